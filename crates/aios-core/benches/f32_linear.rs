//! f32 linear layers: the `gemm` crate (re-packs the weight on every call;
//! column-chunked over our pool, the runtime's path before `quant::packed`,
//! kept here as the reference) against our kernel on weights packed once at
//! load (`quant::packed`), on the shapes the runtime runs: diffusion canvases
//! (64-128 rows), one embedded query (7-30 rows) and single rows.
//!
//! Run: `cargo bench -p aios-core --bench f32_linear` (2 threads; set
//! `AIOS_BENCH_THREADS` to change).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use gemm::Parallelism;
use rayon::prelude::*;
use std::time::Duration;

use aios_core::quant::packed::PackedMatrix;

const COLS_PER_TASK: usize = 128;
const SMALL_ROWS: usize = 16;

struct SendPtr(*mut f32);
// SAFETY: tasks write disjoint column ranges of the output (see below).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// `y[rows, n] = x[rows, k] · w[n, k]^T + bias[n]`, all row-major.
fn linear_f32(x: &[f32], w: &[f32], bias: Option<&[f32]>, rows: usize, k: usize, n: usize) -> Vec<f32> {
    assert_eq!(x.len(), rows * k, "linear_f32: x has the wrong length");
    assert_eq!(w.len(), n * k, "linear_f32: w has the wrong length");
    let mut y = match bias {
        Some(b) => {
            assert_eq!(b.len(), n, "linear_f32: bias has the wrong length");
            b.repeat(rows)
        }
        None => vec![0f32; rows * n],
    };
    if rows == 0 || n == 0 {
        return y;
    }
    let out = SendPtr(y.as_mut_ptr());
    let out = &out;
    if rows <= SMALL_ROWS {
        // A few rows (one embedded query, the positions still masked): gemm
        // would spend as long packing the weights as multiplying, so stream
        // each weight row once through a 4-row dot-product kernel instead.
        (0..n.div_ceil(COLS_PER_TASK)).into_par_iter().for_each(|c| {
            let j0 = c * COLS_PER_TASK;
            for j in j0..(j0 + COLS_PER_TASK).min(n) {
                let wj = &w[j * k..(j + 1) * k];
                for r in (0..rows).step_by(4) {
                    let take = (rows - r).min(4);
                    let d = dot_rows(&x[r * k..(r + take) * k], wj, k);
                    for (i, v) in d.iter().take(take).enumerate() {
                        // SAFETY: (r + i, j) is inside y; column j belongs to this task only.
                        unsafe { *out.0.add((r + i) * n + j) += v };
                    }
                }
            }
        });
        return y;
    }
    (0..n.div_ceil(COLS_PER_TASK)).into_par_iter().for_each(|c| {
        let j0 = c * COLS_PER_TASK;
        let nc = COLS_PER_TASK.min(n - j0);
        // SAFETY: every pointer stays inside its buffer: dst covers rows x
        // [j0, j0+nc) of y (row stride n), lhs is x (row stride k), rhs element
        // (kk, j) is w[(j0 + j) * k + kk]. Tasks touch disjoint columns of y.
        unsafe {
            gemm::gemm(
                rows,
                nc,
                k,
                out.0.add(j0),
                1,
                n as isize,
                true,
                x.as_ptr(),
                1,
                k as isize,
                w.as_ptr().add(j0 * k),
                k as isize,
                1,
                1.0,
                1.0,
                false,
                false,
                false,
                Parallelism::None,
            );
        }
    });
    y
}

/// Dot products of up to 4 rows of `x` (each `k` long) with one weight row,
/// sharing every load of `w`; 16 lanes per row stay in vector registers.
#[inline]
fn dot_rows(x: &[f32], w: &[f32], k: usize) -> [f32; 4] {
    const L: usize = 16;
    let rows = x.len() / k;
    let mut acc = [[0f32; L]; 4];
    let full = k / L * L;
    for c in (0..full).step_by(L) {
        let wc = &w[c..c + L];
        for (r, a) in acc.iter_mut().enumerate().take(rows) {
            let xc = &x[r * k + c..r * k + c + L];
            for l in 0..L {
                a[l] += xc[l] * wc[l];
            }
        }
    }
    let mut out = [0f32; 4];
    for (r, o) in out.iter_mut().enumerate().take(rows) {
        let tail: f32 = (full..k).map(|i| x[r * k + i] * w[i]).sum();
        *o = acc[r].iter().sum::<f32>() + tail;
    }
    out
}

fn bench(c: &mut Criterion) {
    let threads: usize = std::env::var("AIOS_BENCH_THREADS").ok().and_then(|s| s.parse().ok()).unwrap_or(2);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    // (in, out): tiny DiT (D=256), MiniLM (D=384), edge config (D=768).
    let layers = [
        (256, 768),
        (256, 1024),
        (1024, 256),
        (256, 4096),
        (384, 384),
        (384, 1536),
        (1536, 384),
        (768, 2304),
        (3072, 768),
    ];
    let mut g = c.benchmark_group(format!("f32_linear_{threads}t"));
    g.sample_size(20).warm_up_time(Duration::from_millis(200)).measurement_time(Duration::from_secs(1));
    for rows in [1usize, 7, 30, 64, 128] {
        for (k, n) in layers {
            let x: Vec<f32> = (0..rows * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
            let w: Vec<f32> = (0..n * k).map(|i| ((i * 53 % 97) as f32 - 48.0) / 970.0).collect();
            let b: Vec<f32> = (0..n).map(|i| i as f32 / 100.0).collect();
            let packed = PackedMatrix::pack(&w, n, k);
            let id = format!("{rows}x{k}x{n}");
            g.throughput(Throughput::Elements((2 * rows * k * n) as u64));
            g.bench_function(BenchmarkId::new("gemm", &id), |bn| {
                bn.iter(|| pool.install(|| linear_f32(&x, &w, Some(&b), rows, k, n)))
            });
            g.bench_function(BenchmarkId::new("packed", &id), |bn| {
                bn.iter(|| pool.install(|| packed.linear(&x, Some(&b), rows)))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
