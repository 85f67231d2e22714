//! Boot without the data path: when the eBPF programs cannot load, the host
//! must not come up silently open. A container whose seccomp filter refuses
//! bpf(2) stands in for an old kernel or a verifier refusal.

use std::time::Duration;

use portcullis_tests::{
    TcpServer,
    container::{Boot, Container, INSTANCE_IFACE, INSTANCE_V4},
    is_root, sock, tcp_probe,
};

fn boot(fallback: &str) -> Container {
    let config = format!(
        "interfaces = [\"{INSTANCE_IFACE}\"]\nfallback = \"{fallback}\"\nssh = {{ allow = true }}\n"
    );
    Boot::new()
        .without_bpf()
        .portcullis(&config)
        .unwrap()
        .start(Duration::from_secs(90))
        .unwrap()
}

/// Waits until systemd gave up restarting the service.
fn wait_failed(c: &Container) -> String {
    c.wait_for(
        "portcullis.service to fail",
        Duration::from_secs(30),
        || {
            let out = c.systemctl(&["is-failed", "portcullis.service"]).ok()?;
            let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
            (state == "failed").then_some(state)
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", c.journal("portcullis.service")))
}

#[test]
fn without_the_data_path_the_service_fails_loudly_and_the_fallback_denies_inbound() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let c = boot("nftables");
    wait_failed(&c);
    let journal = c.journal("portcullis.service");
    assert!(
        journal.contains("enforcement cannot start: the host is NOT protected"),
        "{journal}"
    );
    assert!(journal.contains("nftables fallback in place"), "{journal}");
    assert_eq!(c.system_state(), "degraded");
    // Readiness is false: there is no daemon to say otherwise.
    let out = c
        .exec("portcullis", &["wait-ready", "--timeout", "1"])
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    // The fallback: a listener on a port nothing admits is unreachable, SSH
    // is reachable, and the instance's own outbound flows get their replies.
    let _denied = TcpServer::start(&c.instance, sock("0.0.0.0", 9999)).unwrap();
    assert!(tcp_probe(&c.client, sock(INSTANCE_V4, 9999)).is_err());
    assert!(tcp_probe(&c.client, sock(INSTANCE_V4, 22)).is_ok());
    let table = c
        .check("nft", &["list", "table", "inet", "portcullis_fallback"])
        .unwrap();
    assert!(table.contains("policy drop"), "{table}");
}

#[test]
fn without_the_data_path_and_no_fallback_the_service_fails_loudly() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let c = boot("none");
    wait_failed(&c);
    let journal = c.journal("portcullis.service");
    assert!(
        journal.contains("enforcement cannot start: the host is NOT protected"),
        "{journal}"
    );
    assert!(!journal.contains("nftables fallback in place"), "{journal}");
    assert_eq!(c.system_state(), "degraded");
    let status = c
        .check(
            "systemctl",
            &["show", "-p", "StatusText", "portcullis.service"],
        )
        .unwrap_or_default();
    eprintln!("{}", status.trim());
    // As documented: nothing filters (the open port is reachable).
    let _open = TcpServer::start(&c.instance, sock("0.0.0.0", 9999)).unwrap();
    assert!(tcp_probe(&c.client, sock(INSTANCE_V4, 9999)).is_ok());
}
