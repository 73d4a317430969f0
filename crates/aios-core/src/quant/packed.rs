//! f32 `y = x W^T + b` with the weight packed once, at load, into column
//! panels laid out the way the microkernel reads them.
//!
//! Why not a general gemm: `perf` on the tiny model showed the `gemm` crate
//! spending as long re-packing the weight on every call as multiplying
//! (bench/RESULTS.md). Our weights never change between calls, so they are
//! packed once: panel `p` holds columns `[32p, 32p + 32)` as `k` rows of 32
//! contiguous floats (the last panel zero-padded). A tile of up to [`MR`] input
//! rows is multiplied by one panel with all `MR x 32` sums held in registers;
//! the input rows are read in place, unpacked.
//!
//! Every output element is one fused multiply-add chain over `k` in order,
//! starting from zero, then the bias. The AVX-512, AVX2 and portable kernels
//! therefore give bit-identical results, and so does any split of the work
//! over threads.

use crate::quant::Activation;

/// Output columns per panel: two AVX-512 registers, four AVX2 registers.
const NR: usize = 32;
/// Input rows per tile: 2 x 12 accumulators + 2 weight vectors + 1 broadcast
/// fit in AVX-512's 32 vector registers.
const MR: usize = 12;
/// Row tiles per task when a matrix is split by rows too (large inputs).
pub(crate) const TILES_PER_TASK: usize = 8;

/// A `[n, k]` weight matrix packed in column panels.
#[derive(Clone, Debug, PartialEq)]
pub struct PackedMatrix {
    k: usize,
    n: usize,
    panels: Vec<f32>,
}

impl PackedMatrix {
    /// Packs a row-major `[n, k]` matrix (`n` outputs, `k` inputs).
    pub fn pack(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "PackedMatrix::pack: weight has the wrong length");
        let n_panels = n.div_ceil(NR);
        let mut panels = vec![0f32; n_panels * k * NR];
        for (p, panel) in panels.chunks_exact_mut(k * NR).enumerate() {
            for j in 0..NR.min(n - p * NR) {
                let row = &w[(p * NR + j) * k..(p * NR + j + 1) * k];
                for (kk, &v) in row.iter().enumerate() {
                    panel[kk * NR + j] = v;
                }
            }
        }
        PackedMatrix { k, n, panels }
    }

    /// Packs `W` given as its transpose: `wt` is row-major `[k, n]` (e.g. the
    /// values `V` of attention, used as `P V = P (V^T)^T`).
    pub fn pack_transposed(wt: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(wt.len(), n * k, "PackedMatrix::pack_transposed: weight has the wrong length");
        let n_panels = n.div_ceil(NR);
        let mut panels = vec![0f32; n_panels * k * NR];
        for (p, panel) in panels.chunks_exact_mut(k * NR).enumerate() {
            let cols = NR.min(n - p * NR);
            for kk in 0..k {
                panel[kk * NR..kk * NR + cols].copy_from_slice(&wt[kk * n + p * NR..kk * n + p * NR + cols]);
            }
        }
        PackedMatrix { k, n, panels }
    }

    pub fn rows(&self) -> usize {
        self.n
    }

    pub fn cols(&self) -> usize {
        self.k
    }

    /// Back to row-major `[n, k]`.
    pub fn unpack(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.n * self.k];
        for (i, row) in w.chunks_exact_mut(self.k).enumerate() {
            let panel = &self.panels[(i / NR) * self.k * NR..];
            for (kk, v) in row.iter_mut().enumerate() {
                *v = panel[kk * NR + i % NR];
            }
        }
        w
    }

    /// `W += delta`, with `delta` row-major `[n, k]` (fusing an adapter).
    pub fn add(&mut self, delta: &[f32]) {
        assert_eq!(delta.len(), self.n * self.k, "PackedMatrix::add: delta has the wrong length");
        let (k, n) = (self.k, self.n);
        for i in 0..n {
            let panel = &mut self.panels[(i / NR) * k * NR..];
            for kk in 0..k {
                panel[kk * NR + i % NR] += delta[i * k + kk];
            }
        }
    }

    /// `y[rows, n] = x[rows, k] · W^T + bias`, all row-major. Parallel over
    /// column panels (and row blocks for large inputs) with `threads::parallel_for`.
    pub fn linear(&self, x: &[f32], bias: Option<&[f32]>, rows: usize) -> Vec<f32> {
        self.run(x, bias, rows, true, Activation::Identity)
    }

    /// [`PackedMatrix::linear`] followed by `act`, applied per tile.
    pub fn linear_act(&self, x: &[f32], bias: Option<&[f32]>, rows: usize, act: Activation) -> Vec<f32> {
        self.run(x, bias, rows, true, act)
    }

    /// [`PackedMatrix::linear`] on the calling thread only (small products
    /// inside an already parallel loop, e.g. attention per head).
    pub fn linear_serial(&self, x: &[f32], bias: Option<&[f32]>, rows: usize) -> Vec<f32> {
        self.run(x, bias, rows, false, Activation::Identity)
    }

    fn run(&self, x: &[f32], bias: Option<&[f32]>, rows: usize, parallel: bool, act: Activation) -> Vec<f32> {
        let (k, n) = (self.k, self.n);
        assert_eq!(x.len(), rows * k, "PackedMatrix::linear: x has the wrong length");
        if let Some(b) = bias {
            assert_eq!(b.len(), n, "PackedMatrix::linear: bias has the wrong length");
        }
        let mut y = vec![0f32; rows * n];
        if rows == 0 || n == 0 {
            return y;
        }
        let kernel = Kernel::detect();
        let out = SendPtr(y.as_mut_ptr());
        let out = &out;
        for_each_tile(rows, MR, n.div_ceil(NR), parallel, 1, |p, r, mr| {
            let j0 = p * NR;
            let ncols = NR.min(n - j0);
            let panel = &self.panels[p * k * NR..(p + 1) * k * NR];
            let bias = bias.map(|b| &b[j0..j0 + ncols]);
            // SAFETY: x rows [r, r + mr) exist (x.len() == rows * k); the
            // tile writes rows [r, r + mr) x columns [j0, j0 + ncols) of y,
            // which no other tile touches.
            unsafe {
                let tile = out.0.add(r * n + j0);
                kernel.tile(mr, x.as_ptr().add(r * k), k, panel, tile, n, ncols, bias);
                act.apply_tile(tile, mr, n, ncols);
            }
        });
        y
    }
}

/// A `len`-float buffer filled by `fill`, without zeroing it first (a 64 x
/// 4096 logit buffer took 50 us to zero, a tenth of the int8 product that
/// then overwrites it).
///
/// # Safety
/// `fill` must write every one of the `len` floats.
pub(crate) unsafe fn filled_buffer(len: usize, fill: impl FnOnce(*mut f32)) -> Vec<f32> {
    let mut buf: Vec<std::mem::MaybeUninit<f32>> = Vec::with_capacity(len);
    buf.resize_with(len, std::mem::MaybeUninit::uninit);
    fill(buf.as_mut_ptr() as *mut f32);
    let mut buf = std::mem::ManuallyDrop::new(buf);
    Vec::from_raw_parts(buf.as_mut_ptr() as *mut f32, len, buf.capacity())
}

/// Calls `tile(panel, first_row, tile_rows)` for every (column panel, row
/// tile) of a `rows`-row output, with row tiles of at most `mr` rows.
///
/// Row tiles are balanced (64 rows at `mr` 12: 11,11,11,11,10,10 rather than
/// 12 x 5 + 4): a short last tile wastes most of its registers. Tasks are a
/// panel times up to [`TILES_PER_TASK`] row tiles; the grid depends only on
/// the shape, never on the thread count, so neither do the results. In
/// parallel, threads claim `group` consecutive tasks at a time
/// ([`crate::threads::parallel_for_grouped`]).
pub(crate) fn for_each_tile(
    rows: usize,
    mr: usize,
    n_panels: usize,
    parallel: bool,
    group: usize,
    tile: impl Fn(usize, usize, usize) + Sync,
) {
    if rows == 0 || n_panels == 0 {
        return;
    }
    let tiles = rows.div_ceil(mr);
    let tile_start = |t: usize| t * rows / tiles;
    let row_blocks = tiles.div_ceil(TILES_PER_TASK);
    let task = |t: usize| {
        let (p, rb) = (t % n_panels, t / n_panels);
        for t in rb * TILES_PER_TASK..((rb + 1) * TILES_PER_TASK).min(tiles) {
            tile(p, tile_start(t), tile_start(t + 1) - tile_start(t));
        }
    };
    if parallel {
        // (`parallel_for_grouped` with a group of 1 measured 20% slower on
        // the f32 forward pass than this direct call; not understood.)
        match group {
            0 | 1 => crate::threads::parallel_for(n_panels * row_blocks, task),
            _ => crate::threads::parallel_for_grouped(n_panels * row_blocks, group, task),
        }
    } else {
        (0..n_panels * row_blocks).for_each(task);
    }
}

pub(crate) use crate::kernels::SendPtr;

#[derive(Clone, Copy)]
enum Kernel {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

impl Kernel {
    /// The widest kernel the CPU has, within `AIOS_CPU` ([`super::cpu_cap`]).
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            let cap = super::cpu_cap();
            if cap >= super::CpuCap::Native && std::is_x86_feature_detected!("avx512f") {
                return Kernel::Avx512;
            }
            if cap >= super::CpuCap::Avx2
                && std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
            {
                return Kernel::Avx2;
            }
        }
        Kernel::Portable
    }

    /// One tile: `mr` (1..=MR) rows of x (row stride `k`) times one panel,
    /// written to `out` (row stride `ldo`), `ncols` (1..=NR) columns.
    ///
    /// # Safety
    /// `x` must be valid for `mr` rows of `k` floats at stride `k`, `out` for
    /// `mr` rows of `ncols` floats at stride `ldo`, `panel.len() == k * NR`,
    /// and the CPU must support the kernel's instruction set.
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile(
        self,
        mr: usize,
        x: *const f32,
        k: usize,
        panel: &[f32],
        out: *mut f32,
        ldo: usize,
        ncols: usize,
        bias: Option<&[f32]>,
    ) {
        debug_assert!((1..=MR).contains(&mr) && (1..=NR).contains(&ncols) && panel.len() == k * NR);
        macro_rules! dispatch {
            ($f:ident) => {
                match mr {
                    1 => $f::<1>(x, k, panel, out, ldo, ncols, bias),
                    2 => $f::<2>(x, k, panel, out, ldo, ncols, bias),
                    3 => $f::<3>(x, k, panel, out, ldo, ncols, bias),
                    4 => $f::<4>(x, k, panel, out, ldo, ncols, bias),
                    5 => $f::<5>(x, k, panel, out, ldo, ncols, bias),
                    6 => $f::<6>(x, k, panel, out, ldo, ncols, bias),
                    7 => $f::<7>(x, k, panel, out, ldo, ncols, bias),
                    8 => $f::<8>(x, k, panel, out, ldo, ncols, bias),
                    9 => $f::<9>(x, k, panel, out, ldo, ncols, bias),
                    10 => $f::<10>(x, k, panel, out, ldo, ncols, bias),
                    11 => $f::<11>(x, k, panel, out, ldo, ncols, bias),
                    _ => $f::<12>(x, k, panel, out, ldo, ncols, bias),
                }
            };
        }
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => dispatch!(tile_avx512),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => {
                // 16 registers: up to 6 rows x one 16-column half of the panel.
                for half in 0..ncols.div_ceil(16) {
                    let (panel, out) = (&panel[16 * half..], out.add(16 * half));
                    let (ncols, bias) = (16.min(ncols - 16 * half), bias.map(|b| &b[16 * half..]));
                    let mut r = 0;
                    while r < mr {
                        let m = 6.min(mr - r);
                        let (xr, or) = (x.add(r * k), out.add(r * ldo));
                        match m {
                            1 => tile_avx2::<1>(xr, k, panel, or, ldo, ncols, bias),
                            2 => tile_avx2::<2>(xr, k, panel, or, ldo, ncols, bias),
                            3 => tile_avx2::<3>(xr, k, panel, or, ldo, ncols, bias),
                            4 => tile_avx2::<4>(xr, k, panel, or, ldo, ncols, bias),
                            5 => tile_avx2::<5>(xr, k, panel, or, ldo, ncols, bias),
                            _ => tile_avx2::<6>(xr, k, panel, or, ldo, ncols, bias),
                        }
                        r += m;
                    }
                }
            }
            Kernel::Portable => dispatch!(tile_portable),
        }
    }
}

/// Writes one row of sums plus bias, dropping the panel's padding columns.
#[inline(always)]
unsafe fn store_row(sums: &[f32; NR], out: *mut f32, ncols: usize, bias: Option<&[f32]>) {
    for j in 0..ncols {
        let b = bias.map_or(0.0, |b| b[j]);
        *out.add(j) = sums[j] + b;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_avx512<const M: usize>(
    x: *const f32,
    k: usize,
    panel: &[f32],
    out: *mut f32,
    ldo: usize,
    ncols: usize,
    bias: Option<&[f32]>,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; M];
    let p = panel.as_ptr();
    for kk in 0..k {
        let w0 = _mm512_loadu_ps(p.add(kk * NR));
        let w1 = _mm512_loadu_ps(p.add(kk * NR + 16));
        for (r, a) in acc.iter_mut().enumerate() {
            let xb = _mm512_set1_ps(*x.add(r * k + kk));
            a[0] = _mm512_fmadd_ps(xb, w0, a[0]);
            a[1] = _mm512_fmadd_ps(xb, w1, a[1]);
        }
    }
    let mut sums = [0f32; NR];
    for (r, a) in acc.iter().enumerate() {
        _mm512_storeu_ps(sums.as_mut_ptr(), a[0]);
        _mm512_storeu_ps(sums.as_mut_ptr().add(16), a[1]);
        store_row(&sums, out.add(r * ldo), ncols, bias);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
/// Columns `[0, 16)` of `panel` (which may start mid-panel; row stride NR).
unsafe fn tile_avx2<const M: usize>(
    x: *const f32,
    k: usize,
    panel: &[f32],
    out: *mut f32,
    ldo: usize,
    ncols: usize,
    bias: Option<&[f32]>,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); 2]; M];
    let p = panel.as_ptr();
    for kk in 0..k {
        let w0 = _mm256_loadu_ps(p.add(kk * NR));
        let w1 = _mm256_loadu_ps(p.add(kk * NR + 8));
        for (r, a) in acc.iter_mut().enumerate() {
            let xb = _mm256_set1_ps(*x.add(r * k + kk));
            a[0] = _mm256_fmadd_ps(xb, w0, a[0]);
            a[1] = _mm256_fmadd_ps(xb, w1, a[1]);
        }
    }
    let mut sums = [0f32; NR];
    for (r, a) in acc.iter().enumerate() {
        _mm256_storeu_ps(sums.as_mut_ptr(), a[0]);
        _mm256_storeu_ps(sums.as_mut_ptr().add(8), a[1]);
        store_row(&sums, out.add(r * ldo), ncols, bias);
    }
}

/// Any CPU. `mul_add` is a single rounding, like the SIMD kernels' FMA, so
/// the results are bit-identical to theirs.
unsafe fn tile_portable<const M: usize>(
    x: *const f32,
    k: usize,
    panel: &[f32],
    out: *mut f32,
    ldo: usize,
    ncols: usize,
    bias: Option<&[f32]>,
) {
    let mut acc = [[0f32; NR]; M];
    for kk in 0..k {
        let w = &panel[kk * NR..(kk + 1) * NR];
        for (r, a) in acc.iter_mut().enumerate() {
            let xv = *x.add(r * k + kk);
            for (s, &wv) in a.iter_mut().zip(w) {
                *s = xv.mul_add(wv, *s);
            }
        }
    }
    for (r, a) in acc.iter().enumerate() {
        store_row(a, out.add(r * ldo), ncols, bias);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: usize) -> Vec<f32> {
        (0..len).map(|i| (((i * 37 + seed * 11) % 101) as f32 - 50.0) / 50.0).collect()
    }

    /// The reference: one fused multiply-add chain per element, as documented.
    fn reference(x: &[f32], w: &[f32], b: &[f32], rows: usize, k: usize, n: usize) -> Vec<f32> {
        let mut y = vec![0f32; rows * n];
        for i in 0..rows {
            for j in 0..n {
                let mut s = 0f32;
                for kk in 0..k {
                    s = x[i * k + kk].mul_add(w[j * k + kk], s);
                }
                y[i * n + j] = s + b[j];
            }
        }
        y
    }

    #[test]
    fn every_kernel_equals_the_fma_chain_bit_for_bit() {
        for (rows, k, n) in [(1, 384, 130), (7, 33, 300), (13, 5, 31), (64, 256, 96), (100, 17, 33)] {
            let (x, w, b) = (data(rows * k, 1), data(n * k, 2), data(n, 3));
            let want = reference(&x, &w, &b, rows, k, n);
            let m = PackedMatrix::pack(&w, n, k);
            assert_eq!(m.linear(&x, Some(&b), rows), want, "{rows}x{k}x{n}");
            let mut kernels = vec![Kernel::Portable];
            #[cfg(target_arch = "x86_64")]
            {
                if std::is_x86_feature_detected!("avx512f") {
                    kernels.push(Kernel::Avx512);
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    kernels.push(Kernel::Avx2);
                }
            }
            for kernel in kernels {
                let mut y = vec![0f32; rows * n];
                for p in 0..n.div_ceil(NR) {
                    let (j0, panel) = (p * NR, &m.panels[p * k * NR..(p + 1) * k * NR]);
                    let nc = NR.min(n - j0);
                    for r in (0..rows).step_by(MR) {
                        let mr = MR.min(rows - r);
                        unsafe {
                            kernel.tile(
                                mr,
                                x.as_ptr().add(r * k),
                                k,
                                panel,
                                y.as_mut_ptr().add(r * n + j0),
                                n,
                                nc,
                                Some(&b[j0..j0 + nc]),
                            )
                        };
                    }
                }
                assert_eq!(y, want, "{rows}x{k}x{n}");
            }
        }
    }

    #[test]
    fn thread_count_does_not_change_results() {
        let (rows, k, n) = (97, 64, 200);
        let (x, w) = (data(rows * k, 4), data(n * k, 5));
        let m = PackedMatrix::pack(&w, n, k);
        let many = m.linear(&x, None, rows);
        let one = crate::threads::Pool::new(Some(1), "test").unwrap();
        assert_eq!(one.install(|| m.linear(&x, None, rows)), many);
        let three = crate::threads::Pool::new(Some(3), "test").unwrap();
        assert_eq!(three.install(|| m.linear(&x, None, rows)), many);
    }

    #[test]
    fn unpack_and_add_round_trip() {
        let (n, k) = (45, 7);
        let w = data(n * k, 6);
        let mut m = PackedMatrix::pack(&w, n, k);
        assert_eq!(m.unpack(), w);
        let mut wt = vec![0f32; n * k];
        for i in 0..n {
            for j in 0..k {
                wt[j * n + i] = w[i * k + j];
            }
        }
        assert_eq!(PackedMatrix::pack_transposed(&wt, n, k), m);
        let x = data(3 * k, 8);
        assert_eq!(m.linear_serial(&x, None, 3), m.linear(&x, None, 3));
        let delta = data(n * k, 7);
        m.add(&delta);
        let sum: Vec<f32> = w.iter().zip(&delta).map(|(a, b)| a + b).collect();
        assert_eq!(m, PackedMatrix::pack(&sum, n, k));
    }
}
