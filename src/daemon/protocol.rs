//! The daemon's wire protocol: one JSON request per line, at most
//! [`MAX_MESSAGE`] bytes, the attach request with its fds.

#[allow(clippy::wildcard_imports)]
use super::*;

/// Largest request line.
pub const MAX_MESSAGE: usize = 1 << 20;

/// A request on the control socket.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Attach a VM (two fds come with it).
    Attach(AttachRequest),
    /// Stop serving this connection's VM.
    Pause,
    /// Serve it again.
    Resume,
    /// Report.
    Status,
}

/// What a VMM tells the daemon about its VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachRequest {
    /// vCPUs (rings).
    pub vcpus: u32,
    /// `pvm`, `vmx` or `svm`.
    pub backend: String,
    /// Guest RAM size (the guest memfd's size).
    pub ram_size: u64,
    /// Shared region GPA (= offset in the guest memfd).
    pub shared_gpa: u64,
    /// Shared region size.
    pub shared_size: u64,
    /// Page-table pool GPA.
    pub pool_gpa: u64,
    /// Page-table pool size.
    pub pool_size: u64,
    /// Image start.
    pub image_gpa: u64,
    /// Image end.
    pub image_end: u64,
    /// First byte of free RAM.
    pub free_gpa: u64,
    /// Per vCPU: its CPUID table as `[function, index, flags, eax, ebx, ecx, edx]`.
    pub cpuid: Vec<Vec<[u32; 7]>>,
    /// Serve vCPU 0's packet device too: the message then carries two more
    /// fds, the device's UDP socket and vCPU 0's irqfd (an eventfd), and the
    /// daemon maps the free RAM (`free_gpa` ..`ram_size`) for its buffers.
    #[serde(default)]
    pub packet_device: bool,
}
