//! Drop events: read from the data path's ring buffer, kept (the most recent
//! few) for `status`, and fanned out to `watch` clients.

use std::{
    collections::VecDeque,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::{Arc, Mutex},
};

use aya::maps::{MapData, RingBuf};
use portcullis_common::{DIR_EGRESS, DropEvent, FAMILY_V4, Reason};
use serde::{Deserialize, Serialize};
use tokio::{io::unix::AsyncFd, sync::broadcast};

use crate::model::DenySetNames;

/// How many recent events `status` shows.
pub const RECENT: usize = 50;

/// One event, as the API shows it (and the CLI reads it).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Event {
    /// Unix time, milliseconds.
    pub time_ms: u64,
    pub direction: std::borrow::Cow<'static, str>,
    /// The interface the packet came in on (ingress) or was leaving by.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub interface: String,
    pub source: String,
    pub destination: String,
    pub protocol: u8,
    pub source_port: u16,
    pub destination_port: u16,
    pub reason: std::borrow::Cow<'static, str>,
    /// A `drop_denied` drop: the deny set that banned the source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deny_set: Option<String>,
    /// What else there is to say (an alert's figures); empty for a drop.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// The `reason` of an egress volume alert.
pub const EGRESS_VOLUME_ALERT: &str = "alert_egress_volume";

impl Event {
    /// An egress volume alert, as `watch` shows it.
    pub fn volume_alert(a: &crate::volume::Alert) -> Event {
        let d = &a.destination;
        Event {
            time_ms: crate::model::unix_now().saturating_mul(1000),
            direction: "egress".into(),
            interface: String::new(),
            source: String::new(),
            destination: d.destination.clone(),
            protocol: 0,
            source_port: 0,
            destination_port: d.port,
            reason: EGRESS_VOLUME_ALERT.into(),
            deny_set: None,
            detail: format!(
                "{} {} bytes in this {} s window, over the alert volume of {} bytes",
                d.protocol, d.window_bytes, a.interval_secs, a.limit
            ),
        }
    }
}

fn addr(family: u8, bytes: [u8; 16]) -> IpAddr {
    if family == FAMILY_V4 {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(bytes))
    }
}

/// The name of interface `ifindex` (as `if<N>` once it is gone; empty for 0).
fn interface_name(ifindex: u32) -> String {
    if ifindex == 0 {
        return String::new();
    }
    nix::net::if_::if_indextoname(ifindex).map_or_else(
        |_| format!("if{ifindex}"),
        |name| name.to_string_lossy().into_owned(),
    )
}

impl Event {
    fn from_raw(e: &DropEvent, mono_to_unix_ns: i128, sets: &DenySetNames) -> Event {
        let reason = Reason::ALL
            .get(e.reason as usize)
            .map_or("unknown", |r| r.name());
        Event {
            time_ms: ((e.time_ns as i128 + mono_to_unix_ns) / 1_000_000).max(0) as u64,
            direction: if e.dir == DIR_EGRESS {
                "egress".into()
            } else {
                "ingress".into()
            },
            interface: interface_name(e.ifindex),
            source: addr(e.family, e.src).to_string(),
            destination: addr(e.family, e.dst).to_string(),
            protocol: e.proto,
            source_port: e.sport,
            destination_port: e.dport,
            reason: reason.into(),
            detail: String::new(),
            deny_set: deny_set_name(e, sets),
        }
    }
}

/// The name of the deny set a `DropDenied` event carries (its id + 1), or
/// `set#<id>` when the daemon does not know it.
fn deny_set_name(e: &DropEvent, sets: &DenySetNames) -> Option<String> {
    if u32::from(e.reason) != Reason::DropDenied as u32 || e.deny_set == 0 {
        return None;
    }
    let id = e.deny_set - 1;
    let names = sets
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    Some(
        names
            .get(&id)
            .cloned()
            .unwrap_or_else(|| format!("set#{id}")),
    )
}

/// The recent events and the live feed.
#[derive(Clone)]
pub struct Feed {
    recent: Arc<Mutex<VecDeque<Event>>>,
    tx: broadcast::Sender<Event>,
    /// Deny set names by id (the core's), to name a ban's set.
    deny_sets: DenySetNames,
}

impl Default for Feed {
    fn default() -> Self {
        Feed {
            recent: Arc::default(),
            tx: broadcast::channel(1024).0,
            deny_sets: DenySetNames::default(),
        }
    }
}

impl Feed {
    /// A feed that names deny sets from `names` (`Core::deny_set_names`).
    pub fn naming_deny_sets(names: DenySetNames) -> Feed {
        Feed {
            deny_sets: names,
            ..Feed::default()
        }
    }

    pub fn recent(&self) -> Vec<Event> {
        self.recent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }

    /// Tells `status` and every `watch` of an event the daemon raised
    /// itself (an alert).
    pub fn notify(&self, e: Event) {
        self.push(e);
    }

    fn push(&self, e: Event) {
        let mut recent = self
            .recent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if recent.len() == RECENT {
            recent.pop_front();
        }
        recent.push_back(e.clone());
        // No watcher is fine.
        let _ = self.tx.send(e);
    }

    /// Reads the ring buffer until it fails.
    pub async fn run(self, ring: RingBuf<MapData>) -> anyhow::Result<()> {
        let offset = mono_to_unix_ns();
        // SAFETY: the RingBuf owns its map fd, which stays open and the same
        // for as long as the AsyncFd owns the RingBuf.
        let mut fd =
            unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
                .map_err(|e| anyhow::anyhow!("cannot poll the event ring buffer: {e}"))?;
        loop {
            let mut guard = fd.readable_mut().await?;
            let ring = guard.get_inner_mut();
            while let Some(item) = ring.next() {
                if item.len() >= size_of::<DropEvent>() {
                    // SAFETY: the kernel wrote a whole `DropEvent` (checked
                    // length); read_unaligned makes no alignment assumption.
                    let raw: DropEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                    self.push(Event::from_raw(&raw, offset, &self.deny_sets));
                }
            }
            guard.clear_ready();
        }
    }
}

/// Unix time minus `CLOCK_MONOTONIC`, in ns.
fn mono_to_unix_ns() -> i128 {
    // CLOCK_MONOTONIC cannot fail on Linux; 0 would only skew event times.
    let mono = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        t.tv_sec() as i128 * 1_000_000_000 + t.tv_nsec() as i128
    });
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128);
    unix - mono
}
