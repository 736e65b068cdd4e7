//! A contiguous per-sequence KV cache with f16 storage.
//!
//! Layout, per layer, for keys and values alike:
//! ```text
//! k[layer]: [pos][kv_head][head_dim]   f16, pos in 0..len (capacity grows on demand up to max_tokens)
//! ```
//! A forward pass writes rows for positions `len..len + n` in every layer with [`KvCache::write`],
//! then calls [`KvCache::advance`] once: the cache's length moves only after all layers are written.

use half::f16;
use half::slice::HalfFloatSliceExt;

/// Keys and values of one sequence for every layer.
///
/// # Invariants
/// `k[l].len() == v[l].len() >= len * kv_dim` for every layer `l`; `len <= max_tokens`.
#[derive(Debug, Clone)]
pub struct KvCache {
    n_layers: usize,
    /// n_kv_heads * head_dim: f16 values per position per layer, for K (and again for V).
    kv_dim: usize,
    max_tokens: usize,
    len: usize,
    k: Vec<Vec<f16>>,
    v: Vec<Vec<f16>>,
}

impl KvCache {
    /// An empty cache for a model with `n_layers` layers of `kv_dim` values per position, holding at
    /// most `max_tokens` positions. Memory is taken as positions are written, not up front.
    pub fn new(n_layers: usize, kv_dim: usize, max_tokens: usize) -> Self {
        Self {
            n_layers,
            kv_dim,
            max_tokens,
            len: 0,
            k: vec![Vec::new(); n_layers],
            v: vec![Vec::new(); n_layers],
        }
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no position is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Most positions this cache may hold.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Values per position per layer (n_kv_heads * head_dim).
    pub fn kv_dim(&self) -> usize {
        self.kv_dim
    }

    /// Forgets positions from `len` on (e.g. to rewind a chat turn).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Forgets everything.
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Writes K and V rows (`[n][kv_dim]` f32 each) of `layer` for positions `len..len + n`.
    ///
    /// # Panics
    /// If the rows would pass `max_tokens` (callers check [`KvCache::remaining`] first).
    pub fn write(&mut self, layer: usize, k_rows: &[f32], v_rows: &[f32]) {
        assert!(
            k_rows.len() == v_rows.len() && k_rows.len().is_multiple_of(self.kv_dim),
            "bad KV row shape"
        );
        let n = k_rows.len() / self.kv_dim;
        assert!(
            self.len + n <= self.max_tokens,
            "KV cache overflow: caller must check remaining()"
        );
        let start = self.len * self.kv_dim;
        let end = start + k_rows.len();
        for (dst, src) in [(&mut self.k[layer], k_rows), (&mut self.v[layer], v_rows)] {
            if dst.len() < end {
                dst.resize(end, f16::ZERO);
            }
            dst[start..end].convert_from_f32_slice(src);
        }
    }

    /// Marks `n` positions written in every layer as held.
    pub fn advance(&mut self, n: usize) {
        debug_assert!(
            self.k
                .iter()
                .all(|k| k.len() >= (self.len + n) * self.kv_dim),
            "advance before every layer was written"
        );
        self.len += n;
    }

    /// Positions still free.
    pub fn remaining(&self) -> usize {
        self.max_tokens - self.len
    }

    /// Keys of `layer` for positions `0..end`, `[pos][kv_dim]`; `end` may include rows written but
    /// not yet advanced over (the current forward pass's own tokens).
    pub fn keys(&self, layer: usize, end: usize) -> &[f16] {
        &self.k[layer][..end * self.kv_dim]
    }

    /// Values of `layer` for positions `0..end`, like [`KvCache::keys`].
    pub fn values(&self, layer: usize, end: usize) -> &[f16] {
        &self.v[layer][..end * self.kv_dim]
    }

    /// Bytes held for the current length (K and V, all layers).
    pub fn bytes(&self) -> usize {
        self.len * self.kv_dim * 2 * self.n_layers * std::mem::size_of::<f16>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_advance_read() {
        let mut c = KvCache::new(2, 4, 3);
        let k: Vec<f32> = (0..8).map(|i| i as f32).collect();
        let v: Vec<f32> = (0..8).map(|i| -(i as f32)).collect();
        for l in 0..2 {
            c.write(l, &k, &v);
        }
        c.advance(2);
        assert_eq!(c.len(), 2);
        assert_eq!(c.remaining(), 1);
        assert_eq!(c.keys(1, 2)[5].to_f32(), 5.0);
        assert_eq!(c.values(0, 2)[7].to_f32(), -7.0);
        assert_eq!(c.bytes(), 2 * 4 * 2 * 2 * 2);
        c.truncate(1);
        assert_eq!(c.len(), 1);
        c.write(0, &k[..4], &v[..4]);
        assert_eq!(c.keys(0, 2)[4].to_f32(), 0.0);
    }

    #[test]
    #[should_panic(expected = "KV cache overflow")]
    fn overflow_panics_for_callers_that_skip_the_check() {
        let mut c = KvCache::new(1, 2, 1);
        c.write(0, &[0.0; 4], &[0.0; 4]);
    }
}
