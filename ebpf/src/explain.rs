//! Explain mode: the same programs, loaded a second time by the daemon with
//! the read-only global `EXPLAIN` set to 1 (`portcullis explain`). The
//! verifier knows a frozen `.rodata` value, so in the live instance
//! (`EXPLAIN` = 0) every branch below is dead code it removes, and in the
//! explain instance every write of the data path is: counters
//! (`VERDICTS`, `RULE_STATS_g`, `DENY_STATS`), the flow tables, `FRAGMENTS`,
//! `DHCP_REQUESTS`, the event budget and `EVENTS`. What the run decided is
//! written to `EXPLAIN_RESULT` instead (the explain instance's own map,
//! never pinned). The verdict code is the same code: nothing here decides.
//!
//! | map              | type      | key | value |
//! |------------------|-----------|-----|-------|
//! | `EXPLAIN_RESULT` | array (1) | 0   | `ExplainResult`: reason, audit, slot, deny set, generation |

use aya_ebpf::{Global, macros::map, maps::Array};
use portcullis_common::{ExplainResult, Reason};

/// 1 in the explain instance (set by the loader), 0 otherwise.
#[unsafe(no_mangle)]
static EXPLAIN: Global<u8> = Global::new(0);

#[map]
static EXPLAIN_RESULT: Array<ExplainResult> = Array::with_max_entries(1, 0);

/// Whether this is the explain instance: a constant to the verifier.
#[inline(always)]
pub fn on() -> bool {
    EXPLAIN.load() != 0
}

#[inline(always)]
fn result(f: impl FnOnce(&mut ExplainResult)) {
    if let Some(r) = EXPLAIN_RESULT.get_ptr_mut(0) {
        // SAFETY: pointer from a successful array lookup; the daemon runs
        // one explain at a time.
        f(unsafe { &mut *r });
    }
}

/// The reason the live instance would count (`PassAudit`: the audit flag).
#[inline(always)]
pub fn reason(reason: Reason) {
    result(|r| {
        if reason == Reason::PassAudit {
            r.audited = 1;
        } else {
            r.reason = reason as u32;
        }
    });
}

/// The rule slot the live instance would credit.
#[inline(always)]
pub fn slot(slot: u32) {
    result(|r| r.slot = slot);
}

/// The deny set the live instance would count the drop against.
#[inline(always)]
pub fn deny_set(set: u32) {
    result(|r| r.deny_set = set);
}

/// The generation of the rules this packet reads.
#[inline(always)]
pub fn generation(generation: usize) {
    result(|r| r.generation = generation as u32);
}
