//! What `generate()` and the engine loop share about a request: one validator (before any work)
//! and one stop/finish check (after each sampled token).

use crate::engine::{SubmitError, MAX_N};
use crate::sampler::SamplingParams;
use crate::stop::TextStream;
use crate::FinishReason;
use kvinfer_model::tokenizer::Tokenizer;

/// What a request is checked against.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Most positions per sequence (prompt + output).
    pub ctx: usize,
    /// Tokens the KV pool holds.
    pub pool_tokens: usize,
    /// Vocabulary size.
    pub vocab: usize,
}

/// The parts of a request the validator reads.
pub(crate) struct RequestShape<'a> {
    pub prompt_ids: &'a [u32],
    pub max_tokens: usize,
    pub n: usize,
    pub sampling: &'a SamplingParams,
}

/// Why a request was refused before any work; each caller maps it to its own error type.
#[derive(Debug)]
pub(crate) enum Refusal {
    /// A bad field (the message names it).
    Invalid(String),
    /// The prompt does not fit the context.
    TooLongForContext(String),
    /// The prompt does not fit the KV pool.
    TooLongForPool(String),
}

impl From<Refusal> for SubmitError {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::Invalid(m) => SubmitError::Invalid(m),
            Refusal::TooLongForContext(m) | Refusal::TooLongForPool(m) => SubmitError::TooLong(m),
        }
    }
}

/// Checks a request before any work; the message names the field and what to do.
pub(crate) fn validate(req: &RequestShape<'_>, limits: &Limits) -> Result<(), Refusal> {
    let invalid = |m: String| Err(Refusal::Invalid(m));
    if req.prompt_ids.is_empty() {
        return invalid("the prompt is empty".into());
    }
    if req.max_tokens == 0 {
        return invalid("max_tokens must be at least 1".into());
    }
    if req.n == 0 || req.n > MAX_N {
        return invalid(format!("n must be between 1 and {MAX_N}, got {}", req.n));
    }
    req.sampling.validate().map_err(Refusal::Invalid)?;
    if let Some(bad) = req.prompt_ids.iter().find(|&&t| t as usize >= limits.vocab) {
        return invalid(format!(
            "token id {bad} is outside the vocabulary of {}",
            limits.vocab
        ));
    }
    let len = req.prompt_ids.len();
    if len >= limits.ctx {
        return Err(Refusal::TooLongForContext(format!(
            "the prompt has {len} tokens; the context holds {} (prompt + at least one \
             generated token)",
            limits.ctx
        )));
    }
    if len + 1 > limits.pool_tokens {
        return Err(Refusal::TooLongForPool(format!(
            "the prompt has {len} tokens; the KV cache holds {} (raise --kv-cache-mb)",
            limits.pool_tokens
        )));
    }
    Ok(())
}

/// Where a sequence stands after a sampled token.
pub(crate) struct TokenOutcome {
    /// Text that became final (including any held text released because the sequence ended).
    pub emit: String,
    /// Why it ended, if it did.
    pub end: Option<FinishReason>,
}

/// The state the finish check reads.
pub(crate) struct FinishCheck {
    pub ignore_eos: bool,
    pub max_tokens: usize,
    pub ctx: usize,
}

impl FinishCheck {
    /// The one stop check: `next` was sampled as the `generated`-th token and the sequence now
    /// holds `total_len` tokens. Order: end-of-generation token, stop string (text cut there,
    /// nothing held back shown), `max_tokens`, then the context.
    pub fn after_token(
        &self,
        tok: &Tokenizer,
        text: &mut TextStream,
        next: u32,
        generated: usize,
        total_len: usize,
    ) -> TokenOutcome {
        if !self.ignore_eos && tok.is_eog(next) {
            return TokenOutcome {
                emit: text.finish(),
                end: Some(FinishReason::Stop),
            };
        }
        let step = text.push_token(tok.token_bytes(next));
        let mut emit = step.emit;
        if step.stopped {
            return TokenOutcome {
                emit,
                end: Some(FinishReason::Stop),
            };
        }
        let end = if generated >= self.max_tokens {
            Some(FinishReason::Length)
        } else if total_len > self.ctx {
            Some(FinishReason::ContextFull)
        } else {
            None
        };
        if end.is_some() {
            emit.push_str(&text.finish());
        }
        TokenOutcome { emit, end }
    }
}
