//! x86-64 SIMD kernels (AVX2 + FMA + F16C, optionally AVX-512 VNNI on 256-bit vectors).
//!
//! Everything here is `unsafe`: callers (`kernels::matmul`) check the CPU features once
//! (`kernels::simd`) and pass in-bounds pointers. Each kernel has a scalar twin in `quant.rs`
//! that the tests compare it against.
//!
//! The 32-weight types all go through one tile kernel, [`q32_tile`]: every weight block is
//! unpacked to 32 *unsigned* bytes `u` with `w = d * u + m` (Q4_0: m = -8d, Q5_0: m = -16d,
//! Q4_1/Q5_1: their min, Q8_0 with VNNI: u = q ^ 0x80 and m = -128d), multiplied with the signed
//! activation bytes by `maddubs` (or VNNI `dpbusd`), scaled by `d_w * d_y` and accumulated in f32.
//! The `m * sum(y)` part is separable: it is one short f32 dot per (row, token) over the blocks'
//! `m` and the activations' `s = d_y * sum(q_y)`, done once at the end of a row.
//! Q8_0 without VNNI keeps its signed quants and uses the `sign` trick (`maddubs` would
//! saturate on u8 values up to 255).
//!
//! Batch invariance: the decode kernel ([`q32_dot_rows`], one token) and the tile kernel
//! ([`q32_tile`] + [`min_corrections`], many tokens) compute each (row, token) result with the
//! same sequence of operations: the same per-block `d_w * d_y` product and FMA into the same
//! 8 lanes, block by block, the same horizontal sum, and the `m * s` corrections as one running
//! sum in block order, added last. So a token's output bits do not depend on how many tokens or
//! rows are computed together, nor on the threads (the tests check this bitwise).

// Tiles index several per-row / per-token arrays with the same loop variable.
#![allow(clippy::needless_range_loop)]
use std::arch::x86_64::*;

use super::matmul::OutPtr;
use super::quant::{Q8Acts, QK};
use crate::ggml_type::GgmlType;

// ---------------------------------------------------------------------------------------------
// Small helpers (always inlined into a `#[target_feature]` caller).
// ---------------------------------------------------------------------------------------------

#[inline(always)]
pub(super) unsafe fn hsum_ps(x: __m256) -> f32 {
    let r = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
    let r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    let r = _mm_add_ss(r, _mm_movehdup_ps(r));
    _mm_cvtss_f32(r)
}

#[inline(always)]
unsafe fn hsum_epi32(x: __m256i) -> i32 {
    let r = _mm_add_epi32(_mm256_extracti128_si256(x, 1), _mm256_castsi256_si128(x));
    let r = _mm_add_epi32(r, _mm_unpackhi_epi64(r, r));
    let r = _mm_add_epi32(r, _mm_shuffle_epi32(r, 0b10_11_00_01));
    _mm_cvtsi128_si32(r)
}

/// `f16` bits at `p` (unaligned) as f32, with F16C.
#[inline(always)]
pub(super) unsafe fn f16_at(p: *const u8) -> f32 {
    let bits = (p as *const u16).read_unaligned();
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// 16 bytes at `p` as 32 nibbles: byte j of the result = low nibble of p[j] (j < 16) or high
/// nibble of p[j - 16].
#[inline(always)]
pub(super) unsafe fn nibbles_32(p: *const u8) -> __m256i {
    let v = _mm_loadu_si128(p as *const __m128i);
    let both = _mm256_set_m128i(_mm_srli_epi16(v, 4), v);
    _mm256_and_si256(both, _mm256_set1_epi8(0xF))
}

/// The 32 bits at `p` as 32 bytes: 0x10 where the bit is set, else 0.
#[inline(always)]
unsafe fn bits_32_as_0x10(p: *const u8) -> __m256i {
    let x = (p as *const u32).read_unaligned();
    let shuf = _mm256_set_epi64x(
        0x0303030303030303,
        0x0202020202020202,
        0x0101010101010101,
        0x0000000000000000,
    );
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(x as i32), shuf);
    let bit = _mm256_set1_epi64x(0x8040201008040201u64 as i64);
    let set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit);
    _mm256_and_si256(set, _mm256_set1_epi8(0x10))
}

/// f32 dot of `n` values at two pointers.
#[inline(always)]
pub(super) unsafe fn dot_f32_ptr(a: *const f32, b: *const f32, n: usize) -> f32 {
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (k, acc) in acc.iter_mut().enumerate() {
            let x = _mm256_loadu_ps(a.add(i + 8 * k));
            *acc = _mm256_fmadd_ps(x, _mm256_loadu_ps(b.add(i + 8 * k)), *acc);
        }
        i += 32;
    }
    while i + 8 <= n {
        acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(i)), _mm256_loadu_ps(b.add(i)), acc[0]);
        i += 8;
    }
    let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut sum = hsum_ps(s);
    while i < n {
        sum += *a.add(i) * *b.add(i);
        i += 1;
    }
    sum
}

// ---------------------------------------------------------------------------------------------
// Small f32 helpers for attention.
// ---------------------------------------------------------------------------------------------

#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    dot_f32_ptr(a.as_ptr(), b.as_ptr(), a.len().min(b.len()))
}

#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn axpy_f32(alpha: f32, x: &[f32], y: &mut [f32]) {
    let n = x.len().min(y.len());
    let (xp, yp) = (x.as_ptr(), y.as_mut_ptr());
    let va = _mm256_set1_ps(alpha);
    let mut i = 0;
    while i + 8 <= n {
        let v = _mm256_fmadd_ps(va, _mm256_loadu_ps(xp.add(i)), _mm256_loadu_ps(yp.add(i)));
        _mm256_storeu_ps(yp.add(i), v);
        i += 8;
    }
    while i < n {
        *yp.add(i) += alpha * *xp.add(i);
        i += 1;
    }
}

/// `a · b` with `b` in f16, widened in registers: the same operations as [`dot_f32_ptr`] on the
/// widened values (the widening is exact), so the result is bit-identical to `dot_f32`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_f32_f16(a: &[f32], b: &[half::f16]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (a.as_ptr(), b.as_ptr() as *const u16);
    let ld = |p: *const u16| _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (k, acc) in acc.iter_mut().enumerate() {
            let x = _mm256_loadu_ps(a.add(i + 8 * k));
            *acc = _mm256_fmadd_ps(x, ld(b.add(i + 8 * k)), *acc);
        }
        i += 32;
    }
    while i + 8 <= n {
        acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(i)), ld(b.add(i)), acc[0]);
        i += 8;
    }
    let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut sum = hsum_ps(s);
    while i < n {
        sum += *a.add(i) * half::f16::from_bits(*b.add(i)).to_f32();
        i += 1;
    }
    sum
}

/// `y[i] += alpha * x[i]` with `x` in f16 (bit-identical to `axpy_f32` on the widened `x`).
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn axpy_f16(alpha: f32, x: &[half::f16], y: &mut [f32]) {
    let n = x.len().min(y.len());
    let (xp, yp) = (x.as_ptr() as *const u16, y.as_mut_ptr());
    let va = _mm256_set1_ps(alpha);
    let mut i = 0;
    while i + 8 <= n {
        let xv = _mm256_cvtph_ps(_mm_loadu_si128(xp.add(i) as *const __m128i));
        let v = _mm256_fmadd_ps(va, xv, _mm256_loadu_ps(yp.add(i)));
        _mm256_storeu_ps(yp.add(i), v);
        i += 8;
    }
    while i < n {
        *yp.add(i) += alpha * half::f16::from_bits(*xp.add(i)).to_f32();
        i += 1;
    }
}

/// `out[r] = q · rows[r]` for `out.len()` rows of `hd` f16 (one block of keys): each exactly
/// [`dot_f32_f16`], without a dispatch per row.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_f16_rows(q: &[f32], rows: &[half::f16], hd: usize, out: &mut [f32]) {
    for (r, o) in out.iter_mut().enumerate() {
        *o = dot_f32_f16(q, &rows[r * hd..(r + 1) * hd]);
    }
}

/// `y += probs[r] * rows[r]` for each row in order (one block of values), `y` kept in registers
/// across rows. Per lane this is the same fused multiply-add sequence as calling [`axpy_f16`]
/// row after row, so the result is bit-identical.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn axpy_f16_rows(probs: &[f32], rows: &[half::f16], hd: usize, y: &mut [f32]) {
    let n = hd.min(y.len());
    debug_assert!(rows.len() >= probs.len() * hd, "rows shorter than probs");
    let (xp, yp) = (rows.as_ptr() as *const u16, y.as_mut_ptr());
    let mut i = 0;
    while i + 8 <= n {
        let mut acc = _mm256_loadu_ps(yp.add(i));
        for (r, &p) in probs.iter().enumerate() {
            let xv = _mm256_cvtph_ps(_mm_loadu_si128(xp.add(r * hd + i) as *const __m128i));
            acc = _mm256_fmadd_ps(_mm256_set1_ps(p), xv, acc);
        }
        _mm256_storeu_ps(yp.add(i), acc);
        i += 8;
    }
    while i < n {
        for (r, &p) in probs.iter().enumerate() {
            *yp.add(i) += p * half::f16::from_bits(*xp.add(r * hd + i)).to_f32();
        }
        i += 1;
    }
}

/// F16 row -> f32.
#[target_feature(enable = "avx2,f16c")]
pub(crate) unsafe fn f16_to_f32_row(src: &[u8], dst: &mut [f32]) {
    let n = dst.len().min(src.len() / 2);
    let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
    let mut i = 0;
    while i + 8 <= n {
        let h = _mm_loadu_si128(s.add(2 * i) as *const __m128i);
        _mm256_storeu_ps(d.add(i), _mm256_cvtph_ps(h));
        i += 8;
    }
    while i < n {
        *d.add(i) = f16_at(s.add(2 * i));
        i += 1;
    }
}

// ---------------------------------------------------------------------------------------------
// Activation quantization (bit-identical to `quant::quantize_q8_scalar`).
// ---------------------------------------------------------------------------------------------

#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn quantize_q8(
    x: &[f32],
    qs: &mut [i8],
    d: &mut [f32],
    s: &mut [f32],
    q8_1: bool,
) {
    let nb = x.len() / QK;
    assert!(qs.len() >= nb * QK && d.len() >= nb && s.len() >= nb);
    let sign = _mm256_set1_ps(-0.0);
    for b in 0..nb {
        let p = x.as_ptr().add(b * QK);
        let v = [
            _mm256_loadu_ps(p),
            _mm256_loadu_ps(p.add(8)),
            _mm256_loadu_ps(p.add(16)),
            _mm256_loadu_ps(p.add(24)),
        ];
        let mut m = _mm256_andnot_ps(sign, v[0]);
        for vk in &v[1..] {
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, *vk));
        }
        let m4 = _mm_max_ps(_mm256_extractf128_ps(m, 1), _mm256_castps256_ps128(m));
        let m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        let amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
        let dd = amax / 127.0;
        let id = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
        const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
        let i: [__m256i; 4] =
            v.map(|vk| _mm256_cvtps_epi32(_mm256_round_ps::<NEAREST>(_mm256_mul_ps(vk, id))));
        let sum = hsum_epi32(_mm256_add_epi32(
            _mm256_add_epi32(i[0], i[1]),
            _mm256_add_epi32(i[2], i[3]),
        ));
        let p01 = _mm256_packs_epi32(i[0], i[1]);
        let p23 = _mm256_packs_epi32(i[2], i[3]);
        let packed = _mm256_packs_epi16(p01, p23);
        let packed = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(qs.as_mut_ptr().add(b * QK) as *mut __m256i, packed);
        (d[b], s[b]) = super::quant::q8_scales(dd, sum, q8_1);
    }
}

// ---------------------------------------------------------------------------------------------
// 32-weight block types.
// ---------------------------------------------------------------------------------------------

/// How to unpack one block of a 32-weight type.
pub(crate) trait Block32 {
    /// Bytes per block.
    const BYTES: usize;
    /// Quants are signed bytes (Q8_0) rather than small unsigned values.
    const SIGNED: bool;
    /// The block stores its min `m` as an f16 right after `d` (Q4_1, Q5_1); otherwise
    /// m = -OFFSET * d.
    const HAS_MIN: bool;
    /// See `HAS_MIN`.
    const OFFSET: f32;
    /// The 32 quants of the block at `p`: u8 values, or i8 when `SIGNED`.
    unsafe fn quants(p: *const u8) -> __m256i;
    /// (d, m) with `w = d * u + m` for the unsigned quants `u` (for `SIGNED`: m = 0, and the
    /// caller adds the -128d of the `^ 0x80` trick itself).
    unsafe fn scale_min(p: *const u8) -> (f32, f32);
}

pub(crate) struct Q4_0;
pub(crate) struct Q4_1;
pub(crate) struct Q5_0;
pub(crate) struct Q5_1;
pub(crate) struct Q8_0;
#[allow(non_camel_case_types)] // ggml's name
pub(crate) struct IQ4_NL;

impl Block32 for Q4_0 {
    const HAS_MIN: bool = false;
    const OFFSET: f32 = 8.0;
    const BYTES: usize = 18;
    const SIGNED: bool = false;
    #[inline(always)]
    unsafe fn quants(p: *const u8) -> __m256i {
        nibbles_32(p.add(2))
    }
    #[inline(always)]
    unsafe fn scale_min(p: *const u8) -> (f32, f32) {
        let d = f16_at(p);
        (d, -8.0 * d)
    }
}

impl Block32 for Q4_1 {
    const HAS_MIN: bool = true;
    const OFFSET: f32 = 0.0;
    const BYTES: usize = 20;
    const SIGNED: bool = false;
    #[inline(always)]
    unsafe fn quants(p: *const u8) -> __m256i {
        nibbles_32(p.add(4))
    }
    #[inline(always)]
    unsafe fn scale_min(p: *const u8) -> (f32, f32) {
        (f16_at(p), f16_at(p.add(2)))
    }
}

impl Block32 for Q5_0 {
    const HAS_MIN: bool = false;
    const OFFSET: f32 = 16.0;
    const BYTES: usize = 22;
    const SIGNED: bool = false;
    #[inline(always)]
    unsafe fn quants(p: *const u8) -> __m256i {
        _mm256_or_si256(nibbles_32(p.add(6)), bits_32_as_0x10(p.add(2)))
    }
    #[inline(always)]
    unsafe fn scale_min(p: *const u8) -> (f32, f32) {
        let d = f16_at(p);
        (d, -16.0 * d)
    }
}

impl Block32 for Q5_1 {
    const HAS_MIN: bool = true;
    const OFFSET: f32 = 0.0;
    const BYTES: usize = 24;
    const SIGNED: bool = false;
    #[inline(always)]
    unsafe fn quants(p: *const u8) -> __m256i {
        _mm256_or_si256(nibbles_32(p.add(8)), bits_32_as_0x10(p.add(4)))
    }
    #[inline(always)]
    unsafe fn scale_min(p: *const u8) -> (f32, f32) {
        (f16_at(p), f16_at(p.add(2)))
    }
}

impl Block32 for Q8_0 {
    const HAS_MIN: bool = false;
    const OFFSET: f32 = 0.0;
    const BYTES: usize = 34;
    const SIGNED: bool = true;
    #[inline(always)]
    unsafe fn quants(p: *const u8) -> __m256i {
        _mm256_loadu_si256(p.add(2) as *const __m256i)
    }
    #[inline(always)]
    unsafe fn scale_min(p: *const u8) -> (f32, f32) {
        (f16_at(p), 0.0)
    }
}

impl Block32 for IQ4_NL {
    const HAS_MIN: bool = false;
    const OFFSET: f32 = 0.0;
    const BYTES: usize = 18;
    const SIGNED: bool = true;
    /// The nibbles (Q4_0's layout) looked up in `KVALUES_IQ4`: signed quants, as Q8_0's.
    #[inline(always)]
    unsafe fn quants(p: *const u8) -> __m256i {
        let table = _mm256_broadcastsi128_si256(_mm_loadu_si128(
            super::quant::KVALUES_IQ4.as_ptr() as *const __m128i,
        ));
        _mm256_shuffle_epi8(table, nibbles_32(p.add(2)))
    }
    #[inline(always)]
    unsafe fn scale_min(p: *const u8) -> (f32, f32) {
        (f16_at(p), 0.0)
    }
}

/// Lanes (d, m, _, _) of the block at `p` (for Q8_0 with VNNI, m = -128d: see `q32_tile`).
#[inline(always)]
unsafe fn scale_min_vec<B: Block32, const VNNI: bool>(p: *const u8) -> __m128 {
    if B::HAS_MIN {
        _mm_cvtph_ps(_mm_cvtsi32_si128((p as *const i32).read_unaligned()))
    } else {
        let off = if B::SIGNED {
            if VNNI {
                128.0
            } else {
                0.0
            }
        } else {
            B::OFFSET
        };
        let d = _mm_cvtph_ps(_mm_set1_epi16((p as *const i16).read_unaligned()));
        _mm_mul_ps(d, _mm_setr_ps(1.0, -off, 0.0, 0.0))
    }
}

/// Decode: `R` weight rows . one token (quants `yq`, block scales `yd`, block sums `ys`).
/// Scales and mins are read inline: `(d_w, m_w) * (d_y, s_y)` in one 128-bit multiply gives
/// both the block's scale and its min correction. By far the most time of decoding is spent
/// here (memory-bound on large matrices).
#[inline(always)]
pub(super) unsafe fn q32_dot_rows<B: Block32, const VNNI: bool, const R: usize>(
    nb: usize,
    w: [*const u8; R],
    pf: usize,
    yq: *const i8,
    yd: *const f32,
    ys: *const f32,
) -> [f32; R] {
    let mut acc = [_mm256_setzero_ps(); R];
    let mut corr = [_mm_setzero_ps(); R];
    let ones = _mm256_set1_epi16(1);
    for b in 0..nb {
        let y = _mm256_loadu_si256(yq.add(b * QK) as *const __m256i);
        let dys = _mm_setr_ps(*yd.add(b), *ys.add(b), 0.0, 0.0);
        for r in 0..R {
            let p = w[r].add(b * B::BYTES);
            // Prefetch `pf` bytes ahead (see `decode_prefetch_distance`), one line per row
            // every other block. A prefetch never faults, hence `wrapping_add`.
            if b % 2 == 0 {
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(pf) as *const i8);
            }
            let u = B::quants(p);
            let isum = if VNNI {
                let u = if B::SIGNED {
                    _mm256_xor_si256(u, _mm256_set1_epi8(-128))
                } else {
                    u
                };
                _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, y)
            } else if B::SIGNED {
                let dot = _mm256_maddubs_epi16(_mm256_sign_epi8(u, u), _mm256_sign_epi8(y, u));
                _mm256_madd_epi16(dot, ones)
            } else {
                _mm256_madd_epi16(_mm256_maddubs_epi16(u, y), ones)
            };
            let prod = _mm_mul_ps(scale_min_vec::<B, VNNI>(p), dys);
            corr[r] = _mm_add_ps(corr[r], prod);
            acc[r] = _mm256_fmadd_ps(
                _mm256_cvtepi32_ps(isum),
                _mm256_broadcastss_ps(prod),
                acc[r],
            );
        }
    }
    // Q8_0 without VNNI has no min: no correction term (as in the tiles).
    let has_min = !B::SIGNED || VNNI;
    let mut out = [0.0f32; R];
    for r in 0..R {
        out[r] = hsum_ps(acc[r]);
        if has_min {
            out[r] += _mm_cvtss_f32(_mm_movehdup_ps(corr[r]));
        }
    }
    out
}

/// Min corrections of one row for all tokens: `out[t] = sum_b m[b] * s[t][b]` (`st` is
/// `[nb][n_tokens]`, `m` has nb values, `odd` is scratch of n_tokens), summed in exactly the
/// order of the decode kernels so that a token's result does not depend on the batch:
/// `PAIRS = false` (AVX2 `q32_dot_rows`): one running sum in block order; `PAIRS = true`
/// (AVX-512 pair kernels): even and odd blocks in two running sums, added at the end.
/// Each token is an independent lane (vectorized across tokens, no reassociation).
#[inline(always)]
pub(super) fn min_corrections<const PAIRS: bool>(
    m: &[f32],
    st: &[f32],
    out: &mut [f32],
    odd: &mut [f32],
) {
    let n = out.len();
    if n <= 16 {
        // Few tokens (decode batches): the running sums of all tokens in two fixed 16-lane
        // arrays the compiler keeps in vector registers. The loop below would keep them in
        // memory, a store-to-load chain per multiply-add that dominated small batches. Each
        // lane is one token with the same operations in the same order (multiply, then add).
        let (mut even, mut odd_sum) = ([0.0f32; 16], [0.0f32; 16]);
        // Block b's n values, in lanes 0..n. Lanes past n hold whatever follows (the next
        // blocks' values): they are never read back, and a whole 16-lane load is one register.
        let load = |b: usize| {
            let mut v = [0.0f32; 16];
            match st.get(b * n..b * n + 16) {
                Some(full) => v.copy_from_slice(full),
                None => {
                    for (x, &y) in v.iter_mut().zip(&st[b * n..(b + 1) * n]) {
                        *x = y;
                    }
                }
            }
            v
        };
        let nb = m.len();
        let mut b = 0;
        if PAIRS {
            while b + 2 <= nb {
                let (s0, s1, m0, m1) = (load(b), load(b + 1), m[b], m[b + 1]);
                for t in 0..16 {
                    even[t] += m0 * s0[t];
                    odd_sum[t] += m1 * s1[t];
                }
                b += 2;
            }
        }
        while b < nb {
            let (s0, m0) = (load(b), m[b]);
            for t in 0..16 {
                even[t] += m0 * s0[t];
            }
            b += 1;
        }
        for (t, o) in out.iter_mut().enumerate() {
            *o = if PAIRS { even[t] + odd_sum[t] } else { even[t] };
        }
        return;
    }
    out.fill(0.0);
    if PAIRS {
        odd[..n].fill(0.0);
    }
    for (b, (&mb, sb)) in m.iter().zip(st.chunks_exact(n)).enumerate() {
        let acc = if PAIRS && b % 2 == 1 {
            &mut odd[..n]
        } else {
            &mut *out
        };
        for (a, &sv) in acc.iter_mut().zip(sb) {
            *a += mb * sv;
        }
    }
    if PAIRS {
        for (a, &o) in out.iter_mut().zip(&odd[..n]) {
            *a += o;
        }
    }
}

/// Rows `R` x tokens `T` of f32 accumulators over all `nb` blocks.
///
/// `w[r]`: start of weight row r; `dw[r]`: its nb block scales (f32); `yq[t]`/`yd[t]`: token t's
/// quants and block scales. Returns per-(r, t) vectors whose lane sum is
/// `sum_b d_w d_y dot(u, q_y)`. By far the most time of prompt processing is spent here.
#[inline(always)]
pub(super) unsafe fn q32_tile<B: Block32, const VNNI: bool, const R: usize, const T: usize>(
    nb: usize,
    w: [*const u8; R],
    dw: [*const f32; R],
    yq: [*const i8; T],
    yd: [*const f32; T],
) -> [[__m256; T]; R] {
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    let ones = _mm256_set1_epi16(1);
    for b in 0..nb {
        let mut u = [_mm256_setzero_si256(); R];
        for r in 0..R {
            u[r] = B::quants(w[r].add(b * B::BYTES));
            if B::SIGNED && VNNI {
                u[r] = _mm256_xor_si256(u[r], _mm256_set1_epi8(-128));
            }
        }
        // For signed quants without VNNI: |u| as the unsigned operand, sign moved to y.
        let mut au = u;
        if B::SIGNED && !VNNI {
            for r in 0..R {
                au[r] = _mm256_sign_epi8(u[r], u[r]);
            }
        }
        for t in 0..T {
            let y = _mm256_loadu_si256(yq[t].add(b * QK) as *const __m256i);
            let dy = _mm256_set1_ps(*yd[t].add(b));
            for r in 0..R {
                let isum = if VNNI {
                    _mm256_dpbusd_epi32(_mm256_setzero_si256(), u[r], y)
                } else if B::SIGNED {
                    let sy = _mm256_sign_epi8(y, u[r]);
                    _mm256_madd_epi16(_mm256_maddubs_epi16(au[r], sy), ones)
                } else {
                    _mm256_madd_epi16(_mm256_maddubs_epi16(u[r], y), ones)
                };
                let dd = _mm256_mul_ps(_mm256_set1_ps(*dw[r].add(b)), dy);
                acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), dd, acc[r][t]);
            }
        }
    }
    acc
}

/// `R` rows starting at `r0`, all tokens: unpack the rows' scales and mins into `dm`
/// (`[R][2][nb]`), their min corrections for every token into `corr` (`[R][n_tokens]`, with
/// `odd` scratch), run tiles of `T` tokens (then single tokens) and write the results.
///
/// Every (row, token) result is computed by the same instruction sequence as in
/// `q32_dot_rows` (same per-block scale products and FMAs into the same lanes, same horizontal
/// sum, same correction order), so results do not depend on n_tokens or the row grouping.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn q32_rows_block<B: Block32, const VNNI: bool, const R: usize, const T: usize>(
    w: &[u8],
    row_bytes: usize,
    r0: usize,
    acts: &Q8Acts,
    n_tokens: usize,
    dm: &mut [f32],
    corr: &mut [f32],
    odd: &mut [f32],
    out: OutPtr,
) {
    let nb = acts.nb;
    let mut wp = [std::ptr::null(); R];
    let mut dwp = [std::ptr::null(); R];
    let has_min = !B::SIGNED || VNNI;
    for r in 0..R {
        wp[r] = w.as_ptr().add((r0 + r) * row_bytes);
        let (dr, mr) = dm[2 * r * nb..2 * (r + 1) * nb].split_at_mut(nb);
        for b in 0..nb {
            let (d, m) = B::scale_min(wp[r].add(b * B::BYTES));
            dr[b] = d;
            mr[b] = if B::SIGNED && VNNI { -128.0 * d } else { m };
        }
        dwp[r] = dr.as_ptr();
        if has_min {
            min_corrections::<false>(
                mr,
                &acts.st[..nb * n_tokens],
                &mut corr[r * n_tokens..(r + 1) * n_tokens],
                odd,
            );
        }
    }
    let finish = |acc: &[[__m256; T]; R], t0: usize| {
        for r in 0..R {
            for t in 0..T {
                let mut v = hsum_ps(acc[r][t]);
                if has_min {
                    v += corr[r * n_tokens + t0 + t];
                }
                out.write(r0 + r, t0 + t, v);
            }
        }
    };
    let tok = |t: usize| {
        (
            acts.qs.as_ptr().add(t * nb * QK),
            acts.d.as_ptr().add(t * nb),
        )
    };
    let mut t0 = 0;
    while t0 + T <= n_tokens {
        let mut yq = [std::ptr::null(); T];
        let mut yd = [std::ptr::null(); T];
        for t in 0..T {
            (yq[t], yd[t]) = tok(t0 + t);
        }
        let acc = q32_tile::<B, VNNI, R, T>(nb, wp, dwp, yq, yd);
        finish(&acc, t0);
        t0 += T;
    }
    while t0 < n_tokens {
        let (yq, yd) = tok(t0);
        let acc = q32_tile::<B, VNNI, R, 1>(nb, wp, dwp, [yq], [yd]);
        for r in 0..R {
            let mut v = hsum_ps(acc[r][0]);
            if has_min {
                v += corr[r * n_tokens + t0];
            }
            out.write(r0 + r, t0, v);
        }
        t0 += 1;
    }
}

/// Software prefetch distance (bytes) of the decode kernels, which read `rows_per_pass` rows
/// of `row_bytes` in lockstep and are bound by memory bandwidth: the hardware prefetchers
/// keep too few lines in flight for several interleaved streams (measured ~2x on a 178 MB
/// Q8_0 matrix). Each row pointer prefetches the same offset two passes ahead (the distance
/// must be at least one pass, or it would fetch what another row stream is reading now);
/// for long rows, where that would be far beyond L1, a fixed distance within the row.
#[inline(always)]
pub(super) fn decode_prefetch_distance(row_bytes: usize, rows_per_pass: usize) -> usize {
    let pass = row_bytes * rows_per_pass;
    if 2 * pass <= 16 * 1024 {
        2 * pass
    } else {
        1024
    }
}

/// Rows `rows` of a 32-weight-type matrix times all `n_tokens` quantized tokens.
#[inline(always)]
unsafe fn q32_rows<B: Block32, const VNNI: bool, const R: usize, const T: usize>(
    w: &[u8],
    row_bytes: usize,
    rows: std::ops::Range<usize>,
    acts: &Q8Acts,
    n_tokens: usize,
    out: OutPtr,
) {
    let nb = acts.nb;
    let mut r = rows.start;
    if n_tokens == 1 {
        // Decode: 4 independent rows keep the loads in flight.
        let pf = decode_prefetch_distance(row_bytes, 4);
        let (yq, yd, ys) = (acts.qs.as_ptr(), acts.d.as_ptr(), acts.s.as_ptr());
        let row = |r: usize| w.as_ptr().add(r * row_bytes);
        while r + 4 <= rows.end {
            let v = q32_dot_rows::<B, VNNI, 4>(
                nb,
                [row(r), row(r + 1), row(r + 2), row(r + 3)],
                pf,
                yq,
                yd,
                ys,
            );
            for (k, v) in v.into_iter().enumerate() {
                out.write(r + k, 0, v);
            }
            r += 4;
        }
        while r < rows.end {
            out.write(
                r,
                0,
                q32_dot_rows::<B, VNNI, 1>(nb, [row(r)], pf, yq, yd, ys)[0],
            );
            r += 1;
        }
        return;
    }
    let mut dm = vec![0.0f32; 2 * R * nb]; // [rows][d | m][nb]
    let mut corr = vec![0.0f32; (R + 1) * n_tokens]; // [rows][tokens], then odd-block scratch
    let (corr, odd) = corr.split_at_mut(R * n_tokens);
    while r + R <= rows.end {
        q32_rows_block::<B, VNNI, R, T>(w, row_bytes, r, acts, n_tokens, &mut dm, corr, odd, out);
        r += R;
    }
    while r < rows.end {
        q32_rows_block::<B, VNNI, 1, T>(w, row_bytes, r, acts, n_tokens, &mut dm, corr, odd, out);
        r += 1;
    }
}

/// AVX2 (+FMA, F16C) entry for the 32-weight types. 2 rows x 4 tokens fit in 16 registers.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn q32_rows_avx2(
    ty: GgmlType,
    w: &[u8],
    row_bytes: usize,
    rows: std::ops::Range<usize>,
    acts: &Q8Acts,
    n_tokens: usize,
    out: OutPtr,
) {
    match ty {
        GgmlType::Q4_0 => q32_rows::<Q4_0, false, 2, 4>(w, row_bytes, rows, acts, n_tokens, out),
        GgmlType::Q4_1 => q32_rows::<Q4_1, false, 2, 4>(w, row_bytes, rows, acts, n_tokens, out),
        GgmlType::Q5_0 => q32_rows::<Q5_0, false, 2, 4>(w, row_bytes, rows, acts, n_tokens, out),
        GgmlType::Q5_1 => q32_rows::<Q5_1, false, 2, 4>(w, row_bytes, rows, acts, n_tokens, out),
        GgmlType::Q8_0 => q32_rows::<Q8_0, false, 2, 4>(w, row_bytes, rows, acts, n_tokens, out),
        GgmlType::IQ4_NL => {
            q32_rows::<IQ4_NL, false, 2, 4>(w, row_bytes, rows, acts, n_tokens, out)
        }
        _ => unreachable!("{ty:?} is not a 32-weight block type"),
    }
}

/// AVX-512 VNNI entry (256-bit `vpdpbusd`, 32 vector registers): 4 rows x 4 tokens.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(crate) unsafe fn q32_rows_vnni(
    ty: GgmlType,
    w: &[u8],
    row_bytes: usize,
    rows: std::ops::Range<usize>,
    acts: &Q8Acts,
    n_tokens: usize,
    out: OutPtr,
) {
    match ty {
        GgmlType::Q4_0 => q32_rows::<Q4_0, true, 4, 4>(w, row_bytes, rows, acts, n_tokens, out),
        GgmlType::Q4_1 => q32_rows::<Q4_1, true, 4, 4>(w, row_bytes, rows, acts, n_tokens, out),
        GgmlType::Q5_0 => q32_rows::<Q5_0, true, 4, 4>(w, row_bytes, rows, acts, n_tokens, out),
        GgmlType::Q5_1 => q32_rows::<Q5_1, true, 4, 4>(w, row_bytes, rows, acts, n_tokens, out),
        GgmlType::Q8_0 => q32_rows::<Q8_0, true, 4, 4>(w, row_bytes, rows, acts, n_tokens, out),
        GgmlType::IQ4_NL => q32_rows::<IQ4_NL, true, 4, 4>(w, row_bytes, rows, acts, n_tokens, out),
        _ => unreachable!("{ty:?} is not a 32-weight block type"),
    }
}
