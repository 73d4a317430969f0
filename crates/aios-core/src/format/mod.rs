//! The Parquet weight/adapter container (DESIGN section 4).
//!
//! One row per tensor: `name: utf8, dtype: utf8, shape: list<int64>,
//! data: large_binary`, uncompressed, no dictionary, no statistics. File
//! metadata: `aios.format_version`, `aios.kind`, `aios.config` (JSON),
//! `aios.checksums` (JSON, version 2).

mod dtype;
mod read;
mod write;

pub use dtype::DType;
pub use read::{RawTensor, WeightFile};
pub use write::{write_weight_file, TensorToWrite};

/// The version this build writes. 2: `aios.checksums` is required, so a
/// damaged checksum key cannot pass for a file that never had one. Version 1
/// files (written before checksums) still load, unverified.
pub const FORMAT_VERSION: u32 = 2;
/// The first version whose files must carry `aios.checksums`.
pub const CHECKSUMS_SINCE: u32 = 2;
pub const KEY_VERSION: &str = "aios.format_version";
pub const KEY_KIND: &str = "aios.kind";
pub const KEY_CONFIG: &str = "aios.config";
/// Every tensor's dtype, shape and CRC32 of its data bytes, JSON
/// `{name: {"dtype": "f32", "shape": [2, 3], "crc32": "8 hex digits"}}`,
/// written by both writers and verified at load. The CRC is zlib's (IEEE).
pub const KEY_CHECKSUMS: &str = "aios.checksums";

/// One tensor's entry in `aios.checksums`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorChecksum {
    pub dtype: String,
    pub shape: Vec<usize>,
    pub crc32: String,
}

impl TensorChecksum {
    pub fn of(dtype: DType, shape: &[usize], data: &[u8]) -> Self {
        TensorChecksum {
            dtype: dtype.as_str().to_string(),
            shape: shape.to_vec(),
            crc32: format!("{:08x}", crc32fast::hash(data)),
        }
    }
}

/// The `aios.checksums` value for `(name, dtype, shape, data)` tensors.
pub fn checksums_json<'a>(tensors: impl IntoIterator<Item = (&'a str, DType, &'a [usize], &'a [u8])>) -> String {
    let map: std::collections::BTreeMap<&str, TensorChecksum> =
        tensors.into_iter().map(|(n, dt, shape, d)| (n, TensorChecksum::of(dt, shape, d))).collect();
    serde_json::to_string(&map).expect("checksums serialise")
}
/// Parquet BYTE_ARRAY values are limited to 2^31-1 bytes.
pub const MAX_TENSOR_BYTES: usize = i32::MAX as usize;

#[cfg(test)]
mod tests;
