//! The maps shared with user space. All are pinned by name under the daemon's
//! pin directory, so they outlive the daemon and a restarted daemon reuses them.
//!
//! | map          | type            | key            | value      | written by |
//! |--------------|-----------------|----------------|------------|------------|
//! | `VERDICTS`   | per-CPU array   | `Reason` index | `Counter`  | XDP and TC |
//! | `SETTINGS`   | array (2)       | generation     | `Settings` | daemon     |

use aya_ebpf::{
    macros::map,
    maps::{Array, PerCpuArray},
};
use portcullis_common::{Counter, Reason, Settings};

#[map]
pub static VERDICTS: PerCpuArray<Counter> = PerCpuArray::pinned(Reason::COUNT, 0);

/// One entry per generation, switched with the rules.
#[map]
pub static SETTINGS: Array<Settings> = Array::pinned(2, 0);

/// Stage 4: count. Per-CPU, so no atomics on the hot path.
#[inline(always)]
pub fn count(reason: Reason, bytes: u64) {
    if crate::explain::on() {
        crate::explain::reason(reason);
        return;
    }
    if let Some(c) = VERDICTS.get_ptr_mut(reason as u32) {
        // SAFETY: the pointer comes from a successful lookup in a per-CPU map,
        // so it is valid and only this CPU writes it while we run.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}

/// The settings of `generation`, or all-off when not written yet.
#[inline(always)]
pub fn settings(generation: usize) -> Settings {
    match SETTINGS.get(generation as u32) {
        Some(s) => *s,
        None => Settings::default(),
    }
}
