//! Element-wise kernels candle does not vectorise. Profiling the tiny model
//! (perf, 1 thread) showed candle's GELU spending 36% of a forward pass in
//! scalar libm `tanhf`/`expm1f`; this version auto-vectorises (AVX2/AVX-512).

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

/// exp(x) for x in [-87, 88], relative error ~2e-7: Cody-Waite range
/// reduction to r in [-ln2/2, ln2/2] and a degree-6 Taylor/minimax polynomial.
/// Branch-free so that loops over slices vectorise.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // 2^n by building the exponent bits directly.
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
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

struct GeluTanh;

/// Below this many elements splitting over threads costs more than it saves.
const PAR_MIN: usize = 1 << 16;

impl CustomOp1 for GeluTanh {
    fn name(&self) -> &'static str {
        "aios-gelu-tanh"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("aios-gelu-tanh: only f32 is supported");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("aios-gelu-tanh: input must be contiguous");
        };
        let src = &data[start..end];
        let mut out = vec![0f32; src.len()];
        let apply = |(o, s): (&mut [f32], &[f32])| o.iter_mut().zip(s).for_each(|(o, &x)| *o = gelu_tanh_scalar(x));
        if src.len() >= PAR_MIN {
            // Element-wise, so the split cannot change results (determinism).
            out.par_chunks_mut(PAR_MIN / 4).zip(src.par_chunks(PAR_MIN / 4)).for_each(apply);
        } else {
            apply((&mut out, src));
        }
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// GELU (tanh approximation) of an f32 tensor.
pub fn gelu_tanh(x: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&GeluTanh)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let t = Tensor::new(&[[-3f32, -0.5, 0.0], [0.5, 1.0, 3.0]], &candle_core::Device::Cpu).unwrap();
        let a = gelu_tanh(&t).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = t.gelu().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (a, b) in a.iter().zip(&b) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }
}
