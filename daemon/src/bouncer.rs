//! The CrowdSec bouncer: polls a Local API's decision stream and keeps a
//! deny set in step with its ban decisions, through the core's deny-set
//! operations (each change an audit record, as the API's are).
//!
//! The first pull (`startup=true`) replaces the set with every active ban;
//! later pulls apply the `new` and `deleted` deltas (see
//! [`crate::crowdsec::Tracker`]). A LAPI that cannot be reached, or answers
//! badly, changes nothing: the bans in force stay, the error is logged once
//! per outage and shown by `portcullis status`; the first good answer after
//! it is a full pull again, which reconciles what changed meanwhile.

use std::{path::Path, time::Duration};

use http_body_util::BodyExt as _;
use hyper::body::Bytes;
use tracing::{error, info, warn};

use crate::{
    core::{self, Actor, ChangeError, Core, DenyChanged},
    crowdsec::{self, BouncerStatus, CrowdSecConfig, Tracker, Url},
    denylist::Entry,
    model::unix_now,
};

/// How long one poll may take, connection to last byte.
const POLL_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest API key accepted.
const MAX_KEY: usize = 512;

/// Reads the API key: the file must be owned by root, writable by root
/// only and readable by no others; one line of visible ASCII.
pub fn read_key(path: &Path) -> Result<String, String> {
    use std::os::unix::fs::MetadataExt as _;
    crate::config::only_root_writes(path, "it holds the CrowdSec bouncer's API key")
        .map_err(|e| format!("api_key_file: {e:#}"))?;
    let meta = std::fs::metadata(path).map_err(|e| format!("api_key_file: {e}"))?;
    if meta.mode() & 0o004 != 0 {
        return Err(format!(
            "api_key_file: {} is readable by others (mode {:o}): make it 0600",
            path.display(),
            meta.mode() & 0o7777
        ));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("api_key_file: cannot read {}: {e}", path.display()))?;
    let key = text.trim();
    if key.is_empty() || key.len() > MAX_KEY || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "api_key_file: {} must hold one key of 1 to {MAX_KEY} visible ASCII characters",
            path.display()
        ));
    }
    Ok(key.to_string())
}

/// How long a connection to the LAPI may take to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The usual cause of an unanswered or refused connection under the unit.
const UNIT_HINT: &str = "under the shipped unit, IPAddressDeny=any drops it unless a drop-in allows the LAPI's address, e.g. /etc/systemd/system/portcullis.service.d/crowdsec.conf with [Service] IPAddressAllow=127.0.0.1";

/// What a failed connection means, with the unit's usual cause named.
fn connect_error(url: &Url, e: &std::io::Error) -> String {
    let hint = if e.kind() == std::io::ErrorKind::PermissionDenied {
        format!(" ({UNIT_HINT})")
    } else {
        String::new()
    };
    format!(
        "LAPI unreachable: cannot connect to {}:{}: {e}{hint}",
        url.host, url.port
    )
}

/// A connection to the LAPI, within [`CONNECT_TIMEOUT`].
async fn connect(url: &Url) -> Result<tokio::net::TcpStream, String> {
    let connecting = tokio::net::TcpStream::connect((url.host.as_str(), url.port));
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(connect_error(url, &e)),
        Err(_) => Err(format!(
            "LAPI unreachable: no answer from {}:{} within {CONNECT_TIMEOUT:?} (a firewall on the way, or: {UNIT_HINT})",
            url.host, url.port
        )),
    }
}

/// Plain http on this host: the key goes only to a LAPI run by root. Any
/// user may bind the LAPI's port while the LAPI is down (at boot, on its
/// restart); such a squatter would get the key and could answer in the
/// LAPI's name (an empty full pull lifts every ban). The accepted socket
/// carries its listener's owner, which `sock_diag` reports.
fn served_by_root(stream: &tokio::net::TcpStream) -> Result<(), String> {
    let (local, peer) = match (stream.local_addr(), stream.peer_addr()) {
        (Ok(l), Ok(p)) => (l, p),
        (Err(e), _) | (_, Err(e)) => {
            return Err(format!("LAPI: cannot read the connection's ends: {e}"));
        }
    };
    if !peer.ip().is_loopback() {
        return Ok(());
    }
    match crate::sockets::peer_uid(local, peer) {
        Ok(Some(0)) => Ok(()),
        Ok(Some(uid)) => Err(format!(
            "LAPI: {peer} is served by uid {uid}, not root: the key is not sent (a local user may hold the LAPI's port)"
        )),
        Ok(None) => Err(format!(
            "LAPI: the server end of the connection to {peer} is not found: the key is not sent"
        )),
        Err(e) => Err(format!("LAPI: cannot tell who serves {peer}: {e:#}")),
    }
}

/// The TLS client for an https LAPI: it trusts exactly the certificates
/// in `ca_file` (PEM), ring as the crypto provider.
pub fn tls_connector(ca_file: &Path) -> Result<tokio_rustls::TlsConnector, String> {
    use rustls::pki_types::{CertificateDer, pem::PemObject as _};
    let bad = |e: String| format!("ca_file: {}: {e}", ca_file.display());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_file).map_err(|e| bad(e.to_string()))? {
        let cert = cert.map_err(|e| bad(e.to_string()))?;
        roots.add(cert).map_err(|e| bad(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(bad("holds no PEM certificate".into()));
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(std::sync::Arc::new(
        config,
    )))
}

/// `GET {base}{path}` with the API key; the body of a 200 answer. Over TLS
/// when `tls` is given (an https URL), the LAPI's name checked against its
/// certificate.
pub async fn get(
    url: &Url,
    tls: Option<&tokio_rustls::TlsConnector>,
    path: &str,
    key: &str,
) -> Result<Bytes, String> {
    let stream = connect(url).await?;
    match tls {
        None => {
            served_by_root(&stream)?;
            exchange(hyper_util::rt::TokioIo::new(stream), url, path, key).await
        }
        Some(tls) => {
            let name = rustls::pki_types::ServerName::try_from(url.host.clone())
                .map_err(|e| format!("LAPI: {:?} is not a TLS server name: {e}", url.host))?;
            let stream = tls
                .connect(name, stream)
                .await
                .map_err(|e| format!("LAPI: TLS handshake with {} failed: {e}", url.host))?;
            exchange(hyper_util::rt::TokioIo::new(stream), url, path, key).await
        }
    }
}

/// One HTTP/1.1 request on an open connection.
async fn exchange<IO>(io: IO, url: &Url, path: &str, key: &str) -> Result<Bytes, String>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("LAPI: HTTP handshake failed: {e}"))?;
    let conn = tokio::spawn(conn);
    let host = if url.host.contains(':') {
        format!("[{}]:{}", url.host, url.port)
    } else {
        format!("{}:{}", url.host, url.port)
    };
    let request = hyper::Request::get(format!("{}{path}", url.base))
        .header(hyper::header::HOST, host)
        .header("X-Api-Key", key)
        .header(
            hyper::header::USER_AGENT,
            concat!("portcullis-bouncer/", env!("CARGO_PKG_VERSION")),
        )
        .body(http_body_util::Empty::<Bytes>::new())
        .map_err(|e| format!("LAPI: cannot build the request: {e}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("LAPI: request failed: {e}"))?;
    let status = response.status();
    let body = http_body_util::Limited::new(response.into_body(), crowdsec::MAX_RESPONSE)
        .collect()
        .await
        .map_err(|e| format!("LAPI: cannot read the answer: {e}"))?
        .to_bytes();
    conn.abort();
    if status != hyper::StatusCode::OK {
        let said: String = String::from_utf8_lossy(&body)
            .chars()
            .take(200)
            .filter(|c| !c.is_control())
            .collect();
        return Err(format!("LAPI answered {status}: {said}"));
    }
    Ok(body)
}

/// Applies one deny-set change as the API does: the core records who
/// acted (`crowdsec`) and the outcome goes to the audit log.
async fn change(
    core: &core::Shared,
    what: String,
    f: impl FnOnce(&mut Core) -> Result<DenyChanged, ChangeError>,
) -> Result<DenyChanged, String> {
    let mut core = core.lock().await;
    core.acting(Actor {
        uid: None,
        pid: None,
        action: what.clone(),
    });
    let result = f(&mut core);
    core.acting(Actor::default());
    let outcome = match &result {
        Ok(_) => "applied".to_string(),
        Err(e) => format!("refused: {e}"),
    };
    if let Err(e) = core.record(None, None, &what, outcome) {
        error!(error = %format!("{e:#}"), what, "crowdsec: cannot write the audit record");
    }
    let changed = result.map_err(|e| format!("deny set: {e}"))?;
    info!(
        set = changed.set,
        added = changed.added,
        removed = changed.removed,
        entries = changed.entries,
        "crowdsec: deny set updated"
    );
    if !changed.admin_exempt.is_empty() {
        warn!(
            set = changed.set,
            admin = ?changed.admin_exempt,
            "crowdsec: decisions overlap an admin network; the admin network stays exempt"
        );
    }
    Ok(changed)
}

fn first(entries: &[Entry]) -> String {
    entries
        .first()
        .map_or_else(|| "-".into(), |e| e.prefix.to_string())
}

/// A full pull the core refused (more bans than the deny set holds): a
/// fingerprint of its prefixes and the error.
type RefusedPull = Option<(u64, String)>;

/// A fingerprint of the set of prefixes `entries` bans (order aside).
fn fingerprint(entries: &[Entry]) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut prefixes: Vec<_> = entries.iter().map(|e| e.prefix).collect();
    prefixes.sort_unstable();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    prefixes.hash(&mut h);
    h.finish()
}

/// The full pull's replace, unless the same bans were refused last time:
/// retrying it every poll changes nothing and costs a journal write, the
/// kernel writes and their undo, and an audit record each time. The first
/// answer that names other bans is tried again.
async fn replace(
    core: &core::Shared,
    set: &str,
    entries: &[Entry],
    refused: &mut RefusedPull,
) -> Result<(), String> {
    let print = fingerprint(entries);
    if let Some((same, e)) = refused.as_ref()
        && *same == print
    {
        return Err(format!(
            "{e} (not retried while the LAPI names the same bans)"
        ));
    }
    let what = format!(
        "crowdsec: full pull into {set}: {} entries (first {})",
        entries.len(),
        first(entries)
    );
    match change(core, what, |c| c.deny_replace(set, entries)).await {
        Ok(_) => {
            *refused = None;
            Ok(())
        }
        Err(e) => {
            *refused = Some((print, e.clone()));
            Err(e)
        }
    }
}

/// One poll: a full pull when `tracker` is empty, else a delta.
async fn poll(
    cfg: &CrowdSecConfig,
    url: &Url,
    tracker: &mut Option<Tracker>,
    core: &core::Shared,
    refused_pull: &mut RefusedPull,
) -> Result<(usize, Vec<String>), String> {
    let key = read_key(&cfg.api_key_file)?;
    let tls = match (&cfg.ca_file, url.tls) {
        (Some(ca), true) => Some(tls_connector(ca)?),
        _ => None,
    };
    let startup = tracker.is_none();
    let path = format!("/v1/decisions/stream?startup={startup}");
    let body = tokio::time::timeout(POLL_TIMEOUT, get(url, tls.as_ref(), &path, &key))
        .await
        .map_err(|_| format!("LAPI unreachable: no answer within {POLL_TIMEOUT:?}"))??;
    let now = unix_now();
    let pulled =
        crowdsec::check_stream(&body, cfg, now).map_err(|e| format!("LAPI: refused: {e}"))?;
    for r in &pulled.refused {
        warn!(decision = %r, "crowdsec: decision refused");
    }
    let refused: Vec<String> = pulled.refused.iter().take(10).cloned().collect();
    let set = cfg.set.clone();
    let Some(t) = tracker.as_mut() else {
        let (t, entries) = Tracker::of_startup(&pulled.new);
        replace(core, &set, &entries, refused_pull).await?;
        let held = t.decisions();
        *tracker = Some(t);
        return Ok((held, refused));
    };
    t.expire(now);
    let delta = t.apply(&pulled.deleted, &pulled.new);
    let held = t.decisions();
    if delta.resync {
        *tracker = None;
    }
    let exists = core.lock().await.deny_count(&set) > 0;
    if !delta.remove.is_empty() && exists {
        let what = format!(
            "crowdsec: lift {} entries from {set} (first {})",
            delta.remove.len(),
            delta
                .remove
                .first()
                .map_or_else(String::new, ToString::to_string)
        );
        let remove = delta.remove.clone();
        if let Err(e) = change(core, what, |c| c.deny_remove(&set, &remove)).await {
            *tracker = None;
            return Err(e);
        }
    }
    if !delta.add.is_empty() {
        let what = format!(
            "crowdsec: ban {} entries in {set} (first {})",
            delta.add.len(),
            first(&delta.add)
        );
        if let Err(e) = change(core, what, |c| c.deny_add(&set, &delta.add)).await {
            *tracker = None;
            return Err(e);
        }
    }
    Ok((held, refused))
}

/// Runs the bouncer for ever: polls every `poll_interval`, keeps the
/// status in the core.
pub async fn run(cfg: CrowdSecConfig, core: core::Shared) {
    let (interval, url) = match (cfg.validate(), crowdsec::parse_url(&cfg.url)) {
        (Ok(i), Ok(u)) => (Duration::from_secs(i), u),
        (Err(e), _) | (_, Err(e)) => {
            error!(error = %e, "crowdsec: bouncer not started");
            return;
        }
    };
    let mut status = BouncerStatus {
        url: cfg.url.clone(),
        set: cfg.set.clone(),
        ..BouncerStatus::default()
    };
    if !url.tls && !crowdsec::is_loopback(&url.host) {
        let w = format!(
            "{} is plain http to a non-loopback address: the API key and the decisions cross the network in the clear",
            cfg.url
        );
        warn!(warning = %w, "crowdsec");
        status.warning = Some(w);
    }
    info!(
        url = cfg.url,
        set = cfg.set,
        ?interval,
        "crowdsec: bouncer started"
    );
    core.lock().await.crowdsec = Some(status.clone());
    let mut tracker: Option<Tracker> = None;
    let mut refused_pull: RefusedPull = None;
    loop {
        let result = poll(&cfg, &url, &mut tracker, &core, &mut refused_pull).await;
        note(&mut status, result, &mut tracker);
        core.lock().await.crowdsec = Some(status.clone());
        tokio::time::sleep(interval).await;
    }
}

/// Records a poll's outcome: an error logged once per outage (and the
/// next good answer a full pull), recovery logged.
fn note(
    status: &mut BouncerStatus,
    result: Result<(usize, Vec<String>), String>,
    tracker: &mut Option<Tracker>,
) {
    let now = unix_now();
    match result {
        Ok((held, refused)) => {
            status.refused = refused;
            if status.failing_since.is_some() {
                info!(
                    url = status.url,
                    "crowdsec: LAPI reachable again; bans reconciled"
                );
            }
            status.connected = true;
            status.last_success = Some(now);
            status.error = None;
            status.failing_since = None;
            status.decisions = held;
        }
        Err(e) => {
            if status.failing_since.is_none() {
                error!(url = status.url, error = %e, "crowdsec: poll failed; the bans in force stay");
                status.failing_since = Some(now);
            }
            status.connected = false;
            status.error = Some(e);
            *tracker = None;
        }
    }
}
