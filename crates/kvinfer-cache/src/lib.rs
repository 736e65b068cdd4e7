//! The KV cache core of kvinfer.
//!
//! For now one contiguous cache per sequence ([`KvCache`]); the paged block pool, prefix index and
//! eviction policies replace it (see docs/ARCHITECTURE.md). Pure and synchronous: no threads, no I/O.
#![deny(missing_docs)]

mod contiguous;

pub use contiguous::KvCache;
