//! The MDLM diffusion transformer (kuleshov-group/mdlm `models/dit.py`), with
//! the same parameter names minus MDLM's `backbone.` prefix, so a converted
//! MDLM checkpoint runs unchanged.
//!
//! Shapes: tokens `[B, L]` (u32) -> logits `[B, L, V]` (f32, raw: the
//! absorbing-state SUBS masking is the sampler's job).

use crate::threads::{parallel_for, parallel_row_blocks, parallel_rows};
use candle_core::{Device, Tensor};

use super::config::ModelConfig;
use super::ops::{exp_f32, max_and_nan, mean_var_f64, sum_by_lanes};
use crate::adapter::ActiveLora;
use crate::error::{Error, Result};
use crate::format::WeightFile;
use crate::quant::packed::{PackedMatrix, SendPtr};
use crate::quant::{self, Activation, Linear, MatmulMode};

const FREQ_EMBED_DIM: usize = 256;
const MAX_PERIOD: f64 = 10_000.0;

/// MDLM's LayerNorm: no bias, learned weight.
#[derive(Clone, Debug)]
struct LayerNorm {
    weight: Vec<f32>,
    eps: f32,
}

impl LayerNorm {
    fn load(file: &WeightFile, name: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(LayerNorm { weight: load_vector(file, name, dim)?, eps: eps as f32 })
    }

    /// `norm(x) * (1 + scale) + shift` for each row of `x` (`[B * L, D]`);
    /// batch item `b` uses `shift(b)` and `scale(b)`. Statistics in f64.
    fn forward_modulated<'a>(
        &self,
        x: &[f32],
        l: usize,
        shift: impl Fn(usize) -> &'a [f32] + Sync,
        scale: impl Fn(usize) -> &'a [f32] + Sync,
    ) -> Vec<f32> {
        let d = self.weight.len();
        let mut out = vec![0f32; x.len()];
        parallel_rows(&mut out, d, ROWS_PER_TASK, |first, block| {
            for (i, o) in block.chunks_exact_mut(d).enumerate() {
                let r = first + i;
                self.normalize_row(&x[r * d..(r + 1) * d], shift(r / l), scale(r / l), o);
            }
        });
        out
    }

    /// `x += gate(b) * y` row by row, then [`LayerNorm::forward_modulated`]
    /// of the new `x`: the residual add and the next norm in one pass.
    fn add_gated_then_forward<'a>(
        &self,
        x: &mut [f32],
        y: &[f32],
        l: usize,
        gate: impl Fn(usize) -> &'a [f32] + Sync,
        shift: impl Fn(usize) -> &'a [f32] + Sync,
        scale: impl Fn(usize) -> &'a [f32] + Sync,
    ) -> Vec<f32> {
        let d = self.weight.len();
        let mut out = vec![0f32; x.len()];
        parallel_row_blocks((x, d), (&mut out, d), ROWS_PER_TASK, |first, xs, os| {
            for (i, (xr, o)) in xs.chunks_exact_mut(d).zip(os.chunks_exact_mut(d)).enumerate() {
                let r = first + i;
                add_gated_row(xr, &y[r * d..(r + 1) * d], gate(r / l));
                self.normalize_row(xr, shift(r / l), scale(r / l), o);
            }
        });
        out
    }

    fn normalize_row(&self, row: &[f32], shift: &[f32], scale: &[f32], out: &mut [f32]) {
        let (mean, var) = mean_var_f64(row);
        let inv = (1.0 / (var + self.eps as f64).sqrt()) as f32;
        let mean = mean as f32;
        for i in 0..row.len() {
            out[i] = ((row[i] - mean) * inv * self.weight[i]) * (1.0 + scale[i]) + shift[i];
        }
    }
}

fn load_vector(file: &WeightFile, name: &str, dim: usize) -> Result<Vec<f32>> {
    let raw = file.require(name)?;
    quant::linear::check_shape(file, name, &raw.shape, &[dim])?;
    Ok(quant::load_f32(file, raw)?.to_vec1()?)
}

fn silu(x: &mut [f32]) {
    x.iter_mut().for_each(|v| *v /= 1.0 + (-*v).exp());
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

    /// `c = silu(mlp(cat(cos, sin)(sigma * freqs)))`, `[B, cond]`.
    fn forward(&self, sigma: &[f32]) -> Result<Vec<f32>> {
        let half = FREQ_EMBED_DIM / 2;
        let freqs: Vec<f32> = (0..half).map(|i| (-(MAX_PERIOD.ln()) * i as f64 / half as f64).exp() as f32).collect();
        let features: Vec<f32> = sigma
            .iter()
            .flat_map(|&s| {
                let args: Vec<f32> = freqs.iter().map(|&f| s * f).collect();
                args.iter().map(|a| a.cos()).chain(args.iter().map(|a| a.sin())).collect::<Vec<_>>()
            })
            .collect();
        let mut h = self.fc1.forward_rows(&features, sigma.len())?;
        silu(&mut h);
        let mut c = self.fc2.forward_rows(&h, sigma.len())?;
        silu(&mut c);
        Ok(c)
    }
}

/// The adaLN shift/scale/... vectors: `rows` (1 = shared by the batch, or B)
/// x `parts` vectors of length `d`.
#[derive(Clone, Debug)]
struct Modulation {
    rows: usize,
    parts: usize,
    d: usize,
    data: Vec<f32>,
}

impl Modulation {
    fn compute(ada: &Linear, c: &[f32], rows: usize, parts: usize) -> Result<Self> {
        let data = ada.forward_rows(c, rows)?;
        Ok(Modulation { rows, parts, d: ada.out_features / parts, data })
    }

    /// Part `i` for batch item `b`.
    fn part(&self, b: usize, i: usize) -> &[f32] {
        let r = if self.rows == 1 { 0 } else { b };
        &self.data[(r * self.parts + i) * self.d..(r * self.parts + i + 1) * self.d]
    }
}

/// Rows per task of the row-wise passes: 64 rows make 8 tasks of a few
/// microseconds.
const ROWS_PER_TASK: usize = 8;

/// `x += gate(b) * y` row by row.
fn add_gated<'a>(x: &mut [f32], y: &[f32], l: usize, gate: impl Fn(usize) -> &'a [f32] + Sync) {
    let d = gate(0).len();
    parallel_rows(x, d, ROWS_PER_TASK, |first, block| {
        for (i, xr) in block.chunks_exact_mut(d).enumerate() {
            let r = first + i;
            add_gated_row(xr, &y[r * d..(r + 1) * d], gate(r / l));
        }
    });
}

fn add_gated_row(x: &mut [f32], y: &[f32], gate: &[f32]) {
    for i in 0..x.len() {
        x[i] += gate[i] * y[i];
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

    /// `act(linear(x) + the active adapters' update)`.
    fn linear(&self, which: usize, x: &[f32], rows: usize, lora: &ActiveLora, act: Activation) -> Result<Vec<f32>> {
        let layer = [&self.attn_qkv, &self.attn_out, &self.mlp_in, &self.mlp_out][which];
        if !lora.targets(&self.names[which]) {
            return layer.forward_rows_act(x, rows, act);
        }
        let mut y = layer.forward_rows(x, rows)?;
        lora.apply(&self.names[which], x, rows, &mut y);
        act.apply(&mut y);
        Ok(y)
    }

    fn linear_mut(&mut self, name: &str) -> Option<&mut Linear> {
        let i = self.names.iter().position(|n| n == name)?;
        [&mut self.attn_qkv, &mut self.attn_out, &mut self.mlp_in, &mut self.mlp_out].into_iter().nth(i)
    }

    /// One block over `x` (`[B * L, D]`). With `keep`, only those positions
    /// of each sequence leave the block (`[B * keep.len(), D]`): in the last
    /// block nothing reads the other rows after attention, whose keys and
    /// values still come from every position.
    fn forward(&self, x: Vec<f32>, l: usize, m: &Modulation, pass: &Pass, keep: Option<&[usize]>) -> Result<Vec<f32>> {
        let Pass { rope, causal, lora } = *pass;
        let d = self.norm1.weight.len();
        let rows = x.len() / d;
        let batch = rows / l;
        // Parts: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp.
        let h = self.norm1.forward_modulated(&x, l, |b| m.part(b, 0), |b| m.part(b, 1));
        let qkv = self.linear(0, &h, rows, lora, Activation::Identity)?;
        let o = attention(&qkv, l, d, self.n_heads, rope, causal, keep);
        let (mut x, l) = match keep {
            Some(keep) => (gather_rows(&x, d, l, keep), keep.len()),
            None => (x, l),
        };
        let rows = batch * l;
        let a = self.linear(1, &o, rows, lora, Activation::Identity)?;
        let h = self.norm2.add_gated_then_forward(&mut x, &a, l, |b| m.part(b, 2), |b| m.part(b, 3), |b| m.part(b, 4));
        let u = self.linear(2, &h, rows, lora, Activation::GeluTanh)?;
        let y = self.linear(3, &u, rows, lora, Activation::Identity)?;
        add_gated(&mut x, &y, l, |b| m.part(b, 5));
        Ok(x)
    }
}

/// What every block of one forward pass shares.
#[derive(Clone, Copy)]
struct Pass<'a> {
    rope: &'a Rope,
    causal: bool,
    lora: &'a ActiveLora,
}

/// Rows `positions` of each length-`l` sequence in `x` (`[B * L, D]`).
fn gather_rows(x: &[f32], d: usize, l: usize, positions: &[usize]) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len() / l * positions.len());
    for seq in x.chunks_exact(l * d) {
        for &p in positions {
            out.extend_from_slice(&seq[p * d..(p + 1) * d]);
        }
    }
    out
}

/// Softmax attention, one task per (batch item, head). `qkv` rows are
/// `[q | k | v]` with heads contiguous inside each part; the output rows are
/// `[head 0 | head 1 | ...]`, one per query position: `queries` of each
/// sequence, or all. With `causal`, position i sees 0..=i. Both products run
/// on the packed kernel: packing K and V costs O(L hd), the products O(L^2 hd).
fn attention(
    qkv: &[f32],
    l: usize,
    d: usize,
    heads: usize,
    rope: &Rope,
    causal: bool,
    queries: Option<&[usize]>,
) -> Vec<f32> {
    let hd = d / heads;
    let batch = qkv.len() / (3 * d * l);
    let all: Vec<usize>;
    let queries = match queries {
        Some(q) => q,
        None => {
            all = (0..l).collect();
            &all
        }
    };
    let nq = queries.len();
    let scale = (1.0 / (hd as f64).sqrt()) as f32;
    let mut out = vec![0f32; batch * nq * d];
    let out_ptr = SendPtr(out.as_mut_ptr());
    let out_ptr = &out_ptr;
    parallel_for(batch * heads, |task| {
        let (b, head) = (task / heads, task % heads);
        let (mut q, mut k, mut v) =
            (Vec::with_capacity(nq * hd), Vec::with_capacity(l * hd), Vec::with_capacity(l * hd));
        let seq = &qkv[b * l * 3 * d..(b + 1) * l * 3 * d];
        let at = |pos: usize, part: usize| &seq[pos * 3 * d + part * d + head * hd..][..hd];
        for pos in 0..l {
            rope.rotate_into(at(pos, 1), pos, &mut k);
            v.extend_from_slice(at(pos, 2));
        }
        for &pos in queries {
            rope.rotate_into(at(pos, 0), pos, &mut q);
        }
        let mut scores = PackedMatrix::pack(&k, l, hd).linear_serial(&q, None, nq); // [nq, L]
        for (row, &pos) in scores.chunks_exact_mut(l).zip(queries) {
            let seen = if causal { pos + 1 } else { l };
            // max(s * scale) = max(s) * scale exactly: scaling by a positive
            // number is monotonic, rounding too.
            let max = max_and_nan(&row[..seen]).0 * scale;
            row[..seen].iter_mut().for_each(|s| *s = exp_f32(*s * scale - max));
            row[seen..].iter_mut().for_each(|s| *s = 0.0);
            let inv = 1.0 / sum_by_lanes(row);
            row.iter_mut().for_each(|s| *s *= inv);
        }
        let o = PackedMatrix::pack_transposed(&v, hd, l).linear_serial(&scores, None, nq); // [nq, hd]
        for (i, o) in o.chunks_exact(hd).enumerate() {
            // SAFETY: row b * nq + i, columns [head * hd, (head + 1) * hd) of
            // `out` belong to this task only; the row exists (out has batch * nq rows).
            unsafe { std::ptr::copy_nonoverlapping(o.as_ptr(), out_ptr.0.add((b * nq + i) * d + head * hd), hd) };
        }
    });
    out
}

/// Rotary tables `[max_len, hd/2]`; non-interleaved (`rotate_half`) layout.
#[derive(Clone, Debug)]
struct Rope {
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rope {
    fn new(cfg: &ModelConfig) -> Self {
        let half = cfg.head_dim() / 2;
        let inv: Vec<f32> =
            (0..half).map(|i| (1.0 / cfg.rope_base.powf(2.0 * i as f64 / (2 * half) as f64)) as f32).collect();
        let freqs: Vec<f32> = (0..cfg.max_length).flat_map(|p| inv.iter().map(move |&f| p as f32 * f)).collect();
        Rope { half, cos: freqs.iter().map(|f| f.cos()).collect(), sin: freqs.iter().map(|f| f.sin()).collect() }
    }

    /// Appends one head's vector `x` (length `2 * half`) rotated to
    /// position `pos` to `out`.
    fn rotate_into(&self, x: &[f32], pos: usize, out: &mut Vec<f32>) {
        let half = self.half;
        let (cos, sin) = (&self.cos[pos * half..(pos + 1) * half], &self.sin[pos * half..(pos + 1) * half]);
        let (x1, x2) = x.split_at(half);
        out.extend((0..half).map(|i| x1[i] * cos[i] - x2[i] * sin[i]));
        out.extend((0..half).map(|i| x1[i] * sin[i] + x2[i] * cos[i]));
    }
}

/// The whole backbone plus the text output head.
///
/// The forward pass runs on plain row-major f32 buffers (`[B * L, D]`): at
/// diffusion sizes (64-128 rows) candle's per-op allocation and thread
/// wake-ups cost as much as the arithmetic (`perf`, bench/RESULTS.md), so
/// only the linear layers call out: to the packed f32 kernel, our int8
/// kernel or candle's quantised matmul. Parallel loops run on the engine's
/// `threads::Pool`.
#[derive(Clone, Debug)]
pub struct Dit {
    pub cfg: ModelConfig,
    /// `[vocab, D]`.
    embedding: Vec<f32>,
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
        let embedding = quant::load_f32(file, raw)?.flatten_all()?.to_vec1()?;
        let sigma_map = TimestepEmbedder::load(file, cfg.cond_dim, mode)?;
        let blocks = (0..cfg.n_layers).map(|i| Block::load(file, i, &cfg, mode)).collect::<Result<Vec<_>>>()?;
        let final_norm = LayerNorm::load(file, "output_layer.norm_final.weight", d, cfg.norm_eps)?;
        let final_ada = Linear::load(file, "output_layer.adaLN_modulation", 2 * d, cfg.cond_dim, true, mode)?;
        let output = Linear::load(file, "output_layer.linear", v, d, true, mode)?;
        let rope = Rope::new(&cfg);
        let mut model =
            Dit { cfg, embedding, sigma_map, blocks, final_norm, final_ada, output, rope, constant_modulation: None };
        if !model.cfg.time_conditioning {
            let c = model.sigma_map.forward(&[0.0])?;
            model.constant_modulation = Some(model.modulations(&c, 1)?);
        }
        Ok(model)
    }

    fn modulations(&self, c: &[f32], rows: usize) -> Result<(Vec<Modulation>, Modulation)> {
        let blocks = self.blocks.iter().map(|b| Modulation::compute(&b.ada, c, rows, 6)).collect::<Result<Vec<_>>>()?;
        Ok((blocks, Modulation::compute(&self.final_ada, c, rows, 2)?))
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
        let ids = tokens.to_dtype(candle_core::DType::U32)?.flatten_all()?.to_vec1::<u32>()?;
        let sigma = sigma.map(|s| s.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()).transpose()?;
        let logits = self.logits(&ids, b, sigma.as_deref(), positions, lora)?;
        let p = positions.map_or(l, <[usize]>::len);
        Ok(Tensor::from_vec(logits, (b, p, self.cfg.vocab_size), &Device::Cpu)?)
    }

    /// Raw logits `[B, P, V]` (row-major) for `tokens` (`[B, L]`, row-major)
    /// at `positions` (P of them; all L if None). `sigma` has one value per
    /// batch item (zeros if None) and matters only with time conditioning.
    pub fn logits(
        &self,
        tokens: &[u32],
        batch: usize,
        sigma: Option<&[f32]>,
        positions: Option<&[usize]>,
        lora: &ActiveLora,
    ) -> Result<Vec<f32>> {
        let (d, v) = (self.cfg.hidden_size, self.cfg.vocab_size);
        if batch == 0 || tokens.is_empty() || !tokens.len().is_multiple_of(batch) {
            return Err(Error::Input(format!("{} tokens do not split into {batch} sequences", tokens.len())));
        }
        let l = tokens.len() / batch;
        if l > self.cfg.max_length {
            return Err(Error::Input(format!("sequence length {l} is outside 1..={}", self.cfg.max_length)));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= v) {
            return Err(Error::Input(format!("token id {bad} is outside the vocabulary of {v}")));
        }
        if let Some(&bad) = positions.unwrap_or(&[]).iter().find(|&&p| p >= l) {
            return Err(Error::Input(format!("position {bad} is outside the sequence of length {l}")));
        }
        let computed;
        let (block_mods, final_mod) = match &self.constant_modulation {
            Some((bm, fm)) => (bm, fm),
            None => {
                let zeros = vec![0f32; batch];
                let sigma = sigma.unwrap_or(&zeros);
                if sigma.len() != batch {
                    return Err(Error::Input(format!("sigma has {} values for {batch} sequences", sigma.len())));
                }
                computed = self.modulations(&self.sigma_map.forward(sigma)?, batch)?;
                (&computed.0, &computed.1)
            }
        };
        let mut x = Vec::with_capacity(tokens.len() * d);
        for &t in tokens {
            x.extend_from_slice(&self.embedding[t as usize * d..(t as usize + 1) * d]);
        }
        // Only the rows at `positions` reach the output layer, so the last
        // block computes only those after attention.
        let keep = positions.filter(|pos| !pos.iter().copied().eq(0..l));
        let last = self.blocks.len() - 1;
        let pass = Pass { rope: &self.rope, causal: self.cfg.causal, lora };
        for (i, (block, m)) in self.blocks.iter().zip(block_mods).enumerate() {
            x = block.forward(x, l, m, &pass, keep.filter(|_| i == last))?;
        }
        // (A config has at least one block: `ModelConfig::validate`.)
        let p = keep.map_or(l, <[usize]>::len);
        let h = self.final_norm.forward_modulated(&x, p, |b| final_mod.part(b, 0), |b| final_mod.part(b, 1));
        let mut logits = self.output.forward_rows(&h, batch * p)?;
        lora.apply("output_layer.linear", &h, batch * p, &mut logits);
        Ok(logits)
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
