//! The data path's clock constants (`ebpf/src/clock.rs`): the kernel's
//! tick, from its configuration, and the offset that makes `jiffies × tick`
//! read as `CLOCK_MONOTONIC`, from a sample of both. The loader sets them
//! as read-only globals; without them, the programs read the coarse clock
//! (`Clock::COARSE`), which is slower, never wrong.
//!
//! Both sources are the running kernel's own: `/proc/config.gz` (built
//! into the kernel) or `/boot/config-<release>` for `CONFIG_HZ`, and the
//! first `jiffies:` line of `/proc/timer_list` (root only), read between
//! two readings of `CLOCK_MONOTONIC`. A tick that does not fit the sample
//! (a config file of another build of the same release) is refused: a
//! 64-bit kernel starts `jiffies` at `2^32 − 300 × HZ` (`INITIAL_JIFFIES`)
//! and, on the tickless kernels clouds run, advances it by one for each
//! `TICK_NSEC` of `CLOCK_MONOTONIC`, so `jiffies` less its start, times the
//! tick, is the time since boot to within the boot's first moments. That
//! also keeps the two together for the life of the boot; programs pinned
//! by an earlier daemon keep the constants they were loaded with, which
//! are as good.

use std::{
    fs,
    io::{BufReader, Read as _},
};

use tracing::warn;

/// How far `jiffies` since boot, times the tick, may be from
/// `CLOCK_MONOTONIC` (the boot's first moments before the tick runs; a
/// wrong `HZ` is off by minutes, except within seconds of the 300th).
const PLAUSIBLE_NS: i128 = 10_000_000_000;

/// What the programs' `now()` is made of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Clock {
    /// Nanoseconds per jiffy (`TICK_NSEC`); 0: read the coarse clock.
    pub tick_ns: u64,
    /// `jiffies × tick_ns − CLOCK_MONOTONIC` (wrapping).
    pub offset_ns: u64,
}

impl Clock {
    /// `bpf_ktime_get_coarse_ns`: what a kernel whose tick is unknown gets.
    pub const COARSE: Clock = Clock {
        tick_ns: 0,
        offset_ns: 0,
    };

    /// The running kernel's: its tick and a sample of `jiffies` against
    /// `CLOCK_MONOTONIC`; [`Clock::COARSE`] if either cannot be read or
    /// they do not fit together.
    pub fn probe() -> Clock {
        let Some(hz) = kernel_config().as_deref().and_then(config_hz) else {
            return Clock::COARSE;
        };
        let tick_ns = tick_ns(hz);
        let Some((jiffies, monotonic_ns)) = jiffies_sample(tick_ns) else {
            return Clock::COARSE;
        };
        if !plausible(hz, jiffies, monotonic_ns) {
            warn!(
                hz,
                jiffies,
                monotonic_ns,
                "the kernel configuration's HZ does not fit its jiffies; the data path reads the coarse clock"
            );
            return Clock::COARSE;
        }
        Clock::from_sample(hz, jiffies, monotonic_ns)
    }

    /// The constants for a kernel of `hz` whose `jiffies` took the value
    /// `jiffies` at `monotonic_ns`.
    pub fn from_sample(hz: u64, jiffies: u64, monotonic_ns: u64) -> Clock {
        if hz == 0 {
            return Clock::COARSE;
        }
        let tick_ns = tick_ns(hz);
        Clock {
            tick_ns,
            offset_ns: jiffies.wrapping_mul(tick_ns).wrapping_sub(monotonic_ns),
        }
    }

    /// The time the programs read when the kernel's `jiffies` is `jiffies`
    /// (`ebpf/src/clock.rs`, written again for the tests).
    #[cfg(test)]
    fn at(&self, jiffies: u64) -> u64 {
        jiffies
            .wrapping_mul(self.tick_ns)
            .wrapping_sub(self.offset_ns)
    }
}

impl std::fmt::Display for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.tick_ns {
            0 => f.write_str("coarse clock (the kernel's tick is unknown)"),
            tick => write!(f, "jiffies, {tick} ns a tick"),
        }
    }
}

/// The running kernel's configuration, as text.
fn kernel_config() -> Option<String> {
    if let Ok(gz) = fs::read("/proc/config.gz") {
        let mut text = String::new();
        if flate2::read::GzDecoder::new(gz.as_slice())
            .read_to_string(&mut text)
            .is_ok()
        {
            return Some(text);
        }
    }
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    fs::read_to_string(format!("/boot/config-{}", release.trim())).ok()
}

/// `CONFIG_HZ` of a kernel configuration.
fn config_hz(config: &str) -> Option<u64> {
    config
        .lines()
        .find_map(|line| line.strip_prefix("CONFIG_HZ="))
        .and_then(|v| v.trim().parse().ok())
        .filter(|&hz| hz > 0)
}

/// The kernel's `TICK_NSEC` for `hz` (rounded as it rounds it).
fn tick_ns(hz: u64) -> u64 {
    (1_000_000_000 + hz / 2) / hz
}

/// `(jiffies, CLOCK_MONOTONIC ns when jiffies took that value)`: the
/// quickest of three reads of `/proc/timer_list` up to its first
/// `jiffies:` line, each between two readings of `CLOCK_MONOTONIC`.
/// `jiffies` took its value at the start of a tick, at most a tick before
/// it was read: the middle of that span is the estimate, within half a
/// tick and half the read.
fn jiffies_sample(tick_ns: u64) -> Option<(u64, u64)> {
    let mut best: Option<(u64, u64, u64)> = None;
    for _ in 0..3 {
        let before = monotonic_ns()?;
        let file = fs::File::open("/proc/timer_list").ok()?;
        let jiffies = first_jiffies(BufReader::new(file))?;
        let after = monotonic_ns()?;
        let took = after.saturating_sub(before);
        if best.is_none_or(|(_, _, t)| took < t) {
            best = Some((jiffies, before, took));
        }
    }
    let (jiffies, before, took) = best?;
    Some((jiffies, (before + took / 2).saturating_sub(tick_ns / 2)))
}

/// The value of the first `jiffies: N` line (the rest is not read: the
/// file goes on with every CPU's timers).
fn first_jiffies(text: impl std::io::BufRead) -> Option<u64> {
    text.lines()
        .map_while(Result::ok)
        .find_map(|l| l.strip_prefix("jiffies:")?.trim().parse().ok())
}

/// Whether `jiffies` at `monotonic_ns` fits a 64-bit kernel of `hz`: its
/// count since `INITIAL_JIFFIES`, times the tick, is the time since boot
/// to within [`PLAUSIBLE_NS`].
fn plausible(hz: u64, jiffies: u64, monotonic_ns: u64) -> bool {
    // `(unsigned int)(-300 * HZ)`, wrapping as C's does for any `HZ`.
    let initial = u64::from((hz as u32).wrapping_mul(300).wrapping_neg());
    let since_boot = i128::from(jiffies.wrapping_sub(initial) as i64) * i128::from(tick_ns(hz));
    (since_boot - i128::from(monotonic_ns)).abs() <= PLAUSIBLE_NS
}

/// `CLOCK_MONOTONIC` now, in ns: the programs' clock, to a tick.
pub(super) fn monotonic_ns() -> Option<u64> {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).ok()?;
    Some(t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tick_is_read_from_the_kernel_configuration() {
        let config =
            "# CONFIG_HZ_100 is not set\nCONFIG_HZ_250=y\nCONFIG_HZ=250\nCONFIG_HZ_PERIODIC=n\n";
        assert_eq!(config_hz(config), Some(250));
        assert_eq!(config_hz("CONFIG_HZ_1000=y\n"), None);
        assert_eq!(config_hz("CONFIG_HZ=0\n"), None);
        assert_eq!(config_hz("CONFIG_HZ=abc\n"), None);
    }

    #[test]
    fn jiffies_are_read_from_the_first_cpu_of_a_timer_list() {
        let text = "Timer List Version: v0.10\nHRTIMER_MAX_CLOCK_BASES: 8\nnow at 31744817072316 nsecs\n\ncpu: 0\n  .idle_jiffies   : 4302828360\n  .last_jiffies   : 4302828435\njiffies: 4302828436\n\ncpu: 1\njiffies: 4302828437\n";
        assert_eq!(first_jiffies(text.as_bytes()), Some(4_302_828_436));
        assert_eq!(first_jiffies("now at 7 nsecs\n".as_bytes()), None);
        assert_eq!(first_jiffies("jiffies: x\n".as_bytes()), None);
    }

    /// From this machine's `/proc/timer_list` (HZ 250, up 31744.8 s): the
    /// right HZ fits, the others do not, and early in a boot too.
    #[test]
    fn only_the_kernels_hz_fits_its_jiffies() {
        let (jiffies, monotonic) = (4_302_828_435, 31_744_817_072_316);
        assert!(plausible(250, jiffies, monotonic));
        for wrong in [100, 300, 1000] {
            assert!(!plausible(wrong, jiffies, monotonic), "HZ {wrong}");
        }
        // Five seconds after boot, HZ 1000: jiffies 2^32 - 300,000 + 5,000.
        let early = (1u64 << 32) - 300_000 + 5_000;
        assert!(plausible(1000, early, 5_000_000_000));
        for wrong in [100, 250, 300] {
            assert!(!plausible(wrong, early, 5_000_000_000), "HZ {wrong}");
        }
        // A config file's HZ is not trusted to be small: no overflow, and
        // a HZ past 10^9 has no tick (the programs read the coarse clock).
        let _ = plausible(u64::MAX, early, 5_000_000_000);
        assert_eq!(
            Clock::from_sample(u64::MAX, early, 5_000_000_000).tick_ns,
            0
        );
        assert!(!plausible(20_000_000, early, 5_000_000_000));
    }

    #[test]
    fn the_clock_reads_the_sampled_time_and_advances_a_tick_a_jiffy() {
        // HZ 300: TICK_NSEC is rounded, as the kernel rounds it.
        for (hz, tick) in [
            (100, 10_000_000),
            (250, 4_000_000),
            (300, 3_333_333),
            (1000, 1_000_000),
        ] {
            let jiffies = 4_294_892_296u64 + 123_456;
            let clock = Clock::from_sample(hz, jiffies, 31_744_817_072_316);
            assert_eq!(clock.tick_ns, tick);
            assert_eq!(clock.at(jiffies), 31_744_817_072_316);
            assert_eq!(clock.at(jiffies + 10), 31_744_817_072_316 + 10 * tick);
        }
        // Early in a boot `jiffies × tick` is below the monotonic time's
        // magnitude on no kernel, but the wrapping holds either way.
        let clock = Clock::from_sample(1000, 1, u64::MAX - 5);
        assert_eq!(clock.at(1), u64::MAX - 5);
        assert_eq!(Clock::from_sample(0, 1, 2), Clock::COARSE);
    }
}
