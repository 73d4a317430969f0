//! The text head: the token embedding on the way in (`vocab_embed.embedding`)
//! and the output projection to logits on the way out
//! (`output_layer.linear`, reading the final layer's modulated states), as
//! in MDLM's DiT.

use super::config::ModelConfig;
use crate::adapter::ActiveLora;
use crate::error::Result;
use crate::format::WeightFile;
use crate::quant::{self, Linear, MatmulMode};

/// Adapter name of the output projection.
pub const OUTPUT_NAME: &str = "output_layer.linear";

#[derive(Clone, Debug)]
pub struct TextHead {
    /// `[vocab, D]`.
    embedding: Vec<f32>,
    pub(crate) output: Linear,
    d: usize,
}

impl TextHead {
    pub fn load(file: &WeightFile, cfg: &ModelConfig, mode: MatmulMode) -> Result<Self> {
        let (v, d) = (cfg.vocab_size, cfg.hidden_size);
        let raw = file.require("vocab_embed.embedding")?;
        quant::linear::check_shape(file, "vocab_embed.embedding", &raw.shape, &[v, d])?;
        let embedding = quant::load_f32(file, raw)?.flatten_all()?.to_vec1()?;
        let output = Linear::load(file, OUTPUT_NAME, v, d, true, mode)?;
        Ok(TextHead { embedding, output, d })
    }

    /// Model-width rows for `tokens` (ids already checked against the
    /// vocabulary), plus `extra` (the text modality vector) when given.
    pub fn embed(&self, tokens: &[u32], extra: Option<&[f32]>) -> Vec<f32> {
        let d = self.d;
        let mut x = Vec::with_capacity(tokens.len() * d);
        for &t in tokens {
            let e = &self.embedding[t as usize * d..(t as usize + 1) * d];
            match extra {
                Some(m) => x.extend(e.iter().zip(m).map(|(a, b)| a + b)),
                None => x.extend_from_slice(e),
            }
        }
        x
    }

    /// Raw logits `[rows, V]` from final hidden rows, with the active adapters.
    pub fn logits(&self, hidden: &[f32], rows: usize, lora: &ActiveLora) -> Result<Vec<f32>> {
        let mut logits = self.output.forward_rows(hidden, rows)?;
        lora.apply(OUTPUT_NAME, hidden, rows, &mut logits);
        Ok(logits)
    }
}
