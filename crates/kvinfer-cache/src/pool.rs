//! The block pool: per-block reference counts, the free list, the prefix index and the eviction
//! policy. It knows nothing of sequences (that is [`crate::KvCacheManager`]) nor of bytes
//! ([`crate::KvStorage`]).
//!
//! A block is in exactly one state:
//! ```text
//!   Free ──allocate──> InUse(ref>0) ──register──> InUse + hashed
//!    ^                   │ release to 0              │ release to 0
//!    └───────────────────┘                           v
//!    └──────────evict (policy, leaf first)──── Cached(ref 0, hashed) ──lookup hit──> InUse
//! ```
//! Cached blocks form a forest: each hashed block points at the block holding its parent hash.
//! Only a cached block with no cached children is an eviction candidate (leaf first), so no
//! cached block is ever unreachable from the root.

use crate::ids::{BlockHash, BlockId};
use crate::policy::{new_policy, EvictionPolicy, PolicyKind};
use std::collections::HashMap;

/// What happened to a block, as the pool reports it (when recording is on). The tiers and, later,
/// a KV-aware router consume these: a registered block is write-through material, an evicted one
/// write-back material. An evicted block's bytes stay readable in the storage until the block is
/// next written: [`crate::PagedKv`] hands them to its sink before any write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolEvent {
    /// `block` now holds the content named `hash` and is in the prefix index.
    Registered {
        /// The content hash.
        hash: BlockHash,
        /// The layer group whose layers the block holds.
        group: u16,
        /// The block holding it.
        block: BlockId,
    },
    /// A cached `block` holding `hash` was evicted (it is about to be reused).
    Evicted {
        /// The content hash it held.
        hash: BlockHash,
        /// The layer group whose layers the block holds.
        group: u16,
        /// The block, still holding the bytes.
        block: BlockId,
    },
}

#[derive(Debug, Clone, Default)]
struct BlockMeta {
    /// Sequences whose block table holds this block.
    ref_count: u32,
    /// Set while the block is registered in the prefix index.
    hash: Option<BlockHash>,
    /// The layer group it was registered for (with `hash`, its key in the index).
    group: u16,
    /// The block holding the parent hash (None: the parent is the root).
    parent: Option<BlockId>,
    /// Registered blocks whose `parent` is this block.
    cached_children: u32,
}

/// Blocks and their states. See the module docs.
///
/// # Invariants
/// - a block is in `free` iff `ref_count == 0 && hash.is_none()`;
/// - `index[h] == b` iff `blocks[b].hash == Some(h)`;
/// - the policy's candidates are exactly the hashed blocks with `ref_count == 0` and no cached
///   children;
/// - (kept by the manager) whoever holds a registered block holds its parent too, so every
///   cached tree has an unreferenced leaf and `num_available` blocks can really be allocated.
#[derive(Debug)]
pub struct BlockPool {
    blocks: Vec<BlockMeta>,
    /// Blocks holding nothing, used LIFO (recently freed memory is warm).
    free: Vec<BlockId>,
    /// The prefix index: (layer group, content hash) -> the block holding it.
    index: HashMap<(u16, BlockHash), BlockId>,
    policy: Box<dyn EvictionPolicy>,
    /// Hashed blocks with ref count 0 (evictable now or after their children).
    num_cached: usize,
    evictions: u64,
    /// Events since the last [`BlockPool::take_events`], when `record_events`.
    events: Vec<PoolEvent>,
    record_events: bool,
}

impl BlockPool {
    /// A pool of `num_blocks` free blocks evicting by `policy` (`seed` drives `Random`).
    pub fn new(num_blocks: usize, policy: PolicyKind, seed: u64) -> Self {
        Self {
            blocks: vec![BlockMeta::default(); num_blocks],
            free: (0..num_blocks as u32).rev().map(BlockId).collect(),
            index: HashMap::new(),
            policy: new_policy(policy, num_blocks, seed),
            num_cached: 0,
            evictions: 0,
            events: Vec::new(),
            record_events: false,
        }
    }

    /// Turns event recording on or off (off by default: nobody drains them).
    pub fn set_record_events(&mut self, on: bool) {
        self.record_events = on;
        if !on {
            self.events.clear();
        }
    }

    /// The events since the last call, oldest first.
    pub fn take_events(&mut self) -> Vec<PoolEvent> {
        std::mem::take(&mut self.events)
    }

    /// Registered blocks (cached or in use).
    pub fn num_registered(&self) -> usize {
        self.index.len()
    }

    /// Blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks holding nothing.
    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Cached blocks no sequence uses (evictable, leaf first).
    pub fn num_cached(&self) -> usize {
        self.num_cached
    }

    /// Blocks an allocation could take now: free plus cached.
    pub fn num_available(&self) -> usize {
        self.free.len() + self.num_cached
    }

    /// Blocks evicted so far.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// The policy in use.
    pub fn policy_kind(&self) -> PolicyKind {
        self.policy.kind()
    }

    /// References on `block`.
    pub fn ref_count(&self, block: BlockId) -> u32 {
        self.blocks[block.index()].ref_count
    }

    /// The block registered under `hash` for layer group `group`, if any.
    pub fn lookup(&self, group: u16, hash: &BlockHash) -> Option<BlockId> {
        self.index.get(&(group, *hash)).copied()
    }

    /// Takes `n` blocks with ref count 1, evicting cached blocks as needed. All or nothing:
    /// `None` (and no change) when fewer than `n` are available.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<BlockId>> {
        if n > self.num_available() {
            return None;
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let b = match self.free.pop().or_else(|| self.evict_one()) {
                Some(b) => b,
                None => {
                    // Unreachable while every holder of a registered block also holds its
                    // parent (the manager's rule); undo rather than trust it.
                    debug_assert!(false, "cached blocks without an evictable leaf");
                    for b in out {
                        self.release(b);
                    }
                    return None;
                }
            };
            self.blocks[b.index()].ref_count = 1;
            out.push(b);
        }
        Some(out)
    }

    /// Evicts the policy's choice; the block comes back holding nothing (not in `free`).
    fn evict_one(&mut self) -> Option<BlockId> {
        let b = self.policy.evict()?;
        let meta = &mut self.blocks[b.index()];
        debug_assert!(
            meta.ref_count == 0 && meta.cached_children == 0,
            "policy evicted a pinned block {b:?}"
        );
        let hash = meta.hash.take();
        let parent = meta.parent.take();
        if let Some(h) = hash {
            let group = meta.group;
            self.index.remove(&(group, h));
            if self.record_events {
                self.events.push(PoolEvent::Evicted {
                    hash: h,
                    group,
                    block: b,
                });
            }
        }
        self.num_cached -= 1;
        self.evictions += 1;
        if let Some(p) = parent {
            self.blocks[p.index()].cached_children -= 1;
            self.sync_candidate(p, false);
        }
        Some(b)
    }

    /// Evicts every cached block no sequence uses (leaf first), without recording events: a
    /// deliberate clear, not eviction pressure. Returns how many were dropped.
    pub fn drop_cached(&mut self) -> usize {
        let record = std::mem::replace(&mut self.record_events, false);
        let mut n = 0;
        while let Some(b) = self.evict_one() {
            self.free.push(b);
            n += 1;
        }
        self.record_events = record;
        n
    }

    /// A lookup hit on a registered block: one more reference, and the policy hears of the hit.
    pub fn acquire_cached(&mut self, block: BlockId) {
        let meta = &mut self.blocks[block.index()];
        debug_assert!(
            meta.hash.is_some(),
            "acquire_cached on unregistered {block:?}"
        );
        if meta.ref_count == 0 {
            self.num_cached -= 1;
        }
        meta.ref_count += 1;
        self.policy.access(block);
        self.sync_candidate(block, true);
    }

    /// One more reference on a block already in use (a fork).
    pub fn share(&mut self, block: BlockId) {
        let meta = &mut self.blocks[block.index()];
        debug_assert!(meta.ref_count > 0, "share of unused {block:?}");
        meta.ref_count += 1;
    }

    /// Drops one reference. At zero a registered block becomes cached, any other block free.
    pub fn release(&mut self, block: BlockId) {
        let meta = &mut self.blocks[block.index()];
        debug_assert!(meta.ref_count > 0, "release of unused {block:?}");
        meta.ref_count -= 1;
        if meta.ref_count > 0 {
            return;
        }
        if meta.hash.is_some() {
            self.num_cached += 1;
            self.sync_candidate(block, true);
        } else {
            self.free.push(block);
        }
    }

    /// Registers an in-use, unregistered `block` under (`group`, `hash`), its parent hash held
    /// by `parent` (None for the root, and for blocks of sliding-window groups, which need no
    /// chain). Returns false (and changes nothing) when the key is already registered: the
    /// first copy stays canonical and this one is freed on release.
    pub fn register(
        &mut self,
        block: BlockId,
        group: u16,
        hash: BlockHash,
        parent: Option<BlockId>,
    ) -> bool {
        debug_assert!(
            self.blocks[block.index()].ref_count > 0,
            "register of unused {block:?}"
        );
        debug_assert!(
            self.blocks[block.index()].hash.is_none(),
            "{block:?} registered twice"
        );
        if self.index.contains_key(&(group, hash)) {
            return false;
        }
        self.index.insert((group, hash), block);
        if self.record_events {
            self.events
                .push(PoolEvent::Registered { hash, group, block });
        }
        let meta = &mut self.blocks[block.index()];
        meta.hash = Some(hash);
        meta.group = group;
        meta.parent = parent;
        self.policy.insert(block, hash.key64());
        self.sync_candidate(block, true);
        if let Some(p) = parent {
            self.blocks[p.index()].cached_children += 1;
            self.sync_candidate(p, true);
        }
        true
    }

    /// Tells the policy whether a hashed block may be evicted now; `used`: a candidate because its
    /// last user let go just now (not because its last cached child was evicted).
    fn sync_candidate(&mut self, block: BlockId, used: bool) {
        let meta = &self.blocks[block.index()];
        if meta.hash.is_none() {
            return;
        }
        if meta.ref_count == 0 && meta.cached_children == 0 {
            self.policy.unpin(block, used);
        } else {
            self.policy.pin(block);
        }
    }

    /// Checks the invariants in the type docs. `Err` says which one broke.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut in_free = vec![false; self.blocks.len()];
        for b in &self.free {
            if std::mem::replace(&mut in_free[b.index()], true) {
                return Err(format!("{b:?} twice in the free list"));
            }
        }
        let mut children = vec![0u32; self.blocks.len()];
        let (mut cached, mut candidates) = (0, 0);
        for (i, m) in self.blocks.iter().enumerate() {
            let b = BlockId(i as u32);
            let should_be_free = m.ref_count == 0 && m.hash.is_none();
            if in_free[i] != should_be_free {
                return Err(format!("{b:?}: in free list {} but {m:?}", in_free[i]));
            }
            if let Some(h) = m.hash {
                if self.index.get(&(m.group, h)) != Some(&b) {
                    return Err(format!("{b:?} hashed {h:?} but the index disagrees"));
                }
                if let Some(p) = m.parent {
                    if self.blocks[p.index()].hash.is_none() {
                        return Err(format!("{b:?} has unregistered parent {p:?}"));
                    }
                    children[p.index()] += 1;
                }
                if m.ref_count == 0 {
                    cached += 1;
                }
            } else if m.parent.is_some() || m.cached_children != 0 {
                return Err(format!("unregistered {b:?} has tree links: {m:?}"));
            }
        }
        for (i, m) in self.blocks.iter().enumerate() {
            if children[i] != m.cached_children {
                return Err(format!(
                    "block {i}: cached_children {} but {} children point at it",
                    m.cached_children, children[i]
                ));
            }
            if m.hash.is_some() && m.ref_count == 0 && m.cached_children == 0 {
                candidates += 1;
            }
        }
        if self.index.len() != self.blocks.iter().filter(|m| m.hash.is_some()).count() {
            return Err("index holds hashes no block has".into());
        }
        if cached != self.num_cached {
            return Err(format!(
                "num_cached {} but {cached} cached",
                self.num_cached
            ));
        }
        if candidates != self.policy.num_candidates() {
            return Err(format!(
                "{candidates} leaf cached blocks but the policy has {} candidates",
                self.policy.num_candidates()
            ));
        }
        Ok(())
    }
}
