//! The wire form of a block, the same on every tier:
//!
//! ```text
//! off  size  field
//!   0     4  magic "KVBK"
//!   4     2  format version (1)
//!   6     2  header length in bytes (everything before the payload)
//!   8    32  model fingerprint
//!  40     2  layer group
//!  42     1  KV dtype (0 f16, 1 q8_0, 2 q4_0, 3 q4)
//!  43     1  codec (see codec::Codec::id)
//!  44    16  block hash
//!  60     8  shape: n_layers, n_kv_heads, head_dim, block_size (u16 each)
//!  68     2  token count, then 2 reserved (0)
//!  72     4  payload length, uncompressed
//!  76     4  payload length, stored
//!  80  4*n   token ids (u32)
//!   .     4  crc32c of every header byte before it, then of the stored payload
//!   .     .  payload (stored form)
//! ```
//! All integers little-endian. [`decode`] checks every field against what the reader expects
//! and the checksum; any difference is an error, and the block is treated as a miss.

use crate::codec::Codec;
use crate::TierKey;
use kvinfer_cache::{BlockHash, ModelFingerprint};

/// Magic at offset 0.
pub const MAGIC: [u8; 4] = *b"KVBK";
/// Current format version.
pub const VERSION: u16 = 1;
const FIXED: usize = 80;

/// What a block must look like to be used: the reader's model, group, dtype and shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSpec {
    /// The model's KV identity.
    pub fingerprint: ModelFingerprint,
    /// Layer group.
    pub group: u16,
    /// KV dtype id ([`kvinfer_cache::KvDtype::id`]: 0 f16, 1 q8_0, 2 q4_0, 3 q4).
    pub dtype: u8,
    /// Layers in the group.
    pub n_layers: u16,
    /// KV heads per layer.
    pub n_kv_heads: u16,
    /// Values per head.
    pub head_dim: u16,
    /// Tokens per block.
    pub block_size: u16,
}

impl BlockSpec {
    /// Payload bytes of one block: K and V rows of every layer and head in the dtype
    /// (0 for an unknown dtype id).
    pub fn payload_bytes(&self) -> usize {
        let Some(dtype) = kvinfer_cache::KvDtype::from_id(self.dtype) else {
            return 0;
        };
        self.n_layers as usize
            * 2
            * self.n_kv_heads as usize
            * self.block_size as usize
            * dtype.row_bytes(self.head_dim as usize)
    }

    /// Bytes of one block on a tier when stored as is (header with its token ids, then the
    /// payload): what a reader plans its round trips by. A compressed block is smaller; an
    /// incompressible one may exceed it by the codec's framing (a fraction of a percent).
    pub fn wire_bytes(&self) -> usize {
        FIXED + 4 * self.block_size as usize + 4 + self.payload_bytes()
    }

    /// The same blocks of layer group `group`.
    pub fn in_group(&self, group: u16) -> BlockSpec {
        BlockSpec { group, ..*self }
    }

    /// The tier key of `hash` under this spec.
    pub fn key(&self, hash: BlockHash) -> TierKey {
        TierKey {
            fingerprint: self.fingerprint,
            group: self.group,
            hash,
        }
    }
}

/// Why a stored block was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Shorter than its header says.
    #[error("truncated block")]
    Truncated,
    /// Not a block (magic).
    #[error("bad magic")]
    Magic,
    /// Another format version.
    #[error("format version {0} (this build reads {VERSION})")]
    Version(u16),
    /// A header field differs from what the reader expects.
    #[error("{0} does not match")]
    Mismatch(&'static str),
    /// The checksum does not match the bytes.
    #[error("checksum mismatch")]
    Checksum,
    /// The payload does not decompress to one block.
    #[error("payload does not decode")]
    Payload,
}

/// Encodes one block: `tokens` are its token ids, `raw` its payload (exactly one block).
pub fn encode(
    spec: &BlockSpec,
    hash: &BlockHash,
    tokens: &[u32],
    raw: &[u8],
    codec: Codec,
) -> Vec<u8> {
    debug_assert_eq!(raw.len(), spec.payload_bytes(), "payload is one block");
    let stored = codec.encode(raw);
    let header_len = FIXED + 4 * tokens.len() + 4;
    let mut out = Vec::with_capacity(header_len + stored.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(header_len as u16).to_le_bytes());
    out.extend_from_slice(&spec.fingerprint.0);
    out.extend_from_slice(&spec.group.to_le_bytes());
    out.push(spec.dtype);
    out.push(codec.id());
    out.extend_from_slice(&hash.0);
    for v in [
        spec.n_layers,
        spec.n_kv_heads,
        spec.head_dim,
        spec.block_size,
    ] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&(tokens.len() as u16).to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(raw.len() as u32).to_le_bytes());
    out.extend_from_slice(&(stored.len() as u32).to_le_bytes());
    for t in tokens {
        out.extend_from_slice(&t.to_le_bytes());
    }
    let crc = crc32c::crc32c_append(crc32c::crc32c(&out), &stored);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&stored);
    out
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

/// Checks a stored block against the reader's `spec`, the `hash` it asked for and the `tokens`
/// that block must hold, and returns its payload (one block, decompressed).
pub fn decode(
    spec: &BlockSpec,
    hash: &BlockHash,
    tokens: &[u32],
    bytes: &[u8],
) -> Result<Vec<u8>, WireError> {
    if bytes.len() < FIXED + 4 {
        return Err(WireError::Truncated);
    }
    if bytes[..4] != MAGIC {
        return Err(WireError::Magic);
    }
    let version = u16_at(bytes, 4);
    if version != VERSION {
        return Err(WireError::Version(version));
    }
    let header_len = u16_at(bytes, 6) as usize;
    let n_tokens = u16_at(bytes, 68) as usize;
    if header_len != FIXED + 4 * n_tokens + 4 || bytes.len() < header_len {
        return Err(WireError::Truncated);
    }
    let stored_len = u32_at(bytes, 76) as usize;
    if bytes.len() != header_len + stored_len {
        return Err(WireError::Truncated);
    }
    let crc_at = header_len - 4;
    let crc = crc32c::crc32c_append(crc32c::crc32c(&bytes[..crc_at]), &bytes[header_len..]);
    if crc != u32_at(bytes, crc_at) {
        return Err(WireError::Checksum);
    }
    if bytes[8..40] != spec.fingerprint.0 {
        return Err(WireError::Mismatch("model fingerprint"));
    }
    if u16_at(bytes, 40) != spec.group {
        return Err(WireError::Mismatch("layer group"));
    }
    if bytes[42] != spec.dtype {
        return Err(WireError::Mismatch("KV dtype"));
    }
    if bytes[44..60] != hash.0 {
        return Err(WireError::Mismatch("block hash"));
    }
    let shape = [
        spec.n_layers,
        spec.n_kv_heads,
        spec.head_dim,
        spec.block_size,
    ];
    if (0..4).any(|i| u16_at(bytes, 60 + 2 * i) != shape[i]) {
        return Err(WireError::Mismatch("block shape"));
    }
    if n_tokens != tokens.len() || (0..n_tokens).any(|i| u32_at(bytes, FIXED + 4 * i) != tokens[i])
    {
        return Err(WireError::Mismatch("token ids"));
    }
    let raw_len = u32_at(bytes, 72) as usize;
    if raw_len != spec.payload_bytes() {
        return Err(WireError::Mismatch("payload length"));
    }
    let codec = Codec::from_id(bytes[43]).ok_or(WireError::Mismatch("codec"))?;
    codec
        .decode(&bytes[header_len..], raw_len)
        .ok_or(WireError::Payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn spec() -> BlockSpec {
        BlockSpec {
            fingerprint: ModelFingerprint([5; 32]),
            group: 0,
            dtype: 0,
            n_layers: 2,
            n_kv_heads: 1,
            head_dim: 4,
            block_size: 2,
        }
    }

    #[test]
    fn each_dtype_has_its_own_payload_size_and_is_checked() {
        let hd = 64u16;
        let h = BlockHash([3; 16]);
        for d in kvinfer_cache::KvDtype::ALL {
            let s = BlockSpec {
                dtype: d.id(),
                head_dim: hd,
                ..spec()
            };
            let want = 2 * 2 * s.n_kv_heads as usize * s.block_size as usize * d.row_bytes(64);
            assert_eq!(s.payload_bytes(), want, "{d}");
            let raw = vec![7u8; want];
            let b = encode(&s, &h, &[1, 2], &raw, Codec::None);
            assert_eq!(b.len(), s.wire_bytes(), "{d}");
            assert_eq!(decode(&s, &h, &[1, 2], &b).unwrap(), raw, "{d}");
            // Read back under any other dtype: refused.
            for other in kvinfer_cache::KvDtype::ALL.into_iter().filter(|&o| o != d) {
                let t = BlockSpec {
                    dtype: other.id(),
                    ..s
                };
                assert_eq!(
                    decode(&t, &h, &[1, 2], &b),
                    Err(WireError::Mismatch("KV dtype")),
                    "{d} read as {other}"
                );
            }
        }
        assert_eq!(BlockSpec { dtype: 9, ..spec() }.payload_bytes(), 0);
    }

    #[test]
    fn round_trip_and_every_kind_of_damage_is_refused() {
        let s = spec();
        let h = BlockHash([7; 16]);
        let raw: Vec<u8> = (0..s.payload_bytes() as u8).collect();
        for codec in Codec::ALL {
            let b = encode(&s, &h, &[1, 2], &raw, codec);
            assert_eq!(decode(&s, &h, &[1, 2], &b).unwrap(), raw, "{codec}");
            // Every single-bit flip anywhere is caught.
            for i in 0..b.len() {
                let mut bad = b.clone();
                bad[i] ^= 0x10;
                assert!(
                    decode(&s, &h, &[1, 2], &bad).is_err(),
                    "{codec}: flip at {i}"
                );
            }
            // Every truncation is caught.
            for len in 0..b.len() {
                assert!(
                    decode(&s, &h, &[1, 2], &b[..len]).is_err(),
                    "{codec}: cut at {len}"
                );
            }
        }
        let b = encode(&s, &h, &[1, 2], &raw, Codec::None);
        let other = BlockSpec {
            fingerprint: ModelFingerprint([6; 32]),
            ..s
        };
        assert_eq!(
            decode(&other, &h, &[1, 2], &b),
            Err(WireError::Mismatch("model fingerprint"))
        );
        assert_eq!(
            decode(&BlockSpec { group: 1, ..s }, &h, &[1, 2], &b),
            Err(WireError::Mismatch("layer group"))
        );
        assert_eq!(
            decode(&BlockSpec { dtype: 1, ..s }, &h, &[1, 2], &b),
            Err(WireError::Mismatch("KV dtype"))
        );
        assert_eq!(
            decode(&s, &BlockHash([8; 16]), &[1, 2], &b),
            Err(WireError::Mismatch("block hash"))
        );
        assert_eq!(
            decode(&s, &h, &[1, 3], &b),
            Err(WireError::Mismatch("token ids"))
        );
        // Another version, with a valid checksum, is still refused.
        let mut v2 = b.clone();
        v2[4] = 2;
        let hl = u16_at(&v2, 6) as usize;
        let crc = crc32c::crc32c_append(crc32c::crc32c(&v2[..hl - 4]), &v2[hl..]);
        v2[hl - 4..hl].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(decode(&s, &h, &[1, 2], &v2), Err(WireError::Version(2)));
    }
}
