//! The error type of kvinfer-model.

use crate::gguf::GgufError;

/// Everything that can go wrong loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The GGUF file could not be read.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// Metadata is missing or unsupported.
    #[error("model config: {0}")]
    Config(String),
    /// The file asks for a computation kvinfer does not implement (named).
    #[error("unsupported model: {0}")]
    Unsupported(String),
    /// A tensor the architecture needs is absent.
    #[error("model file lacks tensor {0}")]
    MissingTensor(String),
    /// A tensor has the wrong shape.
    #[error("model shape: {0}")]
    Shape(String),
    /// The tokenizer could not be built.
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
    /// The chat template could not be compiled or rendered.
    #[error(transparent)]
    ChatTemplate(#[from] crate::chat::ChatTemplateError),
    /// Bad input to `forward`.
    #[error("invalid input: {0}")]
    Input(String),
    /// The sequence would pass the cache's capacity.
    #[error("context full: {needed} tokens needed, the context holds {max}")]
    ContextFull {
        /// Positions the request needs.
        needed: usize,
        /// Positions available.
        max: usize,
    },
}
