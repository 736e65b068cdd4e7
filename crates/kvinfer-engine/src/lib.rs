//! kvinfer-engine: sampling and the generation loop over a [`kvinfer_model::Model`].
//!
//! Two ways to run a model: [`generate`] runs one sequence on the caller's thread (CLI), and the
//! engine loop ([`start_engine`] -> [`EngineHandle`]) runs many with continuous batching on its
//! own thread (the server).
#![deny(missing_docs)]

mod cache;
mod engine;
mod generate;
mod grammar;
pub mod json_numbers;
mod request;
mod sampler;
mod stop;
mod tiers;

pub use cache::{
    default_kv_cache_mb, extend_sequence, extend_sequence_rows, new_kv_cache, new_paged_kv,
    CacheOptions, DEFAULT_BLOCK_SIZE,
};
pub use engine::{
    start as start_engine, ClearReport, EngineConfig, EngineHandle, EngineRequest, EngineStats,
    Event, Histogram, SubmitError, TierCleared, TokenLogprob, Usage, LATENCY_BUCKETS_S, MAX_N,
    MAX_TOP_LOGPROBS,
};
pub use generate::{
    generate, generate_tiered, FinishReason, GenerateOutput, GenerateRequest, Timings,
    PREFILL_CHUNK,
};
pub use grammar::{Constraint, GrammarCompiler, GrammarSpec, Mask};
/// The chat message type of the model's template (for servers building prompts).
pub use kvinfer_model::chat::{ChatMessage, ToolSyntax};
pub use kvinfer_tier::{Codec, TierStats, TieredStore, WriteMode, TIER_LATENCY_BUCKETS_S};
pub use sampler::{Sampler, SamplingParams};
pub use stop::{StopMatcher, TextStream, Utf8Stream};
pub use tiers::{block_spec, build_store, TierOptions, TierSink, TierWrite, DEFAULT_CODEC};

/// Errors of the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The model failed (bad ids, context full...).
    #[error(transparent)]
    Model(#[from] kvinfer_model::ModelError),
    /// The request is invalid.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The KV cache cannot hold the request.
    #[error("{0}")]
    CacheFull(String),
}
