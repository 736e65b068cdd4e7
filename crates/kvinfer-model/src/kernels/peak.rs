//! What the machine can do, measured: the roofline `kvinfer bench peak` prints. Memory read
//! bandwidth (one large buffer summed by every thread), and the multiply-add peaks of the
//! instructions the kernels use (int8 `vpdpbusd` / `vpmaddubsw`, f32 FMA) from loops of
//! independent chains in registers.

use std::time::Instant;

use super::SimdLevel;

/// Bytes per second reading `bytes` of memory with `threads` threads (best of `passes`).
pub fn read_bandwidth(bytes: usize, threads: usize, passes: usize) -> f64 {
    let words = bytes / 8;
    let buf: Vec<u64> = (0..words as u64).collect();
    let threads = threads.max(1);
    let per = words.div_ceil(threads);
    let mut best = 0.0f64;
    for _ in 0..passes.max(1) {
        let t = Instant::now();
        let total: u64 = std::thread::scope(|s| {
            let hs: Vec<_> = buf
                .chunks(per)
                .map(|c| s.spawn(move || sum_words(c)))
                .collect();
            hs.into_iter().map(|h| h.join().expect("reader")).sum()
        });
        std::hint::black_box(total);
        best = best.max((words * 8) as f64 / t.elapsed().as_secs_f64());
    }
    best
}

/// Sum of `c` with 8 independent lanes (vectorizes; bound by memory, not by the adds).
fn sum_words(c: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    let mut it = c.chunks_exact(8);
    for w in &mut it {
        for k in 0..8 {
            acc[k] = acc[k].wrapping_add(w[k]);
        }
    }
    let tail: u64 = it.remainder().iter().fold(0, |a, &b| a.wrapping_add(b));
    acc.iter().fold(tail, |a, &b| a.wrapping_add(b))
}

/// Int8 multiply-adds per second on `threads` threads at `level` (the instruction the group
/// kernels use there); 0 for scalar.
pub fn int8_macs(level: SimdLevel, threads: usize, seconds: f64) -> f64 {
    per_thread_rate(threads, seconds, move |iters| match level {
        // SAFETY: the caller passes a detected level.
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 => unsafe { x86::dpbusd512(iters) },
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2Vnni => unsafe { x86::dpbusd256(iters) },
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 => unsafe { x86::maddubs256(iters) },
        _ => 0.0,
    })
}

/// f32 multiply-adds per second on `threads` threads at `level` (FMA; 0 for scalar).
pub fn f32_fmas(level: SimdLevel, threads: usize, seconds: f64) -> f64 {
    per_thread_rate(threads, seconds, move |iters| match level {
        // SAFETY: the caller passes a detected level.
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 => unsafe { x86::fma512(iters) },
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 | SimdLevel::Avx2Vnni => unsafe { x86::fma256(iters) },
        _ => 0.0,
    })
}

/// Int8 multiply-adds per second of [`super::matmul`] on a `rows` x `cols` matrix of type `ty`
/// (random quants, scales near 1e-2, repacked as the loader does) times `tokens` tokens, on the
/// rayon global pool (the caller sizes it), timed for about `seconds` after one untimed call:
/// what the GEMM kernels reach of [`int8_macs`].
pub fn gemm_macs(
    ty: crate::ggml_type::GgmlType,
    rows: usize,
    cols: usize,
    tokens: usize,
    seconds: f64,
) -> f64 {
    let Some(row_bytes) = ty.row_bytes(cols) else {
        return 0.0;
    };
    let (bs, blk) = (ty.type_size(), ty.block_size());
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut data: Vec<u8> = (0..rows * row_bytes).map(|_| next() as u8).collect();
    // Every block of these types starts with an f16 scale (and Q4_1 / Q5_1 an f16 min):
    // make them finite and small, so the sums stay in range.
    let scale = half::f16::from_f32(1e-2).to_bits().to_le_bytes();
    for b in data.chunks_exact_mut(bs) {
        b[..2].copy_from_slice(&scale);
        if matches!(
            ty,
            crate::ggml_type::GgmlType::Q4_1 | crate::ggml_type::GgmlType::Q5_1
        ) {
            b[2..4].copy_from_slice(&scale);
        }
    }
    debug_assert_eq!(cols % blk, 0);
    let w = super::QMatRef {
        ty,
        rows,
        cols,
        data: &data,
        packed: None,
    };
    let packed = if super::packing_enabled() {
        super::PackedMat::pack(w)
    } else {
        None
    };
    let w = super::QMatRef {
        packed: packed.as_ref(),
        ..w
    };
    let x: Vec<f32> = (0..tokens * cols)
        .map(|_| (next() % 2001) as f32 / 1000.0 - 1.0)
        .collect();
    let mut y = vec![0.0f32; tokens * rows];
    super::matmul(w, &x, tokens, &mut y);
    let (t, mut n) = (Instant::now(), 0u64);
    while n == 0 || t.elapsed().as_secs_f64() < seconds {
        super::matmul(w, &x, tokens, &mut y);
        n += 1;
    }
    std::hint::black_box(&y);
    (n as usize * rows * cols * tokens) as f64 / t.elapsed().as_secs_f64()
}

/// Runs `f(iters)` (returning the operations it did) on every thread for about `seconds`;
/// operations per second summed over threads.
fn per_thread_rate(threads: usize, seconds: f64, f: impl Fn(u64) -> f64 + Sync) -> f64 {
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads.max(1))
            .map(|_| {
                s.spawn(|| {
                    let mut iters = 1u64 << 16;
                    loop {
                        let t = Instant::now();
                        let ops = f(iters);
                        let dt = t.elapsed().as_secs_f64();
                        if dt >= seconds || ops == 0.0 {
                            return if dt > 0.0 { ops / dt } else { 0.0 };
                        }
                        iters *= 2;
                    }
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("peak thread")).sum()
    })
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// 8 independent accumulators (enough to cover the latency of every instruction here).
    const CHAINS: usize = 8;

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn dpbusd512(iters: u64) -> f64 {
        let (a, b) = std::hint::black_box((_mm512_set1_epi8(3), _mm512_set1_epi8(-2)));
        let mut acc = [_mm512_setzero_si512(); CHAINS];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm512_dpbusd_epi32(*x, a, b);
            }
        }
        std::hint::black_box(acc);
        (iters * CHAINS as u64 * 64) as f64
    }

    #[target_feature(enable = "avx2,avx512f,avx512vl,avx512vnni")]
    pub(super) unsafe fn dpbusd256(iters: u64) -> f64 {
        let (a, b) = std::hint::black_box((_mm256_set1_epi8(3), _mm256_set1_epi8(-2)));
        let mut acc = [_mm256_setzero_si256(); CHAINS];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm256_dpbusd_epi32(*x, a, b);
            }
        }
        std::hint::black_box(acc);
        (iters * CHAINS as u64 * 32) as f64
    }

    /// `vpmaddubsw` + `vpmaddwd` + `vpaddd`: the AVX2 int8 dot product (32 multiply-adds).
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn maddubs256(iters: u64) -> f64 {
        let (a, b, ones) = std::hint::black_box((
            _mm256_set1_epi8(3),
            _mm256_set1_epi8(-2),
            _mm256_set1_epi16(1),
        ));
        let mut acc = [_mm256_setzero_si256(); CHAINS];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                // Each chain's own operand, so the product cannot be hoisted out of the loop.
                let p = _mm256_madd_epi16(_mm256_maddubs_epi16(a, *x), ones);
                *x = _mm256_add_epi32(b, p);
            }
        }
        std::hint::black_box(acc);
        (iters * CHAINS as u64 * 32) as f64
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn fma512(iters: u64) -> f64 {
        let (a, b) = std::hint::black_box((_mm512_set1_ps(0.999), _mm512_set1_ps(1e-3)));
        let mut acc = [_mm512_set1_ps(1.0); CHAINS];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm512_fmadd_ps(*x, a, b);
            }
        }
        std::hint::black_box(acc);
        (iters * CHAINS as u64 * 16) as f64
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn fma256(iters: u64) -> f64 {
        let (a, b) = std::hint::black_box((_mm256_set1_ps(0.999), _mm256_set1_ps(1e-3)));
        let mut acc = [_mm256_set1_ps(1.0); CHAINS];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm256_fmadd_ps(*x, a, b);
            }
        }
        std::hint::black_box(acc);
        (iters * CHAINS as u64 * 8) as f64
    }
}
