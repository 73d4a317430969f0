//! The long fuzz run (numbers for bench/RESULTS.md):
//! `cargo run --release -p aios-core --example fuzz -- [MUTANTS_PER_TARGET] [SEED]`
//! (runs `target/release/aios-run info` on every 50th weight mutant if built).

#[path = "../tests/support/fuzz.rs"]
mod harness;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let seed: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(1);
    let dir = tempfile::tempdir().expect("temp dir");
    let bin = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/release/aios-run");
    let cli = bin.is_file().then_some((bin.as_path(), 50));
    let t0 = std::time::Instant::now();
    let results = harness::run(dir.path(), n, seed, cli);
    let mut total = 0;
    let mut failures = 0;
    for (target, c) in &results {
        total += c.mutants;
        failures += c.failures();
        println!("{target:16} {c:?}");
    }
    println!("{total} mutants in {:.0} s, seed {seed}: {failures} failures", t0.elapsed().as_secs_f64());
    if failures > 0 {
        std::process::exit(1);
    }
}
