//! The Parquet weight/adapter container (DESIGN section 4).
//!
//! One row per tensor: `name: utf8, dtype: utf8, shape: list<int64>,
//! data: large_binary`, uncompressed, no dictionary, no statistics. File
//! metadata: `aios.format_version`, `aios.kind`, `aios.config` (JSON).

mod dtype;
mod read;
mod write;

pub use dtype::DType;
pub use read::{RawTensor, WeightFile};
pub use write::{write_weight_file, TensorToWrite};

pub const FORMAT_VERSION: u32 = 1;
pub const KEY_VERSION: &str = "aios.format_version";
pub const KEY_KIND: &str = "aios.kind";
pub const KEY_CONFIG: &str = "aios.config";
/// CRC32 of every tensor's data bytes, JSON `{name: "8 hex digits"}`,
/// written by both writers and verified at load (files written before it
/// existed have none and load unverified).
pub const KEY_CHECKSUMS: &str = "aios.checksums";

/// The `aios.checksums` value for these tensors.
pub fn checksums_json<'a>(tensors: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> String {
    let map: std::collections::BTreeMap<&str, String> =
        tensors.into_iter().map(|(n, d)| (n, format!("{:08x}", crc32fast::hash(d)))).collect();
    serde_json::to_string(&map).expect("checksums serialise")
}
/// Parquet BYTE_ARRAY values are limited to 2^31-1 bytes.
pub const MAX_TENSOR_BYTES: usize = i32::MAX as usize;

#[cfg(test)]
mod tests;
