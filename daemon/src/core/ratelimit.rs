//! The rate limiter's bans through the core: listed as the deny set
//! `ratelimit` (read from the data path's `RATE_BANS`, which the data path
//! itself writes when a source exceeds its limit; see `ebpf/src/ratelimit.rs`).

use ipnet::IpNet;
use portcullis_common::Reason;

use super::{
    ChangeError, Core,
    deny::{DenyChanged, DenyListed, DenySetView},
};
use crate::{dataplane, denylist::RATELIMIT_SET, model::unix_now};

impl Core {
    /// The bans the rate limiter holds now, as a deny set: each source (an
    /// IPv4 address, an IPv6 prefix) and when its ban ends; what it dropped
    /// is every `drop_rate_limit` (bans and excess flows).
    pub(super) fn ratelimit_view(&mut self, count_only: bool) -> Result<DenySetView, ChangeError> {
        let bans = self.dataplane.rate_bans().map_err(ChangeError::Internal)?;
        let (unix, boot) = (unix_now(), dataplane::boottime_ns());
        let entries = if count_only {
            Vec::new()
        } else {
            bans.iter()
                .map(|(net, until)| DenyListed {
                    prefix: net.to_string(),
                    expires: Some(unix + until.saturating_sub(boot).div_ceil(1_000_000_000)),
                })
                .collect()
        };
        let dropped = dataplane::read_counters(self.dataplane.pin_dir())
            .ok()
            .and_then(|c| c.into_iter().find(|(r, _)| *r == Reason::DropRateLimit))
            .map(|(_, c)| c)
            .unwrap_or_default();
        Ok(DenySetView {
            set: RATELIMIT_SET.to_string(),
            id: portcullis_common::DENY_SETS_MAX,
            count: bans.len(),
            dropped_packets: dropped.packets,
            dropped_bytes: dropped.bytes,
            entries,
        })
    }

    /// Lifts the bans of `sources` (each as listed: an IPv4 address, an
    /// IPv6 prefix), or every ban (`deny remove` / `deny flush ratelimit`).
    pub(super) fn ratelimit_lift(
        &mut self,
        sources: Option<&[IpNet]>,
    ) -> Result<DenyChanged, ChangeError> {
        let removed = self
            .dataplane
            .rate_unban(sources)
            .map_err(ChangeError::Internal)?;
        let entries = self
            .dataplane
            .rate_bans()
            .map_err(ChangeError::Internal)?
            .len();
        tracing::info!(removed, "rate limiter: bans lifted");
        Ok(DenyChanged {
            set: RATELIMIT_SET.to_string(),
            removed,
            entries,
            ..DenyChanged::default()
        })
    }

    /// Whether the rate limiter bans (its set is listed among the deny sets).
    pub(super) fn ratelimit_bans(&self) -> bool {
        self.dataplane
            .rate_limit
            .as_ref()
            .is_some_and(|l| l.ban_seconds.is_some())
    }
}
