//! Super-block (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS) x Q8_K kernels: one weight row against
//! `T` tokens at once.
//!
//! A type is a [`SuperBlock`]: how its 256 weights unpack into bytes that line up with the
//! Q8_K activations (32 at a time for 256-bit vectors, 64 for 512-bit ones), the i16 scale of
//! each 16 of them, and how a block's exact integer sums become a float (its `d`, the mins or
//! offsets taken from the activations' 16-value sums). One tile per vector width runs every
//! type: the weights of a block are unpacked once and meet the Q8_K blocks of `T` tokens, per
//! 32 (64) weights `maddubs` of unsigned quants (IQ4_XS: their magnitudes, the signs moved
//! onto the activations) with the activations, then `madd` with the scales.
//!
//! Batch invariance: every (row, token) result follows the same sequence of float operations
//! whatever `T` is (the decode path is the `T = 1` instance of the same code): per super-block,
//! the same integer 8-lane sums (exact; the 512-bit tile adds its two halves first), one
//! `d_w * d_y` product and one FMA into the token's own 8 lanes (Q2_K / Q4_K / Q5_K: then one
//! FNMA of the 8 lanes of min corrections), a horizontal sum at the end. The two widths give
//! different lane sums, so a level's results are its own (tested against the scalar dots).

// Tiles index several per-token arrays with the same loop variable.
#![allow(clippy::needless_range_loop)]
use std::arch::x86_64::*;

use super::matmul::OutPtr;
use super::quant::{BlockQ8K, KVALUES_IQ4};
use super::x86::{f16_at, hsum_ps, nibbles_32};
use super::{QMatRef, SimdLevel};
use crate::ggml_type::{GgmlType, QK_K};

/// How one super-block type unpacks (see the module docs).
trait SuperBlock {
    /// Bytes of a block.
    const BYTES: usize;
    /// Quants are signed (IQ4_XS): the tiles multiply magnitudes by sign-moved activations.
    const SIGNED: bool = false;
    /// What a block needs once, before its tokens (scales, mins, `d`).
    type Prep: Copy;
    unsafe fn prep(p: *const u8) -> Self::Prep;
    /// Weights `32 j .. 32 j + 32` (j in 0..8) as bytes, and the i16 scale of each `maddubs`
    /// lane (lanes 0..8: the first 16 weights, 8..16: the next).
    unsafe fn chunk(p: *const u8, prep: &Self::Prep, j: usize) -> (__m256i, __m256i);
    /// Weights `64 m .. 64 m + 64` (m in 0..4) and their 32 lanes of scales.
    unsafe fn pair(p: *const u8, prep: &Self::Prep, m: usize) -> (__m512i, __m512i);
    /// `acc` plus the block's contribution for activations `y` with integer sums `isum`.
    unsafe fn finish(prep: &Self::Prep, y: &BlockQ8K, isum: __m256i, acc: __m256) -> __m256;
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

/// `vpermw` index: lanes 0..16 = `a`, 16..32 = `a + 1` (two 32-weight sub-block scales).
#[inline(always)]
unsafe fn idx_halves(a: usize) -> __m512i {
    let (x, y) = (a as i16, a as i16 + 1);
    _mm512_inserti64x4::<1>(
        _mm512_castsi256_si512(_mm256_set1_epi16(x)),
        _mm256_set1_epi16(y),
    )
}

/// `vpermw` index: lanes `8 k .. 8 k + 8` = `g + k` (four 16-weight group scales).
#[inline(always)]
unsafe fn idx_quarters(g: usize) -> __m512i {
    let g = g as i64 * 0x0001_0001_0001_0001;
    let one = 0x0001_0001_0001_0001i64;
    _mm512_setr_epi64(
        g,
        g,
        g + one,
        g + one,
        g + 2 * one,
        g + 2 * one,
        g + 3 * one,
        g + 3 * one,
    )
}

/// Two 256-bit halves as one vector.
#[inline(always)]
unsafe fn join(lo: __m256i, hi: __m256i) -> __m512i {
    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
}

/// `_mm256_srl_epi16` by a run-time count.
#[inline(always)]
unsafe fn srl16(v: __m256i, n: usize) -> __m256i {
    _mm256_srl_epi16(v, _mm_cvtsi32_si128(n as i32))
}

/// 8 i16 scales (or 16) widened into the low lanes of a 512-bit vector, for `vpermw`.
#[inline(always)]
unsafe fn scales_512_u8(v: __m128i) -> __m512i {
    _mm512_castsi256_si512(_mm256_cvtepu8_epi16(v))
}

#[inline(always)]
unsafe fn scales_512_i8(v: __m128i) -> __m512i {
    _mm512_castsi256_si512(_mm256_cvtepi8_epi16(v))
}

/// `acc + d * isum`.
#[inline(always)]
unsafe fn fma_d(d: f32, isum: __m256i, acc: __m256) -> __m256 {
    _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(isum), acc)
}

/// The activations' 16-value sums.
#[inline(always)]
unsafe fn bsums(y: &BlockQ8K) -> __m256i {
    _mm256_loadu_si256(y.bsums.as_ptr() as *const __m256i)
}

// ---------------------------------------------------------------------------------------------
// The types.
// ---------------------------------------------------------------------------------------------

/// Q4_K (`FIVE` false) and Q5_K: 8 sub-blocks of 32 with 6-bit scales and mins; nibbles of
/// `qs[32 m ..]` (low: sub-block 2m, high: 2m + 1), Q5_K's fifth bit j of `qh[l]`.
struct Q45K<const FIVE: bool>;

#[derive(Clone, Copy)]
struct Q45Prep {
    sc: __m128i,
    mins: __m256i,
    qh: __m256i,
    dw: f32,
    mw: f32,
}

impl<const FIVE: bool> Q45K<FIVE> {
    const QS: usize = if FIVE { 48 } else { 16 };

    /// The 8 scales and 8 mins (12 packed bytes at `p`), as two u64 of bytes.
    #[inline(always)]
    unsafe fn scales_mins(p: *const u8) -> (u64, u64) {
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

    /// Sub-blocks 2m (low nibbles) and 2m + 1 (high), with Q5_K's fifth bits.
    #[inline(always)]
    unsafe fn nibbles(p: *const u8, prep: &Q45Prep, m: usize) -> (__m256i, __m256i) {
        let m4 = _mm256_set1_epi8(0xF);
        let q = _mm256_loadu_si256(p.add(Self::QS + 32 * m) as *const __m256i);
        let mut lo = _mm256_and_si256(q, m4);
        let mut hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
        if FIVE {
            // Bit j of each qh byte to bit 4 (a shift of at most 7 keeps each byte's bits).
            let one = _mm256_set1_epi8(1);
            let b = |s: usize| _mm256_slli_epi16(_mm256_and_si256(srl16(prep.qh, s), one), 4);
            lo = _mm256_or_si256(lo, b(2 * m));
            hi = _mm256_or_si256(hi, b(2 * m + 1));
        }
        (lo, hi)
    }
}

impl<const FIVE: bool> SuperBlock for Q45K<FIVE> {
    const BYTES: usize = if FIVE { 176 } else { 144 };
    type Prep = Q45Prep;
    #[inline(always)]
    unsafe fn prep(p: *const u8) -> Q45Prep {
        let (sc, mn) = Self::scales_mins(p.add(4));
        // Each min twice (m0 m0 m1 m1 ...), as 16 i16, against the 16 bsums.
        let mn = _mm_cvtsi64_si128(mn as i64);
        Q45Prep {
            sc: _mm_cvtsi64_si128(sc as i64),
            mins: _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(mn, mn)),
            qh: if FIVE {
                _mm256_loadu_si256(p.add(16) as *const __m256i)
            } else {
                _mm256_setzero_si256()
            },
            dw: f16_at(p),
            mw: f16_at(p.add(2)),
        }
    }
    #[inline(always)]
    unsafe fn chunk(p: *const u8, prep: &Q45Prep, j: usize) -> (__m256i, __m256i) {
        let (lo, hi) = Self::nibbles(p, prep, j / 2);
        let q = if j % 2 == 0 { lo } else { hi };
        (
            q,
            _mm256_cvtepu8_epi16(_mm_shuffle_epi8(prep.sc, bcast_byte(j))),
        )
    }
    #[inline(always)]
    unsafe fn pair(p: *const u8, prep: &Q45Prep, m: usize) -> (__m512i, __m512i) {
        let (lo, hi) = Self::nibbles(p, prep, m);
        let sc = _mm512_permutexvar_epi16(idx_halves(2 * m), scales_512_u8(prep.sc));
        (join(lo, hi), sc)
    }
    #[inline(always)]
    unsafe fn finish(prep: &Q45Prep, y: &BlockQ8K, isum: __m256i, acc: __m256) -> __m256 {
        // The mins part, 8 lanes of m_k * (bsums[2k] + bsums[2k + 1]).
        let msum = _mm256_cvtepi32_ps(_mm256_madd_epi16(bsums(y), prep.mins));
        let acc = fma_d(prep.dw * y.d, isum, acc);
        _mm256_fnmadd_ps(_mm256_set1_ps(prep.mw * y.d), msum, acc)
    }
}

/// Q6_K: weight `128 h + 32 k + l` is 4 bits of `ql` and 2 of `qh`, minus 32; a signed scale
/// per 16.
struct Q6K;

#[derive(Clone, Copy)]
struct Q6Prep {
    scv: __m128i,
    sc16: __m256i,
    dw: f32,
}

impl Q6K {
    /// Weights `128 h + 32 k ..` plus 32 (0..64).
    #[inline(always)]
    unsafe fn quants(p: *const u8, h: usize, k: usize) -> __m256i {
        let m4 = _mm256_set1_epi8(0xF);
        let m30 = _mm256_set1_epi8(0x30);
        let ql = _mm256_loadu_si256(p.add(64 * h + 32 * (k % 2)) as *const __m256i);
        let qh = _mm256_loadu_si256(p.add(128 + 32 * h) as *const __m256i);
        let low = if k < 2 { ql } else { _mm256_srli_epi16(ql, 4) };
        // Bits 2k, 2k + 1 of qh to bits 4, 5.
        let high = match k {
            0 => _mm256_slli_epi16(qh, 4),
            1 => _mm256_slli_epi16(qh, 2),
            2 => qh,
            _ => _mm256_srli_epi16(qh, 2),
        };
        _mm256_or_si256(_mm256_and_si256(low, m4), _mm256_and_si256(high, m30))
    }
}

impl SuperBlock for Q6K {
    const BYTES: usize = 210;
    type Prep = Q6Prep;
    #[inline(always)]
    unsafe fn prep(p: *const u8) -> Q6Prep {
        let scv = _mm_loadu_si128(p.add(192) as *const __m128i);
        Q6Prep {
            scv,
            sc16: _mm256_cvtepi8_epi16(scv),
            dw: f16_at(p.add(208)),
        }
    }
    #[inline(always)]
    unsafe fn chunk(p: *const u8, prep: &Q6Prep, j: usize) -> (__m256i, __m256i) {
        let (h, k) = (j / 4, j % 4);
        let sc = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(prep.scv, bcast_pair(8 * h + 2 * k)));
        (Self::quants(p, h, k), sc)
    }
    #[inline(always)]
    unsafe fn pair(p: *const u8, prep: &Q6Prep, m: usize) -> (__m512i, __m512i) {
        let (h, k) = (m / 2, 2 * (m % 2));
        let sc = _mm512_permutexvar_epi16(idx_quarters(8 * h + 2 * k), scales_512_i8(prep.scv));
        (join(Self::quants(p, h, k), Self::quants(p, h, k + 1)), sc)
    }
    #[inline(always)]
    unsafe fn finish(prep: &Q6Prep, y: &BlockQ8K, isum: __m256i, acc: __m256) -> __m256 {
        // The -32 offset: -32 * sum_g sc[g] * bsums[g].
        let off = _mm256_slli_epi32(_mm256_madd_epi16(bsums(y), prep.sc16), 5);
        fma_d(prep.dw * y.d, _mm256_sub_epi32(isum, off), acc)
    }
}

/// Q2_K: weight `128 h + 32 k + l` is bits `2k` of `qs[32 h + l]`; a 4-bit scale and min per
/// 16.
struct Q2K;

#[derive(Clone, Copy)]
struct Q2Prep {
    sc: __m128i,
    mins: __m256i,
    dw: f32,
    mw: f32,
}

impl Q2K {
    #[inline(always)]
    unsafe fn quants(p: *const u8, h: usize, k: usize) -> __m256i {
        let q = _mm256_loadu_si256(p.add(16 + 32 * h) as *const __m256i);
        _mm256_and_si256(srl16(q, 2 * k), _mm256_set1_epi8(3))
    }
}

impl SuperBlock for Q2K {
    const BYTES: usize = 84;
    type Prep = Q2Prep;
    #[inline(always)]
    unsafe fn prep(p: *const u8) -> Q2Prep {
        let m4 = _mm_set1_epi8(0xF);
        let sm = _mm_loadu_si128(p as *const __m128i);
        Q2Prep {
            sc: _mm_and_si128(sm, m4),
            mins: _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(sm, 4), m4)),
            dw: f16_at(p.add(80)),
            mw: f16_at(p.add(82)),
        }
    }
    #[inline(always)]
    unsafe fn chunk(p: *const u8, prep: &Q2Prep, j: usize) -> (__m256i, __m256i) {
        let (h, k) = (j / 4, j % 4);
        let sc = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(prep.sc, bcast_pair(8 * h + 2 * k)));
        (Self::quants(p, h, k), sc)
    }
    #[inline(always)]
    unsafe fn pair(p: *const u8, prep: &Q2Prep, m: usize) -> (__m512i, __m512i) {
        let (h, k) = (m / 2, 2 * (m % 2));
        let sc = _mm512_permutexvar_epi16(idx_quarters(8 * h + 2 * k), scales_512_u8(prep.sc));
        (join(Self::quants(p, h, k), Self::quants(p, h, k + 1)), sc)
    }
    #[inline(always)]
    unsafe fn finish(prep: &Q2Prep, y: &BlockQ8K, isum: __m256i, acc: __m256) -> __m256 {
        let msum = _mm256_cvtepi32_ps(_mm256_madd_epi16(bsums(y), prep.mins));
        let acc = fma_d(prep.dw * y.d, isum, acc);
        _mm256_fnmadd_ps(_mm256_set1_ps(prep.mw * y.d), msum, acc)
    }
}

/// Q3_K: Q2_K's two low bits, a third from `hmask` (bit j of `hmask[l]` for weights
/// `32 j + l`), quant = bits - 4 where the third is clear; a signed 6-bit scale per 16. The
/// tiles multiply `q + 4` (0..8) and take the 4 back from the activations' sums.
struct Q3K;

#[derive(Clone, Copy)]
struct Q3Prep {
    scv: __m128i,
    sc16: __m256i,
    hm: __m256i,
    dw: f32,
}

impl Q3K {
    /// The 16 signed scales (12 packed bytes at `p`), as i8 bytes.
    #[inline(always)]
    unsafe fn scales(p: *const u8) -> __m128i {
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

    #[inline(always)]
    unsafe fn quants(p: *const u8, prep: &Q3Prep, h: usize, k: usize) -> __m256i {
        let q = _mm256_loadu_si256(p.add(32 + 32 * h) as *const __m256i);
        let lo = _mm256_and_si256(srl16(q, 2 * k), _mm256_set1_epi8(3));
        let one = _mm256_set1_epi8(1);
        let hb = _mm256_slli_epi16(_mm256_and_si256(srl16(prep.hm, 4 * h + k), one), 2);
        _mm256_or_si256(lo, hb)
    }
}

impl SuperBlock for Q3K {
    const BYTES: usize = 110;
    type Prep = Q3Prep;
    #[inline(always)]
    unsafe fn prep(p: *const u8) -> Q3Prep {
        let scv = Self::scales(p.add(96));
        Q3Prep {
            scv,
            sc16: _mm256_cvtepi8_epi16(scv),
            hm: _mm256_loadu_si256(p as *const __m256i),
            dw: f16_at(p.add(108)),
        }
    }
    #[inline(always)]
    unsafe fn chunk(p: *const u8, prep: &Q3Prep, j: usize) -> (__m256i, __m256i) {
        let (h, k) = (j / 4, j % 4);
        let sc = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(prep.scv, bcast_pair(8 * h + 2 * k)));
        (Self::quants(p, prep, h, k), sc)
    }
    #[inline(always)]
    unsafe fn pair(p: *const u8, prep: &Q3Prep, m: usize) -> (__m512i, __m512i) {
        let (h, k) = (m / 2, 2 * (m % 2));
        let sc = _mm512_permutexvar_epi16(idx_quarters(8 * h + 2 * k), scales_512_i8(prep.scv));
        let q = join(Self::quants(p, prep, h, k), Self::quants(p, prep, h, k + 1));
        (q, sc)
    }
    #[inline(always)]
    unsafe fn finish(prep: &Q3Prep, y: &BlockQ8K, isum: __m256i, acc: __m256) -> __m256 {
        // The -4 offset: -4 * sum_g sc[g] * bsums[g].
        let off = _mm256_slli_epi32(_mm256_madd_epi16(bsums(y), prep.sc16), 2);
        fma_d(prep.dw * y.d, _mm256_sub_epi32(isum, off), acc)
    }
}

/// IQ4_XS: each 32 weights' nibbles (`qs[16 j ..]`, Q4_0's order) index `KVALUES_IQ4`; a
/// signed 6-bit scale per 32.
struct Iq4Xs;

#[derive(Clone, Copy)]
struct Iq4Prep {
    ls: __m128i,
    dw: f32,
}

impl Iq4Xs {
    #[inline(always)]
    unsafe fn quants(p: *const u8, j: usize) -> __m256i {
        let table =
            _mm256_broadcastsi128_si256(_mm_loadu_si128(KVALUES_IQ4.as_ptr() as *const __m128i));
        _mm256_shuffle_epi8(table, nibbles_32(p.add(8 + 16 * j)))
    }
}

impl SuperBlock for Iq4Xs {
    const BYTES: usize = 136;
    const SIGNED: bool = true;
    type Prep = Iq4Prep;
    #[inline(always)]
    unsafe fn prep(p: *const u8) -> Iq4Prep {
        let sh = (p.add(2) as *const u16).read_unaligned();
        let mut ls = [0i16; 8];
        for (j, l) in ls.iter_mut().enumerate() {
            let low = (*p.add(4 + j / 2) >> (4 * (j % 2))) & 0xF;
            *l = (low as u16 | (((sh >> (2 * j)) & 3) << 4)) as i16 - 32;
        }
        Iq4Prep {
            ls: _mm_loadu_si128(ls.as_ptr() as *const __m128i),
            dw: f16_at(p),
        }
    }
    #[inline(always)]
    unsafe fn chunk(p: *const u8, prep: &Iq4Prep, j: usize) -> (__m256i, __m256i) {
        let sc = _mm256_broadcastw_epi16(_mm_shuffle_epi8(prep.ls, bcast_i16(j)));
        (Self::quants(p, j), sc)
    }
    #[inline(always)]
    unsafe fn pair(p: *const u8, prep: &Iq4Prep, m: usize) -> (__m512i, __m512i) {
        let sc = _mm512_permutexvar_epi16(idx_halves(2 * m), _mm512_castsi128_si512(prep.ls));
        (join(Self::quants(p, 2 * m), Self::quants(p, 2 * m + 1)), sc)
    }
    #[inline(always)]
    unsafe fn finish(prep: &Iq4Prep, y: &BlockQ8K, isum: __m256i, acc: __m256) -> __m256 {
        fma_d(prep.dw * y.d, isum, acc)
    }
}

/// `pshufb` mask copying i16 lane `j` (bytes 2j, 2j + 1) into every lane.
#[inline(always)]
unsafe fn bcast_i16(j: usize) -> __m128i {
    _mm_set1_epi16((2 * j | (2 * j + 1) << 8) as i16)
}

// ---------------------------------------------------------------------------------------------
// The tiles.
// ---------------------------------------------------------------------------------------------

/// One row (`nb` blocks at `w`) . `T` tokens' Q8_K blocks, 256-bit vectors.
#[inline(always)]
unsafe fn tile<B: SuperBlock, const T: usize>(
    w: *const u8,
    nb: usize,
    acts: [*const BlockQ8K; T],
) -> [f32; T] {
    let mut acc = [_mm256_setzero_ps(); T];
    for i in 0..nb {
        let p = w.add(i * B::BYTES);
        let prep = B::prep(p);
        let mut isum = [_mm256_setzero_si256(); T];
        for j in 0..8 {
            let (q, sc) = B::chunk(p, &prep, j);
            let aq = if B::SIGNED { _mm256_sign_epi8(q, q) } else { q };
            for t in 0..T {
                let ys = (*acts[t].add(i)).qs.as_ptr();
                let mut y = _mm256_loadu_si256(ys.add(32 * j) as *const __m256i);
                if B::SIGNED {
                    y = _mm256_sign_epi8(y, q);
                }
                let prod = _mm256_madd_epi16(_mm256_maddubs_epi16(aq, y), sc);
                isum[t] = _mm256_add_epi32(isum[t], prod);
            }
        }
        for t in 0..T {
            acc[t] = B::finish(&prep, &*acts[t].add(i), isum[t], acc[t]);
        }
    }
    let mut out = [0.0f32; T];
    for t in 0..T {
        out[t] = hsum_ps(acc[t]);
    }
    out
}

/// [`tile`] with 512-bit vectors (64 weights per step), the two halves of each token's sums
/// added before the block's float step.
#[inline(always)]
unsafe fn tile512<B: SuperBlock, const T: usize>(
    w: *const u8,
    nb: usize,
    acts: [*const BlockQ8K; T],
) -> [f32; T] {
    let mut acc = [_mm256_setzero_ps(); T];
    let zero = _mm512_setzero_si512();
    for i in 0..nb {
        let p = w.add(i * B::BYTES);
        let prep = B::prep(p);
        let mut isum = [_mm512_setzero_si512(); T];
        for m in 0..4 {
            let (q, sc) = B::pair(p, &prep, m);
            let (aq, neg) = if B::SIGNED {
                (_mm512_abs_epi8(q), _mm512_movepi8_mask(q))
            } else {
                (q, 0)
            };
            for t in 0..T {
                let ys = (*acts[t].add(i)).qs.as_ptr();
                let mut y = _mm512_loadu_si512(ys.add(64 * m) as *const __m512i);
                if B::SIGNED {
                    y = _mm512_mask_sub_epi8(y, neg, zero, y);
                }
                let prod = _mm512_madd_epi16(_mm512_maddubs_epi16(aq, y), sc);
                isum[t] = _mm512_add_epi32(isum[t], prod);
            }
        }
        for t in 0..T {
            let s = isum[t];
            let s = _mm256_add_epi32(_mm512_castsi512_si256(s), _mm512_extracti64x4_epi64::<1>(s));
            acc[t] = B::finish(&prep, &*acts[t].add(i), s, acc[t]);
        }
    }
    let mut out = [0.0f32; T];
    for t in 0..T {
        out[t] = hsum_ps(acc[t]);
    }
    out
}

/// Token groups of `TT` (then single tokens) outer, rows `rr` inner: the rows' weights stay in
/// L1/L2 while a group's activations are reused across them. `WIDE`: the 512-bit tile.
#[inline(always)]
unsafe fn rows_impl<B: SuperBlock, const TT: usize, const WIDE: bool>(
    w: QMatRef,
    row_bytes: usize,
    rr: std::ops::Range<usize>,
    acts: &[BlockQ8K],
    n_tokens: usize,
    out: OutPtr,
) {
    let nb = w.cols / QK_K;
    let a = acts.as_ptr();
    let wp = w.data.as_ptr();
    let mut t0 = 0;
    while t0 + TT <= n_tokens {
        let ap: [*const BlockQ8K; TT] = std::array::from_fn(|k| a.add((t0 + k) * nb));
        for r in rr.clone() {
            let p = wp.add(r * row_bytes);
            let v = if WIDE {
                tile512::<B, TT>(p, nb, ap)
            } else {
                tile::<B, TT>(p, nb, ap)
            };
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
            let v = if WIDE {
                tile512::<B, 1>(p, nb, ap)
            } else {
                tile::<B, 1>(p, nb, ap)
            };
            out.write(r, t, v[0]);
        }
    }
}

/// Runs `$f::<type, ...>($args)` for the super-block type `$ty`.
macro_rules! by_type {
    ($ty:expr, $f:ident, <$($g:tt),*>, ($($arg:expr),*)) => {
        match $ty {
            GgmlType::Q2_K => $f::<Q2K, $($g),*>($($arg),*),
            GgmlType::Q3_K => $f::<Q3K, $($g),*>($($arg),*),
            GgmlType::Q4_K => $f::<Q45K<false>, $($g),*>($($arg),*),
            GgmlType::Q5_K => $f::<Q45K<true>, $($g),*>($($arg),*),
            GgmlType::Q6_K => $f::<Q6K, $($g),*>($($arg),*),
            GgmlType::IQ4_XS => $f::<Iq4Xs, $($g),*>($($arg),*),
            other => unreachable!("{other:?} is not a super-block type"),
        }
    };
}

/// One super-block-type row . one token's Q8_K activations with the 256-bit tile.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_one(ty: GgmlType, row: &[u8], act: &[BlockQ8K]) -> f32 {
    let nb = row.len() / ty.type_size();
    assert!(act.len() >= nb);
    let (p, a) = (row.as_ptr(), [act.as_ptr()]);
    by_type!(ty, tile, <1>, (p, nb, a))[0]
}

/// Rows `rr` of a super-block-type matrix, all tokens, at SIMD `level` (AVX2 or better).
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
    assert!(acts.len() >= n_tokens * (w.cols / QK_K));
    assert!(w.data.len() >= rr.end * row_bytes);
    match level {
        SimdLevel::Avx512 => k_rows_avx512(w, row_bytes, rr, acts, n_tokens, out),
        SimdLevel::Avx2Vnni => k_rows_vnni(w, row_bytes, rr, acts, n_tokens, out),
        _ => k_rows_avx2(w, row_bytes, rr, acts, n_tokens, out),
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
    by_type!(w.ty, rows_impl, <4, false>, (w, row_bytes, rr, acts, n_tokens, out))
}

/// The 256-bit tile with AVX-512VL's 32 vector registers (no spills of 8 tokens' sums).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
unsafe fn k_rows_vnni(
    w: QMatRef,
    row_bytes: usize,
    rr: std::ops::Range<usize>,
    acts: &[BlockQ8K],
    n_tokens: usize,
    out: OutPtr,
) {
    by_type!(w.ty, rows_impl, <8, false>, (w, row_bytes, rr, acts, n_tokens, out))
}

/// The 512-bit tile.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
unsafe fn k_rows_avx512(
    w: QMatRef,
    row_bytes: usize,
    rr: std::ops::Range<usize>,
    acts: &[BlockQ8K],
    n_tokens: usize,
    out: OutPtr,
) {
    by_type!(w.ty, rows_impl, <8, true>, (w, row_bytes, rr, acts, n_tokens, out))
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
