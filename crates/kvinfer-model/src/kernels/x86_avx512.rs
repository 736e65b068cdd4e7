//! AVX-512 (F, BW, VL, VNNI) kernels for the 32-weight types: two blocks per 512-bit vector.
//!
//! Same arithmetic as `x86::q32_tile` (unsigned quants `u`, `w = d * u + m`, the `m * s` part
//! separate), but a `vpdpbusd zmm` covers blocks `b` and `b + 1` at once, which halves the
//! instruction count of the AVX2 kernels; this is what bounds them on small models.
//!
//! Nibble types unpack a block pair into 128-bit lanes `[b lo, b+1 lo, b hi, b+1 hi]`
//! ("interleaved"; activations are shuffled to match once per pair and token), Q8_0 keeps the
//! natural order `[b, b+1]`. Either way each 128-bit lane belongs to a single block, so the
//! per-block scales are applied by a lane pattern built with one `vpermps`. An odd last block
//! is a pair step with zero activations in the second block's lanes.
//!
//! Batch invariance: decode (`dot_rows2`) and tiles (`tile2` + `min_corrections::<true>`)
//! compute each (row, token) result with the same sequence of operations (see the comment
//! above `dot_step2`), so a token's output bits do not depend on the batch or row grouping.

// Tiles index several per-row / per-token arrays with the same loop variable.
#![allow(clippy::needless_range_loop)]
use std::arch::x86_64::*;

use super::matmul::OutPtr;
use super::quant::{Q8Acts, QK};
use super::x86::{
    decode_prefetch_distance, min_corrections, Block32, IQ4_NL, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
};
use crate::ggml_type::GgmlType;

/// Unpacking of two consecutive blocks into one 512-bit vector of unsigned quants.
pub(crate) trait Block32x2: Block32 {
    /// Lane order `[b, b+1]` (true) or `[b lo, b+1 lo, b hi, b+1 hi]` (false).
    const NATURAL: bool;
    /// Unsigned quants of the blocks at `p0` and `p1` (Q8_0: `q ^ 0x80`, offset 128).
    unsafe fn quants2(p0: *const u8, p1: *const u8) -> __m512i;
}

/// Low nibbles and high nibbles of two 16-byte `qs` arrays, interleaved order.
#[inline(always)]
unsafe fn nibbles_64(q0: *const u8, q1: *const u8) -> __m512i {
    let lo = _mm_loadu_si128(q0 as *const __m128i);
    let v = _mm256_inserti128_si256(
        _mm256_castsi128_si256(lo),
        _mm_loadu_si128(q1 as *const __m128i),
        1,
    );
    let both = _mm512_inserti64x4(_mm512_castsi256_si512(v), _mm256_srli_epi16(v, 4), 1);
    _mm512_and_si512(both, _mm512_set1_epi8(0xF))
}

/// Fifth bits (`qh`, u32 at `h0`, `h1`) as 0x10 bytes, interleaved order.
#[inline(always)]
unsafe fn high_bits_64(h0: *const u8, h1: *const u8) -> __m512i {
    let a = (h0 as *const u32).read_unaligned() as u64;
    let b = (h1 as *const u32).read_unaligned() as u64;
    let mask = (a & 0xFFFF) | ((b & 0xFFFF) << 16) | ((a >> 16) << 32) | ((b >> 16) << 48);
    _mm512_maskz_mov_epi8(mask, _mm512_set1_epi8(0x10))
}

impl Block32x2 for Q4_0 {
    const NATURAL: bool = false;
    #[inline(always)]
    unsafe fn quants2(p0: *const u8, p1: *const u8) -> __m512i {
        nibbles_64(p0.add(2), p1.add(2))
    }
}

impl Block32x2 for Q4_1 {
    const NATURAL: bool = false;
    #[inline(always)]
    unsafe fn quants2(p0: *const u8, p1: *const u8) -> __m512i {
        nibbles_64(p0.add(4), p1.add(4))
    }
}

impl Block32x2 for Q5_0 {
    const NATURAL: bool = false;
    #[inline(always)]
    unsafe fn quants2(p0: *const u8, p1: *const u8) -> __m512i {
        _mm512_or_si512(
            nibbles_64(p0.add(6), p1.add(6)),
            high_bits_64(p0.add(2), p1.add(2)),
        )
    }
}

impl Block32x2 for Q5_1 {
    const NATURAL: bool = false;
    #[inline(always)]
    unsafe fn quants2(p0: *const u8, p1: *const u8) -> __m512i {
        _mm512_or_si512(
            nibbles_64(p0.add(8), p1.add(8)),
            high_bits_64(p0.add(4), p1.add(4)),
        )
    }
}

impl Block32x2 for Q8_0 {
    const NATURAL: bool = true;
    #[inline(always)]
    unsafe fn quants2(p0: *const u8, p1: *const u8) -> __m512i {
        let a = _mm256_loadu_si256(p0.add(2) as *const __m256i);
        let v = _mm512_inserti64x4(
            _mm512_castsi256_si512(a),
            _mm256_loadu_si256(p1.add(2) as *const __m256i),
            1,
        );
        _mm512_xor_si512(v, _mm512_set1_epi8(-128))
    }
}

impl Block32x2 for IQ4_NL {
    const NATURAL: bool = false;
    /// The nibbles looked up in `KVALUES_IQ4` + 128 (the signed values' offset, as Q8_0).
    #[inline(always)]
    unsafe fn quants2(p0: *const u8, p1: *const u8) -> __m512i {
        let table = _mm512_broadcast_i32x4(_mm_loadu_si128(
            super::quant::KVALUES_IQ4.as_ptr() as *const __m128i
        ));
        let v = _mm512_shuffle_epi8(table, nibbles_64(p0.add(2), p1.add(2)));
        _mm512_xor_si512(v, _mm512_set1_epi8(-128))
    }
}

/// Index vector spreading lanes 0 and `second` of a vector over the 16 i32 lanes of a pair.
#[inline(always)]
unsafe fn pair_pattern<B: Block32x2>(second: i32) -> __m512i {
    if B::NATURAL {
        _mm512_setr_epi32(
            0, 0, 0, 0, 0, 0, 0, 0, second, second, second, second, second, second, second, second,
        )
    } else {
        _mm512_setr_epi32(
            0, 0, 0, 0, second, second, second, second, 0, 0, 0, 0, second, second, second, second,
        )
    }
}

/// Activation quants of blocks `b`, `b + 1`, in the lane order of `B`; for the `TAIL` of an
/// odd block count only block `b` is read and block `b + 1`'s lanes are zero.
#[inline(always)]
unsafe fn load_y2<B: Block32x2, const TAIL: bool>(yq: *const i8) -> __m512i {
    let y = if TAIL {
        _mm512_maskz_loadu_epi8(0xFFFF_FFFF, yq)
    } else {
        _mm512_loadu_si512(yq as *const __m512i)
    };
    if B::NATURAL {
        y
    } else {
        _mm512_shuffle_i64x2::<0b11_01_10_00>(y, y)
    }
}

/// Lanes (v[b], v[b + 1], 0, 0) of an f32 array, or (v[b], 0, 0, 0) for the `TAIL`.
#[inline(always)]
unsafe fn load_f32x2<const TAIL: bool>(p: *const f32) -> __m128 {
    if TAIL {
        _mm_load_ss(p)
    } else {
        _mm_castpd_ps(_mm_load_sd(p as *const f64))
    }
}

/// Lanes (d0, m0, d1, m1) of two blocks.
#[inline(always)]
unsafe fn scale_min2<B: Block32x2>(p0: *const u8, p1: *const u8) -> __m128 {
    if B::HAS_MIN {
        let a = (p0 as *const i32).read_unaligned();
        let b = (p1 as *const i32).read_unaligned();
        _mm_cvtph_ps(_mm_setr_epi32(a, b, 0, 0))
    } else {
        let a = (p0 as *const u16).read_unaligned() as i32;
        let b = (p1 as *const u16).read_unaligned() as i32;
        let dd = _mm_cvtph_ps(_mm_setr_epi32(a | (a << 16), b | (b << 16), 0, 0));
        let off = if B::SIGNED { 128.0 } else { B::OFFSET };
        _mm_mul_ps(dd, _mm_setr_ps(1.0, -off, 1.0, -off))
    }
}

// Batch invariance: a (row, token) result is defined by one sequence of operations, which the
// decode kernel (`dot_rows2`) and the tile kernel (`tile2` + `min_corrections::<true>`) both
// follow exactly:
//   acc (16 lanes) = 0; for each block pair (b, b + 1) (an odd last block pairs with zeros):
//     acc = fma(cvt(dpbusd(0, u, y)), lanes of (d_w[b] * d_y[b], d_w[b+1] * d_y[b+1]), acc)
//   ce = sum of m_w[b] * s_y[b] over even b, co over odd b (running sums in block order)
//   result = reduce_add(acc) + (ce + co)

/// One pair step of the decode kernel: `R` rows x `T` tokens (blocks `b`, `b + 1`, or the
/// `TAIL` block), weights unpacked once for the `T` tokens. Scales and mins are read inline:
/// `(d_w, m_w) * (d_y, s_y)` of two blocks in one 128-bit multiply.
#[inline(always)]
#[allow(clippy::too_many_arguments)] // a hot inner step: its state is passed in registers, not a struct
unsafe fn dot_step2<B: Block32x2, const R: usize, const T: usize, const TAIL: bool>(
    b: usize,
    w: &[*const u8; R],
    pf: usize,
    yq: &[*const i8; T],
    yd: &[*const f32; T],
    ys: &[*const f32; T],
    acc: &mut [[__m512; T]; R],
    corr: &mut [[__m128; T]; R],
) {
    let pat = pair_pattern::<B>(2);
    let mut y = [_mm512_setzero_si512(); T];
    let mut dys = [_mm_setzero_ps(); T];
    for t in 0..T {
        y[t] = load_y2::<B, TAIL>(yq[t].add(b * QK));
        let dy = load_f32x2::<TAIL>(yd[t].add(b));
        let sy = load_f32x2::<TAIL>(ys[t].add(b));
        dys[t] = _mm_unpacklo_ps(dy, sy);
    }
    for r in 0..R {
        let p0 = w[r].add(b * B::BYTES);
        if !TAIL && pf != 0 {
            _mm_prefetch::<_MM_HINT_T0>(p0.wrapping_add(pf) as *const i8);
        }
        let p1 = if TAIL { p0 } else { p0.add(B::BYTES) };
        let u = B::quants2(p0, p1);
        let sm = scale_min2::<B>(p0, p1);
        for t in 0..T {
            let isum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, y[t]);
            let prod = _mm_mul_ps(sm, dys[t]);
            corr[r][t] = _mm_add_ps(corr[r][t], prod);
            let scale = _mm512_permutexvar_ps(pat, _mm512_castps128_ps512(prod));
            acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, acc[r][t]);
        }
    }
}

/// Decode: `R` rows x `T` tokens (one token, or a small batch of decodes), two blocks per
/// step; every (row, token) is the same sequence of operations whatever `R` and `T` are.
#[inline(always)]
unsafe fn dot_rows2<B: Block32x2, const R: usize, const T: usize>(
    nb: usize,
    w: [*const u8; R],
    pf: usize,
    yq: [*const i8; T],
    yd: [*const f32; T],
    ys: [*const f32; T],
) -> [[f32; T]; R] {
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    let mut corr = [[_mm_setzero_ps(); T]; R];
    let mut b = 0;
    while b + 2 <= nb {
        dot_step2::<B, R, T, false>(b, &w, pf, &yq, &yd, &ys, &mut acc, &mut corr);
        b += 2;
    }
    if b < nb {
        dot_step2::<B, R, T, true>(b, &w, pf, &yq, &yd, &ys, &mut acc, &mut corr);
    }
    let mut out = [[0.0f32; T]; R];
    for r in 0..R {
        for t in 0..T {
            let c = _mm_add_ps(corr[r][t], _mm_movehl_ps(corr[r][t], corr[r][t]));
            out[r][t] = _mm512_reduce_add_ps(acc[r][t]) + _mm_cvtss_f32(_mm_movehdup_ps(c));
        }
    }
    out
}

/// Rows x a few tokens (2..=`SMALL_BATCH`): pairs of rows, tokens in groups of up to 4.
#[inline(always)]
unsafe fn small_batch_rows<B: Block32x2>(
    w: &[u8],
    row_bytes: usize,
    rows: std::ops::Range<usize>,
    acts: &Q8Acts,
    n_tokens: usize,
    out: OutPtr,
) {
    let nb = acts.nb;
    let pf = decode_prefetch_distance(row_bytes, 2);
    let row = |r: usize| w.as_ptr().add(r * row_bytes);
    let tok = |t: usize| {
        (
            acts.qs.as_ptr().add(t * nb * QK),
            acts.d.as_ptr().add(t * nb),
            acts.s.as_ptr().add(t * nb),
        )
    };
    macro_rules! run {
        ($r0:expr, $t0:expr, $R:literal, $T:literal) => {{
            let yq: [*const i8; $T] = std::array::from_fn(|t| tok($t0 + t).0);
            let yd: [*const f32; $T] = std::array::from_fn(|t| tok($t0 + t).1);
            let ys: [*const f32; $T] = std::array::from_fn(|t| tok($t0 + t).2);
            let w: [*const u8; $R] = std::array::from_fn(|k| row($r0 + k));
            let v = dot_rows2::<B, $R, $T>(nb, w, pf, yq, yd, ys);
            for k in 0..$R {
                for t in 0..$T {
                    out.write($r0 + k, $t0 + t, v[k][t]);
                }
            }
        }};
    }
    let mut r = rows.start;
    while r < rows.end {
        let pair = rows.end - r >= 2;
        let mut t0 = 0;
        while t0 < n_tokens {
            let g = (n_tokens - t0).min(4);
            match (pair, g) {
                (true, 4) => run!(r, t0, 2, 4),
                (true, 3) => run!(r, t0, 2, 3),
                (true, 2) => run!(r, t0, 2, 2),
                (true, _) => run!(r, t0, 2, 1),
                (false, 4) => run!(r, t0, 1, 4),
                (false, 3) => run!(r, t0, 1, 3),
                (false, 2) => run!(r, t0, 1, 2),
                (false, _) => run!(r, t0, 1, 1),
            }
            t0 += g;
        }
        r += if pair { 2 } else { 1 };
    }
}

/// Most tokens the small-batch kernel takes; larger batches use the tile kernel, which reuses
/// each unpacked weight block for more tokens.
const SMALL_BATCH: usize = 16;

/// One pair step of the tile kernel (blocks `b`, `b + 1`, or the `TAIL` block).
#[inline(always)]
unsafe fn tile_step2<B: Block32x2, const R: usize, const T: usize, const TAIL: bool>(
    b: usize,
    w: &[*const u8; R],
    dw: &[*const f32; R],
    yq: &[*const i8; T],
    yd: &[*const f32; T],
    acc: &mut [[__m512; T]; R],
) {
    let pat = pair_pattern::<B>(1);
    let mut u = [_mm512_setzero_si512(); R];
    let mut dwp = [_mm512_setzero_ps(); R];
    for r in 0..R {
        let p0 = w[r].add(b * B::BYTES);
        u[r] = B::quants2(p0, if TAIL { p0 } else { p0.add(B::BYTES) });
        let d2 = load_f32x2::<TAIL>(dw[r].add(b));
        dwp[r] = _mm512_permutexvar_ps(pat, _mm512_castps128_ps512(d2));
    }
    for t in 0..T {
        let y = load_y2::<B, TAIL>(yq[t].add(b * QK));
        let d2 = load_f32x2::<TAIL>(yd[t].add(b));
        let dyp = _mm512_permutexvar_ps(pat, _mm512_castps128_ps512(d2));
        for r in 0..R {
            let isum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u[r], y);
            let dd = _mm512_mul_ps(dwp[r], dyp);
            acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), dd, acc[r][t]);
        }
    }
}

/// Prefill: `R` rows x `T` tokens, two blocks per step; `dw[r]` are row r's block scales
/// (f32, unpacked by the caller). Returns `reduce_add(acc)` per (r, t), without the mins.
/// By far the most time of prompt processing is spent here.
#[inline(always)]
unsafe fn tile2<B: Block32x2, const R: usize, const T: usize>(
    nb: usize,
    w: [*const u8; R],
    dw: [*const f32; R],
    yq: [*const i8; T],
    yd: [*const f32; T],
) -> [[f32; T]; R] {
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    let mut b = 0;
    while b + 2 <= nb {
        tile_step2::<B, R, T, false>(b, &w, &dw, &yq, &yd, &mut acc);
        b += 2;
    }
    if b < nb {
        tile_step2::<B, R, T, true>(b, &w, &dw, &yq, &yd, &mut acc);
    }
    let mut out = [[0.0f32; T]; R];
    for r in 0..R {
        for t in 0..T {
            out[r][t] = _mm512_reduce_add_ps(acc[r][t]);
        }
    }
    out
}

/// `R` rows from `r0`, all tokens (tiles of `T`, then single tokens); `dm` is scratch for
/// the rows' scales and mins (`[R][2][nb]`), `corr` for their min corrections
/// (`[R][n_tokens]`), `odd` for `min_corrections`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn rows_block<B: Block32x2, const R: usize, const T: usize>(
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
    for r in 0..R {
        wp[r] = w.as_ptr().add((r0 + r) * row_bytes);
        let (dr, mr) = dm[2 * r * nb..2 * (r + 1) * nb].split_at_mut(nb);
        for b in 0..nb {
            let (d, m) = B::scale_min(wp[r].add(b * B::BYTES));
            dr[b] = d;
            mr[b] = if B::SIGNED { -128.0 * d } else { m };
        }
        dwp[r] = dr.as_ptr();
        min_corrections::<true>(
            mr,
            &acts.st[..nb * n_tokens],
            &mut corr[r * n_tokens..(r + 1) * n_tokens],
            odd,
        );
    }
    let tok = |t: usize| {
        (
            acts.qs.as_ptr().add(t * nb * QK),
            acts.d.as_ptr().add(t * nb),
        )
    };
    let finish = |r: usize, t: usize, v: f32| {
        out.write(r0 + r, t, v + corr[r * n_tokens + t]);
    };
    let mut t0 = 0;
    while t0 + T <= n_tokens {
        let mut yq = [std::ptr::null(); T];
        let mut yd = [std::ptr::null(); T];
        for t in 0..T {
            (yq[t], yd[t]) = tok(t0 + t);
        }
        let v = tile2::<B, R, T>(nb, wp, dwp, yq, yd);
        for r in 0..R {
            for t in 0..T {
                finish(r, t0 + t, v[r][t]);
            }
        }
        t0 += T;
    }
    // The last 1-3 tokens in one narrower tile, so the weights are unpacked once for them
    // (small batches of decodes live here). A tile's width changes no output's operations.
    macro_rules! tail_tile {
        ($n:literal) => {{
            let yq: [*const i8; $n] = std::array::from_fn(|t| tok(t0 + t).0);
            let yd: [*const f32; $n] = std::array::from_fn(|t| tok(t0 + t).1);
            let v = tile2::<B, R, $n>(nb, wp, dwp, yq, yd);
            for r in 0..R {
                for t in 0..$n {
                    finish(r, t0 + t, v[r][t]);
                }
            }
        }};
    }
    match n_tokens - t0 {
        3 => tail_tile!(3),
        2 => tail_tile!(2),
        1 => tail_tile!(1),
        _ => {}
    }
}

/// Decode (one token): `DR` rows per pass (more independent loads in flight), prefetching
/// the blocks a few rows ahead. Row grouping does not change any row's operations.
#[inline(always)]
unsafe fn decode_rows<B: Block32x2, const DR: usize>(
    w: &[u8],
    row_bytes: usize,
    rows: std::ops::Range<usize>,
    acts: &Q8Acts,
    out: OutPtr,
) {
    let nb = acts.nb;
    let pf = decode_prefetch_distance(row_bytes, DR);
    let (yq, yd, ys) = (acts.qs.as_ptr(), acts.d.as_ptr(), acts.s.as_ptr());
    let row = |r: usize| w.as_ptr().add(r * row_bytes);
    let mut r = rows.start;
    while r + DR <= rows.end {
        let w = std::array::from_fn(|k| row(r + k));
        let v = dot_rows2::<B, DR, 1>(nb, w, pf, [yq], [yd], [ys]);
        for (k, v) in v.into_iter().enumerate() {
            out.write(r + k, 0, v[0]);
        }
        r += DR;
    }
    while r < rows.end {
        out.write(
            r,
            0,
            dot_rows2::<B, 1, 1>(nb, [row(r)], pf, [yq], [yd], [ys])[0][0],
        );
        r += 1;
    }
}

#[inline(always)]
unsafe fn rows<B: Block32x2>(
    w: &[u8],
    row_bytes: usize,
    rows: std::ops::Range<usize>,
    acts: &Q8Acts,
    n_tokens: usize,
    out: OutPtr,
) {
    const R: usize = 4;
    const T: usize = 4;
    let nb = acts.nb;
    let mut r = rows.start;
    if n_tokens == 1 {
        decode_rows::<B, 4>(w, row_bytes, rows, acts, out);
        return;
    }
    if n_tokens <= SMALL_BATCH {
        small_batch_rows::<B>(w, row_bytes, rows, acts, n_tokens, out);
        return;
    }
    let mut dm = vec![0.0f32; 2 * R * nb]; // [rows][d | m][nb]
    let mut corr = vec![0.0f32; (R + 1) * n_tokens]; // [rows][tokens], then odd-block scratch
    let (corr, odd) = corr.split_at_mut(R * n_tokens);
    while r + R <= rows.end {
        rows_block::<B, R, T>(w, row_bytes, r, acts, n_tokens, &mut dm, corr, odd, out);
        r += R;
    }
    while r < rows.end {
        rows_block::<B, 1, T>(w, row_bytes, r, acts, n_tokens, &mut dm, corr, odd, out);
        r += 1;
    }
}

/// Entry for the 32-weight types: rows `rows` x all `n_tokens` quantized tokens.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(crate) unsafe fn q32_rows_avx512(
    ty: GgmlType,
    w: &[u8],
    row_bytes: usize,
    rr: std::ops::Range<usize>,
    acts: &Q8Acts,
    n_tokens: usize,
    out: OutPtr,
) {
    match ty {
        GgmlType::Q4_0 => rows::<Q4_0>(w, row_bytes, rr, acts, n_tokens, out),
        GgmlType::Q4_1 => rows::<Q4_1>(w, row_bytes, rr, acts, n_tokens, out),
        GgmlType::Q5_0 => rows::<Q5_0>(w, row_bytes, rr, acts, n_tokens, out),
        GgmlType::Q5_1 => rows::<Q5_1>(w, row_bytes, rr, acts, n_tokens, out),
        GgmlType::Q8_0 => rows::<Q8_0>(w, row_bytes, rr, acts, n_tokens, out),
        GgmlType::IQ4_NL => rows::<IQ4_NL>(w, row_bytes, rr, acts, n_tokens, out),
        _ => unreachable!("{ty:?} is not a 32-weight block type"),
    }
}
