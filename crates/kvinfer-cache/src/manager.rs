//! Sequences over the block pool: block tables, prefix reuse, copy-on-write, and hit statistics.
//!
//! Plan, then commit (as llama.cpp's memory API): [`KvCacheManager::lookup`] and
//! [`KvCacheManager::blocks_needed`] only read; [`KvCacheManager::add_sequence`],
//! [`KvCacheManager::reserve`] and [`KvCacheManager::commit`] change state. One step of a
//! sequence is: `reserve(seq, n)` (blocks for `n` more tokens, plus any copy-on-write the caller
//! must perform on the storage), run the model over the block table, then `commit(seq, tokens)`
//! once their K/V is written: every block that became full is hashed and registered, so later
//! requests can reuse it.

use crate::groups::{first_needed_block, HOLE};
use crate::ids::{BlockHash, BlockId, ModelFingerprint, SeqId, TokenId};
use crate::policy::PolicyKind;
use crate::pool::{BlockPool, PoolEvent};
use std::collections::HashMap;

/// How to build a [`KvCacheManager`].
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// Blocks in the pool.
    pub num_blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Eviction policy.
    pub policy: PolicyKind,
    /// Seed of the `Random` policy.
    pub seed: u64,
    /// Roots every block hash chain.
    pub fingerprint: ModelFingerprint,
    /// Per layer group, its sliding window (`None`: full attention); one block table per group
    /// and sequence. `vec![None]` for one group (see [`crate::KvGroups`]).
    pub windows: Vec<Option<usize>>,
}

/// A copy the caller must perform on the storage before writing into `dst` (copy-on-write of
/// a partial block shared after a fork).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockCopy {
    /// Block to read.
    pub src: BlockId,
    /// Block to overwrite.
    pub dst: BlockId,
}

/// Not enough free or evictable blocks; nothing was changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutOfBlocks {
    /// Blocks the request needed.
    pub needed: usize,
    /// Blocks that could be had.
    pub available: usize,
}

/// Blocks being brought in from a tier, between [`KvCacheManager::import_begin`] and
/// [`KvCacheManager::import_finish`]: the caller writes `wanted[i]`'s bytes into `fresh[i]`.
#[derive(Debug)]
pub struct Import {
    /// Blocks held meanwhile (so nothing evicts what the imports chain to).
    held: Vec<BlockId>,
    /// The blocks to fill, one per wanted block.
    pub fresh: Vec<BlockId>,
    /// (group, block index in the prompt) of each imported block, as asked.
    pub wanted: Vec<(usize, usize)>,
}

/// The cached prefix of a prompt.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrefixMatch {
    /// Per layer group, the cached blocks of the prefix: every one for full-attention groups,
    /// those of the window before the prefix's end for sliding ones ([`HOLE`] before it).
    pub tables: Vec<Vec<BlockId>>,
    /// Blocks of the prefix.
    pub num_blocks: usize,
    /// Tokens they hold (`num_blocks * block_size`).
    pub num_tokens: usize,
}

/// Prefix cache counters (the server exports them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PrefixStats {
    /// Prompts looked up.
    pub queries: u64,
    /// Prompt tokens looked up.
    pub query_tokens: u64,
    /// Prompt tokens served from the cache.
    pub hit_tokens: u64,
}

impl PrefixStats {
    /// `hit_tokens / query_tokens` (0 before any query).
    pub fn hit_rate(&self) -> f64 {
        if self.query_tokens == 0 {
            0.0
        } else {
            self.hit_tokens as f64 / self.query_tokens as f64
        }
    }
}

/// Where the pool's blocks are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct BlockUsage {
    /// Blocks in the pool.
    pub total: usize,
    /// Held by at least one sequence.
    pub in_use: usize,
    /// Unused but holding a cached prefix (evictable).
    pub cached: usize,
    /// Holding nothing.
    pub free: usize,
    /// Evicted so far.
    pub evictions: u64,
}

#[derive(Debug, Clone)]
struct Sequence {
    /// Block table per layer group: position `p` lives in `tables[g][p / block_size]` (or
    /// nowhere: [`HOLE`], a sliding-window block let go).
    tables: Vec<Vec<BlockId>>,
    /// Tokens whose K/V is written (committed).
    tokens: Vec<TokenId>,
    /// Hashes of the full blocks, in order.
    hashes: Vec<BlockHash>,
    /// Hashes of the prompt's full blocks, computed once when the request was accepted; commit
    /// takes block `i`'s hash from here instead of hashing again.
    planned: Vec<BlockHash>,
    /// Whether full blocks are registered for reuse.
    cache_prefix: bool,
}

/// Sequences, their block tables, and the pool under them.
///
/// # Invariants
/// - a sequence's tables cover at least its committed tokens; their first `hashes.len()` blocks
///   are full and, where registered, registered under those hashes (and their group);
/// - each table entry but a [`HOLE`] holds one reference on its block; holes are only in
///   sliding-window groups, before the window of the next position;
/// - a sequence holding a registered block of a full-attention group holds that block's
///   registered parent (so the pool's cached trees always have an evictable leaf); blocks of
///   sliding-window groups are registered without a parent (any of them may be evicted).
#[derive(Debug)]
pub struct KvCacheManager {
    pool: BlockPool,
    block_size: usize,
    windows: Vec<Option<usize>>,
    root: BlockHash,
    seqs: HashMap<SeqId, Sequence>,
    next_seq: u64,
    stats: PrefixStats,
    /// `[num_blocks][block_size]`: the token ids a registered block holds (kept after eviction
    /// until the block is registered again, so an eviction event can still name them).
    block_tokens: Vec<TokenId>,
}

impl KvCacheManager {
    /// An empty cache.
    pub fn new(config: &CacheConfig) -> Self {
        assert!(config.block_size > 0, "block_size must be positive");
        assert!(!config.windows.is_empty(), "at least one layer group");
        Self {
            pool: BlockPool::new(config.num_blocks, config.policy, config.seed),
            block_size: config.block_size,
            windows: config.windows.clone(),
            root: BlockHash::root(&config.fingerprint),
            seqs: HashMap::new(),
            next_seq: 0,
            stats: PrefixStats::default(),
            block_tokens: vec![0; config.num_blocks * config.block_size],
        }
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.pool.num_blocks()
    }

    /// The eviction policy.
    pub fn policy(&self) -> PolicyKind {
        self.pool.policy_kind()
    }

    /// Prefix cache counters.
    pub fn stats(&self) -> PrefixStats {
        self.stats
    }

    /// Where the blocks are.
    pub fn usage(&self) -> BlockUsage {
        let (free, cached) = (self.pool.num_free(), self.pool.num_cached());
        BlockUsage {
            total: self.pool.num_blocks(),
            in_use: self.pool.num_blocks() - free - cached,
            cached,
            free,
            evictions: self.pool.evictions(),
        }
    }

    /// Token slots allocated to live sequences but not (yet) filled, and slots allocated: the
    /// paging waste is `unfilled / allocated`. Shared blocks count once per sequence.
    pub fn slot_usage(&self) -> (usize, usize) {
        let mut unfilled = 0;
        let mut allocated = 0;
        for s in self.seqs.values() {
            for t in &s.tables {
                let held = t.iter().filter(|&&b| b != HOLE).count();
                let slots = held * self.block_size;
                allocated += slots;
                unfilled += (t.len() * self.block_size).saturating_sub(s.tokens.len());
            }
        }
        (unfilled, allocated)
    }

    /// Live sequences.
    pub fn num_sequences(&self) -> usize {
        self.seqs.len()
    }

    /// The hashes of the full blocks of `tokens`, chained from the fingerprint's root. A request
    /// computes these once and passes them to lookup, admission and commit.
    pub fn hash_blocks(&self, tokens: &[TokenId]) -> Vec<BlockHash> {
        let mut parent = self.root;
        tokens
            .chunks_exact(self.block_size)
            .map(|chunk| {
                parent = BlockHash::chain(&parent, chunk, &[]);
                parent
            })
            .collect()
    }

    /// Full blocks a prompt of `prompt_len` tokens may take from a cache: all but the last token
    /// must be covered, so the last one is always computed.
    pub fn max_prefix_blocks(&self, prompt_len: usize) -> usize {
        prompt_len.saturating_sub(1) / self.block_size
    }

    /// The longest run of cached full blocks that starts `prompt`, leaving at least its last
    /// token to compute. Reads only.
    pub fn lookup(&self, prompt: &[TokenId]) -> PrefixMatch {
        self.lookup_hashed(&self.hash_blocks(prompt), prompt.len())
    }

    /// Layer groups (block tables per sequence).
    pub fn num_groups(&self) -> usize {
        self.windows.len()
    }

    /// Per group, its sliding window (`None`: full attention).
    pub fn windows(&self) -> &[Option<usize>] {
        &self.windows
    }

    /// The block of group `g` registered under `hash`.
    pub fn cached_block(&self, g: usize, hash: &BlockHash) -> Option<BlockId> {
        self.pool.lookup(g as u16, hash)
    }

    /// As [`Self::lookup`], for a prompt of `prompt_len` tokens whose block hashes are `hashes`.
    pub fn lookup_hashed(&self, hashes: &[BlockHash], prompt_len: usize) -> PrefixMatch {
        let max_blocks = self.max_prefix_blocks(prompt_len).min(hashes.len());
        let n = self.prefix_blocks(&hashes[..max_blocks], |g, i| {
            self.pool.lookup(g as u16, &hashes[i]).is_some()
        });
        let tables = (0..self.windows.len())
            .map(|g| {
                let first = self.first_needed(g, n);
                (0..n)
                    .map(|i| match i < first {
                        true => HOLE,
                        false => self.pool.lookup(g as u16, &hashes[i]).expect("checked"),
                    })
                    .collect()
            })
            .collect();
        PrefixMatch {
            tables,
            num_blocks: n,
            num_tokens: n * self.block_size,
        }
    }

    /// The first block group `g` needs of a prefix of `n` blocks: the window before the first
    /// position to compute (0 for full attention).
    pub fn first_needed(&self, g: usize, n: usize) -> usize {
        first_needed_block(self.windows[g], n * self.block_size, self.block_size).min(n)
    }

    /// The longest prefix of the `hashes.len()` blocks usable as a hit, where `has(g, i)` says
    /// whether group `g`'s block `i` is at hand: every full-attention group has all its blocks,
    /// and each sliding-window group those of the window before the prefix's end (vLLM's
    /// hybrid rule). Walks back from the longest full-attention run.
    pub fn prefix_blocks(&self, hashes: &[BlockHash], has: impl Fn(usize, usize) -> bool) -> usize {
        let groups = 0..self.windows.len();
        let mut n = hashes.len();
        for g in groups.clone().filter(|&g| self.windows[g].is_none()) {
            n = n.min((0..n).take_while(|&i| has(g, i)).count());
        }
        let sliding: Vec<usize> = groups.filter(|&g| self.windows[g].is_some()).collect();
        if sliding.is_empty() {
            return n;
        }
        // run[g][i]: how many blocks of group g end at block i, all at hand.
        let runs: Vec<Vec<usize>> = sliding
            .iter()
            .map(|&g| {
                let mut run = 0;
                (0..n)
                    .map(|i| {
                        run = if has(g, i) { run + 1 } else { 0 };
                        run
                    })
                    .collect()
            })
            .collect();
        (1..=n)
            .rev()
            .find(|&len| {
                sliding
                    .iter()
                    .zip(&runs)
                    .all(|(&g, run)| run[len - 1] >= len - self.first_needed(g, len))
            })
            .unwrap_or(0)
    }

    /// Starts a sequence for `prompt`. With `reuse_prefix`, the cached prefix is taken (one
    /// reference per block, counted as hits) and its tokens count as already computed; the rest
    /// is up to the caller: `reserve`, run, `commit`. Returns the sequence and its cached
    /// tokens. With `reuse_prefix` false the sequence neither reads nor fills the prefix cache.
    pub fn add_sequence(&mut self, prompt: &[TokenId], reuse_prefix: bool) -> (SeqId, usize) {
        let hashes = if reuse_prefix {
            self.hash_blocks(prompt)
        } else {
            Vec::new()
        };
        self.add_sequence_hashed(prompt, hashes, reuse_prefix)
    }

    /// As [`Self::add_sequence`], with the prompt's block hashes already computed
    /// ([`Self::hash_blocks`], or the first of them; ignored without `reuse_prefix`).
    pub fn add_sequence_hashed(
        &mut self,
        prompt: &[TokenId],
        hashes: Vec<BlockHash>,
        reuse_prefix: bool,
    ) -> (SeqId, usize) {
        // A preempted sequence brings the hashes of what it computed: its last block may lack.
        debug_assert!(
            !reuse_prefix || self.hash_blocks(prompt).starts_with(&hashes),
            "hashes are not the prompt's"
        );
        let id = SeqId(self.next_seq);
        self.next_seq += 1;
        let mut seq = Sequence {
            tables: vec![Vec::new(); self.windows.len()],
            tokens: Vec::new(),
            hashes: Vec::new(),
            planned: Vec::new(),
            cache_prefix: reuse_prefix,
        };
        if reuse_prefix {
            let m = self.lookup_hashed(&hashes, prompt.len());
            for t in &m.tables {
                for &b in t.iter().filter(|&&b| b != HOLE) {
                    self.pool.acquire_cached(b);
                }
            }
            seq.hashes = hashes[..m.num_blocks].to_vec();
            seq.tables = m.tables;
            seq.tokens = prompt[..m.num_tokens].to_vec();
            seq.planned = hashes;
            self.stats.queries += 1;
            self.stats.query_tokens += prompt.len() as u64;
            self.stats.hit_tokens += m.num_tokens as u64;
        }
        let cached = seq.tokens.len();
        self.seqs.insert(id, seq);
        (id, cached)
    }

    /// Hashes of the full blocks `seq` has computed (to re-admit it after a preemption without
    /// hashing again).
    pub fn sequence_hashes(&self, seq: SeqId) -> &[BlockHash] {
        &self.seq(seq).hashes
    }

    /// First step of bringing blocks in from a tier: `wanted` lists (group, block index) of
    /// blocks of the prompt hashed `hashes` to import, none registered here. A full-attention
    /// group's blocks must extend its cached run: its other blocks up to the last wanted one
    /// must be registered here. What the pool has of the hit they make is held meanwhile, so
    /// the allocation evicts none of it.
    /// Allocates one block per wanted block. All or nothing: `None` (nothing changed) when the
    /// pool has no room or a chain is broken. The caller writes the bytes, then calls
    /// [`Self::import_finish`].
    pub fn import_begin(
        &mut self,
        hashes: &[BlockHash],
        wanted: &[(usize, usize)],
    ) -> Option<Import> {
        // Hold what the hit these imports make will use and the pool has: every block of a
        // full-attention group (a missing one breaks its chain: nothing to import), the
        // window's blocks of a sliding group.
        let n = wanted.iter().map(|w| w.1 + 1).max().unwrap_or(0);
        let asked: std::collections::HashSet<(usize, usize)> = wanted.iter().copied().collect();
        let mut held = Vec::new();
        for g in 0..self.windows.len() {
            for i in self.first_needed(g, n)..n {
                if asked.contains(&(g, i)) {
                    continue;
                }
                match (self.pool.lookup(g as u16, &hashes[i]), self.windows[g]) {
                    (Some(b), _) => held.push(b),
                    (None, None) => return None,
                    (None, Some(_)) => {} // a shorter hit, unless it comes back
                }
            }
        }
        if wanted.len() > self.pool.num_available() {
            return None;
        }
        for &b in &held {
            self.pool.acquire_cached(b);
        }
        let Some(fresh) = self.pool.allocate(wanted.len()) else {
            for &b in held.iter().rev() {
                self.pool.release(b);
            }
            return None;
        };
        Some(Import {
            held,
            fresh,
            wanted: wanted.to_vec(),
        })
    }

    /// Registers the imported blocks (their bytes are written; `tokens` are the prompt's) and
    /// lets go of every reference `import_begin` took: they stay cached, for the next
    /// [`Self::add_sequence_hashed`] to take. A full-attention group's blocks chain after its
    /// cached run, in order; a chain stops at a block whose parent is not registered or whose
    /// key got registered meanwhile (the rest are freed). Returns the blocks registered.
    pub fn import_finish(
        &mut self,
        import: Import,
        hashes: &[BlockHash],
        tokens: &[TokenId],
    ) -> usize {
        let Import {
            held,
            fresh,
            wanted,
        } = import;
        let bs = self.block_size;
        let mut registered = 0;
        for (&b, &(g, i)) in fresh.iter().zip(&wanted) {
            let parent = match (self.windows[g], i) {
                (Some(_), _) | (None, 0) => None,
                (None, _) => match self.pool.lookup(g as u16, &hashes[i - 1]) {
                    Some(p) => Some(p),
                    None => continue,
                },
            };
            if tokens.len() >= (i + 1) * bs && self.pool.register(b, g as u16, hashes[i], parent) {
                self.block_tokens[b.index() * bs..(b.index() + 1) * bs]
                    .copy_from_slice(&tokens[i * bs..(i + 1) * bs]);
                registered += 1;
            }
        }
        for &b in fresh.iter().rev().chain(held.iter().rev()) {
            self.pool.release(b);
        }
        registered
    }

    /// The token ids `block` holds (or last held, if it was evicted since): valid for
    /// registered blocks and for the block of an eviction event until it is registered again.
    pub fn block_tokens(&self, block: BlockId) -> &[TokenId] {
        let bs = self.block_size;
        &self.block_tokens[block.index() * bs..(block.index() + 1) * bs]
    }

    /// Drops every cached block no sequence uses (see [`BlockPool::drop_cached`]).
    pub fn drop_cached(&mut self) -> usize {
        self.pool.drop_cached()
    }

    /// Turns pool event recording on (for a [`crate::PagedKv`] with a sink).
    pub fn set_record_events(&mut self, on: bool) {
        self.pool.set_record_events(on);
    }

    /// Pool events since the last call.
    pub fn take_events(&mut self) -> Vec<PoolEvent> {
        self.pool.take_events()
    }

    fn seq(&self, id: SeqId) -> &Sequence {
        self.seqs
            .get(&id)
            .unwrap_or_else(|| panic!("unknown sequence {id:?}"))
    }

    /// Tokens committed for `seq`.
    pub fn num_tokens(&self, seq: SeqId) -> usize {
        self.seq(seq).tokens.len()
    }

    /// The block table of `seq`'s first layer group (its only one without sliding windows).
    pub fn block_table(&self, seq: SeqId) -> &[BlockId] {
        &self.seq(seq).tables[0]
    }

    /// The block tables of `seq`, one per layer group.
    pub fn block_tables(&self, seq: SeqId) -> &[Vec<BlockId>] {
        &self.seq(seq).tables
    }

    /// New blocks `reserve(seq, n_new)` would take (including copies-on-write). Reads only.
    pub fn blocks_needed(&self, seq: SeqId, n_new: usize) -> usize {
        let s = self.seq(seq);
        let want = (s.tokens.len() + n_new).div_ceil(self.block_size);
        s.tables
            .iter()
            .map(|t| want.saturating_sub(t.len()) + usize::from(self.needs_cow(s, t, n_new)))
            .sum()
    }

    /// True when the next write into table `t` lands in a partial block another sequence shares.
    fn needs_cow(&self, s: &Sequence, t: &[BlockId], n_new: usize) -> bool {
        let filled = s.tokens.len() % self.block_size;
        n_new > 0 && filled != 0 && self.pool.ref_count(t[s.tokens.len() / self.block_size]) > 1
    }

    /// Makes room for `n_new` more tokens of `seq`: allocates blocks (evicting by policy when
    /// needed) and un-shares a shared partial last block. The returned copies must be applied to
    /// the storage before the model writes. All or nothing.
    pub fn reserve(&mut self, seq: SeqId, n_new: usize) -> Result<Vec<BlockCopy>, OutOfBlocks> {
        let needed = self.blocks_needed(seq, n_new);
        let available = self.pool.num_available();
        if needed > available {
            return Err(OutOfBlocks { needed, available });
        }
        let mut fresh = self
            .pool
            .allocate(needed)
            .ok_or(OutOfBlocks { needed, available })?;
        let bs = self.block_size;
        let cows: Vec<bool> = {
            let s = self.seq(seq);
            s.tables
                .iter()
                .map(|t| self.needs_cow(s, t, n_new))
                .collect()
        };
        let s = self
            .seqs
            .get_mut(&seq)
            .unwrap_or_else(|| panic!("unknown sequence {seq:?}"));
        let want = (s.tokens.len() + n_new).div_ceil(bs);
        let mut copies = Vec::new();
        for (t, cow) in s.tables.iter_mut().zip(cows) {
            if cow {
                let i = s.tokens.len() / bs;
                let dst = fresh.pop().expect("blocks_needed counted the copy");
                let src = std::mem::replace(&mut t[i], dst);
                self.pool.release(src);
                copies.push(BlockCopy { src, dst });
            }
            let grow = want.saturating_sub(t.len());
            t.extend(fresh.drain(fresh.len() - grow..));
        }
        debug_assert!(fresh.is_empty(), "blocks_needed counted every block");
        Ok(copies)
    }

    /// Records that the K/V of `tokens` (the next positions of `seq`) is written. Each block that
    /// becomes full is hashed and registered for reuse in every group (if `seq` caches its
    /// prefix); a block whose content is already cached elsewhere is swapped for the cached copy
    /// (equal key, equal bytes) and freed. Then each sliding-window group lets go of the blocks
    /// that end before the next position's window (registered ones stay cached).
    pub fn commit(&mut self, seq: SeqId, tokens: &[TokenId]) {
        let bs = self.block_size;
        let root = self.root;
        let s = self
            .seqs
            .get_mut(&seq)
            .unwrap_or_else(|| panic!("unknown sequence {seq:?}"));
        debug_assert!(
            s.tokens.len() + tokens.len() <= s.tables[0].len() * bs,
            "commit past the reserved blocks of {seq:?}"
        );
        s.tokens.extend_from_slice(tokens);
        if s.cache_prefix {
            while s.hashes.len() < s.tokens.len() / bs {
                let i = s.hashes.len();
                let parent_hash = if i == 0 { root } else { s.hashes[i - 1] };
                let h = match s.planned.get(i) {
                    Some(&h) => h,
                    None => BlockHash::chain(&parent_hash, &s.tokens[i * bs..(i + 1) * bs], &[]),
                };
                s.hashes.push(h);
                for (g, t) in s.tables.iter_mut().enumerate() {
                    let key = g as u16;
                    let parent = match (self.windows[g], i) {
                        (Some(_), _) | (None, 0) => None,
                        (None, _) => {
                            // The parent must be this sequence's own registered block (the
                            // manager's invariant); else this one is not registered either.
                            let p = t[i - 1];
                            if self.pool.lookup(key, &parent_hash) != Some(p) {
                                continue;
                            }
                            Some(p)
                        }
                    };
                    let b = t[i];
                    if b == HOLE {
                        continue; // already out of the window (a window under a block)
                    }
                    match self.pool.lookup(key, &h) {
                        Some(c) if c == b => {}
                        Some(c) => {
                            // Only when no other sequence shares `b`: else swapping would leave
                            // them on a block never registered under its content; fine, skip.
                            if self.pool.ref_count(b) == 1 {
                                self.pool.acquire_cached(c);
                                self.pool.release(b);
                                t[i] = c;
                            }
                        }
                        None => {
                            if self.pool.register(b, key, h, parent) {
                                self.block_tokens[b.index() * bs..(b.index() + 1) * bs]
                                    .copy_from_slice(&s.tokens[i * bs..(i + 1) * bs]);
                            }
                        }
                    }
                }
            }
        }
        // Out of the window: no later query reads these (a registered one stays cached).
        let next = s.tokens.len();
        for (g, t) in s.tables.iter_mut().enumerate() {
            let end = first_needed_block(self.windows[g], next, bs).min(t.len());
            for e in t[..end].iter_mut().rev() {
                if *e == HOLE {
                    break; // everything before was let go earlier
                }
                self.pool.release(std::mem::replace(e, HOLE));
            }
        }
    }

    /// A new sequence sharing every block of `seq` (e.g. the `n` samples of one prompt). A shared
    /// partial block is copied when either sequence next writes into it.
    pub fn fork(&mut self, seq: SeqId) -> SeqId {
        let s = self.seq(seq).clone();
        for t in &s.tables {
            for &b in t.iter().filter(|&&b| b != HOLE) {
                self.pool.share(b);
            }
        }
        let id = SeqId(self.next_seq);
        self.next_seq += 1;
        self.seqs.insert(id, s);
        id
    }

    /// Ends `seq`: its references are dropped; registered blocks stay cached (evictable),
    /// the others are freed.
    pub fn release(&mut self, seq: SeqId) {
        if let Some(s) = self.seqs.remove(&seq) {
            // Leaf first, so a policy sees children released before parents.
            for t in &s.tables {
                for &b in t.iter().rev().filter(|&&b| b != HOLE) {
                    self.pool.release(b);
                }
            }
        }
    }

    /// Checks the pool's invariants and that reference counts match the block tables.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.pool.check_invariants()?;
        let mut refs = vec![0u32; self.pool.num_blocks()];
        for (id, s) in &self.seqs {
            for (g, t) in s.tables.iter().enumerate() {
                if t.len() * self.block_size < s.tokens.len() {
                    return Err(format!("{id:?}: table {g} too short for its tokens"));
                }
                let first = first_needed_block(self.windows[g], s.tokens.len(), self.block_size);
                for (i, b) in t.iter().enumerate() {
                    match (*b == HOLE, i < first) {
                        (true, false) => return Err(format!("{id:?}: hole at {g}/{i}")),
                        (true, true) => {}
                        (false, _) => refs[b.index()] += 1,
                    }
                }
            }
        }
        for (i, &r) in refs.iter().enumerate() {
            let have = self.pool.ref_count(BlockId(i as u32));
            if have != r {
                return Err(format!(
                    "block {i}: ref count {have}, block tables hold {r}"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "manager_tests.rs"]
mod tests;
