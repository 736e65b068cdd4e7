//! Causal attention over f16 KV blocks, tiled: the query heads that share a KV head and
//! several rows of one sequence form a task; each block of keys (and of values) is widened to
//! f32 once per task and met by all its queries.
//!
//! Numbers (the same for every query, whatever its task, batch or SIMD level; the tests compare
//! bit for bit): the query rounded to f16 (as llama.cpp's f16 K·Q); key `j`'s score a fused
//! multiply-add chain over the head dimension in order; `x_j = s_j * scale`, `m = max x_j`,
//! `e_j = exp(x_j - m)` by [`exp`] (one polynomial, not libm), their sum in f64 over 8 lanes
//! (`j mod 8`, then a fixed tree), `p_j = e_j * (1 / sum)` rounded to f16 (llama.cpp's f16 V·P);
//! output element `d` a fused multiply-add chain `o_d = fma(p_j, v_jd, o_d)` over the keys in
//! order. Every step is an independent lane or an ordered chain, so the compiler's vectors
//! (16 lanes on AVX-512, 8 on AVX2, 1 in scalar code) do not change a bit.

use half::f16;
use kvinfer_cache::KvStorage;
use rayon::prelude::*;

use crate::kernels::SimdLevel;
use crate::layers::{AttnShape, SeqSpan};

/// Rows of one sequence per task in prefill.
const TILE_ROWS: usize = 16;
/// Keys per transposed tile (one 512-bit vector of scores).
const LANES: usize = 16;
/// Keys from which a task is split across threads when there are fewer tasks than threads.
const SPLIT_KEYS: usize = 512;

/// `e^x`, arguments clamped to [-87, 88] (below: e^-87 ~ 1.6e-38 instead of less; above:
/// e^88 ~ 1.7e38 instead of more): Cody-Waite reduction and Cephes' degree-6 polynomial, ~1 ulp.
/// Branch-free, so loops of it vectorize (in a function compiled with FMA; without, `mul_add`
/// is a library call with the same result).
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E).round_ties_even();
    let r = n.mul_add(-0.693_359_4, x);
    let r = n.mul_add(2.121_944_4e-4, r);
    let mut p = 1.987_569_1e-4f32;
    p = p.mul_add(r, 1.398_199_9e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 0.166_666_65);
    p = p.mul_add(r, 0.5);
    let e = (p * r).mul_add(r, r) + 1.0;
    // 2^n from n's bits (n is an integer in [-126, 127]): adding 1.5 * 2^23 puts n in the
    // low mantissa bits, exactly (`n as i32` would be a saturating scalar conversion that
    // does not vectorize).
    let i = (n + 12_582_912.0).to_bits() as i32 - 0x4B40_0000;
    e * f32::from_bits(((i + 127) << 23) as u32)
}

/// One task: rows `rows` (batch rows) of span `span`, query heads `heads` (all in one KV group).
struct Task {
    span: usize,
    rows: std::ops::Range<usize>,
    heads: std::ops::Range<usize>,
}

/// Where tasks write `out` (`[N][n_heads][head_dim]`).
///
/// # Invariants
/// Points at the caller's `out`, alive for the call; tasks write disjoint (row, head) slices.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: see the invariants.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// Per-thread scratch.
#[derive(Default)]
struct Scratch {
    q: Vec<f32>,
    scores: Vec<f32>,
    o: Vec<f32>,
    kt: Vec<f32>,
    vt: Vec<f32>,
    half: Vec<f16>,
    ranges: Vec<(usize, usize)>,
}

thread_local! {
    /// Each thread's scratch, kept between calls: a task's buffers (its score matrix is up to
    /// queries x keys) are not allocated, faulted in and zeroed again for every call.
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// `f` with this thread's scratch (a fresh one if it is in use: rayon can run another task on
/// this thread while one waits).
fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|c| match c.try_borrow_mut() {
        Ok(mut s) => f(&mut s),
        Err(_) => f(&mut Scratch::default()),
    })
}

/// Attention of every new query over its sequence's f16 keys and values (see
/// [`crate::layers::attention`]), at SIMD `level`.
pub(crate) fn attention_f16(
    level: SimdLevel,
    q: &[f32],
    kv: &KvStorage,
    layer: usize,
    spans: &[SeqSpan],
    shape: AttnShape,
    out: &mut [f32],
) {
    let n_heads = shape.n_heads;
    let group = n_heads / shape.n_kv_heads;
    let mut tasks = Vec::new();
    // A task: the query heads of one KV head over up to TILE_ROWS rows of one sequence, so
    // each block of keys and values is widened once for all of them (decode: one row). When
    // that leaves threads idle (a few sequences decoding over few KV heads: Gemma 3 has one),
    // one task per query head instead (the numbers are the same either way).
    let tiles: usize = spans.iter().map(|s| s.rows.len().div_ceil(TILE_ROWS)).sum();
    let threads = rayon::current_num_threads();
    let few = tiles * shape.n_kv_heads < threads;
    // Grouped tasks that do not fill the threads evenly (3 KV heads on 2 threads).
    let uneven = !(tiles * shape.n_kv_heads).is_multiple_of(threads)
        && tiles * shape.n_kv_heads < 4 * threads;
    // Few tasks over many keys (decode at depth): each grouped task split across the threads.
    let keys = |s: &SeqSpan| {
        let n = s.start + s.rows.len();
        shape.window.map_or(n, |w| n.min(w + TILE_ROWS))
    };
    let split = (few || uneven) && spans.iter().any(|s| keys(s) >= SPLIT_KEYS);
    let per_head = few && group > 1 && !split;
    for (si, s) in spans.iter().enumerate() {
        for kvh in 0..shape.n_kv_heads {
            let mut r = s.rows.start;
            while r < s.rows.end {
                let end = (r + TILE_ROWS).min(s.rows.end);
                let heads = kvh * group..(kvh + 1) * group;
                if per_head {
                    for h in heads {
                        tasks.push(Task {
                            span: si,
                            rows: r..end,
                            heads: h..h + 1,
                        });
                    }
                } else {
                    tasks.push(Task {
                        span: si,
                        rows: r..end,
                        heads,
                    });
                }
                r = end;
            }
        }
    }
    assert_eq!(out.len(), q.len(), "attention: out must be shaped as q");
    let o = Out(out.as_mut_ptr());
    if split {
        tasks_split(level, &tasks, spans, q, kv, layer, shape, o);
        return;
    }
    let run = |sc: &mut Scratch, t: &Task| {
        let span = &spans[t.span];
        // SAFETY (of the level): `level` was detected by the caller or is scalar.
        unsafe { run_task(level, sc, t, span, q, kv, layer, shape, o) };
    };
    if tasks.len() == 1 {
        with_scratch(|sc| run(sc, &tasks[0]));
    } else {
        tasks.par_iter().for_each(|t| with_scratch(|sc| run(sc, t)));
    }
}

#[allow(clippy::too_many_arguments)]
unsafe fn run_task(
    level: SimdLevel,
    sc: &mut Scratch,
    t: &Task,
    span: &SeqSpan,
    q: &[f32],
    kv: &KvStorage,
    layer: usize,
    shape: AttnShape,
    out: Out,
) {
    match level {
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 | SimdLevel::Avx2Vnni => {
            task_avx512(sc, t, span, q, kv, layer, shape, out)
        }
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 => task_avx2(sc, t, span, q, kv, layer, shape, out),
        _ => task(level, sc, t, span, q, kv, layer, shape, out),
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn task_avx2(
    sc: &mut Scratch,
    t: &Task,
    span: &SeqSpan,
    q: &[f32],
    kv: &KvStorage,
    layer: usize,
    shape: AttnShape,
    out: Out,
) {
    task(SimdLevel::Avx2, sc, t, span, q, kv, layer, shape, out)
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
unsafe fn task_avx512(
    sc: &mut Scratch,
    t: &Task,
    span: &SeqSpan,
    q: &[f32],
    kv: &KvStorage,
    layer: usize,
    shape: AttnShape,
    out: Out,
) {
    task(SimdLevel::Avx512, sc, t, span, q, kv, layer, shape, out)
}

/// `out[j] = sum_d q[d] * kt[d][j]` for 16 keys (`kt`: `[hd][16]`), each a chain over `d`.
#[inline(always)]
fn scores16(q: &[f32], kt: &[f32]) -> [f32; LANES] {
    let mut s = [0f32; LANES];
    for (d, &qd) in q.iter().enumerate() {
        let k: &[f32; LANES] = kt[d * LANES..(d + 1) * LANES].try_into().expect("16");
        for j in 0..LANES {
            s[j] = qd.mul_add(k[j], s[j]);
        }
    }
    s
}

/// One query against `T` tiles of 16 keys (`kt`: `[T][hd][16]`): `T` independent chains, the
/// same arithmetic as [`scores16`] on each tile.
#[inline(always)]
fn scores_tiles<const T: usize>(q: &[f32], kt: &[f32]) -> [[f32; LANES]; T] {
    let hd = q.len();
    let mut s = [[0f32; LANES]; T];
    for (d, &qd) in q.iter().enumerate() {
        for (i, si) in s.iter_mut().enumerate() {
            let k: &[f32; LANES] = kt[(i * hd + d) * LANES..(i * hd + d + 1) * LANES]
                .try_into()
                .expect("16");
            for j in 0..LANES {
                si[j] = qd.mul_add(k[j], si[j]);
            }
        }
    }
    s
}

/// Four queries at once (each key row loaded once), the same chains as [`scores16`].
#[inline(always)]
fn scores16x4(q: [&[f32]; 4], kt: &[f32]) -> [[f32; LANES]; 4] {
    let mut s = [[0f32; LANES]; 4];
    for d in 0..q[0].len() {
        let k: &[f32; LANES] = kt[d * LANES..(d + 1) * LANES].try_into().expect("16");
        for i in 0..4 {
            let qd = q[i][d];
            for j in 0..LANES {
                s[i][j] = qd.mul_add(k[j], s[i][j]);
            }
        }
    }
    s
}

/// `o[c] = fma(p[j], v[j][c], o[c])` over the rows `j` of `v` (`[p.len()][o.len()]`) in order:
/// `N` vectors of 16 outputs at a time, independent chains that keep the FMA units busy (not 8:
/// the compiler then turns the loads into gathers).
#[inline(always)]
fn pv(p: &[f32], v: &[f32], o: &mut [f32]) {
    let hd = o.len();
    let mut c = 0;
    while c + 4 * LANES <= hd {
        pv_chunk::<4>(p, v, hd, &mut o[c..c + 4 * LANES], c);
        c += 4 * LANES;
    }
    while c + LANES <= hd {
        pv_chunk::<1>(p, v, hd, &mut o[c..c + LANES], c);
        c += LANES;
    }
    for (k, oc) in o.iter_mut().enumerate().skip(c) {
        for (j, &pj) in p.iter().enumerate() {
            *oc = pj.mul_add(v[j * hd + k], *oc);
        }
    }
}

/// Outputs `c..c + 16 N` of [`pv`] (`o` is that slice).
#[inline(always)]
fn pv_chunk<const N: usize>(p: &[f32], v: &[f32], hd: usize, o: &mut [f32], c: usize) {
    let mut acc = [[0f32; LANES]; N];
    for (n, a) in acc.iter_mut().enumerate() {
        a.copy_from_slice(&o[n * LANES..(n + 1) * LANES]);
    }
    assert!(v.len() >= p.len() * hd && c + N * LANES <= hd);
    for (j, &pj) in p.iter().enumerate() {
        let row = &v[j * hd + c..j * hd + c + N * LANES];
        for n in 0..N {
            for k in 0..LANES {
                acc[n][k] = pj.mul_add(row[n * LANES + k], acc[n][k]);
            }
        }
    }
    for (n, a) in acc.iter().enumerate() {
        o[n * LANES..(n + 1) * LANES].copy_from_slice(a);
    }
}

/// Softmax of `s` in place (`s` holds q·k; see the module doc), probabilities rounded to f16.
#[inline(always)]
fn softmax(level: SimdLevel, s: &mut [f32], scale: f32, half: &mut Vec<f16>) {
    #[cfg(target_arch = "x86_64")]
    if level >= SimdLevel::Avx2Vnni {
        // SAFETY: AVX-512 F and F16C come with these levels.
        return unsafe { crate::attn_avx512::softmax(s, scale) };
    }
    // The max in 16 lanes, then across them (exact: any order gives the same value).
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = s.chunks_exact(LANES);
    for c in &mut chunks {
        for k in 0..LANES {
            lanes[k] = lanes[k].max(c[k] * scale);
        }
    }
    let max = (chunks.remainder().iter())
        .map(|&v| v * scale)
        .chain(lanes)
        .fold(f32::NEG_INFINITY, f32::max);
    for v in s.iter_mut() {
        *v = exp(*v * scale - max);
    }
    let mut lanes = [0f64; 8];
    let mut chunks = s.chunks_exact(8);
    for c in &mut chunks {
        for k in 0..8 {
            lanes[k] += c[k] as f64;
        }
    }
    for (k, &v) in chunks.remainder().iter().enumerate() {
        lanes[k] += v as f64;
    }
    let sum = (((lanes[0] + lanes[1]) + (lanes[2] + lanes[3]))
        + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]))) as f32;
    // Times 1 / sum, as llama.cpp's soft_max (ggml_vec_scale_f32): no division per element.
    let inv = 1.0 / sum;
    for v in s.iter_mut() {
        *v *= inv;
    }
    round_f16(level, s, half);
}

/// `x = f32(f16(x))` (round to nearest even), at `level` (F16C eight at a time, or `half`).
#[inline(always)]
pub(crate) fn round_f16(level: SimdLevel, x: &mut [f32], buf: &mut Vec<f16>) {
    #[cfg(target_arch = "x86_64")]
    if level >= SimdLevel::Avx2 {
        // SAFETY: F16C comes with every level from AVX2 up.
        return unsafe { round_f16c(x) };
    }
    use half::slice::HalfFloatSliceExt;
    let _ = level;
    buf.resize(x.len(), f16::ZERO);
    buf.convert_from_f32_slice(x);
    buf.convert_to_f32_slice(x);
}

/// `dst = f32(src)` (exact), at `level`.
#[inline(always)]
fn widen(level: SimdLevel, src: &[f16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "widen: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if level >= SimdLevel::Avx2 {
        // SAFETY: F16C comes with every level from AVX2 up; lengths checked.
        return unsafe { widen_f16c(src, dst) };
    }
    use half::slice::HalfFloatSliceExt;
    let _ = level;
    src.convert_to_f32_slice(dst);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn round_f16c(x: &mut [f32]) {
    use std::arch::x86_64::*;
    let mut c = x.chunks_exact_mut(8);
    for v in &mut c {
        let p = v.as_mut_ptr();
        let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(p));
        _mm256_storeu_ps(p, _mm256_cvtph_ps(h));
    }
    for v in c.into_remainder() {
        *v = f16::from_f32(*v).to_f32();
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn widen_f16c(src: &[f16], dst: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = src.len() / 8 * 8;
    let (sp, dp) = (src.as_ptr() as *const __m128i, dst.as_mut_ptr());
    for i in (0..n).step_by(8) {
        _mm256_storeu_ps(dp.add(i), _mm256_cvtph_ps(_mm_loadu_si128(sp.add(i / 8))));
    }
    for i in n..src.len() {
        dst[i] = src[i].to_f32();
    }
}

/// Up to 16 keys: slots `g0..` of one block (`keys` points at slot `g0` of dimension 0 of its
/// transposed f16 keys, `[hd][block_size]`), of which lanes `off..off + z - a` are the keys
/// `a..z` (relative to the span's first key). Lanes outside are computed and dropped.
#[derive(Clone, Copy)]
struct Tile {
    a: usize,
    z: usize,
    off: usize,
    keys: *const f16,
}

/// Scores of the task's queries against `tiles` into `sc.scores`: read in place from the
/// cache's f16 keys when `direct` (AVX-512, whole tiles of 16), else from their widened
/// copies in `sc.kt` (`[k][hd][16]`).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn score_tiles(
    level: SimdLevel,
    sc: &mut Scratch,
    tiles: &[Tile],
    direct: bool,
    bs: usize,
    nq: usize,
    hd: usize,
    n_keys: usize,
    range: &impl Fn(usize) -> (usize, usize),
) {
    let live = |i: usize, t: &Tile| {
        let (f, e) = range(i);
        f < t.z && t.a < e
    };
    #[cfg(target_arch = "x86_64")]
    if level >= SimdLevel::Avx2Vnni {
        // Up to 4 queries x all (up to 4) tiles at once; pairs masked out are computed and
        // dropped.
        assert!(direct || sc.kt.len() >= tiles.len() * hd * LANES);
        assert!(sc.q.len() >= nq * hd);
        let mut s = [[[0f32; LANES]; 4]; 4];
        let mut i = 0;
        while i < nq {
            let qn = (nq - i).min(4);
            if (i..i + qn).any(|m| tiles.iter().any(|t| live(m, t))) {
                let q: [*const f32; 4] =
                    std::array::from_fn(|m| sc.q[(i + m.min(qn - 1)) * hd..].as_ptr());
                // SAFETY: AVX-512 F and F16C come with these levels; a direct tile's pointer
                // has `hd` rows of `bs` keys from it (16 of them read, `bs % 16 == 0`), a copy
                // `hd * 16` values (asserted above).
                unsafe {
                    if direct {
                        let kt: [*const f16; 4] =
                            std::array::from_fn(|k| tiles[k.min(tiles.len() - 1)].keys);
                        crate::attn_avx512::scores_dyn(&q[..qn], &kt[..tiles.len()], bs, hd, &mut s)
                    } else {
                        let kt: [*const f32; 4] = std::array::from_fn(|k| {
                            sc.kt[k.min(tiles.len() - 1) * hd * LANES..].as_ptr()
                        });
                        crate::attn_avx512::scores_dyn(
                            &q[..qn],
                            &kt[..tiles.len()],
                            LANES,
                            hd,
                            &mut s,
                        )
                    }
                };
                for (m, sm) in s.iter().enumerate().take(qn) {
                    for (k, t) in tiles.iter().enumerate() {
                        if live(i + m, t) {
                            sc.scores[(i + m) * n_keys + t.a..(i + m) * n_keys + t.z]
                                .copy_from_slice(&sm[k][t.off..t.off + t.z - t.a]);
                        }
                    }
                }
            }
            i += qn;
        }
        return;
    }
    let _ = (level, direct, bs);
    let tile = |k: usize| &sc.kt[k * hd * LANES..(k + 1) * hd * LANES];
    let put = |scores: &mut [f32], i: usize, t: &Tile, s: &[f32; LANES]| {
        scores[i * n_keys + t.a..i * n_keys + t.z].copy_from_slice(&s[t.off..t.off + t.z - t.a]);
    };
    if nq < 4 {
        // Few queries (decode): each query against all tiles at once.
        for i in 0..nq {
            let q = &sc.q[i * hd..(i + 1) * hd];
            if tiles.len() == 4 {
                let s = scores_tiles::<4>(q, &sc.kt[..4 * hd * LANES]);
                for (k, sk) in s.iter().enumerate() {
                    if live(i, &tiles[k]) {
                        put(&mut sc.scores, i, &tiles[k], sk);
                    }
                }
            } else {
                for (k, t) in tiles.iter().enumerate() {
                    let s = scores_tiles::<1>(q, tile(k));
                    if live(i, t) {
                        put(&mut sc.scores, i, t, &s[0]);
                    }
                }
            }
        }
        return;
    }
    for (k, t) in tiles.iter().enumerate() {
        let kt = tile(k);
        let mut i = 0;
        while i < nq {
            if i + 4 <= nq && (i..i + 4).all(|i| live(i, t)) {
                let qs = std::array::from_fn(|m| &sc.q[(i + m) * hd..(i + m + 1) * hd]);
                let s4 = scores16x4(qs, kt);
                for (m, s) in s4.iter().enumerate() {
                    put(&mut sc.scores, i + m, t, s);
                }
                i += 4;
            } else {
                if live(i, t) {
                    let s = scores16(&sc.q[i * hd..(i + 1) * hd], kt);
                    put(&mut sc.scores, i, t, &s);
                }
                i += 1;
            }
        }
    }
}

/// Slots `g0..g0 + n` (`n <= 16`) of a block's transposed f16 keys (`[hd][bs]`) widened into
/// `dst` (`[hd][16]`, lanes past `n` zero): exact, so the same scores as reading them in place.
#[inline(always)]
fn widen_tile(
    level: SimdLevel,
    keys: &[f16],
    bs: usize,
    g0: usize,
    n: usize,
    hd: usize,
    dst: &mut [f32],
) {
    for d in 0..hd {
        let row = &mut dst[d * LANES..(d + 1) * LANES];
        widen(level, &keys[d * bs + g0..d * bs + g0 + n], &mut row[..n]);
        row[n..].fill(0.0);
    }
}

/// Where a task's queries are and what they see.
#[derive(Clone, Copy)]
struct View<'a> {
    span: &'a SeqSpan<'a>,
    kv: &'a KvStorage,
    layer: usize,
    kvh: usize,
    hd: usize,
}

/// The task's queries into `sc.q` (rounded to f16), in (row, head) order, and their key
/// ranges (absolute positions `first..end`) into `ranges`.
#[inline(always)]
fn fill_queries(
    level: SimdLevel,
    sc: &mut Scratch,
    t: &Task,
    span: &SeqSpan,
    q: &[f32],
    shape: AttnShape,
    ranges: &mut Vec<(usize, usize)>,
) {
    let (n_heads, hd) = (shape.n_heads, shape.head_dim);
    sc.q.clear();
    ranges.clear();
    for r in t.rows.clone() {
        let pos = span.start + (r - span.rows.start);
        let first = shape.window.map_or(0, |w| (pos + 1).saturating_sub(w));
        for h in t.heads.clone() {
            let at = (r * n_heads + h) * hd;
            sc.q.extend_from_slice(&q[at..at + hd]);
            ranges.push((first, pos + 1));
        }
    }
    round_f16(level, &mut sc.q, &mut sc.half);
}

/// A task's start, the same for a whole task and a split one: its queries into `sc.q`, their
/// key ranges into `ranges`; returns where it reads and its keys `lo..=hi`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn prepare<'a>(
    level: SimdLevel,
    sc: &mut Scratch,
    t: &Task,
    span: &'a SeqSpan<'a>,
    q: &[f32],
    (kv, layer): (&'a KvStorage, usize),
    shape: AttnShape,
    ranges: &mut Vec<(usize, usize)>,
) -> (View<'a>, usize, usize) {
    fill_queries(level, sc, t, span, q, shape, ranges);
    let (lo, hi) = (ranges[0].0, ranges[ranges.len() - 1].1 - 1);
    let v = View {
        span,
        kv,
        layer,
        kvh: t.heads.start / (shape.n_heads / shape.n_kv_heads),
        hd: shape.head_dim,
    };
    (v, lo, hi)
}

/// Query `i`'s key range clipped to keys `lo..=hi`, relative to `lo` (empty: `(0, 0)`).
#[inline(always)]
fn clip(ranges: &[(usize, usize)], i: usize, lo: usize, hi: usize) -> (usize, usize) {
    let (f, e) = ranges[i];
    let (f, e) = (f.max(lo), e.min(hi + 1));
    if f < e {
        (f - lo, e - lo)
    } else {
        (0, 0)
    }
}

/// Scores of the queries in `sc.q` against keys `lo..=hi` into `sc.scores` (`[nq][hi + 1 -
/// lo]`; entries outside a query's range unspecified).
#[inline(always)]
fn scores_span(
    level: SimdLevel,
    sc: &mut Scratch,
    v: View,
    lo: usize,
    hi: usize,
    ranges: &[(usize, usize)],
) {
    let (hd, bs) = (v.hd, v.kv.layout().block_size);
    let (nq, n_keys) = (ranges.len(), hi + 1 - lo);
    let range = |i: usize| clip(ranges, i, lo, hi);
    // Not cleared: every entry a query reads (its own range) is written below.
    if sc.scores.len() < nq * n_keys {
        sc.scores.resize(nq * n_keys, 0.0);
    }
    const TILES: usize = 4;
    // Decode reads the keys in place; more queries (prefill) share a widened copy per tile.
    let direct = cfg!(target_arch = "x86_64")
        && level >= SimdLevel::Avx2Vnni
        && bs.is_multiple_of(LANES)
        && nq <= 4;
    if !direct {
        sc.kt.resize(TILES * hd * LANES, 0.0);
    }
    // Tiles of 16 slots of a block (aligned, so a tile is one vector per dimension of the
    // transposed keys), up to 4 at a time.
    let mut tiles: Vec<Tile> = Vec::with_capacity(TILES);
    let mut bi = lo / bs;
    let mut j0 = lo;
    loop {
        let done = j0 > hi;
        if !done {
            let base = bi * bs;
            let slot = j0 - base;
            let g0 = slot / LANES * LANES;
            let g1 = (g0 + LANES).min(bs);
            let j1 = (base + g1).min(hi + 1);
            let keys = v.kv.keys(v.span.blocks[bi], v.layer, v.kvh);
            let k = tiles.len();
            if !direct {
                let dst = &mut sc.kt[k * hd * LANES..(k + 1) * hd * LANES];
                widen_tile(level, keys, bs, g0, g1 - g0, hd, dst);
            }
            tiles.push(Tile {
                a: j0 - lo,
                z: j1 - lo,
                off: slot - g0,
                keys: keys[g0..].as_ptr(),
            });
            j0 = j1;
            if j0 == base + bs {
                bi += 1;
            }
        }
        if tiles.len() == TILES || (done && !tiles.is_empty()) {
            score_tiles(level, sc, &tiles, direct, bs, nq, hd, n_keys, &range);
            tiles.clear();
        }
        if done {
            break;
        }
    }
}

/// Softmax of each query's scores (`scores`: exactly `[nq][n_keys]`, over keys `lo..`) over
/// its range, soft-capped first when `softcap` is set.
#[inline(always)]
fn softmax_rows(
    level: SimdLevel,
    scores: &mut [f32],
    lo: usize,
    ranges: &[(usize, usize)],
    (scale, softcap): (f32, Option<f32>),
    half: &mut Vec<f16>,
) {
    let n_keys = scores.len() / ranges.len().max(1);
    for (i, &(f, e)) in ranges.iter().enumerate() {
        let row = &mut scores[i * n_keys + f - lo..i * n_keys + e - lo];
        if let Some(cap) = softcap {
            crate::layers::softcap(row, cap);
        }
        softmax(level, row, scale, half);
    }
}

/// Output columns `cols` of every query: probabilities `scores` (`[nq][hi + 1 - lo]`) times
/// the values of keys `lo..=hi`, into `o` (`[nq][cols.len()]`).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn values_span(
    level: SimdLevel,
    vt: &mut Vec<f32>,
    o: &mut Vec<f32>,
    scores: &[f32],
    v: View,
    lo: usize,
    hi: usize,
    ranges: &[(usize, usize)],
    cols: std::ops::Range<usize>,
) {
    let (hd, bs) = (v.hd, v.kv.layout().block_size);
    let (nq, n_keys, w) = (ranges.len(), hi + 1 - lo, cols.len());
    o.clear();
    o.resize(nq * w, 0.0);
    for bi in lo / bs..=hi / bs {
        let (b0, b1) = ((bi * bs).max(lo), ((bi + 1) * bs).min(hi + 1));
        let vals = v.kv.values(v.span.blocks[bi], v.layer, v.kvh);
        let slot = b0 - bi * bs;
        let n = b1 - b0;
        // AVX-512 reads the f16 values directly (widening them as it loads) when one group
        // of up to 4 queries reads them (decode); more queries share one widened copy.
        let direct = cfg!(target_arch = "x86_64")
            && level >= SimdLevel::Avx2Vnni
            && w.is_multiple_of(LANES)
            && nq <= 4;
        if !direct {
            vt.resize(n * w, 0.0);
            if w == hd {
                widen(level, &vals[slot * hd..(slot + n) * hd], &mut vt[..n * hd]);
            } else {
                for j in 0..n {
                    let at = (slot + j) * hd;
                    widen(
                        level,
                        &vals[at + cols.start..at + cols.end],
                        &mut vt[j * w..(j + 1) * w],
                    );
                }
            }
        }
        let cut = |i: usize| {
            let (f, e) = clip(ranges, i, lo, hi);
            ((b0 - lo).max(f), (b1 - lo).min(e))
        };
        let mut i = 0;
        while i < nq {
            let (a, z) = cut(i);
            if a >= z {
                i += 1;
                continue;
            }
            #[cfg(target_arch = "x86_64")]
            if level >= SimdLevel::Avx2Vnni && w.is_multiple_of(LANES) {
                // Up to 4 queries over the same keys: each value row loaded once for all.
                let qn = (1..4.min(nq - i))
                    .take_while(|&m| cut(i + m) == (a, z))
                    .count()
                    + 1;
                let p: [*const f32; 4] =
                    std::array::from_fn(|m| scores[(i + m.min(qn - 1)) * n_keys + a..].as_ptr());
                assert!(o.len() >= (i + qn) * w && cols.end <= hd);
                let ob = o.as_mut_ptr();
                // SAFETY (of `add`): within `o`, asserted above.
                let op: [*mut f32; 4] =
                    std::array::from_fn(|m| unsafe { ob.add((i + m.min(qn - 1)) * w) });
                // SAFETY: AVX-512 F and F16C come with these levels; each query's scores
                // hold its z - a probabilities and its output w values (asserted), distinct
                // queries; `rows` holds z - a rows of `stride` values, of which `w` are read.
                unsafe {
                    let (p, op, n) = (&p[..qn], &op[..qn], z - a);
                    if direct {
                        let rows = &vals[(slot + a + lo - b0) * hd..(slot + z + lo - b0) * hd];
                        let v0 = rows.as_ptr().add(cols.start);
                        crate::attn_avx512::pv_dyn(p, n, v0, hd, w, op)
                    } else {
                        let rows = &vt[(a + lo - b0) * w..(z + lo - b0) * w];
                        crate::attn_avx512::pv_dyn(p, n, rows.as_ptr(), w, w, op)
                    }
                };
                i += qn;
                continue;
            }
            let vv = &vt[(a + lo - b0) * w..(z + lo - b0) * w];
            let p = &scores[i * n_keys + a..i * n_keys + z];
            pv(p, vv, &mut o[i * w..(i + 1) * w]);
            i += 1;
        }
    }
}

/// Writes `o` (`[nq][cols.len()]`, queries in (row, head) order) to columns `cols` of the
/// task's rows and heads in `out`.
///
/// # Safety
/// Those (row, head, column) elements are written by this call only; `out` is
/// `[N][n_heads][hd]` with every row of `t` in it.
#[inline(always)]
unsafe fn write_out(
    o: &[f32],
    t: &Task,
    n_heads: usize,
    hd: usize,
    cols: std::ops::Range<usize>,
    out: Out,
) {
    let w = cols.len();
    let mut i = 0;
    for r in t.rows.clone() {
        for h in t.heads.clone() {
            std::ptr::copy_nonoverlapping(
                o[i * w..].as_ptr(),
                out.0.add((r * n_heads + h) * hd + cols.start),
                w,
            );
            i += 1;
        }
    }
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn task(
    level: SimdLevel,
    sc: &mut Scratch,
    t: &Task,
    span: &SeqSpan,
    q: &[f32],
    kv: &KvStorage,
    layer: usize,
    shape: AttnShape,
    out: Out,
) {
    let (n_heads, hd) = (shape.n_heads, shape.head_dim);
    let mut ranges = std::mem::take(&mut sc.ranges);
    let (v, lo, hi) = prepare(level, sc, t, span, q, (kv, layer), shape, &mut ranges);
    scores_span(level, sc, v, lo, hi, &ranges);
    let n = ranges.len() * (hi + 1 - lo);
    softmax_rows(
        level,
        &mut sc.scores[..n],
        lo,
        &ranges,
        (shape.scale, shape.softcap),
        &mut sc.half,
    );
    values_span(
        level,
        &mut sc.vt,
        &mut sc.o,
        &sc.scores,
        v,
        lo,
        hi,
        &ranges,
        0..hd,
    );
    // SAFETY: (row, head) of this task are its alone.
    unsafe { write_out(&sc.o, t, n_heads, hd, 0..hd, out) };
    sc.ranges = ranges;
}

/// `$at(level, args)`: `$f(level, args)` compiled for `level`'s target features (`$f` is
/// `#[inline(always)]`, so it is inlined into a function that enables them), as
/// [`run_task`] does for whole tasks.
macro_rules! at_level {
    ($at:ident => $f:ident($($a:ident: $t:ty),*)) => {
        #[allow(clippy::too_many_arguments)]
        fn $at(level: SimdLevel, $($a: $t),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[allow(clippy::too_many_arguments)]
                #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
                unsafe fn avx512($($a: $t),*) {
                    $f(SimdLevel::Avx512, $($a),*)
                }
                #[allow(clippy::too_many_arguments)]
                #[target_feature(enable = "avx2,fma,f16c")]
                unsafe fn avx2($($a: $t),*) {
                    $f(SimdLevel::Avx2, $($a),*)
                }
                match level {
                    // SAFETY: the caller's level was detected (or is checked by the tests).
                    SimdLevel::Avx512 | SimdLevel::Avx2Vnni => return unsafe { avx512($($a),*) },
                    SimdLevel::Avx2 => return unsafe { avx2($($a),*) },
                    _ => {}
                }
            }
            $f(level, $($a),*)
        }
    };
}

at_level!(scores_span_at => scores_span(
    sc: &mut Scratch, v: View<'_>, lo: usize, hi: usize, ranges: &[(usize, usize)]
));
at_level!(softmax_rows_at => softmax_rows(
    scores: &mut [f32], lo: usize, ranges: &[(usize, usize)], scale: (f32, Option<f32>),
    half: &mut Vec<f16>
));
at_level!(values_span_at => values_span(
    vt: &mut Vec<f32>, o: &mut Vec<f32>, scores: &[f32], v: View<'_>, lo: usize, hi: usize,
    ranges: &[(usize, usize)], cols: std::ops::Range<usize>
));

/// One split task: its queries, their ranges, keys `lo..=hi`, and its score matrix.
struct Split<'a> {
    t: &'a Task,
    v: View<'a>,
    q: Vec<f32>,
    ranges: Vec<(usize, usize)>,
    lo: usize,
    hi: usize,
    scores: Vec<f32>,
}

/// The tasks' work spread over the threads (fewer tasks than threads, or not a multiple of
/// them, over long ranges: decode at depth): scores of every task by chunks of whole blocks in
/// one parallel pass, each task's softmax, then output columns in chunks in a second pass.
/// Every element goes through the same operations as in [`task`], so the bits are the same.
#[allow(clippy::too_many_arguments)]
fn tasks_split(
    level: SimdLevel,
    tasks: &[Task],
    spans: &[SeqSpan],
    q: &[f32],
    kv: &KvStorage,
    layer: usize,
    shape: AttnShape,
    out: Out,
) {
    let (n_heads, hd) = (shape.n_heads, shape.head_dim);
    let bs = kv.layout().block_size;
    let mut sc0 = Scratch::default();
    let mut splits: Vec<Split> = tasks
        .iter()
        .map(|t| {
            let mut ranges = Vec::new();
            let (v, lo, hi) = prepare(
                level,
                &mut sc0,
                t,
                &spans[t.span],
                q,
                (kv, layer),
                shape,
                &mut ranges,
            );
            let scores = vec![0f32; ranges.len() * (hi + 1 - lo)];
            Split {
                t,
                v,
                q: sc0.q.clone(),
                ranges,
                lo,
                hi,
                scores,
            }
        })
        .collect();
    let threads = rayon::current_num_threads().max(1);
    // Scores: chunks of whole blocks, ~4 per thread over all tasks.
    let total: usize = splits.iter().map(|s| s.hi + 1 - s.lo).sum();
    let chunk = total.div_ceil(4 * threads).div_ceil(bs).max(1) * bs;
    let mut chunks = Vec::new();
    for (k, s) in splits.iter().enumerate() {
        for c in (s.lo / bs * bs..=s.hi).step_by(chunk) {
            chunks.push((k, c.max(s.lo), (c + chunk - 1).min(s.hi)));
        }
    }
    let ptrs: Vec<Out> = splits
        .iter_mut()
        .map(|s| Out(s.scores.as_mut_ptr()))
        .collect();
    let (splits_r, ptrs) = (&splits, &ptrs);
    chunks.par_iter().for_each(|&(k, clo, chi)| {
        with_scratch(|sc| {
            let s = &splits_r[k];
            let (nq, n_keys) = (s.ranges.len(), s.hi + 1 - s.lo);
            sc.q.clone_from(&s.q);
            scores_span_at(level, sc, s.v, clo, chi, &s.ranges);
            let m = chi + 1 - clo;
            for i in 0..nq {
                // SAFETY: columns clo - lo .. of every row of task k's matrix are this
                // chunk's alone; in bounds.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        sc.scores[i * m..].as_ptr(),
                        ptrs[k].0.add(i * n_keys + clo - s.lo),
                        m,
                    )
                };
            }
        })
    });
    for s in splits.iter_mut() {
        softmax_rows_at(
            level,
            &mut s.scores,
            s.lo,
            &s.ranges,
            (shape.scale, shape.softcap),
            &mut sc0.half,
        );
    }
    // Values: column chunks of 64 (16 when 64 does not divide head_dim).
    let cw = if hd.is_multiple_of(4 * LANES) {
        4 * LANES
    } else if hd.is_multiple_of(LANES) {
        LANES
    } else {
        hd
    };
    let cols: Vec<(usize, usize)> = (0..splits.len())
        .flat_map(|k| (0..hd / cw).map(move |c| (k, c)))
        .collect();
    let splits = &splits;
    cols.par_iter().for_each(|&(k, c)| {
        with_scratch(|sc| {
            let s = &splits[k];
            let cols = c * cw..(c + 1) * cw;
            let Scratch { vt, o, .. } = sc;
            values_span_at(
                level,
                vt,
                o,
                &s.scores,
                s.v,
                s.lo,
                s.hi,
                &s.ranges,
                cols.clone(),
            );
            // SAFETY: these columns of the task's (row, head) elements are this chunk's alone.
            unsafe { write_out(&sc.o, s.t, n_heads, hd, cols, out) };
        })
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvinfer_cache::{BlockId, KvDtype, KvLayout};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    #[test]
    fn exp_is_within_two_ulp_of_libm() {
        let mut x = -90.0f32;
        while x <= 0.0 {
            let (a, b) = (exp(x), x.exp());
            if x >= -87.0 {
                let ulps = (a.to_bits() as i64 - b.to_bits() as i64).abs();
                assert!(ulps <= 2, "exp({x}) = {a}, libm {b} ({ulps} ulp)");
            } else {
                assert!(a < 2e-38, "exp({x}) = {a}");
            }
            x += 0.000_731;
        }
        assert_eq!(exp(0.0), 1.0);
        let mut x = 0.0f32;
        while x <= 88.0 {
            let (a, b) = (exp(x), x.exp());
            let ulps = (a.to_bits() as i64 - b.to_bits() as i64).abs();
            assert!(ulps <= 2, "exp({x}) = {a}, libm {b} ({ulps} ulp)");
            x += 0.000_913;
        }
        assert!(exp(1000.0).is_finite() && exp(-1000.0) >= 0.0);
    }

    /// A random cache of `n` positions (`(n_heads, n_kv, hd, bs)`), random queries for every
    /// position, and their attention computed at the scalar level in one prefill.
    #[allow(clippy::type_complexity)]
    fn scalar_prefill(
        rng: &mut StdRng,
        n: usize,
        (n_heads, n_kv, hd, bs): (usize, usize, usize, usize),
        window: Option<usize>,
    ) -> (KvStorage, Vec<BlockId>, AttnShape, Vec<f32>, Vec<f32>) {
        let (kv, blocks) = random_cache(rng, n, n_kv, hd, bs);
        let shape = AttnShape {
            n_heads,
            n_kv_heads: n_kv,
            head_dim: hd,
            scale: 1.0 / (hd as f32).sqrt(),
            window,
            softcap: None,
        };
        let w = n_heads * hd;
        let q: Vec<f32> = (0..n * w).map(|_| rng.random_range(-2.0..2.0)).collect();
        let all = [SeqSpan {
            blocks: &blocks,
            start: 0,
            rows: 0..n,
        }];
        let mut want = vec![0.0; n * w];
        attention_f16(SimdLevel::Scalar, &q, &kv, 0, &all, shape, &mut want);
        (kv, blocks, shape, q, want)
    }

    /// A cache of `n` random positions (`[pos][n_kv * hd]` K and V), blocks of `bs` slots in
    /// scrambled order.
    fn random_cache(
        rng: &mut StdRng,
        n: usize,
        n_kv: usize,
        hd: usize,
        bs: usize,
    ) -> (KvStorage, Vec<BlockId>) {
        let nblocks = n.div_ceil(bs);
        let mut kv = KvStorage::new(KvLayout {
            n_layers: 1,
            n_kv_heads: n_kv,
            head_dim: hd,
            block_size: bs,
            num_blocks: nblocks + 1,
            dtype: KvDtype::F16,
        });
        let blocks: Vec<BlockId> = (0..nblocks)
            .map(|i| BlockId(((i * 7) % nblocks + 1) as u32))
            .collect();
        let k: Vec<f32> = (0..n * n_kv * hd)
            .map(|_| rng.random_range(-2.0..2.0))
            .collect();
        let v: Vec<f32> = (0..n * n_kv * hd)
            .map(|_| rng.random_range(-2.0..2.0))
            .collect();
        let spans = [SeqSpan {
            blocks: &blocks,
            start: 0,
            rows: 0..n,
        }];
        crate::layers::store_kv(&mut kv, 0, &spans, &k, &v);
        (kv, blocks)
    }

    /// Every query's output is the same bits computed in one prefill call (tiles of rows and
    /// heads), one row at a time (decode: one task per head), and at every SIMD level; and it
    /// is softmax attention to f16 precision (an f64 reference).
    #[test]
    fn same_bits_alone_batched_and_at_every_level_and_close_to_f64() {
        let mut rng = StdRng::seed_from_u64(5);
        // (The first two reach the AVX-512 kernels' every query and tile count: more than 64
        // keys, head_dim 64 and 128; the third 48, not a multiple of 64.)
        for (n_heads, n_kv, hd, bs, window, n) in [
            (6, 2, 64, 16, None, 150),
            (8, 2, 128, 32, Some(90), 120),
            (4, 1, 48, 16, Some(7), 45),
            (3, 3, 16, 5, None, 45),
            (2, 1, 20, 16, Some(40), 45),
        ] {
            let (kv, blocks, shape, q, want) =
                scalar_prefill(&mut rng, n, (n_heads, n_kv, hd, bs), window);
            let w = n_heads * hd;
            let all = [SeqSpan {
                blocks: &blocks,
                start: 0,
                rows: 0..n,
            }];
            for level in SimdLevel::available() {
                let mut got = vec![f32::NAN; n * w];
                attention_f16(level, &q, &kv, 0, &all, shape, &mut got);
                for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(a.to_bits(), b.to_bits(), "{level:?} prefill [{i}]");
                }
                // Row by row, as decode steps (and split spans, as chunked prefill).
                for r in 0..n {
                    let one = [SeqSpan {
                        blocks: &blocks,
                        start: r,
                        rows: 0..1,
                    }];
                    let mut o = vec![f32::NAN; w];
                    attention_f16(level, &q[r * w..(r + 1) * w], &kv, 0, &one, shape, &mut o);
                    for (i, (a, b)) in o.iter().zip(&want[r * w..]).enumerate() {
                        assert_eq!(a.to_bits(), b.to_bits(), "{level:?} row {r} [{i}]");
                    }
                }
                let (a, b) = (17, 45);
                let part = [SeqSpan {
                    blocks: &blocks,
                    start: a,
                    rows: 0..b - a,
                }];
                let mut o = vec![f32::NAN; (b - a) * w];
                attention_f16(level, &q[a * w..b * w], &kv, 0, &part, shape, &mut o);
                for (i, (x, y)) in o.iter().zip(&want[a * w..]).enumerate() {
                    assert_eq!(x.to_bits(), y.to_bits(), "{level:?} chunk [{i}]");
                }
            }
            // Against f64 softmax attention over the f16 keys and values.
            let group = n_heads / n_kv;
            for r in 0..n {
                for h in 0..n_heads {
                    let kvh = h / group;
                    let first = window.map_or(0, |w| (r + 1).saturating_sub(w));
                    let row = |j: usize, vals: bool| {
                        let b = blocks[j / bs];
                        let s = if vals {
                            kv.values(b, 0, kvh)
                        } else {
                            kv.keys(b, 0, kvh)
                        };
                        let slot = j % bs;
                        if vals {
                            s[slot * hd..(slot + 1) * hd].to_vec()
                        } else {
                            // Keys are transposed within the block.
                            (0..hd).map(|d| s[d * bs + slot]).collect()
                        }
                    };
                    let qh = &q[r * w + h * hd..r * w + (h + 1) * hd];
                    let sc: Vec<f64> = (first..=r)
                        .map(|j| {
                            let k = row(j, false);
                            let d: f64 =
                                qh.iter().zip(&k).map(|(a, b)| *a as f64 * b.to_f64()).sum();
                            d * shape.scale as f64
                        })
                        .collect();
                    let m = sc.iter().cloned().fold(f64::MIN, f64::max);
                    let e: Vec<f64> = sc.iter().map(|s| (s - m).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    for d in 0..hd {
                        let o: f64 = (first..=r)
                            .zip(&e)
                            .map(|(j, p)| p / sum * row(j, true)[d].to_f64())
                            .sum();
                        let got = want[r * w + h * hd + d] as f64;
                        assert!((got - o).abs() < 2e-2, "r={r} h={h} d={d}: {got} vs {o}");
                    }
                }
            }
        }
    }

    /// Decode over many keys with fewer tasks than threads takes the split path (scores by
    /// key chunks, values by column chunks, across the threads): the same bits as the whole
    /// prefill computed at the scalar level.
    #[test]
    fn split_decode_over_many_keys_is_the_same_bits() {
        let mut rng = StdRng::seed_from_u64(9);
        // 4 threads: fewer tasks than threads; 2 threads: 3 KV heads do not divide evenly.
        let pools: Vec<rayon::ThreadPool> = [4, 2]
            .map(|n| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .build()
                    .expect("pool")
            })
            .into();
        for (n_heads, n_kv, hd, window) in
            [(4, 1, 256, None), (6, 2, 64, Some(600)), (3, 3, 80, None)]
        {
            let n = 700;
            let (kv, blocks, shape, q, want) =
                scalar_prefill(&mut rng, n, (n_heads, n_kv, hd, 16), window);
            let w = n_heads * hd;
            let levels = SimdLevel::available();
            for (level, pool) in levels
                .iter()
                .flat_map(|&l| pools.iter().map(move |p| (l, p)))
            {
                for r in [511, 512, 600, 699] {
                    let one = [SeqSpan {
                        blocks: &blocks,
                        start: r,
                        rows: 0..1,
                    }];
                    let mut o = vec![f32::NAN; w];
                    pool.install(|| {
                        attention_f16(level, &q[r * w..(r + 1) * w], &kv, 0, &one, shape, &mut o)
                    });
                    for (i, (a, b)) in o.iter().zip(&want[r * w..]).enumerate() {
                        assert_eq!(a.to_bits(), b.to_bits(), "{level:?} hd {hd} row {r} [{i}]");
                    }
                }
                // Two sequences decoding in one batch (over the same blocks).
                let (r1, r2) = (530, 699);
                let two = [
                    SeqSpan {
                        blocks: &blocks,
                        start: r1,
                        rows: 0..1,
                    },
                    SeqSpan {
                        blocks: &blocks,
                        start: r2,
                        rows: 1..2,
                    },
                ];
                let qq: Vec<f32> = [&q[r1 * w..(r1 + 1) * w], &q[r2 * w..(r2 + 1) * w]].concat();
                let mut o = vec![f32::NAN; 2 * w];
                pool.install(|| attention_f16(level, &qq, &kv, 0, &two, shape, &mut o));
                let both = [&want[r1 * w..(r1 + 1) * w], &want[r2 * w..(r2 + 1) * w]].concat();
                for (i, (a, b)) in o.iter().zip(&both).enumerate() {
                    assert_eq!(a.to_bits(), b.to_bits(), "{level:?} hd {hd} batch [{i}]");
                }
            }
        }
    }
}
