//! A short, seeded run of the mutation fuzzer (the long run is
//! `cargo run --release -p aios-core --example fuzz`).

#[path = "support/fuzz.rs"]
mod harness;

#[test]
fn mutants_never_panic_hang_or_lose_data_silently() {
    let dir = tempfile::tempdir().unwrap();
    let results = harness::run(dir.path(), 300, 7, None);
    for (target, c) in &results {
        assert_eq!(c.failures(), 0, "{target}: {c:?}");
        assert!(c.rejected > 0, "{target}: no mutant was rejected, so nothing was tested: {c:?}");
        assert_eq!(c.tensor_mutants, c.tensor_mutants_detected, "{target}: a damaged tensor loaded: {c:?}");
    }
    assert!(results["weights_f32"].tensor_mutants > 0);
    let silenced: u64 = results.values().map(|c| c.panics_silenced).sum();
    eprintln!("decoder panics caught silently: {silenced}");
}
