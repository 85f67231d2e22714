//! `explain`: what the data path decides for a described packet.

use hyper::Method;
use portcullis::explain::{Decision, Explained, Probe, Request, TCP_ACK, TCP_SYN};

use crate::{Ctx, args::ExplainArgs, rulecmds::read_replacement};

pub fn explain(ctx: &Ctx, a: &ExplainArgs) -> anyhow::Result<()> {
    let given = [
        &a.direction,
        &a.protocol,
        &a.source,
        &a.arrow,
        &a.destination,
    ]
    .map(|w| w.clone());
    let mut packet = Probe::parse(&given).map_err(|e| anyhow::anyhow!("{e}"))?;
    packet.interface = a.interface.clone();
    packet.icmp_type = a.icmp_type;
    packet.tcp_flags = a.tcp_flags.as_deref().map(tcp_flags).transpose()?;
    let rules = a.rules.as_deref().map(read_replacement).transpose()?;
    let req = Request { packet, rules };
    let (explained, reply): (Explained, _) = ctx.send(Method::POST, "/v1/explain", Some(&req))?;
    let file = a.rules.as_ref().map(|f| f.display().to_string());
    ctx.print(&reply, || words(&explained, file.as_deref()))
}

fn tcp_flags(s: &str) -> anyhow::Result<u8> {
    Ok(match s {
        "syn" => TCP_SYN,
        "ack" => TCP_ACK,
        "syn-ack" | "synack" => TCP_SYN | TCP_ACK,
        "fin" => 0x01 | TCP_ACK,
        "rst" => 0x04,
        other => anyhow::bail!("--tcp-flags {other:?}: expected syn, ack, syn-ack, fin or rst"),
    })
}

fn line(label: &str, d: &Decision) -> String {
    let verdict = if d.passes { "PASS" } else { "DROP" };
    let reason = d.reason.as_deref().unwrap_or("uncounted");
    format!("  {label:<10} {verdict}  {reason}: {}", d.why)
}

fn words(e: &Explained, file: Option<&str>) -> String {
    let mut out = e.packet.clone();
    if let Some(i) = &e.interface {
        out.push_str(&format!(" on {i}"));
    }
    let live = match e.live.generation {
        Some(g) => format!("live (gen {g})"),
        None => "live".to_string(),
    };
    out.push('\n');
    out.push_str(&line(&live, &e.live));
    if let Some(p) = &e.proposed {
        out.push('\n');
        out.push_str(&line("proposed", p));
        out.push('\n');
        out.push_str(&match (e.differs, file) {
            (Some(true), Some(f)) => format!("{f} decides otherwise than the live rules"),
            (Some(true), None) => "the proposed rules decide otherwise".into(),
            (_, Some(f)) => format!("{f} decides the same"),
            _ => "the proposed rules decide the same".into(),
        });
    }
    out
}
