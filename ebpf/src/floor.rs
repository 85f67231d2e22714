//! The kernel's floor for each stage of the data path: XDP programs that do
//! one thing each, run by the benchmark (`cargo xtask bench`) with the same
//! `BPF_PROG_TEST_RUN` harness as the real ingress program, so a stage's cost
//! can be set against what the kernel itself charges for it.
//!
//! A binary of its own (`portcullis-floor`), so the daemon's object, and so
//! what the daemon loads and the maps it creates, stay as they are. Its maps
//! are not pinned.
//!
//! | program          | does                                                         |
//! |------------------|--------------------------------------------------------------|
//! | `floor_empty`    | nothing: returns XDP_PASS (the program call itself)          |
//! | `floor_array`    | one array read (as the live generation or its settings)      |
//! | `floor_counter`  | one per-CPU counter update (as a verdict or rule counter)    |
//! | `floor_lru_hit`  | one LRU hash lookup of a `FlowKey` that is present           |
//! | `floor_lru_miss` | one LRU hash lookup of a `FlowKey` that is absent            |
//! | `floor_ktime`    | one `bpf_ktime_get_ns` (the exact clock, to compare)         |
//! | `floor_coarse`   | one `bpf_ktime_get_coarse_ns` (conntrack refresh, the event budget) |
//! | `floor_jiffies`  | one `bpf_jiffies64` (the verifier inlines it as a load of `jiffies`) |
//! | `floor_lru16_miss` | one LRU lookup of a 16-byte key (an IPv4 5-tuple), absent  |
//! | `floor_lru16_hit` | the same key present (as `CONNTRACK4` for an established IPv4 flow) |
//! | `floor_parse`    | Ethernet, IPv4 (IHL) or IPv6, TCP/UDP ports, bounds-checked  |
//! | `floor_hash`     | one hash lookup of a `u64` key that is present (as `IFDIR`)  |
//! | `floor_lru16_update` | one LRU update of a 16-byte key (as `EMBRYO4` for an admitted SYN under an egress allowlist, or for this host's SYN-ACK) |
//! | `floor_lru16_update_percpu` | the same in an LRU with per-CPU lists (`BPF_F_NO_COMMON_LRU`) |
//! | `floor_cold`     | one read of a 256 MiB array at an index from the packet's source address |
//! | `floor_cold8`    | eight such reads, each index from the value the last one read |
//!
//! The cold rows price what the rule lookup pays at 100k rules and the
//! others do not show: its reads land in 225 MiB of rule maps, a
//! different place for each packet's source, so a packet's first run
//! misses the caches and the TLB on each read, and its next runs
//! (`BPF_PROG_TEST_RUN` repeats each packet) find them cached, as the rule
//! lookup's do. The lookup's reads depend on each other (the IPv4 table's
//! steps, the region, the segments' binary search), as `floor_cold8`'s do.
//!
//! The LRU map has the connection table's key and value types, size and
//! flags (`CONNTRACK6` in `conntrack.rs`: `FlowKey` -> `Flow`,
//! `CONNTRACK_DEFAULT_ENTRIES`, no flags; `FLOOR_LRU16` stands in for
//! `CONNTRACK4`'s 16-byte key). The key is built on the stack
//! from constants: building it from the packet is the parse floor's part.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod programs {
    use core::ptr::read_volatile;

    use aya_ebpf::{
        bindings::xdp_action,
        helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
        macros::{map, xdp},
        maps::{Array, HashMap, LruHashMap, PerCpuArray},
        programs::XdpContext,
    };
    use portcullis_common::{
        BPF_F_MMAPABLE, CONNTRACK_DEFAULT_ENTRIES, Counter, Flow, FlowKey, Reason,
    };

    #[map]
    static FLOOR_LRU: LruHashMap<FlowKey, Flow> =
        LruHashMap::with_max_entries(CONNTRACK_DEFAULT_ENTRIES, 0);

    /// As `FLOOR_LRU` with the smallest IPv4 5-tuple key (addresses, ports,
    /// protocol and padding: 16 bytes), to price a smaller key.
    #[map]
    static FLOOR_LRU16: LruHashMap<[u32; 4], Flow> =
        LruHashMap::with_max_entries(CONNTRACK_DEFAULT_ENTRIES, 0);

    /// As `FLOOR_LRU16` with a free list per CPU (`BPF_F_NO_COMMON_LRU`):
    /// an update takes no lock shared between CPUs.
    #[map]
    static FLOOR_LRU16_PERCPU: LruHashMap<[u32; 4], Flow> =
        LruHashMap::with_max_entries(CONNTRACK_DEFAULT_ENTRIES, 2);

    #[map]
    static FLOOR_ARRAY: Array<u64> = Array::with_max_entries(2, 0);

    /// `FLOOR_COLD`'s entries: 2^25 of 8 bytes, 256 MiB.
    const COLD_ENTRIES: u32 = 1 << 25;

    /// An array the size of a 100k-rule set's maps, mmapable as the rule
    /// arrays are (`BPF_F_MMAPABLE`): the cold rows read it.
    #[map]
    static FLOOR_COLD: Array<u64> = Array::with_max_entries(COLD_ENTRIES, BPF_F_MMAPABLE);

    /// As `IFDIR` (`rules.rs`): a small hash of `u64` keys; the benchmark
    /// inserts the key `floor_hash` looks up ([`HASH_KEY`]).
    #[map]
    static FLOOR_HASH: HashMap<u64, u32> = HashMap::with_max_entries(64, 0);

    /// Generation 0, ifindex 1: an `IFDIR` key.
    const HASH_KEY: u64 = 1;

    #[map]
    static FLOOR_COUNTERS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(Reason::COUNT, 0);

    /// The key `floor_lru_hit` looks up; the benchmark inserts it
    /// (`local_port` 1). `floor_lru_miss` looks up `local_port` 2.
    #[inline(always)]
    fn key(local_port: u16) -> FlowKey {
        FlowKey {
            local: [10, 200, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            remote: [10, 200, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            local_port,
            remote_port: 40000,
            proto: 6,
            family: 4,
            _pad: [0; 2],
        }
    }

    #[inline(always)]
    fn pass_unless(zero: bool) -> u32 {
        if zero {
            xdp_action::XDP_DROP
        } else {
            xdp_action::XDP_PASS
        }
    }

    #[xdp]
    pub fn floor_empty(_ctx: XdpContext) -> u32 {
        xdp_action::XDP_PASS
    }

    #[xdp]
    pub fn floor_array(_ctx: XdpContext) -> u32 {
        match FLOOR_ARRAY.get_ptr(1) {
            // SAFETY: a pointer from a successful array lookup.
            Some(v) => pass_unless(unsafe { read_volatile(v) } == u64::MAX),
            None => xdp_action::XDP_ABORTED,
        }
    }

    #[xdp]
    pub fn floor_counter(ctx: XdpContext) -> u32 {
        let bytes = (ctx.data_end() - ctx.data()) as u64;
        if let Some(c) = FLOOR_COUNTERS.get_ptr_mut(Reason::PassRule as u32) {
            // SAFETY: a per-CPU entry from a successful lookup; only this
            // CPU writes it while we run.
            unsafe {
                (*c).packets += 1;
                (*c).bytes += bytes;
            }
        }
        xdp_action::XDP_PASS
    }

    #[inline(always)]
    fn lru(local_port: u16) -> u32 {
        let k = key(local_port);
        // SAFETY: the value is only read, as a copy.
        match unsafe { FLOOR_LRU.get(&k) } {
            Some(f) => pass_unless(f.state == u8::MAX),
            None => xdp_action::XDP_PASS,
        }
    }

    #[xdp]
    pub fn floor_lru_hit(_ctx: XdpContext) -> u32 {
        lru(1)
    }

    #[xdp]
    pub fn floor_lru_miss(_ctx: XdpContext) -> u32 {
        lru(2)
    }

    /// One lookup in `FLOOR_LRU16` of the key with `local_port`; the
    /// benchmark inserts `local_port` 1 (`floor_lru16_hit`).
    #[inline(always)]
    fn lru16(local_port: u32) -> u32 {
        let k: [u32; 4] = [0x0a00_c80a, 0x0200_c80a, 40000 << 16 | local_port, 6];
        // SAFETY: the value is only read, as a copy.
        match unsafe { FLOOR_LRU16.get(&k) } {
            Some(f) => pass_unless(f.state == u8::MAX),
            None => xdp_action::XDP_PASS,
        }
    }

    #[xdp]
    pub fn floor_lru16_miss(_ctx: XdpContext) -> u32 {
        lru16(2)
    }

    #[xdp]
    pub fn floor_lru16_hit(_ctx: XdpContext) -> u32 {
        lru16(1)
    }

    #[xdp]
    pub fn floor_hash(_ctx: XdpContext) -> u32 {
        // SAFETY: the value is only read, as a copy.
        match unsafe { FLOOR_HASH.get(&HASH_KEY) } {
            Some(d) => pass_unless(*d == u32::MAX),
            None => xdp_action::XDP_ABORTED,
        }
    }

    #[xdp]
    pub fn floor_lru16_update(_ctx: XdpContext) -> u32 {
        lru16_update(&FLOOR_LRU16)
    }

    #[xdp]
    pub fn floor_lru16_update_percpu(_ctx: XdpContext) -> u32 {
        lru16_update(&FLOOR_LRU16_PERCPU)
    }

    /// One update of a fixed 16-byte key in `map`.
    #[inline(always)]
    fn lru16_update(map: &LruHashMap<[u32; 4], Flow>) -> u32 {
        let k: [u32; 4] = [0x0a00_c80a, 0x0200_c80a, 40000 << 16 | 3, 6];
        let flow = Flow {
            last_seen_ns: 1,
            state: 1,
            _pad: [0; 7],
        };
        pass_unless(map.insert(&k, &flow, 0).is_err())
    }

    /// An index of `FLOOR_COLD` from `x` (a multiplicative hash).
    #[inline(always)]
    fn cold_index(x: u32) -> u32 {
        x.wrapping_mul(0x9e37_79b1) >> 7
    }

    /// The value at `index` of `FLOOR_COLD` (0: every entry is).
    #[inline(always)]
    fn cold(index: u32) -> Option<u64> {
        let v = FLOOR_COLD.get_ptr(index)?;
        // SAFETY: a pointer from a successful array lookup, read once.
        Some(unsafe { read_volatile(v) })
    }

    /// Four bytes of the source address (IPv4: all of it; IPv6: its
    /// middle), different for each of the benchmark's packets.
    #[inline(always)]
    fn source_bits(ctx: &XdpContext) -> Option<u32> {
        bytes::<4>(ctx, 26).map(u32::from_ne_bytes)
    }

    #[xdp]
    pub fn floor_cold(ctx: XdpContext) -> u32 {
        match source_bits(&ctx).and_then(|x| cold(cold_index(x))) {
            Some(v) => pass_unless(v == u64::MAX),
            None => xdp_action::XDP_ABORTED,
        }
    }

    #[xdp]
    pub fn floor_cold8(ctx: XdpContext) -> u32 {
        let Some(mut x) = source_bits(&ctx) else {
            return xdp_action::XDP_ABORTED;
        };
        // Unrolled (eight reads, no loop for the verifier to bound); each
        // index waits for the value before it.
        macro_rules! step {
            () => {
                match cold(cold_index(x)) {
                    Some(v) => x = x.wrapping_add(1) ^ v as u32,
                    None => return xdp_action::XDP_ABORTED,
                }
            };
        }
        step!();
        step!();
        step!();
        step!();
        step!();
        step!();
        step!();
        step!();
        pass_unless(x == u32::MAX)
    }

    #[xdp]
    pub fn floor_ktime(_ctx: XdpContext) -> u32 {
        // SAFETY: a helper without arguments or side effects.
        pass_unless(unsafe { bpf_ktime_get_ns() } == 0)
    }

    #[xdp]
    pub fn floor_coarse(_ctx: XdpContext) -> u32 {
        // SAFETY: a helper without arguments or side effects.
        pass_unless(unsafe { bpf_ktime_get_coarse_ns() } == 0)
    }

    #[xdp]
    pub fn floor_jiffies(_ctx: XdpContext) -> u32 {
        // SAFETY: a helper without arguments or side effects.
        pass_unless(unsafe { bpf_jiffies64() } == 0)
    }

    /// `N` bytes at `offset`, bounds-checked as the data path's parser does.
    #[inline(always)]
    fn bytes<const N: usize>(ctx: &XdpContext, offset: usize) -> Option<[u8; N]> {
        let (start, end) = (ctx.data(), ctx.data_end());
        if offset > 512 || start + offset + N > end {
            return None;
        }
        // SAFETY: the check above keeps the N bytes inside the packet.
        Some(unsafe { *((start + offset) as *const [u8; N]) })
    }

    #[inline(always)]
    fn parse(ctx: &XdpContext) -> Option<(u8, u16, u16)> {
        let ethertype = u16::from_be_bytes(bytes::<2>(ctx, 12)?);
        let (proto, l4) = match ethertype {
            0x0800 => {
                let [vihl, ..] = bytes::<1>(ctx, 14)?;
                let ihl = ((vihl & 0x0f) as usize) * 4;
                if vihl >> 4 != 4 || ihl < 20 {
                    return None;
                }
                let h = bytes::<20>(ctx, 14)?;
                (h[9], 14 + ihl)
            }
            0x86dd => {
                let h = bytes::<40>(ctx, 14)?;
                (h[6], 54)
            }
            _ => return None,
        };
        let p = bytes::<4>(ctx, l4)?;
        Some((
            proto,
            u16::from_be_bytes([p[0], p[1]]),
            u16::from_be_bytes([p[2], p[3]]),
        ))
    }

    #[xdp]
    pub fn floor_parse(ctx: XdpContext) -> u32 {
        match parse(&ctx) {
            Some((proto, sport, dport)) => pass_unless(proto == 0 && sport == dport),
            None => xdp_action::XDP_DROP,
        }
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
