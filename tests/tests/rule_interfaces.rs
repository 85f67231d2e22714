//! Rules that apply to some interfaces (issue 18), with real traffic: the
//! protected host has a public NIC (`pc0`, to one peer) and a cluster NIC
//! (`pc2`, to another); a rule with `interfaces = ["pc2"]` admits its port
//! from the cluster NIC's peer and not from the public one, while a rule
//! without interfaces admits on both. IPv4 and IPv6.

use std::io;

use portcullis_tests::*;

const CLUSTER_IF: &str = "pc2";
const CLUSTER_PEER_IF: &str = "pc3";
const HOST2_V4: &str = "10.200.2.1";
const HOST2_V6: &str = "fd00:200:2::1";
const PEER2_V4: &str = "10.200.2.2";
const PEER2_V6: &str = "fd00:200:2::2";
const WEB: u16 = 8080;
const CLUSTER: u16 = 9000;

const RULES: &str = "[[ingress_rules]]\nid = \"cluster\"\nfrom_port = 9000\nto_port = 9000\n\
ip_ranges = []\nprotocol = \"tcp\"\ninterfaces = [\"pc2\"]\n\
[[ingress_rules]]\nid = \"web\"\nfrom_port = 8080\nto_port = 8080\nip_ranges = []\nprotocol = \"tcp\"\n";

fn reaches(ns: &Netns, host: &str, port: u16) -> bool {
    match tcp_probe(ns, sock(host, port)) {
        Ok(()) => true,
        Err(e) => {
            assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{host}:{port}: {e}");
            false
        }
    }
}

#[test]
fn an_interface_rule_admits_on_its_interface_only() {
    require_root!();
    let pair = Pair::new().unwrap();
    let cluster = Netns::new("q").unwrap();
    veth(&pair.host, CLUSTER_IF, &cluster, CLUSTER_PEER_IF).unwrap();
    addresses(
        &pair.host,
        CLUSTER_IF,
        &format!("{HOST2_V4}/24"),
        &format!("{HOST2_V6}/64"),
    )
    .unwrap();
    addresses(
        &cluster,
        CLUSTER_PEER_IF,
        &format!("{PEER2_V4}/24"),
        &format!("{PEER2_V6}/64"),
    )
    .unwrap();
    for host in [HOST_V4, HOST_V6, HOST2_V4, HOST2_V6] {
        for port in [WEB, CLUSTER] {
            TcpServer::start(&pair.host, sock(host, port)).unwrap();
        }
    }
    // Control: without the filter both peers reach both ports.
    for (ns, hosts) in [
        (&pair.peer, [HOST_V4, HOST_V6]),
        (&cluster, [HOST2_V4, HOST2_V6]),
    ] {
        for host in hosts {
            for port in [WEB, CLUSTER] {
                assert!(reaches(ns, host, port), "control: {host}:{port}");
            }
        }
    }
    let pins = PinDir::new().unwrap();
    let text = config_text(&pins, RULES).replace(
        &format!("interfaces = [\"{HOST_IFACE}\"]"),
        &format!("interfaces = [\"{HOST_IFACE}\", \"{CLUSTER_IF}\"]"),
    );
    let config = ConfigFile::new(&text).unwrap();
    let _daemon = Daemon::start(&pair.host, &config).expect("portcullisd");
    let dropped = pins.counter(Reason::DropNoRule);
    for host in [HOST2_V4, HOST2_V6] {
        assert!(
            reaches(&cluster, host, CLUSTER),
            "cluster NIC: {host}:{CLUSTER}"
        );
        assert!(reaches(&cluster, host, WEB), "cluster NIC: {host}:{WEB}");
    }
    for host in [HOST_V4, HOST_V6] {
        assert!(
            !reaches(&pair.peer, host, CLUSTER),
            "public NIC admitted {host}:{CLUSTER}"
        );
        assert!(reaches(&pair.peer, host, WEB), "public NIC: {host}:{WEB}");
    }
    assert_eq!(
        pins.counter(Reason::DropNoRule),
        dropped + 2,
        "two SYNs dropped"
    );
    let listed = String::from_utf8_lossy(&cli(&config, &["rules", "list"]).stdout).into_owned();
    assert!(listed.contains("any on pc2"), "{listed}");
    // Interfaces are for ingress rules: refused on egress, naming the rule
    // and the field, and nothing changes.
    let out = cli(
        &config,
        &[
            "rules",
            "add",
            "--id",
            "out",
            "--from-port",
            "53",
            "--to-port",
            "53",
            "--egress",
            "--interface",
            "pc2",
        ],
    );
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && said.contains("\"out\"") && said.contains("interfaces"),
        "{said}"
    );
    // Added at run time: `allow --interface` scopes a rule the same way.
    let out = cli(&config, &["allow", "7000/tcp", "--interface", "pc2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    TcpServer::start(&pair.host, sock(HOST2_V4, 7000)).unwrap();
    TcpServer::start(&pair.host, sock(HOST_V4, 7000)).unwrap();
    assert!(reaches(&cluster, HOST2_V4, 7000));
    assert!(!reaches(&pair.peer, HOST_V4, 7000));
}
