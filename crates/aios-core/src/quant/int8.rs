//! `y = x W^T + b` in integer arithmetic, for weights stored as GGML blocks
//! (Q8_0, Q4_K, Q2_K), on AVX-512 VNNI's `vpdpbusd` (64 int8 products per
//! instruction, against 16 f32 products per FMA).
//!
//! Every one of the three block formats is, exactly, `w = scale * q - min`
//! with small integers `q` and one `scale` per block of `kb` inputs (and one
//! `min` per block of `mb` inputs):
//!
//! | format | q | kb | min |
//! | --- | --- | --- | --- |
//! | Q8_0 | signed, -127..=127 | 32 | none |
//! | Q4_K | sub-block scale is folded into `scale`; q in 0..=15 | 32 | per 32 |
//! | Q2_K | 4-bit sub-block scale times the 2-bit q: 0..=45 | 256 | per 16 |
//!
//! At load the integers are repacked into column panels the kernel reads
//! directly (32 columns; per group of 4 inputs, 4 bytes per column, which is
//! `vpdpbusd`'s operand layout and also AMX's B-tile layout). On each call the
//! input rows are quantised to int8 with one scale per row and `kb` block
//! (`x ≈ s * xq`, `|xq| <= 127`), like llama.cpp's Q8_0/Q8_K activations, so
//!
//! `y[i, j] = Σ_b scale[j, b] s[i, b] Σ_{k in b} q[j, k] xq[i, k]  -  Σ_m min[j, m] s[i, b(m)] Σ_{k in m} xq[i, k]`
//!
//! The inner sums are exact in int32, so the result is the exact product of
//! the dequantised weights with the quantised input. (The min term uses the
//! quantised input sums on purpose: with the exact sums the error would be
//! `Σ (w + min) δx` instead of `Σ w δx`: 3x the logit error on Q4_K in
//! tests/test_parity.py.)
//! The float epilogue is one fixed
//! sequence of fused multiply-adds per output, the same in the SIMD and the
//! portable kernel: results are bit-identical on every kernel and thread count.
//!
//! `vpdpbusd` multiplies unsigned by signed bytes. Q8_0's signed weights are
//! paired with the input stored as `xq + 128` (unsigned), and each block's
//! int32 sum starts at `-128 Σ_k q` (precomputed), which cancels the offset;
//! the K-quants' unsigned weights pair with the signed `xq` as they are.

use crate::error::{Error, Result};
use crate::format::DType;
use crate::quant::packed::{filled_buffer, for_each_tile, SendPtr, TILES_PER_TASK};
use crate::quant::Activation;

/// Output columns per panel (two AVX-512 registers of 16 int32 lanes).
const NR: usize = 32;
/// Input rows per tile: 2 x 6 int32 and 2 x 6 f32 accumulators, two weight
/// vectors, one broadcast and the epilogue's temporaries fit in 32 registers.
const MR: usize = 6;
/// Multiply-adds per parallel task (a few microseconds on one core).
const INT8_GRAIN: usize = 1 << 21;

/// A `[n, k]` GGML block matrix repacked for the int8 kernel.
#[derive(Clone, Debug, PartialEq)]
pub struct Int8Matrix {
    k: usize,
    n: usize,
    /// Inputs per scale block (32 or 256).
    kb: usize,
    /// Inputs per min block (16 or 32), or 0 without mins (Q8_0).
    mb: usize,
    /// Q8_0: weights are signed and the input is stored offset by 128.
    signed: bool,
    /// Per panel: `k / 4` groups of `NR x 4` bytes (column-major within the group).
    q: Vec<u8>,
    /// Per panel, per scale block: `NR` scales.
    scales: Vec<f32>,
    /// Per panel, per min block: `NR` mins (empty when `mb == 0`).
    mins: Vec<f32>,
    /// Q8_0 only. Per panel, per scale block: `NR` values of `-128 Σ_k q`.
    offsets: Vec<i32>,
}

/// The input rows quantised for one product.
struct QuantizedInput {
    /// `rows x k`: `xq` (K-quants) or `xq + 128` (Q8_0), as bytes.
    q: Vec<u8>,
    /// `rows x (k / kb)`: `s`, with `x ≈ s * xq`.
    scales: Vec<f32>,
    /// `rows x (k / mb)`: the sums `s Σ_{k in m} xq` (empty without mins).
    sums: Vec<f32>,
}

/// One weight row decoded from its blocks: integers, scales, mins.
struct DecodedRow {
    q: Vec<i8>,
    scales: Vec<f32>,
    mins: Vec<f32>,
}

impl Int8Matrix {
    /// The integer form of `dtype` blocks holding a row-major `[n, k]` matrix.
    pub fn from_blocks(dtype: DType, data: &[u8], n: usize, k: usize) -> Result<Self> {
        let expected = dtype.byte_len(&[n, k]).map_err(Error::Input)?;
        if data.len() != expected {
            return Err(Error::Input(format!("{dtype}[{n}, {k}] needs {expected} bytes, got {}", data.len())));
        }
        let (kb, mb, signed) = match dtype {
            DType::Q8_0 => (32, 0, true),
            DType::Q4K => (32, 32, false),
            DType::Q2K => (256, 16, false),
            other => return Err(Error::Input(format!("the int8 kernel takes Q8_0, Q4_K or Q2_K blocks, not {other}"))),
        };
        let row_bytes = expected / n.max(1);
        let n_panels = n.div_ceil(NR);
        let (nb, nm) = (k / kb, k.checked_div(mb).unwrap_or(0));
        let mut m = Int8Matrix {
            k,
            n,
            kb,
            mb,
            signed,
            q: vec![0; n_panels * k * NR],
            scales: vec![0.0; n_panels * nb * NR],
            mins: vec![0.0; n_panels * nm * NR],
            offsets: vec![0; if signed { n_panels * nb * NR } else { 0 }],
        };
        for j in 0..n {
            let row = decode_row(dtype, &data[j * row_bytes..(j + 1) * row_bytes], k);
            let (p, c) = (j / NR, j % NR);
            let panel = &mut m.q[p * k * NR..(p + 1) * k * NR];
            for (kk, &v) in row.q.iter().enumerate() {
                panel[(kk / 4) * NR * 4 + c * 4 + kk % 4] = v as u8;
            }
            for (b, &s) in row.scales.iter().enumerate() {
                m.scales[(p * nb + b) * NR + c] = s;
                if signed {
                    let sum: i32 = row.q[b * kb..(b + 1) * kb].iter().map(|&v| v as i32).sum();
                    m.offsets[(p * nb + b) * NR + c] = -128 * sum;
                }
            }
            for (b, &v) in row.mins.iter().enumerate() {
                m.mins[(p * nm + b) * NR + c] = v;
            }
        }
        Ok(m)
    }

    pub fn rows(&self) -> usize {
        self.n
    }

    pub fn cols(&self) -> usize {
        self.k
    }

    /// The weights as f32 `[n, k]`, exactly as GGML dequantises them.
    pub fn dequantize(&self) -> Vec<f32> {
        let (k, nb, nm) = (self.k, self.k / self.kb, self.n_min_blocks());
        let mut w = vec![0f32; self.n * k];
        for (j, row) in w.chunks_exact_mut(k).enumerate() {
            let (p, c) = (j / NR, j % NR);
            for (kk, v) in row.iter_mut().enumerate() {
                let q = self.q[p * k * NR + (kk / 4) * NR * 4 + c * 4 + kk % 4];
                let q = if self.signed { q as i8 as f32 } else { q as f32 };
                let s = self.scales[(p * nb + kk / self.kb) * NR + c];
                let m = kk.checked_div(self.mb).map_or(0.0, |m| self.mins[(p * nm + m) * NR + c]);
                *v = s * q - m;
            }
        }
        w
    }

    fn n_min_blocks(&self) -> usize {
        self.k.checked_div(self.mb).unwrap_or(0)
    }

    /// `y[rows, n] = x[rows, k] · W^T + bias`, parallel on the current rayon pool.
    pub fn linear(&self, x: &[f32], bias: Option<&[f32]>, rows: usize) -> Vec<f32> {
        self.linear_act(x, bias, rows, Activation::Identity)
    }

    /// [`Int8Matrix::linear`] followed by `act`, applied per tile.
    pub fn linear_act(&self, x: &[f32], bias: Option<&[f32]>, rows: usize, act: Activation) -> Vec<f32> {
        let (k, n) = (self.k, self.n);
        assert_eq!(x.len(), rows * k, "Int8Matrix::linear: x has the wrong length");
        if let Some(b) = bias {
            assert_eq!(b.len(), n, "Int8Matrix::linear: bias has the wrong length");
        }
        if rows == 0 || n == 0 {
            return vec![0f32; rows * n];
        }
        let kernel = Kernel::detect();
        let input = self.quantize_input(x, rows);
        // SAFETY: the tiles cover every (row, column) of the output.
        unsafe { filled_buffer(rows * n, |y| self.run_tiles(kernel, &input, bias, rows, act, y)) }
    }

    fn run_tiles(
        &self,
        kernel: Kernel,
        input: &QuantizedInput,
        bias: Option<&[f32]>,
        rows: usize,
        act: Activation,
        y: *mut f32,
    ) {
        let n = self.n;
        let out = SendPtr(y);
        let out = &out;
        // Tasks of about INT8_GRAIN products (see `parallel_for_grouped`).
        let task_macs = (rows.min(MR * TILES_PER_TASK) * self.k * NR).max(1);
        for_each_tile(rows, MR, n.div_ceil(NR), true, INT8_GRAIN.div_ceil(task_macs), |p, r, mr| {
            let ncols = NR.min(n - p * NR);
            // SAFETY: the tile writes rows [r, r + mr) x columns
            // [p * NR, p * NR + ncols) of y, which no other tile touches.
            unsafe {
                let tile = out.0.add(r * n + p * NR);
                self.tile(kernel, input, p, r, mr, tile, ncols, bias);
                act.apply_tile(tile, mr, n, ncols);
            }
        });
    }

    /// Quantises the input rows, in parallel over blocks of rows (at 1,024
    /// inputs per row this is a tenth of the product's time).
    fn quantize_input(&self, x: &[f32], rows: usize) -> QuantizedInput {
        const ROWS_PER_TASK: usize = 8;
        let (k, nb, nm) = (self.k, self.k / self.kb, self.n_min_blocks());
        let offset = if self.signed { 128 } else { 0 };
        let mut input =
            QuantizedInput { q: vec![0; rows * k], scales: vec![0.0; rows * nb], sums: vec![0.0; rows * nm] };
        let (q, scales, sums) =
            (SendPtr(input.q.as_mut_ptr()), SendPtr(input.scales.as_mut_ptr()), SendPtr(input.sums.as_mut_ptr()));
        let (q, scales, sums) = (&q, &scales, &sums);
        crate::threads::parallel_for(rows.div_ceil(ROWS_PER_TASK), |t| {
            for r in t * ROWS_PER_TASK..((t + 1) * ROWS_PER_TASK).min(rows) {
                // SAFETY: row r of each buffer belongs to this task only, and
                // every buffer has `rows` rows of the given width.
                unsafe {
                    self.quantize_row(
                        offset,
                        &x[r * k..(r + 1) * k],
                        std::slice::from_raw_parts_mut(q.0.add(r * k), k),
                        std::slice::from_raw_parts_mut(scales.0.add(r * nb), nb),
                        std::slice::from_raw_parts_mut(sums.0.add(r * nm), nm),
                    )
                };
            }
        });
        input
    }

    fn quantize_row(&self, offset: i32, x: &[f32], q: &mut [u8], scales: &mut [f32], sums: &mut [f32]) {
        let (kb, mb) = (self.kb, self.mb);
        let kernel = Kernel::detect();
        for ((block, q), scale) in x.chunks_exact(kb).zip(q.chunks_exact_mut(kb)).zip(scales.iter_mut()) {
            *scale = match kernel {
                // SAFETY: the kernel was detected on this CPU; kb is a multiple of 16.
                #[cfg(target_arch = "x86_64")]
                Kernel::Vnni => unsafe { quantize_block_avx512(block, q, offset) },
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx2 | Kernel::Vnni256 => unsafe { quantize_block_avx2(block, q, offset) },
                Kernel::Portable => quantize_block(block, q, offset),
            };
        }
        // Mins only come with the K-quants, whose input bytes are plain `xq`.
        for (m, (s, q)) in sums.iter_mut().zip(q.chunks_exact(mb.max(1))).enumerate() {
            let isum: i32 = q.iter().map(|&v| v as i8 as i32).sum();
            *s = isum as f32 * scales[m * mb / kb];
        }
    }

    /// # Safety
    /// `out` must be valid for `mr` rows of `ncols` floats at row stride `n`,
    /// and `kernel` must be supported by the CPU.
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile(
        &self,
        kernel: Kernel,
        input: &QuantizedInput,
        p: usize,
        r: usize,
        mr: usize,
        out: *mut f32,
        ncols: usize,
        bias: Option<&[f32]>,
    ) {
        let (k, nb, nm) = (self.k, self.k / self.kb, self.n_min_blocks());
        let t = Tile {
            k,
            kb: self.kb,
            mb: self.mb,
            x: &input.q[r * k..(r + mr) * k],
            xs: &input.scales[r * nb..(r + mr) * nb],
            xsum: &input.sums[r * nm..(r + mr) * nm],
            q: &self.q[p * k * NR..(p + 1) * k * NR],
            scales: &self.scales[p * nb * NR..(p + 1) * nb * NR],
            mins: &self.mins[p * nm * NR..(p + 1) * nm * NR],
            offsets: if self.signed { &self.offsets[p * nb * NR..(p + 1) * nb * NR] } else { &[] },
        };
        let mut acc = [[0f32; NR]; MR];
        macro_rules! dispatch {
            ($f:ident, $signed:expr) => {
                match mr {
                    1 => $f::<1, $signed>(&t, &mut acc),
                    2 => $f::<2, $signed>(&t, &mut acc),
                    3 => $f::<3, $signed>(&t, &mut acc),
                    4 => $f::<4, $signed>(&t, &mut acc),
                    5 => $f::<5, $signed>(&t, &mut acc),
                    _ => $f::<6, $signed>(&t, &mut acc),
                }
            };
        }
        match (kernel, self.signed) {
            #[cfg(target_arch = "x86_64")]
            (Kernel::Vnni, true) => dispatch!(tile_vnni, true),
            #[cfg(target_arch = "x86_64")]
            (Kernel::Vnni, false) => dispatch!(tile_vnni, false),
            #[cfg(target_arch = "x86_64")]
            (Kernel::Avx2, true) => dispatch!(tile_avx2, true),
            #[cfg(target_arch = "x86_64")]
            (Kernel::Avx2, false) => dispatch!(tile_avx2, false),
            #[cfg(target_arch = "x86_64")]
            (Kernel::Vnni256, signed) => match (has_avx_vnni(), signed) {
                (true, true) => dispatch!(tile_avx_vnni, true),
                (true, false) => dispatch!(tile_avx_vnni, false),
                (false, true) => dispatch!(tile_vnni256_evex, true),
                (false, false) => dispatch!(tile_vnni256_evex, false),
            },
            (Kernel::Portable, true) => dispatch!(tile_portable, true),
            (Kernel::Portable, false) => dispatch!(tile_portable, false),
        }
        let bias = bias.map(|b| &b[p * NR..p * NR + ncols]);
        for (i, row) in acc.iter().take(mr).enumerate() {
            let dst = std::slice::from_raw_parts_mut(out.add(i * self.n), ncols);
            match bias {
                Some(b) => dst.iter_mut().zip(&row[..ncols]).zip(b).for_each(|((d, &v), &b)| *d = v + b),
                None => dst.copy_from_slice(&row[..ncols]),
            }
        }
    }
}

/// Quantises one block of inputs to int8 (`x ≈ scale * q`, `|q| <= 127`,
/// rounding to nearest even) and returns the scale. Each byte is `q + offset`
/// (offset 128 makes it unsigned, for Q8_0). Results equal
/// [`quantize_block_avx512`]'s for finite inputs.
fn quantize_block(x: &[f32], q: &mut [u8], offset: i32) -> f32 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let (scale, inv) = if amax > 0.0 { (amax / 127.0, 127.0 / amax) } else { (0.0, 0.0) };
    for (q, &v) in q.iter_mut().zip(x) {
        *q = ((v * inv).round_ties_even().clamp(-127.0, 127.0) as i32 + offset) as u8;
    }
    scale
}

/// [`quantize_block`] with AVX-512 (`x.len()` a multiple of 16).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quantize_block_avx512(x: &[f32], q: &mut [u8], offset: i32) -> f32 {
    use std::arch::x86_64::*;
    debug_assert!(x.len().is_multiple_of(16) && q.len() == x.len());
    let mut m = _mm512_setzero_ps();
    for c in x.chunks_exact(16) {
        m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(c.as_ptr())));
    }
    let amax = _mm512_reduce_max_ps(m);
    let (scale, inv) = if amax > 0.0 { (amax / 127.0, 127.0 / amax) } else { (0.0, 0.0) };
    let (inv, lo, hi, off) =
        (_mm512_set1_ps(inv), _mm512_set1_epi32(-127), _mm512_set1_epi32(127), _mm512_set1_epi32(offset));
    for (c, o) in x.chunks_exact(16).zip(q.chunks_exact_mut(16)) {
        // cvtps rounds to nearest even (the default MXCSR mode).
        let v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(c.as_ptr()), inv));
        let v = _mm512_add_epi32(_mm512_min_epi32(_mm512_max_epi32(v, lo), hi), off);
        _mm_storeu_si128(o.as_mut_ptr() as *mut __m128i, _mm512_cvtepi32_epi8(v));
    }
    scale
}

/// [`quantize_block`] with AVX2 (`x.len()` a multiple of 8).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_block_avx2(x: &[f32], q: &mut [u8], offset: i32) -> f32 {
    use std::arch::x86_64::*;
    debug_assert!(x.len().is_multiple_of(8) && q.len() == x.len());
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let mut m = _mm256_setzero_ps();
    for c in x.chunks_exact(8) {
        m = _mm256_max_ps(m, _mm256_and_ps(_mm256_loadu_ps(c.as_ptr()), abs_mask));
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), m);
    let amax = lanes.iter().fold(0f32, |a, &b| a.max(b));
    let (scale, inv) = if amax > 0.0 { (amax / 127.0, 127.0 / amax) } else { (0.0, 0.0) };
    let (inv, lo, hi, off) =
        (_mm256_set1_ps(inv), _mm256_set1_epi32(-127), _mm256_set1_epi32(127), _mm256_set1_epi32(offset));
    let mut ints = [0i32; 8];
    for (c, o) in x.chunks_exact(8).zip(q.chunks_exact_mut(8)) {
        // cvtps rounds to nearest even (the default MXCSR mode).
        let v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(c.as_ptr()), inv));
        let v = _mm256_add_epi32(_mm256_min_epi32(_mm256_max_epi32(v, lo), hi), off);
        _mm256_storeu_si256(ints.as_mut_ptr() as *mut __m256i, v);
        for (o, &i) in o.iter_mut().zip(&ints) {
            *o = i as u8;
        }
    }
    scale
}

/// One tile's operands: `M` quantised input rows and one weight panel.
struct Tile<'a> {
    k: usize,
    kb: usize,
    mb: usize,
    x: &'a [u8],
    xs: &'a [f32],
    xsum: &'a [f32],
    q: &'a [u8],
    scales: &'a [f32],
    mins: &'a [f32],
    offsets: &'a [i32],
}

/// The int8 kernel families. [`Kernel::detect`] picks the fastest this CPU
/// has within `AIOS_CPU` ([`crate::quant::cpu_cap`]); tests run every
/// family the CPU has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// AVX-512 VNNI `vpdpbusd`: 64 products per instruction.
    #[cfg(target_arch = "x86_64")]
    Vnni,
    /// `vpdpbusd` on 256-bit registers: AVX-VNNI (VEX, e.g. Intel cores
    /// without AVX-512), or on CPUs with AVX-512 VNNI its 256-bit EVEX form
    /// (the same code, so tests cover it there).
    #[cfg(target_arch = "x86_64")]
    Vnni256,
    /// AVX2 `vpmaddubsw` + `vpmaddwd`: 32 products per two instructions.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// Scalar, any CPU (aarch64 runs this one until a NEON kernel exists).
    Portable,
}

impl Kernel {
    /// Every family this CPU can run, fastest first.
    pub fn available() -> Vec<Kernel> {
        let mut v = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if has_vnni() {
                v.push(Kernel::Vnni);
            }
            let avx2 = std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
            if avx2 && (has_avx_vnni() || (has_vnni() && std::is_x86_feature_detected!("avx512vl"))) {
                v.push(Kernel::Vnni256);
            }
            if avx2 {
                v.push(Kernel::Avx2);
            }
        }
        v.push(Kernel::Portable);
        v
    }

    /// The kernel in use: the fastest available within `AIOS_CPU`.
    pub fn detect() -> Self {
        static CHOSEN: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *CHOSEN.get_or_init(Self::choose)
    }

    fn choose() -> Self {
        use crate::quant::{cpu_cap, CpuCap};
        let cap = cpu_cap();
        Kernel::available()
            .into_iter()
            .find(|k| match k {
                #[cfg(target_arch = "x86_64")]
                Kernel::Vnni | Kernel::Vnni256 => cap >= CpuCap::Native,
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx2 => cap >= CpuCap::Avx2,
                Kernel::Portable => true,
            })
            .unwrap_or(Kernel::Portable)
    }

    /// Whether this kernel beats f32 on the CPU (the portable one does not).
    pub fn is_fast(self) -> bool {
        self != Kernel::Portable
    }
}

/// Whether this CPU has AVX-VNNI (the VEX-encoded 256-bit `vpdpbusd`).
#[cfg(target_arch = "x86_64")]
fn has_avx_vnni() -> bool {
    std::is_x86_feature_detected!("avxvnni")
        && std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
}

/// Whether this CPU runs the int8 kernel natively (AVX-512 VNNI); without it
/// the portable kernel is correct but slower than f32.
pub fn has_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile_vnni<const M: usize, const SIGNED: bool>(t: &Tile, out: &mut [[f32; NR]; MR]) {
    use std::arch::x86_64::*;
    let (k, kb, nb) = (t.k, t.kb, t.k / t.kb);
    let (x, w) = (t.x.as_ptr(), t.q.as_ptr());
    let mut accf = [[_mm512_setzero_ps(); 2]; M];
    for b in 0..nb {
        let mut acc = [[_mm512_setzero_si512(); 2]; M];
        if SIGNED {
            let o0 = _mm512_loadu_si512(t.offsets.as_ptr().add(b * NR) as *const _);
            let o1 = _mm512_loadu_si512(t.offsets.as_ptr().add(b * NR + 16) as *const _);
            acc = [[o0, o1]; M];
        }
        for g in b * kb / 4..(b + 1) * kb / 4 {
            let w0 = _mm512_loadu_si512(w.add(g * NR * 4) as *const _);
            let w1 = _mm512_loadu_si512(w.add(g * NR * 4 + 64) as *const _);
            for (i, a) in acc.iter_mut().enumerate() {
                let xb = _mm512_set1_epi32((x.add(i * k + g * 4) as *const i32).read_unaligned());
                if SIGNED {
                    a[0] = _mm512_dpbusd_epi32(a[0], xb, w0);
                    a[1] = _mm512_dpbusd_epi32(a[1], xb, w1);
                } else {
                    a[0] = _mm512_dpbusd_epi32(a[0], w0, xb);
                    a[1] = _mm512_dpbusd_epi32(a[1], w1, xb);
                }
            }
        }
        let s0 = _mm512_loadu_ps(t.scales.as_ptr().add(b * NR));
        let s1 = _mm512_loadu_ps(t.scales.as_ptr().add(b * NR + 16));
        for (i, (f, a)) in accf.iter_mut().zip(&acc).enumerate() {
            let xs = _mm512_set1_ps(t.xs[i * nb + b]);
            f[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[0]), _mm512_mul_ps(s0, xs), f[0]);
            f[1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[1]), _mm512_mul_ps(s1, xs), f[1]);
        }
        if !SIGNED {
            let nm = k / t.mb;
            for m in b * kb / t.mb..(b + 1) * kb / t.mb {
                let m0 = _mm512_loadu_ps(t.mins.as_ptr().add(m * NR));
                let m1 = _mm512_loadu_ps(t.mins.as_ptr().add(m * NR + 16));
                for (i, f) in accf.iter_mut().enumerate() {
                    let xsum = _mm512_set1_ps(t.xsum[i * nm + m]);
                    f[0] = _mm512_fnmadd_ps(m0, xsum, f[0]);
                    f[1] = _mm512_fnmadd_ps(m1, xsum, f[1]);
                }
            }
        }
    }
    for (o, f) in out.iter_mut().zip(&accf) {
        _mm512_storeu_ps(o.as_mut_ptr(), f[0]);
        _mm512_storeu_ps(o.as_mut_ptr().add(16), f[1]);
    }
}

/// [`tile_vnni`] on 256-bit registers, for CPUs with AVX-VNNI but no
/// AVX-512 (16 registers: the tile is done in two halves of 16 columns and
/// the f32 sums live in `out` between blocks). `$dot` is `vpdpbusd`, VEX
/// (`avxvnni`) or EVEX (`avx512vl`); the code is otherwise the same, so the
/// EVEX copy tests it on AVX-512 machines.
macro_rules! tile_vnni256 {
    ($name:ident, $features:literal, $dot:ident) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $name<const M: usize, const SIGNED: bool>(t: &Tile, out: &mut [[f32; NR]; MR]) {
            use std::arch::x86_64::*;
            let (k, kb, nb) = (t.k, t.kb, t.k / t.kb);
            let (x, w) = (t.x.as_ptr(), t.q.as_ptr());
            for h in 0..2 {
                for b in 0..nb {
                    let mut acc = [[_mm256_setzero_si256(); 2]; M];
                    if SIGNED {
                        let o0 = _mm256_loadu_si256(t.offsets.as_ptr().add(b * NR + h * 16) as *const __m256i);
                        let o1 = _mm256_loadu_si256(t.offsets.as_ptr().add(b * NR + h * 16 + 8) as *const __m256i);
                        acc = [[o0, o1]; M];
                    }
                    for g in b * kb / 4..(b + 1) * kb / 4 {
                        let w0 = _mm256_loadu_si256(w.add(g * NR * 4 + h * 64) as *const __m256i);
                        let w1 = _mm256_loadu_si256(w.add(g * NR * 4 + h * 64 + 32) as *const __m256i);
                        for (i, a) in acc.iter_mut().enumerate() {
                            let xb = _mm256_set1_epi32((x.add(i * k + g * 4) as *const i32).read_unaligned());
                            if SIGNED {
                                a[0] = $dot(a[0], xb, w0);
                                a[1] = $dot(a[1], xb, w1);
                            } else {
                                a[0] = $dot(a[0], w0, xb);
                                a[1] = $dot(a[1], w1, xb);
                            }
                        }
                    }
                    let s0 = _mm256_loadu_ps(t.scales.as_ptr().add(b * NR + h * 16));
                    let s1 = _mm256_loadu_ps(t.scales.as_ptr().add(b * NR + h * 16 + 8));
                    for (i, a) in acc.iter().enumerate() {
                        let o = out[i].as_mut_ptr().add(h * 16);
                        let xs = _mm256_set1_ps(t.xs[i * nb + b]);
                        let f0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[0]), _mm256_mul_ps(s0, xs), _mm256_loadu_ps(o));
                        let f1 =
                            _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[1]), _mm256_mul_ps(s1, xs), _mm256_loadu_ps(o.add(8)));
                        _mm256_storeu_ps(o, f0);
                        _mm256_storeu_ps(o.add(8), f1);
                    }
                    if !SIGNED {
                        let nm = k / t.mb;
                        for m in b * kb / t.mb..(b + 1) * kb / t.mb {
                            let m0 = _mm256_loadu_ps(t.mins.as_ptr().add(m * NR + h * 16));
                            let m1 = _mm256_loadu_ps(t.mins.as_ptr().add(m * NR + h * 16 + 8));
                            for (i, o) in out.iter_mut().take(M).enumerate() {
                                let o = o.as_mut_ptr().add(h * 16);
                                let xsum = _mm256_set1_ps(t.xsum[i * nm + m]);
                                _mm256_storeu_ps(o, _mm256_fnmadd_ps(m0, xsum, _mm256_loadu_ps(o)));
                                _mm256_storeu_ps(o.add(8), _mm256_fnmadd_ps(m1, xsum, _mm256_loadu_ps(o.add(8))));
                            }
                        }
                    }
                }
            }
        }
    };
}

tile_vnni256!(tile_avx_vnni, "avx2,fma,avxvnni", _mm256_dpbusd_avx_epi32);
tile_vnni256!(tile_vnni256_evex, "avx2,fma,avx512f,avx512vl,avx512vnni", _mm256_dpbusd_epi32);

/// AVX2: the same integer sums as [`tile_vnni`] (each of `vpmaddubsw`'s i16
/// pair sums is at most 2 x 128 x 127 < 2^15, so nothing saturates), then the
/// same fused multiply-adds in the same order per column, 16 columns at a
/// time. Q8_0's input bytes are turned back into signed `xq` (xor 0x80) and
/// multiplied by |w| with the sign moved onto `xq` (`vpsignb`), so the block
/// sums start at 0 instead of the VNNI offsets.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2<const M: usize, const SIGNED: bool>(t: &Tile, out: &mut [[f32; NR]; MR]) {
    use std::arch::x86_64::*;
    let (k, kb, nb) = (t.k, t.kb, t.k / t.kb);
    let (x, w) = (t.x.as_ptr(), t.q.as_ptr());
    let ones = _mm256_set1_epi16(1);
    let flip = _mm256_set1_epi8(-128);
    for h in 0..2 {
        let mut accf = [[_mm256_setzero_ps(); 2]; M];
        for b in 0..nb {
            let mut acc = [[_mm256_setzero_si256(); 2]; M];
            for g in b * kb / 4..(b + 1) * kb / 4 {
                let w0 = _mm256_loadu_si256(w.add(g * NR * 4 + h * 64) as *const __m256i);
                let w1 = _mm256_loadu_si256(w.add(g * NR * 4 + h * 64 + 32) as *const __m256i);
                let (a0, a1) = if SIGNED { (_mm256_abs_epi8(w0), _mm256_abs_epi8(w1)) } else { (w0, w1) };
                for (i, a) in acc.iter_mut().enumerate() {
                    let xb = _mm256_set1_epi32((x.add(i * k + g * 4) as *const i32).read_unaligned());
                    let (p0, p1) = if SIGNED {
                        let xs = _mm256_xor_si256(xb, flip);
                        (
                            _mm256_maddubs_epi16(a0, _mm256_sign_epi8(xs, w0)),
                            _mm256_maddubs_epi16(a1, _mm256_sign_epi8(xs, w1)),
                        )
                    } else {
                        (_mm256_maddubs_epi16(a0, xb), _mm256_maddubs_epi16(a1, xb))
                    };
                    a[0] = _mm256_add_epi32(a[0], _mm256_madd_epi16(p0, ones));
                    a[1] = _mm256_add_epi32(a[1], _mm256_madd_epi16(p1, ones));
                }
            }
            let s0 = _mm256_loadu_ps(t.scales.as_ptr().add(b * NR + h * 16));
            let s1 = _mm256_loadu_ps(t.scales.as_ptr().add(b * NR + h * 16 + 8));
            for (i, (f, a)) in accf.iter_mut().zip(&acc).enumerate() {
                let xs = _mm256_set1_ps(t.xs[i * nb + b]);
                f[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[0]), _mm256_mul_ps(s0, xs), f[0]);
                f[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[1]), _mm256_mul_ps(s1, xs), f[1]);
            }
            if !SIGNED {
                let nm = k / t.mb;
                for m in b * kb / t.mb..(b + 1) * kb / t.mb {
                    let m0 = _mm256_loadu_ps(t.mins.as_ptr().add(m * NR + h * 16));
                    let m1 = _mm256_loadu_ps(t.mins.as_ptr().add(m * NR + h * 16 + 8));
                    for (i, f) in accf.iter_mut().enumerate() {
                        let xsum = _mm256_set1_ps(t.xsum[i * nm + m]);
                        f[0] = _mm256_fnmadd_ps(m0, xsum, f[0]);
                        f[1] = _mm256_fnmadd_ps(m1, xsum, f[1]);
                    }
                }
            }
        }
        for (o, f) in out.iter_mut().zip(&accf) {
            _mm256_storeu_ps(o.as_mut_ptr().add(h * 16), f[0]);
            _mm256_storeu_ps(o.as_mut_ptr().add(h * 16 + 8), f[1]);
        }
    }
}

/// Any CPU: the same integer sums and the same fused multiply-adds, in the
/// same order, as [`tile_vnni`].
unsafe fn tile_portable<const M: usize, const SIGNED: bool>(t: &Tile, out: &mut [[f32; NR]; MR]) {
    let (k, kb, nb) = (t.k, t.kb, t.k / t.kb);
    for (i, o) in out.iter_mut().take(M).enumerate() {
        let x = &t.x[i * k..(i + 1) * k];
        let mut f = [0f32; NR];
        for b in 0..nb {
            for (j, fj) in f.iter_mut().enumerate() {
                let mut acc: i32 = if SIGNED { t.offsets[b * NR + j] } else { 0 };
                for (kk, &xv) in x.iter().enumerate().take((b + 1) * kb).skip(b * kb) {
                    let q = t.q[(kk / 4) * NR * 4 + j * 4 + kk % 4];
                    acc += if SIGNED { xv as i32 * (q as i8) as i32 } else { q as i32 * (xv as i8) as i32 };
                }
                *fj = (acc as f32).mul_add(t.scales[b * NR + j] * t.xs[i * nb + b], *fj);
            }
            if !SIGNED {
                let nm = k / t.mb;
                for m in b * kb / t.mb..(b + 1) * kb / t.mb {
                    for (j, fj) in f.iter_mut().enumerate() {
                        *fj = (-t.mins[m * NR + j]).mul_add(t.xsum[i * nm + m], *fj);
                    }
                }
            }
        }
        *o = f;
    }
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Decodes one weight row of GGML blocks (layouts as in candle's `k_quants.rs`).
fn decode_row(dtype: DType, data: &[u8], k: usize) -> DecodedRow {
    let mut row = DecodedRow { q: Vec::with_capacity(k), scales: vec![], mins: vec![] };
    match dtype {
        DType::Q8_0 => {
            // d: f16, qs: [i8; 32]
            for block in data.chunks_exact(34) {
                row.scales.push(f16_at(block, 0));
                row.q.extend(block[2..].iter().map(|&v| v as i8));
            }
        }
        DType::Q4K => {
            // d: f16, dmin: f16, scales: [u8; 12] (6-bit scale/min pairs), qs: [u8; 128]
            for block in data.chunks_exact(144) {
                let (d, dmin, sc, qs) = (f16_at(block, 0), f16_at(block, 2), &block[4..16], &block[16..]);
                for j in 0..4 {
                    let q = &qs[32 * j..32 * j + 32];
                    for (half, shift) in [(0, 0), (1, 4)] {
                        let (s, m) = scale_min_k4(2 * j + half, sc);
                        row.scales.push(d * s as f32);
                        row.mins.push(dmin * m as f32);
                        row.q.extend(q.iter().map(|&v| ((v >> shift) & 0xF) as i8));
                    }
                }
            }
        }
        DType::Q2K => {
            // scales: [u8; 16] (4-bit scale | 4-bit min << 4), qs: [u8; 64], d: f16, dmin: f16
            for block in data.chunks_exact(84) {
                let (sc, qs, d, dmin) = (&block[..16], &block[16..80], f16_at(block, 80), f16_at(block, 82));
                row.scales.push(d);
                let mut is = 0;
                for chunk in qs.chunks_exact(32) {
                    for shift in [0, 2, 4, 6] {
                        for half in chunk.chunks_exact(16) {
                            let s = sc[is];
                            is += 1;
                            row.mins.push(dmin * (s >> 4) as f32);
                            row.q.extend(half.iter().map(|&v| (((v >> shift) & 3) * (s & 0xF)) as i8));
                        }
                    }
                }
            }
        }
        _ => unreachable!("checked by from_blocks"),
    }
    debug_assert_eq!(row.q.len(), k);
    row
}

/// GGML's `get_scale_min_k4`: the `j`-th 6-bit (scale, min) pair of a Q4_K block.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{dequantize, quantize};

    fn data(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    const DTYPES: [DType; 3] = [DType::Q8_0, DType::Q4K, DType::Q2K];

    #[test]
    fn decoding_equals_ggml_dequantisation_exactly() {
        for dtype in DTYPES {
            let (n, k) = (37, 512);
            let w = data(n * k, 1);
            let blocks = quantize(&w, &[n, k], dtype).unwrap();
            let m = Int8Matrix::from_blocks(dtype, &blocks, n, k).unwrap();
            assert_eq!(m.dequantize(), dequantize(&blocks, &[n, k], dtype).unwrap(), "{dtype}");
        }
    }

    /// Against f32 on GGML's own dequantised weights: the only difference is
    /// the input's int8 rounding (at most half a step of `amax / 127` each).
    #[test]
    fn product_tracks_f32_on_the_dequantised_weights() {
        for dtype in DTYPES {
            for (rows, n, k) in [(1, 40, 256), (7, 64, 512), (64, 96, 1024)] {
                let (w, x, b) = (data(n * k, 2), data(rows * k, 3), data(n, 4));
                let blocks = quantize(&w, &[n, k], dtype).unwrap();
                let m = Int8Matrix::from_blocks(dtype, &blocks, n, k).unwrap();
                let wd = m.dequantize();
                let y = m.linear(&x, Some(&b), rows);
                for i in 0..rows {
                    for j in 0..n {
                        let (xr, wr) = (&x[i * k..(i + 1) * k], &wd[j * k..(j + 1) * k]);
                        let exact: f64 =
                            xr.iter().zip(wr).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() + b[j] as f64;
                        // Bound: Σ |w| * step / 2 with step = amax / 127 <= 1 / 127.
                        let bound: f64 = wr.iter().map(|v| v.abs() as f64).sum::<f64>() / 254.0 + 1e-4;
                        let err = (y[i * n + j] as f64 - exact).abs();
                        assert!(err <= bound, "{dtype} {rows}x{n}x{k} [{i},{j}]: err {err} > {bound}");
                    }
                }
            }
        }
    }

    #[test]
    fn every_kernel_and_thread_count_gives_the_same_bits() {
        for dtype in DTYPES {
            let (rows, n, k) = (13, 70, 512);
            let (w, x) = (data(n * k, 5), data(rows * k, 6));
            let m = Int8Matrix::from_blocks(dtype, &quantize(&w, &[n, k], dtype).unwrap(), n, k).unwrap();
            let want = m.linear(&x, None, rows);
            let one = crate::threads::Pool::new(Some(1), "test").unwrap();
            assert_eq!(one.install(|| m.linear(&x, None, rows)), want);
            let three = crate::threads::Pool::new(Some(3), "test").unwrap();
            assert_eq!(three.install(|| m.linear(&x, None, rows)), want);
            let kernels = Kernel::available();
            #[cfg(target_arch = "x86_64")]
            for (family, name) in [
                (Kernel::Vnni, "AVX-512 VNNI"),
                (Kernel::Vnni256, "AVX-VNNI or AVX-512 VL"),
                (Kernel::Avx2, "AVX2+FMA"),
            ] {
                if !kernels.contains(&family) {
                    eprintln!("SKIPPED: int8 kernel {family:?} not tested: this CPU has no {name}");
                }
            }
            for kernel in kernels {
                let input = m.quantize_input(&x, rows);
                let mut y = vec![0f32; rows * n];
                for p in 0..n.div_ceil(NR) {
                    for r in (0..rows).step_by(MR) {
                        let mr = MR.min(rows - r);
                        unsafe {
                            m.tile(
                                kernel,
                                &input,
                                p,
                                r,
                                mr,
                                y.as_mut_ptr().add(r * n + p * NR),
                                NR.min(n - p * NR),
                                None,
                            )
                        };
                    }
                }
                assert_eq!(y, want, "{dtype} {kernel:?}");
            }
        }
    }

    #[test]
    fn simd_and_scalar_input_quantisation_agree() {
        // Random blocks, a zero block, and exact .5 ties (rounded to even by all).
        let mut blocks: Vec<Vec<f32>> = (0..50).map(|i| data(32, 100 + i)).collect();
        blocks.push(vec![0.0; 32]);
        // amax 127 makes the scale exactly 1, so x.5 values are exact ties.
        blocks.push((0..32).map(|i| if i == 0 { 127.0 } else { i as f32 - 16.5 }).collect());
        let kernels = Kernel::available();
        let mut tested = 0;
        for kernel in kernels {
            for x in &blocks {
                for offset in [0, 128] {
                    let (mut a, mut b) = (vec![0u8; 32], vec![0u8; 32]);
                    let sa = quantize_block(x, &mut a, offset);
                    // SAFETY: the kernel is available on this CPU.
                    let sb = match kernel {
                        #[cfg(target_arch = "x86_64")]
                        Kernel::Vnni => unsafe { quantize_block_avx512(x, &mut b, offset) },
                        #[cfg(target_arch = "x86_64")]
                        Kernel::Avx2 | Kernel::Vnni256 => unsafe { quantize_block_avx2(x, &mut b, offset) },
                        Kernel::Portable => continue,
                    };
                    tested += 1;
                    assert_eq!((sa, &a), (sb, &b), "{kernel:?} offset {offset}, block {x:?}");
                }
            }
        }
        if tested == 0 {
            eprintln!("SKIPPED: no SIMD input quantiser on this CPU; only the scalar one exists here");
        }
    }

    #[test]
    fn zero_rows_and_bad_blocks() {
        let blocks = quantize(&data(32 * 256, 7), &[32, 256], DType::Q4K).unwrap();
        let m = Int8Matrix::from_blocks(DType::Q4K, &blocks, 32, 256).unwrap();
        assert!(m.linear(&[], None, 0).is_empty());
        assert!(Int8Matrix::from_blocks(DType::Q4K, &blocks[1..], 32, 256).is_err());
        assert!(Int8Matrix::from_blocks(DType::F32, &[0; 16], 2, 2).is_err());
    }
}
