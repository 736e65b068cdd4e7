//! The tiers behind the pool, from the engine's side: building the [`TieredStore`] the flags ask
//! for, the sink that turns pool events into tier writes, and the two halves of a tier hit
//! (what to ask for; importing what came back). `generate()` loads on its own thread; the engine
//! loop sends the request to the store's loader and admits the sequence when the reply comes.

use kvinfer_cache::{BlockHash, KvEventSink, PagedKv, PoolEvent, TokenId};
use kvinfer_model::KvIdentity;
use kvinfer_tier::{
    BlockSpec, Codec, DiskTier, DiskTierConfig, LoadRequest, LoadResult, RamTier, RedisTarget,
    RedisTier, RedisTierConfig, TierSpec, TieredStore, TieredStoreConfig, WriteMode,
};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The tiers' codec, chosen by measurement (`kvinfer bench tiers`, docs/BENCHMARKS.md):
/// shuffle-zstd is the only codec that gains anything on f16 KV (12%); its decode (~1.4 GB/s,
/// on up to 4 threads per load) costs a tier hit less than the TTFT noise between runs, and a
/// disk read after the page cache is dropped gets faster with fewer bytes.
pub const DEFAULT_CODEC: Codec = Codec::ShuffleZstd;

/// When each tier takes blocks (`--tier-write ram=back,disk=through,redis=through`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TierWrite {
    /// The RAM tier.
    pub ram: WriteMode,
    /// The disk tier.
    pub disk: WriteMode,
    /// The Redis tier.
    pub redis: WriteMode,
}

impl Default for TierWrite {
    fn default() -> Self {
        Self {
            ram: WriteMode::Back,
            disk: WriteMode::Through,
            redis: WriteMode::Through,
        }
    }
}

impl std::str::FromStr for TierWrite {
    type Err = String;
    /// `tier=mode` pairs, comma-separated; tiers not named keep their default.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut w = TierWrite::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (tier, mode) = part
                .split_once('=')
                .ok_or_else(|| format!("--tier-write wants tier=mode pairs, got {part:?}"))?;
            let mode: WriteMode = mode.parse()?;
            match tier {
                "ram" => w.ram = mode,
                "disk" => w.disk = mode,
                "redis" => w.redis = mode,
                _ => {
                    return Err(format!(
                        "unknown tier {tier:?} in --tier-write; use ram, disk or redis"
                    ))
                }
            }
        }
        Ok(w)
    }
}

/// Which tiers to run below the pool, and how.
#[derive(Debug, Clone)]
pub struct TierOptions {
    /// RAM tier budget in MiB (0: no RAM tier).
    pub ram_tier_mb: usize,
    /// Compression of tier blocks; None: [`DEFAULT_CODEC`].
    pub codec: Option<Codec>,
    /// Disk tier directory.
    pub disk_dir: Option<PathBuf>,
    /// Disk tier size cap in MiB.
    pub disk_tier_mb: usize,
    /// Disk block lifetime (none: until evicted by the cap).
    pub disk_ttl: Option<Duration>,
    /// One redis-server.
    pub redis_url: Option<String>,
    /// A Redis Cluster's nodes.
    pub redis_cluster: Vec<String>,
    /// Redis block lifetime (jittered +-10%).
    pub redis_ttl: Duration,
    /// Deadline of one Redis read.
    pub redis_timeout: Duration,
    /// When each tier is written.
    pub write: TierWrite,
}

impl Default for TierOptions {
    fn default() -> Self {
        Self {
            ram_tier_mb: 0,
            codec: None,
            disk_dir: None,
            disk_tier_mb: 4096,
            disk_ttl: None,
            redis_url: None,
            redis_cluster: Vec::new(),
            redis_ttl: Duration::from_secs(24 * 3600),
            redis_timeout: Duration::from_millis(100),
            write: TierWrite::default(),
        }
    }
}

impl TierOptions {
    /// Whether any tier is asked for.
    pub fn any(&self) -> bool {
        self.ram_tier_mb > 0
            || self.disk_dir.is_some()
            || self.redis_url.is_some()
            || !self.redis_cluster.is_empty()
    }
}

/// What a block of a model's KV identity looks like on the tiers.
pub fn block_spec(id: &KvIdentity) -> BlockSpec {
    let l = id.layout(1);
    BlockSpec {
        fingerprint: id.fingerprint,
        group: 0,
        dtype: l.dtype.id(),
        n_layers: l.n_layers as u16,
        n_kv_heads: l.n_kv_heads as u16,
        head_dim: l.head_dim as u16,
        block_size: l.block_size as u16,
    }
}

/// The store the options ask for (None when they ask for no tier). Errors name the flag.
pub fn build_store(
    spec: BlockSpec,
    opts: &TierOptions,
    policy: kvinfer_cache::PolicyKind,
) -> Result<Option<Arc<TieredStore>>, String> {
    if !opts.any() {
        return Ok(None);
    }
    let mut tiers = Vec::new();
    if opts.ram_tier_mb > 0 {
        tiers.push(TierSpec {
            tier: Arc::new(RamTier::new((opts.ram_tier_mb as u64) << 20, policy)),
            write: opts.write.ram,
            codec: opts.codec.unwrap_or(DEFAULT_CODEC),
        });
    }
    if let Some(dir) = &opts.disk_dir {
        let disk = DiskTier::open(&DiskTierConfig {
            dir: dir.clone(),
            budget_bytes: (opts.disk_tier_mb as u64) << 20,
            ttl: opts.disk_ttl,
        })
        .map_err(|e| format!("--disk-tier {}: {e}", dir.display()))?;
        tiers.push(TierSpec {
            tier: Arc::new(disk),
            write: opts.write.disk,
            codec: opts.codec.unwrap_or(DEFAULT_CODEC),
        });
    }
    let target = match (&opts.redis_url, opts.redis_cluster.is_empty()) {
        (Some(_), false) => return Err("give --redis or --redis-cluster, not both".into()),
        (Some(url), true) => Some(RedisTarget::Single(url.clone())),
        (None, false) => Some(RedisTarget::Cluster(opts.redis_cluster.clone())),
        (None, true) => None,
    };
    if let Some(target) = target {
        let redis = RedisTier::new(RedisTierConfig {
            target,
            ttl: opts.redis_ttl,
            read_timeout: opts.redis_timeout,
            write_timeout: opts.redis_timeout.max(Duration::from_secs(1)),
        })
        .map_err(|e| format!("--redis: {e}"))?;
        tiers.push(TierSpec {
            tier: Arc::new(redis),
            write: opts.write.redis,
            // Every reader takes the codec from the header: instances may differ.
            codec: opts.codec.unwrap_or(DEFAULT_CODEC),
        });
    }
    let config = TieredStoreConfig {
        block: spec,
        write_queue_blocks: 256,
        load_queue: 64,
    };
    Ok(Some(Arc::new(TieredStore::new(config, tiers))))
}

/// Pool events to tier writes: registered blocks to the write-through tiers, evicted ones to the
/// write-back tiers. Only copies a block when some tier takes it; never blocks.
pub struct TierSink {
    store: Arc<TieredStore>,
    through: bool,
    back: bool,
}

impl TierSink {
    /// A sink writing to `store`.
    pub fn new(store: Arc<TieredStore>) -> Self {
        Self {
            through: store.writes(WriteMode::Through),
            back: store.writes(WriteMode::Back),
            store,
        }
    }
}

impl KvEventSink for TierSink {
    fn on_event(&mut self, event: &PoolEvent, tokens: &[TokenId], bytes: &[u8]) {
        match *event {
            PoolEvent::Registered { hash, group, .. } if self.through => {
                self.store.write_registered(group, hash, tokens, bytes)
            }
            PoolEvent::Evicted { hash, group, .. } if self.back => {
                self.store.write_evicted(group, hash, tokens, bytes)
            }
            _ => {}
        }
    }
}

/// What to ask the tiers for a prompt whose longest possible hit is every full block it may
/// take: each full-attention group's blocks after its cached run, then each sliding-window
/// group's blocks of the window before the end of the shortest run that came back (the hit
/// point, known only then). `None` when the pool already has that hit. Returns (the prompt's
/// first block in the request, the request).
pub(crate) fn load_request(
    kv: &PagedKv,
    hashes: &[BlockHash],
    prompt: &[TokenId],
) -> Option<(usize, LoadRequest)> {
    let max = kv.max_prefix_blocks(prompt.len()).min(hashes.len());
    if kv.lookup_hashed(hashes, prompt.len()).num_blocks >= max {
        return None;
    }
    let bs = kv.block_size();
    let windows = kv.windows();
    let chains: Vec<(usize, usize)> = (0..windows.len())
        .filter(|&g| windows[g].is_none())
        .map(|g| {
            (
                g,
                (0..max)
                    .take_while(|&i| kv.has_block(g, &hashes[i]))
                    .count(),
            )
        })
        .collect();
    // Blocks of the window before a hit point (first_needed_block's reach back).
    let tails: Vec<(usize, usize)> = (0..windows.len())
        .filter_map(|g| windows[g].map(|w| (g, w.saturating_sub(1).div_ceil(bs))))
        .collect();
    let first_end = chains.iter().map(|c| c.1).min()?;
    let reach = tails.iter().map(|t| t.1).max().unwrap_or(0);
    let lo = first_end.saturating_sub(reach);
    let mut req = LoadRequest::chain(hashes[lo..max].to_vec(), prompt[lo * bs..max * bs].to_vec());
    req.groups = chains.iter().map(|&(g, s)| (g as u16, s - lo)).collect();
    req.tails = tails.iter().map(|&(g, k)| (g as u16, k)).collect();
    Some((lo, req))
}

/// Imports a load's verified blocks (the request began at the prompt's block `lo`) into the
/// pool: those the longest prefix the pool and the load together can serve needs and the pool
/// lacks. The pool may have changed meanwhile: what it has is skipped, and a full-attention
/// chain that lost a block before the loaded ones cannot take them (a shorter hit). Returns
/// the blocks the prompt's cached prefix grew by.
pub(crate) fn import_loaded(
    kv: &mut PagedKv,
    hashes: &[BlockHash],
    prompt: &[TokenId],
    lo: usize,
    result: &LoadResult,
) -> usize {
    let loaded = |g: usize, i: usize| -> Option<&[u8]> {
        result
            .runs
            .iter()
            .find(|r| r.group as usize == g)
            .and_then(|r| {
                let k = i.checked_sub(lo + r.start)?;
                r.payloads.get(k).map(|p| &p[..])
            })
    };
    let max = kv.max_prefix_blocks(prompt.len()).min(hashes.len());
    let n = kv.prefix_blocks(&hashes[..max], |g, i| {
        kv.has_block(g, &hashes[i]) || loaded(g, i).is_some()
    });
    let mut wanted = Vec::new();
    let mut payloads = Vec::new();
    for g in 0..kv.num_groups() {
        for i in kv.first_needed(g, n)..n {
            if !kv.has_block(g, &hashes[i]) {
                wanted.push((g, i));
                payloads.push(loaded(g, i).expect("prefix_blocks saw it"));
            }
        }
    }
    if wanted.is_empty() {
        return 0;
    }
    let before = kv.lookup_hashed(hashes, prompt.len()).num_blocks;
    kv.import(hashes, &wanted, &payloads, prompt);
    kv.lookup_hashed(hashes, prompt.len())
        .num_blocks
        .saturating_sub(before)
}
