//! A linear layer whose weight may be stored as f32 or GGML blocks.

use candle_core::quantized::QMatMul;
use candle_core::{Module, Tensor};

use crate::error::{Error, Result};
use crate::format::{DType, WeightFile};
use crate::quant::int8::{self, Int8Matrix};
use crate::quant::packed::PackedMatrix;
use crate::quant::Activation;

/// How a quantised weight is multiplied. Chosen by measurement
/// (`cargo run --release -p aios-core --example linear_ab`, bench/RESULTS.md):
/// on a whole diffusion canvas (64 rows) our int8 kernel (`quant::int8`,
/// AVX-512 VNNI) is 2.3-3.2x faster than f32 for every block format and, on
/// most shapes, faster than candle's quantised matmul, which also runs on its
/// own spin-waiting thread pool that competes with ours.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MatmulMode {
    /// The int8 kernel where the CPU has AVX-512 VNNI; otherwise candle's
    /// blocks for Q8_0/Q4_K and f32 for Q2_K (the faster there).
    #[default]
    Auto,
    /// Dequantise once when the model loads; f32 at run time.
    DequantizeAtLoad,
    /// Keep the blocks in memory and use candle's quantised matmul (smallest RAM).
    Quantized,
    /// Our int8 kernel (`quant::int8`) on every quantised matrix, natively or
    /// with its portable fallback. Takes 1 byte per weight.
    Int8,
}

impl MatmulMode {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "auto" => Some(Self::Auto),
            "dequantize" | "dequantize-at-load" => Some(Self::DequantizeAtLoad),
            "quantized" => Some(Self::Quantized),
            "int8" => Some(Self::Int8),
            _ => None,
        }
    }

    /// Which kernel runs a matrix stored as `dtype`.
    fn kernel_for(self, dtype: DType) -> KernelChoice {
        if !dtype.is_quantized() {
            return KernelChoice::F32;
        }
        match self {
            MatmulMode::DequantizeAtLoad => KernelChoice::F32,
            MatmulMode::Quantized => KernelChoice::Candle,
            MatmulMode::Int8 => KernelChoice::Int8,
            MatmulMode::Auto if int8::Kernel::detect().is_fast() => KernelChoice::Int8,
            MatmulMode::Auto if dtype == DType::Q2K => KernelChoice::F32,
            MatmulMode::Auto => KernelChoice::Candle,
        }
    }
}

enum KernelChoice {
    F32,
    Candle,
    Int8,
}

#[derive(Clone, Debug)]
enum Weight {
    /// f32, packed at load for our kernel (`quant::packed`).
    Dense(PackedMatrix),
    /// GGML blocks through candle's quantised matmul.
    Quant(QMatMul),
    /// GGML blocks as integers for our int8 kernel.
    Int8(Int8Matrix),
}

/// `y = x W^T + b` over the last dimension of `x`.
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Weight,
    bias: Option<Vec<f32>>,
    pub in_features: usize,
    pub out_features: usize,
}

impl Linear {
    /// Loads `{prefix}.weight` (`[out, in]`) and, if `has_bias`, `{prefix}.bias`
    /// (`[out]`), checking both shapes.
    pub fn load(
        file: &WeightFile,
        prefix: &str,
        out_features: usize,
        in_features: usize,
        has_bias: bool,
        mode: MatmulMode,
    ) -> Result<Self> {
        let wname = format!("{prefix}.weight");
        let raw = file.require(&wname)?;
        check_shape(file, &wname, &raw.shape, &[out_features, in_features])?;
        // Dequantising also checks every value is finite, so do it even when
        // the blocks are kept.
        let dense = super::load_f32(file, raw)?;
        let weight = match mode.kernel_for(raw.dtype) {
            KernelChoice::F32 => {
                Weight::Dense(PackedMatrix::pack(&dense.flatten_all()?.to_vec1()?, out_features, in_features))
            }
            KernelChoice::Candle => {
                let q = super::qtensor_from_bytes(raw.dtype, &raw.shape, raw.data())?;
                Weight::Quant(QMatMul::from_qtensor(q)?)
            }
            KernelChoice::Int8 => {
                Weight::Int8(Int8Matrix::from_blocks(raw.dtype, raw.data(), out_features, in_features)?)
            }
        };
        let bias = if has_bias {
            let bname = format!("{prefix}.bias");
            let raw = file.require(&bname)?;
            check_shape(file, &bname, &raw.shape, &[out_features])?;
            Some(super::load_f32(file, raw)?.to_vec1()?)
        } else {
            None
        };
        Ok(Linear { weight, bias, in_features, out_features })
    }

    /// Builds from an f32 weight `[out, in]` and bias `[out]` (tests, adapters).
    pub fn from_dense(weight: &Tensor, bias: Option<&Tensor>) -> Result<Self> {
        let (out_features, in_features) = weight.dims2()?;
        let bias = bias.map(|b| b.to_vec1()).transpose()?;
        let packed = PackedMatrix::pack(&weight.flatten_all()?.to_vec1()?, out_features, in_features);
        Ok(Linear { weight: Weight::Dense(packed), bias, in_features, out_features })
    }

    pub fn is_quantized(&self) -> bool {
        !matches!(self.weight, Weight::Dense(_))
    }

    /// `W += delta` (`[out, in]` row-major); only for f32 (dense) weights.
    pub fn add_to_weight(&mut self, delta: &[f32]) -> std::result::Result<(), String> {
        if delta.len() != self.out_features * self.in_features {
            return Err(format!(
                "delta has {} values, the weight {}",
                delta.len(),
                self.out_features * self.in_features
            ));
        }
        match &mut self.weight {
            Weight::Dense(w) => {
                w.add(delta);
                Ok(())
            }
            Weight::Quant(_) | Weight::Int8(_) => {
                Err("the base weight is quantised; load the f32 model (or matmul=\"dequantize\") to fuse, \
                 or keep the adapter unfused"
                    .into())
            }
        }
    }

    /// `y[rows, out] = x[rows, in] W^T + b` on plain row-major buffers.
    pub fn forward_rows(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        self.forward_rows_act(x, rows, Activation::Identity)
    }

    /// `act(x W^T + b)`; the activation runs inside the kernel where it can.
    pub fn forward_rows_act(&self, x: &[f32], rows: usize, act: Activation) -> Result<Vec<f32>> {
        if x.len() != rows * self.in_features {
            return Err(Error::Input(format!(
                "linear expects {} inputs per row, got {} values for {rows} rows",
                self.in_features,
                x.len()
            )));
        }
        match &self.weight {
            Weight::Dense(w) => Ok(w.linear_act(x, self.bias.as_deref(), rows, act)),
            Weight::Int8(w) => Ok(w.linear_act(x, self.bias.as_deref(), rows, act)),
            Weight::Quant(q) => {
                let x = Tensor::from_slice(x, (rows, self.in_features), &candle_core::Device::Cpu)?;
                let mut y = q.forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
                if let Some(b) = &self.bias {
                    y.chunks_exact_mut(self.out_features).for_each(|r| r.iter_mut().zip(b).for_each(|(y, b)| *y += b));
                }
                act.apply(&mut y);
                Ok(y)
            }
        }
    }

    /// [`Linear::forward_rows`] over the last dimension of a tensor.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let last = *dims.last().ok_or_else(|| Error::Input("linear input has no dimensions".into()))?;
        if last != self.in_features {
            return Err(Error::Input(format!("linear expects {} inputs, got {last}", self.in_features)));
        }
        let rows = x.elem_count() / last;
        let y = self.forward_rows(&x.flatten_all()?.to_vec1::<f32>()?, rows)?;
        let mut out_dims = dims;
        *out_dims.last_mut().unwrap() = self.out_features;
        Ok(Tensor::from_vec(y, out_dims, x.device())?)
    }
}

pub(crate) fn check_shape(file: &WeightFile, name: &str, got: &[usize], want: &[usize]) -> Result<()> {
    if got != want {
        return Err(Error::format(
            file.path.display(),
            format!("tensor {name:?} has shape {got:?}, the config needs {want:?}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;
    use candle_core::Device;

    /// candle's quantised kernel must agree with f32 gemm on the dequantised
    /// weight up to the activation quantisation (Q8_K, ~0.5% relative).
    #[test]
    fn qmatmul_tracks_dense_on_the_same_blocks() {
        let dev = Device::Cpu;
        for rows in [1usize, 7, 64] {
            let x = Tensor::randn(0f32, 1.0, (rows, 512), &dev).unwrap();
            let w = (Tensor::randn(0f32, 1.0, (256, 512), &dev).unwrap() * 0.05).unwrap();
            for dt in [DType::Q8_0, DType::Q4K, DType::Q2K] {
                let q = QTensor::quantize(&w, dt.ggml()).unwrap();
                let dense = Linear::from_dense(&q.dequantize(&dev).unwrap(), None).unwrap();
                let quant = Linear {
                    weight: Weight::Quant(QMatMul::from_qtensor(q).unwrap()),
                    bias: None,
                    in_features: 512,
                    out_features: 256,
                };
                let a = dense.forward(&x).unwrap();
                let b = quant.forward(&x).unwrap();
                let err = (a.clone() - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                let scale = a.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(err < 0.02 * scale, "{dt} rows {rows}: {err} vs {scale}");
            }
        }
    }
}
