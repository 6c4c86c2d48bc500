//! The VMM's side: [`Attachment`] (`run --attach`), the calls it makes,
//! and `sidecore status`'s query and rendering.

#[allow(clippy::wildcard_imports)]
use super::*;
use std::io::BufReader;

/// A connection to the daemon: JSON-RPC 2.0 calls, one at a time, and
/// the events of a subscription.
pub struct Client {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
    next_id: u64,
}

impl Client {
    /// Connects to the daemon at `socket`, with [`REQUEST_TIMEOUT`] for
    /// each reply.
    pub fn connect(socket: &Path) -> Result<Client, DaemonError> {
        let stream = UnixStream::connect(socket)
            .map_err(|source| DaemonError::Connect { path: socket.to_path_buf(), source })?;
        Client::on(stream, Some(REQUEST_TIMEOUT))
    }

    fn on(stream: UnixStream, timeout: Option<Duration>) -> Result<Client, DaemonError> {
        for r in [stream.set_read_timeout(timeout), stream.set_write_timeout(timeout)] {
            r.map_err(|e| DaemonError::Protocol(format!("setting the connection's time-outs: {e}")))?;
        }
        let reader = BufReader::new(stream.try_clone().map_err(|e| DaemonError::Protocol(e.to_string()))?);
        Ok(Client { stream, reader, next_id: 1 })
    }

    /// Calls `method` with `params` (and `fds` by SCM_RIGHTS) and waits for
    /// its reply: the result, or the daemon's error as
    /// [`DaemonError::Refused`]. Notifications that arrive first (this
    /// client does not subscribe, but a daemon may send them) are skipped.
    pub fn call_with_fds(
        &mut self,
        method: &str,
        params: Option<serde_json::Value>,
        fds: &[RawFd],
    ) -> Result<serde_json::Value, DaemonError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut line = protocol::request_line(id, method, params).into_bytes();
        line.push(b'\n');
        let sent = if fds.is_empty() {
            self.stream.write_all(&line).map_err(|e| DaemonError::Protocol(format!("sending {method}: {e}")))
        } else {
            self.stream
                .send_with_fds(&[&line[..]], fds)
                .map(drop)
                .map_err(|e| DaemonError::Protocol(format!("sendmsg ({method}): {e}")))
        };
        if let Err(e) = sent {
            // A daemon that refuses the connection (permission, too many) answers and closes
            // at once, so the request can meet a closed socket: its reason is still queued here.
            return match self.read_message() {
                Ok(msg) if msg.get("id") == Some(&serde_json::Value::Null) => Self::answer(msg, id),
                _ => Err(e),
            };
        }
        loop {
            let msg = self.read_message()?;
            if msg.get("id").is_none() && msg.get("method").is_some() {
                continue;
            }
            return Self::answer(msg, id);
        }
    }

    /// The reply `msg` to request `id`: its result, or why there is none.
    fn answer(msg: serde_json::Value, id: u64) -> Result<serde_json::Value, DaemonError> {
        protocol::response_result(msg, id).map_err(|e| match e {
            protocol::ResponseError::Rpc(e) => DaemonError::Refused(e.message),
            protocol::ResponseError::Garbled(why) => DaemonError::Protocol(why),
        })
    }

    /// [`Client::call_with_fds`] without fds.
    pub fn call(&mut self, method: &str, params: Option<serde_json::Value>) -> Result<serde_json::Value, DaemonError> {
        self.call_with_fds(method, params, &[])
    }

    fn read_message(&mut self) -> Result<serde_json::Value, DaemonError> {
        let line = read_line(&mut self.reader)
            .map_err(DaemonError::Protocol)?
            .ok_or_else(|| DaemonError::Protocol("the daemon hung up".into()))?;
        serde_json::from_str(&line).map_err(|e| DaemonError::Protocol(format!("bad reply: {e}")))
    }
}

/// A VMM's connection to the daemon, kept open while its VM runs.
pub struct Attachment {
    /// Set once a request went unanswered in time: the stream may be out of
    /// step, and the daemon is stopped or hung.
    broken: std::sync::atomic::AtomicBool,
    client: Mutex<Client>,
    /// A second handle on the stream, for [`Attachment::watch`].
    watch_stream: UnixStream,
    /// The daemon's id for the VM.
    pub vm: u64,
    /// The name the daemon labels it with.
    pub name: String,
    /// The CPU of the sidecore serving it.
    pub sidecore_cpu: Option<usize>,
}

/// How long the VMM and `sidecore status` wait for the daemon's answer to
/// a request (not the attach, which maps the VM): a stopped or hung daemon
/// gets this long.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

impl Attachment {
    /// Attaches a VM: sends the layout and CPUID tables with the two memfds,
    /// the doorbell, and `extra` fds (the packet device's socket and irqfd
    /// when the request asks for it).
    pub fn attach(
        socket: &Path,
        req: AttachRequest,
        guest: &File,
        host: &File,
        doorbell: &std::os::fd::OwnedFd,
        extra: &[RawFd],
    ) -> Result<Attachment, DaemonError> {
        let stream = UnixStream::connect(socket)
            .map_err(|source| DaemonError::Connect { path: socket.to_path_buf(), source })?;
        let watch_stream = stream.try_clone().map_err(|e| DaemonError::Protocol(e.to_string()))?;
        // No time-out on the attach itself (the daemon maps the VM); from
        // then on a daemon that stops answering (stopped, hung) costs a
        // request REQUEST_TIMEOUT, not the VMM's life.
        let mut client = Client::on(stream, None)?;
        let params = serde_json::to_value(&req).map_err(|e| DaemonError::Protocol(e.to_string()))?;
        let fds = [&[guest.as_raw_fd(), host.as_raw_fd(), doorbell.as_raw_fd()][..], extra].concat();
        let v = client.call_with_fds("attach", Some(params), &fds)?;
        for r in [
            client.stream.set_read_timeout(Some(REQUEST_TIMEOUT)),
            client.stream.set_write_timeout(Some(REQUEST_TIMEOUT)),
        ] {
            r.map_err(|e| DaemonError::Protocol(format!("setting the daemon connection's time-outs: {e}")))?;
        }
        Ok(Attachment {
            broken: std::sync::atomic::AtomicBool::new(false),
            client: Mutex::new(client),
            watch_stream,
            vm: v["vm"].as_u64().unwrap_or(0),
            name: v["name"].as_str().unwrap_or_default().to_string(),
            sidecore_cpu: v["sidecore_cpu"].as_u64().and_then(|c| usize::try_from(c).ok()),
        })
    }

    /// One request and its reply on this VM's connection.
    fn request(&self, method: &str) -> Result<serde_json::Value, DaemonError> {
        use std::sync::atomic::Ordering;
        if self.broken.load(Ordering::Relaxed) {
            return Err(DaemonError::Protocol("the daemon stopped answering earlier".into()));
        }
        let mut c = self.client.lock().map_err(|_| DaemonError::Protocol("poisoned".into()))?;
        let out = c.call(method, None);
        if matches!(out, Err(DaemonError::Protocol(_))) {
            // A time-out or a torn reply leaves the stream out of step (a
            // refusal is a whole reply: it does not).
            self.broken.store(true, Ordering::Relaxed);
        }
        out
    }

    /// The number of requests the daemon has answered for this VM.
    pub fn served(&self) -> Result<u64, DaemonError> {
        let report = status_report(self.request("status")?)?;
        report
            .vms
            .iter()
            .find(|vm| vm.vm == self.vm)
            .map(|vm| vm.total)
            .ok_or_else(|| DaemonError::Protocol("the daemon does not list this VM".into()))
    }

    /// Calls `on_lost` once, from a thread of its own, when the daemon
    /// closes this VM's connection: it died or shut down, and a call its
    /// sidecore had claimed will never be answered. The thread only polls
    /// for the hang-up (never reads), so it does not race [`Self::request`].
    pub fn watch(&self, on_lost: impl FnOnce() + Send + 'static) -> Result<(), DaemonError> {
        let stream = self
            .watch_stream
            .try_clone()
            .map_err(|e| DaemonError::Protocol(format!("cannot watch the daemon connection: {e}")))?;
        std::thread::Builder::new()
            .name("daemon-watch".into())
            .spawn(move || {
                let mut p = libc::pollfd { fd: stream.as_raw_fd(), events: libc::POLLRDHUP, revents: 0 };
                loop {
                    // SAFETY: one valid pollfd, the count given is 1; the fd
                    // stays open while `stream` lives in this thread.
                    let r = unsafe { libc::poll(&mut p, 1, -1) };
                    if r < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                        continue;
                    }
                    if r < 0 || p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
                        on_lost();
                        return;
                    }
                }
            })
            .map(|_| ())
            .map_err(|e| DaemonError::Protocol(format!("cannot start the daemon watch thread: {e}")))
    }

    /// Asks the daemon to stop (`true`) or resume serving this VM.
    pub fn set_paused(&self, paused: bool) -> Result<(), DaemonError> {
        self.request(if paused { "pause" } else { "resume" }).map(|_| ())
    }
}

/// `sidecore status`: asks the daemon for its report.
pub fn query_status(socket: &Path) -> Result<StatusReport, DaemonError> {
    status_report(Client::connect(socket)?.call("status", None)?)
}

/// Asks the daemon for its versions and capabilities.
pub fn query_hello(socket: &Path) -> Result<protocol::Hello, DaemonError> {
    let v = Client::connect(socket)?.call("hello", None)?;
    serde_json::from_value(v).map_err(|e| DaemonError::Protocol(format!("bad hello reply: {e}")))
}

/// A status reply, typed.
fn status_report(v: serde_json::Value) -> Result<StatusReport, DaemonError> {
    serde_json::from_value(v).map_err(|e| DaemonError::Protocol(format!("bad status report: {e}")))
}

/// The status report as text.
pub fn format_status(r: &StatusReport) -> String {
    let mut s = format!("sidecore daemon, up {:.0} s\n", r.uptime_s);
    for c in &r.sidecores {
        s += &format!(
            "  sidecore on CPU {}: {} rings, {} served, busy {:.1}%{}\n",
            c.cpu,
            c.rings,
            c.served,
            c.busy_fraction * 100.0,
            if c.parked { ", parked" } else { "" }
        );
    }
    s += &format!("{} VM(s) attached\n", r.vms.len());
    let ns = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.0}"));
    for vm in &r.vms {
        s += &format!(
            "  vm {} ({}) pid {} vCPUs {} on CPU {}: {} calls, {} rejected, {} sent to the exit path; service p50 {} ns p99 {} ns\n",
            vm.vm,
            vm.name,
            vm.pid,
            vm.vcpus,
            vm.sidecore_cpu.map_or("?".into(), |c| c.to_string()),
            vm.total,
            vm.rejected,
            vm.use_exit_path,
            ns(vm.service_ns.p50),
            ns(vm.service_ns.p99),
        );
        for c in &vm.calls {
            s += &format!("      {:<10} {:<14} {}\n", c.op, c.status, c.count);
        }
        if let Some(d) = &vm.device {
            s += &format!(
                "      packet device: {} rx, {} tx, {} dropped (no buffer), {} bad descriptors, {} wake-up interrupts\n",
                d.rx, d.tx, d.rx_no_buffer, d.bad_desc, d.interrupts
            );
        }
        if vm.device.as_ref().is_some_and(|d| d.kicks_blocked > 0) {
            s += "      packet device: its irqfd would block (the VMM filled it): wake-up interrupts stopped\n";
        }
    }
    if !r.vhost_user_blk.is_empty() {
        s += "vhost-user-blk devices:\n";
    }
    for d in &r.vhost_user_blk {
        s += &format!(
            "  {} -> {} ({} MiB{}, {} queues offered): {}, {} connections, {} protocol errors\n",
            d.socket,
            d.image,
            d.capacity_bytes >> 20,
            if d.readonly { ", read-only" } else { "" },
            d.queues_offered,
            match (d.connected, d.sidecore) {
                (true, Some(k)) => format!("VMM connected, {} queues on sidecore {k}", d.running_queues),
                (true, None) => "VMM connected".to_string(),
                _ => "no VMM".to_string(),
            },
            d.connections,
            d.protocol_errors,
        );
        for q in &d.queues {
            s += &format!(
                "      queue {}: {} requests, {} MiB read, {} MiB written, {} kicks, {} interrupts, {} bad chains, {} I/O errors{}\n",
                q.index,
                q.requests,
                q.read_bytes >> 20,
                q.written_bytes >> 20,
                q.kicks,
                q.interrupts,
                q.bad_chains,
                q.io_errors,
                if q.broken > 0 { ", stopped on a bad avail index" } else { "" }
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_sent_before_the_request_is_reported_not_the_broken_pipe() {
        let (ours, mut daemon) = UnixStream::pair().expect("socketpair");
        transport::reply_error(&mut daemon, protocol::code::PERMISSION_DENIED, "permission denied: not in its group");
        drop(daemon);
        let mut c = Client::on(ours, Some(Duration::from_secs(1))).expect("client");
        match c.call("status", None) {
            Err(DaemonError::Refused(m)) => assert!(m.contains("not in its group"), "{m}"),
            other => panic!("expected the daemon's refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_closed_connection_without_a_reply_is_the_send_error() {
        let (ours, daemon) = UnixStream::pair().expect("socketpair");
        drop(daemon);
        let mut c = Client::on(ours, Some(Duration::from_secs(1))).expect("client");
        match c.call("status", None) {
            Err(DaemonError::Protocol(m)) => assert!(m.contains("sending status"), "{m}"),
            other => panic!("expected the send error, got {other:?}"),
        }
    }
}
