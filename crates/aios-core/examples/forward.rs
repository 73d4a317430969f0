//! Times forward passes of a model file: `cargo run --release --example forward -- MODEL [LEN] [N] [THREADS]`.
//! Handy under `perf` or `valgrind --tool=callgrind`.

use aios_core::{Engine, EngineOptions};

fn main() -> aios_core::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let path = args.get(1).map(String::as_str).unwrap_or("models/aios-text-tiny");
    let len: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(64);
    let n: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(16);
    let threads: Option<usize> = args.get(4).and_then(|s| s.parse().ok());
    let e = Engine::open(path, &EngineOptions { threads, ..Default::default() })?;
    let toks: Vec<u32> = (0..len as u32).map(|i| (i * 7 + 1) % e.config().vocab_size as u32).collect();
    e.logits(std::slice::from_ref(&toks), None)?;
    let t = std::time::Instant::now();
    for _ in 0..n {
        e.logits(std::slice::from_ref(&toks), None)?;
    }
    println!("{:.2} ms per forward (len {len})", t.elapsed().as_secs_f64() * 1e3 / n as f64);
    Ok(())
}
