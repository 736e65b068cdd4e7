//! Tiny random-weight models written as real GGUF files, so tests need no download.
//!
//! Both shapes exercise the full loading path (metadata, tensor index, tokenizer, chat template)
//! and mix weight types (F32, F16, Q8_0, Q4_0) so several kernels run. The weights are seeded: the
//! same seed writes the same file.

use crate::ggml_type::GgmlType;
use crate::gguf::{GgufWriter, MetaValue};
use half::f16;
use std::path::Path;

/// Which tiny model to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TinyArch {
    /// 2 layers, n_embd 64, 4 heads / 2 KV heads, byte-level BPE vocabulary.
    Llama,
    /// 6 layers (5 sliding with window 8, then 1 global), head_dim 32, SentencePiece vocabulary.
    Gemma3,
    /// As `Llama` with 2 heads of 32 / 1 KV head (quantized KV needs heads of a multiple of 32).
    LlamaHead32,
    /// Llama 3 style: RoPE frequency factors (`rope_freqs.weight`), base 500000 and linear
    /// RoPE scaling (factor 2); n_embd 256, 8 heads of 32 / 2 KV heads, its matrices in the
    /// types whose rows need 256 weights: Q4_K and Q5_K in layer 0; Q2_K, Q3_K, IQ4_XS and
    /// IQ4_NL in layer 1 (as a `*_K_M` file mixes them).
    Llama3,
    /// qwen2: biases on Q, K and V, NEOX RoPE; 2 heads of 32 / 1 KV head.
    Qwen2,
    /// qwen3: per-head Q/K norms, NEOX RoPE; 4 heads of 32 / 2 KV heads over n_embd 64 (heads
    /// wider than the residual stream, as Qwen 3's are).
    Qwen3,
    /// phi3: Q/K/V in one matrix, gate and up in one, NEOX RoPE, 2 heads of 32 (no GQA), a
    /// sliding window in the metadata that is not applied (as llama.cpp), SentencePiece.
    Phi3,
    /// gemma2: soft-capped attention scores (cap 2) and logits (cap 8), even layers in a
    /// sliding window of 8, post-norms, GELU, output tied to the embeddings; 4 layers, 4 heads
    /// of 32 / 2 KV heads.
    Gemma2,
    /// A llama wide enough that the matrix products dominate (n_embd 2048, n_ff 5632, 16 heads
    /// of 128 / 4 KV heads, 2 layers), every matrix in one type: per-type speed against
    /// llama.cpp on the same file (`examples/wide_model.rs`). Not in [`TinyArch::ALL`].
    Wide(GgmlType),
}

impl TinyArch {
    /// Every tiny model.
    pub const ALL: [TinyArch; 8] = [
        TinyArch::Llama,
        TinyArch::Gemma3,
        TinyArch::LlamaHead32,
        TinyArch::Llama3,
        TinyArch::Qwen2,
        TinyArch::Qwen3,
        TinyArch::Phi3,
        TinyArch::Gemma2,
    ];
}

struct Rng(u64);

impl Rng {
    fn next_f32(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next_f32() * scale).collect()
    }
}

/// Q4_K (`five` false) or Q5_K blocks of `x` (256 weights each): per 32 weights a 6-bit scale
/// and min from the range, laid out as ggml's `block_q4_K` / `block_q5_K` (not ggml's search for
/// the best scales: any well-formed block serves the tests).
fn quantize_k(x: &[f32], five: bool) -> Vec<u8> {
    let qmax = if five { 31.0 } else { 15.0 };
    let mut out = Vec::new();
    for b in x.chunks(256) {
        let (mut scale, mut minv) = ([0f32; 8], [0f32; 8]);
        for j in 0..8 {
            let s = &b[32 * j..32 * j + 32];
            let lo = s.iter().fold(0f32, |m, &v| m.min(v));
            let hi = s.iter().fold(f32::MIN, |m, &v| m.max(v));
            scale[j] = (hi - lo) / qmax;
            minv[j] = -lo;
        }
        let top = |a: &[f32; 8]| a.iter().fold(0f32, |m, &v| m.max(v)) / 63.0;
        let (d, dmin) = (f16::from_f32(top(&scale)), f16::from_f32(top(&minv)));
        let (df, dminf) = (d.to_f32(), dmin.to_f32());
        let six = |v: f32, unit: f32| {
            if unit > 0.0 {
                (v / unit).round().clamp(0.0, 63.0) as u8
            } else {
                0
            }
        };
        let sc: [u8; 8] = std::array::from_fn(|j| six(scale[j], df));
        let m: [u8; 8] = std::array::from_fn(|j| six(minv[j], dminf));
        let mut scales = [0u8; 12];
        for j in 0..8 {
            if j < 4 {
                scales[j] |= sc[j];
                scales[j + 4] |= m[j];
            } else {
                scales[j + 4] = (sc[j] & 0xF) | ((m[j] & 0xF) << 4);
                scales[j - 4] |= (sc[j] >> 4) << 6;
                scales[j] |= (m[j] >> 4) << 6;
            }
        }
        let q = |j: usize, l: usize| -> u8 {
            let step = df * sc[j] as f32;
            if step > 0.0 {
                ((b[32 * j + l] + dminf * m[j] as f32) / step)
                    .round()
                    .clamp(0.0, qmax) as u8
            } else {
                0
            }
        };
        let (mut qh, mut qs) = ([0u8; 32], [0u8; 128]);
        for p in 0..4 {
            for l in 0..32 {
                let (a, z) = (q(2 * p, l), q(2 * p + 1, l));
                qs[32 * p + l] = (a & 0xF) | ((z & 0xF) << 4);
                qh[l] |= ((a >> 4) << (2 * p)) | ((z >> 4) << (2 * p + 1));
            }
        }
        out.extend(d.to_le_bytes());
        out.extend(dmin.to_le_bytes());
        out.extend(scales);
        if five {
            out.extend(qh);
        }
        out.extend(qs);
    }
    out
}

/// `v / unit` rounded into `lo..=hi` (0 when `unit` is 0).
fn steps(v: f32, unit: f32, lo: f32, hi: f32) -> i32 {
    if unit > 0.0 {
        (v / unit).round().clamp(lo, hi) as i32
    } else {
        0
    }
}

/// Q2_K blocks of `x`: per 16 weights a 4-bit scale and min from the range.
#[allow(clippy::needless_range_loop)] // weight i sets bits of two arrays
fn quantize_q2_k(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for b in x.chunks(256) {
        let (mut scale, mut minv) = ([0f32; 16], [0f32; 16]);
        for g in 0..16 {
            let s = &b[16 * g..16 * g + 16];
            let lo = s.iter().fold(0f32, |m, &v| m.min(v));
            let hi = s.iter().fold(lo, |m, &v| m.max(v));
            (scale[g], minv[g]) = ((hi - lo) / 3.0, -lo);
        }
        let top = |a: &[f32; 16]| f16::from_f32(a.iter().fold(0f32, |m, &v| m.max(v)) / 15.0);
        let (d, dmin) = (top(&scale), top(&minv));
        let (df, dminf) = (d.to_f32(), dmin.to_f32());
        let mut blk = [0u8; 84];
        for g in 0..16 {
            let sc = steps(scale[g], df, 0.0, 15.0);
            let m = steps(minv[g], dminf, 0.0, 15.0);
            blk[g] = (sc | (m << 4)) as u8;
            for i in 16 * g..16 * g + 16 {
                let q = steps(b[i] + dminf * m as f32, df * sc as f32, 0.0, 3.0);
                let (h, k, l) = (i / 128, (i % 128) / 32, i % 32);
                blk[16 + 32 * h + l] |= (q as u8) << (2 * k);
            }
        }
        blk[80..82].copy_from_slice(&d.to_le_bytes());
        blk[82..84].copy_from_slice(&dmin.to_le_bytes());
        out.extend(blk);
    }
    out
}

/// Q3_K blocks of `x`: per 16 weights a signed 6-bit scale, quants -4..=3.
#[allow(clippy::needless_range_loop)] // weight i sets bits of three arrays
fn quantize_q3_k(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for b in x.chunks(256) {
        let scale: [f32; 16] = std::array::from_fn(|g| {
            b[16 * g..16 * g + 16]
                .iter()
                .fold(0f32, |m, &v| m.max(v.abs()))
                / 4.0
        });
        let d = f16::from_f32(scale.iter().fold(0f32, |m, &v| m.max(v)) / 31.0);
        let df = d.to_f32();
        let mut blk = [0u8; 110];
        for g in 0..16 {
            let sc = steps(scale[g], df, -32.0, 31.0);
            let stored = (sc + 32) as u8;
            if g < 8 {
                blk[96 + g] |= stored & 0xF;
            } else {
                blk[96 + g - 8] |= (stored & 0xF) << 4;
            }
            blk[96 + 8 + g % 4] |= (stored >> 4) << (2 * (g / 4));
            for i in 16 * g..16 * g + 16 {
                let q = (steps(b[i], df * sc as f32, -4.0, 3.0) + 4) as u8;
                let (h, k, l) = (i / 128, (i % 128) / 32, i % 32);
                blk[32 + 32 * h + l] |= (q & 3) << (2 * k);
                blk[l] |= (q >> 2) << (i / 32);
            }
        }
        blk[108..110].copy_from_slice(&d.to_le_bytes());
        out.extend(blk);
    }
    out
}

/// The index of the IQ4 table value nearest `v`.
fn nearest_iq4(v: f32) -> u8 {
    let mut best = 0;
    for (i, &k) in crate::kernels::quant::KVALUES_IQ4.iter().enumerate() {
        if (v - k as f32).abs() < (v - crate::kernels::quant::KVALUES_IQ4[best] as f32).abs() {
            best = i;
        }
    }
    best as u8
}

/// IQ4_NL blocks of `x` (32 weights, one f16 scale, table indices in Q4_0's nibble order).
fn quantize_iq4_nl(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for b in x.chunks(32) {
        let d = f16::from_f32(b.iter().fold(0f32, |m, &v| m.max(v.abs())) / 127.0);
        let df = d.to_f32();
        let q = |v: f32| if df > 0.0 { nearest_iq4(v / df) } else { 8 };
        out.extend(d.to_le_bytes());
        out.extend((0..16).map(|j| q(b[j]) | (q(b[j + 16]) << 4)));
    }
    out
}

/// IQ4_XS blocks of `x`: per 32 weights a signed 6-bit scale, table indices.
fn quantize_iq4_xs(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for b in x.chunks(256) {
        let scale: [f32; 8] = std::array::from_fn(|ib| {
            b[32 * ib..32 * ib + 32]
                .iter()
                .fold(0f32, |m, &v| m.max(v.abs()))
                / 127.0
        });
        let d = f16::from_f32(scale.iter().fold(0f32, |m, &v| m.max(v)) / 31.0);
        let df = d.to_f32();
        let mut blk = [0u8; 136];
        let mut scales_h = 0u16;
        for ib in 0..8 {
            let ls = steps(scale[ib], df, -32.0, 31.0);
            let stored = (ls + 32) as u8;
            blk[4 + ib / 2] |= (stored & 0xF) << (4 * (ib % 2));
            scales_h |= ((stored >> 4) as u16) << (2 * ib);
            let unit = df * ls as f32;
            for j in 0..32 {
                let q = if unit != 0.0 {
                    nearest_iq4(b[32 * ib + j] / unit)
                } else {
                    8
                };
                blk[8 + 16 * ib + j % 16] |= if j < 16 { q } else { q << 4 };
            }
        }
        blk[0..2].copy_from_slice(&d.to_le_bytes());
        blk[2..4].copy_from_slice(&scales_h.to_le_bytes());
        out.extend(blk);
    }
    out
}

/// Quantizes f32 values to `ty` (F32, F16, Q8_0, Q4_0 as ggml's reference quantizers do;
/// the K-quants and IQ4 types from each block's range, not ggml's search for the best scales:
/// any well-formed block serves the tests).
pub fn quantize(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    match ty {
        GgmlType::Q2_K => quantize_q2_k(x),
        GgmlType::Q3_K => quantize_q3_k(x),
        GgmlType::IQ4_NL => quantize_iq4_nl(x),
        GgmlType::IQ4_XS => quantize_iq4_xs(x),
        GgmlType::Q4_K => quantize_k(x, false),
        GgmlType::Q5_K => quantize_k(x, true),
        GgmlType::F32 => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
        GgmlType::F16 => x
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
            .collect(),
        GgmlType::Q8_0 => x
            .chunks(32)
            .flat_map(|b| {
                let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if d > 0.0 { 1.0 / d } else { 0.0 };
                let mut out = f16::from_f32(d).to_le_bytes().to_vec();
                out.extend(b.iter().map(|v| (v * id).round() as i8 as u8));
                out
            })
            .collect(),
        GgmlType::Q4_0 => x
            .chunks(32)
            .flat_map(|b| {
                let (mut amax, mut max) = (0f32, 0f32);
                for &v in b {
                    if v.abs() > amax {
                        amax = v.abs();
                        max = v;
                    }
                }
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                let q = |v: f32| ((v * id + 8.5) as i32).clamp(0, 15) as u8;
                let mut out = f16::from_f32(d).to_le_bytes().to_vec();
                out.extend((0..16).map(|j| q(b[j]) | (q(b[j + 16]) << 4)));
                out
            })
            .collect(),
        other => panic!("testing::quantize does not write {other:?}"),
    }
}

fn s(v: &str) -> MetaValue {
    MetaValue::Str(v.to_string())
}

fn strs<I: IntoIterator<Item = String>>(it: I) -> MetaValue {
    MetaValue::Array(it.into_iter().map(MetaValue::Str).collect())
}

/// GPT-2's byte -> printable char mapping (the byte-level BPE alphabet).
fn byte_chars() -> Vec<char> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let mut n = 0;
    (0..256u32)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap_or('?')
            } else {
                n += 1;
                char::from_u32(255 + n).unwrap_or('?')
            }
        })
        .collect()
}

fn bpe_vocab(w: &mut GgufWriter) -> usize {
    let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .iter()
        .map(|t| t.to_string())
        .collect();
    let mut types = vec![3i32; 3];
    tokens.extend(byte_chars().into_iter().map(String::from));
    types.resize(tokens.len(), 1);
    let merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"];
    for m in merges {
        tokens.push(m.replace(' ', ""));
        types.push(1);
    }
    let n = tokens.len();
    let tmpl = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    w.meta("tokenizer.ggml.model", s("gpt2"))
        .meta("tokenizer.ggml.pre", s("smollm"))
        .meta("tokenizer.ggml.tokens", strs(tokens))
        .meta(
            "tokenizer.ggml.token_type",
            MetaValue::Array(types.into_iter().map(MetaValue::I32).collect()),
        )
        .meta(
            "tokenizer.ggml.merges",
            strs(merges.iter().map(|m| m.to_string())),
        )
        .meta("tokenizer.ggml.bos_token_id", MetaValue::U32(1))
        .meta("tokenizer.ggml.eos_token_id", MetaValue::U32(2))
        .meta("tokenizer.ggml.add_bos_token", MetaValue::Bool(false))
        .meta("tokenizer.chat_template", s(tmpl));
    n
}

fn spm_vocab(w: &mut GgufWriter, phi3: bool) -> usize {
    // Gemma's special tokens, or Phi-3's (llama.cpp's Phi-3 vocabulary needs `<unk>`, `<s>`,
    // `</s>` and `<|endoftext|>`, and strips whitespace after the others).
    let (head, tail, ids): (&[&str], &[&str], _) = if phi3 {
        (
            &["<pad>", "</s>", "<s>", "<unk>"],
            &["<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"],
            (2, 1, 3),
        )
    } else {
        (
            &["<pad>", "<eos>", "<bos>", "<unk>"],
            &["<start_of_turn>", "<end_of_turn>"],
            (2, 1, 3),
        )
    };
    let mut tokens: Vec<String> = head.iter().map(|t| t.to_string()).collect();
    let mut types = vec![3, 3, 3, 2];
    let mut scores = vec![0f32; 4];
    for b in 0..256 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
        scores.push(0.0);
    }
    for (i, p) in ["▁", "t", "h", "e", "he", "▁t", "▁the", "a", "▁a", "n", "in"]
        .iter()
        .enumerate()
    {
        tokens.push(p.to_string());
        types.push(1);
        scores.push(-(i as f32));
    }
    for p in tail {
        tokens.push(p.to_string());
        types.push(3);
        scores.push(0.0);
    }
    let n = tokens.len();
    w.meta("tokenizer.ggml.model", s("llama"))
        .meta("tokenizer.ggml.pre", s("default"))
        .meta("tokenizer.ggml.tokens", strs(tokens))
        .meta(
            "tokenizer.ggml.scores",
            MetaValue::Array(scores.into_iter().map(MetaValue::F32).collect()),
        )
        .meta(
            "tokenizer.ggml.token_type",
            MetaValue::Array(types.into_iter().map(MetaValue::I32).collect()),
        )
        .meta("tokenizer.ggml.bos_token_id", MetaValue::U32(ids.0))
        .meta("tokenizer.ggml.eos_token_id", MetaValue::U32(ids.1))
        .meta("tokenizer.ggml.unknown_token_id", MetaValue::U32(ids.2))
        .meta("tokenizer.ggml.add_bos_token", MetaValue::Bool(true))
        .meta("tokenizer.ggml.add_space_prefix", MetaValue::Bool(false));
    n
}

/// Writes a tiny random model of `arch` to `path`.
pub fn write_tiny_model(path: &Path, arch: TinyArch, seed: u64) -> std::io::Result<()> {
    write_tiny_model_ctx(path, arch, seed, 256)
}

/// As [`write_tiny_model`], with a context of `context_length` tokens (same weights).
pub fn write_tiny_model_ctx(
    path: &Path,
    arch: TinyArch,
    seed: u64,
    context_length: u32,
) -> std::io::Result<()> {
    write_tiny_model_with(path, arch, seed, context_length, |_| {})
}

/// As [`write_tiny_model_ctx`], with `extra` adding metadata or tensors before the file is
/// written (what a file kvinfer must refuse looks like).
pub fn write_tiny_model_with(
    path: &Path,
    arch: TinyArch,
    seed: u64,
    context_length: u32,
    extra: impl FnOnce(&mut GgufWriter),
) -> std::io::Result<()> {
    let mut w = GgufWriter::new();
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let (name, n_layers, n_embd, n_ff, n_heads, n_kv, head_dim) = match arch {
        TinyArch::Llama => ("llama", 2usize, 64usize, 128usize, 4usize, 2usize, 16usize),
        TinyArch::LlamaHead32 => ("llama", 2, 64, 128, 2, 1, 32),
        TinyArch::Llama3 => ("llama", 2, 256, 256, 8, 2, 32),
        TinyArch::Gemma3 => ("gemma3", 6, 64, 128, 4, 1, 32),
        TinyArch::Qwen2 => ("qwen2", 2, 64, 128, 2, 1, 32),
        TinyArch::Qwen3 => ("qwen3", 2, 64, 128, 4, 2, 32),
        TinyArch::Phi3 => ("phi3", 2, 64, 128, 2, 2, 32),
        TinyArch::Gemma2 => ("gemma2", 4, 64, 128, 4, 2, 32),
        TinyArch::Wide(_) => ("llama", 2, 2048, 5632, 16, 4, 128),
    };
    let key = |k: &str| format!("{name}.{k}");
    w.meta("general.architecture", s(name))
        .meta("general.name", s(&format!("tiny-{name}")));
    w.meta(&key("block_count"), MetaValue::U32(n_layers as u32))
        .meta(&key("context_length"), MetaValue::U32(context_length))
        .meta(&key("embedding_length"), MetaValue::U32(n_embd as u32))
        .meta(&key("feed_forward_length"), MetaValue::U32(n_ff as u32))
        .meta(&key("attention.head_count"), MetaValue::U32(n_heads as u32))
        .meta(&key("attention.head_count_kv"), MetaValue::U32(n_kv as u32))
        .meta(
            &key("attention.layer_norm_rms_epsilon"),
            MetaValue::F32(1e-5),
        );
    if n_heads * head_dim != n_embd {
        w.meta(
            &key("attention.key_length"),
            MetaValue::U32(head_dim as u32),
        )
        .meta(
            &key("attention.value_length"),
            MetaValue::U32(head_dim as u32),
        );
    }
    let vocab = match arch {
        TinyArch::Llama
        | TinyArch::LlamaHead32
        | TinyArch::Qwen2
        | TinyArch::Qwen3
        | TinyArch::Wide(_) => {
            w.meta(&key("rope.freq_base"), MetaValue::F32(10_000.0));
            bpe_vocab(&mut w)
        }
        TinyArch::Llama3 => {
            w.meta(&key("rope.freq_base"), MetaValue::F32(500_000.0))
                .meta(&key("rope.scaling.type"), s("linear"))
                .meta(&key("rope.scaling.factor"), MetaValue::F32(2.0));
            // Slower rotations for the low-frequency pairs, as Llama 3.1's factors are.
            let ff: Vec<f32> = (0..head_dim / 2)
                .map(|i| 1.0 + 7.0 * (i as f32 / (head_dim / 2 - 1) as f32))
                .collect();
            w.tensor_f32("rope_freqs.weight", &[ff.len() as u64], &ff);
            bpe_vocab(&mut w)
        }
        TinyArch::Gemma3 => {
            w.meta(&key("rope.freq_base"), MetaValue::F32(1_000_000.0))
                .meta(&key("attention.sliding_window"), MetaValue::U32(8));
            spm_vocab(&mut w, arch == TinyArch::Phi3)
        }
        TinyArch::Gemma2 => {
            w.meta(&key("rope.freq_base"), MetaValue::F32(10_000.0))
                .meta(&key("attention.sliding_window"), MetaValue::U32(8))
                .meta(&key("attn_logit_softcapping"), MetaValue::F32(2.0))
                .meta(&key("final_logit_softcapping"), MetaValue::F32(8.0));
            spm_vocab(&mut w, arch == TinyArch::Phi3)
        }
        TinyArch::Phi3 => {
            w.meta(&key("rope.freq_base"), MetaValue::F32(10_000.0))
                .meta(&key("attention.sliding_window"), MetaValue::U32(8));
            spm_vocab(&mut w, arch == TinyArch::Phi3)
        }
    };
    let mut mat = |w: &mut GgufWriter, name: &str, rows: usize, cols: usize, ty: GgmlType| {
        let x = rng.vec(rows * cols, 1.5 / (cols as f32).sqrt());
        w.tensor(name, &[cols as u64, rows as u64], ty, quantize(ty, &x));
    };
    let (qd, kvd) = (n_heads * head_dim, n_kv * head_dim);
    mat(&mut w, "token_embd.weight", vocab, n_embd, GgmlType::Q8_0);
    if matches!(arch, TinyArch::Gemma2 | TinyArch::Gemma3) {
        // Tied output.
    } else {
        // Untied output (gemma3 keeps the tied path covered). Random tied embeddings make greedy
        // decoding repeat the last token forever, which would hide bugs.
        mat(&mut w, "output.weight", vocab, n_embd, GgmlType::Q8_0);
    }
    let mut norm_rng = Rng(seed ^ 0xABCD);
    let mut norm = |w: &mut GgufWriter, name: &str, n: usize| {
        let v: Vec<f32> = norm_rng.vec(n, 0.2).iter().map(|x| 1.0 + x).collect();
        w.tensor_f32(name, &[n as u64], &v);
    };
    if arch == TinyArch::Gemma2 {
        // Logits 4x larger (a 4x output norm; the output is tied to the embeddings, as
        // llama.cpp's gemma2 always has it), so top-1 margins stand well above rounding and the
        // cap of 8 bends them.
        let v: Vec<f32> = Rng(seed ^ 0x6E6D)
            .vec(n_embd, 0.2)
            .iter()
            .map(|x| 4.0 * (1.0 + x))
            .collect();
        w.tensor_f32("output_norm.weight", &[n_embd as u64], &v);
    } else {
        norm(&mut w, "output_norm.weight", n_embd);
    }
    let mut bias_rng = Rng(seed ^ 0x5151);
    // Types of (q, k, v, output, gate, up, down).
    let layer_types = |l: usize| match arch {
        TinyArch::Llama3 if l == 0 => {
            use GgmlType::{Q4_K, Q5_K};
            [Q4_K, Q5_K, Q5_K, Q4_K, Q5_K, Q4_K, Q5_K]
        }
        TinyArch::Llama3 => {
            use GgmlType::{IQ4_NL, IQ4_XS, Q2_K, Q3_K};
            [Q2_K, Q3_K, IQ4_XS, IQ4_NL, Q3_K, Q2_K, IQ4_XS]
        }
        TinyArch::Wide(ty) => [ty; 7],
        _ => {
            use GgmlType::{F16, F32, Q4_0, Q8_0};
            [Q8_0, F16, F32, Q4_0, Q8_0, F16, Q4_0]
        }
    };
    for l in 0..n_layers {
        let types = layer_types(l);
        let p = |t: &str| format!("blk.{l}.{t}.weight");
        norm(&mut w, &p("attn_norm"), n_embd);
        if arch == TinyArch::Phi3 {
            mat(&mut w, &p("attn_qkv"), qd + 2 * kvd, n_embd, types[0]);
        } else {
            mat(&mut w, &p("attn_q"), qd, n_embd, types[0]);
            mat(&mut w, &p("attn_k"), kvd, n_embd, types[1]);
            mat(&mut w, &p("attn_v"), kvd, n_embd, types[2]);
        }
        mat(&mut w, &p("attn_output"), n_embd, qd, types[3]);
        norm(&mut w, &p("ffn_norm"), n_embd);
        if arch == TinyArch::Phi3 {
            mat(&mut w, &p("ffn_up"), 2 * n_ff, n_embd, types[5]);
        } else {
            mat(&mut w, &p("ffn_gate"), n_ff, n_embd, types[4]);
            mat(&mut w, &p("ffn_up"), n_ff, n_embd, types[5]);
        }
        mat(&mut w, &p("ffn_down"), n_embd, n_ff, types[6]);
        if matches!(arch, TinyArch::Gemma3 | TinyArch::Qwen3) {
            norm(&mut w, &p("attn_q_norm"), head_dim);
            norm(&mut w, &p("attn_k_norm"), head_dim);
        }
        if arch == TinyArch::Gemma3 {
            norm(&mut w, &p("post_attention_norm"), n_embd);
            norm(&mut w, &p("post_ffw_norm"), n_embd);
        }
        if arch == TinyArch::Gemma2 {
            // Layer outputs 3x larger than the scaled embedding they add to, so the tied output
            // does not just echo the input token.
            for t in ["post_attention_norm", "post_ffw_norm"] {
                let v: Vec<f32> = Rng(seed ^ (l as u64 + 0x77)).vec(n_embd, 0.2);
                let v: Vec<f32> = v.iter().map(|x| 3.0 * (1.0 + x)).collect();
                w.tensor_f32(&p(t), &[n_embd as u64], &v);
            }
        }
        if arch == TinyArch::Qwen2 {
            for (t, n) in [("attn_q", qd), ("attn_k", kvd), ("attn_v", kvd)] {
                let b = bias_rng.vec(n, 0.5);
                w.tensor_f32(&format!("blk.{l}.{t}.bias"), &[n as u64], &b);
            }
        }
    }
    extra(&mut w);
    w.write(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each type the test quantizer writes decodes (kvinfer's dequantization) close to what it
    /// was given: a quantizer that wrote misplaced bits would fail here before any model test.
    #[test]
    fn quantize_round_trips_within_each_types_precision() {
        use GgmlType::*;
        let x = Rng(11).vec(4096, 1.0);
        for (ty, tol) in [
            (F16, 1e-3),
            (Q8_0, 0.01),
            (Q4_0, 0.1),
            (Q4_K, 0.1),
            (Q5_K, 0.05),
            (Q2_K, 0.35),
            (Q3_K, 0.2),
            (IQ4_NL, 0.1),
            (IQ4_XS, 0.1),
        ] {
            let q = quantize(ty, &x);
            assert_eq!(Some(q.len()), ty.row_bytes(x.len()), "{ty:?} size");
            let mut y = vec![0f32; x.len()];
            crate::kernels::dequantize_row(ty, &q, &mut y);
            let err: f32 = x.iter().zip(&y).map(|(a, b)| (a - b) * (a - b)).sum();
            let norm: f32 = x.iter().map(|a| a * a).sum();
            let rel = (err / norm).sqrt();
            assert!(rel < tol, "{ty:?}: relative error {rel} over {tol}");
        }
    }
}
