//! The control API: HTTP/1.1 and JSON over a Unix socket (`curl
//! --unix-socket` works as well as the CLI), paths under `/v1`.
//!
//! Who may change what is decided by the caller's credentials
//! (`SO_PEERCRED`): root and members of the configured group may write;
//! everybody who can open the socket may read. Refused writes are logged and
//! counted. Bodies are size-limited and requests time-limited; a malformed
//! request gets a 4xx that says what is wrong.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use axum::{
    Json, Router,
    extract::{
        ConnectInfo, DefaultBodyLimit, Path as UrlPath, Query, State, connect_info::Connected,
        rejection::JsonRejection,
    },
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{delete, get, post},
    serve::IncomingStream,
};
use serde::{Deserialize, Serialize};
use tokio::{net::UnixListener, sync::Mutex};
use tracing::{error, info, warn};

use crate::{
    core::{ChangeError, Changed, Core, Count, Mode, Options, Session},
    readiness::{Checker, Live, Report},
    rules::{Cluster, FirewallRule, RuleSet},
};

pub const DEFAULT_SOCKET: &str = "/run/portcullis/portcullis.sock";
/// Largest request body: a 100k-rule set in JSON fits.
pub const MAX_BODY: usize = 32 << 20;

/// The caller, from the socket's peer credentials.
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
}

impl Connected<IncomingStream<'_, UnixListener>> for Caller {
    fn connect_info(stream: IncomingStream<'_, UnixListener>) -> Self {
        match stream.io().peer_cred() {
            Ok(c) => Caller {
                uid: c.uid(),
                gid: c.gid(),
                pid: c.pid(),
            },
            // No credentials: treat as nobody (read-only).
            Err(_) => Caller {
                uid: u32::MAX,
                gid: u32::MAX,
                pid: None,
            },
        }
    }
}

/// Who may write: root, and the members of `group` when set.
#[derive(Clone, Debug, Default)]
pub struct Writers {
    pub gid: Option<u32>,
}

impl Writers {
    fn allows(&self, caller: &Caller) -> bool {
        if caller.uid == 0 {
            return true;
        }
        let Some(gid) = self.gid else { return false };
        if caller.gid == gid {
            return true;
        }
        // The supplementary groups of the connecting process itself.
        if let Some(pid) = caller.pid
            && let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status"))
            && let Some(groups) = status.lines().find_map(|l| l.strip_prefix("Groups:"))
        {
            return groups.split_whitespace().any(|g| g.parse() == Ok(gid));
        }
        // Else the supplementary groups of the caller's user.
        let Ok(Some(user)) = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(caller.uid))
        else {
            return false;
        };
        let Ok(name) = std::ffi::CString::new(user.name) else {
            return false;
        };
        nix::unistd::getgrouplist(&name, user.gid)
            .map(|groups| groups.iter().any(|g| g.as_raw() == gid))
            .unwrap_or(false)
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
}

/// An error reply: `{"error": "..."}` with a status that says whose fault.
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl From<ChangeError> for ApiError {
    fn from(e: ChangeError) -> Self {
        let status = match &e {
            ChangeError::Invalid(_) | ChangeError::TooLarge(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ChangeError::Conflict { .. }
            | ChangeError::Exists(_)
            | ChangeError::LocksOutCaller(_)
            | ChangeError::AwaitingConfirmation { .. } => StatusCode::CONFLICT,
            ChangeError::NotFound(_) | ChangeError::NothingToConfirm => StatusCode::NOT_FOUND,
            ChangeError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
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
}

impl Expect {
    fn options(&self, caller: &Caller) -> Options {
        Options {
            expected: self.expected_generation,
            allow_ping: None,
            dry_run: self.dry_run,
            force: self.force,
            caller_session: caller.pid.and_then(Session::of_process),
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
        let mut core = self.core.lock().await;
        let (uid, pid) = (Some(caller.uid), caller.pid);
        if !self.writers.allows(caller) {
            core.refused_writes += 1;
            warn!(uid = caller.uid, pid = ?caller.pid, what, "write refused: not root or in the portcullis group");
            let reason = format!(
                "uid {} may not change rules (root or the configured group only)",
                caller.uid
            );
            audited(core.record(uid, pid, what, format!("refused: {reason}")))?;
            return Err(ApiError(StatusCode::FORBIDDEN, reason));
        }
        let result = f(&mut core);
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
        audited(core.record(uid, pid, what, outcome))?;
        result.map_err(ApiError::from)
    }
}

fn audited(r: anyhow::Result<()>) -> Result<(), ApiError> {
    r.map_err(|e| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot write the audit log: {e:#}"),
        )
    })
}

#[derive(Serialize)]
struct Status {
    /// Every interface to protect is protected (none missing).
    enforcing: bool,
    generation: u64,
    hash: String,
    interfaces: BTreeMap<String, String>,
    /// Configured interfaces that are missing: not protected.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    missing_interfaces: Vec<String>,
    rules: usize,
    counters: BTreeMap<&'static str, Count>,
    refused_writes: u64,
    audit_head: String,
    mode: Mode,
    /// Flows in the connection table, and its capacity.
    conntrack: serde_json::Value,
    /// The most recent drops (sampled: at most a few hundred a second).
    recent_drops: Vec<crate::events::Event>,
    /// SSH readiness: each check with its state and reason.
    readiness: Report,
    /// A change awaiting confirmation: its generation and deadline.
    #[serde(skip_serializing_if = "Option::is_none")]
    pending: Option<serde_json::Value>,
}

/// Evaluates SSH readiness (the core's part under its lock, the probes of
/// the host outside it).
pub async fn readiness(api: &Api) -> Report {
    let live = {
        let core = api.core.lock().await;
        Live::of(&core)
    };
    let checker = api.readiness.clone();
    match tokio::task::spawn_blocking(move || checker.report(live)).await {
        Ok(report) => report,
        Err(e) => Report::failed(format!("readiness evaluation panicked: {e}")),
    }
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
    let conntrack = match core.dataplane().conntrack_usage() {
        Ok((entries, capacity)) => serde_json::json!({ "entries": entries, "capacity": capacity }),
        Err(e) => serde_json::json!({ "error": format!("{e:#}") }),
    };
    let counters = core
        .reason_counters()
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")))?
        .into_iter()
        .map(|(r, c)| (r.name(), c))
        .collect();
    Ok(Json(Status {
        enforcing: core.protected(),
        generation: core.generation(),
        hash: core.hash().to_string(),
        interfaces: core.interfaces.clone(),
        missing_interfaces: core.missing_interfaces(),
        rules: core.rules().ingress_rules.len() + core.rules().egress_rules.len(),
        counters,
        refused_writes: core.refused_writes,
        audit_head: core.audit.head().to_string(),
        mode: core.mode().clone(),
        conntrack,
        recent_drops: {
            let recent = api.feed.recent();
            recent[recent.len().saturating_sub(10)..].to_vec()
        },
        readiness,
        pending: core
            .pending()
            .map(|p| serde_json::json!({ "generation": p.generation, "deadline": p.deadline })),
    }))
}

#[derive(Serialize)]
struct Rules {
    generation: u64,
    hash: String,
    #[serde(flatten)]
    rules: RuleSet,
}

async fn get_rules(State(api): State<Api>) -> Json<Rules> {
    let core = api.core.lock().await;
    Json(Rules {
        generation: core.generation(),
        hash: core.hash().to_string(),
        rules: core.rules().clone(),
    })
}

async fn put_rules(
    State(api): State<Api>,
    ConnectInfo(caller): ConnectInfo<Caller>,
    Query(expect): Query<Expect>,
    body: Result<Json<RuleSet>, JsonRejection>,
) -> Result<Json<Changed>, ApiError> {
    let Json(rules) = body?;
    let opts = expect.options(&caller);
    let what = expect.label("replace rules");
    let changed = api
        .write(&caller, &what, |core| {
            core.change(&opts, |live| {
                *live = rules;
                Ok(())
            })
        })
        .await?;
    arm(&api, &changed);
    Ok(Json(changed))
}

/// Which list a single-rule change is for.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Direction {
    Ingress,
    Egress,
}

async fn add_rule(
    State(api): State<Api>,
    ConnectInfo(caller): ConnectInfo<Caller>,
    UrlPath(direction): UrlPath<Direction>,
    Query(expect): Query<Expect>,
    body: Result<Json<FirewallRule>, JsonRejection>,
) -> Result<(StatusCode, Json<Changed>), ApiError> {
    let Json(rule) = body?;
    let opts = expect.options(&caller);
    let what = expect.label("add rule");
    let changed = api
        .write(&caller, &what, |core| {
            core.change(&opts, |live| {
                if live
                    .ingress_rules
                    .iter()
                    .chain(&live.egress_rules)
                    .any(|r| r.id == rule.id)
                {
                    return Err(ChangeError::Exists(rule.id.clone()));
                }
                match direction {
                    Direction::Ingress => live.ingress_rules.push(rule),
                    Direction::Egress => live.egress_rules.push(rule),
                }
                Ok(())
            })
        })
        .await?;
    arm(&api, &changed);
    Ok((StatusCode::CREATED, Json(changed)))
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
            core.change(&opts, |live| {
                let before = live.ingress_rules.len() + live.egress_rules.len();
                live.ingress_rules.retain(|r| r.id != id);
                live.egress_rules.retain(|r| r.id != id);
                if live.ingress_rules.len() + live.egress_rules.len() == before {
                    return Err(ChangeError::NotFound(id.clone()));
                }
                Ok(())
            })
        })
        .await?;
    arm(&api, &changed);
    Ok(Json(changed))
}

/// Peer CIDRs, for add, remove and replace.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Peers {
    peers: Vec<String>,
    /// The cluster id, when there is no cluster yet.
    #[serde(default)]
    cluster: Option<String>,
}

#[derive(Clone, Copy)]
enum PeerOp {
    Add,
    Remove,
    Replace,
}

async fn get_peers(State(api): State<Api>) -> Json<serde_json::Value> {
    let core = api.core.lock().await;
    let cluster = core.rules().cluster.clone().unwrap_or_default();
    Json(serde_json::json!({
        "generation": core.generation(),
        "cluster": cluster.id,
        "peers": cluster.peers,
    }))
}

async fn change_peers(
    api: Api,
    caller: Caller,
    expect: Expect,
    body: Result<Json<Peers>, JsonRejection>,
    op: PeerOp,
) -> Result<Json<Changed>, ApiError> {
    let Json(body) = body?;
    let opts = expect.options(&caller);
    let what = expect.label("change peers");
    let changed = api
        .write(&caller, &what, |core| {
            core.change(&opts, |live| {
                let cluster = live.cluster.get_or_insert_with(|| Cluster {
                    id: body.cluster.clone().unwrap_or_else(|| "default".into()),
                    ..Default::default()
                });
                match op {
                    PeerOp::Replace => cluster.peers = body.peers.clone(),
                    PeerOp::Add => {
                        for p in &body.peers {
                            if !cluster.peers.contains(p) {
                                cluster.peers.push(p.clone());
                            }
                        }
                    }
                    PeerOp::Remove => {
                        for p in &body.peers {
                            if !cluster.peers.contains(p) {
                                return Err(ChangeError::NotFound(p.clone()));
                            }
                        }
                        cluster.peers.retain(|p| !body.peers.contains(p));
                    }
                }
                Ok(())
            })
        })
        .await?;
    arm(&api, &changed);
    Ok(Json(changed))
}

async fn add_peers(
    State(api): State<Api>,
    ConnectInfo(caller): ConnectInfo<Caller>,
    Query(expect): Query<Expect>,
    body: Result<Json<Peers>, JsonRejection>,
) -> Result<Json<Changed>, ApiError> {
    change_peers(api, caller, expect, body, PeerOp::Add).await
}

async fn remove_peers(
    State(api): State<Api>,
    ConnectInfo(caller): ConnectInfo<Caller>,
    Query(expect): Query<Expect>,
    body: Result<Json<Peers>, JsonRejection>,
) -> Result<Json<Changed>, ApiError> {
    change_peers(api, caller, expect, body, PeerOp::Remove).await
}

async fn replace_peers(
    State(api): State<Api>,
    ConnectInfo(caller): ConnectInfo<Caller>,
    Query(expect): Query<Expect>,
    body: Result<Json<Peers>, JsonRejection>,
) -> Result<Json<Changed>, ApiError> {
    change_peers(api, caller, expect, body, PeerOp::Replace).await
}

#[derive(Serialize)]
struct Counters {
    generation: u64,
    reasons: BTreeMap<&'static str, Count>,
    rules: BTreeMap<String, Count>,
}

async fn counters(State(api): State<Api>) -> Result<Json<Counters>, ApiError> {
    let mut core = api.core.lock().await;
    let reasons = core
        .reason_counters()
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")))?
        .into_iter()
        .map(|(r, c)| (r.name(), c))
        .collect();
    Ok(Json(Counters {
        generation: core.generation(),
        reasons,
        rules: core.rule_counters().into_iter().collect(),
    }))
}

/// Prometheus text exposition.
async fn metrics(State(api): State<Api>) -> Result<String, ApiError> {
    use std::fmt::Write as _;
    let mut core = api.core.lock().await;
    let reasons = core
        .reason_counters()
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")))?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP portcullis_packets_total Packets by verdict reason.\n# TYPE portcullis_packets_total counter"
    );
    for (r, c) in &reasons {
        let _ = writeln!(
            out,
            "portcullis_packets_total{{reason=\"{}\"}} {}",
            r.name(),
            c.packets
        );
    }
    let _ = writeln!(
        out,
        "# HELP portcullis_bytes_total Bytes by verdict reason.\n# TYPE portcullis_bytes_total counter"
    );
    for (r, c) in &reasons {
        let _ = writeln!(
            out,
            "portcullis_bytes_total{{reason=\"{}\"}} {}",
            r.name(),
            c.bytes
        );
    }
    let _ = writeln!(
        out,
        "# HELP portcullis_rule_packets_total Packets admitted by each rule.\n# TYPE portcullis_rule_packets_total counter"
    );
    let rules: BTreeMap<_, _> = core.rule_counters().into_iter().collect();
    for (name, c) in &rules {
        let _ = writeln!(
            out,
            "portcullis_rule_packets_total{{rule=\"{}\"}} {}",
            name.replace('"', "'"),
            c.packets
        );
    }
    let _ = writeln!(
        out,
        "# HELP portcullis_rules_generation Generation of the live rule set.\n# TYPE portcullis_rules_generation gauge"
    );
    let _ = writeln!(out, "portcullis_rules_generation {}", core.generation());
    let _ = writeln!(
        out,
        "# HELP portcullis_api_refused_writes_total Rule changes refused for lack of permission.\n# TYPE portcullis_api_refused_writes_total counter"
    );
    let _ = writeln!(
        out,
        "portcullis_api_refused_writes_total {}",
        core.refused_writes
    );
    let _ = writeln!(
        out,
        "# HELP portcullis_enforcing Whether the data path is attached to at least one interface.\n# TYPE portcullis_enforcing gauge"
    );
    let _ = writeln!(out, "portcullis_enforcing {}", u8::from(core.protected()));
    Ok(out)
}

/// Starts the rollback timer of a change applied with a confirmation window.
fn arm(api: &Api, changed: &Changed) {
    if let Some(deadline) = changed.confirm_by {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        arm_rollback(
            api.core.clone(),
            changed.generation,
            deadline.saturating_sub(now),
        );
    }
}

/// Rolls the pending change of `generation` back after `secs` unless it was
/// confirmed. The timer is monotonic (a clock step does not move it); a
/// failed rollback keeps the change pending and is retried.
pub fn arm_rollback(core: Arc<Mutex<Core>>, generation: u64, secs: u64) {
    const RETRY: Duration = Duration::from_secs(5);
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(secs)).await;
        loop {
            let mut core = core.lock().await;
            match core.roll_back(generation) {
                Ok(Some(restored)) => {
                    warn!(
                        generation,
                        restored, "change not confirmed in time: rolled back"
                    );
                    let _ = core.record(
                        None,
                        None,
                        "confirmation window",
                        "rolled back: not confirmed".into(),
                    );
                    return;
                }
                Ok(None) => return,
                Err(e) => {
                    error!(generation, error = %e, "rollback failed; the change stays pending, retrying");
                    let _ = core.record(
                        None,
                        None,
                        "confirmation window",
                        format!("rollback failed, retrying: {e}"),
                    );
                }
            }
            drop(core);
            tokio::time::sleep(RETRY).await;
        }
    });
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    #[serde(default)]
    follow: bool,
}

/// Recent drop events as a JSON array, or with `follow=true` a stream of
/// them, one JSON object per line, as they happen.
async fn events(State(api): State<Api>, Query(q): Query<EventsQuery>) -> Response {
    if !q.follow {
        return Json(api.feed.recent()).into_response();
    }
    let rx = api.feed.subscribe();
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(e) => {
                    let line = serde_json::to_string(&e).unwrap_or_default() + "\n";
                    return Some((Ok::<_, std::convert::Infallible>(line), rx));
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    (
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
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
    body: Result<Json<Mode>, JsonRejection>,
) -> Result<Json<Changed>, ApiError> {
    let Json(mode) = body?;
    let what = format!(
        "set mode {}",
        serde_json::to_string(&mode).unwrap_or_default()
    );
    let changed = api
        .write(&caller, &what, |core| core.set_mode(mode))
        .await?;
    Ok(Json(changed))
}

async fn confirm(
    State(api): State<Api>,
    ConnectInfo(caller): ConnectInfo<Caller>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let generation = api.write(&caller, "confirm", |core| core.confirm()).await?;
    Ok(Json(serde_json::json!({ "confirmed": generation })))
}

async fn not_found() -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        "no such endpoint; see /v1/status, /v1/rules, /v1/peers, /v1/counters, /v1/metrics".into(),
    )
}

pub fn router(api: Api) -> Router {
    let timeout = api.request_timeout;
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/ready", get(ready))
        .route("/v1/rules", get(get_rules).put(put_rules))
        .route("/v1/rules/{direction}", post(add_rule))
        .route("/v1/rule/{id}", delete(remove_rule))
        .route(
            "/v1/peers",
            get(get_peers)
                .put(replace_peers)
                .post(add_peers)
                .delete(remove_peers),
        )
        .route("/v1/confirm", post(confirm))
        .route("/v1/mode", get(get_mode).put(put_mode))
        .route("/v1/counters", get(counters))
        .route("/v1/events", get(events))
        .route("/v1/metrics", get(metrics))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            timeout,
        ))
        .with_state(api)
}

/// Binds the socket. Anyone on the host may connect and read (mode 0666);
/// writes are checked per request against the caller's credentials. The
/// socket is owned by the writers' group when there is one.
pub fn bind(path: &Path, gid: Option<u32>) -> anyhow::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(path);
    let listener =
        UnixListener::bind(path).with_context(|| format!("cannot bind {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    if let Some(gid) = gid {
        nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(gid)))?;
    }
    Ok(listener)
}

/// Serves the API on `listener` until the future is dropped.
pub async fn serve(listener: UnixListener, api: Api) -> anyhow::Result<()> {
    let app = router(api).into_make_service_with_connect_info::<Caller>();
    axum::serve(listener, app).await?;
    Ok(())
}

/// Serves the read-only health endpoint: `GET /` (or `/health`) answers the
/// readiness document, 200 when SSH-ready and 503 otherwise. Nothing else.
pub async fn serve_health(listener: tokio::net::TcpListener, api: Api) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/", get(ready))
        .route("/health", get(ready))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_secs(10),
        ))
        .with_state(api);
    axum::serve(listener, app).await?;
    Ok(())
}

/// The socket path for a configuration.
pub fn socket_path(configured: Option<&Path>) -> PathBuf {
    configured.map_or_else(|| PathBuf::from(DEFAULT_SOCKET), Path::to_path_buf)
}
