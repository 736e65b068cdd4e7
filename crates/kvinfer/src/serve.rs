//! `kvinfer serve`: the engine loop on its own thread (inside a rayon pool for the kernels) and
//! the HTTP server on a small tokio runtime.

use crate::cli::ServeArgs;
use crate::load::{cache_options, load_model, worker_pool};
use anyhow::{Context, Result};
use kvinfer_engine::{start_engine, EngineConfig};
use kvinfer_server::ServerConfig;

pub fn run(a: ServeArgs) -> Result<()> {
    anyhow::ensure!(a.max_running >= 1, "--max-running must be at least 1");
    // Connections, tier files and Redis connections each take a descriptor: raise the soft
    // open-files limit to the hard one before any is opened (the server caps its connections
    // under what is left).
    if let Err(e) = kvinfer_server::raise_open_files_limit() {
        eprintln!("kvinfer: could not raise the open-files limit: {e}");
    }
    let model = load_model(&a.model)?;
    let config = EngineConfig {
        cache: cache_options(&a.model),
        max_batch_tokens: a.max_batch_tokens,
        max_running: a.max_running,
        ctx_size: a.model.ctx_size,
        max_waiting: a.max_waiting,
    };
    let (pool, threads) = worker_pool(a.model.threads)?;
    let (engine, engine_thread) =
        start_engine(model, config, move |f| pool.install(f)).map_err(anyhow::Error::msg)?;
    let stats = engine.stats();
    let groups = match stats.kv_groups {
        1 => String::new(),
        g => format!(", {g} layer groups: sliding-window memory"),
    };
    eprintln!(
        "kvinfer: {} | {} threads | KV cache {} blocks of {} tokens, {} ({} eviction{groups}) | \
         context {}",
        stats.model,
        threads,
        stats.blocks.total,
        stats.block_size,
        stats.kv_dtype,
        stats.policy,
        engine.context_size()
    );
    if !stats.tiers.is_empty() {
        let names: Vec<&str> = stats.tiers.iter().map(|t| t.name).collect();
        eprintln!("kvinfer: KV tiers below the pool: {}", names.join(" -> "));
    }
    let server = ServerConfig {
        host: a.host,
        port: a.port,
        api_key: a.api_key,
        max_body_bytes: a.max_body_bytes,
        cors_origins: a.cors_origins,
        shutdown_grace: std::time::Duration::from_secs(a.shutdown_grace),
        request_timeout: (a.request_timeout > 0)
            .then(|| std::time::Duration::from_secs(a.request_timeout)),
        ..ServerConfig::default()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("kvinfer-http")
        .enable_all()
        .build()
        .context("starting the HTTP runtime")?;
    let served = rt.block_on(kvinfer_server::serve(engine, server));
    // Dropping the runtime drops every handle; the engine finishes or cancels what is left.
    drop(rt);
    served.context("serving HTTP")?;
    let _ = engine_thread.join();
    eprintln!("kvinfer: stopped");
    Ok(())
}
