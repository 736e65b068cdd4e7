//! Building blocks shared by the architectures: RMSNorm, RoPE, activations, and causal attention
//! over the KV cache. Shapes are named in every signature: `[n][dim]` is `n` rows of `dim` f32.

use crate::kernels::kv_quant::{self, KvQuery};
use crate::kernels::{matmul, QMatRef};
use half::f16;
use kvinfer_cache::{BlockId, KvDtype, KvGroups, KvStorage};
use rayon::prelude::*;
use std::ops::Range;

/// `x[i] = x[i] / rms(x) * w[i]` for each row of `x` (`[n][w.len()]`).
///
/// Rows go to the threads when there are many (prefill); each row's arithmetic is the same
/// either way.
pub fn rmsnorm(x: &mut [f32], w: &[f32], eps: f32) {
    let one = |row: &mut [f32]| {
        // Sum of squares in f64, as ggml does (its `ggml_float`), in 8 lanes (`i mod 8`, then
        // a fixed tree): not one serial chain of adds, and the same in every batch.
        let mut lanes = [0f64; 8];
        let mut chunks = row.chunks_exact(8);
        for c in &mut chunks {
            for k in 0..8 {
                lanes[k] += (c[k] * c[k]) as f64;
            }
        }
        for (k, &v) in chunks.remainder().iter().enumerate() {
            lanes[k] += (v * v) as f64;
        }
        let sum = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3]))
            + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
        let ss = (sum / w.len() as f64) as f32;
        let s = 1.0 / (ss + eps).sqrt();
        for (v, wi) in row.iter_mut().zip(w) {
            *v = *v * s * wi;
        }
    };
    if x.len() >= 1 << 15 {
        x.par_chunks_exact_mut(w.len()).for_each(one);
    } else {
        x.chunks_exact_mut(w.len()).for_each(one);
    }
}

/// `out = rmsnorm(x) * w` row by row, leaving `x` intact.
pub fn rmsnorm_into(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    out.copy_from_slice(x);
    rmsnorm(out, w, eps);
}

/// The output head for each sequence's last token: final RMSNorm of its residual row of `x`
/// (`[N][n_embd]`), then one matrix product over all of them (the output matrix is the largest
/// in small models: read once per step, not once per sequence). Logits `[spans][vocab]`.
pub fn lm_head(
    x: &[f32],
    spans: &[SeqSpan],
    norm: &[f32],
    eps: f32,
    output: QMatRef,
    every_row: bool,
) -> Vec<Vec<f32>> {
    let d = norm.len();
    let mut last = Vec::with_capacity(spans.len() * d); // [rows][n_embd]
    for s in spans {
        let rows = if every_row {
            s.rows.clone()
        } else {
            s.rows.end - 1..s.rows.end
        };
        last.extend_from_slice(&x[rows.start * d..rows.end * d]);
    }
    let n = last.len() / d;
    rmsnorm(&mut last, norm, eps);
    let mut logits = vec![0f32; n * output.rows];
    matmul(output, &last, n, &mut logits);
    logits
        .chunks_exact(output.rows)
        .map(<[f32]>::to_vec)
        .collect()
}

/// How RoPE pairs the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs (2i, 2i+1): ggml's "normal" mode, used by llama GGUFs (Q/K are permuted at
    /// conversion so this matches HF's rotate_half).
    Normal,
    /// Halves (i, i + d/2): ggml's NEOX mode, used by gemma3.
    Neox,
}

fn rotate(head: &mut [f32], cs: &[(f32, f32)], style: RopeStyle) {
    let half = cs.len();
    match style {
        RopeStyle::Normal => {
            for (i, &(c, s)) in cs.iter().enumerate() {
                let (x0, x1) = (head[2 * i], head[2 * i + 1]);
                head[2 * i] = x0 * c - x1 * s;
                head[2 * i + 1] = x0 * s + x1 * c;
            }
        }
        RopeStyle::Neox => {
            for (i, &(c, s)) in cs.iter().enumerate() {
                let (x0, x1) = (head[i], head[i + half]);
                head[i] = x0 * c - x1 * s;
                head[i + half] = x0 * s + x1 * c;
            }
        }
    }
}

/// How positions become rotations: ggml's `rope_ext` without YaRN (`ext_factor` 0).
#[derive(Debug, Clone, Copy)]
pub struct Rope<'a> {
    /// How the dimensions pair.
    pub style: RopeStyle,
    /// Frequency base (`rope.freq_base`).
    pub base: f32,
    /// Angles times this: `1 / rope.scaling.factor` under linear scaling, else 1.
    pub freq_scale: f32,
    /// Per dimension pair, the angle divided by this (Llama 3's `rope_freqs.weight`).
    pub factors: Option<&'a [f32]>,
}

impl Rope<'_> {
    /// Unscaled RoPE of `base`.
    pub fn plain(style: RopeStyle, base: f32) -> Rope<'static> {
        Rope {
            style,
            base,
            freq_scale: 1.0,
            factors: None,
        }
    }
}

/// Rotates `x` (`[n][n_heads][head_dim]`), token `t` at position `start + t`. Pair `i`'s angle
/// is `freq_scale * (pos * base^(-2i / head_dim) / factors[i])`, the power built by repeated
/// multiplication and cos / sin in f32, as ggml's `ggml_rope_cache_init` / `rope_yarn` do
/// (with no factors and no scaling the divisions and the product are exact: plain RoPE).
pub fn rope_tokens(x: &mut [f32], n_heads: usize, head_dim: usize, start: usize, rope: &Rope) {
    let half = head_dim / 2;
    let theta_scale = rope.base.powf(-2.0 / head_dim as f32);
    let mut cs = vec![(0f32, 0f32); half];
    for (t, tok) in x.chunks_exact_mut(n_heads * head_dim).enumerate() {
        let pos = (start + t) as f32;
        let mut theta = pos;
        for (i, c) in cs.iter_mut().enumerate() {
            let ff = rope.factors.map_or(1.0, |f| f[i]);
            let a = rope.freq_scale * (theta / ff);
            *c = (a.cos(), a.sin());
            theta *= theta_scale;
        }
        for head in tok.chunks_exact_mut(head_dim) {
            rotate(head, &cs, rope.style);
        }
    }
}

/// SiLU-gated product in place: `gate[i] = silu(gate[i]) * up[i]`, with `silu(x) = x / (1 +
/// e^-x)` and e^x the attention's polynomial ([`crate::attn::exp`], as ggml's SIMD SiLU uses its
/// own `expf`): element-wise, the same bits at every SIMD level.
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    let level = crate::kernels::simd();
    par_pairs(gate, up, |gate, up| silu_mul(level, gate, up));
}

fn silu_mul(level: crate::kernels::SimdLevel, gate: &mut [f32], up: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if level >= crate::kernels::SimdLevel::Avx2 {
        // SAFETY: AVX2 and FMA come with every level from Avx2 up.
        return unsafe { silu_mul_fma(gate, up) };
    }
    let _ = level;
    silu_mul_body(gate, up)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_mul_fma(gate: &mut [f32], up: &[f32]) {
    silu_mul_body(gate, up)
}

#[inline(always)]
fn silu_mul_body(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + crate::attn::exp(-*g)) * u;
    }
}

/// GELU (tanh approximation) gated product: `gate[i] = gelu(gate[i]) * up[i]`.
///
/// Computed as ggml's CPU backend does: GELU is a table over every f16 input (the input rounded
/// to f16, the output stored as f16), saturating to 0 / x beyond ±10. Matching it keeps gemma3's
/// logits within noise of llama.cpp's, and the lookup is far cheaper than `tanh`.
pub fn geglu(gate: &mut [f32], up: &[f32]) {
    let table = gelu_table();
    let one = |g: &mut [f32], u: &[f32]| {
        for (g, u) in g.iter_mut().zip(u) {
            let x = *g;
            *g = if x <= -10.0 {
                0.0
            } else if x >= 10.0 {
                x * u
            } else {
                table[f16::from_f32(x).to_bits() as usize] * u
            };
        }
    };
    par_pairs(gate, up, one);
}

/// `gelu(x)` for every f16 bit pattern `x`, rounded to f16 (ggml's `ggml_table_gelu_f16`).
fn gelu_table() -> &'static [f32] {
    static TABLE: std::sync::OnceLock<Vec<f32>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        const SQRT_2_OVER_PI: f32 = 0.797_884_6;
        const COEF_A: f32 = 0.044_715;
        (0..=u16::MAX)
            .map(|bits| {
                let x = f16::from_bits(bits).to_f32();
                let y = 0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + COEF_A * x * x)).tanh());
                f16::from_f32(y).to_f32()
            })
            .collect()
    })
}

/// Applies `f` to matching chunks of `a` and `b`, in parallel when they are long (prefill).
fn par_pairs(a: &mut [f32], b: &[f32], f: impl Fn(&mut [f32], &[f32]) + Sync) {
    const CHUNK: usize = 16 * 1024;
    if a.len() <= CHUNK {
        f(a, b);
    } else {
        a.par_chunks_mut(CHUNK)
            .zip(b.par_chunks(CHUNK))
            .for_each(|(a, b)| f(a, b));
    }
}

/// Shapes of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads; query head `h` reads KV head `h / (n_heads / n_kv_heads)`.
    pub n_kv_heads: usize,
    /// Dimension of a head.
    pub head_dim: usize,
    /// Multiplier of q·k before softmax.
    pub scale: f32,
    /// Sliding window: key `j` is visible to query `i` only when `i - j < window`.
    pub window: Option<usize>,
    /// Scores soft-capped before the softmax, `cap * tanh(s / cap)` (Gemma 2's
    /// `attn_logit_softcapping`; then `scale` is 1 and the queries come pre-scaled).
    pub softcap: Option<f32>,
}

/// `x = cap * tanh(x * (1 / cap))` element-wise, as ggml's scale, tanh, scale (soft-capping of
/// attention scores and of logits). Scalar, so the same bits at every SIMD level.
pub fn softcap(x: &mut [f32], cap: f32) {
    let inv = 1.0 / cap;
    for v in x {
        *v = (*v * inv).tanh() * cap;
    }
}

/// One sequence's rows in a batched forward pass.
#[derive(Debug, Clone)]
pub struct SeqSpan<'a> {
    /// The sequence's block table (covers `start + rows.len()` positions).
    pub blocks: &'a [BlockId],
    /// Positions already cached before this pass.
    pub start: usize,
    /// Its token rows in the batch: row `r` is position `start + (r - rows.start)`.
    pub rows: Range<usize>,
}

/// A batch's spans per layer group: layer `l` reads and writes its group's block tables at its
/// slot in the group's blocks.
pub struct KvSpans<'a> {
    groups: KvGroups,
    spans: Vec<Vec<SeqSpan<'a>>>,
}

impl<'a> KvSpans<'a> {
    /// `spans[g]`: the batch's spans over group `g`'s tables (equal rows and positions).
    pub fn new(groups: KvGroups, spans: Vec<Vec<SeqSpan<'a>>>) -> Self {
        debug_assert_eq!(groups.len(), spans.len(), "one span list per group");
        Self { groups, spans }
    }

    /// The spans for what does not read the cache (positions, rows).
    pub fn rows(&self) -> &[SeqSpan<'a>] {
        &self.spans[0]
    }

    /// Layer `l`'s slot in its group's blocks and the spans over that group's tables.
    pub fn layer(&self, l: usize) -> (usize, &[SeqSpan<'a>]) {
        let (g, slot) = self.groups.of_layer(l);
        (slot, &self.spans[g])
    }
}

/// Rotates each sequence's rows of `x` (`[N][n_heads][head_dim]`) at its own positions.
pub fn rope_spans(x: &mut [f32], spans: &[SeqSpan], n_heads: usize, head_dim: usize, rope: &Rope) {
    let w = n_heads * head_dim;
    for s in spans {
        let rows = &mut x[s.rows.start * w..s.rows.end * w];
        rope_tokens(rows, n_heads, head_dim, s.start, rope);
    }
}

/// Writes each new token's K and V rows (`[N][n_kv_heads][head_dim]`) of `layer` into its
/// sequence's block and slot.
pub fn store_kv(kv: &mut KvStorage, layer: usize, spans: &[SeqSpan], k: &[f32], v: &[f32]) {
    let kv_dim = kv.layout().kv_dim();
    let bs = kv.layout().block_size;
    let dtype = kv.layout().dtype;
    for s in spans {
        for (i, r) in s.rows.clone().enumerate() {
            let pos = s.start + i;
            let row = r * kv_dim..(r + 1) * kv_dim;
            kv.write_with(
                s.blocks[pos / bs],
                pos % bs,
                layer,
                &k[row.clone()],
                &v[row],
                |x, out| kv_quant::quantize_kv_row(dtype, x, out),
            );
        }
    }
}

/// Causal attention of every new query over its own sequence's cached keys and values, read in
/// place through the block table (`[slot][head_dim]` f16 per block and KV head; the new tokens'
/// rows already stored). `q` and `out` are `[N][n_heads][head_dim]` for the whole batch.
///
/// By far the most time at long context is spent here in decode: each query head reads
/// `pos + 1` keys and values of `head_dim` f16.
pub fn attention(
    q: &[f32],
    kv: &KvStorage,
    layer: usize,
    spans: &[SeqSpan],
    shape: AttnShape,
    out: &mut [f32],
) {
    let AttnShape {
        n_heads,
        n_kv_heads,
        head_dim,
        scale,
        window,
        softcap: cap,
    } = shape;
    if kv.layout().dtype == KvDtype::F16 {
        return crate::attn::attention_f16(crate::kernels::simd(), q, kv, layer, spans, shape, out);
    }
    let bs = kv.layout().block_size;
    // Quantized keys and values (q8_0, q4_0, q4): one task per (row, head).
    // Row -> (span, position) for the flat parallel loop.
    let mut row_pos = Vec::with_capacity(q.len() / (n_heads * head_dim));
    let mut widest = 1;
    for (si, s) in spans.iter().enumerate() {
        for (i, _) in s.rows.clone().enumerate() {
            row_pos.push((si, s.start + i));
        }
        widest = widest.max(s.start + s.rows.len());
    }
    debug_assert_eq!(row_pos.len() * n_heads * head_dim, q.len(), "q shape");
    let group = n_heads / n_kv_heads;
    let min_len = (32 * 1024 / (widest * head_dim)).max(1);
    let dtype = kv.layout().dtype;
    let rb = kv.layout().row_bytes();
    out.par_chunks_mut(head_dim)
        .with_min_len(min_len)
        .enumerate()
        .for_each_init(
            || (Vec::new(), KvQuery::default()),
            |(scores, kq): &mut (Vec<f32>, KvQuery), (idx, o)| {
                let (r, h) = (idx / n_heads, idx % n_heads);
                let (si, pos) = row_pos[r];
                let blocks = spans[si].blocks;
                let first = window.map_or(0, |w| (pos + 1).saturating_sub(w));
                let kvh = h / group;
                let q = &q[idx * head_dim..(idx + 1) * head_dim];
                // The query quantized to q8_0 as ggml does (rotated first for q4), integer
                // dot products.
                kq.prepare(dtype, q);
                // Scores block by block: one kernel call per block of keys.
                scores.clear();
                scores.resize(pos + 1 - first, 0.0);
                for (bi, slots, at) in block_runs(first, pos, bs) {
                    let out = &mut scores[at..at + slots.len()];
                    let keys = kv.rows_bytes(blocks[bi], layer, false, kvh);
                    kv_quant::dot_kv_rows(dtype, kq, &keys[slots.start * rb..], head_dim, out);
                }
                if let Some(cap) = cap {
                    softcap(scores, cap);
                }
                let max = scores
                    .iter()
                    .fold(f32::NEG_INFINITY, |m, &s| m.max(s * scale));
                let mut sum = 0.0f64; // f64 like ggml's softmax sum
                for s in scores.iter_mut() {
                    *s = (*s * scale - max).exp();
                    sum += *s as f64;
                }
                let sum = sum as f32;
                for s in scores.iter_mut() {
                    *s /= sum;
                }
                o.fill(0.0);
                // Dequantized on the fly against f32 probabilities (ggml's flash-attention
                // path for quantized V).
                for (bi, slots, at) in block_runs(first, pos, bs) {
                    let values = kv.rows_bytes(blocks[bi], layer, true, kvh);
                    let p = &scores[at..at + slots.len()];
                    kv_quant::axpy_kv_rows(dtype, p, &values[slots.start * rb..], head_dim, o);
                }
                if dtype.rotated() {
                    kv_quant::hadamard(o);
                }
            },
        );
}

/// The blocks covering positions `first..=last`: (block index in the table, slot range in the
/// block, offset of its first position from `first`).
fn block_runs(
    first: usize,
    last: usize,
    bs: usize,
) -> impl Iterator<Item = (usize, Range<usize>, usize)> {
    (first / bs..=last / bs).map(move |bi| {
        let lo = (bi * bs).max(first);
        let hi = ((bi + 1) * bs).min(last + 1);
        (bi, lo - bi * bs..hi - bi * bs, lo - first)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rmsnorm_unit_rms() {
        let mut x = vec![3.0, 4.0];
        rmsnorm(&mut x, &[1.0, 2.0], 0.0);
        let r = (12.5f32).sqrt();
        assert!((x[0] - 3.0 / r).abs() < 1e-6 && (x[1] - 8.0 / r).abs() < 1e-6);
    }

    #[test]
    fn rope_position_zero_is_identity_and_norm_preserved() {
        let mut x: Vec<f32> = (0..16).map(|i| i as f32 * 0.1).collect();
        let orig = x.clone();
        rope_tokens(
            &mut x[..8],
            1,
            8,
            0,
            &Rope::plain(RopeStyle::Normal, 10_000.0),
        );
        assert_eq!(&x[..8], &orig[..8]);
        for style in [RopeStyle::Normal, RopeStyle::Neox] {
            let mut y = orig.clone();
            rope_tokens(&mut y, 2, 8, 5, &Rope::plain(style, 10_000.0));
            let n0: f32 = orig.iter().map(|v| v * v).sum();
            let n1: f32 = y.iter().map(|v| v * v).sum();
            assert!((n0 - n1).abs() < 1e-4, "{style:?}");
            assert_ne!(y, orig);
        }
    }

    /// Linear scaling by 2 and frequency factors of 2 both rotate position 2p as plain RoPE
    /// rotates p (bit for bit: the factors of 2 are exact); other factors slow each pair by
    /// its own factor (against f64).
    #[test]
    fn rope_scaling_and_frequency_factors() {
        let x: Vec<f32> = (0..16).map(|i| (i as f32 * 0.37).sin()).collect();
        let rotated = |pos: usize, rope: &Rope| {
            let mut y = x.clone();
            rope_tokens(&mut y, 1, 16, pos, rope);
            y
        };
        for style in [RopeStyle::Normal, RopeStyle::Neox] {
            let plain = Rope::plain(style, 10_000.0);
            let want = rotated(7, &plain);
            let linear = Rope {
                freq_scale: 0.5,
                ..plain
            };
            assert_eq!(rotated(14, &linear), want, "{style:?} linear");
            let twos = [2.0f32; 8];
            let factors = Rope {
                factors: Some(&twos),
                ..plain
            };
            assert_eq!(rotated(14, &factors), want, "{style:?} factors");
        }
        let ff = [1.0f32, 1.5, 3.0, 8.0, 8.0, 20.0, 40.0, 100.0];
        let rope = Rope {
            factors: Some(&ff),
            ..Rope::plain(RopeStyle::Normal, 500_000.0)
        };
        let y = rotated(1000, &rope);
        for i in 0..8 {
            let a = 1000.0 * 500_000f64.powf(-2.0 * i as f64 / 16.0) / ff[i] as f64;
            let (x0, x1) = (x[2 * i] as f64, x[2 * i + 1] as f64);
            let want = (x0 * a.cos() - x1 * a.sin(), x0 * a.sin() + x1 * a.cos());
            assert!((y[2 * i] as f64 - want.0).abs() < 1e-3, "pair {i}");
            assert!((y[2 * i + 1] as f64 - want.1).abs() < 1e-3, "pair {i}");
        }
    }

    /// A cache holding `k`/`v` rows (`[pos][n_kv_heads * head_dim]`) for one sequence, its
    /// positions scattered over blocks of 1 slot in reverse block order.
    fn cache(
        k: &[f32],
        v: &[f32],
        n_kv_heads: usize,
        head_dim: usize,
    ) -> (KvStorage, Vec<BlockId>) {
        let n = k.len() / (n_kv_heads * head_dim);
        let mut kv = KvStorage::new(kvinfer_cache::KvLayout {
            n_layers: 1,
            n_kv_heads,
            head_dim,
            block_size: 1,
            num_blocks: n + 1,
            dtype: kvinfer_cache::KvDtype::F16,
        });
        let blocks: Vec<BlockId> = (0..n).map(|i| BlockId((n - i) as u32)).collect();
        let spans = [SeqSpan {
            blocks: &blocks,
            start: 0,
            rows: 0..n,
        }];
        store_kv(&mut kv, 0, &spans, k, v);
        (kv, blocks)
    }

    #[test]
    fn slice_rounding_to_f16_equals_the_scalar_rounding() {
        let mut x: Vec<f32> = (0..1000)
            .map(|i| ((i as f32) * 0.7311).sin() * 70000.0 / (i as f32 + 1.0))
            .collect();
        x.extend([
            0.0,
            -0.0,
            1e-8,
            -6.1e-5,
            65504.0,
            65520.0,
            1e9,
            f32::MIN_POSITIVE,
            0.1,
            1.0 / 3.0,
        ]);
        for level in crate::kernels::SimdLevel::available() {
            let mut out = x.clone();
            crate::attn::round_f16(level, &mut out, &mut Vec::new());
            for (a, b) in x.iter().zip(&out) {
                assert_eq!(
                    f16::from_f32(*a).to_f32().to_bits(),
                    b.to_bits(),
                    "{level:?} {a}"
                );
            }
        }
    }

    #[test]
    fn swiglu_is_the_same_bits_at_every_level_and_close_to_libm() {
        let x: Vec<f32> = (0..4000).map(|i| (i as f32 - 2000.0) * 0.0173).collect();
        let up: Vec<f32> = (0..4000).map(|i| 1.0 + (i % 7) as f32 * 0.25).collect();
        let mut want = x.clone();
        silu_mul(crate::kernels::SimdLevel::Scalar, &mut want, &up);
        for level in crate::kernels::SimdLevel::available() {
            let mut g = x.clone();
            silu_mul(level, &mut g, &up);
            for (i, (a, b)) in g.iter().zip(&want).enumerate() {
                assert_eq!(a.to_bits(), b.to_bits(), "{level:?} [{i}]");
            }
        }
        for ((&g, &u), &got) in x.iter().zip(&up).zip(&want) {
            let libm = g / (1.0 + (-g).exp()) * u;
            assert!(
                (got - libm).abs() <= 4.0 * f32::EPSILON * libm.abs().max(1e-30),
                "{g}: {got} vs {libm}"
            );
        }
    }

    #[test]
    fn attention_single_key_returns_its_value() {
        let shape = AttnShape {
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 4,
            scale: 0.5,
            window: None,
            softcap: None,
        };
        let (kv, blocks) = cache(&[1.0, 0.0, 0.0, 0.0], &[1.0, 2.0, 3.0, 4.0], 1, 4);
        let spans = [SeqSpan {
            blocks: &blocks,
            start: 0,
            rows: 0..1,
        }];
        let q = vec![0.3; 8];
        let mut out = vec![0.0; 8];
        attention(&q, &kv, 0, &spans, shape, &mut out);
        assert_eq!(out, vec![1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn attention_window_hides_old_keys_across_blocks() {
        // Two keys; with window 1 the query at position 1 sees only key 1.
        let shape = AttnShape {
            n_heads: 1,
            n_kv_heads: 1,
            head_dim: 2,
            scale: 1.0,
            window: Some(1),
            softcap: None,
        };
        let (kv, blocks) = cache(&[1.0, 0.0, 1.0, 0.0], &[5.0, 5.0, 7.0, 9.0], 1, 2);
        let spans = [SeqSpan {
            blocks: &blocks,
            start: 1,
            rows: 0..1,
        }];
        let mut out = vec![0.0; 2];
        attention(&[1.0, 1.0], &kv, 0, &spans, shape, &mut out);
        assert_eq!(out, vec![7.0, 9.0]);
        let shape = AttnShape {
            window: None,
            ..shape
        };
        attention(&[1.0, 1.0], &kv, 0, &spans, shape, &mut out);
        assert_eq!(out, vec![6.0, 7.0]);
    }
}
