//! `kvinfer bench kv`: what each KV dtype buys and costs in memory and speed, side by side in
//! one process (every round runs each dtype once, in turn; medians reported).

use crate::bench::{tokens, warm_up};
use crate::cli::KvBenchArgs;
use crate::load::load_model;
use anyhow::{ensure, Context, Result};
use kvinfer_cache::{KvDtype, PagedKv, PolicyKind, SeqId};
use kvinfer_engine::{extend_sequence, DEFAULT_BLOCK_SIZE};
use kvinfer_model::{Model, SeqBatch};
use serde_json::{json, Value};
use std::time::Instant;

/// A pool of `blocks` blocks of every layer (`windowed`: grouped as `kvinfer serve` runs by
/// default, blocks of one layer group each, as many bytes).
fn cache_as(model: &Model, dtype: KvDtype, blocks: usize, windowed: bool) -> PagedKv {
    let bs = DEFAULT_BLOCK_SIZE;
    let id = model.kv_identity(bs, dtype, windowed);
    id.paged(blocks * id.groups.len(), PolicyKind::Lru, 0)
}

fn cache(model: &Model, dtype: KvDtype, blocks: usize) -> PagedKv {
    cache_as(model, dtype, blocks, true)
}

/// Prefills `ids` into `seq` in chunks of at most 512 tokens; the last logits, or `None` when
/// the pool ran out of room.
fn prefill_in(
    model: &Model,
    kv: &mut PagedKv,
    seq: SeqId,
    ids: &[u32],
) -> Result<Option<Vec<f32>>> {
    let mut last = None;
    for c in ids.chunks(512) {
        match extend_sequence(model, kv, seq, c)? {
            Some(l) => last = Some(l),
            None => return Ok(None),
        }
    }
    Ok(last)
}

/// Prefills `ids` into `seq` in chunks of at most 512 tokens.
fn prefill(model: &Model, kv: &mut PagedKv, seq: SeqId, ids: &[u32]) -> Result<()> {
    prefill_in(model, kv, seq, ids)?.context("the pool is too small")?;
    Ok(())
}

/// One sequence of `n` tokens with and without sliding-window savings: KV bytes held per
/// token at its end, and whether the last logits agree bit for bit.
fn window_savings(model: &Model, dtype: KvDtype, n: usize) -> Result<Value> {
    let ids = tokens(model, n, 21);
    let mut out = Vec::new();
    for windowed in [false, true] {
        let mut kv = cache_as(model, dtype, n.div_ceil(DEFAULT_BLOCK_SIZE) + 1, windowed);
        let (seq, _) = kv.add_sequence(&[], false);
        let t = Instant::now();
        let logits = prefill_in(model, &mut kv, seq, &ids)?.context("room")?;
        let held = kv.usage().in_use * kv.layout().block_bytes();
        eprintln!(
            "bench kv: {n} tokens {dtype} {}: {} B/token held ({:.0} s)",
            if windowed { "windowed" } else { "swa-full" },
            held / n,
            t.elapsed().as_secs_f64()
        );
        out.push((held, logits));
    }
    Ok(json!({
        "kv_dtype": dtype.name(),
        "tokens": n,
        "bytes_per_token_full": out[0].0 as f64 / n as f64,
        "bytes_per_token_windowed": out[1].0 as f64 / n as f64,
        "saving": out[0].0 as f64 / out[1].0 as f64,
        "logits_bit_identical": out[0].1 == out[1].1,
        "groups": model.kv_groups(true).describe(),
    }))
}

/// Decode tok/s after `context` cached tokens.
fn decode_at(model: &Model, dtype: KvDtype, context: usize, steps: usize) -> Result<f64> {
    let ids = tokens(model, context + steps, 7);
    let mut kv = cache(model, dtype, (context + steps).div_ceil(DEFAULT_BLOCK_SIZE));
    let (seq, _) = kv.add_sequence(&[], false);
    prefill(model, &mut kv, seq, &ids[..context])?;
    let t = Instant::now();
    for &id in &ids[context..] {
        extend_sequence(model, &mut kv, seq, &[id])?.context("room")?;
    }
    Ok(steps as f64 / t.elapsed().as_secs_f64())
}

/// Prefill tok/s over `n` tokens from an empty cache.
fn prefill_speed(model: &Model, dtype: KvDtype, n: usize) -> Result<f64> {
    let ids = tokens(model, n, 9);
    let mut kv = cache(model, dtype, n.div_ceil(DEFAULT_BLOCK_SIZE));
    let (seq, _) = kv.add_sequence(&[], false);
    let t = Instant::now();
    extend_sequence(model, &mut kv, seq, &ids)?.context("room")?;
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

/// How many sequences of `seq_tokens` run at once in a pool of `budget_mb`: each is
/// prefilled, then all take one decode step together in one batch.
fn capacity(
    model: &Model,
    dtype: KvDtype,
    budget_mb: usize,
    seq_tokens: usize,
    windowed: bool,
) -> Result<usize> {
    let one = model
        .kv_identity(DEFAULT_BLOCK_SIZE, dtype, false)
        .block_bytes();
    let mut kv = cache_as(model, dtype, (budget_mb << 20) / one, windowed);
    let mut seqs = Vec::new();
    loop {
        let ids = tokens(model, seq_tokens, 100 + seqs.len() as u64);
        let (seq, _) = kv.add_sequence(&ids, false);
        // The prompt in chunks, then the room of its decode step (held now, so the next
        // sequence cannot take it), or the pool is full.
        if prefill_in(model, &mut kv, seq, &ids)?.is_none() || kv.reserve(seq, 1).is_err() {
            kv.release(seq);
            break;
        }
        seqs.push(seq);
    }
    if !seqs.is_empty() {
        let next: Vec<u32> = tokens(model, seqs.len(), 5);
        let (tables, storage) = kv.tables_and_storage();
        let batch: Vec<SeqBatch> = seqs
            .iter()
            .zip(&next)
            .map(|(&s, t)| SeqBatch {
                tokens: std::slice::from_ref(t),
                start: tables.num_tokens(s),
                tables: tables.block_tables(s),
            })
            .collect();
        model.forward(storage, &batch)?;
    }
    Ok(seqs.len())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `kvinfer bench kv`.
pub fn run(a: KvBenchArgs, threads: usize) -> Result<()> {
    ensure!(!a.dtypes.is_empty(), "--dtypes is empty");
    ensure!(a.repetitions >= 1, "--repetitions must be at least 1");
    let model = load_model(&a.model)?;
    for d in &a.dtypes {
        d.check_head_dim(model.config.head_dim)
            .map_err(anyhow::Error::msg)?;
    }
    ensure!(
        a.context + a.decode_tokens <= model.config.context_length,
        "--context {} + --decode-tokens {} is past this model's context of {}",
        a.context,
        a.decode_tokens,
        model.config.context_length
    );
    eprintln!("bench kv: warming up {:.0} s", a.warmup_s);
    warm_up(&model, a.warmup_s)?;
    let n = a.dtypes.len();
    let (mut dec, mut pre) = (vec![Vec::new(); n], vec![Vec::new(); n]);
    for round in 0..a.repetitions {
        for (i, &d) in a.dtypes.iter().enumerate() {
            dec[i].push(decode_at(&model, d, a.context, a.decode_tokens)?);
            pre[i].push(prefill_speed(&model, d, a.prompt_tokens)?);
            eprintln!(
                "bench kv: round {}/{} {d}: decode {:.1} tok/s at {}, prefill {:.0} tok/s",
                round + 1,
                a.repetitions,
                dec[i].last().unwrap(),
                a.context,
                pre[i].last().unwrap()
            );
        }
    }
    let mut rows: Vec<Value> = Vec::new();
    let (mut base_dec, mut base_pre) = (0.0, 0.0);
    let sliding = model.kv_groups(true).len() > 1;
    for (i, &d) in a.dtypes.iter().enumerate() {
        // The capacity test (skipped with --budget-mb 0): with and without window savings.
        let (mut fit, mut fit_windowed) = (None, None);
        if a.budget_mb > 0 {
            fit = Some(capacity(&model, d, a.budget_mb, a.seq_tokens, false)?);
            if sliding {
                fit_windowed = Some(capacity(&model, d, a.budget_mb, a.seq_tokens, true)?);
            }
            eprintln!(
                "bench kv: {d}: {fit:?} sequences of {} tokens in {} MiB ({fit_windowed:?} with \
                 sliding-window savings)",
                a.seq_tokens, a.budget_mb
            );
        }
        let (dm, pm) = (median(&mut dec[i]), median(&mut pre[i]));
        if i == 0 {
            (base_dec, base_pre) = (dm, pm);
        }
        rows.push(json!({
            "kv_dtype": d.name(),
            "kv_bytes_per_token": model.kv_identity(DEFAULT_BLOCK_SIZE, d, false).token_bytes(),
            "sequences_fit": fit,
            "sequences_fit_windowed": fit_windowed,
            "decode_tok_s": dm,
            "decode_tok_s_all": dec[i],
            "prefill_tok_s": pm,
            "prefill_tok_s_all": pre[i],
            "decode_vs_first": dm / base_dec,
            "prefill_vs_first": pm / base_pre,
        }));
    }
    let window = match (sliding, a.window_context) {
        (true, n) if n > 0 => {
            ensure!(
                n <= model.config.context_length,
                "--window-context {n} is past this model's context of {}",
                model.config.context_length
            );
            Some(window_savings(&model, a.dtypes[0], n)?)
        }
        _ => None,
    };
    let name = a.model.model.clone();
    let out = json!({
        "model": name,
        "threads": threads,
        "context": a.context,
        "decode_tokens": a.decode_tokens,
        "prompt_tokens": a.prompt_tokens,
        "budget_mb": a.budget_mb,
        "seq_tokens": a.seq_tokens,
        "repetitions": a.repetitions,
        "dtypes": rows,
        "window_savings": window,
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "{:<6} {:>10} {:>6} {:>12} {:>8} {:>12} {:>8}",
            "dtype", "B/token", "fit", "decode t/s", "ratio", "prefill t/s", "ratio"
        );
        for r in &rows {
            println!(
                "{:<6} {:>10} {:>6} {:>12.1} {:>8.2} {:>12.0} {:>8.2}",
                r["kv_dtype"].as_str().unwrap_or(""),
                r["kv_bytes_per_token"].as_u64().unwrap_or(0),
                match (
                    r["sequences_fit"].as_u64(),
                    r["sequences_fit_windowed"].as_u64()
                ) {
                    (Some(f), Some(w)) => format!("{f}/{w}"),
                    (Some(f), None) => f.to_string(),
                    _ => "-".into(),
                },
                r["decode_tok_s"].as_f64().unwrap_or(0.0),
                r["decode_vs_first"].as_f64().unwrap_or(0.0),
                r["prefill_tok_s"].as_f64().unwrap_or(0.0),
                r["prefill_vs_first"].as_f64().unwrap_or(0.0),
            );
        }
        if let Some(w) = &out["window_savings"].as_object() {
            println!(
                "sliding-window savings at {} tokens ({}): {:.0} -> {:.0} B/token ({:.2}x), \
                 logits bit-identical: {}",
                w["tokens"],
                w["kv_dtype"],
                w["bytes_per_token_full"],
                w["bytes_per_token_windowed"],
                w["saving"],
                w["logits_bit_identical"]
            );
        }
    }
    Ok(())
}
