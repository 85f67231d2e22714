//! The systemd unit: its hardening, as `systemd-analyze security` scores it.

use std::process::Command;

#[test]
fn the_service_unit_is_hardened_to_an_exposure_of_at_most_2_2() {
    let unit = concat!(env!("CARGO_MANIFEST_DIR"), "/../systemd/portcullis.service");
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager", unit])
        .output()
        .expect("systemd-analyze (package systemd; cargo xtask setup installs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    let (exposure, line) = portcullis_tests::security_exposure(&text).unwrap_or_else(|| {
        panic!(
            "no exposure in:\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    eprintln!("{line}");
    // 2.2: what remains is justified line by line in the unit file.
    assert!(exposure <= 2.2, "exposure {exposure} above 2.2:\n{text}");
}
