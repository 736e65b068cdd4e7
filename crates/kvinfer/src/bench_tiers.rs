//! `kvinfer bench tiers` and `kvinfer bench small-pool`: what the tiers below the pool are worth.
//!
//! - `tiers`: TTFT of a long prompt plus a new suffix, cold, from the pool, and from each tier
//!   alone (RAM, disk with the page cache dropped where allowed, Redis, Redis Cluster); each
//!   output is checked equal to the cold one. Then each tier's I/O rate on the prompt's real KV
//!   blocks, and every codec's ratio and speed on them.
//! - `small-pool`: a multi-turn chat workload replayed with an unlimited pool, with a pool of a
//!   tenth of its working set, and with that small pool plus RAM and disk tiers: prefix hit
//!   rate and throughput, outputs checked equal across the three.

use crate::bench::{pp, tokens, warm_up};
use crate::cli::{SmallPoolBenchArgs, TierBenchArgs};
use crate::load::{cache_options, load_model};
use anyhow::{anyhow, ensure, Result};
use kvinfer_engine::{
    block_spec, generate, generate_tiered, new_kv_cache, new_paged_kv, CacheOptions, Codec,
    GenerateRequest, TierOptions, TierSink, TieredStore,
};
use kvinfer_model::Model;
use kvinfer_tier::testing::{RedisCluster, RedisServer};
use kvinfer_tier::{
    wire, BlockSpec, DiskTier, DiskTierConfig, LoadRequest, RamTier, RedisTarget, RedisTier,
    RedisTierConfig, Tier, TierSpec, TieredStoreConfig, WriteMode,
};
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn greedy(ids: &[u32], max_tokens: usize, ctx: usize, prefix_cache: bool) -> GenerateRequest {
    GenerateRequest {
        prefix_cache,
        ctx_size: ctx,
        ..GenerateRequest::greedy(ids, max_tokens)
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Drops the OS page cache (needs root); false when not allowed.
fn drop_page_cache() -> bool {
    let _ = std::process::Command::new("sync").status();
    std::fs::write("/proc/sys/vm/drop_caches", "1").is_ok()
}

/// One tier under test: how to build it, and whether it reads from disk.
struct Case {
    name: &'static str,
    tier: Arc<dyn Tier>,
    disk: bool,
}

fn cases(a: &TierBenchArgs, dir: &Path) -> Result<(Vec<Case>, Vec<Box<dyn std::any::Any>>)> {
    let mut keep: Vec<Box<dyn std::any::Any>> = Vec::new();
    let redis_cfg = |target| RedisTierConfig {
        target,
        ttl: Duration::from_secs(3600),
        read_timeout: Duration::from_millis(2000),
        write_timeout: Duration::from_millis(5000),
    };
    let mut out = vec![
        Case {
            name: "ram",
            tier: Arc::new(RamTier::new(4 << 30, a.model.evict)),
            disk: false,
        },
        Case {
            name: "disk",
            tier: Arc::new(DiskTier::open(&DiskTierConfig {
                dir: dir.to_path_buf(),
                budget_bytes: 16 << 30,
                ttl: None,
            })?),
            disk: true,
        },
    ];
    if !a.no_redis {
        let url = match &a.model.tiers.redis {
            Some(u) => u.clone(),
            None => {
                let s = RedisServer::start()?;
                let u = s.url();
                keep.push(Box::new(s));
                u
            }
        };
        out.push(Case {
            name: "redis",
            tier: Arc::new(RedisTier::new(redis_cfg(RedisTarget::Single(url)))?),
            disk: false,
        });
        let nodes = if a.model.tiers.redis_cluster.is_empty() {
            let c = RedisCluster::start(3)?;
            let n = c.addrs();
            keep.push(Box::new(c));
            n
        } else {
            a.model.tiers.redis_cluster.clone()
        };
        out.push(Case {
            name: "redis-cluster",
            tier: Arc::new(RedisTier::new(redis_cfg(RedisTarget::Cluster(nodes)))?),
            disk: false,
        });
    }
    Ok((out, keep))
}

fn store_of(spec: BlockSpec, tier: Arc<dyn Tier>, codec: Codec) -> Arc<TieredStore> {
    let config = TieredStoreConfig {
        block: spec,
        write_queue_blocks: 4096,
        load_queue: 4,
    };
    let t = TierSpec {
        tier,
        write: WriteMode::Through,
        codec,
    };
    Arc::new(TieredStore::new(config, vec![t]))
}

/// Bytes per second over `secs` as MB/s.
fn mb_s(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / 1e6 / secs.max(1e-9)
}

/// Runs `f` at least `min_s` seconds (and at least once); seconds per call.
fn time_per_call(min_s: f64, mut f: impl FnMut()) -> f64 {
    let t = Instant::now();
    let mut n = 0u32;
    while n == 0 || t.elapsed().as_secs_f64() < min_s {
        f();
        n += 1;
    }
    t.elapsed().as_secs_f64() / n as f64
}

/// `kvinfer bench tiers`.
pub fn run(a: TierBenchArgs, threads: usize) -> Result<()> {
    ensure!(
        a.prompt_tokens >= a.model.block_size,
        "--prompt-tokens must cover a block"
    );
    ensure!(a.repetitions >= 1, "--repetitions must be at least 1");
    ensure!(
        a.model.tiers.ram_tier_mb == 0 && a.model.tiers.disk_tier.is_none(),
        "`kvinfer bench tiers` builds each tier itself (RAM, a temp disk dir); only --redis, \
         --redis-cluster and --tier-codec choose what it measures"
    );
    let model = load_model(&a.model)?;
    let ctx = a.model.ctx_size.min(model.config.context_length);
    ensure!(
        a.prompt_tokens + a.suffix_tokens + a.gen_tokens <= ctx,
        "the prompt, suffix and output do not fit --ctx-size {ctx}"
    );
    warm_up(&model, a.warmup_s)?;
    pp(&model, 64, 7)?;
    let bs = a.model.block_size;
    let all = tokens(&model, a.prompt_tokens + a.suffix_tokens, 42);
    let prefix = &all[..a.prompt_tokens];
    let pool_opts = CacheOptions {
        tiers: TierOptions::default(),
        ..cache_options(&a.model)
    };
    let fresh = || new_paged_kv(&model, &pool_opts).map_err(anyhow::Error::msg);
    let mut rows: Vec<Value> = Vec::new();
    let progress = |s: &str| eprintln!("bench tiers: {s}");

    // Cold: nothing cached.
    let mut times = Vec::new();
    let mut reference = Vec::new();
    for _ in 0..a.repetitions {
        let o = generate(
            &model,
            &mut fresh()?,
            &greedy(&all, a.gen_tokens, ctx, true),
            |_| true,
        )?;
        times.push(o.timings.prefill_ms);
        reference = o.ids;
    }
    let cold = median(&mut times);
    progress(&format!("cold {cold:.1} ms"));
    rows.push(
        json!({"case": "cold", "ttft_ms": cold, "ttft_ms_all": times, "cached_tokens": 0,
        "tier_tokens": 0, "outputs_equal": true}),
    );

    // Pool hit.
    let (mut times, mut equal, mut cached) = (Vec::new(), true, 0);
    for _ in 0..a.repetitions {
        let mut kv = fresh()?;
        generate(&model, &mut kv, &greedy(prefix, 1, ctx, true), |_| true)?;
        let o = generate(
            &model,
            &mut kv,
            &greedy(&all, a.gen_tokens, ctx, true),
            |_| true,
        )?;
        times.push(o.timings.prefill_ms);
        equal &= o.ids == reference;
        cached = o.timings.cached_tokens;
    }
    let pool = median(&mut times);
    progress(&format!("pool hit {pool:.1} ms"));
    rows.push(
        json!({"case": "pool", "ttft_ms": pool, "ttft_ms_all": times,
        "cached_tokens": cached, "tier_tokens": 0, "outputs_equal": equal}),
    );

    let dir = std::env::temp_dir().join(format!("kvinfer-bench-tiers-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (cases, _servers) = cases(&a, &dir)?;
    let spec = block_spec(&model.kv_identity(bs, a.model.kv_dtype, !a.model.swa_full));
    let codec_of = |_: &Case| {
        a.model
            .tiers
            .tier_codec
            .unwrap_or(kvinfer_engine::DEFAULT_CODEC)
    };
    let mut page_cache_dropped = None;
    let mut io = Vec::new();
    let mut payloads: Vec<Vec<u8>> = Vec::new();
    for case in &cases {
        let codec = codec_of(case);
        let store = store_of(spec, case.tier.clone(), codec);
        // Populate: the prefix computed once on a pool that writes through to this tier.
        let mut kv = fresh()?;
        kv.set_sink(Box::new(TierSink::new(store.clone())));
        generate(&model, &mut kv, &greedy(prefix, 1, ctx, true), |_| true)?;
        store.flush();
        let hashes = kv.hash_blocks(prefix);
        drop(kv);
        let (mut times, mut equal, mut cached, mut tier_tokens) = (Vec::new(), true, 0, 0);
        let mut load_ms = Vec::new();
        for _ in 0..a.repetitions {
            if case.disk {
                page_cache_dropped = Some(drop_page_cache());
            }
            let mut kv = fresh()?;
            let req = greedy(&all, a.gen_tokens, ctx, true);
            let o = generate_tiered(&model, &mut kv, Some(&store), &req, |_| true)?;
            times.push(o.timings.prefill_ms);
            equal &= o.ids == reference;
            cached = o.timings.cached_tokens;
            tier_tokens = o.timings.tier_tokens;
            load_ms.push(o.timings.tier_load_ms);
        }
        let t = median(&mut times);
        progress(&format!(
            "{} hit {t:.1} ms ({tier_tokens} tokens from the tier)",
            case.name
        ));
        rows.push(
            json!({"case": case.name, "ttft_ms": t, "ttft_ms_all": times,
            "tier_load_ms": median(&mut load_ms), "cached_tokens": cached,
            "tier_tokens": tier_tokens, "outputs_equal": equal}),
        );
        // The prompt's verified blocks, for the I/O and codec measurements.
        if payloads.is_empty() {
            let lr = LoadRequest::chain(hashes.clone(), prefix[..hashes.len() * bs].to_vec());
            payloads = store.load_blocking(&lr).payloads().to_vec();
        }
        io.push(tier_io(case, &spec, &hashes, prefix, &payloads, codec)?);
        let _ = store.clear();
    }
    let _ = std::fs::remove_dir_all(&dir);
    let codecs = codec_table(&payloads);
    for r in rows.iter_mut() {
        let t = r["ttft_ms"].as_f64().unwrap_or(0.0);
        r["ratio_vs_cold"] = json!(t / cold);
        r["ratio_vs_pool"] = json!(t / pool);
    }
    let j = json!({
        "model": model.name,
        "threads": threads,
        "prompt_tokens": a.prompt_tokens,
        "suffix_tokens": a.suffix_tokens,
        "block_size": bs,
        "block_bytes": spec.payload_bytes(),
        "codecs_used": cases.iter().map(|c| json!({"tier": c.name, "codec": codec_of(c).to_string()})).collect::<Vec<_>>(),
        "repetitions": a.repetitions,
        "page_cache_dropped": page_cache_dropped,
        "cases": rows,
        "io": io,
        "codecs": codecs,
    });
    if let Some(p) = &a.plot {
        plot(p, &model.name, &j["cases"])?;
    }
    let mut out = std::io::stdout();
    if a.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&j)?)?;
    } else {
        writeln!(
            out,
            "{} ({} tokens + {} new; block {} tokens, {} KiB)",
            model.name,
            a.prompt_tokens,
            a.suffix_tokens,
            bs,
            spec.payload_bytes() >> 10
        )?;
        writeln!(
            out,
            "{:<14} {:>10} {:>9} {:>9} {:>7} {:>6}",
            "case", "TTFT ms", "x cold", "x pool", "cached", "equal"
        )?;
        for r in j["cases"].as_array().into_iter().flatten() {
            writeln!(
                out,
                "{:<14} {:>10.1} {:>9.4} {:>9.2} {:>7} {:>6}",
                r["case"].as_str().unwrap_or(""),
                r["ttft_ms"].as_f64().unwrap_or(0.0),
                r["ratio_vs_cold"].as_f64().unwrap_or(0.0),
                r["ratio_vs_pool"].as_f64().unwrap_or(0.0),
                r["cached_tokens"],
                r["outputs_equal"]
            )?;
        }
        writeln!(out, "\ntier I/O (codec per tier as in the TTFT runs):")?;
        for r in &io {
            writeln!(out, "{:<14} {:<13} write {:>8.1} MB/s {:>8.0} blocks/s   read {:>8.1} MB/s {:>8.0} blocks/s",
                r["tier"].as_str().unwrap_or(""), r["codec"].as_str().unwrap_or(""), r["write_mb_s"].as_f64().unwrap_or(0.0),
                r["write_blocks_s"].as_f64().unwrap_or(0.0), r["read_mb_s"].as_f64().unwrap_or(0.0),
                r["read_blocks_s"].as_f64().unwrap_or(0.0))?;
        }
        writeln!(out, "\ncodecs on {} real KV blocks:", payloads.len())?;
        for r in &codecs {
            writeln!(
                out,
                "{:<14} ratio {:>6.3}  encode {:>8.1} MB/s  decode {:>8.1} MB/s",
                r["codec"].as_str().unwrap_or(""),
                r["ratio"].as_f64().unwrap_or(0.0),
                r["encode_mb_s"].as_f64().unwrap_or(0.0),
                r["decode_mb_s"].as_f64().unwrap_or(0.0)
            )?;
        }
    }
    let bad: Vec<&str> = j["cases"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["outputs_equal"] != json!(true))
        .filter_map(|r| r["case"].as_str())
        .collect();
    ensure!(
        bad.is_empty(),
        "outputs differ from the cold run for: {bad:?}"
    );
    Ok(())
}

/// Put then get of the prompt's blocks under fresh keys, straight on the tier: MB/s (of raw
/// payload) and blocks/s, the wire encoding and checks included.
fn tier_io(
    case: &Case,
    spec: &BlockSpec,
    hashes: &[kvinfer_cache::BlockHash],
    prefix: &[u32],
    payloads: &[Vec<u8>],
    codec: Codec,
) -> Result<Value> {
    let bs = spec.block_size as usize;
    let keys: Vec<_> = hashes
        .iter()
        .map(|h| {
            let mut h = *h;
            h.0[15] ^= 0x5a;
            h
        })
        .collect();
    let raw_bytes: usize = payloads.iter().map(|p| p.len()).sum();
    let t = Instant::now();
    let mut wire_bytes = 0;
    for (i, p) in payloads.iter().enumerate() {
        let w = wire::encode(spec, &keys[i], &prefix[i * bs..(i + 1) * bs], p, codec);
        wire_bytes += w.len();
        case.tier
            .put(&spec.key(keys[i]), &w)
            .map_err(|e| anyhow!("{}: {e}", case.name))?;
    }
    let write_s = t.elapsed().as_secs_f64();
    if case.disk {
        drop_page_cache();
    }
    let tier_keys: Vec<_> = keys[..payloads.len()]
        .iter()
        .map(|h| spec.key(*h))
        .collect();
    let t = Instant::now();
    let got = case
        .tier
        .get_many(&tier_keys)
        .map_err(|e| anyhow!("{}: {e}", case.name))?;
    let mut ok = 0;
    for (i, g) in got.iter().enumerate() {
        if let Some(b) = g {
            ok += wire::decode(spec, &keys[i], &prefix[i * bs..(i + 1) * bs], b).is_ok() as usize;
        }
    }
    let read_s = t.elapsed().as_secs_f64();
    ensure!(
        ok == payloads.len(),
        "{}: read back {ok} of {} blocks",
        case.name,
        payloads.len()
    );
    for k in &tier_keys {
        let _ = case.tier.delete(k);
    }
    let n = payloads.len() as f64;
    Ok(json!({
        "tier": case.name,
        "codec": codec.to_string(),
        "blocks": payloads.len(),
        "wire_bytes_per_block": wire_bytes / payloads.len().max(1),
        "write_mb_s": mb_s(raw_bytes, write_s),
        "write_blocks_s": n / write_s.max(1e-9),
        "read_mb_s": mb_s(raw_bytes, read_s),
        "read_blocks_s": n / read_s.max(1e-9),
    }))
}

/// Every codec on the real blocks: compression ratio and speed.
fn codec_table(payloads: &[Vec<u8>]) -> Vec<Value> {
    let raw: usize = payloads.iter().map(|p| p.len()).sum();
    Codec::ALL
        .into_iter()
        .map(|c| {
            let enc: Vec<Vec<u8>> = payloads.iter().map(|p| c.encode(p)).collect();
            let stored: usize = enc.iter().map(|e| e.len()).sum();
            let e_s = time_per_call(0.3, || {
                for p in payloads {
                    std::hint::black_box(c.encode(p));
                }
            });
            let d_s = time_per_call(0.3, || {
                for (e, p) in enc.iter().zip(payloads) {
                    std::hint::black_box(c.decode(e, p.len()));
                }
            });
            json!({"codec": c.to_string(), "ratio": raw as f64 / stored.max(1) as f64,
                "encode_mb_s": mb_s(raw, e_s), "decode_mb_s": mb_s(raw, d_s)})
        })
        .collect()
}

/// A bar per case: TTFT in ms on a log scale.
fn plot(path: &PathBuf, title: &str, cases: &Value) -> Result<()> {
    use plotters::prelude::*;
    let err = |e: &dyn std::fmt::Display| anyhow!("{e}");
    let rows: Vec<(String, f64)> = cases
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            (
                r["case"].as_str().unwrap_or("").to_string(),
                r["ttft_ms"].as_f64().unwrap_or(1.0).max(0.1),
            )
        })
        .collect();
    let top = rows.iter().map(|r| r.1).fold(1.0, f64::max) * 2.0;
    let root = SVGBackend::new(path, (800, 450)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("TTFT of a cached prompt + new suffix: {title}"),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0..rows.len(), (1.0..top).log_scale())
        .map_err(|e| err(&e))?;
    let names: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(rows.len() + 1)
        .x_label_formatter(&|i| names.get(*i).cloned().unwrap_or_default())
        .y_desc("TTFT (ms, log scale)")
        .draw()
        .map_err(|e| err(&e))?;
    chart
        .draw_series(rows.iter().enumerate().map(|(i, r)| {
            let color = if i == 0 {
                RGBColor(217, 83, 79)
            } else {
                RGBColor(66, 139, 202)
            };
            Rectangle::new([(i, 1.0), (i + 1, r.1)], color.filled())
        }))
        .map_err(|e| err(&e))?;
    chart
        .draw_series(
            rows.iter().enumerate().map(|(i, r)| {
                Text::new(format!("{:.0}", r.1), (i, r.1 * 1.15), ("sans-serif", 14))
            }),
        )
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// One replay of the chat workload: hit rate, time, and every turn's output.
struct Replay {
    prompt_tokens: usize,
    cached_tokens: usize,
    tier_tokens: usize,
    seconds: f64,
    outputs: Vec<Vec<u32>>,
}

fn replay(
    model: &Model,
    a: &SmallPoolBenchArgs,
    opts: &CacheOptions,
    ctx: usize,
) -> Result<Replay> {
    let (mut kv, store) = new_kv_cache(model, opts).map_err(anyhow::Error::msg)?;
    let mut history: Vec<Vec<u32>> = vec![Vec::new(); a.conversations];
    let mut r = Replay {
        prompt_tokens: 0,
        cached_tokens: 0,
        tier_tokens: 0,
        seconds: 0.0,
        outputs: Vec::new(),
    };
    let t = Instant::now();
    for turn in 0..a.turns {
        for (c, h) in history.iter_mut().enumerate() {
            h.extend(tokens(model, a.turn_tokens, 1000 + (c * 100 + turn) as u64));
            let o = generate_tiered(
                model,
                &mut kv,
                store.as_deref(),
                &greedy(h, a.gen_tokens, ctx, true),
                |_| true,
            )?;
            r.prompt_tokens += h.len();
            r.cached_tokens += o.timings.cached_tokens;
            r.tier_tokens += o.timings.tier_tokens;
            h.extend(&o.ids);
            r.outputs.push(o.ids);
        }
    }
    r.seconds = t.elapsed().as_secs_f64();
    Ok(r)
}

/// `kvinfer bench small-pool`.
pub fn run_small_pool(a: SmallPoolBenchArgs, threads: usize) -> Result<()> {
    ensure!(
        a.conversations >= 1 && a.turns >= 2,
        "give at least 1 conversation and 2 turns"
    );
    ensure!(
        a.pool_fraction > 0.0 && a.pool_fraction < 1.0,
        "--pool-fraction is in (0, 1)"
    );
    crate::bench::no_tier_flags(
        &a.model,
        "bench small-pool",
        "it builds its own RAM and disk tiers (--ram-mb)",
    )?;
    let model = load_model(&a.model)?;
    let ctx = a.model.ctx_size.min(model.config.context_length);
    let bs = a.model.block_size;
    let longest = a.turns * (a.turn_tokens + a.gen_tokens);
    ensure!(
        longest < ctx,
        "a conversation of {longest} tokens does not fit --ctx-size {ctx}"
    );
    warm_up(&model, a.warmup_s)?;
    pp(&model, 64, 7)?;
    let working_blocks = a.conversations * longest.div_ceil(bs);
    let small = ((working_blocks as f64 * a.pool_fraction) as usize).max(longest.div_ceil(bs) + 2);
    let base = CacheOptions {
        tiers: TierOptions::default(),
        ..cache_options(&a.model)
    };
    let with_blocks = |n: usize, tiers: TierOptions| CacheOptions {
        num_blocks: Some(n),
        tiers,
        ..base.clone()
    };
    let dir = std::env::temp_dir().join(format!("kvinfer-bench-small-pool-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let tiered = TierOptions {
        ram_tier_mb: a.ram_mb,
        disk_dir: Some(dir.clone()),
        ..TierOptions::default()
    };
    let runs = [
        (
            "unlimited",
            with_blocks(working_blocks * 2 + 64, TierOptions::default()),
        ),
        ("small", with_blocks(small, TierOptions::default())),
        ("small+ram+disk", with_blocks(small, tiered)),
    ];
    let mut results = Vec::new();
    for (name, opts) in &runs {
        let r = replay(&model, &a, opts, ctx)?;
        eprintln!(
            "bench small-pool: {name}: hit rate {:.3}, {:.1} s",
            r.cached_tokens as f64 / r.prompt_tokens as f64,
            r.seconds
        );
        results.push((name, r));
    }
    let _ = std::fs::remove_dir_all(&dir);
    let hit = |r: &Replay| r.cached_tokens as f64 / r.prompt_tokens.max(1) as f64;
    let (u, s, t) = (&results[0].1, &results[1].1, &results[2].1);
    let lost = hit(u) - hit(s);
    let recovered = if lost > 0.0 {
        (hit(t) - hit(s)) / lost
    } else {
        1.0
    };
    let equal = s.outputs == u.outputs && t.outputs == u.outputs;
    let runs_json: Vec<Value> = results
        .iter()
        .map(|(name, r)| {
            json!({
                "run": name,
                "prefix_hit_rate": hit(r),
                "prompt_tokens": r.prompt_tokens,
                "cached_tokens": r.cached_tokens,
                "tier_tokens": r.tier_tokens,
                "seconds": r.seconds,
                "prompt_tokens_per_s": r.prompt_tokens as f64 / r.seconds,
                "turns_per_s": r.outputs.len() as f64 / r.seconds,
            })
        })
        .collect();
    let j = json!({
        "model": model.name,
        "threads": threads,
        "conversations": a.conversations,
        "turns": a.turns,
        "turn_tokens": a.turn_tokens,
        "gen_tokens": a.gen_tokens,
        "working_set_blocks": working_blocks,
        "small_pool_blocks": small,
        "ram_tier_mb": a.ram_mb,
        "runs": runs_json,
        "hits_recovered": recovered,
        "throughput_gain": (t.prompt_tokens as f64 / t.seconds) / (s.prompt_tokens as f64 / s.seconds),
        "outputs_equal": equal,
    });
    let mut out = std::io::stdout();
    if a.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&j)?)?;
    } else {
        for r in j["runs"].as_array().into_iter().flatten() {
            writeln!(
                out,
                "{:<16} hit rate {:>6.1}%  {:>7.1} prompt tok/s  {:>6.1} s",
                r["run"].as_str().unwrap_or(""),
                100.0 * r["prefix_hit_rate"].as_f64().unwrap_or(0.0),
                r["prompt_tokens_per_s"].as_f64().unwrap_or(0.0),
                r["seconds"].as_f64().unwrap_or(0.0)
            )?;
        }
        writeln!(out, "the tiers won back {:.1}% of the hits the small pool lost; throughput x{:.2}; outputs equal: {equal}",
            100.0 * recovered, j["throughput_gain"].as_f64().unwrap_or(0.0))?;
    }
    ensure!(
        equal,
        "outputs differ between the runs: a cache feature changed the result"
    );
    Ok(())
}
