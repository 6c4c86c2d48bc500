//! The daemon's wire protocol: JSON-RPC 2.0 over a Unix stream socket, one
//! message per line (at most [`MAX_MESSAGE`] bytes), the attach request
//! carrying its fds by SCM_RIGHTS.
//!
//! * Requests: `{"jsonrpc":"2.0","id":ID,"method":M,"params":{...}}`; the
//!   reply echoes the id, with `result` or `error` (`{"code","message"}`,
//!   and `data` where there is more to say). A request without `id` is a
//!   notification: it is carried out and not answered. An array is a
//!   batch, answered by an array (attach is not allowed in one: its fds go
//!   with exactly one request).
//! * Events: a connection that called `subscribe` also receives
//!   notifications `{"jsonrpc":"2.0","method":"event","params":{...}}`
//!   ([`Event`]), interleaved with its replies, whole lines each.
//!
//! [`PROTOCOL_VERSION`] counts incompatible changes; `hello` reports it
//! with the daemon's version, the ring ABI and what the daemon can do.

#[allow(clippy::wildcard_imports)]
use super::*;
use serde_json::Value;

/// Largest message line.
pub const MAX_MESSAGE: usize = 1 << 20;

/// This protocol's version, reported by `hello`.
pub const PROTOCOL_VERSION: u32 = 1;

/// Every method, as `methods` lists them.
pub const METHODS: &[&str] = &[
    "hello",
    "methods",
    "status",
    "attach",
    "pause",
    "resume",
    "subscribe",
    "unsubscribe",
    "vhost_user_blk_add",
    "vhost_user_blk_remove",
];

/// What `hello` says the daemon can do.
pub const CAPABILITIES: &[&str] = &["attach", "pause", "events", "packet_device", "batch", "vhost_user_blk"];

/// Error codes: JSON-RPC 2.0's own, and the daemon's (-32000 to -32099,
/// the range the specification leaves to servers).
pub mod code {
    /// The line is not JSON.
    pub const PARSE_ERROR: i64 = -32700;
    /// JSON, but not a JSON-RPC 2.0 request.
    pub const INVALID_REQUEST: i64 = -32600;
    /// No such method.
    pub const METHOD_NOT_FOUND: i64 = -32601;
    /// The method's params are wrong.
    pub const INVALID_PARAMS: i64 = -32602;
    /// The daemon failed (e.g. its state could not be read).
    pub const INTERNAL_ERROR: i64 = -32603;
    /// The attach was refused: bad layout, fds, or no room.
    pub const ATTACH_REFUSED: i64 = -32000;
    /// pause/resume on a connection with no VM attached.
    pub const NOT_ATTACHED: i64 = -32001;
    /// attach on a connection that has a VM already.
    pub const ALREADY_ATTACHED: i64 = -32002;
    /// Too many connections waiting, or too many subscribers: try later.
    pub const BUSY: i64 = -32003;
    /// The peer may not use the daemon (uid / group).
    pub const PERMISSION_DENIED: i64 = -32004;
    /// The connection broke the framing: a line too long, too many fds, a
    /// request not whole within its deadline. The daemon then closes it.
    pub const FRAMING: i64 = -32005;
    /// A vhost-user device could not be added or removed.
    pub const DEVICE_REFUSED: i64 = -32006;
}

/// A JSON-RPC error object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RpcError {
    /// One of [`code`].
    pub code: i64,
    /// What went wrong, and what to do.
    pub message: String,
    /// More detail, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

impl RpcError {
    /// An error with `code` and `message`.
    pub fn new(code: i64, message: impl Into<String>) -> RpcError {
        RpcError { code, message: message.into(), data: None }
    }
}

impl std::fmt::Display for RpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (error {})", self.message, self.code)
    }
}

/// A method call, its params parsed and checked.
#[derive(Debug)]
pub enum Method {
    /// Versions and capabilities.
    Hello,
    /// The method names.
    Methods,
    /// The daemon's report ([`StatusReport`]).
    Status,
    /// Attach a VM (its fds come with the message).
    Attach(Box<AttachRequest>),
    /// Stop serving this connection's VM.
    Pause,
    /// Serve it again.
    Resume,
    /// Receive events on this connection.
    Subscribe(SubscribeParams),
    /// Stop receiving them.
    Unsubscribe,
    /// Serve a vhost-user-blk device (params as `--vhost-user-blk`:
    /// `{"socket":..,"path":..,"readonly":false,"queues":4}`).
    VhostBlkAdd(crate::vhost::BlkSpec),
    /// Stop serving the device on `{"socket":..}`.
    VhostBlkRemove(std::path::PathBuf),
}

impl Method {
    /// Its name on the wire.
    pub fn name(&self) -> &'static str {
        match self {
            Method::Hello => "hello",
            Method::Methods => "methods",
            Method::Status => "status",
            Method::Attach(_) => "attach",
            Method::Pause => "pause",
            Method::Resume => "resume",
            Method::Subscribe(_) => "subscribe",
            Method::Unsubscribe => "unsubscribe",
            Method::VhostBlkAdd(_) => "vhost_user_blk_add",
            Method::VhostBlkRemove(_) => "vhost_user_blk_remove",
        }
    }
}

/// One request: its id (`None` for a notification) and method.
#[derive(Debug)]
pub struct Call {
    /// The id to echo: a number, a string or null; `None` if absent.
    pub id: Option<Value>,
    /// What it asks.
    pub method: Method,
}

/// A request that cannot be carried out, with the id to answer it under
/// (`Value::Null` if none could be read) — `None` for a notification,
/// which gets no answer even when wrong.
#[derive(Debug)]
pub struct BadCall {
    /// The id to answer with.
    pub id: Option<Value>,
    /// Why.
    pub error: RpcError,
}

/// A message line: one call, or a batch.
#[derive(Debug)]
pub enum Message {
    /// One request.
    One(Result<Call, BadCall>),
    /// A batch (never empty).
    Batch(Vec<Result<Call, BadCall>>),
}

/// Largest batch.
pub const MAX_BATCH: usize = 64;

/// Parses one message line. Errors that leave no request to answer per
/// item (not JSON, an empty batch, a batch too large) come back as one
/// [`BadCall`] with a null id.
pub fn parse_message(line: &[u8]) -> Message {
    let v: Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => {
            return Message::One(Err(BadCall {
                id: Some(Value::Null),
                error: RpcError::new(code::PARSE_ERROR, format!("not JSON: {e}")),
            }))
        }
    };
    match v {
        Value::Array(items) if items.is_empty() => Message::One(Err(BadCall {
            id: Some(Value::Null),
            error: RpcError::new(code::INVALID_REQUEST, "an empty batch"),
        })),
        Value::Array(items) if items.len() > MAX_BATCH => Message::One(Err(BadCall {
            id: Some(Value::Null),
            error: RpcError::new(code::INVALID_REQUEST, format!("a batch of more than {MAX_BATCH} requests")),
        })),
        Value::Array(items) => Message::Batch(items.into_iter().map(parse_call).collect()),
        v => Message::One(parse_call(v)),
    }
}

/// Checks one request object and parses its params.
pub fn parse_call(v: Value) -> Result<Call, BadCall> {
    let Value::Object(mut obj) = v else {
        return Err(BadCall {
            id: Some(Value::Null),
            error: RpcError::new(code::INVALID_REQUEST, "a request must be a JSON object"),
        });
    };
    // The id first: even a bad request is answered under its own id.
    let id = match obj.remove("id") {
        None => None,
        Some(id @ (Value::Null | Value::Number(_) | Value::String(_))) => Some(id),
        Some(_) => {
            return Err(BadCall {
                id: Some(Value::Null),
                error: RpcError::new(code::INVALID_REQUEST, "\"id\" must be a number, a string or null"),
            })
        }
    };
    let bad = |code, msg: String| BadCall { id: id.clone(), error: RpcError::new(code, msg) };
    if obj.remove("jsonrpc") != Some(Value::String("2.0".into())) {
        return Err(bad(code::INVALID_REQUEST, "\"jsonrpc\" must be \"2.0\"".into()));
    }
    let method = match obj.remove("method") {
        Some(Value::String(m)) => m,
        _ => return Err(bad(code::INVALID_REQUEST, "\"method\" must be a string".into())),
    };
    let params = obj.remove("params");
    if let Some(k) = obj.keys().next() {
        return Err(bad(code::INVALID_REQUEST, format!("unknown member {k:?} in the request")));
    }
    if let Some(p) = &params {
        if !p.is_object() && !p.is_array() {
            return Err(bad(code::INVALID_REQUEST, "\"params\" must be an object or an array".into()));
        }
    }
    let no_params = |m: Method| match &params {
        None => Ok(m),
        Some(Value::Object(o)) if o.is_empty() => Ok(m),
        Some(Value::Array(a)) if a.is_empty() => Ok(m),
        Some(_) => Err(bad(code::INVALID_PARAMS, format!("{method} takes no params"))),
    };
    let method = match method.as_str() {
        "hello" => no_params(Method::Hello)?,
        "methods" => no_params(Method::Methods)?,
        "status" => no_params(Method::Status)?,
        "pause" => no_params(Method::Pause)?,
        "resume" => no_params(Method::Resume)?,
        "unsubscribe" => no_params(Method::Unsubscribe)?,
        "attach" => {
            let p = params.ok_or_else(|| bad(code::INVALID_PARAMS, "attach needs params: the VM's layout".into()))?;
            Method::Attach(Box::new(
                serde_json::from_value(p).map_err(|e| bad(code::INVALID_PARAMS, format!("attach params: {e}")))?,
            ))
        }
        "vhost_user_blk_add" => {
            let p = params
                .ok_or_else(|| bad(code::INVALID_PARAMS, "vhost_user_blk_add needs params: socket, path".into()))?;
            let spec: crate::vhost::BlkSpec = serde_json::from_value(p)
                .map_err(|e| bad(code::INVALID_PARAMS, format!("vhost_user_blk_add params: {e}")))?;
            if spec.queues == 0 || spec.queues > crate::vhost::MAX_QUEUES {
                return Err(bad(code::INVALID_PARAMS, format!("queues: give 1 to {}", crate::vhost::MAX_QUEUES)));
            }
            Method::VhostBlkAdd(spec)
        }
        "vhost_user_blk_remove" => {
            #[derive(Deserialize)]
            #[serde(deny_unknown_fields)]
            struct P {
                socket: std::path::PathBuf,
            }
            let p =
                params.ok_or_else(|| bad(code::INVALID_PARAMS, "vhost_user_blk_remove needs params: socket".into()))?;
            let p: P = serde_json::from_value(p)
                .map_err(|e| bad(code::INVALID_PARAMS, format!("vhost_user_blk_remove params: {e}")))?;
            Method::VhostBlkRemove(p.socket)
        }
        "subscribe" => Method::Subscribe(match params {
            None => SubscribeParams::default(),
            Some(p) => {
                serde_json::from_value(p).map_err(|e| bad(code::INVALID_PARAMS, format!("subscribe params: {e}")))?
            }
        }),
        other => {
            return Err(bad(
                code::METHOD_NOT_FOUND,
                format!("no method {other:?}: the daemon has {}", METHODS.join(", ")),
            ))
        }
    };
    Ok(Call { id, method })
}

/// A reply line's JSON: `result` under `id`.
pub fn response(id: &Value, result: Value) -> Value {
    serde_json::json!({"jsonrpc": "2.0", "id": id, "result": result})
}

/// An error reply's JSON under `id`.
pub fn error_response(id: &Value, error: &RpcError) -> Value {
    serde_json::json!({"jsonrpc": "2.0", "id": id, "error": error})
}

/// A request line (the client's side), without its newline.
pub fn request_line(id: u64, method: &str, params: Option<Value>) -> String {
    let mut v = serde_json::json!({"jsonrpc": "2.0", "id": id, "method": method});
    if let (Some(p), Value::Object(o)) = (params, &mut v) {
        o.insert("params".into(), p);
    }
    v.to_string()
}

/// What a reply line says (the client's side): its `result`, or its error.
/// A reply to another id, or one that is not JSON-RPC 2.0, is an error of
/// its own (`Err(None)` carries the reason in the string).
pub fn parse_response(line: &str, want_id: u64) -> Result<Value, ResponseError> {
    let v: Value = serde_json::from_str(line).map_err(|e| ResponseError::Garbled(format!("not JSON: {e}")))?;
    response_result(v, want_id)
}

/// [`parse_response`] of a reply already parsed as JSON.
pub fn response_result(v: Value, want_id: u64) -> Result<Value, ResponseError> {
    if v.get("jsonrpc") != Some(&Value::String("2.0".into())) {
        return Err(ResponseError::Garbled("not a JSON-RPC 2.0 reply (is this a sidecore daemon?)".into()));
    }
    // An error with a null id is about the connection (refused peer,
    // framing, too many connections): it answers whatever was asked.
    let connection_error = v.get("id") == Some(&Value::Null) && v.get("error").is_some();
    if !connection_error && v.get("id").and_then(Value::as_u64) != Some(want_id) {
        return Err(ResponseError::Garbled(format!("a reply to id {}, not to {want_id}", v["id"])));
    }
    if let Some(e) = v.get("error") {
        return Err(match serde_json::from_value::<RpcError>(e.clone()) {
            Ok(e) => ResponseError::Rpc(e),
            Err(e) => ResponseError::Garbled(format!("bad error object: {e}")),
        });
    }
    v.get("result").cloned().ok_or_else(|| ResponseError::Garbled("a reply with neither result nor error".into()))
}

/// Why a reply gave no result.
#[derive(Debug)]
pub enum ResponseError {
    /// The daemon answered with an error.
    Rpc(RpcError),
    /// The reply is not one (wrong id, not JSON-RPC).
    Garbled(String),
}

/// What `hello` returns.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    /// Always `sidecore`.
    pub name: String,
    /// The daemon's version (Cargo's).
    pub version: String,
    /// The commit it was built from, or `unknown`.
    pub commit: String,
    /// [`PROTOCOL_VERSION`].
    pub protocol: u32,
    /// The ring ABI ([`shm_proto::ABI_VERSION`]).
    pub abi: u32,
    /// [`CAPABILITIES`].
    pub capabilities: Vec<String>,
    /// [`EVENT_KINDS`].
    pub events: Vec<String>,
}

impl Hello {
    /// This daemon's.
    pub fn here() -> Hello {
        Hello {
            name: "sidecore".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            commit: crate::build_commit().into(),
            protocol: PROTOCOL_VERSION,
            abi: shm_proto::ABI_VERSION,
            capabilities: CAPABILITIES.iter().map(|s| (*s).into()).collect(),
            events: EVENT_KINDS.iter().map(|s| (*s).into()).collect(),
        }
    }
}

/// Every kind of event.
pub const EVENT_KINDS: &[&str] = &[
    "attach",
    "detach",
    "pause",
    "resume",
    "sidecore_park",
    "sidecore_unpark",
    "fallback_storm",
    "fallback_calm",
    "vhost_connect",
    "vhost_disconnect",
];

/// `subscribe`'s params: the kinds wanted (all when absent).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscribeParams {
    /// Kinds from [`EVENT_KINDS`].
    #[serde(default)]
    pub events: Option<Vec<String>>,
}

/// One event, as the `event` notification's params.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// One of [`EVENT_KINDS`].
    pub event: String,
    /// Seconds since the Unix epoch.
    pub time: f64,
    /// The VM, for VM events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<u64>,
    /// Its VMM's pid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    /// Its name, if the VMM gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The sidecore's CPU (attach, park, unpark).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<usize>,
    /// Calls sent to the exit path per second (fallback storms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
    /// The vhost-user device's socket (vhost_connect, vhost_disconnect).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
}

/// What a VMM tells the daemon about its VM (`attach`'s params).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachRequest {
    /// vCPUs (rings).
    pub vcpus: u32,
    /// `pvm`, `vmx` or `svm`.
    pub backend: String,
    /// Guest RAM size (the guest memfd's size).
    pub ram_size: u64,
    /// Shared region GPA (= offset in the guest memfd).
    pub shared_gpa: u64,
    /// Shared region size.
    pub shared_size: u64,
    /// Page-table pool GPA.
    pub pool_gpa: u64,
    /// Page-table pool size.
    pub pool_size: u64,
    /// Image start.
    pub image_gpa: u64,
    /// Image end.
    pub image_end: u64,
    /// First byte of free RAM.
    pub free_gpa: u64,
    /// Per vCPU: its CPUID table as `[function, index, flags, eax, ebx, ecx, edx]`.
    pub cpuid: Vec<Vec<[u32; 7]>>,
    /// Serve vCPU 0's packet device too: the message then carries two more
    /// fds, the device's UDP socket and vCPU 0's irqfd (an eventfd), and the
    /// daemon maps the free RAM (`free_gpa` ..`ram_size`) for its buffers.
    #[serde(default)]
    pub packet_device: bool,
    /// A name for the VM (metrics and events label it with this; at most
    /// [`MAX_NAME`] bytes of letters, digits, `-`, `_`, `.`); default
    /// `vm<ID>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Whether the guest's page tables live in the pool and PTE_UPDATE
    /// serves them (the guest-agent); `false` for a guest whose tables are
    /// its own (Linux): no pool (its fields 0), PTE_UPDATE is an unknown op.
    #[serde(default = "page_tables_default")]
    pub page_tables: bool,
}

fn page_tables_default() -> bool {
    true
}

/// Longest VM name.
pub const MAX_NAME: usize = 64;

/// Checks a VM name a VMM gave.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(format!("a VM name has 1 to {MAX_NAME} bytes, not {}", name.len()));
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
        return Err(format!("VM name {name:?}: only letters, digits, '-', '_' and '.' are allowed"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(line: &str) -> Result<Call, BadCall> {
        match parse_message(line.as_bytes()) {
            Message::One(c) => c,
            Message::Batch(_) => panic!("not one: {line}"),
        }
    }

    #[test]
    fn requests_parse_with_their_ids() {
        let c = one(r#"{"jsonrpc":"2.0","id":7,"method":"status"}"#).expect("status");
        assert_eq!((c.id, c.method.name()), (Some(serde_json::json!(7)), "status"));
        let c = one(r#"{"jsonrpc":"2.0","id":"a","method":"hello","params":{}}"#).expect("hello");
        assert_eq!(c.id, Some(serde_json::json!("a")));
        let c = one(r#"{"jsonrpc":"2.0","method":"pause"}"#).expect("notification");
        assert!(c.id.is_none());
        let c = one(r#"{"jsonrpc":"2.0","id":1,"method":"subscribe","params":{"events":["attach"]}}"#).expect("sub");
        assert!(matches!(c.method, Method::Subscribe(SubscribeParams { events: Some(ref e) }) if e == &["attach"]));
    }

    #[test]
    fn bad_requests_get_the_standard_codes_under_their_id() {
        let err = |line: &str| one(line).expect_err(line);
        let e = err("{not json");
        assert_eq!((e.id, e.error.code), (Some(Value::Null), code::PARSE_ERROR));
        let e = err(r#"{"id":3,"method":"status"}"#);
        assert_eq!((e.id, e.error.code), (Some(serde_json::json!(3)), code::INVALID_REQUEST));
        let e = err(r#"{"jsonrpc":"2.0","id":4,"method":"nuke"}"#);
        assert_eq!((e.id.clone(), e.error.code), (Some(serde_json::json!(4)), code::METHOD_NOT_FOUND));
        assert!(e.error.message.contains("status"), "names the methods: {}", e.error.message);
        let e = err(r#"{"jsonrpc":"2.0","id":5,"method":"attach","params":{"vcpus":1}}"#);
        assert_eq!(e.error.code, code::INVALID_PARAMS);
        let e = err(r#"{"jsonrpc":"2.0","id":5,"method":"status","params":{"x":1}}"#);
        assert_eq!(e.error.code, code::INVALID_PARAMS);
        let e = err(r#"{"jsonrpc":"2.0","id":[1],"method":"status"}"#);
        assert_eq!((e.id, e.error.code), (Some(Value::Null), code::INVALID_REQUEST));
        let e = err(r#"{"jsonrpc":"2.0","id":6,"method":"status","extra":1}"#);
        assert_eq!(e.error.code, code::INVALID_REQUEST);
        let e = err(r#"{"jsonrpc":"2.0","id":6,"method":"status","params":3}"#);
        assert_eq!(e.error.code, code::INVALID_REQUEST);
        assert_eq!(err("[]").error.code, code::INVALID_REQUEST);
        assert_eq!(err("3").error.code, code::INVALID_REQUEST);
        let e = err(r#"{"jsonrpc":"2.0","method":"nuke"}"#);
        assert!(e.id.is_none(), "a bad notification is still not answered");
    }

    #[test]
    fn batches_parse_item_by_item() {
        let Message::Batch(items) =
            parse_message(br#"[{"jsonrpc":"2.0","id":1,"method":"hello"},{"jsonrpc":"2.0","id":2,"method":"x"}]"#)
        else {
            panic!("a batch")
        };
        assert!(items[0].is_ok());
        assert_eq!(items[1].as_ref().map(|_| ()).expect_err("x").error.code, code::METHOD_NOT_FOUND);
        let big = format!("[{}]", vec![r#"{"jsonrpc":"2.0","id":1,"method":"hello"}"#; MAX_BATCH + 1].join(","));
        assert!(matches!(parse_message(big.as_bytes()), Message::One(Err(_))));
    }

    #[test]
    fn replies_round_trip_on_the_client_side() {
        let line = response(&serde_json::json!(9), serde_json::json!({"a": 1})).to_string();
        assert_eq!(parse_response(&line, 9).expect("result")["a"], 1);
        assert!(matches!(parse_response(&line, 8), Err(ResponseError::Garbled(_))));
        let line = error_response(&serde_json::json!(9), &RpcError::new(code::BUSY, "later")).to_string();
        match parse_response(&line, 9) {
            Err(ResponseError::Rpc(e)) => assert_eq!((e.code, e.message.as_str()), (code::BUSY, "later")),
            other => panic!("{other:?}"),
        }
        assert!(matches!(parse_response(r#"{"ok":true}"#, 1), Err(ResponseError::Garbled(_))));
        let refused = error_response(&Value::Null, &RpcError::new(code::PERMISSION_DENIED, "no")).to_string();
        assert!(matches!(parse_response(&refused, 4), Err(ResponseError::Rpc(e)) if e.code == code::PERMISSION_DENIED));
        let req: Value = serde_json::from_str(&request_line(3, "status", None)).expect("json");
        assert_eq!(req, serde_json::json!({"jsonrpc":"2.0","id":3,"method":"status"}));
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("web-1.prod_a").is_ok());
        for bad in ["", "a b", "x\"y", "é", &"a".repeat(MAX_NAME + 1)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
