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
/// of the table. SSH sources are read as the compiler reads them
/// ([`Ssh::networks`]: a bare address is a host route); sources that do not
/// parse admit nothing, never everyone.
pub fn ruleset(ssh: &Ssh) -> String {
    let mut ssh_rules = String::new();
    let ports: Vec<String> = ssh.ports.iter().map(ToString::to_string).collect();
    let ports = format!("{{ {} }}", ports.join(", "));
    match ssh.networks() {
        Ok(_) if ssh.allow && ssh.sources.is_empty() => {
            ssh_rules.push_str(&format!("    tcp dport {ports} accept\n"));
        }
        Ok(nets) if ssh.allow => {
            for (family, v4) in [("ip", true), ("ip6", false)] {
                let list: Vec<String> = nets
                    .iter()
                    .filter(|n| matches!(n, IpNet::V4(_)) == v4)
                    .map(ToString::to_string)
                    .collect();
                if !list.is_empty() {
                    ssh_rules.push_str(&format!(
                        "    {family} saddr {{ {} }} tcp dport {ports} accept\n",
                        list.join(", ")
                    ));
                }
            }
        }
        Ok(_) => {}
        Err(e) => {
            tracing::error!(error = %e, "ssh: sources: the fallback admits SSH from nowhere");
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
         \x20   ip6 hoplimit 255 icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert, nd-router-advert }} accept\n\
         \x20   ip protocol udp udp sport 67 udp dport 68 accept\n\
         \x20   ip6 nexthdr udp udp sport 547 udp dport 546 accept\n\
         {ssh_rules}\
         \x20 }}\n\
         }}\n"
    )
}

/// Installs the fallback policy with `nft`.
pub fn apply(ssh: &Ssh) -> anyhow::Result<()> {
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
        .write_all(ruleset(ssh).as_bytes())?;
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

    fn ssh(sources: &[&str], ports: &[u16]) -> Ssh {
        Ssh {
            allow: true,
            sources: sources.iter().map(ToString::to_string).collect(),
            ports: ports.to_vec(),
        }
    }

    #[test]
    fn ssh_sources_split_by_family_and_the_table_is_replaced_atomically() {
        let r = ruleset(&ssh(&["10.0.0.0/8", "fd00::/8", "192.0.2.0/24"], &[22]));
        assert!(r.starts_with(
            "table inet portcullis_fallback\ndelete table inet portcullis_fallback\n"
        ));
        assert!(
            r.contains("ip saddr { 10.0.0.0/8, 192.0.2.0/24 } tcp dport { 22 } accept"),
            "{r}"
        );
        assert!(
            r.contains("ip6 saddr { fd00::/8 } tcp dport { 22 } accept"),
            "{r}"
        );
        assert!(r.contains("policy drop;"));
        // Host essentials as narrow as the data path's: DHCP replies from
        // the server port only, neighbour discovery from the link only
        // (ICMP errors come in as `related` to tracked connections).
        assert!(r.contains("udp sport 67 udp dport 68 accept"), "{r}");
        assert!(r.contains("ip6 hoplimit 255 icmpv6 type"), "{r}");
        assert!(!r.contains("udp dport { 68, 546 }"), "{r}");
    }

    #[test]
    fn without_the_exemption_no_port_is_open() {
        let r = ruleset(&Ssh {
            allow: false,
            ..Ssh::default()
        });
        assert!(!r.contains("dport { 22"), "{r}");
        let r = ruleset(&ssh(&[], &[22, 2222]));
        assert!(r.contains("    tcp dport { 22, 2222 } accept\n"), "{r}");
    }

    /// Issue 14: a bare address in `sources` (which the rule validator
    /// accepts as a host route) used to be dropped by the fallback's own
    /// parser, leaving `tcp dport 22 accept` for everyone.
    #[test]
    fn a_bare_source_address_restricts_ssh_and_bad_sources_admit_nobody() {
        let r = ruleset(&ssh(&["10.200.90.5"], &[2222]));
        assert!(
            r.contains("ip saddr { 10.200.90.5/32 } tcp dport { 2222 } accept"),
            "{r}"
        );
        assert_eq!(r.matches("tcp dport").count(), 1, "{r}");
        let r = ruleset(&ssh(&["not-an-address"], &[22]));
        assert!(!r.contains("dport { 22"), "{r}");
    }
}
