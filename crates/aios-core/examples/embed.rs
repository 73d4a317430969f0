//! Times the sentence embedder: `cargo run --release --example embed -- MODEL_DIR [N] [THREADS]`.

use std::time::Instant;

use aios_core::memory::Embedder;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = args.get(1).expect("usage: embed MODEL_DIR [N] [THREADS]");
    let n: usize = args.get(2).map_or(256, |s| s.parse().unwrap());
    let threads: usize = args.get(3).map_or(1, |s| s.parse().unwrap());
    let pool = aios_core::threads::thread_pool(Some(threads), "embed").unwrap();
    let e = Embedder::open(std::path::Path::new(dir)).unwrap();
    let base = [
        "Our trip to Kyoto was in April 2025; we saw the cherry blossoms.",
        "The dentist appointment moved to Tuesday at 9am.",
        "Grandma's lemon cake needs three eggs and a cup of sugar.",
        "when did we visit Japan?",
    ];
    let texts: Vec<String> = (0..n).map(|i| format!("{} ({i})", base[i % base.len()])).collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    pool.install(|| e.embed(&refs[..4])).unwrap();
    let t = Instant::now();
    pool.install(|| e.embed(&refs)).unwrap();
    let batch = t.elapsed().as_secs_f64();
    let median_ms = |q: &str| {
        let mut one = vec![];
        for _ in 0..21 {
            let t = Instant::now();
            pool.install(|| e.embed(&[q])).unwrap();
            one.push(t.elapsed().as_secs_f64() * 1e3);
        }
        one.sort_by(f64::total_cmp);
        one[10]
    };
    let short = median_ms("when did we visit Japan?");
    let long = median_ms(
        "The 14th Dalai Lama is the current Dalai Lama, the highest spiritual leader and head of Tibetan Buddhism.",
    );
    println!(
        "{n} sentences: {:.1} sent/s; one query: {short:.2} ms (7 tokens), {long:.2} ms (25 tokens)",
        n as f64 / batch
    );
}
