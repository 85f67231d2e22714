//! A small etcd v3 client over etcd's JSON gateway (`/v3/...`, the
//! gRPC-gateway every etcd server serves on its client port), HTTP/1.1 over
//! rustls: range, watch (a streamed response, one JSON document a line),
//! lease grant and keep-alive, put, and authentication (a token sent as
//! `Authorization`). Keys and values are base64 in the JSON; 64-bit
//! integers are strings. No OpenSSL, no protoc.

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context as _, anyhow, bail};
use base64::Engine as _;
use http_body_util::{BodyExt as _, Full};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject as _};
use serde_json::{Value, json};

use crate::config::FleetConfig;
use crate::membership::{self, Event};

/// A unary call (connect, TLS, request, response) takes at most this long.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// A TCP connection is set up within this (inside [`TIMEOUT`]).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Largest response read (a full member list included).
const MAX_RESPONSE: usize = 64 << 20;

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn unb64(v: &Value) -> Vec<u8> {
    v.as_str()
        .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
        .unwrap_or_default()
}

/// The value at `path` (a JSON pointer), `null` when absent.
fn at<'a>(v: &'a Value, path: &str) -> &'a Value {
    static NULL: Value = Value::Null;
    v.pointer(path).unwrap_or(&NULL)
}

/// A JSON int64 (a string in the gateway's JSON), 0 when absent.
pub fn int(v: &Value) -> i64 {
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

/// The TLS settings of `[fleet]`: the CA, and the client certificate when
/// configured. Errors name the file.
fn tls_config(cfg: &FleetConfig) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let read_certs = |path: &PathBuf, key: &str| -> anyhow::Result<Vec<CertificateDer<'static>>> {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| anyhow!("fleet: {key} {}: {e}", path.display()))?;
        if certs.is_empty() {
            bail!("fleet: {key} {}: no PEM certificate in it", path.display());
        }
        Ok(certs)
    };
    for cert in read_certs(&cfg.ca_file, "ca_file")? {
        roots
            .add(cert)
            .with_context(|| format!("fleet: ca_file {}", cfg.ca_file.display()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    Ok(match (&cfg.cert_file, &cfg.key_file) {
        (Some(cert), Some(key)) => {
            let chain = read_certs(cert, "cert_file")?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| anyhow!("fleet: key_file {}: {e}", key.display()))?;
            builder.with_client_auth_cert(chain, key)?
        }
        _ => builder.with_no_client_auth(),
    })
}

/// A connection-level failure names the endpoint and, for TLS, the CA file.
fn tls_error(url: &str, ca: &std::path::Path, e: std::io::Error) -> anyhow::Error {
    let text = e.to_string();
    let rustls = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match rustls {
        Some(rustls::Error::InvalidCertificate(_)) => anyhow!(
            "TLS with etcd at {url} failed: {text} (the server's certificate must be signed by the CA in ca_file {})",
            ca.display()
        ),
        Some(rustls::Error::AlertReceived(_)) => anyhow!(
            "TLS with etcd at {url} failed: {text} (etcd refused this host's client certificate, or its absence: see cert_file and key_file)"
        ),
        _ => anyhow!("TLS with etcd at {url} failed: {text}"),
    }
}

/// A failed exchange. With TLS 1.3 the server checks the client's
/// certificate after the handshake: its refusal arrives as an alert here.
fn exchange_error(url: &str, e: hyper::Error) -> anyhow::Error {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(err) = source {
        let tls = err.downcast_ref::<rustls::Error>().or_else(|| {
            err.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(rustls::Error::AlertReceived(alert)) = tls {
            return anyhow!(
                "TLS with etcd at {url} failed: received fatal alert {alert:?} (etcd refused this host's client certificate, or its absence: see cert_file and key_file)"
            );
        }
        source = err.source();
    }
    anyhow!("etcd at {url}: {e}")
}

/// The etcd client: its endpoints (one in use, the next on failure), TLS,
/// credentials, and the auth token of the current session.
pub struct Client {
    endpoints: Vec<(String, u16)>,
    current: usize,
    tls: tokio_rustls::TlsConnector,
    ca_file: PathBuf,
    user: Option<(String, PathBuf)>,
    token: Option<String>,
}

/// One message of a watch.
#[derive(Debug)]
pub enum WatchMsg {
    /// Events up to `revision`.
    Events { revision: i64, events: Vec<Event> },
    /// The start revision was compacted: read everything again.
    Compacted(i64),
    /// Nothing changed (created, or a progress notification).
    Quiet,
}

/// Reads a streamed response one JSON document at a time.
pub struct Lines {
    body: Incoming,
    buf: Vec<u8>,
    done: bool,
}

impl Lines {
    fn new(body: Incoming) -> Self {
        Lines {
            body,
            buf: Vec::new(),
            done: false,
        }
    }

    /// The next document; `None` at the end. Cancel-safe: bytes read are
    /// kept in the buffer before the next await.
    pub async fn next(&mut self) -> anyhow::Result<Option<Value>> {
        loop {
            if let Some(at) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=at).collect();
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return parse(&line).map(Some);
            }
            if self.done {
                if self.buf.iter().all(u8::is_ascii_whitespace) {
                    return Ok(None);
                }
                let rest = std::mem::take(&mut self.buf);
                return parse(&rest).map(Some);
            }
            match self.body.frame().await {
                Some(frame) => {
                    if let Ok(data) = frame?.into_data() {
                        self.buf.extend_from_slice(&data);
                        if self.buf.len() > MAX_RESPONSE {
                            bail!("etcd sent a document over {MAX_RESPONSE} bytes");
                        }
                    }
                }
                None => self.done = true,
            }
        }
    }
}

/// One JSON document; what is not JSON is quoted (bounded) in the error.
fn parse(bytes: &[u8]) -> anyhow::Result<Value> {
    serde_json::from_slice(bytes).map_err(|e| {
        let text = String::from_utf8_lossy(bytes.get(..200).unwrap_or(bytes)).into_owned();
        anyhow!("not JSON ({e}): {:?}", text.trim())
    })
}

/// The error etcd put in a response, if any (unary: `error`/`message`;
/// streamed: `error.message`).
fn etcd_error(v: &Value) -> Option<String> {
    let e = v.get("error")?;
    let message = e
        .get("message")
        .or_else(|| v.get("message"))
        .and_then(Value::as_str)
        .or_else(|| e.as_str())
        .unwrap_or("unknown error");
    Some(message.to_string())
}

impl Client {
    pub fn new(cfg: &FleetConfig) -> anyhow::Result<Self> {
        let endpoints = cfg
            .endpoints
            .iter()
            .map(|e| membership::parse_endpoint(e).map_err(|why| anyhow!("fleet: {why}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(tls_config(cfg)?));
        Ok(Client {
            endpoints,
            current: 0,
            tls,
            ca_file: cfg.ca_file.clone(),
            user: cfg.username.clone().zip(cfg.password_file.clone()),
            token: None,
        })
    }

    /// The endpoint in use, as a URL.
    pub fn url(&self) -> String {
        let (host, port) = self
            .endpoints
            .get(self.current)
            .cloned()
            .unwrap_or_default();
        if host.contains(':') {
            format!("https://[{host}]:{port}")
        } else {
            format!("https://{host}:{port}")
        }
    }

    /// Moves to the next endpoint (after a failure), dropping the token.
    pub fn fail_over(&mut self) {
        self.current = (self.current + 1) % self.endpoints.len().max(1);
        self.token = None;
    }

    async fn send(&self, path: &str, body: &Value) -> anyhow::Result<hyper::Response<Incoming>> {
        let url = self.url();
        let (host, port) = self
            .endpoints
            .get(self.current)
            .cloned()
            .context("no etcd endpoint")?;
        let connect = tokio::net::TcpStream::connect((host.as_str(), port));
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| {
                anyhow!("cannot connect to etcd at {url}: no answer within {CONNECT_TIMEOUT:?} (under the shipped unit, IPAddressAllow= must list it: docs/fleet.md)")
            })?
            .with_context(|| format!("cannot connect to etcd at {url}"))?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(host.clone()).map_err(|e| anyhow!("etcd at {url}: {e}"))?;
        let tls = self
            .tls
            .connect(name, tcp)
            .await
            .map_err(|e| tls_error(&url, &self.ca_file, e))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = hyper::Request::post(path)
            .header(hyper::header::HOST, format!("{host}:{port}"))
            .header(hyper::header::CONTENT_TYPE, "application/json");
        if let Some(token) = &self.token {
            req = req.header(hyper::header::AUTHORIZATION, token.as_str());
        }
        let req = req.body(Full::new(Bytes::from(body.to_string())))?;
        sender
            .send_request(req)
            .await
            .map_err(|e| exchange_error(&url, e))
    }

    /// A request whose first document is the answer (unary calls, and a
    /// keep-alive, whose stream ends when the request's does).
    async fn call(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let url = self.url();
        let answer = async {
            let resp = self.send(path, body).await?;
            let status = resp.status();
            let doc = Lines::new(resp.into_body()).next().await?;
            let doc =
                doc.with_context(|| format!("etcd at {url}: {path}: empty answer ({status})"))?;
            if let Some(e) = etcd_error(&doc) {
                bail!("etcd at {url}: {path}: {e}");
            }
            if !status.is_success() {
                bail!("etcd at {url}: {path}: HTTP {status}");
            }
            Ok(doc)
        };
        tokio::time::timeout(TIMEOUT, answer)
            .await
            .map_err(|_| anyhow!("etcd at {url}: {path}: no answer within {TIMEOUT:?}"))?
    }

    /// Logs in (when a user is configured): the token goes with every
    /// request until [`Client::fail_over`]. The password file must be
    /// root's and not readable by others.
    pub async fn authenticate(&mut self) -> anyhow::Result<()> {
        let Some((user, file)) = self.user.clone() else {
            return Ok(());
        };
        let password = read_secret(&file)?;
        self.token = None;
        let v = self
            .call(
                "/v3/auth/authenticate",
                &json!({"name": user, "password": password}),
            )
            .await
            .map_err(|e| {
                let e = format!("{e:#}");
                // etcd's own answer (`etcdserver: authentication failed`),
                // not a connection that failed on the way.
                if e.contains("etcdserver:") {
                    anyhow!(
                        "etcd refused the credentials of user {user:?} (password_file {}): {e}",
                        file.display()
                    )
                } else {
                    anyhow!("cannot log in to etcd as user {user:?}: {e}")
                }
            })?;
        let token = at(&v, "/token")
            .as_str()
            .context("etcd: no token in the answer")?;
        self.token = Some(token.to_string());
        Ok(())
    }

    /// Every key under `prefix`: the revision and (key, value) pairs.
    pub async fn range(&self, prefix: &str) -> anyhow::Result<(i64, Vec<(String, String)>)> {
        let end = membership::range_end(prefix.as_bytes());
        let v = self
            .call(
                "/v3/kv/range",
                &json!({"key": b64(prefix.as_bytes()), "range_end": b64(&end)}),
            )
            .await?;
        let kvs = at(&v, "/kvs").as_array().cloned().unwrap_or_default();
        let pairs = kvs
            .iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(&unb64(at(kv, "/key"))).into_owned(),
                    String::from_utf8_lossy(&unb64(at(kv, "/value"))).into_owned(),
                )
            })
            .collect();
        Ok((int(at(&v, "/header/revision")), pairs))
    }

    /// A linearizable count of the keys under `prefix`: proves the endpoint
    /// is part of a cluster with a leader.
    pub async fn ping(&self, prefix: &str) -> anyhow::Result<i64> {
        let end = membership::range_end(prefix.as_bytes());
        let v = self
            .call(
                "/v3/kv/range",
                &json!({"key": b64(prefix.as_bytes()), "range_end": b64(&end), "count_only": true}),
            )
            .await?;
        Ok(int(at(&v, "/header/revision")))
    }

    /// Whether `revision` was compacted away. A watch resumed from
    /// `revision + 1` is complete only if it was not: etcd drops the
    /// tombstones of deletions at or below the compaction, so a watch from
    /// the compaction revision itself would miss a member removed there.
    pub async fn compacted(&self, prefix: &str, revision: i64) -> anyhow::Result<bool> {
        let end = membership::range_end(prefix.as_bytes());
        let body = json!({
            "key": b64(prefix.as_bytes()),
            "range_end": b64(&end),
            "revision": revision.to_string(),
            "count_only": true,
        });
        match self.call("/v3/kv/range", &body).await {
            Ok(_) => Ok(false),
            Err(e) if format!("{e:#}").contains("has been compacted") => Ok(true),
            // A revision etcd has not reached: its history is not the one
            // the saved list came from (a restore): read the whole list.
            Err(e) if format!("{e:#}").contains("future revision") => Ok(true),
            Err(e) => Err(e),
        }
    }

    pub async fn grant(&self, ttl: u64) -> anyhow::Result<i64> {
        let v = self
            .call(
                "/v3/lease/grant",
                &json!({"TTL": ttl.to_string(), "ID": "0"}),
            )
            .await?;
        Ok(int(at(&v, "/ID")))
    }

    /// Renews lease `id`: its remaining TTL, 0 when it is gone.
    pub async fn keep_alive(&self, id: i64) -> anyhow::Result<i64> {
        match self
            .call("/v3/lease/keepalive", &json!({"ID": id.to_string()}))
            .await
        {
            Ok(v) => Ok(int(at(&v, "/result/TTL"))),
            Err(e) if format!("{e:#}").contains("lease not found") => Ok(0),
            Err(e) => Err(e),
        }
    }

    pub async fn put(&self, key: &str, value: &str, lease: i64) -> anyhow::Result<i64> {
        let v = self
            .call(
                "/v3/kv/put",
                &json!({"key": b64(key.as_bytes()), "value": b64(value.as_bytes()), "lease": lease.to_string()}),
            )
            .await?;
        Ok(int(at(&v, "/header/revision")))
    }

    /// Deletes `key`; the revision it made.
    pub async fn delete(&self, key: &str) -> anyhow::Result<i64> {
        let v = self
            .call("/v3/kv/deleterange", &json!({"key": b64(key.as_bytes())}))
            .await?;
        Ok(int(at(&v, "/header/revision")))
    }

    /// Watches every key under `prefix` from `start` on.
    pub async fn watch(&self, prefix: &str, start: i64) -> anyhow::Result<Watch> {
        let end = membership::range_end(prefix.as_bytes());
        let body = json!({"create_request": {
            "key": b64(prefix.as_bytes()),
            "range_end": b64(&end),
            "start_revision": start.to_string(),
        }});
        let url = self.url();
        let resp = tokio::time::timeout(TIMEOUT, self.send("/v3/watch", &body))
            .await
            .map_err(|_| anyhow!("etcd at {url}: watch: no answer within {TIMEOUT:?}"))??;
        if !resp.status().is_success() {
            bail!("etcd at {url}: watch: HTTP {}", resp.status());
        }
        Ok(Watch {
            lines: Lines::new(resp.into_body()),
            url,
        })
    }
}

/// An open watch.
pub struct Watch {
    lines: Lines,
    url: String,
}

impl Watch {
    /// The next message; an error when the stream ends or etcd cancels it.
    pub async fn next(&mut self) -> anyhow::Result<WatchMsg> {
        let url = &self.url;
        let v = self
            .lines
            .next()
            .await?
            .with_context(|| format!("etcd at {url}: the watch ended"))?;
        if let Some(e) = etcd_error(&v) {
            bail!("etcd at {url}: watch: {e}");
        }
        let r = at(&v, "/result");
        let compacted = int(at(r, "/compact_revision"));
        if compacted > 0 {
            return Ok(WatchMsg::Compacted(compacted));
        }
        if at(r, "/canceled").as_bool() == Some(true) {
            let why = at(r, "/cancel_reason").as_str().unwrap_or("canceled");
            bail!("etcd at {url}: watch canceled: {why}");
        }
        let Some(events) = at(r, "/events").as_array() else {
            return Ok(WatchMsg::Quiet);
        };
        // Only the events' own revisions: a catching-up watch stamps every
        // batch with the store's current revision while more batches are
        // to come, so the header would claim revisions not yet seen (a
        // session ending between batches would skip their deletions).
        let mut revision = 0;
        let mut out = Vec::new();
        for e in events {
            let kv = at(e, "/kv");
            let key = String::from_utf8_lossy(&unb64(at(kv, "/key"))).into_owned();
            revision = revision.max(int(at(kv, "/mod_revision")));
            if at(e, "/type").as_str() == Some("DELETE") {
                out.push(Event::Delete { key });
            } else {
                let value = String::from_utf8_lossy(&unb64(at(kv, "/value"))).into_owned();
                out.push(Event::Put { key, value });
            }
        }
        Ok(WatchMsg::Events {
            revision,
            events: out,
        })
    }
}

/// A secret file: owned by root, no access for group or others; its first
/// line.
fn read_secret(path: &std::path::Path) -> anyhow::Result<String> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(path)
        .with_context(|| format!("fleet: password_file {}", path.display()))?;
    if meta.uid() != 0 || meta.mode() & 0o077 != 0 {
        bail!(
            "fleet: password_file {} must be owned by root with mode 0600 or stricter (it is uid {}, mode {:o})",
            path.display(),
            meta.uid(),
            meta.mode() & 0o7777
        );
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("fleet: password_file {}", path.display()))?;
    Ok(text.lines().next().unwrap_or_default().to_string())
}
