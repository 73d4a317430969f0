//! Adapters applied on top of a loaded base model without reloading it.
//!
//! - [`lora`]: LoRA files (`aios.kind = lora`) and the active, weighted set
//!   applied unmerged (`W x + s B(A x)`), so they work over quantised bases.
//! - [`patch`]: tensor patches (`aios.kind = patch`): replacement values for
//!   a few of the base's tensors (selective fine-tuning), overlaid on a
//!   re-read of the base file and removed by going back to the base.
//! - [`controlnet`]: ControlNets (`aios.kind = controlnet`): a low-rank copy
//!   of the first blocks that reads a control input (tokens or an image) and
//!   steers the base through zero-initialised projections.

pub mod controlnet;
pub mod lora;
pub mod patch;

use std::path::Path;

pub use controlnet::{AppliedControl, ControlKind, ControlNet, ControlValue};
pub use lora::{write_random_lora, ActiveLora, LoraAdapter};
pub use patch::TensorPatch;

use crate::model::ModelConfig;
use crate::{Error, Result};

/// Checks that an adapter or patch was made for this base: same
/// `aios.fingerprint` and same config (the fingerprint alone is only as good
/// as its writer).
fn check_base(
    path: &Path,
    file_fingerprint: &str,
    file_base_config: &serde_json::Value,
    cfg: &ModelConfig,
    engine_fingerprint: Option<&str>,
) -> Result<()> {
    match engine_fingerprint {
        None => {
            return Err(Error::Config(format!(
                "{}: the base model file has no aios.fingerprint, so the adapter cannot be checked against it; \
                 re-export the base with aios_train (quantised variants inherit it)",
                path.display()
            )))
        }
        Some(fp) if fp != file_fingerprint => {
            return Err(Error::Config(format!(
                "{}: adapter was trained on base model {file_fingerprint}, but this engine's model is {fp}",
                path.display(),
            )))
        }
        Some(_) => {}
    }
    let base: ModelConfig = serde_json::from_value(file_base_config.clone())
        .map_err(|e| Error::format(path.display(), format!("invalid base_config: {e}")))?;
    if base != *cfg {
        let model = serde_json::to_value(cfg).expect("config serialises");
        let adapter = serde_json::to_value(&base).expect("config serialises");
        return Err(Error::Config(format!(
            "{}: adapter was trained on a base with another config ({})",
            path.display(),
            differing_fields(&adapter, &model).join("; ")
        )));
    }
    Ok(())
}

/// The config fields whose values differ between `a` and `b`, for messages.
fn differing_fields(a: &serde_json::Value, b: &serde_json::Value) -> Vec<String> {
    let empty = serde_json::Map::new();
    let (a, b) = (a.as_object().unwrap_or(&empty), b.as_object().unwrap_or(&empty));
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| {
            format!(
                "{k}: adapter {} vs model {}",
                a.get(k).unwrap_or(&serde_json::Value::Null),
                b.get(k).unwrap_or(&serde_json::Value::Null)
            )
        })
        .collect()
}
