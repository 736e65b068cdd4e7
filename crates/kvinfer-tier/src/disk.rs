//! DiskTier: one file per block under a directory that survives restart (`--disk-tier DIR`).
//!
//! ```text
//! DIR/kvinfer-v1/<model: 32 hex>/<hash[0]: 2 hex>/<hash: 32 hex>-g<group>.kvb
//! ```
//! - **Atomic writes**: a block is written to `<name>.<pid>-<n>.tmp` in the same directory, then
//!   renamed over its final name. A reader sees a whole block or none; a crash (even kill -9)
//!   leaves at most a temp file, which the next start sweeps. A block is immutable once named
//!   (its name is its content hash), so readers never race a writer of the same name with
//!   different content. No fsync: a process crash loses nothing the page cache holds; a power
//!   cut may lose recent blocks, which the checksum turns into misses.
//! - Chosen over an embedded LSM store (LevelDB's role) because a block is a 100 KB-1 MB value
//!   written once and read whole: one file each is one write and one read with no compaction,
//!   and `kvinfer bench tiers` measures it at page-cache speed (docs/BENCHMARKS.md).
//! - **Index rebuilt at start-up** from the file names and sizes (no file is opened), oldest
//!   modification first, so eviction continues in about the order it left off.
//! - **Size cap** (`--disk-tier-mb`): least recently used files are deleted to stay under it.
//! - **TTL** (optional): files older than it are deleted at start-up and treated as misses
//!   (and deleted) when read.
//! - **An unreadable entry** (no permission, a directory in the file's place, an I/O error)
//!   is a miss for that block only: counted in `errors`, dropped from the index and deleted
//!   (file or directory), so the writer stores the block again and the next request hits.
//!   Left in place, it would cost every later request with its prefix the rest of the prefix.
//!   A failure that may pass (interrupted, out of memory) is counted and the entry kept.

use crate::index::EntryIndex;
use crate::stats::{TierCounters, TierStats};
use crate::{unhex, Tier, TierError, TierKey};
use kvinfer_cache::{BlockHash, ModelFingerprint, PolicyKind};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// How to open a disk tier.
#[derive(Debug, Clone)]
pub struct DiskTierConfig {
    /// The directory (created if missing).
    pub dir: PathBuf,
    /// Most bytes of block files.
    pub budget_bytes: u64,
    /// Files older than this are expired.
    pub ttl: Option<Duration>,
}

/// Blocks as files. See the module docs.
pub struct DiskTier {
    root: PathBuf,
    ttl: Option<Duration>,
    /// Entry -> when it was written.
    index: Mutex<EntryIndex<SystemTime>>,
    counters: TierCounters,
    next_tmp: AtomicU64,
    /// Leftover temp files deleted at start-up.
    swept_tmp: u64,
}

const LAYOUT_DIR: &str = "kvinfer-v1";

/// What a disk tier directory holds, read without changing anything (for `kvinfer cache stats`
/// while a server may be writing to it).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DiskScan {
    /// Per model namespace (the fingerprint's first 16 bytes, hex): blocks and bytes.
    pub models: Vec<(String, u64, u64)>,
    /// Temp files (writes in flight, or left by a crash).
    pub temp_files: u64,
}

impl DiskTier {
    /// Reads what `dir` holds without sweeping, expiring or trimming anything.
    pub fn scan(dir: &Path) -> Result<DiskScan, TierError> {
        let root = dir.join(LAYOUT_DIR);
        let mut out = DiskScan::default();
        if !root.is_dir() {
            return Ok(out);
        }
        for model_dir in read_dirs(&root)? {
            let name = model_dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned());
            let Some(name) = name.filter(|n| unhex::<16>(n).is_some()) else {
                continue;
            };
            let (mut n, mut bytes) = (0, 0);
            for shard in read_dirs(&model_dir)? {
                for e in std::fs::read_dir(&shard)?.flatten() {
                    let f = e.file_name();
                    let f = f.to_string_lossy();
                    if f.ends_with(".tmp") {
                        out.temp_files += 1;
                    } else if f.ends_with(".kvb") {
                        n += 1;
                        bytes += e.metadata().map(|m| m.len()).unwrap_or(0);
                    }
                }
            }
            out.models.push((name, n, bytes));
        }
        out.models.sort();
        Ok(out)
    }

    /// Opens (or creates) the tier: sweeps leftover temp files, expires old files, rebuilds the
    /// index, and trims to the budget.
    pub fn open(config: &DiskTierConfig) -> Result<Self, TierError> {
        let root = config.dir.join(LAYOUT_DIR);
        std::fs::create_dir_all(&root)?;
        let mut found: Vec<(SystemTime, TierKey, u64)> = Vec::new();
        let mut swept = 0;
        let now = SystemTime::now();
        for model_dir in read_dirs(&root)? {
            let Some(fp) = model_dir
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(unhex::<16>)
            else {
                continue;
            };
            for shard in read_dirs(&model_dir)? {
                for entry in std::fs::read_dir(&shard)?.flatten() {
                    let path = entry.path();
                    let name = entry.file_name();
                    let name = name.to_string_lossy();
                    if name.ends_with(".tmp") {
                        let _ = std::fs::remove_file(&path);
                        swept += 1;
                        continue;
                    }
                    let Some(key) = parse_name(&fp, &name) else {
                        continue;
                    };
                    let Ok(meta) = entry.metadata() else { continue };
                    let written = meta.modified().unwrap_or(now);
                    if expired(config.ttl, written, now) {
                        let _ = std::fs::remove_file(&path);
                        continue;
                    }
                    found.push((written, key, meta.len()));
                }
            }
        }
        found.sort_by_key(|f| f.0);
        let mut index = EntryIndex::new(config.budget_bytes, PolicyKind::Lru);
        let tier = Self {
            root,
            ttl: config.ttl,
            index: Mutex::new(EntryIndex::new(0, PolicyKind::Lru)),
            counters: TierCounters::default(),
            next_tmp: AtomicU64::new(0),
            swept_tmp: swept,
        };
        for (written, key, len) in found {
            match index.insert(key, len, written) {
                Ok(evicted) => {
                    for (k, _) in evicted {
                        let _ = std::fs::remove_file(tier.path(&k));
                    }
                }
                Err(_) => {
                    let _ = std::fs::remove_file(tier.path(&key));
                }
            }
        }
        *tier.index.lock().unwrap_or_else(|e| e.into_inner()) = index;
        Ok(tier)
    }

    /// Temp files swept at start-up.
    pub fn swept_temp_files(&self) -> u64 {
        self.swept_tmp
    }

    /// The final path of `key`'s file.
    pub fn path(&self, key: &TierKey) -> PathBuf {
        let h = key.hash_hex();
        self.root
            .join(key.model_hex())
            .join(&h[..2])
            .join(format!("{h}-g{}.kvb", key.group))
    }

    fn index(&self) -> std::sync::MutexGuard<'_, EntryIndex<SystemTime>> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn forget(&self, key: &TierKey) {
        self.index().remove(key);
        remove_path(&self.path(key));
    }

    /// `key`'s entry is there but its file cannot be read: counted, and forgotten unless the
    /// failure may pass (see the module docs). Returns the error for the caller.
    fn unreadable(&self, key: &TierKey, e: std::io::Error) -> TierError {
        TierCounters::add(&self.counters.errors, 1);
        let lasting = !matches!(
            e.kind(),
            ErrorKind::Interrupted | ErrorKind::OutOfMemory | ErrorKind::WouldBlock
        );
        if lasting {
            self.forget(key);
        }
        tracing::warn!(
            "disk tier: block {} unreadable ({e}){}",
            key.hash_hex(),
            if lasting { "; removed" } else { "" }
        );
        e.into()
    }
}

/// Deletes what is at a block's path: its file, or whatever took its place (a directory and
/// its contents; a link itself, never what it points to).
fn remove_path(path: &Path) {
    let is_dir = std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir());
    let _ = if is_dir {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
}

fn read_dirs(dir: &Path) -> Result<Vec<PathBuf>, TierError> {
    Ok(std::fs::read_dir(dir)?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect())
}

fn expired(ttl: Option<Duration>, written: SystemTime, now: SystemTime) -> bool {
    ttl.is_some_and(|t| now.duration_since(written).unwrap_or_default() > t)
}

/// `<hash hex>-g<group>.kvb` of model namespace `fp` (the first 16 bytes of the fingerprint).
/// The full fingerprint is checked from the header at read time; the key carries only what
/// the name does, padded with the namespace bytes.
fn parse_name(fp: &[u8; 16], name: &str) -> Option<TierKey> {
    let stem = name.strip_suffix(".kvb")?;
    let (h, g) = stem.split_once("-g")?;
    let hash = BlockHash(unhex::<16>(h)?);
    let group = g.parse().ok()?;
    let mut full = [0u8; 32];
    full[..16].copy_from_slice(fp);
    Some(TierKey {
        fingerprint: ModelFingerprint(full),
        group,
        hash,
    })
}

impl Tier for DiskTier {
    fn name(&self) -> &'static str {
        "disk"
    }

    fn get(&self, key: &TierKey) -> Result<Option<Vec<u8>>, TierError> {
        let k = ns_key(key);
        let written = match self.index().get(&k) {
            Some(w) => *w,
            None => return Ok(None),
        };
        if expired(self.ttl, written, SystemTime::now()) {
            self.forget(&k);
            TierCounters::add(&self.counters.evictions, 1);
            return Ok(None);
        }
        match std::fs::read(self.path(key)) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == ErrorKind::NotFound => {
                self.index().remove(&k);
                Ok(None)
            }
            Err(e) => Err(self.unreadable(&k, e)),
        }
    }

    fn put(&self, key: &TierKey, value: &[u8]) -> Result<(), TierError> {
        let path = self.path(key);
        let dir = path.parent().expect("a block path has a directory");
        std::fs::create_dir_all(dir)?;
        let n = self.next_tmp.fetch_add(1, Ordering::Relaxed);
        let tmp = path.with_extension(format!("{}-{n}.tmp", std::process::id()));
        let write = std::fs::write(&tmp, value).and_then(|_| std::fs::rename(&tmp, &path));
        if let Err(e) = write {
            let _ = std::fs::remove_file(&tmp);
            return Err(e.into());
        }
        let evicted = self
            .index()
            .insert(ns_key(key), value.len() as u64, SystemTime::now());
        match evicted {
            Ok(evicted) => {
                TierCounters::add(&self.counters.evictions, evicted.len() as u64);
                for (k, _) in evicted {
                    let _ = std::fs::remove_file(self.path(&k));
                }
            }
            Err(_) => {
                let _ = std::fs::remove_file(&path);
                return Err(TierError::Config("block larger than the disk tier".into()));
            }
        }
        Ok(())
    }

    fn contains(&self, key: &TierKey) -> Result<bool, TierError> {
        Ok(self.index().contains(&ns_key(key)))
    }

    fn delete(&self, key: &TierKey) -> Result<(), TierError> {
        self.forget(&ns_key(key));
        Ok(())
    }

    fn clear(&self, model: Option<&ModelFingerprint>) -> Result<u64, TierError> {
        let ns = model.map(ns_key_fp);
        let gone = self
            .index()
            .remove_where(|k, _| ns.is_none_or(|m| k.fingerprint == m));
        for k in &gone {
            remove_path(&self.path(k));
        }
        Ok(gone.len() as u64)
    }

    fn counters(&self) -> &TierCounters {
        &self.counters
    }

    fn stats(&self) -> TierStats {
        let ix = self.index();
        self.counters
            .snapshot(self.name(), ix.len() as u64, ix.bytes(), true)
    }
}

/// The index keys entries by what a file name can say: the fingerprint's first 16 bytes.
fn ns_key(key: &TierKey) -> TierKey {
    TierKey {
        fingerprint: ns_key_fp(&key.fingerprint),
        ..*key
    }
}

fn ns_key_fp(fp: &ModelFingerprint) -> ModelFingerprint {
    let mut full = [0u8; 32];
    full[..16].copy_from_slice(&fp.0[..16]);
    ModelFingerprint(full)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(model: u8, i: u8) -> TierKey {
        TierKey {
            fingerprint: ModelFingerprint([model; 32]),
            group: 0,
            hash: BlockHash([i; 16]),
        }
    }

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kvinfer-disk-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn survives_reopen_sweeps_temp_files_and_keeps_its_cap() {
        let d = dir("reopen");
        let cfg = DiskTierConfig {
            dir: d.clone(),
            budget_bytes: 300,
            ttl: None,
        };
        let t = DiskTier::open(&cfg).unwrap();
        for i in 0..3 {
            t.put(&key(1, i), &[i; 100]).unwrap();
        }
        t.get(&key(1, 0)).unwrap(); // 1 is now the least recent
        t.put(&key(1, 3), &[3; 100]).unwrap();
        assert_eq!(
            t.get(&key(1, 1)).unwrap(),
            None,
            "evicted to stay under the cap"
        );
        assert!(!t.path(&key(1, 1)).exists(), "its file is gone");
        assert_eq!(t.get(&key(1, 3)).unwrap(), Some(vec![3; 100]));
        // A half-written block from a crash.
        let tmp = t.path(&key(1, 9)).with_extension("123-0.tmp");
        std::fs::create_dir_all(tmp.parent().unwrap()).unwrap();
        std::fs::write(&tmp, [9; 50]).unwrap();
        drop(t);
        let t = DiskTier::open(&cfg).unwrap();
        assert_eq!(t.swept_temp_files(), 1);
        assert!(!tmp.exists());
        assert_eq!(t.stats().entries, 3);
        assert_eq!(t.get(&key(1, 2)).unwrap(), Some(vec![2; 100]));
        assert_eq!(
            t.get(&key(2, 2)).unwrap(),
            None,
            "another model's namespace"
        );
        assert_eq!(t.clear(Some(&ModelFingerprint([1; 32]))).unwrap(), 3);
        assert_eq!(t.stats().entries, 0);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn an_unreadable_block_is_counted_forgotten_and_does_not_fail_its_batch() {
        let d = dir("unreadable");
        let cfg = DiskTierConfig {
            dir: d.clone(),
            budget_bytes: 1 << 20,
            ttl: None,
        };
        let t = DiskTier::open(&cfg).unwrap();
        let keys: Vec<TierKey> = (0..4).map(|i| key(1, i)).collect();
        for (i, k) in keys.iter().enumerate() {
            t.put(k, &[i as u8; 10]).unwrap();
        }
        // A directory (with something in it) where block 1's file should be: unreadable even
        // for root.
        let p = t.path(&keys[1]);
        std::fs::remove_file(&p).unwrap();
        std::fs::create_dir_all(p.join("junk")).unwrap();
        let got = t.get_many(&keys).unwrap();
        assert_eq!(
            got,
            vec![
                Some(vec![0; 10]),
                None,
                Some(vec![2; 10]),
                Some(vec![3; 10])
            ],
            "the others are served"
        );
        let st = t.stats();
        assert_eq!((st.errors, st.entries), (1, 3), "counted and forgotten");
        assert!(!p.exists(), "the directory is removed");
        assert!(
            !t.contains(&keys[1]).unwrap(),
            "so the writer stores it again"
        );
        t.put(&keys[1], &[1; 10]).unwrap();
        assert_eq!(t.get(&keys[1]).unwrap(), Some(vec![1; 10]));
        assert_eq!(t.stats().errors, 1);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn expired_files_are_misses_and_are_deleted() {
        let d = dir("ttl");
        let cfg = DiskTierConfig {
            dir: d.clone(),
            budget_bytes: 1 << 20,
            ttl: Some(Duration::from_millis(50)),
        };
        let t = DiskTier::open(&cfg).unwrap();
        t.put(&key(1, 1), &[1; 10]).unwrap();
        assert!(t.get(&key(1, 1)).unwrap().is_some());
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(t.get(&key(1, 1)).unwrap(), None);
        assert!(!t.path(&key(1, 1)).exists());
        let _ = std::fs::remove_dir_all(&d);
    }
}
