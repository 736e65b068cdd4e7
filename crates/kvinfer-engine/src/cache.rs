//! Building the paged KV cache for a model: its memory budget and block geometry.

use crate::tiers::{block_spec, build_store, TierOptions, TierSink};
use kvinfer_cache::{KvDtype, PagedKv, PolicyKind, SeqId};
use kvinfer_model::{Model, ModelError, SeqBatch};
use kvinfer_tier::TieredStore;
use std::sync::Arc;

/// Default tokens per block (vLLM's figure: small enough that paging wastes little, large enough
/// that block tables and hashing cost little).
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// Largest default budget: plenty for one machine's CPU serving of small models.
const DEFAULT_CAP_MB: usize = 2048; // 2 GiB
/// Smallest default budget, for machines that report little free memory.
const DEFAULT_FLOOR_MB: usize = 64;

/// How to size and run the cache.
#[derive(Debug, Clone)]
pub struct CacheOptions {
    /// Memory for K/V in MiB; `None` picks [`default_kv_cache_mb`].
    pub kv_cache_mb: Option<usize>,
    /// Tokens per block.
    pub block_size: usize,
    /// Eviction policy.
    pub policy: PolicyKind,
    /// Seed of the `Random` policy.
    pub seed: u64,
    /// Exactly this many blocks, overriding `kv_cache_mb` (tests and experiments).
    pub num_blocks: Option<usize>,
    /// Tiers below the pool (none by default).
    pub tiers: TierOptions,
    /// How K and V rows are stored (f16 by default).
    pub kv_dtype: KvDtype,
    /// Keep every position of sliding-window layers (one block table of every layer), as
    /// llama.cpp's `--swa-full`; by default their blocks before the window are let go.
    pub swa_full: bool,
}

impl Default for CacheOptions {
    fn default() -> Self {
        Self {
            kv_cache_mb: None,
            block_size: DEFAULT_BLOCK_SIZE,
            policy: PolicyKind::Lru,
            seed: 0,
            num_blocks: None,
            tiers: TierOptions::default(),
            kv_dtype: KvDtype::F16,
            swa_full: false,
        }
    }
}

/// A quarter of the memory the OS reports available, between 64 MiB and 2 GiB. The arena is
/// allocated zeroed, so pages are only backed as blocks are first written.
pub fn default_kv_cache_mb() -> usize {
    let available_mb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<usize>().ok())
        })
        .map(|kb| kb / 1024);
    match available_mb {
        Some(mb) => (mb / 4).clamp(DEFAULT_FLOOR_MB, DEFAULT_CAP_MB),
        None => DEFAULT_FLOOR_MB * 8,
    }
}

/// A cache for `model` within the budget. Errors when the budget holds no block or the block
/// size is zero.
pub fn new_paged_kv(model: &Model, opts: &CacheOptions) -> Result<PagedKv, String> {
    if opts.block_size == 0 || opts.block_size > 1024 {
        return Err(format!(
            "block size {} is out of range; use 1..=1024 tokens (default {DEFAULT_BLOCK_SIZE})",
            opts.block_size
        ));
    }
    opts.kv_dtype.check_head_dim(model.config.head_dim)?;
    let mb = opts.kv_cache_mb.unwrap_or_else(default_kv_cache_mb);
    let id = model.kv_identity(opts.block_size, opts.kv_dtype, !opts.swa_full);
    let bytes = id.block_bytes();
    let num_blocks = opts.num_blocks.unwrap_or((mb << 20) / bytes.max(1));
    if num_blocks == 0 {
        return Err(format!(
            "--kv-cache-mb {mb} holds no block of {} KiB; give at least {} MiB",
            bytes >> 10,
            bytes.div_ceil(1 << 20)
        ));
    }
    Ok(id.paged(num_blocks, opts.policy, opts.seed))
}

/// The pool and, when the options ask for tiers, the store behind it (the pool's events wired
/// to it).
pub fn new_kv_cache(
    model: &Model,
    opts: &CacheOptions,
) -> Result<(PagedKv, Option<Arc<TieredStore>>), String> {
    let mut kv = new_paged_kv(model, opts)?;
    let spec = block_spec(&model.kv_identity(opts.block_size, opts.kv_dtype, !opts.swa_full));
    let store = build_store(spec, &opts.tiers, opts.policy)?;
    if let Some(s) = &store {
        kv.set_sink(Box::new(TierSink::new(s.clone())));
    }
    Ok((kv, store))
}

/// Runs `tokens` as the next positions of sequence `seq` alone: reserves their blocks (applying
/// any copy-on-write), runs the model, and commits them (full blocks become reusable). Returns
/// the last token's logits, or `None` (and changes nothing) when the pool has no room.
pub fn extend_sequence(
    model: &Model,
    kv: &mut PagedKv,
    seq: SeqId,
    tokens: &[u32],
) -> Result<Option<Vec<f32>>, ModelError> {
    Ok(extend_sequence_rows(model, kv, seq, tokens, false)?.and_then(|l| l.into_iter().next()))
}

/// As [`extend_sequence`]; with `every_row`, the logits after every one of `tokens` (for
/// perplexity), else only the last token's.
pub fn extend_sequence_rows(
    model: &Model,
    kv: &mut PagedKv,
    seq: SeqId,
    tokens: &[u32],
    every_row: bool,
) -> Result<Option<Vec<Vec<f32>>>, ModelError> {
    if kv.reserve(seq, tokens.len()).is_err() {
        return Ok(None);
    }
    let (tables, storage) = kv.tables_and_storage();
    let batch = [SeqBatch {
        tokens,
        start: tables.num_tokens(seq),
        tables: tables.block_tables(seq),
    }];
    let logits = if every_row {
        model.forward_all(storage, &batch)?
    } else {
        model.forward(storage, &batch)?
    };
    kv.commit(seq, tokens);
    Ok(Some(logits))
}
