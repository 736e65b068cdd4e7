//! The engine loop: one thread owns the model's KV cache and runs every request in one batched
//! forward pass per step (continuous batching). The server sees only an [`EngineHandle`]: it
//! submits requests and reads each one's events from a channel; dropping that channel cancels
//! the request and frees its blocks.
//!
//! ```text
//! server --submit--> [commands] --> engine thread: loop { admit; schedule; forward; sample }
//!        <--events-- [per-request channel] <--                 (Text, Done, Usage | Error)
//! ```

mod metrics;
mod scheduler;

pub use metrics::{EngineStats, Histogram, LATENCY_BUCKETS_S};

use crate::cache::{new_kv_cache, CacheOptions};
use crate::grammar::{Constraint, GrammarCompiler};
use crate::request::{validate, Limits, RequestShape};
use crate::sampler::SamplingParams;
use crate::FinishReason;
use kvinfer_model::Model;
use serde::Serialize;
use std::sync::{mpsc, Arc, Mutex};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

/// How the engine runs.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The KV cache: budget, block size, eviction policy.
    pub cache: CacheOptions,
    /// Most tokens in one forward pass (decode tokens plus prefill chunks): a long prompt is
    /// prefilled in chunks so running decodes keep going.
    pub max_batch_tokens: usize,
    /// Most sequences running at once.
    pub max_running: usize,
    /// Most positions per sequence (prompt + output); 0 means the model's context length.
    pub ctx_size: usize,
    /// Most requests accepted but not yet running; past it `submit` answers `Overloaded`.
    pub max_waiting: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            cache: CacheOptions::default(),
            max_batch_tokens: 512,
            max_running: 64,
            ctx_size: 0,
            max_waiting: 256,
        }
    }
}

/// One request as the engine sees it: token ids in, `n` sampled continuations out.
#[derive(Debug, Clone)]
pub struct EngineRequest {
    /// Prompt token ids (templated and tokenized by the caller).
    pub prompt_ids: Vec<u32>,
    /// Most tokens per choice.
    pub max_tokens: usize,
    /// Sampling; choice `i` draws with `seed + i`.
    pub sampling: SamplingParams,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Choices to sample from the one prompt (they share its KV blocks).
    pub n: usize,
    /// Keep going past end-of-generation tokens.
    pub ignore_eos: bool,
    /// End-of-generation tokens are not sampled before this many tokens (stop strings still end
    /// a choice).
    pub min_tokens: usize,
    /// Report each sampled token's log-probability and this many most likely alternatives
    /// (`Event::Logprob` before the token's text); None: off.
    pub logprobs: Option<usize>,
    /// The grammar every choice's output must follow (compiled with a
    /// [`crate::GrammarCompiler`]); the choice ends when the grammar is complete.
    pub grammar: Option<Constraint>,
}

/// Most alternatives per token `logprobs` may ask for.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// A token and its log-probability under the model (log-softmax of the raw logits).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenLogprob {
    /// The token id.
    pub id: u32,
    /// Its text (lossy UTF-8 of its bytes).
    pub token: String,
    /// Its bytes.
    pub bytes: Vec<u8>,
    /// ln p.
    pub logprob: f32,
}

/// Token accounting of a finished request (OpenAI's `usage`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Tokens generated over all choices.
    pub completion_tokens: usize,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: usize,
}

/// What a request's channel carries, in order: text and `Done` per choice, then exactly one
/// `Usage` (success) or `Error` (failure), then the channel closes.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// New text of choice `index`.
    Text {
        /// Choice.
        index: usize,
        /// Text to append.
        text: String,
    },
    /// The log-probabilities of choice `index`'s next token (sent before its text).
    Logprob {
        /// Choice.
        index: usize,
        /// The sampled token.
        token: TokenLogprob,
        /// The most likely tokens, best first.
        top: Vec<TokenLogprob>,
    },
    /// Choice `index` ended.
    Done {
        /// Choice.
        index: usize,
        /// Why.
        finish_reason: FinishReason,
    },
    /// Every choice ended.
    Usage(Usage),
    /// The request failed; nothing more follows.
    Error(String),
}

/// Why a request was refused at submission.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// Bad parameters (the message names the field).
    #[error("{0}")]
    Invalid(String),
    /// The prompt does not fit the context or the cache.
    #[error("{0}")]
    TooLong(String),
    /// The engine has stopped.
    #[error("the engine is shutting down")]
    ShuttingDown,
    /// Too many requests wait already (`max_waiting`); try again shortly.
    #[error("{0}")]
    Overloaded(String),
}

enum Command {
    Submit(EngineRequest, UnboundedSender<Event>),
    ClearCache(tokio::sync::oneshot::Sender<ClearReport>),
}

/// What a cache clear removed.
#[derive(Debug, Clone, Serialize)]
pub struct ClearReport {
    /// Cached blocks freed in the pool.
    pub pool_blocks: usize,
    /// Per tier, in lookup order.
    pub tiers: Vec<TierCleared>,
}

/// One tier's part of a clear.
#[derive(Debug, Clone, Serialize)]
pub struct TierCleared {
    /// Tier name.
    pub tier: &'static str,
    /// Blocks deleted (None when it failed).
    pub deleted: Option<u64>,
    /// Why it failed.
    pub error: Option<String>,
}

/// The only way into the engine. Cheap to clone; the engine thread ends when every handle is
/// dropped and the work in flight is done.
#[derive(Clone)]
pub struct EngineHandle {
    commands: mpsc::Sender<Command>,
    model: Arc<Model>,
    stats: Arc<Mutex<EngineStats>>,
    limits: Limits,
    tiers: Option<Arc<kvinfer_tier::TieredStore>>,
    /// Requests accepted and not yet admitted (the scheduler takes them off at admission).
    queued: Arc<std::sync::atomic::AtomicUsize>,
    max_waiting: usize,
    /// The identity of the pool's blocks (model, dtype, block size, layer groups).
    kv_fingerprint: kvinfer_cache::ModelFingerprint,
    /// Built on first use (the vocabulary's token trie).
    grammar: Arc<std::sync::OnceLock<Result<Arc<GrammarCompiler>, String>>>,
}

/// Most choices per request.
pub const MAX_N: usize = 16;

impl EngineHandle {
    /// The model (for tokenizing and the chat template; the engine thread runs it).
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The identity of the KV blocks this engine writes (model, dtype, block size, groups).
    pub fn kv_fingerprint(&self) -> kvinfer_cache::ModelFingerprint {
        self.kv_fingerprint
    }

    /// The grammar compiler for this model's vocabulary, built on first call (blocking: tens
    /// to hundreds of milliseconds, by vocabulary size; call it off async threads).
    pub fn grammar_compiler(&self) -> Result<Arc<GrammarCompiler>, String> {
        self.grammar
            .get_or_init(|| GrammarCompiler::new(self.model.clone()).map(Arc::new))
            .clone()
    }

    /// Most positions per sequence.
    pub fn context_size(&self) -> usize {
        self.limits.ctx
    }

    /// The latest snapshot of the engine, with the tiers' counters read now (they change on
    /// their own threads, while the engine loop may be idle).
    pub fn stats(&self) -> EngineStats {
        let mut s = self.stats.lock().map(|s| s.clone()).unwrap_or_default();
        if let Some(t) = &self.tiers {
            s.tiers = t.stats();
        }
        s
    }

    /// Empties the prefix cache: the pool's cached blocks and this model's blocks on every tier.
    /// Requests in flight keep their blocks.
    pub async fn clear_cache(&self) -> Result<ClearReport, SubmitError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.commands
            .send(Command::ClearCache(tx))
            .map_err(|_| SubmitError::ShuttingDown)?;
        rx.await.map_err(|_| SubmitError::ShuttingDown)
    }

    /// Checks `req` and queues it; its events arrive on the returned channel. Dropping the
    /// receiver cancels the request.
    pub fn submit(&self, req: EngineRequest) -> Result<UnboundedReceiver<Event>, SubmitError> {
        let shape = RequestShape {
            prompt_ids: &req.prompt_ids,
            max_tokens: req.max_tokens,
            n: req.n,
            sampling: &req.sampling,
        };
        validate(&shape, &self.limits).map_err(SubmitError::from)?;
        if req.logprobs.is_some_and(|k| k > MAX_TOP_LOGPROBS) {
            return Err(SubmitError::Invalid(format!(
                "top_logprobs must be at most {MAX_TOP_LOGPROBS}"
            )));
        }
        use std::sync::atomic::Ordering::SeqCst;
        let queued = self.queued.fetch_add(1, SeqCst);
        if queued >= self.max_waiting {
            self.queued.fetch_sub(1, SeqCst);
            return Err(SubmitError::Overloaded(format!(
                "{queued} requests are already waiting (--max-waiting {}); retry shortly",
                self.max_waiting
            )));
        }
        let (tx, rx) = unbounded_channel();
        self.commands.send(Command::Submit(req, tx)).map_err(|_| {
            self.queued.fetch_sub(1, SeqCst);
            SubmitError::ShuttingDown
        })?;
        Ok(rx)
    }
}

/// Starts the engine thread over `model`. The thread runs its whole loop inside `run_in` (e.g.
/// `|f| pool.install(f)` so the kernels fork from a worker of that thread pool); pass `|f| f()`
/// to run it plainly.
pub fn start(
    model: Model,
    config: EngineConfig,
    run_in: impl FnOnce(&mut (dyn FnMut() + Send)) + Send + 'static,
) -> Result<(EngineHandle, std::thread::JoinHandle<()>), String> {
    if config.max_batch_tokens < config.max_running.max(1) {
        return Err(format!(
            "--max-batch-tokens ({}) must be at least the most running sequences ({})",
            config.max_batch_tokens, config.max_running
        ));
    }
    let (kv, tiers) = new_kv_cache(&model, &config.cache)?;
    let model = Arc::new(model);
    let ctx = match config.ctx_size {
        0 => model.config.context_length,
        n => n.min(model.config.context_length),
    };
    let limits = Limits {
        ctx,
        pool_tokens: kv.max_sequence_tokens(config.max_batch_tokens),
        vocab: model.config.vocab_size,
    };
    let stats = Arc::new(Mutex::new(EngineStats::default()));
    let queued = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (tx, rx) = mpsc::channel();
    let handle = EngineHandle {
        commands: tx,
        model: model.clone(),
        stats: stats.clone(),
        limits,
        tiers: tiers.clone(),
        queued: queued.clone(),
        max_waiting: config.max_waiting.max(1),
        kv_fingerprint: kv.fingerprint(),
        grammar: Arc::default(),
    };
    let mut sched = scheduler::Scheduler::new(model, kv, config, ctx, stats, tiers);
    sched.set_queue_counter(queued);
    let thread = std::thread::Builder::new()
        .name("kvinfer-engine".into())
        .spawn(move || {
            let mut rx = Some(rx);
            run_in(&mut move || {
                if let Some(rx) = rx.take() {
                    sched.run(&rx);
                }
            })
        })
        .map_err(|e| format!("starting the engine thread: {e}"))?;
    Ok((handle, thread))
}
