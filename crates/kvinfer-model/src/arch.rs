//! The architectures kvinfer runs, each a small spec of what differs from the plain llama
//! decoder ([`crate::decoder`] runs them all): found by their GGUF `general.architecture`
//! name in [`ARCHS`], one place.
//!
//! What a spec names is what llama.cpp's graph for that architecture does (`src/models/*.cpp`
//! in llama.cpp): the tensors it loads (required when the spec says so, and every tensor of a
//! file must be read: see [`crate::support`]), the metadata it reads, RoPE's pairing, the
//! feed-forward activation, the extra norms, the embedding scale and which layers attend
//! within a sliding window.

use crate::layers::RopeStyle;

/// The gated feed-forward network's activation: `down(act(gate(x)) * up(x))`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    /// SiLU (llama, ...): [`crate::layers::swiglu`].
    Silu,
    /// GELU, tanh approximation (gemma): [`crate::layers::geglu`].
    GeluTanh,
}

/// Which layers attend only to the last `window` positions (`{arch}.attention.sliding_window`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowRule {
    /// None: the architecture has no sliding window (the metadata key is refused).
    None,
    /// Every layer but each `period`-th (layer `% period == period - 1` is global): Gemma 3's
    /// five local layers per global one (llama.cpp's `set_swa_pattern(6)`), Gemma 2's
    /// alternation (2).
    AllButEvery(usize),
}

/// What an architecture changes in the decoder. See the module docs.
#[derive(Debug)]
pub struct ArchSpec {
    /// The GGUF `general.architecture` string, and the metadata namespace.
    pub name: &'static str,
    /// How RoPE pairs a head's dimensions.
    pub rope: RopeStyle,
    /// Biases on the Q, K and V projections (`attn_q.bias`, `attn_k.bias`, `attn_v.bias`).
    pub qkv_bias: bool,
    /// RoPE frequency factors may be given (`rope_freqs.weight`, one per dimension pair:
    /// Llama 3.1+'s long-context scaling).
    pub rope_freqs: bool,
    /// Q, K and V in one matrix (`attn_qkv`: Q's rows, then K's, then V's).
    pub fused_qkv: bool,
    /// The FFN's gate and up projections in one matrix (`ffn_up`: gate's rows, then up's; no
    /// `ffn_gate`), as ggml's `swiglu` of one tensor splits it.
    pub fused_gate_up: bool,
    /// RMSNorm of each query and key head before RoPE (`attn_q_norm`, `attn_k_norm`).
    pub qk_norm: bool,
    /// RMSNorm of the attention and FFN outputs before each residual add
    /// (`post_attention_norm`, `post_ffw_norm`).
    pub post_norms: bool,
    /// The FFN's activation.
    pub act: Act,
    /// The embeddings are multiplied by `sqrt(n_embd)`.
    pub embd_scale: bool,
    /// Sliding-window layers.
    pub window: WindowRule,
    /// RoPE base of the sliding-window layers when the file names none
    /// (`rope.freq_base_swa`; llama.cpp's default for gemma3 is 10000).
    pub rope_base_swa: Option<f32>,
    /// Soft-capping (`attn_logit_softcapping`, `final_logit_softcapping`): attention scores
    /// and logits through `cap * tanh(x / cap)`; queries are then scaled before the scores
    /// (by `1 / sqrt(head_dim)`; Gemma 2 27B: `1 / sqrt(n_embd / n_heads)`), as llama.cpp's
    /// gemma2 graph does.
    pub softcap: bool,
    /// The chat template used when the file carries none.
    pub builtin_template: Option<&'static str>,
    /// The output matrix is always the embedding table (llama.cpp's gemma2 never reads an
    /// `output.weight`, so a file with one is refused); otherwise `output.weight` when present.
    pub tied_output: bool,
    /// `{arch}.*` metadata keys this architecture reads beyond the common ones
    /// ([`crate::support`]).
    pub extra_keys: &'static [&'static str],
}

impl ArchSpec {
    /// The GGUF `general.architecture` string.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Whether the architecture has sliding-window layers at all.
    pub fn has_window(&self) -> bool {
        !matches!(self.window, WindowRule::None)
    }

    /// Whether `layer` attends within the sliding window (when the model has one).
    pub fn is_swa_layer(&self, layer: usize) -> bool {
        match self.window {
            WindowRule::None => false,
            WindowRule::AllButEvery(p) => layer % p != p - 1,
        }
    }
}

impl PartialEq for ArchSpec {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

/// The plain decoder every spec starts from (`..PLAIN`): llama's graph without its optional
/// RoPE factors. Each architecture below names only what differs.
const PLAIN: ArchSpec = ArchSpec {
    name: "",
    rope: RopeStyle::Normal,
    qkv_bias: false,
    rope_freqs: false,
    fused_qkv: false,
    fused_gate_up: false,
    qk_norm: false,
    post_norms: false,
    act: Act::Silu,
    embd_scale: false,
    window: WindowRule::None,
    rope_base_swa: None,
    softcap: false,
    builtin_template: None,
    tied_output: false,
    extra_keys: &[],
};

/// LLaMA and its descendants (SmolLM2, Mistral 7B, ...): RMSNorm, RoPE (normal), SwiGLU FFN.
/// Touvron et al. 2023, arXiv:2302.13971. Llama 3.1+ files add RoPE frequency factors. A
/// Mistral-style `attention.sliding_window` is read and not applied: llama.cpp's `llama` graph
/// attends to the whole context (the model summary says so).
pub static LLAMA: ArchSpec = ArchSpec {
    name: "llama",
    rope_freqs: true,
    extra_keys: &["attention.sliding_window"],
    ..PLAIN
};

/// Gemma 3 (Gemma Team 2025, arXiv:2503.19786): embeddings scaled by sqrt(n_embd); RMSNorm on
/// each query and key head; norms after attention and after the FFN as well as before; GELU
/// FFN; NEOX RoPE with base 1e6 on global layers and 10000 on sliding-window layers; five
/// sliding-window layers for every global one; output tied to the embeddings. The GGUF norm
/// weights already include Gemma's `1 +` offset (added at conversion).
pub static GEMMA3: ArchSpec = ArchSpec {
    name: "gemma3",
    rope: RopeStyle::Neox,
    qk_norm: true,
    post_norms: true,
    act: Act::GeluTanh,
    embd_scale: true,
    window: WindowRule::AllButEvery(6),
    rope_base_swa: Some(10_000.0),
    builtin_template: Some(crate::chat::GEMMA3_TEMPLATE),
    extra_keys: &["attention.sliding_window", "rope.freq_base_swa"],
    ..PLAIN
};

/// Qwen 2 / 2.5 (and DeepSeek-R1-Distill-Qwen): llama with biases on Q, K and V and NEOX
/// RoPE (llama.cpp's `qwen2` graph).
pub static QWEN2: ArchSpec = ArchSpec {
    name: "qwen2",
    rope: RopeStyle::Neox,
    qkv_bias: true,
    ..PLAIN
};

/// Qwen 3 (dense): llama with an RMSNorm on each query and key head before RoPE, no biases,
/// NEOX RoPE (llama.cpp's `qwen3` graph).
pub static QWEN3: ArchSpec = ArchSpec {
    name: "qwen3",
    rope: RopeStyle::Neox,
    qk_norm: true,
    ..PLAIN
};

/// Phi-3 / Phi-3.5 (mini, medium; not their 128k LongRoPE variants, whose
/// `rope_factors_long` / `_short` tensors are refused): Q, K, V in one matrix, gate and up in
/// one, NEOX RoPE (llama.cpp's `phi3` graph). Its `attention.sliding_window` is read and not
/// applied, as llama.cpp does ("Phi SWA is currently disabled").
pub static PHI3: ArchSpec = ArchSpec {
    name: "phi3",
    rope: RopeStyle::Neox,
    fused_qkv: true,
    fused_gate_up: true,
    extra_keys: &["attention.sliding_window"],
    ..PLAIN
};

/// Gemma 2 (Gemma Team 2024, arXiv:2408.00118): Gemma 3 without Q/K norms, with soft-capped
/// attention scores and logits, and every other layer (the even ones) in a sliding window
/// (llama.cpp's `gemma2` graph, without flash attention).
pub static GEMMA2: ArchSpec = ArchSpec {
    name: "gemma2",
    rope: RopeStyle::Neox,
    post_norms: true,
    act: Act::GeluTanh,
    embd_scale: true,
    window: WindowRule::AllButEvery(2),
    softcap: true,
    builtin_template: Some(crate::chat::GEMMA3_TEMPLATE),
    tied_output: true,
    extra_keys: &[
        "attention.sliding_window",
        "attn_logit_softcapping",
        "final_logit_softcapping",
    ],
    ..PLAIN
};

/// Every architecture kvinfer runs.
pub static ARCHS: &[&ArchSpec] = &[&LLAMA, &GEMMA3, &QWEN2, &QWEN3, &PHI3, &GEMMA2];

/// The spec of `general.architecture` = `name`.
pub fn find(name: &str) -> Option<&'static ArchSpec> {
    ARCHS.iter().copied().find(|a| a.name == name)
}

/// The names of [`ARCHS`], for messages ("llama, gemma3").
pub fn names() -> String {
    ARCHS.iter().map(|a| a.name).collect::<Vec<_>>().join(", ")
}
