//! `kvinfer cache simulate` (`cache stats` and `cache clear` are in cache_admin.rs): replays a request trace against eviction policies at several
//! capacities (the simulator lives in `kvinfer_cache::simulate`; this file reads the trace and
//! prints, serialises or plots the results).

use crate::cli::{CacheCommand, SimulateArgs};
use anyhow::{anyhow, bail, Context, Result};
use kvinfer_cache::simulate::{simulate, SimPolicy, SimResult};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Runs a `kvinfer cache ...` command.
pub fn run(cmd: CacheCommand) -> Result<()> {
    match cmd {
        CacheCommand::Simulate(a) => run_simulate(a),
        CacheCommand::Stats(a) => crate::cache_admin::stats(a),
        CacheCommand::Clear(a) => crate::cache_admin::clear(a),
    }
}

fn run_simulate(a: SimulateArgs) -> Result<()> {
    let requests = read_trace(&a.trace)?;
    if a.policy.is_empty() {
        bail!("no policy given; pass --policy lru,lfu,fifo,random,s3fifo,belady");
    }
    // One job per (capacity, policy), run in parallel; results keep this order.
    let jobs: Vec<(usize, SimPolicy)> = a
        .capacity_blocks
        .iter()
        .flat_map(|&c| a.policy.iter().map(move |&p| (c, p)))
        .collect();
    let results: Vec<SimResult> = jobs
        .par_iter()
        .map(|&(c, p)| simulate(&requests, p, c, a.seed))
        .collect();
    if let Some(path) = &a.plot {
        plot(path, &a.policy, &results).with_context(|| format!("drawing {}", path.display()))?;
    }
    if a.json {
        let rows: Vec<JsonRow> = results.iter().map(JsonRow::from).collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print_table(&requests, &results);
    }
    Ok(())
}

/// One line of a Mooncake trace; other fields (timestamp, lengths) are ignored.
#[derive(Deserialize)]
struct TraceLine {
    hash_ids: Vec<u64>,
}

/// Reads a Mooncake JSONL trace: each non-blank line an object whose `hash_ids` are its blocks.
fn read_trace(path: &Path) -> Result<Vec<Vec<u64>>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading trace {}", path.display()))?;
    let mut requests = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let parsed: TraceLine = serde_json::from_str(line).with_context(|| {
            format!(
                "{}:{}: not a trace line (expected a JSON object with \"hash_ids\": [ids...])",
                path.display(),
                i + 1
            )
        })?;
        requests.push(parsed.hash_ids);
    }
    if requests.is_empty() {
        bail!("trace {} holds no requests", path.display());
    }
    Ok(requests)
}

/// The `--json` form of a [`SimResult`].
#[derive(Serialize)]
struct JsonRow<'a> {
    policy: &'a str,
    capacity_blocks: usize,
    lookups: u64,
    block_hits: u64,
    block_hit_rate: f64,
    prefix_hits: u64,
    prefix_hit_rate: f64,
}

impl<'a> From<&'a SimResult> for JsonRow<'a> {
    fn from(r: &'a SimResult) -> Self {
        Self {
            policy: &r.policy,
            capacity_blocks: r.capacity_blocks,
            lookups: r.lookups,
            block_hits: r.block_hits,
            block_hit_rate: r.block_hit_rate,
            prefix_hits: r.prefix_hits,
            prefix_hit_rate: r.prefix_hit_rate,
        }
    }
}

fn print_table(requests: &[Vec<u64>], results: &[SimResult]) {
    let lookups: usize = requests.iter().map(Vec::len).sum();
    println!("{} requests, {lookups} block lookups", requests.len());
    println!(
        "{:>10}  {:<8} {:>10} {:>8} {:>10} {:>8}",
        "capacity", "policy", "block_hits", "block %", "prefix_hits", "prefix %"
    );
    let mut last_capacity = None;
    for r in results {
        if last_capacity.is_some_and(|c| c != r.capacity_blocks) {
            println!();
        }
        last_capacity = Some(r.capacity_blocks);
        println!(
            "{:>10}  {:<8} {:>10} {:>7.2}% {:>11} {:>7.2}%",
            r.capacity_blocks,
            r.policy,
            r.block_hits,
            100.0 * r.block_hit_rate,
            r.prefix_hits,
            100.0 * r.prefix_hit_rate
        );
    }
}

/// Which rate of a result a plot panel shows.
type Metric = fn(&SimResult) -> f64;

/// Fixed colours, so a policy looks the same in every plot; Belady black.
fn policy_color(policy: SimPolicy, k: usize) -> plotters::style::RGBAColor {
    use plotters::style::{Color, Palette, Palette99, RGBColor, BLACK};
    let rgb = match policy.name() {
        "lru" => RGBColor(214, 39, 40),
        "lfu" => RGBColor(44, 160, 44),
        "fifo" => RGBColor(188, 140, 0),
        "random" => RGBColor(31, 119, 180),
        "s3fifo" => RGBColor(255, 127, 14),
        "belady" => BLACK,
        _ => return Palette99::pick(k).to_rgba(),
    };
    rgb.to_rgba()
}

/// Two panels side by side, block and prefix hit rate (%) against capacity (log scale), one line
/// per policy; Belady's optimum dashed.
fn plot(path: &Path, policies: &[SimPolicy], results: &[SimResult]) -> Result<()> {
    use plotters::prelude::*;
    let err = |e: &dyn std::fmt::Display| anyhow!("{e}");

    let caps = results.iter().map(|r| r.capacity_blocks.max(1) as f64);
    let (lo, hi) = caps.fold((f64::MAX, 0.0f64), |(lo, hi), c| (lo.min(c), hi.max(c)));
    // A little room either side; a single capacity still gets a range.
    let (x0, x1) = (lo / 1.5, hi * 1.5);
    let y_top = results
        .iter()
        .map(|r| 100.0 * r.block_hit_rate)
        .fold(0.0, f64::max);
    let y1 = ((y_top / 10.0).ceil() * 10.0).max(10.0);

    let root = SVGBackend::new(path, (1200, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let panels = root.split_evenly((1, 2));
    let metrics: [(&str, Metric); 2] = [
        ("Block hit rate", |r| r.block_hit_rate),
        ("Prefix hit rate", |r| r.prefix_hit_rate),
    ];
    for (area, (title, metric)) in panels.iter().zip(metrics) {
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(45)
            .y_label_area_size(55)
            .build_cartesian_2d((x0..x1).log_scale(), 0.0..y1)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("cache capacity (blocks, log scale)")
            .y_desc("hit rate (%)")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .draw()
            .map_err(|e| err(&e))?;
        for (k, &policy) in policies.iter().enumerate() {
            let points: Vec<(f64, f64)> = results
                .iter()
                .filter(|r| r.policy == policy.name())
                .map(|r| (r.capacity_blocks.max(1) as f64, 100.0 * metric(r)))
                .collect();
            let color = policy_color(policy, k);
            let style = color.stroke_width(2);
            let anno = if policy == SimPolicy::Belady {
                chart.draw_series(DashedLineSeries::new(points.clone(), 8, 5, style))
            } else {
                chart.draw_series(LineSeries::new(points.clone(), style))
            }
            .map_err(|e| err(&e))?;
            anno.label(policy.name()).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
            chart
                .draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(|e| err(&e))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
