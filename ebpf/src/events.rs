//! Stage 5 (drops only): report. A dropped packet's addresses, ports,
//! protocol, reason, direction, interface index (and for a ban, the deny
//! set) go to the `EVENTS` ring buffer, at most
//! `EVENTS_PER_SECOND_PER_CPU` a second per CPU (a token bucket in a per-CPU
//! array), so a flood costs a counter, not a ring buffer full of copies.
//! The verdict never depends on this: a full ring buffer only loses events.

use aya_ebpf::{
    macros::map,
    maps::{PerCpuArray, RingBuf},
};
use portcullis_common::{DropEvent, EVENTS_PER_SECOND_PER_CPU, Reason};

use crate::{clock::now, parse::Ip};

#[map]
pub static EVENTS: RingBuf = RingBuf::pinned(256 * 1024, 0);

/// Per CPU: (start of the current one-second window, events in it).
/// Pinned like every other map, so a restarted daemon can adopt the pinned
/// programs (which use it) knowing they use only the maps pinned now.
#[map]
static EVENT_BUDGET: PerCpuArray<[u64; 2]> = PerCpuArray::pinned(1, 0);

const SECOND: u64 = 1_000_000_000;

#[inline(always)]
pub fn report(ip: &Ip, reason: Reason, dir: u8, ifindex: u32) {
    if crate::explain::on() {
        return;
    }
    let Some(budget) = EVENT_BUDGET.get_ptr_mut(0) else {
        return;
    };
    let now = now();
    // SAFETY: per-CPU entry from a successful lookup; only this CPU uses it.
    let budget = unsafe { &mut *budget };
    if now.saturating_sub(budget[0]) >= SECOND {
        budget[0] = now;
        budget[1] = 0;
    }
    if budget[1] >= EVENTS_PER_SECOND_PER_CPU {
        return;
    }
    budget[1] += 1;
    let event = DropEvent {
        time_ns: now,
        src: ip.src,
        dst: ip.dst,
        sport: ip.sport,
        dport: ip.dport,
        proto: ip.proto,
        family: ip.family,
        reason: reason as u8,
        dir,
        ifindex,
        deny_set: if reason as u32 == Reason::DropDenied as u32 {
            crate::deny::set_of(ip)
        } else {
            0
        },
    };
    let _ = EVENTS.output(&event, 0);
}
