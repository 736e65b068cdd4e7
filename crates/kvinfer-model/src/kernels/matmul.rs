//! Threaded matrix x activations product: `y[t * rows + r] = sum_c W[r, c] * x[t * cols + c]`.
//!
//! Plan (as llama.cpp): quantize the activations once per call (Q8 blocks of 32 for the
//! 32-weight types, Q8_K for the K-quants), then split the weight rows into many chunks that the
//! rayon pool runs with work stealing. A task owns a chunk of rows for *all* tokens, so its
//! weight rows stay in L1/L2 while it walks the tokens; it writes only its rows of `y`.

use std::cell::RefCell;

use rayon::prelude::*;

use super::packed::{self, PackedMat, GROUP};
use super::quant::{self, BlockQ8K, Q8Acts};
use super::{QMatRef, SimdLevel};
use crate::ggml_type::{GgmlType, QK_K};

/// Where a kernel writes `y[t * rows + r]`.
///
/// # Invariants
/// `ptr` points at an `n_tokens * rows` f32 buffer that outlives the call; concurrent tasks
/// write disjoint rows of it (each task owns a row range).
#[derive(Clone, Copy)]
pub(crate) struct OutPtr {
    pub ptr: *mut f32,
    pub rows: usize,
}

// SAFETY: see the invariants: copies are only used to write disjoint cells.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// # Safety
    /// `r < rows`, `t < n_tokens`, and no other task writes row `r`.
    #[inline(always)]
    pub(crate) unsafe fn write(self, r: usize, t: usize, v: f32) {
        *self.ptr.add(t * self.rows + r) = v;
    }
}

thread_local! {
    /// Quantized activations reused across calls made from this thread (avoids an allocation
    /// per decode step). `try_borrow_mut` guards re-entrant calls (rayon work stealing).
    static Q8_SCRATCH: RefCell<Q8Acts> = RefCell::new(Q8Acts::default());
    static Q8K_SCRATCH: RefCell<Vec<BlockQ8K>> = const { RefCell::new(Vec::new()) };
    /// The same activations laid out for the packed kernels' tiles.
    static TILE_SCRATCH: RefCell<packed::TiledActs> = RefCell::new(packed::TiledActs::default());
}

/// Run `f` with this thread's scratch value, or a fresh one if it is already borrowed.
fn with_scratch<S: Default + 'static, R>(
    key: &'static std::thread::LocalKey<RefCell<S>>,
    f: impl FnOnce(&mut S) -> R,
) -> R {
    key.with(|cell| match cell.try_borrow_mut() {
        Ok(mut s) => f(&mut s),
        Err(_) => f(&mut S::default()),
    })
}

/// Rows per task: small enough for ~8 tasks per thread (work stealing copes with a busy core),
/// large enough that a task is >= ~32K multiply-adds (rayon's per-task cost is ~1 us).
fn rows_per_task(rows: usize, cols: usize, n_tokens: usize) -> usize {
    let min_tasks = 8 * rayon::current_num_threads().max(1);
    let by_work = (1usize << 15).div_ceil(cols * n_tokens);
    let by_count = rows.div_ceil(min_tasks).min(256);
    by_work
        .max(by_count)
        .max(4)
        .next_multiple_of(4)
        .min(rows.max(1))
}

/// Run `f(row_range)` over chunks of rows in parallel.
fn par_rows(rows: usize, cols: usize, n_tokens: usize, f: impl Fn(std::ops::Range<usize>) + Sync) {
    let chunk = rows_per_task(rows, cols, n_tokens);
    let n_chunks = rows.div_ceil(chunk);
    if n_chunks <= 1 {
        f(0..rows);
        return;
    }
    (0..n_chunks)
        .into_par_iter()
        .for_each(|c| f(c * chunk..((c + 1) * chunk).min(rows)));
}

/// `matmul` at a given SIMD level (the tests run every level the CPU has).
pub(crate) fn matmul_with(level: SimdLevel, w: QMatRef, x: &[f32], n_tokens: usize, y: &mut [f32]) {
    let (rows, cols) = (w.rows, w.cols);
    let row_bytes = w.ty.row_bytes(cols).unwrap_or_else(|| {
        panic!(
            "matmul: {:?} rows of {cols} weights are not whole blocks",
            w.ty
        )
    });
    assert!(
        w.data.len() >= rows * row_bytes,
        "matmul: weight data too short for {rows}x{cols} {:?}",
        w.ty
    );
    assert_eq!(
        x.len(),
        n_tokens * cols,
        "matmul: x must be n_tokens * cols"
    );
    assert_eq!(
        y.len(),
        n_tokens * rows,
        "matmul: y must be n_tokens * rows"
    );
    if n_tokens == 0 || rows == 0 {
        return;
    }
    let out = OutPtr {
        ptr: y.as_mut_ptr(),
        rows,
    };
    #[cfg(target_arch = "x86_64")]
    if let Some(p) = w.packed.filter(|_| level >= SimdLevel::Avx2) {
        assert!(
            p.ty() == w.ty && p.rows() == rows && p.cols() == cols,
            "matmul: packed matrix does not match its file matrix"
        );
        return packed_matmul(level, p, x, n_tokens, out);
    }
    match w.ty {
        GgmlType::Q4_0
        | GgmlType::Q4_1
        | GgmlType::Q5_0
        | GgmlType::Q5_1
        | GgmlType::Q8_0
        | GgmlType::IQ4_NL => {
            with_scratch(&Q8_SCRATCH, |acts| {
                quantize_q8_tokens(level, x, n_tokens, cols, q8_1(w.ty), acts);
                let acts = &*acts;
                par_rows(rows, cols, n_tokens, |rr| {
                    // SAFETY: rows `rr` are this task's alone; shapes checked above.
                    unsafe { q32_rows(level, w, row_bytes, rr, acts, n_tokens, out) }
                });
            });
        }
        GgmlType::Q2_K
        | GgmlType::Q3_K
        | GgmlType::Q4_K
        | GgmlType::Q5_K
        | GgmlType::Q6_K
        | GgmlType::IQ4_XS => {
            with_scratch(&Q8K_SCRATCH, |acts| {
                let nb = cols / QK_K;
                acts.clear();
                acts.resize(n_tokens * nb, BlockQ8K::ZERO);
                if n_tokens * cols >= 1 << 14 {
                    x.par_chunks_exact(cols)
                        .zip(acts.par_chunks_exact_mut(nb))
                        .for_each(|(xt, at)| quantize_q8_k(level, xt, at));
                } else {
                    for (xt, at) in x.chunks_exact(cols).zip(acts.chunks_exact_mut(nb)) {
                        quantize_q8_k(level, xt, at);
                    }
                }
                let acts = &*acts;
                par_rows(rows, cols, n_tokens, |rr| {
                    #[cfg(target_arch = "x86_64")]
                    if level >= SimdLevel::Avx2 {
                        // SAFETY: level was detected (or checked by the tests); rows `rr` are
                        // this task's alone; shapes checked above.
                        unsafe {
                            super::kquant_x86::k_rows(level, w, row_bytes, rr, acts, n_tokens, out)
                        };
                        return;
                    }
                    for r in rr {
                        let row = &w.data[r * row_bytes..(r + 1) * row_bytes];
                        for (t, at) in acts.chunks_exact(nb).enumerate() {
                            let v = dot_k(level, w.ty, row, at);
                            // SAFETY: row r belongs to this task.
                            unsafe { out.write(r, t, v) };
                        }
                    }
                });
            });
        }
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 | GgmlType::Q8_K => {
            par_rows(rows, cols, n_tokens, |rr| {
                let mut wf = vec![0.0f32; cols]; // one dequantized weight row
                for r in rr {
                    super::dequantize_row_with(
                        level,
                        w.ty,
                        &w.data[r * row_bytes..(r + 1) * row_bytes],
                        &mut wf,
                    );
                    for (t, xt) in x.chunks_exact(cols).enumerate() {
                        let v = super::dot_f32_with(level, &wf, xt);
                        // SAFETY: row r belongs to this task.
                        unsafe { out.write(r, t, v) };
                    }
                }
            });
        }
    }
}

/// A packed matrix x `n_tokens` tokens (shapes checked by the caller): quantize the tokens
/// once, then tasks of whole groups of 16 rows.
#[cfg(target_arch = "x86_64")]
fn packed_matmul(level: SimdLevel, p: &PackedMat, x: &[f32], n_tokens: usize, out: OutPtr) {
    let cols = p.cols();
    with_scratch(&Q8_SCRATCH, |acts| {
        quantize_q8_tokens(level, x, n_tokens, cols, packed::has_min(p.ty()), acts);
        with_scratch(&TILE_SCRATCH, |tiled| {
            let (w, off) = (
                super::packed_x86::width(level, p.ty()),
                super::packed_x86::int_offset(level, p.ty()),
            );
            tiled.fill(acts, n_tokens, w, off);
            packed_groups(level, p, tiled, out);
        });
    });
}

/// [`packed_matmul`]'s kernels over tasks of whole groups.
#[cfg(target_arch = "x86_64")]
fn packed_groups(level: SimdLevel, p: &PackedMat, y: &packed::TiledActs, out: OutPtr) {
    let per = rows_per_task(p.rows(), p.cols(), y.n_tokens)
        .div_ceil(GROUP)
        .max(1);
    let run = |gr: std::ops::Range<usize>| {
        // SAFETY: the level was detected (or checked by the tests); `y` was laid out for it
        // from tokens of p.cols() values; groups `gr` are this task's.
        unsafe {
            match level {
                SimdLevel::Avx512 => super::packed_x86::groups_avx512(p, gr, y, out),
                SimdLevel::Avx2Vnni => super::packed_x86::groups_avx2vnni(p, gr, y, out),
                _ => super::packed_x86::groups_avx2(p, gr, y, out),
            }
        }
    };
    let groups = p.rows() / GROUP;
    let n_chunks = groups.div_ceil(per);
    if n_chunks <= 1 {
        run(0..groups);
    } else {
        (0..n_chunks)
            .into_par_iter()
            .for_each(|c| run(c * per..((c + 1) * per).min(groups)));
    }
}

/// Weight types whose llama.cpp dot product takes `block_q8_1` activations (f16 block sums).
fn q8_1(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1)
}

/// Quantize `n_tokens` rows of `x` into `acts` (in parallel when there are many).
fn quantize_q8_tokens(
    level: SimdLevel,
    x: &[f32],
    n_tokens: usize,
    cols: usize,
    q8_1: bool,
    acts: &mut Q8Acts,
) {
    acts.resize(n_tokens, cols);
    let nb = acts.nb;
    let one = |xt: &[f32], qs: &mut [i8], d: &mut [f32], s: &mut [f32]| match level {
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 | SimdLevel::Avx2Vnni | SimdLevel::Avx512 => {
            // SAFETY: level was detected (or checked by the tests).
            unsafe { super::x86::quantize_q8(xt, qs, d, s, q8_1) }
        }
        _ => quant::quantize_q8_scalar(xt, qs, d, s, q8_1),
    };
    let Q8Acts { qs, d, s, .. } = acts;
    if n_tokens * cols >= 1 << 14 {
        x.par_chunks_exact(cols)
            .zip(qs.par_chunks_exact_mut(cols))
            .zip(d.par_chunks_exact_mut(nb).zip(s.par_chunks_exact_mut(nb)))
            .for_each(|((xt, qs), (d, s))| one(xt, qs, d, s));
    } else {
        for ((xt, qs), (d, s)) in x
            .chunks_exact(cols)
            .zip(qs.chunks_exact_mut(cols))
            .zip(d.chunks_exact_mut(nb).zip(s.chunks_exact_mut(nb)))
        {
            one(xt, qs, d, s);
        }
    }
    acts.transpose_sums(n_tokens);
}

/// Rows `rr` of a 32-weight-type matrix, all tokens.
///
/// # Safety
/// Rows `rr` are written by this call only; `acts` holds `n_tokens` tokens of `w.cols` values.
unsafe fn q32_rows(
    level: SimdLevel,
    w: QMatRef,
    row_bytes: usize,
    rr: std::ops::Range<usize>,
    acts: &Q8Acts,
    n_tokens: usize,
    out: OutPtr,
) {
    match level {
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 => {
            super::x86_avx512::q32_rows_avx512(w.ty, w.data, row_bytes, rr, acts, n_tokens, out)
        }
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2Vnni => {
            super::x86::q32_rows_vnni(w.ty, w.data, row_bytes, rr, acts, n_tokens, out)
        }
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 => {
            super::x86::q32_rows_avx2(w.ty, w.data, row_bytes, rr, acts, n_tokens, out)
        }
        _ => {
            let nb = acts.nb;
            for r in rr {
                let row = &w.data[r * row_bytes..(r + 1) * row_bytes];
                for t in 0..n_tokens {
                    let qs = &acts.qs[t * nb * quant::QK..(t + 1) * nb * quant::QK];
                    let (d, s) = (&acts.d[t * nb..(t + 1) * nb], &acts.s[t * nb..(t + 1) * nb]);
                    out.write(r, t, quant::dot_q8_scalar(w.ty, row, qs, d, s));
                }
            }
        }
    }
}

/// One token's Q8_K activations (bit-identical at every level).
fn quantize_q8_k(level: SimdLevel, x: &[f32], out: &mut [BlockQ8K]) {
    #[cfg(target_arch = "x86_64")]
    if level >= SimdLevel::Avx2 {
        // SAFETY: level was detected (or checked by the tests).
        return unsafe { super::kquant_x86::quantize_q8_k(x, out) };
    }
    let _ = level;
    quant::quantize_q8_k(x, out)
}

/// One K-quant row . one token's Q8_K blocks.
fn dot_k(level: SimdLevel, ty: GgmlType, row: &[u8], act: &[BlockQ8K]) -> f32 {
    match (level, ty) {
        #[cfg(target_arch = "x86_64")]
        (SimdLevel::Avx2 | SimdLevel::Avx2Vnni | SimdLevel::Avx512, _) => {
            // SAFETY: level was detected (or checked by the tests).
            unsafe { super::kquant_x86::dot_one(ty, row, act) }
        }
        (_, GgmlType::Q2_K) => quant::dot_q2_k_scalar(row, act),
        (_, GgmlType::Q3_K) => quant::dot_q3_k_scalar(row, act),
        (_, GgmlType::IQ4_XS) => quant::dot_iq4_xs_scalar(row, act),
        (_, GgmlType::Q4_K) => quant::dot_q4_k_scalar(row, act),
        (_, GgmlType::Q5_K) => quant::dot_q5_k_scalar(row, act),
        (_, GgmlType::Q6_K) => quant::dot_q6_k_scalar(row, act),
        (_, other) => unreachable!("{other:?} is not a K-quant"),
    }
}

/// Quantizes one token `x` into `acts` (q8_0, as for the 32-weight types).
pub(crate) fn quantize_one(x: &[f32], acts: &mut Q8Acts) {
    quantize_q8_tokens(super::simd(), x, 1, x.len(), false, acts);
}

/// `out[r] = row_r · token` for `out.len()` rows of `ty` (a 32-weight type without f16 block
/// sums: Q8_0, Q4_0) of `cols` values in `rows`, against the one token in `acts`; on this
/// thread (attention calls it from its own parallel loop). The decode kernels' results.
pub(crate) fn dot_rows_one(ty: GgmlType, rows: &[u8], cols: usize, acts: &Q8Acts, out: &mut [f32]) {
    debug_assert!(!q8_1(ty), "{ty:?} takes q8_1 activations");
    let n = out.len();
    let row_bytes = ty.row_bytes(cols).expect("a 32-value block type");
    assert!(rows.len() >= n * row_bytes && acts.nb * quant::QK == cols);
    let w = QMatRef {
        ty,
        rows: n,
        cols,
        data: rows,
        packed: None,
    };
    let ptr = OutPtr {
        ptr: out.as_mut_ptr(),
        rows: n,
    };
    // SAFETY: `out` holds n values (one token) and this call writes each row once.
    unsafe { q32_rows(super::simd(), w, row_bytes, 0..n, acts, 1, ptr) }
}
