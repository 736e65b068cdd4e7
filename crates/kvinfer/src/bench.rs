//! `kvinfer bench`: prompt processing (pp) and text generation (tg) speed, measured the way
//! llama-bench does: pp = one forward over N prompt tokens from an empty cache; tg = N single-token
//! forwards from an empty cache. Random token ids, fixed seed; the mean of `repetitions` runs.

use crate::cli::{BatchBenchArgs, BenchArgs, PeakBenchArgs, PrefixBenchArgs};
use crate::load::{kv_cache, load_model};
use anyhow::Result;
use kvinfer_cache::{KvDtype, PagedKv, PolicyKind};
use kvinfer_engine::{generate, generate_tiered, GenerateRequest};
use kvinfer_model::ggml_type::GgmlType;
use kvinfer_model::{Model, SeqBatch};
use std::io::Write;
use std::time::Instant;

pub(crate) fn tokens(model: &Model, n: usize, seed: u64) -> Vec<u32> {
    // xorshift: deterministic ids without pulling a generator into the measurement.
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let vocab = model.config.vocab_size as u64;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % vocab) as u32
        })
        .collect()
}

/// A cache with room for one sequence of `n` tokens, and that sequence (no prefix reuse: every
/// token is computed).
fn one_sequence(model: &Model, n: usize) -> (PagedKv, kvinfer_cache::SeqId) {
    let bs = kvinfer_engine::DEFAULT_BLOCK_SIZE;
    let mut kv =
        model
            .kv_identity(bs, KvDtype::F16, false)
            .paged(n.div_ceil(bs), PolicyKind::Lru, 0);
    let (seq, _) = kv.add_sequence(&[], false);
    (kv, seq)
}

/// Runs `ids` after the sequence's cached tokens.
fn step(model: &Model, kv: &mut PagedKv, seq: kvinfer_cache::SeqId, ids: &[u32]) -> Result<()> {
    kvinfer_engine::extend_sequence(model, kv, seq, ids)?
        .ok_or_else(|| anyhow::anyhow!("the bench's KV cache is too small"))?;
    Ok(())
}

pub(crate) fn pp(model: &Model, n: usize, seed: u64) -> Result<f64> {
    pp_at(model, n, 0, seed)
}

/// A sequence with `depth` cached tokens (computed, not timed).
fn at_depth(model: &Model, depth: usize, n: usize) -> Result<(PagedKv, kvinfer_cache::SeqId)> {
    let (mut kv, seq) = one_sequence(model, depth + n);
    if depth > 0 {
        step(model, &mut kv, seq, &tokens(model, depth, 4242))?;
    }
    Ok((kv, seq))
}

/// pp of `n` tokens after `depth` cached ones.
fn pp_at(model: &Model, n: usize, depth: usize, seed: u64) -> Result<f64> {
    let ids = tokens(model, n, seed);
    let (mut kv, seq) = at_depth(model, depth, n)?;
    let t = Instant::now();
    step(model, &mut kv, seq, &ids)?;
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

/// tg of `n` tokens after `depth` cached ones.
fn tg_at(model: &Model, n: usize, depth: usize, seed: u64) -> Result<f64> {
    let ids = tokens(model, n, seed);
    let (mut kv, seq) = at_depth(model, depth, n)?;
    let t = Instant::now();
    for id in ids {
        step(model, &mut kv, seq, &[id])?;
    }
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

fn tg(model: &Model, n: usize, seed: u64) -> Result<f64> {
    tg_at(model, n, 0, seed)
}

/// `kvinfer bench peak`: memory read bandwidth and multiply-add peaks (a roofline's axes).
pub fn run_peak(a: PeakBenchArgs, threads: usize) -> Result<()> {
    use kvinfer_model::kernels::{peak, simd};
    anyhow::ensure!(a.buffer_mb >= 1, "--buffer-mb must be at least 1");
    if a.warmup_s > 0.0 {
        peak::f32_fmas(simd(), threads, a.warmup_s);
    }
    let read = peak::read_bandwidth(a.buffer_mb << 20, threads, 5);
    let int8 = peak::int8_macs(simd(), threads, 0.5);
    let f32 = peak::f32_fmas(simd(), threads, 0.5);
    // The packed GEMM at SmolLM2's FFN shape and a 512-token prefill, per packed type.
    let gemm: Vec<(GgmlType, f64)> = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
    ]
    .into_iter()
    .map(|ty| (ty, peak::gemm_macs(ty, 1536, 576, 512, 0.5)))
    .collect();
    let j = serde_json::json!({
        "threads": threads,
        "simd": simd().name(),
        "buffer_mb": a.buffer_mb,
        "read_gb_s": read / 1e9,
        "int8_gops": 2.0 * int8 / 1e9,
        "f32_gflops": 2.0 * f32 / 1e9,
        "gemm_1536x576x512_gops": gemm
            .iter()
            .map(|(ty, m)| (format!("{ty:?}"), serde_json::json!(2.0 * m / 1e9)))
            .collect::<serde_json::Map<_, _>>(),
    });
    let mut out = std::io::stdout();
    if a.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&j)?)?;
    } else {
        writeln!(out, "{threads} threads, {}", simd().name())?;
        writeln!(
            out,
            "memory read   {:8.1} GB/s ({} MiB buffer)",
            read / 1e9,
            a.buffer_mb
        )?;
        writeln!(
            out,
            "int8 peak     {:8.1} GOP/s (multiply + add = 2)",
            2.0 * int8 / 1e9
        )?;
        writeln!(out, "f32 FMA peak  {:8.1} GFLOP/s", 2.0 * f32 / 1e9)?;
        for (ty, m) in &gemm {
            writeln!(
                out,
                "GEMM {:<5}    {:8.1} GOP/s ({:.0}% of int8 peak; 1536x576 weights x 512 tokens)",
                format!("{ty:?}"),
                2.0 * m / 1e9,
                100.0 * m / int8.max(1.0)
            )?;
        }
    }
    Ok(())
}

pub(crate) fn warm_up(model: &Model, seconds: f64) -> Result<()> {
    let t = Instant::now();
    let mut i = 0;
    while t.elapsed().as_secs_f64() < seconds {
        pp(model, 64, 1000 + i)?;
        i += 1;
    }
    Ok(())
}

/// `kvinfer bench prefix`: cold TTFT of a prompt, then warm TTFT of the prompt plus a new suffix
/// (its prefix cached by the cold run), in one process; the warm output must equal a run of the
/// same request on a fresh cache.
pub fn run_prefix(a: PrefixBenchArgs, threads: usize) -> Result<()> {
    anyhow::ensure!(a.prompt_tokens >= 1, "--prompt-tokens must be at least 1");
    anyhow::ensure!(a.suffix_tokens >= 1, "--suffix-tokens must be at least 1");
    anyhow::ensure!(a.gen_tokens >= 1, "--gen-tokens must be at least 1");
    let model = load_model(&a.model)?;
    let total = a.prompt_tokens + a.suffix_tokens + a.gen_tokens;
    let ctx = a.model.ctx_size.min(model.config.context_length);
    anyhow::ensure!(
        total <= ctx,
        "prompt + suffix + generated = {total} tokens; the context holds {ctx} (raise --ctx-size)"
    );
    warm_up(&model, a.warmup_s)?;
    pp(&model, 64, 7)?; // page the weights in
    let all = tokens(&model, a.prompt_tokens + a.suffix_tokens, 42);
    let request = |ids: &[u32], prefix_cache: bool| GenerateRequest {
        prefix_cache,
        ctx_size: ctx,
        ..GenerateRequest::greedy(ids, a.gen_tokens)
    };
    let (mut kv, tiers) = kv_cache(&model, &a.model)?;
    let tiers = tiers.as_deref();
    let cold = generate_tiered(
        &model,
        &mut kv,
        tiers,
        &request(&all[..a.prompt_tokens], true),
        |_| true,
    )?;
    let warm = generate_tiered(&model, &mut kv, tiers, &request(&all, true), |_| true)?;
    // The reference runs on a pool of its own, with no tier behind it.
    let mut fresh = kvinfer_engine::new_paged_kv(&model, &crate::load::cache_options(&a.model))
        .map_err(anyhow::Error::msg)?;
    let reference = generate(&model, &mut fresh, &request(&all, false), |_| true)?;
    let (cold_ms, warm_ms) = (cold.timings.prefill_ms, warm.timings.prefill_ms);
    let j = serde_json::json!({
        "model": model.name,
        "threads": threads,
        "prompt_tokens": a.prompt_tokens,
        "suffix_tokens": a.suffix_tokens,
        "block_size": kv.block_size(),
        "cold_ttft_ms": cold_ms,
        "warm_ttft_ms": warm_ms,
        "ratio": warm_ms / cold_ms,
        "cached_tokens": warm.timings.cached_tokens,
        "reference_ttft_ms": reference.timings.prefill_ms,
        "outputs_equal": warm.ids == reference.ids,
    });
    if a.json {
        writeln!(std::io::stdout(), "{}", serde_json::to_string_pretty(&j)?)?;
    } else {
        writeln!(
            std::io::stdout(),
            "cold TTFT {cold_ms:.1} ms ({} tokens); warm TTFT {warm_ms:.1} ms ({} of {} tokens \
             cached); ratio {:.4}; outputs equal: {}",
            a.prompt_tokens,
            warm.timings.cached_tokens,
            all.len(),
            warm_ms / cold_ms,
            warm.ids == reference.ids
        )?;
    }
    anyhow::ensure!(
        warm.ids == reference.ids,
        "the warm output differs from the reference: the prefix cache changed the result"
    );
    Ok(())
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let m = v.iter().sum::<f64>() / v.len() as f64;
    let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / v.len() as f64;
    (m, var.sqrt())
}

/// Refuses tier flags on a bench that would not use them (no flag is accepted and ignored).
pub(crate) fn no_tier_flags(
    args: &crate::cli::ModelArgs,
    bench: &str,
    instead: &str,
) -> Result<()> {
    anyhow::ensure!(
        !args.tiers.options().any(),
        "`kvinfer {bench}` measures compute only and would ignore the tier flags; {instead}"
    );
    Ok(())
}

pub fn run(a: BenchArgs, threads: usize) -> Result<()> {
    no_tier_flags(
        &a.model,
        "bench",
        "use `kvinfer bench prefix` or `kvinfer bench tiers`",
    )?;
    let model = load_model(&a.model)?;
    warm_up(&model, a.warmup_s)?;
    // One untimed run of each to page the weights in.
    pp(&model, a.prompt_tokens.clamp(1, 64), 7)?;
    tg(&model, 4, 7)?;
    let reps = a.repetitions.max(1);
    let mut pps = Vec::new();
    let mut tgs = Vec::new();
    for r in 0..reps {
        if a.prompt_tokens > 0 {
            pps.push(pp_at(&model, a.prompt_tokens, a.depth, r as u64)?);
        }
        if a.gen_tokens > 0 {
            tgs.push(tg_at(&model, a.gen_tokens, a.depth, r as u64)?);
        }
    }
    let (pp_m, pp_s) = if pps.is_empty() {
        (0.0, 0.0)
    } else {
        mean_std(&pps)
    };
    let (tg_m, tg_s) = if tgs.is_empty() {
        (0.0, 0.0)
    } else {
        mean_std(&tgs)
    };
    let profiles = if a.profile {
        profile_runs(&model, a.prompt_tokens, a.gen_tokens, a.depth)?
    } else {
        vec![]
    };
    if a.json {
        let mut j = serde_json::json!({
            "engine": "kvinfer",
            "model": model.name,
            "arch": model.config.arch.name(),
            "threads": threads,
            "simd": kvinfer_model::kernels::simd_level(),
            "prompt_tokens": a.prompt_tokens,
            "gen_tokens": a.gen_tokens,
            "depth": a.depth,
            "repetitions": reps,
            "pp_tok_s": pp_m,
            "pp_tok_s_std": pp_s,
            "tg_tok_s": tg_m,
            "tg_tok_s_std": tg_s,
        });
        if a.profile {
            j["profile"] = profiles
                .iter()
                .map(|p| (p.test.clone(), p.json()))
                .collect::<serde_json::Map<_, _>>()
                .into();
        }
        writeln!(std::io::stdout(), "{}", serde_json::to_string_pretty(&j)?)?;
    } else {
        writeln!(
            std::io::stdout(),
            "model {} ({} threads, {})",
            model.name,
            threads,
            kvinfer_model::kernels::simd_level()
        )?;
        let at = if a.depth > 0 {
            format!(" @ d{}", a.depth)
        } else {
            String::new()
        };
        writeln!(
            std::io::stdout(),
            "pp{:<5} {:8.1} ± {:.1} tok/s{at}",
            a.prompt_tokens,
            pp_m,
            pp_s
        )?;
        writeln!(
            std::io::stdout(),
            "tg{:<5} {:8.1} ± {:.1} tok/s{at}",
            a.gen_tokens,
            tg_m,
            tg_s
        )?;
        for p in &profiles {
            p.print()?;
        }
    }
    Ok(())
}

/// One profiled run: where a test's time went, per operation of the forward pass.
struct Profile {
    /// `pp512`, `tg128`.
    test: String,
    /// Tokens the run computed.
    tokens: usize,
    /// Wall seconds of the whole run.
    total_s: f64,
    ops: Vec<(kvinfer_model::profile::Op, f64, u64)>,
}

impl Profile {
    fn json(&self) -> serde_json::Value {
        let ops: Vec<_> = (self.ops.iter())
            .map(|(op, s, calls)| {
                serde_json::json!({
                    "op": op.name(), "ms": s * 1e3, "calls": calls,
                    "share": s / self.total_s, "us_per_token": s * 1e6 / self.tokens as f64,
                })
            })
            .collect();
        let timed: f64 = self.ops.iter().map(|o| o.1).sum();
        serde_json::json!({
            "tokens": self.tokens, "total_ms": self.total_s * 1e3,
            "outside_ops_ms": (self.total_s - timed) * 1e3, "ops": ops,
        })
    }

    fn print(&self) -> Result<()> {
        let mut out = std::io::stdout();
        writeln!(
            out,
            "\nprofile {}: {:.1} ms, {} tokens",
            self.test,
            self.total_s * 1e3,
            self.tokens
        )?;
        writeln!(
            out,
            "  {:<12} {:>10} {:>7} {:>12}",
            "op", "ms", "share", "us/token"
        )?;
        let mut rows: Vec<(&str, f64)> = self.ops.iter().map(|o| (o.0.name(), o.1)).collect();
        let timed: f64 = rows.iter().map(|r| r.1).sum();
        rows.push(("(other)", self.total_s - timed));
        for (name, s) in rows {
            writeln!(
                out,
                "  {name:<12} {:>10.2} {:>6.1}% {:>12.1}",
                s * 1e3,
                100.0 * s / self.total_s,
                s * 1e6 / self.tokens as f64
            )?;
        }
        Ok(())
    }
}

/// A pp and a tg run with every operation timed.
fn profile_runs(model: &Model, prompt: usize, gen: usize, depth: usize) -> Result<Vec<Profile>> {
    use kvinfer_model::profile;
    let mut out = Vec::new();
    for (test, n) in [("pp", prompt), ("tg", gen)] {
        if n == 0 {
            continue;
        }
        // The depth is filled before profiling starts.
        let (mut kv, seq) = at_depth(model, depth, n)?;
        let ids = tokens(model, n, 99);
        profile::reset();
        profile::enable(true);
        let t = Instant::now();
        let r = if test == "pp" {
            step(model, &mut kv, seq, &ids)
        } else {
            ids.iter()
                .try_for_each(|&id| step(model, &mut kv, seq, &[id]))
        };
        let total_s = t.elapsed().as_secs_f64();
        profile::enable(false);
        r?;
        out.push(Profile {
            test: format!("{test}{n}"),
            tokens: n,
            total_s,
            ops: profile::snapshot(),
        });
    }
    Ok(out)
}

/// `kvinfer bench batch`: B sequences of `context` cached tokens each decode `steps` tokens in
/// one forward per step; the step time against B single-sequence steps.
pub fn run_batch(a: BatchBenchArgs, threads: usize) -> Result<()> {
    no_tier_flags(
        &a.model,
        "bench batch",
        "use `kvinfer bench prefix` or `kvinfer bench tiers`",
    )?;
    anyhow::ensure!(
        !a.batch_sizes.is_empty() && a.batch_sizes.iter().all(|&b| b >= 1),
        "batch sizes must be at least 1"
    );
    anyhow::ensure!(
        a.context >= 1 && a.steps >= 1,
        "--context and --steps must be at least 1"
    );
    let model = load_model(&a.model)?;
    warm_up(&model, a.warmup_s)?;
    pp(&model, 64, 7)?;
    let bs = kvinfer_engine::DEFAULT_BLOCK_SIZE;
    let mut rows = Vec::new();
    for &b in &a.batch_sizes {
        let per_seq = (a.context + a.steps + 1).div_ceil(bs);
        let mut kv =
            model
                .kv_identity(bs, KvDtype::F16, false)
                .paged(per_seq * b, PolicyKind::Lru, 0);
        let mut seqs = Vec::new();
        for i in 0..b {
            let (seq, _) = kv.add_sequence(&[], false);
            step(
                &model,
                &mut kv,
                seq,
                &tokens(&model, a.context, 100 + i as u64),
            )?;
            seqs.push(seq);
        }
        let next = tokens(&model, a.steps * b, 7);
        let t = Instant::now();
        for s in 0..a.steps {
            for &seq in &seqs {
                kv.reserve(seq, 1)
                    .map_err(|e| anyhow::anyhow!("bench cache too small: {e:?}"))?;
            }
            let ids = &next[s * b..(s + 1) * b];
            let (tables, storage) = kv.tables_and_storage();
            let batch: Vec<SeqBatch> = seqs
                .iter()
                .zip(ids.chunks(1))
                .map(|(&seq, id)| SeqBatch {
                    tokens: id,
                    start: tables.num_tokens(seq),
                    tables: tables.block_tables(seq),
                })
                .collect();
            model.forward(storage, &batch)?;
            for (&seq, id) in seqs.iter().zip(ids.chunks(1)) {
                kv.commit(seq, id);
            }
        }
        let step_ms = t.elapsed().as_secs_f64() * 1e3 / a.steps as f64;
        rows.push((b, step_ms));
    }
    let single = rows.iter().find(|r| r.0 == 1).map(|r| r.1);
    let out: Vec<serde_json::Value> = rows
        .iter()
        .map(|&(b, ms)| {
            serde_json::json!({
                "batch": b,
                "step_ms": ms,
                "tok_s": b as f64 * 1000.0 / ms,
                // Cost of one batched step relative to B separate single-sequence steps.
                "cost_vs_singles": single.map(|s| ms / (b as f64 * s)),
            })
        })
        .collect();
    if a.json {
        let j = serde_json::json!({
            "model": model.name,
            "threads": threads,
            "context": a.context,
            "steps": a.steps,
            "results": out,
        });
        writeln!(std::io::stdout(), "{}", serde_json::to_string_pretty(&j)?)?;
    } else {
        writeln!(
            std::io::stdout(),
            "model {} ({threads} threads), context {} tokens",
            model.name,
            a.context
        )?;
        for (r, (b, ms)) in out.iter().zip(&rows) {
            writeln!(
                std::io::stdout(),
                "batch {b:>3}: {ms:7.2} ms/step  {:8.1} tok/s  cost vs {b} single steps: {:.2}",
                r["tok_s"].as_f64().unwrap_or(0.0),
                r["cost_vs_singles"].as_f64().unwrap_or(f64::NAN)
            )?;
        }
    }
    Ok(())
}
