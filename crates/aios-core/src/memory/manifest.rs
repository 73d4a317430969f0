//! The manifest: which segments (and which deletions) make up a store at one
//! version. Each version is a new file `MANIFEST-<version>` written
//! atomically; its last line is a CRC32 of the JSON body, so a damaged
//! manifest is detected and an older one can be used instead.

use std::fs;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::durable::write_atomic;
use crate::{Error, Result};

/// The on-disk format this build writes and the newest it can read.
pub const FORMAT_VERSION: u32 = 1;
const PREFIX: &str = "MANIFEST-";

/// Where a store's vectors come from; fixed by the first add.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum VectorSource {
    /// Computed by this embedder (name and weights fingerprint).
    Embedder { name: String, fingerprint: String },
    /// Supplied by the caller with every memory and query.
    Caller,
}

impl std::fmt::Display for VectorSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VectorSource::Embedder { name, fingerprint } => write!(f, "embedder:{name}:{fingerprint}"),
            VectorSource::Caller => write!(f, "caller"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentRef {
    pub file: String,
    pub rows: u64,
    pub first_id: u64,
    pub last_id: u64,
    pub bytes: u64,
    pub crc32: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format_version: u32,
    pub version: u64,
    /// Vector dimension; `None` until the first memory is added.
    pub dim: Option<usize>,
    pub source: Option<VectorSource>,
    pub next_id: u64,
    pub segments: Vec<SegmentRef>,
    /// Tombstones: ids deleted but still present in some segment (sorted).
    pub deleted: Vec<u64>,
}

impl Manifest {
    pub fn empty() -> Self {
        Manifest {
            format_version: FORMAT_VERSION,
            version: 0,
            dim: None,
            source: None,
            next_id: 1,
            segments: Vec::new(),
            deleted: Vec::new(),
        }
    }

    pub fn file_name(version: u64) -> String {
        format!("{PREFIX}{version:016}")
    }

    /// The version in a manifest file name `MANIFEST-<version>`.
    pub fn version_in(file_name: &str) -> Option<u64> {
        file_name.strip_prefix(PREFIX)?.parse().ok()
    }

    /// The manifest versions present in `dir`, newest first.
    pub fn list(dir: &Path) -> Result<Vec<u64>> {
        let mut versions = Vec::new();
        for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
            let entry = entry.map_err(|e| Error::io(dir, e))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if let Some(v) = Self::version_in(&name) {
                versions.push(v);
            }
        }
        versions.sort_unstable_by(|a, b| b.cmp(a));
        Ok(versions)
    }

    pub fn encode(&self) -> Vec<u8> {
        let body = serde_json::to_string(self).expect("manifest serialises");
        let crc = crc32fast::hash(body.as_bytes());
        format!("{body}\ncrc32 {crc:08x}\n").into_bytes()
    }

    /// Parses a manifest file's bytes. A format version newer than this build
    /// is a hard error (using an older manifest instead would hide data).
    pub fn decode(bytes: &[u8], name: &str) -> Result<Manifest> {
        let bad = |msg: &str| Error::format(name, msg.to_string());
        let text = std::str::from_utf8(bytes).map_err(|_| bad("not UTF-8"))?;
        let (body, trailer) = text.trim_end_matches('\n').rsplit_once('\n').ok_or_else(|| bad("no checksum line"))?;
        let crc = trailer
            .strip_prefix("crc32 ")
            .and_then(|h| u32::from_str_radix(h, 16).ok())
            .ok_or_else(|| bad("malformed checksum line"))?;
        if crc32fast::hash(body.as_bytes()) != crc {
            return Err(bad("checksum mismatch (damaged or truncated)"));
        }
        let value: serde_json::Value = serde_json::from_str(body).map_err(|e| bad(&format!("invalid JSON: {e}")))?;
        let format = value.get("format_version").and_then(|v| v.as_u64()).ok_or_else(|| bad("no format_version"))?;
        if format > FORMAT_VERSION as u64 {
            return Err(Error::Config(format!(
                "{name}: the store was written by a newer aios (memory format {format}); this build reads up to {FORMAT_VERSION}. Upgrade aios to open it."
            )));
        }
        let m: Manifest = serde_json::from_value(value).map_err(|e| bad(&format!("invalid manifest: {e}")))?;
        if m.segments.windows(2).any(|w| w[0].last_id >= w[1].first_id) {
            return Err(bad("segments overlap or are out of order"));
        }
        if m.deleted.windows(2).any(|w| w[0] >= w[1]) {
            return Err(bad("deleted ids are not sorted"));
        }
        // A segment entry names a file inside the store, as this build writes
        // it: never an absolute path, `..` or another folder.
        if let Some(r) = m.segments.iter().find(|r| segment_version(&r.file).is_none()) {
            return Err(bad(&format!("segment entry {:?} is not a segment file name (seg-<version>.arrow)", r.file)));
        }
        if let Some(r) = m.segments.iter().find(|r| r.rows == 0 || r.first_id > r.last_id) {
            return Err(bad(&format!("segment entry {:?} has an empty or inverted id range", r.file)));
        }
        Ok(m)
    }

    pub fn publish(&self, dir: &Path) -> Result<()> {
        write_atomic(dir, &Self::file_name(self.version), &self.encode())
    }

    pub fn rows(&self) -> u64 {
        self.segments.iter().map(|s| s.rows).sum()
    }

    /// Rows not deleted. The store drops tombstones of ids it does not hold
    /// when it loads a manifest, so this never counts them.
    pub fn live(&self) -> u64 {
        self.rows().saturating_sub(self.deleted.len() as u64)
    }

    /// The id the next memory gets: past every id this manifest's segments
    /// hold, whatever `next_id` says (a reused id would hide a memory).
    pub fn first_free_id(&self) -> u64 {
        self.segments.iter().map(|s| s.last_id + 1).fold(self.next_id, u64::max)
    }
}

/// The version in a segment file name `seg-<16 digits>.arrow`, or None for
/// any other name (paths, `..`, other files).
pub fn segment_version(file: &str) -> Option<u64> {
    let digits = file.strip_prefix("seg-")?.strip_suffix(".arrow")?;
    if digits.len() != 16 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The file name of the segment written at `version`.
pub fn segment_file(version: u64) -> String {
    format!("seg-{version:016}.arrow")
}
