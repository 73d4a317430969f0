//! `aios-run`: the standalone runtime for edge devices.
//!
//! Exit codes: 0 success, 2 bad command line, 3 invalid input, 4 corrupt or
//! inconsistent model file/config (or NaN output), 5 I/O error, 6 tokenizer error, 1 other.

mod memory;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use aios_core::format::DType;
use aios_core::quant::{quantize_file, MatmulMode};
use aios_core::sampler::{SamplerOptions, Strategy};
use aios_core::{Engine, EngineOptions, Error, TextRequest};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Parser)]
#[command(name = "aios-run", version, about = "Run small diffusion language models on the edge")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt (text on stdout, progress on stderr).
    Generate(GenerateArgs),
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
    /// Text the generation starts with. `[MASK]` inside it marks tokens to fill.
    prompt: String,
    /// Text fixed at the end of the canvas (the model fills the gap).
    #[arg(long)]
    suffix: Option<String>,
    /// Canvas length in tokens, prompt included.
    #[arg(long, default_value_t = 64)]
    length: usize,
    #[arg(long, default_value_t = 16)]
    steps: usize,
    /// ancestral, confidence, entropy, margin or threshold.
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
    /// Hide the progress bar.
    #[arg(long, short)]
    quiet: bool,
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

fn parse_dtype(s: &str) -> Result<DType, Error> {
    DType::parse(s).ok_or_else(|| Error::Input(format!("unknown dtype {s:?}; use f32, f16, int8, int4 or int2")))
}

fn generate(a: GenerateArgs) -> Result<(), Error> {
    let matmul = MatmulMode::parse(&a.matmul).ok_or_else(|| {
        Error::Input(format!("unknown matmul mode {:?}; use auto, int8, dequantize or quantized", a.matmul))
    })?;
    let opts = EngineOptions { threads: a.threads, dtype: a.dtype.as_deref().map(parse_dtype).transpose()?, matmul };
    let sampler = SamplerOptions {
        strategy: Strategy::parse(&a.sampler)?,
        steps: a.steps,
        temperature: a.temperature,
        top_p: a.top_p,
        block_length: a.block_length,
        guidance: a.guidance,
        threshold: a.threshold,
        seed: a.seed,
    };
    sampler.validate()?;
    let adapters = a.adapters.iter().map(|s| parse_adapter(s)).collect::<Result<Vec<_>, _>>()?;
    let engine = Engine::open(&a.model, &opts)?;
    for (i, (path, weight)) in adapters.iter().enumerate() {
        engine.load_adapter(path, &format!("adapter{i}"), Some(*weight))?;
    }
    let req = TextRequest { prompt: a.prompt, suffix: a.suffix, length: a.length, sampler };
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
    let generated: Vec<f32> = g.confidence.iter().zip(&g.given).filter(|(_, &gv)| !gv).map(|(c, _)| *c).collect();
    let mean_conf = generated.iter().sum::<f32>() / generated.len().max(1) as f32;
    if !a.quiet {
        eprintln!(
            "{} tokens, {} steps, {} forward passes, {:.1} ms ({:.1} ms forward), mean confidence {:.3}",
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
        Command::Generate(a) => generate(a),
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
