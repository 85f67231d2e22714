//! The control API: HTTP/1.1 and JSON over a Unix socket (`curl
//! --unix-socket` works as well as the CLI), paths under `/v1`.
//!
//! Who may do what is decided by the caller's credentials, taken from the
//! connection itself (`SO_PEERCRED` and `SO_PEERGROUPS`, never `/proc`):
//! root and members of the configured group may write and read; members of
//! `[api] reader_group` may read; nobody else gets anything. A write from
//! anyone else is refused before its body is read, and refusals are recorded
//! with a bounded record, rate-limited per uid. Connections and event streams
//! of uids that are neither root nor writers are bounded per uid and in
//! total, below the descriptor limit, so root and the writers always get
//! through. Bodies are size-limited per route and requests time-limited; a
//! malformed request gets a 4xx that says what is wrong.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    os::fd::{AsRawFd as _, RawFd},
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use axum::{
    Json, Router,
    extract::{
        ConnectInfo, DefaultBodyLimit, Path as UrlPath, Query, Request, State,
        connect_info::Connected, rejection::JsonRejection,
    },
    http::{Method, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{delete, get, post, put},
    serve::IncomingStream,
};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{UnixListener, UnixStream},
    sync::Mutex,
};
use tracing::{info, warn};

mod body;
mod deny;

use body::Body;

pub use deny::{DenyEntries, DenyItem, DenyRemoval, MAX_DENY_BODY};

use crate::{
    config::{ApiConfig, HealthConfig},
    core::{ChangeError, Changed, Core, Count, Mode, Options, Rollback, Session},
    readiness::{Checker, Live, Report},
    rules::{Direction, EditError, FirewallRule, PeerEdit, RuleSet},
};

pub const DEFAULT_SOCKET: &str = "/run/portcullis/portcullis.sock";
/// Largest body of a whole rule set (`PUT /v1/rules`): a 100k-rule set in
/// JSON fits.
pub const MAX_BODY: usize = 32 << 20;
/// Largest body of a peer change: tens of thousands of CIDRs.
pub const MAX_PEERS_BODY: usize = 4 << 20;
/// Largest body of a single rule, a mode or anything else.
pub const MAX_SMALL_BODY: usize = 64 << 10;
/// Longest action text kept in a record or a log line.
const MAX_ACTION: usize = 200;

/// The caller, from the socket's peer credentials at connect time.
#[derive(Clone, Debug)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
    /// Supplementary groups (`SO_PEERGROUPS`).
    pub groups: Vec<u32>,
}

impl Caller {
    /// Root, with no supplementary groups (tests and the fuzz harness).
    pub fn root() -> Self {
        Caller {
            uid: 0,
            gid: 0,
            pid: None,
            groups: Vec::new(),
        }
    }

    /// A caller whose credentials are unknown: may do nothing.
    pub fn nobody() -> Self {
        Caller {
            uid: u32::MAX,
            gid: u32::MAX,
            pid: None,
            groups: Vec::new(),
        }
    }

    /// The credentials of the peer of a connected Unix socket.
    pub fn of(stream: &UnixStream) -> Self {
        let Ok(cred) = stream.peer_cred() else {
            return Caller::nobody();
        };
        Caller {
            uid: cred.uid(),
            gid: cred.gid(),
            pid: cred.pid(),
            groups: peer_groups(stream.as_raw_fd()).unwrap_or_default(),
        }
    }

    /// Whether the caller's primary or a supplementary group is `gid`.
    pub fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }
}

/// The supplementary groups the peer of `fd` had when it connected
/// (`SO_PEERGROUPS`, Linux 4.13).
fn peer_groups(fd: RawFd) -> std::io::Result<Vec<u32>> {
    // NGROUPS_MAX is 65536; start small and grow to what the kernel asks.
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    for _ in 0..2 {
        let Ok(mut len) = libc::socklen_t::try_from(std::mem::size_of_val(groups.as_slice()))
        else {
            break;
        };
        // SAFETY: `groups` is a live buffer of `len` bytes; the kernel
        // writes at most `len` bytes into it and the true size into `len`.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = usize::try_from(len).unwrap_or(0) / std::mem::size_of::<libc::gid_t>();
        if rc == 0 {
            groups.truncate(n);
            return Ok(groups);
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::ERANGE) || n <= groups.len() {
            return Err(err);
        }
        groups.resize(n.min(65536), 0);
    }
    Err(std::io::Error::from_raw_os_error(libc::ERANGE))
}

impl Connected<IncomingStream<'_, Limited>> for Caller {
    fn connect_info(stream: IncomingStream<'_, Limited>) -> Self {
        stream.remote_addr().clone()
    }
}

/// Who may write: root, and the members of `group` when set.
#[derive(Clone, Debug, Default)]
pub struct Writers {
    pub gid: Option<u32>,
}

impl Writers {
    /// From the connection's credentials only: the primary gid and the
    /// supplementary groups the peer had when it connected.
    pub fn allows(&self, caller: &Caller) -> bool {
        caller.uid == 0 || self.gid.is_some_and(|gid| caller.in_group(gid))
    }
}

/// The bounds on what callers that are neither root nor writers may hold,
/// and the refusal log's rate limit.
pub struct Control {
    /// Members may read.
    pub reader_gid: Option<u32>,
    per_uid: usize,
    total: usize,
    streams_per_uid: usize,
    refusals_per_minute: u32,
    open: std::sync::Mutex<Counts>,
    streams: std::sync::Mutex<HashMap<u32, usize>>,
    refusals: std::sync::Mutex<HashMap<u32, Window>>,
    dropped: std::sync::Mutex<Window>,
}

#[derive(Default)]
struct Counts {
    per_uid: HashMap<u32, usize>,
    total: usize,
}

/// One uid's refusals in the current minute.
#[derive(Clone, Copy)]
struct Window {
    start: Instant,
    logged: u32,
    suppressed: u64,
}

impl Window {
    fn new() -> Self {
        Window {
            start: Instant::now(),
            logged: 0,
            suppressed: 0,
        }
    }

    /// Whether to log this event; and when a new minute begins, how many
    /// were left out in the last one.
    fn admit(&mut self, limit: u32) -> (bool, u64) {
        let mut summary = 0;
        if self.start.elapsed() >= Duration::from_secs(60) {
            summary = self.suppressed;
            *self = Window::new();
        }
        if self.logged < limit {
            self.logged += 1;
            (true, summary)
        } else {
            self.suppressed += 1;
            (false, summary)
        }
    }
}

impl Default for Control {
    fn default() -> Self {
        Control::new(&ApiConfig::default(), None)
    }
}

impl Control {
    /// The bounds of `config`; the total is capped at a quarter of the
    /// descriptor limit in force now.
    pub fn new(config: &ApiConfig, reader_gid: Option<u32>) -> Self {
        let fd_limit = nofile().map_or(1024, |(soft, _)| soft);
        let quarter = usize::try_from(fd_limit / 4).unwrap_or(usize::MAX).max(1);
        let total = config.max_connections.min(quarter).max(1);
        Control {
            reader_gid,
            per_uid: config.max_connections_per_uid.min(total).max(1),
            total,
            streams_per_uid: config.max_streams_per_uid.max(1),
            refusals_per_minute: config.refusals_logged_per_minute,
            open: Default::default(),
            streams: Default::default(),
            refusals: Default::default(),
            dropped: std::sync::Mutex::new(Window::new()),
        }
    }

    /// Whether a caller that is not a writer may read.
    pub fn reads(&self, caller: &Caller) -> bool {
        self.reader_gid.is_some_and(|gid| caller.in_group(gid))
    }

    /// A connection slot for an unprivileged uid, or why not.
    fn admit(self: &Arc<Self>, uid: u32) -> Result<Slot, &'static str> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if open.total >= self.total {
            return Err("too many connections from unprivileged users");
        }
        let n = open.per_uid.entry(uid).or_insert(0);
        if *n >= self.per_uid {
            return Err("too many connections from this uid");
        }
        *n += 1;
        open.total += 1;
        Ok(Slot {
            control: self.clone(),
            uid,
        })
    }

    /// An event stream for an unprivileged uid, or `None` over the limit.
    fn stream(self: &Arc<Self>, uid: u32) -> Option<StreamSlot> {
        let mut streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        let n = streams.entry(uid).or_insert(0);
        if *n >= self.streams_per_uid {
            return None;
        }
        *n += 1;
        Some(StreamSlot {
            control: self.clone(),
            uid,
        })
    }

    /// Whether to record a refusal of `uid`, and how many went unrecorded
    /// in its previous minute.
    fn refusal(&self, uid: u32) -> (bool, u64) {
        let mut map = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= 4096 && !map.contains_key(&uid) {
            // Forget the uids whose minute is over (their summaries with
            // them): the map stays bounded.
            map.retain(|_, w| w.start.elapsed() < Duration::from_secs(60));
            if map.len() >= 4096 {
                return (false, 0);
            }
        }
        map.entry(uid)
            .or_insert_with(Window::new)
            .admit(self.refusals_per_minute)
    }
}

/// An open connection of an unprivileged uid; released when dropped.
struct Slot {
    control: Arc<Control>,
    uid: u32,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.control.open.lock().unwrap_or_else(|p| p.into_inner());
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.per_uid.get_mut(&self.uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.per_uid.remove(&self.uid);
            }
        }
    }
}

/// An event stream of an unprivileged uid; released when dropped.
struct StreamSlot {
    control: Arc<Control>,
    uid: u32,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut streams = self
            .control
            .streams
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = streams.get_mut(&self.uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                streams.remove(&self.uid);
            }
        }
    }
}

/// The API socket's listener: takes the peer's credentials right after
/// accept and closes at once a connection of an unprivileged uid over its
/// bounds, so root and the writers always find a descriptor.
pub struct Limited {
    listener: UnixListener,
    writers: Writers,
    control: Arc<Control>,
}

/// An accepted connection, holding its slot while it is open.
pub struct Conn {
    stream: UnixStream,
    _slot: Option<Slot>,
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

impl axum::serve::Listener for Limited {
    type Io = Conn;
    type Addr = Caller;

    async fn accept(&mut self) -> (Conn, Caller) {
        loop {
            let stream = match self.listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors or memory: let some go, then retry.
                    if let Some((true, n)) = self.control.dropped_log() {
                        warn!(error = %e, more = n, "cannot accept an API connection");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let caller = Caller::of(&stream);
            if self.writers.allows(&caller) {
                return (
                    Conn {
                        stream,
                        _slot: None,
                    },
                    caller,
                );
            }
            match self.control.admit(caller.uid) {
                Ok(slot) => {
                    return (
                        Conn {
                            stream,
                            _slot: Some(slot),
                        },
                        caller,
                    );
                }
                Err(why) => {
                    // Say why without waiting for the peer, then close.
                    let reply = format!(
                        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
                        why.len() + 13
                    ) + &format!("{{\"error\":\"{why}\"}}\n");
                    let _ = stream.try_write(reply.as_bytes());
                    if let Some((true, n)) = self.control.dropped_log() {
                        warn!(uid = caller.uid, more = n, "API connection closed: {why}");
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Caller> {
        Ok(Caller::nobody())
    }
}

impl Control {
    /// Rate limit of the log lines about connections closed at accept.
    fn dropped_log(&self) -> Option<(bool, u64)> {
        let mut w = self.dropped.lock().unwrap_or_else(|p| p.into_inner());
        Some(w.admit(self.refusals_per_minute))
    }
}

#[derive(Clone)]
pub struct Api {
    pub core: Arc<Mutex<Core>>,
    pub writers: Writers,
    pub feed: crate::events::Feed,
    /// A request that takes longer (a slow client's included) gets a 408.
    pub request_timeout: Duration,
    pub readiness: Arc<Checker>,
    /// Readers, connection and stream bounds, the refusal log's limit.
    pub control: Arc<Control>,
}

/// An error reply: `{"error": "..."}` with a status that says whose fault.
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody { error: self.1 })).into_response()
    }
}

impl From<ChangeError> for ApiError {
    fn from(e: ChangeError) -> Self {
        let status = match &e {
            ChangeError::Invalid(_) | ChangeError::TooLarge(_) | ChangeError::Config(_) => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            ChangeError::Conflict { .. }
            | ChangeError::Edit(EditError::Exists(_))
            | ChangeError::LocksOutCaller(_)
            | ChangeError::BlocksNextLogin(_)
            | ChangeError::LocksOutOpenSessions(_)
            | ChangeError::RuntimeChanges(_)
            | ChangeError::AwaitingConfirmation { .. } => StatusCode::CONFLICT,
            ChangeError::Edit(EditError::NoRule(_) | EditError::NoPeer(_))
            | ChangeError::NothingToConfirm => StatusCode::NOT_FOUND,
            ChangeError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let message = match &e {
            // The place in words (`ingress rule "web"`), not as an index.
            ChangeError::Invalid(r) => format!("invalid rule set: {}", r.in_words()),
            _ => e.to_string(),
        };
        ApiError(status, message)
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        ApiError(e.status(), format!("bad request body: {}", e.body_text()))
    }
}

/// Query parameters of a change: `expected_generation=N` (refuse unless N
/// is live), `dry_run=true` (only report), `force=true` (even if it cuts the
/// caller's SSH session), `confirm_within=SECS` (roll back unless confirmed).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    pub expected_generation: Option<u64>,
    #[serde(default)]
    pub dry_run: bool,
    #[serde(default)]
    pub force: bool,
    pub confirm_within: Option<u64>,
    /// The caller's `SSH_CONNECTION`, as the CLI declares it. Trusted only
    /// to refuse more: a caller who lies can only give up its own lockout
    /// protection, which `force` does anyway.
    pub ssh_session: Option<String>,
}

impl Expect {
    fn options(&self, caller: &Caller) -> Options {
        // The daemon's own reading of the caller's environment first; the
        // declared session where the daemon cannot see the caller (another
        // user's process under ProtectProc=invisible).
        let session = caller
            .pid
            .and_then(Session::of_process)
            .or_else(|| self.ssh_session.as_deref().and_then(Session::parse));
        Options {
            expected: self.expected_generation,
            allow_ping: None,
            dry_run: self.dry_run,
            force: self.force,
            caller_session: session,
            confirm_within: self.confirm_within,
        }
    }

    fn label(&self, what: &str) -> String {
        if self.dry_run {
            format!("{what} (dry run)")
        } else {
            what.to_string()
        }
    }
}

impl Api {
    async fn write<T>(
        &self,
        caller: &Caller,
        what: &str,
        f: impl FnOnce(&mut Core) -> Result<T, ChangeError>,
    ) -> Result<T, ApiError> {
        let what = bounded(what);
        if !self.writers.allows(caller) {
            // The guard refuses these before the body is read; this is the
            // same check again, in case a route escapes it.
            return Err(self.refuse_write(caller, &what, None).await);
        }
        let mut core = self.core.lock().await;
        let (uid, pid) = (Some(caller.uid), caller.pid);
        core.acting(crate::core::Actor {
            uid,
            pid,
            action: what.clone(),
        });
        let result = f(&mut core);
        core.acting(crate::core::Actor::default());
        let outcome = match &result {
            Ok(_) => {
                info!(uid = caller.uid, pid = ?caller.pid, what, generation = core.generation(), hash = core.hash(), "change applied");
                "applied".to_string()
            }
            Err(e) => {
                warn!(uid = caller.uid, pid = ?caller.pid, what, error = %e, "change refused");
                format!("refused: {e}")
            }
        };
        // The record is on disk before the caller hears the answer.
        audited(core.record(uid, pid, &what, outcome))?;
        result.map_err(ApiError::from)
    }

    /// Refuses a write from a caller that may not write: counted always;
    /// recorded (audit log and journal) with a bounded record, at most
    /// `refusals_logged_per_minute` times per uid and minute, then once
    /// with the number left out.
    async fn refuse_write(&self, caller: &Caller, what: &str, size: Option<u64>) -> ApiError {
        let reason = format!(
            "uid {} may not change rules (root or the configured group only)",
            caller.uid
        );
        let (log, left_out) = self.control.refusal(caller.uid);
        let mut core = self.core.lock().await;
        core.refused_write();
        let (uid, pid) = (Some(caller.uid), caller.pid);
        if left_out > 0 {
            warn!(
                uid = caller.uid,
                left_out, "write refused: more refusals in the last minute were not recorded"
            );
            let _ = core.record(
                uid,
                pid,
                "refused writes (summary)",
                format!("refused: {left_out} more writes in the previous minute were not recorded"),
            );
        }
        if log {
            let size = size.map_or_else(|| "unknown".to_string(), |n| n.to_string());
            warn!(uid = caller.uid, pid = ?caller.pid, what, body_bytes = %size, "write refused: not root or in the portcullis group");
            if let Err(e) = core.record(
                uid,
                pid,
                what,
                format!("refused: {reason}; body of {size} bytes not read"),
            ) {
                return ApiError(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("cannot write the audit log: {e:#}"),
                );
            }
        }
        ApiError(StatusCode::FORBIDDEN, reason)
    }
}

/// `s`, cut to at most [`MAX_ACTION`] bytes at a character boundary.
fn bounded(s: &str) -> String {
    crate::audit::bounded(s, MAX_ACTION)
}

/// Decides from the connection's credentials and the method alone, before
/// any body is read: reads need root, a writer or a reader; anything else
/// needs root or a writer.
async fn guard(State(api): State<Api>, req: Request, next: Next) -> Response {
    let caller = req
        .extensions()
        .get::<ConnectInfo<Caller>>()
        .map_or_else(Caller::nobody, |c| c.0.clone());
    if api.writers.allows(&caller) {
        return next.run(req).await;
    }
    // `POST /v1/explain` changes nothing (the packet is run through an
    // instance of the programs that cannot write): a read.
    let read = req.method() == Method::GET
        || req.method() == Method::HEAD
        || (req.method() == Method::POST && req.uri().path() == EXPLAIN_PATH);
    if read && api.control.reads(&caller) {
        return next.run(req).await;
    }
    let refusal = if read {
        ApiError(
            StatusCode::FORBIDDEN,
            format!(
                "uid {} may not read (root, the writers' group or [api] reader_group only)",
                caller.uid
            ),
        )
    } else {
        let what = bounded(&format!("{} {}", req.method(), req.uri().path()));
        let size = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        api.refuse_write(&caller, &what, size).await
    };
    // The body stays unread: end the connection after the answer.
    let mut resp = refusal.into_response();
    resp.headers_mut().insert(
        header::CONNECTION,
        header::HeaderValue::from_static("close"),
    );
    resp
}

fn audited(r: anyhow::Result<()>) -> Result<(), ApiError> {
    r.map_err(|e| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot write the audit log: {e:#}"),
        )
    })
}

/// `GET /v1/status`: is the host protected, where, how (the CLI's
/// `portcullis status` reads it).
#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    /// Every interface to protect is protected (none missing).
    pub enforcing: bool,
    pub generation: u64,
    pub hash: String,
    pub interfaces: BTreeMap<String, String>,
    /// Configured interfaces that are missing: not protected.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing_interfaces: Vec<String>,
    pub rules: usize,
    pub counters: BTreeMap<String, ReasonCount>,
    pub refused_writes: u64,
    pub audit_head: String,
    pub mode: Mode,
    /// Flows in the connection table, and its capacity.
    pub conntrack: Conntrack,
    /// The most recent drops (sampled: at most a few hundred a second).
    pub recent_drops: Vec<crate::events::Event>,
    /// SSH readiness: each check with its state and reason.
    pub readiness: Report,
    /// A change awaiting confirmation: its generation and deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<PendingWindow>,
    /// The last change rolled back for want of confirmation, since the
    /// daemon started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rollback: Option<Rollback>,
    /// Runtime changes: what the live set holds that the configuration
    /// does not (a reload refuses to drop them; `rules save` keeps them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub runtime_changes: Vec<String>,
    /// Egress volume per destination, when counted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_volume: Option<crate::core::VolumeStatus>,
    /// The deny sets by name: entries and what each dropped.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny_sets: Vec<crate::core::DenySetView>,
    /// The CrowdSec bouncer, when configured: last successful poll, error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crowdsec: Option<crate::crowdsec::BouncerStatus>,
    /// The etcd member list (`[fleet]`): its revision and staleness.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<crate::core::FleetStatus>,
    /// The DNS forwarder for FQDN egress rules, when it runs: where it
    /// listens, its upstreams, the learned destinations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<crate::core::fqdn::DnsStatus>,
}

/// A verdict counter, and whether its packets were passed or dropped (so
/// no reader needs to guess from the name).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReasonCount {
    pub packets: u64,
    pub bytes: u64,
    pub passes: bool,
}

impl ReasonCount {
    fn of(reason: portcullis_common::Reason, c: Count) -> Self {
        ReasonCount {
            packets: c.packets,
            bytes: c.bytes,
            passes: reason.passes(),
        }
    }
}

/// The connection table's use, or why it could not be read.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Conntrack {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entries: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A change awaiting confirmation.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PendingWindow {
    pub generation: u64,
    /// Unix time (seconds) at which it is rolled back unless confirmed.
    pub deadline: u64,
}

/// An error reply's body.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// Evaluates SSH readiness (the core's part under its lock, the probes of
/// the host outside it).
pub async fn readiness(api: &Api) -> Report {
    let (live, fleet) = {
        let core = api.core.lock().await;
        (Live::of(&core), core.fleet_status())
    };
    let checker = api.readiness.clone();
    let mut report = match tokio::task::spawn_blocking(move || checker.report(live)).await {
        Ok(report) => report,
        Err(e) => Report::failed(format!("readiness evaluation panicked: {e}")),
    };
    // Reported, never gating: enforcement does not wait for etcd.
    if let Some(f) = fleet {
        report.checks.push(crate::readiness::fleet_check(&f));
    }
    report
}

/// `GET /v1/ready`: the readiness document, 200 when SSH-ready, else 503.
async fn ready(State(api): State<Api>) -> (StatusCode, Json<Report>) {
    let report = readiness(&api).await;
    let code = if report.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(report))
}

async fn status(State(api): State<Api>) -> Result<Json<Status>, ApiError> {
    let readiness = readiness(&api).await;
    let mut core = api.core.lock().await;
    let conntrack = match core.conntrack_usage() {
        Ok((entries, capacity)) => Conntrack {
            entries: u64::try_from(entries).ok(),
            capacity: Some(capacity.into()),
            error: None,
        },
        Err(e) => Conntrack {
            error: Some(format!("{e:#}")),
            ..Conntrack::default()
        },
    };
    let counters = reason_counts(&core)?;
    read_volume(&api, &mut core);
    Ok(Json(Status {
        enforcing: core.protected(),
        generation: core.generation(),
        hash: core.hash().to_string(),
        interfaces: core.interfaces().clone(),
        missing_interfaces: core.missing_interfaces(),
        rules: core.packed_rules().len(),
        counters,
        refused_writes: core.refused_writes(),
        audit_head: core.audit_head().to_string(),
        mode: core.mode().clone(),
        conntrack,
        recent_drops: {
            let recent = api.feed.recent();
            recent
                .get(recent.len().saturating_sub(10)..)
                .unwrap_or_default()
                .to_vec()
        },
        readiness,
        pending: core.pending().map(|p| PendingWindow {
            generation: p.generation,
            deadline: p.deadline,
        }),
        last_rollback: core.last_rollback().cloned(),
        runtime_changes: core.runtime_changes(),
        egress_volume: core.volume_on().then(|| core.volume_status()),
        deny_sets: core.deny_sets(),
        crowdsec: core.crowdsec.clone(),
        fleet: core.fleet_status(),
        dns: core.dns_status(),
    }))
}

/// Reads egress volume into the core's ledger and raises what it finds: a
/// destination over the alert volume (journal warning, `watch` event), and
/// traffic the data path's table had no room for.
pub fn read_volume(api: &Api, core: &mut Core) {
    match core.volume_read() {
        Ok((alerts, overflow)) => {
            for a in &alerts {
                let d = &a.destination;
                tracing::warn!(
                    destination = %d.destination,
                    protocol = %d.protocol,
                    port = d.port,
                    bytes = d.window_bytes,
                    limit = a.limit,
                    interval_secs = a.interval_secs,
                    "egress volume: a destination passed the alert volume"
                );
                api.feed.notify(crate::events::Event::volume_alert(a));
            }
            if overflow.packets > 0 {
                tracing::warn!(
                    packets = overflow.packets,
                    bytes = overflow.bytes,
                    "egress volume: the destination table was full; this traffic is counted only as overflow"
                );
            }
        }
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "egress volume: cannot read the data path's table")
        }
    }
}

/// The verdict counters by reason name.
fn reason_counts(core: &Core) -> Result<BTreeMap<String, ReasonCount>, ApiError> {
    Ok(core
        .reason_counters()
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")))?
        .into_iter()
        .map(|(r, c)| (r.name().to_string(), ReasonCount::of(r, c)))
        .collect())
}

/// `GET /v1/rules`: the live rule set with its generation and hash.
#[derive(Debug, Serialize, Deserialize)]
pub struct Rules {
    pub generation: u64,
    pub hash: String,
    #[serde(flatten)]
    pub rules: RuleSet,
}

async fn get_rules(State(api): State<Api>) -> Json<Rules> {
    let core = api.core.lock().await;
    Json(Rules {
        generation: core.generation(),
        hash: core.hash().to_string(),
        rules: core.rules(),
    })
}

async fn put_rules(
    State(api): State<Api>,
    ConnectInfo(caller): ConnectInfo<Caller>,
    Query(expect): Query<Expect>,
    body: Result<Body<crate::rules::Replacement>, JsonRejection>,
) -> Result<Json<Changed>, ApiError> {
    let Body(rules) = body?;
    let opts = expect.options(&caller);
    let what = expect.label("replace rules");
    let changed = api
        .write(&caller, &what, |core| core.replace(&opts, rules))
        .await?;
    crate::core::watch_confirmation(&api.core, &changed);
    Ok(Json(changed))
}

async fn add_rule(
    State(api): State<Api>,
    ConnectInfo(caller): ConnectInfo<Caller>,
    UrlPath(direction): UrlPath<Direction>,
    Query(expect): Query<Expect>,
    body: Result<Body<FirewallRule>, JsonRejection>,
) -> Result<(StatusCode, Json<Changed>), ApiError> {
    let Body(rule) = body?;
    let opts = expect.options(&caller);
    let what = expect.label("add rule");
    let changed = api
        .write(&caller, &what, |core| core.add_rule(&opts, direction, rule))
        .await?;
    crate::core::watch_confirmation(&api.core, &changed);
    Ok((StatusCode::CREATED, Json(changed)))
}

/// `PUT /v1/egress`: the egress policy (`{"egress": "allow"}` or
/// `"allowlist"`). A rule change: writers only, audited.
#[derive(Debug, Serialize, Deserialize)]
pub struct EgressPolicy {
    pub egress: crate::rules::EgressMode,
}

async fn put_egress(
    State(api): State<Api>,
    ConnectInfo(caller): ConnectInfo<Caller>,
    Query(expect): Query<Expect>,
    body: Result<Body<EgressPolicy>, JsonRejection>,
) -> Result<Json<Changed>, ApiError> {
    let Body(policy) = body?;
    let opts = expect.options(&caller);
    let what = expect.label(&format!("set egress {}", policy.egress.name()));
    let changed = api
        .write(&caller, &what, |core| {
            core.change(&opts, |live| {
                live.egress = Some(policy.egress);
                Ok(())
            })
        })
        .await?;
    crate::core::watch_confirmation(&api.core, &changed);
    Ok(Json(changed))
}

async fn remove_rule(
    State(api): State<Api>,
    ConnectInfo(caller): ConnectInfo<Caller>,
    UrlPath(id): UrlPath<String>,
    Query(expect): Query<Expect>,
) -> Result<Json<Changed>, ApiError> {
    let opts = expect.options(&caller);
    let what = expect.label("remove rule");
    let changed = api
        .write(&caller, &what, |core| {
            core.change(&opts, |live| Ok(live.remove_rule(&id)?))
        })
        .await?;
    crate::core::watch_confirmation(&api.core, &changed);
    Ok(Json(changed))
}

/// Peer CIDRs, for add, remove and replace.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peers {
    pub peers: Vec<String>,
    /// The cluster id, when there is no cluster yet.
    #[serde(default)]
    pub cluster: Option<String>,
}

/// `GET /v1/peers`.
#[derive(Debug, Serialize, Deserialize)]
pub struct PeerList {
    pub generation: u64,
    pub cluster: String,
    pub peers: Vec<String>,
}

async fn get_peers(State(api): State<Api>) -> Json<PeerList> {
    let core = api.core.lock().await;
    let cluster = core
        .packed_rules()
        .head()
        .cluster
        .clone()
        .unwrap_or_default();
    Json(PeerList {
        generation: core.generation(),
        cluster: cluster.id,
        peers: cluster.peers,
    })
}

async fn change_peers(
    api: Api,
    caller: Caller,
    expect: Expect,
    body: Result<Body<Peers>, JsonRejection>,
    op: PeerEdit,
) -> Result<Json<Changed>, ApiError> {
    let Body(body) = body?;
    let opts = expect.options(&caller);
    let what = expect.label("change peers");
    let changed = api
        .write(&caller, &what, |core| {
            core.change(&opts, |live| {
                Ok(live.edit_peers(op, &body.peers, body.cluster.as_deref())?)
            })
        })
        .await?;
    crate::core::watch_confirmation(&api.core, &changed);
    Ok(Json(changed))
}

async fn add_peers(
    State(api): State<Api>,
    ConnectInfo(caller): ConnectInfo<Caller>,
    Query(expect): Query<Expect>,
    body: Result<Body<Peers>, JsonRejection>,
) -> Result<Json<Changed>, ApiError> {
    change_peers(api, caller, expect, body, PeerEdit::Add).await
}

async fn remove_peers(
    State(api): State<Api>,
    ConnectInfo(caller): ConnectInfo<Caller>,
    Query(expect): Query<Expect>,
    body: Result<Body<Peers>, JsonRejection>,
) -> Result<Json<Changed>, ApiError> {
    change_peers(api, caller, expect, body, PeerEdit::Remove).await
}

async fn replace_peers(
    State(api): State<Api>,
    ConnectInfo(caller): ConnectInfo<Caller>,
    Query(expect): Query<Expect>,
    body: Result<Body<Peers>, JsonRejection>,
) -> Result<Json<Changed>, ApiError> {
    change_peers(api, caller, expect, body, PeerEdit::Replace).await
}

/// `GET /v1/counters`: by verdict reason, and by rule slot (`rule:<id>`,
/// `cluster:<id>`, `ssh`; rules removed since the daemon started included
/// when they counted something).
#[derive(Debug, Serialize, Deserialize)]
pub struct Counters {
    pub generation: u64,
    pub reasons: BTreeMap<String, ReasonCount>,
    pub rules: BTreeMap<String, Count>,
}

async fn counters(State(api): State<Api>) -> Result<Json<Counters>, ApiError> {
    let mut core = api.core.lock().await;
    let reasons = reason_counts(&core)?;
    Ok(Json(Counters {
        generation: core.generation(),
        reasons,
        rules: core.rule_counters().into_iter().collect(),
    }))
}

/// The explain endpoint, which readers may use.
const EXPLAIN_PATH: &str = "/v1/explain";

/// `POST /v1/explain`: what the live data path decides for a described
/// packet, and what a proposed rule set would (see [`crate::explain`]).
async fn explain(
    State(api): State<Api>,
    body: Result<Body<crate::explain::Request>, JsonRejection>,
) -> Result<Json<crate::explain::Explained>, ApiError> {
    let Body(req) = body?;
    let mut core = api.core.lock().await;
    Ok(Json(core.explain(&req)?))
}

/// Prometheus exposition (OpenMetrics text, see [`crate::metrics`]).
async fn metrics(
    State(api): State<Api>,
) -> Result<([(axum::http::HeaderName, &'static str); 1], String), ApiError> {
    let ready = readiness(&api).await.ready;
    let mut core = api.core.lock().await;
    let reasons = core
        .reason_counters()
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")))?;
    let mut rules: Vec<_> = core.rule_counters().into_iter().collect();
    rules.sort_by(|a, b| a.0.cmp(&b.0));
    let snapshot = crate::metrics::Snapshot {
        reasons,
        rules,
        generation: core.generation(),
        refused_writes: core.refused_writes(),
        enforcing: core.protected(),
        mode: core.mode().clone(),
        ready,
        conntrack: core.conntrack_usage().ok(),
        deny_sets: core
            .deny_sets()
            .into_iter()
            .map(|v| {
                let c = Count {
                    packets: v.dropped_packets,
                    bytes: v.dropped_bytes,
                };
                (v.set, v.count, c)
            })
            .collect(),
        egress_volume: core.volume_on().then(|| core.volume_status()),
        fleet: core.fleet_status().map(|f| (f.revision, f.stale_secs)),
    };
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            crate::metrics::CONTENT_TYPE,
        )],
        crate::metrics::render(&snapshot),
    ))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    #[serde(default)]
    follow: bool,
}

/// Recent drop events as a JSON array, or with `follow=true` a stream of
/// them, one JSON object per line, as they happen.
async fn events(
    State(api): State<Api>,
    ConnectInfo(caller): ConnectInfo<Caller>,
    Query(q): Query<EventsQuery>,
) -> Response {
    if !q.follow {
        return Json(api.feed.recent()).into_response();
    }
    let slot = if api.writers.allows(&caller) {
        None
    } else {
        match api.control.stream(caller.uid) {
            Some(slot) => Some(slot),
            None => {
                return ApiError(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!(
                        "uid {} has too many event streams open ([api] max_streams_per_uid)",
                        caller.uid
                    ),
                )
                .into_response();
            }
        }
    };
    let rx = api.feed.subscribe();
    // The slot lives as long as the stream.
    let stream = futures::stream::unfold((rx, slot), |(mut rx, slot)| async move {
        loop {
            match rx.recv().await {
                Ok(e) => {
                    let line = serde_json::to_string(&e).unwrap_or_default() + "\n";
                    return Some((Ok::<_, std::convert::Infallible>(line), (rx, slot)));
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(stream),
    )
        .into_response()
}

async fn get_mode(State(api): State<Api>) -> Json<Mode> {
    Json(api.core.lock().await.mode().clone())
}

async fn put_mode(
    State(api): State<Api>,
    ConnectInfo(caller): ConnectInfo<Caller>,
    Query(expect): Query<Expect>,
    body: Result<Body<Mode>, JsonRejection>,
) -> Result<Json<Changed>, ApiError> {
    let Body(mode) = body?;
    let what = expect.label(&format!(
        "set mode {}",
        serde_json::to_string(&mode).unwrap_or_default()
    ));
    let opts = expect.options(&caller);
    let changed = api
        .write(&caller, &what, |core| core.set_mode_with(mode, &opts))
        .await?;
    Ok(Json(changed))
}

/// `POST /v1/confirm`: the generation that stays.
#[derive(Debug, Serialize, Deserialize)]
pub struct Confirmed {
    pub confirmed: u64,
}

async fn confirm(
    State(api): State<Api>,
    ConnectInfo(caller): ConnectInfo<Caller>,
) -> Result<Json<Confirmed>, ApiError> {
    let generation = api.write(&caller, "confirm", |core| core.confirm()).await?;
    Ok(Json(Confirmed {
        confirmed: generation,
    }))
}

/// Query parameters of a reload: `dry_run=true` (only report),
/// `discard_runtime=true` (drop runtime changes the file would undo),
/// `force=true` and `ssh_session` as for a change.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReloadQuery {
    #[serde(default)]
    pub dry_run: bool,
    #[serde(default)]
    pub discard_runtime: bool,
    #[serde(default)]
    pub force: bool,
    pub ssh_session: Option<String>,
}

/// `POST /v1/reload`: re-reads the configuration file and applies what it
/// can, synchronously; the reply says what changed and what needs a
/// restart. Refused (409) when it would drop runtime changes, naming them.
async fn reload(
    State(api): State<Api>,
    ConnectInfo(caller): ConnectInfo<Caller>,
    Query(q): Query<ReloadQuery>,
) -> Result<Json<crate::core::Reloaded>, ApiError> {
    let expect = Expect {
        dry_run: q.dry_run,
        force: q.force,
        ssh_session: q.ssh_session,
        ..Default::default()
    };
    let session = expect.options(&caller).caller_session;
    let opts = crate::core::ReloadOptions {
        dry_run: q.dry_run,
        discard_runtime: q.discard_runtime,
        force: q.force,
        caller_session: session,
    };
    let what = expect.label(if q.discard_runtime {
        "reload --discard-runtime"
    } else {
        "reload"
    });
    let reloaded = api
        .write(&caller, &what, |core| core.reload_file(&opts))
        .await?;
    Ok(Json(reloaded))
}

/// `POST /v1/rules/save`: the live rule set becomes permanent.
async fn save_rules(
    State(api): State<Api>,
    ConnectInfo(caller): ConnectInfo<Caller>,
) -> Result<Json<crate::core::Saved>, ApiError> {
    let saved = api
        .write(&caller, "save rules", |core| core.save_rules())
        .await?;
    Ok(Json(saved))
}

async fn not_found() -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        "no such endpoint; see /v1/status, /v1/rules, /v1/peers, /v1/counters, /v1/metrics".into(),
    )
}

pub fn router(api: Api) -> Router {
    let timeout = api.request_timeout;
    let small = DefaultBodyLimit::max(MAX_SMALL_BODY);
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/ready", get(ready))
        .route(
            "/v1/rules",
            get(get_rules)
                .put(put_rules)
                .layer(DefaultBodyLimit::max(MAX_BODY)),
        )
        .route("/v1/rules/save", post(save_rules).layer(small))
        .route("/v1/rules/{direction}", post(add_rule).layer(small))
        .route("/v1/reload", post(reload).layer(small))
        .route("/v1/rule/{id}", delete(remove_rule).layer(small))
        .route("/v1/egress", put(put_egress).layer(small))
        .route(
            "/v1/peers",
            get(get_peers)
                .put(replace_peers)
                .post(add_peers)
                .delete(remove_peers)
                .layer(DefaultBodyLimit::max(MAX_PEERS_BODY)),
        )
        .route("/v1/confirm", post(confirm).layer(small))
        .route("/v1/mode", get(get_mode).put(put_mode).layer(small))
        .route("/v1/counters", get(counters))
        .route(
            EXPLAIN_PATH,
            post(explain).layer(DefaultBodyLimit::max(MAX_BODY)),
        )
        .route("/v1/events", get(events))
        .route("/v1/metrics", get(metrics))
        .route("/v1/deny", get(deny::list_sets))
        .route(
            "/v1/deny/{set}",
            get(deny::list)
                .post(deny::add)
                .put(deny::replace)
                .delete(deny::remove)
                .layer(DefaultBodyLimit::max(MAX_DENY_BODY)),
        )
        .fallback(not_found)
        .layer(small)
        .layer(middleware::from_fn_with_state(api.clone(), guard))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            timeout,
        ))
        .with_state(api)
}

/// Raises the soft descriptor limit to the hard one (systemd gives units a
/// soft limit of 1024); returns the soft limit now in force.
pub fn raise_fd_limit() -> u64 {
    match nofile() {
        Some((soft, hard)) if soft < hard => {
            let raised = libc::rlimit {
                rlim_cur: hard,
                rlim_max: hard,
            };
            // SAFETY: `raised` is a valid rlimit the call only reads.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
                hard
            } else {
                soft
            }
        }
        Some((soft, _)) => soft,
        None => 1024,
    }
}

/// The soft and hard descriptor limits.
fn nofile() -> Option<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid rlimit the call writes into.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    (rc == 0).then_some((limit.rlim_cur, limit.rlim_max))
}

/// Binds the socket: owned by root and by `group` (the readers' group when
/// there is one, else the writers'), mode 0660, both set as the node is
/// created (the mode with `fchmod` on the socket before `bind` under a
/// umask that keeps it, the group as the thread's filesystem gid), never by
/// path afterwards. Without a group only root can connect.
pub fn bind(path: &Path, group: Option<u32>) -> anyhow::Result<UnixListener> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, socket};
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => {
            std::fs::remove_file(path)
                .with_context(|| format!("cannot remove the old socket {}", path.display()))?;
        }
        Ok(_) => anyhow::bail!(
            "{} exists and is not a socket; refusing to replace it",
            path.display()
        ),
        Err(_) => {}
    }
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .context("cannot create the API socket")?;
    // The node bind creates takes this mode, less the umask.
    nix::sys::stat::fchmod(&fd, nix::sys::stat::Mode::from_bits_truncate(0o660))
        .context("cannot set the API socket's mode")?;
    let addr =
        UnixAddr::new(path).with_context(|| format!("bad socket path {}", path.display()))?;
    // Created root:root 0660 (nobody else can connect yet), then given to
    // the group without following a link. Under the unit this needs
    // CAP_CHOWN (root is not a member of the group).
    let old_umask = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o117));
    let bound = nix::sys::socket::bind(fd.as_raw_fd(), &addr);
    nix::sys::stat::umask(old_umask);
    bound.with_context(|| format!("cannot bind {}", path.display()))?;
    if let Some(gid) = group {
        std::os::unix::fs::lchown(path, None, Some(gid)).with_context(|| {
            format!(
                "cannot give the API socket {} to group {gid} (the daemon needs CAP_CHOWN)",
                path.display()
            )
        })?;
    }
    nix::sys::socket::listen(
        &fd,
        nix::sys::socket::Backlog::new(1024).unwrap_or(nix::sys::socket::Backlog::MAXCONN),
    )
    .with_context(|| format!("cannot listen on {}", path.display()))?;
    let std_listener = std::os::unix::net::UnixListener::from(fd);
    Ok(UnixListener::from_std(std_listener)?)
}

/// Serves the API on `listener` until the future is dropped: connections
/// of uids that are neither root nor writers are bounded at accept.
pub async fn serve(listener: UnixListener, api: Api) -> anyhow::Result<()> {
    let limited = Limited {
        listener,
        writers: api.writers.clone(),
        control: api.control.clone(),
    };
    let app = router(api).into_make_service_with_connect_info::<Caller>();
    axum::serve(limited, app).await?;
    Ok(())
}

/// Serves the health endpoint: `GET /` or `/health` answers `200 ready` or
/// `503 not ready`, nothing more (the readiness document stays on the API
/// socket). Connections are bounded in total and per source address, and a
/// client that has not sent its request head within the timeout is cut off.
pub async fn serve_health(
    listener: tokio::net::TcpListener,
    api: Api,
    config: HealthConfig,
) -> anyhow::Result<()> {
    let header_timeout = Duration::from_secs(config.header_timeout_secs);
    let open: Arc<std::sync::Mutex<HealthCounts>> = Default::default();
    let mut dropped = Window::new();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                if dropped.admit(10).0 {
                    warn!(error = %e, "health endpoint: cannot accept");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(slot) = HealthSlot::take(&open, peer.ip(), &config) else {
            // Over a bound: closed at once, unanswered.
            drop(stream);
            continue;
        };
        let api = api.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req| health_answer(api.clone(), req));
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout)
                .keep_alive(false)
                .max_buf_size(8192);
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            // Whatever the client does, the connection ends.
            let _ = tokio::time::timeout(header_timeout * 2, conn).await;
        });
    }
}

/// Open health connections, per source and in total.
#[derive(Default)]
struct HealthCounts {
    per_source: HashMap<IpAddr, usize>,
    total: usize,
}

/// A health connection's place, per source address and in total.
struct HealthSlot {
    open: Arc<std::sync::Mutex<HealthCounts>>,
    source: IpAddr,
}

impl HealthSlot {
    fn take(
        open: &Arc<std::sync::Mutex<HealthCounts>>,
        ip: IpAddr,
        config: &HealthConfig,
    ) -> Option<HealthSlot> {
        // IPv6: one /64 counts as one source (what one host usually holds).
        let source = match ip.to_canonical() {
            IpAddr::V6(a) => IpAddr::V6(std::net::Ipv6Addr::from_bits(
                a.to_bits() & !((1u128 << 64) - 1),
            )),
            v4 => v4,
        };
        let mut counts = open.lock().unwrap_or_else(|p| p.into_inner());
        if counts.total >= config.max_connections {
            return None;
        }
        let n = counts.per_source.entry(source).or_insert(0);
        if *n >= config.max_connections_per_source {
            return None;
        }
        *n += 1;
        counts.total += 1;
        Some(HealthSlot {
            open: open.clone(),
            source,
        })
    }
}

impl Drop for HealthSlot {
    fn drop(&mut self) {
        let mut counts = self.open.lock().unwrap_or_else(|p| p.into_inner());
        counts.total = counts.total.saturating_sub(1);
        if let Some(n) = counts.per_source.get_mut(&self.source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.per_source.remove(&self.source);
            }
        }
    }
}

async fn health_answer(
    api: Api,
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<http_body_util::Full<hyper::body::Bytes>>, std::convert::Infallible> {
    let (status, body) = if req.method() != Method::GET && req.method() != Method::HEAD {
        (StatusCode::METHOD_NOT_ALLOWED, "GET only\n")
    } else if req.uri().path() != "/" && req.uri().path() != "/health" {
        (StatusCode::NOT_FOUND, "not found\n")
    } else if readiness(&api).await.ready {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    };
    let mut resp = hyper::Response::new(http_body_util::Full::new(
        hyper::body::Bytes::from_static(body.as_bytes()),
    ));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain"),
    );
    Ok(resp)
}

/// The socket path for a configuration.
pub fn socket_path(configured: Option<&Path>) -> PathBuf {
    configured.map_or_else(|| PathBuf::from(DEFAULT_SOCKET), Path::to_path_buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_logged_a_few_times_a_minute_then_summarised() {
        let mut w = Window::new();
        let logged = (0..25).filter(|_| w.admit(10).0).count();
        assert_eq!(logged, 10);
        assert_eq!(w.suppressed, 15);
        // A new minute: the first refusal carries the summary.
        w.start -= Duration::from_secs(61);
        assert_eq!(w.admit(10), (true, 15));
        assert_eq!((w.logged, w.suppressed), (1, 0));
    }

    #[test]
    fn actions_are_bounded_at_a_character_boundary() {
        let long = "é".repeat(300);
        let b = bounded(&long);
        assert!(b.len() < MAX_ACTION + 30, "{b}");
        assert!(b.ends_with("(600 bytes)"), "{b}");
    }

    #[test]
    fn peer_groups_are_the_connecting_tasks() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut groups = peer_groups(a.as_raw_fd()).unwrap();
        let mut ours: Vec<u32> = nix::unistd::getgroups()
            .unwrap()
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
        groups.sort_unstable();
        ours.sort_unstable();
        assert_eq!(groups, ours);
    }

    #[test]
    fn connections_are_bounded_per_uid_and_in_total() {
        let config = ApiConfig {
            max_connections_per_uid: 2,
            max_connections: 3,
            ..ApiConfig::default()
        };
        let control = Arc::new(Control::new(&config, None));
        let a1 = control.admit(1000).unwrap();
        let _a2 = control.admit(1000).unwrap();
        assert!(control.admit(1000).is_err(), "per uid");
        let _b1 = control.admit(1001).unwrap();
        assert!(control.admit(1002).is_err(), "in total");
        drop(a1);
        assert!(
            control.admit(1002).is_ok(),
            "a closed connection frees its slot"
        );
    }
}
