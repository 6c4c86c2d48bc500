//! Checking an attach request against the memory a VMM sent, and the
//! packet device the daemon builds for an attached VM.

#[allow(clippy::wildcard_imports)]
use super::*;

fn sockopt_int(sock: &File, level: libc::c_int, name: libc::c_int) -> Option<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).ok()?;
    // SAFETY: getsockopt writes at most `len` bytes into `v`, a c_int.
    let rc = unsafe { libc::getsockopt(sock.as_raw_fd(), level, name, (&raw mut v).cast(), &mut len) };
    (rc == 0).then_some(v)
}

/// Whether `sock` is a UDP socket (IPv4 or IPv6), else what it is.
pub(super) fn check_udp(sock: &File, what: &str) -> Result<(), String> {
    let domain = sockopt_int(sock, libc::SOL_SOCKET, libc::SO_DOMAIN);
    let ty = sockopt_int(sock, libc::SOL_SOCKET, libc::SO_TYPE);
    let proto = sockopt_int(sock, libc::SOL_SOCKET, libc::SO_PROTOCOL);
    let udp = matches!(domain, Some(libc::AF_INET | libc::AF_INET6))
        && ty == Some(libc::SOCK_DGRAM)
        && proto == Some(libc::IPPROTO_UDP);
    if udp {
        Ok(())
    } else {
        Err(format!("{what}: not a UDP socket ({}): pass the device's bound UDP socket", fd_kind(sock)))
    }
}

/// The packet device of an attaching VM: its UDP socket (checked to be
/// one), vCPU 0's irqfd (checked to be an eventfd), and a mapping of the
/// guest's free RAM for the buffers; with the counter of its kicks that
/// would have blocked.
pub(super) fn packet_device(
    req: &AttachRequest,
    guest: &File,
    guest_size: u64,
    sock: &File,
    irq: &File,
    region: Arc<SharedRegion>,
    control: Arc<VmControl>,
) -> Result<(sidecore_core::device::PacketDevice, Arc<AtomicU64>), String> {
    use std::os::fd::OwnedFd;
    check_udp(sock, "packet_device: the fourth fd")?;
    if !is_eventfd(irq) {
        return Err(format!("packet_device: the fifth fd is not an eventfd ({}): pass vCPU 0's irqfd", fd_kind(irq)));
    }
    if !req.free_gpa.is_multiple_of(4096) || req.free_gpa >= req.ram_size.min(guest_size) {
        return Err("packet_device: free RAM is empty or misaligned".into());
    }
    let len = req.ram_size.min(guest_size) - req.free_gpa;
    let map = Mapping::new(guest, req.free_gpa, usize::try_from(len).map_err(|_| "free RAM too large")?)
        .map_err(|e| e.to_string())?;
    let base = map.ptr();
    // SAFETY: the mapping is `len` bytes of the guest memfd from free_gpa and
    // lives as long as its owner, which the window holds.
    let window = unsafe { sidecore_core::device::GuestWindow::new(base, req.free_gpa, len, Arc::new(map)) };
    let socket = std::net::UdpSocket::from(OwnedFd::from(sock.try_clone().map_err(|e| format!("socket fd: {e}"))?));
    let kick =
        sidecore_core::device::Kick::new(Arc::new(OwnedFd::from(irq.try_clone().map_err(|e| format!("irqfd: {e}"))?)));
    let blocked = kick.blocked();
    let mut dev = sidecore_core::device::PacketDevice::new(
        region,
        0,
        window,
        socket,
        sidecore_core::device::Delivery::Posted(Some(kick)),
    )
    .map_err(|e| format!("packet_device: {e}"))?;
    dev.set_control(control);
    Ok((dev, blocked))
}

/// Checks an attach request against the sizes of the two memfds that came
/// with it; returns the pool's page count and the host block's length.
/// Everything here comes from another process and is treated as hostile.
pub fn validate_attach(req: &AttachRequest, guest_size: u64, host_size: u64) -> Result<(usize, usize), String> {
    if req.vcpus == 0 || req.vcpus > MAX_VCPUS {
        return Err(format!("vcpus {} out of range 1..={MAX_VCPUS}", req.vcpus));
    }
    if req.cpuid.len() != req.vcpus as usize {
        return Err(format!("{} CPUID tables for {} vCPUs", req.cpuid.len(), req.vcpus));
    }
    if req.cpuid.iter().any(|t| t.len() > sidecore_core::cpuid::MAX_CPUID_ENTRIES) {
        return Err(format!(
            "a CPUID table has more than {} entries (KVM_SET_CPUID2 takes no more)",
            sidecore_core::cpuid::MAX_CPUID_ENTRIES
        ));
    }
    let inside = |gpa: u64, len: u64| {
        gpa.checked_add(len).is_some_and(|e| e <= req.ram_size) && gpa.is_multiple_of(4096) && len > 0
    };
    if req.ram_size > guest_size {
        return Err(format!("ram_size {:#x} exceeds the guest memfd ({guest_size:#x} bytes)", req.ram_size));
    }
    if !inside(req.shared_gpa, req.shared_size) || req.shared_size < region_size(req.vcpus) {
        return Err("shared region outside RAM, misaligned or too small".into());
    }
    if !req.page_tables {
        if req.pool_gpa != 0 || req.pool_size != 0 {
            return Err("a page-table pool with page_tables false: send pool_gpa and pool_size 0".into());
        }
    } else {
        if !inside(req.pool_gpa, req.pool_size) || !req.pool_size.is_multiple_of(4096) {
            return Err("page-table pool outside RAM or misaligned".into());
        }
        let overlap = req.shared_gpa < req.pool_gpa + req.pool_size && req.pool_gpa < req.shared_gpa + req.shared_size;
        if overlap {
            return Err("shared region overlaps the page-table pool".into());
        }
    }
    if req.image_gpa > req.image_end || req.image_end > req.ram_size || req.free_gpa > req.ram_size {
        return Err("image or free RAM range outside RAM".into());
    }
    let pool_pages = usize::try_from(req.pool_size / 4096).map_err(|_| "pool too large")?;
    let host_len = HostShared::size(pool_pages);
    if host_size < host_len as u64 {
        return Err("host-state memfd too small".into());
    }
    Ok((pool_pages, host_len))
}
