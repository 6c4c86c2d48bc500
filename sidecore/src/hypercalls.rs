//! The registry hypercalls the VMM registers on every VM. They have a
//! userspace exit path (the PIO mailbox) and a sidecall path.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::hostmem::HostShared;
use crate::service::{RegistryError, Services};
use shm_proto::op::{Status, HC_COUNTER_ADD, HC_MIX, HC_MONOTONIC_NS, WORDS};

/// Host CLOCK_MONOTONIC in ns.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: ts is a valid timespec to write; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let s = u64::try_from(ts.tv_sec).unwrap_or(0);
    let ns = u64::try_from(ts.tv_nsec).unwrap_or(0);
    s.saturating_mul(1_000_000_000).saturating_add(ns)
}

/// Registers the VMM's hypercalls; `host` holds the per-vCPU counters of
/// [`HC_COUNTER_ADD`] (shared with a daemon, if one serves the VM).
pub fn register_vmm_hypercalls(s: &mut Services, host: Arc<HostShared>) -> Result<(), RegistryError> {
    s.register(HC_MONOTONIC_NS, Box::new(|_, _| Ok([monotonic_ns(), 0, 0, 0, 0, 0])))?;
    s.register(
        HC_COUNTER_ADD,
        Box::new(move |ctx, w| {
            let c = host.counter(ctx.vcpu).ok_or(Status::HostError)?;
            let v = c.fetch_add(w[0], Ordering::Relaxed).wrapping_add(w[0]);
            Ok([v, 0, 0, 0, 0, 0])
        }),
    )?;
    s.register(
        HC_MIX,
        Box::new(|ctx, w: &[u64; WORDS]| {
            Ok([w[0].wrapping_mul(3).wrapping_add(w[1] ^ u64::from(ctx.vcpu)), 0, 0, 0, 0, 0])
        }),
    )?;
    Ok(())
}

/// The service set of one VM, as its VMM and the daemon both build it:
/// CPUID from the vCPUs' tables, the page-table service, and the VMM's
/// hypercalls over the VM's host-private state.
pub fn vm_services(
    cpuid: Vec<crate::cpuid::CpuidTable>,
    pte: Option<crate::pte::PteService>,
    host: Arc<HostShared>,
) -> Result<Services, RegistryError> {
    let mut s = Services::new(cpuid);
    if let Some(pte) = pte {
        s.set_pte(pte);
    }
    register_vmm_hypercalls(&mut s, host)?;
    Ok(s)
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)]
mod tests {
    use super::*;
    use crate::service::CallCtx;
    use shm_proto::op::encode_head;

    #[test]
    fn vmm_hypercalls_answer() {
        let mut s = Services::new(vec![]);
        let host = HostShared::alloc(1).unwrap();
        register_vmm_hypercalls(&mut s, host.clone()).unwrap();
        let c1 = CallCtx { vcpu: 1 };
        assert_eq!(s.dispatch(&c1, encode_head(HC_COUNTER_ADD, 0), &[5, 0, 0, 0, 0, 0]).1[0], 5);
        assert_eq!(s.dispatch(&c1, encode_head(HC_COUNTER_ADD, 0), &[6, 0, 0, 0, 0, 0]).1[0], 11);
        assert_eq!(host.counter(0).unwrap().load(Ordering::Relaxed), 0);
        assert_eq!(s.dispatch(&CallCtx { vcpu: 99 }, encode_head(HC_COUNTER_ADD, 0), &[1; 6]).0, Status::HostError);
        assert_eq!(s.dispatch(&c1, encode_head(HC_MIX, 0), &[2, 4, 0, 0, 0, 0]).1[0], 6 + (4 ^ 1));
        let t = s.dispatch(&c1, encode_head(HC_MONOTONIC_NS, 0), &[0; 6]);
        assert_eq!(t.0, Status::Ok);
        assert!(t.1[0] > 0);
    }
}
