//! What the host gets when the eBPF data path cannot load (an old kernel, a
//! verifier refusal, bpf(2) not permitted): never a silent open door. The
//! daemon fails loudly either way; with `fallback = "nftables"` it first
//! installs a plain nftables policy: inbound denied except SSH (from its
//! configured sources), established and related flows, loopback, neighbour
//! discovery and DHCP replies. When the data path loads again, the table is
//! removed.

use std::{
    io::Write as _,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};
use ipnet::IpNet;

use crate::rules::Ssh;

/// The nftables table the fallback owns (and nothing else touches).
pub const TABLE: &str = "portcullis_fallback";

/// The ruleset, as one `nft -f` transaction that replaces any earlier copy
/// of the table.
pub fn ruleset(ssh: &Ssh, ssh_port: u16) -> String {
    let mut ssh_rules = String::new();
    if ssh.allow {
        let nets: Vec<IpNet> = ssh.sources.iter().filter_map(|s| s.parse().ok()).collect();
        if nets.is_empty() {
            ssh_rules.push_str(&format!("    tcp dport {ssh_port} accept\n"));
        } else {
            for (family, v4) in [("ip", true), ("ip6", false)] {
                let list: Vec<String> = nets
                    .iter()
                    .filter(|n| matches!(n, IpNet::V4(_)) == v4)
                    .map(ToString::to_string)
                    .collect();
                if !list.is_empty() {
                    ssh_rules.push_str(&format!(
                        "    {family} saddr {{ {} }} tcp dport {ssh_port} accept\n",
                        list.join(", ")
                    ));
                }
            }
        }
    }
    format!(
        "table inet {TABLE}\n\
         delete table inet {TABLE}\n\
         table inet {TABLE} {{\n\
         \x20 chain input {{\n\
         \x20   type filter hook input priority filter; policy drop;\n\
         \x20   iif \"lo\" accept\n\
         \x20   ct state established,related accept\n\
         \x20   icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert, nd-router-advert, packet-too-big }} accept\n\
         \x20   udp dport {{ 68, 546 }} accept\n\
         {ssh_rules}\
         \x20 }}\n\
         }}\n"
    )
}

/// Installs the fallback policy with `nft`.
pub fn apply(ssh: &Ssh, ssh_port: u16) -> anyhow::Result<()> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run nft (package nftables)")?;
    child
        .stdin
        .take()
        .context("nft has no stdin")?
        .write_all(ruleset(ssh, ssh_port).as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "nft refused the fallback policy: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Removes the fallback table if it is there. Returns whether it was.
pub fn remove() -> bool {
    Command::new("nft")
        .args(["delete", "table", "inet", TABLE])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssh_sources_split_by_family_and_the_table_is_replaced_atomically() {
        let ssh = Ssh {
            allow: true,
            sources: vec![
                "10.0.0.0/8".into(),
                "fd00::/8".into(),
                "192.0.2.0/24".into(),
            ],
        };
        let r = ruleset(&ssh, 22);
        assert!(r.starts_with(
            "table inet portcullis_fallback\ndelete table inet portcullis_fallback\n"
        ));
        assert!(
            r.contains("ip saddr { 10.0.0.0/8, 192.0.2.0/24 } tcp dport 22 accept"),
            "{r}"
        );
        assert!(
            r.contains("ip6 saddr { fd00::/8 } tcp dport 22 accept"),
            "{r}"
        );
        assert!(r.contains("policy drop;"));
    }

    #[test]
    fn without_the_exemption_no_port_is_open() {
        let r = ruleset(&Ssh::default(), 22);
        assert!(!r.contains("dport 22"), "{r}");
        let r = ruleset(
            &Ssh {
                allow: true,
                sources: vec![],
            },
            2222,
        );
        assert!(r.contains("    tcp dport 2222 accept\n"), "{r}");
    }
}
