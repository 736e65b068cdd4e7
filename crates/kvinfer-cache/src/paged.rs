//! [`PagedKv`]: the one door to the KV cache. It owns the manager (metadata) and the storage
//! (bytes) and keeps them in step: copy-on-write copies are applied, and pool events reach the
//! sink with the block's bytes while they are still intact.
//!
//! ```text
//!  engine ──hash_blocks / lookup / add_sequence / reserve / commit / import──> PagedKv
//!                                                      │ pool events + bytes
//!                                                      v
//!                                            KvEventSink (tier write-back / write-through)
//! ```

use crate::ids::{BlockHash, BlockId, ModelFingerprint, SeqId, TokenId};
use crate::manager::{
    BlockUsage, CacheConfig, KvCacheManager, OutOfBlocks, PrefixMatch, PrefixStats,
};
use crate::policy::PolicyKind;
use crate::pool::PoolEvent;
use crate::storage::{KvLayout, KvStorage};

/// Receives what happens to blocks, with the block's bytes (as [`KvStorage::block_bytes`]).
/// Called on the engine thread: implementations copy what they need and return at once.
pub trait KvEventSink: Send {
    /// `event` happened; `tokens` are the block's token ids and `bytes` its content (for
    /// `Evicted`: what it held).
    fn on_event(&mut self, event: &PoolEvent, tokens: &[TokenId], bytes: &[u8]);
}

/// A sequence-level cache: the manager (metadata) and the storage (bytes) it indexes, sized
/// alike. The engine owns one; the model reads and writes the storage through block tables
/// ([`PagedKv::tables_and_storage`]).
pub struct PagedKv {
    fingerprint: ModelFingerprint,
    manager: KvCacheManager,
    storage: KvStorage,
    sink: Option<Box<dyn KvEventSink>>,
}

impl std::fmt::Debug for PagedKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PagedKv")
            .field("manager", &self.manager)
            .field("storage", &self.storage)
            .field("sink", &self.sink.is_some())
            .finish()
    }
}

/// Read access to the block tables while the storage is borrowed mutably (for a forward pass).
#[derive(Clone, Copy)]
pub struct SeqTables<'a>(&'a KvCacheManager);

impl<'a> SeqTables<'a> {
    /// The block table of `seq`'s first layer group.
    pub fn block_table(&self, seq: SeqId) -> &'a [BlockId] {
        self.0.block_table(seq)
    }

    /// The block tables of `seq`, one per layer group.
    pub fn block_tables(&self, seq: SeqId) -> &'a [Vec<BlockId>] {
        self.0.block_tables(seq)
    }

    /// Tokens committed for `seq`.
    pub fn num_tokens(&self, seq: SeqId) -> usize {
        self.0.num_tokens(seq)
    }
}

impl PagedKv {
    /// A cache of `layout.num_blocks` blocks of `layout.block_size` tokens, one layer group.
    pub fn new(
        layout: KvLayout,
        policy: PolicyKind,
        seed: u64,
        fingerprint: ModelFingerprint,
    ) -> Self {
        Self::with_groups(layout, vec![None], policy, seed, fingerprint)
    }

    /// As [`Self::new`], with one block table per layer group, whose windows are `windows`
    /// (see [`crate::KvGroups`]; each block holds `layout.n_layers` layers of one group).
    pub fn with_groups(
        layout: KvLayout,
        windows: Vec<Option<usize>>,
        policy: PolicyKind,
        seed: u64,
        fingerprint: ModelFingerprint,
    ) -> Self {
        let manager = KvCacheManager::new(&CacheConfig {
            num_blocks: layout.num_blocks,
            block_size: layout.block_size,
            policy,
            seed,
            fingerprint,
            windows,
        });
        Self {
            fingerprint,
            manager,
            storage: KvStorage::new(layout),
            sink: None,
        }
    }

    /// Sends pool events (blocks registered, blocks evicted) with their bytes to `sink`.
    pub fn set_sink(&mut self, sink: Box<dyn KvEventSink>) {
        self.manager.set_record_events(true);
        self.sink = Some(sink);
    }

    /// Delivers recorded events. Must run after every manager call that can register or evict
    /// and before anything writes to the storage.
    fn deliver_events(&mut self) {
        let Some(sink) = self.sink.as_mut() else {
            return;
        };
        for ev in self.manager.take_events() {
            let block = match ev {
                PoolEvent::Registered { block, .. } | PoolEvent::Evicted { block, .. } => block,
            };
            sink.on_event(
                &ev,
                self.manager.block_tokens(block),
                self.storage.block_bytes(block),
            );
        }
    }

    /// The storage's shape.
    pub fn layout(&self) -> &KvLayout {
        self.storage.layout()
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.manager.block_size()
    }

    /// Layer groups (block tables per sequence).
    pub fn num_groups(&self) -> usize {
        self.manager.num_groups()
    }

    /// The identity of the blocks (roots every hash chain).
    pub fn fingerprint(&self) -> ModelFingerprint {
        self.fingerprint
    }

    /// Blocks one sequence of `tokens` positions holds at its peak when run in chunks of at most
    /// `chunk` tokens: every block in full-attention groups, the window and a chunk in
    /// sliding-window groups.
    pub fn peak_blocks(&self, tokens: usize, chunk: usize) -> usize {
        let bs = self.block_size();
        let all = tokens.div_ceil(bs);
        self.windows()
            .iter()
            .map(|w| match w {
                None => all,
                Some(w) => all.min(w.saturating_add(chunk).div_ceil(bs).saturating_add(2)),
            })
            .sum()
    }

    /// The longest sequence the pool holds alone, run in chunks of at most `chunk` tokens.
    pub fn max_sequence_tokens(&self, chunk: usize) -> usize {
        let (mut lo, mut hi) = (0, self.num_blocks() * self.block_size());
        while lo < hi {
            let mid = (lo + hi).div_ceil(2);
            if self.peak_blocks(mid, chunk) <= self.num_blocks() {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        lo
    }

    /// Per layer group, its sliding window (`None`: full attention).
    pub fn windows(&self) -> &[Option<usize>] {
        self.manager.windows()
    }

    /// The first block group `g` needs of a prefix of `n` blocks.
    pub fn first_needed(&self, g: usize, n: usize) -> usize {
        self.manager.first_needed(g, n)
    }

    /// Whether group `g`'s block for `hash` is in the pool.
    pub fn has_block(&self, g: usize, hash: &BlockHash) -> bool {
        self.manager.cached_block(g, hash).is_some()
    }

    /// The longest usable prefix of `hashes` where `has(g, i)` says whether group `g`'s block
    /// `i` is at hand (see [`KvCacheManager::prefix_blocks`]).
    pub fn prefix_blocks(&self, hashes: &[BlockHash], has: impl Fn(usize, usize) -> bool) -> usize {
        self.manager.prefix_blocks(hashes, has)
    }

    /// Blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.manager.num_blocks()
    }

    /// The eviction policy.
    pub fn policy(&self) -> PolicyKind {
        self.manager.policy()
    }

    /// Prefix cache counters.
    pub fn stats(&self) -> PrefixStats {
        self.manager.stats()
    }

    /// Where the blocks are.
    pub fn usage(&self) -> BlockUsage {
        self.manager.usage()
    }

    /// Unfilled and allocated token slots of live sequences (the paging waste).
    pub fn slot_usage(&self) -> (usize, usize) {
        self.manager.slot_usage()
    }

    /// Live sequences.
    pub fn num_sequences(&self) -> usize {
        self.manager.num_sequences()
    }

    /// Hashes of the full blocks of `tokens` (compute once per request).
    pub fn hash_blocks(&self, tokens: &[TokenId]) -> Vec<BlockHash> {
        self.manager.hash_blocks(tokens)
    }

    /// Full blocks a prompt of `prompt_len` tokens may take from a cache.
    pub fn max_prefix_blocks(&self, prompt_len: usize) -> usize {
        self.manager.max_prefix_blocks(prompt_len)
    }

    /// The cached prefix of `prompt`. Reads only.
    pub fn lookup(&self, prompt: &[TokenId]) -> PrefixMatch {
        self.manager.lookup(prompt)
    }

    /// The cached prefix of a prompt of `prompt_len` tokens hashed `hashes`. Reads only.
    pub fn lookup_hashed(&self, hashes: &[BlockHash], prompt_len: usize) -> PrefixMatch {
        self.manager.lookup_hashed(hashes, prompt_len)
    }

    /// Starts a sequence (see [`KvCacheManager::add_sequence`]).
    pub fn add_sequence(&mut self, prompt: &[TokenId], reuse_prefix: bool) -> (SeqId, usize) {
        self.manager.add_sequence(prompt, reuse_prefix)
    }

    /// Starts a sequence with its prompt's hashes already computed.
    pub fn add_sequence_hashed(
        &mut self,
        prompt: &[TokenId],
        hashes: Vec<BlockHash>,
        reuse_prefix: bool,
    ) -> (SeqId, usize) {
        self.manager
            .add_sequence_hashed(prompt, hashes, reuse_prefix)
    }

    /// Hashes of the full blocks `seq` has computed.
    pub fn sequence_hashes(&self, seq: SeqId) -> &[BlockHash] {
        self.manager.sequence_hashes(seq)
    }

    /// Reserves room for `n_new` tokens of `seq`: evicted blocks reach the sink with their bytes,
    /// then any copy-on-write is applied to the storage. All or nothing.
    pub fn reserve(&mut self, seq: SeqId, n_new: usize) -> Result<(), OutOfBlocks> {
        let copies = self.manager.reserve(seq, n_new)?;
        self.deliver_events();
        for c in copies {
            self.storage.copy_block(c.src, c.dst);
        }
        Ok(())
    }

    /// Records that `tokens` of `seq` are written; full blocks are registered (and reported).
    pub fn commit(&mut self, seq: SeqId, tokens: &[TokenId]) {
        self.manager.commit(seq, tokens);
        self.deliver_events();
    }

    /// A sequence sharing every block of `seq`.
    pub fn fork(&mut self, seq: SeqId) -> SeqId {
        self.manager.fork(seq)
    }

    /// Ends `seq`; registered blocks stay cached.
    pub fn release(&mut self, seq: SeqId) {
        self.manager.release(seq)
    }

    /// Tokens committed for `seq`.
    pub fn num_tokens(&self, seq: SeqId) -> usize {
        self.manager.num_tokens(seq)
    }

    /// The block table of `seq`'s first layer group.
    pub fn block_table(&self, seq: SeqId) -> &[BlockId] {
        self.manager.block_table(seq)
    }

    /// The block tables of `seq`, one per layer group.
    pub fn block_tables(&self, seq: SeqId) -> &[Vec<BlockId>] {
        self.manager.block_tables(seq)
    }

    /// The block tables (read) and the storage (write), for one forward pass.
    pub fn tables_and_storage(&mut self) -> (SeqTables<'_>, &mut KvStorage) {
        (SeqTables(&self.manager), &mut self.storage)
    }

    /// The storage (read).
    pub fn storage(&self) -> &KvStorage {
        &self.storage
    }

    /// Brings blocks in from a tier: `wanted[i]` = (group, block index) of a block of the
    /// prompt `prompt` hashed `hashes`, and `payloads[i]` its verified bytes (exactly one block).
    /// A full-attention group's blocks must extend the run the pool has of it. They are copied
    /// into pool blocks and registered, cached for the next `add_sequence` to take. Returns how
    /// many were registered: 0 when the pool has no room (nothing changed).
    pub fn import(
        &mut self,
        hashes: &[BlockHash],
        wanted: &[(usize, usize)],
        payloads: &[&[u8]],
        prompt: &[TokenId],
    ) -> usize {
        let bytes = self.storage.layout().block_bytes();
        let bs = self.block_size();
        if payloads.len() != wanted.len()
            || payloads.iter().any(|p| p.len() != bytes)
            || wanted.iter().any(|&(g, i)| {
                g >= self.num_groups() || i >= hashes.len() || (i + 1) * bs > prompt.len()
            })
        {
            return 0;
        }
        let Some(import) = self.manager.import_begin(hashes, wanted) else {
            return 0;
        };
        self.deliver_events(); // evictions, before their blocks are overwritten
        for (&b, p) in import.fresh.iter().zip(payloads) {
            self.storage.set_block_bytes(b, p);
        }
        let n = self.manager.import_finish(import, hashes, prompt);
        self.deliver_events();
        n
    }

    /// Empties the prefix cache: every cached block no sequence uses is freed (not reported to
    /// the sink). Returns how many.
    pub fn clear_cached(&mut self) -> usize {
        self.manager.drop_cached()
    }

    /// Checks the manager's and pool's invariants.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.manager.check_invariants()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    type Log = Arc<Mutex<Vec<(PoolEvent, Vec<u32>, Vec<u8>)>>>;
    struct Recorder(Log);
    impl KvEventSink for Recorder {
        fn on_event(&mut self, event: &PoolEvent, tokens: &[u32], bytes: &[u8]) {
            self.0
                .lock()
                .unwrap()
                .push((*event, tokens.to_vec(), bytes.to_vec()));
        }
    }

    fn kv(num_blocks: usize) -> PagedKv {
        let layout = KvLayout {
            n_layers: 1,
            n_kv_heads: 1,
            head_dim: 2,
            block_size: 2,
            num_blocks,
            dtype: crate::KvDtype::F16,
        };
        PagedKv::new(layout, PolicyKind::Lru, 0, ModelFingerprint([9; 32]))
    }

    /// Runs `prompt` as one sequence, writing position `p` as the value `p + tag`.
    fn run(kv: &mut PagedKv, prompt: &[u32], tag: f32) -> SeqId {
        let hashes = kv.hash_blocks(prompt);
        let (s, cached) = kv.add_sequence_hashed(prompt, hashes, true);
        kv.reserve(s, prompt.len() - cached).unwrap();
        for p in cached..prompt.len() {
            let b = kv.block_table(s)[p / 2];
            let x = [p as f32 + tag, 0.0];
            kv.tables_and_storage().1.write(b, p % 2, 0, &x, &x);
        }
        kv.commit(s, &prompt[cached..]);
        s
    }

    #[test]
    fn the_sink_sees_registrations_and_evictions_with_intact_bytes() {
        let log = Log::default();
        let mut kv = kv(2);
        kv.set_sink(Box::new(Recorder(log.clone())));
        let a = run(&mut kv, &[1, 2, 3, 4], 10.0);
        let regs: Vec<_> = log.lock().unwrap().drain(..).collect();
        assert_eq!(regs.len(), 2);
        let hashes = kv.hash_blocks(&[1, 2, 3, 4]);
        for (i, (ev, tokens, bytes)) in regs.iter().enumerate() {
            assert_eq!(tokens, &[[1, 2], [3, 4]][i]);
            assert_eq!(
                *ev,
                PoolEvent::Registered {
                    hash: hashes[i],
                    group: 0,
                    block: kv.block_table(a)[i]
                }
            );
            assert_eq!(&bytes[..], kv.storage().block_bytes(kv.block_table(a)[i]));
        }
        kv.release(a);
        // A new prompt needs both blocks: the leaf goes first, then its parent, each reported
        // with the bytes it held before being overwritten.
        let b = run(&mut kv, &[7, 8, 9], 50.0);
        let evs: Vec<_> = log.lock().unwrap().drain(..).collect();
        let evicted: Vec<_> = evs
            .iter()
            .filter(|(e, _, _)| matches!(e, PoolEvent::Evicted { .. }))
            .collect();
        assert_eq!(evicted.len(), 2);
        assert!(matches!(evicted[0].0, PoolEvent::Evicted { hash, .. } if hash == hashes[1]));
        assert_eq!(evicted[0].1, vec![3, 4], "the leaf's tokens");
        assert_eq!(evicted[0].2, regs[1].2, "the leaf's bytes as registered");
        assert_eq!(evicted[1].2, regs[0].2);
        kv.release(b);
        kv.check_invariants().unwrap();
        // A clear frees every cached block and reports nothing.
        assert_eq!(kv.usage().cached, 1);
        assert_eq!(kv.clear_cached(), 1);
        assert_eq!(kv.usage().free, 2);
        assert!(log.lock().unwrap().is_empty());
        kv.check_invariants().unwrap();
    }

    #[test]
    fn imported_blocks_are_registered_and_taken_by_the_next_sequence() {
        let mut src = kv(4);
        let prompt = [1, 2, 3, 4, 5, 6, 7];
        let s = run(&mut src, &prompt, 3.0);
        let hashes = src.hash_blocks(&prompt);
        let payloads: Vec<Vec<u8>> = src
            .block_table(s)
            .iter()
            .take(3)
            .map(|&b| src.storage().block_bytes(b).to_vec())
            .collect();

        let mut dst = kv(5);
        // The first block is computed here; blocks 2 and 3 come from a "tier".
        let first = run(&mut dst, &prompt[..3], 3.0);
        dst.release(first);
        assert_eq!(dst.lookup_hashed(&hashes, prompt.len()).num_blocks, 1);
        let refs: Vec<&[u8]> = payloads[1..].iter().map(|p| &p[..]).collect();
        assert_eq!(
            dst.import(&hashes, &[(0, 1), (0, 2)], &refs, &prompt[..5]),
            0,
            "tokens of every block"
        );
        assert_eq!(
            dst.import(&hashes, &[(0, 2)], &refs[1..], &prompt),
            0,
            "a full-attention chain must extend the cached run"
        );
        assert_eq!(dst.import(&hashes, &[(0, 1), (0, 2)], &refs, &prompt), 2);
        dst.check_invariants().unwrap();
        assert_eq!(dst.usage().in_use, 0, "imported blocks wait cached");
        let (seq, cached) = dst.add_sequence_hashed(&prompt, hashes.clone(), true);
        assert_eq!(cached, 6);
        for i in 0..3 {
            assert_eq!(
                dst.storage().block_bytes(dst.block_table(seq)[i]),
                &payloads[i][..]
            );
        }
        dst.release(seq);

        // No room: nothing changes. A payload of the wrong size is refused.
        let mut tiny = kv(1);
        let before = tiny.usage();
        let refs: Vec<&[u8]> = payloads.iter().map(|p| &p[..]).collect();
        assert_eq!(
            tiny.import(&hashes, &[(0, 0), (0, 1), (0, 2)], &refs, &prompt),
            0
        );
        assert_eq!(tiny.usage(), before);
        assert_eq!(
            tiny.import(&hashes[..1], &[(0, 0)], &[&[0u8; 3]], &prompt),
            0
        );
        tiny.check_invariants().unwrap();
    }

    #[test]
    fn an_import_never_evicts_the_hit_it_completes() {
        // A full group and a sliding one (window 4, blocks of 2). The pool has the full
        // group's 4 blocks of a prompt, cached; the sliding window before them (blocks 2, 3)
        // comes from a "tier". With room for one more block only, the import is refused
        // rather than evict the full group's chain to make room.
        let layout = KvLayout {
            n_layers: 1,
            n_kv_heads: 1,
            head_dim: 2,
            block_size: 2,
            num_blocks: 5,
            dtype: crate::KvDtype::F16,
        };
        let windows = vec![None, Some(4)];
        let mut kv = PagedKv::with_groups(
            layout,
            windows,
            PolicyKind::Lru,
            0,
            ModelFingerprint([9; 32]),
        );
        let prompt: Vec<u32> = (1..=9).collect();
        let hashes = kv.hash_blocks(&prompt);
        let one = vec![7u8; kv.layout().block_bytes()];
        let full: Vec<(usize, usize)> = (0..4).map(|i| (0, i)).collect();
        assert_eq!(kv.import(&hashes, &full, &[&one[..]; 4], &prompt), 4);
        assert_eq!(kv.usage().cached, 4);
        assert_eq!(
            kv.lookup_hashed(&hashes, prompt.len()).num_blocks,
            0,
            "no window yet"
        );
        assert_eq!(
            kv.import(&hashes, &[(1, 2), (1, 3)], &[&one[..]; 2], &prompt),
            0
        );
        assert_eq!(kv.usage().cached, 4, "the full group's chain is intact");
        assert_eq!(kv.usage().evictions, 0);
        kv.check_invariants().unwrap();
        // With room, the window comes in and the whole prompt is a hit.
        kv.clear_cached();
        let mut kv2 = PagedKv::with_groups(
            KvLayout {
                num_blocks: 6,
                ..layout
            },
            vec![None, Some(4)],
            PolicyKind::Lru,
            0,
            ModelFingerprint([9; 32]),
        );
        assert_eq!(kv2.import(&hashes, &full, &[&one[..]; 4], &prompt), 4);
        assert_eq!(
            kv2.import(&hashes, &[(1, 2), (1, 3)], &[&one[..]; 2], &prompt),
            2
        );
        let hit = kv2.lookup_hashed(&hashes, prompt.len());
        assert_eq!(hit.num_blocks, 4);
        assert_eq!(&hit.tables[1][..2], &[crate::HOLE; 2]);
        kv2.check_invariants().unwrap();
    }
}
