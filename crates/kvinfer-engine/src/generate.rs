//! One sequence from prompt to finish: prefill, then decode token by token, with or without the
//! KV cache (without it, every step recomputes the whole prefix: the quadratic baseline).

use crate::sampler::{Sampler, SamplingParams};
use crate::stop::{StopMatcher, Utf8Stream};
use crate::EngineError;
use kvinfer_cache::KvCache;
use kvinfer_model::Model;
use std::time::Instant;

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// Prompt token ids (already templated and tokenized).
    pub prompt_ids: Vec<u32>,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Sampling parameters.
    pub sampling: SamplingParams,
    /// Stop strings: generation ends before the first one; it is not part of the text.
    pub stop: Vec<String>,
    /// Keep going past end-of-generation tokens.
    pub ignore_eos: bool,
    /// False: recompute the whole prefix at every step (no KV cache reuse).
    pub use_kv_cache: bool,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The context (KV cache capacity) is full.
    ContextFull,
    /// The token callback asked to stop.
    Cancelled,
}

/// Wall-clock split of one generation.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Timings {
    /// Prompt tokens actually computed (cached ones are skipped).
    pub prefill_tokens: usize,
    /// Time to run them and sample the first token: the time to first token.
    pub prefill_ms: f64,
    /// Decode forward passes after the first token.
    pub decode_tokens: usize,
    /// Time of those steps.
    pub decode_ms: f64,
}

impl Timings {
    /// Prompt tokens per second.
    pub fn prefill_tok_s(&self) -> f64 {
        rate(self.prefill_tokens, self.prefill_ms)
    }
    /// Decode tokens per second.
    pub fn decode_tok_s(&self) -> f64 {
        rate(self.decode_tokens, self.decode_ms)
    }
}

fn rate(n: usize, ms: f64) -> f64 {
    if ms > 0.0 {
        n as f64 * 1000.0 / ms
    } else {
        0.0
    }
}

/// The result of [`generate`].
#[derive(Debug, Clone)]
pub struct GenerateOutput {
    /// Generated token ids (including a final end-of-generation token if one was sampled).
    pub ids: Vec<u32>,
    /// Generated text, cut before any stop string; EOG tokens render as nothing.
    pub text: String,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// Timings.
    pub timings: Timings,
}

/// Generates from `req.prompt_ids`. `kv` may already hold a prefix of the prompt (multi-turn
/// reuse): only the positions past a common prefix are computed. `on_text` receives text as it
/// becomes final; returning `false` cancels.
pub fn generate(
    model: &Model,
    kv: &mut KvCache,
    req: &GenerateRequest,
    mut on_text: impl FnMut(&str) -> bool,
) -> Result<GenerateOutput, EngineError> {
    if req.prompt_ids.is_empty() {
        return Err(EngineError::Invalid("the prompt is empty".into()));
    }
    if req.max_tokens == 0 {
        return Err(EngineError::Invalid("max_tokens must be at least 1".into()));
    }
    req.sampling.validate().map_err(EngineError::Invalid)?;
    if req.prompt_ids.len() >= kv.max_tokens() {
        return Err(EngineError::Invalid(format!(
            "the prompt has {} tokens; the context holds {}",
            req.prompt_ids.len(),
            kv.max_tokens()
        )));
    }
    let tok = &model.tokenizer;
    let mut sampler = Sampler::new(req.sampling.clone());
    let mut utf8 = Utf8Stream::default();
    let mut stop = StopMatcher::new(&req.stop);
    let mut history = req.prompt_ids.clone();
    let mut out = GenerateOutput {
        ids: Vec::new(),
        text: String::new(),
        finish_reason: FinishReason::Length,
        timings: Timings::default(),
    };

    // Prefill: reuse the cached prefix (always recompute at least the last prompt token).
    let t0 = Instant::now();
    let reuse = if req.use_kv_cache {
        kv.len().min(req.prompt_ids.len() - 1)
    } else {
        0
    };
    kv.truncate(reuse);
    let todo = &req.prompt_ids[reuse..];
    let mut logits = model.forward(todo, kv)?;
    out.timings.prefill_tokens = todo.len();
    let mut next = sampler.sample(&logits, &history);
    out.timings.prefill_ms = t0.elapsed().as_secs_f64() * 1e3;

    let t1 = Instant::now();
    loop {
        out.ids.push(next);
        history.push(next);
        if !req.ignore_eos && tok.is_eog(next) {
            out.finish_reason = FinishReason::Stop;
            break;
        }
        let piece = utf8.push(tok.token_bytes(next));
        let step = stop.push(&piece);
        out.text.push_str(&step.emit);
        if !step.emit.is_empty() && !on_text(&step.emit) {
            out.finish_reason = FinishReason::Cancelled;
            break;
        }
        if step.stopped {
            out.finish_reason = FinishReason::Stop;
            break;
        }
        if out.ids.len() >= req.max_tokens {
            break;
        }
        let room = if req.use_kv_cache {
            kv.remaining() > 0
        } else {
            history.len() <= kv.max_tokens()
        };
        if !room {
            out.finish_reason = FinishReason::ContextFull;
            break;
        }
        logits = if req.use_kv_cache {
            model.forward(&[next], kv)?
        } else {
            kv.clear();
            model.forward(&history, kv)?
        };
        out.timings.decode_tokens += 1;
        next = sampler.sample(&logits, &history);
    }
    out.timings.decode_ms = t1.elapsed().as_secs_f64() * 1e3;
    if out.finish_reason != FinishReason::Stop || stop_was_eog(&out, tok) {
        let tail = utf8.finish();
        let step = stop.push(&tail);
        let rest = if step.stopped {
            step.emit
        } else {
            step.emit + &stop.finish()
        };
        if !rest.is_empty() {
            on_text(&rest);
        }
        out.text.push_str(&rest);
    }
    Ok(out)
}

/// True when generation stopped on an end-of-generation token (not on a stop string), so held
/// text must still be released.
fn stop_was_eog(out: &GenerateOutput, tok: &kvinfer_model::tokenizer::Tokenizer) -> bool {
    out.ids.last().is_some_and(|&t| tok.is_eog(t))
}
