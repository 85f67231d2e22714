//! Attack suite under the shipped unit file (issue 14): a Debian container
//! booted with systemd-nspawn, Portcullis installed as its hardened service
//! (`systemd/portcullis.service`), real sshd. What the namespace tests
//! cannot show, because they start the daemon by hand: the anti-lockout
//! refusal over a real SSH session (the unit's `ProtectProc=invisible` and
//! capability bounding set apply), and `[api] group` (the socket's group
//! needs a capability the unit must keep).

use std::time::Duration;

use portcullis_tests::{
    container::{Boot, Container, INSTANCE_IFACE, INSTANCE_V4, SshKey},
    is_root,
};

const BOOT: Duration = Duration::from_secs(90);
const WRITERS: &str = "pcwriters";

macro_rules! require_root {
    () => {
        if !is_root() {
            eprintln!("skipped: needs root");
            return;
        }
    };
}

fn boot(extra: &str) -> Container {
    let config = format!("interfaces = [\"{INSTANCE_IFACE}\"]\n[ssh]\nallow = true\n{extra}");
    let c = Boot::new()
        .portcullis(&config)
        .unwrap()
        .start(BOOT)
        .unwrap();
    c.wait_for("portcullis to enforce", Duration::from_secs(30), || {
        let out = c.exec("portcullis", &["--json", "status"]).ok()?;
        let s: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (s["enforcing"] == true).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", c.journal("portcullis.service")));
    c
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// An admin logged in over SSH applies a rule set that turns the SSH
/// exemption off: the daemon must see the session (through the unit's
/// `ProtectProc=invisible`) and refuse, and the session keeps working.
#[test]
fn the_anti_lockout_refusal_holds_over_a_real_ssh_session_under_the_unit() {
    require_root!();
    let key = SshKey::new().unwrap();
    let c = boot("");
    c.check(
        "portcullis",
        &["ssh", "add-key", "--user", "root", &key.public().unwrap()],
    )
    .unwrap();
    c.check(
        "sh",
        &[
            "-c",
            "echo '{\"ssh\": {\"allow\": false}}' > /root/no-ssh.json",
        ],
    )
    .unwrap();
    let over_ssh = |command: &str| {
        key.ssh(&c.client, "root", INSTANCE_V4)
            .arg(command)
            .output()
            .unwrap()
    };
    let out = over_ssh("portcullis rules apply /root/no-ssh.json");
    assert!(
        !out.status.success() && text(&out).contains("would cut your own SSH session"),
        "turning SSH off over SSH was not refused: {}\n{}",
        text(&out),
        c.journal("portcullis.service")
    );
    let out = over_ssh("portcullis --json rules get");
    assert!(
        out.status.success() && text(&out).contains("\"allow\": true"),
        "{}",
        text(&out)
    );
}

/// `[api] group`: the socket belongs to the writers' group (mode 0660) and
/// its members may change rules, under the unit's capability bounding set.
#[test]
fn the_writers_group_works_under_the_unit() {
    require_root!();
    let c = boot("");
    // The group and its member, then the configuration naming the group
    // (the daemon resolves it at start, so it restarts).
    c.check("groupadd", &[WRITERS]).unwrap();
    c.check("useradd", &["-m", "-G", WRITERS, "pcwriter"])
        .unwrap();
    c.check("useradd", &["-m", "pcother"]).unwrap();
    c.check(
        "sh",
        &[
            "-c",
            &format!(
                "printf '[api]\\ngroup = \"{WRITERS}\"\\n' >> /etc/portcullis/portcullis.toml"
            ),
        ],
    )
    .unwrap();
    c.check("systemctl", &["restart", "portcullis.service"])
        .unwrap_or_else(|e| panic!("{e}\n{}", c.journal("portcullis.service")));
    let mode = c
        .check("stat", &["-c", "%a %G", "/run/portcullis/portcullis.sock"])
        .unwrap_or_else(|e| panic!("{e}\n{}", c.journal("portcullis.service")));
    assert_eq!(mode.trim(), format!("660 {WRITERS}"), "the API socket");
    let as_user = |user: &str, args: &[&str]| {
        let mut cmd = c.command("runuser");
        cmd.args(["-u", user, "--", "portcullis"]).args(args);
        cmd.output().unwrap()
    };
    let add = [
        "rules",
        "add",
        "--id",
        "by-writer",
        "--from-port",
        "8080",
        "--to-port",
        "8080",
    ];
    let out = as_user("pcwriter", &add);
    assert!(
        out.status.success(),
        "a member of {WRITERS} could not write: {}\n{}",
        text(&out),
        c.journal("portcullis.service")
    );
    let out = as_user("pcother", &["status"]);
    assert!(
        !out.status.success(),
        "a non-member read the API: {}",
        text(&out)
    );

    // The member, logged in over SSH, turns SSH off: the daemon cannot read
    // another user's environment under ProtectProc=invisible, so the CLI
    // declares the session; the change is refused all the same.
    let key = SshKey::new().unwrap();
    c.check(
        "portcullis",
        &[
            "ssh",
            "add-key",
            "--user",
            "pcwriter",
            &key.public().unwrap(),
        ],
    )
    .unwrap();
    c.check(
        "sh",
        &[
            "-c",
            "echo '{\"ssh\": {\"allow\": false}}' > /tmp/no-ssh.json && chmod 644 /tmp/no-ssh.json",
        ],
    )
    .unwrap();
    let out = key
        .ssh(&c.client, "pcwriter", INSTANCE_V4)
        .arg("portcullis rules apply /tmp/no-ssh.json")
        .output()
        .unwrap();
    assert!(
        !out.status.success() && text(&out).contains("would cut your own SSH session"),
        "a writer turned SSH off over SSH: {}\n{}",
        text(&out),
        c.journal("portcullis.service")
    );
}

/// Opens up to `n` live event streams to the API as `user`, holds them for
/// `hold` seconds, and prints how many the daemon accepted (an HTTP 200
/// head) before it refused or stopped answering. Runs inside the container
/// (perl is in Debian's minimal base).
const STREAMS: &str = r#"
use IO::Socket::UNIX; use IO::Select;
my ($n, $hold) = @ARGV; my @open; my $ok = 0;
for (1..$n) {
  my $s = IO::Socket::UNIX->new(Peer => '/run/portcullis/portcullis.sock') or last;
  print $s "GET /v1/events?follow=true HTTP/1.1\r\nHost: portcullis\r\n\r\n";
  my $sel = IO::Select->new($s);
  last unless $sel->can_read(2);
  my $line = <$s>;
  last unless defined $line && $line =~ m{^HTTP/1\.1 200};
  $ok++; push @open, $s;
}
print "$ok\n"; STDOUT->flush; sleep $hold;
"#;

/// Any local user the reader group admits opens event streams until
/// refused, from two uids (so a higher descriptor limit alone could not
/// save the daemon); root's lockdown and status still answer, under the
/// unit's own descriptor limit.
#[test]
fn local_readers_cannot_starve_root_under_the_unit() {
    require_root!();
    let c = boot("");
    c.check("groupadd", &["pcreaders"]).unwrap();
    for user in ["pcr1", "pcr2"] {
        c.check("useradd", &["-M", "-G", "pcreaders", user])
            .unwrap();
    }
    c.check(
        "sh",
        &[
            "-c",
            "printf '[api]\\nreader_group = \"pcreaders\"\\n' >> /etc/portcullis/portcullis.toml",
        ],
    )
    .unwrap();
    c.check("systemctl", &["restart", "portcullis.service"])
        .unwrap_or_else(|e| panic!("{e}\n{}", c.journal("portcullis.service")));
    let mut holders = Vec::new();
    for user in ["pcr1", "pcr2"] {
        let mut cmd = c.command("runuser");
        cmd.args(["-u", user, "--", "perl", "-e", STREAMS, "2000", "40"])
            .stdout(std::process::Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut first = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut first).unwrap();
        let accepted: usize = first.trim().parse().unwrap_or(usize::MAX);
        eprintln!("{user}: {accepted} event streams accepted, then refused");
        assert!(accepted < 2000, "{user} was never refused");
        holders.push(child);
    }
    // Both users hold what they got; root must still be answered.
    for args in [
        &["--json", "status"][..],
        &["--json", "lockdown", "--admin", "10.200.0.0/16"][..],
        &["--json", "enforce"][..],
    ] {
        let started = std::time::Instant::now();
        let out = c
            .command("timeout")
            .arg("5")
            .arg("portcullis")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "root's {args:?} did not answer within 5 s ({:?}): {}\n{}",
            started.elapsed(),
            text(&out),
            c.journal("portcullis.service")
        );
    }
    for mut h in holders {
        let _ = h.kill();
        let _ = h.wait();
    }
}

/// A configured interface that systemd-networkd creates after the daemon
/// started (Portcullis runs before network-pre.target, so this is the
/// normal order at boot): until it exists the daemon says "not protected",
/// in `status` and in systemd's status text, and protects it the moment it
/// appears.
#[test]
fn a_netdev_networkd_creates_later_is_reported_missing_then_protected() {
    require_root!();
    const NETDEV: &str = "pcnd0";
    let config =
        format!("interfaces = [\"{INSTANCE_IFACE}\", \"{NETDEV}\"]\n[ssh]\nallow = true\n");
    let c = Boot::new()
        .portcullis(&config)
        .unwrap()
        .file(
            "/etc/systemd/network/10-pcnd0.netdev",
            format!("[NetDev]\nName={NETDEV}\nKind=veth\n[Peer]\nName=pcnd1\n"),
            0o644,
        )
        .file(
            "/etc/systemd/network/10-pcnd0.network",
            format!("[Match]\nName={NETDEV}\n[Network]\nAddress=10.200.77.1/24\n"),
            0o644,
        )
        .start(BOOT)
        .unwrap();
    let status = || -> serde_json::Value {
        c.exec("portcullis", &["--json", "status"])
            .ok()
            .and_then(|o| serde_json::from_slice(&o.stdout).ok())
            .unwrap_or_default()
    };
    let s = c
        .wait_for("portcullis to answer", Duration::from_secs(30), || {
            Some(status()).filter(|s| s["interfaces"][INSTANCE_IFACE].is_string())
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", c.journal("portcullis.service")));
    assert_eq!(s["enforcing"], false, "{s:#}");
    assert_eq!(s["missing_interfaces"][0], NETDEV, "{s:#}");
    let shown = c
        .check(
            "systemctl",
            &["show", "-p", "StatusText", "portcullis.service"],
        )
        .unwrap();
    assert!(
        shown.contains(&format!("not protected: {NETDEV} missing")),
        "{shown}"
    );
    let wait = c
        .exec("portcullis", &["wait-ready", "--timeout", "1"])
        .unwrap();
    assert!(!wait.status.success(), "{}", text(&wait));

    // networkd starts (as it would after network-pre.target) and creates it.
    c.check("systemctl", &["start", "systemd-networkd.service"])
        .unwrap();
    c.wait_for("the new netdev protected", Duration::from_secs(20), || {
        let s = status();
        (s["enforcing"] == true && s["interfaces"][NETDEV].is_string()).then_some(())
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}\n{:#}\n{}\n{}\n{}",
            status(),
            c.journal("portcullis.service"),
            c.journal("systemd-networkd.service"),
            c.check("ip", &["link"]).unwrap_or_default()
        )
    });
    let link = c.check("ip", &["-d", "link", "show", NETDEV]).unwrap();
    assert!(link.contains("xdp"), "no XDP program on {NETDEV}: {link}");
}
