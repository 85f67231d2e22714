//! The Debian package as an image build or a provider installs it: over a
//! config written beforehand, with no terminal (`dpkg -i`, `apt-get install
//! ./file.deb`), from the conffile packaging of earlier versions, and on a
//! clean host (the documented default); then upgrade and purge. Also the
//! packaged binaries' glibc floor.
//!
//! Run by `cargo xtask e2e` (part of `cargo xtask test`), which builds the
//! packages and sets PORTCULLIS_E2E_DIR; ignored by a plain `cargo test`.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use portcullis_tests::{
    TcpServer,
    container::{Boot, Container, INSTANCE_V4},
    is_root, sock, tcp_probe, tcp_probe_control,
};

const CONFIG_PATH: &str = "/etc/portcullis/portcullis.toml";
/// The port the admin's config admits, and one nothing admits.
const ADMITTED: u16 = 8443;
const DENIED: u16 = 9999;
/// What an image build writes before installing the package.
const ADMIN_CONFIG: &str = r#"# Written by the image build, before the package is installed.
interfaces = ["eth0"]

[ssh]
allow = true

[[ingress_rules]]
id = "admitted"
from_port = 8443
to_port = 8443
ip_ranges = []
"#;
/// The oldest glibc among the supported distributions (Ubuntu 22.04: 2.35;
/// Debian 12 has 2.36, Ubuntu 24.04 2.39).
const GLIBC_FLOOR: (u32, u32) = (2, 35);
/// A clean environment, as in an image build: no terminal, no
/// DEBIAN_FRONTEND, no dpkg options.
const ENV: &[&str] = &["env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin"];

fn e2e_dir() -> PathBuf {
    PathBuf::from(std::env::var("PORTCULLIS_E2E_DIR").expect(
        "PORTCULLIS_E2E_DIR is not set: run this through `cargo xtask e2e`, which builds the packages",
    ))
}

/// The one .deb in `dir`.
fn deb_in(dir: &Path) -> PathBuf {
    let debs: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .collect();
    assert_eq!(debs.len(), 1, "one .deb in {}: {debs:?}", dir.display());
    debs.into_iter().next().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `command...` inside the container in a clean environment, stdin not a
/// terminal (`Command::output` gives it /dev/null).
fn install(c: &Container, command: &[&str]) -> Output {
    let mut argv: Vec<&str> = ENV.to_vec();
    argv.extend_from_slice(command);
    c.exec(argv[0], &argv[1..]).unwrap()
}

fn assert_success(what: &str, o: &Output, c: &Container) {
    assert!(
        o.status.success(),
        "{what} failed ({}):\n{}\njournal:\n{}",
        o.status,
        text(o),
        c.journal("portcullis.service")
    );
}

/// A container with the two package versions (and the derived older one)
/// at /srv/debs/{repo,next,legacy} and, when given, a config written before
/// boot; TCP listeners on the admitted and the denied port.
fn boot(config: Option<&str>, legacy: Option<&Path>) -> Container {
    boot_from(Boot::new(), config, legacy)
}

/// [`boot`] from `b` (e.g. a container that refuses bpf(2)).
fn boot_from(b: Boot, config: Option<&str>, legacy: Option<&Path>) -> Container {
    let dir = e2e_dir();
    let mut b = b
        .bind_ro(&dir.join("repo"), "/srv/debs/repo")
        .bind_ro(&dir.join("next"), "/srv/debs/next");
    if let Some(legacy) = legacy {
        b = b.bind_ro(legacy, "/srv/debs/legacy");
    }
    if let Some(config) = config {
        b = b.file(CONFIG_PATH, config, 0o644);
    }
    let c = b.start(Duration::from_secs(300)).unwrap();
    TcpServer::start(&c.instance, sock("0.0.0.0", ADMITTED)).unwrap();
    TcpServer::start(&c.instance, sock("0.0.0.0", DENIED)).unwrap();
    // Before any package: both answer, so "not reachable" below is the
    // firewall's doing.
    for port in [ADMITTED, DENIED] {
        tcp_probe_control(&c.client, sock(INSTANCE_V4, port))
            .unwrap_or_else(|e| panic!("port {port} before the install: {e}"));
    }
    c
}

fn in_container(dir: &str, deb: &Path) -> String {
    format!("{dir}/{}", deb.file_name().unwrap().to_string_lossy())
}

fn config_now(c: &Container) -> Option<Vec<u8>> {
    std::fs::read(c.host_path(Path::new(CONFIG_PATH))).ok()
}

/// The service is active (it notifies READY once it enforces) and the host
/// is protected with the admin's config: its port answers, another does not.
fn assert_protected_with_admin_config(c: &Container, when: &str) {
    let active = c
        .wait_for("portcullis.service active", Duration::from_secs(60), || {
            let o = c.systemctl(&["is-active", "portcullis.service"]).ok()?;
            o.status.success().then_some(())
        })
        .is_ok();
    assert!(
        active,
        "{when}: portcullis.service is not active:\n{}",
        c.journal("portcullis.service")
    );
    tcp_probe_control(&c.client, sock(INSTANCE_V4, ADMITTED)).unwrap_or_else(|e| {
        panic!(
            "{when}: the port the admin's config admits does not answer: {e}\n{}",
            c.journal("portcullis.service")
        )
    });
    assert!(
        tcp_probe(&c.client, sock(INSTANCE_V4, DENIED)).is_err(),
        "{when}: a port nothing admits answers: the host is not protected"
    );
}

fn assert_config_kept(c: &Container, want: &[u8], when: &str) {
    let now = config_now(c);
    assert!(
        now.as_deref() == Some(want),
        "{when}: {CONFIG_PATH} changed; now:\n{}",
        now.map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_else(|| "(missing)".into())
    );
}

/// Purge: the config goes, and so does the firewall (the host is open),
/// and the bpffs run-bpffs.mount mounted for the pins.
fn purge(c: &Container) {
    let o = install(c, &["dpkg", "--purge", "portcullis"]);
    assert_success("dpkg --purge", &o, c);
    assert!(config_now(c).is_none(), "{CONFIG_PATH} survived the purge");
    tcp_probe_control(&c.client, sock(INSTANCE_V4, DENIED))
        .expect("the host stays filtered after purge");
    let mounted = c.exec("mountpoint", &["-q", "/run/bpffs"]).unwrap();
    assert!(
        !mounted.status.success(),
        "/run/bpffs is still mounted after purge:\n{}{}{}",
        text(&c.exec("findmnt", &["/run/bpffs"]).unwrap()),
        text(&c.exec("ls", &["-la", "/run/bpffs"]).unwrap()),
        text(&c.systemctl(&["status", "run-bpffs.mount"]).unwrap())
    );
}

/// Issue 21: `apt remove` leaves the host filtered (a firewall does not open
/// because its package went away), says so, and prints the commands that
/// lift it, which work with no binary of the package left: here with the
/// clsact egress path, so both the pins and the tc filter are covered.
#[test]
#[ignore = "run by `cargo xtask e2e`"]
fn apt_remove_says_enforcement_stays_and_how_to_lift_it() {
    assert!(is_root(), "the package tests need root");
    let config = format!("tc_attach = \"clsact\"\n{ADMIN_CONFIG}");
    let c = boot(Some(&config), None);
    let o = install(
        &c,
        &[
            "sh",
            "-c",
            "cd /srv/debs/repo && exec apt-get install -y ./portcullis_*.deb",
        ],
    );
    assert_success("apt-get install", &o, &c);
    assert_protected_with_admin_config(&c, "after apt-get install");
    let egress = || {
        text(
            &c.exec("tc", &["filter", "show", "dev", "eth0", "egress"])
                .unwrap(),
        )
    };
    assert!(
        egress().contains("pref 49374"),
        "no clsact filter:\n{}",
        egress()
    );

    let o = install(&c, &["apt-get", "remove", "-y", "portcullis"]);
    assert_success("apt-get remove", &o, &c);
    let said = text(&o);
    eprintln!("apt-get remove said:\n{said}");
    for want in [
        "the firewall stays in force",
        "interfaces: eth0",
        "apt purge portcullis",
        "    rm -rf /run/bpffs/portcullis",
        "    tc filter del dev eth0 egress pref 49374",
    ] {
        assert!(
            said.contains(want),
            "apt-get remove did not say {want:?}:\n{said}"
        );
    }
    assert!(
        !c.host_path(Path::new("/usr/bin/portcullisd")).exists(),
        "the binary survived the removal"
    );
    assert!(
        tcp_probe(&c.client, sock(INSTANCE_V4, DENIED)).is_err(),
        "the host is open after apt remove: enforcement must stay"
    );

    // Follow it, as root, with nothing of the package left.
    let commands: Vec<&str> = said
        .lines()
        .filter_map(|l| l.strip_prefix("    "))
        .collect();
    assert_eq!(commands.len(), 2, "{said}");
    for command in commands {
        let o = c.exec("sh", &["-c", command]).unwrap();
        assert!(o.status.success(), "{command}: {}", text(&o));
    }
    tcp_probe_control(&c.client, sock(INSTANCE_V4, DENIED))
        .expect("the host is still filtered after following the removal's instructions");
    assert!(!egress().contains("pref 49374"), "{}", egress());
    let link = text(&c.exec("ip", &["link", "show", "eth0"]).unwrap());
    assert!(!link.contains("xdp"), "{link}");

    purge(&c);
}

#[test]
#[ignore = "run by `cargo xtask e2e`"]
fn dpkg_i_over_a_prewritten_config_keeps_it_protects_with_it_upgrades_and_purges() {
    assert!(is_root(), "the package tests need root");
    let dir = e2e_dir();
    let (first, next) = (deb_in(&dir.join("repo")), deb_in(&dir.join("next")));
    let c = boot(Some(ADMIN_CONFIG), None);

    let o = install(&c, &["dpkg", "-i", &in_container("/srv/debs/repo", &first)]);
    assert_success("dpkg -i over a pre-written config", &o, &c);
    assert_config_kept(&c, ADMIN_CONFIG.as_bytes(), "after dpkg -i");
    assert_protected_with_admin_config(&c, "after dpkg -i");

    let o = install(&c, &["dpkg", "-i", &in_container("/srv/debs/next", &next)]);
    assert_success("dpkg -i of the next version", &o, &c);
    assert_config_kept(&c, ADMIN_CONFIG.as_bytes(), "after the upgrade");
    assert_protected_with_admin_config(&c, "after the upgrade");

    purge(&c);
}

#[test]
#[ignore = "run by `cargo xtask e2e`"]
fn apt_get_install_of_the_file_over_a_prewritten_config_keeps_it() {
    assert!(is_root(), "the package tests need root");
    let c = boot(Some(ADMIN_CONFIG), None);
    let o = install(
        &c,
        &[
            "sh",
            "-c",
            "cd /srv/debs/repo && exec apt-get install -y ./portcullis_*.deb",
        ],
    );
    assert_success("apt-get install ./portcullis_*.deb", &o, &c);
    assert_config_kept(&c, ADMIN_CONFIG.as_bytes(), "after apt-get install");
    assert_protected_with_admin_config(&c, "after apt-get install");
    purge(&c);
}

#[test]
#[ignore = "run by `cargo xtask e2e`"]
fn a_clean_install_gets_the_documented_default_config() {
    assert!(is_root(), "the package tests need root");
    let first = deb_in(&e2e_dir().join("repo"));
    let c = boot(None, None);
    let o = install(&c, &["dpkg", "-i", &in_container("/srv/debs/repo", &first)]);
    assert_success("dpkg -i on a clean host", &o, &c);
    let default = include_bytes!("../../systemd/portcullis.toml");
    assert_config_kept(&c, default, "the default after a clean install");
    for doc in [
        "/usr/share/portcullis/portcullis.toml",
        "/usr/share/doc/portcullis/examples/portcullis.toml",
    ] {
        let got = std::fs::read(c.host_path(Path::new(doc))).unwrap_or_default();
        assert!(got == default, "{doc} is not the documented default");
    }
    let o = c.systemctl(&["is-active", "portcullis.service"]).unwrap();
    assert!(o.status.success(), "{}", c.journal("portcullis.service"));
    purge(&c);
}

/// When the data path cannot start (here: bpf(2) refused), the nftables
/// fallback filters; it stays on `apt remove` too, which names it and prints
/// the command that lifts it.
#[test]
#[ignore = "run by `cargo xtask e2e`"]
fn apt_remove_names_the_nftables_fallback_and_how_to_lift_it() {
    assert!(is_root(), "the package tests need root");
    let first = deb_in(&e2e_dir().join("repo"));
    let c = boot_from(Boot::new().without_bpf(), Some(ADMIN_CONFIG), None);
    // The service fails (loudly); the package stays installed.
    let o = install(&c, &["dpkg", "-i", &in_container("/srv/debs/repo", &first)]);
    assert_success("dpkg -i without bpf(2)", &o, &c);
    let fallback = || {
        c.exec("nft", &["list", "table", "inet", "portcullis_fallback"])
            .unwrap()
            .status
            .success()
    };
    c.wait_for("the nftables fallback", Duration::from_secs(30), || {
        fallback().then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", c.journal("portcullis.service")));
    assert!(tcp_probe(&c.client, sock(INSTANCE_V4, DENIED)).is_err());

    let o = install(&c, &["apt-get", "remove", "-y", "portcullis"]);
    assert_success("apt-get remove", &o, &c);
    let said = text(&o);
    eprintln!("apt-get remove said:\n{said}");
    for want in [
        "the firewall stays in force",
        "the nftables fallback policy keeps filtering",
        "    nft delete table inet portcullis_fallback",
    ] {
        assert!(
            said.contains(want),
            "apt-get remove did not say {want:?}:\n{said}"
        );
    }
    assert!(
        tcp_probe(&c.client, sock(INSTANCE_V4, DENIED)).is_err(),
        "the host is open after apt remove: the fallback must stay"
    );
    for command in said.lines().filter_map(|l| l.strip_prefix("    ")) {
        let o = c.exec("sh", &["-c", command]).unwrap();
        assert!(o.status.success(), "{command}: {}", text(&o));
    }
    assert!(!fallback(), "the fallback table is still there");
    tcp_probe_control(&c.client, sock(INSTANCE_V4, DENIED))
        .expect("the host is still filtered after following the removal's instructions");
    purge(&c);
}

/// The packaging of earlier versions: the same package with the default
/// config as a conffile at /etc/portcullis/portcullis.toml (and nothing in
/// /usr/share/portcullis), version `-0`.
fn conffile_package(deb: &Path, out: &Path) -> PathBuf {
    let tree = out.join("tree");
    let run = |cmd: &mut Command| {
        let o = cmd.output().unwrap();
        assert!(o.status.success(), "{cmd:?}: {}", text(&o));
    };
    run(Command::new("dpkg-deb").arg("-R").arg(deb).arg(&tree));
    std::fs::create_dir_all(tree.join("etc/portcullis")).unwrap();
    std::fs::rename(
        tree.join("usr/share/portcullis/portcullis.toml"),
        tree.join("etc/portcullis/portcullis.toml"),
    )
    .unwrap();
    std::fs::remove_dir(tree.join("usr/share/portcullis")).unwrap();
    std::fs::remove_file(tree.join("usr/share/doc/portcullis/examples/portcullis.toml")).unwrap();
    std::fs::write(tree.join("DEBIAN/conffiles"), format!("{CONFIG_PATH}\n")).unwrap();
    let md5 = tree.join("DEBIAN/md5sums");
    if let Ok(sums) = std::fs::read_to_string(&md5) {
        let kept: String = sums
            .lines()
            .filter(|l| !l.ends_with("/portcullis.toml"))
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(&md5, kept).unwrap();
    }
    let control = std::fs::read_to_string(tree.join("DEBIAN/control")).unwrap();
    let control: String = control
        .lines()
        .map(|l| match l.strip_prefix("Version: ") {
            Some(v) => format!("Version: {}-0\n", v.rsplit_once('-').map_or(v, |(b, _)| b)),
            None => format!("{l}\n"),
        })
        .collect();
    std::fs::write(tree.join("DEBIAN/control"), control).unwrap();
    let legacy = out.join("pkg");
    std::fs::create_dir_all(&legacy).unwrap();
    let built = legacy.join("portcullis_legacy.deb");
    run(Command::new("dpkg-deb")
        .args(["--root-owner-group", "-b"])
        .arg(&tree)
        .arg(&built));
    legacy
}

#[test]
#[ignore = "run by `cargo xtask e2e`"]
fn an_upgrade_from_the_conffile_packaging_keeps_the_admins_config_without_a_prompt() {
    assert!(is_root(), "the package tests need root");
    let dir = e2e_dir();
    let (first, next) = (deb_in(&dir.join("repo")), deb_in(&dir.join("next")));
    let scratch = tempfile::tempdir().unwrap();
    let legacy = conffile_package(&first, scratch.path());
    let c = boot(None, Some(&legacy));

    let o = install(
        &c,
        &["dpkg", "-i", "/srv/debs/legacy/portcullis_legacy.deb"],
    );
    assert_success("dpkg -i of the conffile packaging", &o, &c);
    let conffiles = c
        .check("dpkg-query", &["-W", "-f=${Conffiles}", "portcullis"])
        .unwrap();
    assert!(conffiles.contains(CONFIG_PATH), "{conffiles}");
    // The admin edits the conffile, reloads (the rules: a restart alone
    // keeps the saved live set) and restarts (the interfaces).
    std::fs::write(c.host_path(Path::new(CONFIG_PATH)), ADMIN_CONFIG).unwrap();
    for action in ["reload", "restart"] {
        let o = c.systemctl(&[action, "portcullis.service"]).unwrap();
        assert_success(&format!("systemctl {action}"), &o, &c);
    }
    assert_protected_with_admin_config(&c, "with the conffile packaging");

    for (deb, at) in [(&first, "/srv/debs/repo"), (&next, "/srv/debs/next")] {
        let o = install(&c, &["dpkg", "-i", &in_container(at, deb)]);
        assert_success(&format!("dpkg -i {}", deb.display()), &o, &c);
        assert_config_kept(&c, ADMIN_CONFIG.as_bytes(), "after the upgrade");
        assert_protected_with_admin_config(&c, &format!("after upgrading to {}", deb.display()));
    }
    purge(&c);
}

/// The highest `GLIBC_x.y` symbol version an ELF file needs (objdump -T).
fn glibc_needed(bin: &Path) -> (u32, u32) {
    let o = Command::new("objdump")
        .arg("-T")
        .arg(bin)
        .output()
        .expect("objdump (package binutils; cargo xtask setup installs it)");
    assert!(
        o.status.success(),
        "objdump -T {}: {}",
        bin.display(),
        text(&o)
    );
    let dump = String::from_utf8_lossy(&o.stdout);
    dump.split("GLIBC_")
        .skip(1)
        .filter_map(|rest| {
            let v: String = rest
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.')
                .collect();
            let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
            Some((parts.next()??, parts.next().flatten().unwrap_or(0)))
        })
        .max()
        .unwrap_or_else(|| panic!("{} needs no glibc symbol at all?", bin.display()))
}

#[test]
#[ignore = "run by `cargo xtask e2e`"]
fn the_packaged_binaries_need_at_most_the_oldest_supported_glibc() {
    let dir = e2e_dir();
    for deb in [deb_in(&dir.join("repo")), deb_in(&dir.join("next"))] {
        let tree = tempfile::tempdir().unwrap();
        let o = Command::new("dpkg-deb")
            .arg("-x")
            .arg(&deb)
            .arg(tree.path())
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o));
        for bin in ["portcullisd", "portcullis"] {
            let path = tree.path().join("usr/bin").join(bin);
            let (major, minor) = glibc_needed(&path);
            eprintln!(
                "{} {bin}: needs GLIBC_{major}.{minor}",
                deb.file_name().unwrap().to_string_lossy()
            );
            assert!(
                (major, minor) <= GLIBC_FLOOR,
                "{bin} in {} needs GLIBC_{major}.{minor}, above the supported floor GLIBC_{}.{} (Ubuntu 22.04)",
                deb.display(),
                GLIBC_FLOOR.0,
                GLIBC_FLOOR.1
            );
        }
    }
}
