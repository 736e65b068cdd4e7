//! Super-block (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS) x Q8_K kernels, AVX2: one weight row
//! against `T` tokens at once.
//!
//! A tile unpacks each weight super-block (2- to 6-bit quants or IQ4_XS's table lookups, the
//! scales and mins) once and multiplies it with the Q8_K blocks of `T` tokens. Per 16 or 32
//! weights: `maddubs` of unsigned quants (IQ4_XS: their magnitudes, the signs moved onto the
//! activations) with the activations, then `madd` with the sub-block scales; offsets (Q3_K's -4,
//! Q6_K's -32) and mins come from the activations' 16-value sums.
//!
//! Batch invariance: every (row, token) result follows the same sequence of float operations
//! whatever `T` is (the decode path is the `T = 1` instance of the same code): per super-block,
//! the same integer 8-lane sums (exact), one `d_w * d_y` product and one FMA into the token's own
//! 8 lanes (Q4_K / Q5_K: then one FNMA of the 8 lanes of min corrections), a horizontal sum at
//! the end.

// Tiles index several per-token arrays with the same loop variable.
#![allow(clippy::needless_range_loop)]
use std::arch::x86_64::*;

use super::matmul::OutPtr;
use super::quant::BlockQ8K;
use super::x86::{f16_at, hsum_ps};
use super::{QMatRef, SimdLevel};
use crate::ggml_type::GgmlType;

const Q2K_BYTES: usize = 84;
const Q3K_BYTES: usize = 110;
const IQ4XS_BYTES: usize = 136;
const Q4K_BYTES: usize = 144;
const Q5K_BYTES: usize = 176;
const Q6K_BYTES: usize = 210;

/// The K-quant a kernel instance runs (a const parameter, so each is compiled on its own):
/// its bits per weight.
mod k {
    pub(super) const Q2: u8 = 2;
    pub(super) const Q3: u8 = 3;
    pub(super) const Q4: u8 = 4;
    pub(super) const Q5: u8 = 5;
    pub(super) const Q6: u8 = 6;
    /// IQ4_XS (4-bit indices into a table of 16 values).
    pub(super) const IQ4X: u8 = 44;
}

/// The 8 scales and 8 mins of a Q4_K block (12 packed bytes at `p`), as two u64 of bytes.
#[inline(always)]
unsafe fn q4k_scales_mins(p: *const u8) -> (u64, u64) {
    const KMASK1: u32 = 0x3f3f_3f3f;
    const KMASK2: u32 = 0x0f0f_0f0f;
    const KMASK3: u32 = 0x0303_0303;
    let u0 = (p as *const u32).read_unaligned();
    let u1 = (p.add(4) as *const u32).read_unaligned();
    let u2 = (p.add(8) as *const u32).read_unaligned();
    let s0 = u0 & KMASK1;
    let s1 = (u2 & KMASK2) | (((u0 >> 6) & KMASK3) << 4);
    let m0 = u1 & KMASK1;
    let m1 = ((u2 >> 4) & KMASK2) | (((u1 >> 6) & KMASK3) << 4);
    (
        s0 as u64 | ((s1 as u64) << 32),
        m0 as u64 | ((m1 as u64) << 32),
    )
}

/// `pshufb` mask: every byte = `i`.
#[inline(always)]
unsafe fn bcast_byte(i: usize) -> __m128i {
    _mm_set1_epi8(i as i8)
}

/// `pshufb` mask: bytes 0..8 = `i`, bytes 8..16 = `i + 1`.
#[inline(always)]
unsafe fn bcast_pair(i: usize) -> __m128i {
    _mm_set_epi64x(
        0x0101_0101_0101_0101 * (i as i64 + 1),
        0x0101_0101_0101_0101 * i as i64,
    )
}

/// One Q4_K (`Q5` false) or Q5_K row (`nb` blocks at `w`) . `T` tokens' Q8_K blocks
/// (`acts[t]`, `nb` each). Q5_K's fifth bits (`qh`, bit `2j` / `2j + 1` for the low / high
/// nibbles of the `j`-th 32 bytes) are or-ed in as 16: quants 0..31, the same integer sums.
#[inline(always)]
unsafe fn q4k_tile<const Q5: bool, const T: usize>(
    w: *const u8,
    nb: usize,
    acts: [*const BlockQ8K; T],
) -> [f32; T] {
    let m4 = _mm256_set1_epi8(0xF);
    let one = _mm256_set1_epi8(1);
    let (bytes, qs_at) = if Q5 { (Q5K_BYTES, 48) } else { (Q4K_BYTES, 16) };
    let mut acc = [_mm256_setzero_ps(); T];
    for i in 0..nb {
        let p = w.add(i * bytes);
        let qh = if Q5 {
            _mm256_loadu_si256(p.add(16) as *const __m256i)
        } else {
            _mm256_setzero_si256()
        };
        let (sc, mn) = q4k_scales_mins(p.add(4));
        let scv = _mm_cvtsi64_si128(sc as i64);
        // Each min twice (m0 m0 m1 m1 ...), as 16 i16, against the 16 bsums.
        let mn = _mm_cvtsi64_si128(mn as i64);
        let mins = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(mn, mn));
        let mut isum = [_mm256_setzero_si256(); T];
        for j in 0..4 {
            let q = _mm256_loadu_si256(p.add(qs_at + 32 * j) as *const __m256i);
            let mut lo = _mm256_and_si256(q, m4);
            let mut hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
            if Q5 {
                // Bit 2j (2j + 1) of each qh byte to bit 4: shifts within 16-bit lanes, then
                // masks to each byte's bit 0 (a shift of at most 7 keeps each byte's own bits).
                let b = |s: i32| {
                    let x = _mm256_srl_epi16(qh, _mm_cvtsi32_si128(s));
                    _mm256_slli_epi16(_mm256_and_si256(x, one), 4)
                };
                lo = _mm256_or_si256(lo, b(2 * j as i32));
                hi = _mm256_or_si256(hi, b(2 * j as i32 + 1));
            }
            let s1 = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(scv, bcast_byte(2 * j)));
            let s2 = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(scv, bcast_byte(2 * j + 1)));
            for t in 0..T {
                let ys = (*acts[t].add(i)).qs.as_ptr();
                let ylo = _mm256_loadu_si256(ys.add(64 * j) as *const __m256i);
                let yhi = _mm256_loadu_si256(ys.add(64 * j + 32) as *const __m256i);
                let plo = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, ylo), s1);
                let phi = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, yhi), s2);
                isum[t] = _mm256_add_epi32(isum[t], _mm256_add_epi32(plo, phi));
            }
        }
        let dw = f16_at(p);
        let mw = f16_at(p.add(2));
        for t in 0..T {
            let y = &*acts[t].add(i);
            // The mins part, 8 lanes of m_k * (bsums[2k] + bsums[2k + 1]).
            let bs = _mm256_loadu_si256(y.bsums.as_ptr() as *const __m256i);
            let msum = _mm256_cvtepi32_ps(_mm256_madd_epi16(bs, mins));
            let d = dw * y.d;
            let dmin = mw * y.d;
            acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(isum[t]), acc[t]);
            acc[t] = _mm256_fnmadd_ps(_mm256_set1_ps(dmin), msum, acc[t]);
        }
    }
    let mut out = [0.0f32; T];
    for t in 0..T {
        out[t] = hsum_ps(acc[t]);
    }
    out
}

/// One Q6_K row (`nb` blocks at `w`) . `T` tokens' Q8_K blocks (`acts[t]`, `nb` each).
#[inline(always)]
unsafe fn q6k_tile<const T: usize>(
    w: *const u8,
    nb: usize,
    acts: [*const BlockQ8K; T],
) -> [f32; T] {
    let m4 = _mm256_set1_epi8(0xF);
    let m30 = _mm256_set1_epi8(0x30);
    let mut acc = [_mm256_setzero_ps(); T];
    for i in 0..nb {
        let p = w.add(i * Q6K_BYTES);
        let sc = p.add(192) as *const i8;
        let scv = _mm_loadu_si128(sc as *const __m128i);
        let sc16 = _mm256_cvtepi8_epi16(scv);
        let mut isum = [_mm256_setzero_si256(); T];
        for half in 0..2 {
            let ql0 = _mm256_loadu_si256(p.add(64 * half) as *const __m256i);
            let ql1 = _mm256_loadu_si256(p.add(64 * half + 32) as *const __m256i);
            let qh = _mm256_loadu_si256(p.add(128 + 32 * half) as *const __m256i);
            for k in 0..4 {
                let qk = match k {
                    0 => _mm256_or_si256(
                        _mm256_and_si256(ql0, m4),
                        _mm256_and_si256(_mm256_slli_epi16(qh, 4), m30),
                    ),
                    1 => _mm256_or_si256(
                        _mm256_and_si256(ql1, m4),
                        _mm256_and_si256(_mm256_slli_epi16(qh, 2), m30),
                    ),
                    2 => _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4),
                        _mm256_and_si256(qh, m30),
                    ),
                    _ => _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                        _mm256_and_si256(_mm256_srli_epi16(qh, 2), m30),
                    ),
                };
                // sc[i] in the low 128 bits' 8 lanes, sc[i + 1] in the high ones.
                let scale =
                    _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scv, bcast_pair(8 * half + 2 * k)));
                for t in 0..T {
                    let ys = (*acts[t].add(i)).qs.as_ptr();
                    let y = _mm256_loadu_si256(ys.add(128 * half + 32 * k) as *const __m256i);
                    let prod = _mm256_madd_epi16(_mm256_maddubs_epi16(qk, y), scale);
                    isum[t] = _mm256_add_epi32(isum[t], prod);
                }
            }
        }
        let dw = f16_at(p.add(208));
        for t in 0..T {
            let y = &*acts[t].add(i);
            // The -32 offset: -32 * sum_g sc[g] * bsums[g].
            let bs = _mm256_loadu_si256(y.bsums.as_ptr() as *const __m256i);
            let off = _mm256_slli_epi32(_mm256_madd_epi16(bs, sc16), 5);
            let isum = _mm256_sub_epi32(isum[t], off);
            let d = dw * y.d;
            acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(isum), acc[t]);
        }
    }
    let mut out = [0.0f32; T];
    for t in 0..T {
        out[t] = hsum_ps(acc[t]);
    }
    out
}

/// `_mm256_srl_epi16` by a run-time count.
#[inline(always)]
unsafe fn srl16(v: __m256i, n: usize) -> __m256i {
    _mm256_srl_epi16(v, _mm_cvtsi32_si128(n as i32))
}

/// One Q2_K row (`nb` blocks at `w`) . `T` tokens' Q8_K blocks.
#[inline(always)]
unsafe fn q2k_tile<const T: usize>(
    w: *const u8,
    nb: usize,
    acts: [*const BlockQ8K; T],
) -> [f32; T] {
    let m3 = _mm256_set1_epi8(3);
    let m4 = _mm_set1_epi8(0xF);
    let mut acc = [_mm256_setzero_ps(); T];
    for i in 0..nb {
        let p = w.add(i * Q2K_BYTES);
        let sm = _mm_loadu_si128(p as *const __m128i);
        let sc = _mm_and_si128(sm, m4);
        let mins = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(sm, 4), m4));
        let mut isum = [_mm256_setzero_si256(); T];
        for h in 0..2 {
            let q = _mm256_loadu_si256(p.add(16 + 32 * h) as *const __m256i);
            for k in 0..4 {
                let v = _mm256_and_si256(srl16(q, 2 * k), m3);
                // Groups 8h + 2k (bytes 0..16) and 8h + 2k + 1 (bytes 16..32).
                let scale = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(sc, bcast_pair(8 * h + 2 * k)));
                for t in 0..T {
                    let ys = (*acts[t].add(i)).qs.as_ptr();
                    let y = _mm256_loadu_si256(ys.add(128 * h + 32 * k) as *const __m256i);
                    let prod = _mm256_madd_epi16(_mm256_maddubs_epi16(v, y), scale);
                    isum[t] = _mm256_add_epi32(isum[t], prod);
                }
            }
        }
        let dw = f16_at(p.add(80));
        let mw = f16_at(p.add(82));
        for t in 0..T {
            let y = &*acts[t].add(i);
            let bs = _mm256_loadu_si256(y.bsums.as_ptr() as *const __m256i);
            let msum = _mm256_cvtepi32_ps(_mm256_madd_epi16(bs, mins));
            acc[t] = _mm256_fmadd_ps(
                _mm256_set1_ps(dw * y.d),
                _mm256_cvtepi32_ps(isum[t]),
                acc[t],
            );
            acc[t] = _mm256_fnmadd_ps(_mm256_set1_ps(mw * y.d), msum, acc[t]);
        }
    }
    let mut out = [0.0f32; T];
    for t in 0..T {
        out[t] = hsum_ps(acc[t]);
    }
    out
}

/// The 16 signed scales of a Q3_K block (12 packed bytes at `p`), as i8 bytes.
#[inline(always)]
unsafe fn q3k_scales(p: *const u8) -> __m128i {
    const KMASK1: u32 = 0x0303_0303;
    const KMASK2: u32 = 0x0f0f_0f0f;
    let a0 = (p as *const u32).read_unaligned();
    let a1 = (p.add(4) as *const u32).read_unaligned();
    let hi = (p.add(8) as *const u32).read_unaligned();
    let s0 = (a0 & KMASK2) | ((hi & KMASK1) << 4);
    let s1 = (a1 & KMASK2) | (((hi >> 2) & KMASK1) << 4);
    let s2 = ((a0 >> 4) & KMASK2) | (((hi >> 4) & KMASK1) << 4);
    let s3 = ((a1 >> 4) & KMASK2) | (((hi >> 6) & KMASK1) << 4);
    let v = _mm_setr_epi32(s0 as i32, s1 as i32, s2 as i32, s3 as i32);
    _mm_sub_epi8(v, _mm_set1_epi8(32))
}

/// One Q3_K row (`nb` blocks at `w`) . `T` tokens' Q8_K blocks: quants `q + 4` (two low bits
/// or-ed with 4 where the high bit is set, 0..8), the 4 taken back from the 16-value sums.
#[inline(always)]
unsafe fn q3k_tile<const T: usize>(
    w: *const u8,
    nb: usize,
    acts: [*const BlockQ8K; T],
) -> [f32; T] {
    let m3 = _mm256_set1_epi8(3);
    let one = _mm256_set1_epi8(1);
    let mut acc = [_mm256_setzero_ps(); T];
    for i in 0..nb {
        let p = w.add(i * Q3K_BYTES);
        let scv = q3k_scales(p.add(96));
        let sc16 = _mm256_cvtepi8_epi16(scv);
        let hm = _mm256_loadu_si256(p as *const __m256i);
        let mut isum = [_mm256_setzero_si256(); T];
        for h in 0..2 {
            let q = _mm256_loadu_si256(p.add(32 + 32 * h) as *const __m256i);
            for k in 0..4 {
                let lo = _mm256_and_si256(srl16(q, 2 * k), m3);
                // Bit 4h + k of each hmask byte (a shift of at most 7 keeps each byte's bits).
                let hb = _mm256_slli_epi16(_mm256_and_si256(srl16(hm, 4 * h + k), one), 2);
                let v = _mm256_or_si256(lo, hb);
                let scale = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scv, bcast_pair(8 * h + 2 * k)));
                for t in 0..T {
                    let ys = (*acts[t].add(i)).qs.as_ptr();
                    let y = _mm256_loadu_si256(ys.add(128 * h + 32 * k) as *const __m256i);
                    let prod = _mm256_madd_epi16(_mm256_maddubs_epi16(v, y), scale);
                    isum[t] = _mm256_add_epi32(isum[t], prod);
                }
            }
        }
        let dw = f16_at(p.add(108));
        for t in 0..T {
            let y = &*acts[t].add(i);
            // The -4 offset: -4 * sum_g sc[g] * bsums[g].
            let bs = _mm256_loadu_si256(y.bsums.as_ptr() as *const __m256i);
            let off = _mm256_slli_epi32(_mm256_madd_epi16(bs, sc16), 2);
            let isum = _mm256_sub_epi32(isum[t], off);
            acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(dw * y.d), _mm256_cvtepi32_ps(isum), acc[t]);
        }
    }
    let mut out = [0.0f32; T];
    for t in 0..T {
        out[t] = hsum_ps(acc[t]);
    }
    out
}

/// One IQ4_XS row (`nb` blocks at `w`) . `T` tokens' Q8_K blocks: each 32 weights' nibbles
/// looked up in `KVALUES_IQ4` (signed: `maddubs` of their magnitudes with the activations
/// carrying their signs), times the sub-block's scale.
#[inline(always)]
unsafe fn iq4xs_tile<const T: usize>(
    w: *const u8,
    nb: usize,
    acts: [*const BlockQ8K; T],
) -> [f32; T] {
    let table = _mm256_broadcastsi128_si256(_mm_loadu_si128(
        super::quant::KVALUES_IQ4.as_ptr() as *const __m128i
    ));
    let mut acc = [_mm256_setzero_ps(); T];
    for i in 0..nb {
        let p = w.add(i * IQ4XS_BYTES);
        let sh = (p.add(2) as *const u16).read_unaligned();
        let mut isum = [_mm256_setzero_si256(); T];
        for ib in 0..8 {
            let low = (*p.add(4 + ib / 2) >> (4 * (ib % 2))) & 0xF;
            let ls = (low as u16 | (((sh >> (2 * ib)) & 3) << 4)) as i16 - 32;
            let scale = _mm256_set1_epi16(ls);
            let q = _mm256_shuffle_epi8(table, super::x86::nibbles_32(p.add(8 + 16 * ib)));
            let aq = _mm256_sign_epi8(q, q);
            for t in 0..T {
                let ys = (*acts[t].add(i)).qs.as_ptr();
                let y = _mm256_loadu_si256(ys.add(32 * ib) as *const __m256i);
                let prod =
                    _mm256_madd_epi16(_mm256_maddubs_epi16(aq, _mm256_sign_epi8(y, q)), scale);
                isum[t] = _mm256_add_epi32(isum[t], prod);
            }
        }
        let dw = f16_at(p);
        for t in 0..T {
            let y = &*acts[t].add(i);
            acc[t] = _mm256_fmadd_ps(
                _mm256_set1_ps(dw * y.d),
                _mm256_cvtepi32_ps(isum[t]),
                acc[t],
            );
        }
    }
    let mut out = [0.0f32; T];
    for t in 0..T {
        out[t] = hsum_ps(acc[t]);
    }
    out
}

/// The tile of kernel `KIND` (see [`k`]).
#[inline(always)]
unsafe fn tile<const KIND: u8, const T: usize>(
    p: *const u8,
    nb: usize,
    acts: [*const BlockQ8K; T],
) -> [f32; T] {
    match KIND {
        k::Q2 => q2k_tile::<T>(p, nb, acts),
        k::Q3 => q3k_tile::<T>(p, nb, acts),
        k::Q4 => q4k_tile::<false, T>(p, nb, acts),
        k::Q5 => q4k_tile::<true, T>(p, nb, acts),
        k::Q6 => q6k_tile::<T>(p, nb, acts),
        _ => iq4xs_tile::<T>(p, nb, acts),
    }
}

/// One super-block-type row . one token's Q8_K activations (the decode kernels' results).
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_one(ty: GgmlType, row: &[u8], act: &[BlockQ8K]) -> f32 {
    let nb = row.len() / ty.type_size();
    assert!(act.len() >= nb);
    let (p, a) = (row.as_ptr(), [act.as_ptr()]);
    match ty {
        GgmlType::Q2_K => tile::<{ k::Q2 }, 1>(p, nb, a)[0],
        GgmlType::Q3_K => tile::<{ k::Q3 }, 1>(p, nb, a)[0],
        GgmlType::Q4_K => tile::<{ k::Q4 }, 1>(p, nb, a)[0],
        GgmlType::Q5_K => tile::<{ k::Q5 }, 1>(p, nb, a)[0],
        GgmlType::Q6_K => tile::<{ k::Q6 }, 1>(p, nb, a)[0],
        GgmlType::IQ4_XS => tile::<{ k::IQ4X }, 1>(p, nb, a)[0],
        other => unreachable!("{other:?} is not a super-block type"),
    }
}

/// Token groups of 4 (then single tokens) outer, rows `rr` inner: the rows' weights stay in
/// L1/L2 while a group's activations are reused across them.
#[inline(always)]
unsafe fn k_rows_impl<const KIND: u8, const TT: usize>(
    w: QMatRef,
    row_bytes: usize,
    rr: std::ops::Range<usize>,
    acts: &[BlockQ8K],
    n_tokens: usize,
    out: OutPtr,
) {
    let nb = w.cols / crate::ggml_type::QK_K;
    let a = acts.as_ptr();
    let wp = w.data.as_ptr();
    let mut t0 = 0;
    while t0 + TT <= n_tokens {
        let ap: [*const BlockQ8K; TT] = std::array::from_fn(|k| a.add((t0 + k) * nb));
        for r in rr.clone() {
            let p = wp.add(r * row_bytes);
            let v = tile::<KIND, TT>(p, nb, ap);
            for k in 0..TT {
                out.write(r, t0 + k, v[k]);
            }
        }
        t0 += TT;
    }
    for t in t0..n_tokens {
        for r in rr.clone() {
            let p = wp.add(r * row_bytes);
            let ap = [a.add(t * nb)];
            let v = tile::<KIND, 1>(p, nb, ap);
            out.write(r, t, v[0]);
        }
    }
}

/// Rows `rr` of a Q4_K / Q5_K / Q6_K matrix, all tokens, at SIMD `level` (AVX2 or better).
///
/// # Safety
/// The CPU has `level`; rows `rr` are written by this call only (`out` holds `n_tokens` rows
/// of `w.rows`).
pub(crate) unsafe fn k_rows(
    level: SimdLevel,
    w: QMatRef,
    row_bytes: usize,
    rr: std::ops::Range<usize>,
    acts: &[BlockQ8K],
    n_tokens: usize,
    out: OutPtr,
) {
    assert!(acts.len() >= n_tokens * (w.cols / crate::ggml_type::QK_K));
    assert!(w.data.len() >= rr.end * row_bytes);
    if level >= SimdLevel::Avx2Vnni {
        k_rows_avx512(w, row_bytes, rr, acts, n_tokens, out);
    } else {
        k_rows_avx2(w, row_bytes, rr, acts, n_tokens, out);
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn k_rows_avx2(
    w: QMatRef,
    row_bytes: usize,
    rr: std::ops::Range<usize>,
    acts: &[BlockQ8K],
    n_tokens: usize,
    out: OutPtr,
) {
    match w.ty {
        GgmlType::Q2_K => k_rows_impl::<{ k::Q2 }, 4>(w, row_bytes, rr, acts, n_tokens, out),
        GgmlType::Q3_K => k_rows_impl::<{ k::Q3 }, 4>(w, row_bytes, rr, acts, n_tokens, out),
        GgmlType::IQ4_XS => k_rows_impl::<{ k::IQ4X }, 4>(w, row_bytes, rr, acts, n_tokens, out),
        GgmlType::Q4_K => k_rows_impl::<{ k::Q4 }, 4>(w, row_bytes, rr, acts, n_tokens, out),
        GgmlType::Q5_K => k_rows_impl::<{ k::Q5 }, 4>(w, row_bytes, rr, acts, n_tokens, out),
        GgmlType::Q6_K => k_rows_impl::<{ k::Q6 }, 4>(w, row_bytes, rr, acts, n_tokens, out),
        other => unreachable!("{other:?} is not a super-block type"),
    }
}

/// The same code with AVX-512VL's 32 vector registers (no spills of the 4 tokens' sums).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
unsafe fn k_rows_avx512(
    w: QMatRef,
    row_bytes: usize,
    rr: std::ops::Range<usize>,
    acts: &[BlockQ8K],
    n_tokens: usize,
    out: OutPtr,
) {
    match w.ty {
        GgmlType::Q2_K => k_rows_impl::<{ k::Q2 }, 8>(w, row_bytes, rr, acts, n_tokens, out),
        GgmlType::Q3_K => k_rows_impl::<{ k::Q3 }, 8>(w, row_bytes, rr, acts, n_tokens, out),
        GgmlType::IQ4_XS => k_rows_impl::<{ k::IQ4X }, 8>(w, row_bytes, rr, acts, n_tokens, out),
        GgmlType::Q4_K => k_rows_impl::<{ k::Q4 }, 8>(w, row_bytes, rr, acts, n_tokens, out),
        GgmlType::Q5_K => k_rows_impl::<{ k::Q5 }, 8>(w, row_bytes, rr, acts, n_tokens, out),
        GgmlType::Q6_K => k_rows_impl::<{ k::Q6 }, 4>(w, row_bytes, rr, acts, n_tokens, out),
        other => unreachable!("{other:?} is not a super-block type"),
    }
}

/// `min(top, round_half_even(s * x))` for 8 values at `p`.
#[inline(always)]
unsafe fn q8k_8(s: __m256, p: *const f32, top: __m256i) -> __m256i {
    let v = _mm256_mul_ps(s, _mm256_loadu_ps(p));
    _mm256_min_epi32(_mm256_cvtps_epi32(v), top)
}

/// [`super::quant::quantize_q8_k`] with AVX2, bit-identical to it (same max search semantics:
/// the first value of largest magnitude; `cvtps` rounds half to even like `nearest_int`).
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn quantize_q8_k(x: &[f32], out: &mut [BlockQ8K]) {
    const QK_K: usize = crate::ggml_type::QK_K;
    assert!(out.len() >= x.len() / QK_K);
    let sign = _mm256_set1_ps(-0.0);
    for (xb, blk) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        let p = xb.as_ptr();
        let mut m = _mm256_setzero_ps();
        for i in 0..QK_K / 8 {
            // `max_ps(a, m)` returns `m` when `a` is NaN, as the scalar `>` test skips NaN.
            m = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(p.add(8 * i))), m);
        }
        let r = _mm_max_ps(_mm256_extractf128_ps(m, 1), _mm256_castps256_ps128(m));
        let r = _mm_max_ps(r, _mm_movehl_ps(r, r));
        let r = _mm_max_ss(r, _mm_movehdup_ps(r));
        let amax = _mm_cvtss_f32(r);
        if amax == 0.0 {
            *blk = BlockQ8K::ZERO;
            continue;
        }
        let max = *xb.iter().find(|v| v.abs() == amax).unwrap_or(&amax);
        let iscale = -127.0 / max;
        let vs = _mm256_set1_ps(iscale);
        let top = _mm256_set1_epi32(127);
        let perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for i in 0..QK_K / 32 {
            let pi = p.add(32 * i);
            let ab = _mm256_packs_epi32(q8k_8(vs, pi, top), q8k_8(vs, pi.add(8), top));
            let cd = _mm256_packs_epi32(q8k_8(vs, pi.add(16), top), q8k_8(vs, pi.add(24), top));
            let b = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(ab, cd), perm);
            _mm256_storeu_si256(blk.qs.as_mut_ptr().add(32 * i) as *mut __m256i, b);
        }
        for (g, bs) in blk.bsums.iter_mut().enumerate() {
            *bs = blk.qs[16 * g..16 * g + 16].iter().map(|&q| q as i16).sum();
        }
        blk.d = 1.0 / iscale;
    }
}
