//! Random-weight models with the exact tensor layout of [`super::Dit`], for
//! tests, benchmarks and the "edge" configuration.

use std::collections::BTreeMap;
use std::path::Path;

use super::config::ModelConfig;
use crate::error::Result;
use crate::format::{write_weight_file, DType, TensorToWrite, KEY_CONFIG};
use crate::quant;
use crate::sampler::Stream;

/// Writes a model with uniform random weights scaled by 1/sqrt(fan_in)
/// (norm weights near 1), every eligible matrix stored as `dtype`.
pub fn write_random_model(path: impl AsRef<Path>, cfg: &ModelConfig, seed: u64, dtype: DType) -> Result<()> {
    cfg.validate()?;
    let mut encoded = vec![];
    for (idx, (name, shape)) in cfg.tensor_shapes().into_iter().enumerate() {
        let numel: usize = shape.iter().product();
        let mut rng = Stream::new(seed, 0, idx as u64);
        let scale = 1.0 / (*shape.last().unwrap() as f64).sqrt();
        let is_norm = name.contains("norm");
        let values: Vec<f32> = (0..numel)
            .map(|_| {
                let u = rng.uniform() * 2.0 - 1.0;
                (if is_norm { 1.0 + 0.1 * u } else { u * scale }) as f32
            })
            .collect();
        let d = quant::file::dtype_for(&shape, dtype);
        let bytes = quant::quantize(&values, &shape, d)?;
        encoded.push((name, d, shape, bytes));
    }
    let tensors: Vec<TensorToWrite> =
        encoded.iter().map(|(n, d, s, b)| TensorToWrite { name: n, dtype: *d, shape: s, data: b }).collect();
    // Identifies the random weights (the same for every dtype of one seed and
    // config, as quantised variants inherit their f32 source's fingerprint).
    // 16 lowercase hex chars, like the sha256-based fingerprints aios_train writes.
    let crc = crc32fast::hash(cfg.to_json().as_bytes()) as u64;
    let fingerprint = format!("{:016x}", seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (crc << 32 | crc));
    let meta = BTreeMap::from([(KEY_CONFIG.to_string(), cfg.to_json()), ("aios.fingerprint".to_string(), fingerprint)]);
    write_weight_file(path, "model", &meta, &tensors)
}
