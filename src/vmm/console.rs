//! What of the guest's console reaches the VMM's output: escaped, so that a
//! guest cannot drive the terminal (only `\n` and `\t` pass as they are;
//! every other control byte, escape sequences included, and every byte
//! above ASCII is written as `\xNN`), and rate-limited per VM by a token
//! bucket, so that a guest cannot flood it. Lines that do not fit are
//! dropped whole, and counted: the next line that fits (or the end of the
//! run) is preceded by one `[console: N bytes dropped]` line.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Bytes per second a VM's console may write, sustained.
pub const CONSOLE_RATE: u64 = 4096;
/// Bytes it may write at once after a quiet spell.
pub const CONSOLE_BURST: u64 = 32 * 1024;

/// Appends `raw` to `out` with everything but printable ASCII, `\n` and
/// `\t` written as `\xNN` (and `\` as `\\`, so that the escaping is
/// unambiguous).
pub fn escape_into(raw: &[u8], out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for &b in raw {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' | b'\t' | 0x20..=0x7e => out.push(b),
            _ => out.extend_from_slice(&[b'\\', b'x', HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]]),
        }
    }
}

/// A token bucket of bytes: `rate` a second, at most `burst` saved up.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    rate: u64,
    burst: u64,
    tokens: u64,
    /// Time up to which refills are accounted.
    last: Instant,
}

impl TokenBucket {
    /// A full bucket at `now`.
    pub fn new(rate: u64, burst: u64, now: Instant) -> TokenBucket {
        TokenBucket { rate, burst, tokens: burst, last: now }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last);
        let earned = elapsed.as_nanos().saturating_mul(u128::from(self.rate)) / 1_000_000_000;
        let earned = u64::try_from(earned).unwrap_or(u64::MAX);
        self.tokens = self.tokens.saturating_add(earned).min(self.burst);
        if self.tokens == self.burst || self.rate == 0 {
            self.last = now;
        } else {
            // Advance only by the time the earned tokens stand for: the
            // fraction of a token left over is kept for the next refill.
            let ns = u128::from(earned).saturating_mul(1_000_000_000) / u128::from(self.rate);
            self.last += Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX));
        }
    }

    /// Takes `n` tokens at `now` if there are that many; whether it did.
    pub fn take(&mut self, n: u64, now: Instant) -> bool {
        self.refill(now);
        if n <= self.tokens {
            self.tokens -= n;
            true
        } else {
            false
        }
    }
}

/// One VM's console budget and the bytes it dropped since the last report.
#[derive(Clone, Debug)]
pub struct ConsoleLimiter {
    bucket: TokenBucket,
    dropped: u64,
}

impl ConsoleLimiter {
    /// [`CONSOLE_RATE`] with a [`CONSOLE_BURST`], full at `now`.
    pub fn new(now: Instant) -> ConsoleLimiter {
        ConsoleLimiter::with(TokenBucket::new(CONSOLE_RATE, CONSOLE_BURST, now))
    }

    /// With this bucket.
    pub fn with(bucket: TokenBucket) -> ConsoleLimiter {
        ConsoleLimiter { bucket, dropped: 0 }
    }

    /// What to write for the (escaped) line `line` at `now`: the report of
    /// the bytes dropped before it, if any, then the line; nothing if the
    /// two do not fit in the budget (the line is counted as dropped). The
    /// report is paid for too: the output never exceeds the budget.
    pub fn admit(&mut self, line: &[u8], now: Instant) -> Vec<u8> {
        let n = u64::try_from(line.len()).unwrap_or(u64::MAX);
        let report = report_line(self.dropped);
        let cost = n.saturating_add(u64::try_from(report.len()).unwrap_or(u64::MAX));
        if !self.bucket.take(cost, now) {
            self.dropped = self.dropped.saturating_add(n);
            return Vec::new();
        }
        self.dropped = 0;
        let mut out = report;
        out.extend_from_slice(line);
        out
    }

    /// The `[console: N bytes dropped]` line for what was dropped since the
    /// last report (empty if nothing was); resets the count.
    pub fn report(&mut self) -> Vec<u8> {
        report_line(std::mem::take(&mut self.dropped))
    }
}

fn report_line(dropped: u64) -> Vec<u8> {
    match dropped {
        0 => Vec::new(),
        n => format!("[console: {n} bytes dropped]\n").into_bytes(),
    }
}

/// A VM's console writer for one vCPU: each `write` is one guest line,
/// escaped and admitted by the VM's shared [`ConsoleLimiter`].
pub struct GuardedConsole<W: Write> {
    inner: W,
    limiter: Arc<Mutex<ConsoleLimiter>>,
    escaped: Vec<u8>,
}

impl<W: Write> GuardedConsole<W> {
    /// Writes to `inner` within `limiter`'s budget.
    pub fn new(inner: W, limiter: Arc<Mutex<ConsoleLimiter>>) -> GuardedConsole<W> {
        GuardedConsole { inner, limiter, escaped: Vec::new() }
    }
}

impl<W: Write> Write for GuardedConsole<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.escaped.clear();
        escape_into(buf, &mut self.escaped);
        let out = {
            let mut l = self.limiter.lock().map_err(|_| std::io::Error::other("console limiter poisoned"))?;
            l.admit(&self.escaped, Instant::now())
        };
        if !out.is_empty() {
            self.inner.write_all(&out)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn esc(raw: &[u8]) -> String {
        let mut v = Vec::new();
        escape_into(raw, &mut v);
        String::from_utf8(v).unwrap()
    }

    #[test]
    fn escaping_keeps_text_newlines_and_tabs_and_neuters_the_rest() {
        assert_eq!(esc(b"selftest: ok\tyes\n"), "selftest: ok\tyes\n");
        assert_eq!(esc(b"\x1b[2J\x1b]0;pwned\x07"), "\\x1b[2J\\x1b]0;pwned\\x07");
        assert_eq!(esc(b"a\rb\x00\x7f\x9b\xff"), "a\\x0db\\x00\\x7f\\x9b\\xff");
        assert_eq!(esc(b"back\\slash"), "back\\\\slash");
        // Whatever the guest writes, what comes out is printable ASCII,
        // newlines and tabs.
        let all: Vec<u8> = (0..=255u8).collect();
        assert!(esc(&all).bytes().all(|b| b == b'\n' || b == b'\t' || (0x20..=0x7e).contains(&b)));
    }

    #[test]
    fn the_bucket_allows_a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000, 100, t0);
        assert!(b.take(100, t0));
        assert!(!b.take(1, t0));
        // 1000 bytes/s: 10 ms earn 10 bytes, in small steps too.
        for i in 1..=10 {
            assert!(b.take(1, t0 + Duration::from_millis(i)), "step {i}");
        }
        assert!(!b.take(1, t0 + Duration::from_millis(10)));
        // A long pause refills to the burst, no more.
        let t1 = t0 + Duration::from_secs(3600);
        assert!(b.take(100, t1));
        assert!(!b.take(1, t1));
    }

    #[test]
    fn fractions_of_a_token_are_not_lost() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(3, 10, t0);
        assert!(b.take(10, t0));
        // 3 tokens a second, asked every 100 ms for 10 s: 30 tokens.
        let got = (1..=100).filter(|i| b.take(1, t0 + Duration::from_millis(100 * i))).count();
        assert_eq!(got, 30);
    }

    #[test]
    fn dropped_lines_are_counted_and_reported_once() {
        let t0 = Instant::now();
        let mut l = ConsoleLimiter::with(TokenBucket::new(20, 40, t0));
        let a = [b'a'; 30];
        assert_eq!(l.admit(&a, t0), a, "30 of 40 tokens");
        assert!(l.admit(b"0123456789\n", t0).is_empty(), "11 bytes, 10 tokens left");
        // 4 bytes would fit, not with the 28-byte report before them.
        assert!(l.admit(b"abc\n", t0).is_empty());
        let t1 = t0 + Duration::from_secs(2);
        assert_eq!(l.admit(b"ok\n", t1), b"[console: 15 bytes dropped]\nok\n");
        assert_eq!(l.admit(b"ok\n", t1), b"ok\n");
        assert!(l.report().is_empty());
    }

    #[test]
    fn a_flood_through_the_writer_stays_within_the_budget() {
        let sink = Arc::new(Mutex::new(Vec::new()));
        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl Write for Sink {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let limiter = Arc::new(Mutex::new(ConsoleLimiter::new(Instant::now())));
        let mut c = GuardedConsole::new(Sink(sink.clone()), limiter.clone());
        let line = [0x1bu8; 255];
        for _ in 0..10_000 {
            c.write_all(&line).unwrap();
        }
        let out = sink.lock().unwrap();
        // The burst plus what the rate earned meanwhile (the loop is quick).
        assert!(out.len() as u64 <= CONSOLE_BURST + CONSOLE_RATE * 10, "{} bytes passed", out.len());
        assert!(!out.contains(&0x1b), "an escape byte reached the output");
        let report = String::from_utf8(limiter.lock().unwrap().report()).unwrap();
        assert!(report.starts_with("[console: ") && report.ends_with(" bytes dropped]\n"), "{report}");
    }
}
