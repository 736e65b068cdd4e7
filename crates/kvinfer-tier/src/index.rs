//! The entry index the RAM and disk tiers share: key -> slot, sizes against a byte budget, and
//! eviction by one of kvinfer-cache's policies (slots stand in for block ids).

use crate::TierKey;
use kvinfer_cache::{new_policy, BlockId, EvictionPolicy, PolicyKind};
use std::collections::HashMap;

struct Entry<V> {
    key: TierKey,
    bytes: u64,
    value: V,
}

/// Entries of one tier. `V` is what the tier keeps per entry (RAM: the bytes; disk: the time
/// it was written).
///
/// # Invariants
/// `map[k] == s` iff `slots[s]` holds `k`; `bytes` is the sum of the entries' sizes and stays
/// within `budget`; the policy knows exactly the occupied slots.
pub(crate) struct EntryIndex<V> {
    slots: Vec<Option<Entry<V>>>,
    free: Vec<u32>,
    map: HashMap<TierKey, u32>,
    policy: Box<dyn EvictionPolicy>,
    bytes: u64,
    budget: u64,
}

impl<V> EntryIndex<V> {
    /// An empty index of at most `budget` bytes, evicting by `policy`.
    pub fn new(budget: u64, policy: PolicyKind) -> Self {
        Self {
            slots: Vec::new(),
            free: Vec::new(),
            map: HashMap::new(),
            policy: new_policy(policy, 1024, 0x5eed),
            bytes: 0,
            budget,
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn contains(&self, key: &TierKey) -> bool {
        self.map.contains_key(key)
    }

    /// The entry's value, and the policy hears of the hit.
    pub fn get(&mut self, key: &TierKey) -> Option<&V> {
        let s = *self.map.get(key)?;
        self.policy.access(BlockId(s));
        self.slots[s as usize].as_ref().map(|e| &e.value)
    }

    /// Inserts (or replaces) `key`, evicting by policy until it fits. Returns the evicted
    /// entries; `Err(value)` (nothing changed) when one entry alone exceeds the budget.
    pub fn insert(&mut self, key: TierKey, bytes: u64, value: V) -> Result<Vec<(TierKey, V)>, V> {
        if bytes > self.budget {
            return Err(value);
        }
        let mut evicted = Vec::new();
        if let Some(old) = self.remove(&key) {
            drop(old);
        }
        while self.bytes + bytes > self.budget {
            let Some(s) = self.policy.evict() else { break };
            if let Some(e) = self.take_slot(s.0) {
                evicted.push((e.key, e.value));
            }
        }
        let s = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(None);
                (self.slots.len() - 1) as u32
            }
        };
        self.slots[s as usize] = Some(Entry { key, bytes, value });
        self.map.insert(key, s);
        self.bytes += bytes;
        let mut k = [0u8; 8];
        k.copy_from_slice(&key.hash.0[..8]);
        self.policy.insert(BlockId(s), u64::from_le_bytes(k));
        Ok(evicted)
    }

    fn take_slot(&mut self, s: u32) -> Option<Entry<V>> {
        let e = self.slots.get_mut(s as usize)?.take()?;
        self.map.remove(&e.key);
        self.bytes -= e.bytes;
        self.free.push(s);
        Some(e)
    }

    /// Removes `key`; its value if it was there.
    pub fn remove(&mut self, key: &TierKey) -> Option<V> {
        let s = self.map.get(key).copied()?;
        self.policy.remove(BlockId(s));
        self.take_slot(s).map(|e| e.value)
    }

    /// Removes every entry for which `pred` holds; returns them.
    pub fn remove_where(&mut self, mut pred: impl FnMut(&TierKey, &V) -> bool) -> Vec<TierKey> {
        let keys: Vec<TierKey> = self
            .slots
            .iter()
            .flatten()
            .filter(|e| pred(&e.key, &e.value))
            .map(|e| e.key)
            .collect();
        for k in &keys {
            self.remove(k);
        }
        keys
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvinfer_cache::{BlockHash, ModelFingerprint};

    fn key(i: u8) -> TierKey {
        TierKey {
            fingerprint: ModelFingerprint([1; 32]),
            group: 0,
            hash: BlockHash([i; 16]),
        }
    }

    #[test]
    fn stays_in_budget_evicting_the_least_recently_used() {
        let mut ix: EntryIndex<u8> = EntryIndex::new(30, PolicyKind::Lru);
        for i in 0..3 {
            assert!(ix.insert(key(i), 10, i).unwrap().is_empty());
        }
        assert_eq!(ix.get(&key(0)), Some(&0)); // 1 is now the least recent
        let ev = ix.insert(key(3), 10, 3).unwrap();
        assert_eq!(ev, vec![(key(1), 1)]);
        assert_eq!((ix.len(), ix.bytes()), (3, 30));
        assert!(ix.insert(key(9), 31, 9).is_err(), "larger than the budget");
        assert_eq!(ix.remove(&key(0)), Some(0));
        assert_eq!(ix.bytes(), 20);
        // Replacing a key does not count it twice.
        ix.insert(key(2), 5, 22).unwrap();
        assert_eq!((ix.len(), ix.bytes()), (2, 15));
        assert_eq!(ix.remove_where(|_, v| *v == 22), vec![key(2)]);
    }
}
