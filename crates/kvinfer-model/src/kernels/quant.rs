//! Block formats of the ggml quantized types, scalar dequantization, quantization of the
//! activations (to our Q8 / Q8_K formats) and the scalar dot products every SIMD kernel is
//! tested against.
//!
//! Layouts follow ggml's `ggml-common.h` byte for byte. Weights come straight from the mmap'd
//! GGUF file, which guarantees no alignment for these structs, so blocks are read as byte slices
//! (`f16` fields with `u16::from_le_bytes`), never cast to `&Block`.
//!
//! | type | bytes | layout (byte offsets)                                                    |
//! |------|-------|---------------------------------------------------------------------------|
//! | Q4_0 | 18    | `d: f16 [0..2]`, `qs [2..18]`: w = d * (q - 8)                             |
//! | Q4_1 | 20    | `d [0..2]`, `m [2..4]`, `qs [4..20]`: w = d * q + m                        |
//! | Q5_0 | 22    | `d [0..2]`, `qh: u32 [2..6]`, `qs [6..22]`: w = d * (q - 16)               |
//! | Q5_1 | 24    | `d [0..2]`, `m [2..4]`, `qh [4..8]`, `qs [8..24]`: w = d * q + m           |
//! | Q8_0 | 34    | `d [0..2]`, `qs: i8 [2..34]`: w = d * q                                    |
//! | Q4_K | 144   | `d [0..2]`, `dmin [2..4]`, `scales [4..16]` (8 x 6-bit scale+min), `qs [16..144]` |
//! | Q5_K | 176   | as Q4_K, then `qh [16..48]` (bit `2j` / `2j + 1` of byte `l`: fifth bit of weight `l` of sub-blocks `2j` / `2j + 1`), `qs [48..176]` |
//! | Q6_K | 210   | `ql [0..128]`, `qh [128..192]`, `scales: i8 [192..208]`, `d [208..210]`    |
//! | Q2_K | 84    | `scales [0..16]` (per 16 weights: scale low nibble, min high), `qs [16..80]` (2 bits), `d [80..82]`, `dmin [82..84]`: w = d * sc * q - dmin * m |
//! | Q3_K | 110   | `hmask [0..32]`, `qs [32..96]` (2 low bits), `scales [96..108]` (16 x 6 bits, minus 32), `d [108..110]`: w = d * sc * (q - 4 * !high) |
//! | IQ4_NL | 18  | `d [0..2]`, `qs [2..18]` as Q4_0: w = d * KVALUES_IQ4[q]                   |
//! | IQ4_XS | 136 | `d [0..2]`, `scales_h: u16 [2..4]`, `scales_l [4..8]`, `qs [8..136]` (16 bytes per 32 weights): w = d * (ls - 32) * KVALUES_IQ4[q] |
//!
//! In Q2_K and Q3_K, weight `128 h + 32 k + l` (h in 0..2, k in 0..4, l in 0..32) has its two
//! low bits at bit `2k` of `qs[32 h + l]`; Q3_K's third bit is bit `4 h + k` of `hmask[l]`.
//! Every 16 weights share a scale (Q2_K: and a min) in both.
//!
//! In the 32-weight types, byte `j` of `qs` holds weight `j` in its low nibble and weight
//! `j + 16` in its high nibble; bit `j` of `qh` is the fifth bit of weight `j`.

use crate::ggml_type::{GgmlType, QK_K};
use half::f16;

/// Weights per block of the 32-weight types (Q4_0 ... Q8_0) and of our activation Q8 format.
pub const QK: usize = 32;

/// The 16 values an IQ4_NL / IQ4_XS nibble stands for (ggml's `kvalues_iq4nl`).
pub const KVALUES_IQ4: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// Quant of weight `i` (0..256) of a Q2_K block `b`, in 0..4.
#[inline(always)]
pub(crate) fn q2_k_value(b: &[u8], i: usize) -> i32 {
    let (h, k, l) = (i / 128, (i % 128) / 32, i % 32);
    ((b[16 + 32 * h + l] >> (2 * k)) & 3) as i32
}

/// Signed quant of weight `i` (0..256) of a Q3_K block `b`, in -4..4.
#[inline(always)]
pub(crate) fn q3_k_value(b: &[u8], i: usize) -> i32 {
    let (h, k, l) = (i / 128, (i % 128) / 32, i % 32);
    let low = ((b[32 + 32 * h + l] >> (2 * k)) & 3) as i32;
    let high = (b[l] >> (i / 32)) & 1;
    low - if high == 1 { 0 } else { 4 }
}

/// Signed scale of 16-weight group `g` (0..16) of a Q3_K block `b` (ggml's 12-byte packing:
/// low nibbles in bytes 0..8, two high bits in bytes 8..12).
#[inline(always)]
pub(crate) fn q3_k_scale(b: &[u8], g: usize) -> i32 {
    let sc = &b[96..108];
    let low = if g < 8 { sc[g] & 0xF } else { sc[g - 8] >> 4 };
    let high = (sc[8 + g % 4] >> (2 * (g / 4))) & 3;
    (low | (high << 4)) as i32 - 32
}

/// Signed scale of 32-weight sub-block `ib` (0..8) of an IQ4_XS block `b`.
#[inline(always)]
pub(crate) fn iq4_xs_scale(b: &[u8], ib: usize) -> i32 {
    let sh = u16::from_le_bytes([b[2], b[3]]);
    let low = (b[4 + ib / 2] >> (4 * (ib % 2))) & 0xF;
    let high = ((sh >> (2 * ib)) & 3) as u8;
    (low | (high << 4)) as i32 - 32
}

/// Quant value of weight `j` (0..32) of IQ4_XS sub-block `ib` of block `b`.
#[inline(always)]
pub(crate) fn iq4_xs_value(b: &[u8], ib: usize, j: usize) -> i32 {
    let q = b[8 + 16 * ib + j % 16];
    let nib = if j < 16 { q & 0xF } else { q >> 4 };
    KVALUES_IQ4[nib as usize] as i32
}

/// An `f16` stored little-endian at `b[at..at + 2]`, as f32.
#[inline(always)]
pub(crate) fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// Scale and min of sub-block `j` (0..8) of a Q4_K block from its 12 packed `scales` bytes
/// (ggml's `get_scale_min_k4`).
#[inline(always)]
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Dequantization (scalar reference; also the non-x86 fallback).
// ---------------------------------------------------------------------------------------------

/// Dequantize one row of `dst.len()` weights of type `ty` from `src` (exactly
/// `ty.row_bytes(dst.len())` bytes). Scalar; `kernels::dequantize_row` may use SIMD instead.
pub fn dequantize_row_scalar(ty: GgmlType, src: &[u8], dst: &mut [f32]) {
    let n = dst.len();
    assert_eq!(
        ty.row_bytes(n),
        Some(src.len()),
        "dequantize_row: {ty:?} row of {n} weights needs a whole number of blocks"
    );
    match ty {
        GgmlType::F32 => {
            for (d, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => {
            for (i, d) in dst.iter_mut().enumerate() {
                *d = f16_at(src, 2 * i);
            }
        }
        GgmlType::BF16 => {
            for (d, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
            }
        }
        GgmlType::Q8_K => {
            for (b, y) in src
                .chunks_exact(ty.type_size())
                .zip(dst.chunks_exact_mut(QK_K))
            {
                let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                for (yi, &q) in y.iter_mut().zip(&b[4..4 + QK_K]) {
                    *yi = d * q as i8 as f32;
                }
            }
        }
        GgmlType::Q4_K => {
            for (b, y) in src
                .chunks_exact(ty.type_size())
                .zip(dst.chunks_exact_mut(QK_K))
            {
                dequant_block_q45_k(b, y, false);
            }
        }
        GgmlType::Q5_K => {
            for (b, y) in src
                .chunks_exact(ty.type_size())
                .zip(dst.chunks_exact_mut(QK_K))
            {
                dequant_block_q45_k(b, y, true);
            }
        }
        GgmlType::Q6_K => {
            for (b, y) in src
                .chunks_exact(ty.type_size())
                .zip(dst.chunks_exact_mut(QK_K))
            {
                dequant_block_q6_k(b, y);
            }
        }
        GgmlType::Q2_K => {
            for (b, y) in src
                .chunks_exact(ty.type_size())
                .zip(dst.chunks_exact_mut(QK_K))
            {
                let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
                for (i, yi) in y.iter_mut().enumerate() {
                    let sc = b[i / 16];
                    let (dl, ml) = (d * (sc & 0xF) as f32, dmin * (sc >> 4) as f32);
                    *yi = dl * q2_k_value(b, i) as f32 - ml;
                }
            }
        }
        GgmlType::Q3_K => {
            for (b, y) in src
                .chunks_exact(ty.type_size())
                .zip(dst.chunks_exact_mut(QK_K))
            {
                let d = f16_at(b, 108);
                for (i, yi) in y.iter_mut().enumerate() {
                    *yi = d * q3_k_scale(b, i / 16) as f32 * q3_k_value(b, i) as f32;
                }
            }
        }
        GgmlType::IQ4_XS => {
            for (b, y) in src
                .chunks_exact(ty.type_size())
                .zip(dst.chunks_exact_mut(QK_K))
            {
                let d = f16_at(b, 0);
                for (ib, y) in y.chunks_exact_mut(QK).enumerate() {
                    let dl = d * iq4_xs_scale(b, ib) as f32;
                    for (j, yj) in y.iter_mut().enumerate() {
                        *yj = dl * iq4_xs_value(b, ib, j) as f32;
                    }
                }
            }
        }
        GgmlType::Q4_0
        | GgmlType::Q4_1
        | GgmlType::Q5_0
        | GgmlType::Q5_1
        | GgmlType::Q8_0
        | GgmlType::IQ4_NL => {
            for (b, y) in src
                .chunks_exact(ty.type_size())
                .zip(dst.chunks_exact_mut(QK))
            {
                dequant_block_32(ty, b, y);
            }
        }
    }
}

/// The 32 integer quants of one block of a 32-weight type, and (d, m) such that the weights are
/// `d * v + m` (exactly so for Q4_1/Q5_1/Q8_0; for Q4_0/Q5_0, m = -8d / -16d, one rounding off
/// ggml's `d * (v - 8)`).
#[inline(always)]
pub(crate) fn block_32_values(ty: GgmlType, b: &[u8], v: &mut [i32; QK]) -> (f32, f32) {
    let d = f16_at(b, 0);
    let nibbles = |qs: &[u8], v: &mut [i32; QK]| {
        for j in 0..16 {
            v[j] = (qs[j] & 0xF) as i32;
            v[j + 16] = (qs[j] >> 4) as i32;
        }
    };
    let high_bits = |qh: u32, v: &mut [i32; QK]| {
        for (j, vj) in v.iter_mut().enumerate() {
            *vj |= (((qh >> j) & 1) << 4) as i32;
        }
    };
    let qh_at = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    match ty {
        GgmlType::Q4_0 => {
            nibbles(&b[2..18], v);
            (d, -8.0 * d)
        }
        GgmlType::Q4_1 => {
            nibbles(&b[4..20], v);
            (d, f16_at(b, 2))
        }
        GgmlType::Q5_0 => {
            nibbles(&b[6..22], v);
            high_bits(qh_at(2), v);
            (d, -16.0 * d)
        }
        GgmlType::Q5_1 => {
            nibbles(&b[8..24], v);
            high_bits(qh_at(4), v);
            (d, f16_at(b, 2))
        }
        GgmlType::Q8_0 => {
            for (vj, &q) in v.iter_mut().zip(&b[2..34]) {
                *vj = q as i8 as i32;
            }
            (d, 0.0)
        }
        GgmlType::IQ4_NL => {
            nibbles(&b[2..18], v);
            for vj in v.iter_mut() {
                *vj = KVALUES_IQ4[*vj as usize] as i32;
            }
            (d, 0.0)
        }
        _ => unreachable!("{ty:?} is not a 32-weight block type"),
    }
}

/// Dequantize one block of a 32-weight type exactly as ggml's `dequantize_row_*` does.
fn dequant_block_32(ty: GgmlType, b: &[u8], y: &mut [f32]) {
    let mut v = [0i32; QK];
    let (d, m) = block_32_values(ty, b, &mut v);
    let offset = match ty {
        GgmlType::Q4_0 => 8,
        GgmlType::Q5_0 => 16,
        _ => 0,
    };
    let has_min = matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1);
    for (yi, &vi) in y.iter_mut().zip(&v) {
        *yi = if has_min {
            vi as f32 * d + m
        } else {
            (vi - offset) as f32 * d
        };
    }
}

/// ggml's `dequantize_row_q4_K` (`five` false) / `dequantize_row_q5_K`: per pair of 32-weight
/// sub-blocks, the low and high nibbles of 32 bytes, Q5_K or-ing in a fifth bit from `qh`
/// (bit `2j` / `2j + 1` of byte `l`).
fn dequant_block_q45_k(b: &[u8], y: &mut [f32], five: bool) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let (qh, qs) = if five {
        (&b[16..48], &b[48..176])
    } else {
        (&[0u8; 32][..], &b[16..144])
    };
    for (j, (q, y)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * j, scales);
        let (sc2, m2) = scale_min_k4(2 * j + 1, scales);
        let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
        for l in 0..32 {
            let (h1, h2) = ((qh[l] >> (2 * j)) & 1, (qh[l] >> (2 * j + 1)) & 1);
            y[l] = d1 * ((q[l] & 0xF) | h1 << 4) as f32 - m1;
            y[l + 32] = d2 * ((q[l] >> 4) | h2 << 4) as f32 - m2;
        }
    }
}

/// Weight `l + 32 * k` (k in 0..4, l in 0..32) of one 128-weight half of a Q6_K block, in
/// 0..64 (subtract 32 for the signed value). `ql` is the half's 64 bytes, `qh` its 32.
#[inline(always)]
pub(crate) fn q6_k_value(ql: &[u8], qh: &[u8], l: usize, k: usize) -> i32 {
    let lo = match k {
        0 => ql[l] & 0xF,
        1 => ql[l + 32] & 0xF,
        2 => ql[l] >> 4,
        _ => ql[l + 32] >> 4,
    };
    (lo | (((qh[l] >> (2 * k)) & 3) << 4)) as i32
}

fn dequant_block_q6_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 208);
    for half in 0..2 {
        let ql = &b[64 * half..64 * half + 64];
        let qh = &b[128 + 32 * half..128 + 32 * half + 32];
        let sc = &b[192 + 8 * half..192 + 8 * half + 8];
        let y = &mut y[128 * half..128 * half + 128];
        for l in 0..32 {
            for k in 0..4 {
                let q = q6_k_value(ql, qh, l, k) - 32;
                y[l + 32 * k] = d * (sc[l / 16 + 2 * k] as i8 as f32) * q as f32;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Activation quantization.
// ---------------------------------------------------------------------------------------------

/// Activations quantized to 8 bits in blocks of 32, for the 32-weight types (ggml's Q8_0/Q8_1,
/// kept as separate arrays so kernels can read the scales of several tokens cheaply).
///
/// # Invariants
/// `qs.len() == n_tokens * nb * 32`, `d.len() == s.len() == n_tokens * nb`; token `t` owns
/// blocks `t * nb .. (t + 1) * nb`; value = `d * qs`; `s[i] == d[i] * sum(qs of block i)`.
#[derive(Default)]
pub struct Q8Acts {
    /// Blocks per token (`cols / 32`).
    pub nb: usize,
    /// Quants, `[n_tokens][nb][32]`.
    pub qs: Vec<i8>,
    /// Block scales, `[n_tokens][nb]`.
    pub d: Vec<f32>,
    /// Block sums times scale, `[n_tokens][nb]` (for the offsets / mins of Q4_0 ... Q5_1).
    pub s: Vec<f32>,
    /// `s` transposed, `[nb][n_tokens]`: the SIMD tile kernels compute the min corrections of a
    /// row for all tokens at once from it (filled by `kernels::matmul`, not by `resize`).
    pub st: Vec<f32>,
}

impl Q8Acts {
    /// Reshape (reusing capacity) for `n_tokens` tokens of `cols` values.
    pub fn resize(&mut self, n_tokens: usize, cols: usize) {
        debug_assert!(
            cols.is_multiple_of(QK),
            "Q8 activations need cols % 32 == 0, got {cols}"
        );
        self.nb = cols / QK;
        self.qs.resize(n_tokens * cols, 0);
        self.d.resize(n_tokens * self.nb, 0.0);
        self.s.resize(n_tokens * self.nb, 0.0);
        self.st.resize(n_tokens * self.nb, 0.0);
    }

    /// Fill `st` from `s` (`n_tokens` tokens).
    pub fn transpose_sums(&mut self, n_tokens: usize) {
        let nb = self.nb;
        self.st.resize(n_tokens * nb, 0.0);
        for (t, st) in self.s.chunks_exact(nb).take(n_tokens).enumerate() {
            for (b, &v) in st.iter().enumerate() {
                self.st[b * n_tokens + t] = v;
            }
        }
    }

    /// Quantize token `t` from `x` (cols values) with the scalar code.
    pub fn quantize_token_scalar(&mut self, t: usize, x: &[f32], q8_1: bool) {
        let nb = self.nb;
        let qs = &mut self.qs[t * nb * QK..(t + 1) * nb * QK];
        let d = &mut self.d[t * nb..(t + 1) * nb];
        let s = &mut self.s[t * nb..(t + 1) * nb];
        quantize_q8_scalar(x, qs, d, s, q8_1);
    }
}

/// Quantize `x` (nb * 32 values) into `qs` with one scale per 32 values exactly as llama.cpp's
/// `quantize_row_q8_0` / `quantize_row_q8_1` do, so both engines multiply the same numbers:
/// `q = round_ties_even(x * 127 / amax)`, the scale stored rounded to f16 (`d = f16(amax / 127)`),
/// and the block sum `s = d * sum(q)` (Q8_0 users: exact, for the min corrections of Q4_0/Q5_0)
/// or, with `q8_1`, `s = f16(amax / 127 * sum(q))` as ggml's `block_q8_1` stores it (Q4_1/Q5_1).
/// The AVX2 version computes bit-identical results.
pub fn quantize_q8_scalar(x: &[f32], qs: &mut [i8], d: &mut [f32], s: &mut [f32], q8_1: bool) {
    for ((xb, qb), (db, sb)) in x
        .chunks_exact(QK)
        .zip(qs.chunks_exact_mut(QK))
        .zip(d.iter_mut().zip(s.iter_mut()))
    {
        let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let dd = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in qb.iter_mut().zip(xb) {
            let r = (v * id).round_ties_even() as i32;
            *q = r as i8;
            sum += r;
        }
        (*db, *sb) = q8_scales(dd, sum, q8_1);
    }
}

/// The stored scale and block sum of a Q8 block with f32 scale `dd` and quant sum `sum`.
#[inline]
pub(crate) fn q8_scales(dd: f32, sum: i32, q8_1: bool) -> (f32, f32) {
    let d16 = f16::from_f32(dd).to_f32();
    let s = if q8_1 {
        f16::from_f32(dd * sum as f32).to_f32()
    } else {
        d16 * sum as f32
    };
    (d16, s)
}

/// One super-block of activations quantized for the K-quants (ggml's `block_q8_K`, but with a
/// symmetric scale `d = amax / 127` so quants stay in -127..=127).
#[derive(Clone, Copy)]
#[repr(C)]
pub struct BlockQ8K {
    /// Scale.
    pub d: f32,
    /// Quants.
    pub qs: [i8; QK_K],
    /// Sum of each group of 16 quants.
    pub bsums: [i16; QK_K / 16],
}

impl BlockQ8K {
    /// All zero.
    pub const ZERO: Self = Self {
        d: 0.0,
        qs: [0; QK_K],
        bsums: [0; QK_K / 16],
    };
}

/// `x.round_ties_even() as i32` for |x| < 2^22 (llama.cpp's `nearest_int`; no libm call).
#[inline(always)]
fn nearest_int(x: f32) -> i32 {
    let v = x + 12582912.0;
    (v.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// Quantize `x` (a multiple of 256 values) into `out` (one block per 256) exactly as llama.cpp's
/// `quantize_row_q8_K_ref`: the scale comes from the value of largest magnitude *with its sign*
/// (`iscale = -127 / max`, so `d = 1 / iscale` may be negative), `q = min(127, round(iscale * x))`.
pub fn quantize_q8_k(x: &[f32], out: &mut [BlockQ8K]) {
    for (xb, blk) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        let (mut amax, mut max) = (0.0f32, 0.0f32);
        for &v in xb {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            *blk = BlockQ8K::ZERO;
            continue;
        }
        let iscale = -127.0 / max;
        for (q, &v) in blk.qs.iter_mut().zip(xb) {
            *q = nearest_int(iscale * v).min(127) as i8;
        }
        for (g, bs) in blk.bsums.iter_mut().enumerate() {
            *bs = blk.qs[16 * g..16 * g + 16].iter().map(|&q| q as i16).sum();
        }
        blk.d = 1.0 / iscale;
    }
}

// ---------------------------------------------------------------------------------------------
// Scalar dot products: one weight row against one quantized token. These define the results;
// the SIMD kernels must agree up to float rounding.
// ---------------------------------------------------------------------------------------------

/// Dot of a row of a 32-weight type (`row`: nb blocks) with token activations
/// (`qs`: nb * 32, `d`, `s`: nb).
pub fn dot_q8_scalar(ty: GgmlType, row: &[u8], qs: &[i8], d: &[f32], s: &[f32]) -> f32 {
    let bs = ty.type_size();
    let mut v = [0i32; QK];
    let mut sum = 0.0f32;
    for (b, blk) in row.chunks_exact(bs).enumerate() {
        let (dw, mw) = block_32_values(ty, blk, &mut v);
        let y = &qs[b * QK..(b + 1) * QK];
        let isum: i32 = v.iter().zip(y).map(|(&a, &b)| a * b as i32).sum();
        sum += dw * d[b] * isum as f32 + mw * s[b];
    }
    sum
}

/// Dot of a Q4_K row with Q8_K activations.
pub fn dot_q4_k_scalar(row: &[u8], act: &[BlockQ8K]) -> f32 {
    dot_q45_k_scalar(row, act, false)
}

/// Dot of a Q5_K row with Q8_K activations.
pub fn dot_q5_k_scalar(row: &[u8], act: &[BlockQ8K]) -> f32 {
    dot_q45_k_scalar(row, act, true)
}

/// Q4_K / Q5_K (`five`) . Q8_K: exact integer sums per block, then `d * isum - dmin * msum`.
fn dot_q45_k_scalar(row: &[u8], act: &[BlockQ8K], five: bool) -> f32 {
    let ty = if five { GgmlType::Q5_K } else { GgmlType::Q4_K };
    let qs_at = if five { 48 } else { 16 };
    let mut sum = 0.0f32;
    for (b, y) in row.chunks_exact(ty.type_size()).zip(act) {
        let (d, dmin) = (f16_at(b, 0) * y.d, f16_at(b, 2) * y.d);
        let scales = &b[4..16];
        let (mut isum, mut msum) = (0i32, 0i32);
        for j in 0..8 {
            let (sc, m) = scale_min_k4(j, scales);
            let q = &b[qs_at + 32 * (j / 2)..qs_at + 32 * (j / 2) + 32];
            let ys = &y.qs[32 * j..32 * j + 32];
            let dot: i32 = (0..32)
                .map(|l| {
                    let lo = if j % 2 == 0 { q[l] & 0xF } else { q[l] >> 4 };
                    let hi = if five { ((b[16 + l] >> j) & 1) << 4 } else { 0 };
                    (lo | hi) as i32 * ys[l] as i32
                })
                .sum();
            isum += sc as i32 * dot;
            msum += m as i32 * (y.bsums[2 * j] as i32 + y.bsums[2 * j + 1] as i32);
        }
        sum += d * isum as f32 - dmin * msum as f32;
    }
    sum
}

/// Dot of a Q6_K row with Q8_K activations.
pub fn dot_q6_k_scalar(row: &[u8], act: &[BlockQ8K]) -> f32 {
    let mut sum = 0.0f32;
    for (b, y) in row.chunks_exact(GgmlType::Q6_K.type_size()).zip(act) {
        let d = f16_at(b, 208) * y.d;
        let mut isum = 0i32;
        for half in 0..2 {
            let ql = &b[64 * half..64 * half + 64];
            let qh = &b[128 + 32 * half..128 + 32 * half + 32];
            let sc = &b[192 + 8 * half..192 + 8 * half + 8];
            let ys = &y.qs[128 * half..128 * half + 128];
            for l in 0..32 {
                for k in 0..4 {
                    let q = q6_k_value(ql, qh, l, k) - 32;
                    isum += sc[l / 16 + 2 * k] as i8 as i32 * q * ys[l + 32 * k] as i32;
                }
            }
        }
        sum += d * isum as f32;
    }
    sum
}

/// Dot of a Q2_K row with Q8_K activations: per block `d * isum - dmin * msum` (llama.cpp's
/// `vec_dot_q2_K_q8_K`), the mins against the activations' 16-value sums.
pub fn dot_q2_k_scalar(row: &[u8], act: &[BlockQ8K]) -> f32 {
    let mut sum = 0.0f32;
    for (b, y) in row.chunks_exact(GgmlType::Q2_K.type_size()).zip(act) {
        let (d, dmin) = (f16_at(b, 80) * y.d, f16_at(b, 82) * y.d);
        let (mut isum, mut msum) = (0i32, 0i32);
        for g in 0..16 {
            let dot: i32 = (16 * g..16 * g + 16)
                .map(|i| q2_k_value(b, i) * y.qs[i] as i32)
                .sum();
            isum += (b[g] & 0xF) as i32 * dot;
            msum += (b[g] >> 4) as i32 * y.bsums[g] as i32;
        }
        sum += d * isum as f32 - dmin * msum as f32;
    }
    sum
}

/// Dot of a Q3_K row with Q8_K activations.
pub fn dot_q3_k_scalar(row: &[u8], act: &[BlockQ8K]) -> f32 {
    let mut sum = 0.0f32;
    for (b, y) in row.chunks_exact(GgmlType::Q3_K.type_size()).zip(act) {
        let d = f16_at(b, 108) * y.d;
        let mut isum = 0i32;
        for g in 0..16 {
            let dot: i32 = (16 * g..16 * g + 16)
                .map(|i| q3_k_value(b, i) * y.qs[i] as i32)
                .sum();
            isum += q3_k_scale(b, g) * dot;
        }
        sum += d * isum as f32;
    }
    sum
}

/// Dot of an IQ4_XS row with Q8_K activations.
pub fn dot_iq4_xs_scalar(row: &[u8], act: &[BlockQ8K]) -> f32 {
    let mut sum = 0.0f32;
    for (b, y) in row.chunks_exact(GgmlType::IQ4_XS.type_size()).zip(act) {
        let d = f16_at(b, 0) * y.d;
        let mut isum = 0i32;
        for ib in 0..8 {
            let dot: i32 = (0..32)
                .map(|j| iq4_xs_value(b, ib, j) * y.qs[32 * ib + j] as i32)
                .sum();
            isum += iq4_xs_scale(b, ib) * dot;
        }
        sum += d * isum as f32;
    }
    sum
}
