//! Drops in the journal (issue 19): each sampled drop event (`events`)
//! whose reason `[drop_log] reasons` selects becomes one structured journal
//! record (`PORTCULLIS_REASON`, `PORTCULLIS_SOURCE`, ..., and for
//! `drop_denied` the deny set in `PORTCULLIS_SET`; `MESSAGE_ID`
//! [`MESSAGE_ID`]), at most `per_second` a second with a burst of as many
//! (a token bucket); what the limit holds back is counted and reported in
//! one record every 10 s. Without a journal (not under systemd) the records
//! are log lines instead.

use std::{collections::BTreeSet, time::Duration};

use tokio::{sync::broadcast::error::RecvError, time::Instant};

use crate::{config::DropLogConfig, events::Event, journal};

/// `journalctl MESSAGE_ID=...` finds every drop record.
pub const MESSAGE_ID: &str = "6b1e0c6f2a9d4d8e9f3c5a7b1d2e4f60";
/// How often what the rate limit held back is reported.
const SUMMARY_EVERY: Duration = Duration::from_secs(10);

/// The selection and the token bucket.
pub struct Limiter {
    reasons: BTreeSet<String>,
    per_second: f64,
    tokens: f64,
    last: Instant,
    /// Selected drops not logged since the last summary.
    pub held_back: u64,
}

impl Limiter {
    pub fn new(config: &DropLogConfig, now: Instant) -> Limiter {
        let per_second = f64::from(config.per_second);
        Limiter {
            reasons: config.reasons.iter().cloned().collect(),
            per_second,
            tokens: per_second,
            last: now,
            held_back: 0,
        }
    }

    /// Whether `reason`'s drop at `now` is logged (selected and within the
    /// rate); a selected one that is not is counted in `held_back`.
    pub fn admit(&mut self, reason: &str, now: Instant) -> bool {
        if !self.reasons.contains(reason) {
            return false;
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.per_second);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            self.held_back += 1;
            false
        }
    }
}

/// The record of one drop: its fields, the message first.
pub fn fields(e: &Event) -> Vec<(&'static str, String)> {
    let at = |addr: &str, port: u16| {
        if e.protocol == 6 || e.protocol == 17 {
            if addr.contains(':') {
                format!("[{addr}]:{port}")
            } else {
                format!("{addr}:{port}")
            }
        } else {
            addr.to_string()
        }
    };
    let on = if e.interface.is_empty() {
        String::new()
    } else {
        format!(" on {}", e.interface)
    };
    vec![
        (
            "MESSAGE",
            format!(
                "dropped ({}): {} {} {} -> {}{on}",
                e.reason,
                e.direction,
                protocol(e.protocol),
                at(&e.source, e.source_port),
                at(&e.destination, e.destination_port)
            ),
        ),
        ("MESSAGE_ID", MESSAGE_ID.into()),
        ("PRIORITY", "5".into()),
        ("SYSLOG_IDENTIFIER", "portcullisd".into()),
        ("PORTCULLIS_REASON", e.reason.to_string()),
        ("PORTCULLIS_DIRECTION", e.direction.to_string()),
        ("PORTCULLIS_INTERFACE", e.interface.clone()),
        ("PORTCULLIS_PROTOCOL", protocol(e.protocol)),
        ("PORTCULLIS_SOURCE", e.source.clone()),
        ("PORTCULLIS_SOURCE_PORT", e.source_port.to_string()),
        ("PORTCULLIS_DESTINATION", e.destination.clone()),
        (
            "PORTCULLIS_DESTINATION_PORT",
            e.destination_port.to_string(),
        ),
    ]
}

fn protocol(p: u8) -> String {
    match p {
        6 => "tcp".into(),
        17 => "udp".into(),
        1 => "icmp".into(),
        58 => "icmpv6".into(),
        other => other.to_string(),
    }
}

fn write(fields: &[(&'static str, String)], journal: bool) {
    if journal && journal::send_record(fields).is_ok() {
        return;
    }
    let text: Vec<String> = fields
        .iter()
        .skip(1)
        .filter(|(k, _)| k.starts_with("PORTCULLIS_"))
        .map(|(k, v)| format!("{}={v}", k.trim_start_matches("PORTCULLIS_").to_lowercase()))
        .collect();
    let message = fields.first().map_or("", |(_, m)| m.as_str());
    tracing::info!("{message} [{}]", text.join(" "));
}

/// Follows the drop events of `feed` and logs the selected ones (a
/// `drop_denied` one names its deny set, asked of `core`).
pub async fn run(feed: crate::events::Feed, config: DropLogConfig, core: crate::core::Shared) {
    if config.reasons.is_empty() || config.per_second == 0 {
        return;
    }
    let journal = journal::under_journal();
    let mut events = feed.subscribe();
    let mut limiter = Limiter::new(&config, Instant::now());
    let mut summary = tokio::time::interval(SUMMARY_EVERY);
    loop {
        tokio::select! {
            got = events.recv() => match got {
                Ok(e) => {
                    if limiter.admit(&e.reason, Instant::now()) {
                        let mut record = fields(&e);
                        // The set the data path named; the model's answer
                        // for an event from before the set ids were known.
                        let set = match &e.deny_set {
                            Some(set) => Some(set.clone()),
                            None if e.reason == "drop_denied" => match e.source.parse() {
                                Ok(ip) => core.lock().await.deny_set_of(ip),
                                Err(_) => None,
                            },
                            None => None,
                        };
                        if let Some(set) = set {
                            record.push(("PORTCULLIS_SET", set));
                        }
                        write(&record, journal);
                    }
                }
                // The feed ran ahead of us: those are held back too.
                Err(RecvError::Lagged(n)) => limiter.held_back += n,
                Err(RecvError::Closed) => return,
            },
            _ = summary.tick() => {
                if limiter.held_back > 0 {
                    let n = std::mem::take(&mut limiter.held_back);
                    write(&[
                        ("MESSAGE", format!("{n} drop record(s) held back by [drop_log] per_second = {}", config.per_second)),
                        ("PRIORITY", "5".into()),
                        ("SYSLOG_IDENTIFIER", "portcullisd".into()),
                        ("PORTCULLIS_HELD_BACK", n.to_string()),
                    ], journal);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_selected_reasons_within_the_rate_are_logged() {
        let config = DropLogConfig {
            reasons: vec!["drop_denied".into()],
            per_second: 5,
        };
        let t0 = Instant::now();
        let mut l = Limiter::new(&config, t0);
        assert!(!l.admit("drop_no_rule", t0));
        assert_eq!(l.held_back, 0);
        let logged = (0..100).filter(|_| l.admit("drop_denied", t0)).count();
        assert_eq!(logged, 5, "a burst of per_second");
        assert_eq!(l.held_back, 95);
        // A second later, per_second more.
        let t1 = t0 + Duration::from_secs(1);
        let logged = (0..100).filter(|_| l.admit("drop_denied", t1)).count();
        assert_eq!(logged, 5);
    }

    #[test]
    fn a_record_carries_every_field() {
        let e = Event {
            time_ms: 0,
            direction: "ingress".into(),
            interface: "eth0".into(),
            source: "192.0.2.7".into(),
            destination: "10.0.0.1".into(),
            protocol: 6,
            source_port: 40000,
            destination_port: 22,
            reason: "drop_denied".into(),
            deny_set: None,
            detail: String::new(),
        };
        let f = fields(&e);
        let get = |k: &str| f.iter().find(|(key, _)| *key == k).map(|(_, v)| v.as_str());
        assert_eq!(
            get("MESSAGE"),
            Some("dropped (drop_denied): ingress tcp 192.0.2.7:40000 -> 10.0.0.1:22 on eth0")
        );
        assert_eq!(get("PORTCULLIS_SOURCE_PORT"), Some("40000"));
        assert_eq!(get("PORTCULLIS_PROTOCOL"), Some("tcp"));
        assert_eq!(get("PORTCULLIS_INTERFACE"), Some("eth0"));
    }
}
