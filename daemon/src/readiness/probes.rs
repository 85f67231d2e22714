//! The host checks readiness runs when a report is asked for: the data
//! path enforces, something listens on the SSH ports, the live rules admit
//! them, sshd accepts keys (`sshd -T`), the SSH user's `authorized_keys`.

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
    process::Command,
};

use portcullis_common::{
    DIR_INGRESS, PCLASS_TCP, SLOT_INDEX_MASK, SLOT_KIND_PEER, SLOT_KIND_SHIFT, slot_admits,
};

use super::{Check, SSH_UNITS, State, SystemdView};
use crate::{
    compile::Image,
    core::Mode,
    rules::{FirewallRule, PackedSet},
    sockets,
};

pub(super) fn enforcing(interfaces: &BTreeMap<String, String>, missing: &[String]) -> Check {
    if !missing.is_empty() {
        Check::new(
            "enforcing",
            State::Fail,
            format!("not protected: {} missing", missing.join(", ")),
        )
    } else if interfaces.is_empty() {
        Check::new("enforcing", State::Fail, "no interface is protected yet")
    } else {
        let names: Vec<String> = interfaces
            .iter()
            .map(|(name, mode)| format!("{name} ({mode})"))
            .collect();
        Check::new(
            "enforcing",
            State::Pass,
            format!("enforcing on {}", names.join(", ")),
        )
    }
}

pub(super) fn ssh_unit(view: &SystemdView) -> Check {
    let name = "ssh_unit";
    if !view.connected {
        let why = view.error.as_deref().unwrap_or("not connected yet");
        return Check::new(
            name,
            State::Unknown,
            format!("system D-Bus unavailable: {why}"),
        );
    }
    match &view.ssh_unit {
        None => Check::new(
            name,
            State::Fail,
            format!(
                "no SSH unit is loaded (looked for {})",
                SSH_UNITS.join(", ")
            ),
        ),
        Some(u) if u.active_state == "active" => Check::new(
            name,
            State::Pass,
            format!("{} is {} ({})", u.name, u.active_state, u.sub_state),
        ),
        Some(u) => Check::new(
            name,
            State::Fail,
            format!(
                "{} is {} ({}), load state {}",
                u.name, u.active_state, u.sub_state, u.load_state
            ),
        ),
    }
}

/// Whether something listens on one of the SSH ports; also which do.
pub(super) fn listening(ports: &[u16]) -> (Check, Vec<u16>) {
    let name = "listening";
    let mut open = Vec::new();
    for &port in ports {
        match sockets::listening_tcp(port) {
            Ok(true) => open.push(port),
            Ok(false) => {}
            Err(e) => {
                let c = Check::new(name, State::Unknown, format!("cannot list sockets: {e:#}"));
                return (c, open);
            }
        }
    }
    let list = |ports: &[u16]| {
        ports
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let check = if open.is_empty() {
        Check::new(
            name,
            State::Fail,
            format!(
                "nothing listens on TCP port {} (the SSH ports)",
                list(ports)
            ),
        )
    } else {
        Check::new(
            name,
            State::Pass,
            format!("a TCP socket listens on port {}", list(&open)),
        )
    };
    (check, open)
}

/// The `admitted` check over the SSH ports: it passes when an SSH port that
/// something listens on is admitted (any SSH port, when none listens, so
/// the report still says what the rules allow).
pub(super) fn admitted_on(per_port: Vec<(u16, Check)>, listening: &[u16]) -> Check {
    let relevant: Vec<Check> = per_port
        .iter()
        .filter(|(p, _)| listening.is_empty() || listening.contains(p))
        .map(|(_, c)| c.clone())
        .collect();
    if let Some(pass) = relevant.iter().find(|c| c.state.passes()) {
        return pass.clone();
    }
    let details: Vec<String> = relevant.iter().map(|c| c.detail.clone()).collect();
    let state = relevant.first().map_or(State::Fail, |c| c.state);
    Check::new("admitted", state, details.join("; "))
}

/// Whether the live rules admit new TCP connections to `port`, and from where.
/// `image` is the live image of `rules` (stripped or whole: its index).
pub fn admitted(rules: &PackedSet, image: &Image, mode: &Mode, port: u16) -> Check {
    let name = "admitted";
    match mode {
        Mode::Open | Mode::Audit => {
            return Check::new(
                name,
                State::Warn,
                format!("mode {mode:?}: every packet passes, port {port} included"),
            );
        }
        Mode::Lockdown { admin: Some(admin) } => {
            return Check::new(
                name,
                State::Warn,
                format!("lockdown: port {port} admitted from {admin} only"),
            );
        }
        Mode::Lockdown { admin: None } => {
            return Check::new(
                name,
                State::Fail,
                format!("lockdown: nothing is admitted, port {port} included"),
            );
        }
        Mode::Enforce => {}
    }
    let from = admitted_by(rules, image, port);
    if from.is_empty() {
        Check::new(
            name,
            State::Fail,
            format!(
                "no rule admits TCP port {port} (the SSH exemption is off and no ingress rule covers it)"
            ),
        )
    } else {
        Check::new(
            name,
            State::Pass,
            format!("TCP port {port} admitted by {}", from.join("; ")),
        )
    }
}

/// Who admits new TCP connections to `port`, asked of the live image's
/// index (the compiler's entries, with the one admission predicate
/// `slot_admits`), not re-derived from the rules: the SSH exemption and the
/// ingress rules, each once, described by their configured sources. Peers
/// are left out (they admit everything from the cluster, not SSH as such);
/// an entry without a network (sources that do not parse) admits nothing.
/// Service rules (the daemon's own) are in the image, not in `rules`: left
/// out too.
fn admitted_by(rules: &PackedSet, image: &Image, port: u16) -> Vec<String> {
    let slots = image.index.slots_covering(DIR_INGRESS, PCLASS_TCP, port);
    let first = first_rule_slot(image);
    let mut by_id: Option<HashMap<String, FirewallRule>> = None;
    let mut from = Vec::new();
    for slot in slots {
        if !slot_admits(slot) || slot >> SLOT_KIND_SHIFT == SLOT_KIND_PEER {
            continue;
        }
        let name = image
            .slots
            .get((slot & SLOT_INDEX_MASK) as usize)
            .map_or("", |s| s.name);
        if name == "ssh" {
            from.push(describe_sources(
                "the SSH exemption",
                &rules.head().ssh.sources,
            ));
        } else if let Some(id) = name.strip_prefix("rule:")
            && let Some(rule) = at_place(rules, first, slot, id).or_else(|| {
                by_id
                    .get_or_insert_with(|| {
                        rules.ingress_rules().map(|r| (r.id.clone(), r)).collect()
                    })
                    .get(id)
                    .cloned()
            })
        {
            let on = if rule.interfaces.is_empty() {
                String::new()
            } else {
                format!(" on {}", rule.interfaces.join(", "))
            };
            from.push(describe_sources(
                &format!("rule {id:?}{on}"),
                &rule.ip_ranges,
            ));
        }
    }
    from
}

/// The first slot of a rule (rules have the slots after the peers' and the
/// SSH exemption's, ingress first).
pub(super) fn first_rule_slot(image: &Image) -> Option<usize> {
    image.slots.iter().position(|s| s.name.starts_with("rule:"))
}

/// The ingress rule `id` on `slot`, found at its place: ingress rules have
/// consecutive slots, in order, from the first rule slot (`first`). Checked
/// by id; `None` sends the caller to a map of every id.
pub(super) fn at_place(
    rules: &PackedSet,
    first: Option<usize>,
    slot: u32,
    id: &str,
) -> Option<FirewallRule> {
    let place = (slot & SLOT_INDEX_MASK) as usize;
    let rule = rules.ingress_rule(place.checked_sub(first?)?)?;
    (rule.id == id).then_some(rule)
}

fn describe_sources(by: &str, sources: &[String]) -> String {
    if sources.is_empty() {
        format!("{by} from any source")
    } else {
        format!("{by} from {}", sources.join(", "))
    }
}

pub(super) fn key_auth(sshd: &Path) -> Check {
    let name = "key_auth";
    if !sshd.exists() {
        return Check::new(
            name,
            State::Unknown,
            format!(
                "{} not found: cannot read sshd's configuration",
                sshd.display()
            ),
        );
    }
    let out = match Command::new(sshd).arg("-T").output() {
        Ok(out) => out,
        Err(e) => {
            return Check::new(
                name,
                State::Unknown,
                format!("cannot run {} -T: {e}", sshd.display()),
            );
        }
    };
    if !out.status.success() {
        return Check::new(
            name,
            State::Fail,
            format!(
                "{} -T fails (a broken sshd configuration): {}",
                sshd.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        );
    }
    sshd_settings(&String::from_utf8_lossy(&out.stdout))
}

/// Judges `sshd -T` output.
pub(super) fn sshd_settings(text: &str) -> Check {
    let name = "key_auth";
    let value = |key: &str| {
        text.lines().find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == key).then(|| v.trim().to_string())
        })
    };
    if value("pubkeyauthentication").as_deref() != Some("yes") {
        return Check::new(
            name,
            State::Fail,
            "sshd refuses public-key authentication (PubkeyAuthentication no)",
        );
    }
    if value("passwordauthentication").as_deref() == Some("yes") {
        return Check::new(
            name,
            State::Warn,
            "public-key authentication on; password authentication is on too",
        );
    }
    Check::new(
        name,
        State::Pass,
        "public-key authentication on, passwords off",
    )
}

/// The configured user's `~/.ssh/authorized_keys`: there, holding a key,
/// and writable by nobody but the user (sshd's StrictModes refuses it
/// otherwise).
pub(super) fn authorized_keys(user: Option<&str>) -> Check {
    let name = "authorized_keys";
    let Some(user) = user else {
        let mut c = Check::new(name, State::Skipped, "no ssh_user configured");
        c.gates = false;
        return c;
    };
    let entry = match nix::unistd::User::from_name(user) {
        Ok(Some(u)) => u,
        Ok(None) => return Check::new(name, State::Fail, format!("no user {user:?} on this host")),
        Err(e) => {
            return Check::new(
                name,
                State::Unknown,
                format!("cannot look up user {user:?}: {e}"),
            );
        }
    };
    // The walk from descriptors, never following a symbolic link, never
    // blocking on a FIFO or device (the user owns these paths and may swap
    // them): the home, then .ssh and the file relative to their parent.
    use std::os::fd::AsFd as _;
    let uid = entry.uid.as_raw();
    let dir = entry.dir.join(".ssh");
    let file = dir.join("authorized_keys");
    let walked = safe_path(nix::fcntl::AT_FDCWD, &entry.dir, &entry.dir, true, uid)
        .and_then(|home| safe_path(home.as_fd(), Path::new(".ssh"), &dir, true, uid))
        .and_then(|ssh| safe_path(ssh.as_fd(), Path::new("authorized_keys"), &file, false, uid))
        .and_then(|fd| crate::sshkeys::read_bounded(fd, &file));
    match walked {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let keys = text
                .lines()
                .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
                .count();
            if keys == 0 {
                Check::new(
                    name,
                    State::Fail,
                    format!("{} holds no key", file.display()),
                )
            } else {
                Check::new(
                    name,
                    State::Pass,
                    format!("{} holds {keys} key(s)", file.display()),
                )
            }
        }
        Err(why) => Check::new(name, State::Fail, why),
    }
}

/// Opens `name` in `at` (`shown` in messages; a directory if `is_dir`) if
/// it is what sshd accepts on the way to the keys: not a symbolic link, not
/// a special file, owned by `uid` or root, not writable by group or others.
/// Checked through a descriptor opened without following a link or
/// blocking on a FIFO.
pub(super) fn safe_path(
    at: std::os::fd::BorrowedFd<'_>,
    name: &Path,
    shown: &Path,
    is_dir: bool,
    uid: u32,
) -> Result<std::os::fd::OwnedFd, String> {
    let kind = if is_dir {
        crate::sshkeys::Kind::Dir
    } else {
        crate::sshkeys::Kind::File
    };
    crate::sshkeys::open_for_sshd(at, name, shown, kind, uid)
}
