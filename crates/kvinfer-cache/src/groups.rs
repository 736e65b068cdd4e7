//! Layer groups (vLLM's hybrid KV cache manager): a model's layers split by attention kind into
//! groups of equal size, each with its own block table per sequence. Every block holds one
//! group's layers, so one pool of equal blocks serves all groups. A sliding-window group's blocks
//! that end before the window are let go (kept cached and evictable), so Gemma 3's 15
//! sliding-window layers hold about 512 tokens each however long the context.
//!
//! ```text
//!  Gemma 3 270M (18 layers, every 6th full):  group 0 = full {5, 11, 17}
//!                                             groups 1..=5 = sliding {0,1,2} {3,4,6} ...
//!  position:  0 ......................... pos-window+1 ...... pos
//!  group 0:   [b0][b1][b2] ...................................[bn]   every block
//!  group 1+:  [--][--][--] .........holes........ [bk] ....... [bn]   the window only
//! ```

use crate::ids::BlockId;

/// How a model's layers share blocks. Group 0 has full attention (when any layer has).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvGroups {
    /// Per group: its sliding window in tokens (`None`: full attention).
    windows: Vec<Option<usize>>,
    /// Per model layer: (its group, its layer slot in that group's blocks).
    layers: Vec<(usize, usize)>,
}

/// Greatest common divisor.
fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl KvGroups {
    /// Every layer in one group with full attention: one block table per sequence, blocks of
    /// every layer (what models without sliding windows have, and `--swa-full`).
    pub fn single(n_layers: usize) -> Self {
        Self {
            windows: vec![None],
            layers: (0..n_layers).map(|l| (0, l)).collect(),
        }
    }

    /// Groups for layers whose windows are `per_layer` (`None`: full attention): layers of one
    /// kind are cut, in order, into groups of `gcd` of the kinds' counts, full attention first.
    /// One group when every layer is of one kind.
    pub fn by_window(per_layer: &[Option<usize>]) -> Self {
        let mut kinds: Vec<Option<usize>> = Vec::new();
        for w in per_layer {
            if !kinds.contains(w) {
                kinds.push(*w);
            }
        }
        kinds.sort_by_key(|w| w.map_or(0, |w| w.max(1))); // None first
        if kinds.len() < 2 {
            return Self::single(per_layer.len());
        }
        let count = |k: &Option<usize>| per_layer.iter().filter(|w| *w == k).count();
        let size = kinds.iter().map(count).fold(0, gcd);
        let mut windows = Vec::new();
        let mut layers = vec![(0, 0); per_layer.len()];
        for k in &kinds {
            for (i, (l, _)) in per_layer
                .iter()
                .enumerate()
                .filter(|(_, w)| *w == k)
                .enumerate()
            {
                if i % size == 0 {
                    windows.push(*k);
                }
                layers[l] = (windows.len() - 1, i % size);
            }
        }
        Self { windows, layers }
    }

    /// Number of groups (block tables per sequence).
    pub fn len(&self) -> usize {
        self.windows.len()
    }

    /// Always false: a model has at least one group.
    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }

    /// Layers each block holds.
    pub fn layers_per_block(&self) -> usize {
        self.layers.len() / self.windows.len().max(1)
    }

    /// The model's layer count.
    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// Group `g`'s sliding window (`None`: full attention).
    pub fn window(&self, g: usize) -> Option<usize> {
        self.windows[g]
    }

    /// Every group's window.
    pub fn windows(&self) -> &[Option<usize>] {
        &self.windows
    }

    /// Layer `l`'s (group, layer slot in the group's blocks).
    pub fn of_layer(&self, l: usize) -> (usize, usize) {
        self.layers[l]
    }

    /// A short name for the fingerprint and reports, e.g. `1x3 full + 5x3 sliding(512)`.
    pub fn describe(&self) -> String {
        let mut parts: Vec<(Option<usize>, usize)> = Vec::new();
        for w in &self.windows {
            match parts.last_mut() {
                Some((k, n)) if k == w => *n += 1,
                _ => parts.push((*w, 1)),
            }
        }
        parts
            .iter()
            .map(|(w, n)| match w {
                None => format!("{n}x{} full", self.layers_per_block()),
                Some(w) => format!("{n}x{} sliding({w})", self.layers_per_block()),
            })
            .collect::<Vec<_>>()
            .join(" + ")
    }
}

/// The first block a query at position `pos` or later reads in a group with `window`: blocks
/// before it are outside every later window (`0` for full attention).
pub fn first_needed_block(window: Option<usize>, pos: usize, block_size: usize) -> usize {
    window.map_or(0, |w| (pos + 1).saturating_sub(w) / block_size)
}

/// A table entry no longer held: a sliding-window block that fell out of the window.
pub const HOLE: BlockId = BlockId(u32::MAX);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemma3_splits_into_one_full_and_five_sliding_groups_of_three() {
        let per_layer: Vec<Option<usize>> = (0..18)
            .map(|l| if l % 6 == 5 { None } else { Some(512) })
            .collect();
        let g = KvGroups::by_window(&per_layer);
        assert_eq!(g.len(), 6);
        assert_eq!(g.layers_per_block(), 3);
        assert_eq!(g.window(0), None);
        assert!((1..6).all(|i| g.window(i) == Some(512)));
        assert_eq!(g.of_layer(5), (0, 0));
        assert_eq!(g.of_layer(11), (0, 1));
        assert_eq!(g.of_layer(17), (0, 2));
        assert_eq!(g.of_layer(0), (1, 0));
        assert_eq!(g.of_layer(6), (2, 2));
        assert_eq!(g.of_layer(16), (5, 2));
        // Every (group, slot) is one layer's.
        let mut seen: Vec<_> = (0..18).map(|l| g.of_layer(l)).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 18);
        assert_eq!(g.describe(), "1x3 full + 5x3 sliding(512)");
    }

    #[test]
    fn one_kind_is_one_group() {
        assert_eq!(KvGroups::by_window(&[None; 4]), KvGroups::single(4));
        assert_eq!(KvGroups::single(4).layers_per_block(), 4);
        let tiny = KvGroups::by_window(&[Some(8), Some(8), Some(8), Some(8), Some(8), None]);
        assert_eq!((tiny.len(), tiny.layers_per_block()), (6, 1));
    }

    #[test]
    fn the_window_before_a_position_starts_at_its_first_visible_key() {
        // Window 512, blocks of 16: the query at 1024 sees 513..=1024, so block 32 on.
        assert_eq!(first_needed_block(Some(512), 1024, 16), 32);
        assert_eq!(first_needed_block(Some(512), 1023, 16), 32);
        assert_eq!(first_needed_block(Some(512), 1022, 16), 31);
        assert_eq!(first_needed_block(Some(512), 100, 16), 0);
        assert_eq!(first_needed_block(None, 5000, 16), 0);
    }
}
