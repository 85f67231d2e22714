//! The CrowdSec bouncer under the shipped unit (issue 18, item 6), in a
//! container with real systemd. The unit denies the daemon IP sockets
//! (`IPAddressDeny=any`, loopback included): without a drop-in the status
//! says the LAPI is unreachable, and names the drop-in, rather than
//! silently pulling nothing; with the documented drop-in
//! (`portcullis.service.d/crowdsec.conf`, `IPAddressAllow=127.0.0.1`) the
//! daemon pulls a ban from a real LAPI on the machine's loopback and
//! enforces it on real traffic, while another source still connects. One
//! boot; the LAPI runs in the container's network namespace.

use std::{path::Path, time::Duration};

use portcullis_tests::{
    container::{Boot, CLIENT_V4, INSTANCE_IFACE, INSTANCE_V4, INSTANCE_V6},
    crowdsec::Lapi,
    is_root, sock, tcp_probe, tcp_probe_control,
};

const BOOT: Duration = Duration::from_secs(90);
const PORT: u16 = 18070;
const KEY: &str = "/etc/portcullis/crowdsec.key";
const DROP_IN: &str = "/etc/systemd/system/portcullis.service.d/crowdsec.conf";

#[test]
fn the_bouncer_needs_the_drop_in_under_the_shipped_unit_and_works_with_it() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let config = format!(
        "interfaces = [\"{INSTANCE_IFACE}\"]\n[ssh]\nallow = true\n\
         [crowdsec]\nurl = \"http://127.0.0.1:{PORT}\"\napi_key_file = \"{KEY}\"\npoll_interval = \"1s\"\n"
    );
    let mut c = Boot::new()
        .portcullis(&config)
        .unwrap()
        .file(KEY, "placeholder\n", 0o600)
        .prepare()
        .unwrap();
    let lapi = Lapi::start(&c.instance, PORT).unwrap();
    std::fs::write(c.host_path(Path::new(KEY)), format!("{}\n", lapi.key)).unwrap();
    // The client's IPv4 address is banned; its IPv6 address is not.
    lapi.add(&["--ip", CLIENT_V4, "--duration", "1h"]).unwrap();
    c.boot(BOOT).unwrap();
    let journal = |c: &portcullis_tests::container::Container| c.journal("portcullis.service");
    let crowdsec = |c: &portcullis_tests::container::Container| -> Option<serde_json::Value> {
        let out = c.exec("portcullis", &["--json", "status"]).ok()?;
        let s: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (s["enforcing"] == true && !s["crowdsec"].is_null()).then(|| s["crowdsec"].clone())
    };

    // As shipped: IP sockets denied, so the LAPI is unreachable, and the
    // status says so (the ban is not pulled: the client still connects).
    let st = c
        .wait_for("the bouncer to report", Duration::from_secs(60), || {
            crowdsec(&c).filter(|s| s["error"].is_string())
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", journal(&c)));
    let error = st["error"].as_str().unwrap_or_default();
    eprintln!("as shipped, the bouncer's status says: {error}");
    assert!(
        st["connected"] == false
            && error.contains("unreachable")
            && error.contains("IPAddressAllow=127.0.0.1"),
        "{st}"
    );
    let human = c.check("portcullis", &["status"]).unwrap();
    assert!(human.contains("CrowdSec:    NOT CONNECTED"), "{human}");
    tcp_probe_control(&c.client, sock(INSTANCE_V4, 22))
        .expect("without the drop-in nothing is banned: the client connects");

    // With the documented drop-in: the ban is pulled and enforced.
    let drop_in = c.host_path(Path::new(DROP_IN));
    std::fs::create_dir_all(drop_in.parent().unwrap()).unwrap();
    std::fs::write(&drop_in, "[Service]\nIPAddressAllow=127.0.0.1\n").unwrap();
    c.check("systemctl", &["daemon-reload"]).unwrap();
    c.check("systemctl", &["restart", "portcullis.service"])
        .unwrap_or_else(|e| panic!("{e}\n{}", journal(&c)));
    c.wait_for("the bouncer to connect", Duration::from_secs(60), || {
        crowdsec(&c).filter(|s| s["connected"] == true)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", journal(&c)));
    c.wait_for("the ban to be enforced", Duration::from_secs(30), || {
        tcp_probe(&c.client, sock(INSTANCE_V4, 22))
            .is_err()
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", journal(&c)));
    tcp_probe_control(&c.client, sock(INSTANCE_V6, 22))
        .expect("another source (the client's IPv6 address) still connects");
    let listed = c
        .check("portcullis", &["--json", "deny", "list", "crowdsec"])
        .unwrap();
    assert!(listed.contains(CLIENT_V4), "{listed}");
    // Lifted in the LAPI: lifted here.
    for (id, _) in lapi.ids(CLIENT_V4).unwrap() {
        lapi.delete_id(id).unwrap();
    }
    c.wait_for("the ban to be lifted", Duration::from_secs(30), || {
        tcp_probe(&c.client, sock(INSTANCE_V4, 22))
            .is_ok()
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", journal(&c)));
}
