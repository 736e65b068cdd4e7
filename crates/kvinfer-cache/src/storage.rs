//! The bytes of the KV cache: one preallocated arena of f16 values, addressed by [`BlockId`].
//!
//! Layout, block-major, so one block is one contiguous run (a copy-on-write is one `memcpy`, and a
//! tier stores a block as one slice):
//! ```text
//! data: [block][layer][K|V][kv_head][slot][head_dim]   f16
//!                                   ^^^^^^^^^^^^^^^^ one head's rows of one block: contiguous,
//!                                                    what attention reads for 16 positions
//! ```
//! Position `p` of a sequence lives in block `table[p / block_size]`, slot `p % block_size`.
//! The arena is allocated zeroed up front (`calloc`), so the OS backs pages only as blocks are
//! first written: a large `--kv-cache-mb` costs address space, not memory, until used.

use crate::ids::BlockId;
use half::f16;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};

/// Shape of the arena.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    /// Transformer layers.
    pub n_layers: usize,
    /// Key/value heads per layer.
    pub n_kv_heads: usize,
    /// Values per head.
    pub head_dim: usize,
    /// Token slots per block.
    pub block_size: usize,
    /// Blocks in the arena.
    pub num_blocks: usize,
}

impl KvLayout {
    /// f16 values per (layer, K or V) of one block: `n_kv_heads * block_size * head_dim`.
    fn half_elems(&self) -> usize {
        self.n_kv_heads * self.block_size * self.head_dim
    }

    /// f16 values per block, all layers, K and V.
    pub fn block_elems(&self) -> usize {
        self.n_layers * 2 * self.half_elems()
    }

    /// Bytes per block.
    pub fn block_bytes(&self) -> usize {
        self.block_elems() * std::mem::size_of::<f16>()
    }

    /// Values per position per layer for K (and again for V): `n_kv_heads * head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// How many blocks fit in `bytes`.
    pub fn blocks_in(&self, bytes: usize) -> usize {
        bytes / self.block_bytes().max(1)
    }
}

/// The K/V arena. See the module docs for the layout.
///
/// # Invariants
/// `data.len() == layout.num_blocks * layout.block_elems()`.
pub struct KvStorage {
    layout: KvLayout,
    /// f16 bit patterns (u16 so the arena can be allocated zeroed and lazily backed).
    data: Vec<u16>,
}

impl std::fmt::Debug for KvStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvStorage")
            .field("layout", &self.layout)
            .finish()
    }
}

impl KvStorage {
    /// A zeroed arena of `layout.num_blocks` blocks.
    pub fn new(layout: KvLayout) -> Self {
        Self {
            layout,
            data: vec![0u16; layout.num_blocks * layout.block_elems()],
        }
    }

    /// The arena's shape.
    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }

    /// Bytes of the arena (allocated, not necessarily touched).
    pub fn bytes(&self) -> usize {
        self.data.len() * 2
    }

    fn offset(&self, block: BlockId, layer: usize, v: bool, head: usize) -> usize {
        let l = &self.layout;
        debug_assert!(
            block.index() < l.num_blocks,
            "block {block:?} outside the arena"
        );
        debug_assert!(
            layer < l.n_layers && head < l.n_kv_heads,
            "layer/head out of range"
        );
        block.index() * l.block_elems()
            + (layer * 2 + v as usize) * l.half_elems()
            + head * l.block_size * l.head_dim
    }

    /// Keys of `head` in `layer` for the block's slots: `[block_size][head_dim]`.
    #[inline]
    pub fn keys(&self, block: BlockId, layer: usize, head: usize) -> &[f16] {
        let o = self.offset(block, layer, false, head);
        let n = self.layout.block_size * self.layout.head_dim;
        self.data[o..o + n].reinterpret_cast()
    }

    /// Values of `head` in `layer` for the block's slots: `[block_size][head_dim]`.
    #[inline]
    pub fn values(&self, block: BlockId, layer: usize, head: usize) -> &[f16] {
        let o = self.offset(block, layer, true, head);
        let n = self.layout.block_size * self.layout.head_dim;
        self.data[o..o + n].reinterpret_cast()
    }

    /// Writes one position's K and V rows of `layer` (`[n_kv_heads][head_dim]` f32 each) into
    /// `slot` of `block`, rounding to f16.
    pub fn write(&mut self, block: BlockId, slot: usize, layer: usize, k: &[f32], v: &[f32]) {
        let (hd, bs) = (self.layout.head_dim, self.layout.block_size);
        debug_assert!(slot < bs, "slot {slot} outside a block of {bs}");
        debug_assert!(
            k.len() == self.layout.kv_dim() && v.len() == k.len(),
            "bad KV row"
        );
        for (row, is_v) in [(k, false), (v, true)] {
            for (h, src) in row.chunks_exact(hd).enumerate() {
                let o = self.offset(block, layer, is_v, h) + slot * hd;
                let dst: &mut [f16] = self.data[o..o + hd].reinterpret_cast_mut();
                dst.convert_from_f32_slice(src);
            }
        }
    }

    /// Copies block `src` into `dst` (copy-on-write of a shared partial block).
    pub fn copy_block(&mut self, src: BlockId, dst: BlockId) {
        let n = self.layout.block_elems();
        let (s, d) = (src.index() * n, dst.index() * n);
        self.data.copy_within(s..s + n, d);
    }

    /// One block's content as bytes (f16 little-endian, the layout above): what a tier stores.
    pub fn block_bytes(&self, block: BlockId) -> &[u8] {
        bytemuck::cast_slice(self.block_data(block))
    }

    /// Overwrites one block with `bytes` (from [`Self::block_bytes`] of a block of this layout).
    pub fn set_block_bytes(&mut self, block: BlockId, bytes: &[u8]) {
        let n = self.layout.block_elems();
        assert_eq!(
            bytes.len(),
            n * 2,
            "a block of this layout is {} bytes",
            n * 2
        );
        let dst = &mut self.data[block.index() * n..(block.index() + 1) * n];
        bytemuck::cast_slice_mut::<u16, u8>(dst).copy_from_slice(bytes);
    }

    /// One block's bytes, as stored (for tiers and tests).
    pub fn block_data(&self, block: BlockId) -> &[u16] {
        let n = self.layout.block_elems();
        &self.data[block.index() * n..(block.index() + 1) * n]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> KvLayout {
        KvLayout {
            n_layers: 2,
            n_kv_heads: 2,
            head_dim: 4,
            block_size: 3,
            num_blocks: 4,
        }
    }

    #[test]
    fn write_then_read_by_head_and_copy() {
        let mut s = KvStorage::new(layout());
        assert_eq!(s.bytes(), 4 * 2 * 2 * 2 * 3 * 4 * 2);
        let k: Vec<f32> = (0..8).map(|i| i as f32).collect();
        let v: Vec<f32> = (0..8).map(|i| -(i as f32)).collect();
        s.write(BlockId(2), 1, 1, &k, &v);
        // head 1 of K: slot 1 holds k[4..8].
        let kh = s.keys(BlockId(2), 1, 1);
        assert_eq!(kh.len(), 12);
        assert_eq!(kh[4].to_f32(), 4.0);
        assert_eq!(kh[7].to_f32(), 7.0);
        assert_eq!(s.values(BlockId(2), 1, 0)[4].to_f32(), -0.0);
        assert_eq!(s.values(BlockId(2), 1, 0)[5].to_f32(), -1.0);
        // Other layers and blocks untouched.
        assert!(s.keys(BlockId(2), 0, 1).iter().all(|x| x.to_f32() == 0.0));
        assert!(s.block_data(BlockId(1)).iter().all(|&x| x == 0));
        s.copy_block(BlockId(2), BlockId(0));
        assert_eq!(s.block_data(BlockId(0)), s.block_data(BlockId(2)));
        let bytes = s.block_bytes(BlockId(2)).to_vec();
        s.set_block_bytes(BlockId(3), &bytes);
        assert_eq!(s.block_data(BlockId(3)), s.block_data(BlockId(2)));
        assert_eq!(s.keys(BlockId(3), 1, 1)[7].to_f32(), 7.0);
    }
}
