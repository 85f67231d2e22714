//! Attacks on the deny sets (issue 18): a hostile set file, a ban aimed at
//! the admin network, and a ban sent over a reader's connection. Each is
//! performed for real and must change nothing it should not.

mod deny_env;

use std::{
    io::{Read as _, Write as _},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use deny_env::*;
use portcullis_tests::*;

/// A set file that is refused must name its line and change nothing: the
/// set keeps its entries and the traffic its verdicts.
#[test]
fn a_hostile_set_file_is_refused_whole_naming_the_line() {
    require_root!();
    let mut env = Env::new("allow = true\n");
    env.start();
    env.ok(&["deny", "add", "drop", A4]);
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    // Line 3 of 5 is bad; lines 1, 2, 4, 5 would ban B4 and B6.
    let bad3 = write(
        "bad3",
        format!("{B4}/32 ; SBL1\n{B6}\n10.200.0.999/32\n{C6}\n{D6}\n").as_bytes(),
    );
    let mut huge = format!("{B4}\n").into_bytes();
    huge.extend(std::iter::repeat_n(b'1', 1 << 20));
    let huge = write("huge", &huge);
    let mut junk = format!("# junk\n{B4}\n").into_bytes();
    junk.extend((0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8));
    let junk = write("junk", &junk);
    for (file, line) in [(&bad3, 3), (&huge, 2), (&junk, 3)] {
        let out = env.cli(&["deny", "load", "drop", file.to_str().unwrap()]);
        assert!(!out.status.success(), "{file:?} was accepted");
        let text = said(&out);
        assert!(
            text.contains(&format!("line {line}:")) && text.contains("nothing changed"),
            "{file:?}: {text}"
        );
        assert!(
            text.len() < 4096,
            "the error echoes the file: {} bytes",
            text.len()
        );
    }
    // The same junk sent straight to the API as a prefix: refused, named.
    let out = env.cli(&["deny", "add", "drop", "1.2.3.4/33"]);
    assert!(!out.status.success());
    let listed = env.listed("drop");
    assert_eq!(listed["count"], 1, "{listed}");
    assert_eq!(
        listed["entries"][0]["prefix"],
        format!("{A4}/32"),
        "{listed}"
    );
    assert!(!env.reaches(A4, APP), "the old ban still holds");
    assert!(
        env.reaches(B4, APP) && env.reaches(B6, APP),
        "nothing new was banned"
    );
    // A good file then replaces the set.
    let good = write(
        "good",
        format!("; Spamhaus DROP style\n{B4}/32 ; SBL1\n").as_bytes(),
    );
    env.ok(&["deny", "load", "drop", good.to_str().unwrap()]);
    assert!(env.reaches(A4, APP) && !env.reaches(B4, APP));
}

/// A ban covering the admin network (`[ssh] sources`, then a lockdown's
/// --admin) never cuts it: the admin network bypasses every deny set, on
/// every port; the rest of the banned prefix is dropped.
#[test]
fn a_ban_never_cuts_the_admin_network() {
    require_root!();
    let mut env = Env::new(&format!(
        "allow = true\nsources = [\"{A4}/32\", \"{A6}/128\"]\n"
    ));
    env.start();
    let out = env.ok(&[
        "--json",
        "deny",
        "add",
        "wide",
        "10.200.0.0/16",
        "fd00:200::/32",
        A4,
    ]);
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["admin_exempt"].as_array().unwrap().len(), 3, "{doc}");
    for src in [A4, A6] {
        assert!(env.reaches(src, 22), "admin {src} lost SSH to a ban");
        assert!(
            env.reaches(src, APP),
            "admin {src} lost the rule's port to a ban"
        );
    }
    for src in [B4, B6, C6] {
        assert!(!env.reaches(src, APP), "{src} is banned");
    }
    drop(env);
    // With the default `sources = []` nobody is exempt: a banned source
    // loses SSH too, until a lockdown names it as the admin network.
    let mut env = Env::new("allow = true\n");
    env.start();
    env.ok(&["deny", "add", "wide", "10.200.0.0/16", "fd00:200::/32"]);
    assert!(!env.reaches(B4, 22), "a banned source kept SSH");
    env.ok(&[
        "mode",
        "lockdown",
        "--admin",
        &format!("{B4}/32"),
        "--force",
    ]);
    assert!(
        env.reaches(B4, 22),
        "the lockdown's admin network lost SSH to a ban"
    );
    assert!(!env.reaches(A4, 22) && !env.reaches(B6, 22));
    env.ok(&["mode", "enforce"]);
    assert!(
        !env.reaches(B4, 22),
        "the ban applies again once B4 is no admin"
    );
}

fn http(socket: &Path, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: portcullis\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    let status = reply.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = reply.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, body.to_string())
}

/// uid 65534 as a reader (`reader_group = "nogroup"`): it may list the
/// sets, but a ban, a removal, a replacement or a flush is refused before
/// its body is read, and nothing changes.
#[test]
fn a_reader_cannot_ban_or_lift_a_ban() {
    require_root!();
    let mut env = Env::new("allow = true\n");
    env.config
        .rewrite(&config_text(
            &env.pins,
            &format!("[api]\nreader_group = \"nogroup\"\n[ssh]\nallow = true\n{RULES}"),
        ))
        .unwrap();
    env.start();
    env.ok(&["deny", "add", "kept", A4]);
    let socket = env.config.socket();
    let results = std::thread::spawn(move || {
        // SAFETY: plain integer arguments; only this thread's credentials change.
        unsafe {
            assert_eq!(
                libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<u32>()),
                0
            );
            assert_eq!(libc::syscall(libc::SYS_setresgid, 65534, 65534, 65534), 0);
            assert_eq!(libc::syscall(libc::SYS_setresuid, 65534, 65534, 65534), 0);
        }
        let ban = format!(r#"{{"entries":[{{"prefix":"{B4}"}}]}}"#);
        vec![
            http(&socket, "GET", "/v1/deny", ""),
            http(&socket, "POST", "/v1/deny/evil", &ban),
            http(&socket, "PUT", "/v1/deny/kept", r#"{"entries":[]}"#),
            http(&socket, "DELETE", "/v1/deny/kept", r#"{"all":true}"#),
        ]
    })
    .join()
    .unwrap();
    assert_eq!(results[0].0, 200, "a reader lists: {:?}", results[0]);
    for (status, body) in &results[1..] {
        assert_eq!(*status, 403, "{body}");
    }
    assert!(env.reaches(B4, APP), "the reader's ban took effect");
    assert!(!env.reaches(A4, APP), "the reader lifted a ban");
    assert_eq!(env.listed("kept")["count"], 1);
}
