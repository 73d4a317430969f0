use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;

/// A deterministic fake model: logits depend on the whole canvas, so a
/// change anywhere changes every row (like attention would).
struct Stub {
    vocab: usize,
    calls: AtomicUsize,
    sharp: f32,
    nan: bool,
    /// One token per position gets all the mass (a very confident model).
    peaked: bool,
}

impl Stub {
    fn new(vocab: usize, sharp: f32) -> Self {
        Stub { vocab, calls: AtomicUsize::new(0), sharp, nan: false, peaked: false }
    }
}

impl Denoiser for Stub {
    fn vocab_size(&self) -> usize {
        self.vocab
    }
    fn mask_id(&self) -> u32 {
        0
    }
    fn logits(&self, canvases: &[Vec<u32>], _t: f64, positions: &[usize]) -> Result<Vec<f32>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let mut out = Vec::new();
        for c in canvases {
            let h: u64 = c.iter().fold(1469598103934665603u64, |h, &t| (h ^ t as u64).wrapping_mul(1099511628211));
            for &i in positions {
                for v in 0..self.vocab {
                    let x = ((h >> (v % 17)) as usize + i * 31 + v * 7) % 13;
                    let x = if self.peaked {
                        30.0 * f32::from(v == 1 + i % (self.vocab - 1))
                    } else {
                        x as f32 * self.sharp / 13.0
                    };
                    out.push(if self.nan && i == 2 { f32::NAN } else { x });
                }
            }
        }
        Ok(out)
    }
    fn time_conditioned(&self) -> bool {
        false
    }
}

fn canvas() -> Vec<u32> {
    // given tokens at 0, 1, 7 and 15; masks (0) elsewhere.
    let mut c = vec![0u32; 16];
    c[0] = 5;
    c[1] = 6;
    c[7] = 9;
    c[15] = 3;
    c
}

fn opts(strategy: Strategy) -> SamplerOptions {
    SamplerOptions { strategy, steps: 8, seed: 42, ..Default::default() }
}

fn all_variants() -> Vec<SamplerOptions> {
    let mut v = vec![];
    for s in [Strategy::Ancestral, Strategy::Confidence, Strategy::Entropy, Strategy::Margin, Strategy::Threshold] {
        v.push(opts(s));
        v.push(SamplerOptions { block_length: Some(4), ..opts(s) });
        v.push(SamplerOptions { guidance: 1.5, temperature: 0.0, ..opts(s) });
    }
    v
}

#[test]
fn given_tokens_never_change_and_no_mask_is_left() {
    let c = canvas();
    for o in all_variants() {
        let stub = Stub::new(20, 4.0);
        let r = sample(&stub, c.clone(), &o, &mut |_| {}).unwrap();
        for i in [0, 1, 7, 15] {
            assert_eq!(r.tokens[i], c[i], "{o:?}");
            assert_eq!(r.commit_step[i], None);
            assert_eq!(r.confidence[i], 1.0);
        }
        assert!(r.tokens.iter().all(|&t| t != 0), "{o:?}: {:?}", r.tokens);
        assert!(r.confidence.iter().all(|p| *p > 0.0 && *p <= 1.0), "{o:?}");
        assert!(r.steps_run <= o.steps);
    }
}

#[test]
fn confidence_runs_one_forward_per_step() {
    let stub = Stub::new(20, 4.0);
    let r = sample(&stub, canvas(), &opts(Strategy::Confidence), &mut |_| {}).unwrap();
    assert_eq!(r.forward_passes, 8);
    assert_eq!(r.steps_run, 8);
    assert_eq!(stub.calls.load(Ordering::SeqCst), 8);
    // Guidance batches cond+uncond into one call per step.
    let stub = Stub::new(20, 4.0);
    let o = SamplerOptions { guidance: 2.0, ..opts(Strategy::Confidence) };
    sample(&stub, canvas(), &o, &mut |_| {}).unwrap();
    assert_eq!(stub.calls.load(Ordering::SeqCst), 8);
}

#[test]
fn ancestral_cache_skips_forward_passes() {
    // 12 masks over 64 steps: most steps reveal nothing, so most forward
    // passes are served from the cache.
    let stub = Stub::new(20, 4.0);
    let o = SamplerOptions { steps: 64, ..opts(Strategy::Ancestral) };
    let r = sample(&stub, canvas(), &o, &mut |_| {}).unwrap();
    // It stops early once the block is fully revealed.
    assert!(r.steps_run <= 64);
    assert!(r.forward_passes <= 13, "{} passes", r.forward_passes);
    assert_eq!(r.forward_passes, stub.calls.load(Ordering::SeqCst));
}

#[test]
fn threshold_finishes_early_when_confident() {
    let mut stub = Stub::new(20, 1.0);
    stub.peaked = true;
    let o = SamplerOptions { steps: 12, threshold: 0.5, ..opts(Strategy::Threshold) };
    let r = sample(&stub, canvas(), &o, &mut |_| {}).unwrap();
    assert_eq!(r.steps_run, 1);
}

#[test]
fn same_seed_same_output_on_1_2_and_3_threads() {
    for o in all_variants() {
        let run = |threads: usize| {
            let pool = crate::threads::Pool::new(Some(threads), "test").unwrap();
            pool.install(|| sample(&Stub::new(20, 2.0), canvas(), &o, &mut |_| {}).unwrap())
        };
        let (a, b, c) = (run(1), run(2), run(3));
        assert_eq!(a.tokens, b.tokens);
        assert_eq!(a.confidence, b.confidence);
        assert_eq!((a.tokens, a.confidence), (c.tokens, c.confidence));
    }
    let a = sample(&Stub::new(20, 1.0), canvas(), &opts(Strategy::Confidence), &mut |_| {}).unwrap();
    let o = SamplerOptions { seed: 43, ..opts(Strategy::Confidence) };
    let b = sample(&Stub::new(20, 1.0), canvas(), &o, &mut |_| {}).unwrap();
    assert_ne!(a.tokens, b.tokens, "different seeds should differ at temperature 1");
}

#[test]
fn progress_reports_every_step() {
    let mut seen = vec![];
    sample(&Stub::new(20, 4.0), canvas(), &opts(Strategy::Confidence), &mut |p| seen.push(p.masked_left)).unwrap();
    assert_eq!(seen.len(), 8);
    assert_eq!(*seen.last().unwrap(), 0);
    assert!(seen.windows(2).all(|w| w[0] >= w[1]));
}

#[test]
fn bad_options_are_input_errors() {
    let stub = Stub::new(20, 1.0);
    let bad = [
        SamplerOptions { steps: 0, ..opts(Strategy::Confidence) },
        SamplerOptions { temperature: f64::NAN, ..opts(Strategy::Confidence) },
        SamplerOptions { guidance: -1.0, ..opts(Strategy::Confidence) },
        SamplerOptions { top_p: 0.0, ..opts(Strategy::Confidence) },
        SamplerOptions { top_p: 1.5, ..opts(Strategy::Ancestral) },
        SamplerOptions { top_p: f64::NAN, ..opts(Strategy::Confidence) },
        SamplerOptions { threshold: 0.0, ..opts(Strategy::Threshold) },
        SamplerOptions { block_length: Some(0), ..opts(Strategy::Confidence) },
        SamplerOptions { block_length: Some(1), steps: 3, ..opts(Strategy::Confidence) },
    ];
    for o in bad {
        assert!(matches!(sample(&stub, canvas(), &o, &mut |_| {}), Err(Error::Input(_))), "{o:?}");
    }
    assert!(matches!(Strategy::parse("nope"), Err(Error::Input(_))));
    assert!(matches!(sample(&stub, vec![], &opts(Strategy::Confidence), &mut |_| {}), Err(Error::Input(_))));
    assert!(matches!(sample(&stub, vec![0, 99], &opts(Strategy::Confidence), &mut |_| {}), Err(Error::Input(_))));
    let mut nan = Stub::new(20, 1.0);
    nan.nan = true;
    assert!(sample(&nan, canvas(), &opts(Strategy::Confidence), &mut |_| {}).is_err());
}

#[test]
fn schedule_sums_to_n() {
    assert_eq!(commit_schedule(10, 4), vec![3, 3, 2, 2]);
    assert_eq!(commit_schedule(2, 4), vec![1, 1, 0, 0]);
    for n in 0..40 {
        for s in 1..10 {
            assert_eq!(commit_schedule(n, s).iter().sum::<usize>(), n);
        }
    }
}

/// Logits that ignore the canvas: row v of position i is `(v * (i + 1)) % 7`.
struct Fixed;

impl Denoiser for Fixed {
    fn vocab_size(&self) -> usize {
        8
    }
    fn mask_id(&self) -> u32 {
        0
    }
    fn logits(&self, canvases: &[Vec<u32>], _t: f64, positions: &[usize]) -> Result<Vec<f32>> {
        Ok(canvases
            .iter()
            .flat_map(|_| positions.iter().flat_map(|&i| (0..8).map(move |v| ((v * (i + 1)) % 7) as f32)))
            .collect())
    }
    fn time_conditioned(&self) -> bool {
        false
    }
}

#[test]
fn likelihood_estimate_is_the_nll_for_a_context_free_model() {
    // With logits independent of the canvas, the masked-diffusion bound is
    // exactly the sum of -ln p(token) (E_t[1/t * P(masked | t)] = 1), so the
    // estimate must converge to it; given positions do not count.
    let tokens: Vec<u32> = (0..12).map(|i| 1 + (i * 5) % 7).collect();
    let given: Vec<bool> = (0..12).map(|i| i < 3).collect();
    let mut truth = 0.0;
    for (i, &tok) in tokens.iter().enumerate().skip(3) {
        let row: Vec<f64> = (1..8).map(|v| ((v * (i + 1)) % 7) as f64).collect();
        let lse = row.iter().map(|x| x.exp()).sum::<f64>().ln();
        truth += lse - ((tok as usize * (i + 1)) % 7) as f64;
    }
    truth /= 9.0;
    let est = uncertainty::likelihood(&Fixed, &tokens, &given, 256, 7).unwrap().unwrap();
    assert!((est - truth).abs() < 0.05 * truth, "estimate {est} vs exact {truth}");
    // Deterministic per seed; nothing generated or no samples: no estimate.
    assert_eq!(uncertainty::likelihood(&Fixed, &tokens, &given, 256, 7).unwrap(), Some(est));
    assert_eq!(uncertainty::likelihood(&Fixed, &tokens, &[true; 12], 4, 7).unwrap(), None);
    assert_eq!(uncertainty::likelihood(&Fixed, &tokens, &given, 0, 7).unwrap(), None);
}

#[test]
fn trajectory_records_prediction_changes_and_uncertainty() {
    // The hashing stub's predictions move whenever the canvas changes, so a
    // multi-step generation sees changes; a canvas-independent model none.
    let o = opts(Strategy::Confidence);
    let s = sample(&Stub::new(11, 3.0), canvas(), &o, &mut |_| {}).unwrap();
    let given: Vec<bool> = canvas().iter().map(|&t| t != 0).collect();
    assert!(s.changes.iter().sum::<u32>() > 0);
    for (i, &g) in given.iter().enumerate() {
        if g {
            assert_eq!((s.changes[i], s.last_change[i]), (0, None));
        } else if let Some(l) = s.last_change[i] {
            assert!(l <= s.commit_step[i].unwrap(), "a change after commit at {i}");
        }
    }
    let fixed = sample(&Fixed, vec![0; 10], &o, &mut |_| {}).unwrap();
    assert!(fixed.changes.iter().all(|&c| c == 0));
    let u = uncertainty::summarize(&s, &given, Some(1.5), None).unwrap();
    assert_eq!(u.token.len(), 16);
    assert!(given.iter().zip(&u.token).all(|(&g, &t)| !g || t == 0.0));
    assert!(u.parts.changes > 0.0 && u.parts.lateness > 0.0 && u.parts.lateness <= 1.0);
    assert_eq!(u.should_evolve, None);
    // Uncalibrated: the plain mean of the five components.
    let p = u.parts;
    let mean = (p.entropy + p.surprisal + p.changes + p.lateness + 1.5) / 5.0;
    assert!((u.scalar - mean).abs() < 1e-12);
    // Calibrated: standardised, weighted, and a verdict at the threshold.
    let cal = Calibration {
        mean: [p.entropy, 0.0, 0.0, 0.0, 0.0],
        std: [1.0; 5],
        weight: [1.0, 0.0, 0.0, 0.0, 0.0],
        threshold: -0.5,
    };
    let c = uncertainty::summarize(&s, &given, Some(1.5), Some(&cal)).unwrap();
    assert!(c.scalar.abs() < 1e-12);
    assert_eq!(c.should_evolve, Some(true));
    assert!(uncertainty::summarize(&s, &[true; 16], None, None).is_none());
}

#[test]
fn calibration_files_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("uncertainty.json");
    assert_eq!(Calibration::load(&p).unwrap(), None);
    let good = r#"{"components": {"nll": {"mean": 4.0, "std": 0.5, "weight": 1.0}}, "threshold": 1.2}"#;
    std::fs::write(&p, good).unwrap();
    let c = Calibration::load(&p).unwrap().unwrap();
    assert_eq!((c.mean[4], c.std[4], c.weight[4], c.threshold), (4.0, 0.5, 1.0, 1.2));
    assert_eq!(c.weight[0], 0.0);
    for bad in [
        "not json",
        r#"{"components": {"nll": {"mean": 4.0, "std": 0.0, "weight": 1.0}}, "threshold": 1.2}"#,
        r#"{"components": {"fog": {"mean": 4.0, "std": 1.0, "weight": 1.0}}, "threshold": 1.2}"#,
        r#"{"components": {"nll": {"mean": 4.0, "std": 1.0, "weight": 0.0}}, "threshold": 1.2}"#,
        r#"{"components": {}, "threshold": 1.2}"#,
    ] {
        std::fs::write(&p, bad).unwrap();
        let e = Calibration::load(&p).unwrap_err();
        assert!(matches!(e, Error::Format { .. }), "{bad}: {e}");
    }
}

/// Records every canvas it is asked about (and answers like `Stub`).
struct Recorder {
    inner: Stub,
    seen: std::sync::Mutex<Vec<Vec<u32>>>,
}

impl Denoiser for Recorder {
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }
    fn mask_id(&self) -> u32 {
        0
    }
    fn logits(&self, canvases: &[Vec<u32>], t: f64, positions: &[usize]) -> Result<Vec<f32>> {
        self.seen.lock().unwrap().extend(canvases.iter().cloned());
        self.inner.logits(canvases, t, positions)
    }
    fn time_conditioned(&self) -> bool {
        false
    }
}

#[test]
fn composition_generalises_guidance_and_masks_the_right_views() {
    let den = Stub::new(11, 3.0);
    let c = canvas();
    let given: Vec<bool> = c.iter().map(|&t| t != 0).collect();
    let pos: Vec<usize> = (0..16).filter(|&i| !given[i]).collect();
    // guidance w == [full: 1 + w, unconditional: -w]
    let w = 1.5;
    let guided = guided_logits(&den, &c, &given, 0, 0.5, w, &pos).unwrap();
    let o = SamplerOptions {
        compose: vec![Term::new(View::Full, 1.0 + w), Term::new(View::Unconditional, -w)],
        ..opts(Strategy::Confidence)
    };
    let composed = composed_logits(&den, &c, &given, &o, 0.5, &pos).unwrap();
    for (a, b) in guided.iter().zip(&composed) {
        assert!((a - b).abs() < 1e-4, "{a} vs {b}");
    }
    // [full: 1] is the plain model.
    let plain = SamplerOptions { compose: vec![Term::new(View::Full, 1.0)], ..opts(Strategy::Confidence) };
    assert_eq!(
        sample(&den, c.clone(), &plain, &mut |_| {}).unwrap().tokens,
        sample(&den, c.clone(), &opts(Strategy::Confidence), &mut |_| {}).unwrap().tokens
    );
    // no_memory masks the given tokens of the memory prefix only (positions 0 and 1 here).
    let rec = Recorder { inner: Stub::new(11, 3.0), seen: Default::default() };
    let mem = SamplerOptions {
        compose: vec![Term::new(View::Full, 2.0), Term::new(View::NoMemory, -1.0)],
        memory_prefix: 2,
        ..opts(Strategy::Confidence)
    };
    let out = sample(&rec, c.clone(), &mem, &mut |_| {}).unwrap();
    let seen = rec.seen.lock().unwrap();
    let (full, nomem) = (&seen[0], &seen[1]);
    assert_eq!(full, &c);
    assert_eq!((nomem[0], nomem[1], nomem[7], nomem[15]), (0, 0, 9, 3));
    assert!(out.tokens.iter().all(|&t| t != 0));
    assert_ne!(out.tokens, sample(&den, c.clone(), &opts(Strategy::Confidence), &mut |_| {}).unwrap().tokens);
    // Bad compositions.
    let bad = |compose: Vec<Term>, guidance: f64| SamplerOptions { compose, guidance, ..opts(Strategy::Confidence) };
    let t = |view, weight| Term::new(view, weight);
    for o in [
        bad(vec![t(View::Full, 1.5)], 0.0),
        bad(vec![t(View::Full, 0.5), t(View::Full, 0.5)], 0.0),
        bad(vec![t(View::Full, f64::NAN)], 0.0),
        bad(vec![t(View::Full, 1.0)], 2.0),
    ] {
        assert!(matches!(o.validate(), Err(Error::Input(_))), "{o:?}");
    }
    let over = SamplerOptions { memory_prefix: 17, ..plain };
    assert!(matches!(sample(&den, c, &over, &mut |_| {}), Err(Error::Input(_))));
    assert!(View::parse("fog").is_err());
    assert_eq!(View::parse("no_memory").unwrap(), View::NoMemory);
}
