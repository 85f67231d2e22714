//! Plain data shared by the Portcullis eBPF programs and user space.
//!
//! Everything here is `#[repr(C)]` (or a constant) so both sides agree on the
//! byte layout of map keys and values. With the `user` feature the types also
//! implement [`aya::Pod`], which user space needs to read and write maps.
//!
//! Changing a layout or renumbering a constant changes what the pinned maps
//! contain: bump [`LAYOUT_VERSION`] when you do.
#![no_std]

/// Version of the map layouts below. Recorded beside the pins, so a daemon can
/// tell whether the maps it finds pinned were written by a compatible version.
pub const LAYOUT_VERSION: u32 = 13;

/// Names of the maps, as the eBPF object declares them and as they are pinned.
pub mod maps {
    /// `PerCpuArray<Counter>` indexed by [`crate::Reason`].
    pub const VERDICTS: &str = "VERDICTS";
    /// `Array<u32>` with a single entry: which generation (0 or 1) of the
    /// rule maps below is live. The data path reads it at most once per
    /// packet (a packet of an established flow does not read it).
    pub const ACTIVE: &str = "ACTIVE";
    /// `Array<u32>` per generation: IPv4 stride table root, indexed by
    /// direction * 65536 + the address's top 16 bits (see `V4_NODE`).
    pub const V4_ROOT: [&str; 2] = ["V4_ROOT_0", "V4_ROOT_1"];
    /// `Array<u32>` per generation: IPv4 stride table chunks of 16 entries,
    /// one per 4 more bits of the address.
    pub const V4_CHUNKS: [&str; 2] = ["V4_CHUNKS_0", "V4_CHUNKS_1"];
    /// `LpmTrie<RuleKey6, u32>` per generation: (direction, IPv6 prefix) ->
    /// region, for prefixes shorter than /32 (up to [`crate::V6_SHORT_MAX`]
    /// bits) and those of a /32 whose bucket overflowed.
    pub const SRC6: [&str; 2] = ["SRC6_0", "SRC6_1"];
    /// `HashMap<V6BucketKey, V6Lengths>` per generation: (direction, the top
    /// 32 bits of an address) -> the prefix lengths (32..=128) that exist
    /// under that /32, longest first. Absent: no such prefix covers it.
    pub const V6_BUCKETS: [&str; 2] = ["V6_BUCKETS_0", "V6_BUCKETS_1"];
    /// `HashMap<V6PrefixKey, u32>` per generation: (direction, length,
    /// address masked to it) -> region, for prefixes of /32 and longer.
    pub const V6_PREFIXES: [&str; 2] = ["V6_PREFIXES_0", "V6_PREFIXES_1"];
    /// `Array<Region>` per generation.
    pub const REGIONS: [&str; 2] = ["REGIONS_0", "REGIONS_1"];
    /// `Array<Segment>` per generation.
    pub const SEGMENTS: [&str; 2] = ["SEGMENTS_0", "SEGMENTS_1"];
    /// `PerCpuArray<Counter>` per generation, indexed by rule slot.
    pub const RULE_STATS: [&str; 2] = ["RULE_STATS_0", "RULE_STATS_1"];
    /// `HashMap<u64, u32>`: (generation << 32 | ifindex) -> the ingress
    /// direction byte ([`crate::ingress_dir`]) of an interface rules name;
    /// absent: `Settings::ingress_dir` of that generation.
    pub const IFDIR: &str = "IFDIR";
    /// `Array<Settings>`, one entry per generation (2).
    pub const SETTINGS: &str = "SETTINGS";
    /// `LruHashMap<FlowKey4, Flow>`: IPv4 flows the host opened (connection
    /// table). One table per family, so each key is as small as its 5-tuple.
    pub const CONNTRACK4: &str = "CONNTRACK4";
    /// `LruHashMap<FlowKey, Flow>`: IPv6 flows the host opened.
    pub const CONNTRACK6: &str = "CONNTRACK6";
    /// Both connection tables, IPv4 first; each holds up to the configured
    /// number of connections.
    pub const CONNTRACK: [&str; 2] = [CONNTRACK4, CONNTRACK6];
    /// `PerCpuArray<CachedFlow4>` / `PerCpuArray<CachedFlow6>`, each
    /// [`crate::FLOW_CACHE_SLOTS`] a CPU: the established-flow caches, direct
    /// mapped, in front of the connection tables on ingress
    /// (`ebpf/src/flowcache.rs`).
    pub const FLOW_CACHE: [&str; 2] = ["FLOW_CACHE4", "FLOW_CACHE6"];
    /// `Array<u64>`, 1 entry: the flow caches' epoch; a slot admits only
    /// in the epoch it was written in. The daemon moves it on after every
    /// removal from the connection tables.
    pub const FLOW_CACHE_EPOCH: &str = "FLOW_CACHE_EPOCH";
    /// `LruHashMap<FlowKey4, Flow>` (IPv4) and `LruHashMap<FlowKey, Flow>`
    /// (IPv6): inbound flows the rules admitted. They admit no inbound
    /// packet (the rules decide each); they let this host's replies out
    /// under an egress allowlist and relate ICMP errors to them. Apart from
    /// the connection tables, so an inbound flood cannot evict their flows.
    pub const INBOUND: [&str; 2] = ["INBOUND4", "INBOUND6"];
    /// `LruHashMap<FlowKey4, Flow>` / `LruHashMap<FlowKey, Flow>`: as
    /// `INBOUND`, for protocols other than TCP (no handshake to wait for),
    /// so a flood of them cannot evict an inbound TCP connection.
    pub const INBOUND_OTHER: [&str; 2] = ["INBOUND_OTHER4", "INBOUND_OTHER6"];
    /// `LruHashMap<FlowKey4, Embryo>` (IPv4) and `LruHashMap<FlowKey,
    /// Embryo>` (IPv6): inbound TCP connections the rules admitted whose
    /// handshake has not completed. A flow moves to `INBOUND` only with the
    /// ACK of this host's SYN-ACK, so a flood of SYNs (spoofed or not)
    /// evicts embryos, never an established inbound flow.
    pub const EMBRYO: [&str; 2] = ["EMBRYO4", "EMBRYO6"];
    /// `LruHashMap<FragKey, u64>`: fragmented packets whose first fragment
    /// passed, per direction.
    pub const FRAGMENTS: &str = "FRAGMENTS";
    /// `Array<u64>`, 2 entries (`DHCP_V4`, `DHCP_V6`): when this host last
    /// sent a DHCP client request of that family.
    pub const DHCP_REQUESTS: &str = "DHCP_REQUESTS";
    /// `RingBuf` of `DropEvent`s (rate-limited per CPU).
    pub const EVENTS: &str = "EVENTS";
    /// `LpmTrie<[u8; 4], DenyEntry>`: banned IPv4 prefixes -> set and expiry.
    pub const DENY_V4: &str = "DENY_V4";
    /// `LpmTrie<[u8; 16], DenyEntry>`: banned IPv6 prefixes -> set and expiry.
    pub const DENY_V6: &str = "DENY_V6";
    /// `LpmTrie<[u8; 4], u32>`: the admin networks no ban applies to.
    pub const DENY_EXEMPT_V4: &str = "DENY_EXEMPT_V4";
    /// `LpmTrie<[u8; 16], u32>`: the same for IPv6.
    pub const DENY_EXEMPT_V6: &str = "DENY_EXEMPT_V6";
    /// `PerCpuArray<Counter>` indexed by deny set id: what each set dropped.
    pub const DENY_STATS: &str = "DENY_STATS";
    /// `PerCpuHashMap<VolumeKey, Counter>`: what left this host per
    /// destination (packets count segments of offloaded frames). A plain
    /// hash, not an LRU: a full table evicts nothing, it counts the rest in
    /// `EGRESS_VOLUME_OVERFLOW`; the daemon drains idle entries.
    pub const EGRESS_VOLUME: &str = "EGRESS_VOLUME";
    /// `PerCpuArray<Counter>`, 1 entry: egress traffic to destinations that
    /// found `EGRESS_VOLUME` full.
    pub const EGRESS_VOLUME_OVERFLOW: &str = "EGRESS_VOLUME_OVERFLOW";
    /// `HashMap<FqdnKey, FqdnEntry>`: destinations the DNS forwarder learned
    /// for FQDN egress rules (address, protocol class, port; port 0: any)
    /// -> expiry and rule slot. Written by the daemon before it returns the
    /// answer; swept by it after expiry.
    pub const FQDN_DEST: &str = "FQDN_DEST";
    /// `HashMap<FqdnKey, u8>`: the forwarder's upstreams (address, port,
    /// protocol class), the only destinations a packet with `DNS_MARK` is
    /// admitted to by its mark. Filled by the daemon from `[dns] upstreams`.
    pub const DNS_UPSTREAM: &str = "DNS_UPSTREAM";
    /// `Array<ExplainResult>`, 1 entry, not pinned: what the explain
    /// instance (`EXPLAIN` = 1) decided for the last crafted packet.
    pub const EXPLAIN_RESULT: &str = "EXPLAIN_RESULT";
    /// `Array<RateLimit>` per generation, indexed by rule slot: a rule's own
    /// limit on new flows per source; entry 0 (`SLOT_NONE`) is the default.
    pub const RATE_LIMITS: [&str; 2] = ["RATE_LIMITS_0", "RATE_LIMITS_1"];
    /// `LruHashMap<RateKey, u64>`: each source's token bucket (GCRA: its
    /// theoretical arrival time, `CLOCK_MONOTONIC` ns).
    pub const RATE_BUCKETS: &str = "RATE_BUCKETS";
    /// `LruHashMap<RateKey, u64>`: sources banned for exceeding a limit ->
    /// until when (`CLOCK_BOOTTIME` ns). Written by the data path.
    pub const RATE_BANS: &str = "RATE_BANS";
}

/// Names of the programs in the eBPF object.
pub mod programs {
    /// The XDP ingress filter (multi-buffer: `xdp.frags`, kernel 5.18+).
    pub const INGRESS: &str = "portcullis_ingress";
    /// The same filter for single-buffer XDP (kernels before 5.18).
    pub const INGRESS_SINGLE: &str = "portcullis_ingress_single";
    /// The TC egress flow recorder.
    pub const EGRESS: &str = "portcullis_egress";
}

/// Why a packet got its verdict. Each reason has its own counter, so an
/// operator (and a test) can tell exactly which branch of the policy fired.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// ARP, which a host needs to be reachable at all.
    PassArp = 0,
    /// IPv6 neighbour/router discovery with hop limit 255.
    PassNeighbor = 1,
    /// TCP to port 22 while the SSH exemption is on.
    PassSsh = 2,
    /// A rule admits it (protocol, port and source).
    PassRule = 3,
    /// A packet of a flow the host opened (the connection table).
    PassEstablished = 4,
    /// An ICMP error quoting a packet of a tracked flow (one the host opened,
    /// or an inbound one the rules admitted).
    PassRelated = 5,
    /// A DHCPv4 or DHCPv6 server reply within `DHCP_REPLY_WINDOW_NS` of this
    /// host's last client request of that family.
    PassDhcp = 6,
    /// An echo request while pings are allowed.
    PassPing = 7,
    /// A later fragment of a packet whose first fragment passed.
    PassFragment = 8,
    /// From a member of this host's cluster (all protocols and ports).
    PassPeer = 9,
    /// Outbound: an egress rule admits it, or egress is allow-all.
    PassEgress = 10,
    /// Would have been dropped, but enforcement is in audit (or open) mode;
    /// the drop reason is counted too.
    PassAudit = 11,
    /// TCP or UDP that no rule admits.
    DropNoRule = 12,
    /// ICMP or ICMPv6 that is neither always allowed nor related to a flow.
    DropIcmp = 13,
    /// Any other IP protocol (GRE, SCTP, ESP, ...) without a flow.
    DropProtocol = 14,
    /// A header that is truncated or inconsistent: a header that does not fit
    /// in what the IP header says the packet holds, a first fragment without
    /// its whole header chain and transport header (RFC 7112). Outbound only
    /// under an egress allowlist.
    DropMalformed = 15,
    /// An Ethernet type that is neither ARP, IPv4 nor IPv6.
    DropEthertype = 16,
    /// A fragment of no packet that passed (either direction), or an IPv4
    /// TCP fragment at offset 1 (RFC 1858/3128 overlapping-fragment attack).
    DropFragment = 17,
    /// More than one VLAN tag.
    DropVlanStack = 18,
    /// From a member of another cluster, and no rule admits it.
    DropOtherCluster = 19,
    /// Outbound and the egress allowlist does not admit it.
    DropEgress = 20,
    /// New inbound traffic from a source in a deny set (not an admin
    /// network); `DENY_STATS[set]` counts it per set.
    DropDenied = 21,
    /// A new inbound flow over its source's rate limit (`[rate_limit]`, or
    /// the admitting rule's `rate`), or from a source banned for exceeding
    /// one (`RATE_BANS`).
    DropRateLimit = 22,
}

impl Reason {
    /// Every reason, in counter-index order.
    pub const ALL: [Reason; 23] = [
        Reason::PassArp,
        Reason::PassNeighbor,
        Reason::PassSsh,
        Reason::PassRule,
        Reason::PassEstablished,
        Reason::PassRelated,
        Reason::PassDhcp,
        Reason::PassPing,
        Reason::PassFragment,
        Reason::PassPeer,
        Reason::PassEgress,
        Reason::PassAudit,
        Reason::DropNoRule,
        Reason::DropIcmp,
        Reason::DropProtocol,
        Reason::DropMalformed,
        Reason::DropEthertype,
        Reason::DropFragment,
        Reason::DropVlanStack,
        Reason::DropOtherCluster,
        Reason::DropEgress,
        Reason::DropDenied,
        Reason::DropRateLimit,
    ];

    /// Number of counters in [`maps::VERDICTS`].
    pub const COUNT: u32 = Self::ALL.len() as u32;

    /// Stable name used in logs, the CLI and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::PassArp => "pass_arp",
            Reason::PassNeighbor => "pass_neighbor_discovery",
            Reason::PassSsh => "pass_ssh",
            Reason::PassRule => "pass_rule",
            Reason::PassEstablished => "pass_established",
            Reason::PassRelated => "pass_related_icmp",
            Reason::PassDhcp => "pass_dhcp",
            Reason::PassPing => "pass_ping",
            Reason::PassFragment => "pass_fragment",
            Reason::PassPeer => "pass_peer",
            Reason::PassEgress => "pass_egress",
            Reason::PassAudit => "pass_audit",
            Reason::DropNoRule => "drop_no_rule",
            Reason::DropIcmp => "drop_icmp",
            Reason::DropProtocol => "drop_protocol",
            Reason::DropMalformed => "drop_malformed",
            Reason::DropEthertype => "drop_ethertype",
            Reason::DropFragment => "drop_fragment",
            Reason::DropVlanStack => "drop_vlan_stack",
            Reason::DropOtherCluster => "drop_other_cluster",
            Reason::DropEgress => "drop_egress",
            Reason::DropDenied => "drop_denied",
            Reason::DropRateLimit => "drop_rate_limit",
        }
    }

    /// Whether packets with this reason are passed.
    pub const fn passes(self) -> bool {
        (self as u32) < Reason::DropNoRule as u32
    }
}

/// A per-CPU counter: packets and bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

/// Global switches the control plane sets for the data path.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// Bit set of `SETTING_*` flags.
    pub flags: u32,
    /// The ingress direction byte of interfaces no rule names and no
    /// `IFDIR` entry covers: `DIR_INGRESS` while no rule names interfaces,
    /// else `ingress_dir(0)`.
    pub ingress_dir: u32,
}

/// Bit 0 is unused: the SSH exemption is a compiled rule (`SLOT_KIND_SSH`)
/// on the configured ports, not a switch.
/// Admit inbound ICMP/ICMPv6 echo requests.
pub const SETTING_PING: u32 = 1 << 1;

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// A flow as the host sees it, whichever direction the packet goes: `local`
/// is this host's address and port, `remote` the other end's. Addresses are
/// in network byte order, IPv4 in the first four bytes. For ICMP echo the
/// local port is the echo identifier and the remote port 0; for protocols
/// without ports both are 0. The key of the IPv6 tables; the IPv4 tables
/// use [`FlowKey4`] ([`FlowKey::v4`]).
// Aligned to 8 (no size change: 40 bytes, no implicit padding), so the flow
// cache reads a key as 8-byte words.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub local: [u8; 16],
    pub remote: [u8; 16],
    pub local_port: u16,
    pub remote_port: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// An IPv4 flow (`FlowKey` with 4-byte addresses and no family: the
/// family is the table's): 16 bytes, aligned to 8 as `FlowKey`.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey4 {
    pub local: [u8; 4],
    pub remote: [u8; 4],
    pub local_port: u16,
    pub remote_port: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl FlowKey {
    /// The IPv4 tables' key of this flow (meaningful when `family` is
    /// `FAMILY_V4`).
    pub const fn v4(&self) -> FlowKey4 {
        let (l, r) = (self.local, self.remote);
        FlowKey4 {
            local: [l[0], l[1], l[2], l[3]],
            remote: [r[0], r[1], r[2], r[3]],
            local_port: self.local_port,
            remote_port: self.remote_port,
            proto: self.proto,
            _pad: [0; 3],
        }
    }
}

impl FlowKey4 {
    /// The same flow as a [`FlowKey`] of family `FAMILY_V4`.
    pub const fn widen(&self) -> FlowKey {
        let (l, r) = (self.local, self.remote);
        FlowKey {
            local: [l[0], l[1], l[2], l[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            remote: [r[0], r[1], r[2], r[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            local_port: self.local_port,
            remote_port: self.remote_port,
            proto: self.proto,
            family: FAMILY_V4,
            _pad: [0; 2],
        }
    }
}

/// Connection-table entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    /// `CLOCK_MONOTONIC` (the programs' clock, `ebpf/src/clock.rs`: as of
    /// the kernel's last tick) of the last packet, rounded to
    /// the refresh interval: the data path rewrites it at most once a second.
    pub last_seen_ns: u64,
    /// One of the `FLOW_*` states.
    pub state: u8,
    pub _pad: [u8; 7],
}

/// A half-open inbound TCP connection (`maps::EMBRYO`): when its SYN was
/// admitted, and this host's initial sequence number once its SYN-ACK left.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Embryo {
    /// `CLOCK_MONOTONIC` ns of the SYN.
    pub seen_ns: u64,
    /// The SYN-ACK's sequence number (valid when `synack` is 1).
    pub isn: u32,
    /// 1 once this host answered with a SYN-ACK.
    pub synack: u32,
}

/// TCP: SYN sent, no answer yet.
pub const FLOW_TCP_SYN_SENT: u8 = 1;
/// TCP: the peer answered the SYN.
pub const FLOW_TCP_ESTABLISHED: u8 = 2;
/// TCP: a FIN was seen.
pub const FLOW_TCP_CLOSING: u8 = 3;
/// TCP: a RST was seen.
pub const FLOW_TCP_CLOSED: u8 = 4;
/// UDP, ICMP echo, other protocols: sent, no reply yet.
pub const FLOW_UNREPLIED: u8 = 5;
/// UDP, ICMP echo, other protocols: a reply came back.
pub const FLOW_REPLIED: u8 = 6;

const SEC: u64 = 1_000_000_000;

/// How long a flow in `state` lives without packets (nanoseconds). Modelled
/// on Linux conntrack's defaults, shorter where a stale entry only costs a
/// slot in an LRU table that evicts the oldest anyway.
pub const fn flow_timeout_ns(proto: u8, state: u8) -> u64 {
    match (proto, state) {
        (IPPROTO_TCP, FLOW_TCP_SYN_SENT) => 60 * SEC,
        (IPPROTO_TCP, FLOW_TCP_ESTABLISHED) => 5 * 24 * 3600 * SEC,
        (IPPROTO_TCP, FLOW_TCP_CLOSING) => 120 * SEC,
        (IPPROTO_TCP, _) => 10 * SEC,
        (IPPROTO_UDP, FLOW_REPLIED) => 180 * SEC,
        (IPPROTO_UDP, _) => 30 * SEC,
        (IPPROTO_ICMP | IPPROTO_ICMPV6, _) => 30 * SEC,
        _ => 600 * SEC,
    }
}

/// The data path rewrites `last_seen_ns` at most this often per flow.
pub const FLOW_REFRESH_NS: u64 = SEC;

/// Slots per CPU of each flow cache ([`maps::FLOW_CACHE`]); a power of two.
/// 1024 a CPU: 88 KiB for both families. (Changing it, or `CachedFlow`,
/// changes a pinned map's layout: bump [`LAYOUT_VERSION`].)
pub const FLOW_CACHE_SLOTS: u32 = 1024;

/// A slot of a flow cache: a connection-table key as 8-byte words (`N` = 2:
/// `FlowKey4`; 5: `FlowKey`), until when (the programs' clock) it admits
/// that flow's inbound packets without a table lookup, and a check word
/// (the key's hash xor `until_ns` xor the caches' epoch) that a torn write
/// or a slot of an old epoch cannot match. All zero: empty (`until_ns` 0
/// is long past).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CachedFlow<const N: usize> {
    pub key: [u64; N],
    pub until_ns: u64,
    pub check: u64,
}

impl<const N: usize> Default for CachedFlow<N> {
    fn default() -> Self {
        Self {
            key: [0; N],
            until_ns: 0,
            check: 0,
        }
    }
}

/// The IPv4 flow cache's slot.
pub type CachedFlow4 = CachedFlow<2>;
/// The IPv6 flow cache's slot.
pub type CachedFlow6 = CachedFlow<5>;

/// The flow cache's hash of a key's words: the slot is its low bits, the
/// check word is it xor the expiry. Multiplicative, a few instructions per
/// word; a sender who picks colliding flows only evicts slots (the table
/// still answers).
#[inline(always)]
pub const fn flow_cache_hash<const N: usize>(words: &[u64; N]) -> u64 {
    let mut h: u64 = 0;
    let mut i = 0;
    while i < N {
        h = (h ^ words[i]).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        h ^= h >> 29;
        i += 1;
    }
    h
}

/// The map flag of arrays user space writes through a shared mapping of
/// their memory (`BPF_F_MMAPABLE`): a memory copy, where a batch update
/// copies entry by entry in the kernel. Lookups from a program are
/// unchanged.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Default size of [`maps::CONNTRACK`]; the config can change it.
pub const CONNTRACK_DEFAULT_ENTRIES: u32 = 65536;

/// A fragmented packet: addresses, IP identification, protocol, direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub id: u32,
    pub proto: u8,
    pub family: u8,
    /// `DIR_INGRESS` or `DIR_EGRESS`: a first fragment admitted one way
    /// admits no later fragment the other way.
    pub dir: u8,
    pub _pad: u8,
}

/// Later fragments are admitted this long after their first fragment.
pub const FRAGMENT_TIMEOUT_NS: u64 = 30 * SEC;

/// `maps::DHCP_REQUESTS` indexes.
pub const DHCP_V4: u32 = 0;
pub const DHCP_V6: u32 = 1;
/// DHCP server replies are admitted this long after this host's last DHCP
/// client request of the same family (none before the first request).
pub const DHCP_REPLY_WINDOW_NS: u64 = 60 * SEC;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

/// ICMP message types (RFC 792) the data path tells apart.
pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_ECHO_REQUEST: u8 = 8;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMP_PARAMETER_PROBLEM: u8 = 12;
/// ICMPv6 message types (RFC 4443, 2710, 3810, 4861) the data path tells apart.
pub const ICMPV6_DEST_UNREACH: u8 = 1;
pub const ICMPV6_PACKET_TOO_BIG: u8 = 2;
pub const ICMPV6_TIME_EXCEEDED: u8 = 3;
pub const ICMPV6_PARAMETER_PROBLEM: u8 = 4;
pub const ICMPV6_ECHO_REQUEST: u8 = 128;
pub const ICMPV6_ECHO_REPLY: u8 = 129;

/// Outbound traffic is an allowlist (the egress rules are not empty).
pub const SETTING_EGRESS_ALLOWLIST: u32 = 1 << 2;
/// Audit (or open) mode: decide and count as usual, but pass what would be
/// dropped (counted under its drop reason and `PassAudit`).
pub const SETTING_PASS_ALL: u32 = 1 << 3;
/// Count what passes egress per destination (`maps::EGRESS_VOLUME`).
pub const SETTING_EGRESS_VOLUME: u32 = 1 << 4;

/// FQDN egress rules exist: only packets carrying [`DNS_MARK`] (the
/// forwarder's upstream queries) may leave to port 53 or 853.
pub const SETTING_DNS_GUARD: u32 = 1 << 5;
/// No rule of this generation names an interface (it has no `IFDIR`
/// entries): the ingress path does not look the interface up in `IFDIR`,
/// every interface has `Settings::ingress_dir`. Set with `ingress_dir` from
/// the same compiled image. A skip, not a switch: without it (settings an
/// older daemon wrote) the lookup is made, as before.
pub const SETTING_NO_IF_RULES: u32 = 1 << 6;
/// The deny tries (`DENY_V4`, `DENY_V6`) were empty when this generation
/// was written and no entry was added since: the ingress path does not look
/// a source up in them. The daemon clears it in both generations before it
/// adds an entry, so while any entry exists it is clear (the lookup made).
pub const SETTING_NO_DENY: u32 = 1 << 7;
/// This generation's `SRC6_g` (IPv6 prefixes shorter than /32) is empty:
/// the IPv6 lookup does not ask it. Set from the same compiled image as the
/// trie's entries; without it the trie is asked, as before.
pub const SETTING_NO_SRC6: u32 = 1 << 8;
/// The socket mark (SO_MARK) of the DNS forwarder's upstream sockets.
/// Setting a mark needs CAP_NET_ADMIN in the host's network namespace.
pub const DNS_MARK: u32 = 0x5043_0053;
/// The DNS ports only the forwarder may send to under [`SETTING_DNS_GUARD`].
pub const DNS_PORT: u16 = 53;
pub const DNS_TLS_PORT: u16 = 853;

/// A destination learned for FQDN egress rules: the address (IPv4 in the
/// first 4 bytes, the rest zero), the destination port (0: any port) and
/// the protocol class (`PCLASS_TCP`/`PCLASS_UDP`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FqdnKey {
    pub addr: [u8; 16],
    pub port: u16,
    pub pclass: u8,
    pub family: u8,
}

/// Until when (CLOCK_BOOTTIME ns) a learned destination admits new flows,
/// the rule slot credited, and which rule learned it (a hash of the rule,
/// so a restarted or reloaded daemon keeps only entries whose rule is
/// unchanged).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FqdnEntry {
    pub expires_ns: u64,
    pub slot: u32,
    pub rule: u32,
}

/// Destinations `FQDN_DEST` holds at once.
pub const FQDN_ENTRIES: u32 = 16384;
/// Upstreams `[dns]` may list (each takes a TCP and a UDP entry in
/// `DNS_UPSTREAM`).
pub const DNS_MAX_UPSTREAMS: u32 = 8;

/// A destination of egress volume: the address (IPv6 cut to its /64, the
/// rest zero), the destination port (TCP and UDP; 0 otherwise), protocol
/// and family.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VolumeKey {
    pub addr: [u8; 16],
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}

/// Destinations `EGRESS_VOLUME` holds at once.
pub const EGRESS_DESTINATIONS: u32 = 4096;
/// Prefix length an IPv6 destination is counted under (an interface
/// identifier may rotate within its /64).
pub const VOLUME_V6_PREFIX: usize = 64;

// ---- The rule engine's maps -------------------------------------------------
//
// Rules compile, per direction and address family, into:
//   source prefix --(LPM)--> region --(per protocol class)--> sorted port
//   segments --> rule slot.
// A region is the set of rules whose source prefixes cover an address: the
// user-space compiler walks the nested prefixes and gives each distinct
// prefix the region of all rules on its path, so the longest match is enough.
// Each region lists, per protocol class, segments of the port space with the
// first admitting rule (lowest slot) in each, found with a binary search of a
// fixed number of steps. Every generation has its own set of these maps; the
// `ACTIVE` index switches between them in one write.

/// Direction byte that leads every rule key.
pub const DIR_INGRESS: u8 = 0;
pub const DIR_EGRESS: u8 = 1;

/// Ingress rule lists per interface (rules with `interfaces = [..]`).
/// `DIR_INGRESS` (0) holds every ingress rule whatever its interfaces (the
/// union): what egress asks about replies, and what the XDP program reads
/// on every interface while no rule names one. Once one does, each
/// interface has its list: class 0 (interfaces no rule names: the rules
/// without `interfaces`) has direction byte 2, the named interfaces (at
/// most [`IF_CLASSES`]) 3.. ([`ingress_dir`]).
pub const IF_CLASSES: u32 = 3;

/// The direction byte of the ingress rule list of interface class `class`
/// (0: interfaces no rule names; 1..=[`IF_CLASSES`]: a named interface).
#[inline(always)]
pub const fn ingress_dir(class: u32) -> u8 {
    if class > IF_CLASSES {
        DIR_INGRESS
    } else {
        2 + class as u8
    }
}

/// A compiled IPv4 prefix: direction, then the address (its length, like an
/// LPM key's, counts the direction byte: 8 + prefix length).
pub type RuleKey4 = [u8; 5];
/// LPM key data for IPv6 rules.
pub type RuleKey6 = [u8; 17];
/// IPv6 prefixes up to this length go to the LPM trie; longer ones (from /32,
/// the usual allocation to a network, on) to the per-/32 hash tables (see
/// `maps::V6_BUCKETS`). So the trie holds only the rare short prefixes, and
/// an address that no longer prefix covers walks a trie that stays small.
pub const V6_SHORT_MAX: u32 = 31;
/// (direction, top 32 bits of the address).
pub type V6BucketKey = [u8; 5];
/// (direction, prefix length, the address masked to that length).
pub type V6PrefixKey = [u8; 18];
/// Prefix lengths under one /32, longest first, 0-terminated; at most
/// [`V6_BUCKET_LENGTHS`], so a lookup makes at most that many probes. A /32
/// with more distinct lengths is marked [`V6_BUCKET_OVERFLOW`] in the first
/// byte and its prefixes go to the LPM trie instead.
pub type V6Lengths = [u8; V6_BUCKET_LENGTHS];
pub const V6_BUCKET_LENGTHS: usize = 8;
pub const V6_BUCKET_OVERFLOW: u8 = 255;

/// The protocol class of an IP protocol, and the port its rules match on
/// (other protocols have none: 0; for ICMP the caller uses [`icmp_port`]
/// instead of this 0).
#[inline(always)]
pub const fn pclass_port(proto: u8, port: u16) -> (usize, u16) {
    match proto {
        IPPROTO_TCP => (PCLASS_TCP, port),
        IPPROTO_UDP => (PCLASS_UDP, port),
        IPPROTO_ICMP | IPPROTO_ICMPV6 => (PCLASS_ICMP, 0),
        _ => (PCLASS_OTHER, 0),
    }
}

/// The port an ICMP or ICMPv6 message meets the rules with: its type and
/// code (`type << 8 | code`). A rule without ICMP types covers them all.
#[inline(always)]
pub const fn icmp_port(icmp_type: u8, code: u8) -> u16 {
    ((icmp_type as u16) << 8) | code as u16
}

/// Protocol classes a region distinguishes.
pub const PCLASS_TCP: usize = 0;
pub const PCLASS_UDP: usize = 1;
/// ICMP and ICMPv6 (the port is the type and code: [`icmp_port`]).
pub const PCLASS_ICMP: usize = 2;
/// Every other IP protocol (no ports: port 0).
pub const PCLASS_OTHER: usize = 3;
pub const PCLASSES: usize = 4;

/// Where a region's segments are, per protocol class.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Region {
    /// First segment in `SEGMENTS`, per protocol class.
    pub offset: [u32; PCLASSES],
    /// Number of segments (0: nothing admitted), per protocol class.
    pub len: [u32; PCLASSES],
}

/// A run of ports from `start` up to the next segment's start.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Segment {
    pub start: u16,
    pub _pad: u16,
    /// `SLOT_NONE`, or a rule slot with its kind in the top bits.
    pub slot: u32,
}

pub const SLOT_NONE: u32 = 0;
/// Low bits: the slot number (index into `RULE_STATS`).
pub const SLOT_INDEX_MASK: u32 = 0x3fff_ffff;
pub const SLOT_KIND_SHIFT: u32 = 30;
/// Kinds of slot: what the match means.
pub const SLOT_KIND_RULE: u32 = 0;
pub const SLOT_KIND_PEER: u32 = 1;
pub const SLOT_KIND_SSH: u32 = 2;
/// A member of another cluster: dropped unless a rule admits it first.
pub const SLOT_KIND_FOREIGN: u32 = 3;

/// Whether a lookup's slot admits the packet: a slot was found and it is not
/// the other-clusters marker. The one definition, used by the data path
/// (`ebpf/src/policy.rs`) and the daemon (`core`, `readiness`).
#[inline(always)]
pub const fn slot_admits(slot: u32) -> bool {
    slot != SLOT_NONE && slot >> SLOT_KIND_SHIFT != SLOT_KIND_FOREIGN
}

/// A dropped (or, in audit mode, would-be-dropped) packet, for the event
/// stream. Addresses as in `FlowKey`; ports in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropEvent {
    /// `CLOCK_MONOTONIC` nanoseconds.
    pub time_ns: u64,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    /// `Reason` as u8.
    pub reason: u8,
    /// `DIR_INGRESS` or `DIR_EGRESS`.
    pub dir: u8,
    /// The interface the packet came in on (ingress) or was leaving by
    /// (egress), so `portcullis watch` can name it.
    pub ifindex: u32,
    /// A `DropDenied` drop: the banning deny set's id + 1 (0: none, or
    /// another reason), so the daemon can name the set. Every byte of an
    /// event is written (the ring buffer copies whole events).
    pub deny_set: u32,
}

/// The value of a deny-set entry: which set banned the prefix and until
/// when (`CLOCK_BOOTTIME` ns, `bpf_ktime_get_boot_ns`; 0: no expiry). The
/// data path ignores an entry whose time has passed, before the daemon's
/// sweeper removes it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DenyEntry {
    pub expires_ns: u64,
    pub set: u32,
    pub _pad: u32,
}

/// A limit on the new inbound flows of one source (GCRA, the generic cell
/// rate algorithm: a source's bucket holds its theoretical arrival time
/// `tat`; with `next = max(tat, now) + interval_ns`, a new flow at `now`
/// is admitted when `next <= now + burst_ns`, and then `tat` becomes
/// `next`). The daemon computes both figures, so the data path only
/// adds and compares. `RATE_LIMITS_g[slot]`; entry 0 is the default for
/// new inbound traffic, and alone carries `ban_ns` and `v6_mask`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimit {
    /// The emission interval: 1e9 / rate, in ns. 0: no limit (a rule's
    /// entry: the default applies).
    pub interval_ns: u64,
    /// burst * `interval_ns`: how far ahead of now a source's `tat` may run.
    pub burst_ns: u64,
    /// A source over its limit is banned this long (`RATE_BANS`); 0: never.
    pub ban_ns: u64,
    /// IPv6 sources share a bucket per prefix: the mask of its length
    /// (`ipv6_prefix`; IPv4: per address).
    pub v6_mask: [u8; 16],
}

/// The key of a source's bucket and of its ban: its address (IPv6 masked
/// with `RateLimit::v6_mask`), and the slot of the rule whose own limit it
/// counts against (0: the default limit; always 0 for a ban).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RateKey {
    pub addr: [u8; 16],
    pub slot: u32,
    pub family: u8,
    pub _pad: [u8; 3],
}

/// Sources with a bucket (`RATE_BUCKETS`) and banned sources (`RATE_BANS`)
/// held at once; the least recently used are evicted.
pub const RATE_BUCKETS_ENTRIES: u32 = 65536;
pub const RATE_BANS_ENTRIES: u32 = 65536;

/// Deny sets a host may have (set ids 0..DENY_SETS_MAX index `DENY_STATS`).
pub const DENY_SETS_MAX: u32 = 256;
/// Default capacity of each deny trie (entries are allocated as inserted).
pub const DEFAULT_DENY_PREFIXES: u32 = 1 << 20;

/// Drop events each CPU may report per second; the rest are only counted.
pub const EVENTS_PER_SECOND_PER_CPU: u64 = 200;

/// The read-only global (`.rodata`) that makes a loaded instance of the
/// programs an explain instance: set to 1 by the daemon's loader, every
/// write of the data path (counters, flow tables, fragments, DHCP times,
/// events) is compiled out by the verifier and the decision is written to
/// `EXPLAIN_RESULT` instead.
pub const EXPLAIN_GLOBAL: &str = "EXPLAIN";
/// Read-only global of the programs (`ebpf/src/clock.rs`): nanoseconds
/// per jiffy, 0 to read the coarse clock. Set by the loader.
pub const CLOCK_TICK_GLOBAL: &str = "CLOCK_TICK_NS";
/// Read-only global of the programs: `jiffies × tick − CLOCK_MONOTONIC`.
pub const CLOCK_OFFSET_GLOBAL: &str = "CLOCK_OFFSET_NS";
/// `ExplainResult` field not set by the run (no reason counted, no slot
/// credited, no deny set hit).
pub const EXPLAIN_UNSET: u32 = u32::MAX;

/// What an explain run decided (see [`EXPLAIN_GLOBAL`]). The daemon sets
/// every field to [`EXPLAIN_UNSET`] before a run.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExplainResult {
    /// The `Reason` counted (a drop in audit mode: the drop's reason).
    pub reason: u32,
    /// 1 when audit (or open) mode turned a drop into a pass.
    pub audited: u32,
    /// The rule slot credited (with its kind bits), as `RULE_STATS_g` would.
    pub slot: u32,
    /// The deny set whose entry dropped it, as `DENY_STATS` would.
    pub deny_set: u32,
    /// The generation whose rules decided (read from `ACTIVE`).
    pub generation: u32,
    pub _pad: u32,
}

impl Default for ExplainResult {
    fn default() -> Self {
        ExplainResult {
            reason: EXPLAIN_UNSET,
            audited: 0,
            slot: EXPLAIN_UNSET,
            deny_set: EXPLAIN_UNSET,
            generation: EXPLAIN_UNSET,
            _pad: 0,
        }
    }
}

/// IPv4 sources use a fixed-stride table instead of an LPM trie: the top 16
/// bits index `V4_ROOT`, then up to four 4-bit steps through `V4_CHUNKS`. An
/// entry is 0 (no rule covers the address), `region + 1`, or `V4_NODE |
/// chunk` (look at the next 4 bits in that chunk). At most five array reads,
/// whatever the rules.
pub const V4_NODE: u32 = 1 << 31;
/// One block of 65536 per direction byte: ingress (any interface), egress,
/// and ingress per interface class ([`ingress_dir`]).
pub const V4_ROOT_ENTRIES: u32 = (3 + IF_CLASSES) * 65536;
pub const V4_CHUNK_ENTRIES: u32 = 16;

/// Default capacities of the rule maps; the configuration can raise them.
pub const DEFAULT_PREFIXES: u32 = 65536;
pub const DEFAULT_REGIONS: u32 = 65536;
pub const DEFAULT_SEGMENTS: u32 = 262144;
pub const DEFAULT_RULE_SLOTS: u32 = 65536;
/// In chunks of `V4_CHUNK_ENTRIES`.
pub const DEFAULT_V4_CHUNKS: u32 = 65536;

/// Binary-search steps per lookup: regions hold at most 2^SEARCH_STEPS
/// segments per protocol class.
pub const SEARCH_STEPS: u32 = 10;
pub const MAX_SEGMENTS_PER_CLASS: u32 = 1 << SEARCH_STEPS;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain #[repr(C)] structs of integers without padding.
    unsafe impl aya::Pod for super::Counter {}
    // SAFETY: repr(C), plain integers and byte arrays, no padding holes.
    unsafe impl aya::Pod for super::FqdnKey {}
    // SAFETY: repr(C), plain integers (explicit padding field).
    unsafe impl aya::Pod for super::FqdnEntry {}
    // SAFETY: plain #[repr(C)] struct of integers without padding.
    unsafe impl aya::Pod for super::Settings {}
    // SAFETY: plain #[repr(C)] struct of byte arrays and integers, padding explicit.
    unsafe impl aya::Pod for super::FlowKey {}
    // SAFETY: repr(C), plain integers, no padding left implicit.
    unsafe impl aya::Pod for super::FlowKey4 {}
    // SAFETY: repr(C) of u64s only, no padding.
    unsafe impl<const N: usize> aya::Pod for super::CachedFlow<N> {}
    // SAFETY: plain #[repr(C)] struct of integers, padding explicit.
    unsafe impl aya::Pod for super::Flow {}
    // SAFETY: plain #[repr(C)] struct of byte arrays and integers, padding explicit.
    unsafe impl aya::Pod for super::FragKey {}
    // SAFETY: plain #[repr(C)] struct of u32 arrays.
    unsafe impl aya::Pod for super::Region {}
    // SAFETY: plain #[repr(C)] struct of integers and byte arrays, no padding.
    unsafe impl aya::Pod for super::DropEvent {}
    // SAFETY: plain #[repr(C)] struct of integers, padding explicit.
    unsafe impl aya::Pod for super::Segment {}
    // SAFETY: plain #[repr(C)] struct of integers, padding explicit.
    unsafe impl aya::Pod for super::DenyEntry {}
    // SAFETY: plain #[repr(C)] struct of a byte array and integers, no padding.
    unsafe impl aya::Pod for super::VolumeKey {}
    // SAFETY: plain #[repr(C)] struct of u32s, no padding.
    unsafe impl aya::Pod for super::ExplainResult {}
    // SAFETY: plain #[repr(C)] struct of integers, padding explicit.
    unsafe impl aya::Pod for super::RateLimit {}
    // SAFETY: plain #[repr(C)] struct of integers, no padding.
    unsafe impl aya::Pod for super::Embryo {}
    // SAFETY: plain #[repr(C)] struct of a byte array and integers, padding explicit.
    unsafe impl aya::Pod for super::RateKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_numbered_in_order() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{} out of order", r.name());
        }
    }

    #[test]
    fn passing_reasons_come_first() {
        let passing = Reason::ALL.iter().filter(|r| r.passes()).count();
        assert_eq!(passing, Reason::DropNoRule as usize);
        assert!(
            Reason::ALL
                .iter()
                .all(|r| r.passes() == r.name().starts_with("pass_"))
        );
    }

    #[test]
    fn keys_have_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<FlowKey>(), 40);
        assert_eq!(core::mem::size_of::<FlowKey4>(), 16);
        // The flow cache reads keys as words.
        assert_eq!(core::mem::align_of::<FlowKey>(), 8);
        assert_eq!(core::mem::align_of::<FlowKey4>(), 8);
        assert_eq!(core::mem::size_of::<CachedFlow4>(), 32);
        assert_eq!(core::mem::size_of::<CachedFlow6>(), 56);
        assert_eq!(core::mem::size_of::<Flow>(), 16);
        assert_eq!(core::mem::size_of::<FragKey>(), 40);
    }

    #[test]
    fn rule_layouts_have_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<DropEvent>(), 56);
        assert_eq!(core::mem::size_of::<Region>(), 32);
        assert_eq!(core::mem::size_of::<Segment>(), 8);
        assert_eq!(core::mem::size_of::<DenyEntry>(), 16);
        assert_eq!(core::mem::size_of::<VolumeKey>(), 20);
        assert_eq!(core::mem::size_of::<RateLimit>(), 40);
        assert_eq!(core::mem::size_of::<RateKey>(), 24);
    }
}
