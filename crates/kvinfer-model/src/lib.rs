//! kvinfer-model: everything about a model except caching policy.
//!
//! GGUF loading over mmap ([`gguf`]), the tokenizer ([`tokenizer`]) and chat template ([`chat`]),
//! CPU kernels with runtime SIMD dispatch ([`kernels`]), and one file per architecture
//! ([`llama`], [`gemma3`]) behind [`Model::forward`].
#![deny(missing_docs)]

mod attn;
#[cfg(target_arch = "x86_64")]
mod attn_avx512;
pub mod chat;
pub mod config;
mod error;
pub mod gemma3;
pub mod ggml_type;
pub mod gguf;
pub mod kernels;
pub mod layers;
pub mod llama;
mod model;
pub mod profile;
pub mod support;
pub mod testing;
pub mod tokenizer;
pub mod weights;

pub use config::{Arch, ModelConfig};
pub use error::ModelError;
pub use model::{Model, SeqBatch};
