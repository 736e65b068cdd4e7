//! `kvinfer bench`: prompt processing (pp) and text generation (tg) speed, measured the way
//! llama-bench does: pp = one forward over N prompt tokens from an empty cache; tg = N single-token
//! forwards from an empty cache. Random token ids, fixed seed; the mean of `repetitions` runs.

use crate::cli::BenchArgs;
use crate::load::load_model;
use anyhow::Result;
use kvinfer_model::Model;
use std::io::Write;
use std::time::Instant;

fn tokens(model: &Model, n: usize, seed: u64) -> Vec<u32> {
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

fn pp(model: &Model, n: usize, seed: u64) -> Result<f64> {
    let ids = tokens(model, n, seed);
    let mut kv = model.new_kv_cache(n + 1);
    let t = Instant::now();
    model.forward(&ids, &mut kv)?;
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

fn tg(model: &Model, n: usize, seed: u64) -> Result<f64> {
    let ids = tokens(model, n, seed);
    let mut kv = model.new_kv_cache(n + 1);
    let t = Instant::now();
    for id in ids {
        model.forward(&[id], &mut kv)?;
    }
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let m = v.iter().sum::<f64>() / v.len() as f64;
    let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / v.len() as f64;
    (m, var.sqrt())
}

pub fn run(a: BenchArgs, threads: usize) -> Result<()> {
    let model = load_model(&a.model)?;
    if a.warmup_s > 0.0 {
        let t = Instant::now();
        let mut i = 0;
        while t.elapsed().as_secs_f64() < a.warmup_s {
            pp(&model, 64, 1000 + i)?;
            i += 1;
        }
    }
    // One untimed run of each to page the weights in.
    pp(&model, a.prompt_tokens.clamp(1, 64), 7)?;
    tg(&model, 4, 7)?;
    let reps = a.repetitions.max(1);
    let mut pps = Vec::new();
    let mut tgs = Vec::new();
    for r in 0..reps {
        if a.prompt_tokens > 0 {
            pps.push(pp(&model, a.prompt_tokens, r as u64)?);
        }
        if a.gen_tokens > 0 {
            tgs.push(tg(&model, a.gen_tokens, r as u64)?);
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
    if a.json {
        let j = serde_json::json!({
            "engine": "kvinfer",
            "model": model.name,
            "arch": model.config.arch.name(),
            "threads": threads,
            "simd": kvinfer_model::kernels::simd_level(),
            "prompt_tokens": a.prompt_tokens,
            "gen_tokens": a.gen_tokens,
            "repetitions": reps,
            "pp_tok_s": pp_m,
            "pp_tok_s_std": pp_s,
            "tg_tok_s": tg_m,
            "tg_tok_s_std": tg_s,
        });
        writeln!(std::io::stdout(), "{}", serde_json::to_string_pretty(&j)?)?;
    } else {
        writeln!(
            std::io::stdout(),
            "model {} ({} threads, {})",
            model.name,
            threads,
            kvinfer_model::kernels::simd_level()
        )?;
        writeln!(
            std::io::stdout(),
            "pp{:<5} {:8.1} ± {:.1} tok/s",
            a.prompt_tokens,
            pp_m,
            pp_s
        )?;
        writeln!(
            std::io::stdout(),
            "tg{:<5} {:8.1} ± {:.1} tok/s",
            a.gen_tokens,
            tg_m,
            tg_s
        )?;
    }
    Ok(())
}
