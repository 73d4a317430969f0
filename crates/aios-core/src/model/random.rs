//! Random-weight models with the exact tensor layout of [`super::Dit`], for
//! tests, benchmarks and the "edge" configuration.

use std::collections::BTreeMap;
use std::path::Path;

use super::config::ModelConfig;
use crate::error::Result;
use crate::format::{write_weight_file, DType, TensorToWrite, KEY_CONFIG};
use crate::quant;
use crate::sampler::Stream;

/// Every tensor a config needs, with its shape, in a stable order.
pub fn tensor_shapes(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (v, d, c, r) = (cfg.vocab_size, cfg.hidden_size, cfg.cond_dim, cfg.mlp_ratio);
    let mut s: Vec<(String, Vec<usize>)> = vec![
        ("vocab_embed.embedding".into(), vec![v, d]),
        ("sigma_map.mlp.0.weight".into(), vec![c, 256]),
        ("sigma_map.mlp.0.bias".into(), vec![c]),
        ("sigma_map.mlp.2.weight".into(), vec![c, c]),
        ("sigma_map.mlp.2.bias".into(), vec![c]),
    ];
    for i in 0..cfg.n_layers {
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

/// Writes a model with uniform random weights scaled by 1/sqrt(fan_in)
/// (norm weights near 1), every eligible matrix stored as `dtype`.
pub fn write_random_model(path: impl AsRef<Path>, cfg: &ModelConfig, seed: u64, dtype: DType) -> Result<()> {
    cfg.validate()?;
    let mut encoded = vec![];
    for (idx, (name, shape)) in tensor_shapes(cfg).into_iter().enumerate() {
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
    let meta = BTreeMap::from([(KEY_CONFIG.to_string(), cfg.to_json())]);
    write_weight_file(path, "model", &meta, &tensors)
}
