//! A loaded model: config, weights over the mapped file, tokenizer and chat template.

use crate::chat::ChatTemplate;
use crate::config::{Arch, ModelConfig};
use crate::gguf::GgufFile;
use crate::layers::{KvSpans, SeqSpan};
use crate::tokenizer::{Tokenizer, TokenizerSpec};
use crate::{gemma3, llama, ModelError};
use kvinfer_cache::{
    first_needed_block, BlockId, KvDtype, KvGroups, KvLayout, KvStorage, ModelFingerprint, HOLE,
};
use std::path::Path;

enum ArchWeights {
    Llama(llama::Weights),
    Gemma3(gemma3::Weights),
}

/// One sequence's part of a [`Model::forward`] batch.
#[derive(Debug, Clone, Copy)]
pub struct SeqBatch<'a> {
    /// New tokens, at positions `start..start + tokens.len()`.
    pub tokens: &'a [u32],
    /// Positions already cached (K/V written) before these tokens.
    pub start: usize,
    /// The sequence's block tables, one per layer group (see [`Model::kv_groups`]), each
    /// covering at least `start + tokens.len()` positions.
    pub tables: &'a [Vec<BlockId>],
}

/// Version of the KV byte format; part of the fingerprint, so a change invalidates old blocks
/// (2: f16 keys transposed within a block).
const KV_FORMAT_VERSION: u32 = 2;

/// A model ready to run. Immutable: one `Model` serves any number of sequences, whose K/V live in
/// a shared paged [`KvStorage`].
pub struct Model {
    /// Shapes and hyper-parameters.
    pub config: ModelConfig,
    /// Text <-> token ids, as llama.cpp tokenizes.
    pub tokenizer: Tokenizer,
    /// The chat template (the file's, or gemma3's built-in one); `None` if the file has none.
    pub chat_template: Option<ChatTemplate>,
    /// `general.name`, or the file name.
    pub name: String,
    file: GgufFile,
    weights: ArchWeights,
}

impl Model {
    /// Loads a GGUF model: maps the file, reads the config, checks every tensor, builds the
    /// tokenizer. Weights stay in the map (the OS pages them in on first use).
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        let file = GgufFile::open(path)?;
        let config = ModelConfig::from_gguf(&file)?;
        crate::support::check_metadata(&file, config.arch, config.head_dim)?;
        let weights = match config.arch {
            Arch::Llama => ArchWeights::Llama(llama::Weights::load(&file, &config)?),
            Arch::Gemma3 => ArchWeights::Gemma3(gemma3::Weights::load(&file, &config)?),
        };
        crate::support::check_tensors(&file, config.arch)?;
        let tokenizer = Tokenizer::from_spec(TokenizerSpec::from_gguf(&file)?)?;
        if tokenizer.vocab_size() != config.vocab_size {
            return Err(ModelError::Config(format!(
                "tokenizer has {} tokens but the output matrix has {} rows",
                tokenizer.vocab_size(),
                config.vocab_size
            )));
        }
        let piece = |id: Option<u32>| {
            id.map(|i| tokenizer.token_text(i).to_string())
                .unwrap_or_default()
        };
        let (bos, eos) = (piece(tokenizer.bos_id()), piece(tokenizer.eos_id()));
        let source = match (file.get_str("tokenizer.chat_template"), config.arch) {
            (Some(s), _) => Some(s.to_string()),
            (None, Arch::Gemma3) => Some(ChatTemplate::gemma3_builtin().to_string()),
            (None, Arch::Llama) => None,
        };
        let chat_template = source
            .map(|s| ChatTemplate::new(&s, &bos, &eos))
            .transpose()?;
        let name = file
            .get_str("general.name")
            .map(str::to_string)
            .or_else(|| path.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_default();
        Ok(Self {
            config,
            tokenizer,
            chat_template,
            name,
            file,
            weights,
        })
    }

    /// The shape of a KV arena for this model: `num_blocks` blocks of `block_size` tokens.
    pub fn kv_layout(&self, block_size: usize, num_blocks: usize) -> KvLayout {
        self.kv_layout_of(block_size, num_blocks, KvDtype::F16)
    }

    /// As [`Self::kv_layout`], storing rows as `dtype`.
    pub fn kv_layout_of(&self, block_size: usize, num_blocks: usize, dtype: KvDtype) -> KvLayout {
        self.kv_layout_for(
            block_size,
            num_blocks,
            dtype,
            &KvGroups::single(self.config.n_layers),
        )
    }

    /// How the layers share blocks: with `windowed`, sliding-window layers get groups of their
    /// own whose blocks before the window are let go (Gemma 3: one full-attention group and five
    /// sliding ones of 3 layers); else, or for models without sliding windows, one group of
    /// every layer.
    pub fn kv_groups(&self, windowed: bool) -> KvGroups {
        let c = &self.config;
        if !windowed || c.sliding_window.is_none() {
            return KvGroups::single(c.n_layers);
        }
        let per_layer: Vec<Option<usize>> = (0..c.n_layers)
            .map(|l| c.sliding_window.filter(|_| c.is_swa_layer(l)))
            .collect();
        KvGroups::by_window(&per_layer)
    }

    /// As [`Self::kv_layout_of`], for blocks of one group of `groups` each.
    pub fn kv_layout_for(
        &self,
        block_size: usize,
        num_blocks: usize,
        dtype: KvDtype,
        groups: &KvGroups,
    ) -> KvLayout {
        KvLayout {
            n_layers: groups.layers_per_block(),
            n_kv_heads: self.config.n_kv_heads,
            head_dim: self.config.head_dim,
            block_size,
            num_blocks,
            dtype,
        }
    }

    /// The identity of this model's KV bytes for `block_size`-token f16 blocks: a blake3 digest of
    /// the architecture, every tensor's name, type and shape, and samples of its content (16
    /// evenly spaced 4 KiB windows per tensor: cheap at load, and two files that differ only
    /// between samples are not a risk we guard against), the KV dtype, the block size and the
    /// format version.
    pub fn fingerprint(&self, block_size: usize) -> ModelFingerprint {
        self.fingerprint_of(block_size, KvDtype::F16)
    }

    /// As [`Self::fingerprint`], for blocks stored as `dtype` (a block is only ever used under
    /// the dtype it was written with; f16 keeps the digest it always had).
    pub fn fingerprint_of(&self, block_size: usize, dtype: KvDtype) -> ModelFingerprint {
        self.fingerprint_for(block_size, dtype, &KvGroups::single(self.config.n_layers))
    }

    /// As [`Self::fingerprint_of`], for blocks of layer groups `groups` (one group keeps the
    /// digest it always had; grouped blocks hold other layers, so they get another).
    pub fn fingerprint_for(
        &self,
        block_size: usize,
        dtype: KvDtype,
        groups: &KvGroups,
    ) -> ModelFingerprint {
        const WINDOWS: usize = 16;
        const WINDOW_BYTES: usize = 4 << 10; // 4 KiB
        let mut h = blake3::Hasher::new();
        h.update(b"kvinfer-kv");
        h.update(&KV_FORMAT_VERSION.to_le_bytes());
        h.update(format!("{:?}", self.config.arch).as_bytes());
        h.update(dtype.name().as_bytes());
        h.update(&(block_size as u64).to_le_bytes());
        if groups.len() > 1 {
            h.update(b"groups");
            h.update(groups.describe().as_bytes());
        }
        for t in self.file.tensors() {
            h.update(t.name.as_bytes());
            h.update(format!("{:?}{:?}", t.ty, t.dims).as_bytes());
            let data = self.file.tensor_data(t);
            let stride = (data.len() / WINDOWS).max(1);
            for w in 0..WINDOWS {
                let lo = (w * stride).min(data.len());
                h.update(&data[lo..(lo + WINDOW_BYTES).min(data.len())]);
            }
            // The samples fault in whole runs of pages around them; a repacked tensor's pages
            // are otherwise never read again.
            self.file.release_copied(t);
        }
        ModelFingerprint(*h.finalize().as_bytes())
    }

    /// Runs a batch of sequences: each one's `tokens` after its `start` cached positions. Stores
    /// their keys and values in `kv` through each block table and returns each sequence's
    /// last-token logits (`[batch][vocab_size]`). Every matrix product runs once for the whole
    /// batch (weights are read once per step); attention runs per sequence.
    pub fn forward(
        &self,
        kv: &mut KvStorage,
        batch: &[SeqBatch],
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        self.forward_rows(kv, batch, false)
    }

    /// As [`Self::forward`], returning the logits after every token of every sequence, in
    /// order (`[Σ tokens][vocab]`: perplexity and accuracy measurements).
    pub fn forward_all(
        &self,
        kv: &mut KvStorage,
        batch: &[SeqBatch],
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        self.forward_rows(kv, batch, true)
    }

    fn forward_rows(
        &self,
        kv: &mut KvStorage,
        batch: &[SeqBatch],
        every_row: bool,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let n_tables = batch.first().map_or(1, |s| s.tables.len());
        let groups = self.kv_groups(n_tables > 1);
        if groups.len() != n_tables {
            return Err(ModelError::Input(format!(
                "{n_tables} block tables per sequence, but the model has {} layer groups",
                groups.len()
            )));
        }
        let l = kv.layout();
        let layout = self.kv_layout_for(l.block_size, l.num_blocks, l.dtype, &groups);
        if *kv.layout() != layout || l.dtype.check_head_dim(l.head_dim).is_err() {
            return Err(ModelError::Input(
                "KV storage was made for another model".into(),
            ));
        }
        let mut tokens = Vec::new();
        let mut spans: Vec<Vec<SeqSpan>> = vec![Vec::with_capacity(batch.len()); groups.len()];
        for s in batch {
            self.check_seq(s, &layout, &groups)?;
            let r0 = tokens.len();
            tokens.extend_from_slice(s.tokens);
            for (g, t) in s.tables.iter().enumerate() {
                spans[g].push(SeqSpan {
                    blocks: t,
                    start: s.start,
                    rows: r0..tokens.len(),
                });
            }
        }
        if tokens.is_empty() {
            return Err(ModelError::Input("no tokens to run".into()));
        }
        let spans = KvSpans::new(groups, spans);
        let (f, c) = (&self.file, &self.config);
        Ok(match &self.weights {
            ArchWeights::Llama(w) => w.forward(f, c, &tokens, &spans, kv, every_row),
            ArchWeights::Gemma3(w) => w.forward(f, c, &tokens, &spans, kv, every_row),
        })
    }

    fn check_seq(
        &self,
        s: &SeqBatch,
        layout: &KvLayout,
        groups: &KvGroups,
    ) -> Result<(), ModelError> {
        if s.tokens.is_empty() {
            return Err(ModelError::Input("no tokens to run".into()));
        }
        if let Some(&bad) = s
            .tokens
            .iter()
            .find(|&&t| t as usize >= self.config.vocab_size)
        {
            return Err(ModelError::Input(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.config.vocab_size
            )));
        }
        let end = s.start + s.tokens.len();
        if end > self.config.context_length {
            return Err(ModelError::ContextFull {
                needed: end,
                max: self.config.context_length,
            });
        }
        if s.tables.len() != groups.len() {
            return Err(ModelError::Input(format!(
                "{} block tables for {} layer groups",
                s.tables.len(),
                groups.len()
            )));
        }
        for (g, t) in s.tables.iter().enumerate() {
            if t.len() * layout.block_size < end {
                return Err(ModelError::Input(format!(
                    "block table of {} blocks cannot hold {end} positions",
                    t.len()
                )));
            }
            // Holes (blocks let go) only where no query of this pass looks.
            let first = first_needed_block(groups.window(g), s.start, layout.block_size);
            for (i, b) in t[..end.div_ceil(layout.block_size)].iter().enumerate() {
                if *b == HOLE && i >= first {
                    return Err(ModelError::Input(format!(
                        "block {i} of group {g} is needed but was let go"
                    )));
                }
                if *b != HOLE && b.index() >= layout.num_blocks {
                    return Err(ModelError::Input(format!("{b:?} is outside the KV arena")));
                }
            }
        }
        Ok(())
    }

    /// Size of the model file in bytes.
    pub fn file_bytes(&self) -> u64 {
        self.file.file_len()
    }

    /// The GGUF file (for metadata).
    pub fn gguf(&self) -> &GgufFile {
        &self.file
    }
}
