//! The maps shared with user space. All are pinned by name under the daemon's
//! pin directory, so they outlive the daemon and a restarted daemon reuses them.
//!
//! | map          | type            | key            | value      | written by |
//! |--------------|-----------------|----------------|------------|------------|
//! | `VERDICTS`   | per-CPU array   | `Reason` index | `Counter`  | XDP        |
//! | `PORT_CLASS` | array (131072)  | `port_index()` | `u32` class, 0 = no rule | daemon |
//! | `SETTINGS`   | array (1)       | 0              | `Settings` | daemon     |

use aya_ebpf::{
    macros::map,
    maps::{Array, PerCpuArray},
};
use portcullis_common::{Counter, PORT_CLASS_ENTRIES, Reason, Settings};

#[map]
pub static VERDICTS: PerCpuArray<Counter> = PerCpuArray::pinned(Reason::COUNT, 0);

#[map]
pub static PORT_CLASS: Array<u32> = Array::pinned(PORT_CLASS_ENTRIES, 0);

#[map]
pub static SETTINGS: Array<Settings> = Array::pinned(1, 0);

/// Stage 4: count. Per-CPU, so no atomics on the hot path.
#[inline(always)]
pub fn count(reason: Reason, bytes: u64) {
    if let Some(c) = VERDICTS.get_ptr_mut(reason as u32) {
        // SAFETY: the pointer comes from a successful lookup in a per-CPU map,
        // so it is valid and only this CPU writes it while we run.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}

/// The settings entry, or all-off when user space has not written it yet.
#[inline(always)]
pub fn settings() -> Settings {
    match SETTINGS.get(0) {
        Some(s) => *s,
        None => Settings::default(),
    }
}
