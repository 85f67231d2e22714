//! FQDN egress under the shipped unit (issue 19, item 6), in a container
//! with real systemd and systemd-resolved. As shipped, the unit grants no
//! CAP_NET_BIND_SERVICE and denies every IP address: the forwarder cannot
//! listen on port 53, the status says so and names the fix, and names
//! admit nothing (fail closed). With the documented pieces
//! (`portcullis-dns.socket`, the service drop-in allowing the upstream,
//! resolved's drop-in making the forwarder its upstream) a program that
//! resolves through resolved's stub reaches an allowed name at once, an
//! address no name admitted stays dropped, and `systemctl restart
//! portcullis` during a stream of lookups loses none of them (systemd
//! holds the sockets). One boot; the upstream dnsmasq and the services run
//! in the client namespace, outside the container.

use std::{path::Path, time::Duration};

use portcullis_tests::{
    container::{Boot, CLIENT_IFACE, CLIENT_V4, Container, INSTANCE_IFACE},
    dns::Dnsmasq,
    is_root, sock, tcp_echo_server,
};

const BOOT: Duration = Duration::from_secs(90);
/// The service a name stands for: an address of its own on the client.
const SERVICE: &str = "10.200.60.3";
const LOOKUPS: usize = 30;
const SERVICE_DROP_IN: &str = "/etc/systemd/system/portcullis.service.d/dns.conf";
const RESOLVED_DROP_IN: &str = "/etc/systemd/resolved.conf.d/portcullis.conf";
const EXAMPLES: &str = "/usr/share/doc/portcullis/examples/dns";

fn config() -> String {
    format!(
        "interfaces = [\"{INSTANCE_IFACE}\"]\negress = \"allowlist\"\n[ssh]\nallow = true\n\
         [[egress_rules]]\nid = \"api\"\nprotocol = \"tcp\"\nfrom_port = 8080\nto_port = 8080\nip_ranges = []\n\
         names = [\"allowed.test\", \"*.allowed.test\"]\n\
         [dns]\nupstreams = [\"{CLIENT_V4}\"]\nttl_floor = 30\n"
    )
}

/// `portcullis --json status`'s `dns` object, once the daemon enforces.
fn dns_status(c: &Container) -> Option<serde_json::Value> {
    let out = c.exec("portcullis", &["--json", "status"]).ok()?;
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    (s["enforcing"] == true).then(|| s["dns"].clone())
}

/// Resolves `name` in the container the way programs do (glibc, through
/// /etc/resolv.conf: resolved's stub); the addresses printed.
fn resolve(c: &Container, name: &str) -> Result<String, String> {
    let out = c
        .exec("getent", &["ahostsv4", name])
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("getent {name}: {}", out.status))
    }
}

/// A TCP connection from the container to `addr:port` (bash's /dev/tcp,
/// three seconds at most): whether it was established.
fn connects(c: &Container, addr: &str, port: u16) -> bool {
    let script = format!("exec 3<>/dev/tcp/{addr}/{port}");
    c.exec("timeout", &["3", "bash", "-c", &script])
        .is_ok_and(|o| o.status.success())
}

#[test]
fn the_forwarder_needs_its_socket_and_drop_ins_under_the_shipped_unit_and_survives_restarts() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let mut c = Boot::new()
        .portcullis(&config())
        .unwrap()
        .prepare()
        .unwrap();
    c.client
        .ip(&["addr", "add", &format!("{SERVICE}/24"), "dev", CLIENT_IFACE])
        .unwrap();
    let mut hosts = vec![("allowed.test".to_owned(), SERVICE.to_owned())];
    hosts.extend((0..LOOKUPS).map(|i| (format!("q{i}.allowed.test"), SERVICE.to_owned())));
    hosts.push(("other.test".to_owned(), SERVICE.to_owned()));
    let hosts: Vec<(&str, &str)> = hosts
        .iter()
        .map(|(n, a)| (n.as_str(), a.as_str()))
        .collect();
    let _upstream = Dnsmasq::start(&c.client, CLIENT_V4, 300, &hosts, &[]).unwrap();
    tcp_echo_server(&c.client, sock(SERVICE, 8080)).unwrap();
    tcp_echo_server(&c.client, sock(SERVICE, 8081)).unwrap();
    c.boot(BOOT).unwrap();
    let journal = |c: &Container| c.journal("portcullis.service");

    // As shipped: no port 53 without CAP_NET_BIND_SERVICE. The status
    // says the forwarder is not running, why, and what to install; names
    // admit nothing, so the service stays unreachable.
    let st = c
        .wait_for(
            "the daemon to report its forwarder",
            Duration::from_secs(60),
            || dns_status(&c).filter(|d| d["error"].is_string()),
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", journal(&c)));
    let error = st["error"].as_str().unwrap_or_default();
    eprintln!("as shipped, the forwarder's status says: {error}");
    assert!(error.contains("portcullis-dns.socket"), "{st}");
    assert!(
        !connects(&c, SERVICE, 8080),
        "nothing resolved, yet the service is reachable"
    );

    // The documented setup: the socket unit, the service's drop-in (with
    // the upstream allowed), resolved with the forwarder as its upstream.
    let example =
        |name: &str| std::fs::read_to_string(c.host_path(&Path::new(EXAMPLES).join(name))).unwrap();
    let service_drop_in = example("portcullis-dns.conf").replace("192.0.2.53", CLIENT_V4);
    let resolved_drop_in = example("resolved-portcullis.conf");
    for (path, text) in [
        (SERVICE_DROP_IN, service_drop_in),
        (RESOLVED_DROP_IN, resolved_drop_in),
    ] {
        let p = c.host_path(Path::new(path));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    std::fs::write(
        c.host_path(Path::new("/etc/resolv.conf")),
        "nameserver 127.0.0.53\n",
    )
    .unwrap();
    c.check("systemctl", &["daemon-reload"]).unwrap();
    // Enabled, not started: systemd refuses to start a socket unit whose
    // service runs; the restart below starts it first (the drop-in's
    // Wants=/After=).
    c.check("systemctl", &["enable", "portcullis-dns.socket"])
        .unwrap_or_else(|e| panic!("{e}\n{}", c.journal("portcullis-dns.socket")));
    c.check(
        "systemctl",
        &["enable", "--now", "systemd-resolved.service"],
    )
    .unwrap();
    c.check("systemctl", &["restart", "portcullis.service"])
        .unwrap_or_else(|e| panic!("{e}\n{}", journal(&c)));
    let st = c
        .wait_for(
            "the forwarder to run on systemd's sockets",
            Duration::from_secs(60),
            || dns_status(&c).filter(|d| d["socket_activated"] == true),
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", journal(&c)));
    eprintln!("with the drop-ins: {st}");

    // Not looked up yet: dropped. Looked up through resolved: reachable at
    // once, on the rule's port only.
    assert!(!connects(&c, SERVICE, 8080), "reachable before any lookup");
    let answer = resolve(&c, "allowed.test").unwrap_or_else(|e| panic!("{e}\n{}", journal(&c)));
    assert!(answer.contains(SERVICE), "{answer}");
    assert!(
        connects(&c, SERVICE, 8080),
        "the allowed name is not reachable right after its lookup\n{}",
        journal(&c)
    );
    assert!(
        !connects(&c, SERVICE, 8081),
        "the allowed name's address is reachable on a port no rule names"
    );

    // Restarts during a stream of lookups lose none of them (systemd holds
    // the sockets; a query waits in them while the daemon restarts).
    let lookups = {
        let script = format!(
            "for i in $(seq 0 {}); do getent ahostsv4 q$i.allowed.test >/dev/null || echo LOST q$i; sleep 0.1; done; echo DONE",
            LOOKUPS - 1
        );
        c.command("bash")
            .args(["-c", &script])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    for _ in 0..2 {
        std::thread::sleep(Duration::from_millis(700));
        c.check("systemctl", &["restart", "portcullis.service"])
            .unwrap_or_else(|e| panic!("{e}\n{}", journal(&c)));
    }
    let out = lookups.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    eprintln!("lookups during two restarts: {}", out.trim());
    assert!(
        out.contains("DONE") && !out.contains("LOST"),
        "lookups lost across restarts:\n{out}\n{}",
        journal(&c)
    );
}
