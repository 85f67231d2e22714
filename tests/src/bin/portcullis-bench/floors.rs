//! The kernel's floor per stage: the micro-programs of `ebpf/src/floor.rs`
//! (one thing each), loaded from their own object, each attached to a veth
//! of its own (driver mode, so a test run does not swap it in and out of the
//! XDP dispatcher) and run with the same `BPF_PROG_TEST_RUN` harness.

use std::os::fd::{AsFd as _, BorrowedFd, OwnedFd};

use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, MapData},
    programs::Xdp,
};
use portcullis::testrun::FLOOR_OBJECT;
use portcullis_common::{Flow, FlowKey};

/// The floor programs, in the order printed: (program, what it does).
pub const PROGRAMS: [(&str, &str); 16] = [
    ("floor_empty", "empty program (call + return)"),
    ("floor_array", "one array read"),
    ("floor_counter", "one per-CPU counter update"),
    ("floor_lru_hit", "one LRU lookup, FlowKey, hit"),
    ("floor_lru_miss", "one LRU lookup, FlowKey, miss"),
    ("floor_ktime", "one bpf_ktime_get_ns"),
    ("floor_parse", "bounds-checked eth/IP/L4 parse"),
    ("floor_coarse", "one bpf_ktime_get_coarse_ns"),
    ("floor_lru16_miss", "one LRU lookup, 16-byte key, miss"),
    ("floor_hash", "one hash lookup, u64 key, hit"),
    ("floor_lru16_update", "one LRU update, 16-byte key"),
    (
        "floor_lru16_update_percpu",
        "one LRU update, 16-byte key, per-CPU lists",
    ),
    ("floor_lru16_hit", "one LRU lookup, 16-byte key, hit"),
    ("floor_cold", "one read, 256 MiB array, index by source"),
    ("floor_cold8", "8 dependent reads, 256 MiB array"),
    ("floor_jiffies", "one bpf_jiffies64 (inlined)"),
];

/// The value the hit rows find (any live flow).
const SEEN: Flow = Flow {
    last_seen_ns: 1,
    state: 1,
    _pad: [0; 7],
};

pub struct Floors {
    /// Program fds in `PROGRAMS` order.
    pub fds: Vec<OwnedFd>,
    _links: Vec<OwnedFd>,
    _ebpf: Ebpf,
}

impl Floors {
    /// Loads the floor programs, inserts the keys `floor_lru_hit`,
    /// `floor_lru16_hit` and `floor_hash` find and attaches each program to one end of veth pairs
    /// `floorN`.
    pub fn load(ip: impl Fn(&[&str]) -> anyhow::Result<String>) -> anyhow::Result<Self> {
        let mut ebpf = Ebpf::load(FLOOR_OBJECT)?;
        {
            let map = ebpf
                .map_mut("FLOOR_LRU")
                .ok_or_else(|| anyhow::anyhow!("FLOOR_LRU missing"))?;
            let mut lru: BpfHashMap<&mut MapData, FlowKey, Flow> = BpfHashMap::try_from(map)?;
            let key = FlowKey {
                local: [10, 200, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                remote: [10, 200, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                local_port: 1,
                remote_port: 40000,
                proto: 6,
                family: 4,
                _pad: [0; 2],
            };
            lru.insert(&key, &SEEN, 0)?;
        }
        {
            // The key `floor_lru16_hit` finds (`ebpf/src/floor.rs`:
            // addresses, ports 40000 and 1, TCP).
            let map = ebpf
                .map_mut("FLOOR_LRU16")
                .ok_or_else(|| anyhow::anyhow!("FLOOR_LRU16 missing"))?;
            let mut lru: BpfHashMap<&mut MapData, [u32; 4], Flow> = BpfHashMap::try_from(map)?;
            let key: [u32; 4] = [0x0a00_c80a, 0x0200_c80a, 40000 << 16 | 1, 6];
            lru.insert(&key, &SEEN, 0)?;
        }
        {
            // The key `floor_hash` finds (generation 0, ifindex 1).
            let map = ebpf
                .map_mut("FLOOR_HASH")
                .ok_or_else(|| anyhow::anyhow!("FLOOR_HASH missing"))?;
            let mut hash: BpfHashMap<&mut MapData, u64, u32> = BpfHashMap::try_from(map)?;
            hash.insert(&1, &1, 0)?;
        }
        let mut fds = Vec::new();
        let mut links = Vec::new();
        for (i, (name, _)) in PROGRAMS.iter().enumerate() {
            let prog: &mut Xdp = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow::anyhow!("{name} missing from the floor object"))?
                .try_into()?;
            prog.load()?;
            let fd = prog.fd()?.as_fd().try_clone_to_owned()?;
            let (a, b) = (format!("floor{i}a"), format!("floor{i}b"));
            ip(&["link", "add", &a, "type", "veth", "peer", "name", &b])?;
            ip(&["link", "set", &a, "up"])?;
            ip(&["link", "set", &b, "up"])?;
            let ifindex = nix::net::if_::if_nametoindex(a.as_str())?;
            links.push(crate::rawbpf::attach_xdp(fd.as_fd(), ifindex)?);
            fds.push(fd);
        }
        Ok(Floors {
            fds,
            _links: links,
            _ebpf: ebpf,
        })
    }

    pub fn empty(&self) -> BorrowedFd<'_> {
        self.fds[0].as_fd()
    }
}
