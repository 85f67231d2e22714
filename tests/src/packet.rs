//! Crafted frames for `BPF_PROG_TEST_RUN`: Ethernet (optionally VLAN
//! tagged), IPv4 with options and fragments, IPv6 with extension headers,
//! and TCP, UDP, ICMP or any other payload. Checksums are left zero: the
//! programs do not verify them (the kernel does, later).

use std::net::IpAddr;

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMP: u8 = 1;
pub const ICMPV6: u8 = 58;
pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;

pub const HOPOPTS: u8 = 0;
pub const ROUTING: u8 = 43;
pub const FRAGMENT: u8 = 44;
pub const DSTOPTS: u8 = 60;

#[derive(Clone, Debug)]
pub struct Pkt {
    src: IpAddr,
    dst: IpAddr,
    vlans: Vec<u16>,
    ttl: u8,
    ipv4_options: usize,
    /// IPv4: (id, fragment offset in 8-byte units, more fragments).
    frag: Option<(u32, u16, bool)>,
    /// IPv6 extension headers: (kind, length in 8-byte units beyond the first).
    ext: Vec<(u8, u8)>,
    proto: u8,
    l4: Vec<u8>,
}

impl Pkt {
    pub fn new(src: &str, dst: &str) -> Self {
        Pkt {
            src: src.parse().expect("source address"),
            dst: dst.parse().expect("destination address"),
            vlans: vec![],
            ttl: 64,
            ipv4_options: 0,
            frag: None,
            ext: vec![],
            proto: 0,
            l4: vec![],
        }
    }

    pub fn tcp(mut self, sport: u16, dport: u16, flags: u8) -> Self {
        let mut h = vec![0u8; 20];
        h[0..2].copy_from_slice(&sport.to_be_bytes());
        h[2..4].copy_from_slice(&dport.to_be_bytes());
        h[12] = 5 << 4;
        h[13] = flags;
        h[14..16].copy_from_slice(&64240u16.to_be_bytes());
        self.proto = TCP;
        self.l4 = h;
        self
    }

    /// A TCP segment's sequence and acknowledgment numbers (after `tcp`).
    pub fn seq_ack(mut self, seq: u32, ack: u32) -> Self {
        self.l4[4..8].copy_from_slice(&seq.to_be_bytes());
        self.l4[8..12].copy_from_slice(&ack.to_be_bytes());
        self
    }

    pub fn udp(mut self, sport: u16, dport: u16) -> Self {
        let mut h = vec![0u8; 8];
        h[0..2].copy_from_slice(&sport.to_be_bytes());
        h[2..4].copy_from_slice(&dport.to_be_bytes());
        h[4..6].copy_from_slice(&8u16.to_be_bytes());
        self.proto = UDP;
        self.l4 = h;
        self
    }

    /// ICMP (IPv4) or ICMPv6 (IPv6) with the given type, code, identifier
    /// (echo) and payload (for errors: the quoted packet).
    pub fn icmp(mut self, kind: u8, code: u8, id: u16, payload: &[u8]) -> Self {
        let mut h = vec![kind, code, 0, 0];
        h.extend_from_slice(&id.to_be_bytes());
        h.extend_from_slice(&[0, 1]);
        h.extend_from_slice(payload);
        self.proto = if self.src.is_ipv4() { ICMP } else { ICMPV6 };
        self.l4 = h;
        self
    }

    /// Any other IP protocol with a raw payload.
    pub fn proto(mut self, proto: u8, payload: &[u8]) -> Self {
        self.proto = proto;
        self.l4 = payload.to_vec();
        self
    }

    pub fn vlan(mut self, tag: u16) -> Self {
        self.vlans.push(tag);
        self
    }

    pub fn ttl(mut self, ttl: u8) -> Self {
        self.ttl = ttl;
        self
    }

    /// IPv4 options of `bytes` bytes (a multiple of 4, at most 40).
    pub fn ipv4_options(mut self, bytes: usize) -> Self {
        self.ipv4_options = bytes;
        self
    }

    /// Marks the packet as a fragment (IPv4 header fields or an IPv6 fragment header).
    pub fn fragment(mut self, id: u32, offset_units: u16, more: bool) -> Self {
        self.frag = Some((id, offset_units, more));
        if self.src.is_ipv6() {
            self.ext.push((FRAGMENT, 0));
        }
        self
    }

    /// Adds an IPv6 extension header of `kind` and (1 + `len`) * 8 bytes.
    pub fn ext(mut self, kind: u8, len: u8) -> Self {
        self.ext.push((kind, len));
        self
    }

    /// The whole frame.
    pub fn bytes(&self) -> Vec<u8> {
        let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
        for tag in &self.vlans {
            f.extend_from_slice(&0x8100u16.to_be_bytes());
            f.extend_from_slice(&tag.to_be_bytes());
        }
        let ethertype: u16 = if self.src.is_ipv4() { 0x0800 } else { 0x86dd };
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(&self.ip_bytes());
        f
    }

    /// From the IP header on (what an ICMP error quotes).
    pub fn ip_bytes(&self) -> Vec<u8> {
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let ihl = 20 + self.ipv4_options;
                let mut h = vec![0u8; ihl];
                h[0] = 0x40 | (ihl / 4) as u8;
                h[2..4].copy_from_slice(&((ihl + self.l4.len()) as u16).to_be_bytes());
                if let Some((id, off, more)) = self.frag {
                    h[4..6].copy_from_slice(&(id as u16).to_be_bytes());
                    let v = off | if more { 0x2000 } else { 0 };
                    h[6..8].copy_from_slice(&v.to_be_bytes());
                }
                h[8] = self.ttl;
                h[9] = self.proto;
                h[12..16].copy_from_slice(&s.octets());
                h[16..20].copy_from_slice(&d.octets());
                // Options: NOPs then end of list.
                for b in &mut h[20..] {
                    *b = 1;
                }
                if self.ipv4_options > 0 {
                    h[ihl - 1] = 0;
                }
                h.extend_from_slice(&self.l4);
                h
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let mut exts = Vec::new();
                for (i, &(kind, len)) in self.ext.iter().enumerate() {
                    let next = self.ext.get(i + 1).map_or(self.proto, |e| e.0);
                    let mut e = vec![0u8; (len as usize + 1) * 8];
                    e[0] = next;
                    if kind == FRAGMENT {
                        let (id, off, more) =
                            self.frag.expect("fragment header without fragment()");
                        e[1] = 0;
                        let v = (off << 3) | more as u16;
                        e[2..4].copy_from_slice(&v.to_be_bytes());
                        e[4..8].copy_from_slice(&id.to_be_bytes());
                    } else {
                        e[1] = len;
                        // PadN filling the options area.
                        e[2] = 1;
                        e[3] = (e.len() - 4) as u8;
                    }
                    exts.extend_from_slice(&e);
                }
                let first = self.ext.first().map_or(self.proto, |e| e.0);
                let mut h = vec![0u8; 40];
                h[0] = 0x60;
                h[4..6].copy_from_slice(&((exts.len() + self.l4.len()) as u16).to_be_bytes());
                h[6] = first;
                h[7] = self.ttl;
                h[8..24].copy_from_slice(&s.octets());
                h[24..40].copy_from_slice(&d.octets());
                h.extend_from_slice(&exts);
                h.extend_from_slice(&self.l4);
                h
            }
            _ => panic!("source and destination of different families"),
        }
    }
}
