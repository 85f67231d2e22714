//! A small HTTP/1.1 client for the API socket (what the CLI uses).

use std::path::Path;

use anyhow::Context as _;
use http_body_util::{BodyExt as _, Full};
use hyper::{Method, Request, body::Bytes};
use hyper_util::rt::TokioIo;

/// A reply: status code and body.
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
}

/// The daemon refused a request: its own words, without transport details.
#[derive(Debug)]
pub struct Refused {
    /// The HTTP status (for scripts that want it; not part of the message).
    pub status: u16,
    pub message: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Refused {}

impl Reply {
    /// The body as JSON, or the API's error message as an error.
    pub fn json(self) -> anyhow::Result<serde_json::Value> {
        self.typed()
    }

    /// The body as `T`, or the API's error message as a [`Refused`] error.
    pub fn typed<T: serde::de::DeserializeOwned>(&self) -> anyhow::Result<T> {
        if !(200..300).contains(&self.status) {
            let message = serde_json::from_slice::<crate::api::ErrorBody>(&self.body)
                .map(|e| e.error)
                .unwrap_or_else(|_| {
                    format!(
                        "the daemon refused the request without saying why ({})",
                        String::from_utf8_lossy(&self.body).trim()
                    )
                });
            return Err(Refused {
                status: self.status,
                message,
            }
            .into());
        }
        serde_json::from_slice(&self.body).with_context(|| {
            "the daemon answered with a document this portcullis does not understand (a different version?)"
        })
    }
}

/// `s` as one URL path segment: every byte but the unreserved ones
/// (RFC 3986: letters, digits, `-`, `.`, `_`, `~`) percent-encoded, so an id
/// with `/`, `?`, `#`, `%`, spaces or `..` names itself and nothing else.
/// A segment that is only dots is encoded whole (`.` and `..` are never
/// sent as path steps).
pub fn path_segment(s: &str) -> String {
    use std::fmt::Write as _;
    let only_dots = s.bytes().all(|b| b == b'.');
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'~') || (b == b'.' && !only_dots)
        {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Sends one request to the API at `socket`.
pub async fn request(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> anyhow::Result<Reply> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .with_context(|| {
            format!(
                "cannot connect to {} (is portcullisd running, and may you use it?)",
                socket.display()
            )
        })?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "portcullis");
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let req = req.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes().to_vec();
    Ok(Reply { status, body })
}

/// Sends a GET and calls `on_line` with each line of the streamed body as it
/// arrives, until the server ends it.
pub async fn follow(
    socket: &Path,
    path: &str,
    mut on_line: impl FnMut(&str),
) -> anyhow::Result<()> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .with_context(|| format!("cannot connect to {}", socket.display()))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let req = Request::builder()
        .method(Method::GET)
        .uri(path)
        .header("host", "portcullis")
        .body(Full::new(Bytes::new()))?;
    let mut body = sender.send_request(req).await?.into_body();
    let mut pending = String::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            pending.push_str(&String::from_utf8_lossy(&data));
            while let Some(i) = pending.find('\n') {
                on_line(pending.get(..i).unwrap_or_default());
                pending.drain(..=i);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::path_segment;

    #[test]
    fn path_segments_name_only_themselves() {
        assert_eq!(path_segment("web-1_a.b~"), "web-1_a.b~");
        assert_eq!(path_segment("a/../../mode"), "a%2F..%2F..%2Fmode");
        assert_eq!(path_segment("a?force=true#x y"), "a%3Fforce%3Dtrue%23x%20y");
        assert_eq!(path_segment("%41"), "%2541");
        assert_eq!(path_segment(".."), "%2E%2E");
        assert_eq!(path_segment("é"), "%C3%A9");
    }
}
