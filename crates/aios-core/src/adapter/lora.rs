//! LoRA adapters in the aios container (`aios.kind = lora`).
//!
//! Tensors: `<module>.lora_A` `[r, in]` and `<module>.lora_B` `[out, r]` for
//! each target module. `aios.config` (JSON): `rank`, `alpha`, `use_rslora`,
//! `target_modules` (full names such as `blocks.0.attn_qkv`) and
//! `base_fingerprint`; optional `distill` marks a consistency-distilled
//! student (`aios_train.lcm`: `modality`, `student_steps`, `guidance`); other
//! extra keys (training notes) are ignored. The layer
//! becomes `y = W x + b + scale * B (A x)` with `scale = alpha / r`, or
//! `alpha / sqrt(r)` with rsLoRA (peft's convention).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Tensor;
use serde::Deserialize;

use crate::format::WeightFile;
use crate::model::ModelConfig;
use crate::quant;
use crate::quant::packed::PackedMatrix;
use crate::{Error, Result};

/// Largest rank accepted (LoRA ranks are small; this catches corrupt files).
const MAX_RANK: usize = 4096;

#[derive(Debug, Deserialize)]
struct LoraFileConfig {
    rank: usize,
    alpha: f64,
    #[serde(default)]
    use_rslora: bool,
    target_modules: Vec<String>,
    base_fingerprint: String,
    /// The whole config of the base it was trained on; must equal the
    /// engine's (the fingerprint alone is only as good as its writer).
    base_config: serde_json::Value,
    #[serde(default)]
    distill: Option<DistillFileConfig>,
}

#[derive(Debug, Deserialize)]
struct DistillFileConfig {
    modality: String,
    student_steps: usize,
    #[serde(default)]
    guidance: f64,
}

/// What a consistency-distilled LoRA (LCM-LoRA) was trained for: the
/// modality it samples in few steps with the "lcm" sampler, its step count,
/// and the teacher's guidance it has built in.
#[derive(Clone, Debug, PartialEq)]
pub struct Student {
    pub modality: crate::model::Modality,
    pub student_steps: usize,
    pub guidance: f64,
}

/// `(out_features, in_features)` of every module an adapter may target.
pub fn target_shapes(cfg: &ModelConfig) -> BTreeMap<String, (usize, usize)> {
    let (d, f) = (cfg.hidden_size, cfg.mlp_ratio * cfg.hidden_size);
    let mut m = BTreeMap::new();
    for i in 0..cfg.n_layers {
        m.insert(format!("blocks.{i}.attn_qkv"), (3 * d, d));
        m.insert(format!("blocks.{i}.attn_out"), (d, d));
        m.insert(format!("blocks.{i}.mlp.0"), (f, d));
        m.insert(format!("blocks.{i}.mlp.2"), (d, f));
    }
    m.insert("output_layer.linear".into(), (cfg.vocab_size, d));
    m
}

/// One module's factors, f32.
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// `[r, in]`
    pub a: Tensor,
    /// `[out, r]`
    pub b: Tensor,
}

/// A validated adapter file.
#[derive(Debug)]
pub struct LoraAdapter {
    pub path: PathBuf,
    pub rank: usize,
    pub alpha: f64,
    pub use_rslora: bool,
    pub base_fingerprint: String,
    pub modules: BTreeMap<String, LoraPair>,
    /// Set for a consistency-distilled student.
    pub student: Option<Student>,
}

impl LoraAdapter {
    /// Loads `path` and checks it against the base model's config and
    /// fingerprint: every mismatch is a clear error, nothing is half-loaded.
    pub fn load(path: impl AsRef<Path>, cfg: &ModelConfig, base_fingerprint: Option<&str>) -> Result<Self> {
        let path = path.as_ref();
        let file = WeightFile::open(path)?;
        let bad = |msg: String| Error::format(path.display(), msg);
        if file.kind != "lora" {
            return Err(bad(format!("this is a {:?} file, not a LoRA adapter (aios.kind = lora)", file.kind)));
        }
        let json = file.config_json().ok_or_else(|| bad("no aios.config metadata".into()))?;
        let c: LoraFileConfig = serde_json::from_str(json).map_err(|e| bad(format!("invalid adapter config: {e}")))?;
        if c.rank == 0 || c.rank > MAX_RANK {
            return Err(bad(format!("rank {} is outside 1..={MAX_RANK}", c.rank)));
        }
        if !c.alpha.is_finite() {
            return Err(bad(format!("alpha {} is not finite", c.alpha)));
        }
        super::check_base(path, &c.base_fingerprint, &c.base_config, cfg, base_fingerprint)?;
        if c.target_modules.is_empty() {
            return Err(bad("target_modules is empty".into()));
        }
        let shapes = target_shapes(cfg);
        let mut modules = BTreeMap::new();
        for m in &c.target_modules {
            let Some(&(out, inp)) = shapes.get(m) else {
                return Err(bad(format!(
                    "unknown target module {m:?}; this model's are blocks.<0..{}>.{{attn_qkv, attn_out, mlp.0, mlp.2}} \
                     and output_layer.linear",
                    cfg.n_layers
                )));
            };
            if modules.contains_key(m) {
                return Err(bad(format!("target module {m:?} is listed twice")));
            }
            let a = factor(&file, &format!("{m}.lora_A"), [c.rank, inp])?;
            let b = factor(&file, &format!("{m}.lora_B"), [out, c.rank])?;
            modules.insert(m.clone(), LoraPair { a, b });
        }
        let expected = 2 * modules.len();
        if file.tensors.len() != expected {
            let extra: Vec<&str> = file
                .tensors
                .iter()
                .map(|t| t.name.as_str())
                .filter(|n| !modules.keys().any(|m| *n == format!("{m}.lora_A") || *n == format!("{m}.lora_B")))
                .collect();
            return Err(bad(format!("tensors not listed in target_modules: {extra:?}")));
        }
        let student = match c.distill {
            None => None,
            Some(d) => {
                let modality = match d.modality.as_str() {
                    "image" => crate::model::Modality::Image,
                    "audio" => crate::model::Modality::Audio,
                    other => return Err(bad(format!("distill.modality {other:?}: an LCM-LoRA is for image or audio"))),
                };
                if d.student_steps == 0 || !d.guidance.is_finite() || d.guidance < 0.0 {
                    return Err(bad(format!(
                        "distill: student_steps {} must be >= 1 and guidance {} finite and >= 0",
                        d.student_steps, d.guidance
                    )));
                }
                Some(Student { modality, student_steps: d.student_steps, guidance: d.guidance })
            }
        };
        Ok(LoraAdapter {
            student,
            path: path.to_path_buf(),
            rank: c.rank,
            alpha: c.alpha,
            use_rslora: c.use_rslora,
            base_fingerprint: c.base_fingerprint,
            modules,
        })
    }

    /// peft's scaling: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }
}

/// One f32 factor `name` of exactly `shape` (also read by ControlNet files).
pub(crate) fn factor(file: &WeightFile, name: &str, shape: [usize; 2]) -> Result<Tensor> {
    let raw = file.require(name)?;
    if raw.shape != shape {
        return Err(Error::format(
            file.path.display(),
            format!("{name} has shape {:?}, expected {shape:?} (rank or base model mismatch)", raw.shape),
        ));
    }
    quant::load_f32(file, raw)
}

/// Per module, the active adapters stacked along the rank: `A^T` `[in, R]`
/// and `(sum_i w_i s_i B_i)^T` `[R, out]`, so any number of adapters costs
/// two thin matmuls per targeted layer.
#[derive(Debug, Default)]
pub struct ActiveLora {
    /// Per module: the stacked `A` (`[R, in]`) and scaled `B` (`[out, R]`),
    /// packed for the f32 kernel, so an update is two thin packed matmuls.
    modules: HashMap<String, (PackedMatrix, PackedMatrix)>,
    /// Name and weight of each adapter in the set, for reporting.
    pub weights: Vec<(String, f32)>,
    /// The consistency-distilled students in the set (weight != 0), by name.
    pub students: Vec<(String, Student)>,
}

impl ActiveLora {
    pub fn empty() -> Arc<Self> {
        Arc::new(ActiveLora::default())
    }

    /// Stacks `(name, adapter, weight)`; weights must be finite (checked by the caller).
    pub fn build(set: &[(String, Arc<LoraAdapter>, f32)]) -> Result<Self> {
        let mut per_module: BTreeMap<&str, (Vec<Tensor>, Vec<Tensor>)> = BTreeMap::new();
        for (_, adapter, w) in set {
            let s = adapter.scale() * *w as f64;
            for (m, pair) in &adapter.modules {
                let entry = per_module.entry(m.as_str()).or_default();
                entry.0.push(pair.a.clone());
                entry.1.push((&pair.b * s)?);
            }
        }
        let mut modules = HashMap::new();
        for (m, (a, b)) in per_module {
            let a = Tensor::cat(&a, 0)?; // [R, in]
            let b = Tensor::cat(&b, 1)?; // [out, R]
            let ((r, n_in), (n_out, _)) = (a.dims2()?, b.dims2()?);
            let a = PackedMatrix::pack(&a.flatten_all()?.to_vec1()?, r, n_in);
            let b = PackedMatrix::pack(&b.flatten_all()?.to_vec1()?, n_out, r);
            modules.insert(m.to_string(), (a, b));
        }
        let students = set
            .iter()
            .filter(|(_, _, w)| *w != 0.0)
            .filter_map(|(n, a, _)| Some((n.clone(), a.student.clone()?)))
            .collect();
        Ok(ActiveLora { modules, weights: set.iter().map(|(n, _, w)| (n.clone(), *w)).collect(), students })
    }

    pub fn is_empty(&self) -> bool {
        self.modules.is_empty()
    }

    /// Whether an active adapter updates module `name`.
    pub fn targets(&self, name: &str) -> bool {
        self.modules.contains_key(name)
    }

    /// `y += delta(x)` for module `name`, over `rows` rows of `x` (`[rows, in]`)
    /// and `y` (`[rows, out]`); nothing when no adapter targets it.
    pub fn apply(&self, name: &str, x: &[f32], rows: usize, y: &mut [f32]) {
        let Some((a, b)) = self.modules.get(name) else { return };
        // Thin products (rank 8-32): waking the pool would cost more than they do.
        let delta = b.linear_serial(&a.linear_serial(x, None, rows), None, rows);
        y.iter_mut().zip(&delta).for_each(|(y, d)| *y += d);
    }

    /// The dense `[out, in]` update `B A` of module `name`, for fusing into the base.
    pub fn dense_delta(&self, name: &str) -> Result<Option<Vec<f32>>> {
        let Some((a, b)) = self.modules.get(name) else { return Ok(None) };
        let (r, n_in, n_out) = (a.rows(), a.cols(), b.rows());
        // Row o of B A is sum_r B[o, r] A[r, :]: the rows of `(B A)` are `B` applied to
        // the columns of A, i.e. `A^T` run through B as a linear layer.
        let a_cols = transpose(&a.unpack(), r, n_in); // [in, R]
        let delta_t = b.linear(&a_cols, None, n_in); // [in, out]
        Ok(Some(transpose(&delta_t, n_in, n_out)))
    }

    pub fn module_names(&self) -> impl Iterator<Item = &str> {
        self.modules.keys().map(String::as_str)
    }
}

/// Writes a random adapter for `cfg` (tests and benchmarks): `modules` get
/// `A ~ U(-1,1)/sqrt(in)` and `B ~ std` noise, so the update is non-zero.
#[allow(clippy::too_many_arguments)]
pub fn write_random_lora(
    path: impl AsRef<Path>,
    cfg: &ModelConfig,
    base_fingerprint: &str,
    modules: &[&str],
    rank: usize,
    alpha: f64,
    use_rslora: bool,
    seed: u64,
) -> Result<()> {
    use crate::format::{write_weight_file, DType, TensorToWrite, KEY_CONFIG};
    use crate::sampler::rng::Stream;
    let shapes = target_shapes(cfg);
    let mut encoded = vec![];
    for (i, m) in modules.iter().enumerate() {
        let &(out, inp) = shapes.get(*m).ok_or_else(|| Error::Input(format!("unknown module {m:?}")))?;
        for (j, (suffix, shape, scale)) in
            [("lora_A", [rank, inp], 1.0 / (inp as f64).sqrt()), ("lora_B", [out, rank], 0.05)].into_iter().enumerate()
        {
            let mut rng = Stream::new(seed, 1 + i as u64, j as u64);
            let values: Vec<f32> =
                (0..shape[0] * shape[1]).map(|_| ((rng.uniform() * 2.0 - 1.0) * scale) as f32).collect();
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            encoded.push((format!("{m}.{suffix}"), shape.to_vec(), bytes));
        }
    }
    let tensors: Vec<TensorToWrite> =
        encoded.iter().map(|(n, s, b)| TensorToWrite { name: n, dtype: DType::F32, shape: s, data: b }).collect();
    let mut targets: Vec<&str> = modules.to_vec();
    targets.sort_unstable();
    let config = serde_json::json!({
        "rank": rank, "alpha": alpha, "use_rslora": use_rslora,
        "target_modules": targets, "base_fingerprint": base_fingerprint,
        "base_config": serde_json::to_value(cfg).expect("config serialises"), "dropout": 0.0,
    });
    let meta = BTreeMap::from([(KEY_CONFIG.to_string(), config.to_string())]);
    write_weight_file(path, "lora", &meta, &tensors)
}

/// Row-major `[rows, cols]` -> `[cols, rows]`.
fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; m.len()];
    for i in 0..rows {
        for j in 0..cols {
            t[j * rows + i] = m[i * cols + j];
        }
    }
    t
}
