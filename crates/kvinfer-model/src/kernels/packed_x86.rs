//! The packed-group kernels (see `packed.rs` for the layout and the arithmetic they share):
//! AVX-512 (one 512-bit vector = 16 rows), and AVX2 with or without 256-bit VNNI (two passes of
//! 8 rows). A tile keeps `T` tokens' integer block sums and float accumulators in registers
//! while each weight vector, unpacked once per block, meets all `T` tokens.

// Tiles index several per-token arrays with the same loop variable.
#![allow(clippy::needless_range_loop)]
use std::arch::x86_64::*;

use super::matmul::OutPtr;
use super::packed::{PackedMat, Tile, TiledActs, GROUP};
use crate::ggml_type::GgmlType;

/// What differs between the packed 32-weight types.
trait Kind {
    /// Bytes of one block of one group in the quant area.
    const QB: usize;
    /// `w = d * (q - OFF)`.
    const OFF: i32;
    /// A min per block (`w = d * q + m`).
    const MIN: bool;
    /// Fifth bits in 8 masks ahead of the nibbles.
    const FIVE: bool;
    /// Signed byte quants (Q8_0).
    const Q8: bool;
}

struct Q40;
struct Q41;
struct Q50;
struct Q51;
struct Q80;

impl Kind for Q40 {
    const QB: usize = 256;
    const OFF: i32 = 8;
    const MIN: bool = false;
    const FIVE: bool = false;
    const Q8: bool = false;
}
impl Kind for Q41 {
    const QB: usize = 256;
    const OFF: i32 = 0;
    const MIN: bool = true;
    const FIVE: bool = false;
    const Q8: bool = false;
}
impl Kind for Q50 {
    const QB: usize = 320;
    const OFF: i32 = 16;
    const MIN: bool = false;
    const FIVE: bool = true;
    const Q8: bool = false;
}
impl Kind for Q51 {
    const QB: usize = 320;
    const OFF: i32 = 0;
    const MIN: bool = true;
    const FIVE: bool = true;
    const Q8: bool = false;
}
impl Kind for Q80 {
    const QB: usize = 512;
    const OFF: i32 = 0;
    const MIN: bool = false;
    const FIVE: bool = false;
    const Q8: bool = true;
}

// ---------------------------------------------------------------------------------------------
// AVX-512: 16 rows per vector.
// ---------------------------------------------------------------------------------------------

/// Weight vectors for chunks `c` and `c + 4` of block `qb` as unsigned bytes.
#[inline(always)]
unsafe fn pair512<K: Kind>(qb: *const u8, c: usize) -> (__m512i, __m512i) {
    if K::Q8 {
        let x = _mm512_set1_epi8(-128);
        let lo = _mm512_loadu_si512(qb.add(64 * c) as *const __m512i);
        let hi = _mm512_loadu_si512(qb.add(64 * (c + 4)) as *const __m512i);
        return (_mm512_xor_si512(lo, x), _mm512_xor_si512(hi, x));
    }
    let base = if K::FIVE { 64 } else { 0 };
    let v = _mm512_loadu_si512(qb.add(base + 64 * c) as *const __m512i);
    let m4 = _mm512_set1_epi8(0xF);
    let mut lo = _mm512_and_si512(v, m4);
    let mut hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), m4);
    if K::FIVE {
        let b16 = _mm512_set1_epi8(0x10);
        let k0 = (qb.add(16 * c) as *const u64).read_unaligned();
        let k1 = (qb.add(16 * c + 8) as *const u64).read_unaligned();
        lo = _mm512_mask_add_epi8(lo, k0, lo, b16);
        hi = _mm512_mask_add_epi8(hi, k1, hi, b16);
    }
    (lo, hi)
}

/// One group (`q`, `d`, `m`) x the `T` tokens of tile `y` (at token `t0`), results to `out`'s
/// rows `r0..r0 + 16`.
#[inline(always)]
unsafe fn tile512<K: Kind, const T: usize>(
    nb: usize,
    (q, d, m): (*const u8, *const u16, *const u16),
    y: Tile,
    t0: usize,
    r0: usize,
    out: OutPtr,
) {
    let mut acc = [_mm512_setzero_ps(); T];
    for b in 0..nb {
        let qb = q.add(b * K::QB);
        let yq = y.qs.add(b * 8 * T);
        let mut dot = [_mm512_setzero_si512(); T];
        for c in 0..4 {
            let (lo, hi) = pair512::<K>(qb, c);
            for t in 0..T {
                dot[t] = _mm512_dpbusd_epi32(dot[t], lo, _mm512_set1_epi32(*yq.add(c * T + t)));
                dot[t] =
                    _mm512_dpbusd_epi32(dot[t], hi, _mm512_set1_epi32(*yq.add((4 + c) * T + t)));
            }
        }
        let dw = _mm512_cvtph_ps(_mm256_loadu_si256(d.add(GROUP * b) as *const __m256i));
        let mw = if K::MIN {
            _mm512_cvtph_ps(_mm256_loadu_si256(m.add(GROUP * b) as *const __m256i))
        } else {
            _mm512_setzero_ps()
        };
        for t in 0..T {
            let mut i = dot[t];
            if K::OFF != 0 || K::Q8 {
                i = _mm512_sub_epi32(i, _mm512_set1_epi32(*y.off.add(b * T + t)));
            }
            let dd = _mm512_mul_ps(dw, _mm512_set1_ps(*y.d.add(b * T + t)));
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), dd, acc[t]);
            if K::MIN {
                acc[t] = _mm512_fmadd_ps(mw, _mm512_set1_ps(*y.s.add(b * T + t)), acc[t]);
            }
        }
    }
    for t in 0..T {
        _mm512_storeu_ps(out.ptr.add((t0 + t) * out.rows + r0), acc[t]);
    }
}

/// `by_width! { r, f, [G, ..], (args) }` calls `f::<G, .., R>(args)` with the tile width `r`
/// (1..=8) as the constant `R` (braces keep rustfmt off the generics list).
macro_rules! by_width {
    ($r:expr, $f:ident, [$($g:tt)*], ($($a:expr),*)) => {
        match $r {
            1 => $f::<$($g)* 1>($($a),*),
            2 => $f::<$($g)* 2>($($a),*),
            3 => $f::<$($g)* 3>($($a),*),
            4 => $f::<$($g)* 4>($($a),*),
            5 => $f::<$($g)* 5>($($a),*),
            6 => $f::<$($g)* 6>($($a),*),
            7 => $f::<$($g)* 7>($($a),*),
            8 => $f::<$($g)* 8>($($a),*),
            r => unreachable!("tile width {r}"),
        }
    };
}

#[inline(always)]
unsafe fn groups512<K: Kind>(
    p: &PackedMat,
    gr: std::ops::Range<usize>,
    y: &TiledActs,
    out: OutPtr,
) {
    // Token tiles outside: a tile's activations stay in L1 while the task's groups stream by
    // (their weights are read in order, which the prefetchers follow).
    let nb = y.nb;
    let mut t0 = 0;
    while t0 < y.n_tokens {
        let r = y.w.min(y.n_tokens - t0);
        let tile = y.tile(t0);
        for g in gr.clone() {
            let (q, d, m) = p.group(g);
            let qdm = (q.as_ptr(), d.as_ptr(), m.as_ptr());
            by_width! { r, tile512, [K,], (nb, qdm, tile, t0, g * GROUP, out) }
        }
        t0 += r;
    }
}

/// Groups `gr` of `p` x all tokens of `y` (laid out in tiles of [`width`] with the offsets of
/// [`int_offset`]), AVX-512.
///
/// # Safety
/// The CPU has AVX-512 F/BW/VL/VNNI; `y` holds tokens of `p.cols()` values; `out` has
/// `y.n_tokens` rows of `p.rows()` and groups `gr` are written by this call only.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(crate) unsafe fn groups_avx512(
    p: &PackedMat,
    gr: std::ops::Range<usize>,
    y: &TiledActs,
    out: OutPtr,
) {
    match p.ty() {
        GgmlType::Q4_0 => groups512::<Q40>(p, gr, y, out),
        GgmlType::Q4_1 => groups512::<Q41>(p, gr, y, out),
        GgmlType::Q5_0 => groups512::<Q50>(p, gr, y, out),
        GgmlType::Q5_1 => groups512::<Q51>(p, gr, y, out),
        GgmlType::Q8_0 => groups512::<Q80>(p, gr, y, out),
        ty => unreachable!("{ty:?} does not pack"),
    }
}

// ---------------------------------------------------------------------------------------------
// AVX2 (VNNI = 256-bit `vpdpbusd`): rows 0..8 then 8..16 of a group, half `h`.
// ---------------------------------------------------------------------------------------------

/// The 32 fifth bits of a Q5 mask half as bytes 0x10 / 0x00.
#[inline(always)]
unsafe fn five_bits(bits: u32) -> __m256i {
    let v = _mm256_set1_epi32(bits as i32);
    let shuf = _mm256_setr_epi8(
        0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3,
        3, 3,
    );
    let sel = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    let x = _mm256_and_si256(_mm256_shuffle_epi8(v, shuf), sel);
    _mm256_and_si256(_mm256_cmpeq_epi8(x, sel), _mm256_set1_epi8(0x10))
}

/// Weight vectors for chunks `c` and `c + 4`, rows of half `h`: unsigned bytes, or for Q8_0
/// without VNNI the signed quants.
#[inline(always)]
unsafe fn pair256<K: Kind, const VNNI: bool>(
    qb: *const u8,
    c: usize,
    h: usize,
) -> (__m256i, __m256i) {
    if K::Q8 {
        let lo = _mm256_loadu_si256(qb.add(64 * c + 32 * h) as *const __m256i);
        let hi = _mm256_loadu_si256(qb.add(64 * (c + 4) + 32 * h) as *const __m256i);
        if VNNI {
            let x = _mm256_set1_epi8(-128);
            return (_mm256_xor_si256(lo, x), _mm256_xor_si256(hi, x));
        }
        return (lo, hi);
    }
    let base = if K::FIVE { 64 } else { 0 };
    let v = _mm256_loadu_si256(qb.add(base + 64 * c + 32 * h) as *const __m256i);
    let m4 = _mm256_set1_epi8(0xF);
    let mut lo = _mm256_and_si256(v, m4);
    let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), m4);
    if K::FIVE {
        let k0 = (qb.add(16 * c + 4 * h) as *const u32).read_unaligned();
        let k1 = (qb.add(16 * c + 8 + 4 * h) as *const u32).read_unaligned();
        lo = _mm256_or_si256(lo, five_bits(k0));
        hi = _mm256_or_si256(hi, five_bits(k1));
    }
    (lo, hi)
}

/// `acc + w . y` in 8 i32 lanes (4 byte products each).
#[inline(always)]
unsafe fn dot4<K: Kind, const VNNI: bool>(acc: __m256i, w: __m256i, y: __m256i) -> __m256i {
    if VNNI {
        return _mm256_dpbusd_epi32(acc, w, y);
    }
    let p = if K::Q8 {
        _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(y, w))
    } else {
        _mm256_maddubs_epi16(w, y)
    };
    _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)))
}

#[inline(always)]
unsafe fn tile256<K: Kind, const VNNI: bool, const T: usize>(
    nb: usize,
    (q, d, m): (*const u8, *const u16, *const u16),
    y: Tile,
    (t0, r0, h): (usize, usize, usize),
    out: OutPtr,
) {
    let mut acc = [_mm256_setzero_ps(); T];
    for b in 0..nb {
        let qb = q.add(b * K::QB);
        let yq = y.qs.add(b * 8 * T);
        let mut dot = [_mm256_setzero_si256(); T];
        for c in 0..4 {
            let (lo, hi) = pair256::<K, VNNI>(qb, c, h);
            for t in 0..T {
                dot[t] = dot4::<K, VNNI>(dot[t], lo, _mm256_set1_epi32(*yq.add(c * T + t)));
                dot[t] = dot4::<K, VNNI>(dot[t], hi, _mm256_set1_epi32(*yq.add((4 + c) * T + t)));
            }
        }
        let at = GROUP * b + 8 * h;
        let dw = _mm256_cvtph_ps(_mm_loadu_si128(d.add(at) as *const __m128i));
        let mw = if K::MIN {
            _mm256_cvtph_ps(_mm_loadu_si128(m.add(at) as *const __m128i))
        } else {
            _mm256_setzero_ps()
        };
        for t in 0..T {
            let mut i = dot[t];
            if K::OFF != 0 || (K::Q8 && VNNI) {
                i = _mm256_sub_epi32(i, _mm256_set1_epi32(*y.off.add(b * T + t)));
            }
            let dd = _mm256_mul_ps(dw, _mm256_set1_ps(*y.d.add(b * T + t)));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), dd, acc[t]);
            if K::MIN {
                acc[t] = _mm256_fmadd_ps(mw, _mm256_set1_ps(*y.s.add(b * T + t)), acc[t]);
            }
        }
    }
    for t in 0..T {
        _mm256_storeu_ps(out.ptr.add((t0 + t) * out.rows + r0 + 8 * h), acc[t]);
    }
}

#[inline(always)]
unsafe fn groups256<K: Kind, const VNNI: bool>(
    p: &PackedMat,
    gr: std::ops::Range<usize>,
    y: &TiledActs,
    out: OutPtr,
) {
    let nb = y.nb;
    let mut t0 = 0;
    while t0 < y.n_tokens {
        let r = y.w.min(y.n_tokens - t0);
        let tile = y.tile(t0);
        for g in gr.clone() {
            let (q, d, m) = p.group(g);
            let qdm = (q.as_ptr(), d.as_ptr(), m.as_ptr());
            for h in 0..2 {
                let at = (t0, g * GROUP, h);
                by_width! { r, tile256, [K, VNNI,], (nb, qdm, tile, at, out) }
            }
        }
        t0 += r;
    }
}

/// [`groups_avx512`] with AVX2 (+FMA, F16C).
///
/// # Safety
/// As [`groups_avx512`], with AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn groups_avx2(
    p: &PackedMat,
    gr: std::ops::Range<usize>,
    y: &TiledActs,
    out: OutPtr,
) {
    match p.ty() {
        GgmlType::Q4_0 => groups256::<Q40, false>(p, gr, y, out),
        GgmlType::Q4_1 => groups256::<Q41, false>(p, gr, y, out),
        GgmlType::Q5_0 => groups256::<Q50, false>(p, gr, y, out),
        GgmlType::Q5_1 => groups256::<Q51, false>(p, gr, y, out),
        GgmlType::Q8_0 => groups256::<Q80, false>(p, gr, y, out),
        ty => unreachable!("{ty:?} does not pack"),
    }
}

/// [`groups_avx512`] on 256-bit vectors with VNNI (32 registers).
///
/// # Safety
/// As [`groups_avx512`].
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(crate) unsafe fn groups_avx2vnni(
    p: &PackedMat,
    gr: std::ops::Range<usize>,
    y: &TiledActs,
    out: OutPtr,
) {
    match p.ty() {
        GgmlType::Q4_0 => groups256::<Q40, true>(p, gr, y, out),
        GgmlType::Q4_1 => groups256::<Q41, true>(p, gr, y, out),
        GgmlType::Q5_0 => groups256::<Q50, true>(p, gr, y, out),
        GgmlType::Q5_1 => groups256::<Q51, true>(p, gr, y, out),
        GgmlType::Q8_0 => groups256::<Q80, true>(p, gr, y, out),
        ty => unreachable!("{ty:?} does not pack"),
    }
}

/// Tokens per tile of the kernel for `ty` at `level` (the [`TiledActs`] width it wants): as many
/// as keep every accumulator in registers (16 on AVX2, 32 with AVX-512).
pub(crate) fn width(level: super::SimdLevel, ty: GgmlType) -> usize {
    match level {
        super::SimdLevel::Avx512 | super::SimdLevel::Avx2Vnni => 8,
        _ if super::packed::has_min(ty) => 3,
        _ => 4,
    }
}

/// What the kernel for `ty` at `level` subtracts per block, times the block's quant sum: the
/// type's offset (Q4_0 8, Q5_0 16), or 128 for Q8_0 through `vpdpbusd` (its quants go in as
/// `q + 128`).
pub(crate) fn int_offset(level: super::SimdLevel, ty: GgmlType) -> i32 {
    match ty {
        GgmlType::Q8_0 if level >= super::SimdLevel::Avx2Vnni => 128,
        _ => super::packed::offset(ty),
    }
}
