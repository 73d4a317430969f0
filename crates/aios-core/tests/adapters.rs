//! LoRA adapters on the engine: unmerged over every base dtype, weighted
//! mixing, fuse/unfuse, clear refusals, and hot-swapping under load.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aios_core::adapter::write_random_lora;
use aios_core::format::DType;
use aios_core::model::random::write_random_model;
use aios_core::model::ModelConfig;
use aios_core::sampler::{SamplerOptions, Strategy};
use aios_core::{Engine, EngineOptions, Error};

const ALL: [&str; 5] =
    ["blocks.0.attn_qkv", "blocks.0.attn_out", "blocks.1.mlp.0", "blocks.1.mlp.2", "output_layer.linear"];

fn cfg() -> ModelConfig {
    ModelConfig::from_json(
        r#"{"vocab_size":64,"hidden_size":256,"n_layers":2,"n_heads":4,"cond_dim":32,"max_length":48,"mask_token_id":3}"#,
    )
    .unwrap()
}

fn fingerprint(p: &Path) -> String {
    aios_core::format::WeightFile::open(p).unwrap().metadata["aios.fingerprint"].clone()
}

struct Fixture {
    _dir: tempfile::TempDir,
    f32: PathBuf,
    int4: PathBuf,
    a: PathBuf,
    b: PathBuf,
    dir: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let f32 = dir.path().join("model.f32.parquet");
    let int4 = dir.path().join("model.int4.parquet");
    write_random_model(&f32, &cfg(), 7, DType::F32).unwrap();
    write_random_model(&int4, &cfg(), 7, DType::Q4K).unwrap();
    let fp = fingerprint(&f32);
    assert_eq!(fp, fingerprint(&int4));
    let a = dir.path().join("a.lora.parquet");
    let b = dir.path().join("b.lora.parquet");
    write_random_lora(&a, &cfg(), &fp, &ALL, 4, 8.0, false, 1).unwrap();
    write_random_lora(&b, &cfg(), &fp, &ALL[1..3], 8, 16.0, true, 2).unwrap();
    Fixture { dir: dir.path().to_path_buf(), _dir: dir, f32, int4, a, b }
}

fn tokens() -> Vec<Vec<u32>> {
    vec![(0..40).map(|i| (i * 7 % 64) as u32).collect()]
}

fn max_diff(x: &[f32], y: &[f32]) -> f32 {
    x.iter().zip(y).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max)
}

fn open(p: &Path) -> Engine {
    Engine::open(p, &EngineOptions { threads: Some(2), ..Default::default() }).unwrap()
}

#[test]
fn adapters_change_logits_mix_linearly_and_fuse_exactly() {
    let f = fixture();
    for base in [&f.f32, &f.int4] {
        let e = open(base);
        let plain = e.logits(&tokens(), None).unwrap();
        e.load_adapter(&f.a, "a", Some(1.0)).unwrap();
        let with_a = e.logits(&tokens(), None).unwrap();
        assert!(max_diff(&plain, &with_a) > 1e-2, "adapter had no effect");
        e.load_adapter(&f.b, "b", None).unwrap();
        assert_eq!(e.logits(&tokens(), None).unwrap(), with_a, "loading without a weight must not activate");
        // Weight 0 is the same as inactive; weights act linearly on the update.
        e.set_adapters(&BTreeMap::from([("a".into(), 0.0)])).unwrap();
        assert_eq!(e.logits(&tokens(), None).unwrap(), plain);
        e.set_adapters(&BTreeMap::from([("a".into(), 0.5), ("b".into(), 0.7)])).unwrap();
        let mixed = e.logits(&tokens(), None).unwrap();
        e.set_adapters(&BTreeMap::from([("a".into(), 0.5)])).unwrap();
        let half_a = e.logits(&tokens(), None).unwrap();
        assert!(max_diff(&mixed, &half_a) > 1e-3);
        e.unload_adapter("b").unwrap();
        assert_eq!(e.adapters(), (vec![("a".to_string(), 0.5)], vec!["a".to_string()]));
        e.unload_adapter("a").unwrap();
        assert_eq!(e.logits(&tokens(), None).unwrap(), plain, "unloading restores the base exactly");
    }
    // Fuse (f32 base): same logits as unfused; unfuse restores the base bit for bit.
    let e = open(&f.f32);
    let plain = e.logits(&tokens(), None).unwrap();
    e.load_adapter(&f.a, "a", Some(0.8)).unwrap();
    e.load_adapter(&f.b, "b", Some(0.3)).unwrap();
    let unfused = e.logits(&tokens(), None).unwrap();
    e.fuse().unwrap();
    assert!(e.is_fused());
    let fused = e.logits(&tokens(), None).unwrap();
    assert!(max_diff(&fused, &unfused) < 1e-4, "fused vs unfused: {}", max_diff(&fused, &unfused));
    assert!(matches!(e.set_adapters(&BTreeMap::new()), Err(Error::Input(_))));
    e.unfuse().unwrap();
    assert_eq!(e.logits(&tokens(), None).unwrap(), unfused);
    e.set_adapters(&BTreeMap::new()).unwrap();
    assert_eq!(e.logits(&tokens(), None).unwrap(), plain);
    // A quantised base cannot be fused (the adapter stays usable unfused).
    let q = open(&f.int4);
    q.load_adapter(&f.a, "a", Some(1.0)).unwrap();
    let before = q.logits(&tokens(), None).unwrap();
    assert!(matches!(q.fuse(), Err(Error::Input(m)) if m.contains("quantised")));
    assert!(!q.is_fused());
    assert_eq!(q.logits(&tokens(), None).unwrap(), before);
}

#[test]
fn bad_adapters_are_refused_and_the_engine_keeps_its_set() {
    let f = fixture();
    let e = open(&f.f32);
    e.load_adapter(&f.a, "a", Some(1.0)).unwrap();
    let before = e.logits(&tokens(), None).unwrap();
    let p = |n: &str| f.dir.join(n);
    // Wrong base, bigger model (shape mismatch), unknown module, NaN, corrupt, not a lora file.
    write_random_lora(p("other.parquet"), &cfg(), "someone-else", &ALL, 4, 8.0, false, 1).unwrap();
    let mut big = cfg();
    big.hidden_size = 512;
    write_random_lora(p("big.parquet"), &big, &fingerprint(&f.f32), &ALL[..1], 4, 8.0, false, 1).unwrap();
    // Same fingerprint and shapes, another base config (a different eps).
    let mut eps = cfg();
    eps.norm_eps = 1e-3;
    write_random_lora(p("eps.parquet"), &eps, &fingerprint(&f.f32), &ALL, 4, 8.0, false, 1).unwrap();
    let bytes = std::fs::read(&f.a).unwrap();
    std::fs::write(p("trunc.parquet"), &bytes[..bytes.len() / 2]).unwrap();
    let cases: Vec<(PathBuf, &str)> = vec![
        (p("other.parquet"), "trained on base model someone-else"),
        (p("big.parquet"), "hidden_size: adapter 512 vs model 256"),
        (p("eps.parquet"), "norm_eps: adapter 0.001 vs model"),
        (p("trunc.parquet"), ""),
        (f.f32.clone(), "not a LoRA adapter"),
        (p("missing.parquet"), ""),
    ];
    for (path, msg) in cases {
        let err = e.load_adapter(&path, "x", Some(1.0)).unwrap_err();
        assert!(err.to_string().contains(msg), "{path:?}: {err}");
    }
    // A tensor edited to NaN, and an unknown module name.
    let mut cfg_json: serde_json::Value =
        serde_json::from_str(aios_core::format::WeightFile::open(&f.a).unwrap().config_json().unwrap()).unwrap();
    cfg_json["target_modules"] = serde_json::json!(["blocks.0.adaLN_modulation"]);
    let file = aios_core::format::WeightFile::open(&f.a).unwrap();
    let meta = BTreeMap::from([("aios.config".to_string(), cfg_json.to_string())]);
    let t = |name: &str, data: Vec<u8>, shape: Vec<usize>| (name.to_string(), data, shape);
    let a0 = file.get("blocks.0.attn_qkv.lora_A").unwrap();
    let tensors = [t("blocks.0.adaLN_modulation.lora_A", a0.data().to_vec(), a0.shape.clone())];
    let tw: Vec<_> = tensors
        .iter()
        .map(|(n, d, s)| aios_core::format::TensorToWrite { name: n, dtype: DType::F32, shape: s, data: d })
        .collect();
    aios_core::format::write_weight_file(p("unknown.parquet"), "lora", &meta, &tw).unwrap();
    let err = e.load_adapter(p("unknown.parquet"), "x", None).unwrap_err();
    assert!(err.to_string().contains("unknown target module"), "{err}");
    // Names and weights.
    assert!(matches!(e.load_adapter(&f.b, "a", None), Err(Error::Input(m)) if m.contains("already loaded")));
    assert!(matches!(e.unload_adapter("nope"), Err(Error::Input(_))));
    assert!(matches!(e.set_adapters(&BTreeMap::from([("nope".into(), 1.0)])), Err(Error::Input(_))));
    for w in [f32::NAN, f32::INFINITY] {
        assert!(matches!(e.set_adapters(&BTreeMap::from([("a".into(), w)])), Err(Error::Input(_))));
        assert!(matches!(e.load_adapter(&f.b, "b", Some(w)), Err(Error::Input(_))));
    }
    assert_eq!(e.adapters().0, vec![("a".to_string(), 1.0)]);
    assert_eq!(e.logits(&tokens(), None).unwrap(), before, "a refused change altered the engine");
}

#[test]
fn hot_swap_under_load_never_mixes_adapter_sets() {
    let f = fixture();
    let e = Arc::new(open(&f.int4));
    e.load_adapter(&f.a, "a", None).unwrap();
    e.load_adapter(&f.b, "b", None).unwrap();
    let sets: Vec<BTreeMap<String, f32>> = vec![
        BTreeMap::new(),
        BTreeMap::from([("a".into(), 1.0)]),
        BTreeMap::from([("a".into(), 0.5), ("b".into(), 2.0)]),
    ];
    let mut canvas = vec![3u32; 32];
    canvas[0] = 1;
    let opts = |seed| SamplerOptions { strategy: Strategy::Confidence, steps: 8, seed, ..Default::default() };
    // Single-threaded references: (set index, seed) -> tokens.
    let mut reference = BTreeMap::new();
    for (i, set) in sets.iter().enumerate() {
        e.set_adapters(set).unwrap();
        for seed in 0..4 {
            reference.insert((i, seed), e.generate_tokens(canvas.clone(), &opts(seed), &mut |_| {}).unwrap().tokens);
        }
    }
    assert_ne!(reference[&(0, 0)], reference[&(1, 0)], "adapters should change the output");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    std::thread::scope(|s| {
        let (e2, stop2, sets2) = (e.clone(), stop.clone(), sets.clone());
        s.spawn(move || {
            let mut i = 0;
            while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                e2.set_adapters(&sets2[i % 3]).unwrap();
                i += 1;
                std::thread::yield_now();
            }
        });
        let workers: Vec<_> = (0..3)
            .map(|w| {
                let (e, canvas, sets, reference) = (e.clone(), canvas.clone(), sets.clone(), reference.clone());
                s.spawn(move || {
                    for round in 0..6 {
                        let seed = (w + round) % 4;
                        let g = e.generate_tokens(canvas.clone(), &opts(seed as u64), &mut |_| {}).unwrap();
                        let used: BTreeMap<String, f32> = g.adapters.iter().cloned().collect();
                        let i = sets
                            .iter()
                            .position(|s| s.iter().filter(|(_, w)| **w != 0.0).eq(used.iter()))
                            .expect("generation reports a set that was never active");
                        assert_eq!(g.tokens, reference[&(i, seed as u64)], "set {i}, seed {seed}");
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
}

#[test]
fn composition_terms_pick_adapter_sets() {
    use aios_core::sampler::{Term, View};
    let f = fixture();
    let e = open(&f.f32);
    e.load_adapter(&f.a, "a", None).unwrap();
    let mut canvas = vec![3u32; 32];
    canvas[0] = 1;
    canvas[1] = 9;
    let opts = |compose: Vec<Term>| SamplerOptions { steps: 8, seed: 2, compose, ..Default::default() };
    let run = |o: &SamplerOptions| e.generate_tokens(canvas.clone(), o, &mut |_| {}).unwrap();
    let plain = run(&opts(vec![]));
    // A single term with adapter set {a} is the generation with a active.
    let via_term = run(&opts(vec![Term::parse("full@a", 1.0).unwrap()]));
    e.set_adapters(&BTreeMap::from([("a".into(), 1.0)])).unwrap();
    let active = run(&opts(vec![]));
    assert_eq!(via_term.tokens, active.tokens);
    assert_ne!(active.tokens, plain.tokens, "the adapter should change the output");
    // `full@none` is the bare base whatever is active.
    assert_eq!(run(&opts(vec![Term::parse("full@none", 1.0).unwrap()])).tokens, plain.tokens);
    // Adapter guidance mixes both sets in one step and is deterministic.
    let guided = vec![Term::new(View::Full, 3.0), Term::parse("full@none", -2.0).unwrap()];
    let g1 = run(&opts(guided.clone()));
    assert_eq!(g1.tokens, run(&opts(guided)).tokens);
    assert_eq!(g1.forward_passes, active.forward_passes);
    // Unknown names and bad keys are input errors.
    let bad = opts(vec![Term::parse("full@nope", 1.0).unwrap()]);
    assert!(matches!(e.generate_tokens(canvas.clone(), &bad, &mut |_| {}), Err(Error::Input(m)) if m.contains("nope")));
    assert!(matches!(Term::parse("full@a+a", 1.0), Err(Error::Input(_))));
    assert!(matches!(Term::parse("full@", 1.0), Err(Error::Input(_))));
    assert!(matches!(Term::parse("sideways@a", 1.0), Err(Error::Input(_))));
    let dup = opts(vec![Term::parse("full@a", 0.5).unwrap(), Term::parse("full@a", 0.5).unwrap()]);
    assert!(matches!(dup.validate(), Err(Error::Input(_))));
}
