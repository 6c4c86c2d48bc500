//! A vCPU's binary statistics (KVM_GET_STATS_FD), used to count guest exits
//! as PVM.md section 8 says: `exits` - `irq_exits` - `pf_taken`.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

/// KVM_GET_STATS_FD = _IO(KVMIO, 0xce).
const KVM_GET_STATS_FD: libc::c_ulong = 0xaece;
/// Size of `struct kvm_stats_header`.
const HEADER_SIZE: usize = 24;
/// Size of `struct kvm_stats_desc` without its name.
const DESC_SIZE: usize = 16;
/// KVM_STATS_TYPE_MASK.
const TYPE_MASK: u32 = 0xf;
/// KVM_STATS_TYPE_CUMULATIVE.
const TYPE_CUMULATIVE: u32 = 0;

/// Reading the stats failed.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    /// The ioctl failed.
    #[error("KVM_GET_STATS_FD failed (kernel older than 5.14?)")]
    Open(#[source] std::io::Error),
    /// Reading the fd failed.
    #[error("reading the vCPU stats fd failed")]
    Read(#[source] std::io::Error),
    /// The header or a descriptor is malformed.
    #[error("malformed KVM stats data: {0}")]
    Malformed(&'static str),
}

/// A vCPU's stats, by name.
pub struct VcpuStats {
    file: File,
    data_offset: u64,
    /// (name, index of its u64 in the data block) for cumulative scalars.
    fields: Vec<(String, usize)>,
    data_len: usize,
}

fn u32_at(b: &[u8], off: usize) -> Result<u32, StatsError> {
    b.get(off..off + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_ne_bytes)
        .ok_or(StatsError::Malformed("short read"))
}

impl VcpuStats {
    /// Opens the stats of the vCPU behind `vcpu_fd`.
    pub fn open(vcpu_fd: &impl AsRawFd) -> Result<VcpuStats, StatsError> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new fd or -1.
        let fd = unsafe { libc::ioctl(vcpu_fd.as_raw_fd(), KVM_GET_STATS_FD, 0) };
        if fd < 0 {
            return Err(StatsError::Open(std::io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh descriptor that we own from here on.
        let file = unsafe { File::from_raw_fd(fd) };
        let mut hdr = [0u8; HEADER_SIZE];
        file.read_exact_at(&mut hdr, 0).map_err(StatsError::Read)?;
        let name_size = u32_at(&hdr, 4)? as usize;
        let num_desc = u32_at(&hdr, 8)? as usize;
        let desc_offset = u64::from(u32_at(&hdr, 16)?);
        let data_offset = u64::from(u32_at(&hdr, 20)?);
        if num_desc > 4096 || name_size > 4096 {
            return Err(StatsError::Malformed("implausible descriptor count"));
        }
        let stride = DESC_SIZE + name_size;
        let mut descs = vec![0u8; stride * num_desc];
        file.read_exact_at(&mut descs, desc_offset).map_err(StatsError::Read)?;
        let mut fields = Vec::new();
        let mut data_len = 0;
        for d in descs.chunks_exact(stride) {
            let flags = u32_at(d, 0)?;
            let size = usize::from(u16::from_ne_bytes([d[6], d[7]]));
            let offset = u32_at(d, 8)? as usize;
            data_len = data_len.max(offset + size * 8);
            let name_bytes = &d[DESC_SIZE..];
            let end = name_bytes.iter().position(|&c| c == 0).unwrap_or(name_bytes.len());
            let name = String::from_utf8_lossy(&name_bytes[..end]).into_owned();
            if size == 1 && flags & TYPE_MASK == TYPE_CUMULATIVE {
                fields.push((name, offset / 8));
            }
        }
        Ok(VcpuStats { file, data_offset, fields, data_len })
    }

    /// Reads every cumulative counter now.
    pub fn read(&self) -> Result<StatsSample, StatsError> {
        let mut buf = vec![0u8; self.data_len];
        self.file.read_exact_at(&mut buf, self.data_offset).map_err(StatsError::Read)?;
        let mut values = Vec::with_capacity(self.fields.len());
        for (name, i) in &self.fields {
            let v = buf
                .get(i * 8..i * 8 + 8)
                .and_then(|s| s.try_into().ok())
                .map(u64::from_ne_bytes)
                .ok_or(StatsError::Malformed("descriptor offset past data"))?;
            values.push((name.clone(), v));
        }
        Ok(StatsSample { values })
    }
}

/// Cumulative counters at one moment.
#[derive(Clone, Debug, Default)]
pub struct StatsSample {
    values: Vec<(String, u64)>,
}

impl StatsSample {
    /// The counter `name` (0 if this kernel does not have it).
    pub fn get(&self, name: &str) -> u64 {
        self.values.iter().find(|(n, _)| n == name).map_or(0, |(_, v)| *v)
    }

    /// Guest-caused exits between `self` and a later sample `after`:
    /// `exits` - `irq_exits` - `pf_taken` (PVM.md section 8).
    pub fn guest_exits_until(&self, after: &StatsSample) -> i64 {
        let d = |n: &str| i128::from(after.get(n)) - i128::from(self.get(n));
        let v = d("exits") - d("irq_exits") - d("pf_taken");
        i64::try_from(v).unwrap_or(i64::MAX)
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)]
mod tests {
    use super::*;

    #[test]
    fn guest_exits_subtract_host_interrupts_and_shadow_faults() {
        let a = StatsSample { values: vec![("exits".into(), 100), ("irq_exits".into(), 10), ("pf_taken".into(), 5)] };
        let b = StatsSample { values: vec![("exits".into(), 130), ("irq_exits".into(), 20), ("pf_taken".into(), 25)] };
        assert_eq!(a.guest_exits_until(&b), 0);
        let c = StatsSample { values: vec![("exits".into(), 133), ("irq_exits".into(), 20), ("pf_taken".into(), 25)] };
        assert_eq!(a.guest_exits_until(&c), 3);
        assert_eq!(a.get("missing"), 0);
    }
}
