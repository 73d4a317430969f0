//! Element types a tensor can have in the container, and their byte sizes.

use candle_core::quantized::GgmlDType;

/// Storage type of one tensor. The quantised types are GGML block layouts
/// (byte-identical to GGUF), so candle's SIMD kernels apply and files convert
/// to GGUF without re-quantising.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    /// 8-bit, blocks of 32 with one f16 scale (8.5 bits/weight).
    Q8_0,
    /// 4-bit k-quant, super-blocks of 256 (4.5 bits/weight).
    Q4K,
    /// 2-bit k-quant, super-blocks of 256 (2.625 bits/weight).
    Q2K,
}

impl DType {
    pub const ALL: [DType; 6] = [DType::F32, DType::F16, DType::BF16, DType::Q8_0, DType::Q4K, DType::Q2K];

    /// Name as stored in the `dtype` column.
    pub fn as_str(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::Q8_0 => "q8_0",
            DType::Q4K => "q4_k",
            DType::Q2K => "q2_k",
        }
    }

    /// Parses a stored name or a user-facing alias (`int8`, `int4`, `int2`).
    pub fn parse(s: &str) -> Option<DType> {
        Some(match s {
            "f32" | "float32" => DType::F32,
            "f16" | "float16" => DType::F16,
            "bf16" | "bfloat16" => DType::BF16,
            "q8_0" | "int8" => DType::Q8_0,
            "q4_k" | "int4" => DType::Q4K,
            "q2_k" | "int2" => DType::Q2K,
            _ => return None,
        })
    }

    /// User-facing short name (`int4` rather than `q4_k`), used in file names.
    pub fn alias(self) -> &'static str {
        match self {
            DType::Q8_0 => "int8",
            DType::Q4K => "int4",
            DType::Q2K => "int2",
            other => other.as_str(),
        }
    }

    pub fn is_quantized(self) -> bool {
        matches!(self, DType::Q8_0 | DType::Q4K | DType::Q2K)
    }

    pub fn ggml(self) -> GgmlDType {
        match self {
            DType::F32 => GgmlDType::F32,
            DType::F16 => GgmlDType::F16,
            DType::BF16 => GgmlDType::BF16,
            DType::Q8_0 => GgmlDType::Q8_0,
            DType::Q4K => GgmlDType::Q4K,
            DType::Q2K => GgmlDType::Q2K,
        }
    }

    /// Elements per block (1 for plain floats).
    pub fn block_size(self) -> usize {
        self.ggml().block_size()
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        self.ggml().type_size()
    }

    /// Exact byte length of a tensor of this shape, or an explanation of why
    /// the shape cannot be stored in this type. Overflow is an error, not a wrap.
    pub fn byte_len(self, shape: &[usize]) -> Result<usize, String> {
        let numel = shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| format!("shape {shape:?} overflows"))?;
        let bs = self.block_size();
        if bs > 1 {
            let last = *shape.last().ok_or("a quantised tensor needs at least one dimension")?;
            if last % bs != 0 {
                return Err(format!(
                    "last dimension {last} is not a multiple of the {} block size {bs}",
                    self.as_str()
                ));
            }
        }
        (numel / bs).checked_mul(self.block_bytes()).ok_or_else(|| format!("shape {shape:?} overflows"))
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for d in DType::ALL {
            assert_eq!(DType::parse(d.as_str()), Some(d));
            assert_eq!(DType::parse(d.alias()), Some(d));
        }
        assert_eq!(DType::parse("int3"), None);
    }

    #[test]
    fn byte_lengths_match_ggml() {
        assert_eq!(DType::F32.byte_len(&[3, 5]).unwrap(), 60);
        assert_eq!(DType::Q8_0.byte_len(&[2, 64]).unwrap(), 2 * 2 * 34);
        assert_eq!(DType::Q4K.byte_len(&[1, 256]).unwrap(), 144);
        assert_eq!(DType::Q2K.byte_len(&[1, 256]).unwrap(), 84);
        assert!(DType::Q4K.byte_len(&[4, 100]).is_err());
        assert!(DType::F32.byte_len(&[usize::MAX, 3]).is_err());
    }
}
