//! Model hyper-parameters read from GGUF metadata, for the architectures kvinfer runs.

use crate::arch::{ArchSpec, WindowRule};
use crate::gguf::GgufFile;
use crate::ModelError;

/// Everything the forward pass needs to know about shapes.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// The architecture: what differs from the plain decoder ([`crate::arch`]).
    pub arch: &'static ArchSpec,
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
    /// RoPE angles times this: `1 / rope.scaling.factor` under linear scaling (llama.cpp's
    /// `rope_freq_scale`), else 1.
    pub rope_freq_scale: f32,
    /// Attention scores soft-capped at this (Gemma 2), queries then pre-scaled by
    /// `query_scale`.
    pub attn_softcap: Option<f32>,
    /// Logits soft-capped at this (Gemma 2).
    pub final_softcap: Option<f32>,
    /// What queries are multiplied by before their scores: `1 / sqrt(head_dim)` (Gemma 2 27B:
    /// `1 / sqrt(n_embd / n_heads)`, as llama.cpp).
    pub query_scale: f32,
    /// Sliding window in tokens, for layers where [`ModelConfig::layer_window`] is `Some`.
    pub sliding_window: Option<usize>,
}

impl ModelConfig {
    /// Reads the config of `f`, checking that the architecture is supported.
    pub fn from_gguf(f: &GgufFile) -> Result<Self, ModelError> {
        let arch_name = f
            .get_str("general.architecture")
            .ok_or_else(|| ModelError::Config("missing general.architecture".into()))?;
        let arch = crate::arch::find(arch_name).ok_or_else(|| {
            ModelError::Config(format!(
                "architecture {arch_name:?} is not supported (kvinfer runs {})",
                crate::arch::names()
            ))
        })?;
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
        let cap = |k: &str| f.get_f32(&key(k)).filter(|&c| arch.softcap && c > 0.0);
        // As llama.cpp: the factor (or its old name) applies unless the type is `none`; a file
        // without a type scales linearly. YaRN and the rest are not implemented.
        let factor = f
            .get_f32(&key("rope.scaling.factor"))
            .or_else(|| f.get_f32(&key("rope.scale_linear")))
            .unwrap_or(0.0);
        let rope_freq_scale = match f.get_str(&key("rope.scaling.type")) {
            Some("none") => 1.0,
            None | Some("linear") if factor != 0.0 => 1.0 / factor,
            None | Some("linear") => 1.0,
            Some(other) => {
                return Err(ModelError::Unsupported(format!(
                    "metadata {} = {other:?}: kvinfer computes RoPE scaling none and linear \
                     (as llama.cpp does), not {other}",
                    key("rope.scaling.type")
                )))
            }
        };
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
            rope_freq_scale,
            attn_softcap: cap("attn_logit_softcapping"),
            final_softcap: cap("final_logit_softcapping"),
            query_scale: if arch.softcap && need("block_count")? == 46 {
                1.0 / ((n_embd / n_heads) as f32).sqrt()
            } else {
                1.0 / (head_dim as f32).sqrt()
            },
            // gemma3 files carry no SWA base; llama.cpp uses 10000 for its local layers.
            rope_base_swa: f
                .get_f32(&key("rope.freq_base_swa"))
                .or(arch.rope_base_swa)
                .unwrap_or(rope_base),
            sliding_window: match arch.window {
                WindowRule::None => None,
                _ => f
                    .get_u32(&key("attention.sliding_window"))
                    .map(|v| v as usize),
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

    /// Whether `layer` attends within the sliding window (Gemma 3: five of every six layers).
    pub fn is_swa_layer(&self, layer: usize) -> bool {
        self.sliding_window.is_some() && self.arch.is_swa_layer(layer)
    }

    /// The window `layer` attends within, if it is a sliding-window layer.
    pub fn layer_window(&self, layer: usize) -> Option<usize> {
        self.sliding_window
            .filter(|_| self.arch.is_swa_layer(layer))
    }

    /// Values per position per layer in the KV cache (n_kv_heads * head_dim).
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}
