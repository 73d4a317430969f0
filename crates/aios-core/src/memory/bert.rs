//! The BERT encoder of all-MiniLM-L6-v2 on plain f32 buffers.
//!
//! Why not candle-transformers' `BertModel`: on 2 cores it embedded a single
//! query in 9-14 ms, almost all per-op overhead (about 150 candle ops, each
//! allocating and waking a spin-waiting pool) rather than arithmetic
//! (bench/RESULTS.md). Here every linear layer is one call of our kernel on
//! weights packed at load ([`crate::quant::packed`]) over all tokens of
//! all sentences at once, with no padding: tokens of different sentences only
//! meet in attention, which runs per sentence. Results do not depend on the
//! thread count or on which sentences share a batch.

use std::collections::HashMap;

use candle_core::Tensor;
use rayon::prelude::*;

use crate::quant::packed::PackedMatrix;
use crate::{Error, Result};

#[derive(Debug, Clone, serde::Deserialize)]
pub struct BertConfig {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_types")]
    pub type_vocab_size: usize,
    pub vocab_size: usize,
}

fn default_eps() -> f64 {
    1e-12
}
fn default_act() -> String {
    "gelu".into()
}
fn default_types() -> usize {
    2
}

struct Dense {
    w: PackedMatrix,
    b: Vec<f32>,
}

impl Dense {
    fn forward(&self, x: &[f32], rows: usize) -> Vec<f32> {
        self.w.linear(x, Some(&self.b), rows)
    }
}

struct Norm {
    w: Vec<f32>,
    b: Vec<f32>,
    eps: f32,
}

impl Norm {
    /// Row-wise LayerNorm in place (statistics in f64 for stability).
    fn apply(&self, x: &mut [f32]) {
        let d = self.w.len();
        x.par_chunks_mut(d * 64).for_each(|block| {
            for row in block.chunks_exact_mut(d) {
                let mean = row.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
                let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
                let inv = 1.0 / (var + self.eps as f64).sqrt();
                for ((v, w), b) in row.iter_mut().zip(&self.w).zip(&self.b) {
                    *v = ((*v as f64 - mean) * inv) as f32 * w + b;
                }
            }
        });
    }
}

struct Layer {
    /// query, key and value stacked: `[3H, H]`.
    qkv: Dense,
    attn_out: Dense,
    attn_norm: Norm,
    inter: Dense,
    out: Dense,
    out_norm: Norm,
}

pub struct Bert {
    cfg: BertConfig,
    word: Vec<f32>,
    pos: Vec<f32>,
    token_type0: Vec<f32>,
    emb_norm: Norm,
    layers: Vec<Layer>,
}

/// Exact GELU, `x * Phi(x)`, as BERT (and PyTorch's default) computes it.
fn gelu(x: &mut [f32]) {
    x.par_chunks_mut(16_384).for_each(|c| c.iter_mut().for_each(|v| *v *= normal_cdf(*v)));
}

/// Phi(x) = erfc(-x / sqrt 2) / 2 from the Chebyshev fit of erfc in
/// Numerical Recipes (`erfcc`, relative error < 1.2e-7 everywhere, so both
/// tails stay accurate). Branch-free, so the GELU loop vectorises; libm's
/// scalar `erff` was a fifth of an embedding's time.
#[inline(always)]
fn normal_cdf(x: f32) -> f32 {
    let z = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -1.265_512_2
        + t * (1.000_023_7
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_204 + t * (1.488_515_9 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let erfc = t * crate::kernels::exp_f32(-z * z + poly);
    // erfc(z) / 2 is Phi(-|x|); reflect for positive x.
    let tail = 0.5 * erfc;
    if x >= 0.0 {
        1.0 - tail
    } else {
        tail
    }
}

/// Removes `name` (or `bert.<name>`) from the tensors as f32, checking its shape and values.
fn take(t: &mut HashMap<String, Tensor>, name: &str, shape: &[usize], what: &str) -> Result<Vec<f32>> {
    let tensor = t
        .remove(name)
        .or_else(|| t.remove(&format!("bert.{name}")))
        .ok_or_else(|| Error::format(what, format!("missing tensor {name}")))?;
    if tensor.dims() != shape {
        return Err(Error::format(what, format!("{name} has shape {:?}, expected {shape:?}", tensor.dims())));
    }
    let v: Vec<f32> = tensor.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?;
    if v.iter().any(|x| !x.is_finite()) {
        return Err(Error::format(what, format!("{name} holds NaN or infinity")));
    }
    Ok(v)
}

fn norm(t: &mut HashMap<String, Tensor>, p: &str, h: usize, eps: f32, what: &str) -> Result<Norm> {
    Ok(Norm { w: take(t, &format!("{p}.weight"), &[h], what)?, b: take(t, &format!("{p}.bias"), &[h], what)?, eps })
}

/// Row-major `[n_out, n_in]` weight and bias of one linear layer.
fn weight_bias(
    t: &mut HashMap<String, Tensor>,
    p: &str,
    n_out: usize,
    n_in: usize,
    what: &str,
) -> Result<(Vec<f32>, Vec<f32>)> {
    Ok((take(t, &format!("{p}.weight"), &[n_out, n_in], what)?, take(t, &format!("{p}.bias"), &[n_out], what)?))
}

fn dense(t: &mut HashMap<String, Tensor>, p: &str, n_out: usize, n_in: usize, what: &str) -> Result<Dense> {
    let (w, b) = weight_bias(t, p, n_out, n_in, what)?;
    Ok(Dense { w: PackedMatrix::pack(&w, n_out, n_in), b })
}

impl Bert {
    /// Builds the encoder from safetensors tensors (an optional `bert.` prefix is accepted).
    pub fn load(mut t: HashMap<String, Tensor>, cfg: BertConfig, what: &str) -> Result<Self> {
        if cfg.hidden_act != "gelu" {
            return Err(Error::format(what, format!("hidden_act {:?} is not supported (gelu only)", cfg.hidden_act)));
        }
        let (h, heads) = (cfg.hidden_size, cfg.num_attention_heads);
        if h == 0 || heads == 0 || h % heads != 0 {
            return Err(Error::format(what, format!("hidden_size {h} is not a multiple of {heads} heads")));
        }
        let eps = cfg.layer_norm_eps as f32;
        let t = &mut t;
        let emb_norm = norm(t, "embeddings.LayerNorm", h, eps, what)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("encoder.layer.{i}");
            let q = weight_bias(t, &format!("{p}.attention.self.query"), h, h, what)?;
            let k = weight_bias(t, &format!("{p}.attention.self.key"), h, h, what)?;
            let v = weight_bias(t, &format!("{p}.attention.self.value"), h, h, what)?;
            let qkv = Dense { w: PackedMatrix::pack(&[q.0, k.0, v.0].concat(), 3 * h, h), b: [q.1, k.1, v.1].concat() };
            layers.push(Layer {
                qkv,
                attn_out: dense(t, &format!("{p}.attention.output.dense"), h, h, what)?,
                attn_norm: norm(t, &format!("{p}.attention.output.LayerNorm"), h, eps, what)?,
                inter: dense(t, &format!("{p}.intermediate.dense"), cfg.intermediate_size, h, what)?,
                out: dense(t, &format!("{p}.output.dense"), h, cfg.intermediate_size, what)?,
                out_norm: norm(t, &format!("{p}.output.LayerNorm"), h, eps, what)?,
            });
        }
        let word = take(t, "embeddings.word_embeddings.weight", &[cfg.vocab_size, h], what)?;
        let pos = take(t, "embeddings.position_embeddings.weight", &[cfg.max_position_embeddings, h], what)?;
        let types = take(t, "embeddings.token_type_embeddings.weight", &[cfg.type_vocab_size, h], what)?;
        Ok(Bert { token_type0: types[..h].to_vec(), cfg, word, pos, emb_norm, layers })
    }

    pub fn hidden_size(&self) -> usize {
        self.cfg.hidden_size
    }

    /// Mean over tokens of the last hidden state, one row per sentence
    /// (`[n, hidden]`, not normalised). Every id must be < vocab_size and every
    /// sentence 1..=max_position_embeddings tokens (the tokenizer truncates).
    pub fn mean_pooled(&self, sentences: &[&[u32]]) -> Result<Vec<f32>> {
        let h = self.cfg.hidden_size;
        let mut starts = Vec::with_capacity(sentences.len() + 1);
        starts.push(0usize);
        for s in sentences {
            if s.is_empty() || s.len() > self.cfg.max_position_embeddings {
                return Err(Error::Input(format!(
                    "a sentence has {} tokens (1..={})",
                    s.len(),
                    self.cfg.max_position_embeddings
                )));
            }
            if let Some(bad) = s.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
                return Err(Error::Input(format!("token id {bad} is outside the vocabulary")));
            }
            starts.push(starts.last().unwrap() + s.len());
        }
        let rows = *starts.last().unwrap();
        let mut x = vec![0f32; rows * h];
        for (s, ids) in sentences.iter().enumerate() {
            for (p, &id) in ids.iter().enumerate() {
                let row = &mut x[(starts[s] + p) * h..(starts[s] + p + 1) * h];
                let (w, ps) = (&self.word[id as usize * h..(id as usize + 1) * h], &self.pos[p * h..(p + 1) * h]);
                for i in 0..h {
                    row[i] = w[i] + ps[i] + self.token_type0[i];
                }
            }
        }
        self.emb_norm.apply(&mut x);
        for layer in &self.layers {
            x = self.layer(layer, x, rows, &starts);
        }
        let mut pooled = vec![0f32; sentences.len() * h];
        for (s, out) in pooled.chunks_exact_mut(h).enumerate() {
            let n = (starts[s + 1] - starts[s]) as f32;
            for row in x[starts[s] * h..starts[s + 1] * h].chunks_exact(h) {
                out.iter_mut().zip(row).for_each(|(o, v)| *o += v);
            }
            out.iter_mut().for_each(|o| *o /= n);
        }
        Ok(pooled)
    }

    fn layer(&self, l: &Layer, x: Vec<f32>, rows: usize, starts: &[usize]) -> Vec<f32> {
        let h = self.cfg.hidden_size;
        let qkv = l.qkv.forward(&x, rows);
        let ctx = self.attention(&qkv, starts);
        let mut a = l.attn_out.forward(&ctx, rows);
        a.iter_mut().zip(&x).for_each(|(a, x)| *a += x);
        l.attn_norm.apply(&mut a);
        let mut inter = l.inter.forward(&a, rows);
        gelu(&mut inter);
        let mut out = l.out.forward(&inter, rows);
        out.iter_mut().zip(&a).for_each(|(o, a)| *o += a);
        l.out_norm.apply(&mut out);
        debug_assert_eq!(out.len(), rows * h);
        out
    }

    /// Bidirectional softmax attention within each sentence; `qkv` rows are
    /// `[q | k | v]`, heads contiguous inside each part. One task per
    /// (sentence, head), so a single query still uses every core.
    fn attention(&self, qkv: &[f32], starts: &[usize]) -> Vec<f32> {
        let h = self.cfg.hidden_size;
        let heads = self.cfg.num_attention_heads;
        let hd = h / heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let n_sent = starts.len() - 1;
        let parts: Vec<Vec<f32>> = (0..n_sent * heads)
            .into_par_iter()
            .map(|task| {
                let (s, head) = (task / heads, task % heads);
                let (o, len) = (starts[s], starts[s + 1] - starts[s]);
                let at = |i: usize, part: usize| {
                    let off = (o + i) * 3 * h + part * h + head * hd;
                    &qkv[off..off + hd]
                };
                let mut ctx = vec![0f32; len * hd];
                let mut p = vec![0f32; len];
                for (i, out) in ctx.chunks_exact_mut(hd).enumerate() {
                    let q = at(i, 0);
                    let mut max = f32::NEG_INFINITY;
                    for (j, pj) in p.iter_mut().enumerate() {
                        *pj = crate::kernels::dot(q, at(j, 1)) * scale;
                        max = max.max(*pj);
                    }
                    p.iter_mut().for_each(|pj| *pj = crate::kernels::exp_f32(*pj - max));
                    let sum: f32 = p.iter().sum();
                    for (j, pj) in p.iter().enumerate() {
                        let w = pj / sum;
                        out.iter_mut().zip(at(j, 2)).for_each(|(c, v)| *c += w * v);
                    }
                }
                ctx
            })
            .collect();
        let mut ctx = vec![0f32; starts[n_sent] * h];
        for (task, part) in parts.iter().enumerate() {
            let (s, head) = (task / heads, task % heads);
            for (i, row) in part.chunks_exact(hd).enumerate() {
                let off = (starts[s] + i) * h + head * hd;
                ctx[off..off + hd].copy_from_slice(row);
            }
        }
        ctx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_cdf_is_accurate_in_both_tails() {
        let (mut worst_abs, mut worst_rel_tail) = (0f64, 0f64);
        for i in -12000..12000 {
            let x = (i as f32 / 1000.0) as f64;
            let want = 0.5 * libm::erfc(-x / std::f64::consts::SQRT_2);
            let got = normal_cdf(x as f32) as f64;
            worst_abs = worst_abs.max((got - want).abs());
            if x < 0.0 {
                worst_rel_tail = worst_rel_tail.max((got - want).abs() / want);
            }
        }
        // f32 rounding of -z^2 inside exp limits the far tail (x < -8) to ~2e-5 relative.
        assert!(worst_abs < 2e-7 && worst_rel_tail < 5e-5, "{worst_abs} {worst_rel_tail}");
    }
}
