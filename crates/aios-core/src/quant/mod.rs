//! INT8 / INT4 / INT2 block quantisation (GGML Q8_0 / Q4_K / Q2_K, quantised
//! and dequantised with candle's code), conversion of stored tensors to candle
//! tensors, and the linear layer that runs over either f32 weights (`packed`)
//! or quantised ones (our `int8` kernel, or candle's QMatMul).

pub(crate) mod file;
pub mod int8;
pub(crate) mod linear;
pub mod packed;

pub use file::{quantize_file, QuantizeReport};

/// An element-wise function applied to a linear layer's output inside the
/// kernel, on each tile while it is still in cache (saves a pass over the
/// output and a round of thread wake-ups).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Activation {
    #[default]
    Identity,
    /// GELU, tanh approximation ([`crate::kernels::gelu_tanh_scalar`]).
    GeluTanh,
}

impl Activation {
    /// Applies the function to `values` in place.
    pub fn apply(self, values: &mut [f32]) {
        match self {
            Activation::Identity => {}
            Activation::GeluTanh => values.iter_mut().for_each(|v| *v = crate::kernels::gelu_tanh_scalar(*v)),
        }
    }

    /// Applies the function to an `rows x cols` tile at row stride `ld`.
    ///
    /// # Safety
    /// `tile` must be valid for `rows` rows of `cols` floats at stride `ld`,
    /// and nothing else may access them meanwhile.
    pub(crate) unsafe fn apply_tile(self, tile: *mut f32, rows: usize, ld: usize, cols: usize) {
        if self == Activation::Identity {
            return;
        }
        for i in 0..rows {
            self.apply(std::slice::from_raw_parts_mut(tile.add(i * ld), cols));
        }
    }
}
pub use linear::{Linear, MatmulMode};

use std::borrow::Cow;

use candle_core::quantized::{QStorage, QTensor};
use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::format::{DType, RawTensor};

/// Decodes little-endian float bytes of any float dtype into f32.
fn floats_to_f32(dtype: DType, data: &[u8]) -> Vec<f32> {
    match dtype {
        DType::F32 => data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        DType::F16 => data.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        DType::BF16 => data.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        _ => unreachable!("floats_to_f32 called on a quantised dtype"),
    }
}

/// Builds a candle quantised tensor from GGML block bytes. candle reinterprets
/// the bytes as block structs and asserts their alignment, so bytes that are
/// not suitably aligned (Parquet pages give no guarantee) are copied first.
pub fn qtensor_from_bytes(dtype: DType, shape: &[usize], data: &[u8]) -> Result<QTensor> {
    debug_assert!(dtype.is_quantized());
    let expected = dtype.byte_len(shape).map_err(Error::Input)?;
    if data.len() != expected {
        return Err(Error::Input(format!("{dtype}{shape:?} needs {expected} bytes, got {}", data.len())));
    }
    // Every GGML block struct has alignment <= 8; a u64 buffer satisfies it.
    let mut words: Vec<u64> = Vec::new();
    let aligned: &[u8] = if (data.as_ptr() as usize).is_multiple_of(std::mem::align_of::<u64>()) {
        data
    } else {
        words.resize(data.len().div_ceil(8), 0);
        // SAFETY: the u64 buffer is at least data.len() bytes and u8 has no alignment needs.
        let buf = unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr() as *mut u8, data.len()) };
        buf.copy_from_slice(data);
        buf
    };
    let storage = QStorage::from_data(Cow::Borrowed(aligned), &Device::Cpu, dtype.ggml())?;
    Ok(QTensor::new(storage, shape.to_vec())?)
}

/// Any stored tensor as an f32 candle tensor (dequantising if needed).
/// NaN or infinite weights are a format error: they would otherwise surface
/// only later, as garbage or as a failed generation.
pub fn tensor_f32(raw: &RawTensor) -> Result<Tensor> {
    let values = dequantize(raw.data(), &raw.shape, raw.dtype)?;
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(Error::format(
            "weights",
            format!("tensor {:?} has a non-finite value ({}) at index {i}", raw.name, values[i]),
        ));
    }
    Ok(Tensor::from_vec(values, raw.shape.clone(), &Device::Cpu)?)
}

/// [`tensor_f32`] with errors naming the file the tensor came from.
pub fn load_f32(file: &crate::format::WeightFile, raw: &RawTensor) -> Result<Tensor> {
    tensor_f32(raw).map_err(|e| match e {
        Error::Format { msg, .. } => Error::format(file.path.display(), msg),
        other => other,
    })
}

/// Quantises f32 values of `shape` to `dtype`'s block bytes.
pub fn quantize(values: &[f32], shape: &[usize], dtype: DType) -> Result<Vec<u8>> {
    let numel: usize = shape.iter().product();
    if values.len() != numel {
        return Err(Error::Input(format!("{} values for shape {shape:?}", values.len())));
    }
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(Error::Input(format!("value {} at index {i} is not finite", values[i])));
    }
    match dtype {
        DType::F32 => Ok(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        DType::F16 => Ok(values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect()),
        DType::BF16 => Ok(values.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect()),
        _ => {
            dtype.byte_len(shape).map_err(Error::Input)?;
            let t = Tensor::from_slice(values, shape, &Device::Cpu)?;
            let q = QTensor::quantize(&t, dtype.ggml())?;
            Ok(q.data()?.into_owned())
        }
    }
}

/// Decodes `dtype` bytes of `shape` to f32 values.
pub fn dequantize(data: &[u8], shape: &[usize], dtype: DType) -> Result<Vec<f32>> {
    let expected = dtype.byte_len(shape).map_err(Error::Input)?;
    if data.len() != expected {
        return Err(Error::Input(format!("{dtype}{shape:?} needs {expected} bytes, got {}", data.len())));
    }
    if !dtype.is_quantized() {
        return Ok(floats_to_f32(dtype, data));
    }
    let q = qtensor_from_bytes(dtype, shape, data)?;
    Ok(q.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(n: usize) -> Vec<f32> {
        (0..n).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.1).collect()
    }

    #[test]
    fn round_trip_error_shrinks_with_bits() {
        let shape = [4, 512];
        let x = ramp(4 * 512);
        let mut errs = vec![];
        for d in [DType::F16, DType::Q8_0, DType::Q4K, DType::Q2K] {
            let b = quantize(&x, &shape, d).unwrap();
            assert_eq!(b.len(), d.byte_len(&shape).unwrap());
            let y = dequantize(&b, &shape, d).unwrap();
            let rms = (x.iter().zip(&y).map(|(a, b)| (a - b).powi(2)).sum::<f32>() / x.len() as f32).sqrt();
            errs.push(rms);
        }
        assert!(errs[0] < errs[1] && errs[1] < errs[2] && errs[2] < errs[3], "{errs:?}");
        assert!(errs[3] < 0.05, "{errs:?}"); // Q2_K on values in [-0.1, 0.1]
    }

    #[test]
    fn misaligned_bytes_are_copied_not_rejected() {
        let shape = [1, 256];
        let b = quantize(&ramp(256), &shape, DType::Q4K).unwrap();
        let mut shifted = vec![0u8; b.len() + 1];
        shifted[1..].copy_from_slice(&b);
        let y1 = dequantize(&b, &shape, DType::Q4K).unwrap();
        let y2 = dequantize(&shifted[1..], &shape, DType::Q4K).unwrap();
        assert_eq!(y1, y2);
    }

    #[test]
    fn bad_inputs_are_errors() {
        assert!(quantize(&[f32::NAN; 32], &[1, 32], DType::Q8_0).is_err());
        assert!(quantize(&[0.0; 100], &[1, 100], DType::Q4K).is_err());
        assert!(quantize(&[0.0; 3], &[4], DType::F32).is_err());
        assert!(dequantize(&[0u8; 10], &[1, 256], DType::Q4K).is_err());
    }
}

/// The widest SIMD family our own kernels (f32 `packed`, `int8`) may use:
/// `AIOS_CPU=avx2` caps them at AVX2 (to measure or test an AVX2-only CPU on
/// an AVX-512 one), `AIOS_CPU=portable` at scalar code; unset or `native`,
/// they use what the CPU has. candle's and gemm's own kernels do not read it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum CpuCap {
    Portable,
    Avx2,
    Native,
}

pub fn cpu_cap() -> CpuCap {
    static CAP: std::sync::OnceLock<CpuCap> = std::sync::OnceLock::new();
    *CAP.get_or_init(|| match std::env::var("AIOS_CPU").as_deref() {
        Ok("avx2") => CpuCap::Avx2,
        Ok("portable") => CpuCap::Portable,
        _ => CpuCap::Native,
    })
}
