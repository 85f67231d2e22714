//! The bootstrap filter (`ebpf/src/bootstrap.rs`): on a fresh start the
//! daemon attaches it to each interface before the full programs are
//! verified, and the full program replaces it under the same link.
//!
//! - it only narrows: over the same frames (essentials, near misses, and
//!   thousands of mutations of them), whatever it passes the full ingress
//!   program passes too, in the full program's narrowest state (no rules,
//!   no flows, no DHCP request seen);
//! - a real daemon on a fresh start: the interface carries the bootstrap
//!   first (new inbound TCP to an admitted port is dropped, ARP and
//!   neighbour discovery work), then the full program under the same link
//!   (the rules apply);
//! - a crash in the bootstrap window leaves the bootstrap in place, and
//!   the next start replaces it.
//!
//! The window is made observable with `PORTCULLIS_TEST_DELAY_FULL_LOAD_MS`
//! (debug builds only; it only delays the full load).

use std::time::{Duration, Instant};

use portcullis::{
    compile::Limits,
    dataplane::{BOOTSTRAP, BOOTSTRAP_SINGLE, Bootstrap, Dataplane, Program},
    model::XdpProgram,
};
use portcullis_tests::{packet::*, *};

const XDP_PASS: u32 = 2;
const LISTED: u16 = 8080;
const UNLISTED: u16 = 9090;
const RULES: &str =
    "[[ingress_rules]]\nid = \"app\"\nfrom_port = 8080\nto_port = 8080\nip_ranges = []\n";
/// The full program as the kernel names it (15 characters).
const FULL: &str = "portcullis_ingr";

const P4: &str = "10.200.0.2";
const H4: &str = "10.200.0.1";
const P6: &str = "fd00:200::2";
const H6: &str = "fd00:200::1";

fn with_ethertype(mut f: Vec<u8>, at: usize, ethertype: u16) -> Vec<u8> {
    f[at..at + 2].copy_from_slice(&ethertype.to_be_bytes());
    f
}

/// Frames at and around what the bootstrap passes.
fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let arp = with_ethertype(Pkt::new(P4, H4).udp(1, 2).bytes(), 12, 0x0806);
    out.push(("arp".into(), arp.clone()));
    let tagged = with_ethertype(Pkt::new(P4, H4).vlan(7).udp(1, 2).bytes(), 16, 0x0806);
    out.push(("arp, one VLAN tag".into(), tagged));
    let stacked = with_ethertype(
        Pkt::new(P4, H4).vlan(7).vlan(8).udp(1, 2).bytes(),
        20,
        0x0806,
    );
    out.push(("arp, two VLAN tags".into(), stacked));
    out.push(("arp, 14 bytes".into(), arp[..14].to_vec()));
    for kind in 128..=140u8 {
        for hop in [255u8, 254, 64] {
            let nd = Pkt::new(P6, H6).ttl(hop).icmp(kind, 0, 0, &[0; 16]);
            out.push((format!("icmpv6 {kind} hop {hop}"), nd.bytes()));
            out.push((
                format!("icmpv6 {kind} hop {hop}, VLAN"),
                nd.clone().vlan(3).bytes(),
            ));
        }
    }
    let ns = Pkt::new(P6, H6).ttl(255).icmp(135, 0, 0, &[0; 16]);
    out.push((
        "neighbour solicitation after hop-by-hop".into(),
        ns.clone().ext(HOPOPTS, 0).bytes(),
    ));
    let mut short = ns.bytes();
    short[18..20].copy_from_slice(&4u16.to_be_bytes());
    out.push(("neighbour solicitation, payload length 4".into(), short));
    let mut long = ns.bytes();
    long[18..20].copy_from_slice(&4000u16.to_be_bytes());
    out.push(("neighbour solicitation, payload length 4000".into(), long));
    let whole = ns.bytes();
    out.push((
        "neighbour solicitation, cut in its ICMPv6 header".into(),
        whole[..14 + 40 + 4].to_vec(),
    ));
    let mut v4 = ns.bytes();
    v4[14] = 0x40;
    out.push(("neighbour solicitation, version 4".into(), v4));
    let mut ipv4_ethertype = ns.bytes();
    ipv4_ethertype[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    out.push((
        "neighbour solicitation under ethertype IPv4".into(),
        ipv4_ethertype,
    ));
    for (name, pkt) in [
        ("tcp syn 22", Pkt::new(P4, H4).tcp(40000, 22, SYN)),
        ("tcp syn 8080", Pkt::new(P4, H4).tcp(40000, LISTED, SYN)),
        ("tcp syn 22 v6", Pkt::new(P6, H6).tcp(40000, 22, SYN)),
        ("tcp ack", Pkt::new(P4, H4).tcp(443, 40000, ACK)),
        ("dhcpv4 reply", Pkt::new(P4, H4).udp(67, 68)),
        ("dhcpv6 reply", Pkt::new(P6, H6).udp(547, 546)),
        ("dns reply", Pkt::new(P4, H4).udp(53, 40000)),
        ("icmp echo", Pkt::new(P4, H4).icmp(8, 0, 1, &[0; 8])),
        (
            "icmpv6 echo hop 255",
            Pkt::new(P6, H6).ttl(255).icmp(128, 0, 1, &[0; 8]),
        ),
    ] {
        out.push((name.into(), pkt.bytes()));
    }
    out
}

/// Deterministic mutations of the seeds: a few bytes of each changed,
/// biased to the headers the two programs read.
fn mutations(seeds: &[(String, Vec<u8>)], per_seed: usize) -> Vec<(String, Vec<u8>)> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut out = Vec::new();
    for (name, frame) in seeds {
        for i in 0..per_seed {
            let mut f = frame.clone();
            for _ in 0..1 + next() % 3 {
                let at = (next() as usize) % f.len().min(80);
                f[at] = next() as u8;
            }
            if next() % 8 == 0 {
                let cut = 14 + (next() as usize) % (f.len() - 13);
                f.truncate(cut);
            }
            out.push((format!("{name}, mutation {i}"), f));
        }
    }
    out
}

/// Whatever the bootstrap passes, the full ingress program passes too
/// (each variant against its own: multi- and single-buffer).
#[test]
fn bootstrap_passes_a_subset_of_the_full_program() {
    for (choice, name) in [
        (XdpProgram::Frags, BOOTSTRAP),
        (XdpProgram::SingleBuffer, BOOTSTRAP_SINGLE),
    ] {
        let pins = PinDir::new().unwrap();
        let mut full = Dataplane::load_with(pins.path(), 4096, &Limits::default(), choice).unwrap();
        let mut boot = Bootstrap::load(choice).unwrap();
        assert_eq!(boot.program(), name);
        subset(&mut boot, &mut full);
    }
}

fn subset(boot: &mut Bootstrap, full: &mut Dataplane) {
    let seeds = seeds();
    let mut frames = seeds.clone();
    frames.extend(mutations(&seeds, 60));
    let (mut passed, mut checked) = (Vec::new(), 0);
    for (name, frame) in &frames {
        if frame.len() < 14 {
            continue;
        }
        let b = boot.test_run(frame).unwrap().retval;
        let f = full.test_run(Program::Ingress, frame, 1).unwrap().retval;
        checked += 1;
        if b == XDP_PASS {
            assert_eq!(
                f, XDP_PASS,
                "the bootstrap passes {name:?} but the full program returns {f}: {frame:02x?}"
            );
            passed.push(name.as_str());
        }
    }
    // Not trivially narrow: the essentials pass, new inbound does not.
    for must in [
        "arp",
        "arp, one VLAN tag",
        "arp, 14 bytes",
        "icmpv6 133 hop 255",
        "icmpv6 134 hop 255",
        "icmpv6 135 hop 255",
        "icmpv6 136 hop 255",
        "icmpv6 137 hop 255",
        "icmpv6 135 hop 255, VLAN",
    ] {
        assert!(passed.contains(&must), "the bootstrap drops {must}");
    }
    for never in [
        "tcp syn 22",
        "tcp syn 8080",
        "tcp syn 22 v6",
        "tcp ack",
        "dhcpv4 reply",
        "dhcpv6 reply",
        "dns reply",
        "icmp echo",
        "icmpv6 echo hop 255",
        "icmpv6 135 hop 254",
        "arp, two VLAN tags",
        "neighbour solicitation, payload length 4",
    ] {
        assert!(!passed.contains(&never), "the bootstrap passes {never}");
    }
    eprintln!(
        "{checked} frames, {} passed by the bootstrap, all passed by the full program",
        passed.len()
    );
}

/// The bootstrap variant the daemon loads (the harness may force the
/// single-buffer programs: `PORTCULLIS_TEST_XDP_PROGRAM`).
fn bootstrap_name() -> &'static str {
    match std::env::var("PORTCULLIS_TEST_XDP_PROGRAM").as_deref() {
        Ok("single-buffer") => BOOTSTRAP_SINGLE,
        _ => BOOTSTRAP,
    }
}

/// The name of the program the pinned XDP link of `HOST_IFACE` runs, and
/// the link's id.
fn pinned_program(pins: &PinDir) -> (u32, String) {
    let (link, prog) = pins.xdp_link(HOST_IFACE).expect("a pinned XDP link");
    let name = aya::programs::loaded_programs()
        .flatten()
        .find(|p| p.id() == prog)
        .and_then(|p| p.name_as_str().map(str::to_owned))
        .unwrap_or_default();
    (link, name)
}

fn wait_for_log(d: &Daemon, what: &str, secs: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let log = d.log();
        if log.contains(what) {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "no {what:?} in the log after {secs} s:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct Env {
    config: ConfigFile,
    pins: PinDir,
    pair: Pair,
}

impl Env {
    fn new() -> Self {
        let pair = Pair::new().unwrap();
        let pins = PinDir::new().unwrap();
        let config = config(&pins, false, RULES).unwrap();
        for port in [LISTED, UNLISTED] {
            TcpServer::start(&pair.host, sock(HOST_V4, port)).unwrap();
            TcpServer::start(&pair.host, sock(HOST_V6, port)).unwrap();
        }
        // Reachable before any filter, so a later timeout is the filter's.
        tcp_probe_control(&pair.peer, sock(HOST_V4, LISTED)).unwrap();
        tcp_probe_control(&pair.peer, sock(HOST_V6, LISTED)).unwrap();
        pair.flush_neighbours().unwrap();
        Env { config, pins, pair }
    }

    /// Spawns the daemon with the full load delayed; returns once the
    /// bootstrap is attached.
    fn spawn_in_window(&self) -> Daemon {
        let d = Daemon::spawn(
            &self.pair.host,
            &self.config,
            &[("PORTCULLIS_TEST_DELAY_FULL_LOAD_MS", "6000")],
        )
        .unwrap();
        wait_for_log(&d, "bootstrap enforcing", 15);
        d
    }

    /// In the bootstrap window: new inbound TCP is dropped, even to the
    /// admitted port; ARP and neighbour discovery work.
    fn check_bootstrap_window(&self) -> u32 {
        let (link, program) = pinned_program(&self.pins);
        assert_eq!(program, bootstrap_name(), "the interface runs {program:?}");
        for addr in [HOST_V4, HOST_V6] {
            let r = tcp_probe(&self.pair.peer, sock(addr, LISTED));
            assert!(
                matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::TimedOut),
                "new TCP to [{addr}]:{LISTED} during the bootstrap window: {r:?}"
            );
            let state = self.pair.peer_neighbour_state(addr).unwrap();
            assert!(
                matches!(state.as_str(), "REACHABLE" | "STALE" | "DELAY" | "PROBE"),
                "neighbour {addr} is {state} during the bootstrap window: ARP/ND dropped"
            );
        }
        // Whoever asks is told it is the bootstrap, not the rules.
        let pin_dir = self.pins.path().to_str().unwrap();
        let out = cli(&self.config, &["status", "--pin-dir", pin_dir]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains(&format!("Bootstrap:   {HOST_IFACE}:"))
                && !text.contains("enforcement pinned"),
            "status during the bootstrap window:\n{text}"
        );
        link
    }

    /// After the full program replaced the bootstrap under link `link`.
    fn check_full(&self, link: u32) {
        let (now, program) = pinned_program(&self.pins);
        assert_eq!(program, FULL, "the interface runs {program:?}");
        assert_eq!(now, link, "the full program came under a new link");
        for addr in [HOST_V4, HOST_V6] {
            tcp_probe(&self.pair.peer, sock(addr, LISTED))
                .unwrap_or_else(|e| panic!("[{addr}]:{LISTED} admitted by the rules: {e}"));
            assert!(
                tcp_probe(&self.pair.peer, sock(addr, UNLISTED)).is_err(),
                "[{addr}]:{UNLISTED} admitted though no rule lists it"
            );
        }
    }
}

#[test]
fn fresh_start_enforces_the_bootstrap_then_the_full_program() {
    let env = Env::new();
    let d = env.spawn_in_window();
    let link = env.check_bootstrap_window();
    let log = wait_for_log(&d, " ready", 30);
    let boot_at = log.find("bootstrap enforcing").unwrap();
    let full_at = log
        .find("replaced_bootstrap=true")
        .unwrap_or_else(|| panic!("no enforcing line replacing the bootstrap:\n{log}"));
    assert!(
        boot_at < full_at,
        "bootstrap after the full program:\n{log}"
    );
    env.check_full(link);
    drop(d);
}

#[test]
fn a_crash_in_the_bootstrap_window_leaves_the_bootstrap() {
    let env = Env::new();
    let d = env.spawn_in_window();
    let link = env.check_bootstrap_window();
    d.kill();
    // Still the bootstrap, under the pinned link: closed, not open.
    assert_eq!(env.check_bootstrap_window(), link);
    let d = Daemon::start(&env.pair.host, &env.config).unwrap();
    env.check_full(link);
    drop(d);
}

/// A map pinned where the daemon's `ACTIVE` goes, of the wrong type: the
/// full load fails after the bootstrap is attached.
fn spoil_maps(pins: &PinDir) {
    let dir = portcullis::dataplane::maps_dir(pins.path());
    std::fs::create_dir_all(&dir).unwrap();
    run(std::process::Command::new("bpftool")
        .args(["map", "create"])
        .arg(dir.join("ACTIVE"))
        .args([
            "type", "hash", "key", "4", "value", "4", "entries", "1", "name", "ACTIVE",
        ]))
    .unwrap();
}

/// The capabilities systemd/portcullis.service leaves the daemon
/// (`CapabilityBoundingSet=`), as `setpriv` arguments: no CAP_SYS_ADMIN, so
/// no enumeration of the kernel's programs (`BPF_PROG_GET_NEXT_ID`).
const UNIT_CAPS: [&str; 3] = [
    "--bounding-set=-all,+bpf,+net_admin,+perfmon,+dac_read_search,+chown",
    "--inh-caps=-all",
    "--",
];

/// `program` in `ns` (or the host's network when `None`) under the unit's
/// capabilities; checks first that they really lack CAP_SYS_ADMIN.
fn unit_caps(ns: Option<&Netns>, program: impl AsRef<std::ffi::OsStr>) -> std::process::Command {
    let out = std::process::Command::new("setpriv")
        .args(UNIT_CAPS)
        .args(["sh", "-c", "grep CapEff /proc/self/status"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let eff = u64::from_str_radix(text.trim().trim_start_matches("CapEff:").trim(), 16)
        .unwrap_or_else(|e| panic!("CapEff under setpriv: {text:?}: {e}"));
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_BPF: u32 = 39;
    assert!(
        eff & (1 << CAP_SYS_ADMIN) == 0 && eff & (1 << CAP_BPF) != 0,
        "setpriv did not give the unit's capabilities: CapEff {eff:x}"
    );
    let mut cmd = match ns {
        Some(ns) => ns.command("setpriv"),
        None => std::process::Command::new("setpriv"),
    };
    cmd.args(UNIT_CAPS).arg(program);
    cmd
}

/// Runs the daemon on `config` in `ns` under the unit's capabilities until
/// it exits (at most 20 s); its status and log.
fn failed_start_with_unit_caps(
    ns: &Netns,
    config: &ConfigFile,
) -> (std::process::ExitStatus, String) {
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut child = config
        .daemon_args(&mut unit_caps(
            Some(ns),
            workspace_bin("portcullisd").unwrap(),
        ))
        .stdout(std::process::Stdio::null())
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "portcullisd still runs after 20 s:\n{}",
                std::fs::read_to_string(log.path()).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status, std::fs::read_to_string(log.path()).unwrap())
}

/// `portcullis status --pin-dir` without a daemon, under the unit's
/// capabilities.
fn status_with_unit_caps(config: &ConfigFile, pins: &PinDir) -> String {
    let out = unit_caps(None, workspace_bin("portcullis").unwrap())
        .arg("--socket")
        .arg(config.socket())
        .args(["status", "--pin-dir"])
        .arg(pins.path())
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `portcullis status --pin-dir` without a daemon, as root without any
/// capability, and as nobody: it cannot tell what the pinned link runs.
fn status_unprivileged(config: &ConfigFile, pins: &PinDir) -> Vec<String> {
    let as_root = ["--bounding-set=-all", "--inh-caps=-all", "--"];
    let as_nobody = [
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--bounding-set=-all",
        "--inh-caps=-all",
        "--",
    ];
    [&as_root[..], &as_nobody[..]]
        .iter()
        .map(|args| {
            let out = std::process::Command::new("setpriv")
                .args(*args)
                .arg(workspace_bin("portcullis").unwrap())
                .arg("--socket")
                .arg(config.socket())
                .args(["status", "--pin-dir"])
                .arg(pins.path())
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
        .collect()
}

/// A start that fails after the bootstrap went on: with the nftables
/// fallback in place the bootstrap goes, so the fallback's SSH exemption
/// reaches the host (as before the bootstrap existed); without a fallback
/// it stays (closed).
#[test]
fn a_failed_start_hands_the_bootstrap_over_to_the_fallback_only() {
    for fallback in ["nftables", "none"] {
        let pair = Pair::new().unwrap();
        let pins = PinDir::new().unwrap();
        let config = ConfigFile::new(&config_text(
            &pins,
            &format!("fallback = \"{fallback}\"\n[ssh]\nallow = true\n{RULES}"),
        ))
        .unwrap();
        for port in [22, LISTED] {
            TcpServer::start(&pair.host, sock(HOST_V4, port)).unwrap();
        }
        tcp_probe_control(&pair.peer, sock(HOST_V4, 22)).unwrap();
        spoil_maps(&pins);
        // Under the shipped unit's capabilities (no CAP_SYS_ADMIN).
        let (status, log) = failed_start_with_unit_caps(&pair.host, &config);
        assert!(!status.success(), "{log}");
        assert!(log.contains("bootstrap enforcing"), "{log}");
        assert!(log.contains("enforcement cannot start"), "{log}");
        let ssh = tcp_probe(&pair.peer, sock(HOST_V4, 22));
        let app = tcp_probe(&pair.peer, sock(HOST_V4, LISTED));
        assert!(
            app.is_err(),
            "fallback {fallback}: [{HOST_V4}]:{LISTED} reachable"
        );
        if fallback == "nftables" {
            assert!(log.contains("bootstrap filter removed"), "{log}");
            assert!(pins.xdp_link(HOST_IFACE).is_err(), "a link is still pinned");
            ssh.unwrap_or_else(|e| panic!("SSH under the fallback: {e}\n{log}"));
        } else {
            assert!(!log.contains("bootstrap filter removed"), "{log}");
            assert_eq!(pinned_program(&pins).1, bootstrap_name());
            assert!(ssh.is_err(), "SSH reachable with the bootstrap in place");
            // What is said is what is true: closed but for ARP/ND, not open.
            assert!(
                log.contains(&format!(
                    "the bootstrap filter on {HOST_IFACE} passes only ARP and neighbour discovery"
                )) && !log.contains("the host is OPEN"),
                "{log}"
            );
            // Status, without a daemon and CAP_SYS_ADMIN, names the
            // bootstrap and does not claim the rules.
            let text = status_with_unit_caps(&config, &pins);
            assert!(
                text.contains(&format!("Bootstrap:   {HOST_IFACE}:"))
                    && text.contains("Protected:   NO (bootstrap filter only)")
                    && !text.contains("enforcement pinned"),
                "status with the bootstrap left:\n{text}"
            );
            // Without the means to tell, it says so: never the last rules.
            for text in status_unprivileged(&config, &pins) {
                assert!(
                    text.contains("Unknown:") && !text.contains("enforcement pinned"),
                    "unprivileged status with the bootstrap left:\n{text}"
                );
            }
        }
    }
}

/// A bootstrap left on an interface that is then taken out of the
/// configuration (a crash in the window, then a new configuration) goes
/// once the next start enforces: it would hold that interface closed, and
/// a link pinned under a name no longer configured is never replaced.
#[test]
fn a_bootstrap_on_an_interface_no_longer_configured_goes() {
    const EXTRA: &str = "pcd0";
    let pair = Pair::new().unwrap();
    veth(&pair.host, EXTRA, &pair.host, "pcd1").unwrap();
    let pins = PinDir::new().unwrap();
    let text = |interfaces: &str| {
        format!(
            "interfaces = [{interfaces}]\npin_dir = \"{}\"\n[ssh]\nallow = false\n{RULES}",
            pins.path().display()
        )
    };
    let config = ConfigFile::new(&text(&format!("\"{HOST_IFACE}\", \"{EXTRA}\""))).unwrap();
    let d = Daemon::spawn(
        &pair.host,
        &config,
        &[("PORTCULLIS_TEST_DELAY_FULL_LOAD_MS", "6000")],
    )
    .unwrap();
    wait_for_log(&d, &format!("bootstrap enforcing interface={EXTRA}"), 15);
    d.kill();
    let (_, prog) = pins
        .xdp_link(EXTRA)
        .expect("the bootstrap pinned on the extra");
    let name = aya::programs::loaded_programs()
        .flatten()
        .find(|p| p.id() == prog)
        .and_then(|p| p.name_as_str().map(str::to_owned));
    assert_eq!(name.as_deref(), Some(bootstrap_name()));
    config.rewrite(&text(&format!("\"{HOST_IFACE}\""))).unwrap();
    let d = Daemon::start(&pair.host, &config).unwrap();
    let log = d.log();
    assert!(
        log.contains("bootstrap filter removed from interfaces that are not targets")
            && log.contains(&format!("interfaces={EXTRA}")),
        "{log}"
    );
    assert!(
        pins.xdp_link(EXTRA).is_err(),
        "the bootstrap link of {EXTRA} is still pinned"
    );
    let shown = pair.host.ip(&["link", "show", EXTRA]).unwrap();
    assert!(!shown.contains("xdp"), "{EXTRA} still carries XDP: {shown}");
    assert_eq!(pinned_program(&pins).1, FULL);
    drop(d);
}

/// A bootstrap left on an interface that is then renamed (the
/// configuration following the new name) is taken over by the full program
/// under the new name: the link moves with no moment unfiltered, and the
/// start does not fail on the interface being busy.
#[test]
fn a_bootstrap_on_a_renamed_interface_is_replaced_under_its_new_name() {
    const OLD: &str = "pcd0";
    const NEW: &str = "pcd2";
    let pair = Pair::new().unwrap();
    veth(&pair.host, OLD, &pair.host, "pcd1").unwrap();
    let pins = PinDir::new().unwrap();
    let text = |extra: &str| {
        format!(
            "interfaces = [\"{HOST_IFACE}\", \"{extra}\"]\npin_dir = \"{}\"\n[ssh]\nallow = false\n{RULES}",
            pins.path().display()
        )
    };
    let config = ConfigFile::new(&text(OLD)).unwrap();
    let d = Daemon::spawn(
        &pair.host,
        &config,
        &[("PORTCULLIS_TEST_DELAY_FULL_LOAD_MS", "6000")],
    )
    .unwrap();
    wait_for_log(&d, &format!("bootstrap enforcing interface={OLD}"), 15);
    d.kill();
    let (link, _) = pins.xdp_link(OLD).expect("the bootstrap pinned");
    pair.host.ip(&["link", "set", OLD, "down"]).unwrap();
    pair.host.ip(&["link", "set", OLD, "name", NEW]).unwrap();
    pair.host.ip(&["link", "set", NEW, "up"]).unwrap();
    config.rewrite(&text(NEW)).unwrap();
    let d = Daemon::start(&pair.host, &config).unwrap();
    let log = d.log();
    assert!(
        log.contains("bootstrap link of a renamed interface pinned under its new name"),
        "{log}"
    );
    let (now, prog) = pins
        .xdp_link(NEW)
        .expect("a link pinned under the new name");
    assert_eq!(now, link, "the full program came under a new link");
    let name = aya::programs::loaded_programs()
        .flatten()
        .find(|p| p.id() == prog)
        .and_then(|p| p.name_as_str().map(str::to_owned));
    assert_eq!(name.as_deref(), Some(FULL));
    assert!(pins.xdp_link(OLD).is_err(), "still pinned under {OLD}");
    drop(d);
}
