//! `systemctl reload portcullis` under the shipped unit (issue 21): the
//! unit's `ExecReload=` runs `portcullis reload`, a synchronous reload, so
//! systemctl fails when the config is refused and succeeds when it is
//! applied; `portcullis rules save` can write the permanent rule set under
//! the unit's `ProtectSystem=strict`. One boot.

use std::{path::Path, time::Duration};

use portcullis_tests::{
    container::{Boot, INSTANCE_IFACE},
    is_root,
};

const BOOT: Duration = Duration::from_secs(90);
const CONFIG: &str = "/etc/portcullis/portcullis.toml";

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn systemctl_reload_fails_on_a_refused_config_and_succeeds_on_a_good_one() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let good = format!("interfaces = [\"{INSTANCE_IFACE}\"]\n[ssh]\nallow = true\n");
    let c = Boot::new().portcullis(&good).unwrap().start(BOOT).unwrap();
    c.wait_for("portcullis to enforce", Duration::from_secs(30), || {
        let out = c.exec("portcullis", &["--json", "status"]).ok()?;
        let s: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (s["enforcing"] == true).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", c.journal("portcullis.service")));
    let journal = || c.journal("portcullis.service");
    let reload = || c.systemctl(&["reload", "portcullis.service"]).unwrap();

    // A refused config: systemctl reload fails, the service keeps running.
    std::fs::write(
        c.host_path(Path::new(CONFIG)),
        format!("{good}[[ingress_rules]]\nid = \"x\"\nfrom_port = 5\nto_port = 4\n"),
    )
    .unwrap();
    let out = reload();
    assert!(
        !out.status.success(),
        "systemctl reload succeeded on a refused config: {}\n{}",
        text(&out),
        journal()
    );
    assert!(journal().contains("from_port"), "{}", journal());
    let active = c.systemctl(&["is-active", "portcullis.service"]).unwrap();
    assert!(active.status.success(), "{}", text(&active));

    // A good config: it succeeds and applies the file.
    let web = "[[ingress_rules]]\nid = \"web\"\nfrom_port = 8080\nto_port = 8080\n";
    std::fs::write(c.host_path(Path::new(CONFIG)), format!("{good}{web}")).unwrap();
    let out = reload();
    assert!(out.status.success(), "{}\n{}", text(&out), journal());
    assert!(journal().contains("reloaded: +web"), "{}", journal());

    // A runtime rule: the reload refuses to drop it; `rules save` (written
    // by the daemon under ProtectSystem=strict) makes it permanent.
    let add = c
        .exec(
            "portcullis",
            &[
                "rules",
                "add",
                "--id",
                "api",
                "--from-port",
                "9000",
                "--to-port",
                "9000",
            ],
        )
        .unwrap();
    assert!(add.status.success(), "{}", text(&add));
    let out = reload();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(journal().contains("+api"), "{}", journal());
    let save = c.exec("portcullis", &["rules", "save"]).unwrap();
    assert!(save.status.success(), "{}\n{}", text(&save), journal());
    let out = reload();
    assert!(out.status.success(), "{}\n{}", text(&out), journal());
    let rules = c.check("portcullis", &["--json", "rules", "get"]).unwrap();
    assert!(
        rules.contains("\"api\"") && rules.contains("\"web\""),
        "{rules}"
    );
}
