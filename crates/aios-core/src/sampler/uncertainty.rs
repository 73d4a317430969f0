//! How unsure a text generation was, read off its denoising trajectory.
//!
//! Five signals, each a mean over the generated (not given) positions:
//! - `entropy`: predictive entropy when the position was committed (nats);
//! - `surprisal`: -ln p of the committed token under the model at commit;
//! - `changes`: how often the model's top prediction for the position changed
//!   between forward passes before it was committed;
//! - `lateness`: how late the last change came, (last change step + 1) /
//!   (commit step + 1), 0 when the prediction never changed;
//! - `nll`: the masked-diffusion likelihood bound of the output given the
//!   rest of the canvas, nats/token, from `likelihood_samples` extra forward
//!   passes (see [`likelihood`]).
//!
//! The scalar is their weighted mean after standardising each against
//! in-domain text: `sum_c w_c (x_c - mean_c) / std_c / sum_c w_c`. The means,
//! spreads, weights and the `should_evolve` threshold come from the model's
//! `uncertainty.json` (written by `python -m aios_train calibrate-uncertainty`
//! from held-out in-domain text); without one the components enter raw with
//! equal weights and there is no verdict. Per position, the uncertainty is
//! 1 - p(committed token) at commit (0 for given tokens).

use std::path::Path;

use super::rng::Stream;
use super::{Denoiser, Sampled};
use crate::error::{Error, Result};

pub const DEFAULT_LIKELIHOOD_SAMPLES: usize = 4;
pub const MAX_LIKELIHOOD_SAMPLES: usize = 256;
/// The file beside a model's weights that calibrates its uncertainty.
pub const CALIBRATION_FILE: &str = "uncertainty.json";
/// Component names, in the order of [`UncertaintyParts::values`].
pub const COMPONENTS: [&str; 5] = ["entropy", "surprisal", "changes", "lateness", "nll"];

/// The per-generation means the scalar is made of.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct UncertaintyParts {
    pub entropy: f64,
    pub surprisal: f64,
    pub changes: f64,
    pub lateness: f64,
    /// None when `likelihood_samples` was 0.
    pub nll: Option<f64>,
}

impl UncertaintyParts {
    /// The components in [`COMPONENTS`] order (None: not measured).
    pub fn values(&self) -> [Option<f64>; 5] {
        [Some(self.entropy), Some(self.surprisal), Some(self.changes), Some(self.lateness), self.nll]
    }
}

/// The uncertainty report of one generation.
#[derive(Clone, Debug, Default)]
pub struct Uncertainty {
    pub scalar: f64,
    /// Per canvas position: 1 - p(committed token) at commit; 0 if given.
    pub token: Vec<f32>,
    pub parts: UncertaintyParts,
    /// `scalar > threshold` of the model's calibration (None: uncalibrated).
    pub should_evolve: Option<bool>,
}

/// Standardisation and threshold fitted on in-domain held-out text.
#[derive(Clone, Debug, PartialEq)]
pub struct Calibration {
    pub mean: [f64; 5],
    pub std: [f64; 5],
    pub weight: [f64; 5],
    pub threshold: f64,
}

#[derive(serde::Deserialize)]
struct ComponentJson {
    mean: f64,
    std: f64,
    weight: f64,
}

#[derive(serde::Deserialize)]
struct CalibrationJson {
    components: std::collections::BTreeMap<String, ComponentJson>,
    threshold: f64,
}

impl Calibration {
    /// Reads `uncertainty.json`; a missing file is `Ok(None)`, a broken one an error.
    pub fn load(path: &Path) -> Result<Option<Self>> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(path, e)),
        };
        let bad = |msg: String| Error::format(path.display(), msg);
        let j: CalibrationJson =
            serde_json::from_str(&text).map_err(|e| bad(format!("not an uncertainty calibration: {e}")))?;
        let mut cal = Calibration { mean: [0.0; 5], std: [1.0; 5], weight: [0.0; 5], threshold: j.threshold };
        for (name, c) in &j.components {
            let Some(i) = COMPONENTS.iter().position(|n| n == name) else {
                return Err(bad(format!("unknown component {name:?}; known: {}", COMPONENTS.join(", "))));
            };
            if !(c.mean.is_finite() && c.std.is_finite() && c.std > 0.0 && c.weight.is_finite() && c.weight >= 0.0) {
                return Err(bad(format!("component {name:?} needs a finite mean, std > 0 and weight >= 0")));
            }
            (cal.mean[i], cal.std[i], cal.weight[i]) = (c.mean, c.std, c.weight);
        }
        if !cal.threshold.is_finite() || cal.weight.iter().sum::<f64>() <= 0.0 {
            return Err(bad("needs a finite threshold and at least one positive weight".into()));
        }
        Ok(Some(cal))
    }

    /// The scalar of `parts`: weighted mean of standardised components
    /// (components not measured are left out of both sums).
    pub fn scalar(&self, parts: &UncertaintyParts) -> f64 {
        combine(parts, &self.mean, &self.std, &self.weight)
    }
}

fn combine(parts: &UncertaintyParts, mean: &[f64; 5], std: &[f64; 5], weight: &[f64; 5]) -> f64 {
    let (mut num, mut den) = (0.0, 0.0);
    for (i, v) in parts.values().iter().enumerate() {
        if let Some(v) = v {
            num += weight[i] * (v - mean[i]) / std[i];
            den += weight[i];
        }
    }
    if den > 0.0 {
        num / den
    } else {
        f64::NAN
    }
}

/// The report for a finished canvas; None when nothing was generated.
pub fn summarize(s: &Sampled, given: &[bool], nll: Option<f64>, cal: Option<&Calibration>) -> Option<Uncertainty> {
    let gen: Vec<usize> = (0..given.len()).filter(|&i| !given[i]).collect();
    if gen.is_empty() {
        return None;
    }
    let n = gen.len() as f64;
    let mean = |f: &dyn Fn(usize) -> f64| gen.iter().map(|&i| f(i)).sum::<f64>() / n;
    let parts = UncertaintyParts {
        entropy: mean(&|i| s.entropy[i] as f64),
        surprisal: mean(&|i| -(s.confidence[i].max(f32::MIN_POSITIVE) as f64).ln()),
        changes: mean(&|i| s.changes[i] as f64),
        lateness: mean(&|i| match (s.last_change[i], s.commit_step[i]) {
            (Some(l), Some(c)) => (l as f64 + 1.0) / (c as f64 + 1.0),
            _ => 0.0,
        }),
        nll,
    };
    let scalar = match cal {
        Some(c) => c.scalar(&parts),
        None => combine(&parts, &[0.0; 5], &[1.0; 5], &[1.0; 5]),
    };
    Some(Uncertainty {
        scalar,
        token: given.iter().zip(&s.confidence).map(|(&g, &p)| if g { 0.0 } else { 1.0 - p }).collect(),
        parts,
        should_evolve: cal.map(|c| scalar > c.threshold),
    })
}

/// `-ln p(token)` from one row of logits, the mask token excluded (SUBS).
fn neg_log_prob(row: &[f32], mask: u32, token: u32) -> Option<f64> {
    let valid = |j: usize| j != mask as usize;
    let max = row.iter().enumerate().filter(|&(j, _)| valid(j)).map(|(_, &v)| v).fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() || row.iter().any(|v| v.is_nan()) {
        return None;
    }
    let z: f64 = row.iter().enumerate().filter(|&(j, _)| valid(j)).map(|(_, &v)| ((v - max) as f64).exp()).sum();
    Some(z.ln() - (row[token as usize] - max) as f64)
}

/// Counter-based streams of the likelihood estimate live above every
/// sampler step index, so they never repeat a sampling draw.
const LIKELIHOOD_STREAM: u64 = 1 << 48;

/// The masked-diffusion bound on -ln p(generated tokens | given ones), nats
/// per generated token. Each of the `samples` draws masks l of the n
/// generated positions (l stratified over 1..=n, positions at random) and
/// scores the truth there; the bound is E_l[(n / l) * sum of -ln p over the
/// masked], so per token it is the mean over draws of the masked positions'
/// mean -ln p. This is the lower-variance form LLaDA evaluates with (Nie et al.
/// 2025, eq. 6), chosen over MDLM's 1/t weight whose variance diverges as t ->
/// 0. None when nothing was generated or `samples` is 0.
pub fn likelihood(
    den: &dyn Denoiser,
    tokens: &[u32],
    given: &[bool],
    samples: usize,
    seed: u64,
) -> Result<Option<f64>> {
    let gen: Vec<usize> = (0..tokens.len()).filter(|&i| !given[i]).collect();
    if gen.is_empty() || samples == 0 {
        return Ok(None);
    }
    let (mask, vocab, n) = (den.mask_id(), den.vocab_size(), gen.len());
    let mut total = 0.0;
    for k in 0..samples {
        let stream = LIKELIHOOD_STREAM + k as u64;
        let u = Stream::new(seed, stream, 0).uniform();
        let l = (((k as f64 + u) / samples as f64 * n as f64).ceil() as usize).clamp(1, n);
        // A random l-subset: the l positions with the smallest keys.
        let mut keyed: Vec<(f64, usize)> =
            gen.iter().map(|&i| (Stream::new(seed, stream, 1 + i as u64).uniform(), i)).collect();
        keyed.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let mut masked: Vec<usize> = keyed[..l].iter().map(|&(_, i)| i).collect();
        masked.sort_unstable();
        let mut canvas = tokens.to_vec();
        masked.iter().for_each(|&i| canvas[i] = mask);
        let t_canvas = masked.len() as f64 / tokens.len() as f64;
        let logits = den.logits(&[canvas], t_canvas, &masked)?;
        let mut sum = 0.0;
        for (j, &i) in masked.iter().enumerate() {
            sum += neg_log_prob(&logits[j * vocab..(j + 1) * vocab], mask, tokens[i]).ok_or_else(|| {
                Error::Numeric(format!("the model produced non-finite logits at position {i} (likelihood pass)"))
            })?;
        }
        total += sum / l as f64;
    }
    Ok(Some(total / samples as f64))
}
