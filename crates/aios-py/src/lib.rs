//! Python bindings: module `aios_rt._native`, re-exported by `aios_rt`.
//! Only argument conversion lives here; all logic is in aios-core. Every call
//! that does real work releases the GIL, and panics are caught and turned into
//! `AiosError` so nothing unwinds into the interpreter.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

use aios_core::engine::{GivenAudio, GivenImage, MediaRequest};
use aios_core::format::{DType, WeightFile};
use aios_core::model::Modality;
use aios_core::quant::{self, MatmulMode};
use aios_core::sampler::continuous::{ContinuousSampler, ImageEnergy, LinearClassifier};
use aios_core::sampler::{SamplerOptions, Strategy, Term};
use aios_core::{ControlInput, Engine as CoreEngine, EngineOptions, Error, MemorySource, TextRequest};
mod memory;

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyDict, PyType};

/// The exception classes, defined in Python (`aios_rt._errors`) so that each
/// also derives from the standard class that fits (`InputError` is a
/// `ValueError`, `AiosIOError` an `OSError`) and `aios_train` shares them.
static ERRORS: PyOnceLock<[Py<PyType>; 7]> = PyOnceLock::new();
const ERROR_NAMES: [&str; 7] =
    ["AiosError", "FormatError", "ConfigError", "InputError", "TokenizerError", "AiosIOError", "NumericError"];

fn error_classes(py: Python<'_>) -> PyResult<&[Py<PyType>; 7]> {
    ERRORS.get_or_try_init(py, || {
        let m = py.import("aios_rt._errors")?;
        let get = |n: &str| -> PyResult<Py<PyType>> { Ok(m.getattr(n)?.cast_into::<PyType>()?.unbind()) };
        Ok([
            get("AiosError")?,
            get("FormatError")?,
            get("ConfigError")?,
            get("InputError")?,
            get("TokenizerError")?,
            get("AiosIOError")?,
            get("NumericError")?,
        ])
    })
}

/// An exception of class `ERROR_NAMES[i]` with `msg`.
fn error(i: usize, msg: String) -> PyErr {
    Python::attach(|py| match error_classes(py) {
        Ok(c) => PyErr::from_type(c[i].bind(py).clone(), msg),
        Err(e) => e,
    })
}

pub(crate) fn aios_error(msg: impl Into<String>) -> PyErr {
    error(0, msg.into())
}

/// `InputError(msg)`.
pub(crate) fn input_error(msg: impl Into<String>) -> PyErr {
    error(3, msg.into())
}

/// The one mapping from core errors to Python exceptions.
pub(crate) fn to_py(e: Error) -> PyErr {
    let msg = e.to_string();
    let class = match e {
        Error::Format { .. } => 1,
        Error::Config(_) => 2,
        Error::Input(_) => 3,
        Error::Tokenizer(_) => 4,
        Error::Io { .. } => 5,
        Error::Numeric(_) => 6,
        Error::Backend(_) => 0,
    };
    error(class, msg)
}

/// A filesystem path argument (str, bytes or os.PathLike). Unlike pyo3's
/// `PathBuf`, a str that the filesystem encoding cannot represent (a lone
/// surrogate) is an `InputError`, never a panic.
pub(crate) struct PyPath(pub PathBuf);

impl std::ops::Deref for PyPath {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl AsRef<std::path::Path> for PyPath {
    fn as_ref(&self) -> &std::path::Path {
        &self.0
    }
}

impl<'a, 'py> FromPyObject<'a, 'py> for PyPath {
    type Error = PyErr;

    fn extract(ob: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        let py = ob.py();
        let bad = |why: String| {
            input_error(format!("invalid path {}: {why}", ob.repr().map_or_else(|_| "?".into(), |r| r.to_string())))
        };
        let encoded = py
            .import("os")
            .and_then(|os| os.getattr("fsencode"))
            .and_then(|f| f.call1((ob,)))
            .map_err(|e| bad(e.value(py).to_string()))?;
        let bytes: Vec<u8> = encoded.extract().map_err(|e: PyErr| bad(e.value(py).to_string()))?;
        if bytes.contains(&0) {
            return Err(bad("holds a NUL byte".into()));
        }
        #[cfg(unix)]
        let path = {
            use std::os::unix::ffi::OsStringExt;
            PathBuf::from(std::ffi::OsString::from_vec(bytes))
        };
        #[cfg(not(unix))]
        let path = PathBuf::from(String::from_utf8(bytes).map_err(|e| bad(e.to_string()))?);
        Ok(PyPath(path))
    }
}

/// Runs `f` without the GIL and with panics turned into errors.
pub(crate) fn run<T: Send>(py: Python<'_>, f: impl FnOnce() -> Result<T, Error> + Send) -> PyResult<T> {
    py.detach(|| catch_unwind(AssertUnwindSafe(f)))
        .map_err(|p| {
            let what = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            aios_error(format!("internal error (please report): {what}"))
        })?
        .map_err(to_py)
}

/// A non-negative integer argument, as an `InputError` (not an
/// `OverflowError`) when it is negative, too large or not an integer.
pub(crate) fn count(v: &Bound<'_, PyAny>, name: &str) -> PyResult<usize> {
    v.extract::<u64>()
        .ok()
        .and_then(|x| usize::try_from(x).ok())
        .ok_or_else(|| input_error(format!("{name} must be a non-negative integer, got {v}")))
}

pub(crate) fn opt_count(v: Option<&Bound<'_, PyAny>>, name: &str) -> PyResult<Option<usize>> {
    v.filter(|v| !v.is_none()).map(|v| count(v, name)).transpose()
}

/// Integer arguments arrive as objects (defaults applied here) so that a
/// negative or non-integer value is an `InputError`, not an `OverflowError`.
fn count_or(v: Option<&Bound<'_, PyAny>>, default: usize, name: &str) -> PyResult<usize> {
    Ok(opt_count(v, name)?.unwrap_or(default))
}

/// Little-endian f32 bytes (how the wrapper passes arrays) -> floats.
pub(crate) fn floats(data: &[u8], what: &str) -> PyResult<Vec<f32>> {
    if !data.len().is_multiple_of(4) {
        return Err(input_error(format!("{what}: {} bytes is not a whole number of f32", data.len())));
    }
    Ok(data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

/// Floats -> little-endian f32 bytes (read with `np.frombuffer(..., "<f4")`).
pub(crate) fn f32_bytes<'py>(py: Python<'py>, v: &[f32]) -> Bound<'py, PyBytes> {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    PyBytes::new(py, &bytes)
}

const DEFAULT_LENGTH: usize = 64;
const DEFAULT_STEPS: usize = 16;

fn token_ids(v: &Bound<'_, PyAny>) -> PyResult<Vec<u32>> {
    let ids: Vec<Bound<'_, PyAny>> = v.extract().map_err(|_| input_error("tokens must be a sequence of ints"))?;
    ids.iter()
        .map(|t| t.extract::<u32>().map_err(|_| input_error(format!("token id {t} is not a valid id (0..2^32)"))))
        .collect()
}

fn parse_dtype(s: &str) -> PyResult<DType> {
    DType::parse(s).ok_or_else(|| input_error(format!("unknown dtype {s:?}; use f32, f16, bf16, int8, int4 or int2")))
}

/// The result of one generation.
#[pyclass(frozen, module = "aios_rt")]
struct Generation {
    #[pyo3(get)]
    text: String,
    #[pyo3(get)]
    tokens: Vec<u32>,
    #[pyo3(get)]
    confidence: Vec<f32>,
    #[pyo3(get)]
    entropy: Vec<f32>,
    #[pyo3(get)]
    given: Vec<bool>,
    #[pyo3(get)]
    steps_run: usize,
    #[pyo3(get)]
    forward_passes: usize,
    /// name -> weight of the adapters this generation ran with.
    #[pyo3(get)]
    adapters: HashMap<String, f32>,
    /// The tensor patch it ran on (None: the base weights).
    #[pyo3(get)]
    patch: Option<String>,
    /// Stored skills activated for it (their adapters / patch are in `adapters` / `patch`).
    #[pyo3(get)]
    skills: Vec<String>,
    /// Skill cards that matched but were skipped, and why.
    #[pyo3(get)]
    warnings: Vec<String>,
    /// Per constraint passed: {"kind": "banned" | "required", "words": [...], "met": bool}.
    constraints: Vec<aios_core::sampler::constraints::Outcome>,
    #[pyo3(get)]
    timings: HashMap<String, f64>,
    /// The generated modalities, e.g. ["text", "image"].
    #[pyo3(get)]
    modalities: Vec<&'static str>,
    /// How unsure the model was, one number (text generations; None otherwise).
    #[pyo3(get)]
    uncertainty: Option<f64>,
    /// Per canvas position: 1 - p(committed token) at commit, 0 for given tokens.
    #[pyo3(get)]
    token_uncertainty: Option<Vec<f32>>,
    /// The components of `uncertainty` (entropy, surprisal, changes, lateness, nll).
    #[pyo3(get)]
    uncertainty_parts: Option<HashMap<String, f64>>,
    /// `uncertainty` above the model's calibrated threshold (None: no calibration).
    #[pyo3(get)]
    should_evolve: Option<bool>,
    /// The memories that conditioned this generation, most relevant first.
    #[pyo3(get)]
    memories: Vec<UsedMemory>,
    /// Canvas positions in front of the prompt that hold the memories.
    #[pyo3(get)]
    memory_tokens: usize,
    image: Option<aios_core::engine::ImageOut>,
    audio: Option<aios_core::engine::AudioOut>,
}

/// Text constraint: none of `words` may appear in the generated text. An
/// energy on each step's logits (`weight` = eta, the logit penalty of a token
/// that would complete a banned word); `g.constraints` says whether it held.
#[pyclass(frozen, module = "aios_rt", get_all)]
#[derive(Clone)]
struct Banned {
    words: Vec<String>,
    weight: f64,
}

#[pymethods]
impl Banned {
    #[new]
    #[pyo3(signature = (words, weight=aios_core::sampler::constraints::DEFAULT_WEIGHT))]
    fn new(words: Vec<String>, weight: f64) -> Self {
        Banned { words, weight }
    }
    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!("Banned({}, weight={:?})", self.words.clone().into_pyobject(py)?.repr()?, self.weight))
    }
}

/// Text constraint: one of `words` should appear (best effort: favours the
/// words' tokens while none is on the canvas); `g.constraints` says whether it did.
#[pyclass(frozen, module = "aios_rt", get_all)]
#[derive(Clone)]
struct Required {
    words: Vec<String>,
    weight: f64,
}

#[pymethods]
impl Required {
    #[new]
    #[pyo3(signature = (words, weight=aios_core::sampler::constraints::DEFAULT_WEIGHT))]
    fn new(words: Vec<String>, weight: f64) -> Self {
        Required { words, weight }
    }
    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!("Required({}, weight={:?})", self.words.clone().into_pyobject(py)?.repr()?, self.weight))
    }
}

/// Text constraint: "valid JSON so far". The text after [BOS] (the prompt
/// included) must stay a prefix of a JSON value: tokens that cannot continue
/// the committed text, and an end before the value is whole, get energy 1;
/// after the end only end tokens fit. While a grammar (ValidJson, Regex) is
/// active the sampler commits left to right (each step's tokens at the
/// leftmost masked positions, each steered given the ones before it);
/// `g.constraints` says whether the text is one whole JSON value. `weight`
/// (eta) defaults to 30: a token that breaks the grammar drops by e^30.
#[pyclass(frozen, module = "aios_rt", get_all)]
#[derive(Clone)]
struct ValidJson {
    weight: f64,
}

#[pymethods]
impl ValidJson {
    #[new]
    #[pyo3(signature = (weight=aios_core::sampler::constraints::GRAMMAR_WEIGHT))]
    fn new(weight: f64) -> Self {
        ValidJson { weight }
    }
    fn __repr__(&self) -> String {
        format!("ValidJson(weight={:?})", self.weight)
    }
}

/// Text constraint: "matches the pattern so far". `pattern` is a regular
/// expression (Rust `regex` syntax) the whole text after [BOS], the prompt
/// included, should match: tokens that cannot continue a match, and an end
/// before the match is whole, get energy 1 (the same rule and left-to-right
/// commits and default weight 30 as ValidJson, with a DFA for the grammar). The pattern is
/// compiled here: a bad or oversized one raises ValueError.
#[pyclass(frozen, module = "aios_rt")]
#[derive(Clone)]
struct Regex {
    regex: std::sync::Arc<aios_core::sampler::regex_prefix::RegexPrefix>,
    #[pyo3(get)]
    weight: f64,
}

#[pymethods]
impl Regex {
    #[new]
    #[pyo3(signature = (pattern, weight=aios_core::sampler::constraints::GRAMMAR_WEIGHT))]
    fn new(pattern: &str, weight: f64) -> PyResult<Self> {
        let regex = aios_core::sampler::regex_prefix::RegexPrefix::new(pattern).map_err(to_py)?;
        Ok(Regex { regex: std::sync::Arc::new(regex), weight })
    }
    /// The pattern's source text.
    #[getter]
    fn pattern(&self) -> &str {
        self.regex.pattern()
    }
    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!("Regex({}, weight={:?})", self.regex.pattern().into_pyobject(py)?.repr()?, self.weight))
    }
}

/// Image energy: the mean brightness of `region` = (x0, y0, x1, y1), in
/// pixels, end exclusive, should be `target` (0 black .. 1 white). Each
/// denoising step moves the image estimate by `-weight * grad E` (weight 1
/// puts the estimate's mean on the target every step).
#[pyclass(frozen, module = "aios_rt", get_all)]
#[derive(Clone)]
struct Brightness {
    region: (usize, usize, usize, usize),
    target: f32,
    weight: f64,
}

#[pymethods]
impl Brightness {
    #[new]
    #[pyo3(signature = (region, target, weight=1.0))]
    fn new(region: (usize, usize, usize, usize), target: f32, weight: f64) -> Self {
        Brightness { region, target, weight }
    }
    fn __repr__(&self) -> String {
        format!("Brightness(region={:?}, target={:?}, weight={:?})", self.region, self.target, self.weight)
    }
}

/// Image energy: `E = -log p(label | image)` under a linear image classifier
/// (`aios.kind = classifier`, e.g. `models/aios-unified-tiny/fashion.classifier.parquet`
/// from `python -m aios_train classifier`); `label` is a class name or index.
/// Each denoising step moves the image estimate by `-weight * grad E`.
#[pyclass(frozen, module = "aios_rt", get_all)]
#[derive(Clone)]
struct ClassEnergy {
    classifier: PathBuf,
    label: String,
    weight: f64,
}

#[pymethods]
impl ClassEnergy {
    #[new]
    #[pyo3(signature = (classifier, label, weight=1.0))]
    fn new(classifier: PyPath, label: &Bound<'_, PyAny>, weight: f64) -> PyResult<Self> {
        let label = match label.extract::<usize>() {
            Ok(i) => i.to_string(),
            Err(_) => label.extract::<String>().map_err(|_| input_error("label must be a class name or index"))?,
        };
        Ok(ClassEnergy { classifier: classifier.to_path_buf(), label, weight })
    }
    fn __repr__(&self) -> String {
        format!("ClassEnergy(classifier={:?}, label={:?}, weight={:?})", self.classifier, self.label, self.weight)
    }
}

/// Audio energy: the mean level of the log-mel frames `frames` = (f0, f1),
/// end exclusive, should be `target_db`, in dB of the mel magnitude (the
/// features' floor is -100 dB, full scale 0). Each denoising step moves the
/// sound's estimate by `-weight * grad E` (weight 1 puts the span's mean on
/// the target every step).
#[pyclass(frozen, module = "aios_rt", get_all)]
#[derive(Clone)]
struct Loudness {
    frames: (usize, usize),
    target_db: f32,
    weight: f64,
}

#[pymethods]
impl Loudness {
    #[new]
    #[pyo3(signature = (frames, target_db, weight=1.0))]
    fn new(frames: (usize, usize), target_db: f32, weight: f64) -> Self {
        Loudness { frames, target_db, weight }
    }
    fn __repr__(&self) -> String {
        format!("Loudness(frames={:?}, target_db={:?}, weight={:?})", self.frames, self.target_db, self.weight)
    }
}

/// `constraints=`: a list of Banned / Required / ValidJson / Regex (text), Brightness / ClassEnergy (image) and
/// Loudness (audio), parsed once.
#[derive(Default)]
struct Constraints {
    text: Vec<aios_core::sampler::constraints::Constraint>,
    image: Vec<aios_core::sampler::continuous::ImageEnergy>,
    audio: Vec<aios_core::sampler::continuous::Loudness>,
}

impl<'a, 'py> FromPyObject<'a, 'py> for Constraints {
    type Error = PyErr;

    fn extract(ob: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        use aios_core::sampler::constraints::{Constraint, Kind};
        let items: Vec<Bound<'py, PyAny>> = ob.extract().map_err(|_| {
            input_error(
                "constraints must be a list of aios_rt.Banned / aios_rt.Required / aios_rt.ValidJson / aios_rt.Regex / \
                 aios_rt.Brightness / aios_rt.ClassEnergy / aios_rt.Loudness",
            )
        })?;
        let mut out = Constraints::default();
        for it in &items {
            if let Ok(b) = it.cast::<Banned>() {
                let b = b.get();
                out.text.push(Constraint::new(Kind::Banned, b.words.clone(), b.weight));
            } else if let Ok(r) = it.cast::<Required>() {
                let r = r.get();
                out.text.push(Constraint::new(Kind::Required, r.words.clone(), r.weight));
            } else if let Ok(j) = it.cast::<ValidJson>() {
                out.text.push(Constraint::new(Kind::ValidJson, vec![], j.get().weight));
            } else if let Ok(r) = it.cast::<Regex>() {
                let r = r.get();
                out.text.push(Constraint::regex(r.regex.clone(), r.weight));
            } else if let Ok(b) = it.cast::<Brightness>() {
                let b = b.get();
                let (x0, y0, x1, y1) = b.region;
                out.image.push(ImageEnergy::Brightness(aios_core::sampler::continuous::Brightness {
                    rect: [x0, y0, x1, y1],
                    target: b.target,
                    weight: b.weight,
                }));
            } else if let Ok(c) = it.cast::<ClassEnergy>() {
                let c = c.get();
                let classifier = LinearClassifier::load(&c.classifier).map_err(to_py)?;
                let class = classifier.class_index(&c.label).map_err(to_py)?;
                out.image.push(ImageEnergy::Class(aios_core::sampler::continuous::ClassEnergy {
                    classifier: std::sync::Arc::new(classifier),
                    class,
                    weight: c.weight,
                }));
            } else if let Ok(l) = it.cast::<Loudness>() {
                let l = l.get();
                out.audio.push(aios_core::sampler::continuous::Loudness {
                    frames: [l.frames.0, l.frames.1],
                    target_db: l.target_db,
                    weight: l.weight,
                });
            } else {
                return Err(input_error(format!(
                    "unknown constraint {}; use aios_rt.Banned, aios_rt.Required, aios_rt.ValidJson, aios_rt.Regex, \
                     aios_rt.Brightness, aios_rt.ClassEnergy or aios_rt.Loudness",
                    it.get_type()
                )));
            }
        }
        Ok(out)
    }
}

/// A memory that conditioned a generation.
#[pyclass(frozen, module = "aios_rt", get_all)]
#[derive(Clone)]
struct UsedMemory {
    /// Its id in the store (None for memories passed in `memories=`).
    id: Option<u64>,
    /// Cosine similarity to the prompt (None for memories passed in).
    score: Option<f32>,
    text: String,
    /// How many of its tokens fitted on the canvas.
    tokens: usize,
}

#[pymethods]
impl UsedMemory {
    fn __repr__(&self) -> String {
        let score = self.score.map_or("None".to_string(), |s| format!("{s:.3}"));
        format!("UsedMemory(id={:?}, score={score}, tokens={}, text={:?})", self.id, self.tokens, self.text)
    }
}

/// A numpy array of `bytes` read as `dtype`, reshaped to `shape` (a writable copy).
fn numpy_array<'py>(py: Python<'py>, bytes: &[u8], dtype: &str, shape: Vec<usize>) -> PyResult<Bound<'py, PyAny>> {
    let np = py.import("numpy")?;
    np.call_method1("frombuffer", (PyBytes::new(py, bytes), dtype))?
        .call_method1("reshape", (shape,))?
        .call_method0("copy")
}

#[pymethods]
impl Generation {
    fn __repr__(&self) -> String {
        format!(
            "Generation(modalities={:?}, text={:?}, tokens={}, steps_run={}, total_ms={:.1})",
            self.modalities,
            self.text,
            self.tokens.len(),
            self.steps_run,
            self.timings.get("total_ms").copied().unwrap_or(0.0)
        )
    }

    /// The generated image as numpy uint8 `[H, W]` (one channel) or `[C, H, W]`; None without one.
    #[getter]
    fn image<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        let Some(img) = &self.image else { return Ok(None) };
        let shape = if img.channels == 1 { vec![img.size, img.size] } else { vec![img.channels, img.size, img.size] };
        numpy_array(py, &img.pixels, "u1", shape).map(Some)
    }

    /// The generated waveform as numpy float32 `[n]` in [-1, 1]; None without audio.
    #[getter]
    fn audio<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        let Some(a) = &self.audio else { return Ok(None) };
        let bytes: Vec<u8> = a.samples.iter().flat_map(|x| x.to_le_bytes()).collect();
        numpy_array(py, &bytes, "<f4", vec![a.samples.len()]).map(Some)
    }

    /// The generated normalised log-mel spectrogram, numpy float32 `[frames, mels]`.
    #[getter]
    fn log_mel<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        let Some(a) = &self.audio else { return Ok(None) };
        let bytes: Vec<u8> = a.log_mel.iter().flat_map(|x| x.to_le_bytes()).collect();
        numpy_array(py, &bytes, "<f4", vec![a.log_mel.len() / a.mels, a.mels]).map(Some)
    }

    /// Per constraint passed: {"kind": "banned" | "required", "words": [...], "met": bool}.
    #[getter]
    fn constraints<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        self.constraints
            .iter()
            .map(|c| {
                let d = PyDict::new(py);
                d.set_item("kind", c.kind.name())?;
                d.set_item("words", c.words.clone())?;
                d.set_item("met", c.met)?;
                Ok(d)
            })
            .collect()
    }

    /// Sample rate of `audio` in Hz (None without audio).
    #[getter]
    fn sample_rate(&self) -> Option<usize> {
        self.audio.as_ref().map(|a| a.sample_rate)
    }

    /// Writes the output whose kind the extension names: `.png` (image),
    /// `.wav` (audio) or `.txt` (text). Written to a temporary file and
    /// renamed, so a failure leaves nothing behind (`AiosIOError`).
    fn save(&self, py: Python<'_>, path: PyPath) -> PyResult<()> {
        let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).unwrap_or_default();
        let (image, audio, text) = (self.image.clone(), self.audio.clone(), self.text.clone());
        run(py, move || aios_core::engine::save_output(&path, &ext, image.as_ref(), audio.as_ref(), &text))
    }
}

impl From<aios_core::Generation> for Generation {
    fn from(g: aios_core::Generation) -> Self {
        let t = &g.timings;
        let timings = HashMap::from([
            ("tokenize_ms".to_string(), t.tokenize_ms),
            ("forward_ms".to_string(), t.forward_ms),
            ("sampler_ms".to_string(), t.sampler_ms),
            ("decode_ms".to_string(), t.decode_ms),
            ("total_ms".to_string(), t.total_ms),
        ]);
        let u = g.uncertainty;
        let parts = u.as_ref().map(|u| {
            aios_core::sampler::uncertainty::COMPONENTS
                .iter()
                .zip(u.parts.values())
                .filter_map(|(n, v)| v.map(|v| (n.to_string(), v)))
                .collect()
        });
        Generation {
            memories: g
                .memories
                .into_iter()
                .map(|m| UsedMemory { id: m.id, score: m.score, text: m.text, tokens: m.tokens })
                .collect(),
            memory_tokens: g.memory_tokens,
            uncertainty: u.as_ref().map(|u| u.scalar),
            should_evolve: u.as_ref().and_then(|u| u.should_evolve),
            uncertainty_parts: parts,
            token_uncertainty: u.map(|u| u.token),
            text: g.text,
            tokens: g.tokens,
            confidence: g.confidence,
            entropy: g.entropy,
            given: g.given,
            steps_run: g.steps_run,
            forward_passes: g.forward_passes,
            adapters: g.adapters.into_iter().collect(),
            patch: g.patch,
            skills: g.skills,
            warnings: g.warnings,
            constraints: g.constraints,
            timings,
            modalities: g.modalities.iter().map(|m| m.name()).collect(),
            image: g.image,
            audio: g.audio,
        }
    }
}

/// A loaded model. Thread-safe: several Python threads may generate at once.
#[pyclass(frozen, subclass, module = "aios_rt")]
struct Engine {
    inner: CoreEngine,
}

/// `modality=`: one name or a list of names, parsed once.
struct Modalities(Vec<Modality>);

impl<'a, 'py> FromPyObject<'a, 'py> for Modalities {
    type Error = PyErr;

    fn extract(ob: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        let names: Vec<String> = if let Ok(s) = ob.extract::<String>() {
            s.split(',').map(|p| p.trim().to_string()).collect()
        } else {
            ob.extract().map_err(|_| input_error("modality must be a string or a list of strings"))?
        };
        let mut ms = names.iter().map(|n| Modality::parse(n)).collect::<Result<Vec<_>, _>>().map_err(to_py)?;
        ms.sort();
        ms.dedup();
        if ms.is_empty() {
            return Err(input_error("modality must name at least one of text, image, audio"));
        }
        Ok(Modalities(ms))
    }
}

/// `sampler=`: a text strategy or a continuous sampler, parsed once.
enum SamplerChoice {
    Text(Strategy),
    Continuous(ContinuousSampler),
}

impl<'a, 'py> FromPyObject<'a, 'py> for SamplerChoice {
    type Error = PyErr;

    fn extract(ob: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        let s: String = ob.extract().map_err(|_| input_error("sampler must be a string"))?;
        if let Ok(c) = ContinuousSampler::parse(&s) {
            return Ok(SamplerChoice::Continuous(c));
        }
        Strategy::parse(&s).map(SamplerChoice::Text).map_err(|_| {
            input_error(format!(
                "unknown sampler {s:?}; text: {}; image/audio: {}",
                Strategy::NAMES.join(", "),
                ContinuousSampler::NAMES.join(", ")
            ))
        })
    }
}

/// `numpy.asarray(v)` with its dtype kind ('u', 'i', 'f', 'b', ...), shape and
/// values as f64 (NaN kept, for the caller to refuse).
fn array_values(v: &Bound<'_, PyAny>, what: &str) -> PyResult<(char, Vec<usize>, Vec<f64>)> {
    let py = v.py();
    let np = py.import("numpy")?;
    let a = np.call_method1("asarray", (v,)).map_err(|e| input_error(format!("{what}: not an array: {e}")))?;
    let kind: String = a.getattr("dtype")?.getattr("kind")?.extract()?;
    let shape: Vec<usize> = a.getattr("shape")?.extract()?;
    let kind = kind.chars().next().unwrap_or('?');
    if !matches!(kind, 'u' | 'i' | 'f' | 'b') {
        return Err(input_error(format!(
            "{what}: unsupported dtype {} (use uint8, float or bool)",
            a.getattr("dtype")?
        )));
    }
    let flat = a.call_method1("astype", ("<f8",))?.call_method0("ravel")?.call_method0("tobytes")?;
    let bytes: Vec<u8> = flat.extract()?;
    Ok((kind, shape, bytes.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes"))).collect()))
}

/// Image pixels in [0, 255]: uint8 as is, floats in [0, 1] scaled.
fn image_pixels(v: &Bound<'_, PyAny>) -> PyResult<Vec<f32>> {
    let (kind, shape, vals) = array_values(v, "image")?;
    if !(shape.len() == 2 || shape.len() == 3) {
        return Err(input_error(format!("image must be [H, W] or [C, H, W], got shape {shape:?}")));
    }
    match kind {
        'u' if vals.iter().all(|&x| x <= 255.0) => Ok(vals.iter().map(|&x| x as f32).collect()),
        'f' => {
            if vals.iter().any(|x| !x.is_finite()) {
                return Err(input_error("image contains NaN or infinity"));
            }
            if vals.iter().any(|&x| !(0.0..=1.0).contains(&x)) {
                return Err(input_error("a float image must hold values in [0, 1] (or pass uint8 pixels)"));
            }
            Ok(vals.iter().map(|&x| (x * 255.0) as f32).collect())
        }
        _ => Err(input_error("image must be uint8 pixels or floats in [0, 1]")),
    }
}

fn waveform(v: &Bound<'_, PyAny>) -> PyResult<Vec<f32>> {
    let (kind, shape, vals) = array_values(v, "audio")?;
    if shape.len() != 1 || kind != 'f' {
        return Err(input_error(format!("audio must be a 1-D float waveform, got shape {shape:?}")));
    }
    if vals.iter().any(|x| !x.is_finite()) {
        return Err(input_error("audio contains NaN or infinity"));
    }
    Ok(vals.iter().map(|&x| x as f32).collect())
}

fn bool_mask(v: Option<&Bound<'_, PyAny>>, what: &str) -> PyResult<Option<Vec<bool>>> {
    let Some(v) = v.filter(|v| !v.is_none()) else { return Ok(None) };
    let (kind, _, vals) = array_values(v, what)?;
    if !(kind == 'b' || vals.iter().all(|&x| x == 0.0 || x == 1.0)) {
        return Err(input_error(format!("{what} must be boolean (true = known)")));
    }
    Ok(Some(vals.iter().map(|&x| x != 0.0).collect()))
}

/// `compose=`: {"full": w, "no_memory": w, "unconditional": w, "full@name": w,
/// "full@none": w, ...}, parsed once (terms in key order, so the sum is
/// computed in the same order on every call).
struct Compose(Vec<Term>);

impl<'a, 'py> FromPyObject<'a, 'py> for Compose {
    type Error = PyErr;

    fn extract(ob: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        let d: std::collections::BTreeMap<String, f64> = ob.extract().map_err(|_| {
            input_error("compose must be a dict of view name -> weight, e.g. {\"full\": 1.5, \"no_memory\": -0.5}")
        })?;
        let terms = d.iter().map(|(k, &w)| Term::parse(k, w).map_err(to_py)).collect::<PyResult<Vec<_>>>()?;
        Ok(Compose(terms))
    }
}

/// `control={name: input}`: a str for a token ControlNet, an image
/// (uint8 pixels or floats in [0, 1], `[H, W]` or `[C, H, W]`) for an image one.
#[derive(Default)]
struct Controls(std::collections::BTreeMap<String, ControlInput>);

impl<'a, 'py> FromPyObject<'a, 'py> for Controls {
    type Error = PyErr;

    fn extract(ob: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        let d: std::collections::BTreeMap<String, Bound<'py, PyAny>> =
            ob.extract().map_err(|_| input_error("control must be a dict of ControlNet name -> text or image"))?;
        let mut out = std::collections::BTreeMap::new();
        for (name, v) in d {
            let input = match v.extract::<String>() {
                Ok(text) => ControlInput::Text(text),
                Err(_) => ControlInput::Image(image_pixels(&v)?),
            };
            out.insert(name, input);
        }
        Ok(Controls(out))
    }
}

#[allow(clippy::too_many_arguments)]
fn sampler_options(
    strategy: Strategy,
    steps: Option<&Bound<'_, PyAny>>,
    seed: Option<&Bound<'_, PyAny>>,
    block_length: Option<&Bound<'_, PyAny>>,
    guidance: f64,
    temperature: f64,
    top_p: f64,
    threshold: f64,
    likelihood_samples: Option<&Bound<'_, PyAny>>,
    compose: Option<Compose>,
) -> PyResult<SamplerOptions> {
    let o = SamplerOptions {
        strategy,
        steps: count_or(steps, DEFAULT_STEPS, "steps")?,
        temperature,
        top_p,
        block_length: opt_count(block_length, "block_length")?,
        guidance,
        threshold,
        seed: match seed.filter(|s| !s.is_none()) {
            None => 0,
            Some(s) => {
                s.extract::<u64>().map_err(|_| input_error(format!("seed must be an integer in 0..2^64, got {s}")))?
            }
        },
        likelihood_samples: count_or(
            likelihood_samples,
            aios_core::sampler::uncertainty::DEFAULT_LIKELIHOOD_SAMPLES,
            "likelihood_samples",
        )?,
        compose: compose.map(|c| c.0).unwrap_or_default(),
        memory_prefix: 0,
        constraints: vec![],
    };
    o.validate().map_err(to_py)?;
    Ok(o)
}

/// Cosine a skill card needs with the prompt to activate its skill (MiniLM
/// scores related paraphrases ~0.5-0.8 and unrelated text below ~0.3).
const DEFAULT_SKILL_THRESHOLD: f32 = 0.45;

/// The core store behind an `aios_rt.MemoryStore` (or its native object).
fn memory_store(v: Option<&Bound<'_, PyAny>>) -> PyResult<Option<std::sync::Arc<aios_core::memory::MemoryStore>>> {
    let Some(v) = v.filter(|v| !v.is_none()) else { return Ok(None) };
    let native = if v.hasattr("_native")? { v.getattr("_native")? } else { v.clone() };
    let store = native
        .cast::<memory::MemoryStore>()
        .map_err(|_| input_error(format!("memory must be an aios_rt.MemoryStore, got {}", v.get_type())))?;
    Ok(Some(store.get().inner.clone()))
}

#[pymethods]
impl Engine {
    #[new]
    #[pyo3(signature = (path, threads=None, dtype=None, matmul="auto", memory=None, skills=None,
                        skill_threshold=DEFAULT_SKILL_THRESHOLD))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        path: PyPath,
        threads: Option<&Bound<'_, PyAny>>,
        dtype: Option<&str>,
        matmul: &str,
        memory: Option<&Bound<'_, PyAny>>,
        skills: Option<&Bound<'_, PyAny>>,
        skill_threshold: f32,
    ) -> PyResult<Self> {
        let store = memory_store(memory)?;
        let skills = memory_store(skills)?;
        let threads = opt_count(threads, "threads")?;
        let matmul = MatmulMode::parse(matmul).ok_or_else(|| {
            input_error(format!("unknown matmul mode {matmul:?}; use auto, int8, dequantize or quantized"))
        })?;
        let opts = EngineOptions { threads, dtype: dtype.map(parse_dtype).transpose()?, matmul };
        let inner = run(py, || CoreEngine::open(&path, &opts))?;
        inner.set_memory(store);
        inner.set_skills(skills, skill_threshold).map_err(to_py)?;
        Ok(Engine { inner })
    }

    /// Attaches the skills store (an `aios_rt.MemoryStore` of skill cards at
    /// `<skills>/cards`, written by `aios_train.evolution.Evolver`; None
    /// detaches it). Every later text generation activates the skills whose
    /// cards reach `threshold` (MiniLM cosine with the prompt): `g.skills`,
    /// with their adapters in `g.adapters` and patch in `g.patch`.
    #[pyo3(signature = (skills, threshold=DEFAULT_SKILL_THRESHOLD))]
    fn set_skills(&self, skills: Option<&Bound<'_, PyAny>>, threshold: f32) -> PyResult<()> {
        self.inner.set_skills(memory_store(skills)?, threshold).map_err(to_py)
    }

    /// What `prompt` would activate from the skills store, without
    /// generating: {"skills": [...], "adapters": {name: weight}, "patch":
    /// name or None, "controlnets": [...], "warnings": [...]} (files load on
    /// first use; an L1 ControlNet skill reads the prompt as its input).
    fn skills_for<'py>(&self, py: Python<'py>, prompt: &str) -> PyResult<Bound<'py, PyDict>> {
        let m = run(py, || self.inner.match_skills(prompt))?;
        let d = PyDict::new(py);
        d.set_item("skills", m.names)?;
        d.set_item("adapters", m.adapters.into_iter().collect::<HashMap<_, _>>())?;
        d.set_item("patch", m.patch)?;
        d.set_item("controlnets", m.controlnets)?;
        d.set_item("warnings", m.warnings)?;
        Ok(d)
    }

    /// Whether a skills store is attached.
    #[getter]
    fn has_skills(&self) -> bool {
        self.inner.skills_store().is_some()
    }

    /// Attaches the `aios_rt.MemoryStore` that `diffuse(memory_k=...)` searches
    /// (None detaches it). Generations already running keep the old one.
    #[pyo3(signature = (memory))]
    fn set_memory(&self, memory: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        self.inner.set_memory(memory_store(memory)?);
        Ok(())
    }

    /// Whether a memory store is attached.
    #[getter]
    fn has_memory(&self) -> bool {
        self.inner.memory().is_some()
    }

    /// Generates from a prompt. `modality` is what to generate: "text",
    /// "image", "audio" or a list of them (generated together, one canvas).
    /// For text, `length` is the whole canvas (prompt included). `sampler`
    /// is a text strategy or a continuous one ("ddim", "ddpm", or "lcm" for
    /// a consistency-distilled student, an LCM-LoRA). `image` / `audio` are
    /// given media (numpy: uint8 pixels `[H, W]` / `[C, H, W]` or
    /// floats in [0, 1]; a float waveform at the model's sample rate); with a
    /// mask (true = known) they are inpainted, without one they condition
    /// (captioning). `text_length` sizes the text segment of a media canvas.
    /// Text only: `memory_k` conditions on the top-k memories of the engine's
    /// store for the prompt, `memories` on given texts (`g.memories` lists
    /// them); `g.uncertainty` / `g.should_evolve` report how unsure the model
    /// was, with `likelihood_samples` extra forward passes (default 4).
    /// `compose` mixes the logits of several views of the canvas per step,
    /// e.g. `{"full": 1 + w, "no_memory": -w}` (memory guidance) or
    /// `{"full": 1 + w, "unconditional": -w}` (= `guidance=w`); weights sum to 1.
    /// `adapters` ({name: weight} of loaded adapters) replaces the engine's
    /// active set for this call only; `skills=False` skips the skills store.
    /// `constraints` ([aios_rt.Banned([...]), aios_rt.Required([...]),
    /// aios_rt.ValidJson(), aios_rt.Regex(pattern)]) are
    /// energies on each step's logits; `g.constraints` says which held.
    /// For images, aios_rt.Brightness(region, target) steers a rectangle's
    /// mean brightness and aios_rt.ClassEnergy a classifier's class (`score -
    /// eta grad E` on the image estimate); for sound, aios_rt.Loudness(frames,
    /// target_db) steers a span's level.
    /// `control` ({name: input}) feeds the engine's active ControlNets: text
    /// for a token ControlNet (e.g. the keys a JSON object must have), an
    /// image for an image one (e.g. an edge map, white edges on black).
    #[pyo3(signature = (prompt="", modality=Modalities(vec![Modality::Text]), length=None, steps=None,
                        sampler=SamplerChoice::Text(Strategy::Confidence), seed=None, block_length=None,
                        guidance=0.0, temperature=1.0, top_p=1.0, threshold=0.9, suffix=None, image=None, image_mask=None, audio=None,
                        audio_mask=None, text_length=None, eta=0.0, likelihood_samples=None, memory_k=None,
                        memories=None, compose=None, adapters=None, skills=true, constraints=None, control=None))]
    #[allow(clippy::too_many_arguments)]
    fn diffuse(
        &self,
        py: Python<'_>,
        prompt: &str,
        modality: Modalities,
        length: Option<&Bound<'_, PyAny>>,
        steps: Option<&Bound<'_, PyAny>>,
        sampler: SamplerChoice,
        seed: Option<&Bound<'_, PyAny>>,
        block_length: Option<&Bound<'_, PyAny>>,
        guidance: f64,
        temperature: f64,
        top_p: f64,
        threshold: f64,
        suffix: Option<String>,
        image: Option<&Bound<'_, PyAny>>,
        image_mask: Option<&Bound<'_, PyAny>>,
        audio: Option<&Bound<'_, PyAny>>,
        audio_mask: Option<&Bound<'_, PyAny>>,
        text_length: Option<&Bound<'_, PyAny>>,
        eta: f64,
        likelihood_samples: Option<&Bound<'_, PyAny>>,
        memory_k: Option<&Bound<'_, PyAny>>,
        memories: Option<Vec<String>>,
        compose: Option<Compose>,
        adapters: Option<std::collections::BTreeMap<String, f32>>,
        skills: bool,
        constraints: Option<Constraints>,
        control: Option<Controls>,
    ) -> PyResult<Generation> {
        let control = control.unwrap_or_default().0;
        let (strategy, continuous) = match sampler {
            SamplerChoice::Text(s) => (s, ContinuousSampler::Ddim),
            SamplerChoice::Continuous(c) => (Strategy::Confidence, c),
        };
        let mut sampler = sampler_options(
            strategy,
            steps,
            seed,
            block_length,
            guidance,
            temperature,
            top_p,
            threshold,
            likelihood_samples,
            compose,
        )?;
        let Constraints { text: text_constraints, image: energies, audio: audio_energies } =
            constraints.unwrap_or_default();
        sampler.constraints = text_constraints;
        let image = image.filter(|v| !v.is_none());
        let audio = audio.filter(|v| !v.is_none());
        if modality.0 == [Modality::Text] && image.is_none() && audio.is_none() {
            if !energies.is_empty() {
                return Err(input_error("image energies (aios_rt.Brightness, aios_rt.ClassEnergy) are for generated images (modality=\"image\")"));
            }
            if !audio_energies.is_empty() {
                return Err(input_error(
                    "audio energies (aios_rt.Loudness) are for generated sound (modality=\"audio\")",
                ));
            }
            if image_mask.is_some_and(|m| !m.is_none()) || audio_mask.is_some_and(|m| !m.is_none()) {
                return Err(input_error("a mask needs the image or audio it belongs to"));
            }
            let memory = match (opt_count(memory_k, "memory_k")?, memories) {
                (Some(_), Some(_)) => {
                    return Err(input_error("pass memory_k (search the store) or memories, not both"))
                }
                (Some(k), None) => MemorySource::Search { k },
                (None, Some(m)) => MemorySource::Given(m),
                (None, None) => MemorySource::None,
            };
            let req = TextRequest {
                prompt: prompt.to_string(),
                suffix,
                length: count_or(length, DEFAULT_LENGTH, "length")?,
                sampler,
                memory,
                adapters,
                use_skills: skills,
                control,
            };
            return Ok(run(py, || self.inner.generate_text(&req, &mut |_| {}))?.into());
        }
        if memory_k.is_some_and(|m| !m.is_none()) || memories.is_some() {
            return Err(input_error("memories condition text-only generation"));
        }
        if adapters.is_some() {
            return Err(input_error("a per-call adapter set is for text-only generation (use set_adapters)"));
        }
        if suffix.is_some() {
            return Err(input_error("suffix is for text-only generation"));
        }
        let given_image = image
            .map(|img| -> PyResult<GivenImage> {
                Ok(GivenImage { pixels: image_pixels(img)?, mask: bool_mask(image_mask, "image_mask")? })
            })
            .transpose()?;
        let given_audio = audio
            .map(|a| -> PyResult<GivenAudio> {
                Ok(GivenAudio { samples: waveform(a)?, mask: bool_mask(audio_mask, "audio_mask")? })
            })
            .transpose()?;
        if given_image.is_none() && image_mask.is_some_and(|m| !m.is_none()) {
            return Err(input_error("image_mask needs an image"));
        }
        if given_audio.is_none() && audio_mask.is_some_and(|m| !m.is_none()) {
            return Err(input_error("audio_mask needs audio"));
        }
        let req = MediaRequest {
            outputs: modality.0,
            prompt: (!prompt.is_empty()).then(|| prompt.to_string()),
            text_length: opt_count(text_length.or(length), "text_length")?,
            image: given_image,
            audio: given_audio,
            sampler,
            continuous,
            eta,
            energies,
            audio_energies,
            control,
        };
        Ok(run(py, || self.inner.generate_media(&req, &mut |_| {}))?.into())
    }

    /// Generates on a token canvas: every `mask_token_id` is filled, all other
    /// tokens are kept (infilling anywhere).
    #[pyo3(signature = (tokens, steps=None, sampler="confidence", seed=None, block_length=None, guidance=0.0,
                        temperature=1.0, top_p=1.0, threshold=0.9, likelihood_samples=None, compose=None))]
    #[allow(clippy::too_many_arguments)]
    fn diffuse_tokens(
        &self,
        py: Python<'_>,
        tokens: &Bound<'_, PyAny>,
        steps: Option<&Bound<'_, PyAny>>,
        sampler: &str,
        seed: Option<&Bound<'_, PyAny>>,
        block_length: Option<&Bound<'_, PyAny>>,
        guidance: f64,
        temperature: f64,
        top_p: f64,
        threshold: f64,
        likelihood_samples: Option<&Bound<'_, PyAny>>,
        compose: Option<Compose>,
    ) -> PyResult<Generation> {
        let strategy = Strategy::parse(sampler).map_err(to_py)?;
        let opts = sampler_options(
            strategy,
            steps,
            seed,
            block_length,
            guidance,
            temperature,
            top_p,
            threshold,
            likelihood_samples,
            compose,
        )?;
        let tokens = token_ids(tokens)?;
        let mut g = run(py, || self.inner.generate_tokens(tokens, &opts, &mut |_| {}))?;
        if let Ok(text) = self.inner.decode(&g.tokens) {
            g.text = text;
        }
        Ok(g.into())
    }

    /// One forward pass over a multimodal canvas `[text | image | audio]`:
    /// `tokens` `[B, Lt]` ints, `image` `[B, C, H, W]` floats in model units
    /// ([-1, 1]) with times `t_image` `[B]` in [0, 1], `audio` `[B, frames,
    /// mels]` normalised log-mel with `t_audio`. Returns a dict of numpy
    /// arrays: "text" raw logits `[B, Lt, V]`, "image" / "audio" v-predictions.
    /// `control` ({name: input}) feeds the active ControlNets.
    #[pyo3(signature = (tokens, image=None, t_image=None, audio=None, t_audio=None, control=None))]
    #[allow(clippy::too_many_arguments)]
    fn forward_canvas<'py>(
        &self,
        py: Python<'py>,
        tokens: &Bound<'py, PyAny>,
        image: Option<&Bound<'py, PyAny>>,
        t_image: Option<Vec<f32>>,
        audio: Option<&Bound<'py, PyAny>>,
        t_audio: Option<Vec<f32>>,
        control: Option<Controls>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let control = control.unwrap_or_default().0;
        let rows: Vec<Bound<'py, PyAny>> =
            tokens.extract().map_err(|_| input_error("tokens must be a sequence of token sequences"))?;
        let rows = rows.iter().map(token_ids).collect::<PyResult<Vec<_>>>()?;
        let batch = rows.len();
        let lt = rows.first().map_or(0, Vec::len);
        if rows.iter().any(|r| r.len() != lt) {
            return Err(input_error("all token sequences must have the same length"));
        }
        let flat_tokens: Vec<u32> = rows.into_iter().flatten().collect();
        let floats_of = |v: Option<&Bound<'py, PyAny>>, what: &str| -> PyResult<Option<Vec<f32>>> {
            v.filter(|v| !v.is_none())
                .map(|v| array_values(v, what).map(|(_, _, x)| x.iter().map(|&f| f as f32).collect()))
                .transpose()
        };
        let img = floats_of(image, "image")?;
        let aud = floats_of(audio, "audio")?;
        let need_t = |x: &Option<Vec<f32>>, t: &Option<Vec<f32>>, what: &str| -> PyResult<()> {
            if x.is_some() && t.is_none() {
                return Err(input_error(format!("{what} needs its times t_{what}")));
            }
            Ok(())
        };
        need_t(&img, &t_image, "image")?;
        need_t(&aud, &t_audio, "audio")?;
        let input = aios_core::model::CanvasInput {
            batch,
            tokens: &flat_tokens,
            text_sigma: None,
            image: img.as_deref().zip(t_image.as_deref()),
            audio: aud.as_deref().zip(t_audio.as_deref()),
            text_positions: None,
            controls: &[],
        };
        let out = run(py, || self.inner.forward_canvas(&input, &control))?;
        let cfg = self.inner.config();
        let d = PyDict::new(py);
        let bytes = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
        if !out.text.is_empty() {
            d.set_item("text", numpy_array(py, &bytes(&out.text), "<f4", vec![batch, lt, cfg.vocab_size])?)?;
        }
        if !out.image.is_empty() {
            let shape = vec![batch, cfg.image_channels, cfg.image_size, cfg.image_size];
            d.set_item("image", numpy_array(py, &bytes(&out.image), "<f4", shape)?)?;
        }
        if !out.audio.is_empty() {
            let shape = vec![batch, cfg.audio_frames, cfg.audio_mels];
            d.set_item("audio", numpy_array(py, &bytes(&out.audio), "<f4", shape)?)?;
        }
        Ok(d)
    }

    /// Raw logits for a batch of equal-length sequences: `(bytes, shape)` of
    /// little-endian f32 `[n, L, V]` (the Python wrapper returns a numpy array).
    /// `control` ({name: text}) feeds the active token ControlNets.
    #[pyo3(signature = (batch, sigma=None, control=None))]
    fn logits_raw<'py>(
        &self,
        py: Python<'py>,
        batch: &Bound<'py, PyAny>,
        sigma: Option<f32>,
        control: Option<Controls>,
    ) -> PyResult<(Bound<'py, PyBytes>, Vec<usize>)> {
        let control = control.unwrap_or_default().0;
        let rows: Vec<Bound<'py, PyAny>> =
            batch.extract().map_err(|_| input_error("batch must be a sequence of token sequences"))?;
        let batch = rows.iter().map(token_ids).collect::<PyResult<Vec<_>>>()?;
        let shape = vec![batch.len(), batch.first().map_or(0, Vec::len), self.inner.config().vocab_size];
        let v = run(py, || self.inner.logits_controlled(&batch, sigma, &control))?;
        Ok((f32_bytes(py, &v), shape))
    }

    fn encode(&self, py: Python<'_>, text: &str) -> PyResult<Vec<u32>> {
        run(py, || self.inner.encode(text))
    }

    fn decode(&self, py: Python<'_>, ids: &Bound<'_, PyAny>) -> PyResult<String> {
        let ids = token_ids(ids)?;
        run(py, || self.inner.decode(&ids))
    }

    /// The model config as a JSON string.
    #[getter]
    fn config_json(&self) -> String {
        self.inner.config().to_json()
    }

    #[getter]
    fn mask_token_id(&self) -> u32 {
        self.inner.config().mask_token_id
    }

    #[getter]
    fn threads(&self) -> usize {
        self.inner.threads()
    }

    /// Loads a LoRA adapter without reloading the model; `weight` (default
    /// 1.0) activates it, `weight=None` only loads it.
    #[pyo3(signature = (path, name=None, weight=Some(1.0)))]
    fn load_adapter(
        &self,
        py: Python<'_>,
        path: PyPath,
        name: Option<String>,
        weight: Option<f32>,
    ) -> PyResult<String> {
        let name = name.unwrap_or_else(|| {
            let stem = path.file_name().map(|f| f.to_string_lossy().to_string()).unwrap_or_default();
            stem.split('.').next().unwrap_or("adapter").to_string()
        });
        run(py, || self.inner.load_adapter(&path, &name, weight))?;
        Ok(name)
    }

    fn unload_adapter(&self, py: Python<'_>, name: &str) -> PyResult<()> {
        run(py, || self.inner.unload_adapter(name))
    }

    /// Replaces the active set: {name: weight}; names not listed are inactive.
    fn set_adapters(&self, py: Python<'_>, weights: std::collections::BTreeMap<String, f32>) -> PyResult<()> {
        run(py, || self.inner.set_adapters(&weights))
    }

    /// Active adapters, name -> weight.
    #[getter]
    fn active_adapters(&self) -> HashMap<String, f32> {
        self.inner.adapters().0.into_iter().collect()
    }

    /// Every loaded adapter name.
    #[getter]
    fn loaded_adapters(&self) -> Vec<String> {
        self.inner.adapters().1
    }

    /// Loads a ControlNet (`aios.kind = controlnet`) without reloading the
    /// model, checked against it (fingerprint and config). With `scale` it is
    /// also activated; otherwise activate it with `set_controlnets`. Returns
    /// its name (default: the file name up to its first dot).
    #[pyo3(signature = (path, name=None, scale=None))]
    fn load_controlnet(
        &self,
        py: Python<'_>,
        path: PyPath,
        name: Option<String>,
        scale: Option<f32>,
    ) -> PyResult<String> {
        let name = name.unwrap_or_else(|| {
            let stem = path.file_name().map(|f| f.to_string_lossy().to_string()).unwrap_or_default();
            stem.split('.').next().unwrap_or("controlnet").to_string()
        });
        run(py, || self.inner.load_controlnet(&path, &name, scale))?;
        Ok(name)
    }

    /// Replaces the active ControlNets ({name: scale}; scale 0 = loaded but
    /// not applied). Running generations keep the set they started with.
    fn set_controlnets(&self, py: Python<'_>, scales: std::collections::BTreeMap<String, f32>) -> PyResult<()> {
        run(py, || self.inner.set_controlnets(&scales))
    }

    /// Drops a loaded ControlNet.
    fn unload_controlnet(&self, py: Python<'_>, name: &str) -> PyResult<()> {
        run(py, || self.inner.unload_controlnet(name))
    }

    /// {"active": {name: scale}, "loaded": {name: "tokens" or "image"}}.
    #[getter]
    fn controlnets<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let c = self.inner.controlnets();
        let d = PyDict::new(py);
        d.set_item("active", c.active.into_iter().collect::<HashMap<_, _>>())?;
        d.set_item("loaded", c.loaded.into_iter().map(|(n, k)| (n, k.name())).collect::<HashMap<_, _>>())?;
        Ok(d)
    }

    /// Loads a tensor patch (`aios.kind = patch`, from selective fine-tuning)
    /// without reloading the model; `activate` makes later generations run
    /// on it. Each loaded patch holds one more copy of the model in memory.
    #[pyo3(signature = (path, name=None, activate=true))]
    fn load_patch(&self, py: Python<'_>, path: PyPath, name: Option<String>, activate: bool) -> PyResult<String> {
        let name = name.unwrap_or_else(|| {
            let stem = path.file_name().map(|f| f.to_string_lossy().to_string()).unwrap_or_default();
            stem.split('.').next().unwrap_or("patch").to_string()
        });
        run(py, || self.inner.load_patch(&path, &name, activate))?;
        Ok(name)
    }

    /// Runs later generations on the loaded patch `name`, or with None on the base weights.
    #[pyo3(signature = (name))]
    fn set_patch(&self, py: Python<'_>, name: Option<String>) -> PyResult<()> {
        run(py, || self.inner.set_patch(name.as_deref()))
    }

    /// Drops a loaded patch (the base weights are back if it was active).
    fn unload_patch(&self, py: Python<'_>, name: &str) -> PyResult<()> {
        run(py, || self.inner.unload_patch(name))
    }

    /// The active patch's name (None: the base weights).
    #[getter]
    fn active_patch(&self) -> Option<String> {
        self.inner.patches().0
    }

    /// Every loaded patch name.
    #[getter]
    fn loaded_patches(&self) -> Vec<String> {
        self.inner.patches().1
    }

    /// Merges the active adapters into f32 weights; `unfuse` restores them exactly.
    fn fuse(&self, py: Python<'_>) -> PyResult<()> {
        run(py, || self.inner.fuse())
    }

    fn unfuse(&self, py: Python<'_>) -> PyResult<()> {
        run(py, || self.inner.unfuse())
    }

    #[getter]
    fn fused(&self) -> bool {
        self.inner.is_fused()
    }

    /// `aios.fingerprint` of the weights (adapters name the base they fit).
    #[getter]
    fn fingerprint(&self) -> Option<String> {
        self.inner.fingerprint().map(str::to_string)
    }

    /// File, size, stored dtypes, parameter split, and for a distilled student the
    /// sampling steps it was distilled for (`student_steps`, else None).
    #[getter]
    fn info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let i = self.inner.info();
        let d = PyDict::new(py);
        d.set_item("path", i.path.display().to_string())?;
        d.set_item("file_bytes", i.file_bytes)?;
        d.set_item("backbone_params", i.backbone_params)?;
        d.set_item("head_params", i.head_params())?;
        let heads: HashMap<&str, usize> = i.heads.iter().map(|(m, n)| (m.name(), *n)).collect();
        d.set_item("heads", heads)?;
        let dtypes: HashMap<String, (usize, usize)> =
            i.dtypes.iter().map(|(dt, n, p)| (dt.as_str().to_string(), (*n, *p))).collect();
        d.set_item("dtypes", dtypes)?;
        d.set_item("student_steps", i.student_steps)?;
        Ok(d)
    }
}

/// Quantises little-endian f32 `data` of `shape` into `dtype`'s bytes.
#[pyfunction]
fn quantize<'py>(py: Python<'py>, data: &[u8], shape: Vec<usize>, dtype: &str) -> PyResult<Bound<'py, PyBytes>> {
    let d = parse_dtype(dtype)?;
    let values = floats(data, "f32 data")?;
    let out = run(py, || quant::quantize(&values, &shape, d))?;
    Ok(PyBytes::new(py, &out))
}

/// Decodes `dtype` bytes of `shape` to little-endian f32 bytes.
#[pyfunction]
fn dequantize<'py>(py: Python<'py>, data: &[u8], shape: Vec<usize>, dtype: &str) -> PyResult<Bound<'py, PyBytes>> {
    let d = parse_dtype(dtype)?;
    let values = run(py, || quant::dequantize(data, &shape, d))?;
    Ok(f32_bytes(py, &values))
}

/// Reads and validates a container: `(tensors, metadata)` where tensors maps
/// name -> (stored dtype, shape, f32 bytes dequantised).
#[pyfunction]
fn read_tensors_raw<'py>(py: Python<'py>, path: PyPath) -> PyResult<(Bound<'py, PyDict>, HashMap<String, String>)> {
    let (tensors, meta) = run(py, || {
        let f = WeightFile::open(&path)?;
        let mut out = vec![];
        for t in &f.tensors {
            let v = quant::dequantize(t.data(), &t.shape, t.dtype)?;
            out.push((t.name.clone(), t.dtype, t.shape.clone(), v));
        }
        Ok((out, f.metadata.clone().into_iter().collect::<HashMap<_, _>>()))
    })?;
    let d = PyDict::new(py);
    for (name, dtype, shape, v) in tensors {
        d.set_item(name, (dtype.as_str(), shape, f32_bytes(py, &v)))?;
    }
    Ok((d, meta))
}

/// Quantises a whole model file; returns {"in_bytes", "out_bytes", "dtypes": {name: dtype}}.
#[pyfunction]
fn quantize_file<'py>(py: Python<'py>, input: PyPath, output: PyPath, dtype: &str) -> PyResult<Bound<'py, PyDict>> {
    let d = parse_dtype(dtype)?;
    let r = run(py, || quant::quantize_file(&input, &output, d))?;
    let out = PyDict::new(py);
    out.set_item("in_bytes", r.in_bytes)?;
    out.set_item("out_bytes", r.out_bytes)?;
    let dtypes: HashMap<String, &str> = r.tensors.iter().map(|(n, t)| (n.clone(), t.as_str())).collect();
    out.set_item("dtypes", dtypes)?;
    Ok(out)
}

/// Writes a model with random weights (tests and benchmarks).
#[pyfunction]
#[pyo3(signature = (path, config_json, seed=0, dtype="f32"))]
fn write_random_model(py: Python<'_>, path: PyPath, config_json: &str, seed: u64, dtype: &str) -> PyResult<()> {
    let d = parse_dtype(dtype)?;
    let cfg = aios_core::model::ModelConfig::from_json(config_json).map_err(to_py)?;
    run(py, || aios_core::model::random::write_random_model(&path, &cfg, seed, d))
}

/// A random LoRA adapter for the model config (tests and benchmarks).
#[pyfunction]
#[pyo3(signature = (path, config_json, base_fingerprint, modules, rank=4, alpha=8.0, use_rslora=false, seed=0))]
#[allow(clippy::too_many_arguments)]
fn write_random_lora(
    py: Python<'_>,
    path: PyPath,
    config_json: &str,
    base_fingerprint: &str,
    modules: Vec<String>,
    rank: usize,
    alpha: f64,
    use_rslora: bool,
    seed: u64,
) -> PyResult<()> {
    run(py, || {
        let cfg = aios_core::model::ModelConfig::from_json(config_json)?;
        let refs: Vec<&str> = modules.iter().map(String::as_str).collect();
        aios_core::adapter::write_random_lora(&path, &cfg, base_fingerprint, &refs, rank, alpha, use_rslora, seed)
    })
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<Engine>()?;
    m.add_class::<Generation>()?;
    m.add_class::<UsedMemory>()?;
    m.add_class::<Banned>()?;
    m.add_class::<Required>()?;
    m.add_class::<Brightness>()?;
    m.add_class::<Loudness>()?;
    m.add_class::<ClassEnergy>()?;
    m.add_class::<ValidJson>()?;
    m.add_class::<Regex>()?;
    m.add_class::<memory::MemoryStore>()?;
    m.add_class::<memory::Embedder>()?;
    m.add_function(wrap_pyfunction!(quantize, m)?)?;
    m.add_function(wrap_pyfunction!(dequantize, m)?)?;
    m.add_function(wrap_pyfunction!(read_tensors_raw, m)?)?;
    m.add_function(wrap_pyfunction!(quantize_file, m)?)?;
    m.add_function(wrap_pyfunction!(write_random_model, m)?)?;
    m.add_function(wrap_pyfunction!(write_random_lora, m)?)?;
    for (name, class) in ERROR_NAMES.iter().zip(error_classes(py)?) {
        m.add(*name, class.bind(py))?;
    }
    m.add("SAMPLERS", Strategy::NAMES.to_vec())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
