//! A loaded model: config, weights over the mapped file, tokenizer and chat template.

use crate::chat::ChatTemplate;
use crate::config::{Arch, ModelConfig};
use crate::gguf::GgufFile;
use crate::tokenizer::{Tokenizer, TokenizerSpec};
use crate::{gemma3, llama, ModelError};
use kvinfer_cache::KvCache;
use std::path::Path;

enum ArchWeights {
    Llama(llama::Weights),
    Gemma3(gemma3::Weights),
}

/// A model ready to run. Immutable: one `Model` serves any number of sequences, each with its own
/// [`KvCache`].
pub struct Model {
    /// Shapes and hyper-parameters.
    pub config: ModelConfig,
    /// Text <-> token ids, as llama.cpp tokenizes.
    pub tokenizer: Tokenizer,
    /// The chat template (the file's, or gemma3's built-in one); `None` if the file has none.
    pub chat_template: Option<ChatTemplate>,
    /// `general.name`, or the file name.
    pub name: String,
    file: GgufFile,
    weights: ArchWeights,
}

impl Model {
    /// Loads a GGUF model: maps the file, reads the config, checks every tensor, builds the
    /// tokenizer. Weights stay in the map (the OS pages them in on first use).
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        let file = GgufFile::open(path)?;
        let config = ModelConfig::from_gguf(&file)?;
        let weights = match config.arch {
            Arch::Llama => ArchWeights::Llama(llama::Weights::load(&file, &config)?),
            Arch::Gemma3 => ArchWeights::Gemma3(gemma3::Weights::load(&file, &config)?),
        };
        let tokenizer = Tokenizer::from_spec(TokenizerSpec::from_gguf(&file)?)?;
        if tokenizer.vocab_size() != config.vocab_size {
            return Err(ModelError::Config(format!(
                "tokenizer has {} tokens but the output matrix has {} rows",
                tokenizer.vocab_size(),
                config.vocab_size
            )));
        }
        let piece = |id: Option<u32>| {
            id.map(|i| tokenizer.token_text(i).to_string())
                .unwrap_or_default()
        };
        let (bos, eos) = (piece(tokenizer.bos_id()), piece(tokenizer.eos_id()));
        let source = match (file.get_str("tokenizer.chat_template"), config.arch) {
            (Some(s), _) => Some(s.to_string()),
            (None, Arch::Gemma3) => Some(ChatTemplate::gemma3_builtin().to_string()),
            (None, Arch::Llama) => None,
        };
        let chat_template = source
            .map(|s| ChatTemplate::new(&s, &bos, &eos))
            .transpose()?;
        let name = file
            .get_str("general.name")
            .map(str::to_string)
            .or_else(|| path.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_default();
        Ok(Self {
            config,
            tokenizer,
            chat_template,
            name,
            file,
            weights,
        })
    }

    /// An empty KV cache for one sequence of at most `max_tokens` positions (capped at the
    /// model's context length).
    pub fn new_kv_cache(&self, max_tokens: usize) -> KvCache {
        let max = max_tokens.min(self.config.context_length);
        KvCache::new(self.config.n_layers, self.config.kv_dim(), max)
    }

    /// Runs `tokens` after the positions already in `kv`, appends their keys and values, and
    /// returns the logits of the last token (`[vocab_size]`).
    pub fn forward(&self, tokens: &[u32], kv: &mut KvCache) -> Result<Vec<f32>, ModelError> {
        if tokens.is_empty() {
            return Err(ModelError::Input("no tokens to run".into()));
        }
        if let Some(&bad) = tokens
            .iter()
            .find(|&&t| t as usize >= self.config.vocab_size)
        {
            return Err(ModelError::Input(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.config.vocab_size
            )));
        }
        if tokens.len() > kv.remaining() {
            return Err(ModelError::ContextFull {
                needed: kv.len() + tokens.len(),
                max: kv.max_tokens(),
            });
        }
        if kv.kv_dim() != self.config.kv_dim() {
            return Err(ModelError::Input(
                "KV cache was made for another model".into(),
            ));
        }
        let (f, c) = (&self.file, &self.config);
        Ok(match &self.weights {
            ArchWeights::Llama(w) => w.forward(f, c, tokens, kv),
            ArchWeights::Gemma3(w) => w.forward(f, c, tokens, kv),
        })
    }

    /// Size of the model file in bytes.
    pub fn file_bytes(&self) -> u64 {
        self.file.file_len()
    }

    /// The GGUF file (for metadata).
    pub fn gguf(&self) -> &GgufFile {
        &self.file
    }
}
