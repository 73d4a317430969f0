//! The MDLM diffusion transformer (kuleshov-group/mdlm `models/dit.py`), with
//! the same parameter names minus MDLM's `backbone.` prefix, so a converted
//! MDLM checkpoint runs unchanged.
//!
//! Shapes: tokens `[B, L]` (u32) -> logits `[B, L, V]` (f32, raw: the
//! absorbing-state SUBS masking is the sampler's job).

use candle_core::{DType as CDType, Device, IndexOp, Tensor, D};

use super::config::ModelConfig;
use crate::adapter::ActiveLora;
use crate::error::{Error, Result};
use crate::format::WeightFile;
use crate::quant::{self, Linear, MatmulMode};

const FREQ_EMBED_DIM: usize = 256;
const MAX_PERIOD: f64 = 10_000.0;

/// MDLM's LayerNorm: no bias, learned weight, statistics in f32.
#[derive(Clone, Debug)]
struct LayerNorm {
    weight: Tensor,
    zeros: Tensor,
    eps: f32,
}

impl LayerNorm {
    fn load(file: &WeightFile, name: &str, dim: usize, eps: f64) -> Result<Self> {
        let weight = load_vector(file, name, dim)?;
        Ok(LayerNorm { zeros: weight.zeros_like()?, weight, eps: eps as f32 })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::layer_norm(x, &self.weight, &self.zeros, self.eps)?)
    }
}

fn load_vector(file: &WeightFile, name: &str, dim: usize) -> Result<Tensor> {
    let raw = file.require(name)?;
    quant::linear::check_shape(file, name, &raw.shape, &[dim])?;
    quant::load_f32(file, raw)
}

/// `x * (1 + scale) + shift`, with shift/scale `[B, 1, D]`.
fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    Ok(x.broadcast_mul(&(scale + 1.0)?)?.broadcast_add(shift)?)
}

/// Sinusoidal timestep features `cat(cos, sin)`, `[B, 256]`.
fn timestep_features(sigma: &Tensor) -> Result<Tensor> {
    let half = FREQ_EMBED_DIM / 2;
    let freqs: Vec<f32> = (0..half).map(|i| (-(MAX_PERIOD.ln()) * i as f64 / half as f64).exp() as f32).collect();
    let freqs = Tensor::from_vec(freqs, (1, half), sigma.device())?;
    let args = sigma.unsqueeze(1)?.broadcast_mul(&freqs)?;
    Ok(Tensor::cat(&[args.cos()?, args.sin()?], 1)?)
}

#[derive(Clone, Debug)]
struct TimestepEmbedder {
    fc1: Linear,
    fc2: Linear,
}

impl TimestepEmbedder {
    fn load(file: &WeightFile, cond: usize, mode: MatmulMode) -> Result<Self> {
        Ok(TimestepEmbedder {
            fc1: Linear::load(file, "sigma_map.mlp.0", cond, FREQ_EMBED_DIM, true, mode)?,
            fc2: Linear::load(file, "sigma_map.mlp.2", cond, cond, true, mode)?,
        })
    }
    /// `c = silu(mlp(features(sigma)))`, `[B, cond]`.
    fn forward(&self, sigma: &Tensor) -> Result<Tensor> {
        let h = self.fc1.forward(&timestep_features(sigma)?)?;
        let h = self.fc2.forward(&candle_nn::ops::silu(&h)?)?;
        Ok(candle_nn::ops::silu(&h)?)
    }
}

/// The adaLN shift/scale/gate vectors of one block, each `[B, 1, D]`.
#[derive(Clone, Debug)]
struct Modulation(Vec<Tensor>);

impl Modulation {
    fn compute(ada: &Linear, c: &Tensor, parts: usize) -> Result<Self> {
        let m = ada.forward(c)?.unsqueeze(1)?; // [B, 1, parts*D]
        Ok(Modulation(
            m.chunk(parts, D::Minus1)?.into_iter().map(|t| t.contiguous()).collect::<candle_core::Result<_>>()?,
        ))
    }
}

#[derive(Clone, Debug)]
struct Block {
    norm1: LayerNorm,
    attn_qkv: Linear,
    attn_out: Linear,
    norm2: LayerNorm,
    mlp_in: Linear,
    mlp_out: Linear,
    ada: Linear,
    n_heads: usize,
    /// Module names as adapters address them: attn_qkv, attn_out, mlp.0, mlp.2.
    names: [String; 4],
}

impl Block {
    fn load(file: &WeightFile, i: usize, cfg: &ModelConfig, mode: MatmulMode) -> Result<Self> {
        let (d, cond) = (cfg.hidden_size, cfg.cond_dim);
        let p = format!("blocks.{i}");
        Ok(Block {
            norm1: LayerNorm::load(file, &format!("{p}.norm1.weight"), d, cfg.norm_eps)?,
            attn_qkv: Linear::load(file, &format!("{p}.attn_qkv"), 3 * d, d, false, mode)?,
            attn_out: Linear::load(file, &format!("{p}.attn_out"), d, d, false, mode)?,
            norm2: LayerNorm::load(file, &format!("{p}.norm2.weight"), d, cfg.norm_eps)?,
            mlp_in: Linear::load(file, &format!("{p}.mlp.0"), cfg.mlp_ratio * d, d, true, mode)?,
            mlp_out: Linear::load(file, &format!("{p}.mlp.2"), d, cfg.mlp_ratio * d, true, mode)?,
            ada: Linear::load(file, &format!("{p}.adaLN_modulation"), 6 * d, cond, true, mode)?,
            n_heads: cfg.n_heads,
            names: ["attn_qkv", "attn_out", "mlp.0", "mlp.2"].map(|m| format!("{p}.{m}")),
        })
    }

    /// A linear layer plus the active adapters' update for it.
    fn linear(&self, which: usize, x: &Tensor, lora: &ActiveLora) -> Result<Tensor> {
        let layer = [&self.attn_qkv, &self.attn_out, &self.mlp_in, &self.mlp_out][which];
        lora.apply(&self.names[which], x, layer.forward(x)?)
    }

    fn linear_mut(&mut self, name: &str) -> Option<&mut Linear> {
        let i = self.names.iter().position(|n| n == name)?;
        [&mut self.attn_qkv, &mut self.attn_out, &mut self.mlp_in, &mut self.mlp_out].into_iter().nth(i)
    }

    fn forward(
        &self,
        x: &Tensor,
        m: &Modulation,
        rope: &Rope,
        mask: Option<&Tensor>,
        lora: &ActiveLora,
    ) -> Result<Tensor> {
        let [shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp] = &m.0[..] else {
            return Err(Error::Config("block modulation must have 6 parts".into()));
        };
        let (b, l, d) = x.dims3()?;
        let hd = d / self.n_heads;
        let h = modulate(&self.norm1.forward(x)?, shift_msa, scale_msa)?;
        let qkv = self.linear(0, &h, lora)?.reshape((b, l, 3, self.n_heads, hd))?;
        // [B, L, H, hd] -> [B, H, L, hd]
        let head = |i: usize| -> Result<Tensor> { Ok(qkv.i((.., .., i))?.transpose(1, 2)?.contiguous()?) };
        let q = rope.apply(&head(0)?, l)?;
        let k = rope.apply(&head(1)?, l)?;
        let v = head(2)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut att = (q.matmul(&k.t()?)? * scale)?;
        if let Some(mask) = mask {
            att = att.broadcast_add(mask)?;
        }
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let o = att.matmul(&v)?.transpose(1, 2)?.reshape((b, l, d))?;
        let x = (x + self.linear(1, &o, lora)?.broadcast_mul(gate_msa)?)?;
        let h = modulate(&self.norm2.forward(&x)?, shift_mlp, scale_mlp)?;
        let h = self.linear(3, &super::ops::gelu_tanh(&self.linear(2, &h, lora)?)?, lora)?;
        Ok((x + h.broadcast_mul(gate_mlp)?)?)
    }
}

/// Rotary tables `[max_len, hd/2]`; non-interleaved (`rotate_half`) layout.
#[derive(Clone, Debug)]
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    fn new(cfg: &ModelConfig) -> Result<Self> {
        let hd = cfg.head_dim();
        let inv: Vec<f32> =
            (0..hd / 2).map(|i| (1.0 / cfg.rope_base.powf(2.0 * i as f64 / hd as f64)) as f32).collect();
        let t: Vec<f32> = (0..cfg.max_length).map(|p| p as f32).collect();
        let t = Tensor::from_vec(t, (cfg.max_length, 1), &Device::Cpu)?;
        let inv = Tensor::from_vec(inv, (1, hd / 2), &Device::Cpu)?;
        let freqs = t.broadcast_mul(&inv)?;
        Ok(Rope { cos: freqs.cos()?, sin: freqs.sin()? })
    }
    fn apply(&self, x: &Tensor, l: usize) -> Result<Tensor> {
        let cos = self.cos.narrow(0, 0, l)?.contiguous()?;
        let sin = self.sin.narrow(0, 0, l)?.contiguous()?;
        Ok(candle_nn::rotary_emb::rope(x, &cos, &sin)?)
    }
}

/// The whole backbone plus the text output head.
#[derive(Clone, Debug)]
pub struct Dit {
    pub cfg: ModelConfig,
    embedding: Tensor,
    sigma_map: TimestepEmbedder,
    blocks: Vec<Block>,
    final_norm: LayerNorm,
    final_ada: Linear,
    output: Linear,
    rope: Rope,
    /// With time conditioning off, `c` is constant: all adaLN vectors are
    /// computed once here instead of on every step.
    constant_modulation: Option<(Vec<Modulation>, Modulation)>,
}

impl Dit {
    /// Loads and checks every tensor the config needs.
    pub fn load(file: &WeightFile, cfg: ModelConfig, mode: MatmulMode) -> Result<Self> {
        cfg.validate()?;
        // A tensor the config does not use means the config and the weights
        // disagree (e.g. n_layers edited): refuse rather than drop weights.
        let wanted: std::collections::HashSet<String> = cfg.tensor_shapes().into_iter().map(|(n, _)| n).collect();
        let unexpected: Vec<&str> =
            file.tensors.iter().map(|t| t.name.as_str()).filter(|n| !wanted.contains(*n)).collect();
        if !unexpected.is_empty() {
            return Err(Error::format(
                file.path.display(),
                format!("tensors not used by the config: {unexpected:?} (does aios.config match the weights?)"),
            ));
        }
        let (v, d) = (cfg.vocab_size, cfg.hidden_size);
        let raw = file.require("vocab_embed.embedding")?;
        quant::linear::check_shape(file, "vocab_embed.embedding", &raw.shape, &[v, d])?;
        let embedding = quant::load_f32(file, raw)?;
        let sigma_map = TimestepEmbedder::load(file, cfg.cond_dim, mode)?;
        let blocks = (0..cfg.n_layers).map(|i| Block::load(file, i, &cfg, mode)).collect::<Result<Vec<_>>>()?;
        let final_norm = LayerNorm::load(file, "output_layer.norm_final.weight", d, cfg.norm_eps)?;
        let final_ada = Linear::load(file, "output_layer.adaLN_modulation", 2 * d, cfg.cond_dim, true, mode)?;
        let output = Linear::load(file, "output_layer.linear", v, d, true, mode)?;
        let rope = Rope::new(&cfg)?;
        let mut model =
            Dit { cfg, embedding, sigma_map, blocks, final_norm, final_ada, output, rope, constant_modulation: None };
        if !model.cfg.time_conditioning {
            let c = model.sigma_map.forward(&Tensor::zeros(1, CDType::F32, &Device::Cpu)?)?;
            model.constant_modulation = Some(model.modulations(&c)?);
        }
        Ok(model)
    }

    fn modulations(&self, c: &Tensor) -> Result<(Vec<Modulation>, Modulation)> {
        let blocks = self.blocks.iter().map(|b| Modulation::compute(&b.ada, c, 6)).collect::<Result<Vec<_>>>()?;
        Ok((blocks, Modulation::compute(&self.final_ada, c, 2)?))
    }

    /// Raw logits `[B, L, V]` for tokens `[B, L]`. `sigma` (`[B]`, the noise
    /// level) is used only when the model is time-conditioned.
    pub fn forward(&self, tokens: &Tensor, sigma: Option<&Tensor>) -> Result<Tensor> {
        self.forward_at(tokens, sigma, None, &ActiveLora::default())
    }

    /// Like [`Dit::forward`], but the output layer runs only at `positions`
    /// (all if None): logits `[B, positions.len(), V]`. `lora` adds the active
    /// adapters' updates (unmerged, so any base dtype works).
    pub fn forward_at(
        &self,
        tokens: &Tensor,
        sigma: Option<&Tensor>,
        positions: Option<&[usize]>,
        lora: &ActiveLora,
    ) -> Result<Tensor> {
        let (b, l) = tokens.dims2()?;
        if l == 0 || l > self.cfg.max_length {
            return Err(Error::Input(format!("sequence length {l} is outside 1..={}", self.cfg.max_length)));
        }
        let computed;
        let (block_mods, final_mod) = match &self.constant_modulation {
            Some((bm, fm)) => (bm, fm),
            None => {
                let sigma = match sigma {
                    Some(s) => s.to_dtype(CDType::F32)?,
                    None => Tensor::zeros(b, CDType::F32, &Device::Cpu)?,
                };
                computed = self.modulations(&self.sigma_map.forward(&sigma)?)?;
                (&computed.0, &computed.1)
            }
        };
        let mut x = self.embedding.index_select(&tokens.flatten_all()?, 0)?.reshape((b, l, self.cfg.hidden_size))?;
        let mask = if self.cfg.causal { Some(causal_mask(l)?) } else { None };
        for (block, m) in self.blocks.iter().zip(block_mods) {
            x = block.forward(&x, m, &self.rope, mask.as_ref(), lora)?;
        }
        if let Some(pos) = positions {
            if let Some(&bad) = pos.iter().find(|&&p| p >= l) {
                return Err(Error::Input(format!("position {bad} is outside the sequence of length {l}")));
            }
            if pos.len() < l {
                let idx = Tensor::from_vec(pos.iter().map(|&p| p as u32).collect::<Vec<_>>(), pos.len(), &Device::Cpu)?;
                x = x.index_select(&idx, 1)?;
            }
        }
        let [shift, scale] = &final_mod.0[..] else { unreachable!("final modulation has 2 parts") };
        let h = modulate(&self.final_norm.forward(&x)?, shift, scale)?;
        lora.apply("output_layer.linear", &h, self.output.forward(&h)?)
    }

    /// A copy with the adapters' updates merged into the weights (`W + s B A`).
    /// Needs f32 weights in every targeted layer.
    pub fn fused(&self, lora: &ActiveLora) -> Result<Dit> {
        let mut model = self.clone();
        for name in lora.module_names() {
            let delta = lora.dense_delta(name)?.expect("listed module");
            let layer = if name == "output_layer.linear" {
                &mut model.output
            } else {
                model
                    .blocks
                    .iter_mut()
                    .find_map(|b| b.linear_mut(name))
                    .ok_or_else(|| Error::Config(format!("adapter module {name:?} is not in this model")))?
            };
            layer.add_to_weight(&delta).map_err(|e| Error::Input(format!("cannot fuse into {name}: {e}")))?;
        }
        Ok(model)
    }

    /// Parameter counts: (backbone, text heads = token embedding + output projection).
    pub fn parameter_split(&self) -> (usize, usize) {
        let is_head = |n: &str| n == "vocab_embed.embedding" || n.starts_with("output_layer.linear.");
        self.cfg.tensor_shapes().iter().fold((0, 0), |(backbone, heads), (name, shape)| {
            let n: usize = shape.iter().product();
            if is_head(name) {
                (backbone, heads + n)
            } else {
                (backbone + n, heads)
            }
        })
    }
}

fn causal_mask(l: usize) -> Result<Tensor> {
    let m: Vec<f32> = (0..l).flat_map(|i| (0..l).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY })).collect();
    Ok(Tensor::from_vec(m, (1, 1, l, l), &Device::Cpu)?)
}
