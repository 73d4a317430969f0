//! The one orchestration point: load a model folder (weights + tokenizer),
//! build the canvas from a prompt, run a sampler, decode.

mod adapters;
mod canvas;

pub use adapters::{ControlNets, SkillMatch};

pub use canvas::{
    save_output, AudioOut, GivenAudio, GivenImage, ImageOut, MediaRequest, DEFAULT_TEXT_LENGTH, GRIFFIN_LIM_ITERS,
};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use crate::adapter::{ActiveLora, AppliedControl, ControlKind, ControlNet, ControlValue};
use crate::error::{Error, Result};
use crate::format::{DType, WeightFile};
use crate::memory::store::Query;
use crate::memory::{MemoryStore, Precision};
use crate::model::{Dit, ModelConfig};
use crate::quant::MatmulMode;
use crate::sampler::uncertainty::{self, Calibration, Uncertainty};
use crate::sampler::{self, AdapterSet, Denoiser, Progress, SamplerOptions};

/// How to open a model.
#[derive(Clone, Debug, Default)]
pub struct EngineOptions {
    /// Worker threads for this engine (None = all cores).
    pub threads: Option<usize>,
    /// Which weight file of a model folder to load (`model.<dtype>.parquet`);
    /// None = f32 if present, else the smallest variant.
    pub dtype: Option<DType>,
    pub matmul: MatmulMode,
}

/// A text generation request.
#[derive(Clone, Debug)]
pub struct TextRequest {
    pub prompt: String,
    /// Optional text fixed at the end of the canvas (infilling between them).
    pub suffix: Option<String>,
    /// Total canvas length in tokens, prompt and suffix included (memories
    /// come on top, in front of it).
    pub length: usize,
    pub sampler: SamplerOptions,
    /// Memories that condition the generation.
    pub memory: MemorySource,
    /// This call's adapter set (loaded names -> weights) instead of the
    /// engine's active one; None = the engine's.
    pub adapters: Option<BTreeMap<String, f32>>,
    /// Activate the engine's stored skills that match the prompt (when it
    /// has a skills store).
    pub use_skills: bool,
    /// Inputs of the engine's active ControlNets, by name (a token control's
    /// text is laid over the canvas from its first position).
    pub control: BTreeMap<String, ControlInput>,
}

/// A generation's input for one ControlNet.
#[derive(Clone, Debug, PartialEq)]
pub enum ControlInput {
    /// For a token ControlNet: text, tokenised and `[PAD]`-filled to the canvas.
    Text(String),
    /// For an image ControlNet: `[C, H, W]` (or `[H, W]`) pixels in [0, 255],
    /// the image head's size (an edge map: white edges on black).
    Image(Vec<f32>),
}

/// Where a text generation's memories come from.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum MemorySource {
    #[default]
    None,
    /// The top `k` of the engine's memory store for the prompt (cosine of
    /// MiniLM embeddings); a store with fewer memories gives all it has.
    Search { k: usize },
    /// These texts, most relevant first.
    Given(Vec<String>),
}

/// A memory that conditioned a generation.
#[derive(Clone, Debug, PartialEq)]
pub struct UsedMemory {
    /// Its id in the store (None for memories passed by the caller).
    pub id: Option<u64>,
    /// Cosine similarity to the prompt (None for memories passed by the caller).
    pub score: Option<f32>,
    pub text: String,
    /// How many of its tokens fitted on the canvas (it is cut at the end if
    /// the memories together exceed the room left by `length`).
    pub tokens: usize,
}

/// A validated [`TextRequest`]: the canvas, how much of it is the prompt
/// (with BOS), and the fixed suffix.
struct TextPlan {
    canvas: Vec<u32>,
    prefix_len: usize,
    suffix: Vec<u32>,
}

impl TextRequest {
    /// The one place a text request is checked against a model (media
    /// requests: `MediaRequest::plan`).
    fn plan(&self, engine: &Engine) -> Result<TextPlan> {
        let cfg = &engine.config;
        if self.length == 0 || self.length > cfg.max_length {
            return crate::input_err!(
                "length must be in 1..={} (the model's maximum), got {}",
                cfg.max_length,
                self.length
            );
        }
        let mut prefix = vec![cfg.bos_token_id];
        prefix.extend(engine.encode(&self.prompt)?);
        let suffix = match &self.suffix {
            Some(s) => engine.encode(s)?,
            None => vec![],
        };
        if prefix.len() + suffix.len() >= self.length {
            return crate::input_err!(
                "prompt and suffix take {} tokens (with BOS), leaving nothing to generate in length {}",
                prefix.len() + suffix.len(),
                self.length
            );
        }
        let mut canvas = prefix.clone();
        canvas.resize(self.length - suffix.len(), cfg.mask_token_id);
        canvas.extend(&suffix);
        Ok(TextPlan { canvas, prefix_len: prefix.len(), suffix })
    }
}

/// Wall-clock breakdown of one generation, milliseconds.
#[derive(Clone, Debug, Default)]
pub struct Timings {
    pub tokenize_ms: f64,
    pub forward_ms: f64,
    pub sampler_ms: f64,
    pub decode_ms: f64,
    pub total_ms: f64,
}

#[derive(Clone, Debug)]
pub struct Generation {
    /// Decoded text: prompt and continuation, special tokens removed, cut at
    /// the first end-of-sequence after the prompt.
    pub text: String,
    /// The whole canvas, prompt included.
    pub tokens: Vec<u32>,
    /// Per-token probability at commit (1.0 for given tokens).
    pub confidence: Vec<f32>,
    /// Per-token predictive entropy at commit (0.0 for given tokens).
    pub entropy: Vec<f32>,
    /// Which positions were given (prompt, suffix, infill context).
    pub given: Vec<bool>,
    pub steps_run: usize,
    pub forward_passes: usize,
    /// The adapters (name, weight) this generation ran with.
    pub adapters: Vec<(String, f32)>,
    /// The tensor patch it ran on, if any.
    pub patch: Option<String>,
    /// Stored skills activated for it (their adapters or patch are above).
    pub skills: Vec<String>,
    /// Skill cards that matched but were skipped, and why.
    pub warnings: Vec<String>,
    /// Whether each text constraint held.
    pub constraints: Vec<sampler::constraints::Outcome>,
    pub timings: Timings,
    /// The generated image (image among the outputs).
    pub image: Option<ImageOut>,
    /// The generated sound (audio among the outputs).
    pub audio: Option<AudioOut>,
    /// The modalities generated (text only for the text API).
    pub modalities: Vec<crate::model::Modality>,
    /// How unsure the model was (text generations; see `sampler::uncertainty`).
    pub uncertainty: Option<Uncertainty>,
    /// The memories that conditioned it, most relevant first.
    pub memories: Vec<UsedMemory>,
    /// Canvas positions in front of the prompt that hold those memories.
    pub memory_tokens: usize,
}

/// Summary of a loaded model for `aios-run info` and `Engine.info`.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    pub path: PathBuf,
    pub config: ModelConfig,
    pub file_bytes: u64,
    /// `(dtype, tensor count, parameter count)` per stored dtype.
    pub dtypes: Vec<(DType, usize, usize)>,
    pub backbone_params: usize,
    /// Parameters of each head (text: token embedding + output projection).
    pub heads: Vec<(crate::model::Modality, usize)>,
    /// For a distilled student (`aios.distill` metadata, `aios_train.distill`):
    /// the sampling steps it was distilled for.
    pub student_steps: Option<usize>,
}

impl ModelInfo {
    pub fn head_params(&self) -> usize {
        self.heads.iter().map(|h| h.1).sum()
    }
}

/// What one generation runs with: the model and the adapters active when it
/// started. Immutable, so adapter changes never disturb running generations.
pub struct Runtime {
    pub model: Arc<Dit>,
    pub lora: Arc<ActiveLora>,
    /// The tensor patch `model` carries, if any.
    pub patch: Option<String>,
    /// Active ControlNets: (name, net, scale); scale 0 takes an input and applies nothing.
    pub controls: Vec<(String, Arc<ControlNet>, f32)>,
}

/// The ControlNets one generation runs with, inputs resolved.
pub(crate) type Controls = Vec<(Arc<ControlNet>, f32, ControlValue)>;

/// Borrowed views of `controls` for one forward pass.
pub(crate) fn applied(controls: &Controls) -> Vec<AppliedControl<'_>> {
    controls.iter().map(|(net, scale, value)| AppliedControl { net, scale: *scale, value }).collect()
}

pub struct Engine {
    config: ModelConfig,
    /// `aios.fingerprint` of the weights; adapters must name the same one.
    fingerprint: Option<String>,
    current: RwLock<Arc<Runtime>>,
    /// Serialises adapter changes (never held while generating).
    adapters: Mutex<adapters::Adapters>,
    /// Skill cards consulted on every text generation.
    skills: RwLock<Option<adapters::Skills>>,
    matmul: MatmulMode,
    tokenizer: Option<tokenizers::Tokenizer>,
    tokenizer_path: PathBuf,
    pool: crate::threads::Pool,
    info: ModelInfo,
    /// The model's `uncertainty.json`, if it has one.
    calibration: Option<Calibration>,
    /// The memory store `MemorySource::Search` reads.
    memory: RwLock<Option<Arc<MemoryStore>>>,
    /// Each token's text, for the ValidJson and Regex constraints (decoded on first use).
    token_bytes: std::sync::OnceLock<Vec<Vec<u8>>>,
}

/// The `student_steps` of a distilled student's `aios.distill` metadata.
fn distilled_steps(file: &WeightFile) -> Result<Option<usize>> {
    let Some(raw) = file.metadata.get("aios.distill") else { return Ok(None) };
    let bad = |why: &str| Error::format(file.path.display(), format!("aios.distill metadata: {why}"));
    let v: serde_json::Value = serde_json::from_str(raw).map_err(|e| bad(&e.to_string()))?;
    match v.get("student_steps").and_then(serde_json::Value::as_u64) {
        Some(n) if n >= 1 => Ok(Some(n as usize)),
        _ => Err(bad("student_steps must be a positive integer")),
    }
}

/// Resolves a model folder or file to the weight file to load.
pub fn resolve_weights(path: &Path, dtype: Option<DType>) -> Result<PathBuf> {
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    if !path.is_dir() {
        return Err(Error::io(path, std::io::Error::new(std::io::ErrorKind::NotFound, "no such model file or folder")));
    }
    let candidates: Vec<String> = match dtype {
        Some(d) => vec![format!("model.{}.parquet", d.alias())],
        None => ["f32", "f16", "bf16", "int8", "int4", "int2"]
            .iter()
            .map(|a| format!("model.{a}.parquet"))
            .chain(["model.parquet".to_string()])
            .collect(),
    };
    candidates.iter().map(|c| path.join(c)).find(|p| p.is_file()).ok_or_else(|| {
        Error::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no weight file; looked for {}", candidates.join(", ")),
            ),
        )
    })
}

impl Engine {
    /// Opens a model folder (weights + `tokenizer.json`) or a single `.parquet`
    /// (tokenizer looked up beside it; token-level calls work without one).
    pub fn open(path: impl AsRef<Path>, opts: &EngineOptions) -> Result<Self> {
        let path = path.as_ref();
        let weights = resolve_weights(path, opts.dtype)?;
        let pool = crate::threads::Pool::new(opts.threads, "engine")?;
        let file = WeightFile::open(&weights)?;
        if file.kind != "model" {
            return Err(Error::format(weights.display(), format!("this is a {:?} file, not a model", file.kind)));
        }
        let json =
            file.config_json().ok_or_else(|| Error::format(weights.display(), "missing aios.config metadata"))?;
        let config = ModelConfig::from_json(json)?;
        let model = pool.install(|| Dit::load(&file, config.clone(), opts.matmul))?;
        let (backbone_params, heads) = model.parameter_split();
        let mut dtypes: Vec<(DType, usize, usize)> = vec![];
        for t in &file.tensors {
            match dtypes.iter_mut().find(|(d, _, _)| *d == t.dtype) {
                Some(e) => {
                    e.1 += 1;
                    e.2 += t.numel();
                }
                None => dtypes.push((t.dtype, 1, t.numel())),
            }
        }
        let dir = weights.parent().unwrap_or(Path::new("."));
        let tokenizer_path = dir.join("tokenizer.json");
        let tokenizer = if tokenizer_path.is_file() {
            Some(
                tokenizers::Tokenizer::from_file(&tokenizer_path)
                    .map_err(|e| Error::Tokenizer(format!("{}: {e}", tokenizer_path.display())))?,
            )
        } else {
            None
        };
        if let Some(tok) = &tokenizer {
            if tok.get_vocab_size(true) > config.vocab_size {
                return Err(Error::Config(format!(
                    "tokenizer has {} tokens but the model's vocabulary is {}",
                    tok.get_vocab_size(true),
                    config.vocab_size
                )));
            }
        }
        let calibration = Calibration::load(&dir.join(uncertainty::CALIBRATION_FILE))?;
        let student_steps = distilled_steps(&file)?;
        let info = ModelInfo {
            path: weights,
            config,
            file_bytes: file.file_bytes,
            dtypes,
            backbone_params,
            heads,
            student_steps,
        };
        let fingerprint = file.metadata.get("aios.fingerprint").cloned();
        let model = Arc::new(model);
        let current = RwLock::new(Arc::new(Runtime {
            model: model.clone(),
            lora: ActiveLora::empty(),
            patch: None,
            controls: vec![],
        }));
        Ok(Engine {
            config: info.config.clone(),
            fingerprint,
            current,
            adapters: Mutex::new(adapters::Adapters::new(model)),
            skills: RwLock::new(None),
            matmul: opts.matmul,
            tokenizer,
            tokenizer_path,
            pool,
            info,
            calibration,
            memory: RwLock::new(None),
            token_bytes: std::sync::OnceLock::new(),
        })
    }

    /// Attaches (or with None detaches) the memory store that
    /// `MemorySource::Search` reads; generations already running keep theirs.
    pub fn set_memory(&self, store: Option<Arc<MemoryStore>>) {
        *self.memory.write().unwrap_or_else(|e| e.into_inner()) = store;
    }

    pub fn memory(&self) -> Option<Arc<MemoryStore>> {
        self.memory.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The memories `source` names for `prompt`.
    pub fn recall(&self, prompt: &str, source: &MemorySource) -> Result<Vec<UsedMemory>> {
        match source {
            MemorySource::None => Ok(vec![]),
            MemorySource::Given(texts) => {
                if texts.iter().any(|t| t.trim().is_empty()) {
                    return crate::input_err!("a given memory is empty");
                }
                Ok(texts.iter().map(|t| UsedMemory { id: None, score: None, text: t.clone(), tokens: 0 }).collect())
            }
            MemorySource::Search { k } => {
                if *k == 0 {
                    return crate::input_err!("memory_k must be at least 1 (leave it out for no memories)");
                }
                let Some(store) = self.memory() else {
                    return crate::input_err!("memory_k needs a memory store; open the engine with one");
                };
                if prompt.trim().is_empty() {
                    return crate::input_err!("memory search needs a prompt to search with");
                }
                if store.is_empty() {
                    return Ok(vec![]);
                }
                let hits = store.search(Query::Text(prompt), *k, Precision::F32, None)?;
                Ok(hits
                    .into_iter()
                    .map(|h| UsedMemory { id: Some(h.id), score: Some(h.score), text: h.text, tokens: 0 })
                    .collect())
            }
        }
    }

    /// The memory segment of a canvas: `[BOS] memory [EOS]` per memory, most
    /// relevant first, within `room` tokens (the last one that fits is cut,
    /// the rest dropped). Sets each memory's `tokens`; drops those with none.
    fn memory_segment(&self, memories: &mut Vec<UsedMemory>, room: usize) -> Result<Vec<u32>> {
        let cfg = &self.config;
        let mut seg = vec![];
        for m in memories.iter_mut() {
            let mut ids = vec![cfg.bos_token_id];
            ids.extend(self.encode(&m.text)?);
            ids.push(cfg.eos_token_id);
            // The mask id inside a memory would be generated over: refuse it.
            if ids.contains(&cfg.mask_token_id) {
                return crate::input_err!("a memory contains the mask token");
            }
            let take = ids.len().min(room - seg.len());
            if take < 2 {
                break; // not even one of its tokens fits after BOS
            }
            m.tokens = take - 1; // BOS is not the memory's
            seg.extend(&ids[..take]);
        }
        memories.retain(|m| m.tokens > 0);
        Ok(seg)
    }
    /// The uncertainty calibration loaded with the model (`uncertainty.json`).
    pub fn calibration(&self) -> Option<&Calibration> {
        self.calibration.as_ref()
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn fingerprint(&self) -> Option<&str> {
        self.fingerprint.as_deref()
    }

    /// The model and adapter set a call made now would use.
    pub fn snapshot(&self) -> Arc<Runtime> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn threads(&self) -> usize {
        self.pool.threads()
    }

    fn tokenizer(&self) -> Result<&tokenizers::Tokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| {
            Error::Tokenizer(format!("no tokenizer at {}; text calls need one", self.tokenizer_path.display()))
        })
    }

    /// Token ids of `text` (no special tokens added; `[MASK]` in the text
    /// becomes the mask id, which is how templates mark spans to fill).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.tokenizer()?.encode(text, false).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let vocab = self.config.vocab_size;
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
            return crate::input_err!("token id {bad} is outside the vocabulary of {vocab}");
        }
        self.tokenizer()?.decode(ids, true).map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// Raw logits `[n, L, V]` for a batch of equal-length token sequences.
    pub fn logits(&self, batch: &[Vec<u32>], sigma: Option<f32>) -> Result<Vec<f32>> {
        self.logits_controlled(batch, sigma, &BTreeMap::new())
    }

    /// [`Engine::logits`] steered by the active ControlNets with these inputs
    /// (parity tests); an active net without an input is not applied.
    pub fn logits_controlled(
        &self,
        batch: &[Vec<u32>],
        sigma: Option<f32>,
        control: &BTreeMap<String, ControlInput>,
    ) -> Result<Vec<f32>> {
        let rt = self.snapshot();
        let l = batch.first().map_or(0, Vec::len);
        let controls = self.resolve_controls(&rt, control, l, false, &mut vec![])?;
        self.pool.install(|| forward(&rt, batch, sigma, None, &controls))
    }

    /// One forward pass over a multimodal canvas (parity tests, benchmarks).
    /// With `control`, the active ControlNets steer it (inputs by name).
    pub fn forward_canvas(
        &self,
        input: &crate::model::CanvasInput,
        control: &BTreeMap<String, ControlInput>,
    ) -> Result<crate::model::CanvasOutput> {
        let rt = self.snapshot();
        let batch = input.batch.max(1);
        let controls =
            self.resolve_controls(&rt, control, input.tokens.len() / batch, input.image.is_some(), &mut vec![])?;
        let applied = applied(&controls);
        let input = crate::model::CanvasInput { controls: &applied, ..*input };
        self.pool.install(|| rt.model.forward_canvas(&input, &rt.lora))
    }

    /// Generates text for `req`, reporting each step to `on_step`.
    pub fn generate_text(&self, req: &TextRequest, on_step: &mut (dyn FnMut(Progress) + Send)) -> Result<Generation> {
        let t_start = Instant::now();
        let cfg = &self.config;
        let mut sampler = req.sampler.clone();
        for c in sampler.constraints.iter_mut().filter(|c| !c.kind.reads_text()) {
            c.spellings = self.spellings(&c.words, c.kind)?;
        }
        let TextPlan { canvas, prefix_len, suffix } = req.plan(self)?;
        let mut memories = self.recall(&req.prompt, &req.memory)?;
        let room = cfg.max_length - req.length;
        if !memories.is_empty() && room < 3 {
            return crate::input_err!(
                "length {} leaves no room for memories on the model's {}-token canvas; lower length",
                req.length,
                cfg.max_length
            );
        }
        let mut full = self.memory_segment(&mut memories, room)?;
        let mem_len = full.len();
        if sampler.constraints.iter().any(|c| c.kind.reads_text()) {
            // The text a grammar checks starts right after [BOS] (the prompt is part of it).
            let spec = Arc::new(sampler::constraints::TextTokens {
                start: mem_len + 1,
                bytes: self.token_bytes()?.to_vec(),
                stop: vec![cfg.eos_token_id, cfg.pad_token_id],
            });
            for c in sampler.constraints.iter_mut().filter(|c| c.kind.reads_text()) {
                c.text = Some(spec.clone());
            }
        }
        sampler.validate()?;
        full.extend(canvas);
        let mut skills = if req.use_skills { self.match_skills(&req.prompt)? } else { adapters::SkillMatch::default() };
        let rt = self.runtime_for(req.adapters.as_ref(), &mut skills)?;
        let mut control_warnings = vec![];
        // An L1 skill's ControlNet reads the prompt (what it was trained with), unless the call gives an input.
        let mut control = req.control.clone();
        for name in &skills.controlnets {
            control.entry(name.clone()).or_insert_with(|| ControlInput::Text(req.prompt.clone()));
        }
        let controls = self.resolve_controls(&rt, &control, full.len(), false, &mut control_warnings)?;
        let tokenize_ms = t_start.elapsed().as_secs_f64() * 1e3;
        let opts = SamplerOptions { memory_prefix: mem_len, ..sampler };
        let mut generation = self.run_tokens(rt, full, &opts, controls, on_step)?;
        generation.warnings.extend(control_warnings);
        generation.skills = skills.names;
        generation.warnings.splice(0..0, skills.warnings);
        generation.memories = memories;
        generation.memory_tokens = mem_len;
        let prefix = mem_len + prefix_len;
        let t_dec = Instant::now();
        // Cut the generated span at its first end-of-sequence (what follows is
        // a new document in the training format), but keep a caller's suffix.
        let gen_end = mem_len + req.length - suffix.len();
        let cut = generation.tokens[prefix..gen_end]
            .iter()
            .position(|&t| t == cfg.eos_token_id)
            .map_or(gen_end, |p| p + prefix);
        let mut shown = generation.tokens[mem_len..cut].to_vec();
        shown.extend(&generation.tokens[gen_end..]);
        generation.text = self.decode(&shown)?;
        generation.timings.tokenize_ms = tokenize_ms;
        generation.timings.decode_ms = t_dec.elapsed().as_secs_f64() * 1e3;
        generation.timings.total_ms = t_start.elapsed().as_secs_f64() * 1e3;
        Ok(generation)
    }

    /// A distilled student learned to sample in `student_steps`: with more
    /// steps it still runs, but its targets came from a teacher's larger
    /// steps, so it is outside what it was trained for (the teacher is the
    /// model for many-step sampling). Documented in the README; a warning,
    /// not an error.
    fn steps_warning(&self, steps: usize) -> Option<String> {
        let n = self.info.student_steps?;
        (steps > n).then(|| {
            format!(
                "this model was distilled for {n} sampling steps; {steps} steps run it outside what it was \
                 trained for (use its teacher for many-step sampling)"
            )
        })
    }

    /// The text of every token id alone (special tokens: empty), decoded once.
    fn token_bytes(&self) -> Result<&[Vec<u8>]> {
        if let Some(b) = self.token_bytes.get() {
            return Ok(b);
        }
        let tok = self.tokenizer.as_ref().ok_or_else(|| {
            Error::Tokenizer(format!("no tokenizer.json next to the model ({})", self.tokenizer_path.display()))
        })?;
        let bytes = (0..self.config.vocab_size as u32)
            .map(|id| tok.decode(&[id], true).map(String::into_bytes).unwrap_or_default())
            .collect();
        Ok(self.token_bytes.get_or_init(|| bytes))
    }

    /// The token sequences that spell `words` on a canvas: after a space
    /// (how a word appears mid-sentence) and, for banned words, also alone
    /// (glued to what precedes it). A required word is not satisfied by its
    /// bare spelling, which mostly matches inside other words ("elegarden").
    fn spellings(&self, words: &[String], kind: sampler::constraints::Kind) -> Result<Vec<Vec<u32>>> {
        let mut out: Vec<Vec<u32>> = vec![];
        for w in words {
            let forms = match kind {
                sampler::constraints::Kind::Banned => vec![format!(" {w}"), w.clone()],
                sampler::constraints::Kind::Required => vec![format!(" {w}")],
                sampler::constraints::Kind::ValidJson | sampler::constraints::Kind::Regex => vec![],
            };
            for text in forms {
                let ids = self.encode(&text)?;
                if ids.contains(&self.config.mask_token_id) {
                    return crate::input_err!("constraint word {w:?} contains the mask token");
                }
                if !ids.is_empty() && !out.contains(&ids) {
                    out.push(ids);
                }
            }
        }
        Ok(out)
    }

    /// Generates on a token canvas: every `mask_token_id` is filled, every
    /// other token is kept (infilling anywhere).
    pub fn generate_tokens(
        &self,
        canvas: Vec<u32>,
        opts: &SamplerOptions,
        on_step: &mut (dyn FnMut(Progress) + Send),
    ) -> Result<Generation> {
        // One snapshot for the whole generation: adapter swaps meanwhile
        // apply to the next generation, never halfway through this one.
        self.run_tokens(self.snapshot(), canvas, opts, vec![], on_step)
    }

    /// The active ControlNets of `rt` with this generation's inputs: an input
    /// for a net that is not active is an error, an active net without an
    /// input is skipped with a warning. `text_len` is the text canvas length
    /// a token control is laid over; `image` whether the canvas has an image.
    pub(crate) fn resolve_controls(
        &self,
        rt: &Runtime,
        inputs: &BTreeMap<String, ControlInput>,
        text_len: usize,
        image: bool,
        warnings: &mut Vec<String>,
    ) -> Result<Controls> {
        let cfg = &self.config;
        if let Some(name) = inputs.keys().find(|n| !rt.controls.iter().any(|(c, _, _)| c == *n)) {
            let active: Vec<&str> = rt.controls.iter().map(|(n, _, _)| n.as_str()).collect();
            return crate::input_err!(
                "no active ControlNet named {name:?} (active: {active:?}); load it and activate it (set_controlnets)"
            );
        }
        let mut out = vec![];
        for (name, net, scale) in rt.controls.iter().filter(|c| c.2 != 0.0) {
            let value = match (net.kind, inputs.get(name)) {
                (_, None) => {
                    warnings.push(format!("ControlNet {name:?} is active but got no control input; not applied"));
                    continue;
                }
                (ControlKind::Tokens, Some(ControlInput::Text(text))) => {
                    let mut ids = self.encode(text)?;
                    if ids.len() > text_len {
                        return crate::input_err!(
                            "control {name:?}: {} tokens do not fit the {text_len}-token text canvas",
                            ids.len()
                        );
                    }
                    if ids.contains(&cfg.mask_token_id) {
                        return crate::input_err!("control {name:?} contains the mask token");
                    }
                    ids.resize(text_len, cfg.pad_token_id);
                    ControlValue::Tokens(ids)
                }
                (ControlKind::Image, Some(ControlInput::Image(px))) => {
                    if !image {
                        return crate::input_err!("control {name:?} is an image control; generate an image with it");
                    }
                    if px.len() != cfg.image_values() {
                        return crate::input_err!(
                            "control {name:?}: {} pixels, expected {} ({}x{}x{})",
                            px.len(),
                            cfg.image_values(),
                            cfg.image_channels,
                            cfg.image_size,
                            cfg.image_size
                        );
                    }
                    if let Some(bad) = px.iter().find(|v| !v.is_finite() || !(0.0..=255.0).contains(*v)) {
                        return crate::input_err!("control {name:?}: pixel {bad} is not in [0, 255]");
                    }
                    ControlValue::Image(px.iter().map(|v| v / 127.5 - 1.0).collect())
                }
                (kind, Some(_)) => {
                    let want = if kind == ControlKind::Tokens { "text" } else { "an image" };
                    return crate::input_err!("control {name:?} is a {} ControlNet: give it {want}", kind.name());
                }
            };
            out.push((net.clone(), *scale, value));
        }
        Ok(out)
    }

    fn run_tokens(
        &self,
        rt: Arc<Runtime>,
        canvas: Vec<u32>,
        opts: &SamplerOptions,
        controls: Controls,
        on_step: &mut (dyn FnMut(Progress) + Send),
    ) -> Result<Generation> {
        let t0 = Instant::now();
        let cfg = &self.config;
        if cfg.causal {
            return Err(Error::Config(
                "this is an autoregressive baseline (causal = true), not a diffusion model".into(),
            ));
        }
        if canvas.is_empty() || canvas.len() > cfg.max_length {
            return crate::input_err!("canvas length must be in 1..={}, got {}", cfg.max_length, canvas.len());
        }
        let given: Vec<bool> = canvas.iter().map(|&t| t != cfg.mask_token_id).collect();
        // Composition terms that name an adapter set run on this generation's
        // model (and patch) with exactly that set.
        let mut sets: Vec<(AdapterSet, Runtime)> = vec![];
        for set in opts.compose.iter().filter_map(|t| t.adapters.as_ref()) {
            if !sets.iter().any(|(s, _)| s == set) {
                sets.push((set.clone(), self.runtime_with(&rt, set)?));
            }
        }
        let den = ModelDenoiser { rt: &rt, sets, controls };
        let (s, nll) = self
            .pool
            .install(|| -> Result<_> {
                let s = sampler::sample(&den, canvas, opts, on_step)?;
                let t = Instant::now();
                let nll = uncertainty::likelihood(&den, &s.tokens, &given, opts.likelihood_samples, opts.seed)?;
                Ok((s, nll, t.elapsed().as_secs_f64() * 1e3))
            })
            .map(|(mut s, nll, ms)| {
                s.forward_ms += ms;
                (s, nll)
            })?;
        let uncertainty = uncertainty::summarize(&s, &given, nll, self.calibration.as_ref());
        Ok(Generation {
            text: String::new(),
            tokens: s.tokens,
            confidence: s.confidence,
            entropy: s.entropy,
            given,
            steps_run: s.steps_run,
            forward_passes: s.forward_passes,
            adapters: rt.lora.weights.clone(),
            patch: rt.patch.clone(),
            skills: vec![],
            warnings: self.steps_warning(opts.steps).into_iter().collect(),
            constraints: opts
                .constraints
                .iter()
                .zip(&s.constraints_met)
                .map(|(c, &met)| sampler::constraints::Outcome { kind: c.kind, words: c.words.clone(), met })
                .collect(),
            timings: Timings {
                forward_ms: s.forward_ms,
                sampler_ms: s.sampler_ms,
                total_ms: t0.elapsed().as_secs_f64() * 1e3,
                ..Default::default()
            },
            image: None,
            audio: None,
            modalities: vec![crate::model::Modality::Text],
            uncertainty,
            memories: vec![],
            memory_tokens: 0,
        })
    }
}

fn forward(
    rt: &Runtime,
    batch: &[Vec<u32>],
    sigma: Option<f32>,
    positions: Option<&[usize]>,
    controls: &Controls,
) -> Result<Vec<f32>> {
    let model = &rt.model;
    let n = batch.len();
    let l = batch.first().map_or(0, Vec::len);
    if n == 0 || l == 0 {
        return crate::input_err!("empty batch");
    }
    if batch.iter().any(|s| s.len() != l) {
        return crate::input_err!("all sequences in a batch must have the same length");
    }
    let v = model.cfg.vocab_size;
    if let Some(bad) = batch.iter().flatten().find(|&&t| t as usize >= v) {
        return crate::input_err!("token id {bad} is outside the vocabulary of {v}");
    }
    if let Some(s) = sigma {
        if !s.is_finite() {
            return crate::input_err!("sigma must be finite");
        }
    }
    let flat: Vec<u32> = batch.iter().flatten().copied().collect();
    let sigma = sigma.map(|s| vec![s; n]);
    model.logits(&flat, n, sigma.as_deref(), positions, &rt.lora, &applied(controls))
}

struct ModelDenoiser<'a> {
    rt: &'a Runtime,
    /// The adapter sets composition terms name, built once per generation.
    sets: Vec<(AdapterSet, Runtime)>,
    /// ControlNets steering every pass of this generation.
    controls: Controls,
}

/// MDLM's log-linear schedule: sigma(t) = -ln(1 - (1 - eps) t).
fn log_linear_sigma(t: f64) -> f32 {
    const EPS: f64 = 1e-3;
    (-(1.0 - (1.0 - EPS) * t).ln()) as f32
}

impl Denoiser for ModelDenoiser<'_> {
    fn vocab_size(&self) -> usize {
        self.rt.model.cfg.vocab_size
    }
    fn mask_id(&self) -> u32 {
        self.rt.model.cfg.mask_token_id
    }
    fn logits(&self, canvases: &[Vec<u32>], t: f64, positions: &[usize]) -> Result<Vec<f32>> {
        forward(self.rt, canvases, Some(log_linear_sigma(t)), Some(positions), &self.controls)
    }
    fn logits_with(&self, set: &AdapterSet, canvases: &[Vec<u32>], t: f64, positions: &[usize]) -> Result<Vec<f32>> {
        let (_, rt) =
            self.sets.iter().find(|(s, _)| s == set).ok_or_else(|| Error::Input("unknown adapter set".into()))?;
        forward(rt, canvases, Some(log_linear_sigma(t)), Some(positions), &self.controls)
    }
    fn time_conditioned(&self) -> bool {
        self.rt.model.cfg.time_conditioning
    }
}
