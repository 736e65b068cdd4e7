//! Quantized KV rows (ggml's `block_q8_0` / `block_q4_0` per 32 values) and the attention
//! kernels that read them in place: K·Q as integer dot products against the query quantized
//! to q8_0 (the weight kernels' decode path, as ggml does), P·V as a dequantizing axpy. The
//! `q4` dtype rotates each head's rows with an orthonormal Hadamard transform first.
//!
//! The scalar functions define the results; the AVX2 axpy agrees up to float rounding and is
//! tested against them (`tests.rs`).

use super::quant::{self, Q8Acts, QK};
use super::SimdLevel;
use crate::ggml_type::GgmlType;
use half::f16;
use kvinfer_cache::KvDtype;

/// The GGML block type of a quantized dtype's rows.
pub fn ggml_type(dtype: KvDtype) -> GgmlType {
    match dtype {
        KvDtype::F16 => GgmlType::F16,
        KvDtype::Q8_0 => GgmlType::Q8_0,
        KvDtype::Q4_0 | KvDtype::Q4 => GgmlType::Q4_0,
    }
}

/// In-place orthonormal fast Walsh-Hadamard transform (`x.len()` a power of two): `H x` with
/// `H = H^T = H^-1`, so applying it twice gives `x` back and dot products are preserved.
pub fn hadamard(x: &mut [f32]) {
    let n = x.len();
    debug_assert!(n.is_power_of_two(), "Hadamard of {n} values");
    let mut h = 1;
    while h < n {
        for i in (0..n).step_by(2 * h) {
            for j in i..i + h {
                let (a, b) = (x[j], x[j + h]);
                x[j] = a + b;
                x[j + h] = a - b;
            }
        }
        h *= 2;
    }
    let s = 1.0 / (n as f32).sqrt();
    for v in x {
        *v *= s;
    }
}

/// Quantizes one row of `x` (a multiple of 32 values) into `out` (`dtype.row_bytes(x.len())`
/// bytes), rotating it first for `q4`. Layouts and rounding are ggml's: q8_0 as
/// `quantize_row_q8_0` (its AVX2 path: round half to even), q4_0 as `quantize_row_q4_0_ref`.
pub fn quantize_kv_row(dtype: KvDtype, x: &[f32], out: &mut [u8]) {
    // The write path runs per token, layer and head: rotate in a stack buffer, not a Vec.
    let mut buf = [0.0f32; 1024];
    let mut heap;
    let x = if dtype.rotated() {
        let r = if x.len() <= buf.len() {
            &mut buf[..x.len()]
        } else {
            heap = vec![0.0f32; x.len()];
            &mut heap[..]
        };
        r.copy_from_slice(x);
        hadamard(r);
        &*r
    } else {
        x
    };
    match dtype {
        KvDtype::F16 => {
            for (v, o) in x.iter().zip(out.chunks_exact_mut(2)) {
                o.copy_from_slice(&f16::from_f32(*v).to_le_bytes());
            }
        }
        KvDtype::Q8_0 => {
            let mut qs = [0i8; QK];
            let (mut d, mut s) = ([0.0f32], [0.0f32]);
            for (xb, ob) in x.chunks_exact(QK).zip(out.chunks_exact_mut(34)) {
                quant::quantize_q8_scalar(xb, &mut qs, &mut d, &mut s, false);
                ob[..2].copy_from_slice(&f16::from_f32(d[0]).to_le_bytes());
                for (o, q) in ob[2..].iter_mut().zip(qs) {
                    *o = q as u8;
                }
            }
        }
        KvDtype::Q4_0 | KvDtype::Q4 => {
            for (xb, ob) in x.chunks_exact(QK).zip(out.chunks_exact_mut(18)) {
                let (mut amax, mut max) = (0.0f32, 0.0f32);
                for &v in xb {
                    if amax < v.abs() {
                        amax = v.abs();
                        max = v;
                    }
                }
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                ob[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
                for j in 0..QK / 2 {
                    let q = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
                    ob[2 + j] = q(xb[j]) | (q(xb[j + QK / 2]) << 4);
                }
            }
        }
    }
}

/// A query head prepared for quantized keys: rotated for `q4`, quantized to q8_0.
#[derive(Default)]
pub struct KvQuery {
    acts: Q8Acts,
    rotated: Vec<f32>,
}

impl KvQuery {
    /// Prepares `q` (one head) for keys stored as `dtype`.
    pub fn prepare(&mut self, dtype: KvDtype, q: &[f32]) {
        let q = if dtype.rotated() {
            self.rotated.clear();
            self.rotated.extend_from_slice(q);
            hadamard(&mut self.rotated);
            &self.rotated[..]
        } else {
            q
        };
        super::matmul::quantize_one(q, &mut self.acts);
    }
}

/// `out[r] = q · key_r` for `out.len()` quantized rows of `hd` values (`rows`: their bytes, as
/// stored), with the weight kernels' integer dot products.
pub fn dot_kv_rows(dtype: KvDtype, q: &KvQuery, rows: &[u8], hd: usize, out: &mut [f32]) {
    let ty = ggml_type(dtype);
    let rb = dtype.row_bytes(hd);
    assert!(rows.len() >= out.len() * rb, "rows shorter than out");
    super::matmul::dot_rows_one(ty, &rows[..out.len() * rb], hd, &q.acts, out);
}

/// `y += probs[r] * value_r` for each quantized row in order (then, for `q4`, the caller
/// rotates `y` back with [`hadamard`]).
pub fn axpy_kv_rows(dtype: KvDtype, probs: &[f32], rows: &[u8], hd: usize, y: &mut [f32]) {
    axpy_kv_rows_with(super::simd(), dtype, probs, rows, hd, y)
}

pub(crate) fn axpy_kv_rows_with(
    level: SimdLevel,
    dtype: KvDtype,
    probs: &[f32],
    rows: &[u8],
    hd: usize,
    y: &mut [f32],
) {
    let rb = dtype.row_bytes(hd);
    assert!(
        rows.len() >= probs.len() * rb && y.len() >= hd,
        "rows shorter than probs"
    );
    #[cfg(target_arch = "x86_64")]
    if level >= SimdLevel::Avx2 {
        // SAFETY: AVX2 and FMA were detected; the assert bounds every row.
        return unsafe { axpy_avx2(dtype, probs, rows, hd, y) };
    }
    let _ = level;
    for (r, &p) in probs.iter().enumerate() {
        axpy_row_scalar(dtype, p, &rows[r * rb..(r + 1) * rb], &mut y[..hd]);
    }
}

/// `y += p * dequant(row)`: the reference.
pub(crate) fn axpy_row_scalar(dtype: KvDtype, p: f32, row: &[u8], y: &mut [f32]) {
    match dtype {
        KvDtype::F16 => {
            for (o, b) in y.iter_mut().zip(row.chunks_exact(2)) {
                *o += p * f16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        KvDtype::Q8_0 => {
            for (yb, b) in y.chunks_exact_mut(QK).zip(row.chunks_exact(34)) {
                let d = p * f16::from_le_bytes([b[0], b[1]]).to_f32();
                for (o, &q) in yb.iter_mut().zip(&b[2..]) {
                    *o += d * (q as i8) as f32;
                }
            }
        }
        KvDtype::Q4_0 | KvDtype::Q4 => {
            for (yb, b) in y.chunks_exact_mut(QK).zip(row.chunks_exact(18)) {
                let d = p * f16::from_le_bytes([b[0], b[1]]).to_f32();
                for j in 0..QK / 2 {
                    let q = b[2 + j];
                    yb[j] += d * ((q & 0xF) as i32 - 8) as f32;
                    yb[j + QK / 2] += d * ((q >> 4) as i32 - 8) as f32;
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn axpy_avx2(dtype: KvDtype, probs: &[f32], rows: &[u8], hd: usize, y: &mut [f32]) {
    use std::arch::x86_64::*;
    let rb = dtype.row_bytes(hd);
    if dtype == KvDtype::F16 {
        for (r, &p) in probs.iter().enumerate() {
            axpy_row_scalar(dtype, p, &rows[r * rb..(r + 1) * rb], &mut y[..hd]);
        }
        return;
    }
    let q8 = dtype == KvDtype::Q8_0;
    let bytes = if q8 { 34 } else { 18 };
    // 64 columns (two blocks of 32) at a time, accumulated in 8 registers over all rows.
    for c in (0..hd).step_by(2 * QK) {
        let nblk = ((hd - c) / QK).min(2);
        let yp = y.as_mut_ptr().add(c);
        let mut acc = [_mm256_setzero_ps(); 8];
        for (k, a) in acc.iter_mut().enumerate().take(nblk * 4) {
            *a = _mm256_loadu_ps(yp.add(k * 8));
        }
        for (r, &p) in probs.iter().enumerate() {
            for b in 0..nblk {
                let off = r * rb + (c / QK + b) * bytes;
                let d = _mm256_set1_ps(p * super::quant::f16_at(rows, off));
                let blk = rows.as_ptr().add(off + 2);
                let v: [__m256; 4] = if q8 {
                    let lo = _mm_loadu_si128(blk as *const __m128i);
                    let hi = _mm_loadu_si128(blk.add(16) as *const __m128i);
                    [
                        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)),
                        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128::<8>(lo))),
                        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)),
                        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128::<8>(hi))),
                    ]
                } else {
                    // Low nibbles are values 0..16, high nibbles 16..32, both offset by 8.
                    let raw = _mm_loadu_si128(blk as *const __m128i);
                    let m = _mm_set1_epi8(0x0F);
                    let lo = _mm_and_si128(raw, m);
                    let hi = _mm_and_si128(_mm_srli_epi16::<4>(raw), m);
                    let eight = _mm256_set1_epi32(8);
                    let f = |x: __m128i| {
                        _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(x), eight))
                    };
                    [
                        f(lo),
                        f(_mm_srli_si128::<8>(lo)),
                        f(hi),
                        f(_mm_srli_si128::<8>(hi)),
                    ]
                };
                for (k, vk) in v.iter().enumerate() {
                    acc[b * 4 + k] = _mm256_fmadd_ps(d, *vk, acc[b * 4 + k]);
                }
            }
        }
        for (k, a) in acc.iter().enumerate().take(nblk * 4) {
            _mm256_storeu_ps(yp.add(k * 8), *a);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{dequantize_row, SimdLevel};

    fn data(n: usize, seed: u32) -> Vec<f32> {
        let mut x = seed.wrapping_mul(2654435761) | 1;
        (0..n)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let v = (x % 2000) as f32 / 1000.0 - 1.0;
                // A few outliers, as real keys have.
                if i % 29 == 3 {
                    v * 8.0
                } else {
                    v
                }
            })
            .collect()
    }

    #[test]
    fn hadamard_is_orthonormal_and_its_own_inverse() {
        let x = data(64, 1);
        let mut y = x.clone();
        hadamard(&mut y);
        let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
        assert!((norm(&x) - norm(&y)).abs() < 1e-3 * norm(&x));
        hadamard(&mut y);
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() < 1e-5);
        }
    }

    #[test]
    fn rows_quantize_as_ggml_and_dequantize_with_its_kernels() {
        let x = data(128, 2);
        for dtype in [KvDtype::Q8_0, KvDtype::Q4_0] {
            let mut row = vec![0u8; dtype.row_bytes(128)];
            quantize_kv_row(dtype, &x, &mut row);
            let mut back = vec![0.0f32; 128];
            dequantize_row(ggml_type(dtype), &row, &mut back);
            let tol = if dtype == KvDtype::Q8_0 {
                8.0 / 127.0
            } else {
                8.0 / 7.0
            };
            for (a, b) in x.iter().zip(&back) {
                assert!((a - b).abs() <= tol, "{dtype:?}: {a} vs {b}");
            }
            // The axpy reference dequantizes exactly as ggml does.
            let mut y = vec![0.0f32; 128];
            axpy_row_scalar(dtype, 1.0, &row, &mut y);
            assert_eq!(y, back, "{dtype:?}");
        }
    }

    #[test]
    fn dot_and_axpy_kernels_agree_with_the_references() {
        let hd = 64;
        let n = 5;
        for dtype in [KvDtype::Q8_0, KvDtype::Q4_0, KvDtype::Q4] {
            let rb = dtype.row_bytes(hd);
            let mut rows = vec![0u8; n * rb];
            for r in 0..n {
                quantize_kv_row(
                    dtype,
                    &data(hd, 10 + r as u32),
                    &mut rows[r * rb..(r + 1) * rb],
                );
            }
            let q = data(hd, 99);
            let mut kq = KvQuery::default();
            kq.prepare(dtype, &q);
            let mut out = vec![0.0f32; n];
            dot_kv_rows(dtype, &kq, &rows, hd, &mut out);
            // Against f32 math on the dequantized keys and the (rotated) query.
            let mut qr = q.clone();
            if dtype.rotated() {
                hadamard(&mut qr);
            }
            for r in 0..n {
                let mut k = vec![0.0f32; hd];
                dequantize_row(ggml_type(dtype), &rows[r * rb..(r + 1) * rb], &mut k);
                let want: f32 = k.iter().zip(&qr).map(|(a, b)| a * b).sum();
                let scale = k.iter().map(|v| v.abs()).sum::<f32>() * 0.02 + 1e-3;
                assert!(
                    (out[r] - want).abs() <= scale,
                    "{dtype:?} row {r}: {} vs {want}",
                    out[r]
                );
                // The rotated dot equals the plain one (up to the quantization).
                if dtype.rotated() {
                    let mut kk = k.clone();
                    hadamard(&mut kk);
                    let plain: f32 = kk.iter().zip(&q).map(|(a, b)| a * b).sum();
                    assert!((plain - want).abs() < 1e-3 * (1.0 + want.abs()));
                }
            }
            let probs: Vec<f32> = (0..n).map(|i| 0.1 + i as f32 * 0.05).collect();
            let mut fast = vec![0.0f32; hd];
            let mut slow = vec![0.0f32; hd];
            axpy_kv_rows_with(
                SimdLevel::Avx2.min(crate::kernels::simd()),
                dtype,
                &probs,
                &rows,
                hd,
                &mut fast,
            );
            axpy_kv_rows_with(SimdLevel::Scalar, dtype, &probs, &rows, hd, &mut slow);
            for (a, b) in fast.iter().zip(&slow) {
                assert!(
                    (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                    "{dtype:?}: {a} vs {b}"
                );
            }
        }
    }
}
