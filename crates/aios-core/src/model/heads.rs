//! The projection every continuous head shares: `proj_in` (values -> model
//! width) plus a learned position embedding on the way in, `proj_out`
//! (model width -> values) on the way out, read from the final layer's
//! adaLN-modulated states like the text head's `output_layer.linear`.

use crate::error::Result;
use crate::format::WeightFile;
use crate::quant::{Linear, MatmulMode};

#[derive(Clone, Debug)]
pub struct Projection {
    pub proj_in: Linear,
    /// `[positions, D]`.
    pub pos_embed: Vec<f32>,
    pub proj_out: Linear,
    /// Positions of one item (image patches, audio frame groups).
    pub positions: usize,
    /// Values per position.
    pub width: usize,
}

impl Projection {
    pub fn load(
        file: &WeightFile,
        prefix: &str,
        d: usize,
        width: usize,
        positions: usize,
        mode: MatmulMode,
    ) -> Result<Self> {
        let name = format!("{prefix}.pos_embed");
        let raw = file.require(&name)?;
        crate::quant::linear::check_shape(file, &name, &raw.shape, &[positions, d])?;
        Ok(Projection {
            proj_in: Linear::load(file, &format!("{prefix}.proj_in"), d, width, true, mode)?,
            pos_embed: crate::quant::load_f32(file, raw)?.flatten_all()?.to_vec1()?,
            proj_out: Linear::load(file, &format!("{prefix}.proj_out"), width, d, true, mode)?,
            positions,
            width,
        })
    }

    /// Model-width rows `[B * positions, D]` from values `[B * positions, width]`,
    /// position embedding and `extra` (the modality embedding) added.
    pub fn embed(&self, values: &[f32], batch: usize, extra: &[f32]) -> Result<Vec<f32>> {
        let mut h = self.proj_in.forward_rows(values, batch * self.positions)?;
        let d = extra.len();
        for (r, row) in h.chunks_exact_mut(d).enumerate() {
            let pos = &self.pos_embed[(r % self.positions) * d..][..d];
            for ((v, p), e) in row.iter_mut().zip(pos).zip(extra) {
                *v += p + e;
            }
        }
        Ok(h)
    }

    /// Values `[rows, width]` from final hidden rows `[rows, D]`.
    pub fn out(&self, hidden: &[f32], rows: usize) -> Result<Vec<f32>> {
        self.proj_out.forward_rows(hidden, rows)
    }

    pub fn parameters(&self) -> usize {
        let d = self.proj_in.out_features;
        2 * (d * self.width) + d + self.width + self.positions * d
    }
}
