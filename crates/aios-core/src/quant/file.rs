//! Whole-file quantisation: `aios-run quantize IN OUT --dtype int4`.

use std::path::Path;

use crate::error::{Error, Result};
use crate::format::{write_weight_file, DType, TensorToWrite, WeightFile, KEY_CONFIG};

/// What `quantize_file` did, for the CLI to print.
#[derive(Debug, Clone)]
pub struct QuantizeReport {
    /// `(name, dtype chosen)` for every tensor.
    pub tensors: Vec<(String, DType)>,
    pub in_bytes: u64,
    pub out_bytes: u64,
}

/// Smallest matrix worth quantising: below this the per-block scales and the
/// accuracy loss outweigh the bytes saved.
const MIN_QUANT_NUMEL: usize = 4096;

/// The dtype a tensor gets when the file is quantised to `target`. Only 2-D
/// matrices are quantised; norms, biases and small tensors stay f32. A matrix
/// whose rows do not fit the 256-wide k-quant blocks falls back to Q8_0
/// (32-wide), then to f32.
pub fn dtype_for(shape: &[usize], target: DType) -> DType {
    let numel: usize = shape.iter().product();
    if shape.len() != 2 || numel < MIN_QUANT_NUMEL {
        return DType::F32;
    }
    if !target.is_quantized() {
        return target;
    }
    [target, DType::Q8_0].into_iter().find(|d| shape[1].is_multiple_of(d.block_size())).unwrap_or(DType::F32)
}

/// Whether both paths name one existing file (hard link, symlink, `..`).
fn same_file(a: &Path, b: &Path) -> bool {
    let (Ok(ma), Ok(mb)) = (std::fs::metadata(a), std::fs::metadata(b)) else { return false };
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        (ma.dev(), ma.ino()) == (mb.dev(), mb.ino())
    }
    #[cfg(not(unix))]
    {
        let _ = (ma, mb);
        matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
    }
}

/// Rewrites `input` with every eligible matrix stored as `target`.
/// Metadata (config, kind) is carried over unchanged.
pub fn quantize_file(input: impl AsRef<Path>, output: impl AsRef<Path>, target: DType) -> Result<QuantizeReport> {
    let (input, output) = (input.as_ref(), output.as_ref());
    if input == output || same_file(input, output) {
        return Err(Error::Input(format!(
            "quantize: the output {} is the input file itself (same path, link or symlink); write to another file",
            output.display()
        )));
    }
    let src = WeightFile::open(input)?;
    let mut encoded: Vec<(String, DType, Vec<usize>, Vec<u8>)> = Vec::with_capacity(src.tensors.len());
    for t in &src.tensors {
        let dtype = dtype_for(&t.shape, target);
        let bytes = if dtype == t.dtype {
            t.data().to_vec()
        } else {
            let values = super::dequantize(t.data(), &t.shape, t.dtype)?;
            super::quantize(&values, &t.shape, dtype)
                .map_err(|e| Error::format(src.path.display(), format!("tensor {:?}: {e}", t.name)))?
        };
        encoded.push((t.name.clone(), dtype, t.shape.clone(), bytes));
    }
    let to_write: Vec<TensorToWrite> =
        encoded.iter().map(|(name, dtype, shape, data)| TensorToWrite { name, dtype: *dtype, shape, data }).collect();
    let mut meta = src.metadata.clone();
    meta.retain(|k, _| k == KEY_CONFIG || !k.starts_with("aios.") || k == "aios.fingerprint");
    meta.insert("aios.quantized_from".into(), src.path.file_name().unwrap_or_default().to_string_lossy().into());
    write_weight_file(output, &src.kind, &meta, &to_write)?;
    let out_bytes = std::fs::metadata(output).map_err(|e| Error::io(output, e))?.len();
    Ok(QuantizeReport {
        tensors: encoded.into_iter().map(|(n, d, _, _)| (n, d)).collect(),
        in_bytes: src.file_bytes,
        out_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy() {
        assert_eq!(dtype_for(&[512, 256], DType::Q4K), DType::Q4K);
        assert_eq!(dtype_for(&[512, 96], DType::Q4K), DType::Q8_0);
        assert_eq!(dtype_for(&[512, 100], DType::Q2K), DType::F32);
        assert_eq!(dtype_for(&[256], DType::Q2K), DType::F32);
        assert_eq!(dtype_for(&[8, 256], DType::Q2K), DType::F32);
        assert_eq!(dtype_for(&[64, 256], DType::F16), DType::F16);
        assert_eq!(dtype_for(&[256], DType::F16), DType::F32);
    }
}
