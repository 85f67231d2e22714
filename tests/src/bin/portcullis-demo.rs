//! `cargo xtask demo`: portcullisd protecting one namespace from another,
//! with real connections, the counters, and a clean teardown.

use std::process::Command;

use portcullis_tests::*;

const RULES: &str = r#"
[[ingress_rules]]
id = "app"
from_port = 8080
to_port = 8080
ip_ranges = []
description = "the one service this host offers"
"#;

fn main() -> anyhow::Result<()> {
    anyhow::ensure!(
        is_root(),
        "the demo creates network namespaces and attaches XDP: run it as root"
    );
    let pair = Pair::new()?;
    let pins = PinDir::new()?;
    let config = config(&pins, true, RULES)?;
    println!(
        "Protected host: namespace {} ({HOST_IFACE}, {HOST_V4}, {HOST_V6})",
        pair.host.name()
    );
    println!(
        "Peer:           namespace {} ({PEER_IFACE}, {PEER_V4}, {PEER_V6})",
        pair.peer.name()
    );
    println!(
        "\nConfiguration:\n{}",
        std::fs::read_to_string(config.path())?
    );

    for port in [22, 8080, 9090] {
        TcpServer::start(&pair.host, sock(HOST_V4, port))?;
        TcpServer::start(&pair.host, sock(HOST_V6, port))?;
    }
    let daemon = Daemon::start(&pair.host, &config)?;
    println!("portcullisd is enforcing on {HOST_IFACE}.\n");

    let show =
        |what: &str, ok: bool| println!("  {what:<44} {}", if ok { "reached" } else { "dropped" });
    for addr in [HOST_V4, HOST_V6] {
        for port in [22, 8080, 9090] {
            let ok = tcp_probe(&pair.peer, sock(addr, port)).is_ok();
            show(&format!("TCP connect to [{addr}]:{port}"), ok);
        }
        for port in [8080, 9090] {
            let listener = udp_bind(&pair.host, sock(addr, port))?;
            udp_send(&pair.peer, sock(addr, port), b"hello")?;
            show(
                &format!("UDP datagram to [{addr}]:{port}"),
                udp_received(&listener),
            );
        }
        show(&format!("ping {addr}"), ping(&pair.peer, addr));
    }

    tcp_source_server(&pair.peer, sock(PEER_V4, 5001), 4 << 20)?;
    let mut download = tcp_connect(&pair.host, sock(PEER_V4, 5001))?;
    let got = receive_all(&mut download)?;
    println!(
        "  {:<44} {} bytes, replies admitted",
        "download from the host to the peer", got
    );

    println!("\n`portcullis status`:");
    let status = cli(&config, &["status"]);
    print!("{}", String::from_utf8_lossy(&status.stdout));

    println!("\n`portcullis counters`:");
    let cli = workspace_bin("portcullis")?;
    run(Command::new(&cli)
        .arg("counters")
        .arg("--pin-dir")
        .arg(pins.path()))
    .map(|out| print!("{out}"))?;

    println!("\nKilling portcullisd with SIGKILL: enforcement is pinned and stays.");
    daemon.kill();
    show(
        "TCP connect to port 9090 with no daemon",
        tcp_probe(&pair.peer, sock(HOST_V4, 9090)).is_ok(),
    );
    show(
        "TCP connect to port 8080 with no daemon",
        tcp_probe(&pair.peer, sock(HOST_V4, 8080)).is_ok(),
    );

    println!("\n`portcullisd --detach` removes the pins and with them the filter:");
    run(pair
        .host
        .command(workspace_bin("portcullisd")?)
        .arg("--config")
        .arg(config.path())
        .arg("--detach"))?;
    show(
        "TCP connect to port 9090 after detach",
        tcp_probe(&pair.peer, sock(HOST_V4, 9090)).is_ok(),
    );

    drop(pins);
    drop(pair);
    println!("\nCleaned up: namespaces, links and pins are gone.");
    Ok(())
}
