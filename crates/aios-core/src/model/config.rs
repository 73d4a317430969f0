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
        s
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.n_heads
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
