//! Real traffic across the namespaces: TCP, UDP, ICMP and raw IP probes,
//! servers, bulk transfers and floods, bounded and self-stopping.

use std::{
    io::{self, Read as _, Write as _},
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::*;

pub fn sock(addr: &str, port: u16) -> SocketAddr {
    SocketAddr::new(addr.parse::<IpAddr>().expect("address"), port)
}

/// A TCP listener that accepts and holds connections without sending.
pub struct TcpServer {
    pub addr: SocketAddr,
}

impl TcpServer {
    pub fn start(ns: &Netns, addr: SocketAddr) -> anyhow::Result<Self> {
        let listener = ns.enter(|| TcpListener::bind(addr))?;
        thread::spawn(move || {
            let mut held = Vec::new();
            for stream in listener.incoming().flatten() {
                held.push(stream);
            }
        });
        Ok(TcpServer { addr })
    }
}

/// How long a probe waits for a handshake: less than the first SYN
/// retransmission (1 s), so a dropped probe sends exactly one SYN.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(700);

/// Connects from `ns` and closes with a reset: exactly three packets
/// (SYN, ACK, RST) reach the server when the connection succeeds, one (SYN)
/// when it is dropped (the attempt ends before the SYN is retransmitted).
pub fn tcp_probe(ns: &Netns, to: SocketAddr) -> io::Result<()> {
    let stream = ns.enter(|| TcpStream::connect_timeout(&to, PROBE_TIMEOUT))?;
    let sock = Socket::from(stream);
    sock.set_linger(Some(Duration::ZERO))?;
    drop(sock);
    Ok(())
}

/// A control probe, before any filter runs: retried for up to 5 s, since an
/// unfiltered path can be slow to answer its first connection on a loaded
/// machine (neighbour resolution), and that is not what a test checks.
pub fn tcp_probe_control(ns: &Netns, to: SocketAddr) -> io::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tcp_probe(ns, to) {
            Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100));
            }
            result => return result,
        }
    }
}

/// A TCP connection that stays open, for long-lived flows.
pub fn tcp_connect(ns: &Netns, to: SocketAddr) -> io::Result<TcpStream> {
    let s = ns.enter(|| TcpStream::connect_timeout(&to, Duration::from_secs(3)))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    Ok(s)
}

/// An echo server: echoes each TCP connection's bytes back.
pub fn tcp_echo_server(ns: &Netns, addr: SocketAddr) -> anyhow::Result<()> {
    let listener = ns.enter(|| TcpListener::bind(addr))?;
    thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 || stream.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = stream.shutdown(Shutdown::Both);
            });
        }
    });
    Ok(())
}

/// Sends a line on `s` and checks it comes back.
pub fn echo_roundtrip(s: &mut TcpStream, line: &[u8]) -> io::Result<()> {
    s.write_all(line)?;
    let mut buf = vec![0u8; line.len()];
    s.read_exact(&mut buf)?;
    if buf != line {
        return Err(io::Error::other("echo mismatch"));
    }
    Ok(())
}

/// Timeout for each read or write of a bulk transfer: a stalled transfer
/// fails the test instead of hanging it.
pub const BULK_TIMEOUT: Duration = Duration::from_secs(10);

fn bulk(stream: &TcpStream) -> io::Result<()> {
    stream.set_read_timeout(Some(BULK_TIMEOUT))?;
    stream.set_write_timeout(Some(BULK_TIMEOUT))
}

/// Sends `len` bytes on `stream`, then closes its sending side.
pub fn send_bytes(stream: &mut TcpStream, len: usize) -> io::Result<()> {
    bulk(stream)?;
    let chunk = vec![0x5a_u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(chunk.len());
        stream.write_all(&chunk[..n])?;
        left -= n;
    }
    stream.shutdown(Shutdown::Write)
}

/// Reads `stream` to its end; the number of bytes.
pub fn receive_all(stream: &mut TcpStream) -> io::Result<usize> {
    bulk(stream)?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        match stream.read(&mut buf)? {
            0 => return Ok(total),
            n => total += n,
        }
    }
}

/// Serves one connection on `addr` in `ns`: sends `len` bytes to it.
pub fn tcp_source_server(ns: &Netns, addr: SocketAddr, len: usize) -> anyhow::Result<()> {
    let listener = ns.enter(|| TcpListener::bind(addr))?;
    thread::spawn(move || {
        if let Ok((mut s, _)) = listener.accept() {
            let _ = send_bytes(&mut s, len);
        }
    });
    Ok(())
}

/// Serves one connection on `addr` in `ns`: sends `chunks` chunks of 64 KiB,
/// one every `interval`, so the transfer lasts a known time.
pub fn tcp_paced_source_server(
    ns: &Netns,
    addr: SocketAddr,
    chunks: usize,
    interval: Duration,
) -> anyhow::Result<()> {
    let listener = ns.enter(|| TcpListener::bind(addr))?;
    thread::spawn(move || {
        if let Ok((mut s, _)) = listener.accept() {
            let _ = bulk(&s);
            let chunk = vec![0xa5_u8; 64 * 1024];
            for _ in 0..chunks {
                if s.write_all(&chunk).is_err() {
                    return;
                }
                thread::sleep(interval);
            }
            let _ = s.shutdown(Shutdown::Write);
        }
    });
    Ok(())
}

/// Serves one connection on `addr` in `ns`: counts what it receives.
pub fn tcp_sink_server(
    ns: &Netns,
    addr: SocketAddr,
) -> anyhow::Result<std::sync::mpsc::Receiver<io::Result<usize>>> {
    let listener = ns.enter(|| TcpListener::bind(addr))?;
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let result = listener.accept().and_then(|(mut s, _)| receive_all(&mut s));
        let _ = tx.send(result);
    });
    Ok(rx)
}

/// A UDP echo server in `ns`.
pub fn udp_echo_server(ns: &Netns, addr: SocketAddr) -> anyhow::Result<()> {
    let sock = ns.enter(|| UdpSocket::bind(addr))?;
    thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            let _ = sock.send_to(&buf[..n], from);
        }
    });
    Ok(())
}

/// A UDP socket bound in `ns`, with a short receive timeout.
pub fn udp_bind(ns: &Netns, addr: SocketAddr) -> anyhow::Result<UdpSocket> {
    let s = ns.enter(|| UdpSocket::bind(addr))?;
    s.set_read_timeout(Some(Duration::from_millis(700)))?;
    Ok(s)
}

/// Sends one datagram from `ns` to `to`.
pub fn udp_send(ns: &Netns, to: SocketAddr, payload: &[u8]) -> anyhow::Result<()> {
    let any: SocketAddr = if to.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let s = ns.enter(|| UdpSocket::bind(any))?;
    s.send_to(payload, to)?;
    Ok(())
}

/// Whether `sock` receives a datagram within its timeout.
pub fn udp_received(sock: &UdpSocket) -> bool {
    let mut buf = [0u8; 2048];
    sock.recv_from(&mut buf).is_ok()
}

/// A raw IP socket for `protocol` (GRE = 47, SCTP = 132, ...) in `ns`.
pub fn raw_socket(ns: &Netns, v6: bool, protocol: i32) -> anyhow::Result<Socket> {
    let domain = if v6 { Domain::IPV6 } else { Domain::IPV4 };
    let s = ns.enter(|| Socket::new(domain, Type::RAW, Some(Protocol::from(protocol))))?;
    s.set_read_timeout(Some(Duration::from_millis(700)))?;
    Ok(s)
}

/// Sends `payload` as one IP packet of `protocol` from `ns` to `to`.
pub fn raw_send(ns: &Netns, to: IpAddr, protocol: i32, payload: &[u8]) -> anyhow::Result<()> {
    let s = raw_socket(ns, to.is_ipv6(), protocol)?;
    s.send_to(payload, &SockAddr::from(SocketAddr::new(to, 0)))?;
    Ok(())
}

/// Whether a raw socket receives a packet carrying `marker` within its
/// timeout. Packets without it are skipped: late copies of an earlier
/// send (a control sent again while the neighbour was resolved can arrive
/// all at once, after the test moved on) say nothing about this one.
pub fn raw_received(sock: &Socket, marker: &[u8]) -> bool {
    use std::io::Read as _;
    let mut buf = [0u8; 2048];
    loop {
        match (&*sock).read(&mut buf) {
            Ok(n) if buf[..n].windows(marker.len()).any(|w| w == marker) => return true,
            Ok(_) => continue,
            Err(_) => return false,
        }
    }
}

/// One ICMP echo from `ns` to `addr`; true when the reply came back.
pub fn ping(ns: &Netns, addr: &str) -> bool {
    ns.command("ping")
        .args(["-c", "1", "-W", "1", addr])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Pings `addr` from `ns` until it answers, at most `tries` pings of a
/// second each: for a test's preconditions on a fresh pair with nothing
/// attached yet, where a loaded machine can lose the first ping's neighbour
/// solicitation. Never for an assertion about what a filter passes: that
/// is one [`ping`].
pub fn ping_until(ns: &Netns, addr: &str, tries: u32) -> bool {
    (0..tries).any(|_| ping(ns, addr))
}

/// A UDP sender that keeps hitting `to` from `from` (one datagram every
/// `gap`, for at most two minutes) and a sink that counts what arrives, for
/// tests where nothing may arrive while something else happens.
pub struct Flood {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    received: Arc<AtomicU64>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Flood {
    pub fn start(
        from: &Netns,
        sink: UdpSocket,
        to: SocketAddr,
        gap: Duration,
    ) -> anyhow::Result<Flood> {
        let stop = Arc::new(AtomicBool::new(false));
        let (sent, received) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let socket =
            from.enter(|| UdpSocket::bind(if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }))?;
        sink.set_read_timeout(Some(Duration::from_millis(100)))?;
        let sender = {
            let (stop, sent) = (stop.clone(), sent.clone());
            thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(120);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let _ = socket.send_to(b"denied", to);
                    sent.fetch_add(1, Ordering::Relaxed);
                    thread::sleep(gap);
                }
            })
        };
        let counter = {
            let (stop, received) = (stop.clone(), received.clone());
            thread::spawn(move || {
                let mut buf = [0u8; 64];
                while !stop.load(Ordering::Relaxed) {
                    if sink.recv(&mut buf).is_ok() {
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        };
        Ok(Flood {
            stop,
            sent,
            received,
            threads: vec![sender, counter],
        })
    }

    /// Stops both; returns (sent, received).
    pub fn stop(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        (
            self.sent.load(Ordering::Relaxed),
            self.received.load(Ordering::Relaxed),
        )
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
