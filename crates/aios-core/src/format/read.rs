//! Memory-mapped reader for the Parquet weight container, with validation.
//!
//! The file is mapped once and handed to the Parquet reader as `Bytes`, so
//! tensor payloads are slices of the mapping (pages are stored uncompressed):
//! the only copy is the one into candle's storage when a tensor is built.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use parquet::data_type::ByteArray;
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::{Field, RowAccessor};

use super::{
    DType, TensorChecksum, CHECKSUMS_SINCE, FORMAT_VERSION, KEY_CHECKSUMS, KEY_CONFIG, KEY_KIND, KEY_VERSION,
    MAX_TENSOR_BYTES,
};
use crate::error::{Error, Result};

/// One tensor as stored: its bytes still live in the file mapping (clones
/// share them).
#[derive(Clone)]
pub struct RawTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    data: ByteArray,
}

impl RawTensor {
    pub fn data(&self) -> &[u8] {
        self.data.data()
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

impl std::fmt::Debug for RawTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}{:?} ({} bytes)", self.name, self.dtype, self.shape, self.data().len())
    }
}

/// A validated weight or adapter file.
#[derive(Debug)]
pub struct WeightFile {
    pub path: PathBuf,
    pub kind: String,
    pub format_version: u32,
    /// All key/value metadata of the file, `aios.*` keys included.
    pub metadata: BTreeMap<String, String>,
    /// Tensors in file order.
    pub tensors: Vec<RawTensor>,
    index: BTreeMap<String, usize>,
    pub file_bytes: u64,
}

impl WeightFile {
    /// Opens, maps and validates a container. Any inconsistency is an
    /// `Error::Format` naming the file; a panic inside the Parquet decoder on
    /// a hostile file is also turned into one.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        let len = file.metadata().map_err(|e| Error::io(&path, e))?.len();
        if len < 12 {
            return Err(Error::format(path.display(), format!("file is {len} bytes, too short to be Parquet")));
        }
        // SAFETY: the mapping is read-only; like safetensors and candle we
        // accept that another process truncating the file under us is UB-adjacent
        // (SIGBUS), the standard trade-off for zero-copy loading.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        let shown = path.display().to_string();
        // Validate what we can before the decoder sees the bytes.
        if &mmap[..4] != b"PAR1" || &mmap[mmap.len() - 4..] != b"PAR1" {
            return Err(Error::format(
                &shown,
                "no Parquet magic (PAR1) at the start and end: not Parquet, or truncated",
            ));
        }
        let bytes = Bytes::from_owner(mmap);
        let parsed = crate::guard::catch_silent(|| parse(bytes, &shown));
        let (metadata, tensors) = match parsed {
            Some(r) => r?,
            None => return Err(Error::format(&shown, "the Parquet decoder rejected the file (corrupt data)")),
        };
        Self::from_parts(path, len, metadata, tensors)
    }

    fn from_parts(
        path: PathBuf,
        file_bytes: u64,
        metadata: BTreeMap<String, String>,
        tensors: Vec<RawTensor>,
    ) -> Result<Self> {
        let shown = path.display().to_string();
        let version: u32 = metadata
            .get(KEY_VERSION)
            .ok_or_else(|| Error::format(&shown, format!("missing metadata key {KEY_VERSION}: not an aios file")))?
            .parse()
            .map_err(|_| Error::format(&shown, format!("{KEY_VERSION} is not an integer")))?;
        if version > FORMAT_VERSION || version == 0 {
            return Err(Error::format(
                &shown,
                format!(
                    "format version {version} is not supported (this build reads 1..={FORMAT_VERSION}); upgrade aios"
                ),
            ));
        }
        let kind = metadata
            .get(KEY_KIND)
            .cloned()
            .ok_or_else(|| Error::format(&shown, format!("missing metadata key {KEY_KIND}")))?;
        let mut index = BTreeMap::new();
        for (i, t) in tensors.iter().enumerate() {
            if index.insert(t.name.clone(), i).is_some() {
                return Err(Error::format(&shown, format!("duplicate tensor name {:?}", t.name)));
            }
        }
        match metadata.get(KEY_CHECKSUMS) {
            Some(json) => verify_checksums(&shown, json, &tensors)?,
            None if version >= CHECKSUMS_SINCE => {
                return Err(Error::format(
                    &shown,
                    format!("format version {version} requires {KEY_CHECKSUMS}, which is missing (damaged metadata)"),
                ))
            }
            None => {} // written before checksums existed
        }
        Ok(WeightFile { path, kind, format_version: version, metadata, tensors, index, file_bytes })
    }

    pub fn get(&self, name: &str) -> Option<&RawTensor> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// The tensor, or a format error naming what is missing.
    pub fn require(&self, name: &str) -> Result<&RawTensor> {
        self.get(name).ok_or_else(|| Error::format(self.path.display(), format!("missing tensor {name:?}")))
    }

    /// Puts `t` in place of the tensor of the same name, which must exist
    /// (a patch replaces values; it never adds tensors).
    pub fn replace(&mut self, t: RawTensor) -> Result<()> {
        let Some(&i) = self.index.get(&t.name) else {
            return Err(Error::format(self.path.display(), format!("no tensor {:?} to replace", t.name)));
        };
        self.tensors[i] = t;
        Ok(())
    }

    /// The `aios.config` JSON, if the file has one.
    pub fn config_json(&self) -> Option<&str> {
        self.metadata.get(KEY_CONFIG).map(String::as_str)
    }
}

/// Checks every tensor's dtype, shape and data against `aios.checksums`; a
/// damaged tensor is named.
pub(super) fn verify_checksums(shown: &str, json: &str, tensors: &[RawTensor]) -> Result<()> {
    let sums: BTreeMap<String, TensorChecksum> =
        serde_json::from_str(json).map_err(|e| Error::format(shown, format!("{KEY_CHECKSUMS} is not valid: {e}")))?;
    if sums.len() != tensors.len() {
        return Err(Error::format(
            shown,
            format!("{KEY_CHECKSUMS} lists {} tensors, the file has {}", sums.len(), tensors.len()),
        ));
    }
    for t in tensors {
        let want = sums
            .get(&t.name)
            .ok_or_else(|| Error::format(shown, format!("{KEY_CHECKSUMS} has no entry for tensor {:?}", t.name)))?;
        if *want != TensorChecksum::of(t.dtype, &t.shape, t.data()) {
            return Err(Error::format(
                shown,
                format!(
                    "tensor {:?} is damaged: its dtype, shape or data ({}{:?}) does not match its checksum \
                     ({}{:?})",
                    t.name, t.dtype, t.shape, want.dtype, want.shape
                ),
            ));
        }
    }
    Ok(())
}

type Parsed = (BTreeMap<String, String>, Vec<RawTensor>);

fn parse(bytes: Bytes, shown: &str) -> Result<Parsed> {
    let perr = |e: parquet::errors::ParquetError| Error::format(shown, e.to_string());
    let reader = SerializedFileReader::new(bytes).map_err(perr)?;
    let meta = reader.metadata().file_metadata();
    let mut metadata = BTreeMap::new();
    for kv in meta.key_value_metadata().into_iter().flatten() {
        metadata.insert(kv.key.clone(), kv.value.clone().unwrap_or_default());
    }
    let fields: Vec<&str> = meta.schema().get_fields().iter().map(|f| f.name()).collect();
    if fields != ["name", "dtype", "shape", "data"] {
        return Err(Error::format(shown, format!("columns are {fields:?}, expected [name, dtype, shape, data]")));
    }
    // Payloads are read as slices of the mapping, so pages must be stored
    // uncompressed; say so instead of failing inside a codec.
    for rg in reader.metadata().row_groups() {
        for col in rg.columns() {
            if col.compression() != parquet::basic::Compression::UNCOMPRESSED {
                return Err(Error::format(
                    shown,
                    format!(
                        "column {} is compressed with {}; aios weight files must be written uncompressed \
                         (pyarrow: compression='none')",
                        col.column_path(),
                        col.compression()
                    ),
                ));
            }
        }
    }
    let mut tensors = Vec::new();
    for row in reader.get_row_iter(None).map_err(perr)? {
        let row = row.map_err(perr)?;
        let name = row.get_string(0).map_err(perr)?.clone();
        let dtype_name = row.get_string(1).map_err(perr)?;
        let dtype = DType::parse(dtype_name)
            .filter(|d| d.as_str() == dtype_name)
            .ok_or_else(|| Error::format(shown, format!("tensor {name:?} has unknown dtype {dtype_name:?}")))?;
        let mut shape = Vec::new();
        for el in row.get_list(2).map_err(perr)?.elements() {
            match el {
                Field::Long(d) if *d >= 0 => shape.push(*d as usize),
                other => {
                    return Err(Error::format(shown, format!("tensor {name:?} has invalid dimension {other}")));
                }
            }
        }
        let data = row.get_bytes(3).map_err(perr)?.clone();
        let expected = dtype.byte_len(&shape).map_err(|m| Error::format(shown, format!("tensor {name:?}: {m}")))?;
        if data.len() != expected {
            return Err(Error::format(
                shown,
                format!("tensor {name:?} ({dtype}{shape:?}) has {} bytes of data, expected {expected}", data.len()),
            ));
        }
        if expected > MAX_TENSOR_BYTES {
            return Err(Error::format(shown, format!("tensor {name:?} exceeds the 2 GiB limit")));
        }
        tensors.push(RawTensor { name, dtype, shape, data });
    }
    Ok((metadata, tensors))
}
