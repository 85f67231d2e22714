//! The benchmark's results as data: printed as tables by `main`, written as
//! `target/bench/bench.json` and plotted as `target/bench/ns-per-packet.svg`.

use std::path::Path;

use plotters::prelude::*;
use serde::Serialize;

/// A median with the minimum and maximum of the runs.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Stat {
    pub fn of(mut v: Vec<f64>) -> Stat {
        v.sort_by(|a, b| a.total_cmp(b));
        Stat {
            median: v[v.len() / 2],
            min: v[0],
            max: v[v.len() - 1],
        }
    }
}

impl std::fmt::Display for Stat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:6.1} [{:5.1}-{:5.1}]", self.median, self.min, self.max)
    }
}

/// ns/packet of Portcullis at one rule-set size.
#[derive(Debug, Serialize)]
pub struct EngineRow {
    pub rules: usize,
    pub v4_allowed: Stat,
    pub v4_denied: Stat,
    pub v6_allowed: Stat,
    pub v6_denied: Stat,
    pub v4_established: Stat,
    pub v6_established: Stat,
    pub mean: f64,
    /// Cost relative to the first (smallest) set, from runs paired with
    /// runs of that set (see `paired_cells`): median, min, max.
    pub vs_first: Stat,
    pub compile_ms: f64,
    pub live_ms: f64,
    pub map_mib: f64,
    /// New traffic (all four cells' packets) / the empty floor program over
    /// the same packets, per round, the two runs back to back.
    pub vs_empty: Option<Stat>,
    /// Established flows / the empty floor program, paired the same way.
    pub established_vs_empty: Option<Stat>,
    /// Per-stage costs from traffic classes (`stages.rs`), IPv4.
    pub stages: Option<crate::stages::Stages>,
}

/// A floor program (`ebpf/src/floor.rs`): one thing each.
#[derive(Debug, Serialize)]
pub struct Floor {
    pub program: String,
    pub does: String,
    pub ns_per_packet: Stat,
    /// Minus the empty floor program in the same round.
    pub net_of_empty: Stat,
}

/// Another XDP program over the same packets.
#[derive(Debug, Serialize)]
pub struct Reference {
    pub name: String,
    pub entries: usize,
    pub ns_per_packet: Stat,
    /// Portcullis at the largest rule count over this program, the same
    /// packets, per round, the two runs back to back.
    pub portcullis_vs: Option<Stat>,
}

#[derive(Debug, Default, Serialize)]
pub struct Control {
    pub start_ms: f64,
    pub add_ms: Option<Stat>,
    pub replace_10k_ms: Option<Stat>,
    pub rss_idle_mib: f64,
    pub rss_10k_mib: f64,
    pub rss_100k_mib: f64,
    /// The median of `replace_100k_runs_ms`.
    pub replace_100k_ms: f64,
    /// Each 100k replace, in order (the benchmark's set, another, the
    /// benchmark's again).
    pub replace_100k_runs_ms: Vec<f64>,
    /// VmRSS once it stopped moving after the 100k replace (see `settled_rss`).
    pub rss_100k_settled_mib: f64,
    /// VmHWM (peak resident) at that point.
    pub hwm_100k_mib: f64,
    /// A single rule added into the 100k-rule set, round trip: the adds
    /// after the first, each compiled as a delta over the live maps.
    pub add_100k_ms: Option<Stat>,
    /// The first add after the 100k replace: a delta too, which also makes
    /// the idle generation's IPv6 tables (the 10k set's) the live one's.
    pub add_100k_first_ms: f64,
    /// VmRSS settled after those adds.
    pub rss_100k_after_adds_mib: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub machine: String,
    pub engine: Vec<EngineRow>,
    pub references: Vec<Reference>,
    pub traffic: Vec<crate::traffic::Row>,
    pub control: Control,
    pub floors: Vec<Floor>,
    pub start: crate::start::StartReport,
    /// What later features add per packet, against their floors
    /// (`stages::increments`).
    pub increments: crate::stages::Increments,
}

impl Report {
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("bench.json"), serde_json::to_string_pretty(self)?)?;
        self.plot(&dir.join("ns-per-packet.svg"))
    }

    /// ns/packet against the rule count (log scale), with the floor and
    /// xdp-filter as horizontal references.
    fn plot(&self, path: &Path) -> anyhow::Result<()> {
        let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
        root.fill(&WHITE)?;
        let max_rules = self
            .engine
            .iter()
            .map(|r| r.rules)
            .max()
            .unwrap_or(1)
            .max(10) as f64;
        let max_ns = self
            .engine
            .iter()
            .flat_map(|r| {
                [
                    r.v4_allowed.max,
                    r.v4_denied.max,
                    r.v6_allowed.max,
                    r.v6_denied.max,
                ]
            })
            .chain(self.references.iter().map(|r| r.ns_per_packet.max))
            .fold(10.0, f64::max)
            * 1.15;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "Portcullis: ns/packet by rule count (BPF_PROG_TEST_RUN)",
                ("sans-serif", 20),
            )
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d((1.0..max_rules * 1.5).log_scale(), 0.0..max_ns)?;
        chart
            .configure_mesh()
            .x_desc("rules")
            .y_desc("ns/packet")
            .draw()?;
        type Series = (&'static str, RGBColor, fn(&EngineRow) -> f64);
        let series: [Series; 4] = [
            ("IPv4 allowed", BLUE, |r| r.v4_allowed.median),
            ("IPv4 denied", CYAN, |r| r.v4_denied.median),
            ("IPv6 allowed", RED, |r| r.v6_allowed.median),
            ("IPv6 denied", MAGENTA, |r| r.v6_denied.median),
        ];
        for (name, color, value) in series {
            chart
                .draw_series(LineSeries::new(
                    self.engine.iter().map(|r| (r.rules as f64, value(r))),
                    color.stroke_width(2),
                ))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        for (i, reference) in self.references.iter().enumerate() {
            let color = [BLACK, GREEN, RGBColor(200, 120, 0)][i % 3];
            let y = reference.ns_per_packet.median;
            chart
                .draw_series(LineSeries::new(
                    [(1.0, y), (max_rules * 1.5, y)],
                    color.stroke_width(1),
                ))?
                .label(format!(
                    "{} ({} entries)",
                    reference.name, reference.entries
                ))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()?;
        root.present()?;
        Ok(())
    }
}
