//! `kvinfer accuracy`: what each KV dtype costs against f16 on a real text.
//!
//! The text is cut into windows of `--ctx` tokens (llama-perplexity's method): each window runs
//! from an empty cache, its first half is context and every token of its second half is scored.
//! All dtypes run the same windows side by side, so each scored position gets, per dtype, the
//! next-token log-likelihood (perplexity), the KL divergence of its distribution from f16's,
//! and whether its most likely token is f16's (top-1 agreement).

use crate::cli::AccuracyArgs;
use crate::load::{load_model, resolve_model};
use anyhow::{bail, Context, Result};
use kvinfer_cache::{KvDtype, PagedKv, PolicyKind};
use kvinfer_engine::{extend_sequence, extend_sequence_rows};
use kvinfer_model::Model;
use serde_json::{json, Value};
use std::path::PathBuf;

/// Where Debian's `base-files` package puts the licence texts every Debian system ships.
const DEFAULT_TEXT_DIR: &str = "/usr/share/common-licenses";
/// Scored positions run through the output layer at once (bounds the logits in memory).
const SCORE_CHUNK: usize = 128;

/// The text: the files named, or every file of the default directory (each file once, by its
/// real path, in name order), joined with blank lines.
fn read_text(files: &[PathBuf]) -> Result<(String, Vec<String>)> {
    let mut paths: Vec<PathBuf> = if files.is_empty() {
        std::fs::read_dir(DEFAULT_TEXT_DIR)
            .with_context(|| format!("reading {DEFAULT_TEXT_DIR} (pass --text FILE)"))?
            .flatten()
            .map(|e| e.path())
            .collect()
    } else {
        files.to_vec()
    };
    paths.sort();
    let mut seen = std::collections::HashSet::new();
    let (mut text, mut names) = (String::new(), Vec::new());
    for p in paths {
        let real = std::fs::canonicalize(&p).with_context(|| format!("{}", p.display()))?;
        if real.is_dir() || !seen.insert(real.clone()) {
            continue;
        }
        let t = std::fs::read_to_string(&real).with_context(|| format!("{}", real.display()))?;
        if !text.is_empty() {
            text.push_str("\n\n");
        }
        text.push_str(&t);
        names.push(p.display().to_string());
    }
    if text.is_empty() {
        bail!("no text to measure on");
    }
    Ok((text, names))
}

/// log-softmax of `logits` (f64 for the sums).
fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max
        + logits
            .iter()
            .map(|&l| (l as f64 - max).exp())
            .sum::<f64>()
            .ln();
    logits.iter().map(|&l| l as f64 - lse).collect()
}

fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// Per dtype, over every scored position.
#[derive(Default)]
struct Tally {
    nll: f64,
    kl: Vec<f64>,
    top1_same: usize,
    n: usize,
}

/// Runs `tokens` as the next positions of `seq`: the logits after every one of them.
fn rows(
    model: &Model,
    kv: &mut PagedKv,
    seq: kvinfer_cache::SeqId,
    tokens: &[u32],
) -> Result<Vec<Vec<f32>>> {
    extend_sequence_rows(model, kv, seq, tokens, true)?
        .context("the KV pool is too small for the window")
}

/// One window through every dtype's cache in lockstep: the context in one prefill each, then
/// the scored half chunk by chunk (all dtypes' logits of a chunk at once, never a window's).
fn window(
    model: &Model,
    kvs: &mut [PagedKv],
    dtypes: &[KvDtype],
    win: &[u32],
    tallies: &mut [Tally],
) -> Result<()> {
    let from = win.len() / 2;
    let mut seqs = Vec::new();
    for kv in kvs.iter_mut() {
        kv.clear_cached();
        let (seq, _) = kv.add_sequence(win, false);
        seqs.push(seq);
    }
    let result = (|| -> Result<()> {
        for (kv, &seq) in kvs.iter_mut().zip(&seqs) {
            extend_sequence(model, kv, seq, &win[..from])?
                .context("the KV pool is too small for the window")?;
        }
        let f16 = dtypes
            .iter()
            .position(|&d| d == KvDtype::F16)
            .expect("checked");
        let mut at = from;
        for chunk in win[from..].chunks(SCORE_CHUNK) {
            let mut per: Vec<Vec<Vec<f32>>> = Vec::with_capacity(kvs.len());
            for (kv, &seq) in kvs.iter_mut().zip(&seqs) {
                per.push(rows(model, kv, seq, chunk)?);
            }
            for k in 0..chunk.len() {
                // Row k predicts the token after position at + k.
                let Some(&next) = win.get(at + k + 1) else {
                    continue;
                };
                let ref_lp = log_softmax(&per[f16][k]);
                let ref_top = argmax(&per[f16][k]);
                for (i, t) in tallies.iter_mut().enumerate() {
                    let row = &per[i][k];
                    let lp = log_softmax(row);
                    t.nll -= lp[next as usize];
                    t.n += 1;
                    let kl: f64 = ref_lp
                        .iter()
                        .zip(&lp)
                        .map(|(&p, &q)| if p > -60.0 { p.exp() * (p - q) } else { 0.0 })
                        .sum();
                    t.kl.push(kl.max(0.0));
                    t.top1_same += (argmax(row) == ref_top) as usize;
                }
            }
            at += chunk.len();
        }
        Ok(())
    })();
    for (kv, seq) in kvs.iter_mut().zip(seqs) {
        kv.release(seq);
    }
    result
}

/// Runs the measurement for one model; JSON.
fn measure(model: &Model, name: &str, a: &AccuracyArgs, tokens: &[u32]) -> Result<Value> {
    let dtypes: Vec<KvDtype> = a.dtypes.clone();
    let mut runs = Vec::new();
    for &ctx in &a.ctx {
        if ctx < 16 || ctx > model.config.context_length {
            bail!(
                "--ctx {ctx} is outside 16..={} for {name}",
                model.config.context_length
            );
        }
        let windows = (tokens.len() / ctx).min(a.max_windows.unwrap_or(usize::MAX));
        if windows == 0 {
            bail!(
                "the text has {} tokens, fewer than one window of {ctx}",
                tokens.len()
            );
        }
        let bs = 16;
        let mut kvs: Vec<PagedKv> = dtypes
            .iter()
            .map(|&d| {
                model
                    .kv_identity(bs, d, false)
                    .paged(ctx.div_ceil(bs) + 1, PolicyKind::Lru, 0)
            })
            .collect();
        let mut tallies: Vec<Tally> = dtypes.iter().map(|_| Tally::default()).collect();
        let started = std::time::Instant::now();
        for w in 0..windows {
            window(
                model,
                &mut kvs,
                &dtypes,
                &tokens[w * ctx..(w + 1) * ctx],
                &mut tallies,
            )?;
            eprintln!(
                "accuracy: {name} ctx {ctx}: window {}/{windows} ({:.0} s)",
                w + 1,
                started.elapsed().as_secs_f64()
            );
        }
        let per: Vec<Value> = dtypes
            .iter()
            .zip(tallies.iter_mut())
            .map(|(d, t)| {
                t.kl.sort_by(f64::total_cmp);
                let ppl = (t.nll / t.n.max(1) as f64).exp();
                let p999 = t
                    .kl
                    .get(((t.kl.len() as f64 * 0.999).ceil() as usize).saturating_sub(1))
                    .copied();
                let mean_kl = (!t.kl.is_empty()).then(|| t.kl.iter().sum::<f64>() / t.kl.len() as f64);
                json!({
                    "kv_dtype": d.name(),
                    "kv_bytes_per_token": model.kv_identity(16, *d, false).token_bytes(),
                    "perplexity": ppl,
                    "scored_tokens": t.n,
                    "kl_mean": mean_kl,
                    "kl_p99_9": p999,
                    "top1_agreement": (!t.kl.is_empty()).then(|| t.top1_same as f64 / t.kl.len() as f64),
                })
            })
            .collect();
        let f16_ppl = per
            .iter()
            .find(|v| v["kv_dtype"] == "f16")
            .and_then(|v| v["perplexity"].as_f64());
        let per: Vec<Value> = per
            .into_iter()
            .map(|mut v| {
                if let (Some(base), Some(p)) = (f16_ppl, v["perplexity"].as_f64()) {
                    v["perplexity_vs_f16_pct"] = json!(100.0 * (p / base - 1.0));
                }
                v
            })
            .collect();
        runs.push(json!({"ctx": ctx, "windows": windows, "dtypes": per}));
    }
    Ok(json!({"model": name, "runs": runs}))
}

/// `kvinfer accuracy`.
pub fn run(a: AccuracyArgs) -> Result<()> {
    if !a.dtypes.contains(&KvDtype::F16) {
        bail!("--dtypes must include f16 (the reference)");
    }
    let (text, files) = read_text(&a.text)?;
    let mut models = Vec::new();
    for m in &a.models {
        let mut args = a.model.clone();
        args.model = m.clone();
        let path = resolve_model(m)?;
        let model = load_model(&args)?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| m.clone());
        let tokens = model.tokenizer.encode(&text, true, false);
        eprintln!("accuracy: {name}: {} tokens of text", tokens.len());
        let mut v = measure(&model, &name, &a, &tokens)?;
        v["text_tokens"] = json!(tokens.len());
        models.push(v);
    }
    let out = json!({
        "text": {"files": files, "bytes": text.len(), "source": if a.text.is_empty() {
            "Debian base-files: /usr/share/common-licenses" } else { "given" }},
        "method": "windows of ctx tokens from an empty cache; the second half of each scored; \
                   KL(f16 || dtype) per scored position",
        "models": models,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
