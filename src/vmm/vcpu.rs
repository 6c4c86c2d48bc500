//! The vCPU: its exits, translated from `kvm_ioctls::VcpuExit` into the
//! project's own [`Exit`] at one boundary, handled by a function that can be
//! tested with fabricated exits, and the run loop of its pinned thread.

use std::io::Write;
use std::sync::atomic::Ordering;

use kvm_ioctls::{VcpuExit, VcpuFd};
use shm_proto::boot::BootInfo;
use shm_proto::op::{self, Opcode, Status};
use shm_proto::ring::{word_ticket, Body, VcpuShared, CONSOLE_BYTES};
use sidecore_core::service::{CallCtx, Services};
use sidecore_core::stats::VmStats;

/// A VM exit, as this VMM sees it.
#[derive(Debug)]
pub enum Exit<'a> {
    /// PIO write.
    PortOut {
        /// Port.
        port: u16,
        /// Data (1, 2 or 4 bytes).
        data: &'a [u8],
    },
    /// PIO read.
    PortIn {
        /// Port.
        port: u16,
        /// Where the answer goes.
        data: &'a mut [u8],
    },
    /// MMIO write (e.g. a store into the read-only page-table pool).
    MmioWrite {
        /// Guest-physical address.
        addr: u64,
        /// Data.
        data: &'a [u8],
    },
    /// MMIO read of unbacked memory.
    MmioRead {
        /// Guest-physical address.
        addr: u64,
        /// Where the answer goes.
        data: &'a mut [u8],
    },
    /// The guest halted with no in-kernel irqchip to wake it.
    Hlt,
    /// Triple fault or shutdown.
    Shutdown,
    /// KVM could not emulate something.
    InternalError,
    /// VM entry failed.
    FailEntry(u64),
    /// Interrupted by a signal.
    Interrupted,
    /// Anything else.
    Other(&'static str),
}

impl<'a> From<VcpuExit<'a>> for Exit<'a> {
    fn from(e: VcpuExit<'a>) -> Exit<'a> {
        match e {
            VcpuExit::IoOut(port, data) => Exit::PortOut { port, data },
            VcpuExit::IoIn(port, data) => Exit::PortIn { port, data },
            VcpuExit::MmioWrite(addr, data) => Exit::MmioWrite { addr, data },
            VcpuExit::MmioRead(addr, data) => Exit::MmioRead { addr, data },
            VcpuExit::Hlt => Exit::Hlt,
            VcpuExit::Shutdown => Exit::Shutdown,
            VcpuExit::InternalError => Exit::InternalError,
            VcpuExit::FailEntry(reason, _cpu) => Exit::FailEntry(reason),
            VcpuExit::Intr => Exit::Interrupted,
            VcpuExit::Exception => Exit::Other("exception"),
            VcpuExit::Debug(_) => Exit::Other("debug"),
            VcpuExit::Hypercall(_) => Exit::Other("hypercall"),
            VcpuExit::SystemEvent(..) => Exit::Other("system event"),
            _ => Exit::Other("unexpected exit reason"),
        }
    }
}

/// What the run loop does after an exit.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Run the guest again.
    Resume,
    /// The guest reported its status; stop this vCPU.
    Exited(u32),
    /// A phase marker: the run loop samples its counters, then resumes.
    Marker(u32),
    /// A control request: the run loop passes it on, then resumes.
    Control(u32),
    /// The bench's PIO write ([`shm_proto::bench::BENCH_BLOCK_READY`]: a
    /// block is ready; [`shm_proto::bench::BENCH_ARM_FLOOR`]: arm the guest
    /// floor): the run loop handles it, then resumes.
    Bench(u32),
    /// The guest queued packets on the packet device's tx queue (its exit
    /// path): the run loop sends them, then resumes.
    PacketTx,
    /// The guest cannot go on (the message says why); dump registers and stop.
    Fault(String),
}

/// Counters of the exit paths of one vCPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitCounts {
    /// Exit-path calls (PIO mailbox).
    pub calls: u64,
    /// Null-call PIO exits.
    pub null: u64,
    /// Console lines.
    pub console: u64,
    /// MMIO writes.
    pub mmio_writes: u64,
    /// Exits of no known purpose (unknown ports).
    pub unknown: u64,
    /// MMIO reads and writes at a GPA no device and no trap path serves
    /// (a guest that maps addresses past its RAM with tables of its own):
    /// reads get all-ones, writes are dropped.
    pub stray_mmio: u64,
}

/// Handles one vCPU's exits.
pub struct ExitHandler<'a, W: Write> {
    /// vCPU index.
    pub vcpu: u32,
    /// The vCPU's shared block (mailbox, console buffer).
    pub shared: &'a VcpuShared,
    /// The VM's services.
    pub services: &'a Services,
    /// Counters of exit-path calls by op and status.
    pub stats: &'a VmStats,
    /// Ports, from the boot-info page.
    pub boot: &'a BootInfo,
    /// Where console lines go.
    pub console: W,
    /// Counters.
    pub counts: ExitCounts,
}

fn port_value(data: &[u8]) -> u32 {
    let mut b = [0u8; 4];
    for (d, s) in b.iter_mut().zip(data) {
        *d = *s;
    }
    u32::from_le_bytes(b)
}

impl<W: Write> ExitHandler<'_, W> {
    /// Handles `exit`.
    pub fn handle(&mut self, exit: Exit) -> Action {
        match exit {
            Exit::PortOut { port, data } => self.port_out(port, port_value(data)),
            Exit::PortIn { data, .. } => {
                data.fill(0xff);
                self.counts.unknown += 1;
                Action::Resume
            }
            Exit::MmioWrite { addr, data } => {
                self.counts.mmio_writes += 1;
                if self.in_trap_view(addr) {
                    self.pte_trap(addr, data);
                } else {
                    self.stray_mmio("write", addr);
                }
                Action::Resume
            }
            Exit::MmioRead { addr, data } => {
                data.fill(0xff);
                self.stray_mmio("read", addr);
                Action::Resume
            }
            Exit::Interrupted => Action::Resume,
            Exit::Hlt => Action::Fault("the guest halted (HLT) with nothing to wake it".into()),
            Exit::Shutdown => Action::Fault("the guest shut down (triple fault)".into()),
            Exit::InternalError => Action::Fault("KVM internal error (emulation failure)".into()),
            Exit::FailEntry(r) => Action::Fault(format!("VM entry failed, hardware reason {r:#x}")),
            Exit::Other(what) => Action::Fault(format!("unexpected exit: {what}")),
        }
    }

    fn port_out(&mut self, port: u16, value: u32) -> Action {
        let b = self.boot;
        if port == b.console_port {
            self.console_line(value);
            Action::Resume
        } else if port == b.call_port {
            self.mailbox_call();
            Action::Resume
        } else if port == b.null_port {
            self.counts.null += 1;
            Action::Resume
        } else if port == b.exit_port {
            Action::Exited(value)
        } else if port == b.marker_port {
            Action::Marker(value)
        } else if port == b.control_port {
            Action::Control(value)
        } else if port == b.bench_port() {
            Action::Bench(value)
        } else if port == shm_proto::boot::PORT_PKT_TX {
            Action::PacketTx
        } else {
            self.counts.unknown += 1;
            Action::Resume
        }
    }

    fn console_line(&mut self, len: u32) {
        self.counts.console += 1;
        let n = usize::try_from(len).unwrap_or(0).min(CONSOLE_BYTES);
        let mut line = Vec::with_capacity(n);
        for b in &self.shared.console[..n] {
            // SAFETY: reading a byte of guest memory; the guest may change it
            // concurrently (a hostile vCPU), which a volatile read tolerates.
            line.push(unsafe { std::ptr::read_volatile(b) });
        }
        let _ = self.console.write_all(&line);
        let _ = self.console.flush();
    }

    /// The exit path of every service: the request is in the mailbox slot,
    /// read once; the reply goes back there.
    fn mailbox_call(&mut self) {
        self.counts.calls += 1;
        let slot = &self.shared.exit_slot;
        let state = slot.state.load(Ordering::Acquire);
        let req = slot.read_body();
        let ticket = word_ticket(state);
        let (status, words) = self.services.dispatch(&CallCtx { vcpu: self.vcpu }, req.head, &req.words);
        // Masked to 16 bits.
        #[allow(clippy::cast_possible_truncation)]
        self.stats.count(op::op_class((req.head & 0xffff) as u16), status);
        slot.publish_reply(ticket, &Body { head: op::encode_status(status), words });
    }
}

impl<W: Write> ExitHandler<'_, W> {
    /// Whether a store at `addr` lands in the page-table pool's trap view
    /// (the pool itself on PVM), aligned or not.
    fn in_trap_view(&self, addr: u64) -> bool {
        let b = self.boot;
        let base = if b.pt_trap_gpa == 0 { b.pt_pool_gpa } else { b.pt_trap_gpa };
        addr >= base && addr - base < b.pt_pool_size
    }

    /// Counts an MMIO access nothing serves, and says so at the 1st, 2nd,
    /// 4th, 8th… one: a guest that floods them gets a few log lines, not one
    /// per exit.
    fn stray_mmio(&mut self, what: &str, addr: u64) {
        self.counts.stray_mmio = self.counts.stray_mmio.saturating_add(1);
        let n = self.counts.stray_mmio;
        if n.is_power_of_two() {
            tracing::warn!(
                "vCPU {}: MMIO {what} at {addr:#x}, where nothing is mapped ({n} so far): reads get all-ones, writes are dropped",
                self.vcpu
            );
        }
    }

    /// The page-table service's trap path: a guest store into the read-only
    /// pool. Decoded into (table, index, entry), applied by the same handler
    /// as the sidecall, the status left in the vCPU's host status word.
    fn pte_trap(&mut self, addr: u64, data: &[u8]) {
        let result = match (self.services.pte(), <[u8; 8]>::try_from(data)) {
            (Some(pte), Ok(bytes)) => {
                let l = pte.layout();
                match self.boot.pt_trap_target(addr) {
                    Some(e) if (l.pool_gpa..l.pool_gpa + l.pool_size).contains(&e) => {
                        pte.update(e & !0xfff, (e & 0xfff) / 8, u64::from_le_bytes(bytes))
                    }
                    _ => Err(Status::BadArgument),
                }
            }
            (None, _) => Err(Status::UnknownOp),
            _ => Err(Status::BadArgument),
        };
        let (status, kind) = match result {
            Ok((kind, _)) => (Status::Ok, kind as u64),
            Err(s) => (s, 0),
        };
        self.stats.count(op::op_class(Opcode::PteUpdate as u16), status);
        self.shared.host.pte_kind.store(kind, Ordering::Relaxed);
        self.shared.host.pte_status.store(status as u64, Ordering::Release);
    }
}

/// Registers and descriptor state of a vCPU, for fault reports.
pub fn describe_registers(vcpu: &VcpuFd) -> String {
    let mut s = String::new();
    match vcpu.get_regs() {
        Ok(r) => {
            s += &format!(
                "rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x}",
                r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi
            );
        }
        Err(e) => s += &format!("(registers unreadable: {e})"),
    }
    if let Ok(sr) = vcpu.get_sregs() {
        s += &format!(
            " cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x} ss={:#x}",
            sr.cr0, sr.cr2, sr.cr3, sr.cr4, sr.efer, sr.cs.selector, sr.ss.selector
        );
    }
    s
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)]
mod tests {
    use super::*;
    use shm_proto::boot::{Backend, MARKER_SIDECALL_BEGIN};
    use shm_proto::op::encode_head;
    use shm_proto::ring::{state_word, SlotState};
    use sidecore_core::cpuid::{CpuidEntry, CpuidTable};

    fn shared() -> Box<VcpuShared> {
        let layout = std::alloc::Layout::new::<VcpuShared>();
        // SAFETY: VcpuShared is atomics and bytes, for which all-zero is valid;
        // the pointer comes from alloc_zeroed with VcpuShared's own layout.
        unsafe {
            let p = std::alloc::alloc_zeroed(layout).cast::<VcpuShared>();
            assert!(!p.is_null());
            Box::from_raw(p)
        }
    }

    fn services() -> Services {
        Services::new(vec![CpuidTable::new(vec![CpuidEntry {
            function: 0,
            eax: 0xd,
            ebx: 1,
            ecx: 2,
            edx: 3,
            ..Default::default()
        }])])
    }

    #[test]
    fn ports_map_to_actions() {
        let sh = shared();
        let sv = services();
        let st = VmStats::default();
        let boot = BootInfo::new(Backend::Pvm);
        let mut out = Vec::new();
        let mut h = ExitHandler {
            vcpu: 0,
            shared: &sh,
            services: &sv,
            stats: &st,
            boot: &boot,
            console: &mut out,
            counts: ExitCounts::default(),
        };
        assert_eq!(h.handle(Exit::PortOut { port: boot.exit_port, data: &7u32.to_le_bytes() }), Action::Exited(7));
        assert_eq!(
            h.handle(Exit::PortOut { port: boot.marker_port, data: &MARKER_SIDECALL_BEGIN.to_le_bytes() }),
            Action::Marker(1)
        );
        assert_eq!(h.handle(Exit::PortOut { port: boot.control_port, data: &[2] }), Action::Control(2));
        assert_eq!(h.handle(Exit::PortOut { port: boot.null_port, data: &[0] }), Action::Resume);
        assert_eq!(h.handle(Exit::PortOut { port: shm_proto::boot::PORT_PKT_TX, data: &[0] }), Action::PacketTx);
        assert_eq!(h.handle(Exit::PortOut { port: 0x1234, data: &[0] }), Action::Resume);
        let mut buf = [0u8; 4];
        assert_eq!(h.handle(Exit::PortIn { port: 0x60, data: &mut buf }), Action::Resume);
        assert_eq!(buf, [0xff; 4]);
        assert!(matches!(h.handle(Exit::Shutdown), Action::Fault(_)));
        assert!(matches!(h.handle(Exit::Hlt), Action::Fault(_)));
        assert!(matches!(h.handle(Exit::FailEntry(0x21)), Action::Fault(m) if m.contains("0x21")));
        assert!(matches!(h.handle(Exit::InternalError), Action::Fault(_)));
        assert_eq!(h.handle(Exit::Interrupted), Action::Resume);
        assert_eq!(h.counts.null, 1);
        assert_eq!(h.counts.unknown, 2);
    }

    #[test]
    fn console_line_is_bounded_by_the_buffer() {
        let sh = shared();
        let sv = services();
        let st = VmStats::default();
        let boot = BootInfo::new(Backend::Pvm);
        let mut out = Vec::new();
        {
            let mut h = ExitHandler {
                vcpu: 0,
                shared: &sh,
                services: &sv,
                stats: &st,
                boot: &boot,
                console: &mut out,
                counts: ExitCounts::default(),
            };
            let p = sh.console.as_ptr().cast_mut();
            // SAFETY: writing the test's own buffer, nobody else touches it.
            unsafe { std::ptr::copy_nonoverlapping(b"hi\n".as_ptr(), p, 3) };
            h.handle(Exit::PortOut { port: boot.console_port, data: &3u32.to_le_bytes() });
            // A hostile length is clamped to the buffer.
            h.handle(Exit::PortOut { port: boot.console_port, data: &u32::MAX.to_le_bytes() });
        }
        assert_eq!(&out[..3], b"hi\n");
        assert_eq!(out.len(), 3 + CONSOLE_BYTES);
    }

    #[test]
    fn mailbox_call_uses_the_shared_handlers() {
        let sh = shared();
        let sv = services();
        let st = VmStats::default();
        let boot = BootInfo::new(Backend::Pvm);
        let mut out = Vec::new();
        let mut h = ExitHandler {
            vcpu: 0,
            shared: &sh,
            services: &sv,
            stats: &st,
            boot: &boot,
            console: &mut out,
            counts: ExitCounts::default(),
        };
        sh.exit_slot.post(0, &Body { head: encode_head(Opcode::Cpuid as u16, 0), words: [0; 6] });
        assert_eq!(h.handle(Exit::PortOut { port: boot.call_port, data: &[0] }), Action::Resume);
        let r = sh.exit_slot.poll_reply(0).expect("reply published");
        assert_eq!(r.head, 0);
        assert_eq!(r.words[..4], [0xd, 1, 2, 3]);
        // Garbage in the mailbox gets an error status, never a panic.
        sh.exit_slot.post(0, &Body { head: u64::MAX, words: [u64::MAX; 6] });
        h.handle(Exit::PortOut { port: boot.call_port, data: &[0] });
        assert_eq!(sh.exit_slot.poll_reply(0).map(|b| b.head), Some(Status::ReservedBits as u64));
        sh.exit_slot.state.store(state_word(77, SlotState::Empty), Ordering::Release);
        h.handle(Exit::PortOut { port: boot.call_port, data: &[0] });
        assert_eq!(st.snapshot().total(), 3);
        assert_eq!(h.counts.calls, 3);
    }

    struct Pool(std::ptr::NonNull<u8>, std::alloc::Layout);
    // SAFETY: test-only plain memory.
    unsafe impl Send for Pool {}
    // SAFETY: test-only plain memory.
    unsafe impl Sync for Pool {}
    impl Drop for Pool {
        fn drop(&mut self) {
            // SAFETY: allocated with this layout below.
            unsafe { std::alloc::dealloc(self.0.as_ptr(), self.1) };
        }
    }

    #[test]
    fn pool_store_is_the_pte_trap_path() {
        use sidecore_core::pte::{PteLayout, PteService, Visibility};
        let layout = std::alloc::Layout::from_size_align(0x4000, 4096).unwrap();
        // SAFETY: non-zero size.
        let p = std::ptr::NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) }).unwrap();
        let owner = std::sync::Arc::new(Pool(p, layout));
        let pl = PteLayout {
            ram_size: 0x100_0000,
            pool_gpa: 0x10_0000,
            pool_size: 0x4000,
            image_gpa: 0x20_0000,
            image_end: 0x21_0000,
            free_gpa: 0x60_0000,
        };
        // SAFETY: the block is pool_size bytes and lives as long as owner.
        let host = sidecore_core::hostmem::HostShared::alloc(4).unwrap();
        for (i, l) in [4u8, 3, 2, 1].iter().enumerate() {
            host.levels()[i].store(*l, Ordering::Relaxed);
        }
        // SAFETY: as above.
        let pte = unsafe { PteService::new(pl, host, p, owner, Visibility::GuestFlush) }.unwrap();
        let mut sv = services();
        sv.set_pte(pte);
        let sh = shared();
        let st = VmStats::default();
        let boot = BootInfo::new(Backend::Pvm);
        let mut out = Vec::new();
        let mut h = ExitHandler {
            vcpu: 0,
            shared: &sh,
            services: &sv,
            stats: &st,
            boot: &boot,
            console: &mut out,
            counts: ExitCounts::default(),
        };
        let store = |h: &mut ExitHandler<&mut Vec<u8>>, addr: u64, v: u64| {
            assert_eq!(h.handle(Exit::MmioWrite { addr, data: &v.to_le_bytes() }), Action::Resume);
            (sh.host.pte_status.load(Ordering::Acquire), sh.host.pte_kind.load(Ordering::Relaxed))
        };
        // A map into the PT (pool page 3), index 2.
        assert_eq!(store(&mut h, 0x10_3010, 0x60_0000 | 1), (Status::Ok as u64, 1));
        // The same handler refuses what the sidecall path refuses.
        assert_eq!(store(&mut h, 0x10_3018, 0x1000 | 1).0, Status::Denied as u64);
        assert_eq!(store(&mut h, 0x10_3018, 0x60_0000 | 1 | 0x80).0, Status::ReservedBits as u64);
        // Torn or misplaced stores.
        assert_eq!(h.handle(Exit::MmioWrite { addr: 0x10_3018, data: &[1, 2, 3, 4] }), Action::Resume);
        assert_eq!(sh.host.pte_status.load(Ordering::Acquire), Status::BadArgument as u64);
        assert_eq!(store(&mut h, 0x10_3019, 0).0, Status::BadArgument as u64);
        // A store outside the pool is no trap-path call: it leaves the status
        // word alone and is counted as stray.
        sh.host.pte_status.store(77, Ordering::Relaxed);
        assert_eq!(store(&mut h, 0x90_0000, 0).0, 77);
        assert_eq!(h.counts.stray_mmio, 1);
        assert_eq!(st.snapshot().get(op::op_class(Opcode::PteUpdate as u16), Status::Ok), 1);
        assert_eq!(h.counts.mmio_writes, 6);
        // With a trap view (hardware KVM) stores arrive there; a store at the
        // pool's own GPA is no trap-path store (the guest maps it read-only).
        let mut hw = BootInfo::new(Backend::Svm);
        hw.pt_trap_gpa = shm_proto::layout::PT_TRAP_GPA;
        h.boot = &hw;
        assert_eq!(store(&mut h, shm_proto::layout::PT_TRAP_GPA + 0x3020, 0x60_1000 | 1), (Status::Ok as u64, 1));
        // ... so it is stray: the status word keeps the Ok of the store before.
        assert_eq!(store(&mut h, 0x10_3028, 0x60_2000 | 1).0, Status::Ok as u64);
        assert_eq!(h.counts.stray_mmio, 2);
    }

    #[test]
    fn stray_mmio_at_any_gpa_is_counted_and_answered() {
        let sh = shared();
        let sv = services();
        let st = VmStats::default();
        let boot = BootInfo::new(Backend::Pvm);
        let mut out = Vec::new();
        let mut h = ExitHandler {
            vcpu: 0,
            shared: &sh,
            services: &sv,
            stats: &st,
            boot: &boot,
            console: &mut out,
            counts: ExitCounts::default(),
        };
        sh.host.pte_status.store(5, Ordering::Relaxed);
        let gpas =
            [0, 0xfff, shm_proto::layout::ZAP_GPA, shm_proto::layout::ZAP_GPA + 8, 1 << 40, u64::MAX - 7, u64::MAX];
        for (i, gpa) in gpas.iter().enumerate() {
            let mut buf = [0u8; 8];
            let n = 1 + i % 8;
            assert_eq!(h.handle(Exit::MmioRead { addr: *gpa, data: &mut buf[..n] }), Action::Resume);
            assert!(buf[..n].iter().all(|b| *b == 0xff), "{gpa:#x}: {buf:?}");
            assert_eq!(h.handle(Exit::MmioWrite { addr: *gpa, data: &buf[..n] }), Action::Resume);
            assert_eq!(h.handle(Exit::MmioWrite { addr: *gpa, data: &[] }), Action::Resume);
        }
        assert_eq!(h.counts.stray_mmio, 3 * gpas.len() as u64);
        // None of it reached the page-table service or its counters.
        assert_eq!(sh.host.pte_status.load(Ordering::Relaxed), 5);
        assert_eq!(st.snapshot().total(), 0);
    }
}
