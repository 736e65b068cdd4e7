//! Finding and loading a model, with a spinner when it takes more than a second.

use crate::cli::{ModelArgs, SamplingArgs};
use anyhow::{bail, Context, Result};
use kvinfer_engine::SamplingParams;
use kvinfer_model::Model;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Model aliases and their file names under the models directory.
const ALIASES: &[(&str, &str, &str)] = &[
    ("smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2"),
    ("gemma3", "gemma-3-270m-q4_k_m.gguf", "gemma3"),
];

/// Where models live: `KVINFER_MODELS`, else the first `models/` found walking up from the
/// current directory or from the executable (so `target/release/kvinfer` finds `<repo>/models`).
fn models_dirs() -> Vec<PathBuf> {
    if let Ok(d) = std::env::var("KVINFER_MODELS") {
        return vec![PathBuf::from(d)];
    }
    let mut dirs = Vec::new();
    let starts = [std::env::current_dir().ok(), std::env::current_exe().ok()];
    for start in starts.into_iter().flatten() {
        for anc in start.ancestors() {
            let d = anc.join("models");
            if d.is_dir() && !dirs.contains(&d) {
                dirs.push(d);
            }
        }
    }
    dirs
}

/// Resolves `--model`: an existing path, or an alias.
pub fn resolve_model(spec: &str) -> Result<PathBuf> {
    let p = Path::new(spec);
    if p.is_file() {
        return Ok(p.to_path_buf());
    }
    let Some(&(_, file, script_arg)) = ALIASES.iter().find(|a| a.0 == spec) else {
        if spec.ends_with(".gguf") || spec.contains('/') {
            bail!("model file {spec} does not exist");
        }
        let names: Vec<_> = ALIASES.iter().map(|a| a.0).collect();
        bail!(
            "unknown model {spec:?}: give a .gguf path or one of {}",
            names.join(", ")
        );
    };
    let dirs = models_dirs();
    if let Some(found) = dirs.iter().map(|d| d.join(file)).find(|p| p.is_file()) {
        return Ok(found);
    }
    let looked = if dirs.is_empty() {
        "no models/ directory found".to_string()
    } else {
        format!(
            "looked in {}",
            dirs.iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    bail!("model {spec} ({file}) not found ({looked}); install it with: scripts/get-models {script_arg}")
}

/// Runs `f` on a pool of `threads` workers (default: all cores). Everything the command does runs
/// inside the pool, so the kernels' parallel loops fork from a worker instead of waking the pool
/// from outside on every matmul.
pub fn with_threads<R: Send>(
    threads: Option<usize>,
    f: impl FnOnce(usize) -> R + Send,
) -> Result<R> {
    let (pool, n) = worker_pool(threads)?;
    Ok(pool.install(|| f(n)))
}

/// The kernels' worker pool: `threads` workers (default: all cores), and how many.
pub fn worker_pool(threads: Option<usize>) -> Result<(rayon::ThreadPool, usize)> {
    let n = threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("kvinfer-worker-{i}"))
        .build()
        .context("starting worker threads")?;
    Ok((pool, n))
}

/// Loads the model named by `args`, showing a spinner if it takes over a second.
pub fn load_model(args: &ModelArgs) -> Result<Model> {
    let path = resolve_model(&args.model)?;
    let (tx, rx) = std::sync::mpsc::channel();
    let p2 = path.clone();
    let worker = std::thread::spawn(move || {
        let r = Model::load(&p2);
        let _ = tx.send(());
        r
    });
    if rx.recv_timeout(Duration::from_secs(1)).is_err() {
        let spinner = indicatif::ProgressBar::new_spinner();
        spinner.set_message(format!("loading {}", path.display()));
        spinner.enable_steady_tick(Duration::from_millis(100));
        let _ = rx.recv();
        spinner.finish_and_clear();
    }
    let model = worker
        .join()
        .map_err(|_| anyhow::anyhow!("model loader thread panicked"))?
        .with_context(|| format!("loading {}", path.display()))?;
    eprintln!("model: {}", model.summary());
    Ok(model)
}

/// Sampling flags to engine parameters.
pub fn sampling(a: &SamplingArgs) -> SamplingParams {
    SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        min_p: a.min_p,
        repeat_penalty: a.repeat_penalty,
        repeat_last_n: 64,
        seed: a.seed,
        ..SamplingParams::default()
    }
}

/// The cache options the flags ask for (pool and tiers).
pub fn cache_options(args: &ModelArgs) -> kvinfer_engine::CacheOptions {
    kvinfer_engine::CacheOptions {
        kv_cache_mb: args.kv_cache_mb,
        block_size: args.block_size,
        policy: args.evict,
        seed: 0,
        num_blocks: None,
        tiers: args.tiers.options(),
        kv_dtype: args.kv_dtype,
        swa_full: args.swa_full,
    }
}

/// The paged KV cache the flags ask for, and the tiers behind it.
pub type Cache = (
    kvinfer_cache::PagedKv,
    Option<std::sync::Arc<kvinfer_engine::TieredStore>>,
);

/// Builds the cache the flags ask for.
pub fn kv_cache(model: &Model, args: &ModelArgs) -> Result<Cache> {
    kvinfer_engine::new_kv_cache(model, &cache_options(args)).map_err(anyhow::Error::msg)
}
