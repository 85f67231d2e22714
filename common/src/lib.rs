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
pub const LAYOUT_VERSION: u32 = 1;

/// Names of the maps, as the eBPF object declares them and as they are pinned.
pub mod maps {
    /// `PerCpuArray<Counter>` indexed by [`crate::Reason`].
    pub const VERDICTS: &str = "VERDICTS";
    /// `Array<u32>` indexed by [`crate::port_index`]: non-zero admits the port.
    pub const PORT_CLASS: &str = "PORT_CLASS";
    /// `Array<Settings>` with a single entry.
    pub const SETTINGS: &str = "SETTINGS";
}

/// Names of the programs in the eBPF object.
pub mod programs {
    /// The XDP ingress filter.
    pub const INGRESS: &str = "portcullis_ingress";
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
    /// TCP or UDP to a destination port a rule admits.
    PassRule = 3,
    /// TCP or UDP to a destination port no rule admits.
    DropNoRule = 4,
    /// ICMP or ICMPv6 that is not always allowed.
    DropIcmp = 5,
    /// Any other IP protocol (GRE, SCTP, ESP, ...).
    DropProtocol = 6,
    /// A header that is truncated or inconsistent.
    DropMalformed = 7,
    /// An Ethernet type that is neither ARP, IPv4 nor IPv6.
    DropEthertype = 8,
    /// A non-first IP fragment (it carries no ports to check).
    DropFragment = 9,
}

impl Reason {
    /// Every reason, in counter-index order.
    pub const ALL: [Reason; 10] = [
        Reason::PassArp,
        Reason::PassNeighbor,
        Reason::PassSsh,
        Reason::PassRule,
        Reason::DropNoRule,
        Reason::DropIcmp,
        Reason::DropProtocol,
        Reason::DropMalformed,
        Reason::DropEthertype,
        Reason::DropFragment,
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
            Reason::DropNoRule => "drop_no_rule",
            Reason::DropIcmp => "drop_icmp",
            Reason::DropProtocol => "drop_protocol",
            Reason::DropMalformed => "drop_malformed",
            Reason::DropEthertype => "drop_ethertype",
            Reason::DropFragment => "drop_fragment",
        }
    }

    /// Whether packets with this reason are passed.
    pub const fn passes(self) -> bool {
        matches!(
            self,
            Reason::PassArp | Reason::PassNeighbor | Reason::PassSsh | Reason::PassRule
        )
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
    pub _reserved: u32,
}

/// Admit inbound TCP to port 22 regardless of the rules.
pub const SETTING_SSH: u32 = 1 << 0;

/// Transport protocols the port table distinguishes.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp = 0,
    Udp = 1,
}

/// Entries in [`maps::PORT_CLASS`]: one per (protocol, port).
pub const PORT_CLASS_ENTRIES: u32 = 2 * 65536;

/// Index of `(proto, port)` in [`maps::PORT_CLASS`]; the port in host order.
#[inline(always)]
pub const fn port_index(proto: L4, port: u16) -> u32 {
    (proto as u32) * 65536 + port as u32
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain #[repr(C)] structs of integers without padding.
    unsafe impl aya::Pod for super::Counter {}
    // SAFETY: plain #[repr(C)] struct of integers without padding.
    unsafe impl aya::Pod for super::Settings {}
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
    fn port_indices_do_not_overlap() {
        assert_eq!(port_index(L4::Tcp, 65535) + 1, port_index(L4::Udp, 0));
        assert_eq!(port_index(L4::Udp, 65535) + 1, PORT_CLASS_ENTRIES);
    }
}
