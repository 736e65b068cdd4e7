//! RamTier: wire-encoded blocks in memory under a byte budget (`--ram-tier-mb`), evicted by one
//! of kvinfer-cache's policies. Blocks arrive compressed (the store encodes them with the
//! tier's codec), so the budget holds more blocks than the pool would in the same memory.

use crate::index::EntryIndex;
use crate::stats::{TierCounters, TierStats};
use crate::{Tier, TierError, TierKey};
use kvinfer_cache::{ModelFingerprint, PolicyKind};
use std::sync::Mutex;

/// Blocks in memory. See the module docs.
pub struct RamTier {
    index: Mutex<EntryIndex<Vec<u8>>>,
    counters: TierCounters,
}

impl RamTier {
    /// A tier of at most `budget_bytes`, evicting by `policy`.
    pub fn new(budget_bytes: u64, policy: PolicyKind) -> Self {
        Self {
            index: Mutex::new(EntryIndex::new(budget_bytes, policy)),
            counters: TierCounters::default(),
        }
    }

    fn index(&self) -> std::sync::MutexGuard<'_, EntryIndex<Vec<u8>>> {
        // A panic while holding the lock cannot leave the index half-updated in a way that
        // matters more than losing the tier; keep serving.
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Tier for RamTier {
    fn name(&self) -> &'static str {
        "ram"
    }

    fn get(&self, key: &TierKey) -> Result<Option<Vec<u8>>, TierError> {
        Ok(self.index().get(key).cloned())
    }

    fn put(&self, key: &TierKey, value: &[u8]) -> Result<(), TierError> {
        let evicted = self
            .index()
            .insert(*key, value.len() as u64, value.to_vec())
            .map_err(|_| TierError::Config("block larger than the RAM tier".into()))?;
        TierCounters::add(&self.counters.evictions, evicted.len() as u64);
        Ok(())
    }

    fn contains(&self, key: &TierKey) -> Result<bool, TierError> {
        Ok(self.index().contains(key))
    }

    fn delete(&self, key: &TierKey) -> Result<(), TierError> {
        self.index().remove(key);
        Ok(())
    }

    fn clear(&self, model: Option<&ModelFingerprint>) -> Result<u64, TierError> {
        let gone = self
            .index()
            .remove_where(|k, _| model.is_none_or(|m| k.fingerprint == *m));
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
