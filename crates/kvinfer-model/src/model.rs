//! A loaded model: config, weights over the mapped file, tokenizer and chat template.

use crate::chat::ChatTemplate;
use crate::config::ModelConfig;
use crate::gguf::GgufFile;
use crate::layers::{KvSpans, SeqSpan};
use crate::tokenizer::{Tokenizer, TokenizerSpec};
use crate::{decoder, ModelError};
use kvinfer_cache::{
    first_needed_block, BlockId, KvDtype, KvGroups, KvLayout, KvStorage, ModelFingerprint, PagedKv,
    PolicyKind, HOLE,
};
use std::path::Path;

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

/// What a model's KV blocks are for given cache options ([`Model::kv_identity`]): one block's
/// layout, the layer groups and the fingerprint, derived together so they never disagree.
/// Every cache of a model (pool, tiers, tests) is built from one.
#[derive(Debug, Clone)]
pub struct KvIdentity {
    /// One block (`num_blocks` 1).
    block: KvLayout,
    /// How the layers share blocks.
    pub groups: KvGroups,
    /// The digest blocks are stored and found under: a block is used only under it.
    pub fingerprint: ModelFingerprint,
}

impl KvIdentity {
    /// The layout of an arena of `num_blocks` blocks.
    pub fn layout(&self, num_blocks: usize) -> KvLayout {
        KvLayout {
            num_blocks,
            ..self.block
        }
    }

    /// Bytes of one block (all layers of its group, K and V).
    pub fn block_bytes(&self) -> usize {
        self.block.block_bytes()
    }

    /// KV bytes per token, all layers.
    pub fn token_bytes(&self) -> usize {
        self.layout(1).token_bytes() * self.groups.len()
    }

    /// A block pool of `num_blocks` blocks (shared by the groups' tables) under this identity.
    pub fn paged(&self, num_blocks: usize, policy: PolicyKind, seed: u64) -> PagedKv {
        PagedKv::with_groups(
            self.layout(num_blocks),
            self.groups.windows().to_vec(),
            policy,
            seed,
            self.fingerprint,
        )
    }
}

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
    weights: decoder::Weights,
}

impl Model {
    /// Loads a GGUF model: maps the file, reads the config, checks every tensor, builds the
    /// tokenizer. Weights stay in the map (the OS pages them in on first use).
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        let file = GgufFile::open(path)?;
        let config = ModelConfig::from_gguf(&file)?;
        crate::support::check_metadata(&file, config.arch, config.head_dim)?;
        let weights = decoder::Weights::load(&file, &config)?;
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
        let source = file
            .get_str("tokenizer.chat_template")
            .or(config.arch.builtin_template)
            .map(str::to_string);
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

    /// How the layers share blocks: with `windowed`, sliding-window layers get groups of their
    /// own whose blocks before the window are let go (Gemma 3: one full-attention group and five
    /// sliding ones of 3 layers); else, or for models without sliding windows, one group of
    /// every layer.
    pub fn kv_groups(&self, windowed: bool) -> KvGroups {
        let c = &self.config;
        if !windowed || c.sliding_window.is_none() {
            return KvGroups::single(c.n_layers);
        }
        let per_layer: Vec<Option<usize>> = (0..c.n_layers).map(|l| c.layer_window(l)).collect();
        KvGroups::by_window(&per_layer)
    }

    /// The identity of this model's KV blocks of `block_size` tokens stored as `dtype`, with
    /// sliding-window layers in groups of their own when `windowed` ([`Self::kv_groups`]):
    /// their layout and the fingerprint they are stored and found under, derived together.
    pub fn kv_identity(&self, block_size: usize, dtype: KvDtype, windowed: bool) -> KvIdentity {
        let groups = self.kv_groups(windowed);
        let block = KvLayout {
            n_layers: groups.layers_per_block(),
            n_kv_heads: self.config.n_kv_heads,
            head_dim: self.config.head_dim,
            block_size,
            num_blocks: 1,
            dtype,
        };
        let fingerprint = self.fingerprint(block_size, dtype, &groups);
        KvIdentity {
            block,
            groups,
            fingerprint,
        }
    }

    /// A blake3 digest of the architecture, every tensor's name, type and shape, and samples of
    /// its content (16 evenly spaced 4 KiB windows per tensor: cheap at load, and two files
    /// that differ only between samples are not a risk we guard against), the KV dtype, the
    /// block size, the layer groups (when more than one) and the format version.
    fn fingerprint(
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
        h.update(self.config.arch.name.as_bytes());
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
        let layout = KvLayout {
            n_layers: groups.layers_per_block(),
            n_kv_heads: self.config.n_kv_heads,
            head_dim: self.config.head_dim,
            ..*l
        };
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
        Ok(self.weights.forward(f, c, &tokens, &spans, kv, every_row))
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

    /// One line on what runs: architecture, name, layers, context length and the weight types
    /// of its matrices, most common first (`llama "SmolLM2" : 30 layers, context 8192, weights
    /// Q4_1 x 210, Q8_0 x 1`).
    pub fn summary(&self) -> String {
        let mut types: Vec<(String, usize)> = Vec::new();
        for t in self.file.tensors().iter().filter(|t| t.dims.len() == 2) {
            let name = format!("{:?}", t.ty);
            match types.iter_mut().find(|(n, _)| *n == name) {
                Some((_, c)) => *c += 1,
                None => types.push((name, 1)),
            }
        }
        types.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let types: Vec<String> = types.iter().map(|(n, c)| format!("{n} x {c}")).collect();
        let c = &self.config;
        let mut out = format!(
            "{} {:?}: {} layers, {} heads ({} KV) of {}, context {} tokens, weights {}",
            c.arch.name(),
            self.name,
            c.n_layers,
            c.n_heads,
            c.n_kv_heads,
            c.head_dim,
            c.context_length,
            types.join(", ")
        );
        let key = format!("{}.attention.sliding_window", c.arch.name());
        if let (false, Some(w)) = (c.arch.has_window(), self.file.get_u32(&key)) {
            out.push_str(&format!(
                "; the file's sliding window of {w} is not applied (as llama.cpp: full attention)"
            ));
        }
        out
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
