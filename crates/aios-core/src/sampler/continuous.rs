//! Gaussian diffusion samplers of the continuous heads (image, audio).
//!
//! Schedule and objective are `aios_train.continuous`'s (its docstring says
//! why): cosine `alpha_bar(t)` (Nichol & Dhariwal 2021) in continuous time,
//! v-prediction (Salimans & Ho 2022), the grid `t_i = 1 - i / steps`.
//! Samplers: DDIM with `eta` (Song et al. 2021), DDPM ancestral steps
//! from the Gaussian posterior (Ho et al. 2020), LCM's multistep sampler for
//! consistency-distilled students (Luo et al. 2023), classifier-free guidance
//! `v_u + (1 + w)(v_c - v_u)`, and inpainting by replacement: known values
//! are re-noised to the current time after every step and restored exactly
//! at the end, so they never change in the output.
//!
//! Noise is drawn from the counter-based [`Stream`] keyed by (seed, step,
//! element), so a result does not depend on the thread count, and the
//! Python reference (`aios_train.continuous.gaussian`) draws the same numbers.

use super::rng::Stream;
use crate::error::{Error, Result};

const COSINE_S: f64 = 0.008;
/// Continuous-sampler streams live above the text sampler's positions.
pub const NOISE_STREAM: u64 = 1 << 42;
/// Offset of the re-noising draws of known (inpainted) values.
const KNOWN_OFFSET: u64 = 1 << 29;

/// Which update rule a continuous step uses.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ContinuousSampler {
    /// DDIM; `eta = 0` is deterministic, `eta = 1` equals DDPM.
    Ddim,
    /// Ancestral sampling from `q(x_s | x_t, x_0)`.
    Ddpm,
    /// Latent consistency models' multistep sampler (Luo et al. 2023,
    /// Algorithm 1), for a consistency-distilled student (`aios_train.lcm`):
    /// the student's `x_0` estimate is its consistency function, and each
    /// step noises it afresh to the next time, `x_s = alpha_s x_0 + sigma_s z`.
    /// The teacher's guidance is distilled into the student, so it samples
    /// without classifier-free guidance.
    Lcm,
}

impl ContinuousSampler {
    pub const NAMES: [&'static str; 3] = ["ddim", "ddpm", "lcm"];

    pub fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }

    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "ddim" => Ok(ContinuousSampler::Ddim),
            "ddpm" => Ok(ContinuousSampler::Ddpm),
            "lcm" => Ok(ContinuousSampler::Lcm),
            other => Err(Error::Input(format!(
                "unknown continuous sampler {other:?}; choose one of {}",
                Self::NAMES.join(", ")
            ))),
        }
    }
}

/// `(alpha_t, sigma_t)` of the cosine schedule, `alpha^2 + sigma^2 = 1`.
pub fn alpha_sigma(t: f64) -> (f64, f64) {
    let f = |t: f64| ((t.clamp(0.0, 1.0) + COSINE_S) / (1.0 + COSINE_S) * std::f64::consts::FRAC_PI_2).cos().powi(2);
    let ab = (f(t) / f(0.0)).clamp(0.0, 1.0);
    (ab.sqrt(), (1.0 - ab).sqrt())
}

/// Times from 1 (noise) to 0 (data), `steps + 1` of them.
pub fn timesteps(steps: usize) -> Vec<f64> {
    (0..=steps).map(|i| 1.0 - i as f64 / steps as f64).collect()
}

/// `n` standard normals for `step`: element `i` uses stream
/// `(seed, step, NOISE_STREAM + offset + i)`, Box-Muller on its first two uniforms.
pub fn gaussian(seed: u64, step: u64, n: usize, offset: u64) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let mut s = Stream::new(seed, step, NOISE_STREAM + offset + i as u64);
            let (u1, u2) = (s.uniform(), s.uniform());
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
        })
        .collect()
}

/// The model's estimate of `x_0` from `x_t` and `v`, optionally clipped.
fn x0_of(x: f32, v: f32, a_t: f32, s_t: f32, clip: Option<f32>) -> f32 {
    let x0 = a_t * x - s_t * v;
    match clip {
        Some(c) => x0.clamp(-c, c),
        None => x0,
    }
}

/// One step `x_t -> x_s` (`s < t`) in place, given `v` at `t` and noise `z`.
#[allow(clippy::too_many_arguments)]
pub fn step(
    sampler: ContinuousSampler,
    x: &mut [f32],
    v: &[f32],
    t: f64,
    s: f64,
    eta: f64,
    z: &[f32],
    clip: Option<f32>,
) {
    let (a_t, s_t) = alpha_sigma(t);
    let (a_s, _) = alpha_sigma(s);
    let (af, sf) = (a_t as f32, s_t as f32);
    if s <= 0.0 {
        x.iter_mut().zip(v).for_each(|(x, &v)| *x = x0_of(*x, v, af, sf, clip));
        return;
    }
    let (ab_t, ab_s) = (a_t * a_t, a_s * a_s);
    match sampler {
        ContinuousSampler::Ddim => {
            let sig = if ab_t < 1.0 {
                eta * ((1.0 - ab_s) / (1.0 - ab_t)).max(0.0).sqrt() * (1.0 - ab_t / ab_s).max(0.0).sqrt()
            } else {
                0.0
            };
            let dir = (1.0 - ab_s - sig * sig).max(0.0).sqrt() as f32;
            let (a_s, sig) = (a_s as f32, sig as f32);
            for i in 0..x.len() {
                let x0 = x0_of(x[i], v[i], af, sf, clip);
                let eps = (x[i] - af * x0) / sf;
                let mut out = a_s * x0 + dir * eps;
                if sig > 0.0 {
                    out += sig * z[i];
                }
                x[i] = out;
            }
        }
        ContinuousSampler::Lcm => {
            let (a_s, s_s) = (a_s as f32, (1.0 - ab_s).max(0.0).sqrt() as f32);
            for i in 0..x.len() {
                x[i] = a_s * x0_of(x[i], v[i], af, sf, clip) + s_s * z[i];
            }
        }
        ContinuousSampler::Ddpm => {
            let a_ts2 = ab_t / ab_s;
            let beta = 1.0 - a_ts2;
            let c0 = (a_s * beta / (1.0 - ab_t)) as f32;
            let ct = (a_ts2.sqrt() * (1.0 - ab_s) / (1.0 - ab_t)) as f32;
            let sd = (beta * (1.0 - ab_s) / (1.0 - ab_t)).max(0.0).sqrt() as f32;
            for i in 0..x.len() {
                let x0 = x0_of(x[i], v[i], af, sf, clip);
                x[i] = c0 * x0 + ct * x[i] + sd * z[i];
            }
        }
    }
}

/// How a generation steps its continuous segments.
#[derive(Clone, Copy, Debug)]
pub struct StepRule {
    pub sampler: ContinuousSampler,
    /// DDIM's eta (ignored by DDPM).
    pub eta: f64,
    pub seed: u64,
}

/// A region of a continuous canvas segment being generated.
#[derive(Clone, Debug)]
pub struct Region {
    /// Current values `x_t`.
    pub x: Vec<f32>,
    /// Known clean values and the mask (true = known, never changed).
    pub known: Option<(Vec<f32>, Vec<bool>)>,
    /// Noise-stream offset of this region (distinct per modality).
    pub offset: u64,
    /// Clip of the `x_0` estimate (images: 1, their range).
    pub clip: Option<f32>,
}

impl Region {
    /// Pure noise at `t = 1` (`seed`, step 0), known values noised to t = 1.
    pub fn start(n: usize, known: Option<(Vec<f32>, Vec<bool>)>, seed: u64, offset: u64, clip: Option<f32>) -> Self {
        let mut r = Region { x: gaussian(seed, 0, n, offset), known, offset, clip };
        r.renoise_known(1.0, seed, 0);
        r
    }

    /// Known values set to `alpha_t x_0 + sigma_t z` (exactly `x_0` at t = 0).
    fn renoise_known(&mut self, t: f64, seed: u64, step: u64) {
        let Some((x0, mask)) = &self.known else { return };
        let (a, s) = alpha_sigma(t);
        let z = if t > 0.0 { gaussian(seed, step, x0.len(), self.offset + KNOWN_OFFSET) } else { vec![0.0; x0.len()] };
        for i in 0..x0.len() {
            if mask[i] {
                self.x[i] = if t > 0.0 { a as f32 * x0[i] + s as f32 * z[i] } else { x0[i] };
            }
        }
    }

    /// Advances from `t` to `s` with the model's `v`; `step` is 1-based.
    pub fn advance(&mut self, rule: StepRule, v: &[f32], t: f64, s: f64, step: u64) {
        let StepRule { sampler, eta, seed } = rule;
        let stochastic = s > 0.0 && (sampler != ContinuousSampler::Ddim || eta > 0.0);
        let z = if stochastic { gaussian(seed, step, self.x.len(), self.offset) } else { vec![] };
        self::step(sampler, &mut self.x, v, t, s, eta, &z, self.clip);
        self.renoise_known(s, seed, step);
    }
}

/// An energy on a generated image: the mean brightness of a rectangle
/// should be `target` (0 = black, 1 = white). `E = n/2 (mean - target)^2`
/// over the rectangle's `n` values (all channels), so `grad E` is
/// `mean - target` at each of them.
#[derive(Clone, Debug, PartialEq)]
pub struct Brightness {
    /// `[x0, y0, x1, y1)` in pixels, end exclusive.
    pub rect: [usize; 4],
    pub target: f32,
    /// eta: each step moves the `x_0` estimate by `-eta * grad E`.
    pub weight: f64,
}

impl Brightness {
    /// Checks it against an image of `size` x `size`.
    pub fn validate(&self, size: usize) -> crate::error::Result<()> {
        let [x0, y0, x1, y1] = self.rect;
        if !(x0 < x1 && y0 < y1 && x1 <= size && y1 <= size) {
            return crate::input_err!(
                "brightness region {:?} must be [x0, y0, x1, y1) with x0 < x1 <= {size} and y0 < y1 <= {size}",
                self.rect
            );
        }
        if !(self.target.is_finite() && (0.0..=1.0).contains(&self.target)) {
            return crate::input_err!("brightness target must be in [0, 1], got {}", self.target);
        }
        if !(self.weight.is_finite() && self.weight >= 0.0) {
            return crate::input_err!("energy weight (eta) must be finite and >= 0, got {}", self.weight);
        }
        Ok(())
    }

    /// Mean of `x` (`[C, size, size]`, in [-1, 1] units) over the rectangle, in [0, 1].
    pub fn mean(&self, x: &[f32], size: usize) -> f32 {
        let [x0, y0, x1, y1] = self.rect;
        let plane = size * size;
        let (mut sum, mut n) = (0f64, 0usize);
        for c in 0..x.len() / plane {
            for y in y0..y1 {
                for v in &x[c * plane + y * size + x0..c * plane + y * size + x1] {
                    sum += ((v.clamp(-1.0, 1.0) + 1.0) / 2.0) as f64;
                    n += 1;
                }
            }
        }
        (sum / n.max(1) as f64) as f32
    }
}

impl Brightness {
    /// `x0 -= weight * grad E` in [-1, 1] units (target 0..1 -> -1..1).
    fn descend(&self, x0: &mut [f32], size: usize) {
        let step = (self.weight as f32) * 2.0 * (self.mean(x0, size) - self.target);
        let [x0r, y0, x1, y1] = self.rect;
        let plane = size * size;
        for c in 0..x0.len() / plane {
            for y in y0..y1 {
                for xv in &mut x0[c * plane + y * size + x0r..c * plane + y * size + x1] {
                    *xv -= step;
                }
            }
        }
    }
}

/// A linear softmax classifier on images (`aios.kind = classifier`, written
/// by `python -m aios_train classifier`): logits `W x + b` over the
/// `[C*H*W]` pixels in [-1, 1] units. Small and exactly differentiable, so
/// its log-probability is an energy the sampler can follow.
#[derive(Debug)]
pub struct LinearClassifier {
    pub path: std::path::PathBuf,
    pub classes: Vec<String>,
    /// `[K, values]`, row-major.
    weight: Vec<f32>,
    bias: Vec<f32>,
    pub values: usize,
}

#[derive(serde::Deserialize)]
struct ClassifierConfig {
    classes: Vec<String>,
    image_size: usize,
    image_channels: usize,
}

impl LinearClassifier {
    /// Loads and checks a classifier file (kind, shapes, finite values).
    pub fn load(path: impl AsRef<std::path::Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = crate::format::WeightFile::open(path)?;
        let bad = |m: String| Error::format(path.display(), m);
        if file.kind != "classifier" {
            return Err(bad(format!(
                "this is a {:?} file, not an image classifier (aios.kind = classifier)",
                file.kind
            )));
        }
        let json = file.config_json().ok_or_else(|| bad("no aios.config metadata".into()))?;
        let c: ClassifierConfig = serde_json::from_str(json).map_err(|e| bad(format!("invalid config: {e}")))?;
        let (k, n) = (c.classes.len(), c.image_channels * c.image_size * c.image_size);
        if k < 2 || n == 0 {
            return Err(bad(format!("{k} classes over {n} values: need at least 2 classes and an image")));
        }
        let read = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
            let raw = file.require(name)?;
            if raw.shape != shape {
                return Err(bad(format!("{name} has shape {:?}, expected {shape:?}", raw.shape)));
            }
            Ok(crate::quant::load_f32(&file, raw)?.flatten_all()?.to_vec1()?)
        };
        let weight = read("weight", &[k, n])?;
        let bias = read("bias", &[k])?;
        if file.tensors.len() != 2 {
            return Err(bad("a linear classifier has exactly the tensors weight and bias".into()));
        }
        Ok(LinearClassifier { path: path.to_path_buf(), classes: c.classes, weight, bias, values: n })
    }

    /// The class named `label` (or its index).
    pub fn class_index(&self, label: &str) -> Result<usize> {
        if let Some(i) = self.classes.iter().position(|c| c == label) {
            return Ok(i);
        }
        match label.parse::<usize>() {
            Ok(i) if i < self.classes.len() => Ok(i),
            _ => crate::input_err!("class {label:?} is not one of the classifier's {:?}", self.classes),
        }
    }

    /// Class probabilities of one image (`[values]`, [-1, 1] units).
    pub fn probs(&self, x: &[f32]) -> Vec<f64> {
        let logits: Vec<f64> = self
            .weight
            .chunks_exact(self.values)
            .zip(&self.bias)
            .map(|(w, b)| w.iter().zip(x).map(|(w, x)| (w * x) as f64).sum::<f64>() + *b as f64)
            .collect();
        let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
        let z: f64 = e.iter().sum();
        e.iter().map(|v| v / z).collect()
    }
}

/// An energy on a generated image: `E = -log p(class | x_0)` under a
/// linear classifier, whose gradient is `sum_k p_k W_k - W_class`
/// (classifier guidance applied to the `x_0` estimate, as universal
/// guidance does, so the classifier needs no noisy training images).
#[derive(Clone, Debug)]
pub struct ClassEnergy {
    pub classifier: std::sync::Arc<LinearClassifier>,
    pub class: usize,
    /// eta: each step moves the `x_0` estimate by `-eta * grad E`.
    pub weight: f64,
}

impl PartialEq for ClassEnergy {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.classifier, &other.classifier)
            && self.class == other.class
            && self.weight == other.weight
    }
}

impl ClassEnergy {
    fn descend(&self, x0: &mut [f32]) {
        let c = &self.classifier;
        let p = c.probs(x0);
        let eta = self.weight;
        for (k, w) in c.weight.chunks_exact(c.values).enumerate() {
            let coef = eta * (p[k] - if k == self.class { 1.0 } else { 0.0 });
            if coef != 0.0 {
                x0.iter_mut().zip(w).for_each(|(x, &w)| *x -= (coef * w as f64) as f32);
            }
        }
    }
}

/// The energies an image generation can follow.
#[derive(Clone, Debug, PartialEq)]
pub enum ImageEnergy {
    Brightness(Brightness),
    Class(ClassEnergy),
}

impl ImageEnergy {
    pub fn weight(&self) -> f64 {
        match self {
            ImageEnergy::Brightness(b) => b.weight,
            ImageEnergy::Class(c) => c.weight,
        }
    }

    /// Checks it against images of `size` x `size` with `values` values.
    pub fn validate(&self, size: usize, values: usize) -> Result<()> {
        match self {
            ImageEnergy::Brightness(b) => b.validate(size),
            ImageEnergy::Class(c) => {
                if c.classifier.values != values {
                    return crate::input_err!(
                        "classifier {} reads {} values per image, this model's images have {values}",
                        c.classifier.path.display(),
                        c.classifier.values
                    );
                }
                if c.class >= c.classifier.classes.len() {
                    return crate::input_err!("class index {} is outside the classifier's classes", c.class);
                }
                if !(c.weight.is_finite() && c.weight >= 0.0) {
                    return crate::input_err!("energy weight (eta) must be finite and >= 0, got {}", c.weight);
                }
                Ok(())
            }
        }
    }
}

/// Energy guidance on `v` at time `t` for the image `x_t` (`[C, size, size]`):
/// the model's `x_0` estimate moves by `-eta * grad E(x_0)` for each energy,
/// and `v` is rewritten to give that estimate (the score becomes
/// `score - eta * alpha_t / sigma_t^2 * grad E`). Near `t = 0` (`sigma_t`
/// below 1e-4) it does nothing: the estimate is the sample.
pub fn apply_energies(energies: &[ImageEnergy], x: &[f32], v: &mut [f32], t: f64, size: usize, clip: Option<f32>) {
    // Weight 0 leaves v bit for bit as it was (the rewrite below would round it).
    if energies.iter().all(|e| e.weight() == 0.0) {
        return;
    }
    move_estimate(x, v, t, clip, |x0| {
        for e in energies {
            match e {
                ImageEnergy::Brightness(b) => b.descend(x0, size),
                ImageEnergy::Class(c) => c.descend(x0),
            }
        }
    });
}

/// [`apply_energies`] for generated sound (`x_t` `[frames, mels]`).
pub fn apply_audio_energies(energies: &[Loudness], x: &[f32], v: &mut [f32], t: f64, mels: usize) {
    if energies.iter().all(|e| e.weight == 0.0) {
        return;
    }
    move_estimate(x, v, t, None, |x0| energies.iter().for_each(|e| e.descend(x0, mels)));
}

/// `v` rewritten so that the `x_0` estimate becomes `descend(x_0)`.
fn move_estimate(x: &[f32], v: &mut [f32], t: f64, clip: Option<f32>, descend: impl FnOnce(&mut [f32])) {
    let (a, s) = alpha_sigma(t);
    if s < 1e-4 {
        return;
    }
    let (af, sf) = (a as f32, s as f32);
    let mut x0: Vec<f32> = x.iter().zip(v.iter()).map(|(&xi, &vi)| x0_of(xi, vi, af, sf, clip)).collect();
    descend(&mut x0);
    // v = (a x - x0) / s gives back x0 = a x - s v.
    for ((vi, &xi), &x0i) in v.iter_mut().zip(x).zip(&x0) {
        *vi = (af * xi - x0i) / sf;
    }
}

/// An energy on generated sound: the mean level of the log-mel frames
/// `[f0, f1)` (every bin) should be `target_db`, in dB of the mel magnitude
/// (20 log10; the features' floor, 1e-5, is -100 dB, full scale 0 dB).
/// In the model's units (`(ln mel + 4) / 4`) that is `E = n/2 (mean -
/// target)^2` over the span's `n` values, so `grad E = mean - target` at each.
#[derive(Clone, Debug, PartialEq)]
pub struct Loudness {
    /// `[f0, f1)` log-mel frames, end exclusive.
    pub frames: [usize; 2],
    pub target_db: f32,
    /// eta: each step moves the `x_0` estimate by `-eta * grad E`.
    pub weight: f64,
}

impl Loudness {
    /// Checks it against clips of `frames` log-mel frames.
    pub fn validate(&self, frames: usize) -> Result<()> {
        let [f0, f1] = self.frames;
        if !(f0 < f1 && f1 <= frames) {
            return crate::input_err!("loudness frames {:?} must be [f0, f1) with f0 < f1 <= {frames}", self.frames);
        }
        if !(self.target_db.is_finite() && (-100.0..=20.0).contains(&self.target_db)) {
            return crate::input_err!("loudness target must be in [-100, 20] dB, got {}", self.target_db);
        }
        if !(self.weight.is_finite() && self.weight >= 0.0) {
            return crate::input_err!("energy weight (eta) must be finite and >= 0, got {}", self.weight);
        }
        Ok(())
    }

    /// The target in the model's normalised log-mel units.
    pub fn target_unit(&self) -> f32 {
        ((self.target_db as f64 * std::f64::consts::LN_10 / 20.0 + 4.0) / 4.0) as f32
    }

    /// A normalised log-mel value in dB.
    pub fn db_of(unit: f32) -> f32 {
        ((unit as f64 * 4.0 - 4.0) * 20.0 / std::f64::consts::LN_10) as f32
    }

    /// Mean of `x` (`[frames, mels]`, normalised log-mel) over the span.
    pub fn mean(&self, x: &[f32], mels: usize) -> f32 {
        let span = &x[self.frames[0] * mels..self.frames[1] * mels];
        (span.iter().map(|&v| v as f64).sum::<f64>() / span.len().max(1) as f64) as f32
    }

    fn descend(&self, x0: &mut [f32], mels: usize) {
        let step = self.weight as f32 * (self.mean(x0, mels) - self.target_unit());
        x0[self.frames[0] * mels..self.frames[1] * mels].iter_mut().for_each(|v| *v -= step);
    }
}

/// Classifier-free guidance on v: `u + (1 + w)(c - u)`.
pub fn guide(cond: &[f32], uncond: &[f32], w: f64) -> Vec<f32> {
    let w = w as f32;
    cond.iter().zip(uncond).map(|(&c, &u)| u + (1.0 + w) * (c - u)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_ends() {
        let (a0, s0) = alpha_sigma(0.0);
        assert!((a0 - 1.0).abs() < 1e-12 && s0 < 1e-6);
        let (a1, s1) = alpha_sigma(1.0);
        assert!(a1 < 1e-6 && (s1 - 1.0).abs() < 1e-9);
    }

    #[test]
    fn gaussian_moments_and_determinism() {
        let z = gaussian(3, 1, 20_000, 0);
        let mean = z.iter().map(|&v| v as f64).sum::<f64>() / z.len() as f64;
        let var = z.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / z.len() as f64;
        assert!(mean.abs() < 0.03 && (var - 1.0).abs() < 0.05, "{mean} {var}");
        assert_eq!(z, gaussian(3, 1, 20_000, 0));
        assert_ne!(z[..10], gaussian(3, 2, 10, 0)[..]);
    }

    #[test]
    fn ddim_eta_one_equals_ddpm() {
        let x: Vec<f32> = gaussian(1, 0, 64, 0);
        let v: Vec<f32> = gaussian(2, 0, 64, 0).iter().map(|z| z * 0.5).collect();
        let z = gaussian(3, 0, 64, 0);
        for (t, s) in [(1.0, 0.95), (0.6, 0.55), (0.2, 0.1)] {
            let (mut a, mut b) = (x.clone(), x.clone());
            step(ContinuousSampler::Ddim, &mut a, &v, t, s, 1.0, &z, None);
            step(ContinuousSampler::Ddpm, &mut b, &v, t, s, 0.0, &z, None);
            for (p, q) in a.iter().zip(&b) {
                assert!((p - q).abs() < 1e-4, "t={t}: {p} vs {q}");
            }
        }
    }

    #[test]
    fn loudness_energy_moves_the_span_onto_its_target() {
        let (frames, mels) = (8, 4);
        let x: Vec<f32> = (0..frames * mels).map(|i| (i as f32 / 16.0) - 1.0).collect();
        let v0 = vec![0.1f32; frames * mels];
        let e = Loudness { frames: [2, 5], target_db: -40.0, weight: 1.0 };
        e.validate(frames).unwrap();
        let t = 0.5;
        let (a, s) = alpha_sigma(t);
        let mut v = v0.clone();
        apply_audio_energies(std::slice::from_ref(&e), &x, &mut v, t, mels);
        let x0: Vec<f32> = x.iter().zip(&v).map(|(&x, &v)| a as f32 * x - s as f32 * v).collect();
        assert!((e.mean(&x0, mels) - e.target_unit()).abs() < 1e-4, "weight 1 lands on the target");
        assert!((Loudness::db_of(e.target_unit()) + 40.0).abs() < 1e-3);
        for i in (0..2 * mels).chain(5 * mels..frames * mels) {
            assert!((v[i] - v0[i]).abs() < 1e-6, "values outside the span are untouched");
        }
        assert!(Loudness { frames: [5, 5], ..e.clone() }.validate(frames).is_err());
        assert!(Loudness { frames: [0, 9], ..e.clone() }.validate(frames).is_err());
        assert!(Loudness { target_db: f32::NAN, ..e.clone() }.validate(frames).is_err());
        assert!(Loudness { weight: f64::INFINITY, ..e }.validate(frames).is_err());
    }

    #[test]
    fn lcm_step_renoises_the_estimate_and_ends_on_it() {
        // x_s = alpha_s x0 + sigma_s z with x0 = alpha_t x - sigma_t v (clipped); at s = 0 it is x0 itself.
        let x = gaussian(1, 0, 64, 0);
        let v: Vec<f32> = gaussian(2, 0, 64, 0).iter().map(|z| z * 0.5).collect();
        let z = gaussian(3, 0, 64, 0);
        let (t, s) = (0.75, 0.5);
        let ((a_t, s_t), (a_s, s_s)) = (alpha_sigma(t), alpha_sigma(s));
        let mut out = x.clone();
        step(ContinuousSampler::Lcm, &mut out, &v, t, s, 0.0, &z, Some(1.0));
        for i in 0..64 {
            let x0 = (a_t as f32 * x[i] - s_t as f32 * v[i]).clamp(-1.0, 1.0);
            assert!((out[i] - (a_s as f32 * x0 + s_s as f32 * z[i])).abs() < 1e-6);
        }
        let mut last = x.clone();
        step(ContinuousSampler::Lcm, &mut last, &v, 0.25, 0.0, 0.0, &[], None);
        let (a, sg) = alpha_sigma(0.25);
        for i in 0..64 {
            assert!((last[i] - (a as f32 * x[i] - sg as f32 * v[i])).abs() < 1e-6);
        }
        // Different noise, different result: the sampler is stochastic between steps.
        let mut other = x.clone();
        step(ContinuousSampler::Lcm, &mut other, &v, t, s, 0.0, &gaussian(4, 0, 64, 0), Some(1.0));
        assert_ne!(other, out);
    }

    #[test]
    fn exact_v_recovers_the_data_with_deterministic_ddim() {
        // With the true v of a fixed x0, DDIM (eta 0) lands on x0 from any start.
        let x0: Vec<f32> = (0..32).map(|i| (i as f32 / 16.0) - 1.0).collect();
        let mut x = gaussian(5, 0, 32, 0);
        let ts = timesteps(10);
        for w in ts.windows(2) {
            let (a, s) = alpha_sigma(w[0]);
            let eps: Vec<f32> = x.iter().zip(&x0).map(|(&x, &x0)| (x - a as f32 * x0) / s as f32).collect();
            let v: Vec<f32> = eps.iter().zip(&x0).map(|(&e, &x0)| a as f32 * e - s as f32 * x0).collect();
            step(ContinuousSampler::Ddim, &mut x, &v, w[0], w[1], 0.0, &[], None);
        }
        for (p, q) in x.iter().zip(&x0) {
            assert!((p - q).abs() < 1e-3, "{p} vs {q}");
        }
    }

    #[test]
    fn known_values_are_exact_at_the_end() {
        let known: Vec<f32> = (0..16).map(|i| i as f32 / 16.0).collect();
        let mask: Vec<bool> = (0..16).map(|i| i % 3 == 0).collect();
        let mut r = Region::start(16, Some((known.clone(), mask.clone())), 9, 0, Some(1.0));
        let ts = timesteps(4);
        for (i, w) in ts.windows(2).enumerate() {
            let v = vec![0.3f32; 16];
            let rule = StepRule { sampler: ContinuousSampler::Ddpm, eta: 0.0, seed: 9 };
            r.advance(rule, &v, w[0], w[1], i as u64 + 1);
        }
        for i in 0..16 {
            if mask[i] {
                assert_eq!(r.x[i], known[i]);
            }
        }
    }

    #[test]
    fn brightness_energy_moves_the_estimate_onto_its_target() {
        let size = 4;
        let x: Vec<f32> = (0..16).map(|i| (i as f32 / 16.0) - 0.5).collect();
        let v0: Vec<f32> = (0..16).map(|i| ((i * 7 % 5) as f32 - 2.0) * 0.1).collect();
        let t = 0.5;
        let e = Brightness { rect: [0, 0, 2, 4], target: 0.25, weight: 1.0 };
        e.validate(size).unwrap();
        let mut v = v0.clone();
        apply_energies(&[ImageEnergy::Brightness(e.clone())], &x, &mut v, t, size, None);
        let (a, s) = alpha_sigma(t);
        let x0: Vec<f32> = x.iter().zip(&v).map(|(&x, &v)| x0_of(x, v, a as f32, s as f32, None)).collect();
        assert!((e.mean(&x0, size) - 0.25).abs() < 1e-5, "weight 1 puts the mean on the target");
        // Outside the rectangle nothing moves; weight 0 changes nothing at all.
        let before: Vec<f32> = x.iter().zip(&v0).map(|(&x, &v)| x0_of(x, v, a as f32, s as f32, None)).collect();
        for y in 0..4 {
            for c in 2..4 {
                assert!((x0[y * 4 + c] - before[y * 4 + c]).abs() < 1e-5);
            }
        }
        let mut w0 = v0.clone();
        apply_energies(&[ImageEnergy::Brightness(Brightness { weight: 0.0, ..e.clone() })], &x, &mut w0, t, size, None);
        assert!(w0.iter().zip(&v0).all(|(a, b)| (a - b).abs() < 1e-5));
        for bad in [
            Brightness { rect: [2, 0, 2, 4], ..e.clone() },
            Brightness { rect: [0, 0, 5, 4], ..e.clone() },
            Brightness { target: 1.5, ..e.clone() },
            Brightness { weight: f64::NAN, ..e.clone() },
        ] {
            assert!(bad.validate(size).is_err());
        }
    }

    #[test]
    fn class_energy_raises_the_target_class_probability() {
        let n = 16;
        let weight: Vec<f32> = (0..3 * n).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.05).collect();
        let c = std::sync::Arc::new(LinearClassifier {
            path: "mem".into(),
            classes: vec!["a".into(), "b".into(), "c".into()],
            weight,
            bias: vec![0.1, -0.2, 0.0],
            values: n,
        });
        let x: Vec<f32> = (0..n).map(|i| (i as f32 / n as f32) - 0.5).collect();
        let v0: Vec<f32> = vec![0.0; n];
        let t = 0.4;
        let (a, s) = alpha_sigma(t);
        let x0 =
            |v: &[f32]| -> Vec<f32> { x.iter().zip(v).map(|(&x, &v)| x0_of(x, v, a as f32, s as f32, None)).collect() };
        for class in 0..3 {
            let e = ClassEnergy { classifier: c.clone(), class, weight: 2.0 };
            ImageEnergy::Class(e.clone()).validate(4, n).unwrap();
            let mut v = v0.clone();
            apply_energies(&[ImageEnergy::Class(e)], &x, &mut v, t, 4, None);
            let (before, after) = (c.probs(&x0(&v0))[class], c.probs(&x0(&v))[class]);
            assert!(after > before, "class {class}: {before} -> {after}");
        }
        assert_eq!(c.class_index("b").unwrap(), 1);
        assert_eq!(c.class_index("2").unwrap(), 2);
        assert!(c.class_index("d").is_err() && c.class_index("3").is_err());
        let bad = ClassEnergy { classifier: c.clone(), class: 0, weight: f64::NAN };
        assert!(ImageEnergy::Class(bad).validate(4, n).is_err());
        assert!(ImageEnergy::Class(ClassEnergy { classifier: c, class: 0, weight: 1.0 }).validate(3, 9).is_err());
    }
}
