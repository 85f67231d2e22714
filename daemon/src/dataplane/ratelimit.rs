//! The rate limiter's bans (`RATE_BANS`; see `ebpf/src/ratelimit.rs`): the
//! data path writes them when a source exceeds its limit; the daemon lists
//! them (the deny listing's `ratelimit` set) and removes the expired ones.

use aya::maps::HashMap;
use ipnet::IpNet;
use portcullis_common::{FAMILY_V6, RateKey, maps};

use super::{Dataplane, boottime_ns, map_mut};

/// A source the data path banned, and the `CLOCK_BOOTTIME` ns it is banned
/// until.
pub type RateBan = (IpNet, u64);

impl Dataplane {
    /// The unexpired bans (IPv6 sources as the prefix their bucket is
    /// kept by); expired ones are removed.
    pub fn rate_bans(&mut self) -> anyhow::Result<Vec<RateBan>> {
        let v6_prefix = self.rate_limit.as_ref().map_or(128, |l| l.ipv6_prefix);
        let mut bans: HashMap<_, RateKey, u64> =
            HashMap::try_from(map_mut(&mut self.ebpf, maps::RATE_BANS)?)?;
        let now = boottime_ns();
        let mut out = Vec::new();
        let mut expired = Vec::new();
        for (key, until) in bans.iter().filter_map(Result::ok) {
            if until <= now {
                expired.push(key);
                continue;
            }
            let net = if key.family == FAMILY_V6 {
                ipnet::Ipv6Net::new(key.addr.into(), v6_prefix).map(IpNet::V6)
            } else {
                let [a, b, c, d, ..] = key.addr;
                ipnet::Ipv4Net::new([a, b, c, d].into(), 32).map(IpNet::V4)
            };
            if let Ok(net) = net {
                out.push((net, until));
            }
        }
        for key in expired {
            let _ = bans.remove(&key);
        }
        out.sort();
        Ok(out)
    }
}
