//! The packed-group kernels (see `packed.rs` for the layout and the arithmetic they share):
//! AVX-512 (one 512-bit vector = 16 rows), and AVX2 with or without 256-bit VNNI (two passes of
//! 8 rows). A tile keeps `T` tokens' integer block sums and float accumulators in registers
//! while each weight vector, unpacked once per block, meets all `T` tokens.

// Tiles index several per-token arrays with the same loop variable.
#![allow(clippy::needless_range_loop)]
use std::arch::x86_64::*;

use super::matmul::OutPtr;
use super::packed::{PackedMat, GROUP};
use super::quant::{Q8Acts, QK};
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

/// Token `t`'s pointers into `acts`: quants, scales, q8_1 sums, integer sums.
#[inline(always)]
unsafe fn tok(acts: &Q8Acts, t: usize) -> (*const i8, *const f32, *const f32, *const i32) {
    let nb = acts.nb;
    (
        acts.qs.as_ptr().add(t * nb * QK),
        acts.d.as_ptr().add(t * nb),
        acts.s.as_ptr().add(t * nb),
        acts.isum.as_ptr().add(t * nb),
    )
}

#[inline(always)]
unsafe fn dword(p: *const i8) -> i32 {
    (p as *const i32).read_unaligned()
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

/// One group (`q`, `d`, `m`) x tokens `t0..t0 + T`, results to `out`'s rows `r0..r0 + 16`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn tile512<K: Kind, const T: usize>(
    nb: usize,
    q: *const u8,
    d: *const u16,
    m: *const u16,
    acts: &Q8Acts,
    t0: usize,
    r0: usize,
    out: OutPtr,
) {
    // Q8_0 goes through `vpdpbusd` as q + 128: 128 * sum(y) comes off in integers.
    let off = if K::Q8 { 128 } else { K::OFF };
    let mut y = [(
        std::ptr::null(),
        std::ptr::null(),
        std::ptr::null(),
        std::ptr::null(),
    ); T];
    for t in 0..T {
        y[t] = tok(acts, t0 + t);
    }
    let mut acc = [_mm512_setzero_ps(); T];
    let mut corr = [_mm512_setzero_ps(); T];
    for b in 0..nb {
        let qb = q.add(b * K::QB);
        let mut dot = [_mm512_setzero_si512(); T];
        for c in 0..4 {
            let (lo, hi) = pair512::<K>(qb, c);
            for t in 0..T {
                let yb = y[t].0.add(b * QK);
                dot[t] = _mm512_dpbusd_epi32(dot[t], lo, _mm512_set1_epi32(dword(yb.add(4 * c))));
                dot[t] =
                    _mm512_dpbusd_epi32(dot[t], hi, _mm512_set1_epi32(dword(yb.add(16 + 4 * c))));
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
            if off != 0 {
                i = _mm512_sub_epi32(i, _mm512_set1_epi32(off * *y[t].3.add(b)));
            }
            let dd = _mm512_mul_ps(dw, _mm512_set1_ps(*y[t].1.add(b)));
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), dd, acc[t]);
            if K::MIN {
                corr[t] = _mm512_fmadd_ps(mw, _mm512_set1_ps(*y[t].2.add(b)), corr[t]);
            }
        }
    }
    for t in 0..T {
        let v = if K::MIN {
            _mm512_add_ps(acc[t], corr[t])
        } else {
            acc[t]
        };
        _mm512_storeu_ps(out.ptr.add((t0 + t) * out.rows + r0), v);
    }
}

#[inline(always)]
unsafe fn groups512<K: Kind, const T: usize>(
    p: &PackedMat,
    gr: std::ops::Range<usize>,
    acts: &Q8Acts,
    n_tokens: usize,
    out: OutPtr,
) {
    let nb = acts.nb;
    for g in gr {
        let (q, d, m) = p.group(g);
        let (q, d, m) = (q.as_ptr(), d.as_ptr(), m.as_ptr());
        let mut t0 = 0;
        while t0 + T <= n_tokens {
            tile512::<K, T>(nb, q, d, m, acts, t0, g * GROUP, out);
            t0 += T;
        }
        while t0 < n_tokens {
            tile512::<K, 1>(nb, q, d, m, acts, t0, g * GROUP, out);
            t0 += 1;
        }
    }
}

/// Groups `gr` of `p` x all `n_tokens` tokens of `acts`, AVX-512.
///
/// # Safety
/// The CPU has AVX-512 F/BW/VL/VNNI; `acts` holds `n_tokens` tokens of `p.cols()` values with
/// their integer sums; `out` has `n_tokens` rows of `p.rows()` and groups `gr` are written by
/// this call only.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(crate) unsafe fn groups_avx512(
    p: &PackedMat,
    gr: std::ops::Range<usize>,
    acts: &Q8Acts,
    n_tokens: usize,
    out: OutPtr,
) {
    match p.ty() {
        GgmlType::Q4_0 => groups512::<Q40, 8>(p, gr, acts, n_tokens, out),
        GgmlType::Q4_1 => groups512::<Q41, 8>(p, gr, acts, n_tokens, out),
        GgmlType::Q5_0 => groups512::<Q50, 8>(p, gr, acts, n_tokens, out),
        GgmlType::Q5_1 => groups512::<Q51, 8>(p, gr, acts, n_tokens, out),
        GgmlType::Q8_0 => groups512::<Q80, 8>(p, gr, acts, n_tokens, out),
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

#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn tile256<K: Kind, const VNNI: bool, const T: usize>(
    nb: usize,
    q: *const u8,
    d: *const u16,
    m: *const u16,
    acts: &Q8Acts,
    t0: usize,
    r0: usize,
    h: usize,
    out: OutPtr,
) {
    let off = if K::Q8 && VNNI { 128 } else { K::OFF };
    let mut y = [(
        std::ptr::null(),
        std::ptr::null(),
        std::ptr::null(),
        std::ptr::null(),
    ); T];
    for t in 0..T {
        y[t] = tok(acts, t0 + t);
    }
    let mut acc = [_mm256_setzero_ps(); T];
    let mut corr = [_mm256_setzero_ps(); T];
    for b in 0..nb {
        let qb = q.add(b * K::QB);
        let mut dot = [_mm256_setzero_si256(); T];
        for c in 0..4 {
            let (lo, hi) = pair256::<K, VNNI>(qb, c, h);
            for t in 0..T {
                let yb = y[t].0.add(b * QK);
                dot[t] = dot4::<K, VNNI>(dot[t], lo, _mm256_set1_epi32(dword(yb.add(4 * c))));
                dot[t] = dot4::<K, VNNI>(dot[t], hi, _mm256_set1_epi32(dword(yb.add(16 + 4 * c))));
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
            if off != 0 {
                i = _mm256_sub_epi32(i, _mm256_set1_epi32(off * *y[t].3.add(b)));
            }
            let dd = _mm256_mul_ps(dw, _mm256_set1_ps(*y[t].1.add(b)));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), dd, acc[t]);
            if K::MIN {
                corr[t] = _mm256_fmadd_ps(mw, _mm256_set1_ps(*y[t].2.add(b)), corr[t]);
            }
        }
    }
    for t in 0..T {
        let v = if K::MIN {
            _mm256_add_ps(acc[t], corr[t])
        } else {
            acc[t]
        };
        _mm256_storeu_ps(out.ptr.add((t0 + t) * out.rows + r0 + 8 * h), v);
    }
}

#[inline(always)]
unsafe fn groups256<K: Kind, const VNNI: bool, const T: usize>(
    p: &PackedMat,
    gr: std::ops::Range<usize>,
    acts: &Q8Acts,
    n_tokens: usize,
    out: OutPtr,
) {
    let nb = acts.nb;
    for g in gr {
        let (q, d, m) = p.group(g);
        let (q, d, m) = (q.as_ptr(), d.as_ptr(), m.as_ptr());
        for h in 0..2 {
            let mut t0 = 0;
            while t0 + T <= n_tokens {
                tile256::<K, VNNI, T>(nb, q, d, m, acts, t0, g * GROUP, h, out);
                t0 += T;
            }
            while t0 < n_tokens {
                tile256::<K, VNNI, 1>(nb, q, d, m, acts, t0, g * GROUP, h, out);
                t0 += 1;
            }
        }
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
    acts: &Q8Acts,
    n_tokens: usize,
    out: OutPtr,
) {
    match p.ty() {
        GgmlType::Q4_0 => groups256::<Q40, false, 4>(p, gr, acts, n_tokens, out),
        GgmlType::Q4_1 => groups256::<Q41, false, 3>(p, gr, acts, n_tokens, out),
        GgmlType::Q5_0 => groups256::<Q50, false, 4>(p, gr, acts, n_tokens, out),
        GgmlType::Q5_1 => groups256::<Q51, false, 3>(p, gr, acts, n_tokens, out),
        GgmlType::Q8_0 => groups256::<Q80, false, 4>(p, gr, acts, n_tokens, out),
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
    acts: &Q8Acts,
    n_tokens: usize,
    out: OutPtr,
) {
    match p.ty() {
        GgmlType::Q4_0 => groups256::<Q40, true, 8>(p, gr, acts, n_tokens, out),
        GgmlType::Q4_1 => groups256::<Q41, true, 8>(p, gr, acts, n_tokens, out),
        GgmlType::Q5_0 => groups256::<Q50, true, 8>(p, gr, acts, n_tokens, out),
        GgmlType::Q5_1 => groups256::<Q51, true, 8>(p, gr, acts, n_tokens, out),
        GgmlType::Q8_0 => groups256::<Q80, true, 8>(p, gr, acts, n_tokens, out),
        ty => unreachable!("{ty:?} does not pack"),
    }
}
