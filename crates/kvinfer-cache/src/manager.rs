//! Sequences over the block pool: block tables, prefix reuse, copy-on-write, and hit statistics.
//!
//! Plan, then commit (as llama.cpp's memory API): [`KvCacheManager::lookup`] and
//! [`KvCacheManager::blocks_needed`] only read; [`KvCacheManager::add_sequence`],
//! [`KvCacheManager::reserve`] and [`KvCacheManager::commit`] change state. One step of a
//! sequence is: `reserve(seq, n)` (blocks for `n` more tokens, plus any copy-on-write the caller
//! must perform on the storage), run the model over the block table, then `commit(seq, tokens)`
//! once their K/V is written: every block that became full is hashed and registered, so later
//! requests can reuse it.

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
/// [`KvCacheManager::import_finish`]: the caller writes `hashes[i]`'s bytes into `fresh[i]`.
#[derive(Debug)]
pub struct Import {
    prefix: Vec<BlockId>,
    /// The blocks to fill, one per hash.
    pub fresh: Vec<BlockId>,
    /// Hashes of the imported blocks, in chain order.
    pub hashes: Vec<BlockHash>,
}

/// The cached prefix of a prompt.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrefixMatch {
    /// The cached blocks, in order.
    pub blocks: Vec<BlockId>,
    /// Tokens they hold (`blocks.len() * block_size`).
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
    /// Block table: position `p` lives in `blocks[p / block_size]`.
    blocks: Vec<BlockId>,
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
/// - a sequence's table covers at least its committed tokens; its first `hashes.len()` blocks
///   are full and, where registered, registered under those hashes;
/// - each table entry holds one reference on its block;
/// - a sequence holding a registered block holds that block's registered parent (so the pool's
///   cached trees always have an evictable leaf).
#[derive(Debug)]
pub struct KvCacheManager {
    pool: BlockPool,
    block_size: usize,
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
        Self {
            pool: BlockPool::new(config.num_blocks, config.policy, config.seed),
            block_size: config.block_size,
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
            let slots = s.blocks.len() * self.block_size;
            allocated += slots;
            unfilled += slots - s.tokens.len();
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

    /// As [`Self::lookup`], for a prompt of `prompt_len` tokens whose block hashes are `hashes`.
    pub fn lookup_hashed(&self, hashes: &[BlockHash], prompt_len: usize) -> PrefixMatch {
        let max_blocks = self.max_prefix_blocks(prompt_len).min(hashes.len());
        let mut m = PrefixMatch::default();
        for h in &hashes[..max_blocks] {
            match self.pool.lookup(h) {
                Some(b) => m.blocks.push(b),
                None => break,
            }
        }
        m.num_tokens = m.blocks.len() * self.block_size;
        m
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
    /// ([`Self::hash_blocks`]; ignored without `reuse_prefix`).
    pub fn add_sequence_hashed(
        &mut self,
        prompt: &[TokenId],
        hashes: Vec<BlockHash>,
        reuse_prefix: bool,
    ) -> (SeqId, usize) {
        debug_assert!(
            !reuse_prefix || hashes == self.hash_blocks(prompt),
            "hashes are not the prompt's"
        );
        let id = SeqId(self.next_seq);
        self.next_seq += 1;
        let mut seq = Sequence {
            blocks: Vec::new(),
            tokens: Vec::new(),
            hashes: Vec::new(),
            planned: Vec::new(),
            cache_prefix: reuse_prefix,
        };
        if reuse_prefix {
            let m = self.lookup_hashed(&hashes, prompt.len());
            for b in &m.blocks {
                self.pool.acquire_cached(*b);
            }
            seq.hashes = hashes[..m.blocks.len()].to_vec();
            seq.blocks = m.blocks;
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

    /// First step of bringing blocks in from a tier: `hashes[..from]` must be registered here
    /// (the pool's cached prefix, see [`Self::lookup_hashed`]) and `hashes[from..]` not. Takes a
    /// reference on the prefix (so nothing evicts it meanwhile) and allocates one block per
    /// hash to import. All or nothing: `None` (nothing changed) when the pool has no room.
    /// The caller writes the bytes, then calls [`Self::import_finish`].
    pub fn import_begin(&mut self, hashes: &[BlockHash], from: usize) -> Option<Import> {
        let prefix: Vec<BlockId> = hashes[..from]
            .iter()
            .map(|h| self.pool.lookup(h))
            .collect::<Option<_>>()?;
        if hashes.len() - from > self.pool.num_available() {
            return None;
        }
        for &b in &prefix {
            self.pool.acquire_cached(b);
        }
        let Some(fresh) = self.pool.allocate(hashes.len() - from) else {
            for &b in prefix.iter().rev() {
                self.pool.release(b);
            }
            return None;
        };
        Some(Import {
            prefix,
            fresh,
            hashes: hashes[from..].to_vec(),
        })
    }

    /// Registers the imported blocks (their bytes are written) as a chain after the prefix and
    /// lets go of every reference `import_begin` took: they stay cached, for the next
    /// [`Self::add_sequence_hashed`] to take. Returns the blocks registered; stops at a hash
    /// that got registered meanwhile (freeing the rest).
    pub fn import_finish(&mut self, import: Import, tokens: &[TokenId]) -> usize {
        let Import {
            prefix,
            fresh,
            hashes,
        } = import;
        let bs = self.block_size;
        debug_assert_eq!(
            tokens.len(),
            hashes.len() * bs,
            "tokens of every imported block"
        );
        let mut parent = prefix.last().copied();
        let mut registered = 0;
        let mut chain_ok = true;
        for (&b, &h) in fresh.iter().zip(&hashes) {
            chain_ok = chain_ok && self.pool.register(b, h, parent);
            if chain_ok {
                let i = registered;
                self.block_tokens[b.index() * bs..(b.index() + 1) * bs]
                    .copy_from_slice(&tokens[i * bs..(i + 1) * bs]);
                registered += 1;
                parent = Some(b);
            }
        }
        for &b in fresh.iter().rev().chain(prefix.iter().rev()) {
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

    /// The block table of `seq`.
    pub fn block_table(&self, seq: SeqId) -> &[BlockId] {
        &self.seq(seq).blocks
    }

    /// New blocks `reserve(seq, n_new)` would take (including a copy-on-write). Reads only.
    pub fn blocks_needed(&self, seq: SeqId, n_new: usize) -> usize {
        let s = self.seq(seq);
        let want = (s.tokens.len() + n_new).div_ceil(self.block_size);
        let grow = want.saturating_sub(s.blocks.len());
        grow + usize::from(self.needs_cow(s, n_new))
    }

    /// True when the next write lands in a partial block another sequence shares.
    fn needs_cow(&self, s: &Sequence, n_new: usize) -> bool {
        let filled = s.tokens.len() % self.block_size;
        n_new > 0
            && filled != 0
            && self
                .pool
                .ref_count(s.blocks[s.tokens.len() / self.block_size])
                > 1
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
        let cow = {
            let s = self.seq(seq);
            self.needs_cow(s, n_new)
        };
        let s = self
            .seqs
            .get_mut(&seq)
            .unwrap_or_else(|| panic!("unknown sequence {seq:?}"));
        let mut copies = Vec::new();
        if cow {
            let i = s.tokens.len() / bs;
            let dst = fresh.pop().expect("blocks_needed counted the copy");
            let src = std::mem::replace(&mut s.blocks[i], dst);
            self.pool.release(src);
            copies.push(BlockCopy { src, dst });
        }
        s.blocks.extend(fresh);
        Ok(copies)
    }

    /// Records that the K/V of `tokens` (the next positions of `seq`) is written. Each block that
    /// becomes full is hashed and registered for reuse (if `seq` caches its prefix); a block
    /// whose content is already cached elsewhere is swapped for the cached copy (equal hash,
    /// equal bytes) and freed.
    pub fn commit(&mut self, seq: SeqId, tokens: &[TokenId]) {
        let bs = self.block_size;
        let root = self.root;
        let s = self
            .seqs
            .get_mut(&seq)
            .unwrap_or_else(|| panic!("unknown sequence {seq:?}"));
        debug_assert!(
            s.tokens.len() + tokens.len() <= s.blocks.len() * bs,
            "commit past the reserved blocks of {seq:?}"
        );
        s.tokens.extend_from_slice(tokens);
        if !s.cache_prefix {
            return;
        }
        while s.hashes.len() < s.tokens.len() / bs {
            let i = s.hashes.len();
            let parent_hash = if i == 0 { root } else { s.hashes[i - 1] };
            let h = match s.planned.get(i) {
                Some(&h) => h,
                None => BlockHash::chain(&parent_hash, &s.tokens[i * bs..(i + 1) * bs], &[]),
            };
            s.hashes.push(h);
            // The parent must be this sequence's own registered block (the manager's invariant).
            let parent = if i == 0 {
                None
            } else {
                let p = s.blocks[i - 1];
                if self.pool.lookup(&parent_hash) != Some(p) {
                    continue; // the parent was not registered: neither is this one
                }
                Some(p)
            };
            let b = s.blocks[i];
            match self.pool.lookup(&h) {
                Some(c) if c == b => {}
                Some(c) => {
                    // Only when no other sequence shares `b`: else swapping would leave them on
                    // a block that was never registered under its content anyway; fine, skip.
                    if self.pool.ref_count(b) == 1 {
                        self.pool.acquire_cached(c);
                        self.pool.release(b);
                        s.blocks[i] = c;
                    }
                }
                None => {
                    if self.pool.register(b, h, parent) {
                        self.block_tokens[b.index() * bs..(b.index() + 1) * bs]
                            .copy_from_slice(&s.tokens[i * bs..(i + 1) * bs]);
                    }
                }
            }
        }
    }

    /// A new sequence sharing every block of `seq` (e.g. the `n` samples of one prompt). A shared
    /// partial block is copied when either sequence next writes into it.
    pub fn fork(&mut self, seq: SeqId) -> SeqId {
        let s = self.seq(seq).clone();
        for &b in &s.blocks {
            self.pool.share(b);
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
            for &b in s.blocks.iter().rev() {
                self.pool.release(b);
            }
        }
    }

    /// Checks the pool's invariants and that reference counts match the block tables.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.pool.check_invariants()?;
        let mut refs = vec![0u32; self.pool.num_blocks()];
        for (id, s) in &self.seqs {
            if s.blocks.len() * self.block_size < s.tokens.len() {
                return Err(format!("{id:?}: table too short for its tokens"));
            }
            for b in &s.blocks {
                refs[b.index()] += 1;
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
