//! End-to-end tests of the engine on random models (no tokenizer needed).

use aios_core::format::DType;
use aios_core::model::random::write_random_model;
use aios_core::model::ModelConfig;
use aios_core::sampler::{SamplerOptions, Strategy};
use aios_core::{Engine, EngineOptions, Error};

fn cfg(time_conditioning: bool) -> ModelConfig {
    ModelConfig::from_json(&format!(
        r#"{{"vocab_size":64,"hidden_size":256,"n_layers":2,"n_heads":4,"cond_dim":32,"max_length":48,
            "mask_token_id":3,"time_conditioning":{time_conditioning}}}"#
    ))
    .unwrap()
}

fn model(dir: &std::path::Path, tc: bool, dtype: DType) -> std::path::PathBuf {
    let p = dir.join(format!("model.{}.parquet", dtype.alias()));
    write_random_model(&p, &cfg(tc), 7, dtype).unwrap();
    p
}

#[test]
fn logits_identical_on_one_and_two_threads() {
    let dir = tempfile::tempdir().unwrap();
    for tc in [false, true] {
        let p = model(dir.path(), tc, DType::F32);
        let toks: Vec<u32> = (0..40).map(|i| (i * 5 % 64) as u32).collect();
        let run = |threads| {
            let e = Engine::open(&p, &EngineOptions { threads: Some(threads), ..Default::default() }).unwrap();
            e.logits(std::slice::from_ref(&toks), Some(0.3)).unwrap()
        };
        let (a, b) = (run(1), run(2));
        assert_eq!(a.len(), 40 * 64);
        assert!(a.iter().all(|x| x.is_finite()));
        assert_eq!(a, b, "thread count changed the logits");
    }
}

#[test]
fn generation_is_deterministic_and_fills_every_mask() {
    let dir = tempfile::tempdir().unwrap();
    let p = model(dir.path(), false, DType::Q4K);
    let mut canvas = vec![3u32; 32];
    canvas[0] = 1;
    canvas[10] = 20;
    canvas[31] = 2;
    for strategy in [Strategy::Ancestral, Strategy::Confidence, Strategy::Threshold] {
        let opts = SamplerOptions { strategy, steps: 8, seed: 5, block_length: Some(16), ..Default::default() };
        let run = |threads| {
            let e = Engine::open(&p, &EngineOptions { threads: Some(threads), ..Default::default() }).unwrap();
            e.generate_tokens(canvas.clone(), &opts, &mut |_| {}).unwrap()
        };
        let (a, b) = (run(1), run(2));
        assert_eq!(a.tokens, b.tokens);
        assert!(a.tokens.iter().all(|&t| t != 3));
        assert_eq!((a.tokens[0], a.tokens[10], a.tokens[31]), (1, 20, 2));
    }
}

#[test]
fn quantised_logits_track_f32() {
    let dir = tempfile::tempdir().unwrap();
    let toks: Vec<u32> = (0..48).map(|i| (i * 11 % 64) as u32).collect();
    let f32_logits = {
        let e = Engine::open(model(dir.path(), false, DType::F32), &EngineOptions::default()).unwrap();
        e.logits(std::slice::from_ref(&toks), None).unwrap()
    };
    let scale = f32_logits.iter().map(|x| x.abs()).fold(0f32, f32::max);
    let mut last = 0.0;
    for d in [DType::Q8_0, DType::Q4K, DType::Q2K] {
        let e = Engine::open(model(dir.path(), false, d), &EngineOptions::default()).unwrap();
        let q = e.logits(std::slice::from_ref(&toks), None).unwrap();
        let err = f32_logits.iter().zip(&q).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max) / scale;
        assert!(err < 0.5 && err >= last, "{d}: relative max error {err}");
        last = err;
    }
}

#[test]
fn bad_requests_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = model(dir.path(), false, DType::F32);
    let e = Engine::open(&p, &EngineOptions::default()).unwrap();
    let opts = SamplerOptions::default();
    assert!(matches!(e.generate_tokens(vec![], &opts, &mut |_| {}), Err(Error::Input(_))));
    assert!(matches!(e.generate_tokens(vec![3; 49], &opts, &mut |_| {}), Err(Error::Input(_))));
    assert!(matches!(e.generate_tokens(vec![99; 4], &opts, &mut |_| {}), Err(Error::Input(_))));
    assert!(matches!(e.logits(&[vec![1, 2], vec![1]], None), Err(Error::Input(_))));
    // Text calls without a tokenizer say so.
    let req = aios_core::TextRequest {
        prompt: "hi".into(),
        suffix: None,
        length: 8,
        sampler: opts,
        memory: Default::default(),
        adapters: None,
        use_skills: false,
        control: Default::default(),
    };
    assert!(matches!(e.generate_text(&req, &mut |_| {}), Err(Error::Tokenizer(_))));
    assert!(matches!(Engine::open(dir.path().join("nope"), &EngineOptions::default()), Err(Error::Io { .. })));
    assert!(matches!(
        Engine::open(&p, &EngineOptions { threads: Some(0), ..Default::default() }),
        Err(Error::Input(_))
    ));
}

#[test]
fn output_rows_subset_equals_full_logits() {
    use aios_core::format::WeightFile;
    use aios_core::model::Dit;
    use candle_core::{Device, Tensor};
    let dir = tempfile::tempdir().unwrap();
    // The last block computes only the kept rows after attention; that must
    // not change them, with any weight kernel, causal or not, in a batch.
    for (dtype, causal) in [(DType::F32, false), (DType::F32, true), (DType::Q8_0, false), (DType::Q4K, true)] {
        let mut c = cfg(true);
        c.causal = causal;
        let p = dir.path().join(format!("subset.{}.{causal}.parquet", dtype.alias()));
        write_random_model(&p, &c, 7, dtype).unwrap();
        let m = Dit::load(&WeightFile::open(&p).unwrap(), c, Default::default()).unwrap();
        let toks: Vec<u32> = (0..80u32).map(|i| i * 3 % 64).collect();
        let toks = Tensor::from_vec(toks, (2, 40), &Device::Cpu).unwrap();
        let sigma = Tensor::new(&[0.4f32, 0.7], &Device::Cpu).unwrap();
        let full = m.forward(&toks, Some(&sigma)).unwrap();
        let reversed: Vec<usize> = (0..40).rev().collect();
        for pos in [&[3usize, 0, 39, 17, 17][..], &[5], &reversed] {
            let part = m.forward_at(&toks, Some(&sigma), Some(pos), &Default::default()).unwrap();
            assert_eq!(part.dims(), &[2, pos.len(), 64]);
            for b in 0..2 {
                for (j, &i) in pos.iter().enumerate() {
                    let a: Vec<f32> = full.get(b).unwrap().get(i).unwrap().to_vec1().unwrap();
                    let got: Vec<f32> = part.get(b).unwrap().get(j).unwrap().to_vec1().unwrap();
                    // Every value is one fixed chain of operations per row
                    // however many rows go through, so the subset is exact.
                    assert_eq!(a, got, "{dtype:?} causal {causal}: batch {b} row {i}");
                }
            }
        }
    }
    let p = model(dir.path(), true, DType::F32);
    let m = Dit::load(&WeightFile::open(&p).unwrap(), cfg(true), Default::default()).unwrap();
    let toks = Tensor::from_vec((0..40u32).collect::<Vec<_>>(), (1, 40), &Device::Cpu).unwrap();
    assert!(m.forward_at(&toks, None, Some(&[40]), &Default::default()).is_err());
}

#[test]
fn batch_items_do_not_influence_each_other() {
    use aios_core::format::WeightFile;
    use aios_core::model::Dit;
    let dir = tempfile::tempdir().unwrap();
    for tc in [false, true] {
        let p = model(dir.path(), tc, DType::F32);
        let m = Dit::load(&WeightFile::open(&p).unwrap(), cfg(tc), Default::default()).unwrap();
        let a: Vec<u32> = (0..24).map(|i| (i * 7 % 64) as u32).collect();
        let b: Vec<u32> = (0..24).map(|i| (i * 11 % 64) as u32).collect();
        let none = Default::default();
        let one_a = m.logits(&a, 1, Some(&[0.2]), None, &none, &[]).unwrap();
        let one_b = m.logits(&b, 1, Some(&[1.5]), None, &none, &[]).unwrap();
        let both = m.logits(&[a.clone(), b.clone()].concat(), 2, Some(&[0.2, 1.5]), None, &none, &[]).unwrap();
        assert_eq!(both, [one_a, one_b].concat(), "time conditioning {tc}");
    }
}

#[test]
fn dit_logits_rejects_bad_input_without_panicking() {
    use aios_core::format::WeightFile;
    use aios_core::model::Dit;
    let dir = tempfile::tempdir().unwrap();
    let p = model(dir.path(), true, DType::F32);
    let m = Dit::load(&WeightFile::open(&p).unwrap(), cfg(true), Default::default()).unwrap();
    let none = Default::default();
    let toks = vec![5u32; 10];
    let bad = |r: aios_core::Result<Vec<f32>>| matches!(r, Err(Error::Input(_)));
    assert!(bad(m.logits(&toks, 3, None, None, &none, &[])), "10 tokens do not split into 3 sequences");
    assert!(bad(m.logits(&toks, 0, None, None, &none, &[])));
    assert!(bad(m.logits(&[], 1, None, None, &none, &[])));
    assert!(bad(m.logits(&[64], 1, None, None, &none, &[])), "token outside the vocabulary");
    assert!(bad(m.logits(&[5u32; 49], 1, None, None, &none, &[])), "longer than max_length");
    assert!(bad(m.logits(&toks, 1, None, Some(&[10]), &none, &[])), "position outside the sequence");
    assert!(bad(m.logits(&toks, 2, Some(&[0.1]), None, &none, &[])), "one sigma for two sequences");
    assert_eq!(m.logits(&toks, 2, Some(&[0.1, 0.2]), Some(&[4]), &none, &[]).unwrap().len(), 2 * 64);
}

/// A random multimodal model (no tokenizer: requests without a prompt).
fn unified(dir: &std::path::Path, dtype: DType) -> std::path::PathBuf {
    let c = ModelConfig::from_json(
        r#"{"vocab_size":64,"hidden_size":256,"n_layers":2,"n_heads":4,"cond_dim":32,"max_length":96,
            "mask_token_id":3,"image_size":16,"image_patch":4,"audio_mels":16,"audio_frames":32,
            "audio_frames_per_token":4,"audio_sample_rate":8000,"audio_n_fft":256,"audio_hop":64}"#,
    )
    .unwrap();
    let p = dir.join(format!("model.{}.parquet", dtype.alias()));
    write_random_model(&p, &c, 11, dtype).unwrap();
    p
}

#[test]
fn media_generation_is_identical_on_one_and_two_threads() {
    use aios_core::engine::MediaRequest;
    use aios_core::model::Modality;
    use aios_core::sampler::continuous::ContinuousSampler;
    let dir = tempfile::tempdir().unwrap();
    for dtype in [DType::F32, DType::Q4K] {
        let p = unified(dir.path(), dtype);
        for (outputs, sampler) in [
            (vec![Modality::Image], ContinuousSampler::Ddpm),
            (vec![Modality::Audio], ContinuousSampler::Ddim),
            (vec![Modality::Text, Modality::Image, Modality::Audio], ContinuousSampler::Ddim),
        ] {
            let req = MediaRequest {
                outputs: outputs.clone(),
                prompt: None,
                text_length: Some(8),
                image: None,
                audio: None,
                sampler: SamplerOptions { steps: 5, seed: 4, ..Default::default() },
                continuous: sampler,
                eta: 0.3,
                energies: vec![],
                audio_energies: vec![],
                control: Default::default(),
            };
            let run = |threads| {
                let e = Engine::open(&p, &EngineOptions { threads: Some(threads), ..Default::default() }).unwrap();
                e.generate_media(&req, &mut |_| {}).unwrap()
            };
            let (a, b) = (run(1), run(2));
            assert_eq!(a.image.as_ref().map(|i| &i.pixels), b.image.as_ref().map(|i| &i.pixels), "{outputs:?}");
            assert_eq!(a.audio.as_ref().map(|x| &x.samples), b.audio.as_ref().map(|x| &x.samples), "{outputs:?}");
            assert_eq!(a.tokens, b.tokens);
            assert_eq!(a.image.is_some(), outputs.contains(&Modality::Image));
            assert_eq!(a.audio.is_some(), outputs.contains(&Modality::Audio));
            if let Some(x) = &a.audio {
                assert_eq!(x.samples.len(), 31 * 64);
                assert!(x.samples.iter().all(|s| s.is_finite()));
            }
        }
    }
}
