//! Prometheus exposition of the daemon's counters: [`render`] turns a
//! [`MetricsSnapshot`] into OpenMetrics text, and [`serve`] answers
//! `GET /metrics` with it from a small background HTTP server.
//!
//! A fresh registry is built from the snapshot on every scrape; every metric
//! is a constant (`ConstCounter`, `ConstGauge`, [`ConstHistogram`]) grouped
//! into label families that keep the snapshot's order.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::{Registry, Unit};

/// Content type of a scrape answer.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Most bytes of request read from one connection.
const MAX_REQUEST: usize = 8 * 1024;
/// Time a client gets to send its whole request head.
const READ_BUDGET: Duration = Duration::from_secs(2);
/// Time a client gets per write of the answer.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Debug, EncodeLabelSet)]
struct CallLabels {
    vm: u64,
    op: String,
    status: String,
}

#[derive(Clone, Debug, EncodeLabelSet)]
struct VmPidLabels {
    vm: u64,
    pid: i32,
}

#[derive(Clone, Debug, EncodeLabelSet)]
struct VmLabels {
    vm: u64,
}

#[derive(Clone, Debug, EncodeLabelSet)]
struct CpuLabels {
    cpu: usize,
}

/// A metric family whose members are fixed when it is built; unlike
/// `prometheus_client::metrics::family::Family` it needs no constructor and
/// encodes its members in insertion order.
#[derive(Debug)]
struct ConstFamily<S, M>(Vec<(S, M)>);

impl<S, M> EncodeMetric for ConstFamily<S, M>
where
    S: EncodeLabelSet,
    M: EncodeMetric + TypedMetric,
{
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), fmt::Error> {
        for (labels, metric) in &self.0 {
            metric.encode(encoder.encode_family(labels)?)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        M::TYPE
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A histogram whose buckets are known up front (prometheus-client's own
/// `Histogram` can only `observe`).
#[derive(Debug, Clone, PartialEq)]
pub struct ConstHistogram {
    sum: f64,
    count: u64,
    /// (upper bound, count in this bucket alone), ascending, ending with
    /// `+Inf`: the text encoder accumulates the counts itself.
    buckets: Vec<(f64, u64)>,
}

impl ConstHistogram {
    /// Builds one from cumulative buckets `(upper bound, observations <=
    /// bound)`, as in `VmSnapshot::service_buckets`, plus the total count and
    /// sum. Buckets whose bound is NaN or not above the previous one are
    /// folded into the next bucket; a `+Inf` bucket holding `count` is
    /// added (`count` is raised to the largest cumulative count if lower).
    pub fn from_cumulative(cumulative: &[(f64, u64)], count: u64, sum: f64) -> Self {
        let mut buckets = Vec::with_capacity(cumulative.len() + 1);
        let mut prev_bound = f64::NEG_INFINITY;
        let mut prev_cum = 0u64;
        for &(bound, cum) in cumulative {
            if bound.is_nan() || bound <= prev_bound || bound == f64::INFINITY {
                continue;
            }
            let cum = cum.max(prev_cum);
            buckets.push((bound, cum - prev_cum));
            prev_bound = bound;
            prev_cum = cum;
        }
        let count = cumulative.iter().map(|&(_, c)| c).fold(count, u64::max);
        buckets.push((f64::INFINITY, count - prev_cum));
        Self { sum, count, buckets }
    }
}

impl TypedMetric for ConstHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for ConstHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), fmt::Error> {
        encoder.encode_histogram::<NoLabelSet>(self.sum, self.count, &self.buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// One sidecore, for the metrics endpoint.
#[derive(Clone, Debug, Default)]
pub struct CoreSnapshot {
    /// Its CPU.
    pub cpu: usize,
    /// Rings it sweeps.
    pub rings: u64,
    /// Requests served.
    pub served: u64,
    /// Sweeps.
    pub sweeps: u64,
    /// Sweeps that found work.
    pub busy_sweeps: u64,
    /// Parked now.
    pub parked: bool,
}

/// One attached VM, for the metrics endpoint.
#[derive(Clone, Debug, Default)]
pub struct VmSnapshot {
    /// Daemon's id.
    pub vm: u64,
    /// VMM's pid.
    pub pid: i32,
    /// vCPUs.
    pub vcpus: u32,
    /// Sidecore CPU.
    pub sidecore_cpu: usize,
    /// (op, status, count) of every non-zero counter.
    pub calls: Vec<(String, String, u64)>,
    /// Service-time histogram: (upper bound in ns, cumulative count), for
    /// non-empty buckets, ascending.
    pub service_buckets: Vec<(f64, u64)>,
    /// Requests timed.
    pub service_count: u64,
    /// Approximate sum of service times, ns.
    pub service_sum_ns: f64,
}

/// Everything the metrics endpoint exposes.
#[derive(Clone, Debug, Default)]
pub struct MetricsSnapshot {
    /// Sidecores.
    pub cores: Vec<CoreSnapshot>,
    /// VMs.
    pub vms: Vec<VmSnapshot>,
}

/// Renders a snapshot as Prometheus text exposition (OpenMetrics text, via
/// `prometheus_client::encoding::text::encode`, so it ends with `# EOF`).
///
/// Counters get the OpenMetrics `_total` suffix (`sidecore_calls_total`,
/// ...); families with no members (no VMs attached) are left out.
pub fn render(snap: &MetricsSnapshot) -> Result<String, fmt::Error> {
    let mut reg = Registry::default();

    // Sum any duplicate (vm, op, status) so each series appears once.
    let mut calls: BTreeMap<(u64, &str, &str), u64> = BTreeMap::new();
    for vm in &snap.vms {
        for (op, status, n) in &vm.calls {
            let c = calls.entry((vm.vm, op.as_str(), status.as_str())).or_insert(0);
            *c = c.saturating_add(*n);
        }
    }
    let calls = calls
        .into_iter()
        .map(|((vm, op, status), n)| {
            (CallLabels { vm, op: op.to_owned(), status: status.to_owned() }, ConstCounter::new(n))
        })
        .collect();
    reg.register("sidecore_calls", "Requests served, by VM, operation and status", ConstFamily(calls));

    let vcpus = snap.vms.iter().map(|v| (VmPidLabels { vm: v.vm, pid: v.pid }, ConstGauge::new(v.vcpus))).collect();
    reg.register("sidecore_vm_vcpus", "vCPUs of an attached VM", ConstFamily(vcpus));

    let per_core = |f: fn(&CoreSnapshot) -> u64| {
        ConstFamily(snap.cores.iter().map(|c| (CpuLabels { cpu: c.cpu }, ConstCounter::new(f(c)))).collect())
    };
    reg.register("sidecore_served_requests", "Requests a sidecore served", per_core(|c| c.served));
    reg.register("sidecore_sweeps", "Ring sweeps a sidecore made", per_core(|c| c.sweeps));
    reg.register("sidecore_busy_sweeps", "Ring sweeps that found work", per_core(|c| c.busy_sweeps));

    let rings = snap.cores.iter().map(|c| (CpuLabels { cpu: c.cpu }, ConstGauge::new(c.rings))).collect();
    reg.register("sidecore_rings", "Rings a sidecore sweeps", ConstFamily(rings));
    let parked = snap.cores.iter().map(|c| (CpuLabels { cpu: c.cpu }, ConstGauge::new(i64::from(c.parked)))).collect();
    reg.register("sidecore_parked", "1 if the sidecore is parked", ConstFamily(parked));

    let service = snap
        .vms
        .iter()
        .map(|v| {
            let h = ConstHistogram::from_cumulative(&v.service_buckets, v.service_count, v.service_sum_ns);
            (VmLabels { vm: v.vm }, h)
        })
        .collect();
    reg.register_with_unit(
        "sidecore_service_time",
        "Time the sidecore took to serve a request",
        Unit::Other("ns".to_owned()),
        ConstFamily(service),
    );

    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &reg)?;
    Ok(out)
}

/// Binds `addr` (e.g. `127.0.0.1:9464`; any address is accepted, the
/// operator chooses) and serves `GET /metrics` and `GET /` from a
/// background thread named `sidecore-metrics`, one connection at a time.
///
/// Each scrape calls `snapshot` and answers `200` with
/// content type `application/openmetrics-text; version=1.0.0;
/// charset=utf-8` (`HEAD` gets the headers only). Other paths get `404`,
/// other methods `405`, and anything malformed, incomplete after 2 s or
/// longer than 8 KiB `400`. Returns once the socket is bound.
///
/// # Errors
///
/// The bind's or the thread's error if `addr` cannot be bound or the thread
/// cannot be started.
pub fn serve<F>(addr: &str, snapshot: F) -> io::Result<()>
where
    F: Fn() -> MetricsSnapshot + Send + 'static,
{
    serve_with(addr, snapshot, None::<fn() -> Result<(), String>>).map_err(|e| match e {
        ServeError::Io(e) => e,
        ServeError::Start(reason) => io::Error::other(reason),
    })
}

/// Why [`serve_with`] failed.
#[derive(Debug)]
pub enum ServeError {
    /// The bind or the thread's creation.
    Io(io::Error),
    /// The thread's start hook (e.g. its seccomp filter).
    Start(String),
}

/// [`serve`], with `on_start` run first in the metrics thread (the daemon
/// installs its seccomp filter there); returns once it has run, with its
/// error if it failed (the thread then serves nothing).
pub fn serve_with<F, S>(addr: &str, snapshot: F, on_start: Option<S>) -> Result<(), ServeError>
where
    F: Fn() -> MetricsSnapshot + Send + 'static,
    S: FnOnce() -> Result<(), String> + Send + 'static,
{
    let listener = TcpListener::bind(addr).map_err(ServeError::Io)?;
    let bound = listener.local_addr().map_or_else(|_| addr.to_owned(), |a| a.to_string());
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<Result<(), String>>(1);
    std::thread::Builder::new()
        .name("sidecore-metrics".to_owned())
        .spawn(move || {
            let started = on_start.map_or(Ok(()), |f| f());
            let ok = started.is_ok();
            let _ = ready_tx.send(started);
            if ok {
                accept_loop(&listener, &snapshot);
            }
        })
        .map_err(ServeError::Io)?;
    ready_rx
        .recv()
        .map_err(|_| ServeError::Start("the metrics thread died at its start".into()))?
        .map_err(ServeError::Start)?;
    tracing::info!(addr = %bound, "serving metrics");
    Ok(())
}

fn accept_loop(listener: &TcpListener, snapshot: &dyn Fn() -> MetricsSnapshot) {
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                if let Err(e) = handle(stream, || render(&snapshot())) {
                    tracing::debug!(error = %e, "metrics connection failed");
                }
            }
            Err(e) => {
                // E.g. out of fds: do not spin.
                tracing::warn!(error = %e, "metrics accept failed");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    /// The metrics; `true` for HEAD (no body).
    Metrics {
        head_only: bool,
    },
    NotFound,
    MethodNotAllowed,
    BadRequest,
}

/// What reading the request head gave.
enum Head {
    /// Nothing at all arrived before EOF or the deadline.
    Nothing,
    /// The bytes up to the blank line ending the head.
    Complete(Vec<u8>),
    /// EOF, deadline or size limit before the head ended.
    Incomplete,
}

/// Serves one connection: reads the request head (at most [`MAX_REQUEST`]
/// bytes within [`READ_BUDGET`]), calls `render_fn` only for a metrics
/// request, writes one answer and closes.
fn handle<F>(mut stream: TcpStream, render_fn: F) -> io::Result<()>
where
    F: FnOnce() -> Result<String, fmt::Error>,
{
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let route = match read_head(&mut stream)? {
        Head::Nothing => return Ok(()),
        Head::Incomplete => Route::BadRequest,
        Head::Complete(head) => route(&head),
    };
    match route {
        Route::Metrics { head_only } => match render_fn() {
            Ok(body) => respond(&mut stream, "200 OK", CONTENT_TYPE, "", &body, head_only),
            Err(fmt::Error) => respond(
                &mut stream,
                "500 Internal Server Error",
                "text/plain",
                "",
                "cannot render metrics\n",
                head_only,
            ),
        },
        Route::NotFound => respond(&mut stream, "404 Not Found", "text/plain", "", "not found\n", false),
        Route::MethodNotAllowed => respond(
            &mut stream,
            "405 Method Not Allowed",
            "text/plain",
            "Allow: GET, HEAD\r\n",
            "method not allowed\n",
            false,
        ),
        Route::BadRequest => respond(&mut stream, "400 Bad Request", "text/plain", "", "bad request\n", false),
    }?;
    // Best effort: the peer may already be gone.
    let _ = stream.shutdown(Shutdown::Write);
    Ok(())
}

/// Reads until the blank line ending the request head, the size limit, EOF
/// or the deadline, whichever comes first.
fn read_head(stream: &mut TcpStream) -> io::Result<Head> {
    let deadline = Instant::now() + READ_BUDGET;
    let mut buf = vec![0u8; MAX_REQUEST];
    let mut len = 0;
    loop {
        let got = buf.get(..len).unwrap_or_default();
        if let Some(end) = head_end(got) {
            buf.truncate(end);
            return Ok(Head::Complete(buf));
        }
        let cut_short = if len == 0 { Head::Nothing } else { Head::Incomplete };
        let left = deadline.saturating_duration_since(Instant::now());
        if len >= buf.len() {
            return Ok(Head::Incomplete);
        }
        if left.is_zero() {
            return Ok(cut_short);
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(buf.get_mut(len..).unwrap_or_default()) {
            Ok(0) => return Ok(cut_short),
            Ok(n) => len = len.saturating_add(n).min(buf.len()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => return Ok(cut_short),
            Err(e) => return Err(e),
        }
    }
}

/// Length of the request head in `buf` (through the blank line), if it is
/// all there. Bare `\n` line ends are tolerated.
fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Routes a complete request head.
fn route(head: &[u8]) -> Route {
    let Ok(text) = std::str::from_utf8(head) else {
        return Route::BadRequest;
    };
    let mut lines = text.lines();
    let Some(request_line) = lines.next() else {
        return Route::BadRequest;
    };
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Route::BadRequest;
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_alphabetic()) {
        return Route::BadRequest;
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Route::BadRequest;
    }
    // Header lines must at least look like "Name: value".
    for line in lines {
        if line.is_empty() {
            break;
        }
        match line.split_once(':') {
            Some((name, _)) if !name.is_empty() && !name.contains(char::is_whitespace) => {}
            _ => return Route::BadRequest,
        }
    }
    // Absolute form ("http://host:port/metrics") is allowed too.
    let origin = match target.strip_prefix("http://").or_else(|| target.strip_prefix("https://")) {
        Some(rest) => rest.find('/').and_then(|i| rest.get(i..)).unwrap_or("/"),
        None => target,
    };
    if !origin.starts_with('/') || origin.bytes().any(|b| b.is_ascii_control()) {
        return Route::BadRequest;
    }
    let path = origin.split(['?', '#']).next().unwrap_or_default();
    match path {
        "/" | "/metrics" => match method {
            "GET" => Route::Metrics { head_only: false },
            "HEAD" => Route::Metrics { head_only: true },
            _ => Route::MethodNotAllowed,
        },
        _ => Route::NotFound,
    }
}

fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    extra_headers: &str,
    body: &str,
    head_only: bool,
) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\
         {extra_headers}\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    if !head_only {
        stream.write_all(body.as_bytes())?;
    }
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> MetricsSnapshot {
        MetricsSnapshot {
            cores: vec![CoreSnapshot {
                cpu: 3,
                rings: 2,
                served: 1500,
                sweeps: 90_000,
                busy_sweeps: 1200,
                parked: true,
            }],
            vms: vec![VmSnapshot {
                vm: 7,
                pid: 4242,
                vcpus: 4,
                sidecore_cpu: 3,
                calls: vec![("read".to_owned(), "ok".to_owned(), 1000), ("write".to_owned(), "eio".to_owned(), 5)],
                service_buckets: vec![(250.0, 10), (1000.0, 900), (4000.0, 1005)],
                service_count: 1005,
                service_sum_ns: 612_345.5,
            }],
        }
    }

    #[test]
    fn render_snapshot() {
        let text = render(&snapshot()).unwrap();
        for want in [
            "# TYPE sidecore_calls counter\n",
            "sidecore_calls_total{vm=\"7\",op=\"read\",status=\"ok\"} 1000\n",
            "sidecore_calls_total{vm=\"7\",op=\"write\",status=\"eio\"} 5\n",
            "# TYPE sidecore_vm_vcpus gauge\n",
            "sidecore_vm_vcpus{vm=\"7\",pid=\"4242\"} 4\n",
            "sidecore_served_requests_total{cpu=\"3\"} 1500\n",
            "sidecore_sweeps_total{cpu=\"3\"} 90000\n",
            "sidecore_busy_sweeps_total{cpu=\"3\"} 1200\n",
            "# TYPE sidecore_rings gauge\n",
            "sidecore_rings{cpu=\"3\"} 2\n",
            "sidecore_parked{cpu=\"3\"} 1\n",
            "# TYPE sidecore_service_time_ns histogram\n",
            "# UNIT sidecore_service_time_ns ns\n",
            "sidecore_service_time_ns_sum{vm=\"7\"} 612345.5\n",
            "sidecore_service_time_ns_count{vm=\"7\"} 1005\n",
            "sidecore_service_time_ns_bucket{le=\"250.0\",vm=\"7\"} 10\n",
            "sidecore_service_time_ns_bucket{le=\"1000.0\",vm=\"7\"} 900\n",
            "sidecore_service_time_ns_bucket{le=\"4000.0\",vm=\"7\"} 1005\n",
            "sidecore_service_time_ns_bucket{le=\"+Inf\",vm=\"7\"} 1005\n",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert_eq!(text.matches("# EOF").count(), 1);
    }

    #[test]
    fn render_empty_and_parked_zero() {
        assert_eq!(render(&MetricsSnapshot::default()).unwrap(), "# EOF\n");
        let snap = MetricsSnapshot { cores: vec![CoreSnapshot { cpu: 0, ..CoreSnapshot::default() }], vms: vec![] };
        let text = render(&snap).unwrap();
        assert!(text.contains("sidecore_parked{cpu=\"0\"} 0\n"), "{text}");
        assert!(!text.contains("sidecore_calls"), "{text}");
    }

    #[test]
    fn render_escapes_and_merges_calls() {
        let mut snap = snapshot();
        if let Some(vm) = snap.vms.first_mut() {
            vm.calls = vec![
                ("a\"b".to_owned(), "ok".to_owned(), 1),
                ("x".to_owned(), "ok".to_owned(), 2),
                ("x".to_owned(), "ok".to_owned(), 3),
            ];
        }
        let text = render(&snap).unwrap();
        assert!(text.contains("op=\"a\\\"b\""), "{text}");
        assert!(text.contains("sidecore_calls_total{vm=\"7\",op=\"x\",status=\"ok\"} 5\n"), "{text}");
    }

    #[test]
    fn histogram_from_cumulative() {
        let h = ConstHistogram::from_cumulative(&[(1.0, 2), (2.0, 5), (4.0, 5)], 6, 9.0);
        assert_eq!(h.buckets, vec![(1.0, 2), (2.0, 3), (4.0, 0), (f64::INFINITY, 1)]);
        assert_eq!(h.count, 6);
        // NaN, out-of-order and infinite bounds are folded; a count lower
        // than the buckets is raised; decreasing counts do not underflow.
        let h = ConstHistogram::from_cumulative(
            &[(f64::NAN, 1), (2.0, 4), (1.0, 5), (3.0, 3), (f64::INFINITY, 9)],
            0,
            f64::NAN,
        );
        assert_eq!(h.buckets, vec![(2.0, 4), (3.0, 0), (f64::INFINITY, 5)]);
        assert_eq!(h.count, 9);
        let h = ConstHistogram::from_cumulative(&[], 0, 0.0);
        assert_eq!(h.buckets, vec![(f64::INFINITY, 0)]);
    }

    #[test]
    fn routes() {
        let r = |s: &str| route(s.as_bytes());
        assert_eq!(r("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"), Route::Metrics { head_only: false });
        assert_eq!(r("GET / HTTP/1.0\r\n\r\n"), Route::Metrics { head_only: false });
        assert_eq!(r("GET /metrics?x=1 HTTP/1.1\n\n"), Route::Metrics { head_only: false });
        assert_eq!(r("GET http://h:9464/metrics HTTP/1.1\r\n\r\n"), Route::Metrics { head_only: false });
        assert_eq!(r("HEAD /metrics HTTP/1.1\r\n\r\n"), Route::Metrics { head_only: true });
        assert_eq!(r("POST /metrics HTTP/1.1\r\n\r\n"), Route::MethodNotAllowed);
        assert_eq!(r("GET /nope HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(r("GET /metrics/ HTTP/1.1\r\n\r\n"), Route::NotFound);
        for bad in [
            "",
            "\r\n\r\n",
            "GET\r\n\r\n",
            "GET /metrics\r\n\r\n",
            "GET /metrics HTTP/2.0\r\n\r\n",
            "GET  /metrics HTTP/1.1\r\n\r\n",
            "GET /metrics HTTP/1.1 extra\r\n\r\n",
            "G@T /metrics HTTP/1.1\r\n\r\n",
            "GET metrics HTTP/1.1\r\n\r\n",
            "GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n",
            "GET /metrics HTTP/1.1\r\n: empty name\r\n\r\n",
        ] {
            assert_eq!(r(bad), Route::BadRequest, "{bad:?}");
        }
        assert_eq!(route(b"GET /\xff HTTP/1.1\r\n\r\n"), Route::BadRequest);
    }

    /// Sends `request` to `handle` over loopback (optionally half-closing),
    /// returns the whole answer.
    fn exchange(request: &[u8], half_close: bool) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let (server, _) = listener.accept().unwrap();
        let worker = std::thread::spawn(move || handle(server, || Ok("fake_metric 1\n# EOF\n".to_owned())));
        client.write_all(request).unwrap();
        if half_close {
            client.shutdown(Shutdown::Write).unwrap();
        }
        let mut answer = String::new();
        client.read_to_string(&mut answer).unwrap();
        worker.join().unwrap().unwrap();
        answer
    }

    #[test]
    fn handle_over_loopback() {
        let ok = exchange(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n", false);
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains(&format!("\r\nContent-Type: {CONTENT_TYPE}\r\n")), "{ok}");
        assert!(ok.contains("\r\nContent-Length: 20\r\n"), "{ok}");
        assert!(ok.ends_with("\r\n\r\nfake_metric 1\n# EOF\n"), "{ok}");

        let root = exchange(b"GET / HTTP/1.0\r\n\r\n", false);
        assert!(root.starts_with("HTTP/1.1 200 OK\r\n"), "{root}");

        let head = exchange(b"HEAD /metrics HTTP/1.1\r\n\r\n", false);
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n") && head.ends_with("\r\n\r\n"), "{head}");

        let nope = exchange(b"GET /nope HTTP/1.1\r\n\r\n", false);
        assert!(nope.starts_with("HTTP/1.1 404 Not Found\r\n"), "{nope}");

        let post = exchange(b"POST /metrics HTTP/1.1\r\n\r\n", false);
        assert!(post.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"), "{post}");
        assert!(post.contains("\r\nAllow: GET, HEAD\r\n"), "{post}");

        let garbage = exchange(b"\x00\xffgarbage\x01\r\n\r\n", false);
        assert!(garbage.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{garbage}");

        // No end of head before EOF.
        let cut = exchange(b"GET /metrics HTTP/1.1\r\nHost: x", true);
        assert!(cut.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{cut}");

        // 8 KiB without an end of head.
        let long = exchange(&[b'a'; MAX_REQUEST], false);
        assert!(long.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{long}");

        // Connected and closed without a byte: no answer.
        assert_eq!(exchange(b"", true), "");
    }

    #[test]
    fn handle_render_error_is_500() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let (server, _) = listener.accept().unwrap();
        let worker = std::thread::spawn(move || handle(server, || Err(fmt::Error)));
        client.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).unwrap();
        worker.join().unwrap().unwrap();
        assert!(answer.starts_with("HTTP/1.1 500 Internal Server Error\r\n"), "{answer}");
    }

    #[test]
    fn handle_times_out_silent_client() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let (server, _) = listener.accept().unwrap();
        let start = Instant::now();
        let worker = std::thread::spawn(move || handle(server, || Ok(String::new())));
        client.write_all(b"GET /metr").unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).unwrap();
        worker.join().unwrap().unwrap();
        let took = start.elapsed();
        assert!(took >= READ_BUDGET && took < READ_BUDGET * 3, "{took:?}");
        assert!(answer.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{answer}");
    }
}
