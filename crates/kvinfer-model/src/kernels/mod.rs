//! CPU kernels: dequantization, quantized matrix x activations products, f32 helpers.
//!
//! The safe API here dispatches once per process to the best SIMD level the CPU has
//! ([`simd_level`]); `unsafe` SIMD code lives in `x86.rs`, and `quant.rs` holds the block
//! formats and the scalar reference every SIMD kernel is tested against (`tests.rs`).
//!
//! Quantized matmuls follow llama.cpp: activations are quantized to 8 bits per call (blocks of
//! 32 for Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 weights, Q8_K super-blocks for Q4_K/Q5_K/Q6_K), the dot products
//! are integer (`maddubs` / VNNI `dpbusd`), scaled per block in f32. Results therefore differ
//! from an f32 matmul by the activation rounding (~1e-2 relative), as in llama.cpp.

use std::sync::OnceLock;

use crate::ggml_type::GgmlType;
pub use packed::PackedMat;

#[cfg(target_arch = "x86_64")]
mod kquant_x86;
pub mod kv_quant;
mod matmul;
mod packed;
#[cfg(target_arch = "x86_64")]
mod packed_x86;
pub mod peak;
pub mod quant;
#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
mod x86;
#[cfg(target_arch = "x86_64")]
mod x86_avx512;

/// A quantized (or f32/f16/bf16) weight matrix: `rows` rows of `cols` weights, row-major, as
/// stored in GGUF (GGUF dims are `[cols, rows]`: ne0 = cols is the contiguous dim).
///
/// # Invariants
/// `data` holds at least `rows * ty.row_bytes(cols)` bytes; it need not be aligned.
#[derive(Clone, Copy, Debug)]
pub struct QMatRef<'a> {
    /// Element type.
    pub ty: GgmlType,
    /// Number of rows (outputs).
    pub rows: usize,
    /// Weights per row (inputs).
    pub cols: usize,
    /// Raw little-endian tensor bytes.
    pub data: &'a [u8],
    /// The same matrix repacked for the group kernels ([`PackedMat::pack`] of this one), used
    /// at SIMD levels that have them.
    pub packed: Option<&'a PackedMat>,
}

/// SIMD code paths, best last.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SimdLevel {
    /// Portable Rust.
    Scalar,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// The AVX2 kernels with AVX-512 VNNI `vpdpbusd` on 256-bit vectors and 32 registers
    /// (needs AVX-512 F/BW/VL/VNNI).
    Avx2Vnni,
    /// 512-bit kernels, two quant blocks per vector (AVX-512 F/BW/VL/VNNI).
    Avx512,
}

impl SimdLevel {
    /// Name for logs and bench JSON.
    pub fn name(self) -> &'static str {
        match self {
            Self::Scalar => "scalar",
            Self::Avx2 => "avx2",
            Self::Avx2Vnni => "avx2vnni",
            Self::Avx512 => "avx512",
        }
    }

    /// Every level this CPU supports, worst first.
    pub fn available() -> Vec<SimdLevel> {
        let mut v = vec![Self::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                v.push(Self::Avx2);
                if is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512vnni")
                {
                    v.push(Self::Avx2Vnni);
                    v.push(Self::Avx512);
                }
            }
        }
        v
    }
}

/// The SIMD level used by the kernels: the best available, capped by the environment variable
/// `KVINFER_SIMD` (`scalar`, `avx2`, `avx2vnni`, `avx512`) for comparisons. Detected once.
pub fn simd() -> SimdLevel {
    static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let avail = SimdLevel::available();
        let best = *avail.last().unwrap_or(&SimdLevel::Scalar);
        let want = std::env::var("KVINFER_SIMD").unwrap_or_default();
        avail.into_iter().find(|l| l.name() == want).unwrap_or(best)
    })
}

/// Whether model loading repacks weights for the group kernels: yes unless the environment
/// variable `KVINFER_PACK` is `0` (to compare with the row kernels; results then differ in the
/// last bits, as between SIMD levels).
pub fn packing_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("KVINFER_PACK").map_or(true, |v| v != "0"))
}

/// Which SIMD level was picked at runtime (`"avx512"`, `"avx2"`, `"scalar"`).
pub fn simd_level() -> &'static str {
    simd().name()
}

/// Dequantize one row (`dst.len()` weights) of type `ty` from `src`
/// (`ty.row_bytes(dst.len())` bytes). Supports every [`GgmlType`].
pub fn dequantize_row(ty: GgmlType, src: &[u8], dst: &mut [f32]) {
    dequantize_row_with(simd(), ty, src, dst)
}

fn dequantize_row_with(level: SimdLevel, ty: GgmlType, src: &[u8], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if ty == GgmlType::F16 && level >= SimdLevel::Avx2 {
        assert_eq!(
            src.len(),
            2 * dst.len(),
            "dequantize_row: F16 row length mismatch"
        );
        // SAFETY: level >= Avx2 implies F16C was detected.
        unsafe { x86::f16_to_f32_row(src, dst) };
        return;
    }
    let _ = level;
    quant::dequantize_row_scalar(ty, src, dst)
}

/// `y[t * w.rows + r] = sum_c W[r, c] * x[t * w.cols + c]` for `t` in `0..n_tokens`.
///
/// Runs on the rayon global pool (the caller sizes it). `x` is `n_tokens * cols`, `y` is
/// `n_tokens * rows`. Panics on shape mismatches.
///
/// Batch-invariant: at a given SIMD level, `y[t * rows + r]` is bitwise the value a call with
/// token `t` alone would give, whatever `n_tokens`, `rows` and the thread count (each output is
/// computed by one fixed sequence of operations). Different SIMD levels may differ slightly.
pub fn matmul(w: QMatRef, x: &[f32], n_tokens: usize, y: &mut [f32]) {
    matmul::matmul_with(simd(), w, x, n_tokens, y)
}

/// Sum of `a[i] * b[i]` (over the shorter length).
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    dot_f32_with(simd(), a, b)
}

fn dot_f32_with(level: SimdLevel, a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if level >= SimdLevel::Avx2 {
        // SAFETY: AVX2 and FMA were detected.
        return unsafe { x86::dot_f32(a, b) };
    }
    let _ = level;
    // 8 partial sums so the compiler can vectorize.
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `a · b` with `b` in f16 (attention's q·k over the cache), bit-identical to [`dot_f32`] on
/// `b` widened to f32.
pub fn dot_f16(a: &[f32], b: &[half::f16]) -> f32 {
    dot_f16_with(simd(), a, b)
}

fn dot_f16_with(level: SimdLevel, a: &[f32], b: &[half::f16]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if level >= SimdLevel::Avx2 {
        // SAFETY: AVX2, FMA and F16C were detected.
        return unsafe { x86::dot_f32_f16(a, b) };
    }
    let wide: Vec<f32> = b.iter().map(|v| v.to_f32()).collect();
    dot_f32_with(level, a, &wide)
}

/// `y[i] += alpha * x[i]` with `x` in f16 (attention's p·V), bit-identical to [`axpy_f32`] on
/// `x` widened to f32.
pub fn axpy_f16(alpha: f32, x: &[half::f16], y: &mut [f32]) {
    axpy_f16_with(simd(), alpha, x, y)
}

fn axpy_f16_with(level: SimdLevel, alpha: f32, x: &[half::f16], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if level >= SimdLevel::Avx2 {
        // SAFETY: AVX2, FMA and F16C were detected.
        return unsafe { x86::axpy_f16(alpha, x, y) };
    }
    let wide: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
    axpy_f32_with(level, alpha, &wide, y)
}

/// `out[r] = q · rows[r]` for `out.len()` rows of `hd` f16 each (a block of keys); each result
/// bit-identical to [`dot_f16`] on that row.
pub fn dot_f16_rows(q: &[f32], rows: &[half::f16], hd: usize, out: &mut [f32]) {
    dot_f16_rows_with(simd(), q, rows, hd, out)
}

fn dot_f16_rows_with(level: SimdLevel, q: &[f32], rows: &[half::f16], hd: usize, out: &mut [f32]) {
    assert!(rows.len() >= out.len() * hd, "rows shorter than out");
    #[cfg(target_arch = "x86_64")]
    if level >= SimdLevel::Avx2 {
        // SAFETY: AVX2, FMA and F16C were detected; the assert bounds every row.
        return unsafe { x86::dot_f16_rows(q, rows, hd, out) };
    }
    for (r, o) in out.iter_mut().enumerate() {
        *o = dot_f16_with(level, q, &rows[r * hd..(r + 1) * hd]);
    }
}

/// `y += probs[r] * rows[r]` for each row in order (a block of values), bit-identical to
/// [`axpy_f16`] called row after row.
pub fn axpy_f16_rows(probs: &[f32], rows: &[half::f16], hd: usize, y: &mut [f32]) {
    axpy_f16_rows_with(simd(), probs, rows, hd, y)
}

fn axpy_f16_rows_with(
    level: SimdLevel,
    probs: &[f32],
    rows: &[half::f16],
    hd: usize,
    y: &mut [f32],
) {
    assert!(rows.len() >= probs.len() * hd, "rows shorter than probs");
    #[cfg(target_arch = "x86_64")]
    if level >= SimdLevel::Avx2 {
        // SAFETY: AVX2, FMA and F16C were detected; the assert bounds every row.
        return unsafe { x86::axpy_f16_rows(probs, rows, hd, y) };
    }
    for (r, &p) in probs.iter().enumerate() {
        axpy_f16_with(level, p, &rows[r * hd..(r + 1) * hd], y);
    }
}

/// `y[i] += alpha * x[i]` (over the shorter length).
pub fn axpy_f32(alpha: f32, x: &[f32], y: &mut [f32]) {
    axpy_f32_with(simd(), alpha, x, y)
}

fn axpy_f32_with(level: SimdLevel, alpha: f32, x: &[f32], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if level >= SimdLevel::Avx2 {
        // SAFETY: AVX2 and FMA were detected.
        return unsafe { x86::axpy_f32(alpha, x, y) };
    }
    let _ = level;
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += alpha * xi;
    }
}
