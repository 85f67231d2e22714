//! SSH readiness against a real systemd, D-Bus and sshd: a Debian container
//! booted with systemd-nspawn, Portcullis installed as its service.

use std::time::{Duration, Instant};

use portcullis_tests::{
    container::{Boot, CLIENT_V4, Container, INSTANCE_IFACE, INSTANCE_V4, SshKey},
    is_root,
};
use serde_json::Value;

const BOOT: Duration = Duration::from_secs(90);

const HEALTH_PORT: u16 = 9123;

fn config(ssh: bool) -> String {
    format!(
        "interfaces = [\"{INSTANCE_IFACE}\"]\n\
         ssh = {{ allow = {ssh} }}\n\
         [readiness]\nssh_user = \"root\"\n\
         [readiness.health]\nlisten = \"0.0.0.0:{HEALTH_PORT}\"\nsources = [\"{CLIENT_V4}/32\"]\n"
    )
}

/// The health endpoint's HTTP status, asked from the client namespace.
fn health(c: &Container) -> String {
    let out = c
        .client
        .command("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "3",
        ])
        .arg(format!("http://{INSTANCE_V4}:{HEALTH_PORT}/health"))
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `portcullis status --json` inside the container.
fn status(c: &Container) -> Value {
    let out = c
        .exec("portcullis", &["--json", "status"])
        .expect("portcullis status");
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

fn check<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["readiness"]["checks"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["name"] == name))
        .unwrap_or(&Value::Null)
}

fn ready(status: &Value) -> bool {
    status["readiness"]["ready"] == true
}

#[test]
fn readiness_follows_systemd_sshd_and_the_rules() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let key = SshKey::new().unwrap();
    let stranger = SshKey::new().unwrap();
    // The unit denies IP traffic to the daemon (IPAddressDeny=any); the
    // health endpoint needs a drop-in for its clients, as docs/security.md says.
    let c = Boot::new()
        .portcullis(&config(true))
        .unwrap()
        .file(
            "/etc/systemd/system/portcullis.service.d/health.conf",
            format!("[Service]\nIPAddressAllow={CLIENT_V4}/32\n"),
            0o644,
        )
        .start(BOOT)
        .unwrap();
    let journal = || c.journal("portcullis.service");

    // Booted, enforcing, but no key yet: not ready, and it says why.
    let s = c
        .wait_for("portcullis to answer", Duration::from_secs(30), || {
            Some(status(&c))
                .filter(|s| s["enforcing"] == true && check(s, "ssh_unit")["state"] != "unknown")
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", journal()));
    assert!(!ready(&s), "{s:#}");
    assert_eq!(check(&s, "authorized_keys")["state"], "fail", "{s:#}");
    assert_eq!(
        health(&c),
        "503",
        "the health endpoint answers not ready\n{}\n{}",
        journal(),
        c.check("portcullis", &["status"]).unwrap_or_default()
    );
    assert_eq!(check(&s, "ssh_unit")["state"], "pass", "{s:#}");

    // Key injection as the CLI does it from cloud-init; then SSH-ready.
    c.check(
        "portcullis",
        &["ssh", "add-key", "--user", "root", &key.public().unwrap()],
    )
    .unwrap();
    let out = c
        .exec("portcullis", &["wait-ready", "--timeout", "30"])
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        journal()
    );
    let s = status(&c);
    for name in ["enforcing", "ssh_unit", "listening", "admitted", "key_auth"] {
        assert!(
            matches!(check(&s, name)["state"].as_str(), Some("pass" | "warn")),
            "{name}: {s:#}"
        );
    }
    // The system state is reported but never gates readiness: SSH-ready may
    // come while the boot is still `starting` (cloud-init's final stage, slow
    // units). It must reach `running` or `degraded` once the boot ends.
    assert!(
        matches!(
            s["readiness"]["system_state"].as_str(),
            Some("initializing" | "starting" | "running" | "degraded")
        ),
        "{s:#}"
    );
    c.wait_for("the boot to end", Duration::from_secs(120), || {
        let s = status(&c);
        matches!(
            s["readiness"]["system_state"].as_str(),
            Some("running" | "degraded")
        )
        .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{:#}", status(&c)));
    assert_eq!(health(&c), "200", "the health endpoint answers ready");
    // systemd sees the summary too (STATUS=).
    let shown = c
        .check(
            "systemctl",
            &["show", "-p", "StatusText", "portcullis.service"],
        )
        .unwrap();
    assert!(shown.contains("SSH-ready"), "{shown}");

    // A real ssh client logs in through the firewall with the injected key,
    // and is refused with another.
    let out = key
        .ssh(&c.client, "root", INSTANCE_V4)
        .arg("echo in-$(hostname)")
        .output()
        .unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).starts_with("in-"),
        "ssh with the key: {out:?}"
    );
    let out = stranger
        .ssh(&c.client, "root", INSTANCE_V4)
        .arg("true")
        .output()
        .unwrap();
    assert!(!out.status.success(), "ssh without the key got in: {out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "refused by sshd, not by the network: {out:?}"
    );

    // Stopping sshd's unit: not ready within seconds (the fallback poll is
    // 60 s, so this is the D-Bus signals at work; they take milliseconds,
    // the bound is for a loaded machine), naming the unit.
    c.check("systemctl", &["stop", "ssh.service"]).unwrap();
    let stopped = Instant::now();
    let s = c
        .wait_for("readiness to drop", Duration::from_secs(20), || {
            Some(status(&c)).filter(|s| check(s, "ssh_unit")["state"] == "fail")
        })
        .unwrap();
    let took = stopped.elapsed();
    eprintln!("ssh.service stop seen by readiness after {took:?}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(!ready(&s));
    let why = check(&s, "ssh_unit")["detail"].as_str().unwrap_or("");
    assert!(why.contains("ssh.service is inactive"), "{why}");
    // wait-ready times out, listing what fails.
    let out = c
        .exec("portcullis", &["wait-ready", "--timeout", "1"])
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("ssh_unit: ssh.service is inactive"), "{err}");
    assert!(
        err.contains("listening: nothing listens on TCP port 22"),
        "{err}"
    );
    c.check("systemctl", &["start", "ssh.service"]).unwrap();
    c.check("portcullis", &["wait-ready", "--timeout", "10"])
        .unwrap();

    // D-Bus going away (and coming back) changes nothing the data path
    // does: readiness says the SSH unit is unknown, then recovers by itself.
    c.check("systemctl", &["stop", "dbus.socket", "dbus.service"])
        .unwrap();
    let s = c
        .wait_for("the bus loss in readiness", Duration::from_secs(10), || {
            Some(status(&c)).filter(|s| check(s, "ssh_unit")["state"] == "unknown")
        })
        .unwrap();
    assert!(s["enforcing"] == true && !ready(&s), "{s:#}");
    c.check("systemctl", &["start", "dbus.socket", "dbus.service"])
        .unwrap();
    c.check("portcullis", &["wait-ready", "--timeout", "20"])
        .unwrap_or_else(|e| panic!("{e}\n{}", journal()));

    // A failed unit shows in status with its name (and does not gate).
    let _ = c.exec(
        "systemd-run",
        &["--unit=pct-broken.service", "--no-block", "/bin/false"],
    );
    let s = c
        .wait_for("the failed unit in status", Duration::from_secs(10), || {
            Some(status(&c)).filter(|s| {
                s["readiness"]["failed_units"]
                    .as_array()
                    .is_some_and(|u| u.iter().any(|n| n == "pct-broken.service"))
            })
        })
        .unwrap();
    assert!(ready(&s), "a failed unit elsewhere does not gate readiness");
    let text = c.check("portcullis", &["status"]).unwrap();
    assert!(
        text.lines()
            .any(|l| l.starts_with("System:") && l.contains("pct-broken.service")),
        "{text}"
    );

    // Removing the SSH exemption: not ready, because of the rules; and the
    // client is indeed cut off.
    c.check(
        "sh",
        &[
            "-c",
            "echo '{\"ssh\":{\"allow\":false}}' > /tmp/no-ssh.json",
        ],
    )
    .unwrap();
    c.check("portcullis", &["rules", "apply", "/tmp/no-ssh.json"])
        .unwrap();
    let s = status(&c);
    assert!(!ready(&s));
    assert_eq!(check(&s, "admitted")["state"], "fail", "{s:#}");
    let out = key
        .ssh(&c.client, "root", INSTANCE_V4)
        .arg("true")
        .output()
        .unwrap();
    assert!(!out.status.success(), "ssh got through without a rule");
    let _ = CLIENT_V4;
}

/// `portcullis wait-ready` as cloud-init runs it on first boot, with sshd
/// stopped: it times out, cloud-init reports the failure, and its output
/// names the failing checks.
#[test]
fn wait_ready_from_cloud_init_times_out_with_the_reason_when_sshd_is_down() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let user_data = "#cloud-config\nlocale: C.UTF-8\nruncmd:\n  - [systemctl, stop, ssh.service]\n  - [portcullis, wait-ready, --timeout, \"5\"]\n";
    let c = Boot::new()
        .portcullis(&config(true))
        .unwrap()
        .file(
            "/var/lib/cloud/seed/nocloud/meta-data",
            "instance-id: portcullis-wait-ready\n",
            0o644,
        )
        .file("/var/lib/cloud/seed/nocloud/user-data", user_data, 0o644)
        .start(BOOT)
        .unwrap();
    let status = c.exec("cloud-init", &["status", "--wait"]).unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("status: error"), "{text}");
    let log = c.check("cat", &["/var/log/cloud-init-output.log"]).unwrap();
    assert!(log.contains("not SSH-ready after 5 s"), "{log}");
    assert!(log.contains("ssh_unit: ssh.service is inactive"), "{log}");
    assert!(
        log.contains("listening: nothing listens on TCP port 22"),
        "{log}"
    );
}
