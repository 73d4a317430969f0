//! A segment: an immutable Arrow IPC file holding a run of memories.
//!
//! Schema (non-nullable): `id: u64, text: utf8, meta: utf8 (a JSON object),
//! created_ms: i64 (Unix milliseconds), embedding: fixed_size_list<f32, dim>`.
//! Embeddings are stored L2-normalised. Rows are sorted by id and a segment
//! covers a contiguous id range of its store, so lookups are binary searches.

use std::io::Cursor;
use std::sync::{Arc, OnceLock};

use arrow_array::{Array, FixedSizeListArray, Float32Array, Int64Array, RecordBatch, StringArray, UInt64Array};
use arrow_ipc::reader::FileReader;
use arrow_ipc::writer::FileWriter;
use arrow_schema::{DataType, Field, Schema};
use serde_json::{Map, Value};

use super::manifest::VectorSource;
use super::search::{quantize_rows, Int8Rows};
use crate::{Error, Result};

/// Schema metadata key holding the [`VectorSource`] as JSON.
const KEY_SOURCE: &str = "aios.source";

/// Rows per Arrow record batch (keeps utf8 offsets far below i32::MAX).
const BATCH_ROWS: usize = 16_384;

/// The columns of a segment, in memory.
#[derive(Debug, Default)]
pub struct Segment {
    pub dim: usize,
    pub ids: Vec<u64>,
    pub texts: Vec<String>,
    /// The metadata exactly as stored (a JSON object's text).
    pub meta_json: Vec<String>,
    /// The same metadata parsed, for filters.
    pub metas: Vec<Map<String, Value>>,
    pub created_ms: Vec<i64>,
    /// `len * dim` floats, row-major, each row of unit length.
    pub vectors: Vec<f32>,
    /// Where the vectors came from, as recorded in the file (files written
    /// before this was recorded have none); lets a store whose manifests are
    /// lost be rebuilt from its segments alone.
    pub source: Option<VectorSource>,
    int8: OnceLock<Int8Rows>,
}

impl Segment {
    pub fn new(dim: usize) -> Self {
        Segment { dim, ..Default::default() }
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn vector(&self, row: usize) -> &[f32] {
        &self.vectors[row * self.dim..(row + 1) * self.dim]
    }

    /// Int8 codes of the vectors, built on first use.
    pub fn int8(&self) -> &Int8Rows {
        self.int8.get_or_init(|| quantize_rows(&self.vectors, self.dim))
    }

    /// Row index of `id`, if this segment holds it.
    pub fn find(&self, id: u64) -> Option<usize> {
        self.ids.binary_search(&id).ok()
    }

    pub fn push(
        &mut self,
        id: u64,
        text: String,
        meta_json: String,
        meta: Map<String, Value>,
        created_ms: i64,
        v: &[f32],
    ) {
        debug_assert_eq!(v.len(), self.dim);
        self.ids.push(id);
        self.texts.push(text);
        self.meta_json.push(meta_json);
        self.metas.push(meta);
        self.created_ms.push(created_ms);
        self.vectors.extend_from_slice(v);
    }

    /// Copies row `row` of `other` into this segment.
    pub fn push_from(&mut self, other: &Segment, row: usize) {
        self.push(
            other.ids[row],
            other.texts[row].clone(),
            other.meta_json[row].clone(),
            other.metas[row].clone(),
            other.created_ms[row],
            other.vector(row),
        );
    }

    fn schema(dim: usize, source: Option<&VectorSource>) -> Arc<Schema> {
        let item = Arc::new(Field::new("item", DataType::Float32, false));
        let fields = vec![
            Field::new("id", DataType::UInt64, false),
            Field::new("text", DataType::Utf8, false),
            Field::new("meta", DataType::Utf8, false),
            Field::new("created_ms", DataType::Int64, false),
            Field::new("embedding", DataType::FixedSizeList(item, dim as i32), false),
        ];
        let mut metadata: std::collections::HashMap<String, String> =
            [("aios.kind".to_string(), "memory-segment".to_string())].into_iter().collect();
        if let Some(source) = source {
            metadata.insert(KEY_SOURCE.to_string(), serde_json::to_string(source).expect("source serialises"));
        }
        Arc::new(Schema::new_with_metadata(fields, metadata))
    }

    /// The Arrow IPC file bytes of this segment.
    pub fn encode(&self, name: &str) -> Result<Vec<u8>> {
        let schema = Self::schema(self.dim, self.source.as_ref());
        let arrow = |e: arrow_schema::ArrowError| Error::format(name, format!("arrow: {e}"));
        let mut buf = Vec::new();
        let mut writer = FileWriter::try_new(&mut buf, &schema).map_err(arrow)?;
        for start in (0..self.len()).step_by(BATCH_ROWS) {
            let end = (start + BATCH_ROWS).min(self.len());
            let item = Arc::new(Field::new("item", DataType::Float32, false));
            let values = Float32Array::from(self.vectors[start * self.dim..end * self.dim].to_vec());
            let embedding =
                FixedSizeListArray::try_new(item, self.dim as i32, Arc::new(values), None).map_err(arrow)?;
            let batch = RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(UInt64Array::from(self.ids[start..end].to_vec())),
                    Arc::new(StringArray::from_iter_values(&self.texts[start..end])),
                    Arc::new(StringArray::from_iter_values(&self.meta_json[start..end])),
                    Arc::new(Int64Array::from(self.created_ms[start..end].to_vec())),
                    Arc::new(embedding),
                ],
            )
            .map_err(arrow)?;
            writer.write(&batch).map_err(arrow)?;
        }
        writer.finish().map_err(arrow)?;
        drop(writer);
        Ok(buf)
    }

    /// Parses and validates a segment file's bytes; `name` is used in errors.
    /// `dim` is the store's dimension, or None to take the file's own (when
    /// a store is rebuilt from segments alone).
    pub fn decode(bytes: Vec<u8>, dim: Option<usize>, name: &str) -> Result<Segment> {
        let bad = |msg: String| Error::format(name, msg);
        let reader =
            FileReader::try_new(Cursor::new(bytes), None).map_err(|e| bad(format!("not an Arrow IPC file: {e}")))?;
        let dim = match dim {
            Some(d) => d,
            None => match reader.schema().fields().get(4).map(|f| f.data_type().clone()) {
                Some(DataType::FixedSizeList(_, d)) if d > 0 && d as usize <= super::store::MAX_DIM => d as usize,
                _ => return Err(bad("no embedding column of a valid dimension".into())),
            },
        };
        let source = match reader.schema().metadata().get(KEY_SOURCE) {
            Some(json) => Some(
                serde_json::from_str::<VectorSource>(json).map_err(|e| bad(format!("invalid {KEY_SOURCE}: {e}")))?,
            ),
            None => None,
        };
        let expected = Self::schema(dim, None);
        if reader.schema().fields() != expected.fields() {
            return Err(bad(format!(
                "unexpected schema {:?}; expected id, text, meta, created_ms, embedding[{dim}]",
                reader.schema().fields().iter().map(|f| format!("{}: {}", f.name(), f.data_type())).collect::<Vec<_>>()
            )));
        }
        let mut seg = Segment { source, ..Segment::new(dim) };
        for batch in reader {
            let batch = batch.map_err(|e| bad(format!("unreadable record batch: {e}")))?;
            let col = |i: usize| batch.column(i).clone();
            let ids = col(0);
            let ids = ids.as_any().downcast_ref::<UInt64Array>().ok_or_else(|| bad("id column".into()))?;
            let texts = col(1);
            let texts = texts.as_any().downcast_ref::<StringArray>().ok_or_else(|| bad("text column".into()))?;
            let metas = col(2);
            let metas = metas.as_any().downcast_ref::<StringArray>().ok_or_else(|| bad("meta column".into()))?;
            let created = col(3);
            let created =
                created.as_any().downcast_ref::<Int64Array>().ok_or_else(|| bad("created_ms column".into()))?;
            let emb = col(4);
            let emb =
                emb.as_any().downcast_ref::<FixedSizeListArray>().ok_or_else(|| bad("embedding column".into()))?;
            if [ids.null_count(), texts.null_count(), metas.null_count(), created.null_count(), emb.null_count()]
                .iter()
                .any(|&n| n > 0)
            {
                return Err(bad("null values in a non-nullable column".into()));
            }
            let values = emb.values();
            let values =
                values.as_any().downcast_ref::<Float32Array>().ok_or_else(|| bad("embedding values".into()))?;
            let offset = emb.offset() * dim;
            let floats = &values.values()[offset..offset + emb.len() * dim];
            if floats.iter().any(|x| !x.is_finite()) {
                return Err(bad("embedding holds NaN or infinity".into()));
            }
            for i in 0..batch.num_rows() {
                let meta_text = metas.value(i);
                let meta = match serde_json::from_str::<Value>(meta_text) {
                    Ok(Value::Object(m)) => m,
                    _ => {
                        return Err(bad(format!("row {} (id {}): meta is not a JSON object", seg.len(), ids.value(i))))
                    }
                };
                seg.push(
                    ids.value(i),
                    texts.value(i).to_string(),
                    meta_text.to_string(),
                    meta,
                    created.value(i),
                    &floats[i * dim..(i + 1) * dim],
                );
            }
        }
        if seg.ids.windows(2).any(|w| w[0] >= w[1]) {
            return Err(bad("ids are not strictly increasing".into()));
        }
        Ok(seg)
    }
}
