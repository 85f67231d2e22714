//! The DNS forwarder for FQDN egress rules (on the core): the host's
//! resolver (or systemd-resolved's upstream) on a dedicated loopback
//! address, relaying each query to the configured upstreams over UDP or
//! TCP. Before an answer goes back to the client, the addresses on its
//! CNAME chain that an FQDN rule allows are written into the data path
//! (`Core::fqdn_admit`), so the client's first connection is admitted.
//!
//! Each upstream query gets a fresh random id and, over UDP, a fresh
//! socket on a random source port, connected to the upstream: the kernel
//! delivers only datagrams from that address and port, and an answer is
//! accepted only with the same id and the same question (else it is
//! dropped and the wait goes on). The question goes upstream with the case
//! of its letters randomised (0x20) and the answer must repeat it exactly;
//! the client gets its own spelling back. Client EDNS options (Client
//! Subnet, cookies) are not forwarded. The upstream sockets carry
//! [`DNS_MARK`]: the only DNS queries the data path lets leave while FQDN
//! rules exist. An upstream failure is a SERVFAIL to the client, as is an
//! answer whose destinations cannot be written.
//!
//! The listening sockets come from systemd when it passes them
//! (`LISTEN_FDS`, names `dns-udp` and `dns-tcp`): they outlive the
//! daemon, so queries sent while it restarts wait in their queues.

use std::{
    io::Read as _,
    net::{IpAddr, SocketAddr},
    os::fd::{FromRawFd as _, OwnedFd, RawFd},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, bail};
use nix::sys::socket::{getsockopt, setsockopt, sockopt};
use portcullis_common::DNS_MARK;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpSocket, TcpStream, UdpSocket},
    time::timeout,
};

use crate::{core::Shared, dns};

/// How long one upstream gets to answer.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// A TCP client's whole exchange.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest DNS message over UDP read or TCP accepted.
const MAX_MESSAGE: usize = 65535;
/// Queries in flight at once (more wait).
const MAX_INFLIGHT: usize = 256;
/// TCP clients served at once: a connection beyond them is closed at once
/// (each holds a task, a descriptor and its buffered query).
const MAX_TCP_CLIENTS: usize = 64;
/// How long a TCP client gets to send each query's length prefix (an idle
/// or half-sent connection gives its place up after this).
const TCP_IDLE: Duration = Duration::from_secs(2);

/// What the forwarder needs from `[dns]`.
#[derive(Clone, Debug)]
pub struct Settings {
    pub upstreams: Vec<SocketAddr>,
    pub ttl_floor: u32,
    pub ttl_max: u32,
}

/// The listening sockets, from systemd or bound here.
pub struct Listeners {
    pub udp: std::net::UdpSocket,
    pub tcp: std::net::TcpListener,
    pub activated: bool,
}

/// The sockets systemd passed (`LISTEN_PID`, `LISTEN_FDS`,
/// `LISTEN_FDNAMES`): `dns-udp` and `dns-tcp`, each checked to be of its
/// type; else binds `listen` itself.
pub fn listeners(listen: SocketAddr) -> anyhow::Result<Listeners> {
    if let Some(l) = activated()? {
        return Ok(l);
    }
    let udp = std::net::UdpSocket::bind(listen)
        .with_context(|| format!("binding the DNS forwarder to udp {listen}"))?;
    let tcp = std::net::TcpListener::bind(listen)
        .with_context(|| format!("binding the DNS forwarder to tcp {listen}"))?;
    Ok(Listeners {
        udp,
        tcp,
        activated: false,
    })
}

/// The fds systemd passed to this process, by name.
fn passed_fds() -> Vec<(String, RawFd)> {
    let pid_ok = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|p| p == std::process::id());
    let count = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse::<i32>().ok())
        .unwrap_or(0);
    if !pid_ok || count <= 0 {
        return Vec::new();
    }
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    let names: Vec<&str> = names.split(':').collect();
    (0..count.min(64))
        .map(|i| {
            let name = names.get(i as usize).copied().unwrap_or("unknown");
            (name.to_owned(), 3 + i)
        })
        .collect()
}

/// The passed sockets named `dns-udp` and `dns-tcp`; or, when systemd
/// gave one name to both (a single `.socket` unit with one
/// `FileDescriptorName=dns`), those named `dns`, told apart by type.
fn activated() -> anyhow::Result<Option<Listeners>> {
    let fds = passed_fds();
    let named = |want: &str| fds.iter().find(|(n, _)| n == want).map(|(_, fd)| *fd);
    let (u, t) = match (named("dns-udp"), named("dns-tcp")) {
        (Some(u), Some(t)) => (u, t),
        _ => {
            let shared: Vec<RawFd> = fds
                .iter()
                .filter(|(n, _)| n == "dns")
                .map(|(_, fd)| *fd)
                .collect();
            match shared.as_slice() {
                [a, b] => (*a, *b),
                _ => return Ok(None),
            }
        }
    };
    // SAFETY: systemd passed these descriptors to this process (LISTEN_PID
    // is ours) and nothing else in it owns them; each is taken once.
    let (a, b) = unsafe { (OwnedFd::from_raw_fd(u), OwnedFd::from_raw_fd(t)) };
    // Not inherited by what the daemon runs (nft, sshd -T).
    for fd in [&a, &b] {
        use nix::fcntl::{FcntlArg, FdFlag, fcntl};
        fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
            .context("setting FD_CLOEXEC on a passed DNS socket")?;
    }
    use nix::sys::socket::SockType;
    let (u, t) = match getsockopt(&a, sockopt::SockType)? {
        SockType::Datagram => (a, b),
        _ => (b, a),
    };
    if getsockopt(&u, sockopt::SockType)? != SockType::Datagram {
        bail!("no datagram socket among the DNS sockets systemd passed");
    }
    if getsockopt(&t, sockopt::SockType)? != SockType::Stream
        || !getsockopt(&t, sockopt::AcceptConn)?
    {
        bail!("no listening stream socket among the DNS sockets systemd passed");
    }
    Ok(Some(Listeners {
        udp: u.into(),
        tcp: t.into(),
        activated: true,
    }))
}

/// Counters `status` shows.
#[derive(Default)]
struct Stats {
    answers: AtomicU64,
    admitting: AtomicU64,
    servfails: AtomicU64,
}

struct Ctx {
    core: Shared,
    settings: Settings,
    stats: Stats,
    inflight: tokio::sync::Semaphore,
    tcp_clients: Arc<tokio::sync::Semaphore>,
}

/// Serves both listeners until the process ends.
pub async fn run(core: Shared, settings: Settings, listeners: Listeners) -> anyhow::Result<()> {
    listeners.udp.set_nonblocking(true)?;
    listeners.tcp.set_nonblocking(true)?;
    let udp = Arc::new(UdpSocket::from_std(listeners.udp)?);
    let tcp = TcpListener::from_std(listeners.tcp)?;
    let ctx = Arc::new(Ctx {
        core,
        settings,
        stats: Stats::default(),
        inflight: tokio::sync::Semaphore::new(MAX_INFLIGHT),
        tcp_clients: Arc::new(tokio::sync::Semaphore::new(MAX_TCP_CLIENTS)),
    });
    tokio::spawn(report(ctx.clone()));
    tokio::spawn(serve_tcp(tcp, ctx.clone()));
    serve_udp(udp, ctx).await
}

/// Copies the counters into the core's status every second.
async fn report(ctx: Arc<Ctx>) {
    let mut warned = false;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut core = ctx.core.lock().await;
        let entries = core.fqdn_entries();
        let high = entries * 5 > portcullis_common::FQDN_ENTRIES as usize * 4;
        if high && !warned {
            tracing::warn!(
                entries,
                capacity = portcullis_common::FQDN_ENTRIES,
                "the learned destinations are over 80% full (when full, those closest to expiry are evicted)"
            );
        }
        warned = high;
        if let Some(s) = core.dns.as_mut() {
            s.entries = entries;
            s.answers = ctx.stats.answers.load(Ordering::Relaxed);
            s.admitting = ctx.stats.admitting.load(Ordering::Relaxed);
            s.servfails = ctx.stats.servfails.load(Ordering::Relaxed);
        }
    }
}

async fn serve_udp(sock: Arc<UdpSocket>, ctx: Arc<Ctx>) -> anyhow::Result<()> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        // An error (e.g. ICMP unreachable for an earlier answer) is one
        // datagram's: service goes on.
        let (n, client) = match sock.recv_from(&mut buf).await {
            Ok(got) => got,
            Err(e) => {
                tracing::debug!(error = %e, "DNS forwarder: receiving a query");
                continue;
            }
        };
        let query = buf.get(..n).unwrap_or_default().to_vec();
        let Ok(permit) = ctx.inflight.acquire().await else {
            return Ok(());
        };
        permit.forget();
        let (sock, ctx) = (sock.clone(), ctx.clone());
        tokio::spawn(async move {
            if let Some(answer) = answer(&ctx, &query, false).await {
                let _ = sock.send_to(&answer, client).await;
            }
            ctx.inflight.add_permits(1);
        });
    }
}

async fn serve_tcp(listener: TcpListener, ctx: Arc<Ctx>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        // At the cap the connection is closed at once (dropped here).
        let Ok(place) = ctx.tcp_clients.clone().try_acquire_owned() else {
            continue;
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let _ = timeout(CLIENT_TIMEOUT, serve_tcp_client(stream, &ctx)).await;
            drop(place);
        });
    }
}

/// One TCP client: length-prefixed queries, answered in turn.
async fn serve_tcp_client(mut stream: TcpStream, ctx: &Ctx) -> anyhow::Result<()> {
    loop {
        let Ok(query) = read_client_query(&mut stream).await else {
            return Ok(());
        };
        let _permit = ctx.inflight.acquire().await?;
        let Some(answer) = answer(ctx, &query, true).await else {
            return Ok(());
        };
        write_framed(&mut stream, &answer).await?;
    }
}

/// A client's next query: its length prefix within [`TCP_IDLE`], then
/// the body (memory grows only with the bytes that arrive).
async fn read_client_query(stream: &mut TcpStream) -> anyhow::Result<Vec<u8>> {
    let len = timeout(TCP_IDLE, stream.read_u16()).await??;
    read_body(stream, len).await
}

async fn read_framed(stream: &mut TcpStream) -> anyhow::Result<Vec<u8>> {
    let len = stream.read_u16().await?;
    read_body(stream, len).await
}

async fn read_body(stream: &mut TcpStream, len: u16) -> anyhow::Result<Vec<u8>> {
    let mut msg = Vec::new();
    (&mut *stream)
        .take(u64::from(len))
        .read_to_end(&mut msg)
        .await?;
    if msg.len() != usize::from(len) {
        bail!("connection closed within a message");
    }
    Ok(msg)
}

async fn write_framed(stream: &mut TcpStream, msg: &[u8]) -> anyhow::Result<()> {
    let len = u16::try_from(msg.len()).context("answer too long for TCP")?;
    let mut out = len.to_be_bytes().to_vec();
    out.extend_from_slice(msg);
    stream.write_all(&out).await?;
    Ok(())
}

/// The answer to `query` for the client (its id restored), after what it
/// admits is written; SERVFAIL when no upstream answers or the write fails;
/// `None` for a message that is not a query (dropped).
async fn answer(ctx: &Ctx, query: &[u8], tcp: bool) -> Option<Vec<u8>> {
    let parsed = dns::parse_query(query).ok()?;
    if dns::opcode(query) != 0 {
        return Some(dns::refusal(query, &parsed, dns::RCODE_NOTIMP));
    }
    for &upstream in &ctx.settings.upstreams {
        let id = random_u16();
        // 0x20: one random bit per letter of the name, which the answer's
        // question must repeat exactly.
        let sent = dns::upstream_query(query, &parsed, id, &random_bytes::<32>());
        let question = dns::question_wire(&sent).unwrap_or_default();
        let got = if tcp {
            exchange_tcp(upstream, &sent, id, question).await
        } else {
            exchange_udp(upstream, &sent, id, question).await
        };
        let Ok((raw, response)) = got else { continue };
        ctx.stats.answers.fetch_add(1, Ordering::Relaxed);
        let chain = dns::chain(&response);
        let admitted =
            ctx.core
                .lock()
                .await
                .fqdn_admit(&chain, ctx.settings.ttl_floor, ctx.settings.ttl_max);
        match admitted {
            Ok(n) => {
                if n > 0 {
                    ctx.stats.admitting.fetch_add(1, Ordering::Relaxed);
                }
                return Some(dns::for_client(&raw, query, &parsed));
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), name = %parsed.question.name, "cannot admit the answer's addresses: SERVFAIL");
                break;
            }
        }
    }
    ctx.stats.servfails.fetch_add(1, Ordering::Relaxed);
    Some(dns::servfail(query, &parsed))
}

/// 16 random bits from the kernel.
fn random_u16() -> u16 {
    u16::from_ne_bytes(random_bytes())
}

/// `N` random bytes from the kernel.
fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    // /dev/urandom does not fail once open; a zero id would still be checked.
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut b);
    }
    b
}

/// A UDP socket marked as the forwarder's, bound to a random port (the
/// kernel's choice after a few taken ones), connected to `upstream`.
fn upstream_udp(upstream: SocketAddr) -> anyhow::Result<UdpSocket> {
    let any: IpAddr = if upstream.is_ipv4() {
        IpAddr::from([0u8; 4])
    } else {
        IpAddr::from([0u16; 8])
    };
    let mut sock = None;
    for _ in 0..4 {
        let port = 1024 + random_u16() % (u16::MAX - 1024);
        if let Ok(s) = std::net::UdpSocket::bind(SocketAddr::new(any, port)) {
            sock = Some(s);
            break;
        }
    }
    let sock = match sock {
        Some(s) => s,
        None => std::net::UdpSocket::bind(SocketAddr::new(any, 0))?,
    };
    setsockopt(&sock, sockopt::Mark, &DNS_MARK).context("setting the forwarder's socket mark")?;
    sock.connect(upstream)?;
    sock.set_nonblocking(true)?;
    Ok(UdpSocket::from_std(sock)?)
}

/// Whether `raw` is the answer to our query `id` for `question` (the
/// question section as sent: the case of each letter must match, 0x20).
fn accept(raw: &[u8], id: u16, question: &[u8]) -> Option<dns::Response> {
    let r = dns::parse_response(raw).ok()?;
    (r.id == id && dns::question_wire(raw) == Some(question)).then_some(r)
}

async fn exchange_udp(
    upstream: SocketAddr,
    query: &[u8],
    id: u16,
    question: &[u8],
) -> anyhow::Result<(Vec<u8>, dns::Response)> {
    let sock = upstream_udp(upstream)?;
    sock.send(query).await?;
    let mut buf = vec![0u8; MAX_MESSAGE];
    let deadline = tokio::time::Instant::now() + UPSTREAM_TIMEOUT;
    loop {
        // Connected: the kernel delivers only the upstream's datagrams.
        let n = tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await??;
        let raw = buf.get(..n).unwrap_or_default();
        if let Some(r) = accept(raw, id, question) {
            return Ok((raw.to_vec(), r));
        }
    }
}

async fn exchange_tcp(
    upstream: SocketAddr,
    query: &[u8],
    id: u16,
    question: &[u8],
) -> anyhow::Result<(Vec<u8>, dns::Response)> {
    let sock = if upstream.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    setsockopt(&sock, sockopt::Mark, &DNS_MARK).context("setting the forwarder's socket mark")?;
    let work = async {
        let mut stream = sock.connect(upstream).await?;
        write_framed(&mut stream, query).await?;
        let raw = read_framed(&mut stream).await?;
        match accept(&raw, id, question) {
            Some(r) => Ok((raw, r)),
            None => bail!("upstream {upstream} answered another question"),
        }
    };
    timeout(UPSTREAM_TIMEOUT, work).await?
}
