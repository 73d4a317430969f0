//! f32 `x W^T (+ b)` for the dense layers, parallelised by us rather than by
//! candle. On a diffusion canvas (64-128 rows) candle's matmul gets no
//! speed-up from a second core (gemm's own threading costs more than it saves
//! at these sizes, bench/RESULTS.md), while splitting the output columns into
//! fixed-size chunks does. The split depends only on the shape, never on the
//! thread count, and each output element is computed by exactly one
//! sequential gemm call, so results are identical on any number of threads.

use gemm::Parallelism;
use rayon::prelude::*;

/// Output columns per task: large enough to keep the microkernel busy, small
/// enough to balance two to eight cores on the tiny model's 768-wide layers.
const COLS_PER_TASK: usize = 128;
/// At most this many rows take the dot-product path; above it, gemm's packing
/// pays off (`cargo run --release --example embed`, bench/RESULTS.md).
const SMALL_ROWS: usize = 16;

struct SendPtr(*mut f32);
// SAFETY: tasks write disjoint column ranges of the output (see below).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// `y[rows, n] = x[rows, k] · w[n, k]^T + bias[n]`, all row-major.
pub fn linear_f32(x: &[f32], w: &[f32], bias: Option<&[f32]>, rows: usize, k: usize, n: usize) -> Vec<f32> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_naive_and_is_thread_count_independent() {
        // Small-row (dot) path, gemm path, and a single row.
        for (rows, k, n) in [(7, 33, 300), (40, 33, 300), (1, 384, 130)] {
            let x: Vec<f32> = (0..rows * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
            let w: Vec<f32> = (0..n * k).map(|i| ((i * 53 % 97) as f32 - 48.0) / 97.0).collect();
            let b: Vec<f32> = (0..n).map(|i| i as f32 / 100.0).collect();
            let y = linear_f32(&x, &w, Some(&b), rows, k, n);
            for i in 0..rows {
                for j in 0..n {
                    let want: f32 = (0..k).map(|kk| x[i * k + kk] * w[j * k + kk]).sum::<f32>() + b[j];
                    assert!((y[i * n + j] - want).abs() < 1e-4, "{i},{j}");
                }
            }
            let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
            assert_eq!(one.install(|| linear_f32(&x, &w, Some(&b), rows, k, n)), y);
        }
    }
}
