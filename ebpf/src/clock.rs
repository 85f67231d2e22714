//! The data path's clock: `CLOCK_MONOTONIC` in ns, to the kernel's last
//! tick. Flow ages, fragment and DHCP windows, the drop-event budget and
//! rate-limit buckets read it; the daemon writes seeded flows in the same
//! clock and turns event times into wall time with it.
//!
//! Read as `jiffies × tick − offset`: `bpf_jiffies64`, which the verifier
//! inlines as one load of `jiffies` (1.6 ns over the empty program on the
//! benchmark's machine, against 19.2 ns for a call of
//! `bpf_ktime_get_coarse_ns`: `floor_jiffies`, `floor_coarse`). The tick
//! and the offset are read-only globals the loader sets from the running
//! kernel (`daemon/src/dataplane/clock.rs`), so the verifier knows them
//! and the multiply is by a constant. A loader that could not learn the
//! tick leaves it 0, and the clock is `bpf_ktime_get_coarse_ns` (the
//! verifier removes the branch not taken). Both step once a tick: the
//! kernel advances `jiffies` and the coarse clock in the same tick handler.

use aya_ebpf::{
    Global,
    helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns},
};

/// Nanoseconds per jiffy (the kernel's `TICK_NSEC`); 0: unknown, read the
/// coarse clock instead.
#[unsafe(no_mangle)]
static CLOCK_TICK_NS: Global<u64> = Global::new(0);

/// `jiffies × tick − CLOCK_MONOTONIC` when the loader sampled both
/// (wrapping).
#[unsafe(no_mangle)]
static CLOCK_OFFSET_NS: Global<u64> = Global::new(0);

/// `CLOCK_MONOTONIC` at the kernel's last tick, in ns.
#[inline(always)]
pub fn now() -> u64 {
    let tick = CLOCK_TICK_NS.load();
    if tick == 0 {
        // SAFETY: a helper without arguments or side effects.
        return unsafe { bpf_ktime_get_coarse_ns() };
    }
    // SAFETY: a helper without arguments or side effects (inlined by the
    // verifier as a load of `jiffies`).
    let jiffies = unsafe { bpf_jiffies64() };
    jiffies
        .wrapping_mul(tick)
        .wrapping_sub(CLOCK_OFFSET_NS.load())
}
