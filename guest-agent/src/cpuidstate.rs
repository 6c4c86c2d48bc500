//! Selftest part: CPUID answers that KVM derives from the vCPU's state
//! (leaf 1 OSXSAVE/APIC, leaf 7.0 OSPKE, leaf 0xD.0/0xD.1 XSAVE sizes) must
//! be the same by the backend's instruction, by the VMM's PIO handler and
//! by sidecall, after every change of CR4.OSXSAVE, XCR0, IA32_XSS and CR4.PKE
//! the CPU allows. The state is restored at the end.

use core::fmt::{self, Write as _};

use shm_proto::op::{Opcode, Status, WORDS};

use crate::client::{Client, Via};
use crate::console::Console;
use crate::cpustate::{self, CR4_OSXSAVE, CR4_PKE};
use crate::Env;

/// The leaves KVM rewrites at run time.
const LEAVES: [(u32, u32); 4] = [(1, 0), (7, 0), (0xd, 0), (0xd, 1)];
const LEAF1_ECX_XSAVE: u32 = 1 << 26;
const LEAF7_ECX_PKU: u32 = 1 << 3;
const LEAFD1_EAX_XSAVES: u32 = 1 << 3;
/// XCR0 masks to try, each only if every bit is supported: x87|SSE, +AVX,
/// +MPX, +AVX-512, PKRU with and without AVX (then everything supported).
const XCR0_STEPS: [u64; 6] = [0x3, 0x7, 0x1f, 0xe7, 0x203, 0x207];

struct Run<'a, 'b> {
    env: &'a Env,
    c: &'a mut Client<'b>,
    fail: &'a mut dyn FnMut(fmt::Arguments),
    states: u32,
    failed: u32,
    by_sidecall: u64,
    not_sidecall: u64,
}

impl Run<'_, '_> {
    /// Compares the three paths for every leaf in the current state.
    fn compare(&mut self, what: &str) {
        self.states += 1;
        for (leaf, sub) in LEAVES {
            let k = self.c.kernel_cpuid(leaf, sub).map(u64::from);
            let args: [u64; WORDS] = [u64::from(leaf), u64::from(sub), 0, 0, 0, 0];
            let p = self.c.pio_call(Opcode::Cpuid as u16, args);
            if p.status != Status::Ok || p.words[..4] != k {
                self.failed += 1;
                (self.fail)(format_args!(
                    "CPUID {leaf:#x}.{sub} {what}: PIO handler said {:x?} ({:?}), KVM said {k:x?}",
                    &p.words[..4],
                    p.status
                ));
            }
            if !self.c.sidecalls_enabled() {
                continue;
            }
            match self.c.sidecall(Opcode::Cpuid as u16, args) {
                Some(r) if r.via == Via::Sidecall && r.status != Status::UseExitPath => {
                    self.by_sidecall += 1;
                    if r.status != Status::Ok || r.words[..4] != k {
                        self.failed += 1;
                        (self.fail)(format_args!(
                            "CPUID {leaf:#x}.{sub} {what}: sidecall said {:x?} ({:?}), KVM said {k:x?}",
                            &r.words[..4],
                            r.status
                        ));
                    }
                }
                _ => self.not_sidecall += 1,
            }
        }
    }

    fn note(&self, args: fmt::Arguments) {
        let mut con = Console::new(self.env);
        let _ = writeln!(con, "selftest: vCPU {}: CPUID state: {args}", self.env.vcpu);
    }
}

/// Runs the check; failures go to `fail`.
pub fn run(env: &Env, c: &mut Client, fail: &mut dyn FnMut(fmt::Arguments)) {
    let v = env.vcpu;
    if c.sidecalls_enabled() {
        // The sidecore may still be starting: wait for it (a null call
        // times out in its bound) so that the sidecall path is compared.
        for _ in 0..1000 {
            if c.sidecall(Opcode::Null as u16, [0; WORDS]).is_some() {
                break;
            }
        }
    }
    let mut run = Run { env, c, fail, states: 0, failed: 0, by_sidecall: 0, not_sidecall: 0 };
    run.compare("at boot");
    let l1 = run.c.kernel_cpuid(1, 0);
    if l1[2] & LEAF1_ECX_XSAVE == 0 {
        run.note(format_args!("skipped the CR4/XCR0 changes: the VMM's table has no XSAVE"));
        return;
    }
    let cr4_0 = cpustate::cr4(v);
    let xcr0_0 = cpustate::xcr0(v);
    let d0 = run.c.kernel_cpuid(0xd, 0);
    let supported_xcr0 = u64::from(d0[0]) | (u64::from(d0[3]) << 32);
    let d1 = run.c.kernel_cpuid(0xd, 1);
    let supported_xss = if d1[0] & LEAFD1_EAX_XSAVES != 0 { u64::from(d1[2]) | (u64::from(d1[3]) << 32) } else { 0 };

    let got = cpustate::set_cr4(v, cr4_0 | CR4_OSXSAVE);
    if got & CR4_OSXSAVE == 0 {
        run.note(format_args!("skipped the XCR0 changes: CR4 reads {got:#x} after setting OSXSAVE (refused)"));
        cpustate::set_cr4(v, cr4_0);
        run.compare("after a refused OSXSAVE");
        return;
    }
    run.compare("with CR4.OSXSAVE set");
    let mut tried = 0u32;
    let mut last = xcr0_0;
    let mut xgetbv_differs = None;
    let mut unseen = None;
    for mask in XCR0_STEPS.into_iter().chain([supported_xcr0]) {
        if mask & !supported_xcr0 != 0 || mask & 1 == 0 {
            continue;
        }
        let before = run.c.kernel_cpuid(0xd, 0)[1];
        let back = cpustate::set_xcr0(v, mask);
        if back != mask {
            xgetbv_differs.get_or_insert((mask, back));
        }
        // KVM intercepts XSETBV and resizes leaf 0xD.0 from the XCR0 it
        // holds. An emulated CPU that lets XSETBV through unintercepted
        // (QEMU TCG's nested SVM, the AMD-V bed) leaves KVM's XCR0 stale:
        // then no answer can follow "the same guest state", and XCR0 changes
        // are skipped, saying so.
        let after = run.c.kernel_cpuid(0xd, 0)[1];
        let want = standard_size(run.c, mask);
        if after != want && after == before {
            unseen = Some((mask, before, want));
            cpustate::set_xcr0(v, xcr0_0);
            break;
        }
        last = mask;
        tried += 1;
        run.compare("after XSETBV");
    }
    if let Some((mask, before, want)) = unseen {
        run.note(format_args!(
            "skipped the XCR0 changes from {mask:#x} on: the hypervisor did not see XSETBV (leaf 0xD.0 EBX stayed {before}, {want} expected): an emulated CPU that does not intercept it"
        ));
    }
    let mut xss_tried = false;
    if supported_xss != 0 {
        let back = cpustate::set_xss(v, supported_xss);
        run.compare("with IA32_XSS set");
        if back != supported_xss {
            run.note(format_args!("IA32_XSS reads {back:#x} after writing {supported_xss:#x}"));
        }
        cpustate::set_xss(v, 0);
        run.compare("with IA32_XSS cleared");
        xss_tried = true;
    }
    let pku = run.c.kernel_cpuid(7, 0)[2] & LEAF7_ECX_PKU != 0;
    if pku {
        let got = cpustate::set_cr4(v, cpustate::cr4(v) | CR4_PKE);
        if got & CR4_PKE == 0 {
            run.note(format_args!("CR4.PKE not tested: CR4 reads {got:#x} after setting it (refused)"));
        }
        run.compare("with CR4.PKE set");
        cpustate::set_cr4(v, cpustate::cr4(v) & !CR4_PKE);
        run.compare("with CR4.PKE cleared");
    }
    // KVM keeps XCR0 while OSXSAVE is clear: leaf 0xD still sizes it.
    cpustate::set_cr4(v, cpustate::cr4(v) & !CR4_OSXSAVE);
    run.compare("with CR4.OSXSAVE cleared, XCR0 kept");
    cpustate::set_cr4(v, cpustate::cr4(v) | CR4_OSXSAVE);
    cpustate::set_xcr0(v, xcr0_0);
    cpustate::set_cr4(v, cr4_0);
    run.compare("restored");
    if let Some((mask, back)) = xgetbv_differs {
        // PVM: XGETBV is not intercepted and reads the host's XCR0; KVM's
        // CPUID follows the value written, as the shadow does.
        run.note(format_args!("XGETBV read {back:#x} after XSETBV {mask:#x}: not the guest's XCR0 on this backend"));
    }
    let (n, side, not, bad) = (run.states, run.by_sidecall, run.not_sidecall, run.failed);
    run.note(format_args!(
        "{n} states (CR4.OSXSAVE on/off, {tried} XCR0 values up to {last:#x}{}{}), leaves 1, 7.0, 0xD.0, 0xD.1 by instruction, PIO handler{}: {}",
        if xss_tried { ", IA32_XSS" } else { "" },
        if pku { ", CR4.PKE" } else { "" },
        Sidecalls(run.c.sidecalls_enabled(), side, not),
        if bad == 0 { "alike" } else { "DIFFERENT" },
    ));
}

/// The standard-form XSAVE size for `mask`, from the instruction's own leaf
/// 0xD subleaves (KVM's `xstate_required_size`, uncompacted).
fn standard_size(c: &mut Client, mask: u64) -> u32 {
    let mut size = 512 + 64;
    for i in 2..63u32 {
        if mask & (1u64 << i) != 0 {
            let r = c.kernel_cpuid(0xd, i);
            size = size.max(r[1].saturating_add(r[0]));
        }
    }
    size
}

/// " and sidecall (n sidecalls, m fell back)", or nothing without a sidecore.
struct Sidecalls(bool, u64, u64);

impl fmt::Display for Sidecalls {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        if self.0 {
            write!(f, " and sidecall ({} sidecalls, {} fell back)", self.1, self.2)
        } else {
            write!(f, " (no sidecore)")
        }
    }
}
