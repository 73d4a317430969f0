//! Masked-diffusion samplers (DESIGN section 3). All share one driver:
//! the canvas is split into blocks (semi-autoregressive when `block_length`
//! is set, one block otherwise); each step runs the denoiser once (or reuses
//! the previous logits when nothing changed), scores every still-masked
//! position of the current block, and a strategy decides which to commit.
//! Given tokens (prompt, suffix, infill context) are never changed.

pub mod constraints;
pub mod continuous;
pub mod json_prefix;
pub mod regex_prefix;
pub mod rng;
mod scores;
pub mod uncertainty;

pub use rng::Stream;
pub use scores::{score_row, PositionScore};
pub use uncertainty::{Calibration, Uncertainty, UncertaintyParts};

use std::time::Instant;

use crate::error::{Error, Result};

/// How masked positions are chosen for unmasking.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Strategy {
    /// MDLM ancestral (DDPM) sampling with the no-change cache: each masked
    /// token is revealed with probability `(t - s) / t`.
    Ancestral,
    /// LLaDA low-confidence remasking: commit the most probable picks.
    Confidence,
    /// Commit the positions whose predictive entropy is lowest.
    Entropy,
    /// Commit the positions with the largest top-1 minus top-2 margin.
    Margin,
    /// Parallel decoding: commit every position with confidence >= tau (and
    /// at least enough to finish within `steps`).
    Threshold,
}

impl Strategy {
    pub const NAMES: [&'static str; 5] = ["ancestral", "confidence", "entropy", "margin", "threshold"];

    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "ancestral" => Strategy::Ancestral,
            "confidence" => Strategy::Confidence,
            "entropy" => Strategy::Entropy,
            "margin" => Strategy::Margin,
            "threshold" => Strategy::Threshold,
            other => {
                return Err(Error::Input(format!(
                    "unknown sampler {other:?}; choose one of {}",
                    Self::NAMES.join(", ")
                )))
            }
        })
    }
}

/// Which given tokens one term of a score composition sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum View {
    /// Everything given: memories, prompt, suffix.
    Full,
    /// The memory segment (the first `memory_prefix` positions) masked.
    NoMemory,
    /// Every given token masked (classifier-free guidance's unconditional).
    Unconditional,
}

impl View {
    pub const NAMES: [&'static str; 3] = ["full", "no_memory", "unconditional"];

    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "full" => Ok(View::Full),
            "no_memory" => Ok(View::NoMemory),
            "unconditional" => Ok(View::Unconditional),
            other => crate::input_err!("unknown composition term {other:?}; choose from {}", Self::NAMES.join(", ")),
        }
    }
}

/// An adapter set: loaded adapter names and their weights.
pub type AdapterSet = std::collections::BTreeMap<String, f32>;

/// One term of a score composition: the logits of `view`, times `weight`,
/// from the generation's own model (`adapters` None) or with exactly the
/// adapter set `adapters` (empty = the bare base), e.g. "with the skill"
/// minus "without it" pushes towards what the adapter adds.
#[derive(Clone, Debug, PartialEq)]
pub struct Term {
    pub view: View,
    pub weight: f64,
    pub adapters: Option<AdapterSet>,
}

impl Term {
    pub fn new(view: View, weight: f64) -> Self {
        Term { view, weight, adapters: None }
    }

    /// A term from its key and weight: `VIEW` (the generation's model),
    /// `VIEW@NAME+NAME` (those loaded adapters at weight 1, nothing else) or
    /// `VIEW@none` (no adapters), e.g. `full@legal`.
    pub fn parse(key: &str, weight: f64) -> Result<Self> {
        let (view, set) = match key.split_once('@') {
            None => (key, None),
            Some((v, "none")) => (v, Some(AdapterSet::new())),
            Some((v, names)) => {
                let mut set = AdapterSet::new();
                for n in names.split('+').map(str::trim) {
                    if n.is_empty() || set.insert(n.to_string(), 1.0).is_some() {
                        return crate::input_err!(
                            "composition term {key:?}: adapter names must be distinct, non-empty"
                        );
                    }
                }
                (v, Some(set))
            }
        };
        Ok(Term { view: View::parse(view.trim())?, weight, adapters: set })
    }
}

/// Sampler settings; validated by [`SamplerOptions::validate`].
#[derive(Clone, Debug)]
pub struct SamplerOptions {
    pub strategy: Strategy,
    /// Denoising steps (forward passes, at most, barring `steps < blocks`).
    pub steps: usize,
    /// Sampling temperature; 0 = greedy.
    pub temperature: f64,
    /// Nucleus sampling: draw only from the most probable tokens holding
    /// this much of the tempered mass (1 = off; no effect when greedy).
    pub top_p: f64,
    /// Semi-autoregressive block size (None = the whole canvas is one block).
    pub block_length: Option<usize>,
    /// Classifier-free guidance weight w (0 = off): `un + (w+1)(cond - un)`.
    pub guidance: f64,
    /// Confidence threshold for [`Strategy::Threshold`].
    pub threshold: f64,
    pub seed: u64,
    /// Forward passes spent after sampling on the masked-diffusion likelihood
    /// of the output (part of the uncertainty estimate; 0 = skip it).
    pub likelihood_samples: usize,
    /// Score composition (empty = off): each step's logits are
    /// `sum_i w_i logits(view_i)`, the weights summing to 1. Classifier-free
    /// guidance w is `[full: 1 + w, unconditional: -w]`; memory guidance w
    /// is `[full: 1 + w, no_memory: -w]`, which pushes towards what the
    /// memories add to the prompt.
    pub compose: Vec<Term>,
    /// How many leading canvas positions are the memory segment (set by the
    /// engine; `View::NoMemory` masks their given tokens).
    pub memory_prefix: usize,
    /// Energy-based constraints on the text (banned / required words),
    /// applied to every step's logits.
    pub constraints: Vec<constraints::Constraint>,
}

impl Default for SamplerOptions {
    fn default() -> Self {
        SamplerOptions {
            strategy: Strategy::Confidence,
            steps: 16,
            temperature: 1.0,
            top_p: 1.0,
            block_length: None,
            guidance: 0.0,
            threshold: 0.9,
            seed: 0,
            likelihood_samples: uncertainty::DEFAULT_LIKELIHOOD_SAMPLES,
            compose: Vec::new(),
            memory_prefix: 0,
            constraints: Vec::new(),
        }
    }
}

pub const MAX_STEPS: usize = 100_000;

impl SamplerOptions {
    pub fn validate(&self) -> Result<()> {
        if self.steps == 0 || self.steps > MAX_STEPS {
            return crate::input_err!("steps must be in 1..={MAX_STEPS}, got {}", self.steps);
        }
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return crate::input_err!("temperature must be finite and >= 0, got {}", self.temperature);
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return crate::input_err!("top_p must be in (0, 1], got {}", self.top_p);
        }
        if !(self.guidance.is_finite() && self.guidance >= 0.0) {
            return crate::input_err!("guidance must be finite and >= 0, got {}", self.guidance);
        }
        if !(self.threshold > 0.0 && self.threshold <= 1.0) {
            return crate::input_err!("threshold must be in (0, 1], got {}", self.threshold);
        }
        if self.block_length == Some(0) {
            return crate::input_err!("block_length must be >= 1");
        }
        if !self.compose.is_empty() {
            if self.guidance != 0.0 {
                return crate::input_err!(
                    "pass guidance or compose, not both (guidance w is compose full = 1 + w, unconditional = -w)"
                );
            }
            if let Some(t) = self.compose.iter().find(|t| !t.weight.is_finite()) {
                return crate::input_err!("composition weight of {:?} is not finite", t.view);
            }
            for (i, t) in self.compose.iter().enumerate() {
                if self.compose[..i].iter().any(|u| u.view == t.view && u.adapters == t.adapters) {
                    return crate::input_err!("each composition term may appear once");
                }
                if t.adapters.as_ref().is_some_and(|a| a.values().any(|w| !w.is_finite())) {
                    return crate::input_err!("an adapter weight of a composition term is not finite");
                }
            }
            let sum: f64 = self.compose.iter().map(|t| t.weight).sum();
            if (sum - 1.0).abs() > 1e-6 {
                return crate::input_err!(
                    "composition weights must sum to 1 (got {sum}); a sharper or flatter distribution is `temperature`"
                );
            }
        }
        constraints::validate(&self.constraints)?;
        if self.likelihood_samples > uncertainty::MAX_LIKELIHOOD_SAMPLES {
            return crate::input_err!(
                "likelihood_samples must be in 0..={}, got {}",
                uncertainty::MAX_LIKELIHOOD_SAMPLES,
                self.likelihood_samples
            );
        }
        Ok(())
    }
}

/// Whatever produces logits for a canvas: the model, or a stub in tests.
pub trait Denoiser: Sync {
    fn vocab_size(&self) -> usize;
    fn mask_id(&self) -> u32;
    /// Logits at `positions` of `canvases.len()` canvases of equal length,
    /// flattened `[n, positions.len(), V]`. Only the positions a step can
    /// commit are asked for, so the output projection (a quarter of the tiny
    /// model's compute) skips everything already decided. `t` in [0, 1] is the
    /// fraction still masked (the diffusion time), used only by
    /// time-conditioned models.
    fn logits(&self, canvases: &[Vec<u32>], t: f64, positions: &[usize]) -> Result<Vec<f32>>;
    /// Like `logits`, with exactly the adapter set `set` (composition terms
    /// that name one). Denoisers without adapters refuse.
    fn logits_with(&self, set: &AdapterSet, canvases: &[Vec<u32>], t: f64, positions: &[usize]) -> Result<Vec<f32>> {
        let _ = (set, canvases, t, positions);
        crate::input_err!("this denoiser has no adapters for a composition term to choose")
    }
    /// Whether `logits` depends on `t` (then logits cannot be cached).
    fn time_conditioned(&self) -> bool;
}

/// Emitted after every step, for progress bars.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    pub step: usize,
    pub total_steps: usize,
    pub masked_left: usize,
}

/// The finished canvas and what happened on the way.
#[derive(Clone, Debug, Default)]
pub struct Sampled {
    pub tokens: Vec<u32>,
    /// Probability of each token when it was committed (1.0 for given tokens).
    pub confidence: Vec<f32>,
    /// Predictive entropy at commit, nats (0.0 for given tokens).
    pub entropy: Vec<f32>,
    /// Step at which each token was committed (None for given tokens).
    pub commit_step: Vec<Option<u32>>,
    /// How often the model's top prediction for each position changed from
    /// one forward pass to the next while it was still masked.
    pub changes: Vec<u32>,
    /// The step of the last such change (None: it never changed).
    pub last_change: Vec<Option<u32>>,
    /// Sampler steps executed.
    pub steps_run: usize,
    /// Forward passes actually run (fewer than steps with the ancestral cache).
    pub forward_passes: usize,
    /// Whether each of `SamplerOptions::constraints` held on the result.
    pub constraints_met: Vec<bool>,
    pub forward_ms: f64,
    pub sampler_ms: f64,
}

/// Number of commits per step when `n` masked tokens must be revealed in
/// `steps` steps: evenly, the remainder going to the first steps (LLaDA).
pub fn commit_schedule(n: usize, steps: usize) -> Vec<usize> {
    (0..steps).map(|i| n / steps + usize::from(i < n % steps)).collect()
}

/// Runs the sampler on `canvas` (mask id = still to generate).
pub fn sample(
    den: &dyn Denoiser,
    canvas: Vec<u32>,
    opts: &SamplerOptions,
    on_step: &mut dyn FnMut(Progress),
) -> Result<Sampled> {
    opts.validate()?;
    constraints::check_spelled(&opts.constraints)?;
    let len = canvas.len();
    let vocab = den.vocab_size();
    let mask = den.mask_id();
    if len == 0 {
        return crate::input_err!("the canvas is empty");
    }
    if let Some(&bad) = canvas.iter().find(|&&t| t as usize >= vocab) {
        return crate::input_err!("token id {bad} is outside the vocabulary of {vocab}");
    }
    if opts.memory_prefix > len {
        return crate::input_err!("memory_prefix {} is longer than the canvas ({len})", opts.memory_prefix);
    }
    let given: Vec<bool> = canvas.iter().map(|&t| t != mask).collect();
    let block = opts.block_length.unwrap_or(len).min(len);
    let blocks: Vec<(usize, usize)> = (0..len)
        .step_by(block)
        .map(|s| (s, (s + block).min(len)))
        .filter(|&(s, e)| (s..e).any(|i| !given[i]))
        .collect();
    if opts.steps < blocks.len() {
        return crate::input_err!(
            "steps ({}) must be at least the number of blocks with masks ({}); raise steps or block_length",
            opts.steps,
            blocks.len()
        );
    }
    let mut out = Sampled {
        tokens: canvas,
        confidence: given.iter().map(|&g| if g { 1.0 } else { f32::NAN }).collect(),
        entropy: vec![0.0; len],
        commit_step: vec![None; len],
        changes: vec![0; len],
        last_change: vec![None; len],
        ..Default::default()
    };
    // The top prediction of each masked position at the last forward pass.
    let mut last_top: Vec<Option<u32>> = vec![None; len];
    let step_alloc = commit_schedule(opts.steps, blocks.len());
    let mut global_step = 0usize;
    let mut cache: Option<Vec<f32>> = None;
    for (&(start, end), &block_steps) in blocks.iter().zip(&step_alloc) {
        let masked_in_block = (start..end).filter(|&i| out.tokens[i] == mask).count();
        let schedule = commit_schedule(masked_in_block, block_steps);
        for (s, &scheduled) in schedule.iter().enumerate() {
            let eligible: Vec<usize> = (start..end).filter(|&i| out.tokens[i] == mask).collect();
            if eligible.is_empty() {
                break;
            }
            let masked_total = out.tokens.iter().filter(|&&t| t == mask).count();
            let t = masked_total as f64 / len as f64;
            let logits = match cache.take() {
                Some(l) => l,
                None => {
                    let t0 = Instant::now();
                    let l = if opts.compose.is_empty() {
                        guided_logits(den, &out.tokens, &given, mask, t, opts.guidance, &eligible)?
                    } else {
                        composed_logits(den, &out.tokens, &given, opts, t, &eligible)?
                    };
                    out.forward_ms += t0.elapsed().as_secs_f64() * 1e3;
                    out.forward_passes += 1;
                    l
                }
            };
            let t0 = Instant::now();
            // Constraints move a copy: the cache keeps the model's logits (the
            // energies depend on the canvas, unchanged when it is reused).
            let adjusted;
            let step_logits = if opts.constraints.is_empty() {
                &logits
            } else {
                let mut l = logits.clone();
                constraints::apply(&opts.constraints, &out.tokens, mask, &eligible, &mut l, vocab);
                adjusted = l;
                &adjusted
            };
            // Row j of `logits` is position eligible[j]; with the cache this
            // holds because a step that commits nothing leaves `eligible` as is.
            let scored: Vec<(usize, PositionScore)> = crate::threads::parallel_map(eligible.len(), |j| {
                let i = eligible[j];
                let mut rng = Stream::new(opts.seed, global_step as u64, i as u64);
                score_row(&step_logits[j * vocab..(j + 1) * vocab], mask, opts.temperature, opts.top_p, &mut rng)
                    .map(|sc| (i, sc))
                    .ok_or_else(|| Error::Numeric(format!("the model produced non-finite logits at position {i}")))
            })
            .into_iter()
            .collect::<Result<_>>()?;
            for &(i, sc) in &scored {
                if last_top[i].is_some_and(|t| t != sc.top) {
                    out.changes[i] += 1;
                    out.last_change[i] = Some(global_step as u32);
                }
                last_top[i] = Some(sc.top);
            }
            let mut commits = choose(opts, &scored, s, block_steps, scheduled, global_step)?;
            if constraints::has_grammar(&opts.constraints) {
                // A grammar judges a token only once its left is committed: the
                // same number of tokens, taken from the left, each steered.
                commits = constraints::commit_left_to_right(
                    &opts.constraints,
                    &out.tokens,
                    &eligible,
                    step_logits,
                    vocab,
                    commits.len(),
                    |i, row| {
                        let mut rng = Stream::new(opts.seed, global_step as u64, i as u64);
                        score_row(row, mask, opts.temperature, opts.top_p, &mut rng)
                            .map(|sc| (sc.token, sc))
                            .ok_or_else(|| {
                                Error::Numeric(format!("the model produced non-finite logits at position {i}"))
                            })
                    },
                )?;
            }
            for &(i, sc) in &commits {
                out.tokens[i] = sc.token;
                out.confidence[i] = sc.prob;
                out.entropy[i] = sc.entropy;
                out.commit_step[i] = Some(global_step as u32);
            }
            out.sampler_ms += t0.elapsed().as_secs_f64() * 1e3;
            // MDLM's ddpm_cache: if nothing changed and the model ignores t,
            // the next step's logits are exactly these.
            if commits.is_empty() && !den.time_conditioned() {
                cache = Some(logits);
            }
            global_step += 1;
            out.steps_run += 1;
            on_step(Progress {
                step: global_step,
                total_steps: opts.steps,
                masked_left: out.tokens.iter().filter(|&&t| t == mask).count(),
            });
        }
    }
    debug_assert!(out.tokens.iter().all(|&t| t != mask));
    out.constraints_met = constraints::met(&opts.constraints, &out.tokens, &given);
    Ok(out)
}

/// Logits for the canvas, with classifier-free guidance if `w > 0`: the
/// unconditional canvas is the same canvas with every given token masked.
fn guided_logits(
    den: &dyn Denoiser,
    tokens: &[u32],
    given: &[bool],
    mask: u32,
    t: f64,
    w: f64,
    positions: &[usize],
) -> Result<Vec<f32>> {
    if w == 0.0 || !given.iter().any(|&g| g) {
        return den.logits(&[tokens.to_vec()], t, positions);
    }
    let uncond: Vec<u32> = tokens.iter().zip(given).map(|(&tok, &g)| if g { mask } else { tok }).collect();
    let both = den.logits(&[tokens.to_vec(), uncond], t, positions)?;
    let half = both.len() / 2;
    let (cond, un) = both.split_at(half);
    let w = w as f32;
    Ok(cond.iter().zip(un).map(|(&c, &u)| u + (w + 1.0) * (c - u)).collect())
}

/// `sum_i w_i logits(view_i)` for the canvas: the views of one adapter set
/// (or of the generation's own model) go in one batch.
fn composed_logits(
    den: &dyn Denoiser,
    tokens: &[u32],
    given: &[bool],
    opts: &SamplerOptions,
    t: f64,
    positions: &[usize],
) -> Result<Vec<f32>> {
    let mask = den.mask_id();
    let canvases: Vec<Vec<u32>> = opts
        .compose
        .iter()
        .map(|term| {
            let hide = |i: usize| match term.view {
                View::Full => false,
                View::NoMemory => i < opts.memory_prefix && given[i],
                View::Unconditional => given[i],
            };
            tokens.iter().enumerate().map(|(i, &tok)| if hide(i) { mask } else { tok }).collect()
        })
        .collect();
    let mut out: Vec<f32> = vec![];
    let mut done = vec![false; opts.compose.len()];
    for i in 0..opts.compose.len() {
        if done[i] {
            continue;
        }
        let set = &opts.compose[i].adapters;
        let group: Vec<usize> =
            (i..opts.compose.len()).filter(|&j| !done[j] && &opts.compose[j].adapters == set).collect();
        let batch: Vec<Vec<u32>> = group.iter().map(|&j| canvases[j].clone()).collect();
        let all = match set {
            None => den.logits(&batch, t, positions)?,
            Some(s) => den.logits_with(s, &batch, t, positions)?,
        };
        let n = all.len() / batch.len();
        out.resize(n, 0.0);
        for (&j, logits) in group.iter().zip(all.chunks_exact(n)) {
            done[j] = true;
            let w = opts.compose[j].weight as f32;
            out.iter_mut().zip(logits).for_each(|(o, &l)| *o += w * l);
        }
    }
    Ok(out)
}

/// Picks which scored positions to commit this step.
fn choose(
    opts: &SamplerOptions,
    scored: &[(usize, PositionScore)],
    step_in_block: usize,
    block_steps: usize,
    scheduled: usize,
    global_step: usize,
) -> Result<Vec<(usize, PositionScore)>> {
    let steps_left = block_steps - step_in_block;
    let remaining = scored.len();
    let mut ranked: Vec<(usize, PositionScore)> = scored.to_vec();
    let key = |sc: &PositionScore| -> f32 {
        match opts.strategy {
            Strategy::Entropy => -sc.entropy,
            Strategy::Margin => sc.margin,
            _ => sc.prob,
        }
    };
    // Highest score first; ties broken by position so the order is total.
    ranked.sort_by(|a, b| key(&b.1).total_cmp(&key(&a.1)).then(a.0.cmp(&b.0)));
    let k = match opts.strategy {
        Strategy::Ancestral => {
            // Reveal each masked token with probability (t - s) / t, where the
            // block's time runs linearly from 1 to 0 over its steps.
            let t = steps_left as f64 / block_steps as f64;
            let s = (steps_left - 1) as f64 / block_steps as f64;
            let p = (t - s) / t;
            let picked: Vec<(usize, PositionScore)> = scored
                .iter()
                .copied()
                .filter(|&(i, _)| {
                    // A stream separate from the token draw (position offset by 2^40).
                    Stream::new(opts.seed, global_step as u64, (1u64 << 40) + i as u64).uniform() < p
                })
                .collect();
            return Ok(picked);
        }
        Strategy::Threshold => {
            let above = ranked.iter().filter(|(_, sc)| sc.prob as f64 >= opts.threshold).count();
            above.max(remaining.div_ceil(steps_left)).max(1)
        }
        _ => scheduled.max(remaining.div_ceil(steps_left)),
    };
    ranked.truncate(k.min(remaining));
    Ok(ranked)
}

#[cfg(test)]
mod tests;
