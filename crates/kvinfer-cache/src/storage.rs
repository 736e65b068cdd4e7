//! The bytes of the KV cache: one preallocated arena, addressed by [`BlockId`].
//!
//! Layout, block-major, so one block is one contiguous run (a copy-on-write is one `memcpy`, and a
//! tier stores a block as one slice):
//! ```text
//! data: [block][layer][K|V][kv_head][slot][row]   row = head_dim values in the KV dtype
//!                                   ^^^^^^^^^^^ one head's rows of one block: contiguous,
//!                                               what attention reads for 16 positions
//! f16 keys only: [block][layer][K][kv_head][dim][slot]   (transposed within the block)
//! ```
//! A row is `head_dim` f16 values, or ggml's `block_q8_0` / `block_q4_0` runs (an f16 scale and
//! 32 quants per 32 values) for the quantized dtypes: each position's row is quantized on its
//! own, so a block's bytes depend only on its own tokens (prefix hits and batching stay exact).
//! f16 keys are stored transposed within each (block, layer, head): dimension-major, so the
//! attention's score kernel reads 16 keys' value of one dimension as one vector, each key's
//! score one FMA chain over the dimensions, without transposing keys on every read. The same
//! bytes, in another order; still only the block's own tokens.
//! Position `p` of a sequence lives in block `table[p / block_size]`, slot `p % block_size`.
//! The arena is allocated zeroed up front (`calloc`), so the OS backs pages only as blocks are
//! first written: a large `--kv-cache-mb` costs address space, not memory, until used.

use crate::ids::BlockId;
use half::f16;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};

/// How K and V rows are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum KvDtype {
    /// f16 values (the default; what llama.cpp stores by default).
    #[default]
    F16,
    /// ggml's q8_0: per 32 values one f16 scale and 32 int8 (34 bytes).
    Q8_0,
    /// ggml's q4_0: per 32 values one f16 scale and 32 4-bit quants (18 bytes).
    Q4_0,
    /// q4_0 after an orthonormal Hadamard rotation of each head's K and V rows (queries are
    /// rotated the same way and the attention output rotated back): outliers are spread over
    /// the head, so 4 bits lose less.
    Q4,
}

impl KvDtype {
    /// Every dtype, in flag order.
    pub const ALL: [KvDtype; 4] = [KvDtype::F16, KvDtype::Q8_0, KvDtype::Q4_0, KvDtype::Q4];

    /// The flag name (`f16`, `q8_0`, `q4_0`, `q4`).
    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F16 => "f16",
            KvDtype::Q8_0 => "q8_0",
            KvDtype::Q4_0 => "q4_0",
            KvDtype::Q4 => "q4",
        }
    }

    /// The id in the tier wire format and the fingerprint.
    pub fn id(self) -> u8 {
        match self {
            KvDtype::F16 => 0,
            KvDtype::Q8_0 => 1,
            KvDtype::Q4_0 => 2,
            KvDtype::Q4 => 3,
        }
    }

    /// The dtype of an id ([`Self::id`]).
    pub fn from_id(id: u8) -> Option<Self> {
        KvDtype::ALL.into_iter().find(|d| d.id() == id)
    }

    /// Bytes of one row of `head_dim` values (quantized dtypes need `head_dim % 32 == 0`).
    pub fn row_bytes(self, head_dim: usize) -> usize {
        match self {
            KvDtype::F16 => head_dim * 2,
            KvDtype::Q8_0 => head_dim / 32 * 34,
            KvDtype::Q4_0 | KvDtype::Q4 => head_dim / 32 * 18,
        }
    }

    /// Rows are Hadamard-rotated.
    pub fn rotated(self) -> bool {
        self == KvDtype::Q4
    }

    /// Whether this dtype can store heads of `head_dim` values (and why not).
    pub fn check_head_dim(self, head_dim: usize) -> Result<(), String> {
        match self {
            KvDtype::F16 => Ok(()),
            _ if !head_dim.is_multiple_of(32) => Err(format!(
                "--kv-dtype {} needs a head size that is a multiple of 32; this model's is {head_dim}",
                self.name()
            )),
            KvDtype::Q4 if !head_dim.is_power_of_two() => Err(format!(
                "--kv-dtype q4 rotates heads with a Hadamard transform, which needs a power-of-two \
                 head size; this model's is {head_dim} (use q4_0)"
            )),
            _ => Ok(()),
        }
    }
}

impl std::fmt::Display for KvDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for KvDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        KvDtype::ALL
            .into_iter()
            .find(|d| d.name() == s)
            .ok_or_else(|| format!("unknown KV dtype {s:?}; use f16, q8_0, q4_0 or q4"))
    }
}

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
    /// How rows are stored.
    pub dtype: KvDtype,
}

impl KvLayout {
    /// Bytes of one head's row at one position.
    pub fn row_bytes(&self) -> usize {
        self.dtype.row_bytes(self.head_dim)
    }

    /// 16-bit units per (layer, K or V) of one block: `n_kv_heads * block_size * row`.
    fn half_units(&self) -> usize {
        self.n_kv_heads * self.block_size * self.row_bytes() / 2
    }

    /// 16-bit units per block, all layers, K and V.
    fn block_units(&self) -> usize {
        self.n_layers * 2 * self.half_units()
    }

    /// Bytes per block.
    pub fn block_bytes(&self) -> usize {
        self.block_units() * 2
    }

    /// KV bytes per token (all layers, K and V).
    pub fn token_bytes(&self) -> usize {
        self.n_layers * 2 * self.n_kv_heads * self.row_bytes()
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
/// `data.len() * 2 == layout.num_blocks * layout.block_bytes()`; every row is an even number of
/// bytes, so rows start 2-aligned.
pub struct KvStorage {
    layout: KvLayout,
    /// 16-bit units (u16 so the arena can be allocated zeroed and lazily backed, and f16 rows
    /// can be read in place).
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
            data: vec![0u16; layout.num_blocks * layout.block_units()],
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

    /// Offset in units of a head's rows.
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
        block.index() * l.block_units()
            + (layer * 2 + v as usize) * l.half_units()
            + head * l.block_size * l.row_bytes() / 2
    }

    /// f16 keys of `head` in `layer` for the block's slots, transposed: `[head_dim][block_size]`
    /// (dtype f16; see the module docs).
    #[inline]
    pub fn keys(&self, block: BlockId, layer: usize, head: usize) -> &[f16] {
        debug_assert_eq!(self.layout.dtype, KvDtype::F16);
        self.rows(block, layer, false, head).reinterpret_cast()
    }

    /// f16 values of `head` in `layer` for the block's slots: `[block_size][head_dim]` (dtype f16).
    #[inline]
    pub fn values(&self, block: BlockId, layer: usize, head: usize) -> &[f16] {
        debug_assert_eq!(self.layout.dtype, KvDtype::F16);
        self.rows(block, layer, true, head).reinterpret_cast()
    }

    /// The stored rows (any dtype) of `head`'s keys (`v` false) or values in `layer`:
    /// `block_size` rows of [`KvLayout::row_bytes`], as 16-bit units.
    #[inline]
    pub fn rows(&self, block: BlockId, layer: usize, v: bool, head: usize) -> &[u16] {
        let o = self.offset(block, layer, v, head);
        let n = self.layout.block_size * self.layout.row_bytes() / 2;
        &self.data[o..o + n]
    }

    /// As [`Self::rows`], as bytes.
    #[inline]
    pub fn rows_bytes(&self, block: BlockId, layer: usize, v: bool, head: usize) -> &[u8] {
        bytemuck::cast_slice(self.rows(block, layer, v, head))
    }

    /// Writes one position's K and V rows of `layer` (`[n_kv_heads][head_dim]` f32 each) into
    /// `slot` of `block`: rounded to f16, or quantized with `quantize(row, out_bytes)` for the
    /// quantized dtypes (the model's kernels own quantization; rotation is done by the caller).
    pub fn write_with(
        &mut self,
        block: BlockId,
        slot: usize,
        layer: usize,
        k: &[f32],
        v: &[f32],
        quantize: impl Fn(&[f32], &mut [u8]),
    ) {
        let (hd, bs) = (self.layout.head_dim, self.layout.block_size);
        let rb = self.layout.row_bytes();
        debug_assert!(slot < bs, "slot {slot} outside a block of {bs}");
        debug_assert!(
            k.len() == self.layout.kv_dim() && v.len() == k.len(),
            "bad KV row"
        );
        let f16 = self.layout.dtype == KvDtype::F16;
        let mut half = vec![f16::ZERO; if f16 { hd } else { 0 }];
        for (row, is_v) in [(k, false), (v, true)] {
            for (h, src) in row.chunks_exact(hd).enumerate() {
                if f16 && !is_v {
                    // Transposed: dimension d of this slot at d * block_size + slot.
                    half.convert_from_f32_slice(src);
                    let o = self.offset(block, layer, false, h) + slot;
                    for (d, x) in half.iter().enumerate() {
                        self.data[o + d * bs] = x.to_bits();
                    }
                    continue;
                }
                let o = self.offset(block, layer, is_v, h) + slot * rb / 2;
                let dst = &mut self.data[o..o + rb / 2];
                if f16 {
                    let dst: &mut [f16] = dst.reinterpret_cast_mut();
                    dst.convert_from_f32_slice(src);
                } else {
                    quantize(src, bytemuck::cast_slice_mut(dst));
                }
            }
        }
    }

    /// Writes one position's K and V rows of `layer` (`[n_kv_heads][head_dim]` f32 each) into
    /// `slot` of `block`, rounding to f16 (dtype f16).
    pub fn write(&mut self, block: BlockId, slot: usize, layer: usize, k: &[f32], v: &[f32]) {
        assert_eq!(self.layout.dtype, KvDtype::F16, "write() stores f16 rows");
        self.write_with(block, slot, layer, k, v, |_, _| {});
    }

    /// Copies block `src` into `dst` (copy-on-write of a shared partial block).
    pub fn copy_block(&mut self, src: BlockId, dst: BlockId) {
        let n = self.layout.block_units();
        let (s, d) = (src.index() * n, dst.index() * n);
        self.data.copy_within(s..s + n, d);
    }

    /// One block's content as bytes (the layout above, little-endian): what a tier stores.
    pub fn block_bytes(&self, block: BlockId) -> &[u8] {
        bytemuck::cast_slice(self.block_data(block))
    }

    /// Overwrites one block with `bytes` (from [`Self::block_bytes`] of a block of this layout).
    pub fn set_block_bytes(&mut self, block: BlockId, bytes: &[u8]) {
        let n = self.layout.block_units();
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
        let n = self.layout.block_units();
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
            dtype: KvDtype::F16,
        }
    }

    #[test]
    fn write_then_read_by_head_and_copy() {
        let mut s = KvStorage::new(layout());
        assert_eq!(s.bytes(), 4 * 2 * 2 * 2 * 3 * 4 * 2);
        let k: Vec<f32> = (0..8).map(|i| i as f32).collect();
        let v: Vec<f32> = (0..8).map(|i| -(i as f32)).collect();
        s.write(BlockId(2), 1, 1, &k, &v);
        // head 1 of K: slot 1 holds k[4..8], transposed ([head_dim 4][block_size 3]).
        let kh = s.keys(BlockId(2), 1, 1);
        assert_eq!(kh.len(), 12);
        let got: Vec<f32> = (0..4).map(|d| kh[d * 3 + 1].to_f32()).collect();
        assert_eq!(got, [4.0, 5.0, 6.0, 7.0]);
        assert!((0..4).all(|d| kh[d * 3].to_f32() == 0.0 && kh[d * 3 + 2].to_f32() == 0.0));
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
        assert_eq!(s.keys(BlockId(3), 1, 1)[3 * 3 + 1].to_f32(), 7.0);
    }
}

#[cfg(test)]
mod dtype_tests {
    use super::*;

    #[test]
    fn quantized_rows_are_placed_like_f16_rows() {
        let layout = KvLayout {
            n_layers: 2,
            n_kv_heads: 2,
            head_dim: 64,
            block_size: 4,
            num_blocks: 3,
            dtype: KvDtype::Q8_0,
        };
        assert_eq!(layout.row_bytes(), 68);
        assert_eq!(layout.block_bytes(), 2 * 2 * 2 * 4 * 68);
        assert_eq!(layout.token_bytes(), 2 * 2 * 2 * 68);
        let mut s = KvStorage::new(layout);
        // A fake quantizer that writes the row's first value into every byte.
        let k: Vec<f32> = (0..128).map(|i| (i / 64) as f32 + 1.0).collect();
        let v: Vec<f32> = (0..128).map(|i| (i / 64) as f32 + 3.0).collect();
        s.write_with(BlockId(1), 2, 1, &k, &v, |row, out| out.fill(row[0] as u8));
        let rows = s.rows_bytes(BlockId(1), 1, false, 1);
        assert_eq!(rows.len(), 4 * 68);
        assert!(rows[2 * 68..3 * 68].iter().all(|&b| b == 2));
        assert!(rows[..2 * 68].iter().all(|&b| b == 0));
        assert!(s.rows_bytes(BlockId(1), 1, true, 0)[2 * 68..3 * 68]
            .iter()
            .all(|&b| b == 3));
        assert!(s
            .rows_bytes(BlockId(1), 0, false, 1)
            .iter()
            .all(|&b| b == 0));
        assert!(s.block_data(BlockId(0)).iter().all(|&b| b == 0));
        for d in KvDtype::ALL {
            assert_eq!(d.name().parse::<KvDtype>(), Ok(d));
        }
        assert!(KvDtype::Q4.check_head_dim(96).is_err());
        assert!(KvDtype::Q4_0.check_head_dim(96).is_ok());
        assert!(KvDtype::Q8_0.check_head_dim(80).is_err());
    }
}
