//! The low-level kernels that `model`, `sampler`, `quant` and `memory` share
//! (one copy each): exp, GELU, lane reductions in a fixed order (so results
//! depend only on the length, never on threads), dot, and the raw output
//! pointer that parallel tasks write disjoint parts of. Written so the
//! compiler vectorises them: profiling the tiny model (perf, 1 thread) showed
//! candle's GELU spending 36% of a forward pass in scalar libm
//! `tanhf`/`expm1f`; these auto-vectorise (AVX2/AVX-512/NEON).

/// exp(x) for x in [-87, 88], relative error ~2e-7: Cody-Waite range
/// reduction to r in [-ln2/2, ln2/2] and a degree-7 Taylor polynomial.
/// Branch-free and without float-to-int casts (Rust's saturating casts stop
/// the compiler from vectorising), so loops over slices vectorise.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 * 2^23 rounds to an integer n held in the low mantissa
    // bits: bits(t) = bits(1.5 * 2^23) + n for |n| < 2^22.
    const SHIFTER: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let t = x * LOG2E + SHIFTER;
    let n = t - SHIFTER;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // 2^n by building the exponent bits directly: (n + 127) << 23.
    let scale = f32::from_bits(t.to_bits().wrapping_sub(SHIFTER.to_bits()).wrapping_add(127) << 23);
    p * scale
}

/// GELU, tanh approximation: 0.5 x (1 + tanh(z)) = x * sigmoid(2z),
/// z = sqrt(2/pi) (x + 0.044715 x^3). Same function as PyTorch's
/// `gelu(approximate="tanh")`, to ~1e-7 relative.
#[inline(always)]
pub fn gelu_tanh_scalar(x: f32) -> f32 {
    const K: f32 = 0.797_884_6; // sqrt(2/pi)
    let z = K * (x + 0.044_715 * x * x * x);
    x / (1.0 + exp_f32(-2.0 * z))
}

/// The maximum of `x` (NaN ignored; -inf if empty) and whether `x` holds a
/// NaN, in one pass of 16 lanes (vectorises).
#[inline]
pub fn max_and_nan(x: &[f32]) -> (f32, bool) {
    let (mut m, mut nan) = ([f32::NEG_INFINITY; 16], [false; 16]);
    let chunks = x.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..16 {
            m[l] = if c[l] > m[l] { c[l] } else { m[l] };
            nan[l] |= c[l].is_nan();
        }
    }
    let m = tail.iter().chain(&m).fold(f32::NEG_INFINITY, |a, &v| if v > a { v } else { a });
    (m, nan.contains(&true) || tail.iter().any(|v| v.is_nan()))
}

/// `Σ x` in 16 lane sums and a fixed pairwise tree (vectorises; the order,
/// and so the result, depends only on the length).
#[inline]
pub fn sum_by_lanes(x: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let chunks = x.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for l in 0..16 {
            lanes[l] += c[l];
        }
    }
    let mut width = 8;
    while width > 0 {
        for l in 0..width {
            lanes[l] += lanes[l + width];
        }
        width /= 2;
    }
    lanes[0] + tail
}

/// Mean and (biased) variance of `x` in f64, in 8 lanes (vectorises).
#[inline]
pub fn mean_var_f64(x: &[f32]) -> (f64, f64) {
    fn lane_sum(x: &[f32], f: impl Fn(f32) -> f64) -> f64 {
        let mut lanes = [0f64; 8];
        let chunks = x.chunks_exact(8);
        let tail: f64 = chunks.remainder().iter().map(|&v| f(v)).sum();
        for c in chunks {
            for l in 0..8 {
                lanes[l] += f(c[l]);
            }
        }
        ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7])) + tail
    }
    let n = x.len() as f64;
    let mean = lane_sum(x, |v| v as f64) / n;
    let var = lane_sum(x, |v| (v as f64 - mean) * (v as f64 - mean)) / n;
    (mean, var)
}

/// Dot product in eight interleaved partial sums (vectorises; fixed order).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac.remainder().iter().zip(bc.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// Eight lane sums of `f(a[i], b[i])` (fixed order; the tail goes to lane 0).
#[inline(always)]
pub fn lanes8(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f64) -> [f64; 8] {
    let mut acc = [0f64; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        acc[0] += f(*x, *y);
    }
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += f(x[l], y[l]);
        }
    }
    acc
}

/// Eight lane sums combined in a fixed order.
#[inline]
pub fn tree8(a: [f64; 8]) -> f64 {
    ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))
}

/// `Σ x` in f64, in eight lanes (vectorises; the order depends only on the length).
#[inline]
pub fn sum_f64(x: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let chunks = x.chunks_exact(8);
    let tail: f64 = chunks.remainder().iter().map(|&v| v as f64).sum();
    for c in chunks {
        for l in 0..8 {
            acc[l] += c[l] as f64;
        }
    }
    tree8(acc) + tail
}

/// A raw output pointer shared by parallel tasks that write disjoint parts
/// of one buffer (tiles of a matmul, heads of attention). `T: Send` because
/// the values are written from other threads.
pub(crate) struct SendPtr<T: Send>(pub(crate) *mut T);
// SAFETY: every user hands each task a disjoint region of the buffer and
// joins all tasks before the buffer is read or freed (see the call sites).
unsafe impl<T: Send> Send for SendPtr<T> {}
unsafe impl<T: Send> Sync for SendPtr<T> {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_a_plain_sum() {
        let a: Vec<f32> = (0..37).map(|i| i as f32 * 0.25 - 3.0).collect();
        let b: Vec<f32> = (0..37).map(|i| 1.0 - i as f32 * 0.125).collect();
        let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
        assert!((dot(&a, &b) as f64 - want).abs() < 1e-4);
    }

    #[test]
    fn lane_reductions_match_plain_ones() {
        for n in [0usize, 1, 15, 16, 17, 64, 100] {
            let x: Vec<f32> = (0..n).map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.37).collect();
            let want_max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            assert_eq!(max_and_nan(&x).0, want_max, "{n}");
            let want: f64 = x.iter().map(|&v| v as f64).sum();
            assert!((sum_by_lanes(&x) as f64 - want).abs() < 1e-4, "{n}");
            if n > 0 {
                let mean = want / n as f64;
                let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n as f64;
                let (m, v) = mean_var_f64(&x);
                assert!((m - mean).abs() < 1e-12 && (v - var).abs() < 1e-12, "{n}");
            }
        }
    }

    #[test]
    fn exp_is_accurate() {
        let mut worst = 0f64;
        for i in -8700..8800 {
            let x = i as f32 / 100.0;
            let want = (x as f64).exp();
            worst = worst.max(((exp_f32(x) as f64 - want) / want).abs());
        }
        assert!(worst < 5e-7, "{worst}");
    }

    #[test]
    fn gelu_matches_the_tanh_formula() {
        let mut worst = 0f64;
        for i in -20000..20000 {
            let x = i as f64 / 1000.0;
            let want = 0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh());
            let got = gelu_tanh_scalar(x as f32) as f64;
            worst = worst.max((got - want).abs() / want.abs().max(1.0));
        }
        assert!(worst < 1e-6, "{worst}");
        for x in [f32::MAX, -f32::MAX, 1e30, -1e30] {
            assert!(gelu_tanh_scalar(x).is_finite() || x.abs() > 1e30);
        }
        let t = candle_core::Tensor::new(&[[-3f32, -0.5, 0.0], [0.5, 1.0, 3.0]], &candle_core::Device::Cpu).unwrap();
        let a: Vec<f32> =
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(gelu_tanh_scalar).collect();
        let b = t.gelu().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (a, b) in a.iter().zip(&b) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }
}
