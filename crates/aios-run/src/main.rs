//! `aios-run`: the standalone runtime for edge devices.
//!
//! Exit codes: 0 success, 2 bad command line, 3 invalid input, 4 corrupt or
//! inconsistent model file/config (or NaN output), 5 I/O error, 6 tokenizer error, 1 other.

mod memory;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use aios_core::adapter::ControlKind;
use aios_core::engine::{save_output, GivenAudio, GivenImage, MediaRequest};
use aios_core::format::DType;
use aios_core::media::read_png_gray;
use aios_core::memory::{MemoryStore, StoreOptions};
use aios_core::model::Modality;
use aios_core::quant::{quantize_file, MatmulMode};
use aios_core::sampler::constraints::{Constraint, Kind, DEFAULT_WEIGHT, GRAMMAR_WEIGHT};
use aios_core::sampler::continuous::{
    Brightness, ClassEnergy, ContinuousSampler, ImageEnergy, LinearClassifier, Loudness,
};
use aios_core::sampler::regex_prefix::RegexPrefix;
use aios_core::sampler::{SamplerOptions, Strategy, Term};
use aios_core::{ControlInput, Engine, EngineOptions, Error, MemorySource, TextRequest};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Parser)]
#[command(name = "aios-run", version, about = "Run small unified diffusion models (text, image, audio) on the edge")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text, images or sound from a prompt (text on stdout, progress on stderr).
    Generate(Box<GenerateArgs>),
    /// Show a model's config, stored dtypes, file size and parameter split.
    Info {
        /// Model folder or .parquet file.
        model: PathBuf,
        /// Which weight file of a folder to describe.
        #[arg(long)]
        dtype: Option<String>,
    },
    /// The personal memory store: add, search, stats, import, delete, compact.
    Memory(memory::MemoryArgs),
    /// Write a copy of a model with its matrices quantised.
    Quantize {
        input: PathBuf,
        output: PathBuf,
        /// int8 (Q8_0), int4 (Q4_K), int2 (Q2_K), f16 or f32.
        #[arg(long)]
        dtype: String,
    },
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// Model folder (weights + tokenizer.json) or .parquet file.
    #[arg(long, short)]
    model: PathBuf,
    /// Text the generation starts with (`[MASK]` inside it marks tokens to
    /// fill), or the caption an image/sound is generated from.
    #[arg(default_value = "")]
    prompt: String,
    /// What to generate: text, image, audio, or several at once (`text,image`).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "text")]
    modality: Vec<ModalityArg>,
    /// Where image/sound (and, with them, text) go: `PATH.png` / `PATH.wav`,
    /// or a stem that gets `.png`, `.wav` and `.txt` as needed.
    #[arg(long)]
    out: Option<PathBuf>,
    /// A given image (PNG): captioned with `--modality text`, inpainted with `--image-mask`.
    #[arg(long)]
    image: Option<PathBuf>,
    /// PNG of the same size as `--image`: white (>= 128) = known pixel, kept; black = generated.
    #[arg(long)]
    image_mask: Option<PathBuf>,
    /// A given sound (WAV at the model's sample rate), e.g. to transcribe with `--modality text`.
    #[arg(long)]
    audio: Option<PathBuf>,
    /// Tokens in the text segment of an image/audio canvas.
    #[arg(long)]
    text_length: Option<usize>,
    /// DDIM's eta for image/audio (0 = deterministic); `--sampler ddpm` ignores it.
    #[arg(long, default_value_t = 0.0)]
    eta: f64,
    /// Text fixed at the end of the canvas (the model fills the gap).
    #[arg(long)]
    suffix: Option<String>,
    /// Canvas length in tokens, prompt included.
    #[arg(long, default_value_t = 64)]
    length: usize,
    #[arg(long, default_value_t = 16)]
    steps: usize,
    /// Text: ancestral, confidence, entropy, margin or threshold. Image/audio: ddim, ddpm, or lcm (for an LCM-LoRA student).
    #[arg(long, default_value = "confidence")]
    sampler: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    /// Nucleus sampling: draw only from the most probable tokens holding this much of the mass (1 = off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Semi-autoregressive block size (default: whole canvas at once).
    #[arg(long)]
    block_length: Option<usize>,
    /// Classifier-free guidance weight (0 = off).
    #[arg(long, default_value_t = 0.0)]
    guidance: f64,
    /// Confidence threshold of the threshold sampler.
    #[arg(long, default_value_t = 0.9)]
    threshold: f64,
    /// Score composition, `VIEW=WEIGHT,...` over full, no_memory, unconditional (weights sum to 1):
    /// e.g. `full=2,no_memory=-1` (memory guidance 1) or `full=2,unconditional=-1` (= `--guidance 1`).
    /// `VIEW@A+B` is that view with exactly the loaded adapters A and B, `VIEW@none` without adapters:
    /// `full=2,full@none=-1` pushes towards what the active adapters add.
    #[arg(long, value_delimiter = ',')]
    compose: Vec<String>,
    /// A word the text must not contain (an energy on the logits; repeat for several).
    #[arg(long, value_name = "WORD")]
    ban: Vec<String>,
    /// A word the text should contain (best effort; repeat for several).
    #[arg(long, value_name = "WORD")]
    require: Vec<String>,
    /// "Valid JSON so far": the text after [BOS] must stay a prefix of a JSON value (an energy on the
    /// logits; while a grammar is active the sampler commits left to right).
    #[arg(long)]
    valid_json: bool,
    /// "Matches the pattern so far": the text after [BOS] (prompt included) must stay a prefix of a whole
    /// match of this regular expression (Rust regex syntax; an energy on the logits like --valid-json).
    #[arg(long, value_name = "PATTERN")]
    regex: Option<String>,
    /// Image energy: the mean brightness of a rectangle, `X0,Y0,X1,Y1:TARGET[:WEIGHT]` in pixels (end
    /// exclusive), target in [0, 1] (0 black), weight (eta) default 1 = the x0 estimate's mean put on the
    /// target every step; repeat for several.
    #[arg(long, value_name = "X0,Y0,X1,Y1:TARGET[:WEIGHT]")]
    brightness: Vec<String>,
    /// Image energy: `-log p(CLASS | image)` under a linear image classifier file
    /// (`aios.kind = classifier`), `PATH:CLASS[:WEIGHT]`, CLASS a name or index; repeatable.
    #[arg(long = "classifier", value_name = "PATH:CLASS[:WEIGHT]")]
    classifier: Vec<String>,
    /// Audio energy: the mean level of log-mel frames `F0,F1:DB[:WEIGHT]` (end exclusive) in dB of the mel
    /// magnitude (floor -100, full scale 0), weight (eta) default 1; repeatable.
    #[arg(long, value_name = "F0,F1:DB[:WEIGHT]")]
    loudness: Vec<String>,
    /// Weight (eta) of the text constraints: logits move by this per unit of energy (default 8 for
    /// --ban/--require, 30 for the grammars --valid-json/--regex).
    #[arg(long)]
    constraint_weight: Option<f64>,
    /// Extra forward passes estimating the output's likelihood for the uncertainty report (0 = skip).
    #[arg(long, default_value_t = aios_core::sampler::uncertainty::DEFAULT_LIKELIHOOD_SAMPLES)]
    likelihood_samples: usize,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Which weights of a model folder: f32, int8, int4, int2.
    #[arg(long)]
    dtype: Option<String>,
    /// How quantised weights are multiplied: auto (int8 kernel where the CPU has AVX-512 VNNI), int8, dequantize (f32) or quantized (candle, smallest RAM).
    #[arg(long, default_value = "auto")]
    matmul: String,
    /// LoRA adapter to apply, `PATH` or `PATH:WEIGHT` (default weight 1.0); repeat to mix several.
    #[arg(long = "adapter", value_name = "PATH[:WEIGHT]")]
    adapters: Vec<String>,
    /// Tensor patch to run on (`aios.kind = patch`, from selective fine-tuning).
    #[arg(long)]
    patch: Option<PathBuf>,
    /// ControlNet to apply (`aios.kind = controlnet`), `PATH` or `PATH:SCALE` (default scale 1.0);
    /// repeatable, each paired in order with a `--control-input`.
    #[arg(long = "control", value_name = "PATH[:SCALE]")]
    controls: Vec<String>,
    /// The input of each `--control`, in order: for an image ControlNet a grey PNG of the model's
    /// image size (an edge map: white edges on black), for a token ControlNet text (e.g. the keys a
    /// JSON object must have: "name, age").
    #[arg(long = "control-input", value_name = "PNG|TEXT")]
    control_inputs: Vec<String>,
    /// A skills folder written by `python -m aios_train evolve` (`<DIR>/cards` is its store): the
    /// skills whose cards match the prompt are activated for this generation.
    #[arg(long)]
    skills: Option<PathBuf>,
    /// Cosine a skill card needs with the prompt to activate its skill.
    #[arg(long, default_value_t = 0.45)]
    skill_threshold: f32,
    /// A memory store folder (see `aios-run memory`): its memories closest to
    /// the prompt condition the text (how many: `--memory-k`).
    #[arg(long)]
    memory: Option<PathBuf>,
    /// How many memories of `--memory` to condition on.
    #[arg(long = "memory-k", short = 'k', default_value_t = 3)]
    memory_k: usize,
    /// all-MiniLM-L6-v2 folder for `--memory` (default: $AIOS_EMBEDDER).
    #[arg(long)]
    embedder: Option<PathBuf>,
    /// Hide the progress bar.
    #[arg(long, short)]
    quiet: bool,
}

/// `VIEW=WEIGHT`, one term of `--compose`.
fn parse_term(s: &str) -> Result<Term, Error> {
    let (view, w) =
        s.split_once('=').ok_or_else(|| Error::Input(format!("--compose term {s:?}: expected VIEW=WEIGHT")))?;
    let weight =
        w.trim().parse::<f64>().map_err(|_| Error::Input(format!("--compose term {s:?}: {w:?} is not a number")))?;
    Term::parse(view.trim(), weight)
}

/// `PATH:CLASS[:WEIGHT]`, one `--classifier` energy.
fn parse_class_energy(spec: &str) -> Result<ImageEnergy, Error> {
    let parts: Vec<&str> = spec.split(':').collect();
    let (path, label, weight) = match parts.as_slice() {
        [.., l, w] if parts.len() >= 3 && w.parse::<f64>().is_ok() => {
            (parts[..parts.len() - 2].join(":"), *l, w.parse::<f64>().expect("checked"))
        }
        [.., l] if parts.len() >= 2 => (parts[..parts.len() - 1].join(":"), *l, 1.0),
        _ => return Err(Error::Input(format!("--classifier {spec:?}: expected PATH:CLASS[:WEIGHT]"))),
    };
    let classifier = LinearClassifier::load(&path)?;
    let class = classifier.class_index(label)?;
    Ok(ImageEnergy::Class(ClassEnergy { classifier: std::sync::Arc::new(classifier), class, weight }))
}

/// `A,B,...:TARGET[:WEIGHT]` of a region energy (`--brightness`: 4 pixel
/// bounds, `--loudness`: 2 frame bounds), default weight 1.
fn parse_region<const N: usize>(flag: &str, form: &str, spec: &str) -> Result<([usize; N], f32, f64), Error> {
    let bad = || Error::Input(format!("{flag} {spec:?}: expected {form}:TARGET[:WEIGHT]"));
    let mut parts = spec.split(':');
    let bounds: Vec<usize> = parts
        .next()
        .ok_or_else(bad)?
        .split(',')
        .map(|v| v.trim().parse())
        .collect::<Result<_, _>>()
        .map_err(|_| bad())?;
    let bounds: [usize; N] = bounds.try_into().map_err(|_| bad())?;
    let target: f32 = parts.next().ok_or_else(bad)?.trim().parse().map_err(|_| bad())?;
    let weight: f64 = match parts.next() {
        Some(w) => w.trim().parse().map_err(|_| bad())?,
        None => 1.0,
    };
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok((bounds, target, weight))
}

fn parse_brightness(spec: &str) -> Result<Brightness, Error> {
    let (rect, target, weight) = parse_region::<4>("--brightness", "X0,Y0,X1,Y1", spec)?;
    Ok(Brightness { rect, target, weight })
}

fn parse_loudness(spec: &str) -> Result<Loudness, Error> {
    let (frames, target_db, weight) = parse_region::<2>("--loudness", "F0,F1", spec)?;
    Ok(Loudness { frames, target_db, weight })
}

/// `PATH[:WEIGHT]`: the part after the last ':' is a weight only if it parses as one.
fn parse_adapter(spec: &str) -> Result<(PathBuf, f32), Error> {
    if let Some((path, w)) = spec.rsplit_once(':') {
        if let Ok(w) = w.parse::<f32>() {
            if !w.is_finite() {
                return Err(Error::Input(format!("adapter weight in {spec:?} is not finite")));
            }
            return Ok((PathBuf::from(path), w));
        }
    }
    Ok((PathBuf::from(spec), 1.0))
}

/// Loads and activates each `--control PATH[:SCALE]` (as `control0`, `control1`, ...) and reads
/// its `--control-input`: a PNG for an image ControlNet, text for a token one.
fn load_controls(
    engine: &Engine,
    specs: &[String],
    inputs: &[String],
) -> Result<std::collections::BTreeMap<String, ControlInput>, Error> {
    if specs.len() != inputs.len() {
        return Err(Error::Input(format!(
            "{} --control but {} --control-input: give each ControlNet its input, in the same order",
            specs.len(),
            inputs.len()
        )));
    }
    let mut out = std::collections::BTreeMap::new();
    for (i, (spec, input)) in specs.iter().zip(inputs).enumerate() {
        let (path, scale) = parse_adapter(spec)?;
        let name = format!("control{i}");
        engine.load_controlnet(&path, &name, Some(scale))?;
        let kind = engine.controlnets().loaded.into_iter().find(|(n, _)| *n == name).map(|(_, k)| k);
        let value = match kind {
            Some(ControlKind::Image) => {
                let (px, _, _) = read_png_gray(std::path::Path::new(input))?;
                ControlInput::Image(px.iter().map(|&v| v as f32).collect())
            }
            _ => ControlInput::Text(input.clone()),
        };
        out.insert(name, value);
    }
    Ok(out)
}

fn parse_dtype(s: &str) -> Result<DType, Error> {
    DType::parse(s).ok_or_else(|| Error::Input(format!("unknown dtype {s:?}; use f32, f16, int8, int4 or int2")))
}

/// `--modality` values.
#[derive(Clone, Copy, Debug, PartialEq, clap::ValueEnum)]
enum ModalityArg {
    Text,
    Image,
    Audio,
}

impl From<ModalityArg> for Modality {
    fn from(m: ModalityArg) -> Self {
        match m {
            ModalityArg::Text => Modality::Text,
            ModalityArg::Image => Modality::Image,
            ModalityArg::Audio => Modality::Audio,
        }
    }
}

/// A WAV file as mono f32 samples, checked against the model's sample rate.
fn read_wav(path: &std::path::Path, want_rate: usize) -> Result<Vec<f32>, Error> {
    let mut r = hound::WavReader::open(path).map_err(|e| match e {
        hound::Error::IoError(io) => Error::io(path, io),
        other => Error::format(path.display(), format!("not a readable WAV: {other}")),
    })?;
    let spec = r.spec();
    if spec.sample_rate as usize != want_rate {
        return Err(Error::Input(format!(
            "{}: {} Hz, but this model's audio is {want_rate} Hz",
            path.display(),
            spec.sample_rate
        )));
    }
    let bad = |e: hound::Error| Error::format(path.display(), format!("WAV data: {e}"));
    let raw: Vec<f32> = match spec.sample_format {
        hound::SampleFormat::Float => r.samples::<f32>().collect::<Result<_, _>>().map_err(bad)?,
        hound::SampleFormat::Int => {
            let scale = 1.0 / (1u64 << (spec.bits_per_sample.clamp(1, 32) - 1)) as f32;
            r.samples::<i32>().map(|s| s.map(|v| v as f32 * scale)).collect::<Result<_, _>>().map_err(bad)?
        }
    };
    let ch = spec.channels.max(1) as usize;
    Ok(raw.chunks(ch).map(|c| c.iter().sum::<f32>() / c.len() as f32).collect())
}

fn media_generate(
    a: GenerateArgs,
    engine: Engine,
    sampler: SamplerOptions,
    continuous: ContinuousSampler,
    control: std::collections::BTreeMap<String, ControlInput>,
) -> Result<(), Error> {
    let mut outputs: Vec<Modality> = a.modality.iter().map(|&m| m.into()).collect();
    outputs.sort();
    outputs.dedup();
    let cfg = engine.config().clone();
    let image = match &a.image {
        Some(p) => {
            let (px, h, w) = read_png_gray(p)?;
            if cfg.image_channels != 1 || h != cfg.image_size || w != cfg.image_size {
                return Err(Error::Input(format!(
                    "{}: {w}x{h} grey image, but this model's images are {}x{} with {} channel(s)",
                    p.display(),
                    cfg.image_size,
                    cfg.image_size,
                    cfg.image_channels
                )));
            }
            let mask = match &a.image_mask {
                Some(mp) => {
                    let (m, mh, mw) = read_png_gray(mp)?;
                    if (mh, mw) != (h, w) {
                        return Err(Error::Input(format!("{}: mask is {mw}x{mh}, image {w}x{h}", mp.display())));
                    }
                    Some(m.iter().map(|&v| v >= 128).collect())
                }
                None => None,
            };
            Some(GivenImage { pixels: px.iter().map(|&v| v as f32).collect(), mask })
        }
        None if a.image_mask.is_some() => return Err(Error::Input("--image-mask needs --image".into())),
        None => None,
    };
    let audio = match &a.audio {
        Some(p) => {
            if !cfg.has_audio() {
                return Err(Error::Config("audio was given but this model has no audio head".into()));
            }
            Some(GivenAudio { samples: read_wav(p, cfg.audio_sample_rate)?, mask: None })
        }
        None => None,
    };
    let wants_file = outputs.iter().any(|m| *m != Modality::Text);
    if wants_file && a.out.is_none() {
        return Err(Error::Input("image/audio outputs need --out PATH".into()));
    }
    let req = MediaRequest {
        outputs: outputs.clone(),
        prompt: (!a.prompt.is_empty()).then(|| a.prompt.clone()),
        text_length: a.text_length,
        image,
        audio,
        sampler,
        continuous,
        eta: a.eta,
        energies: a
            .brightness
            .iter()
            .map(|b| parse_brightness(b).map(ImageEnergy::Brightness))
            .chain(a.classifier.iter().map(|c| parse_class_energy(c)))
            .collect::<Result<_, _>>()?,
        audio_energies: a.loudness.iter().map(|l| parse_loudness(l)).collect::<Result<_, _>>()?,
        control,
    };
    let bar = if a.quiet { ProgressBar::hidden() } else { ProgressBar::new(req.sampler.steps as u64) };
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{bar:30}] step {pos}/{len} ({elapsed})")
            .expect("static template")
            .progress_chars("=> "),
    );
    let g = engine.generate_media(&req, &mut |p| bar.set_position(p.step as u64))?;
    bar.finish_and_clear();
    for w in &g.warnings {
        eprintln!("warning: {w}");
    }
    let mut written = vec![];
    if let Some(out) = &a.out {
        let ext = out.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
        for m in &outputs {
            let want = match m {
                Modality::Image => "png",
                Modality::Audio => "wav",
                Modality::Text => "txt",
            };
            // A single output whose extension already says what it is is written as named.
            let path = if outputs.len() == 1 && ext.as_deref() == Some(want) {
                out.clone()
            } else {
                let mut p = out.as_os_str().to_owned();
                p.push(format!(".{want}"));
                PathBuf::from(p)
            };
            save_output(&path, want, g.image.as_ref(), g.audio.as_ref(), &g.text)?;
            written.push(path);
        }
    }
    if outputs.contains(&Modality::Text) {
        let _ = writeln!(std::io::stdout().lock(), "{}", g.text);
    }
    if !a.quiet {
        let files: Vec<String> = written.iter().map(|p| p.display().to_string()).collect();
        eprintln!(
            "{} steps, {} forward passes, {:.1} ms ({:.1} ms forward){}{}",
            g.steps_run,
            g.forward_passes,
            g.timings.total_ms,
            g.timings.forward_ms,
            if files.is_empty() { "" } else { "; wrote " },
            files.join(", ")
        );
    }
    Ok(())
}

fn generate(a: GenerateArgs) -> Result<(), Error> {
    let matmul = MatmulMode::parse(&a.matmul).ok_or_else(|| {
        Error::Input(format!("unknown matmul mode {:?}; use auto, int8, dequantize or quantized", a.matmul))
    })?;
    let opts = EngineOptions { threads: a.threads, dtype: a.dtype.as_deref().map(parse_dtype).transpose()?, matmul };
    let (strategy, continuous) = match ContinuousSampler::parse(&a.sampler) {
        Ok(c) => (Strategy::Confidence, c),
        Err(_) => (
            Strategy::parse(&a.sampler).map_err(|_| {
                Error::Input(format!(
                    "unknown sampler {:?}; text: {}; image/audio: {}",
                    a.sampler,
                    Strategy::NAMES.join(", "),
                    ContinuousSampler::NAMES.join(", ")
                ))
            })?,
            ContinuousSampler::Ddim,
        ),
    };
    let sampler = SamplerOptions {
        strategy,
        steps: a.steps,
        temperature: a.temperature,
        top_p: a.top_p,
        block_length: a.block_length,
        guidance: a.guidance,
        threshold: a.threshold,
        seed: a.seed,
        likelihood_samples: a.likelihood_samples,
        compose: a.compose.iter().map(|t| parse_term(t)).collect::<Result<_, _>>()?,
        memory_prefix: 0,
        constraints: [(Kind::Banned, &a.ban), (Kind::Required, &a.require)]
            .into_iter()
            .filter(|(_, words)| !words.is_empty())
            .map(|(kind, words)| Constraint::new(kind, words.clone(), a.constraint_weight.unwrap_or(DEFAULT_WEIGHT)))
            .chain(
                a.valid_json
                    .then(|| Constraint::new(Kind::ValidJson, vec![], a.constraint_weight.unwrap_or(GRAMMAR_WEIGHT))),
            )
            .chain(
                a.regex
                    .as_deref()
                    .map(RegexPrefix::new)
                    .transpose()?
                    .map(|r| Constraint::regex(Arc::new(r), a.constraint_weight.unwrap_or(GRAMMAR_WEIGHT))),
            )
            .collect(),
    };
    sampler.validate()?;
    let adapters = a.adapters.iter().map(|s| parse_adapter(s)).collect::<Result<Vec<_>, _>>()?;
    let engine = Engine::open(&a.model, &opts)?;
    for (i, (path, weight)) in adapters.iter().enumerate() {
        engine.load_adapter(path, &format!("adapter{i}"), Some(*weight))?;
    }
    if let Some(p) = &a.patch {
        engine.load_patch(p, "patch", true)?;
    }
    let control = load_controls(&engine, &a.controls, &a.control_inputs)?;
    if a.modality != [ModalityArg::Text] || a.image.is_some() || a.audio.is_some() || a.image_mask.is_some() {
        if a.memory.is_some() {
            return Err(Error::Input("--memory conditions text-only generation".into()));
        }
        return media_generate(a, engine, sampler, continuous, control);
    }
    if a.out.is_some() {
        return Err(Error::Input("--out is for image/audio outputs; text goes to stdout".into()));
    }
    let memory = match &a.memory {
        Some(dir) => {
            let embedder = a
                .embedder
                .clone()
                .or_else(|| std::env::var_os("AIOS_EMBEDDER").filter(|v| !v.is_empty()).map(PathBuf::from));
            let opts = StoreOptions { read_only: true, embedder, threads: a.threads, ..Default::default() };
            engine.set_memory(Some(std::sync::Arc::new(MemoryStore::open(dir, opts)?)));
            MemorySource::Search { k: a.memory_k }
        }
        None => MemorySource::None,
    };
    if let Some(dir) = &a.skills {
        let embedder = a
            .embedder
            .clone()
            .or_else(|| std::env::var_os("AIOS_EMBEDDER").filter(|v| !v.is_empty()).map(PathBuf::from));
        let opts = StoreOptions { read_only: true, embedder, threads: a.threads, ..Default::default() };
        engine.set_skills(Some(std::sync::Arc::new(MemoryStore::open(dir.join("cards"), opts)?)), a.skill_threshold)?;
    }
    let req = TextRequest {
        prompt: a.prompt,
        suffix: a.suffix,
        length: a.length,
        sampler,
        memory,
        adapters: None,
        use_skills: true,
        control,
    };
    let bar = if a.quiet { ProgressBar::hidden() } else { ProgressBar::new(req.sampler.steps as u64) };
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{bar:30}] step {pos}/{len} {msg} ({elapsed})")
            .expect("static template")
            .progress_chars("=> "),
    );
    let g = engine.generate_text(&req, &mut |p| {
        bar.set_position(p.step as u64);
        bar.set_message(format!("{} masked", p.masked_left));
    })?;
    bar.finish_and_clear();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", g.text);
    if !a.quiet {
        for m in &g.memories {
            let score = m.score.map_or(String::new(), |s| format!(" score {s:.3}"));
            eprintln!("memory {}{score} ({} tokens): {}", m.id.map_or("-".into(), |i| i.to_string()), m.tokens, m.text);
        }
        if !g.skills.is_empty() {
            eprintln!("skills activated: {}", g.skills.join(", "));
        }
        for c in &g.constraints {
            eprintln!("constraint {} {:?}: {}", c.kind.name(), c.words, if c.met { "met" } else { "NOT met" });
        }
        for w in &g.warnings {
            eprintln!("warning: {w}");
        }
    }
    let generated: Vec<f32> = g.confidence.iter().zip(&g.given).filter(|(_, &gv)| !gv).map(|(c, _)| *c).collect();
    let mean_conf = generated.iter().sum::<f32>() / generated.len().max(1) as f32;
    if !a.quiet {
        let uncertainty = match &g.uncertainty {
            Some(u) => format!(
                ", uncertainty {:.3}{}",
                u.scalar,
                match u.should_evolve {
                    Some(true) => " (above the model's threshold: evolve)",
                    Some(false) => " (within the model's threshold)",
                    None => " (uncalibrated)",
                }
            ),
            None => String::new(),
        };
        eprintln!(
            "{} tokens, {} steps, {} forward passes, {:.1} ms ({:.1} ms forward), mean confidence {:.3}{uncertainty}",
            generated.len(),
            g.steps_run,
            g.forward_passes,
            g.timings.total_ms,
            g.timings.forward_ms,
            mean_conf
        );
    }
    Ok(())
}

fn info(model: PathBuf, dtype: Option<String>) -> Result<(), Error> {
    let opts =
        EngineOptions { dtype: dtype.as_deref().map(parse_dtype).transpose()?, threads: Some(1), ..Default::default() };
    let engine = Engine::open(&model, &opts)?;
    let i = engine.info();
    println!("file: {} ({:.2} MB)", i.path.display(), i.file_bytes as f64 / 1e6);
    println!("config: {}", i.config.to_json());
    for (d, n, p) in &i.dtypes {
        println!("dtype {d}: {n} tensors, {p} parameters");
    }
    let total = i.backbone_params + i.head_params();
    let pct = |n: usize| 100.0 * n as f64 / total as f64;
    let heads: Vec<String> = i.heads.iter().map(|(m, n)| format!("{} head {n} ({:.1}%)", m.name(), pct(*n))).collect();
    println!(
        "parameters: {total} total, backbone {} ({:.1}%), {}",
        i.backbone_params,
        pct(i.backbone_params),
        heads.join(", ")
    );
    if let Some(n) = i.student_steps {
        println!("distilled student: for {n} sampling steps (aios.distill metadata)");
    }
    Ok(())
}

fn quantize(input: PathBuf, output: PathBuf, dtype: String) -> Result<(), Error> {
    let d = parse_dtype(&dtype)?;
    let r = quantize_file(&input, &output, d)?;
    let mut counts: Vec<(DType, usize)> = vec![];
    for (_, t) in &r.tensors {
        match counts.iter_mut().find(|(c, _)| c == t) {
            Some(e) => e.1 += 1,
            None => counts.push((*t, 1)),
        }
    }
    let summary: Vec<String> = counts.iter().map(|(t, n)| format!("{n} {t}")).collect();
    println!(
        "{} -> {}: {} tensors ({}), {:.2} MB -> {:.2} MB",
        input.display(),
        output.display(),
        r.tensors.len(),
        summary.join(", "),
        r.in_bytes as f64 / 1e6,
        r.out_bytes as f64 / 1e6
    );
    Ok(())
}

fn exit_code(e: &Error) -> u8 {
    match e {
        Error::Input(_) => 3,
        Error::Format { .. } | Error::Config(_) | Error::Numeric(_) => 4,
        Error::Io { .. } => 5,
        Error::Tokenizer(_) => 6,
        Error::Backend(_) => 1,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(a) => generate(*a),
        Command::Info { model, dtype } => info(model, dtype),
        Command::Quantize { input, output, dtype } => quantize(input, output, dtype),
        Command::Memory(a) => memory::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("aios-run: {e}");
            ExitCode::from(exit_code(&e))
        }
    }
}
