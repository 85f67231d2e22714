//! The data path's clock constants (`ebpf/src/clock.rs`): the kernel's
//! tick, from its configuration, and the offset that makes `jiffies × tick`
//! read as `CLOCK_MONOTONIC`, from one sample of both. The loader sets
//! them as read-only globals; without either, the programs read the coarse
//! clock (`Clock::COARSE`), which is slower, never wrong.
//!
//! Both sources are the running kernel's own: `/proc/config.gz` (built
//! into the kernel) or `/boot/config-<release>` for `CONFIG_HZ`, and
//! `/proc/timer_list` (root only) for `jiffies` beside `now at … nsecs`,
//! which is `CLOCK_MONOTONIC`. The kernel advances `jiffies` by one for
//! each `TICK_NSEC` of `CLOCK_MONOTONIC`, so the two stay together for the
//! life of the boot; programs pinned by an earlier daemon keep the
//! constants they were loaded with, which are as good.

use std::{fs, io::Read as _};

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

    /// The running kernel's: its tick and one sample of `jiffies` against
    /// `CLOCK_MONOTONIC`; [`Clock::COARSE`] if either cannot be read.
    pub fn probe() -> Clock {
        let Some(hz) = kernel_config().as_deref().and_then(config_hz) else {
            return Clock::COARSE;
        };
        let Some((monotonic_ns, jiffies)) = fs::read_to_string("/proc/timer_list")
            .ok()
            .as_deref()
            .and_then(timer_list_sample)
        else {
            return Clock::COARSE;
        };
        Clock::from_sample(hz, jiffies, monotonic_ns)
    }

    /// The constants for a kernel of `hz` that read `jiffies` at
    /// `monotonic_ns`. The sample is one tick old at most (a tick's first
    /// nanosecond is when `jiffies` took its value), so the clock it makes
    /// lags `CLOCK_MONOTONIC` by less than a tick, as the coarse clock does.
    pub fn from_sample(hz: u64, jiffies: u64, monotonic_ns: u64) -> Clock {
        if hz == 0 {
            return Clock::COARSE;
        }
        let tick_ns = (1_000_000_000 + hz / 2) / hz;
        Clock {
            tick_ns,
            offset_ns: jiffies.wrapping_mul(tick_ns).wrapping_sub(monotonic_ns),
        }
    }

    /// The time the programs read when the kernel's `jiffies` is `jiffies`.
    pub fn at(&self, jiffies: u64) -> u64 {
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

/// `(CLOCK_MONOTONIC ns, jiffies)` from `/proc/timer_list`: its header's
/// `now at N nsecs` and the first `jiffies: N` after it.
fn timer_list_sample(text: &str) -> Option<(u64, u64)> {
    let mut lines = text.lines();
    let now = lines.by_ref().find_map(|l| {
        l.strip_prefix("now at ")?
            .strip_suffix(" nsecs")?
            .trim()
            .parse()
            .ok()
    })?;
    let jiffies = lines.find_map(|l| l.strip_prefix("jiffies:")?.trim().parse().ok())?;
    Some((now, jiffies))
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
    fn a_timer_list_gives_the_monotonic_time_and_jiffies() {
        let text = "Timer List Version: v0.10\nHRTIMER_MAX_CLOCK_BASES: 8\nnow at 31744817072316 nsecs\n\ncpu: 0\n  .idle_jiffies   : 4302828360\n  .last_jiffies   : 4302828435\njiffies: 4302828436\n\ncpu: 1\njiffies: 4302828437\n";
        assert_eq!(
            timer_list_sample(text),
            Some((31_744_817_072_316, 4_302_828_436))
        );
        assert_eq!(timer_list_sample("jiffies: 5\nnow at 7 nsecs\n"), None);
        assert_eq!(timer_list_sample("now at 7 nsecs\n"), None);
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
