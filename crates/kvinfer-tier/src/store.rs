//! TieredStore: the tiers in lookup order (RAM -> disk -> Redis), background workers with
//! bounded queues, and the write policy per tier.
//!
//! ```text
//! engine loop ──request_load(hashes, tokens, reply)──> [load queue] ──> loader thread
//!     ^                                                                   │ get_many per tier,
//!     └──────── reply(LoadResult: verified payloads of the leading run) ──┘ verify, delete bad
//! pool events ──write_registered / write_evicted──> [one queue per tier] ──> writer threads
//!                 (non-blocking; a full queue drops the write and counts it)   (skip if held)
//! ```
//! Nothing here blocks the caller except [`TieredStore::load_blocking`] (for one-sequence
//! commands) and [`TieredStore::flush`]. Dropping the store drains every write queue first.

use crate::codec::Codec;
use crate::stats::{TierCounters, TierStats};
use crate::wire::{self, BlockSpec};
use crate::{Tier, TierKey};
use kvinfer_cache::BlockHash;
use std::str::FromStr;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// When a tier takes a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WriteMode {
    /// When the pool evicts it (write-back): the RAM tier's default.
    Back,
    /// When it is registered (write-through, asynchronous): disk's and Redis's default, so a
    /// restart or another instance finds it.
    Through,
    /// Never (read-only).
    Off,
}

impl FromStr for WriteMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "back" => Ok(WriteMode::Back),
            "through" => Ok(WriteMode::Through),
            "off" => Ok(WriteMode::Off),
            _ => Err(format!(
                "unknown write mode {s:?}; use back, through or off"
            )),
        }
    }
}

/// One tier in the store.
pub struct TierSpec {
    /// The tier.
    pub tier: Arc<dyn Tier>,
    /// When it is written.
    pub write: WriteMode,
    /// How payloads are compressed for it.
    pub codec: Codec,
}

/// How the store runs.
#[derive(Debug, Clone)]
pub struct TieredStoreConfig {
    /// The blocks this store reads and writes (model, group, dtype, shape).
    pub block: BlockSpec,
    /// Most blocks waiting to be written, per tier.
    pub write_queue_blocks: usize,
    /// Most loads waiting.
    pub load_queue: usize,
}

/// Blocks to fetch: `hashes` in chain order, `tokens` their token ids (`block_size` each); for
/// each `(group, start)` of `groups`, that layer group's blocks of `hashes[start..]`; then for
/// each `(group, k)` of `tails`, that group's `k` blocks before the end of the shortest run
/// the `groups` got (a sliding window's blocks before the hit point, which is only known then).
#[derive(Debug, Clone)]
pub struct LoadRequest {
    /// Content hashes, in chain order.
    pub hashes: Vec<BlockHash>,
    /// `block_size` token ids per hash.
    pub tokens: Vec<u32>,
    /// Which layer groups' blocks to fetch, each from its first hash on.
    pub groups: Vec<(u16, usize)>,
    /// Layer groups whose last blocks before the `groups`' end to fetch, and how many.
    pub tails: Vec<(u16, usize)>,
}

impl LoadRequest {
    /// Group 0's blocks of every hash (a model with one layer group).
    pub fn chain(hashes: Vec<BlockHash>, tokens: Vec<u32>) -> Self {
        Self {
            hashes,
            tokens,
            groups: vec![(0, 0)],
            tails: Vec::new(),
        }
    }
}

/// One layer group's answer: the verified payloads of the longest leading run of its blocks.
#[derive(Debug, Clone, Default)]
pub struct LoadRun {
    /// The layer group.
    pub group: u16,
    /// Its first hash in the request.
    pub start: usize,
    /// One block each, in chain order, from `hashes[start]` on.
    pub payloads: Vec<Vec<u8>>,
}

/// What a load found, per group asked.
#[derive(Debug, Clone, Default)]
pub struct LoadResult {
    /// One run per entry of the request's `groups`, then one per entry of its `tails` (each
    /// with the start it got), in order.
    pub runs: Vec<LoadRun>,
    /// Blocks of the run each tier served, in tier order.
    pub per_tier: Vec<usize>,
    /// Time the load took.
    pub elapsed: Duration,
}

impl LoadResult {
    /// The first group's run (the only one of a model with one layer group).
    pub fn payloads(&self) -> &[Vec<u8>] {
        self.runs.first().map_or(&[], |r| &r.payloads[..])
    }
}

/// A block's token ids and bytes, shared by the write jobs of every tier taking it.
type SharedBlock = (Arc<[u32]>, Arc<[u8]>);

/// Called with a load's result, on the loader thread.
pub type LoadReply = Box<dyn FnOnce(LoadResult) + Send>;

enum WriteJob {
    Put {
        group: u16,
        hash: BlockHash,
        tokens: Arc<[u32]>,
        raw: Arc<[u8]>,
    },
    Flush(SyncSender<()>),
}

struct Inner {
    spec: BlockSpec,
    tiers: Vec<TierSpec>,
}

/// The tiers behind the pool. See the module docs.
pub struct TieredStore {
    inner: Arc<Inner>,
    writers: Vec<Option<SyncSender<WriteJob>>>,
    loader: Option<SyncSender<(LoadRequest, LoadReply)>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// Blocks one writer batch holds at most.
const WRITE_BATCH: usize = 16;

impl TieredStore {
    /// Starts the workers: one loader, one writer per writable tier.
    pub fn new(config: TieredStoreConfig, tiers: Vec<TierSpec>) -> Self {
        let inner = Arc::new(Inner {
            spec: config.block,
            tiers,
        });
        let mut threads = Vec::new();
        let mut writers = Vec::new();
        for i in 0..inner.tiers.len() {
            if inner.tiers[i].write == WriteMode::Off {
                writers.push(None);
                continue;
            }
            let (tx, rx) = sync_channel(config.write_queue_blocks.max(1));
            let inner = inner.clone();
            let name = format!("kvinfer-tier-{}", inner.tiers[i].tier.name());
            match std::thread::Builder::new()
                .name(name)
                .spawn(move || write_loop(&inner, i, rx))
            {
                Ok(t) => {
                    threads.push(t);
                    writers.push(Some(tx));
                }
                Err(_) => writers.push(None),
            }
        }
        let (ltx, lrx) = sync_channel::<(LoadRequest, LoadReply)>(config.load_queue.max(1));
        let loader_inner = inner.clone();
        let loader = std::thread::Builder::new()
            .name("kvinfer-tier-load".into())
            .spawn(move || {
                for (req, reply) in lrx {
                    reply(load(&loader_inner, &req));
                }
            })
            .ok()
            .map(|t| {
                threads.push(t);
                ltx
            });
        Self {
            inner,
            writers,
            loader,
            threads: Mutex::new(threads),
        }
    }

    /// The blocks this store handles.
    pub fn spec(&self) -> &BlockSpec {
        &self.inner.spec
    }

    /// Names of the tiers, in lookup order.
    pub fn tier_names(&self) -> Vec<&'static str> {
        self.inner.tiers.iter().map(|t| t.tier.name()).collect()
    }

    /// Queues a load; `reply` gets the result on the loader thread. `Err` (the request back)
    /// when the load queue is full: the caller treats it as a miss.
    pub fn request_load(&self, req: LoadRequest, reply: LoadReply) -> Result<(), LoadRequest> {
        match &self.loader {
            Some(tx) => tx.try_send((req, reply)).map_err(|e| match e {
                TrySendError::Full((r, _)) | TrySendError::Disconnected((r, _)) => r,
            }),
            None => Err(req),
        }
    }

    /// Runs a load on the caller's thread (one-sequence commands: chat, generate).
    pub fn load_blocking(&self, req: &LoadRequest) -> LoadResult {
        load(&self.inner, req)
    }

    /// A block of layer group `group` was registered in the pool: write-through tiers take it
    /// (asynchronously).
    pub fn write_registered(&self, group: u16, hash: BlockHash, tokens: &[u32], raw: &[u8]) {
        self.enqueue(WriteMode::Through, group, hash, tokens, raw);
    }

    /// A block of layer group `group` was evicted from the pool: write-back tiers take it
    /// (asynchronously).
    pub fn write_evicted(&self, group: u16, hash: BlockHash, tokens: &[u32], raw: &[u8]) {
        self.enqueue(WriteMode::Back, group, hash, tokens, raw);
    }

    /// Whether any tier takes blocks in `mode`.
    pub fn writes(&self, mode: WriteMode) -> bool {
        self.inner.tiers.iter().any(|t| t.write == mode)
    }

    fn enqueue(&self, mode: WriteMode, group: u16, hash: BlockHash, tokens: &[u32], raw: &[u8]) {
        // The token ids and bytes, copied once for every tier that takes them.
        let mut shared: Option<SharedBlock> = None;
        for (t, w) in self.inner.tiers.iter().zip(&self.writers) {
            let (Some(w), true) = (w, t.write == mode) else {
                continue;
            };
            let (tokens, raw) = shared
                .get_or_insert_with(|| (Arc::from(tokens), Arc::from(raw)))
                .clone();
            let job = WriteJob::Put {
                group,
                hash,
                tokens,
                raw,
            };
            if w.try_send(job).is_err() {
                TierCounters::add(&t.tier.counters().put_dropped, 1);
            }
        }
    }

    /// Waits until every write queued so far is done.
    pub fn flush(&self) {
        let acks: Vec<Receiver<()>> = self
            .writers
            .iter()
            .flatten()
            .filter_map(|w| {
                let (tx, rx) = sync_channel(1);
                w.send(WriteJob::Flush(tx)).ok().map(|_| rx)
            })
            .collect();
        for rx in acks {
            let _ = rx.recv();
        }
    }

    /// Every tier's counters, in lookup order.
    pub fn stats(&self) -> Vec<TierStats> {
        self.inner.tiers.iter().map(|t| t.tier.stats()).collect()
    }

    /// Deletes this model's blocks from every tier (pending writes first); returns how many
    /// were deleted per tier, or the first error's message.
    pub fn clear(&self) -> Vec<(&'static str, Result<u64, String>)> {
        self.flush();
        let fp = self.inner.spec.fingerprint;
        self.inner
            .tiers
            .iter()
            .map(|t| {
                (
                    t.tier.name(),
                    t.tier.clear(Some(&fp)).map_err(|e| e.to_string()),
                )
            })
            .collect()
    }
}

impl Drop for TieredStore {
    /// Drains the write queues (a clean shutdown keeps what was pending) and stops the workers.
    fn drop(&mut self) {
        self.writers.clear();
        self.loader = None;
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }
}

/// For each group asked, the longest leading run of its blocks that some tier holds, verified;
/// then each tail group's blocks before the end of the shortest of those runs.
fn load(inner: &Inner, req: &LoadRequest) -> LoadResult {
    let t0 = Instant::now();
    let bs = inner.spec.block_size as usize;
    let n = req.hashes.len().min(req.tokens.len() / bs.max(1));
    let mut out = LoadResult {
        per_tier: vec![0; inner.tiers.len()],
        ..LoadResult::default()
    };
    let chains: Vec<(u16, usize)> = req.groups.iter().map(|&(g, s)| (g, s.min(n))).collect();
    fetch_runs(inner, req, &chains, n, &mut out);
    if !req.tails.is_empty() {
        let end = out
            .runs
            .iter()
            .map(|r| r.start + r.payloads.len())
            .min()
            .unwrap_or(n);
        let tails: Vec<(u16, usize)> = req
            .tails
            .iter()
            .map(|&(g, k)| (g, end.saturating_sub(k)))
            .collect();
        fetch_runs(inner, req, &tails, end, &mut out);
    }
    out.elapsed = t0.elapsed();
    out
}

/// Fetches each `(group, start)`'s blocks of `req.hashes[start..end]` and appends its verified
/// leading run to `out.runs`. Each tier is asked (in one batch) for the blocks the tiers
/// before it did not have; a block failing any check is deleted from its tier, counted, and
/// treated as missing. A block a tier could not read is missing too (the tier counted the
/// failure), and only it: a run ends at its first missing block, the blocks before are served.
fn fetch_runs(
    inner: &Inner,
    req: &LoadRequest,
    entries: &[(u16, usize)],
    end: usize,
    out: &mut LoadResult,
) {
    let spec = &inner.spec;
    // Every (entry, hash index) asked for.
    let asked: Vec<(usize, usize)> = entries
        .iter()
        .enumerate()
        .flat_map(|(e, &(_, start))| (start.min(end)..end).map(move |i| (e, i)))
        .collect();
    let mut got: Vec<Option<(Vec<u8>, usize)>> = vec![None; asked.len()];
    for (ti, t) in inner.tiers.iter().enumerate() {
        // Ask for every missing block (a later tier may fill a gap in a run).
        let want: Vec<usize> = (0..asked.len()).filter(|&a| got[a].is_none()).collect();
        if want.is_empty() {
            break;
        }
        let keys: Vec<TierKey> = want
            .iter()
            .map(|&a| {
                let (e, i) = asked[a];
                spec.in_group(entries[e].0).key(req.hashes[i])
            })
            .collect();
        let c = t.tier.counters();
        let r0 = Instant::now();
        let Ok(values) = t.tier.get_many_sized(&keys, spec.wire_bytes()) else {
            // The tier counted its error; every block asked of it is a miss.
            TierCounters::add(&c.misses, keys.len() as u64);
            continue;
        };
        c.read_latency.observe(r0.elapsed().as_secs_f64());
        // A tier answering fewer values than keys has not got the rest.
        let values = values.into_iter().chain(std::iter::repeat_with(|| None));
        let mut fetched = Vec::new();
        for ((&a, key), v) in want.iter().zip(&keys).zip(values) {
            match v {
                Some(bytes) => {
                    TierCounters::add(&c.bytes_read, bytes.len() as u64);
                    fetched.push((asked[a].1, key, bytes, a));
                }
                None => TierCounters::add(&c.misses, 1),
            }
        }
        let checked = verify_all(spec, req, &fetched);
        for ((_, key, _, a), result) in fetched.iter().zip(checked) {
            match result {
                Ok(payload) => {
                    TierCounters::add(&c.hits, 1);
                    got[*a] = Some((payload, ti));
                }
                Err(e) => {
                    TierCounters::add(&c.corrupt, 1);
                    tracing::warn!(
                        "{} tier: block {} refused ({e}); deleted",
                        t.tier.name(),
                        key.hash_hex()
                    );
                    let _ = t.tier.delete(key);
                }
            }
        }
    }
    let mut got = got.into_iter();
    for &(group, start) in entries {
        let mut run = LoadRun {
            group,
            start,
            payloads: Vec::new(),
        };
        let mut open = true;
        for g in got.by_ref().take(end.saturating_sub(start)) {
            match g {
                Some((payload, ti)) if open => {
                    out.per_tier[ti] += 1;
                    run.payloads.push(payload);
                }
                _ => open = false,
            }
        }
        out.runs.push(run);
    }
}

/// Checks and decodes fetched blocks `(hash index, key, bytes, _)`, on up to 4 threads:
/// decompression and checksums are the CPU cost of a tier hit, and a prefix is many
/// independent blocks. Each block is judged alone: one that makes the decoder panic is refused
/// (and deleted as corrupt), and the blocks beside it are not.
fn verify_all(
    spec: &BlockSpec,
    req: &LoadRequest,
    fetched: &[(usize, &TierKey, Vec<u8>, usize)],
) -> Vec<Result<Vec<u8>, wire::WireError>> {
    let bs = spec.block_size as usize;
    let one = |(i, key, bytes, _): &(usize, &TierKey, Vec<u8>, usize)| {
        let decode = || {
            wire::decode(
                &spec.in_group(key.group),
                &req.hashes[*i],
                &req.tokens[i * bs..(i + 1) * bs],
                bytes,
            )
        };
        // Only reads shared data and builds its own result: nothing is left half-done.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(decode))
            .unwrap_or(Err(wire::WireError::Payload))
    };
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(4)
        .min(fetched.len().div_ceil(4).max(1));
    if workers <= 1 {
        return fetched.iter().map(one).collect();
    }
    let per = fetched.len().div_ceil(workers);
    std::thread::scope(|s| {
        let handles: Vec<_> = fetched
            .chunks(per)
            .map(|chunk| s.spawn(move || chunk.iter().map(one).collect::<Vec<_>>()))
            .collect();
        // Unreachable (each block is caught alone); if a worker still died, it refuses its
        // blocks (one result per block, in order).
        handles
            .into_iter()
            .zip(fetched.chunks(per))
            .flat_map(|(h, chunk)| {
                h.join()
                    .unwrap_or_else(|_| vec![Err(wire::WireError::Payload); chunk.len()])
            })
            .collect()
    })
}

/// A writer: takes blocks off its queue in batches, skips the ones its tier holds, encodes the
/// rest with the tier's codec and stores them.
fn write_loop(inner: &Inner, i: usize, rx: Receiver<WriteJob>) {
    let t = &inner.tiers[i];
    let c = t.tier.counters();
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < WRITE_BATCH {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        let mut acks = Vec::new();
        let mut puts = Vec::new();
        for job in batch {
            match job {
                WriteJob::Flush(ack) => acks.push(ack),
                WriteJob::Put {
                    group,
                    hash,
                    tokens,
                    raw,
                } => puts.push((inner.spec.in_group(group), hash, tokens, raw)),
            }
        }
        // Skip what the tier holds: one batched check (one round trip for Redis).
        let keys: Vec<TierKey> = puts.iter().map(|p| p.0.key(p.1)).collect();
        let held = t
            .tier
            .contains_many(&keys)
            .unwrap_or_else(|_| vec![false; keys.len()]);
        let mut entries = Vec::new();
        for ((spec, hash, tokens, raw), (key, held)) in
            puts.into_iter().zip(keys.into_iter().zip(held))
        {
            if held {
                TierCounters::add(&c.put_skipped, 1);
                continue;
            }
            let bytes = wire::encode(&spec, &hash, &tokens, &raw, t.codec);
            entries.push((key, bytes));
        }
        if !entries.is_empty() {
            let w0 = Instant::now();
            let n = entries.len() as u64;
            let total: u64 = entries.iter().map(|e| e.1.len() as u64).sum();
            match t.tier.put_many(&entries) {
                Ok(()) => {
                    TierCounters::add(&c.puts, n);
                    TierCounters::add(&c.bytes_written, total);
                    let per = w0.elapsed().as_secs_f64() / n as f64;
                    for _ in 0..n {
                        c.write_latency.observe(per);
                    }
                }
                Err(e) => {
                    TierCounters::add(&c.errors, 1);
                    tracing::debug!("{} tier: write failed: {e}", t.tier.name());
                }
            }
        }
        for a in acks {
            let _ = a.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DiskTier, DiskTierConfig, RamTier};
    use kvinfer_cache::{ModelFingerprint, PolicyKind};

    fn spec() -> BlockSpec {
        BlockSpec {
            fingerprint: ModelFingerprint([4; 32]),
            group: 0,
            dtype: 0,
            n_layers: 1,
            n_kv_heads: 1,
            head_dim: 8,
            block_size: 2,
        }
    }

    fn block(i: u8) -> (BlockHash, Vec<u32>, Vec<u8>) {
        let raw: Vec<u8> = (0..spec().payload_bytes()).map(|j| (j as u8) ^ i).collect();
        (BlockHash([i; 16]), vec![i as u32, 100 + i as u32], raw)
    }

    fn store(dir: &std::path::Path, ram_mode: WriteMode) -> (TieredStore, Arc<DiskTier>) {
        let disk = Arc::new(
            DiskTier::open(&DiskTierConfig {
                dir: dir.to_path_buf(),
                budget_bytes: 1 << 20,
                ttl: None,
            })
            .unwrap(),
        );
        let tiers = vec![
            TierSpec {
                tier: Arc::new(RamTier::new(1 << 20, PolicyKind::Lru)),
                write: ram_mode,
                codec: Codec::ShuffleLz4,
            },
            TierSpec {
                tier: disk.clone(),
                write: WriteMode::Through,
                codec: Codec::None,
            },
        ];
        let cfg = TieredStoreConfig {
            block: spec(),
            write_queue_blocks: 64,
            load_queue: 4,
        };
        (TieredStore::new(cfg, tiers), disk)
    }

    fn request(ids: &[u8]) -> LoadRequest {
        LoadRequest::chain(
            ids.iter().map(|&i| block(i).0).collect(),
            ids.iter().flat_map(|&i| block(i).1).collect(),
        )
    }

    #[test]
    fn write_modes_lookup_order_and_a_corrupt_block_ends_the_run() {
        let dir = std::env::temp_dir().join(format!("kvinfer-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (s, disk) = store(&dir, WriteMode::Back);
        for i in 0..4 {
            let (h, t, raw) = block(i);
            s.write_registered(0, h, &t, &raw); // disk only
        }
        let (h, t, raw) = block(0);
        s.write_evicted(0, h, &t, &raw); // RAM only
        s.flush();
        let st = s.stats();
        assert_eq!((st[0].entries, st[1].entries), (1, 4));
        let r = s.load_blocking(&request(&[0, 1, 2, 3]));
        assert_eq!(r.payloads().len(), 4);
        assert_eq!(r.per_tier, vec![1, 3], "RAM first, disk for the rest");
        for (i, p) in r.payloads().iter().enumerate() {
            assert_eq!(p, &block(i as u8).2);
        }
        // Asking with other tokens than the block holds is refused (the block is deleted).
        let mut wrong = request(&[0, 1]);
        wrong.tokens[2] = 999;
        let r = s.load_blocking(&wrong);
        assert_eq!(r.payloads().len(), 1);
        assert_eq!(s.stats()[1].corrupt, 1);
        // A flipped bit on disk: block 2 is refused, deleted, counted; the run stops before it.
        let p = disk.path(&spec().key(block(2).0));
        let mut bytes = std::fs::read(&p).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&p, bytes).unwrap();
        let r = s.load_blocking(&request(&[0, 2, 3]));
        assert_eq!(r.payloads().len(), 1);
        assert!(!p.exists(), "the corrupt file is deleted");
        assert_eq!(s.stats()[1].corrupt, 2);
        // A repeated write of a block the tier holds is skipped.
        let (h, t, raw) = block(3);
        s.write_registered(0, h, &t, &raw);
        s.flush();
        assert_eq!(s.stats()[1].put_skipped, 1);
        // Asynchronous loads reply on the loader thread.
        let (tx, rx) = std::sync::mpsc::channel();
        s.request_load(request(&[0]), Box::new(move |r| tx.send(r).unwrap()))
            .unwrap();
        assert_eq!(rx.recv().unwrap().payloads().len(), 1);
        let cleared = s.clear();
        assert_eq!(cleared[1], ("disk", Ok(2)));
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Ways a block file can be there and yet unreadable.
    #[derive(Debug, Clone, Copy)]
    enum Damage {
        /// A directory in its place (unreadable even for root).
        Directory,
        /// Mode 000 (readable all the same when the tests run as root).
        NoPermission,
        /// A symbolic link to itself (ELOOP, for root too).
        SymlinkLoop,
    }

    /// Damages the file at `p`; whether this process can no longer read it.
    #[cfg(unix)]
    fn damage(p: &std::path::Path, how: Damage) -> bool {
        use std::os::unix::fs::PermissionsExt;
        match how {
            Damage::Directory => {
                std::fs::remove_file(p).unwrap();
                std::fs::create_dir_all(p.join("junk")).unwrap();
            }
            Damage::NoPermission => {
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o000)).unwrap();
            }
            Damage::SymlinkLoop => {
                std::fs::remove_file(p).unwrap();
                std::os::unix::fs::symlink(p, p).unwrap();
            }
        }
        std::fs::read(p).is_err()
    }

    #[cfg(unix)]
    #[test]
    fn an_unreadable_block_ends_the_run_there_is_counted_removed_and_comes_back() {
        let ids = [0, 1, 2, 3, 4];
        for how in [Damage::Directory, Damage::NoPermission, Damage::SymlinkLoop] {
            let dir = std::env::temp_dir().join(format!(
                "kvinfer-store-unreadable-{how:?}-{}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            let (s, disk) = store(&dir, WriteMode::Off);
            for i in ids {
                let (h, t, raw) = block(i);
                s.write_registered(0, h, &t, &raw);
            }
            s.flush();
            let p = disk.path(&spec().key(block(2).0));
            if !damage(&p, how) {
                // Root reads a mode-000 file: nothing failed, nothing may be lost.
                assert_eq!(
                    s.load_blocking(&request(&ids)).payloads().len(),
                    5,
                    "{how:?}"
                );
                assert_eq!(s.stats()[1].errors, 0, "{how:?}");
                drop(s);
                let _ = std::fs::remove_dir_all(&dir);
                continue;
            }
            let r = s.load_blocking(&request(&ids));
            assert_eq!(
                r.payloads().len(),
                2,
                "{how:?}: the blocks before it are served"
            );
            assert_eq!(r.per_tier, vec![0, 2], "{how:?}");
            let st = &s.stats()[1];
            assert_eq!(
                (st.errors, st.corrupt, st.entries),
                (1, 0, 4),
                "{how:?}: {st:?}"
            );
            assert!(
                std::fs::symlink_metadata(&p).is_err(),
                "{how:?}: removed from disk"
            );
            // The pool registers the recomputed block again: written, and a hit from then on.
            let (h, t, raw) = block(2);
            s.write_registered(0, h, &t, &raw);
            s.flush();
            let r = s.load_blocking(&request(&ids));
            assert_eq!(r.payloads().len(), 5, "{how:?}: its hit is back");
            assert_eq!(r.payloads()[2], block(2).2);
            assert_eq!(s.stats()[1].errors, 1, "{how:?}");
            drop(s);
            let _ = std::fs::remove_dir_all(&dir);
        }
    }

    /// (group, start, blocks) of each run of a load.
    fn run_shapes(r: &LoadResult) -> Vec<(u16, usize, usize)> {
        r.runs
            .iter()
            .map(|r| (r.group, r.start, r.payloads.len()))
            .collect()
    }

    #[test]
    fn each_layer_group_has_its_own_blocks_under_one_hash() {
        let dir = std::env::temp_dir().join(format!("kvinfer-store-groups-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (s, _) = store(&dir, WriteMode::Through);
        // Blocks 0..4 in group 0; in group 3 the same hashes hold other bytes, 0..2 only.
        for i in 0..4 {
            let (h, t, raw) = block(i);
            s.write_registered(0, h, &t, &raw);
            if i < 2 {
                let other: Vec<u8> = raw.iter().map(|b| !b).collect();
                s.write_registered(3, h, &t, &other);
            }
        }
        s.flush();
        let mut req = request(&[0, 1, 2, 3]);
        req.groups = vec![(0, 0), (3, 0), (3, 1), (5, 2)];
        let r = s.load_blocking(&req);
        let lens = run_shapes(&r);
        assert_eq!(lens, vec![(0, 0, 4), (3, 0, 2), (3, 1, 1), (5, 2, 0)]);
        assert_eq!(r.runs[0].payloads[1], block(1).2);
        let flipped: Vec<u8> = block(1).2.iter().map(|b| !b).collect();
        assert_eq!(r.runs[1].payloads[1], flipped, "group 3's own bytes");
        assert_eq!(r.runs[2].payloads[0], flipped);
        // Tails: group 3's 2 blocks before the end of group 0's run, which stops at block 2
        // when block 2 is asked with other tokens.
        let mut req = request(&[0, 1, 2, 3]);
        req.tokens[4] = 999; // block 2's tokens
        req.groups = vec![(0, 0)];
        req.tails = vec![(3, 2), (3, 5)];
        let r = s.load_blocking(&req);
        let lens = run_shapes(&r);
        assert_eq!(lens, vec![(0, 0, 2), (3, 0, 2), (3, 0, 2)]);
        assert_eq!(r.runs[1].payloads[1], flipped);
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn dropping_the_store_flushes_pending_writes() {
        let dir = std::env::temp_dir().join(format!("kvinfer-store-drop-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (s, _) = store(&dir, WriteMode::Off);
        for i in 0..20 {
            let (h, t, raw) = block(i);
            s.write_registered(0, h, &t, &raw);
        }
        drop(s);
        let (s, _) = store(&dir, WriteMode::Off);
        let ids: Vec<u8> = (0..20).collect();
        assert_eq!(s.load_blocking(&request(&ids)).payloads().len(), 20);
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
