//! Exact top-k search: SIMD dot products over every live row, parallel over
//! row chunks, merged under a total order (score descending, then id
//! ascending) so the result does not depend on the thread count.
//!
//! Kernels, chosen by `cargo bench -p aios-core --bench search_kernels`
//! (bench/RESULTS.md): SimSIMD for f32 (NumKong, its successor, accumulates
//! f32 in f64 and scans about 1.5x slower) and NumKong for i8 (about 1.2x
//! faster than SimSIMD's).

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use serde_json::{Map, Value};

use crate::{input_err, Result};

/// Which stored vectors a search scans.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// Exact f32 cosine over every row.
    #[default]
    F32,
    /// Scan int8 codes (a quarter of the memory traffic), then re-score the
    /// best `rerank_pool(k)` candidates in f32. Scores returned are exact.
    Int8,
}

impl std::str::FromStr for Precision {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(Precision::F32),
            "int8" | "i8" => Ok(Precision::Int8),
            other => input_err!("unknown precision '{other}' (expected f32 or int8)"),
        }
    }
}

/// How many int8 candidates are re-scored in f32 for a top-k query.
pub fn rerank_pool(k: usize) -> usize {
    (4 * k).max(k + 32)
}

/// f32 dot product (vectors are L2-normalised, so this is the cosine).
#[inline]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    <f32 as simsimd::SpatialSimilarity>::dot(a, b).expect("dot_f32: equal lengths") as f32
}

/// i8 dot product with i32 accumulation.
#[inline]
pub fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
    <i8 as numkong::Dot>::dot(a, b).expect("dot_i8: equal lengths")
}

/// Row-wise symmetric int8 codes: `x ~= code * scale`, `scale = max|x| / 127`.
#[derive(Debug, Default)]
pub struct Int8Rows {
    pub codes: Vec<i8>,
    pub scales: Vec<f32>,
}

/// Quantises every row (in parallel on the current rayon pool).
pub fn quantize_rows(vectors: &[f32], dim: usize) -> Int8Rows {
    use rayon::prelude::*;
    let rows = vectors.len() / dim.max(1);
    let mut codes = vec![0i8; vectors.len()];
    let mut scales = vec![0f32; rows];
    codes.par_chunks_mut(dim * 1024).zip(scales.par_chunks_mut(1024)).zip(vectors.par_chunks(dim * 1024)).for_each(
        |((codes, scales), vectors)| {
            for ((out, row), scale) in codes.chunks_exact_mut(dim).zip(vectors.chunks_exact(dim)).zip(scales) {
                *scale = quantize_one(row, out);
            }
        },
    );
    Int8Rows { codes, scales }
}

/// Quantises one vector into `out` and returns its scale.
pub fn quantize_one(row: &[f32], out: &mut [i8]) -> f32 {
    let max = row.iter().fold(0f32, |m, x| m.max(x.abs()));
    if max == 0.0 {
        out.fill(0);
        return 0.0;
    }
    let inv = 127.0 / max;
    for (o, x) in out.iter_mut().zip(row) {
        *o = (x * inv).round().clamp(-127.0, 127.0) as i8;
    }
    max / 127.0
}

/// One scored row: `slot` locates it in the snapshot (segment, row).
#[derive(Debug, Clone, Copy)]
pub struct Scored {
    pub score: f32,
    pub id: u64,
    pub segment: u32,
    pub row: u32,
}

impl Scored {
    /// The total order of results: higher score first, then lower id.
    pub fn rank_cmp(&self, other: &Self) -> Ordering {
        other.score.total_cmp(&self.score).then(self.id.cmp(&other.id))
    }
}

/// Heap entry ordered so that the heap's maximum is the worst kept result.
struct Worst(Scored);

impl PartialEq for Worst {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Worst {}
impl PartialOrd for Worst {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Worst {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.rank_cmp(&other.0)
    }
}

/// Keeps the best `k` of everything pushed.
pub struct TopK {
    k: usize,
    heap: BinaryHeap<Worst>,
}

impl TopK {
    pub fn new(k: usize) -> Self {
        TopK { k, heap: BinaryHeap::with_capacity(k.min(1 << 16) + 1) }
    }

    #[inline]
    pub fn push(&mut self, s: Scored) {
        if self.heap.len() < self.k {
            self.heap.push(Worst(s));
        } else if let Some(worst) = self.heap.peek() {
            if s.rank_cmp(&worst.0) == Ordering::Less {
                self.heap.pop();
                self.heap.push(Worst(s));
            }
        }
    }

    /// The score a new row must beat to enter (None while not full).
    #[inline]
    pub fn threshold(&self) -> Option<f32> {
        if self.heap.len() < self.k {
            None
        } else {
            self.heap.peek().map(|w| w.0.score)
        }
    }

    pub fn merge(mut self, other: TopK) -> TopK {
        for w in other.heap {
            self.push(w.0);
        }
        self
    }

    /// Best first.
    pub fn into_sorted(self) -> Vec<Scored> {
        let mut v: Vec<Scored> = self.heap.into_iter().map(|w| w.0).collect();
        v.sort_by(Scored::rank_cmp);
        v
    }
}

/// Metadata filter: every key must be present with exactly this JSON value.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filter {
    equals: Vec<(String, Value)>,
}

impl Filter {
    /// Parses a JSON object such as `{"tag": "travel"}`.
    pub fn from_json(text: &str) -> Result<Self> {
        match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(map)) => Ok(Self::from_map(map)),
            Ok(_) => input_err!("a filter must be a JSON object such as {{\"tag\": \"travel\"}}"),
            Err(e) => input_err!("filter is not valid JSON: {e}"),
        }
    }

    pub fn from_map(map: Map<String, Value>) -> Self {
        Filter { equals: map.into_iter().collect() }
    }

    pub fn is_empty(&self) -> bool {
        self.equals.is_empty()
    }

    pub fn matches(&self, meta: &Map<String, Value>) -> bool {
        self.equals.iter().all(|(k, v)| meta.get(k) == Some(v))
    }
}
