//! Bindings for the memory store and the sentence embedder. The typed
//! wrapper in `python/aios_rt` converts dicts to JSON and arrays to bytes;
//! here every argument is plain and every call releases the GIL.

use aios_core::memory::store::Query;
use aios_core::memory::{self as core, Filter, NewMemory, Precision};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::{count, f32_bytes, floats, input_error, opt_count, run, to_py, PyPath};

/// (id, score, text, meta JSON, created_ms)
type HitTuple = (u64, f32, String, String, i64);

fn hit_tuple(h: core::Hit) -> HitTuple {
    (h.id, h.score, h.text, h.meta, h.created_ms)
}

fn parse_filter(filter: Option<&str>) -> PyResult<Option<Filter>> {
    filter.map(Filter::from_json).transpose().map_err(to_py)
}

#[pyclass(frozen, module = "aios_rt._native")]
pub struct MemoryStore {
    /// Shared with the engines that search it.
    pub(crate) inner: std::sync::Arc<core::MemoryStore>,
}

#[pymethods]
impl MemoryStore {
    #[new]
    #[pyo3(signature = (path, dim=None, embedder=None, read_only=false, threads=None, recover=false))]
    fn new(
        py: Python<'_>,
        path: PyPath,
        dim: Option<&Bound<'_, PyAny>>,
        embedder: Option<PyPath>,
        read_only: bool,
        threads: Option<&Bound<'_, PyAny>>,
        recover: bool,
    ) -> PyResult<Self> {
        let opts = core::StoreOptions {
            read_only,
            dim: opt_count(dim, "dim")?,
            embedder: embedder.map(|p| p.0),
            threads: opt_count(threads, "threads")?,
            recover,
        };
        run(py, || core::MemoryStore::open(&path, opts)).map(|inner| MemoryStore { inner: std::sync::Arc::new(inner) })
    }

    /// Adds memories; `vectors` is row-major little-endian f32 bytes or None.
    #[pyo3(signature = (texts, metas, vectors=None))]
    fn add_many(
        &self,
        py: Python<'_>,
        texts: Vec<String>,
        metas: Vec<Option<String>>,
        vectors: Option<&[u8]>,
    ) -> PyResult<Vec<u64>> {
        if metas.len() != texts.len() {
            return Err(input_error(format!("{} texts but {} metas", texts.len(), metas.len())));
        }
        let mut rows: Vec<Option<Vec<f32>>> = vec![None; texts.len()];
        if let Some(data) = vectors {
            let flat = floats(data, "vectors")?;
            if texts.is_empty() || flat.len() % texts.len() != 0 {
                return Err(input_error(format!("{} floats do not split into {} vectors", flat.len(), texts.len())));
            }
            let dim = flat.len() / texts.len();
            for (slot, v) in rows.iter_mut().zip(flat.chunks_exact(dim.max(1))) {
                *slot = Some(v.to_vec());
            }
        }
        let memories = texts
            .into_iter()
            .zip(metas)
            .zip(rows)
            .map(|((text, meta), vector)| NewMemory { text, meta, vector })
            .collect();
        run(py, || self.inner.add_many(memories))
    }

    #[pyo3(signature = (query, k, precision="f32", filter=None))]
    fn search_text(
        &self,
        py: Python<'_>,
        query: &str,
        k: &Bound<'_, PyAny>,
        precision: &str,
        filter: Option<&str>,
    ) -> PyResult<Vec<HitTuple>> {
        self.search(py, Query::Text(query), k, precision, filter)
    }

    #[pyo3(signature = (vector, k, precision="f32", filter=None))]
    fn search_vector(
        &self,
        py: Python<'_>,
        vector: &[u8],
        k: &Bound<'_, PyAny>,
        precision: &str,
        filter: Option<&str>,
    ) -> PyResult<Vec<HitTuple>> {
        let q = floats(vector, "query vector")?;
        self.search(py, Query::Vector(&q), k, precision, filter)
    }

    fn get(&self, id: &Bound<'_, PyAny>) -> PyResult<Option<HitTuple>> {
        let Ok(id) = id.extract::<u64>() else { return Ok(None) };
        Ok(self.inner.get(id).map(hit_tuple))
    }

    fn delete(&self, py: Python<'_>, ids: Vec<Bound<'_, PyAny>>) -> PyResult<()> {
        let ids: Vec<u64> = ids
            .iter()
            .map(|i| i.extract::<u64>().map_err(|_| input_error(format!("no memory with id {i}"))))
            .collect::<PyResult<_>>()?;
        run(py, || self.inner.delete(&ids))
    }

    fn compact(&self, py: Python<'_>) -> PyResult<u64> {
        run(py, || self.inner.compact())
    }

    fn close(&self, py: Python<'_>) -> PyResult<()> {
        run(py, || {
            self.inner.close();
            Ok(())
        })
    }

    fn refresh(&self, py: Python<'_>) -> PyResult<bool> {
        run(py, || self.inner.refresh())
    }

    /// Embeds texts with this store's embedder -> (f32 bytes, dimension).
    fn embed(&self, py: Python<'_>, texts: Vec<String>) -> PyResult<(Py<PyBytes>, usize)> {
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let (v, dim) = run(py, || Ok((self.inner.embed(&refs)?, self.inner.embedder()?.dim())))?;
        Ok((f32_bytes(py, &v).unbind(), dim))
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.stats();
        let d = PyDict::new(py);
        d.set_item("memories", s.memories)?;
        d.set_item("deleted", s.deleted)?;
        d.set_item("segments", s.segments)?;
        d.set_item("dim", s.dim)?;
        d.set_item("source", s.source.map(|s| s.to_string()))?;
        d.set_item("version", s.version)?;
        d.set_item("bytes", s.bytes)?;
        d.set_item("path", self.inner.dir().display().to_string())?;
        Ok(d)
    }

    #[getter]
    fn warnings(&self) -> Vec<String> {
        self.inner.warnings().to_vec()
    }

    #[getter]
    fn dim(&self) -> Option<usize> {
        self.inner.dim()
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }
}

impl MemoryStore {
    /// Argument checks shared by both search entry points, then the search without the GIL.
    fn search(
        &self,
        py: Python<'_>,
        query: Query<'_>,
        k: &Bound<'_, PyAny>,
        precision: &str,
        filter: Option<&str>,
    ) -> PyResult<Vec<HitTuple>> {
        let k = count(k, "k")?;
        let precision: Precision = precision.parse().map_err(to_py)?;
        let filter = parse_filter(filter)?;
        run(py, || self.inner.search(query, k, precision, filter.as_ref()))
            .map(|hits| hits.into_iter().map(hit_tuple).collect())
    }
}

#[pyclass(frozen, module = "aios_rt._native")]
pub struct Embedder {
    inner: core::Embedder,
    /// A dedicated pool so `threads=` bounds this embedder only.
    pool: rayon::ThreadPool,
}

#[pymethods]
impl Embedder {
    #[new]
    #[pyo3(signature = (path, threads=None))]
    fn new(py: Python<'_>, path: PyPath, threads: Option<&Bound<'_, PyAny>>) -> PyResult<Self> {
        let threads = opt_count(threads, "threads")?;
        run(py, || {
            let pool = aios_core::threads::thread_pool(threads, "embed")?;
            Ok(Embedder { inner: core::Embedder::open(&path)?, pool })
        })
    }

    fn embed(&self, py: Python<'_>, texts: Vec<String>) -> PyResult<Py<PyBytes>> {
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let v = run(py, || self.pool.install(|| self.inner.embed(&refs)))?;
        Ok(f32_bytes(py, &v).unbind())
    }

    #[getter]
    fn dim(&self) -> usize {
        self.inner.dim()
    }

    #[getter]
    fn fingerprint(&self) -> String {
        self.inner.fingerprint().to_string()
    }
}
