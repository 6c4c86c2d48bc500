//! Event subscriptions: a connection that called `subscribe` gets
//! `event` notifications (attach, detach, pause, park, fallback storms).
//!
//! Publishing never blocks and never writes to a socket: each subscriber
//! has a bounded queue and an eventfd, and its own connection thread sends
//! what is queued. A subscriber that does not read loses the events past
//! [`QUEUE`] (counted, and told with a `lost` field on the next event it
//! gets) — and, once its socket buffer is full, its connection after the
//! write deadline: it cannot slow the daemon or the other subscribers.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::protocol::Event;
use super::transport::Conn;

/// Events queued for one subscriber at most.
pub const QUEUE: usize = 1024;

/// Subscribers at most.
pub const MAX_SUBSCRIBERS: usize = 16;

/// An event of kind-to-be-set, stamped now.
pub fn now() -> Event {
    let time = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    Event { time, ..Event::default() }
}

/// One subscribed connection.
pub struct Subscriber {
    /// The kinds it wants; `None`: all.
    kinds: Mutex<Option<Vec<String>>>,
    queue: Mutex<VecDeque<String>>,
    wake: EventFd,
    lost: AtomicU64,
}

impl Subscriber {
    /// Its eventfd, readable when events are queued.
    pub fn wake_fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    /// Changes the kinds it gets.
    pub fn set_kinds(&self, kinds: Option<Vec<String>>) {
        if let Ok(mut k) = self.kinds.lock() {
            *k = kinds;
        }
    }

    fn wants(&self, kind: &str) -> bool {
        self.kinds.lock().map(|k| k.as_ref().is_none_or(|k| k.iter().any(|x| x == kind))).unwrap_or(false)
    }

    fn push(&self, line: &str) {
        let Ok(mut q) = self.queue.lock() else { return };
        if q.len() >= QUEUE {
            self.lost.fetch_add(1, Ordering::Relaxed);
            return;
        }
        q.push_back(line.to_owned());
        drop(q);
        // Non-blocking; a full counter (never, at QUEUE) only means it is
        // readable already.
        let _ = self.wake.write(1);
    }

    /// Sends what is queued on `conn` (its own connection); false if the
    /// peer is gone or not reading.
    pub(super) fn flush(&self, conn: &mut Conn) -> bool {
        let _ = self.wake.read();
        let lines: Vec<String> = match self.queue.lock() {
            Ok(mut q) => q.drain(..).collect(),
            Err(_) => return false,
        };
        let lost = self.lost.swap(0, Ordering::Relaxed);
        if lost > 0 {
            let note = serde_json::json!({"jsonrpc": "2.0", "method": "events_lost", "params": {"lost": lost}});
            if !conn.reply(&note.to_string()) {
                return false;
            }
        }
        lines.iter().all(|l| conn.reply(l))
    }
}

/// The daemon's subscribers.
#[derive(Default)]
pub struct Events {
    subs: Mutex<Vec<Weak<Subscriber>>>,
    /// Events published.
    pub published: AtomicU64,
}

impl Events {
    /// A new subscriber for `kinds`; an error if there are
    /// [`MAX_SUBSCRIBERS`] already or no eventfd can be made.
    pub fn add(&self, kinds: Option<Vec<String>>) -> Result<Arc<Subscriber>, String> {
        let mut subs = self.subs.lock().map_err(|_| "daemon state poisoned".to_string())?;
        subs.retain(|w| w.strong_count() > 0);
        if subs.len() >= MAX_SUBSCRIBERS {
            return Err(format!("{MAX_SUBSCRIBERS} subscribers already: try again later"));
        }
        let wake = EventFd::new(EFD_NONBLOCK).map_err(|e| format!("cannot make the subscriber's eventfd: {e}"))?;
        let sub = Arc::new(Subscriber {
            kinds: Mutex::new(kinds),
            queue: Mutex::new(VecDeque::new()),
            wake,
            lost: AtomicU64::new(0),
        });
        subs.push(Arc::downgrade(&sub));
        Ok(sub)
    }

    /// Forgets `sub` (its connection ended).
    pub fn remove(&self, sub: &Arc<Subscriber>) {
        if let Ok(mut subs) = self.subs.lock() {
            subs.retain(|w| w.strong_count() > 0 && !std::ptr::eq(w.as_ptr(), Arc::as_ptr(sub)));
        }
    }

    /// Queues `ev` for every subscriber that wants its kind.
    pub fn publish(&self, ev: Event) {
        self.published.fetch_add(1, Ordering::Relaxed);
        let Ok(subs) = self.subs.lock() else { return };
        let live: Vec<Arc<Subscriber>> = subs.iter().filter_map(Weak::upgrade).filter(|s| s.wants(&ev.event)).collect();
        drop(subs);
        if live.is_empty() {
            return;
        }
        let line = serde_json::json!({"jsonrpc": "2.0", "method": "event", "params": ev}).to_string();
        for s in live {
            s.push(&line);
        }
    }

    /// Subscribers now.
    pub fn count(&self) -> usize {
        self.subs.lock().map(|s| s.iter().filter(|w| w.strong_count() > 0).count()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_reach_the_subscribers_that_want_them_and_full_queues_drop() {
        let hub = Events::default();
        let all = hub.add(None).expect("sub");
        let some = hub.add(Some(vec!["detach".into()])).expect("sub");
        hub.publish(Event { event: "attach".into(), vm: Some(1), ..now() });
        hub.publish(Event { event: "detach".into(), vm: Some(1), ..now() });
        assert_eq!(all.queue.lock().expect("q").len(), 2);
        let q = some.queue.lock().expect("q").clone();
        assert_eq!(q.len(), 1);
        let v: serde_json::Value = serde_json::from_str(&q[0]).expect("json");
        assert_eq!((v["method"].as_str(), v["params"]["event"].as_str()), (Some("event"), Some("detach")));
        for _ in 0..QUEUE + 5 {
            hub.publish(Event { event: "pause".into(), ..now() });
        }
        assert_eq!(all.queue.lock().expect("q").len(), QUEUE);
        assert_eq!(all.lost.load(Ordering::Relaxed), 7);
        // Dropped subscribers are forgotten; the cap holds.
        drop(some);
        let more: Vec<_> = (0..MAX_SUBSCRIBERS - 1).map(|_| hub.add(None).expect("room")).collect();
        assert!(hub.add(None).is_err(), "cap");
        hub.remove(&all);
        assert_eq!(hub.count(), MAX_SUBSCRIBERS - 1);
        drop(more);
    }
}
