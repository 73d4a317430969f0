//! Seeded mutation fuzzing on stable Rust (cargo-fuzz needs nightly): the
//! weight reader, the LoRA reader, memory segments and manifests, and the
//! `aios-run` CLI get bit flips, truncations, insertions, overwrites and
//! rewrites of the Parquet footer / Arrow header regions. Every outcome is
//! checked, not just "did not crash":
//! - a panic that escapes, or any panic text printed, is a failure;
//! - a mutant that loads must hold exactly the original tensors (a weight
//!   file) or every acknowledged memory (a store opened without warnings):
//!   anything else is silent corruption / silent data loss;
//! - a mutant that takes over `HANG_MS` counts as a hang.
//!
//! Used by `tests/fuzz.rs` (a short run) and `examples/fuzz.rs` (a long run
//! whose numbers go in bench/RESULTS.md). With `AIOS_FUZZ_SAVE_PANICS=DIR`,
//! weight mutants that make a decoder panic (caught, silently) are saved there.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use aios_core::adapter::LoraAdapter;
use aios_core::format::{DType, WeightFile};
use aios_core::memory::{MemoryStore, NewMemory, StoreOptions};
use aios_core::model::ModelConfig;

pub const HANG_MS: u128 = 2_000;
static PANICS_PRINTED: AtomicU64 = AtomicU64::new(0);

#[derive(Debug, Default, Clone)]
pub struct Counts {
    pub mutants: u64,
    pub rejected: u64,
    pub loaded_intact: u64,
    pub panics_raised: u64,
    pub panics_printed: u64,
    /// Decoder panics caught and turned into format errors, silently (fine).
    pub panics_silenced: u64,
    pub hangs: u64,
    pub silent_corruption: u64,
    pub silent_data_loss: u64,
    pub tensor_mutants: u64,
    pub tensor_mutants_detected: u64,
    pub cli_runs: u64,
    pub cli_bad: u64,
    pub max_ms: u128,
}

impl Counts {
    pub fn failures(&self) -> u64 {
        self.panics_raised
            + self.panics_printed
            + self.hangs
            + self.silent_corruption
            + self.silent_data_loss
            + self.cli_bad
    }
}

/// splitmix64: the whole run is a function of the seed.
pub struct Rng(u64);
impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

/// One mutation of `data`; `hot` is a region (header/footer) mutated more often.
pub fn mutate(data: &[u8], rng: &mut Rng, hot: std::ops::Range<usize>) -> Vec<u8> {
    let mut b = data.to_vec();
    let pick = |rng: &mut Rng, len: usize| {
        if rng.below(2) == 0 && !hot.is_empty() {
            hot.start + rng.below(hot.len())
        } else {
            rng.below(len)
        }
    };
    match rng.below(6) {
        0 => {
            for _ in 0..1 + rng.below(4) {
                let i = pick(rng, b.len());
                b[i] ^= 1 << rng.below(8);
            }
        }
        1 => b.truncate(rng.below(b.len())),
        2 => {
            let i = pick(rng, b.len());
            let n = 1 + rng.below(16);
            let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
            b.splice(i..i, bytes);
        }
        3 => {
            let i = pick(rng, b.len());
            let end = (i + 1 + rng.below(8)).min(b.len());
            for x in &mut b[i..end] {
                *x = [0, 0xff, 0x7f, 0x80][rng.below(4)];
            }
        }
        4 => {
            // A 4-byte little-endian length or offset rewritten.
            let i = pick(rng, b.len().saturating_sub(4));
            let v: u32 = [0, 1, u32::MAX, i32::MAX as u32, rng.next_u64() as u32][rng.below(5)];
            let end = (i + 4).min(b.len());
            b[i..end].copy_from_slice(&v.to_le_bytes()[..end - i]);
        }
        _ => {
            let i = rng.below(b.len());
            let n = rng.below(64).min(b.len() - i);
            b.drain(i..i + n);
        }
    }
    b
}

fn install_counter() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Installed before aios's own hook, which chains to this one only for
        // panics it does not silence: this counts exactly the printed ones.
        std::panic::set_hook(Box::new(|_| {
            PANICS_PRINTED.fetch_add(1, Ordering::SeqCst);
        }));
    });
}

fn tiny_config() -> ModelConfig {
    ModelConfig::from_json(
        r#"{"vocab_size":40,"hidden_size":32,"n_layers":1,"n_heads":2,"cond_dim":16,"max_length":16,"mask_token_id":3}"#,
    )
    .expect("config")
}

fn tensors_of(f: &WeightFile) -> BTreeMap<String, (DType, Vec<usize>, Vec<u8>)> {
    f.tensors.iter().map(|t| (t.name.clone(), (t.dtype, t.shape.clone(), t.data().to_vec()))).collect()
}

/// Runs `f`, counting an escaped panic and timing it.
fn timed<T>(c: &mut Counts, f: impl FnOnce() -> T) -> Option<T> {
    let t0 = Instant::now();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    let ms = t0.elapsed().as_millis();
    c.max_ms = c.max_ms.max(ms);
    if ms > HANG_MS {
        c.hangs += 1;
    }
    match r {
        Ok(v) => Some(v),
        Err(_) => {
            c.panics_raised += 1;
            None
        }
    }
}

/// Fuzzes `n` mutants of each target in `dir`; `cli` runs every `cli_every`-th
/// weight mutant through `aios-run info` too.
pub fn run(dir: &Path, n: u64, seed: u64, cli: Option<(&Path, u64)>) -> BTreeMap<&'static str, Counts> {
    install_counter();
    let mut rng = Rng::new(seed);
    let cfg = tiny_config();
    let mut out = BTreeMap::new();

    // Weight files: f32 and int8 (quantised blocks), and a LoRA adapter.
    let model = dir.join("model.parquet");
    aios_core::model::random::write_random_model(&model, &cfg, 1, DType::F32).expect("model");
    let q8 = dir.join("model.q8.parquet");
    aios_core::quant::quantize_file(&model, &q8, DType::Q8_0).expect("quantize");
    let fp = WeightFile::open(&model).unwrap().metadata["aios.fingerprint"].clone();
    let lora = dir.join("a.lora.parquet");
    aios_core::adapter::write_random_lora(&lora, &cfg, &fp, &["blocks.0.attn_qkv", "blocks.0.mlp.0"], 2, 4.0, false, 3)
        .expect("lora");
    let mutant = dir.join("mutant.parquet");
    for (target, path) in [("weights_f32", &model), ("weights_int8", &q8), ("lora", &lora)] {
        let data = std::fs::read(path).unwrap();
        let original = tensors_of(&WeightFile::open(path).unwrap());
        // Tensor payload ranges: mutants touching only these must be detected.
        let payloads: Vec<std::ops::Range<usize>> = original
            .values()
            .filter(|(_, _, d)| d.len() >= 8)
            .filter_map(|(_, _, d)| data.windows(d.len()).position(|w| w == d.as_slice()).map(|at| at..at + d.len()))
            .collect();
        let footer = data.len().saturating_sub(2048)..data.len();
        let mut c = Counts::default();
        for i in 0..n {
            // Every fourth mutant flips one bit inside a tensor's data.
            let (bytes, in_tensor) = if i % 4 == 0 && !payloads.is_empty() {
                let r = &payloads[rng.below(payloads.len())];
                let mut b = data.clone();
                b[r.start + rng.below(r.len())] ^= 1 << rng.below(8);
                (b, true)
            } else {
                (mutate(&data, &mut rng, footer.clone()), false)
            };
            std::fs::write(&mutant, &bytes).unwrap();
            c.mutants += 1;
            let before = PANICS_PRINTED.load(Ordering::SeqCst);
            let silenced = aios_core::guard::silenced();
            let loaded = timed(&mut c, || {
                if target == "lora" {
                    LoraAdapter::load(&mutant, &cfg, Some(&fp)).map(|_| ()).and_then(|_| WeightFile::open(&mutant))
                } else {
                    WeightFile::open(&mutant)
                }
            });
            c.panics_printed += PANICS_PRINTED.load(Ordering::SeqCst) - before;
            if aios_core::guard::silenced() > silenced {
                c.panics_silenced += aios_core::guard::silenced() - silenced;
                // Keep mutants that reach a decoder panic, as regression fixtures.
                if let Some(dir) = std::env::var_os("AIOS_FUZZ_SAVE_PANICS") {
                    let _ = std::fs::write(Path::new(&dir).join(format!("{target}-{seed}-{i}.parquet")), &bytes);
                }
            }
            let rejected = matches!(loaded, Some(Err(_)));
            match loaded {
                Some(Ok(f)) => {
                    if tensors_of(&f) == original {
                        c.loaded_intact += 1;
                    } else {
                        c.silent_corruption += 1;
                        if c.silent_corruption == 1 {
                            let now = tensors_of(&f);
                            for (k, v) in &original {
                                match now.get(k) {
                                    Some(n) if n == v => {}
                                    Some(n) => eprintln!("{target}: {k}: {:?}{:?} -> {:?}{:?}", v.0, v.1, n.0, n.1),
                                    None => eprintln!("{target}: {k} missing"),
                                }
                            }
                        }
                    }
                }
                Some(Err(_)) => c.rejected += 1,
                None => {}
            }
            if in_tensor {
                c.tensor_mutants += 1;
                if rejected {
                    c.tensor_mutants_detected += 1;
                }
            }
            if let Some((bin, every)) = cli {
                if i % every == 0 {
                    c.cli_runs += 1;
                    let p = std::process::Command::new(bin).arg("info").arg(&mutant).output().unwrap();
                    let err = String::from_utf8_lossy(&p.stderr);
                    let code = p.status.code();
                    if err.contains("panicked") || !(code == Some(0) || code == Some(4) || code == Some(5)) {
                        c.cli_bad += 1;
                        eprintln!("CLI: exit {code:?}: {err}");
                    }
                }
            }
        }
        out.insert(target, c);
    }

    // Memory stores: segments and manifests.
    let store_dir = dir.join("store");
    let texts: Vec<String> = (0..6).map(|i| format!("memory {i}")).collect();
    {
        let s = MemoryStore::open(&store_dir, StoreOptions { dim: Some(4), ..Default::default() }).unwrap();
        for (i, t) in texts.iter().enumerate() {
            let v = vec![1.0 + i as f32, 0.5, -0.25 * i as f32, 2.0];
            s.add(NewMemory { text: t.clone(), meta: Some(format!("{{\"i\": {i}}}")), vector: Some(v) }).unwrap();
        }
    }
    let files: Vec<PathBuf> = std::fs::read_dir(&store_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy().to_string();
            n.starts_with("seg-") || n.starts_with("MANIFEST-")
        })
        .collect();
    for (target, prefix) in [("memory_segment", "seg-"), ("memory_manifest", "MANIFEST-")] {
        let mut c = Counts::default();
        let targets: Vec<&PathBuf> =
            files.iter().filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(prefix)).collect();
        let work = dir.join(format!("work-{prefix}"));
        for _ in 0..n {
            let _ = std::fs::remove_dir_all(&work);
            std::fs::create_dir_all(&work).unwrap();
            for f in std::fs::read_dir(&store_dir).unwrap() {
                let f = f.unwrap().path();
                if f.is_file() {
                    std::fs::copy(&f, work.join(f.file_name().unwrap())).unwrap();
                }
            }
            let victim = targets[rng.below(targets.len())];
            let data = std::fs::read(victim).unwrap();
            let hot = 0..data.len().min(512);
            std::fs::write(work.join(victim.file_name().unwrap()), mutate(&data, &mut rng, hot)).unwrap();
            c.mutants += 1;
            let before = PANICS_PRINTED.load(Ordering::SeqCst);
            let silenced = aios_core::guard::silenced();
            let opened =
                timed(&mut c, || MemoryStore::open(&work, StoreOptions { read_only: true, ..Default::default() }));
            c.panics_printed += PANICS_PRINTED.load(Ordering::SeqCst) - before;
            c.panics_silenced += aios_core::guard::silenced() - silenced;
            match opened {
                Some(Ok(s)) if s.warnings().is_empty() => {
                    let intact = s.len() == texts.len()
                        && (1..=texts.len() as u64)
                            .all(|id| s.get(id).is_some_and(|h| h.text == texts[id as usize - 1]));
                    if intact {
                        c.loaded_intact += 1;
                    } else {
                        c.silent_data_loss += 1;
                    }
                }
                Some(_) => c.rejected += 1, // an error, or a store that says what it skipped
                None => {}
            }
        }
        let _ = std::fs::remove_dir_all(&work);
        out.insert(target, c);
    }
    out
}
