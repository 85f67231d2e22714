//! The journal of the installed service (issue 21): read as an operator's
//! tools read it (`journalctl -o json`, `journalctl -p warning`), in a Debian
//! container booted with systemd-nspawn, Portcullis running as its unit.
//! Each message carries the priority of its level, no colour codes, no
//! timestamp of its own (the journal has one) and plain values.

use std::time::Duration;

use portcullis_tests::{
    container::{Boot, Container, INSTANCE_IFACE},
    is_root,
};
use serde_json::Value;

const BOOT: Duration = Duration::from_secs(90);
const CONFIG: &str = "/etc/portcullis/portcullis.toml";

/// One journal entry of portcullis.service: (PRIORITY, MESSAGE).
fn entries(c: &Container) -> Vec<(u8, String)> {
    let out = c
        .check(
            "journalctl",
            &[
                "-b",
                "--no-pager",
                "-o",
                "json",
                "_SYSTEMD_UNIT=portcullis.service",
            ],
        )
        .unwrap();
    out.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
            // journald gives a message with control characters as bytes.
            let message = match &v["MESSAGE"] {
                Value::String(s) => s.clone(),
                Value::Array(bytes) => String::from_utf8_lossy(
                    &bytes
                        .iter()
                        .map(|b| b.as_u64().unwrap_or(0) as u8)
                        .collect::<Vec<u8>>(),
                )
                .into_owned(),
                other => panic!("MESSAGE {other} in {l}"),
            };
            let priority = v["PRIORITY"]
                .as_str()
                .and_then(|p| p.parse().ok())
                .unwrap_or_else(|| panic!("no PRIORITY in {l}"));
            (priority, message)
        })
        .collect()
}

/// The entries whose message contains `text`, waiting up to 10 s for one.
fn find(c: &Container, text: &str) -> Vec<(u8, String)> {
    c.wait_for(
        &format!("a journal entry with {text:?}"),
        Duration::from_secs(10),
        || {
            let found: Vec<_> = entries(c)
                .into_iter()
                .filter(|(_, m)| m.contains(text))
                .collect();
            (!found.is_empty()).then_some(found)
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", c.journal("portcullis.service")))
}

fn assert_priority(c: &Container, text: &str, want: u8) {
    for (priority, message) in find(c, text) {
        assert_eq!(priority, want, "PRIORITY of {message:?}");
    }
}

/// A timestamp as log formats write one (an RFC 3339 date, or a time of
/// day as in syslog's "Nov 30 09:32:45").
fn has_timestamp(m: &str) -> bool {
    let b = m.as_bytes();
    let digits = |at: usize, n: usize| {
        b.get(at..at + n)
            .is_some_and(|s| s.iter().all(u8::is_ascii_digit))
    };
    (0..b.len()).any(|i| {
        (digits(i, 4)
            && b.get(i + 4) == Some(&b'-')
            && digits(i + 5, 2)
            && b.get(i + 7) == Some(&b'-'))
            || (digits(i, 2)
                && b.get(i + 2) == Some(&b':')
                && digits(i + 3, 2)
                && b.get(i + 5) == Some(&b':')
                && digits(i + 6, 2))
    })
}

#[test]
fn the_journal_has_priorities_and_plain_messages() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    // `[readiness] ssh_port` is deprecated: a warning at every start.
    let config = format!(
        "interfaces = [\"{INSTANCE_IFACE}\"]\n[ssh]\nallow = true\n[readiness]\nssh_port = 22\n"
    );
    let c = Boot::new()
        .portcullis(&config)
        .unwrap()
        .start(BOOT)
        .unwrap();
    // Info: enforcing, and a change through the API (it names the caller's
    // pid, which used to read `pid=Some(263)`).
    assert_priority(&c, "enforcing", 6);
    let request = r#"
import socket, sys
body = b'{"id": "web", "from_port": 8080, "to_port": 8080, "ip_ranges": []}'
s = socket.socket(socket.AF_UNIX)
s.connect("/run/portcullis/portcullis.sock")
s.sendall(b"POST /v1/rules/ingress HTTP/1.1\r\nHost: portcullis\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
reply = s.recv(65536).decode()
print(reply)
sys.exit(0 if reply.split()[1].startswith("2") else 1)
"#;
    c.check("python3", &["-c", request])
        .unwrap_or_else(|e| panic!("{e}\n{}", c.journal("portcullis.service")));
    assert_priority(&c, "change applied", 6);
    // Warning: the deprecated key.
    assert_priority(&c, "ssh_port is deprecated", 4);
    // Error: a reload of a config that cannot be used.
    std::fs::write(
        c.host_path(std::path::Path::new(CONFIG)),
        format!("{config}[[ingress_rules]]\nid = \"x\"\nfrom_port = 5\nto_port = 4\n"),
    )
    .unwrap();
    let _ = c.systemctl(&["reload", "portcullis.service"]).unwrap();
    assert_priority(&c, "reload refused", 3);
    // `journalctl -p warning` finds the warning and the error, not the rest.
    let important = c
        .check(
            "journalctl",
            &[
                "-b",
                "--no-pager",
                "-o",
                "cat",
                "-p",
                "warning",
                "-u",
                "portcullis.service",
            ],
        )
        .unwrap();
    assert!(
        important.contains("ssh_port is deprecated") && important.contains("reload refused"),
        "{important}"
    );
    assert!(!important.contains("change applied"), "{important}");

    let all = entries(&c);
    assert!(all.len() >= 4, "{all:?}");
    for (priority, message) in &all {
        assert!(
            !message.contains('\u{1b}'),
            "an escape code in {message:?} (PRIORITY {priority})"
        );
        let head: String = message.chars().take(40).collect();
        assert!(!has_timestamp(&head), "a second timestamp in {message:?}");
        assert!(
            !message.contains("Some(") && !message.contains("=None"),
            "debug formatting in {message:?}"
        );
        // The level is the priority; the text does not repeat it.
        for level in ["ERROR ", "WARN ", "INFO ", "DEBUG "] {
            assert!(
                !message.trim_start().starts_with(level),
                "the level repeated in {message:?}"
            );
        }
    }
}

/// The drop records (`MESSAGE_ID` of `portcullis::droplog`), as JSON.
fn drop_records(c: &Container) -> Vec<Value> {
    let out = c
        .check(
            "journalctl",
            &[
                "-b",
                "--no-pager",
                "-o",
                "json",
                &format!("MESSAGE_ID={}", portcullis::droplog::MESSAGE_ID),
            ],
        )
        .unwrap();
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// Issue 19: drops of the selected reasons reach the real journal as
/// structured records with their fields; other reasons do not; under a
/// flood the rate limit holds and what it held back is reported.
#[test]
fn drops_reach_the_journal_as_structured_rate_limited_records() {
    use portcullis_tests::{
        container::{CLIENT_V4, INSTANCE_V4},
        ping, sock, tcp_probe, udp_send,
    };
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    const RATE: u64 = 5;
    let config = format!(
        "interfaces = [\"{INSTANCE_IFACE}\"]\n[ssh]\nallow = true\n\
         [drop_log]\nreasons = [\"drop_no_rule\", \"drop_denied\"]\nper_second = {RATE}\n"
    );
    let c = Boot::new()
        .portcullis(&config)
        .unwrap()
        .start(BOOT)
        .unwrap();
    find(&c, "enforcing");
    // One TCP connection attempt to a port no rule admits.
    assert!(tcp_probe(&c.client, sock(INSTANCE_V4, 8081)).is_err());
    let record = c
        .wait_for("a drop record", Duration::from_secs(10), || {
            drop_records(&c)
                .into_iter()
                .find(|r| r["PORTCULLIS_DESTINATION_PORT"] == "8081")
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", c.journal("portcullis.service")));
    for (field, want) in [
        ("PORTCULLIS_REASON", "drop_no_rule"),
        ("PORTCULLIS_DIRECTION", "ingress"),
        ("PORTCULLIS_INTERFACE", INSTANCE_IFACE),
        ("PORTCULLIS_PROTOCOL", "tcp"),
        ("PORTCULLIS_SOURCE", CLIENT_V4),
        ("PORTCULLIS_DESTINATION", INSTANCE_V4),
        ("PRIORITY", "5"),
        ("_SYSTEMD_UNIT", "portcullis.service"),
    ] {
        assert_eq!(record[field], want, "{field} in {record}");
    }
    assert!(
        record["PORTCULLIS_SOURCE_PORT"]
            .as_str()
            .is_some_and(|p| p.parse::<u16>().is_ok())
    );
    assert!(
        record["MESSAGE"]
            .as_str()
            .unwrap()
            .contains("dropped (drop_no_rule): ingress tcp"),
        "{record}"
    );
    // A drop of a reason not selected (an unadmitted ping: drop_icmp) is not logged.
    assert!(!ping(&c.client, INSTANCE_V4));
    // A flood: datagrams to a port no rule admits, for about 3 s.
    let before = drop_records(&c).len();
    let start = std::time::Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < Duration::from_secs(3) {
        for _ in 0..50 {
            udp_send(&c.client, sock(INSTANCE_V4, 9999), b"flood").unwrap();
            sent += 1;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_secs(1));
    let elapsed = start.elapsed().as_secs();
    let records = drop_records(&c);
    let during = records.len() - before;
    eprintln!(
        "flood: {sent} datagrams in {elapsed} s; {during} drop records (limit {RATE}/s, burst {RATE})"
    );
    assert!(during >= 1, "the flood left no record");
    assert!(
        during as u64 <= RATE * (elapsed + 1) + RATE,
        "{during} records for {elapsed} s at {RATE}/s"
    );
    assert!(
        records
            .iter()
            .all(|r| r["PORTCULLIS_REASON"] == "drop_no_rule"),
        "only the selected reason is logged: {records:?}"
    );
    // What the limit held back is reported.
    find(&c, "drop record(s) held back by [drop_log] per_second = 5");
    // A banned source: the record names the set.
    c.check("portcullis", &["deny", "add", "intruders", CLIENT_V4])
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert!(tcp_probe(&c.client, sock(INSTANCE_V4, 22)).is_err());
    let denied = c
        .wait_for("a drop_denied record", Duration::from_secs(10), || {
            drop_records(&c)
                .into_iter()
                .find(|r| r["PORTCULLIS_REASON"] == "drop_denied")
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", c.journal("portcullis.service")));
    assert_eq!(denied["PORTCULLIS_SET"], "intruders", "{denied}");
    assert_eq!(denied["PORTCULLIS_DESTINATION_PORT"], "22", "{denied}");
}
