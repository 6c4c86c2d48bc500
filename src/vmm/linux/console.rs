//! The Linux guest's console: rust-vmm's 8250 (`vm-superio`) at COM1,
//! interrupting on IRQ 4 through an irqfd, its output to the run's console
//! sink with the last lines kept (a panic's report shows them) and watched
//! for the kernel's panic banner.

use std::collections::VecDeque;
use std::io::Write;

use vmm_sys_util::eventfd::EventFd;

use crate::vmm::ConsoleSink;

/// COM1's first port.
pub const COM1: u16 = 0x3f8;
/// COM1's ports.
pub const COM1_PORTS: u16 = 8;
/// COM1's ISA interrupt (GSI 4 on KVM's default routing).
pub const COM1_GSI: u32 = 4;
/// Console lines kept for a failure report.
pub const TAIL_LINES: usize = 40;
/// The kernel's panic banner.
pub const PANIC_BANNER: &str = "Kernel panic - not syncing";
/// The line that ends a panic's report.
pub const PANIC_END: &str = "---[ end Kernel panic";

/// The serial interrupt: a write to the irqfd KVM injects as IRQ 4.
pub struct IrqLine(pub EventFd);

impl vm_superio::Trigger for IrqLine {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// What the console has seen of a panic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PanicSeen {
    /// No panic.
    #[default]
    None,
    /// The banner came.
    Banner,
    /// The report ended too.
    Ended,
}

/// The serial port's output: to the sink, with the last [`TAIL_LINES`]
/// lines kept and a panic noticed.
pub struct ConsoleTail {
    sink: ConsoleSink,
    line: Vec<u8>,
    tail: VecDeque<String>,
    panic: PanicSeen,
}

impl ConsoleTail {
    /// Output to `sink`.
    pub fn new(sink: ConsoleSink) -> ConsoleTail {
        ConsoleTail { sink, line: Vec::new(), tail: VecDeque::new(), panic: PanicSeen::None }
    }

    /// The last lines (the one being written included).
    pub fn last_lines(&self) -> Vec<String> {
        let mut v: Vec<String> = self.tail.iter().cloned().collect();
        if !self.line.is_empty() {
            v.push(String::from_utf8_lossy(&self.line).into_owned());
        }
        v
    }

    /// What it has seen of a panic.
    pub fn panic(&self) -> PanicSeen {
        self.panic
    }

    fn end_line(&mut self) {
        let text = String::from_utf8_lossy(&self.line).trim_end_matches('\r').to_string();
        self.line.clear();
        if text.contains(PANIC_BANNER) && self.panic == PanicSeen::None {
            self.panic = PanicSeen::Banner;
        }
        if text.contains(PANIC_END) && self.panic != PanicSeen::None {
            self.panic = PanicSeen::Ended;
        }
        if self.tail.len() == TAIL_LINES {
            self.tail.pop_front();
        }
        self.tail.push_back(text);
    }
}

impl Write for ConsoleTail {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for &b in buf {
            if b == b'\n' {
                self.end_line();
            } else if self.line.len() < 4096 {
                self.line.push(b);
            }
        }
        // The console is the guest's: a closed stdout must not stop it.
        let _ = self.sink.write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = self.sink.flush();
        Ok(())
    }
}

/// COM1.
pub type Com1 = vm_superio::Serial<IrqLine, vm_superio::serial::NoEvents, ConsoleTail>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn keeps_the_last_lines_and_sees_a_panic_through_to_its_end() {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let mut t = ConsoleTail::new(ConsoleSink::Capture(buf.clone()));
        for i in 0..(TAIL_LINES + 5) {
            write!(t, "line {i}\r\n").unwrap();
        }
        assert_eq!(t.last_lines().len(), TAIL_LINES);
        assert_eq!(t.last_lines()[0], "line 5");
        assert_eq!(t.panic(), PanicSeen::None);
        t.write_all(b"[    1.0] Kernel panic - not syncing: Attempted to kill init!\n").unwrap();
        assert_eq!(t.panic(), PanicSeen::Banner);
        t.write_all(b"[    1.1] ---[ end Kernel panic - not syncing: Attempted to kill init! ]---\npartial").unwrap();
        assert_eq!(t.panic(), PanicSeen::Ended);
        assert_eq!(t.last_lines().last().map(String::as_str), Some("partial"));
        assert!(buf.lock().unwrap().ends_with(b"partial"), "everything reaches the sink");
    }

    #[test]
    fn the_serial_port_prints_and_interrupts() {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let irq = IrqLine(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let mut s: Com1 = vm_superio::Serial::new(irq, ConsoleTail::new(ConsoleSink::Capture(buf.clone())));
        // Enable the THR-empty interrupt (IER bit 1), then write a byte.
        s.write(1, 0x2).unwrap();
        s.write(0, b'A').unwrap();
        assert_eq!(&*buf.lock().unwrap(), b"A");
        assert!(s.interrupt_evt().0.read().unwrap() >= 1);
    }
}
