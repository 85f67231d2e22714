//! `rules list|add|remove|apply|save` and the ufw-style `allow`.

use anyhow::Context as _;
use hyper::Method;
use portcullis::{
    api::{Counters, Rules},
    rules::{FirewallRule, Protocol, Replacement, RuleSet},
};

use crate::{
    Ctx,
    args::{AllowArgs, RuleChange, RulesCmd},
    commands::{apply_change, change_path},
    output::{diff_words, table},
};

pub fn rules(ctx: &Ctx, cmd: RulesCmd) -> anyhow::Result<()> {
    match cmd {
        RulesCmd::List => list(ctx),
        RulesCmd::Apply { file, change } => apply(ctx, &file, &change),
        RulesCmd::Add {
            id,
            from_port,
            to_port,
            ip_ranges,
            names,
            protocol,
            description,
            icmp_types,
            rate,
            burst,
            interfaces,
            egress,
            expiry,
            change,
        } => {
            let rule = FirewallRule {
                id,
                from_port,
                to_port,
                ip_ranges,
                names,
                protocol: protocol.into(),
                description,
                icmp_types,
                expires: expiry.field()?,
                rate,
                burst,
                interfaces,
            };
            add(ctx, rule, egress, &change)
        }
        RulesCmd::Remove { rule, change } => remove(ctx, &rule, &change),
        RulesCmd::Save => save(ctx),
    }
}

/// What a rule admits, in words: `tcp 8080 from any source`.
pub fn describe(r: &FirewallRule, egress: bool) -> String {
    let ports = ports(r);
    let nets = match (r.ip_ranges.is_empty(), r.names.is_empty()) {
        (true, true) => "any address".to_string(),
        (true, false) => r.names.join(", "),
        (false, true) => r.ip_ranges.join(", "),
        (false, false) => format!("{}, {}", r.ip_ranges.join(", "), r.names.join(", ")),
    };
    let (proto, ports) = match r.protocol {
        Protocol::Icmp if !r.icmp_types.is_empty() => {
            ("icmp".to_string(), format!(" {}", r.icmp_types.join(",")))
        }
        Protocol::Icmp => ("icmp".to_string(), String::new()),
        p => (proto_name(p).to_string(), format!(" {ports}")),
    };
    let dir = if egress { "to" } else { "from" };
    let limit = match (r.rate, r.burst) {
        (Some(rate), burst) => format!(
            ", at most {rate} new flows/s per source (burst {})",
            burst.unwrap_or(rate)
        ),
        (None, _) => String::new(),
    };
    let on = if r.interfaces.is_empty() {
        String::new()
    } else {
        format!(" on {}", r.interfaces.join(", "))
    };
    format!("{proto}{ports} {dir} {nets}{on}{limit}")
}

fn ports(r: &FirewallRule) -> String {
    if r.from_port == r.to_port {
        r.from_port.to_string()
    } else {
        format!("{}-{}", r.from_port, r.to_port)
    }
}

/// An ICMP rule's PORTS column: its types, or `-` for every type.
fn icmp_column(r: &FirewallRule) -> String {
    if r.icmp_types.is_empty() {
        "-".into()
    } else {
        r.icmp_types.join(",")
    }
}

fn proto_name(p: Protocol) -> &'static str {
    match p {
        Protocol::TcpUdp => "tcp+udp",
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Icmp => "icmp",
        Protocol::Any => "any",
    }
}

/// The rules in `rules list` order (ingress, then egress), numbered from 1.
fn numbered(set: &RuleSet) -> Vec<(usize, bool, &FirewallRule)> {
    set.ingress_rules
        .iter()
        .map(|r| (false, r))
        .chain(set.egress_rules.iter().map(|r| (true, r)))
        .enumerate()
        .map(|(i, (egress, r))| (i + 1, egress, r))
        .collect()
}

fn list(ctx: &Ctx) -> anyhow::Result<()> {
    let (rules, reply): (Rules, _) = ctx.get("/v1/rules")?;
    // Hits are a nicety: a rule list without them beats no list.
    let hits = ctx
        .get::<Counters>("/v1/counters")
        .ok()
        .map(|(c, _)| c.rules);
    ctx.print(&reply, || {
        let rows: Vec<Vec<String>> = numbered(&rules.rules)
            .into_iter()
            .map(|(n, egress, r)| {
                vec![
                    n.to_string(),
                    r.id.clone(),
                    if egress { "out" } else { "in" }.into(),
                    proto_name(r.protocol).into(),
                    if r.protocol == Protocol::Icmp {
                        icmp_column(r)
                    } else {
                        ports(r)
                    },
                    r.sources_text(),
                    hits.as_ref()
                        .and_then(|h| h.get(&format!("rule:{}", r.id)))
                        .map_or_else(|| "-".into(), |c| c.packets.to_string()),
                    r.expires.clone().unwrap_or_else(|| "-".into()),
                    r.description.clone().unwrap_or_default(),
                ]
            })
            .collect();
        let header = &[
            "#",
            "ID",
            "DIR",
            "PROTO",
            "PORTS",
            "SOURCES",
            "HITS",
            "EXPIRES",
            "DESCRIPTION",
        ];
        let ssh = &rules.rules.ssh;
        let mut out = format!(
            "Generation {}; SSH exemption {}.",
            rules.generation,
            if ssh.allow {
                format!(
                    "on (tcp {} from {})",
                    ssh.ports.iter().map(u16::to_string).collect::<Vec<_>>().join(","),
                    if ssh.sources.is_empty() {
                        "any address".to_string()
                    } else {
                        ssh.sources.join(", ")
                    }
                )
            } else {
                "off".to_string()
            }
        );
        out += &format!("\nEgress: {}.", rules.rules.egress_policy());
        for w in rules.rules.egress_warnings() {
            out += &format!("\nwarning: {w}");
        }
        if let Some(c) = &rules.rules.cluster {
            out += &format!("\nCluster {}: {} peer network(s) admitted on every port (portcullis peers list).", c.id, c.peers.len());
        }
        if rows.is_empty() {
            out + "\nNo rules: nothing else is admitted. Open a port with: portcullis allow 8080/tcp"
        } else {
            out + "\n" + &table(header, &rows, &[0, 6])
        }
    })
}

fn add(ctx: &Ctx, rule: FirewallRule, egress: bool, change: &RuleChange) -> anyhow::Result<()> {
    let flags = ctx.change(&change.change);
    let path = if egress {
        "/v1/rules/egress"
    } else {
        "/v1/rules/ingress"
    };
    let what = format!("rule {}: {}", rule.id, describe(&rule, egress));
    apply_change(
        ctx,
        Method::POST,
        &change_path(path, &flags, change.expect_generation),
        Some(&rule),
        (&format!("Added {what}"), &format!("add {what}")),
    )?;
    Ok(())
}

/// `allow PORT[:TO][/PROTO] [--from CIDR]`: an ingress rule with a
/// readable id (`tcp-8080`, `udp-8000-8100`, then `-2`, `-3`... when taken).
pub fn allow(ctx: &Ctx, a: AllowArgs) -> anyhow::Result<()> {
    let (from_port, to_port, protocol, said) = parse_spec(&a.spec)?;
    if !said && !ctx.json {
        eprintln!(
            "{}: TCP (write {}/udp or {}/tcp+udp for others)",
            a.spec, a.spec, a.spec
        );
    }
    let id = match a.id {
        Some(id) => id,
        None => {
            let (rules, _): (Rules, _) = ctx.get("/v1/rules")?;
            free_id(&rules.rules, protocol, from_port, to_port)
        }
    };
    let rule = FirewallRule {
        id,
        from_port,
        to_port,
        ip_ranges: a.from,
        names: Vec::new(),
        protocol,
        description: a.description,
        icmp_types: Vec::new(),
        expires: a.expiry.field()?,
        rate: None,
        burst: None,
        interfaces: a.interfaces,
    };
    add(ctx, rule, false, &a.change)
}

/// `8080`, `8080/tcp`, `8000:8100/udp`, `8000-8100/tcp+udp`: ports,
/// protocol, and whether the protocol was given.
pub fn parse_spec(spec: &str) -> anyhow::Result<(u32, u32, Protocol, bool)> {
    let (ports, proto) = match spec.split_once('/') {
        Some((p, proto)) => (p, Some(proto)),
        None => (spec, None),
    };
    let protocol = match proto.map(str::to_ascii_lowercase).as_deref() {
        None | Some("tcp") => Protocol::Tcp,
        Some("udp") => Protocol::Udp,
        Some("tcp+udp") | Some("both") => Protocol::TcpUdp,
        Some(other) => anyhow::bail!(
            "{spec}: unknown protocol {other:?} (tcp, udp or tcp+udp; for ICMP use `portcullis rules add --protocol icmp`)"
        ),
    };
    let port = |s: &str| -> anyhow::Result<u32> {
        let p: u16 = s
            .trim()
            .parse()
            .with_context(|| format!("{spec}: {s:?} is not a port (1-65535)"))?;
        anyhow::ensure!(p != 0, "{spec}: port 0 is not a port (1-65535)");
        Ok(u32::from(p))
    };
    let (from, to) = match ports.split_once([':', '-']) {
        Some((a, b)) => (port(a)?, port(b)?),
        None => (port(ports)?, port(ports)?),
    };
    anyhow::ensure!(from <= to, "{spec}: the range starts after it ends");
    Ok((from, to, protocol, proto.is_some()))
}

fn free_id(set: &RuleSet, protocol: Protocol, from: u32, to: u32) -> String {
    let proto = match protocol {
        Protocol::TcpUdp => "tcpudp",
        p => proto_name(p),
    };
    let base = if from == to {
        format!("{proto}-{from}")
    } else {
        format!("{proto}-{from}-{to}")
    };
    let taken = |id: &str| {
        set.ingress_rules
            .iter()
            .chain(&set.egress_rules)
            .any(|r| r.id == id)
    };
    (1..)
        .map(|n| {
            if n == 1 {
                base.clone()
            } else {
                format!("{base}-{n}")
            }
        })
        .find(|id| !taken(id))
        .unwrap_or(base)
}

/// `rules remove N|ID`: a number as `rules list` shows it, or an id.
fn remove(ctx: &Ctx, which: &str, change: &RuleChange) -> anyhow::Result<()> {
    let (rules, _): (Rules, _) = ctx.get("/v1/rules")?;
    let all = numbered(&rules.rules);
    let by_id = all.iter().find(|(_, _, r)| r.id == which);
    let by_number = which
        .parse::<usize>()
        .ok()
        .and_then(|n| all.iter().find(|(i, _, _)| *i == n));
    let (n, egress, rule) = match (by_id, by_number) {
        (Some(a), Some(b)) if a.0 != b.0 => anyhow::bail!(
            "{which:?} is both the id of rule {} and the number of rule {} ({}); remove by the other one's id",
            a.0,
            b.0,
            b.2.id
        ),
        (Some(r), _) | (None, Some(r)) => *r,
        (None, None) if which.bytes().all(|b| b.is_ascii_digit()) => anyhow::bail!(
            "no rule number {which}: `portcullis rules list` shows {} rule(s)",
            all.len()
        ),
        // The daemon refuses it, naming it, and records the refusal.
        (None, None) => {
            return remove_id(
                ctx,
                which,
                &ctx.change(&change.change),
                change.expect_generation,
            );
        }
    };
    let flags = ctx.change(&change.change);
    // The number names the rule of the generation just read: refuse if the
    // list changes before the removal lands.
    let generation = change.expect_generation.or(Some(rules.generation));
    let what = format!("rule {n} ({}: {})", rule.id, describe(rule, egress));
    apply_change::<()>(
        ctx,
        Method::DELETE,
        &change_path(
            &format!("/v1/rule/{}", portcullis::client::path_segment(&rule.id)),
            &flags,
            generation,
        ),
        None,
        (&format!("Removed {what}"), &format!("remove {what}")),
    )?;
    Ok(())
}

/// Removes the rule `id` without looking it up first.
fn remove_id(
    ctx: &Ctx,
    id: &str,
    flags: &crate::args::Change,
    generation: Option<u64>,
) -> anyhow::Result<()> {
    let what = format!("rule {id}");
    apply_change::<()>(
        ctx,
        Method::DELETE,
        &change_path(
            &format!("/v1/rule/{}", portcullis::client::path_segment(id)),
            flags,
            generation,
        ),
        None,
        (&format!("Removed {what}"), &format!("remove {what}")),
    )?;
    Ok(())
}

/// `egress allow|allowlist`: sets the egress policy.
pub fn egress(ctx: &Ctx, policy: &str, change: &RuleChange) -> anyhow::Result<()> {
    let flags = ctx.change(&change.change);
    let body = serde_json::json!({ "egress": policy });
    let (changed, reply): (portcullis::core::Changed, _) = ctx.send(
        Method::PUT,
        &change_path("/v1/egress", &flags, change.expect_generation),
        Some(&body),
    )?;
    let diff = diff_words(&changed.diff);
    ctx.print(&reply, || {
        crate::output::change_sentence(
            &format!("Egress policy {policy}: {diff}"),
            &format!("set egress {policy} ({diff})"),
            &changed,
        )
    })
}

/// A rule-set file (JSON, or TOML by its `.toml` name) as a replacement.
pub fn read_replacement(file: &std::path::Path) -> anyhow::Result<Replacement> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    // Without an `ssh` key the live SSH exemption stays as it is.
    Ok(if file.extension().is_some_and(|e| e == "toml") {
        toml::from_str(&text).with_context(|| format!("{} is not a rule set", file.display()))?
    } else {
        serde_json::from_str(&text)
            .with_context(|| format!("{} is not a rule set", file.display()))?
    })
}

fn apply(ctx: &Ctx, file: &std::path::Path, change: &RuleChange) -> anyhow::Result<()> {
    let rules = read_replacement(file)?;
    rules
        .clone()
        .over(&RuleSet::default())
        .validate()
        .map_err(|e| anyhow::anyhow!("{}: {}", file.display(), e.in_words()))?;
    for w in rules.clone().over(&RuleSet::default()).egress_warnings() {
        eprintln!("warning: {w}");
    }
    if rules.ssh.as_ref().is_some_and(|s| !s.allow) {
        eprintln!(
            "warning: this rule set turns the SSH exemption off: new SSH logins need a rule admitting the SSH port"
        );
    }
    let flags = ctx.change(&change.change);
    let (changed, reply): (portcullis::core::Changed, _) = ctx.send(
        Method::PUT,
        &change_path("/v1/rules", &flags, change.expect_generation),
        Some(&rules),
    )?;
    let name = file.display().to_string();
    let diff = diff_words(&changed.diff);
    ctx.print(&reply, || {
        crate::output::change_sentence(
            &format!("Applied {name}: {diff}"),
            &format!("apply {name} ({diff})"),
            &changed,
        )
    })
}

/// `rules save`: the live rule set becomes the permanent one.
fn save(ctx: &Ctx) -> anyhow::Result<()> {
    let (saved, reply): (portcullis::core::Saved, _) =
        ctx.send::<(), _>(Method::POST, "/v1/rules/save", None)?;
    ctx.print(&reply, || {
        format!(
            "Saved generation {} to {}: a reload or reboot keeps it.",
            saved.generation, saved.file
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_read_like_ufw() {
        assert_eq!(
            parse_spec("8080/tcp").unwrap(),
            (8080, 8080, Protocol::Tcp, true)
        );
        assert_eq!(parse_spec("22").unwrap(), (22, 22, Protocol::Tcp, false));
        assert_eq!(
            parse_spec("8000:8100/udp").unwrap(),
            (8000, 8100, Protocol::Udp, true)
        );
        assert_eq!(
            parse_spec("53/tcp+udp").unwrap(),
            (53, 53, Protocol::TcpUdp, true)
        );
        for bad in ["0", "0/tcp", "70000", "http", "10:5", "80/sctp", ""] {
            assert!(parse_spec(bad).is_err(), "{bad}");
        }
    }
}
