//! Model configuration, stored as JSON under `aios.config` in the weight file.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

fn default_mlp_ratio() -> usize {
    4
}
fn default_rope_base() -> f64 {
    10_000.0
}
fn default_norm_eps() -> f64 {
    1e-5
}

/// The MDLM DiT hyper-parameters (keys identical to `aios_train.config.ModelConfig`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    #[serde(default = "default_arch")]
    pub arch: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub cond_dim: usize,
    pub max_length: usize,
    #[serde(default)]
    pub time_conditioning: bool,
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: usize,
    #[serde(default = "default_rope_base")]
    pub rope_base: f64,
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    pub mask_token_id: u32,
    #[serde(default)]
    pub pad_token_id: u32,
    #[serde(default = "one")]
    pub bos_token_id: u32,
    #[serde(default = "two")]
    pub eos_token_id: u32,
    /// Causal attention: the autoregressive baseline, not a diffusion model.
    #[serde(default)]
    pub causal: bool,
    /// Continuous heads, all off (0) in a text model (keys as in
    /// `aios_train.config.ModelConfig`): an image head over
    /// `image_channels x image_size x image_size` pixels in `image_patch`
    /// square patches; an audio head over `audio_frames` log-mel frames of
    /// `audio_mels` bins, `audio_frames_per_token` frames per position. The
    /// STFT settings say how the log-mels were made (the runtime inverts them).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub image_size: usize,
    #[serde(default = "one_usize", skip_serializing_if = "is_one")]
    pub image_channels: usize,
    #[serde(default = "four", skip_serializing_if = "is_four")]
    pub image_patch: usize,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub audio_mels: usize,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub audio_frames: usize,
    #[serde(default = "four", skip_serializing_if = "is_four")]
    pub audio_frames_per_token: usize,
    #[serde(default = "default_sample_rate", skip_serializing_if = "is_default_sample_rate")]
    pub audio_sample_rate: usize,
    #[serde(default = "default_n_fft", skip_serializing_if = "is_default_n_fft")]
    pub audio_n_fft: usize,
    #[serde(default = "default_hop", skip_serializing_if = "is_default_hop")]
    pub audio_hop: usize,
}

fn is_default_sample_rate(v: &usize) -> bool {
    *v == default_sample_rate()
}
fn is_default_n_fft(v: &usize) -> bool {
    *v == default_n_fft()
}
fn is_default_hop(v: &usize) -> bool {
    *v == default_hop()
}
fn is_zero(v: &usize) -> bool {
    *v == 0
}
fn is_one(v: &usize) -> bool {
    *v == 1
}
fn is_four(v: &usize) -> bool {
    *v == 4
}
fn one_usize() -> usize {
    1
}
fn four() -> usize {
    4
}
fn default_sample_rate() -> usize {
    22_050
}
fn default_n_fft() -> usize {
    1024
}
fn default_hop() -> usize {
    256
}

/// The modalities a canvas position can hold (the modality embedding's rows).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Modality {
    Text = 0,
    Image = 1,
    Audio = 2,
}

impl Modality {
    pub const NAMES: [&'static str; 3] = ["text", "image", "audio"];

    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "text" => Ok(Modality::Text),
            "image" => Ok(Modality::Image),
            "audio" => Ok(Modality::Audio),
            other => Err(Error::Input(format!("unknown modality {other:?}; choose from {}", Self::NAMES.join(", ")))),
        }
    }

    pub fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }
}

fn default_arch() -> String {
    "dit".into()
}
fn one() -> u32 {
    1
}
fn two() -> u32 {
    2
}

/// Absurd sizes are refused before any allocation is attempted.
const MAX_DIM: usize = 1 << 16;
const MAX_VOCAB: usize = 1 << 20;

impl ModelConfig {
    pub fn from_json(s: &str) -> Result<Self> {
        let cfg: ModelConfig =
            serde_json::from_str(s).map_err(|e| Error::Config(format!("invalid aios.config JSON: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("config serialises")
    }

    /// Every tensor the model needs, with its shape, in a stable order.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (v, d, c, r) = (self.vocab_size, self.hidden_size, self.cond_dim, self.mlp_ratio);
        let mut s: Vec<(String, Vec<usize>)> = vec![
            ("vocab_embed.embedding".into(), vec![v, d]),
            ("sigma_map.mlp.0.weight".into(), vec![c, 256]),
            ("sigma_map.mlp.0.bias".into(), vec![c]),
            ("sigma_map.mlp.2.weight".into(), vec![c, c]),
            ("sigma_map.mlp.2.bias".into(), vec![c]),
        ];
        for i in 0..self.n_layers {
            let p = format!("blocks.{i}");
            s.extend([
                (format!("{p}.norm1.weight"), vec![d]),
                (format!("{p}.attn_qkv.weight"), vec![3 * d, d]),
                (format!("{p}.attn_out.weight"), vec![d, d]),
                (format!("{p}.norm2.weight"), vec![d]),
                (format!("{p}.mlp.0.weight"), vec![r * d, d]),
                (format!("{p}.mlp.0.bias"), vec![r * d]),
                (format!("{p}.mlp.2.weight"), vec![d, r * d]),
                (format!("{p}.mlp.2.bias"), vec![d]),
                (format!("{p}.adaLN_modulation.weight"), vec![6 * d, c]),
                (format!("{p}.adaLN_modulation.bias"), vec![6 * d]),
            ]);
        }
        s.extend([
            ("output_layer.norm_final.weight".into(), vec![d]),
            ("output_layer.adaLN_modulation.weight".into(), vec![2 * d, c]),
            ("output_layer.adaLN_modulation.bias".into(), vec![2 * d]),
            ("output_layer.linear.weight".into(), vec![v, d]),
            ("output_layer.linear.bias".into(), vec![v]),
        ]);
        if self.multimodal() {
            s.push(("modality_embed.embedding".into(), vec![3, d]));
        }
        for (head, p, n) in [
            ("image_head", self.image_patch_dim(), self.image_tokens()),
            ("audio_head", self.audio_token_dim(), self.audio_tokens()),
        ] {
            if n > 0 {
                s.extend([
                    (format!("{head}.proj_in.weight"), vec![d, p]),
                    (format!("{head}.proj_in.bias"), vec![d]),
                    (format!("{head}.pos_embed"), vec![n, d]),
                    (format!("{head}.proj_out.weight"), vec![p, d]),
                    (format!("{head}.proj_out.bias"), vec![p]),
                ]);
            }
        }
        s
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.n_heads
    }

    pub fn has_image(&self) -> bool {
        self.image_size > 0
    }

    pub fn has_audio(&self) -> bool {
        self.audio_mels > 0
    }

    /// Whether the modality embedding and per-position conditioning exist.
    pub fn multimodal(&self) -> bool {
        self.has_image() || self.has_audio()
    }

    /// The heads this model has, text first.
    pub fn heads(&self) -> Vec<Modality> {
        let mut h = vec![Modality::Text];
        if self.has_image() {
            h.push(Modality::Image);
        }
        if self.has_audio() {
            h.push(Modality::Audio);
        }
        h
    }

    pub fn has_head(&self, m: Modality) -> bool {
        match m {
            Modality::Text => true,
            Modality::Image => self.has_image(),
            Modality::Audio => self.has_audio(),
        }
    }

    /// Canvas positions of an image (patches).
    pub fn image_tokens(&self) -> usize {
        if self.has_image() {
            (self.image_size / self.image_patch).pow(2)
        } else {
            0
        }
    }

    /// Values per image patch (`channels * patch^2`).
    pub fn image_patch_dim(&self) -> usize {
        self.image_channels * self.image_patch * self.image_patch
    }

    /// Values per image (`channels * size^2`).
    pub fn image_values(&self) -> usize {
        self.image_channels * self.image_size * self.image_size
    }

    pub fn audio_tokens(&self) -> usize {
        if self.has_audio() {
            self.audio_frames / self.audio_frames_per_token
        } else {
            0
        }
    }

    pub fn audio_token_dim(&self) -> usize {
        self.audio_mels * self.audio_frames_per_token
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.arch != "dit" {
            return bad(format!("unknown arch {:?} (this build runs \"dit\")", self.arch));
        }
        for (name, v, max) in [
            ("vocab_size", self.vocab_size, MAX_VOCAB),
            ("hidden_size", self.hidden_size, MAX_DIM),
            ("n_layers", self.n_layers, 1024),
            ("n_heads", self.n_heads, 1024),
            ("cond_dim", self.cond_dim, MAX_DIM),
            ("max_length", self.max_length, MAX_DIM),
            ("mlp_ratio", self.mlp_ratio, 64),
        ] {
            if v == 0 || v > max {
                return bad(format!("{name} = {v} is outside 1..={max}"));
            }
        }
        if !self.hidden_size.is_multiple_of(self.n_heads) || !self.head_dim().is_multiple_of(2) {
            return bad(format!(
                "hidden_size {} must split into {} heads of even size",
                self.hidden_size, self.n_heads
            ));
        }
        for (name, id) in [
            ("mask_token_id", self.mask_token_id),
            ("pad_token_id", self.pad_token_id),
            ("bos_token_id", self.bos_token_id),
            ("eos_token_id", self.eos_token_id),
        ] {
            if id as usize >= self.vocab_size {
                return bad(format!("{name} {id} is outside the vocabulary of {}", self.vocab_size));
            }
        }
        for (name, v) in [
            ("image_size", self.image_size),
            ("image_channels", self.image_channels),
            ("image_patch", self.image_patch),
            ("audio_mels", self.audio_mels),
            ("audio_frames", self.audio_frames),
            ("audio_frames_per_token", self.audio_frames_per_token),
            ("audio_sample_rate", self.audio_sample_rate),
            ("audio_n_fft", self.audio_n_fft),
            ("audio_hop", self.audio_hop),
        ] {
            if v > MAX_DIM {
                return bad(format!("{name} = {v} is outside 0..={MAX_DIM}"));
            }
        }
        if self.has_image()
            && (self.image_patch == 0 || self.image_channels == 0 || !self.image_size.is_multiple_of(self.image_patch))
        {
            return bad(format!(
                "image_size {} must be a multiple of image_patch {} (and image_channels positive)",
                self.image_size, self.image_patch
            ));
        }
        if self.has_audio() {
            if self.audio_frames_per_token == 0
                || self.audio_frames == 0
                || !self.audio_frames.is_multiple_of(self.audio_frames_per_token)
            {
                return bad(format!(
                    "audio_frames {} must be a positive multiple of audio_frames_per_token {}",
                    self.audio_frames, self.audio_frames_per_token
                ));
            }
            if self.audio_n_fft < 16
                || self.audio_hop == 0
                || self.audio_hop > self.audio_n_fft
                || self.audio_sample_rate < 8000
                || self.audio_mels > self.audio_n_fft / 2 + 1
            {
                return bad("audio STFT settings out of range (n_fft >= 16, 0 < hop <= n_fft, sample_rate >= 8000, \
                            mels <= n_fft/2 + 1)"
                    .into());
            }
        }
        if self.multimodal() && self.causal {
            return bad("continuous heads need a diffusion model (causal = false)".into());
        }
        let positive = |x: f64| x.is_finite() && x > 0.0;
        if !(positive(self.rope_base) && self.rope_base > 1.0 && positive(self.norm_eps)) {
            return bad("rope_base and norm_eps must be finite and positive".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> &'static str {
        r#"{"vocab_size":64,"hidden_size":32,"n_layers":2,"n_heads":4,"cond_dim":16,"max_length":32,"mask_token_id":3}"#
    }

    #[test]
    fn parses_with_defaults() {
        let c = ModelConfig::from_json(base()).unwrap();
        assert_eq!(c.mlp_ratio, 4);
        assert!(!c.time_conditioning);
        assert_eq!(ModelConfig::from_json(&c.to_json()).unwrap(), c);
    }

    #[test]
    fn rejects_bad_configs() {
        for bad in [
            base().replace("\"n_heads\":4", "\"n_heads\":5"),
            base().replace("\"mask_token_id\":3", "\"mask_token_id\":64"),
            base().replace("\"n_layers\":2", "\"n_layers\":0"),
            base().replace("}", ",\"surprise\":1}"),
            "{not json".to_string(),
        ] {
            assert!(matches!(ModelConfig::from_json(&bad), Err(Error::Config(_))), "{bad}");
        }
    }
}
