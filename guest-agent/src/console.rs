//! The console: a line buffer in the vCPU's shared block, flushed to the VMM
//! with one PIO exit per line.

use core::fmt::{self, Write};

use shm_proto::layout::{VCPU_AREA_GPA, VCPU_AREA_STRIDE};
use shm_proto::ring::{VcpuShared, CONSOLE_BYTES};

use crate::Env;

/// A line writer for one vCPU.
pub struct Console {
    buf: *mut u8,
    len: usize,
    port: u16,
}

impl Console {
    /// The console of the vCPU that `env` describes.
    pub fn new(env: &Env) -> Console {
        Console::for_shared(env.shared, env.boot.console_port)
    }

    fn for_shared(shared: &VcpuShared, port: u16) -> Console {
        Console { buf: shared.console.as_ptr().cast_mut(), len: 0, port }
    }

    /// Sends what is buffered, if anything.
    pub fn flush(&mut self) {
        if self.len > 0 {
            // CONSOLE_BYTES fits in u32.
            #[allow(clippy::cast_possible_truncation)]
            crate::arch::outl(self.port, self.len as u32);
            self.len = 0;
        }
    }
}

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if self.len == CONSOLE_BYTES {
                self.flush();
            }
            // SAFETY: buf points at this vCPU's console buffer of CONSOLE_BYTES
            // bytes, len < CONSOLE_BYTES, and only this vCPU writes it (the VMM
            // reads it while the vCPU is stopped in the PIO exit).
            unsafe { self.buf.add(self.len).write_volatile(b) };
            self.len += 1;
            if b == b'\n' {
                self.flush();
            }
        }
        Ok(())
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        self.flush();
    }
}

/// The vCPU whose stack we run on (handlers have no `Env`).
pub fn current_vcpu() -> Option<u32> {
    let rsp: u64;
    // SAFETY: reads RSP only.
    unsafe { core::arch::asm!("mov {}, rsp", out(reg) rsp, options(nomem, nostack, preserves_flags)) };
    u32::try_from(rsp.checked_sub(VCPU_AREA_GPA)? / VCPU_AREA_STRIDE).ok()
}

/// Prints a panic on the console of whichever vCPU panicked.
pub fn print_panic(info: &core::panic::PanicInfo) {
    let Some(vcpu) = current_vcpu() else { return };
    let Some(env) = Env::for_vcpu(crate::boot_info(), vcpu) else { return };
    let mut c = Console::new(&env);
    let _ = writeln!(c, "guest panic on vCPU {vcpu}: {info}");
}

/// `println!` for the guest: `gprintln!(env, "fmt", args…)`.
#[macro_export]
macro_rules! gprintln {
    ($env:expr, $($arg:tt)*) => {{
        use core::fmt::Write as _;
        let mut c = $crate::console::Console::new($env);
        let _ = writeln!(c, $($arg)*);
    }};
}
