//! One sequence from prompt to finish: prefill, then decode token by token, with or without the
//! KV cache (without it, every step recomputes the whole prefix: the quadratic baseline).

use crate::cache::extend_sequence;
use crate::request::{validate, FinishCheck, Limits, Refusal, RequestShape};
use crate::sampler::{Sampler, SamplingParams};
use crate::stop::TextStream;
use crate::tiers::{import_loaded, load_request};
use crate::EngineError;
use kvinfer_cache::{PagedKv, SeqId};
use kvinfer_model::Model;
use kvinfer_tier::TieredStore;
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

impl GenerateRequest {
    /// Greedy decoding of exactly `max_tokens` tokens (past end-of-generation tokens) with the
    /// KV and prefix caches on: what benchmarks and equality tests run.
    pub fn greedy(prompt_ids: &[u32], max_tokens: usize) -> Self {
        Self {
            prompt_ids: prompt_ids.to_vec(),
            max_tokens,
            sampling: SamplingParams::greedy(),
            stop: Vec::new(),
            ignore_eos: true,
            use_kv_cache: true,
            prefix_cache: true,
            ctx_size: 0,
        }
    }
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
    /// Prompt tokens served from the prefix cache (the pool, or a tier).
    pub cached_tokens: usize,
    /// Of those, tokens brought in from a tier (RAM, disk, Redis).
    pub tier_tokens: usize,
    /// Time spent loading them (part of `prefill_ms`).
    pub tier_load_ms: f64,
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
    generate_tiered(model, kv, None, req, on_text)
}

/// As [`generate`], with the tiers behind the pool: a prefix the pool lacks is looked up in
/// `tiers` (on this thread) and imported before prefill.
pub fn generate_tiered(
    model: &Model,
    kv: &mut PagedKv,
    tiers: Option<&TieredStore>,
    req: &GenerateRequest,
    on_text: impl FnMut(&str) -> bool,
) -> Result<GenerateOutput, EngineError> {
    let ctx = context_limit(model, req);
    let limits = Limits {
        ctx,
        pool_tokens: kv.max_sequence_tokens(PREFILL_CHUNK),
        vocab: model.config.vocab_size,
    };
    let shape = RequestShape {
        prompt_ids: &req.prompt_ids,
        max_tokens: req.max_tokens,
        n: 1,
        sampling: &req.sampling,
    };
    validate(&shape, &limits).map_err(|e| match e {
        Refusal::TooLongForPool(m) => EngineError::CacheFull(m),
        Refusal::Invalid(m) | Refusal::TooLongForContext(m) => EngineError::Invalid(m),
    })?;
    let mut run = Run {
        model,
        kv,
        tiers,
        seq: None,
        tier_tokens: 0,
        tier_load_ms: 0.0,
    };
    let out = run.generate(req, ctx, on_text);
    if let Some(seq) = run.seq.take() {
        run.kv.release(seq);
    }
    out
}

/// Most prompt tokens one forward pass of [`generate`] runs.
pub const PREFILL_CHUNK: usize = 512;

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
    tiers: Option<&'a TieredStore>,
    seq: Option<SeqId>,
    tier_tokens: usize,
    tier_load_ms: f64,
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
            self.kv.release(old);
        }
        let hashes = if reuse {
            self.kv.hash_blocks(ids)
        } else {
            Vec::new()
        };
        if let (true, Some(tiers)) = (reuse, self.tiers) {
            if let Some((from, lr)) = load_request(self.kv, &hashes, ids) {
                let t0 = Instant::now();
                let result = tiers.load_blocking(&lr);
                let n = import_loaded(self.kv, &hashes, ids, from, &result);
                self.tier_tokens = n * self.kv.block_size();
                self.tier_load_ms = t0.elapsed().as_secs_f64() * 1e3;
            }
        }
        let (seq, cached) = self.kv.add_sequence_hashed(ids, hashes, reuse);
        self.seq = Some(seq);
        // In chunks, as the engine does: a sliding-window group then holds its window and one
        // chunk, not the whole prompt (same logits: chunked prefill is bit-identical).
        let mut last = None;
        for c in ids[cached..].chunks(PREFILL_CHUNK) {
            last = self.step(seq, c)?;
            if last.is_none() {
                break;
            }
        }
        Ok((last, cached))
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
                self.kv.num_blocks(),
                self.kv.block_size(),
                req.prompt_ids.len()
            )));
        };
        out.timings.cached_tokens = cached;
        out.timings.tier_tokens = self.tier_tokens.min(cached);
        out.timings.tier_load_ms = self.tier_load_ms;
        out.timings.prefill_tokens = req.prompt_ids.len() - cached;
        let mut next = sampler.sample(&logits, &history);
        out.timings.prefill_ms = t0.elapsed().as_secs_f64() * 1e3;

        let t1 = Instant::now();
        let check = FinishCheck {
            ignore_eos: req.ignore_eos,
            max_tokens: req.max_tokens,
            ctx,
        };
        loop {
            out.ids.push(next);
            history.push(next);
            let step = check.after_token(tok, &mut text, next, out.ids.len(), history.len());
            out.text.push_str(&step.emit);
            if !step.emit.is_empty() && !on_text(&step.emit) {
                out.finish_reason = FinishReason::Cancelled;
                let rest = text.finish();
                if !rest.is_empty() {
                    on_text(&rest);
                }
                out.text.push_str(&rest);
                break;
            }
            if let Some(reason) = step.end {
                out.finish_reason = reason;
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
                let rest = text.finish();
                if !rest.is_empty() {
                    on_text(&rest);
                }
                out.text.push_str(&rest);
                break;
            };
            logits = l;
            out.timings.decode_tokens += 1;
            next = sampler.sample(&logits, &history);
        }
        out.timings.decode_ms = t1.elapsed().as_secs_f64() * 1e3;
        Ok(out)
    }
}
