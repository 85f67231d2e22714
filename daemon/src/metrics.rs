//! The Prometheus exposition behind `/v1/metrics`, rendered by the
//! maintained `prometheus-client` crate (OpenMetrics text; label values
//! escaped there) from a snapshot the API takes of the core. The names,
//! labels and values are the ones the hand-written text had
//! (`tests/tests/metrics.rs` holds them against a saved list).

use portcullis_common::Reason;
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::{core::Count, model::Mode};

/// The content type of [`render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What one scrape reports.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Verdict counters by reason.
    pub reasons: Vec<(Reason, Count)>,
    /// Counters by rule slot name (`rule:<id>`, `ssh`, `cluster:<id>`...).
    pub rules: Vec<(String, Count)>,
    pub generation: u64,
    pub refused_writes: u64,
    /// The data path is attached to at least one interface.
    pub enforcing: bool,
    /// The mode (issue 21): what the data path does with what the rules do
    /// not admit.
    pub mode: Mode,
    /// SSH readiness, as `/v1/ready` reports it.
    pub ready: bool,
    /// Connection-table entries and capacity (`None` when unreadable).
    pub conntrack: Option<(usize, u32)>,
    /// Deny sets: name, entries, and what each dropped.
    pub deny_sets: Vec<(String, usize, Count)>,
    /// Egress volume (when counted): the top destinations and the overflow.
    pub egress_volume: Option<crate::core::VolumeStatus>,
    /// The etcd member list (`[fleet]` only): the revision applied, and
    /// seconds since the last successful exchange with etcd (`None`: none
    /// since start).
    pub fleet: Option<(i64, Option<u64>)>,
}

/// The `mode` label of each mode.
const MODES: [&str; 4] = ["enforce", "audit", "open", "lockdown"];

fn mode_name(mode: &Mode) -> &'static str {
    match mode {
        Mode::Enforce => "enforce",
        Mode::Audit => "audit",
        Mode::Open => "open",
        Mode::Lockdown { .. } => "lockdown",
    }
}

type Labels = Vec<(String, String)>;

fn counters(
    registry: &mut Registry,
    name: &str,
    help: &str,
    label: &str,
    values: impl Iterator<Item = (String, u64)>,
) {
    let family = Family::<Labels, Counter>::default();
    for (value, n) in values {
        family
            .get_or_create(&vec![(label.to_owned(), value)])
            .inc_by(n);
    }
    registry.register(name, help, family);
}

fn gauge(registry: &mut Registry, name: &str, help: &str, value: i64) {
    let g = Gauge::<i64>::default();
    g.set(value);
    registry.register(name, help, g);
}

/// The mode, readiness, connection-table and fleet gauges.
fn state_gauges(r: &mut Registry, s: &Snapshot) {
    let modes = Family::<Labels, Gauge>::default();
    for m in MODES {
        modes
            .get_or_create(&vec![("mode".to_owned(), m.to_owned())])
            .set(i64::from(m == mode_name(&s.mode)));
    }
    r.register(
        "portcullis_mode",
        "The mode (enforce, audit, open, lockdown): 1 for the current one",
        modes,
    );
    gauge(
        r,
        "portcullis_ready",
        "Whether the host is SSH-ready (as /v1/ready)",
        i64::from(s.ready),
    );
    if let Some((entries, capacity)) = s.conntrack {
        gauge(
            r,
            "portcullis_conntrack_entries",
            "Entries in the connection table",
            i64::try_from(entries).unwrap_or(i64::MAX),
        );
        gauge(
            r,
            "portcullis_conntrack_capacity",
            "Capacity of the connection table",
            i64::from(capacity),
        );
    }
    if let Some((revision, stale)) = s.fleet {
        gauge(
            r,
            "portcullis_fleet_revision",
            "The etcd revision of the member list applied (or refused)",
            revision,
        );
        gauge(
            r,
            "portcullis_fleet_stale_seconds",
            "Seconds since the last successful exchange with etcd (-1: none since start)",
            stale.map_or(-1, |s| i64::try_from(s).unwrap_or(i64::MAX)),
        );
    }
}

/// The top destinations of egress volume (a bounded label set: only the
/// configured top-N), and the traffic the data path's table had no room for.
fn egress_volume(r: &mut Registry, v: &crate::core::VolumeStatus) {
    let bytes = Family::<Labels, Counter>::default();
    for d in &v.top {
        bytes
            .get_or_create(&vec![
                ("destination".to_owned(), d.destination.clone()),
                ("protocol".to_owned(), d.protocol.clone()),
                ("port".to_owned(), d.port.to_string()),
            ])
            .inc_by(d.bytes);
    }
    r.register(
        "portcullis_egress_bytes",
        "Bytes sent to each of the top destinations since the daemon started",
        bytes,
    );
    let overflow = Counter::<u64>::default();
    overflow.inc_by(v.overflow_bytes);
    r.register(
        "portcullis_egress_overflow_bytes",
        "Egress bytes not counted per destination: the table was full",
        overflow,
    );
}

/// The exposition text of `s`.
pub fn render(s: &Snapshot) -> String {
    let mut r = Registry::default();
    counters(
        &mut r,
        "portcullis_packets",
        "Packets by verdict reason",
        "reason",
        s.reasons
            .iter()
            .map(|(r, c)| (r.name().to_owned(), c.packets)),
    );
    counters(
        &mut r,
        "portcullis_bytes",
        "Bytes by verdict reason",
        "reason",
        s.reasons
            .iter()
            .map(|(r, c)| (r.name().to_owned(), c.bytes)),
    );
    counters(
        &mut r,
        "portcullis_rule_packets",
        "Packets admitted by each rule",
        "rule",
        s.rules.iter().map(|(name, c)| (name.clone(), c.packets)),
    );
    gauge(
        &mut r,
        "portcullis_rules_generation",
        "Generation of the live rule set",
        i64::try_from(s.generation).unwrap_or(i64::MAX),
    );
    let refused = Counter::<u64>::default();
    refused.inc_by(s.refused_writes);
    r.register(
        "portcullis_api_refused_writes",
        "Rule changes refused for lack of permission",
        refused,
    );
    gauge(
        &mut r,
        "portcullis_enforcing",
        "Whether the data path is attached to at least one interface",
        i64::from(s.enforcing),
    );
    state_gauges(&mut r, s);
    counters(
        &mut r,
        "portcullis_deny_packets",
        "Packets each deny set dropped",
        "set",
        s.deny_sets.iter().map(|(n, _, c)| (n.clone(), c.packets)),
    );
    let entries = Family::<Labels, Gauge>::default();
    for (name, n, _) in &s.deny_sets {
        entries
            .get_or_create(&vec![("set".to_owned(), name.clone())])
            .set(i64::try_from(*n).unwrap_or(i64::MAX));
    }
    r.register(
        "portcullis_deny_entries",
        "Entries in each deny set",
        entries,
    );
    if let Some(v) = &s.egress_volume {
        egress_volume(&mut r, v);
    }
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &r);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `rule` label's value as rendered (moved from `api`'s tests, which
    /// held the hand-written escaper to the same assertions).
    fn label_value(name: &str) -> String {
        let s = Snapshot {
            rules: vec![(name.to_owned(), Count::default())],
            ..Snapshot::default()
        };
        let text = render(&s);
        let start = text.find("{rule=\"").expect("a rule series") + "{rule=\"".len();
        let end = text[start..].find("\"} 0\n").expect("the series' end") + start;
        text[start..end].to_owned()
    }

    #[test]
    fn label_values_cannot_end_the_label_or_the_line() {
        assert_eq!(label_value("rule:web"), "rule:web");
        assert_eq!(label_value("a\"} 1\nx{b=\"\\"), "a\\\"} 1\\nx{b=\\\"\\\\");
    }

    #[test]
    fn label_values_are_escaped() {
        let s = Snapshot {
            rules: vec![("rule:a\\b\"c\nd".into(), Count::default())],
            ..Snapshot::default()
        };
        let text = render(&s);
        assert!(
            text.contains("portcullis_rule_packets_total{rule=\"rule:a\\\\b\\\"c\\nd\"} 0\n"),
            "{text}"
        );
        // Nothing else ends the line or the label early.
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with("portcullis_rule_packets"))
                .count(),
            1,
            "{text}"
        );
    }

    #[test]
    fn names_types_and_values_as_before() {
        let s = Snapshot {
            reasons: vec![(
                Reason::DropNoRule,
                Count {
                    packets: 3,
                    bytes: 180,
                },
            )],
            rules: vec![(
                "ssh".into(),
                Count {
                    packets: 2,
                    bytes: 0,
                },
            )],
            generation: 7,
            refused_writes: 1,
            enforcing: true,
            mode: Mode::Lockdown { admin: None },
            ready: true,
            conntrack: Some((5, 65536)),
            deny_sets: vec![(
                "abuse".into(),
                3,
                Count {
                    packets: 4,
                    bytes: 240,
                },
            )],
            egress_volume: None,
            fleet: Some((12, Some(3))),
        };
        let text = render(&s);
        assert!(text.contains("portcullis_fleet_revision 12\n"), "{text}");
        assert!(
            text.contains("portcullis_fleet_stale_seconds 3\n"),
            "{text}"
        );
        for line in [
            "# TYPE portcullis_packets counter",
            "portcullis_packets_total{reason=\"drop_no_rule\"} 3",
            "portcullis_bytes_total{reason=\"drop_no_rule\"} 180",
            "portcullis_rule_packets_total{rule=\"ssh\"} 2",
            "# TYPE portcullis_rules_generation gauge",
            "portcullis_rules_generation 7",
            "portcullis_api_refused_writes_total 1",
            "portcullis_enforcing 1",
            "portcullis_mode{mode=\"enforce\"} 0",
            "portcullis_mode{mode=\"lockdown\"} 1",
            "portcullis_ready 1",
            "portcullis_conntrack_entries 5",
            "portcullis_deny_packets_total{set=\"abuse\"} 4",
            "portcullis_deny_entries{set=\"abuse\"} 3",
            "portcullis_conntrack_capacity 65536",
            "# EOF",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} in\n{text}");
        }
    }
}
