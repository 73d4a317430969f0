//! Writer for the Parquet weight container (used by `aios-run quantize` and
//! tests; Python writes the same layout with pyarrow).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use parquet::basic::{Compression, Encoding};
use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;

use super::{checksums_json, DType, FORMAT_VERSION, KEY_CHECKSUMS, KEY_KIND, KEY_VERSION, MAX_TENSOR_BYTES};
use crate::error::{Error, Result};

const SCHEMA: &str = "
message aios_tensors {
  required binary name (STRING);
  required binary dtype (STRING);
  required group shape (LIST) {
    repeated group list {
      required int64 element;
    }
  }
  required binary data;
}";

/// A tensor to write: bytes already in `dtype`'s layout, little-endian.
pub struct TensorToWrite<'a> {
    pub name: &'a str,
    pub dtype: DType,
    pub shape: &'a [usize],
    pub data: &'a [u8],
}

/// Writes a container atomically (temp file + rename), so a crash never
/// leaves a half-written file under the final name.
pub fn write_weight_file(
    path: impl AsRef<Path>,
    kind: &str,
    extra_metadata: &BTreeMap<String, String>,
    tensors: &[TensorToWrite<'_>],
) -> Result<()> {
    let path = path.as_ref();
    let shown = path.display().to_string();
    let mut seen = std::collections::HashSet::new();
    for t in tensors {
        let expected = t.dtype.byte_len(t.shape).map_err(|m| Error::Input(format!("tensor {}: {m}", t.name)))?;
        if expected != t.data.len() {
            return Err(Error::Input(format!(
                "tensor {} has {} bytes, {}{:?} needs {expected}",
                t.name,
                t.data.len(),
                t.dtype,
                t.shape
            )));
        }
        if expected > MAX_TENSOR_BYTES {
            return Err(Error::Input(format!("tensor {} exceeds the 2 GiB limit", t.name)));
        }
        if !seen.insert(t.name) {
            return Err(Error::Input(format!("duplicate tensor name {}", t.name)));
        }
    }
    let mut kv = vec![
        KeyValue::new(KEY_VERSION.to_string(), FORMAT_VERSION.to_string()),
        KeyValue::new(KEY_KIND.to_string(), kind.to_string()),
        KeyValue::new(
            KEY_CHECKSUMS.to_string(),
            checksums_json(tensors.iter().map(|t| (t.name, t.dtype, t.shape, t.data))),
        ),
    ];
    for (k, v) in extra_metadata {
        if k != KEY_VERSION && k != KEY_KIND && k != KEY_CHECKSUMS {
            kv.push(KeyValue::new(k.clone(), v.clone()));
        }
    }
    let tmp = path.with_extension("parquet.tmp");
    let written = write_to(&tmp, &shown, WriterProperties::builder().set_key_value_metadata(Some(kv)), tensors)
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
    if written.is_err() {
        // Never leave a half-written temp file behind.
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

fn write_to(
    tmp: &Path,
    shown: &str,
    props: parquet::file::properties::WriterPropertiesBuilder,
    tensors: &[TensorToWrite<'_>],
) -> Result<()> {
    let props = props
        .set_compression(Compression::UNCOMPRESSED)
        .set_dictionary_enabled(false)
        .set_encoding(Encoding::PLAIN)
        .set_statistics_enabled(EnabledStatistics::None)
        .set_write_batch_size(1)
        .build();
    let schema = Arc::new(parse_message_type(SCHEMA).expect("static schema parses"));
    // The tensors were validated above, so a failing write is the
    // filesystem's doing (a full disk, a read-only mount): an I/O error.
    let perr = |e: parquet::errors::ParquetError| {
        let io = match e {
            parquet::errors::ParquetError::External(inner) => match inner.downcast::<std::io::Error>() {
                Ok(io) => *io,
                Err(other) => std::io::Error::other(other.to_string()),
            },
            other => std::io::Error::other(other.to_string()),
        };
        Error::io(shown, io)
    };
    let file = std::fs::File::create(tmp).map_err(|e| Error::io(tmp, e))?;
    let mut writer = SerializedFileWriter::new(file, schema, Arc::new(props)).map_err(perr)?;
    let mut rg = writer.next_row_group().map_err(perr)?;

    let strings = |f: fn(&TensorToWrite) -> String| -> Vec<ByteArray> {
        tensors.iter().map(|t| ByteArray::from(f(t).into_bytes())).collect()
    };
    for values in [strings(|t| t.name.to_string()), strings(|t| t.dtype.as_str().to_string())] {
        let mut col = rg.next_column().map_err(perr)?.expect("schema has 4 columns");
        col.typed::<ByteArrayType>().write_batch(&values, None, None).map_err(perr)?;
        col.close().map_err(perr)?;
    }
    // A required list of required int64: definition level 1 for a present
    // element, 0 for an empty list; repetition level 0 starts a new row.
    let (mut dims, mut def, mut rep) = (Vec::new(), Vec::new(), Vec::new());
    for t in tensors {
        if t.shape.is_empty() {
            def.push(0);
            rep.push(0);
        }
        for (i, &d) in t.shape.iter().enumerate() {
            dims.push(d as i64);
            def.push(1);
            rep.push(if i == 0 { 0 } else { 1 });
        }
    }
    let mut col = rg.next_column().map_err(perr)?.expect("schema has 4 columns");
    col.typed::<Int64Type>().write_batch(&dims, Some(&def), Some(&rep)).map_err(perr)?;
    col.close().map_err(perr)?;
    let data: Vec<ByteArray> = tensors.iter().map(|t| ByteArray::from(t.data.to_vec())).collect();
    let mut col = rg.next_column().map_err(perr)?.expect("schema has 4 columns");
    col.typed::<ByteArrayType>().write_batch(&data, None, None).map_err(perr)?;
    col.close().map_err(perr)?;
    rg.close().map_err(perr)?;
    let file = writer.into_inner().map_err(perr)?;
    file.sync_all().map_err(|e| Error::io(tmp, e))
}
