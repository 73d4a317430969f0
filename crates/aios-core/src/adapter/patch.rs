//! Tensor patches in the aios container (`aios.kind = patch`).
//!
//! Selective fine-tuning changes a few whole tensors of the base (the layers
//! gradient attribution picked); a patch stores only those, under the base's
//! own names and shapes, in any float dtype. `aios.config` (JSON):
//! `base_fingerprint`, `base_config` (the base's whole config) and `tensors`
//! (the names, to catch a file that lost or gained rows); extra keys
//! (training notes) are ignored. Applying it means loading the base again
//! with those tensors swapped in, so a patch works over any base dtype (the
//! patched tensors keep the patch's dtype) and removing it is going back to
//! the base model, exactly.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::format::WeightFile;
use crate::model::ModelConfig;
use crate::{Error, Result};

#[derive(Debug, Deserialize)]
struct PatchFileConfig {
    base_fingerprint: String,
    base_config: serde_json::Value,
    tensors: Vec<String>,
}

/// A validated patch file.
#[derive(Debug)]
pub struct TensorPatch {
    pub path: PathBuf,
    pub base_fingerprint: String,
    file: WeightFile,
}

impl TensorPatch {
    /// Loads `path` and checks it against the base: kind, fingerprint,
    /// config, and every tensor a tensor of the base with the base's shape.
    pub fn load(path: impl AsRef<Path>, cfg: &ModelConfig, base_fingerprint: Option<&str>) -> Result<Self> {
        let path = path.as_ref();
        let file = WeightFile::open(path)?;
        let bad = |msg: String| Error::format(path.display(), msg);
        if file.kind != "patch" {
            return Err(bad(format!("this is a {:?} file, not a tensor patch (aios.kind = patch)", file.kind)));
        }
        let json = file.config_json().ok_or_else(|| bad("no aios.config metadata".into()))?;
        let c: PatchFileConfig = serde_json::from_str(json).map_err(|e| bad(format!("invalid patch config: {e}")))?;
        super::check_base(path, &c.base_fingerprint, &c.base_config, cfg, base_fingerprint)?;
        if file.tensors.is_empty() {
            return Err(bad("the patch holds no tensors".into()));
        }
        let listed: BTreeSet<&str> = c.tensors.iter().map(String::as_str).collect();
        let stored: BTreeSet<&str> = file.tensors.iter().map(|t| t.name.as_str()).collect();
        if listed != stored || listed.len() != c.tensors.len() {
            return Err(bad(format!(
                "aios.config lists tensors {:?} but the file holds {:?}",
                c.tensors,
                stored.iter().collect::<Vec<_>>()
            )));
        }
        let shapes: std::collections::HashMap<String, Vec<usize>> = cfg.tensor_shapes().into_iter().collect();
        for t in &file.tensors {
            let Some(want) = shapes.get(&t.name) else {
                return Err(bad(format!("tensor {:?} is not a tensor of this model", t.name)));
            };
            if &t.shape != want {
                return Err(bad(format!("tensor {:?} has shape {:?}, the model's is {want:?}", t.name, t.shape)));
            }
        }
        Ok(TensorPatch { path: path.to_path_buf(), base_fingerprint: c.base_fingerprint, file })
    }

    /// Names of the tensors it replaces.
    pub fn tensor_names(&self) -> Vec<&str> {
        self.file.tensors.iter().map(|t| t.name.as_str()).collect()
    }

    /// Parameters it replaces.
    pub fn parameters(&self) -> usize {
        self.file.tensors.iter().map(|t| t.numel()).sum()
    }

    /// `base` with this patch's tensors in place of its own.
    pub fn apply(&self, mut base: WeightFile) -> Result<WeightFile> {
        for t in &self.file.tensors {
            base.replace(t.clone())?;
        }
        Ok(base)
    }
}
