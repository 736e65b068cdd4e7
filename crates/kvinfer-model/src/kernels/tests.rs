//! Kernel tests: hand-checked block decodes, every SIMD level against the scalar reference, and
//! matmul against a naive dequantize-then-f32 product.

#![allow(clippy::needless_range_loop)]
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::matmul::matmul_with;
use super::packed;
use super::quant::{self, BlockQ8K, QK};
use super::*;
use crate::ggml_type::{GgmlType, QK_K};

const ALL_MATMUL_TYPES: [GgmlType; 15] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::IQ4_NL,
    GgmlType::IQ4_XS,
];

/// The types dotted with Q8_K activations.
const SUPER_BLOCK_TYPES: [GgmlType; 6] = [
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::IQ4_XS,
];

fn f16_bytes(v: f32) -> [u8; 2] {
    half::f16::from_f32(v).to_bits().to_le_bytes()
}

/// A random but well-formed row of `cols` weights (finite scales of realistic size).
fn random_row(rng: &mut StdRng, ty: GgmlType, cols: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let nblocks = cols / ty.block_size();
    for _ in 0..nblocks {
        let mut b: Vec<u8> = (0..ty.type_size()).map(|_| rng.random()).collect();
        let d = rng.random_range(0.002f32..0.02);
        let m = rng.random_range(-0.1f32..0.1);
        match ty {
            GgmlType::F32 => b.copy_from_slice(&rng.random_range(-1.0f32..1.0).to_le_bytes()),
            GgmlType::F16 => b.copy_from_slice(&f16_bytes(rng.random_range(-1.0f32..1.0))),
            GgmlType::BF16 => {
                let bits = (rng.random_range(-1.0f32..1.0).to_bits() >> 16) as u16;
                b.copy_from_slice(&bits.to_le_bytes());
            }
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => {
                b[0..2].copy_from_slice(&f16_bytes(d))
            }
            GgmlType::IQ4_NL => b[0..2].copy_from_slice(&f16_bytes(d / 16.0)),
            GgmlType::IQ4_XS => b[0..2].copy_from_slice(&f16_bytes(d / 256.0)),
            GgmlType::Q2_K => {
                b[80..82].copy_from_slice(&f16_bytes(d / 4.0));
                b[82..84].copy_from_slice(&f16_bytes(d / 8.0));
            }
            GgmlType::Q3_K => b[108..110].copy_from_slice(&f16_bytes(d / 16.0)),
            GgmlType::Q4_1 | GgmlType::Q5_1 => {
                b[0..2].copy_from_slice(&f16_bytes(d));
                b[2..4].copy_from_slice(&f16_bytes(m));
            }
            GgmlType::Q4_K | GgmlType::Q5_K => {
                b[0..2].copy_from_slice(&f16_bytes(d / 16.0));
                b[2..4].copy_from_slice(&f16_bytes(d / 32.0));
            }
            GgmlType::Q6_K => b[208..210].copy_from_slice(&f16_bytes(d / 64.0)),
            GgmlType::Q8_K => unreachable!(),
        }
        out.extend_from_slice(&b);
    }
    out
}

fn random_matrix(rng: &mut StdRng, ty: GgmlType, rows: usize, cols: usize) -> Vec<u8> {
    (0..rows).flat_map(|_| random_row(rng, ty, cols)).collect()
}

fn random_f32(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// ||a - b|| / ||b||.
fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    let num: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f32 = b.iter().map(|y| y * y).sum();
    (num / den.max(1e-30)).sqrt()
}

#[test]
fn dequant_hand_checked_q4_0_q4_1_q5_0_q8_0() {
    // Q4_0: d = 0.5, qs[0] = 0x21 -> w0 = (1 - 8) * 0.5, w16 = (2 - 8) * 0.5.
    let mut b = vec![0u8; 18];
    b[0..2].copy_from_slice(&f16_bytes(0.5));
    b[2] = 0x21;
    b[17] = 0xF0; // w15 = -4, w31 = (15 - 8) * 0.5
    let mut y = [0.0f32; 32];
    dequantize_row(GgmlType::Q4_0, &b, &mut y);
    assert_eq!(
        (y[0], y[16], y[15], y[31], y[1]),
        (-3.5, -3.0, -4.0, 3.5, -4.0)
    );

    // Q4_1: d = 0.25, m = 1.0, qs[3] = 0x5A -> w3 = 10 * 0.25 + 1, w19 = 5 * 0.25 + 1.
    let mut b = vec![0u8; 20];
    b[0..2].copy_from_slice(&f16_bytes(0.25));
    b[2..4].copy_from_slice(&f16_bytes(1.0));
    b[4 + 3] = 0x5A;
    dequantize_row(GgmlType::Q4_1, &b, &mut y);
    assert_eq!((y[3], y[19], y[0]), (3.5, 2.25, 1.0));

    // Q5_0: d = 1, qh bit 2 and bit 20 set; qs[2] = 0x31, qs[4] = 0x07.
    let mut b = vec![0u8; 22];
    b[0..2].copy_from_slice(&f16_bytes(1.0));
    b[2..6].copy_from_slice(&((1u32 << 2) | (1 << 20)).to_le_bytes());
    b[6 + 2] = 0x31;
    b[6 + 4] = 0x07;
    dequantize_row(GgmlType::Q5_0, &b, &mut y);
    // w2 = (1 | 16) - 16 = 1; w18 = 3 - 16; w4 = 7 - 16; w20 = (0 | 16) - 16 = 0.
    assert_eq!((y[2], y[18], y[4], y[20]), (1.0, -13.0, -9.0, 0.0));

    // Q8_0: d = 2, qs[5] = -3.
    let mut b = vec![0u8; 34];
    b[0..2].copy_from_slice(&f16_bytes(2.0));
    b[2 + 5] = (-3i8) as u8;
    dequantize_row(GgmlType::Q8_0, &b, &mut y);
    assert_eq!((y[5], y[0]), (-6.0, 0.0));
}

#[test]
fn dequant_hand_checked_q4_k_q6_k() {
    // Q4_K: d = 1, dmin = 0.5; sub-block 0 scale 3 min 2, sub-block 1 scale 5 min 1,
    // sub-block 4 (packed in the high bits) scale 0x12 | (1 << 4) ... see get_scale_min_k4.
    let mut b = vec![0u8; 144];
    b[0..2].copy_from_slice(&f16_bytes(1.0));
    b[2..4].copy_from_slice(&f16_bytes(0.5));
    b[4] = 3; // sc0
    b[5] = 5; // sc1
    b[8] = 2; // m0
    b[9] = 1; // m1
    b[4 + 8] = 0x21; // sub-block 4: sc low nibble 1, m low nibble 2
    b[4] |= 0x40; // sc4 high bits = 1 -> sc4 = 1 | (1 << 4) = 17
    b[16] = 0x97; // weight 0: low nibble 7 (sub-block 0); weight 32: high nibble 9 (sub-block 1)
    b[16 + 64] = 0x04; // weight 128: low nibble 4 (sub-block 4)
    let mut y = [0.0f32; QK_K];
    dequantize_row(GgmlType::Q4_K, &b, &mut y);
    assert_eq!(y[0], 3.0 * 7.0 - 0.5 * 2.0);
    assert_eq!(y[32], 5.0 * 9.0 - 0.5 * 1.0);
    assert_eq!(y[128], 17.0 * 4.0 - 0.5 * 2.0);

    // Q5_K: Q4_K's scales and nibbles (qs from byte 48) plus fifth bits from qh (bytes 16..48):
    // weight l of sub-block s takes bit s of qh[l].
    let mut q5 = vec![0u8; 176];
    q5[..16].copy_from_slice(&b[..16]);
    q5[48] = 0x97;
    q5[48 + 64] = 0x04;
    q5[16] = 0b0000_0010; // weight 32 (sub-block 1, l = 0): + 16
    q5[16 + 5] = 0b0001_0000; // weight 128 + 5 (sub-block 4, l = 5): + 16
    let mut y = [0.0f32; QK_K];
    dequantize_row(GgmlType::Q5_K, &q5, &mut y);
    assert_eq!(y[0], 3.0 * 7.0 - 0.5 * 2.0);
    assert_eq!(y[32], 5.0 * (9.0 + 16.0) - 0.5 * 1.0);
    assert_eq!(y[128], 17.0 * 4.0 - 0.5 * 2.0);
    assert_eq!(y[133], 17.0 * 16.0 - 0.5 * 2.0);

    // Q6_K: d = 0.5; weight 0 = (ql[0] & 0xF | (qh[0] & 3) << 4) - 32 with scale sc[0];
    // weight 96 = (ql[32] >> 4 | (qh[0] >> 6) << 4) - 32 with sc[6]; weight 150 in the second half.
    let mut b = vec![0u8; 210];
    b[208..210].copy_from_slice(&f16_bytes(0.5));
    b[0] = 0x05;
    b[32] = 0xA0;
    b[128] = 0b11_00_00_10;
    b[192] = 2;
    b[192 + 6] = (-1i8) as u8;
    b[64 + 22] = 0x0F; // second half, l = 22, k = 0 -> weight 128 + 22 with sc[8 + 1]
    b[128 + 32 + 22] = 0x01;
    b[192 + 9] = 4;
    let mut y = [0.0f32; QK_K];
    dequantize_row(GgmlType::Q6_K, &b, &mut y);
    assert_eq!(y[0], 0.5 * 2.0 * ((5 | (2 << 4)) - 32) as f32);
    assert_eq!(y[96], -0.5 * ((0xA | (3 << 4)) - 32) as f32); // d * sc[6] = 0.5 * -1
    assert_eq!(y[150], 0.5 * 4.0 * ((0xF | (1 << 4)) - 32) as f32);
}

/// Q2_K, Q3_K, IQ4_NL and IQ4_XS blocks built by hand from ggml's layouts.
#[test]
fn dequant_hand_checked_q2_k_q3_k_iq4() {
    // Q2_K: d = 1, dmin = 0.5. Weight 128h + 32k + l takes bits 2k of qs[32h + l] (bytes 16..80)
    // and the scale / min of its 16-weight group (low / high nibble of scales[group]).
    let mut b = vec![0u8; 84];
    b[80..82].copy_from_slice(&f16_bytes(1.0));
    b[82..84].copy_from_slice(&f16_bytes(0.5));
    b[0] = 0x23; // group 0: scale 3, min 2
    b[5] = 0x17; // group 5 (weights 80..96): scale 7, min 1
    b[16] = 0b10_00_00_11; // weight 0: 3; weight 96 (k = 3, l = 0): 2
    b[16 + 17] = 0b00_01_00_00; // weight 64 + 17 = 81 (k = 2, group 5): 1
    let mut y = [0.0f32; QK_K];
    dequantize_row(GgmlType::Q2_K, &b, &mut y);
    assert_eq!(y[0], 3.0 * 3.0 - 0.5 * 2.0);
    assert_eq!(y[81], 7.0 * 1.0 - 0.5 * 1.0);
    assert_eq!(y[96], 0.0 * 2.0 - 0.0); // group 6: scale 0, min 0
    assert_eq!(y[1], -0.5 * 2.0);

    // Q3_K: d = 0.5. q = low two bits - (high bit ? 0 : 4); 16 scales of 6 bits minus 32.
    let mut b = vec![0u8; 110];
    b[108..110].copy_from_slice(&f16_bytes(0.5));
    b[96] = 0x05 | 0x30; // scale 0 low nibble 5, scale 8 low nibble 3
    b[96 + 8] = 0b10_00_00_10; // scale 0 high bits 2 (-> 37 - 32 = 5), scale 12 high bits 2
    b[96 + 4] = 0xA0; // scale 12 low nibble 10 (-> 42 - 32 = 10)
    b[32] = 0b11; // weight 0: low bits 3
    b[0] = 0b1; // weight 0: high bit set -> q = 3
    b[32 + 32 + 1] = 0b01; // weight 128 + 1 (group 8): low 1, high bit clear -> q = -3
    b[32 + 32 + 2] = 0b01_00_00_00; // weight 128 + 96 + 2 = 226 (group 14)
    b[2] = 1 << 7; // weight 226's high bit (bit 4h + k = 7)
    let mut y = [0.0f32; QK_K];
    dequantize_row(GgmlType::Q3_K, &b, &mut y);
    assert_eq!(y[0], 0.5 * 5.0 * 3.0);
    assert_eq!(y[129], 0.5 * (3.0 - 32.0) * -3.0); // scale 8: 3 | (0 << 4), minus 32
    assert_eq!(y[226], 0.5 * -32.0 * 1.0); // scale 14: 0 - 32
    assert_eq!(y[192], 0.5 * (42.0 - 32.0) * -4.0); // group 12, q = 0 - 4

    // IQ4_NL: Q4_0's nibbles index the table.
    let mut b = vec![0u8; 18];
    b[0..2].copy_from_slice(&f16_bytes(0.25));
    b[2] = 0xF0;
    let mut y = [0.0f32; 32];
    dequantize_row(GgmlType::IQ4_NL, &b, &mut y);
    assert_eq!(y[0], 0.25 * -127.0);
    assert_eq!(y[16], 0.25 * 113.0);
    assert_eq!(y[1], 0.25 * -127.0);

    // IQ4_XS: d = 2; sub-block 3's scale = low nibble (high half of scales_l[1]) | two bits
    // 6..8 of scales_h, minus 32.
    let mut b = vec![0u8; 136];
    b[0..2].copy_from_slice(&f16_bytes(2.0));
    b[2..4].copy_from_slice(&(0b10u16 << 6).to_le_bytes());
    b[5] = 0x30; // scale 3 low nibble 3 -> 3 | 2 << 4 = 35 -> 3
    b[8 + 16 * 3 + 4] = 0x9E; // sub-block 3: weight 4 -> 14 (89), weight 20 -> 9 (13)
    let mut y = [0.0f32; QK_K];
    dequantize_row(GgmlType::IQ4_XS, &b, &mut y);
    assert_eq!(y[96 + 4], 2.0 * 3.0 * 89.0);
    assert_eq!(y[96 + 20], 2.0 * 3.0 * 13.0);
    assert_eq!(y[0], 2.0 * -32.0 * -127.0);
}

#[test]
fn dequant_bf16_f16_f32() {
    let vals = [1.5f32, -2.25, 0.0, 3.0e-3];
    let mut y = [0.0f32; 4];
    let f32b: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
    dequantize_row(GgmlType::F32, &f32b, &mut y);
    assert_eq!(y, vals);
    let f16b: Vec<u8> = vals.iter().flat_map(|&v| f16_bytes(v)).collect();
    dequantize_row(GgmlType::F16, &f16b, &mut y);
    for (a, b) in y.iter().zip(&vals) {
        assert!((a - b).abs() <= 1e-3 * b.abs());
    }
    let bf: Vec<u8> = vals
        .iter()
        .flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes())
        .collect();
    dequantize_row(GgmlType::BF16, &bf, &mut y);
    assert_eq!(&y[..3], &vals[..3]);
}

#[test]
fn simd_dequant_f16_matches_scalar() {
    let mut rng = StdRng::seed_from_u64(1);
    let row = random_row(&mut rng, GgmlType::F16, 77);
    let (mut a, mut b) = (vec![0.0; 77], vec![0.0; 77]);
    quant::dequantize_row_scalar(GgmlType::F16, &row, &mut a);
    for level in SimdLevel::available() {
        dequantize_row_with(level, GgmlType::F16, &row, &mut b);
        assert_eq!(a, b, "{level:?}");
    }
}

/// The block-value decode used by the dot products agrees with ggml's dequantization.
#[test]
fn block_values_match_dequant() {
    let mut rng = StdRng::seed_from_u64(2);
    for ty in [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::IQ4_NL,
    ] {
        let row = random_row(&mut rng, ty, 64);
        let mut y = vec![0.0f32; 64];
        dequantize_row(ty, &row, &mut y);
        let mut v = [0i32; QK];
        for (b, blk) in row.chunks_exact(ty.type_size()).enumerate() {
            let (d, m) = quant::block_32_values(ty, blk, &mut v);
            for j in 0..QK {
                let w = d * v[j] as f32 + m;
                assert!(
                    (w - y[b * QK + j]).abs() <= 1e-6,
                    "{ty:?} block {b} weight {j}"
                );
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn simd_quantize_q8_is_bit_identical() {
    if SimdLevel::available().len() < 2 {
        return;
    }
    let mut rng = StdRng::seed_from_u64(3);
    let mut x = random_f32(&mut rng, 32 * 20);
    x[32..64].fill(0.0); // an all-zero block
    let nb = x.len() / QK;
    let (mut q1, mut d1, mut s1) = (vec![0i8; x.len()], vec![0.0; nb], vec![0.0; nb]);
    let (mut q2, mut d2, mut s2) = (q1.clone(), d1.clone(), s1.clone());
    quant::quantize_q8_scalar(&x, &mut q1, &mut d1, &mut s1, false);
    // SAFETY: AVX2 available (checked above).
    unsafe { super::x86::quantize_q8(&x, &mut q2, &mut d2, &mut s2, false) };
    assert_eq!((q1, d1, s1), (q2, d2, s2));
}

/// Naive reference: dequantize every row, f32 dot with every token.
fn naive_matmul(w: QMatRef, x: &[f32], n_tokens: usize) -> Vec<f32> {
    let mut y = vec![0.0f32; n_tokens * w.rows];
    let rb = w.ty.row_bytes(w.cols).unwrap();
    let mut wf = vec![0.0f32; w.cols];
    for r in 0..w.rows {
        quant::dequantize_row_scalar(w.ty, &w.data[r * rb..(r + 1) * rb], &mut wf);
        for t in 0..n_tokens {
            let xt = &x[t * w.cols..(t + 1) * w.cols];
            y[t * w.rows + r] = wf
                .iter()
                .zip(xt)
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum::<f64>() as f32;
        }
    }
    y
}

/// Every level (scalar included) against the naive f32 product; SIMD levels also against the
/// scalar integer reference, which sees identical quantized activations.
#[test]
fn matmul_all_types_all_levels() {
    let mut rng = StdRng::seed_from_u64(4);
    for ty in ALL_MATMUL_TYPES {
        // 32-weight types: an odd and an even number of blocks (the AVX-512 kernels take pairs).
        let cols = if ty.block_size() == QK_K { 512 } else { 96 };
        for &(rows, n_tokens, cols) in &[
            (37usize, 1usize, cols),
            (37, 7, cols),
            (64, 9, cols),
            (5, 4, cols),
            (13, 1, 2 * cols),
            (13, 6, 2 * cols),
        ] {
            // Offset by one byte: GGUF tensors are not aligned for these structs.
            let mut data = vec![0u8];
            data.extend(random_matrix(&mut rng, ty, rows, cols));
            let w = QMatRef {
                ty,
                rows,
                cols,
                data: &data[1..],
                packed: None,
            };
            let x = random_f32(&mut rng, n_tokens * cols);
            let want = naive_matmul(w, &x, n_tokens);
            let mut scalar = vec![f32::NAN; n_tokens * rows];
            matmul_with(SimdLevel::Scalar, w, &x, n_tokens, &mut scalar);
            let e = rel_err(&scalar, &want);
            let tol = if matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
                1e-5
            } else {
                1e-2
            };
            assert!(
                e < tol,
                "{ty:?} scalar {rows}x{cols} n={n_tokens}: rel err {e}"
            );
            for level in SimdLevel::available() {
                let mut y = vec![f32::NAN; n_tokens * rows];
                matmul_with(level, w, &x, n_tokens, &mut y);
                let e = rel_err(&y, &want);
                assert!(
                    e < tol,
                    "{ty:?} {level:?} {rows}x{cols} n={n_tokens}: rel err {e} vs f32"
                );
                // Offsets / mins are applied as a separate f32 term, so allow cancellation error
                // relative to the typical output size.
                let rms = (scalar.iter().map(|v| v * v).sum::<f32>() / scalar.len() as f32).sqrt();
                for (i, (a, b)) in y.iter().zip(&scalar).enumerate() {
                    let scale = b.abs().max(rms);
                    assert!(
                        (a - b).abs() <= 1e-4 * scale,
                        "{ty:?} {level:?} {rows}x{cols} n={n_tokens}: y[{i}] = {a} vs scalar {b}"
                    );
                }
            }
        }
    }
}

/// The public entry point on the shapes of the real models' 32-weight layers (cols 576/640).
#[test]
fn matmul_model_shapes() {
    let mut rng = StdRng::seed_from_u64(5);
    for &(ty, rows, cols) in &[
        (GgmlType::Q4_1, 192, 576),
        (GgmlType::Q5_0, 256, 640),
        (GgmlType::Q6_K, 64, 2048),
    ] {
        let data = random_matrix(&mut rng, ty, rows, cols);
        let w = QMatRef {
            ty,
            rows,
            cols,
            data: &data,
            packed: None,
        };
        for n_tokens in [1, 7] {
            let x = random_f32(&mut rng, n_tokens * cols);
            let mut y = vec![0.0f32; n_tokens * rows];
            matmul(w, &x, n_tokens, &mut y);
            let e = rel_err(&y, &naive_matmul(w, &x, n_tokens));
            assert!(e < 1e-2, "{ty:?} {rows}x{cols} n={n_tokens}: rel err {e}");
        }
    }
}

#[test]
fn k_quant_dots_simd_vs_scalar() {
    let mut rng = StdRng::seed_from_u64(6);
    let cols = 1024;
    let x = random_f32(&mut rng, cols);
    let mut act = vec![BlockQ8K::ZERO; cols / QK_K];
    quant::quantize_q8_k(&x, &mut act);
    for ty in SUPER_BLOCK_TYPES {
        let row = random_row(&mut rng, ty, cols);
        let scalar = match ty {
            GgmlType::Q2_K => quant::dot_q2_k_scalar(&row, &act),
            GgmlType::Q3_K => quant::dot_q3_k_scalar(&row, &act),
            GgmlType::Q4_K => quant::dot_q4_k_scalar(&row, &act),
            GgmlType::Q5_K => quant::dot_q5_k_scalar(&row, &act),
            GgmlType::Q6_K => quant::dot_q6_k_scalar(&row, &act),
            _ => quant::dot_iq4_xs_scalar(&row, &act),
        };
        #[cfg(target_arch = "x86_64")]
        if SimdLevel::available().len() >= 2 {
            // SAFETY: AVX2 available.
            let simd = unsafe { super::kquant_x86::dot_one(ty, &row, &act) };
            assert!(
                (simd - scalar).abs() <= 1e-4 * scalar.abs().max(1.0),
                "{ty:?}: {simd} vs {scalar}"
            );
        }
        let mut wf = vec![0.0f32; cols];
        dequantize_row(ty, &row, &mut wf);
        let exact: f32 = wf.iter().zip(&x).map(|(a, b)| a * b).sum();
        let norm: f32 = wf.iter().map(|a| a.abs()).sum::<f32>() / cols as f32;
        assert!(
            (scalar - exact).abs() < 2e-2 * norm * (cols as f32).sqrt(),
            "{ty:?}: {scalar} vs {exact}"
        );
    }
}

#[test]
fn f32_helpers_all_levels() {
    let mut rng = StdRng::seed_from_u64(7);
    for n in [0usize, 1, 7, 8, 31, 64, 100] {
        let a = random_f32(&mut rng, n);
        let b = random_f32(&mut rng, n);
        let want: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        for level in SimdLevel::available() {
            let got = dot_f32_with(level, &a, &b);
            assert!(
                (got - want).abs() <= 1e-5 * (n as f32 + 1.0),
                "{level:?} n={n}: {got} vs {want}"
            );
            let mut y = b.clone();
            axpy_f32_with(level, 0.5, &a, &mut y);
            for i in 0..n {
                assert!(
                    (y[i] - (b[i] + 0.5 * a[i])).abs() <= 1e-6,
                    "{level:?} axpy n={n}"
                );
            }
        }
    }
}

#[test]
fn f16_helpers_equal_f32_helpers_on_widened_values() {
    let mut rng = StdRng::seed_from_u64(8);
    for n in [0usize, 1, 7, 8, 31, 32, 64, 100, 256] {
        let a = random_f32(&mut rng, n);
        let b16: Vec<half::f16> = random_f32(&mut rng, n)
            .iter()
            .map(|&v| half::f16::from_f32(v))
            .collect();
        let b: Vec<f32> = b16.iter().map(|v| v.to_f32()).collect();
        for level in SimdLevel::available() {
            let (got, want) = (dot_f16_with(level, &a, &b16), dot_f32_with(level, &a, &b));
            assert_eq!(got.to_bits(), want.to_bits(), "{level:?} dot n={n}");
            let (mut y1, mut y2) = (a.clone(), a.clone());
            axpy_f16_with(level, 0.3, &b16, &mut y1);
            axpy_f32_with(level, 0.3, &b, &mut y2);
            assert_eq!(y1, y2, "{level:?} axpy n={n}");
        }
    }
}

#[test]
fn f16_row_kernels_equal_one_row_at_a_time() {
    let mut rng = StdRng::seed_from_u64(9);
    for hd in [4usize, 8, 12, 64, 256] {
        for n_rows in [1usize, 5, 16] {
            let q = random_f32(&mut rng, hd);
            let rows: Vec<half::f16> = random_f32(&mut rng, hd * n_rows)
                .iter()
                .map(|&v| half::f16::from_f32(v))
                .collect();
            let probs = random_f32(&mut rng, n_rows);
            for level in SimdLevel::available() {
                let mut got = vec![0f32; n_rows];
                dot_f16_rows_with(level, &q, &rows, hd, &mut got);
                for (r, g) in got.iter().enumerate() {
                    let want = dot_f16_with(level, &q, &rows[r * hd..(r + 1) * hd]);
                    assert_eq!(g.to_bits(), want.to_bits(), "{level:?} hd={hd} row {r}");
                }
                let (mut y1, mut y2) = (q.clone(), q.clone());
                axpy_f16_rows_with(level, &probs, &rows, hd, &mut y1);
                for (r, &p) in probs.iter().enumerate() {
                    axpy_f16_with(level, p, &rows[r * hd..(r + 1) * hd], &mut y2);
                }
                assert_eq!(y1, y2, "{level:?} hd={hd} rows={n_rows}");
            }
        }
    }
}

#[test]
fn simd_level_is_named() {
    assert!(["scalar", "avx2", "avx2vnni", "avx512"].contains(&simd_level()));
}

/// Activations like a transformer's: mostly small, with a few large outlier channels (these make
/// the Q8 block scales, and so any accumulation-order difference, matter).
fn random_acts(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let v = rng.random_range(-1.0f32..1.0);
            match i % 61 {
                7 => v * 100.0,
                23 => v * 1000.0,
                _ => v,
            }
        })
        .collect()
}

/// Batch invariance: at every SIMD level, token `t` of a batched matmul is bitwise equal to the
/// same token computed alone, for any number of tokens, and row `r` does not depend on how many
/// rows the matrix has (tile remainders, 4-row decode blocks).
#[test]
fn matmul_batch_invariant_all_levels() {
    let mut rng = StdRng::seed_from_u64(8);
    const MAX_ROWS: usize = 64;
    const MAX_TOKENS: usize = 16;
    for ty in ALL_MATMUL_TYPES {
        let col_options: &[usize] = match ty.block_size() {
            QK_K => &[256, 512],
            1 => &[64, 100],
            _ => &[32, 64, 96, 576],
        };
        for &cols in col_options {
            let mut data = vec![0u8];
            data.extend(random_matrix(&mut rng, ty, MAX_ROWS, cols));
            let data = &data[1..];
            let x = random_acts(&mut rng, MAX_TOKENS * cols);
            let rb = ty.row_bytes(cols).unwrap();
            for level in SimdLevel::available() {
                // Reference: each token alone through the full 64-row matrix.
                let mut want = vec![0.0f32; MAX_TOKENS * MAX_ROWS];
                for t in 0..MAX_TOKENS {
                    let w = QMatRef {
                        ty,
                        rows: MAX_ROWS,
                        cols,
                        data,
                        packed: None,
                    };
                    let xt = &x[t * cols..(t + 1) * cols];
                    matmul_with(level, w, xt, 1, &mut want[t * MAX_ROWS..(t + 1) * MAX_ROWS]);
                }
                for rows in [1usize, 3, 5, 17, 64] {
                    let w = QMatRef {
                        ty,
                        rows,
                        cols,
                        data: &data[..rows * rb],
                        packed: None,
                    };
                    for n_tokens in (1..=9).chain([16]) {
                        let mut y = vec![f32::NAN; n_tokens * rows];
                        matmul_with(level, w, &x[..n_tokens * cols], n_tokens, &mut y);
                        for t in 0..n_tokens {
                            for r in 0..rows {
                                let (a, b) = (y[t * rows + r], want[t * MAX_ROWS + r]);
                                assert_eq!(
                                    a.to_bits(),
                                    b.to_bits(),
                                    "{ty:?} {level:?} rows={rows} cols={cols} n={n_tokens}: \
                                     y[t={t}, r={r}] = {a} batched vs {b} alone"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Thread count and row chunking do not change any output bit (and the large shapes take the
/// parallel activation quantization path).
#[test]
fn matmul_thread_invariant_all_levels() {
    let mut rng = StdRng::seed_from_u64(9);
    let (rows, n_tokens) = (203usize, 11usize);
    for ty in ALL_MATMUL_TYPES {
        let cols = 2048;
        let data = random_matrix(&mut rng, ty, rows, cols);
        let w = QMatRef {
            ty,
            rows,
            cols,
            data: &data,
            packed: None,
        };
        let x = random_acts(&mut rng, n_tokens * cols);
        for level in SimdLevel::available() {
            let mut results = Vec::new();
            for threads in [1usize, 2, 3] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let mut y = vec![f32::NAN; n_tokens * rows];
                pool.install(|| matmul_with(level, w, &x, n_tokens, &mut y));
                results.push(y);
            }
            // And token by token.
            let mut y1 = vec![f32::NAN; n_tokens * rows];
            for t in 0..n_tokens {
                matmul_with(
                    level,
                    w,
                    &x[t * cols..(t + 1) * cols],
                    1,
                    &mut y1[t * rows..(t + 1) * rows],
                );
            }
            results.push(y1);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            for (k, y) in results.iter().enumerate().skip(1) {
                assert!(
                    bits(y) == bits(&results[0]),
                    "{ty:?} {level:?}: run {k} differs from the 1-thread batched run"
                );
            }
        }
    }
}

/// The AVX2 Q8_K activation quantization is bit-identical to the scalar reference.
#[cfg(target_arch = "x86_64")]
#[test]
fn simd_quantize_q8_k_is_bit_identical() {
    if SimdLevel::available().len() < 2 {
        return;
    }
    let mut rng = StdRng::seed_from_u64(9);
    for case in 0..40 {
        let mut x = random_f32(&mut rng, 4 * QK_K);
        match case % 4 {
            // Zero blocks, rounding ties (case 1: a tie in magnitude, opposite signs).
            2 => x[..QK_K].iter_mut().for_each(|v| *v = 0.0),
            3 => x.iter_mut().for_each(|v| *v = (*v * 8.0).round() * 0.5),
            _ => {}
        }
        if case % 4 == 1 {
            x[QK_K + 3] = 9.0f32.max(x[QK_K + 3].abs());
            x[QK_K + 7] = -x[QK_K + 3];
        }
        let mut want = vec![BlockQ8K::ZERO; 4];
        let mut got = vec![BlockQ8K::ZERO; 4];
        quant::quantize_q8_k(&x, &mut want);
        // SAFETY: AVX2 available.
        unsafe { super::kquant_x86::quantize_q8_k(&x, &mut got) };
        for (a, b) in got.iter().zip(&want) {
            assert_eq!(a.d.to_bits(), b.d.to_bits(), "case {case}");
            assert_eq!(a.qs, b.qs, "case {case}");
            assert_eq!(a.bsums, b.bsums, "case {case}");
        }
    }
}

/// The packed-group kernels: at every SIMD level that has them, every (row, token) result of a
/// packed matmul is bitwise [`packed::dot_reference`] on the file's row, whatever the number
/// of tokens (tile remainders) and groups; so results are the same at AVX2, AVX2+VNNI and
/// AVX-512, alone or batched. Also checks the values against the dequantized f32 product.
#[test]
fn packed_matmul_is_the_reference_bit_for_bit_at_every_level() {
    let mut rng = StdRng::seed_from_u64(21);
    let levels: Vec<_> = SimdLevel::available()
        .into_iter()
        .filter(|&l| l >= SimdLevel::Avx2)
        .collect();
    for ty in [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
    ] {
        for (rows, cols) in [(16usize, 32usize), (48, 96), (32, 576)] {
            let data = random_matrix(&mut rng, ty, rows, cols);
            let raw = QMatRef {
                ty,
                rows,
                cols,
                data: &data,
                packed: None,
            };
            let p = PackedMat::pack(raw).expect("packs");
            let w = QMatRef {
                packed: Some(&p),
                ..raw
            };
            let rb = ty.row_bytes(cols).unwrap();
            let n_max = 19;
            let x = random_acts(&mut rng, n_max * cols);
            let mut acts = quant::Q8Acts::default();
            acts.resize(n_max, cols);
            for t in 0..n_max {
                acts.quantize_token_scalar(t, &x[t * cols..(t + 1) * cols], packed::has_min(ty));
            }
            let mut want = vec![0.0f32; n_max * rows];
            for t in 0..n_max {
                for r in 0..rows {
                    want[t * rows + r] =
                        packed::dot_reference(ty, &data[r * rb..(r + 1) * rb], &acts, t);
                }
            }
            // The reference is llama.cpp's dot product up to float rounding.
            for r in 0..rows {
                let row = &data[r * rb..(r + 1) * rb];
                let nb = cols / QK;
                let ggml =
                    quant::dot_q8_scalar(ty, row, &acts.qs[..cols], &acts.d[..nb], &acts.s[..nb]);
                let mut wf = vec![0.0f32; cols];
                quant::dequantize_row_scalar(ty, row, &mut wf);
                let scale: f32 = wf.iter().zip(&x[..cols]).map(|(a, b)| (a * b).abs()).sum();
                let got = want[r];
                assert!(
                    (got - ggml).abs() <= 1e-5 * scale.max(1e-3),
                    "{ty:?} r={r}: reference {got} vs llama.cpp's {ggml}"
                );
            }
            for &level in &levels {
                for n_tokens in (1..=9).chain([16, 19]) {
                    let mut y = vec![f32::NAN; n_tokens * rows];
                    matmul_with(level, w, &x[..n_tokens * cols], n_tokens, &mut y);
                    for t in 0..n_tokens {
                        for r in 0..rows {
                            let (a, b) = (y[t * rows + r], want[t * rows + r]);
                            assert_eq!(
                                a.to_bits(),
                                b.to_bits(),
                                "{ty:?} {level:?} {rows}x{cols} n={n_tokens}: y[t={t}, r={r}] \
                                 = {a}, reference {b}"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// Only whole groups of a type with packed kernels pack.
#[test]
fn packing_refuses_what_it_has_no_kernels_for() {
    let mut rng = StdRng::seed_from_u64(22);
    let data = random_matrix(&mut rng, GgmlType::Q4_0, 17, 64);
    let w = |rows, ty| QMatRef {
        ty,
        rows,
        cols: 64,
        data: &data,
        packed: None,
    };
    assert!(PackedMat::pack(w(16, GgmlType::Q4_0)).is_some());
    assert!(PackedMat::pack(w(17, GgmlType::Q4_0)).is_none());
    assert!(PackedMat::pack(w(1, GgmlType::Q4_0)).is_none());
    let k = random_matrix(&mut rng, GgmlType::Q4_K, 16, 256);
    let wk = QMatRef {
        ty: GgmlType::Q4_K,
        rows: 16,
        cols: 256,
        data: &k,
        packed: None,
    };
    assert!(PackedMat::pack(wk).is_none());
}
