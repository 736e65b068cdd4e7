//! `kvinfer generate`: raw prompt in, text (or one JSON object) out.

use crate::cli::GenerateArgs;
use crate::load::{kv_cache, load_model, sampling};
use anyhow::Result;
use kvinfer_engine::{generate_tiered, GenerateRequest};
use std::io::Write;

pub fn run(a: GenerateArgs, threads: usize) -> Result<()> {
    let model = load_model(&a.model)?;
    let tok = &model.tokenizer;
    let prompt_ids = match &a.prompt_ids {
        Some(ids) => ids.clone(),
        None => tok.encode(&a.prompt, true, false),
    };
    if prompt_ids.is_empty() {
        anyhow::bail!("the prompt is empty after tokenization; give some text with --prompt");
    }
    let (mut kv, tiers) = kv_cache(&model, &a.model)?;
    let req = GenerateRequest {
        prompt_ids: prompt_ids.clone(),
        max_tokens: a.max_tokens,
        sampling: sampling(&a.sampling),
        stop: a.sampling.stop.clone(),
        ignore_eos: a.ignore_eos,
        use_kv_cache: !a.no_kv_cache,
        prefix_cache: true,
        ctx_size: a.model.ctx_size,
    };
    // Refuse bad flags before anything is printed.
    req.sampling
        .validate()
        .map_err(|e| anyhow::anyhow!("invalid sampling flags: {e}"))?;
    anyhow::ensure!(req.max_tokens > 0, "--max-tokens must be at least 1");
    let stdout = std::io::stdout();
    let out = if a.json {
        generate_tiered(&model, &mut kv, tiers.as_deref(), &req, |_| true)?
    } else {
        print!("{}", a.prompt);
        let o = generate_tiered(&model, &mut kv, tiers.as_deref(), &req, |t| {
            let mut s = stdout.lock();
            let _ = s.write_all(t.as_bytes());
            let _ = s.flush();
            true
        })?;
        writeln!(std::io::stdout())?;
        o
    };
    let t = &out.timings;
    // Bytes of the blocks this sequence held at its longest.
    let kv_bytes = kv.peak_blocks(
        prompt_ids.len() + out.ids.len(),
        kvinfer_engine::PREFILL_CHUNK,
    ) * kv.layout().block_bytes();
    if a.json {
        let j = serde_json::json!({
            "model": model.name,
            "model_path": crate::load::resolve_model(&a.model.model)?.display().to_string(),
            "arch": model.config.arch.name(),
            "threads": threads,
            "simd": kvinfer_model::kernels::simd_level(),
            "kv_cache": !a.no_kv_cache,
            "prompt_ids": prompt_ids,
            "ids": out.ids,
            "text": out.text,
            "finish_reason": out.finish_reason,
            "timings": {
                "cached_tokens": t.cached_tokens,
                "tier_tokens": t.tier_tokens,
                "tier_load_ms": t.tier_load_ms,
                "prefill_tokens": t.prefill_tokens,
                "prefill_ms": t.prefill_ms,
                "prefill_tok_s": t.prefill_tok_s(),
                "decode_tokens": t.decode_tokens,
                "decode_ms": t.decode_ms,
                "decode_tok_s": t.decode_tok_s(),
            },
            "kv_cache_bytes": kv_bytes,
        });
        writeln!(std::io::stdout(), "{}", serde_json::to_string_pretty(&j)?)?;
    } else {
        eprintln!(
            "[{} prompt tokens in {:.0} ms ({:.1} tok/s); {} tokens in {:.0} ms ({:.1} tok/s); {}]",
            t.prefill_tokens,
            t.prefill_ms,
            t.prefill_tok_s(),
            out.ids.len(),
            t.decode_ms,
            t.decode_tok_s(),
            serde_json::to_string(&out.finish_reason)?.trim_matches('"'),
        );
    }
    Ok(())
}
