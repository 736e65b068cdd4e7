//! The KV cache core of kvinfer: pure and synchronous (no threads, no I/O, no tensor library).
//!
//! - [`ids`]: `BlockId`, `SeqId`, `BlockHash` (chained blake3 from a `ModelFingerprint`).
//! - [`policy`]: eviction policies behind one trait, chosen by `PolicyKind`.
//! - [`simulate`]: the offline policy simulator over request traces, with Belady's optimum.
#![deny(missing_docs)]

mod contiguous;
pub mod ids;
pub mod policy;
pub mod simulate;

pub use contiguous::KvCache;
pub use ids::{BlockHash, BlockId, ModelFingerprint, SeqId, TokenId};
pub use policy::{new_policy, EvictionPolicy, PolicyKind};
