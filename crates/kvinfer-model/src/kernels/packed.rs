//! Weights repacked at load into groups of 16 rows, and the matmul that runs on them.
//!
//! A GGUF file stores a matrix row after row. The packed form interleaves 16 rows so that one
//! 512-bit vector (two 256-bit halves on AVX2) holds 4 consecutive weights of each of the 16
//! rows: one `vpdpbusd` against 4 bytes of a token, broadcast, adds to 16 rows' sums at once,
//! and no horizontal sum is ever needed (ik_llama.cpp's `_R4` / `_R8` types rest on the same
//! idea). The bytes are those of the file, reordered: a packed matrix takes the same memory.
//!
//! ```text
//! per group of 16 rows, per 32-weight block b:
//!   quants  4 vectors of 64 bytes (Q8_0: 8); vector c holds, for row i, the file's bytes
//!           qs[4c..4c+4] at 4i..4i+4: low nibbles are weights 4c..4c+4, high nibbles
//!           16+4c..16+4c+4 (Q8_0: vector c holds weights 4c..4c+4, c in 0..8)
//!   Q5_*    first 64 bytes: 8 masks of 64 bits, mask 2c (2c+1) has bit 4i+k set when weight
//!           4c+k (16+4c+k) of row i has its fifth bit
//!   scales  d[16] (and m[16] for Q4_1 / Q5_1) as f16, in arrays of their own
//! ```
//!
//! Numbers: every kernel computes, for row r and token t, over the blocks b in order,
//! `acc = fma(dot_b as f32, d_w * d_y, acc)` with `dot_b` the exact integer dot product of the
//! block's quants (offsets of Q4_0 / Q5_0 applied in integers) with the token's Q8 quants, and
//! for Q4_1 / Q5_1 then `acc = fma(m_w, s_y, acc)` (llama.cpp's order). Integer sums are exact
//! whatever their order and each (row, token) has its own float lane, so the result does not
//! depend on the batch, the tiling, the thread count, or on AVX2 vs AVX-512 ([`dot_reference`]
//! is the same arithmetic in scalar code; the tests compare bit for bit).

use super::quant::{block_32_values, f16_at, Q8Acts, QK};
use super::QMatRef;
use crate::ggml_type::GgmlType;

/// Rows per packed group.
pub const GROUP: usize = 16;

/// A 64-byte aligned chunk (the quant area is a vector of them).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// A weight matrix repacked for the group kernels (see the module doc).
pub struct PackedMat {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    /// `[groups][nb][quant_bytes]`.
    quants: Vec<Line>,
    /// `[groups][nb][16]` f16 bits.
    d: Vec<u16>,
    /// `[groups][nb][16]` f16 bits (Q4_1 / Q5_1), else empty.
    m: Vec<u16>,
}

impl std::fmt::Debug for PackedMat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedMat({:?}, {}x{})", self.ty, self.rows, self.cols)
    }
}

/// The integer offset of a type's quants (`w = d * (q - OFFSET)`), 0 when it has a min or is
/// signed.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) fn offset(ty: GgmlType) -> i32 {
    match ty {
        GgmlType::Q4_0 => 8,
        GgmlType::Q5_0 => 16,
        _ => 0,
    }
}

/// Types with an f16 min per block (`w = d * q + m`).
pub(crate) fn has_min(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1)
}

/// Bytes of one block of one group in the quant area, for the types that pack.
fn quant_bytes(ty: GgmlType) -> Option<usize> {
    match ty {
        GgmlType::Q4_0 | GgmlType::Q4_1 => Some(256),
        GgmlType::Q5_0 | GgmlType::Q5_1 => Some(320),
        GgmlType::Q8_0 => Some(512),
        _ => None,
    }
}

impl PackedMat {
    /// Repacks `w`, or `None` when its type has no packed kernels or its rows are not whole
    /// groups (such matrices keep the row kernels).
    pub fn pack(w: QMatRef) -> Option<PackedMat> {
        Self::pack_with(w, |_| {})
    }

    /// [`Self::pack`], calling `done(bytes)` each time another ~4 MiB of `w.data` has been
    /// copied, with the range of `w.data` no longer needed (the caller can drop those pages).
    pub fn pack_with(
        w: QMatRef,
        mut done: impl FnMut(std::ops::Range<usize>),
    ) -> Option<PackedMat> {
        let qb = quant_bytes(w.ty)?;
        if w.rows == 0 || !w.rows.is_multiple_of(GROUP) || !w.cols.is_multiple_of(QK) {
            return None;
        }
        let row_bytes = w.ty.row_bytes(w.cols)?;
        if w.data.len() < w.rows * row_bytes {
            return None;
        }
        let (groups, nb, bs) = (w.rows / GROUP, w.cols / QK, w.ty.type_size());
        let mut quants = vec![Line([0; 64]); groups * nb * qb / 64];
        let mut d = vec![0u16; groups * nb * GROUP];
        let mut m = if has_min(w.ty) {
            vec![0u16; groups * nb * GROUP]
        } else {
            Vec::new()
        };
        let (nib_at, qh_at) = match w.ty {
            GgmlType::Q4_0 => (2, 0),
            GgmlType::Q4_1 => (4, 0),
            GgmlType::Q5_0 => (6, 2),
            GgmlType::Q5_1 => (8, 4),
            _ => (2, 0), // Q8_0: the quants follow d
        };
        let mut released = 0;
        for g in 0..groups {
            let consumed = g * GROUP * row_bytes;
            if consumed - released >= 4 << 20 {
                done(released..consumed);
                released = consumed;
            }
            for b in 0..nb {
                let at = g * nb + b;
                let out = bytes_mut(&mut quants[at * qb / 64..(at + 1) * qb / 64]);
                for i in 0..GROUP {
                    let blk = &w.data[(g * GROUP + i) * row_bytes + b * bs..][..bs];
                    let bits = |at: usize| u16::from_le_bytes([blk[at], blk[at + 1]]);
                    d[at * GROUP + i] = bits(0);
                    if has_min(w.ty) {
                        m[at * GROUP + i] = bits(2);
                    }
                    match w.ty {
                        GgmlType::Q8_0 => {
                            for c in 0..8 {
                                out[64 * c + 4 * i..][..4]
                                    .copy_from_slice(&blk[nib_at + 4 * c..][..4]);
                            }
                        }
                        _ => {
                            let five = qh_at != 0;
                            let base = if five { 64 } else { 0 };
                            for c in 0..4 {
                                out[base + 64 * c + 4 * i..][..4]
                                    .copy_from_slice(&blk[nib_at + 4 * c..][..4]);
                            }
                            if five {
                                let qh = u32::from_le_bytes(
                                    blk[qh_at..qh_at + 4].try_into().expect("4 bytes"),
                                );
                                for c in 0..4 {
                                    for k in 0..4 {
                                        for (half, j) in [(0, 4 * c + k), (1, 16 + 4 * c + k)] {
                                            if (qh >> j) & 1 == 1 {
                                                let bit = 4 * i + k;
                                                let mask = 8 * (2 * c + half);
                                                out[mask + bit / 8] |= 1 << (bit % 8);
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        done(released..w.rows * row_bytes);
        Some(PackedMat {
            ty: w.ty,
            rows: w.rows,
            cols: w.cols,
            quants,
            d,
            m,
        })
    }

    /// Element type of the file's matrix.
    pub fn ty(&self) -> GgmlType {
        self.ty
    }

    /// Rows (outputs).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Weights per row.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Heap bytes held.
    pub fn bytes(&self) -> usize {
        self.quants.len() * 64 + 2 * (self.d.len() + self.m.len())
    }

    /// Group `g`'s quant area, d and m arrays (`m` is empty for types without a min).
    pub(crate) fn group(&self, g: usize) -> (&[u8], &[u16], &[u16]) {
        let nb = self.cols / QK;
        let qb = quant_bytes(self.ty).expect("a packed type");
        let lines = nb * qb / 64;
        let q = bytes(&self.quants[g * lines..(g + 1) * lines]);
        let d = &self.d[g * nb * GROUP..(g + 1) * nb * GROUP];
        let m = if self.m.is_empty() {
            &[][..]
        } else {
            &self.m[g * nb * GROUP..(g + 1) * nb * GROUP]
        };
        (q, d, m)
    }
}

fn bytes(l: &[Line]) -> &[u8] {
    // SAFETY: `Line` is 64 plain bytes with no padding.
    unsafe { std::slice::from_raw_parts(l.as_ptr() as *const u8, l.len() * 64) }
}

fn bytes_mut(l: &mut [Line]) -> &mut [u8] {
    // SAFETY: as in `bytes`.
    unsafe { std::slice::from_raw_parts_mut(l.as_mut_ptr() as *mut u8, l.len() * 64) }
}

/// Activations laid out for the group kernels' token tiles: tokens `t0..t0 + w` of a tile
/// (the last tile may be narrower) are interleaved so that, block by block, a kernel finds each
/// token's 4 quant bytes of one chunk, its scale, its min sum and its integer offset at one base
/// pointer plus constant offsets (no per-token pointers, no scalar work in the loop).
///
/// ```text
/// tile of width r at token t0 (all arrays start their tile at t0 * nb * {8, 1}):
///   qs   [nb][8][r] dwords: dword j of block b of token t (bytes 4j..4j+4 of its 32 quants)
///   d    [nb][r]  block scales
///   s    [nb][r]  block scale x sum of quants (the Q4_1 / Q5_1 min term)
///   off  [nb][r]  the type's integer offset x sum of quants (subtracted from the dot product)
/// ```
#[derive(Default)]
pub(crate) struct TiledActs {
    /// Tile width (the kernel's tokens per tile).
    pub w: usize,
    /// Blocks per token.
    pub nb: usize,
    /// Tokens laid out.
    pub n_tokens: usize,
    qs: Vec<i32>,
    d: Vec<f32>,
    s: Vec<f32>,
    off: Vec<i32>,
}

/// One tile's pointers (see [`TiledActs`]).
#[derive(Clone, Copy)]
pub(crate) struct Tile {
    pub qs: *const i32,
    pub d: *const f32,
    pub s: *const f32,
    pub off: *const i32,
}

impl TiledActs {
    /// Lays out the `n_tokens` tokens of `acts` in tiles of `w`, with `off x` the integer sum of
    /// each block's quants in `off`.
    pub fn fill(&mut self, acts: &Q8Acts, n_tokens: usize, w: usize, off: i32) {
        let nb = acts.nb;
        (self.w, self.nb, self.n_tokens) = (w, nb, n_tokens);
        self.qs.resize(n_tokens * nb * 8, 0);
        self.d.resize(n_tokens * nb, 0.0);
        self.s.resize(n_tokens * nb, 0.0);
        self.off.resize(n_tokens * nb, 0);
        let mut t0 = 0;
        while t0 < n_tokens {
            let r = w.min(n_tokens - t0);
            let qs = &mut self.qs[t0 * nb * 8..(t0 + r) * nb * 8];
            let base = t0 * nb;
            for t in 0..r {
                for b in 0..nb {
                    let i = (t0 + t) * nb + b;
                    let blk = &acts.qs[i * QK..(i + 1) * QK];
                    for j in 0..8 {
                        let q = [blk[4 * j], blk[4 * j + 1], blk[4 * j + 2], blk[4 * j + 3]];
                        qs[(b * 8 + j) * r + t] = i32::from_le_bytes(q.map(|v| v as u8));
                    }
                    self.d[base + b * r + t] = acts.d[i];
                    self.s[base + b * r + t] = acts.s[i];
                    self.off[base + b * r + t] = off * blk.iter().map(|&q| q as i32).sum::<i32>();
                }
            }
            t0 += r;
        }
    }

    /// The tile starting at token `t0` (a multiple of `w`).
    pub fn tile(&self, t0: usize) -> Tile {
        debug_assert!(t0.is_multiple_of(self.w) && t0 < self.n_tokens);
        Tile {
            qs: self.qs[t0 * self.nb * 8..].as_ptr(),
            d: self.d[t0 * self.nb..].as_ptr(),
            s: self.s[t0 * self.nb..].as_ptr(),
            off: self.off[t0 * self.nb..].as_ptr(),
        }
    }
}

/// The packed kernels' result for one file row (`row`, raw GGUF bytes) and token `t` of `acts`
/// (quantized with `q8_1 = has_min(ty)`), in scalar code: the definition the SIMD kernels
/// reproduce bit for bit.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) fn dot_reference(ty: GgmlType, row: &[u8], acts: &Q8Acts, t: usize) -> f32 {
    let (nb, bs, off) = (acts.nb, ty.type_size(), offset(ty));
    let mut acc = 0.0f32;
    let mut v = [0i32; QK];
    for b in 0..nb {
        let blk = &row[b * bs..(b + 1) * bs];
        block_32_values(ty, blk, &mut v);
        let y = &acts.qs[(t * nb + b) * QK..][..QK];
        let dot: i32 = v.iter().zip(y).map(|(&w, &y)| (w - off) * y as i32).sum();
        let dd = f16_at(blk, 0) * acts.d[t * nb + b];
        acc = (dot as f32).mul_add(dd, acc);
        if has_min(ty) {
            acc = f16_at(blk, 2).mul_add(acts.s[t * nb + b], acc);
        }
    }
    acc
}
