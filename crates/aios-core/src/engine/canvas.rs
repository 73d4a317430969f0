//! Generation on the multimodal canvas: `[text | image patches | audio
//! frames]`, one forward pass of the shared backbone per step, then each
//! segment that is being generated takes its own step (text: the masked
//! diffusion sampler; image/audio: DDIM/DDPM). Given segments (a prompt, an
//! image to caption, known pixels to inpaint around) are never changed.

use std::sync::Mutex;
use std::time::Instant;

use std::collections::BTreeMap;

use super::{applied, log_linear_sigma, ControlInput, Controls, Engine, Generation, Runtime, Timings};
use crate::error::{Error, Result};
use crate::media::{u8_to_unit, unit_to_u8, MelSpec};
use crate::model::{CanvasInput, Modality, ModelConfig};
use crate::sampler::continuous::{self, ContinuousSampler, Region, StepRule};
use crate::sampler::{self, Denoiser, Progress, SamplerOptions};

/// Griffin-Lim iterations when turning generated log-mels into sound.
pub const GRIFFIN_LIM_ITERS: usize = 48;
/// Default length of the text segment of a media canvas (the training layout:
/// `[BOS] caption [EOS] [PAD]...`).
pub const DEFAULT_TEXT_LENGTH: usize = 12;
/// Noise-stream offsets of the two continuous segments, so they draw
/// independent noise from one seed.
const IMAGE_STREAM: u64 = 0;
const AUDIO_STREAM: u64 = 1 << 32;

/// A given image: pixels in `[0, 255]` as `[C, H, W]` (or `[H, W]` for one
/// channel), plus an optional mask (true = known, kept; false = generated).
#[derive(Clone, Debug)]
pub struct GivenImage {
    pub pixels: Vec<f32>,
    pub mask: Option<Vec<bool>>,
}

/// A given sound: a mono waveform at the model's sample rate, plus an
/// optional per-frame mask (true = known frame).
#[derive(Clone, Debug)]
pub struct GivenAudio {
    pub samples: Vec<f32>,
    pub mask: Option<Vec<bool>>,
}

/// A request on the multimodal canvas. `outputs` are the modalities to
/// generate; everything else given is conditioning.
#[derive(Clone, Debug)]
pub struct MediaRequest {
    pub outputs: Vec<Modality>,
    /// Prompt text: the caption to generate from, or the start of generated text.
    pub prompt: Option<String>,
    /// Tokens in the text segment (default [`DEFAULT_TEXT_LENGTH`]).
    pub text_length: Option<usize>,
    pub image: Option<GivenImage>,
    pub audio: Option<GivenAudio>,
    /// Steps, seed, guidance and the text strategy.
    pub sampler: SamplerOptions,
    pub continuous: ContinuousSampler,
    /// DDIM's eta (0 = deterministic); ignored by DDPM.
    pub eta: f64,
    /// Energies on the generated image (needs the image among the outputs).
    pub energies: Vec<continuous::ImageEnergy>,
    /// Energies on the generated sound (needs audio among the outputs).
    pub audio_energies: Vec<continuous::Loudness>,
    /// Inputs of the engine's active ControlNets, by name.
    pub control: BTreeMap<String, ControlInput>,
}

/// A generated (or inpainted) image.
#[derive(Clone, Debug)]
pub struct ImageOut {
    /// `[C, H, W]` 8-bit pixels.
    pub pixels: Vec<u8>,
    pub channels: usize,
    pub size: usize,
}

/// Generated sound.
#[derive(Clone, Debug)]
pub struct AudioOut {
    pub samples: Vec<f32>,
    pub sample_rate: usize,
    /// The generated normalised log-mel `[frames, mels]`.
    pub log_mel: Vec<f32>,
    pub mels: usize,
}

/// The validated form of a [`MediaRequest`]: canvas, given values, masks.
struct Plan {
    tokens: Vec<u32>,
    gen_text: bool,
    prefix_len: usize,
    image: Option<Segment>,
    audio: Option<Segment>,
}

/// A continuous segment: generated (with optional known values) or given clean.
struct Segment {
    generate: bool,
    values: Vec<f32>,
    mask: Option<Vec<bool>>,
}

impl MediaRequest {
    /// The one place a media request is checked against a model.
    fn plan(&self, engine: &Engine) -> Result<Plan> {
        let cfg = engine.config();
        if self.outputs.is_empty() {
            return crate::input_err!("nothing to generate: give at least one output modality");
        }
        for m in &self.outputs {
            if !cfg.has_head(*m) {
                let has: Vec<&str> = cfg.heads().iter().map(|h| h.name()).collect();
                return Err(Error::Config(format!("this model has no {} head (it has: {})", m.name(), has.join(", "))));
            }
        }
        if !self.sampler.constraints.is_empty() {
            return crate::input_err!("word constraints apply to text-only generation");
        }
        self.sampler.validate()?;
        if !self.sampler.compose.is_empty() {
            return crate::input_err!("score composition applies to text-only generation; use guidance for media");
        }
        if !(self.eta.is_finite() && (0.0..=1.0).contains(&self.eta)) {
            return crate::input_err!("eta must be in [0, 1], got {}", self.eta);
        }
        if self.image.is_some() && !cfg.has_image() {
            return Err(Error::Config("an image was given but this model has no image head".into()));
        }
        if self.audio.is_some() && !cfg.has_audio() {
            return Err(Error::Config("audio was given but this model has no audio head".into()));
        }
        let gen_text = self.outputs.contains(&Modality::Text);
        let gen_image = self.outputs.contains(&Modality::Image);
        let gen_audio = self.outputs.contains(&Modality::Audio);
        if !self.energies.is_empty() && !gen_image {
            return crate::input_err!("image energies need the image among the outputs");
        }
        for e in &self.energies {
            e.validate(cfg.image_size, cfg.image_values())?;
        }
        if !self.audio_energies.is_empty() && !gen_audio {
            return crate::input_err!("audio energies (loudness) need audio among the outputs");
        }
        for e in &self.audio_energies {
            e.validate(cfg.audio_frames)?;
        }
        let tl = self.text_length.unwrap_or(DEFAULT_TEXT_LENGTH);
        let image = match (&self.image, gen_image) {
            (Some(g), _) => Some(image_segment(cfg, g, gen_image)?),
            (None, true) => Some(Segment { generate: true, values: vec![], mask: None }),
            (None, false) => None,
        };
        let audio = match (&self.audio, gen_audio) {
            (Some(g), _) => Some(audio_segment(engine, g, gen_audio)?),
            (None, true) => Some(Segment { generate: true, values: vec![], mask: None }),
            (None, false) => None,
        };
        let media_len =
            image.as_ref().map_or(0, |_| cfg.image_tokens()) + audio.as_ref().map_or(0, |_| cfg.audio_tokens());
        if tl < 2 || tl + media_len > cfg.max_length {
            return crate::input_err!(
                "text_length must be in 2..={} with this canvas ({} media positions), got {tl}",
                cfg.max_length.saturating_sub(media_len),
                media_len
            );
        }
        let prompt_ids = match &self.prompt {
            Some(p) if !p.is_empty() => engine.encode(p)?,
            _ => vec![],
        };
        let mut tokens = Vec::with_capacity(tl);
        let prefix_len;
        if gen_text {
            // [BOS] prompt, then masks to fill.
            tokens.push(cfg.bos_token_id);
            tokens.extend(&prompt_ids);
            prefix_len = tokens.len();
            if prefix_len >= tl {
                return crate::input_err!(
                    "the prompt takes {prefix_len} tokens (with BOS), leaving nothing in text_length {tl}"
                );
            }
            tokens.resize(tl, cfg.mask_token_id);
        } else if prompt_ids.is_empty() {
            // No caption: the unconditional canvas of training (every text position masked).
            tokens.resize(tl, cfg.mask_token_id);
            prefix_len = 0;
        } else {
            // The training layout of a caption: [BOS] caption [EOS] [PAD]...
            if prompt_ids.len() + 2 > tl {
                return crate::input_err!(
                    "the prompt takes {} tokens, more than text_length {tl} leaves (with BOS and EOS)",
                    prompt_ids.len()
                );
            }
            tokens.push(cfg.bos_token_id);
            tokens.extend(&prompt_ids);
            tokens.push(cfg.eos_token_id);
            tokens.resize(tl, cfg.pad_token_id);
            prefix_len = tl;
        }
        Ok(Plan { tokens, gen_text, prefix_len, image, audio })
    }
}

fn image_segment(cfg: &ModelConfig, g: &GivenImage, generate: bool) -> Result<Segment> {
    let n = cfg.image_values();
    if g.pixels.len() != n {
        return crate::input_err!(
            "image must have {} x {} x {} = {n} pixels, got {}",
            cfg.image_channels,
            cfg.image_size,
            cfg.image_size,
            g.pixels.len()
        );
    }
    if let Some(bad) = g.pixels.iter().find(|p| !(p.is_finite() && (0.0..=255.0).contains(*p))) {
        return crate::input_err!("image pixels must be finite and in [0, 255], got {bad}");
    }
    if let Some(m) = &g.mask {
        if m.len() != n {
            return crate::input_err!("image_mask has {} values, the image {n}", m.len());
        }
        if !generate {
            return crate::input_err!("image_mask needs the image among the outputs (inpainting)");
        }
    } else if generate {
        return crate::input_err!(
            "an image given with the image among the outputs needs image_mask (true = known pixels) to inpaint"
        );
    }
    let values = g.pixels.iter().map(|&p| u8_to_unit(p.round() as u8)).collect();
    Ok(Segment { generate, values, mask: g.mask.clone() })
}

fn audio_segment(engine: &Engine, g: &GivenAudio, generate: bool) -> Result<Segment> {
    let cfg = engine.config();
    let spec = engine.mel_spec()?;
    let max = spec.samples_for(cfg.audio_frames);
    if g.samples.is_empty() || g.samples.len() > max {
        return crate::input_err!(
            "audio must have 1..={max} samples ({:.2} s at {} Hz), got {}",
            max as f64 / cfg.audio_sample_rate as f64,
            cfg.audio_sample_rate,
            g.samples.len()
        );
    }
    if g.samples.iter().any(|s| !s.is_finite()) {
        return crate::input_err!("audio contains NaN or infinity");
    }
    let mut wave = g.samples.clone();
    wave.resize(max, 0.0);
    let values = spec.log_mel(&wave);
    debug_assert_eq!(values.len(), cfg.audio_frames * cfg.audio_mels);
    let mask = match &g.mask {
        Some(m) if m.len() != cfg.audio_frames => {
            return crate::input_err!("audio_mask has {} values, the audio {} frames", m.len(), cfg.audio_frames)
        }
        Some(_) if !generate => return crate::input_err!("audio_mask needs audio among the outputs (inpainting)"),
        Some(m) => Some(m.iter().flat_map(|&k| std::iter::repeat_n(k, cfg.audio_mels)).collect()),
        None if generate => {
            return crate::input_err!("audio given with audio among the outputs needs audio_mask (true = known frames)")
        }
        None => None,
    };
    Ok(Segment { generate, values, mask })
}

/// The continuous side of one generation, advanced once per forward pass.
struct ContinuousState {
    image: Option<Region>,
    audio: Option<Region>,
    /// Steps taken so far (0..=steps).
    done: usize,
    times: Vec<f64>,
}

/// Runs the model on the canvas; every call also advances the continuous
/// segments one step (until they reach t = 0).
struct CanvasDenoiser<'a> {
    rt: &'a Runtime,
    given_image: Option<&'a [f32]>,
    given_audio: Option<&'a [f32]>,
    state: Mutex<ContinuousState>,
    opts: &'a SamplerOptions,
    sampler: ContinuousSampler,
    eta: f64,
    energies: &'a [continuous::ImageEnergy],
    audio_energies: &'a [continuous::Loudness],
    controls: Controls,
}

impl CanvasDenoiser<'_> {
    fn lock(&self) -> std::sync::MutexGuard<'_, ContinuousState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn continuous_left(&self) -> bool {
        let st = self.lock();
        (st.image.is_some() || st.audio.is_some()) && st.done + 1 < st.times.len()
    }

    /// One forward pass over `canvases` (1, or 2 with guidance: conditional
    /// and unconditional text); returns the text logits at `positions`.
    fn run(&self, canvases: &[Vec<u32>], t_text: f64, positions: &[usize]) -> Result<Vec<f32>> {
        let n = canvases.len();
        let mut st = self.lock();
        let step = st.done;
        let active = step + 1 < st.times.len();
        let (t, s) = if active { (st.times[step], st.times[step + 1]) } else { (0.0, 0.0) };
        let rep = |x: &[f32]| -> Vec<f32> { (0..n).flat_map(|_| x.iter().copied()).collect() };
        let (img, img_t) = match (&st.image, self.given_image) {
            (Some(r), _) => (Some(rep(&r.x)), vec![if active { t as f32 } else { 0.0 }; n]),
            (None, Some(g)) => (Some(rep(g)), vec![0.0; n]),
            (None, None) => (None, vec![]),
        };
        let (aud, aud_t) = match (&st.audio, self.given_audio) {
            (Some(r), _) => (Some(rep(&r.x)), vec![if active { t as f32 } else { 0.0 }; n]),
            (None, Some(g)) => (Some(rep(g)), vec![0.0; n]),
            (None, None) => (None, vec![]),
        };
        let tokens: Vec<u32> = canvases.iter().flatten().copied().collect();
        let sigma = vec![log_linear_sigma(t_text); n];
        let input = CanvasInput {
            batch: n,
            tokens: &tokens,
            text_sigma: Some(&sigma),
            image: img.as_deref().map(|x| (x, img_t.as_slice())),
            audio: aud.as_deref().map(|x| (x, aud_t.as_slice())),
            text_positions: Some(positions),
            controls: &applied(&self.controls),
        };
        let out = self.rt.model.forward_canvas(&input, &self.rt.lora)?;
        if active {
            let w = self.opts.guidance;
            let rule = StepRule { sampler: self.sampler, eta: self.eta, seed: self.opts.seed };
            let st = &mut *st;
            let (size, mels) = (self.rt.model.cfg.image_size, self.rt.model.cfg.audio_mels);
            for (k, (region, v)) in
                [(st.image.as_mut(), &out.image), (st.audio.as_mut(), &out.audio)].into_iter().enumerate()
            {
                if let Some(r) = region {
                    if v.iter().any(|x| !x.is_finite()) {
                        return Err(Error::Numeric("the model produced a non-finite continuous output".into()));
                    }
                    let per = v.len() / n;
                    let mut v = if n == 2 { continuous::guide(&v[..per], &v[per..], w) } else { v.clone() };
                    if k == 0 {
                        continuous::apply_energies(self.energies, &r.x, &mut v, t, size, r.clip);
                    } else {
                        continuous::apply_audio_energies(self.audio_energies, &r.x, &mut v, t, mels);
                    }
                    r.advance(rule, &v, t, s, step as u64 + 1);
                }
            }
            st.done += 1;
        }
        Ok(out.text)
    }
}

impl Denoiser for CanvasDenoiser<'_> {
    fn vocab_size(&self) -> usize {
        self.rt.model.cfg.vocab_size
    }
    fn mask_id(&self) -> u32 {
        self.rt.model.cfg.mask_token_id
    }
    fn logits(&self, canvases: &[Vec<u32>], t: f64, positions: &[usize]) -> Result<Vec<f32>> {
        self.run(canvases, t, positions)
    }
    /// The continuous segments change every call, so logits are never reusable.
    fn time_conditioned(&self) -> bool {
        true
    }
}

impl Engine {
    /// The STFT settings of this model's audio head (`Error::Config` without one).
    pub fn mel_spec(&self) -> Result<MelSpec> {
        let c = self.config();
        if !c.has_audio() {
            return Err(Error::Config("this model has no audio head".into()));
        }
        MelSpec::new(c.audio_sample_rate, c.audio_n_fft, c.audio_hop, c.audio_mels)
    }

    /// Generates the requested modalities on one canvas (see the module docs).
    pub fn generate_media(&self, req: &MediaRequest, on_step: &mut (dyn FnMut(Progress) + Send)) -> Result<Generation> {
        let t_start = Instant::now();
        let plan = req.plan(self)?;
        let cfg = self.config().clone();
        let rt = self.snapshot();
        let steps = req.sampler.steps;
        let seed = req.sampler.seed;
        let region = |seg: &Option<Segment>, n: usize, offset: u64, clip: Option<f32>| -> Option<Region> {
            let seg = seg.as_ref().filter(|s| s.generate)?;
            let known = seg.mask.as_ref().map(|m| (seg.values.clone(), m.clone()));
            Some(Region::start(n, known, seed, offset, clip))
        };
        let state = ContinuousState {
            image: region(&plan.image, cfg.image_values(), IMAGE_STREAM, Some(1.0)),
            audio: region(&plan.audio, cfg.audio_frames * cfg.audio_mels, AUDIO_STREAM, None),
            done: 0,
            times: continuous::timesteps(steps),
        };
        fn given(seg: &Option<Segment>) -> Option<&[f32]> {
            seg.as_ref().filter(|s| !s.generate).map(|s| s.values.as_slice())
        }
        let mut warnings = student_warnings(&rt, req);
        let controls =
            self.resolve_controls(&rt, &req.control, plan.tokens.len(), plan.image.is_some(), &mut warnings)?;
        let den = CanvasDenoiser {
            rt: &rt,
            given_image: given(&plan.image),
            given_audio: given(&plan.audio),
            state: Mutex::new(state),
            opts: &req.sampler,
            sampler: req.continuous,
            eta: req.eta,
            energies: &req.energies,
            audio_energies: &req.audio_energies,
            controls,
        };
        let tokenize_ms = t_start.elapsed().as_secs_f64() * 1e3;
        let mut forward_ms = 0.0;
        let mut forward_passes = 0;
        let mut sampler_ms = 0.0;
        let mut steps_run = 0;
        let sampled = self.pool.install(|| -> Result<Option<sampler::Sampled>> {
            let mut sampled = None;
            if plan.gen_text {
                let s = sampler::sample(&den, plan.tokens.clone(), &req.sampler, &mut |p| on_step(p))?;
                forward_ms += s.forward_ms;
                forward_passes += s.forward_passes;
                sampler_ms += s.sampler_ms;
                steps_run = s.steps_run;
                sampled = Some(s);
            }
            // Continuous steps the text loop did not take (or all of them).
            let text_now = sampled.as_ref().map_or(plan.tokens.clone(), |s| s.tokens.clone());
            let uncond: Vec<u32> = text_now
                .iter()
                .enumerate()
                .map(|(i, &t)| if i < plan.prefix_len && !plan.gen_text { cfg.mask_token_id } else { t })
                .collect();
            let guided = req.sampler.guidance > 0.0 && !plan.gen_text && uncond != text_now;
            while den.continuous_left() {
                let t0 = Instant::now();
                let canvases = if guided { vec![text_now.clone(), uncond.clone()] } else { vec![text_now.clone()] };
                den.run(&canvases, 0.0, &[])?;
                forward_ms += t0.elapsed().as_secs_f64() * 1e3;
                forward_passes += 1;
                steps_run += 1;
                on_step(Progress { step: steps_run.min(steps), total_steps: steps, masked_left: 0 });
            }
            Ok(sampled)
        })?;
        let t_dec = Instant::now();
        let st = den.state.into_inner().unwrap_or_else(|e| e.into_inner());
        let image = match (st.image, &plan.image) {
            (Some(r), _) => Some(image_out(&cfg, &r.x)),
            _ => None,
        };
        let audio = match st.audio {
            Some(r) => {
                let spec = self.mel_spec()?;
                let samples = spec.to_waveform(&r.x, GRIFFIN_LIM_ITERS)?;
                Some(AudioOut { samples, sample_rate: cfg.audio_sample_rate, log_mel: r.x, mels: cfg.audio_mels })
            }
            None => None,
        };
        let (tokens, confidence, entropy, given) = match &sampled {
            Some(s) => (
                s.tokens.clone(),
                s.confidence.clone(),
                s.entropy.clone(),
                plan.tokens.iter().map(|&t| t != cfg.mask_token_id).collect(),
            ),
            None => (
                plan.tokens.clone(),
                vec![1.0; plan.tokens.len()],
                vec![0.0; plan.tokens.len()],
                vec![true; plan.tokens.len()],
            ),
        };
        // Without a tokenizer (token-level use) the tokens are the output.
        let text = if plan.gen_text && self.tokenizer.is_some() {
            let cut = tokens[plan.prefix_len..]
                .iter()
                .position(|&t| t == cfg.eos_token_id)
                .map_or(tokens.len(), |p| p + plan.prefix_len);
            self.decode(&tokens[..cut])?
        } else {
            String::new()
        };
        let mut modalities = req.outputs.clone();
        modalities.sort();
        Ok(Generation {
            text,
            tokens,
            confidence,
            entropy,
            given,
            steps_run: steps_run.max(sampled.as_ref().map_or(0, |s| s.steps_run)),
            forward_passes,
            adapters: rt.lora.weights.clone(),
            patch: rt.patch.clone(),
            skills: vec![],
            warnings,
            constraints: vec![],
            timings: Timings {
                tokenize_ms,
                forward_ms,
                sampler_ms,
                decode_ms: t_dec.elapsed().as_secs_f64() * 1e3,
                total_ms: t_start.elapsed().as_secs_f64() * 1e3,
            },
            image,
            audio,
            modalities,
            // Calibrated on text-only generations; a caption's is not comparable.
            uncertainty: None,
            memories: vec![],
            memory_tokens: 0,
        })
    }
}

fn image_out(cfg: &ModelConfig, x: &[f32]) -> ImageOut {
    ImageOut { pixels: x.iter().map(|&v| unit_to_u8(v)).collect(), channels: cfg.image_channels, size: cfg.image_size }
}

/// Writes one output of a generation by extension: `png` (image), `wav`
/// (audio), `txt` (text). The CLI and the Python `Generation.save` share it.
pub fn save_output(
    path: &std::path::Path,
    ext: &str,
    image: Option<&ImageOut>,
    audio: Option<&AudioOut>,
    text: &str,
) -> Result<()> {
    match ext {
        "png" => {
            let img = image.ok_or_else(|| Error::Input("this generation has no image to save as PNG".into()))?;
            crate::media::write_png(path, &img.pixels, img.channels, img.size, img.size)
        }
        "wav" => {
            let a = audio.ok_or_else(|| Error::Input("this generation has no audio to save as WAV".into()))?;
            crate::media::write_wav(path, &a.samples, a.sample_rate as u32)
        }
        "txt" => crate::media::files::write_text(path, text),
        other => crate::input_err!("cannot tell what to save from the extension {other:?}: use .png, .wav or .txt"),
    }
}

/// An active consistency-distilled LoRA learned one sampler, a few steps and
/// its teacher's guidance: used otherwise it still runs, outside what it was
/// trained for, so the generation says so (documented; a warning, not an error).
fn student_warnings(rt: &super::Runtime, req: &MediaRequest) -> Vec<String> {
    let mut out = vec![];
    for (name, st) in rt.lora.students.iter().filter(|(_, st)| req.outputs.contains(&st.modality)) {
        let what = format!("adapter {name:?} is a consistency-distilled student for {}", st.modality.name());
        if req.continuous != ContinuousSampler::Lcm {
            out.push(format!(
                "{what}: sample it with sampler \"lcm\" (this generation uses {})",
                req.continuous.name()
            ));
        }
        if req.sampler.steps > st.student_steps {
            out.push(format!(
                "{what}, distilled for {} steps: {} steps run it outside what it was trained for",
                st.student_steps, req.sampler.steps
            ));
        }
        if req.sampler.guidance > 0.0 {
            out.push(format!(
                "{what} with its teacher's guidance {} built in: guidance {} applies guidance twice",
                st.guidance, req.sampler.guidance
            ));
        }
    }
    out
}
