//! Text for people: local times, sentences for changes, aligned tables.

use portcullis::{
    core::{Changed, Diff},
    events::Event,
};

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `secs` since the epoch as local `YYYY-MM-DD HH:MM:SS`, with `.mmm` when
/// `millis` is given.
pub fn local_time(secs: u64, millis: Option<u64>) -> String {
    let t = libc::time_t::try_from(secs).unwrap_or(libc::time_t::MAX);
    // SAFETY: `tm` is plain data that localtime_r fills in; `t` is a valid
    // time_t; both outlive the call, and localtime_r is thread-safe.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let ok = !unsafe { libc::localtime_r(&t, &mut tm) }.is_null();
    if !ok {
        return format!("@{secs}");
    }
    let base = format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    );
    match millis {
        Some(ms) => format!("{base}.{ms:03}"),
        None => base,
    }
}

/// `at` (Unix seconds) for people: `2026-11-30 10:01:02 (in 30 s)`.
pub fn when(at: u64) -> String {
    let now = unix_now();
    let rel = if at >= now {
        format!("in {} s", at - now)
    } else {
        format!("{} s ago", now - at)
    };
    format!("{} ({rel})", local_time(at, None))
}

/// A rule id of a diff (`ingress:web`) for people (`web`, or `egress rule
/// web`).
fn rule_name(key: &str) -> String {
    match key.split_once(':') {
        Some(("ingress", id)) => id.to_string(),
        Some(("egress", id)) => format!("{id} (egress)"),
        _ => key.to_string(),
    }
}

/// What a diff changes, as a clause: `added web-8080; removed db`.
pub fn diff_words(d: &Diff) -> String {
    let mut parts = Vec::new();
    let list = |v: &[String]| {
        v.iter()
            .map(|k| rule_name(k))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if !d.added.is_empty() {
        parts.push(format!("rule {} added", list(&d.added)));
    }
    if !d.removed.is_empty() {
        parts.push(format!("rule {} removed", list(&d.removed)));
    }
    if !d.changed.is_empty() {
        parts.push(format!("rule {} changed", list(&d.changed)));
    }
    if !d.peers_added.is_empty() {
        parts.push(format!("peers {} added", d.peers_added.join(", ")));
    }
    if !d.peers_removed.is_empty() {
        parts.push(format!("peers {} removed", d.peers_removed.join(", ")));
    }
    if d.ssh_changed {
        parts.push("the SSH exemption changed".into());
    }
    if let Some(e) = &d.egress_changed {
        parts.push(format!("egress {e}"));
    }
    if parts.is_empty() {
        "no rule changed".into()
    } else {
        parts.join("; ")
    }
}

/// The outcome of a change in sentences: `done` says what was done
/// (`Added rule tcp-8080: tcp port 8080 from any source`), `would` the same
/// for a dry run (`add rule ...`).
pub fn change_sentence(done: &str, would: &str, c: &Changed) -> String {
    let mut out = Vec::new();
    if c.dry_run {
        out.push(format!(
            "Dry run: would {would}. Nothing changed; generation {} stays live.",
            c.generation
        ));
    } else {
        out.push(format!("{done}. Generation {} is live.", c.generation));
    }
    let verb = if c.dry_run { "would cut" } else { "cut" };
    if c.would_cut.is_empty() {
        out.push(format!("It {verb} no open connection."));
    } else {
        out.push(format!(
            "It {verb} {} open connection(s):",
            c.would_cut.len()
        ));
        for f in &c.would_cut {
            out.push(format!("  {f}"));
        }
    }
    if let Some(by) = c.confirm_by {
        out.push(format!(
            "Unconfirmed: rolls back at {} unless confirmed; confirm with: portcullis confirm",
            when(by)
        ));
    }
    out.join("\n")
}

/// A protocol number by name.
pub fn protocol_name(p: u8) -> String {
    match p {
        6 => "tcp".into(),
        17 => "udp".into(),
        1 => "icmp".into(),
        58 => "icmpv6".into(),
        p => format!("proto {p}"),
    }
}

/// One drop event on one line: `ingress 10.0.0.2:5000 -> 10.0.0.1:22 tcp (drop_no_rule)`.
pub fn describe_drop(d: &Event) -> String {
    let endpoint = |addr: &str, port: u16| {
        if addr.contains(':') {
            format!("[{addr}]:{port}")
        } else {
            format!("{addr}:{port}")
        }
    };
    let interface = if d.interface.is_empty() {
        String::new()
    } else {
        format!(" {}", d.interface)
    };
    let set = d
        .deny_set
        .as_ref()
        .map_or(String::new(), |s| format!(", denied by set {s:?}"));
    format!(
        "{}{interface} {} -> {} {} ({}{set})",
        d.direction,
        endpoint(&d.source, d.source_port),
        endpoint(&d.destination, d.destination_port),
        protocol_name(d.protocol),
        d.reason
    )
}

/// Rows as a table: each column as wide as its widest cell; numbers (the
/// columns named in `right`) aligned right.
pub fn table(header: &[&str], rows: &[Vec<String>], right: &[usize]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| -> String {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i > 0 {
                out.push_str("  ");
            }
            let pad = w.saturating_sub(cell.chars().count());
            if right.contains(&i) {
                out.push_str(&" ".repeat(pad));
                out.push_str(cell);
            } else {
                out.push_str(cell);
                out.push_str(&" ".repeat(pad));
            }
        }
        out.trim_end().to_string()
    };
    let mut out = vec![line(header.to_vec())];
    for row in rows {
        out.push(line(row.iter().map(String::as_str).collect()));
    }
    out.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align() {
        let t = table(
            &["#", "ID", "HITS"],
            &[
                vec!["1".into(), "web".into(), "5".into()],
                vec!["10".into(), "database".into(), "12345".into()],
            ],
            &[0, 2],
        );
        assert_eq!(
            t,
            " #  ID         HITS\n 1  web           5\n10  database  12345"
        );
    }
}
