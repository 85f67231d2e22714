//! Egress volume accounting (pure). The data path counts what leaves per
//! destination in a bounded table (`ebpf/src/volume.rs`); the daemon reads
//! it every few seconds and this ledger turns the readings into totals
//! since the daemon started, a top-N for `status` and metrics, and alerts
//! when a destination passes the configured volume within an interval.
//!
//! Entries idle since the previous reading are handed back to be deleted
//! from the kernel's table (so it keeps room for new destinations); the
//! ledger keeps their totals. Traffic that found the table full is the
//! overflow, reported beside the top-N: a spray of destinations cannot push
//! a heavy one out unnoticed (the kernel's table is not an LRU), and what
//! it could not count is visible as such.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use portcullis_common::{
    Counter, FAMILY_V6, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, VOLUME_V6_PREFIX,
    VolumeKey,
};
use serde::{Deserialize, Serialize};

/// What the ledger is told by the configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Alert windows, seconds (aligned to the first reading).
    pub interval_secs: u64,
    /// Alert when a destination sends more than this within one window
    /// (`None`: never).
    pub alert_bytes: Option<u64>,
    /// Destinations whose totals are kept; beyond it, the smallest are
    /// folded into `others`.
    pub keep: usize,
    /// Destinations `status` and the metrics show.
    pub top: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            interval_secs: 60,
            alert_bytes: None,
            keep: 4 * portcullis_common::EGRESS_DESTINATIONS as usize,
            top: 10,
        }
    }
}

/// One destination's totals, as `status` shows them.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Destination {
    /// An address, or an IPv6 /64.
    pub destination: String,
    pub protocol: String,
    /// Destination port (TCP and UDP; 0 otherwise).
    pub port: u16,
    pub bytes: u64,
    /// Packets as they left (segments of offloaded frames counted).
    pub packets: u64,
    /// Bytes in the current alert window.
    pub window_bytes: u64,
}

/// A destination that passed the alert volume within a window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alert {
    pub destination: Destination,
    pub limit: u64,
    pub interval_secs: u64,
}

#[derive(Clone, Copy, Debug, Default)]
struct Tally {
    total: Counter,
    window_bytes: u64,
    alerted: bool,
}

/// Totals per destination since start; see the module's documentation.
#[derive(Debug, Default)]
pub struct Ledger {
    settings: Settings,
    /// The kernel's totals per entry at the last reading (an entry counts
    /// from zero again once deleted).
    seen: HashMap<VolumeKey, Counter>,
    tallies: HashMap<VolumeKey, Tally>,
    /// Totals of destinations folded out of `tallies`.
    others: Counter,
    overflow_seen: Counter,
    overflow: Counter,
    window_start: Option<u64>,
}

/// What a reading asks of the caller: alerts to raise, and idle entries to
/// delete from the kernel's table (then [`Ledger::forgotten`]).
#[derive(Debug, Default)]
pub struct Reading {
    pub alerts: Vec<Alert>,
    pub idle: Vec<VolumeKey>,
    /// Overflow traffic since the previous reading.
    pub overflow: Counter,
}

fn minus(a: Counter, b: Counter) -> Counter {
    if a.packets < b.packets || a.bytes < b.bytes {
        // The entry was deleted and made again since: all of it is new.
        return a;
    }
    Counter {
        packets: a.packets - b.packets,
        bytes: a.bytes - b.bytes,
    }
}

fn plus(a: Counter, b: Counter) -> Counter {
    Counter {
        packets: a.packets.saturating_add(b.packets),
        bytes: a.bytes.saturating_add(b.bytes),
    }
}

impl Ledger {
    pub fn new(settings: Settings) -> Self {
        Ledger {
            settings,
            ..Ledger::default()
        }
    }

    /// Takes a reading of the kernel's table (`rows`, and the overflow
    /// entry) at `now` (seconds).
    pub fn read(&mut self, now: u64, rows: &[(VolumeKey, Counter)], overflow: Counter) -> Reading {
        self.roll_window(now);
        let mut reading = Reading {
            overflow: minus(overflow, self.overflow_seen),
            ..Reading::default()
        };
        self.overflow_seen = overflow;
        self.overflow = plus(self.overflow, reading.overflow);
        let present: std::collections::HashSet<&VolumeKey> = rows.iter().map(|(k, _)| k).collect();
        self.seen.retain(|k, _| present.contains(k));
        for (key, now_total) in rows {
            let delta = minus(*now_total, self.seen.get(key).copied().unwrap_or_default());
            self.seen.insert(*key, *now_total);
            if delta.packets == 0 && delta.bytes == 0 {
                reading.idle.push(*key);
                continue;
            }
            if let Some(alert) = self.credit(*key, delta) {
                reading.alerts.push(alert);
            }
        }
        self.fold_smallest();
        reading
    }

    /// The caller deleted these entries from the kernel's table.
    pub fn forgotten(&mut self, keys: &[VolumeKey]) {
        for k in keys {
            self.seen.remove(k);
        }
    }

    /// The `n` destinations that sent the most, most first.
    pub fn top(&self, n: usize) -> Vec<Destination> {
        let mut rows: Vec<_> = self.tallies.iter().collect();
        rows.sort_by(|a, b| {
            b.1.total
                .bytes
                .cmp(&a.1.total.bytes)
                .then(a.0.addr.cmp(&b.0.addr))
        });
        rows.into_iter()
            .take(n)
            .map(|(k, t)| destination(k, t))
            .collect()
    }

    /// Traffic the kernel's table had no room for, since start.
    pub fn overflow(&self) -> Counter {
        self.overflow
    }

    pub fn settings(&self) -> Settings {
        self.settings
    }

    /// Destinations counted (those whose totals are kept).
    pub fn destinations(&self) -> usize {
        self.tallies.len()
    }

    fn roll_window(&mut self, now: u64) {
        let start = *self.window_start.get_or_insert(now);
        if now.saturating_sub(start) < self.settings.interval_secs.max(1) {
            return;
        }
        self.window_start = Some(now);
        for t in self.tallies.values_mut() {
            t.window_bytes = 0;
            t.alerted = false;
        }
    }

    fn credit(&mut self, key: VolumeKey, delta: Counter) -> Option<Alert> {
        let t = self.tallies.entry(key).or_default();
        t.total = plus(t.total, delta);
        t.window_bytes = t.window_bytes.saturating_add(delta.bytes);
        let limit = self.settings.alert_bytes?;
        if t.alerted || t.window_bytes <= limit {
            return None;
        }
        t.alerted = true;
        Some(Alert {
            destination: destination(&key, t),
            limit,
            interval_secs: self.settings.interval_secs,
        })
    }

    /// Keeps the ledger bounded: beyond `keep` destinations, the smallest
    /// go into `others`.
    fn fold_smallest(&mut self) {
        let keep = self.settings.keep.max(1);
        if self.tallies.len() <= keep {
            return;
        }
        let mut by_size: Vec<(VolumeKey, u64)> = self
            .tallies
            .iter()
            .map(|(k, t)| (*k, t.total.bytes))
            .collect();
        by_size.sort_by_key(|&(_, bytes)| bytes);
        let excess = self.tallies.len() - keep;
        for (key, _) in by_size.into_iter().take(excess) {
            if let Some(t) = self.tallies.remove(&key) {
                self.others = plus(self.others, t.total);
            }
        }
    }
}

/// The address a key names (IPv6: its /64).
fn address(k: &VolumeKey) -> IpAddr {
    if k.family == FAMILY_V6 {
        IpAddr::V6(Ipv6Addr::from(k.addr))
    } else {
        let [a, b, c, d, ..] = k.addr;
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    }
}

fn destination(k: &VolumeKey, t: &Tally) -> Destination {
    let addr = address(k);
    let destination = match addr {
        IpAddr::V6(_) => format!("{addr}/{VOLUME_V6_PREFIX}"),
        IpAddr::V4(_) => addr.to_string(),
    };
    let protocol = match k.proto {
        IPPROTO_TCP => "tcp".to_owned(),
        IPPROTO_UDP => "udp".to_owned(),
        IPPROTO_ICMP => "icmp".to_owned(),
        IPPROTO_ICMPV6 => "icmpv6".to_owned(),
        p => format!("ip proto {p}"),
    };
    Destination {
        destination,
        protocol,
        port: k.port,
        bytes: t.total.bytes,
        packets: t.total.packets,
        window_bytes: t.window_bytes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(last: u8, port: u16) -> VolumeKey {
        VolumeKey {
            addr: [10, 200, 0, last, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            port,
            proto: IPPROTO_TCP,
            family: portcullis_common::FAMILY_V4,
        }
    }

    fn c(packets: u64, bytes: u64) -> Counter {
        Counter { packets, bytes }
    }

    #[test]
    fn readings_add_up_deltas_and_idle_entries_are_handed_back() {
        let mut l = Ledger::new(Settings::default());
        let r = l.read(0, &[(key(1, 443), c(10, 1000))], Counter::default());
        assert!(r.idle.is_empty());
        let r = l.read(5, &[(key(1, 443), c(15, 1500))], Counter::default());
        assert!(r.idle.is_empty());
        assert_eq!(l.top(1)[0].bytes, 1500);
        // No change since: idle, to be deleted; its total stays.
        let r = l.read(10, &[(key(1, 443), c(15, 1500))], Counter::default());
        assert_eq!(r.idle, vec![key(1, 443)]);
        l.forgotten(&r.idle);
        // Made again by the kernel after the delete: counts from zero.
        l.read(15, &[(key(1, 443), c(2, 200))], Counter::default());
        assert_eq!(l.top(1)[0].bytes, 1700);
        assert_eq!(l.top(1)[0].packets, 17);
        assert_eq!(l.top(1)[0].destination, "10.200.0.1");
    }

    #[test]
    fn an_entry_not_deleted_is_not_counted_twice() {
        let mut l = Ledger::new(Settings::default());
        l.read(0, &[(key(1, 80), c(1, 100))], Counter::default());
        let r = l.read(1, &[(key(1, 80), c(1, 100))], Counter::default());
        assert_eq!(r.idle.len(), 1);
        // The delete failed (no `forgotten`): the next reading sees the same total.
        l.read(2, &[(key(1, 80), c(1, 100))], Counter::default());
        assert_eq!(l.top(1)[0].bytes, 100);
    }

    #[test]
    fn an_alert_fires_once_per_window_when_the_volume_is_passed() {
        let mut l = Ledger::new(Settings {
            interval_secs: 60,
            alert_bytes: Some(1000),
            keep: 10,
            top: 10,
        });
        assert!(
            l.read(0, &[(key(1, 443), c(5, 900))], Counter::default())
                .alerts
                .is_empty()
        );
        let r = l.read(10, &[(key(1, 443), c(6, 1100))], Counter::default());
        assert_eq!(r.alerts.len(), 1);
        assert_eq!(r.alerts[0].destination.window_bytes, 1100);
        assert!(
            l.read(20, &[(key(1, 443), c(9, 5000))], Counter::default())
                .alerts
                .is_empty()
        );
        // A new window: 900 more is under the limit, 1001 over it.
        assert!(
            l.read(61, &[(key(1, 443), c(10, 5900))], Counter::default())
                .alerts
                .is_empty()
        );
        assert_eq!(
            l.read(70, &[(key(1, 443), c(11, 6100))], Counter::default())
                .alerts
                .len(),
            1
        );
    }

    #[test]
    fn the_ledger_is_bounded_and_keeps_the_heaviest() {
        let mut l = Ledger::new(Settings {
            interval_secs: 60,
            alert_bytes: None,
            keep: 3,
            top: 3,
        });
        let rows: Vec<_> = (1..=10u8)
            .map(|i| (key(i, 1), c(1, u64::from(i) * 100)))
            .collect();
        l.read(0, &rows, Counter::default());
        assert_eq!(l.destinations(), 3);
        let top: Vec<_> = l.top(3).into_iter().map(|d| d.bytes).collect();
        assert_eq!(top, vec![1000, 900, 800]);
        assert_eq!(l.others.bytes, (1..=7).map(|i| i * 100).sum::<u64>());
    }

    #[test]
    fn overflow_is_accumulated_from_the_kernels_totals() {
        let mut l = Ledger::new(Settings::default());
        assert_eq!(l.read(0, &[], c(3, 300)).overflow, c(3, 300));
        assert_eq!(l.read(1, &[], c(5, 500)).overflow, c(2, 200));
        assert_eq!(l.overflow(), c(5, 500));
    }
}
