//! One way to build the dedicated rayon pools that bound each object's
//! threads (`threads=` on Engine, MemoryStore, Embedder).

use crate::{input_err, Error, Result};

/// A pool of `threads` workers (default: every core), named `aios-<what>-<i>`.
pub fn thread_pool(threads: Option<usize>, what: &'static str) -> Result<rayon::ThreadPool> {
    let threads = match threads {
        Some(0) => return input_err!("threads must be >= 1"),
        Some(n) if n > 1024 => return input_err!("threads = {n} is absurd"),
        Some(n) => n,
        None => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    };
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(move |i| format!("aios-{what}-{i}"))
        .build()
        .map_err(|e| Error::Input(format!("could not start {threads} threads: {e}")))
}
