//! Fleet convergence (issue 20): the time from an etcd write to every
//! daemon enforcing it. A real etcd (TLS, auth on) and N daemons, each in
//! its own namespace on one segment; the writer runs in the outsider's
//! namespace with the daemon's own etcd client, and polls each daemon's
//! `/v1/peers` (answered from the live rule set, which the core changes
//! only once the new generation is in the maps) until every one holds the
//! change. Prints the median and worst over the writes, for all daemons
//! and per daemon.
//!
//! `PORTCULLIS_BENCH_FLEET_DAEMONS` (default 5), `..._WRITES` (default 40),
//! `..._ETCD` (etcd members, default 1). Needs root; run from the
//! workspace after `cargo build` (it starts `target/<profile>/portcullisd`).

use std::time::{Duration, Instant};

use portcullis::{client, config::FleetConfig};
use portcullis_tests::etcd::{self, Etcd, member_key};
use portcullis_tests::*;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Whether the daemon behind `socket` has `addr` among its peers.
async fn has_peer(socket: &std::path::Path, addr: &str) -> anyhow::Result<bool> {
    let reply = client::request(socket, hyper::Method::GET, "/v1/peers", None).await?;
    let v = reply.json()?;
    Ok(v["peers"]
        .as_array()
        .is_some_and(|p| p.iter().any(|x| x.as_str() == Some(addr))))
}

fn stats(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    (v[v.len() / 2], *v.last().unwrap_or(&Duration::ZERO))
}

fn main() -> anyhow::Result<()> {
    if !is_root() {
        anyhow::bail!("the fleet benchmark needs root (namespaces, XDP)");
    }
    let daemons = env("PORTCULLIS_BENCH_FLEET_DAEMONS", 5);
    let writes = env("PORTCULLIS_BENCH_FLEET_WRITES", 40);
    let members = env("PORTCULLIS_BENCH_FLEET_ETCD", 1);
    let outsider = daemons + 1;
    let lan = Lan::new(daemons + 1 + members)?;
    let nodes: Vec<(&Netns, String)> = (outsider + 1..=outsider + members)
        .map(|i| (lan.host(i), Lan::v4(i)))
        .collect();
    let etcd = Etcd::start(&nodes)?;
    let users: Vec<(String, String)> = (1..=daemons)
        .map(|i| (format!("host-{i}"), format!("pw-{i}")))
        .collect();
    let refs: Vec<(&str, &str)> = users
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    etcd.enable_auth(&refs)?;
    let mut running = Vec::new();
    for (i, (name, pw)) in users.iter().enumerate() {
        let i = i + 1;
        let pins = PinDir::new()?;
        let file = etcd.pki.secret(&format!("pw-{i}"), pw)?;
        let section = etcd::fleet_section(&etcd, name, &file, &[Lan::v4(i)]);
        let cfg = ConfigFile::new(&config_text(&pins, &section))?;
        let daemon = Daemon::start(lan.host(i), &cfg)?;
        running.push((pins, cfg, daemon));
    }
    let sockets: Vec<std::path::PathBuf> = running.iter().map(|(_, c, _)| c.socket()).collect();
    let root_pw = etcd.pki.secret("pw-root", etcd::ROOT_PASSWORD)?;
    let writer = FleetConfig {
        endpoints: etcd.endpoints(),
        ca_file: etcd.pki.ca(),
        cert_file: None,
        key_file: None,
        username: Some("root".into()),
        password_file: Some(root_pw),
        prefix: etcd::PREFIX.into(),
        cluster_id: etcd::CLUSTER.into(),
        allowed_ranges: vec!["10.200.10.0/24".into()],
        name: None,
        addresses: Vec::new(),
        lease_ttl_secs: 10,
    };
    let addr = format!("{}/32", Lan::v4(outsider));
    let value = format!(r#"{{"addresses":["{}"]}}"#, Lan::v4(outsider));
    let key = member_key("bench");
    let (all, each) = lan.host(outsider).enter(|| -> anyhow::Result<_> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let mut c = portcullis::fleet::etcd::Client::new(&writer)?;
            c.authenticate().await?;
            // Every daemon registered before the clock starts.
            let deadline = Instant::now() + Duration::from_secs(30);
            while c
                .range(&format!("{}/{}/members/", etcd::PREFIX, etcd::CLUSTER))
                .await?
                .1
                .len()
                < daemons
            {
                anyhow::ensure!(Instant::now() < deadline, "the daemons did not register");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let (mut all, mut each) = (Vec::new(), Vec::new());
            for w in 0..writes {
                let add = w % 2 == 0;
                let t0 = Instant::now();
                if add {
                    c.put(&key, &value, 0).await?;
                } else {
                    c.delete(&key).await?;
                }
                let mut pending: Vec<usize> = (0..sockets.len()).collect();
                while !pending.is_empty() {
                    anyhow::ensure!(
                        t0.elapsed() < Duration::from_secs(30),
                        "write {w} not enforced everywhere after 30 s"
                    );
                    let mut still = Vec::new();
                    for i in pending {
                        if has_peer(&sockets[i], &addr).await? == add {
                            each.push(t0.elapsed());
                        } else {
                            still.push(i);
                        }
                    }
                    pending = still;
                    if !pending.is_empty() {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
                all.push(t0.elapsed());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            anyhow::Ok((all, each))
        })
    })?;
    let (median, worst) = stats(all);
    let (each_median, each_worst) = stats(each);
    println!(
        "fleet convergence: {daemons} daemons, {members} etcd member(s), {writes} writes (alternating add and remove of one member)"
    );
    println!("  etcd write -> every daemon enforcing: median {median:?}, worst {worst:?}");
    println!(
        "  etcd write -> one daemon enforcing:   median {each_median:?}, worst {each_worst:?}"
    );
    drop(running);
    Ok(())
}
