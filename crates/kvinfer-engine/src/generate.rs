//! One sequence from prompt to finish: prefill, then decode token by token, with or without the
//! KV cache (without it, every step recomputes the whole prefix: the quadratic baseline).

use crate::cache::extend_sequence;
use crate::sampler::{Sampler, SamplingParams};
use crate::stop::TextStream;
use crate::EngineError;
use kvinfer_cache::{PagedKv, SeqId};
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
    /// False: recompute the whole prefix at every step (no KV cache reuse at all).
    pub use_kv_cache: bool,
    /// True: reuse cached blocks of earlier requests with the same prefix, and register this
    /// request's full blocks for later ones.
    pub prefix_cache: bool,
    /// Most positions (prompt + output); 0 means the model's context length.
    pub ctx_size: usize,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The context (`ctx_size`) is full, or the KV cache has no block left.
    ContextFull,
    /// The token callback asked to stop.
    Cancelled,
}

/// Wall-clock split of one generation.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Timings {
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: usize,
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

/// Generates from `req.prompt_ids` as one sequence of `kv`. With `req.prefix_cache` the prompt's
/// longest cached prefix is reused (always recomputing at least the last prompt token) and the
/// sequence's full blocks stay cached afterwards for later requests. `on_text` receives text as
/// it becomes final; returning `false` cancels. The sequence's blocks are released on return,
/// error or not.
pub fn generate(
    model: &Model,
    kv: &mut PagedKv,
    req: &GenerateRequest,
    on_text: impl FnMut(&str) -> bool,
) -> Result<GenerateOutput, EngineError> {
    if req.prompt_ids.is_empty() {
        return Err(EngineError::Invalid("the prompt is empty".into()));
    }
    if req.max_tokens == 0 {
        return Err(EngineError::Invalid("max_tokens must be at least 1".into()));
    }
    req.sampling.validate().map_err(EngineError::Invalid)?;
    let ctx = context_limit(model, req);
    if req.prompt_ids.len() >= ctx {
        return Err(EngineError::Invalid(format!(
            "the prompt has {} tokens; the context holds {ctx}",
            req.prompt_ids.len()
        )));
    }
    let mut run = Run {
        model,
        kv,
        seq: None,
    };
    let out = run.generate(req, ctx, on_text);
    if let Some(seq) = run.seq.take() {
        run.kv.manager.release(seq);
    }
    out
}

/// Most positions a request may use.
fn context_limit(model: &Model, req: &GenerateRequest) -> usize {
    match req.ctx_size {
        0 => model.config.context_length,
        n => n.min(model.config.context_length),
    }
}

/// One generation in flight; owns at most one live sequence of the cache.
struct Run<'a> {
    model: &'a Model,
    kv: &'a mut PagedKv,
    seq: Option<SeqId>,
}

impl Run<'_> {
    /// Computes `tokens` after the cached ones of a fresh (or the current) sequence and returns
    /// the last logits. `None`: the cache has no room.
    fn step(&mut self, seq: SeqId, tokens: &[u32]) -> Result<Option<Vec<f32>>, EngineError> {
        Ok(extend_sequence(self.model, self.kv, seq, tokens)?)
    }

    /// Starts a sequence for `ids` (reusing the cached prefix if asked) and runs the rest.
    fn prefill(
        &mut self,
        ids: &[u32],
        reuse: bool,
    ) -> Result<(Option<Vec<f32>>, usize), EngineError> {
        if let Some(old) = self.seq.take() {
            self.kv.manager.release(old);
        }
        let (seq, cached) = self.kv.manager.add_sequence(ids, reuse);
        self.seq = Some(seq);
        Ok((self.step(seq, &ids[cached..])?, cached))
    }

    fn generate(
        &mut self,
        req: &GenerateRequest,
        ctx: usize,
        mut on_text: impl FnMut(&str) -> bool,
    ) -> Result<GenerateOutput, EngineError> {
        let tok = &self.model.tokenizer;
        let mut sampler = Sampler::new(req.sampling.clone());
        let mut text = TextStream::new(&req.stop);
        let mut history = req.prompt_ids.clone();
        let mut out = GenerateOutput {
            ids: Vec::new(),
            text: String::new(),
            finish_reason: FinishReason::Length,
            timings: Timings::default(),
        };

        let t0 = Instant::now();
        let reuse = req.use_kv_cache && req.prefix_cache;
        let (logits, cached) = self.prefill(&req.prompt_ids, reuse)?;
        let Some(mut logits) = logits else {
            return Err(EngineError::CacheFull(format!(
                "the KV cache ({} blocks of {} tokens) cannot hold a prompt of {} tokens; \
                 raise --kv-cache-mb",
                self.kv.manager.num_blocks(),
                self.kv.manager.block_size(),
                req.prompt_ids.len()
            )));
        };
        out.timings.cached_tokens = cached;
        out.timings.prefill_tokens = req.prompt_ids.len() - cached;
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
            let step = text.push_token(tok.token_bytes(next));
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
            if history.len() > ctx {
                out.finish_reason = FinishReason::ContextFull;
                break;
            }
            let next_logits = if req.use_kv_cache {
                let seq = self.seq.expect("prefill started a sequence");
                self.step(seq, &[next])?
            } else {
                self.prefill(&history, false)?.0
            };
            let Some(l) = next_logits else {
                out.finish_reason = FinishReason::ContextFull;
                break;
            };
            logits = l;
            out.timings.decode_tokens += 1;
            next = sampler.sample(&logits, &history);
        }
        out.timings.decode_ms = t1.elapsed().as_secs_f64() * 1e3;
        if out.finish_reason != FinishReason::Stop || stop_was_eog(&out, tok) {
            let rest = text.finish();
            if !rest.is_empty() {
                on_text(&rest);
            }
            out.text.push_str(&rest);
        }
        Ok(out)
    }
}

/// True when generation stopped on an end-of-generation token (not on a stop string), so held
/// text must still be released.
fn stop_was_eog(out: &GenerateOutput, tok: &kvinfer_model::tokenizer::Tokenizer) -> bool {
    out.ids.last().is_some_and(|&t| tok.is_eog(t))
}
