//! The text model's numbers are pinned: the shipped `aios-text-tiny` files give
//! bit-identical logits and generations to the text-only runtime of commit
//! 344c35a (before the multimodal canvas), whose values these are. Any
//! change to the text path that moves a single bit fails here.
//!
//! The kernels run capped to the portable code (`AIOS_CPU=portable`): the
//! SIMD kernels may round differently from one CPU family to the next, the
//! portable ones give the same bits everywhere. Capped, quantised weights go
//! through candle's quantised matmul, which since candle 0.11 picks a
//! repacked x86 tier at run time (AVX-512 VNNI, AVX-VNNI or AVX2) whose q8_0
//! results differ between tiers; `MISTRALRS_FORCE_AVX2=1` (candle's switch)
//! pins the AVX2 tier, which every x86-64-v3 CPU has. The int8 values are
//! that tier's (recorded on an AMD EPYC Zen 3 without AVX-512, 2026-12-06;
//! the AVX-512 VNNI tier gave 0x3a639fb3).

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
        memory: Default::default(),
        adapters: None,
        use_skills: false,
        control: Default::default(),
    };
    let g = e.generate_text(&req, &mut |_| {}).unwrap();
    (fingerprint(&logits), g.tokens)
}

#[test]
fn shipped_text_model_is_bit_identical() {
    // Before any kernel is chosen (the cap is read once); this binary has one test.
    std::env::set_var("AIOS_CPU", "portable");
    std::env::set_var("MISTRALRS_FORCE_AVX2", "1");
    let seen: Vec<_> = ["f32", "int8", "int4"].into_iter().map(|d| (d, observe(d))).collect();
    for (dtype, (crc, tokens)) in &seen {
        println!("GOLDEN {dtype} {crc:#010x} {tokens:?}");
    }
    for (dtype, (crc, tokens)) in seen {
        let want = GOLDEN.iter().find(|g| g.0 == dtype).expect("golden value");
        assert_eq!(crc, want.1, "{dtype}: logits changed");
        assert_eq!(tokens, want.2, "{dtype}: generation changed");
    }
}

#[allow(clippy::type_complexity)]
const GOLDEN: &[(&str, u32, &[u32])] = &[
    (
        "f32",
        0x264dd3de,
        &[
            1, 464, 1170, 702, 273, 1313, 15, 279, 293, 406, 264, 702, 1204, 17, 202, 303, 342, 293, 1988, 264, 460,
            905, 549, 273, 264, 1773, 283, 273, 264, 582, 2277, 86, 15, 279, 264, 1223, 491, 15, 303, 431, 600, 660,
            335, 17, 202, 1070, 1194, 2,
        ],
    ),
    (
        "int8",
        0xbb30a4a9,
        &[
            1, 464, 1170, 702, 273, 1313, 527, 15, 293, 1029, 264, 700, 1372, 17, 202, 423, 342, 264, 2992, 420, 431,
            713, 585, 273, 264, 1920, 282, 569, 283, 273, 1522, 274, 15, 279, 264, 1063, 79, 274, 285, 365, 515, 690,
            306, 17, 202, 403, 1569, 2,
        ],
    ),
    (
        "int4",
        0xbdcdef67,
        &[
            1, 464, 1170, 702, 426, 878, 15, 279, 302, 1532, 273, 264, 508, 17, 202, 403, 309, 15, 3400, 506, 451, 264,
            508, 15, 264, 1171, 309, 587, 15, 309, 543, 406, 273, 309, 264, 626, 581, 15, 303, 426, 460, 657, 262,
            3116, 92, 293, 587, 2,
        ],
    ),
];
