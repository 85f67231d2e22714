//! The attack suite's forged-source flood (issue 18, item 3): SYNs from
//! many spoofed sources inside 10.200.0.0/16, hand-built and sent from an
//! AF_PACKET socket, to a port the rules admit from anywhere, more than the
//! inbound table holds, while the egress allowlist is on (where an evicted
//! inbound entry would cut the reply path). The host's outbound flow and
//! an established admitted inbound flow must still exchange data after the
//! flood, the server speaking first; and a new client still connects.

use std::{
    io::{self, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    time::Duration,
};

use portcullis_tests::{packet::Pkt, traffic::*, *};
use socket2::{Domain, Protocol, Socket, Type};

const APP: u16 = 8080;
const OUT: u16 = 9000;
/// More than `INBOUND4` holds (65536): every entry a SYN could plant would
/// evict an older one.
const FLOOD: u32 = 131_072;
/// Each forged packet is sent this often.
const REPEAT: u32 = 2;
const ETH_P_ALL: u16 = 0x0003;
const SYN: u8 = 0x02;

fn mac(ns: &Netns, ifname: &str) -> [u8; 6] {
    let out = ns.ip(&["-br", "link", "show", ifname]).expect("ip link");
    let text = out.split_whitespace().nth(2).expect("MAC in `ip -br link`");
    let mut m = [0u8; 6];
    for (i, part) in text.split(':').enumerate() {
        m[i] = u8::from_str_radix(part, 16).expect("MAC byte");
    }
    m
}

/// An AF_PACKET socket bound to `ifname` in `ns`, for sending frames.
fn packet_socket(ns: &Netns, ifname: &str) -> Socket {
    let ifname = ifname.to_string();
    ns.enter(move || {
        let s = Socket::new(
            Domain::PACKET,
            Type::RAW,
            Some(Protocol::from(i32::from(ETH_P_ALL.to_be()))),
        )
        .expect("AF_PACKET socket");
        let index = nix::net::if_::if_nametoindex(ifname.as_str()).expect("interface index");
        // SAFETY: a zeroed sockaddr_ll is valid; the fields set below are plain integers.
        let mut ll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        ll.sll_family = libc::AF_PACKET as u16;
        ll.sll_protocol = ETH_P_ALL.to_be();
        ll.sll_ifindex = index as i32;
        // SAFETY: `ll` is a valid sockaddr_ll of the size given.
        let rc = unsafe {
            libc::bind(
                std::os::fd::AsRawFd::as_raw_fd(&s),
                (&ll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(rc, 0, "bind AF_PACKET: {}", io::Error::last_os_error());
        s
    })
}

/// `FLOOD` SYNs (or UDP datagrams) to the host's `APP`, each from another
/// (source address, port) in 10.200.128.0/17: off the host's /24, so
/// nothing answers them (and their checksums are not even right: only the
/// data path sees them).
fn spoofed_flood(pair: &Pair, udp: bool) {
    let host_mac = mac(&pair.host, HOST_IFACE);
    let s = packet_socket(&pair.peer, PEER_IFACE);
    let frames: Vec<Vec<u8>> = (0..FLOOD)
        .map(|i| {
            let src = format!("10.200.{}.{}", 128 + ((i >> 8) & 127), i & 255);
            let sport = 1000 + (i >> 15) as u16;
            let pkt = Pkt::new(&src, HOST_V4);
            let mut frame = if udp {
                pkt.udp(sport, APP)
            } else {
                pkt.tcp(sport, APP, SYN)
            }
            .bytes();
            frame[..6].copy_from_slice(&host_mac);
            frame
        })
        .collect();
    // Each packet twice in a row: an entry the first planted is then one
    // the table has seen used, which its LRU keeps as long as any other.
    for frame in &frames {
        for _ in 0..REPEAT {
            send(&s, frame);
        }
    }
}

/// Sends `frame`, waiting while the interface's queue is full.
fn send(s: &Socket, frame: &[u8]) {
    loop {
        match s.send(frame) {
            Ok(_) => return,
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                std::thread::sleep(Duration::from_micros(200));
            }
            Err(e) => panic!("send frame: {e}"),
        }
    }
}

/// Entries in the pinned IPv4 table `name` (`INBOUND4`, ...).
fn entries<V: aya::Pod>(pins: &PinDir, name: &str) -> usize {
    let path = portcullis::dataplane::maps_dir(pins.path()).join(name);
    let map: aya::maps::HashMap<_, portcullis_common::FlowKey4, V> = aya::maps::HashMap::try_from(
        aya::maps::Map::LruHashMap(aya::maps::MapData::from_pin(path).unwrap()),
    )
    .unwrap();
    map.keys().filter_map(Result::ok).count()
}

/// Accepts one connection on `listener` (in whatever namespace it was made).
fn accept(listener: &TcpListener) -> TcpStream {
    let (s, _) = listener.accept().expect("accept");
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s
}

/// `line` written on `from` arrives on `to`.
fn carries(from: &mut TcpStream, to: &mut TcpStream, line: &[u8]) -> io::Result<()> {
    from.write_all(line)?;
    let mut got = vec![0u8; line.len()];
    to.read_exact(&mut got)?;
    assert_eq!(got, line);
    Ok(())
}

#[test]
fn a_spoofed_syn_flood_leaves_outbound_and_established_inbound_flows_intact() {
    require_root!();
    flood_leaves_flows_intact(false);
}

/// UDP has no handshake: a forged datagram to an admitted port plants an
/// inbound flow. Those live apart from TCP's, so this flood cannot evict
/// the established TCP connection either.
#[test]
fn a_spoofed_udp_flood_leaves_established_tcp_flows_intact() {
    require_root!();
    flood_leaves_flows_intact(true);
}

fn flood_leaves_flows_intact(udp: bool) {
    // Everything on one CPU, as a flood that arrives on the victim flow's
    // receive queue: the kernel's LRU maps keep per-CPU lists, and an
    // entry made on another CPU than the flood's would be spared by chance.
    let mut one = nix::sched::CpuSet::new();
    one.set(0).unwrap();
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &one).unwrap();
    let pair = Pair::new().unwrap();
    let pins = PinDir::new().unwrap();
    // An ingress rule admitting APP (TCP and UDP) from anywhere (the
    // spoofed sources too), and an egress rule, which makes outbound an allowlist.
    let rules = format!(
        "[[ingress_rules]]\nid = \"app\"\nfrom_port = {APP}\nto_port = {APP}\nip_ranges = []\n\
         [[egress_rules]]\nid = \"out\"\nfrom_port = {OUT}\nto_port = {OUT}\nip_ranges = [\"{PEER_V4}/32\"]\n"
    );
    let config = config(&pins, false, &rules).unwrap();
    let app = pair
        .host
        .enter(|| TcpListener::bind(sock(HOST_V4, APP)))
        .unwrap();
    let out = pair
        .peer
        .enter(|| TcpListener::bind(sock(PEER_V4, OUT)))
        .unwrap();
    let app6 = pair
        .host
        .enter(|| TcpListener::bind(sock(HOST_V6, APP)))
        .unwrap();
    let _daemon = Daemon::start(&pair.host, &config).expect("portcullisd");

    // An admitted inbound flow and an outbound flow, working.
    let mut client = tcp_connect(&pair.peer, sock(HOST_V4, APP)).expect("inbound connect");
    let mut served = accept(&app);
    let mut outbound = tcp_connect(&pair.host, sock(PEER_V4, OUT)).expect("outbound connect");
    let mut remote = accept(&out);
    let control = "control: the flows work before the flood";
    carries(&mut served, &mut client, b"before\n").expect(control);
    carries(&mut client, &mut served, b"before\n").expect(control);
    carries(&mut outbound, &mut remote, b"before\n").expect(control);
    carries(&mut remote, &mut outbound, b"before\n").expect(control);

    let admitted = pins.counter(Reason::PassRule);
    spoofed_flood(&pair, udp);
    // The flood reached the data path and the rule admitted it.
    let flood = pins.counter(Reason::PassRule) - admitted;
    assert!(
        flood >= u64::from(FLOOD * REPEAT) * 9 / 10,
        "only {flood} of {} forged packets were admitted",
        FLOOD * REPEAT
    );

    // Where the flood went: the forged packets filled their own table, not
    // the one of inbound TCP connections, which holds the real one.
    let tcp = entries::<portcullis_common::Flow>(&pins, "INBOUND4");
    let (table, planted) = if udp {
        let n = entries::<portcullis_common::Flow>(&pins, "INBOUND_OTHER4");
        ("INBOUND_OTHER4", n)
    } else {
        (
            "EMBRYO4",
            entries::<portcullis_common::Embryo>(&pins, "EMBRYO4"),
        )
    };
    assert!(tcp <= 2, "{tcp} inbound TCP connections after the flood");
    assert!(planted > 30_000, "only {planted} entries in {table}");
    // The server speaks first: its segment leaves only while the flow is
    // still tracked as an admitted inbound one.
    carries(&mut served, &mut client, b"after\n")
        .expect("the established inbound flow lost its reply path to the flood");
    carries(&mut client, &mut served, b"after\n").expect("the inbound flow, client to server");
    carries(&mut outbound, &mut remote, b"after\n").expect("the outbound flow");
    carries(&mut remote, &mut outbound, b"after\n").expect("the outbound flow's replies");
    // A new client still completes its handshake (SYN-ACK under the
    // allowlist) and is served.
    let mut late = tcp_connect(&pair.peer, sock(HOST_V4, APP)).expect("a new client connects");
    let mut late_served = accept(&app);
    carries(&mut late_served, &mut late, b"hello\n").expect("the new flow");
    // And over IPv6 (its half-open and inbound tables are its own).
    let mut late6 = tcp_connect(&pair.peer, sock(HOST_V6, APP)).expect("a new IPv6 client");
    let mut late6_served = accept(&app6);
    carries(&mut late6_served, &mut late6, b"hello\n").expect("the new IPv6 flow");
}
