//! The MDLM diffusion transformer (kuleshov-group/mdlm `models/dit.py`), with
//! the same parameter names minus MDLM's `backbone.` prefix, so a converted
//! MDLM checkpoint runs unchanged.
//!
//! Shapes: tokens `[B, L]` (u32) -> logits `[B, L, V]` (f32, raw: the
//! absorbing-state SUBS masking is the sampler's job).

use crate::threads::{parallel_for, parallel_row_blocks, parallel_rows};
use candle_core::{Device, Tensor};

use super::audio::AudioHead;
use super::config::{Modality, ModelConfig};
use super::image::ImageHead;
use super::text::TextHead;
use crate::adapter::{ActiveLora, AppliedControl, ControlKind, ControlValue};
use crate::error::{Error, Result};
use crate::format::WeightFile;
use crate::kernels::{exp_f32, max_and_nan, mean_var_f64, sum_by_lanes, SendPtr};
use crate::quant::packed::PackedMatrix;
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
    /// row `r` uses `shift(r)` and `scale(r)`. Statistics in f64.
    fn forward_modulated<'a>(
        &self,
        x: &[f32],
        shift: impl Fn(usize) -> &'a [f32] + Sync,
        scale: impl Fn(usize) -> &'a [f32] + Sync,
    ) -> Vec<f32> {
        let d = self.weight.len();
        let mut out = vec![0f32; x.len()];
        parallel_rows(&mut out, d, ROWS_PER_TASK, |first, block| {
            for (i, o) in block.chunks_exact_mut(d).enumerate() {
                let r = first + i;
                self.normalize_row(&x[r * d..(r + 1) * d], shift(r), scale(r), o);
            }
        });
        out
    }

    /// `x += gate(r) * y` row by row, then [`LayerNorm::forward_modulated`]
    /// of the new `x`: the residual add and the next norm in one pass.
    fn add_gated_then_forward<'a>(
        &self,
        x: &mut [f32],
        y: &[f32],
        gate: impl Fn(usize) -> &'a [f32] + Sync,
        shift: impl Fn(usize) -> &'a [f32] + Sync,
        scale: impl Fn(usize) -> &'a [f32] + Sync,
    ) -> Vec<f32> {
        let d = self.weight.len();
        let mut out = vec![0f32; x.len()];
        parallel_row_blocks((x, d), (&mut out, d), ROWS_PER_TASK, |first, xs, os| {
            for (i, (xr, o)) in xs.chunks_exact_mut(d).zip(os.chunks_exact_mut(d)).enumerate() {
                let r = first + i;
                add_gated_row(xr, &y[r * d..(r + 1) * d], gate(r));
                self.normalize_row(xr, shift(r), scale(r), o);
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

/// The adaLN shift/scale/... vectors: `rows` conditioning rows (1 = shared by
/// the batch; B = one per sequence; one per sequence and canvas segment on a
/// multimodal canvas) x `parts` vectors of length `d`.
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

    /// Part `i` of conditioning row `b`.
    fn part(&self, b: usize, i: usize) -> &[f32] {
        let r = if self.rows == 1 { 0 } else { b };
        &self.data[(r * self.parts + i) * self.d..(r * self.parts + i + 1) * self.d]
    }
}

/// Rows per task of the row-wise passes: 64 rows make 8 tasks of a few
/// microseconds.
const ROWS_PER_TASK: usize = 8;

/// `x += gate(r) * y` row by row.
fn add_gated<'a>(x: &mut [f32], y: &[f32], gate: impl Fn(usize) -> &'a [f32] + Sync) {
    let d = gate(0).len();
    parallel_rows(x, d, ROWS_PER_TASK, |first, block| {
        for (i, xr) in block.chunks_exact_mut(d).enumerate() {
            let r = first + i;
            add_gated_row(xr, &y[r * d..(r + 1) * d], gate(r));
        }
    });
}

/// Which conditioning row of a [`Modulation`] each row of `x` uses: before
/// the last block's gather (`full`, `[B * L]`) and after it (`kept`).
#[derive(Clone, Debug)]
struct RowIndex {
    full: Vec<u32>,
    kept: Vec<u32>,
}

impl RowIndex {
    /// Row `r` of sequence `r / l` uses conditioning row `seq_row(r / l, r % l)`;
    /// after keeping `keep` positions the same rule applies to those positions.
    fn new(batch: usize, l: usize, keep: Option<&[usize]>, seq_row: impl Fn(usize, usize) -> usize) -> Self {
        let full = (0..batch * l).map(|r| seq_row(r / l, r % l) as u32).collect();
        let kept = match keep {
            Some(k) => (0..batch * k.len()).map(|r| seq_row(r / k.len(), k[r % k.len()]) as u32).collect(),
            None => vec![],
        };
        RowIndex { full, kept }
    }
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
    fn forward(
        &self,
        x: Vec<f32>,
        l: usize,
        m: &Modulation,
        pass: &Pass,
        keep: Option<&[usize]>,
        idx: &RowIndex,
    ) -> Result<Vec<f32>> {
        let Pass { rope, causal, lora } = *pass;
        let d = self.norm1.weight.len();
        let rows = x.len() / d;
        let batch = rows / l;
        let full = &idx.full;
        // Parts: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp.
        let h = self.norm1.forward_modulated(&x, |r| m.part(full[r] as usize, 0), |r| m.part(full[r] as usize, 1));
        let qkv = self.linear(0, &h, rows, lora, Activation::Identity)?;
        let o = attention(&qkv, l, d, self.n_heads, rope, causal, keep);
        let (mut x, l, ri) = match keep {
            Some(keep) => (gather_rows(&x, d, l, keep), keep.len(), &idx.kept),
            None => (x, l, full),
        };
        let rows = batch * l;
        let a = self.linear(1, &o, rows, lora, Activation::Identity)?;
        let part = |r: usize, i: usize| m.part(ri[r] as usize, i);
        let h = self.norm2.add_gated_then_forward(&mut x, &a, |r| part(r, 2), |r| part(r, 3), |r| part(r, 4));
        let u = self.linear(2, &h, rows, lora, Activation::GeluTanh)?;
        let y = self.linear(3, &u, rows, lora, Activation::Identity)?;
        add_gated(&mut x, &y, |r| part(r, 5));
        Ok(x)
    }
}

/// `x += residual` (both `[B * L, D]`), or only the rows `kept` of each
/// sequence when the block kept those alone.
fn add_residual(x: &mut [f32], residual: &[f32], d: usize, l: usize, kept: Option<&[usize]>) {
    match kept {
        None => x.iter_mut().zip(residual).for_each(|(x, r)| *x += r),
        Some(keep) => x.iter_mut().zip(&gather_rows(residual, d, l, keep)).for_each(|(x, r)| *x += r),
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
    text: TextHead,
    sigma_map: TimestepEmbedder,
    blocks: Vec<Block>,
    final_norm: LayerNorm,
    final_ada: Linear,
    rope: Rope,
    /// With time conditioning off, `c` is constant: all adaLN vectors are
    /// computed once here instead of on every step.
    constant_modulation: Option<(Vec<Modulation>, Modulation)>,
    /// `[3, D]`, one vector per [`Modality`]; present iff a continuous head is.
    modality_embed: Option<Vec<f32>>,
    image: Option<ImageHead>,
    audio: Option<AudioHead>,
}

/// One multimodal canvas batch: `[text | image patches | audio frame groups]`
/// per sequence, each segment optional, each with its own noise level.
#[derive(Clone, Copy, Debug, Default)]
pub struct CanvasInput<'a> {
    pub batch: usize,
    /// `[B, Lt]` token ids (Lt may be 0).
    pub tokens: &'a [u32],
    /// MDLM sigma per sequence (used only with time conditioning).
    pub text_sigma: Option<&'a [f32]>,
    /// Noisy images `[B, C*H*W]` (in [-1, 1] units) and their times `[B]`.
    pub image: Option<(&'a [f32], &'a [f32])>,
    /// Noisy normalised log-mels `[B, frames*mels]` and their times `[B]`.
    pub audio: Option<(&'a [f32], &'a [f32])>,
    /// Text positions that need logits (None = all).
    pub text_positions: Option<&'a [usize]>,
    /// ControlNets applied in this pass, with their inputs.
    pub controls: &'a [AppliedControl<'a>],
}

/// What [`Dit::forward_canvas`] returns: raw text logits `[B, P, V]` and the
/// v-predictions `[B, values]` of the continuous segments (empty if absent).
#[derive(Clone, Debug, Default)]
pub struct CanvasOutput {
    pub text: Vec<f32>,
    pub image: Vec<f32>,
    pub audio: Vec<f32>,
}

/// Continuous time `t` in [0, 1] enters the timestep embedding as `1000 t`
/// (`aios_train.heads.CONTINUOUS_TIME_SCALE`).
pub const CONTINUOUS_TIME_SCALE: f32 = 1000.0;

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
        let d = cfg.hidden_size;
        let text = TextHead::load(file, &cfg, mode)?;
        let sigma_map = TimestepEmbedder::load(file, cfg.cond_dim, mode)?;
        let blocks = (0..cfg.n_layers).map(|i| Block::load(file, i, &cfg, mode)).collect::<Result<Vec<_>>>()?;
        let final_norm = LayerNorm::load(file, "output_layer.norm_final.weight", d, cfg.norm_eps)?;
        let final_ada = Linear::load(file, "output_layer.adaLN_modulation", 2 * d, cfg.cond_dim, true, mode)?;
        let rope = Rope::new(&cfg);
        let modality_embed = if cfg.multimodal() {
            let raw = file.require("modality_embed.embedding")?;
            quant::linear::check_shape(file, "modality_embed.embedding", &raw.shape, &[3, d])?;
            Some(quant::load_f32(file, raw)?.flatten_all()?.to_vec1()?)
        } else {
            None
        };
        let image = cfg.has_image().then(|| ImageHead::load(file, &cfg, mode)).transpose()?;
        let audio = cfg.has_audio().then(|| AudioHead::load(file, &cfg, mode)).transpose()?;
        let mut model = Dit {
            cfg,
            text,
            sigma_map,
            blocks,
            final_norm,
            final_ada,
            rope,
            constant_modulation: None,
            modality_embed,
            image,
            audio,
        };
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
        let logits = self.logits(&ids, b, sigma.as_deref(), positions, lora, &[])?;
        let p = positions.map_or(l, <[usize]>::len);
        Ok(Tensor::from_vec(logits, (b, p, self.cfg.vocab_size), &Device::Cpu)?)
    }

    /// Raw logits `[B, P, V]` (row-major) for `tokens` (`[B, L]`, row-major)
    /// at `positions` (P of them; all L if None). `sigma` has one value per
    /// batch item (zeros if None) and matters only with time conditioning.
    /// `controls` are ControlNets steering this pass (token controls only: a
    /// text-only pass has no image rows).
    pub fn logits(
        &self,
        tokens: &[u32],
        batch: usize,
        sigma: Option<&[f32]>,
        positions: Option<&[usize]>,
        lora: &ActiveLora,
        controls: &[AppliedControl],
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
        // Text rows of a multimodal model carry the text modality vector.
        let mut x = self.text.embed(tokens, self.modality_embed.as_deref().map(|me| &me[..d]));
        // Only the rows at `positions` reach the output layer, so the last
        // block computes only those after attention.
        let keep = positions.filter(|pos| !pos.iter().copied().eq(0..l));
        let last = self.blocks.len() - 1;
        let pass = Pass { rope: &self.rope, causal: self.cfg.causal, lora };
        // One conditioning row per sequence (or one shared by all).
        let idx = RowIndex::new(batch, l, keep, |b, _| b);
        let residuals = self.control_residuals(&x, l, (l, 0), block_mods, &idx, self.cfg.causal, controls)?;
        for (i, (block, m)) in self.blocks.iter().zip(block_mods).enumerate() {
            let kept = keep.filter(|_| i == last);
            x = block.forward(x, l, m, &pass, kept, &idx)?;
            if let Some(r) = residuals.get(i) {
                add_residual(&mut x, r, d, l, kept);
            }
        }
        // (A config has at least one block: `ModelConfig::validate`.)
        let p = keep.map_or(l, <[usize]>::len);
        let ri = if keep.is_some() { &idx.kept } else { &idx.full };
        let h = self.final_norm.forward_modulated(
            &x,
            |r| final_mod.part(ri[r] as usize, 0),
            |r| final_mod.part(ri[r] as usize, 1),
        );
        self.text.logits(&h, batch * p, lora)
    }

    /// One forward pass over a multimodal canvas (`aios_train`'s
    /// `DiT.forward_canvas`): each segment is embedded by its head plus its
    /// modality vector, gets its own adaLN conditioning (text: MDLM sigma;
    /// image/audio: `silu(sigma_map(1000 t))`), and all positions attend to
    /// all through the shared blocks; each head then reads its rows.
    pub fn forward_canvas(&self, input: &CanvasInput, lora: &ActiveLora) -> Result<CanvasOutput> {
        let cfg = &self.cfg;
        let (d, v) = (cfg.hidden_size, cfg.vocab_size);
        let me = self
            .modality_embed
            .as_deref()
            .ok_or_else(|| Error::Config("this is a text-only model: it has no image or audio head".into()))?;
        let batch = input.batch;
        if batch == 0 || !input.tokens.len().is_multiple_of(batch) {
            return crate::input_err!("{} tokens do not split into {batch} sequences", input.tokens.len());
        }
        let lt = input.tokens.len() / batch;
        if let Some(&bad) = input.tokens.iter().find(|&&t| t as usize >= v) {
            return crate::input_err!("token id {bad} is outside the vocabulary of {v}");
        }
        let check_t = |what: &str, values: &[f32], per: usize, t: &[f32]| -> Result<()> {
            if values.len() != batch * per || t.len() != batch {
                return crate::input_err!(
                    "{what}: expected {batch} x {per} values and {batch} times, got {} and {}",
                    values.len(),
                    t.len()
                );
            }
            if values.iter().chain(t).any(|x| !x.is_finite()) {
                return crate::input_err!("{what} contains NaN or infinity");
            }
            Ok(())
        };
        // Segments present, in canvas order: (embedded rows, positions, conditioning input per sequence).
        let mut segments: Vec<(Vec<f32>, usize, Vec<f32>)> = vec![];
        if lt > 0 {
            let x = self.text.embed(input.tokens, Some(&me[..d]));
            let sigma = match (cfg.time_conditioning, input.text_sigma) {
                (true, Some(s)) if s.len() == batch => s.to_vec(),
                (true, Some(s)) => return crate::input_err!("sigma has {} values for {batch} sequences", s.len()),
                _ => vec![0f32; batch],
            };
            segments.push((x, lt, sigma));
        }
        let image_rows = match (input.image, &self.image) {
            (None, _) => 0,
            (Some(_), None) => return Err(missing_head(cfg, Modality::Image)),
            (Some((px, t)), Some(head)) => {
                check_t("image", px, cfg.image_values(), t)?;
                let me = &me[Modality::Image as usize * d..][..d];
                segments.push((head.embed(px, batch, me)?, head.proj.positions, scaled(t)));
                head.proj.positions
            }
        };
        let audio_rows = match (input.audio, &self.audio) {
            (None, _) => 0,
            (Some(_), None) => return Err(missing_head(cfg, Modality::Audio)),
            (Some((mel, t)), Some(head)) => {
                check_t("audio", mel, cfg.audio_frames * cfg.audio_mels, t)?;
                let me = &me[Modality::Audio as usize * d..][..d];
                segments.push((head.embed(mel, batch, me)?, head.proj.positions, scaled(t)));
                head.proj.positions
            }
        };
        let l: usize = segments.iter().map(|s| s.1).sum();
        if l == 0 {
            return crate::input_err!("the canvas is empty");
        }
        if l > cfg.max_length {
            return crate::input_err!("canvas length {l} is outside 1..={}", cfg.max_length);
        }
        if let Some(&bad) = input.text_positions.unwrap_or(&[]).iter().find(|&&p| p >= lt) {
            return crate::input_err!("text position {bad} is outside the text segment of length {lt}");
        }
        // Interleave the segments back into sequences: [B, L, D].
        let mut x = Vec::with_capacity(batch * l * d);
        for b in 0..batch {
            for (rows, n, _) in &segments {
                x.extend_from_slice(&rows[b * n * d..(b + 1) * n * d]);
            }
        }
        // Conditioning rows: sequence-major, one per (sequence, segment).
        let nseg = segments.len();
        let mut cond_in = Vec::with_capacity(batch * nseg);
        for b in 0..batch {
            cond_in.extend(segments.iter().map(|s| s.2[b]));
        }
        let (block_mods, final_mod) = self.modulations(&self.sigma_map.forward(&cond_in)?, batch * nseg)?;
        let bounds: Vec<usize> = segments
            .iter()
            .scan(0, |acc, s| {
                *acc += s.1;
                Some(*acc)
            })
            .collect();
        let seg_of = |pos: usize| bounds.iter().position(|&e| pos < e).expect("position inside the canvas");
        let idx = RowIndex::new(batch, l, None, |b, pos| b * nseg + seg_of(pos));
        let pass = Pass { rope: &self.rope, causal: false, lora };
        let residuals = self.control_residuals(&x, l, (lt, image_rows), &block_mods, &idx, false, input.controls)?;
        for (i, (block, m)) in self.blocks.iter().zip(&block_mods).enumerate() {
            x = block.forward(x, l, m, &pass, None, &idx)?;
            if let Some(r) = residuals.get(i) {
                add_residual(&mut x, r, d, l, None);
            }
        }
        let h = self.final_norm.forward_modulated(
            &x,
            |r| final_mod.part(idx.full[r] as usize, 0),
            |r| final_mod.part(idx.full[r] as usize, 1),
        );
        let rows_of = |start: usize, positions: &mut dyn Iterator<Item = usize>| -> Vec<f32> {
            let ps: Vec<usize> = positions.collect();
            let mut out = Vec::with_capacity(batch * ps.len() * d);
            for b in 0..batch {
                for &p in &ps {
                    out.extend_from_slice(&h[(b * l + start + p) * d..][..d]);
                }
            }
            out
        };
        let mut out = CanvasOutput::default();
        if lt > 0 {
            let rows = match input.text_positions {
                Some(p) => rows_of(0, &mut p.iter().copied()),
                None => rows_of(0, &mut (0..lt)),
            };
            let n = rows.len() / d;
            if n > 0 {
                out.text = self.text.logits(&rows, n, lora)?;
            }
        }
        if let Some(head) = self.image.as_ref().filter(|_| image_rows > 0) {
            out.image = head.out(&rows_of(lt, &mut (0..image_rows)), batch)?;
        }
        if let Some(head) = self.audio.as_ref().filter(|_| audio_rows > 0) {
            out.audio = head.out(&rows_of(lt + image_rows, &mut (0..audio_rows)), batch)?;
        }
        Ok(out)
    }

    /// What the active ControlNets add after each block (`[B * L, D]` per
    /// block, scale applied, summed over nets; empty without controls). The
    /// canvas of each sequence starts with `segments.0` text rows followed by
    /// `segments.1` image rows; `mods` and `idx` are the base pass's.
    #[allow(clippy::too_many_arguments)]
    fn control_residuals(
        &self,
        x: &[f32],
        l: usize,
        segments: (usize, usize),
        mods: &[Modulation],
        idx: &RowIndex,
        causal: bool,
        controls: &[AppliedControl],
    ) -> Result<Vec<Vec<f32>>> {
        let d = self.cfg.hidden_size;
        let batch = x.len() / (l * d);
        let (lt, li) = segments;
        let active: Vec<&AppliedControl> = controls.iter().filter(|c| c.scale != 0.0).collect();
        if let Some(c) = controls.iter().find(|c| !c.scale.is_finite()) {
            return crate::input_err!("ControlNet scale must be finite, got {}", c.scale);
        }
        let depth = active.iter().map(|c| c.net.n_blocks).max().unwrap_or(0);
        let mut out = vec![vec![0f32; x.len()]; depth];
        for c in active {
            // The control's input rows (the same for every sequence of the batch) and where they start.
            let (start, rows) = match (c.net.kind, c.value) {
                (ControlKind::Tokens, ControlValue::Tokens(ids)) => {
                    if ids.len() != lt {
                        return crate::input_err!(
                            "token control has {} tokens for a text canvas of {lt} (pad it to the canvas)",
                            ids.len()
                        );
                    }
                    if let Some(&bad) = ids.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
                        return crate::input_err!("control token id {bad} is outside the vocabulary");
                    }
                    (0, c.net.input.forward_rows(&self.text.embed(ids, None), lt)?)
                }
                (ControlKind::Image, ControlValue::Image(px)) => {
                    let Some(head) = self.image.as_ref().filter(|_| li > 0) else {
                        return crate::input_err!("an image ControlNet needs an image on the canvas");
                    };
                    if px.len() != self.cfg.image_values() {
                        return crate::input_err!(
                            "control image has {} values, expected {} ({}x{}x{})",
                            px.len(),
                            self.cfg.image_values(),
                            self.cfg.image_channels,
                            self.cfg.image_size,
                            self.cfg.image_size
                        );
                    }
                    if px.iter().any(|v| !v.is_finite()) {
                        return crate::input_err!("control image contains NaN or infinity");
                    }
                    (lt, c.net.input.forward_rows(&head.patchify(px), li)?)
                }
                (kind, _) => {
                    return crate::input_err!("a {} ControlNet got a control input of the other kind", kind.name())
                }
            };
            let mut h = x.to_vec();
            for b in 0..batch {
                let seq = &mut h[(b * l + start) * d..];
                seq.iter_mut().zip(&rows).for_each(|(h, r)| *h += r);
            }
            let pass = Pass { rope: &self.rope, causal, lora: &c.net.copy };
            for (i, zero) in c.net.zero.iter().enumerate() {
                h = self.blocks[i].forward(h, l, &mods[i], &pass, None, idx)?;
                let z = zero.forward_rows(&h, batch * l)?;
                out[i].iter_mut().zip(&z).for_each(|(o, z)| *o += c.scale * z);
            }
        }
        Ok(out)
    }

    pub fn image_head(&self) -> Option<&ImageHead> {
        self.image.as_ref()
    }

    pub fn audio_head(&self) -> Option<&AudioHead> {
        self.audio.as_ref()
    }

    /// A copy with the adapters' updates merged into the weights (`W + s B A`).
    /// Needs f32 weights in every targeted layer.
    pub fn fused(&self, lora: &ActiveLora) -> Result<Dit> {
        let mut model = self.clone();
        for name in lora.module_names() {
            let delta = lora.dense_delta(name)?.expect("listed module");
            let layer = if name == super::text::OUTPUT_NAME {
                &mut model.text.output
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

    /// Parameter counts: the backbone (blocks, timestep MLP, final norm and
    /// adaLN, modality embedding) and each head (text = token embedding +
    /// output projection; image/audio = `*_head.*`), heads in [`Modality`] order.
    pub fn parameter_split(&self) -> (usize, Vec<(Modality, usize)>) {
        let head_of = |n: &str| {
            if n == "vocab_embed.embedding" || n.starts_with("output_layer.linear.") {
                Some(Modality::Text)
            } else if n.starts_with("image_head.") {
                Some(Modality::Image)
            } else if n.starts_with("audio_head.") {
                Some(Modality::Audio)
            } else {
                None
            }
        };
        let mut heads: Vec<(Modality, usize)> = self.cfg.heads().into_iter().map(|m| (m, 0)).collect();
        let mut backbone = 0;
        for (name, shape) in self.cfg.tensor_shapes() {
            let n: usize = shape.iter().product();
            match head_of(&name) {
                Some(m) => heads.iter_mut().find(|(h, _)| *h == m).expect("head listed").1 += n,
                None => backbone += n,
            }
        }
        (backbone, heads)
    }
}

fn scaled(t: &[f32]) -> Vec<f32> {
    t.iter().map(|&t| t * CONTINUOUS_TIME_SCALE).collect()
}

fn missing_head(cfg: &ModelConfig, m: Modality) -> Error {
    let has: Vec<&str> = cfg.heads().iter().map(|h| h.name()).collect();
    Error::Config(format!("this model has no {} head (it has: {})", m.name(), has.join(", ")))
}
