//! kvinfer-engine: sampling and the generation loop over a [`kvinfer_model::Model`].
//!
//! The continuous-batching engine loop and scheduler arrive with the server; today one sequence
//! runs at a time through [`generate`].
#![deny(missing_docs)]

mod cache;
mod generate;
mod sampler;
mod stop;

pub use cache::{default_kv_cache_mb, new_paged_kv, CacheOptions, DEFAULT_BLOCK_SIZE};
pub use generate::{generate, FinishReason, GenerateOutput, GenerateRequest, Timings};
pub use sampler::{Sampler, SamplingParams};
pub use stop::{StopMatcher, Utf8Stream};

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
