//! The operator's everyday experience (issue 21): the CLI and the journal
//! behave like the tools an operator already knows.

use std::process::{Command, Stdio};

use portcullis_tests::*;

macro_rules! require_root {
    () => {
        if !is_root() {
            eprintln!("skipped: needs root");
            return;
        }
    };
}

/// `portcullis status | head -1` used to panic ("failed printing to
/// stdout: Broken pipe") once `head` had gone.
#[test]
fn a_closed_pipe_ends_the_cli_quietly() {
    require_root!();
    let pair = Pair::new().unwrap();
    let pins = PinDir::new().unwrap();
    let config = ConfigFile::new(&config_text(&pins, "[ssh]\nallow = true\n")).unwrap();
    let _d = Daemon::start(&pair.host, &config).unwrap();
    let mut child = Command::new(workspace_bin("portcullis").unwrap())
        .arg("--socket")
        .arg(config.socket())
        .arg("status")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The reader goes away before the first line is written.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    use std::os::unix::process::ExitStatusExt as _;
    assert!(
        out.status.success() || out.status.signal() == Some(libc::SIGPIPE),
        "{:?}: {err}",
        out.status
    );
}
