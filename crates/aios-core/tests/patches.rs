//! Tensor patches on the engine: a patch gives exactly the model with those
//! tensors replaced, over f32 and quantised bases; unloading gives the base
//! back exactly; bad patches are refused and change nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use aios_core::adapter::write_random_lora;
use aios_core::format::{write_weight_file, DType, TensorToWrite, WeightFile};
use aios_core::model::random::write_random_model;
use aios_core::model::ModelConfig;
use aios_core::{Engine, EngineOptions, Error};

const PATCHED: [&str; 3] = ["blocks.1.attn_qkv.weight", "blocks.0.mlp.2.weight", "blocks.0.mlp.2.bias"];

fn cfg() -> ModelConfig {
    ModelConfig::from_json(
        r#"{"vocab_size":64,"hidden_size":256,"n_layers":2,"n_heads":4,"cond_dim":32,"max_length":48,"mask_token_id":3}"#,
    )
    .unwrap()
}

fn f32_values(file: &WeightFile, name: &str) -> Vec<f32> {
    let t = file.get(name).unwrap();
    assert_eq!(t.dtype, DType::F32);
    t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
}

fn bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// `(name, shape, values)` of the patched tensors: the base's plus a ramp.
fn changed(base: &WeightFile) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    PATCHED
        .iter()
        .map(|n| {
            let v: Vec<f32> =
                f32_values(base, n).iter().enumerate().map(|(i, x)| x + 0.02 * ((i % 13) as f32 - 6.0)).collect();
            (n.to_string(), base.get(n).unwrap().shape.clone(), v)
        })
        .collect()
}

fn write_patch(path: &Path, config: serde_json::Value, tensors: &[(String, Vec<usize>, Vec<f32>)]) {
    let data: Vec<(String, Vec<usize>, Vec<u8>)> =
        tensors.iter().map(|(n, s, v)| (n.clone(), s.clone(), bytes(v))).collect();
    let tw: Vec<_> =
        data.iter().map(|(n, s, d)| TensorToWrite { name: n, dtype: DType::F32, shape: s, data: d }).collect();
    let meta = BTreeMap::from([("aios.config".to_string(), config.to_string())]);
    write_weight_file(path, "patch", &meta, &tw).unwrap();
}

fn patch_config(fp: &str, cfg: &ModelConfig, names: &[&str]) -> serde_json::Value {
    serde_json::json!({"base_fingerprint": fp, "base_config": serde_json::to_value(cfg).unwrap(), "tensors": names,
                       "notes": "ignored"})
}

struct Fixture {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    f32: PathBuf,
    int8: PathBuf,
    patch: PathBuf,
    /// The base with the patch's tensors written in, as a whole model.
    merged: PathBuf,
    fp: String,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    let (f32, int8) = (d.join("base/model.f32.parquet"), d.join("base8/model.int8.parquet"));
    std::fs::create_dir_all(f32.parent().unwrap()).unwrap();
    std::fs::create_dir_all(int8.parent().unwrap()).unwrap();
    write_random_model(&f32, &cfg(), 5, DType::F32).unwrap();
    write_random_model(&int8, &cfg(), 5, DType::Q8_0).unwrap();
    let base = WeightFile::open(&f32).unwrap();
    let fp = base.metadata["aios.fingerprint"].clone();
    let ch = changed(&base);
    let patch = d.join("p.patch.parquet");
    write_patch(&patch, patch_config(&fp, &cfg(), &PATCHED), &ch);
    // The expected model: every base tensor, the patched ones replaced.
    let all: Vec<(String, Vec<usize>, Vec<u8>)> = base
        .tensors
        .iter()
        .map(|t| match ch.iter().find(|c| c.0 == t.name) {
            Some((n, s, v)) => (n.clone(), s.clone(), bytes(v)),
            None => (t.name.clone(), t.shape.clone(), t.data().to_vec()),
        })
        .collect();
    let tw: Vec<_> =
        all.iter().map(|(n, s, b)| TensorToWrite { name: n, dtype: DType::F32, shape: s, data: b }).collect();
    let meta: BTreeMap<String, String> = base
        .metadata
        .iter()
        .filter(|(k, _)| k.as_str() != "aios.fingerprint")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let merged = d.join("merged.parquet");
    write_weight_file(&merged, "model", &meta, &tw).unwrap();
    Fixture { _dir: dir, dir: d, f32, int8, patch, merged, fp }
}

fn open(p: &Path) -> Engine {
    Engine::open(p, &EngineOptions { threads: Some(2), ..Default::default() }).unwrap()
}

fn tokens() -> Vec<Vec<u32>> {
    vec![(0..40).map(|i| (i * 5 % 64) as u32).collect()]
}

fn max_diff(x: &[f32], y: &[f32]) -> f32 {
    x.iter().zip(y).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max)
}

#[test]
fn a_patch_is_the_model_with_those_tensors_and_unloads_exactly() {
    let f = fixture();
    let want = open(&f.merged).logits(&tokens(), Some(0.7)).unwrap();
    let e = open(&f.f32);
    let plain = e.logits(&tokens(), Some(0.7)).unwrap();
    assert!(max_diff(&plain, &want) > 1e-3, "the patch must change the output");
    e.load_patch(&f.patch, "p", false).unwrap();
    assert_eq!(e.logits(&tokens(), Some(0.7)).unwrap(), plain, "loading without activating changes nothing");
    assert_eq!(e.patches(), (None, vec!["p".to_string()]));
    e.set_patch(Some("p")).unwrap();
    assert_eq!(e.logits(&tokens(), Some(0.7)).unwrap(), want, "patched != the merged model");
    e.set_patch(None).unwrap();
    assert_eq!(e.logits(&tokens(), Some(0.7)).unwrap(), plain);
    e.set_patch(Some("p")).unwrap();
    e.unload_patch("p").unwrap();
    assert_eq!(e.logits(&tokens(), Some(0.7)).unwrap(), plain, "unloading must restore the base exactly");
    assert_eq!(e.patches(), (None, vec![]));

    // Over an int8 base the patched tensors are f32, the rest stays int8:
    // close to the merged model (the int8 rounding of the other layers only).
    let q = open(&f.int8);
    let q_plain = q.logits(&tokens(), Some(0.7)).unwrap();
    q.load_patch(&f.patch, "p", true).unwrap();
    let q_patched = q.logits(&tokens(), Some(0.7)).unwrap();
    assert!(max_diff(&q_patched, &want) < max_diff(&q_plain, &want), "the patch did not move int8 toward it");
    assert!(max_diff(&q_patched, &want) < 0.1);
    // Patches and adapters stack: the adapter applies on the patched weights.
    let lora = f.dir.join("a.lora.parquet");
    write_random_lora(&lora, &cfg(), &f.fp, &["blocks.0.attn_out", "blocks.1.mlp.0"], 4, 8.0, false, 3).unwrap();
    e.load_patch(&f.patch, "p", true).unwrap();
    e.load_adapter(&lora, "a", Some(1.0)).unwrap();
    let both = e.logits(&tokens(), Some(0.7)).unwrap();
    assert!(max_diff(&both, &want) > 1e-3);
    // While fused, patch changes are refused; unfuse restores the patched model with the adapter.
    e.fuse().unwrap();
    assert!(max_diff(&e.logits(&tokens(), Some(0.7)).unwrap(), &both) < 1e-3);
    assert!(matches!(e.set_patch(None), Err(Error::Input(m)) if m.contains("fused")));
    e.unfuse().unwrap();
    assert_eq!(e.logits(&tokens(), Some(0.7)).unwrap(), both);
}

#[test]
fn bad_patches_are_refused_and_change_nothing() {
    let f = fixture();
    let e = open(&f.f32);
    e.load_patch(&f.patch, "p", true).unwrap();
    let before = e.logits(&tokens(), None).unwrap();
    let base = WeightFile::open(&f.f32).unwrap();
    let ch = changed(&base);
    let p = |n: &str| f.dir.join(n);
    write_patch(&p("other.parquet"), patch_config("0123456789abcdef", &cfg(), &PATCHED), &ch);
    let mut eps = cfg();
    eps.norm_eps = 1e-3;
    write_patch(&p("eps.parquet"), patch_config(&f.fp, &eps, &PATCHED), &ch);
    write_patch(&p("listed.parquet"), patch_config(&f.fp, &cfg(), &PATCHED[..2]), &ch);
    let mut unknown = ch.clone();
    unknown[0].0 = "blocks.7.attn_qkv.weight".into();
    let names: Vec<&str> = unknown.iter().map(|c| c.0.as_str()).collect();
    write_patch(&p("unknown.parquet"), patch_config(&f.fp, &cfg(), &names), &unknown);
    let mut shape = ch.clone();
    shape[0].1 = vec![shape[0].1[1], shape[0].1[0]];
    write_patch(&p("shape.parquet"), patch_config(&f.fp, &cfg(), &PATCHED), &shape);
    let mut nan = ch.clone();
    nan[0].2[5] = f32::NAN;
    write_patch(&p("nan.parquet"), patch_config(&f.fp, &cfg(), &PATCHED), &nan);
    write_patch(&p("empty.parquet"), patch_config(&f.fp, &cfg(), &[]), &[]);
    let bytes = std::fs::read(&f.patch).unwrap();
    std::fs::write(p("trunc.parquet"), &bytes[..bytes.len() / 2]).unwrap();
    let lora = p("a.lora.parquet");
    write_random_lora(&lora, &cfg(), &f.fp, &["blocks.0.attn_out"], 4, 8.0, false, 3).unwrap();
    let cases: Vec<(PathBuf, &str)> = vec![
        (p("other.parquet"), "trained on base model 0123456789abcdef"),
        (p("eps.parquet"), "norm_eps: adapter 0.001 vs model"),
        (p("listed.parquet"), "aios.config lists tensors"),
        (p("unknown.parquet"), "is not a tensor of this model"),
        (p("shape.parquet"), "has shape [256, 768]"),
        (p("nan.parquet"), "finite"),
        (p("empty.parquet"), "holds no tensors"),
        (p("trunc.parquet"), ""),
        (lora, "not a tensor patch"),
        (f.f32.clone(), "not a tensor patch"),
        (p("missing.parquet"), ""),
    ];
    for (path, msg) in cases {
        let err = e.load_patch(&path, "x", true).unwrap_err();
        assert!(err.to_string().contains(msg), "{path:?}: {err}");
    }
    assert!(matches!(e.load_patch(&f.patch, "p", true), Err(Error::Input(m)) if m.contains("already loaded")));
    assert!(matches!(e.load_patch(&f.patch, "", true), Err(Error::Input(_))));
    assert!(matches!(e.set_patch(Some("nope")), Err(Error::Input(_))));
    assert!(matches!(e.unload_patch("nope"), Err(Error::Input(_))));
    assert_eq!(e.patches(), (Some("p".to_string()), vec!["p".to_string()]));
    assert_eq!(e.logits(&tokens(), None).unwrap(), before, "a refused patch altered the engine");
}
