//! Typed ids and hashes: a block's index in the pool, a sequence's id, and the content hash that
//! names a block's KV across requests, restarts and machines.

use std::fmt;

/// Index of a block in the pool (and in [`crate::KvStorage`]). Dense: `0..num_blocks`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub u32);

impl BlockId {
    /// The id as an index into per-block arrays.
    #[inline]
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// A sequence (one request, or one of its `n` samples) known to the cache manager.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

/// A token id as the model's vocabulary numbers it.
pub type TokenId = u32;

/// Identity of a model's KV bytes: a digest of the weights (tensor names, types, shapes and sampled
/// content), the KV dtype, the block size and the cache format version. It seeds the root of every
/// block hash chain, so blocks of different models or layouts never share a hash.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ModelFingerprint(pub [u8; 32]);

impl fmt::Debug for ModelFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ModelFingerprint({})", hex(&self.0[..8]))
    }
}

/// 128-bit content hash of a full block: blake3 of (parent hash, the block's token ids, extra keys),
/// the chain rooted in the [`ModelFingerprint`]. Equal hash means equal KV bytes. blake3 is
/// collision-resistant, so a shared tier cannot be poisoned by crafted collisions.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockHash(pub [u8; 16]);

impl fmt::Debug for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlockHash({})", hex(&self.0))
    }
}

impl BlockHash {
    /// The parent of a sequence's first block.
    pub fn root(fingerprint: &ModelFingerprint) -> Self {
        let mut h = blake3::Hasher::new();
        h.update(b"kvinfer-block-root");
        h.update(&fingerprint.0);
        Self::from_digest(h.finalize())
    }

    /// The hash of the block holding `tokens` after the block hashed `parent`; `extra` keys anything
    /// else its KV depends on (empty for plain text; e.g. an adapter or image id later).
    pub fn chain(parent: &BlockHash, tokens: &[TokenId], extra: &[u8]) -> Self {
        let mut h = blake3::Hasher::new();
        h.update(&parent.0);
        h.update(&(tokens.len() as u32).to_le_bytes());
        for t in tokens {
            h.update(&t.to_le_bytes());
        }
        h.update(&(extra.len() as u32).to_le_bytes());
        h.update(extra);
        Self::from_digest(h.finalize())
    }

    fn from_digest(d: blake3::Hash) -> Self {
        let mut out = [0u8; 16];
        out.copy_from_slice(&d.as_bytes()[..16]);
        Self(out)
    }

    /// The low 64 bits, for policies that remember identities they no longer hold (S3-FIFO's ghost
    /// queue).
    pub fn key64(&self) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[..8]);
        u64::from_le_bytes(b)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_depends_on_parent_tokens_and_extra() {
        let a = BlockHash::root(&ModelFingerprint([1; 32]));
        let b = BlockHash::root(&ModelFingerprint([2; 32]));
        assert_ne!(a, b);
        let t = [1, 2, 3];
        assert_eq!(BlockHash::chain(&a, &t, &[]), BlockHash::chain(&a, &t, &[]));
        assert_ne!(BlockHash::chain(&a, &t, &[]), BlockHash::chain(&b, &t, &[]));
        assert_ne!(
            BlockHash::chain(&a, &t, &[]),
            BlockHash::chain(&a, &[1, 2, 4], &[])
        );
        assert_ne!(
            BlockHash::chain(&a, &t, &[]),
            BlockHash::chain(&a, &t, &[0])
        );
        // Length is framed: [1,2] + extra [..] cannot alias [1,2,x].
        assert_ne!(
            BlockHash::chain(&a, &[1, 2], &[3, 0, 0, 0]),
            BlockHash::chain(&a, &t, &[])
        );
    }
}
