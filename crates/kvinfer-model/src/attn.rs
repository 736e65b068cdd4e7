//! Causal attention over f16 KV blocks, tiled: the query heads that share a KV head and
//! several rows of one sequence form a task; each block of keys (and of values) is widened to
//! f32 once per task and met by all its queries.
//!
//! Numbers (the same for every query, whatever its task, batch or SIMD level; the tests compare
//! bit for bit): the query rounded to f16 (as llama.cpp's f16 K·Q); key `j`'s score a fused
//! multiply-add chain over the head dimension in order; `x_j = s_j * scale`, `m = max x_j`,
//! `e_j = exp(x_j - m)` by [`exp`] (one polynomial, not libm), their sum in f64 over 8 lanes
//! (`j mod 8`, then a fixed tree), `p_j = e_j / sum` rounded to f16 (llama.cpp's f16 V·P);
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

/// `e^x` for `x <= 0` (arguments below -87 give e^-87): Cody-Waite reduction and Cephes'
/// degree-6 polynomial, ~1 ulp. Branch-free, so loops of it vectorize.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    let x = x.max(-87.0);
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
    e * f32::from_bits(((n as i32 + 127) << 23) as u32)
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
    wide: Vec<f32>,
    half: Vec<f16>,
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
    for (si, s) in spans.iter().enumerate() {
        if s.rows.len() >= 2 {
            for kvh in 0..shape.n_kv_heads {
                let mut r = s.rows.start;
                while r < s.rows.end {
                    let end = (r + TILE_ROWS).min(s.rows.end);
                    tasks.push(Task {
                        span: si,
                        rows: r..end,
                        heads: kvh * group..(kvh + 1) * group,
                    });
                    r = end;
                }
            }
        } else {
            for h in 0..n_heads {
                tasks.push(Task {
                    span: si,
                    rows: s.rows.clone(),
                    heads: h..h + 1,
                });
            }
        }
    }
    assert_eq!(out.len(), q.len(), "attention: out must be shaped as q");
    let o = Out(out.as_mut_ptr());
    let run = |sc: &mut Scratch, t: &Task| {
        let span = &spans[t.span];
        // SAFETY (of the level): `level` was detected by the caller or is scalar.
        unsafe { run_task(level, sc, t, span, q, kv, layer, shape, o) };
    };
    if tasks.len() == 1 {
        run(&mut Scratch::default(), &tasks[0]);
    } else {
        tasks.par_iter().for_each_init(Scratch::default, run);
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
        _ => task(sc, t, span, q, kv, layer, shape, out),
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
    task(sc, t, span, q, kv, layer, shape, out)
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
    task(sc, t, span, q, kv, layer, shape, out)
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
/// `N` vectors of 16 outputs at a time, independent chains that keep the FMA units busy.
#[inline(always)]
fn pv(p: &[f32], v: &[f32], o: &mut [f32]) {
    let hd = o.len();
    let mut c = 0;
    while c + 8 * LANES <= hd {
        pv_chunk::<8>(p, v, hd, &mut o[c..c + 8 * LANES], c);
        c += 8 * LANES;
    }
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
fn softmax(s: &mut [f32], scale: f32, half: &mut Vec<f16>) {
    let max = s.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v * scale));
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
    for v in s.iter_mut() {
        *v /= sum;
    }
    round_f16(s, half);
}

/// `x = f32(f16(x))` (round to nearest even) through `half`'s slice conversions.
#[inline(always)]
pub(crate) fn round_f16(x: &mut [f32], buf: &mut Vec<f16>) {
    use half::slice::HalfFloatSliceExt;
    buf.resize(x.len(), f16::ZERO);
    buf.convert_from_f32_slice(x);
    buf.convert_to_f32_slice(x);
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn task(
    sc: &mut Scratch,
    t: &Task,
    span: &SeqSpan,
    q: &[f32],
    kv: &KvStorage,
    layer: usize,
    shape: AttnShape,
    out: Out,
) {
    use half::slice::HalfFloatSliceExt;
    let (n_heads, hd) = (shape.n_heads, shape.head_dim);
    let kvh = t.heads.start / (n_heads / shape.n_kv_heads);
    let bs = kv.layout().block_size;
    // Queries in (row, head) order, with their key ranges.
    let pos_of = |r: usize| span.start + (r - span.rows.start);
    let first_of = |r: usize| {
        shape
            .window
            .map_or(0, |w| (pos_of(r) + 1).saturating_sub(w))
    };
    let nq = t.rows.len() * t.heads.len();
    let (lo, hi) = (first_of(t.rows.start), pos_of(t.rows.end - 1));
    let n_keys = hi + 1 - lo;
    sc.q.clear();
    for r in t.rows.clone() {
        for h in t.heads.clone() {
            let at = (r * n_heads + h) * hd;
            sc.q.extend_from_slice(&q[at..at + hd]);
        }
    }
    round_f16(&mut sc.q, &mut sc.half);
    let range = |i: usize| {
        let r = t.rows.start + i / t.heads.len();
        (first_of(r) - lo, pos_of(r) + 1 - lo)
    };
    sc.scores.clear();
    sc.scores.resize(nq * n_keys, 0.0);
    sc.kt.resize(hd * LANES, 0.0);
    sc.wide.resize(bs.max(LANES) * hd, 0.0);
    // Scores, block by block of keys.
    for bi in lo / bs..=hi / bs {
        let (b0, b1) = ((bi * bs).max(lo), ((bi + 1) * bs).min(hi + 1));
        let keys = kv.keys(span.blocks[bi], layer, kvh);
        let mut j0 = b0;
        while j0 < b1 {
            let j1 = (j0 + LANES).min(b1);
            let n = j1 - j0;
            let slot = j0 - bi * bs;
            keys[slot * hd..(slot + n) * hd].convert_to_f32_slice(&mut sc.wide[..n * hd]);
            for d in 0..hd {
                for j in 0..LANES {
                    sc.kt[d * LANES + j] = if j < n { sc.wide[j * hd + d] } else { 0.0 };
                }
            }
            let (a, z) = (j0 - lo, j1 - lo);
            let mut i = 0;
            while i < nq {
                let live = |i: usize| {
                    let (f, e) = range(i);
                    f < z && a < e
                };
                if i + 4 <= nq && (i..i + 4).all(live) {
                    let qs = std::array::from_fn(|k| &sc.q[(i + k) * hd..(i + k + 1) * hd]);
                    let s4 = scores16x4(qs, &sc.kt);
                    for (k, s) in s4.iter().enumerate() {
                        sc.scores[(i + k) * n_keys + a..(i + k) * n_keys + z]
                            .copy_from_slice(&s[..n]);
                    }
                    i += 4;
                } else {
                    if live(i) {
                        let s = scores16(&sc.q[i * hd..(i + 1) * hd], &sc.kt);
                        sc.scores[i * n_keys + a..i * n_keys + z].copy_from_slice(&s[..n]);
                    }
                    i += 1;
                }
            }
            j0 = j1;
        }
    }
    // Softmax of each query over its own keys.
    for i in 0..nq {
        let (f, e) = range(i);
        softmax(
            &mut sc.scores[i * n_keys + f..i * n_keys + e],
            shape.scale,
            &mut sc.half,
        );
    }
    // Values, block by block.
    sc.o.clear();
    sc.o.resize(nq * hd, 0.0);
    for bi in lo / bs..=hi / bs {
        let (b0, b1) = ((bi * bs).max(lo), ((bi + 1) * bs).min(hi + 1));
        let vals = kv.values(span.blocks[bi], layer, kvh);
        let slot = b0 - bi * bs;
        let n = b1 - b0;
        sc.vt.resize(n * hd, 0.0);
        vals[slot * hd..(slot + n) * hd].convert_to_f32_slice(&mut sc.vt[..n * hd]);
        for i in 0..nq {
            let (f, e) = range(i);
            let (a, z) = ((b0 - lo).max(f), (b1 - lo).min(e));
            if a >= z {
                continue;
            }
            let p = &sc.scores[i * n_keys + a..i * n_keys + z];
            let v = &sc.vt[(a + lo - b0) * hd..(z + lo - b0) * hd];
            pv(p, v, &mut sc.o[i * hd..(i + 1) * hd]);
        }
    }
    let mut i = 0;
    for r in t.rows.clone() {
        for h in t.heads.clone() {
            // SAFETY: (r, h) is this task's alone; `out` is `[N][n_heads][hd]`.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    sc.o[i * hd..].as_ptr(),
                    out.0.add((r * n_heads + h) * hd),
                    hd,
                )
            };
            i += 1;
        }
    }
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
        let k: Vec<f32> = (0..n * n_kv * hd).map(|_| rng.random_range(-2.0..2.0)).collect();
        let v: Vec<f32> = (0..n * n_kv * hd).map(|_| rng.random_range(-2.0..2.0)).collect();
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
        for (n_heads, n_kv, hd, bs, window) in [
            (6, 2, 64, 16, None),
            (4, 1, 48, 16, Some(7)),
            (3, 3, 16, 5, None),
            (2, 1, 20, 16, Some(40)),
        ] {
            let n = 45;
            let (kv, blocks) = random_cache(&mut rng, n, n_kv, hd, bs);
            let shape = AttnShape {
                n_heads,
                n_kv_heads: n_kv,
                head_dim: hd,
                scale: 1.0 / (hd as f32).sqrt(),
                window,
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
                        s[slot * hd..(slot + 1) * hd].to_vec()
                    };
                    let qh = &q[r * w + h * hd..r * w + (h + 1) * hd];
                    let sc: Vec<f64> = (first..=r)
                        .map(|j| {
                            let k = row(j, false);
                            let d: f64 = qh.iter().zip(&k).map(|(a, b)| *a as f64 * b.to_f64()).sum();
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
}
