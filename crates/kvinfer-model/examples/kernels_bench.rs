//! Times `kernels::matmul` on the matrix shapes of SmolLM2-135M and Gemma3-270M.
//!
//! `cargo run --release -p kvinfer-model --example kernels_bench [-- --threads N] [--quick]`
//! (`KVINFER_SIMD=avx2|scalar` to compare SIMD levels). Prints one line per shape and a
//! matmul-only tokens/s estimate for SmolLM2 (decode and 64-token prefill).

use std::time::{Duration, Instant};

use kvinfer_model::ggml_type::GgmlType;
use kvinfer_model::kernels::{self, QMatRef};

struct Shape {
    name: &'static str,
    ty: GgmlType,
    rows: usize,
    cols: usize,
    /// Uses per token in SmolLM2-135M (30 layers), 0 for other models' shapes.
    smol_uses: usize,
}

const SHAPES: &[Shape] = &[
    Shape {
        name: "smol q/o",
        ty: GgmlType::Q4_1,
        rows: 576,
        cols: 576,
        smol_uses: 60,
    },
    Shape {
        name: "smol k/v",
        ty: GgmlType::Q4_1,
        rows: 192,
        cols: 576,
        smol_uses: 60,
    },
    Shape {
        name: "smol gate/up",
        ty: GgmlType::Q4_1,
        rows: 1536,
        cols: 576,
        smol_uses: 60,
    },
    Shape {
        name: "smol down",
        ty: GgmlType::Q4_1,
        rows: 576,
        cols: 1536,
        smol_uses: 30,
    },
    Shape {
        name: "smol output",
        ty: GgmlType::Q8_0,
        rows: 49152,
        cols: 576,
        smol_uses: 1,
    },
    Shape {
        name: "gemma q",
        ty: GgmlType::Q5_0,
        rows: 1024,
        cols: 640,
        smol_uses: 0,
    },
    Shape {
        name: "gemma k/v",
        ty: GgmlType::Q5_0,
        rows: 256,
        cols: 640,
        smol_uses: 0,
    },
    Shape {
        name: "gemma gate/up",
        ty: GgmlType::Q5_0,
        rows: 2048,
        cols: 640,
        smol_uses: 0,
    },
    Shape {
        name: "gemma v q8",
        ty: GgmlType::Q8_0,
        rows: 256,
        cols: 640,
        smol_uses: 0,
    },
    Shape {
        name: "gemma o",
        ty: GgmlType::Q4_K,
        rows: 640,
        cols: 1024,
        smol_uses: 0,
    },
    Shape {
        name: "gemma down",
        ty: GgmlType::Q6_K,
        rows: 640,
        cols: 2048,
        smol_uses: 0,
    },
    Shape {
        name: "gemma output",
        ty: GgmlType::Q8_0,
        rows: 262144,
        cols: 640,
        smol_uses: 0,
    },
];

/// Deterministic filler bytes (xorshift) with sane f16 scales patched in per block.
fn fake_weights(ty: GgmlType, rows: usize, cols: usize) -> Vec<u8> {
    let n_bytes = rows * ty.row_bytes(cols).expect("whole blocks");
    let mut s = 0x9E3779B97F4A7C15u64;
    let mut data: Vec<u8> = (0..n_bytes)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s as u8
        })
        .collect();
    let scale = half::f16::from_f32(0.01).to_bits().to_le_bytes();
    for blk in data.chunks_exact_mut(ty.type_size()) {
        match ty {
            GgmlType::Q6_K => blk[208..210].copy_from_slice(&scale),
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => blk[0..2].copy_from_slice(&scale),
            _ => {
                blk[0..2].copy_from_slice(&scale);
                blk[2..4].copy_from_slice(&scale);
            }
        }
    }
    data
}

/// Nanoseconds this process's threads have spent on a CPU (Linux `schedstat`; 0 elsewhere).
/// Unlike wall time this does not grow when other processes share the cores.
fn cpu_ns() -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    dir.filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// (fastest wall seconds, mean on-CPU seconds) per call, running `f` for about `budget`.
/// The fastest call filters out preemption by other processes on a shared machine.
fn time_it(budget: Duration, mut f: impl FnMut()) -> (f64, f64) {
    f();
    let (start, cpu0) = (Instant::now(), cpu_ns());
    let (mut n, mut best) = (0u32, f64::MAX);
    while start.elapsed() < budget || n < 3 {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
        n += 1;
    }
    (best, (cpu_ns() - cpu0) as f64 * 1e-9 / n as f64)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let threads = match args.iter().position(|a| a == "--threads") {
        Some(i) => args
            .get(i + 1)
            .and_then(|s| s.parse().ok())
            .expect("--threads N"),
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .expect("rayon pool");
    // By default the bench runs on a pool thread (`install`), as an engine should: a call from
    // outside the pool pays two thread wake-ups per matmul. `--cold` measures that case.
    if args.iter().any(|a| a == "--cold") {
        run(&args);
    } else {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("rayon pool");
        pool.install(|| run(&args));
    }
}

fn run(args: &[String]) {
    let quick = args.iter().any(|a| a == "--quick");
    println!(
        "simd={} threads={}",
        kernels::simd_level(),
        rayon::current_num_threads()
    );

    // Warm up: the CPU runs slow for the first seconds after idle.
    let warm = fake_weights(GgmlType::Q4_1, 1536, 576);
    let wm = QMatRef {
        ty: GgmlType::Q4_1,
        rows: 1536,
        cols: 576,
        data: &warm,
        packed: None,
    };
    let xw = vec![0.5f32; 64 * 576];
    let mut yw = vec![0.0f32; 64 * 1536];
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(if quick { 1 } else { 3 }) {
        kernels::matmul(wm, &xw, 64, &mut yw);
    }

    // `--only SUBSTRING` and `--n N` narrow the run (for profiling one kernel).
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let ns: Vec<usize> = match args
        .iter()
        .position(|a| a == "--n")
        .and_then(|i| args.get(i + 1))
    {
        Some(n) => vec![n.parse().expect("--n N")],
        None => vec![1, 64],
    };
    let budget = Duration::from_millis(if quick { 150 } else { 400 });
    let (mut smol_tg_s, mut smol_pp_s) = (0.0f64, 0.0f64);
    println!(
        "{:<14} {:>5} {:>7}x{:<5} {:>4} {:>10} {:>8} {:>8} {:>10}",
        "shape", "type", "rows", "cols", "n", "best-us", "GFLOP/s", "GB/s", "cpu-us"
    );
    for s in SHAPES {
        if only.as_ref().is_some_and(|o| !s.name.contains(o.as_str())) {
            continue;
        }
        let data = fake_weights(s.ty, s.rows, s.cols);
        let w = QMatRef {
            ty: s.ty,
            rows: s.rows,
            cols: s.cols,
            data: &data,
            packed: None,
        };
        for &n_tokens in &ns {
            let x: Vec<f32> = (0..n_tokens * s.cols)
                .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
                .collect();
            let mut y = vec![0.0f32; n_tokens * s.rows];
            let (sec, cpu_sec) = time_it(budget, || kernels::matmul(w, &x, n_tokens, &mut y));
            let gflops = 2.0 * (s.rows * s.cols * n_tokens) as f64 / sec / 1e9;
            let gbs = data.len() as f64 / sec / 1e9;
            println!(
                "{:<14} {:>5} {:>7}x{:<5} {:>4} {:>10.1} {:>8.1} {:>8.1} {:>10.1}",
                s.name,
                format!("{:?}", s.ty),
                s.rows,
                s.cols,
                n_tokens,
                sec * 1e6,
                gflops,
                gbs,
                cpu_sec * 1e6
            );
            if s.smol_uses > 0 {
                if n_tokens == 1 {
                    smol_tg_s += sec * s.smol_uses as f64;
                } else if s.name != "smol output" {
                    // Prefill computes logits for the last token only.
                    smol_pp_s += sec * s.smol_uses as f64;
                }
            }
        }
    }
    if only.is_some() || ns.len() != 2 {
        return;
    }
    println!(
        "SmolLM2-135M matmuls only: decode {:.0} tok/s ({:.2} ms/token), prefill-64 {:.0} tok/s",
        1.0 / smol_tg_s,
        smol_tg_s * 1e3,
        64.0 / smol_pp_s
    );
}
