//! kvinfer-model: everything about a model except caching policy.
//!
//! GGUF loading over mmap ([`gguf`]), the tokenizer ([`tokenizer`]) and chat template ([`chat`]),
//! CPU kernels with runtime SIMD dispatch ([`kernels`]), and one decoder forward pass
//! ([`decoder`]) over the architectures' specs ([`arch`]) behind [`Model::forward`].
#![deny(missing_docs)]

pub mod arch;
mod attn;
#[cfg(target_arch = "x86_64")]
mod attn_avx512;
pub mod chat;
pub mod config;
pub mod decoder;
mod error;
pub mod ggml_type;
pub mod gguf;
pub mod kernels;
pub mod layers;
mod model;
pub mod profile;
pub mod support;
pub mod testing;
pub mod tokenizer;
pub mod weights;

pub use arch::ArchSpec;
pub use config::ModelConfig;
pub use error::ModelError;
pub use model::{KvIdentity, Model, SeqBatch};
