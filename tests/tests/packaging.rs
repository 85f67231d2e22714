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

/// Issue 21: the man pages the package ships, as `cargo xtask deb` generates
/// them: every page another page refers to (`portcullis-rules-add(1)`)
/// exists, each is titled after its own command and section, and
/// `portcullisd --version` names portcullisd.
#[test]
fn every_man_page_a_page_refers_to_is_generated_and_titled_after_its_command() {
    let dir = tempfile::tempdir().unwrap();
    for (bin, arg) in [
        ("portcullis", "generate-docs"),
        ("portcullisd", "--generate-man"),
    ] {
        let out = Command::new(portcullis_tests::workspace_bin(bin).unwrap())
            .arg(arg)
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{bin} {arg}: {out:?}");
    }
    let mut pages = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if let Some((command, section)) = name.rsplit_once('.')
            && (section == "1" || section == "8")
        {
            let text = std::fs::read_to_string(&path).unwrap();
            pages.insert((command.to_string(), section.to_string()), text);
        }
    }
    assert!(
        pages.contains_key(&("portcullis".into(), "1".into())),
        "{pages:?}"
    );
    assert!(
        pages.contains_key(&("portcullisd".into(), "8".into())),
        "{pages:?}"
    );
    for ((command, section), text) in &pages {
        let th = text
            .lines()
            .find(|l| l.starts_with(".TH "))
            .unwrap_or_else(|| panic!("{command}.{section} has no .TH"));
        let mut words = th.split_whitespace().skip(1);
        let (title, sect) = (words.next().unwrap(), words.next().unwrap());
        assert!(
            title.eq_ignore_ascii_case(command) && sect == section,
            "{command}.{section} is titled {title}({sect})"
        );
        // References as the pages write them: `portcullis\-rules\-add(1)`.
        let text = text.replace("\\-", "-");
        for (at, _) in text.match_indices("portcullis") {
            let rest = &text[at..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            let after = &rest[name.len()..];
            for s in ["1", "8"] {
                if after.starts_with(&format!("({s})")) {
                    assert!(
                        pages.contains_key(&(name.clone(), s.to_string())),
                        "{command}.{section} refers to {name}({s}), which is not generated"
                    );
                }
            }
        }
    }
    let out = Command::new(portcullis_tests::workspace_bin("portcullisd").unwrap())
        .arg("--version")
        .output()
        .unwrap();
    let version = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        version.trim(),
        format!("portcullisd {}", env!("CARGO_PKG_VERSION")),
        "portcullisd --version"
    );
}
