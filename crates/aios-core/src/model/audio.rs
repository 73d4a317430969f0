//! The audio head (`audio_head.*` in `aios_train.heads.AudioHead`): log-mel
//! frames `[frames, mels]`, `frames_per_token` consecutive frames per canvas
//! position (a plain reshape, so a position's values are frame-major), with a
//! learned position embedding on top of the backbone's 1D rotary positions.

use super::config::ModelConfig;
use super::heads::Projection;
use crate::error::Result;
use crate::format::WeightFile;
use crate::quant::MatmulMode;

#[derive(Clone, Debug)]
pub struct AudioHead {
    pub proj: Projection,
}

impl AudioHead {
    pub fn load(file: &WeightFile, cfg: &ModelConfig, mode: MatmulMode) -> Result<Self> {
        Ok(AudioHead {
            proj: Projection::load(
                file,
                "audio_head",
                cfg.hidden_size,
                cfg.audio_token_dim(),
                cfg.audio_tokens(),
                mode,
            )?,
        })
    }

    /// Model-width rows for a batch of normalised log-mels (`[B, frames * mels]`).
    pub fn embed(&self, mels: &[f32], batch: usize, modality: &[f32]) -> Result<Vec<f32>> {
        self.proj.embed(mels, batch, modality)
    }

    /// The v-prediction `[B, frames * mels]` from final hidden rows.
    pub fn out(&self, hidden: &[f32], batch: usize) -> Result<Vec<f32>> {
        self.proj.out(hidden, batch * self.proj.positions)
    }
}
