//! ControlNets (`aios.kind = controlnet`, written by `aios_train.controlnet`):
//! a trainable copy of the first N blocks that reads a control input and
//! adds its zero-initialised projections to the base's residual stream.
//!
//! ```text
//! h_0 = x + input(control)               x: the base's embedded canvas
//! h_i = block_i[W + s B A](h_{i-1})      the base's block with the file's low-rank delta
//! x_i = block_i(x_{i-1}) + scale * zero_i(h_i)
//! ```
//!
//! The copy is stored as a low-rank delta on the base's own weights (as
//! Control-LoRA stores ControlNets), so it runs on the base's blocks with an
//! [`ActiveLora`] of its own: over f32 or quantised bases alike, and the file
//! stays under a tenth of the base. Tensors: `blocks.{i}.{module}.lora_A/B`,
//! `input.weight/bias`, `zero.{i}.weight/bias`, all f32.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use super::lora::{factor, ActiveLora, LoraAdapter, LoraPair};
use crate::error::{Error, Result};
use crate::format::WeightFile;
use crate::model::ModelConfig;
use crate::quant::{Linear, MatmulMode};

/// Block modules the copy's delta covers (the LoRA targets of a block).
const MODULES: [&str; 4] = ["attn_qkv", "attn_out", "mlp.0", "mlp.2"];
/// Ranks above this are not a low-rank copy any more.
const MAX_RANK: usize = 1024;

/// What a ControlNet reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlKind {
    /// A token sequence laid over the text canvas (then `[PAD]`), embedded by
    /// the base's token embedding: e.g. the keys a JSON object must have.
    Tokens,
    /// An image the size of the image head's (e.g. an edge map, in [-1, 1]),
    /// patchified like the image head, on the canvas's image rows.
    Image,
}

impl ControlKind {
    pub fn name(self) -> &'static str {
        match self {
            ControlKind::Tokens => "tokens",
            ControlKind::Image => "image",
        }
    }
}

#[derive(Deserialize)]
struct FileConfig {
    control: String,
    n_blocks: usize,
    rank: usize,
    alpha: f64,
    base_fingerprint: String,
    base_config: serde_json::Value,
}

/// A validated ControlNet file.
pub struct ControlNet {
    pub path: PathBuf,
    pub kind: ControlKind,
    pub n_blocks: usize,
    pub rank: usize,
    /// The copy's delta on blocks `0..n_blocks`, at scale alpha / rank.
    pub(crate) copy: ActiveLora,
    pub(crate) input: Linear,
    pub(crate) zero: Vec<Linear>,
    /// Stored parameters (for the REQ-8 budget: < 10% of the base).
    pub parameters: usize,
}

impl std::fmt::Debug for ControlNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlNet")
            .field("path", &self.path)
            .field("kind", &self.kind)
            .field("n_blocks", &self.n_blocks)
            .field("rank", &self.rank)
            .finish()
    }
}

impl ControlNet {
    /// Loads `path` and checks it against the base's config and fingerprint;
    /// every mismatch is a clear error and nothing is half-loaded.
    pub fn load(path: impl AsRef<Path>, cfg: &ModelConfig, base_fingerprint: Option<&str>) -> Result<Self> {
        let path = path.as_ref();
        let file = WeightFile::open(path)?;
        let bad = |msg: String| Error::format(path.display(), msg);
        if file.kind != "controlnet" {
            return Err(bad(format!("this is a {:?} file, not a ControlNet (aios.kind = controlnet)", file.kind)));
        }
        let json = file.config_json().ok_or_else(|| bad("no aios.config metadata".into()))?;
        let c: FileConfig = serde_json::from_str(json).map_err(|e| bad(format!("invalid ControlNet config: {e}")))?;
        let kind = match c.control.as_str() {
            "tokens" => ControlKind::Tokens,
            "image" => ControlKind::Image,
            other => return Err(bad(format!("unknown control {other:?} (known: tokens, image)"))),
        };
        super::check_base(path, &c.base_fingerprint, &c.base_config, cfg, base_fingerprint)?;
        if c.n_blocks == 0 || c.n_blocks > cfg.n_layers {
            return Err(bad(format!("n_blocks {} is outside 1..={}", c.n_blocks, cfg.n_layers)));
        }
        if c.rank == 0 || c.rank > MAX_RANK {
            return Err(bad(format!("rank {} is outside 1..={MAX_RANK}", c.rank)));
        }
        if !c.alpha.is_finite() {
            return Err(bad(format!("alpha {} is not finite", c.alpha)));
        }
        if kind == ControlKind::Image && !cfg.has_image() {
            return Err(bad("an image ControlNet needs a base with an image head".into()));
        }
        let (d, f) = (cfg.hidden_size, cfg.mlp_ratio * cfg.hidden_size);
        let shapes = [(3 * d, d), (d, d), (f, d), (d, f)];
        let mut modules = BTreeMap::new();
        for i in 0..c.n_blocks {
            for (m, &(out, inp)) in MODULES.iter().zip(&shapes) {
                let name = format!("blocks.{i}.{m}");
                let a = factor(&file, &format!("{name}.lora_A"), [c.rank, inp])?;
                let b = factor(&file, &format!("{name}.lora_B"), [out, c.rank])?;
                modules.insert(name, LoraPair { a, b });
            }
        }
        let in_width = match kind {
            ControlKind::Tokens => d,
            ControlKind::Image => cfg.image_channels * cfg.image_patch * cfg.image_patch,
        };
        // Small f32 layers: always the packed f32 kernel, whatever the base's mode.
        let mode = MatmulMode::default();
        let input = Linear::load(&file, "input", d, in_width, true, mode)?;
        let zero = (0..c.n_blocks)
            .map(|i| Linear::load(&file, &format!("zero.{i}"), d, d, true, mode))
            .collect::<Result<Vec<_>>>()?;
        let expected = 8 * c.n_blocks + 2 + 2 * c.n_blocks;
        if file.tensors.len() != expected {
            return Err(bad(format!(
                "{} tensors, expected {expected} for {} blocks (extra tensors are not part of a ControlNet)",
                file.tensors.len(),
                c.n_blocks
            )));
        }
        let parameters = file.tensors.iter().map(|t| t.numel()).sum();
        let adapter = LoraAdapter {
            path: path.to_path_buf(),
            rank: c.rank,
            alpha: c.alpha,
            use_rslora: false,
            base_fingerprint: c.base_fingerprint,
            modules,
            student: None,
        };
        let copy = ActiveLora::build(&[("copy".into(), Arc::new(adapter), 1.0)])?;
        Ok(ControlNet {
            path: path.to_path_buf(),
            kind,
            n_blocks: c.n_blocks,
            rank: c.rank,
            copy,
            input,
            zero,
            parameters,
        })
    }
}

/// A control input, as a generation passes it (one sequence's worth; a batch
/// of canvases shares it).
#[derive(Clone, Debug, PartialEq)]
pub enum ControlValue {
    /// Token ids laid over the text canvas from position 0, `[PAD]`-filled.
    Tokens(Vec<u32>),
    /// `C*H*W` pixels in [-1, 1].
    Image(Vec<f32>),
}

/// One ControlNet applied in a forward pass: the net, its scale, its input.
#[derive(Clone, Copy, Debug)]
pub struct AppliedControl<'a> {
    pub net: &'a ControlNet,
    pub scale: f32,
    pub value: &'a ControlValue,
}
