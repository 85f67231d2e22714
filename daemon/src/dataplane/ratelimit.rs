//! The rate limiter's bans (`RATE_BANS`; see `ebpf/src/ratelimit.rs`): the
//! data path writes them when a source exceeds its limit; the daemon lists
//! them (the deny listing's `ratelimit` set), removes the expired ones, and
//! lifts bans an operator removes (with the source's buckets, so its next
//! flow does not ban it again at once).

use aya::maps::HashMap;
use ipnet::IpNet;
use portcullis_common::{FAMILY_V6, RateKey, maps};

use super::{Dataplane, boottime_ns, map_mut};

/// A source the data path banned, and the `CLOCK_BOOTTIME` ns it is banned
/// until.
pub type RateBan = (IpNet, u64);

impl Dataplane {
    /// The source a key stands for: an IPv4 address, or an IPv6 prefix of
    /// `[rate_limit] ipv6_prefix` bits.
    fn rate_source(&self, key: &RateKey) -> Option<IpNet> {
        let v6_prefix = self.rate_limit.as_ref().map_or(128, |l| l.ipv6_prefix);
        let net = if key.family == FAMILY_V6 {
            ipnet::Ipv6Net::new(key.addr.into(), v6_prefix).map(IpNet::V6)
        } else {
            let [a, b, c, d, ..] = key.addr;
            ipnet::Ipv4Net::new([a, b, c, d].into(), 32).map(IpNet::V4)
        };
        net.ok()
    }

    /// The unexpired bans; expired ones are removed.
    pub fn rate_bans(&mut self) -> anyhow::Result<Vec<RateBan>> {
        let all: Vec<(RateKey, u64)> = {
            let bans: HashMap<_, RateKey, u64> =
                HashMap::try_from(map_mut(&mut self.ebpf, maps::RATE_BANS)?)?;
            bans.iter().filter_map(Result::ok).collect()
        };
        let now = boottime_ns();
        let (live, expired): (Vec<_>, Vec<_>) = all.into_iter().partition(|(_, t)| *t > now);
        let mut out: Vec<RateBan> = live
            .iter()
            .filter_map(|(k, t)| Some((self.rate_source(k)?, *t)))
            .collect();
        let mut bans: HashMap<_, RateKey, u64> =
            HashMap::try_from(map_mut(&mut self.ebpf, maps::RATE_BANS)?)?;
        for (key, _) in expired {
            let _ = bans.remove(&key);
        }
        out.sort();
        Ok(out)
    }

    /// Lifts the bans of `sources` (as listed), or all of them, and clears
    /// those sources' buckets; returns how many bans were lifted.
    pub fn rate_unban(&mut self, sources: Option<&[IpNet]>) -> anyhow::Result<usize> {
        let mut lifted = 0;
        for map in [maps::RATE_BANS, maps::RATE_BUCKETS] {
            let keys: Vec<RateKey> = {
                let m: HashMap<_, RateKey, u64> = HashMap::try_from(map_mut(&mut self.ebpf, map)?)?;
                m.keys().filter_map(Result::ok).collect()
            };
            let chosen: Vec<RateKey> = keys
                .into_iter()
                .filter(|k| {
                    let source = self.rate_source(k);
                    sources.is_none_or(|s| source.is_some_and(|n| s.contains(&n)))
                })
                .collect();
            let mut m: HashMap<_, RateKey, u64> = HashMap::try_from(map_mut(&mut self.ebpf, map)?)?;
            for key in &chosen {
                if m.remove(key).is_ok() && map == maps::RATE_BANS {
                    lifted += 1;
                }
            }
        }
        Ok(lifted)
    }
}
