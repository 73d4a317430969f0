//! Which dot-product kernel the memory search uses: NumKong (SimSIMD's
//! successor, the one we ship), SimSIMD 6, and a plain Rust loop the compiler
//! vectorises, on 384-d vectors (MiniLM). Each iteration scans 100k rows
//! (f32: 154 MB, int8: 38 MB), as one search over a 1e5 store would.
//!
//! Run: `cargo bench -p aios-core --bench search_kernels`

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::hint::black_box;
use std::time::Duration;

const DIM: usize = 384;
const ROWS: usize = 100_000;

fn plain_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    for (ca, cb) in a.chunks_exact(16).zip(b.chunks_exact(16)) {
        for i in 0..16 {
            acc[i] += ca[i] * cb[i];
        }
    }
    acc.iter().sum()
}

fn plain_i8(a: &[i8], b: &[i8]) -> i32 {
    a.iter().zip(b).map(|(&x, &y)| x as i32 * y as i32).sum()
}

fn bench(c: &mut Criterion) {
    let mut s = 1u32;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        (s % 2001) as f32 / 1000.0 - 1.0
    };
    let rows: Vec<f32> = (0..ROWS * DIM).map(|_| next()).collect();
    let q: Vec<f32> = (0..DIM).map(|_| next()).collect();
    let rows8: Vec<i8> = rows.iter().map(|x| (x * 127.0) as i8).collect();
    let q8: Vec<i8> = q.iter().map(|x| (x * 127.0) as i8).collect();

    let mut g = c.benchmark_group("scan_100k_x_384");
    g.sample_size(20).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    g.throughput(Throughput::Bytes((ROWS * DIM * 4) as u64));
    g.bench_function("f32/numkong", |b| {
        b.iter(|| rows.chunks_exact(DIM).map(|r| <f32 as numkong::Dot>::dot(&q, r).unwrap() as f32).sum::<f32>())
    });
    g.bench_function("f32/simsimd", |b| {
        b.iter(|| {
            rows.chunks_exact(DIM).map(|r| <f32 as simsimd::SpatialSimilarity>::dot(&q, r).unwrap() as f32).sum::<f32>()
        })
    });
    g.bench_function("f32/plain", |b| {
        b.iter(|| rows.chunks_exact(DIM).map(|r| plain_f32(black_box(&q), r)).sum::<f32>())
    });
    g.throughput(Throughput::Bytes((ROWS * DIM) as u64));
    g.bench_function("i8/numkong", |b| {
        b.iter(|| rows8.chunks_exact(DIM).map(|r| <i8 as numkong::Dot>::dot(&q8, r).unwrap()).sum::<i32>())
    });
    g.bench_function("i8/simsimd", |b| {
        b.iter(|| {
            rows8
                .chunks_exact(DIM)
                .map(|r| <i8 as simsimd::SpatialSimilarity>::dot(&q8, r).unwrap() as i64)
                .sum::<i64>()
        })
    });
    g.bench_function("i8/plain", |b| {
        b.iter(|| rows8.chunks_exact(DIM).map(|r| plain_i8(black_box(&q8), r)).sum::<i32>())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
