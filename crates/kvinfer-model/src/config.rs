//! Model hyper-parameters read from GGUF metadata, for the architectures kvinfer runs.

use crate::gguf::GgufFile;
use crate::ModelError;

/// The transformer families kvinfer implements, one file each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// LLaMA and its descendants (SmolLM2, ...): RMSNorm, RoPE (normal), SwiGLU FFN.
    Llama,
    /// Gemma 3: q/k norms, post-norms, GELU FFN, interleaved sliding-window attention.
    Gemma3,
}

impl Arch {
    /// The GGUF `general.architecture` string.
    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Gemma3 => "gemma3",
        }
    }
}

/// Everything the forward pass needs to know about shapes.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// Family.
    pub arch: Arch,
    /// Transformer blocks.
    pub n_layers: usize,
    /// Width of the residual stream.
    pub n_embd: usize,
    /// Hidden width of the feed-forward network.
    pub n_ff: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (grouped-query attention when < n_heads).
    pub n_kv_heads: usize,
    /// Dimension of one head.
    pub head_dim: usize,
    /// Tokens in the vocabulary (rows of the output matrix).
    pub vocab_size: usize,
    /// Context length the model was trained for.
    pub context_length: usize,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// RoPE frequency base (global layers).
    pub rope_base: f32,
    /// RoPE base on sliding-window layers (gemma3: 10000).
    pub rope_base_swa: f32,
    /// Sliding window in tokens, for layers where [`ModelConfig::is_swa_layer`] holds.
    pub sliding_window: Option<usize>,
}

impl ModelConfig {
    /// Reads the config of `f`, checking that the architecture is supported.
    pub fn from_gguf(f: &GgufFile) -> Result<Self, ModelError> {
        let arch_name = f
            .get_str("general.architecture")
            .ok_or_else(|| ModelError::Config("missing general.architecture".into()))?;
        let arch = match arch_name {
            "llama" => Arch::Llama,
            "gemma3" => Arch::Gemma3,
            other => {
                return Err(ModelError::Config(format!(
                    "architecture {other:?} is not supported (kvinfer runs llama and gemma3)"
                )))
            }
        };
        let key = |k: &str| format!("{arch_name}.{k}");
        let need = |k: &str| {
            f.get_u32(&key(k))
                .map(|v| v as usize)
                .ok_or_else(|| ModelError::Config(format!("missing metadata {}", key(k))))
        };
        let n_embd = need("embedding_length")?;
        let n_heads = need("attention.head_count")?;
        let n_kv_heads = f
            .get_u32(&key("attention.head_count_kv"))
            .map_or(n_heads, |v| v as usize);
        let head_dim = f
            .get_u32(&key("attention.key_length"))
            .map(|v| v as usize)
            .unwrap_or(n_embd / n_heads.max(1));
        let vocab_size = match f.get_u32(&key("vocab_size")) {
            Some(v) => v as usize,
            None => f
                .tensor("token_embd.weight")
                .map(|t| t.dims[1] as usize)
                .unwrap_or(0),
        };
        let rope_base = f.get_f32(&key("rope.freq_base")).unwrap_or(10_000.0);
        let cfg = Self {
            arch,
            n_layers: need("block_count")?,
            n_embd,
            n_ff: need("feed_forward_length")?,
            n_heads,
            n_kv_heads,
            head_dim,
            vocab_size,
            context_length: need("context_length")?,
            rms_eps: f
                .get_f32(&key("attention.layer_norm_rms_epsilon"))
                .unwrap_or(1e-5),
            rope_base,
            // gemma3 files carry no SWA base; llama.cpp uses 10000 for its local layers.
            rope_base_swa: f.get_f32(&key("rope.freq_base_swa")).unwrap_or(10_000.0),
            sliding_window: match arch {
                Arch::Gemma3 => f
                    .get_u32(&key("attention.sliding_window"))
                    .map(|v| v as usize),
                Arch::Llama => None,
            },
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ModelError> {
        let bad = |m: String| Err(ModelError::Config(m));
        if self.n_layers == 0 || self.n_embd == 0 || self.n_heads == 0 || self.head_dim == 0 {
            return bad(format!("degenerate shape {self:?}"));
        }
        if self.n_kv_heads == 0 || !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad(format!(
                "{} heads not divisible by {} KV heads",
                self.n_heads, self.n_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!("head_dim {} must be even for RoPE", self.head_dim));
        }
        if self.vocab_size == 0 {
            return bad("vocabulary size is 0".into());
        }
        Ok(())
    }

    /// Gemma 3 alternates five sliding-window layers with one global layer (il % 6 == 5).
    pub fn is_swa_layer(&self, layer: usize) -> bool {
        self.sliding_window.is_some() && layer % 6 != 5
    }

    /// Values per position per layer in the KV cache (n_kv_heads * head_dim).
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}
