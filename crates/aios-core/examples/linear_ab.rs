//! Linear-layer kernels on the runtime's shapes, timed as an interleaved A/B:
//! every round calls each variant once, in turn, and the report is the median
//! per variant. On a noisy shared machine this compares variants under the
//! same conditions, which separate criterion runs minutes apart do not.
//!
//! `cargo run --release -p aios-core --example linear_ab -- [ROWS] [THREADS] [ROUNDS]`
//!
//! Variants per (rows x in x out): f32 on packed weights (`quant::packed`);
//! per block format, our int8 kernel (`quant::int8`) and candle's QMatMul.
//! Ours run on `threads::Pool` (as in the engine); candle's variants run in a
//! second interleaved group, because candle's own spinning thread pool and
//! ours would otherwise compete for the cores.

use std::time::Instant;

use aios_core::format::DType;
use aios_core::quant::int8::{Int8Matrix, Kernel};
use aios_core::quant::packed::PackedMatrix;
use aios_core::quant::quantize;
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};

/// Name, whether it is candle's, and the call.
type Variant = (String, bool, Box<dyn Fn() + Sync>);

fn main() {
    let arg = |i: usize, default: usize| std::env::args().nth(i).and_then(|s| s.parse().ok()).unwrap_or(default);
    let (rows, threads, rounds) = (arg(1, 64), arg(2, 2), arg(3, 50));
    let pool = aios_core::threads::Pool::new(Some(threads), "bench").unwrap();
    println!(
        "rows {rows}, {threads} threads, median of {rounds} interleaved rounds; int8 kernel {:?} (AIOS_CPU caps it)",
        Kernel::detect()
    );
    // Tiny model (D = 256, vocab 4096) and edge config (D = 768) layers.
    for (k, n) in [(256, 768), (256, 256), (256, 1024), (1024, 256), (256, 4096), (768, 2304), (3072, 768)] {
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.05).collect();
        let x: Vec<f32> = (0..rows * k).map(|i| (i * 104_729 % 1000) as f32 / 500.0 - 1.0).collect();
        let x_t = Tensor::from_slice(&x, (rows, k), &Device::Cpu).unwrap();
        let f32m = PackedMatrix::pack(&w, n, k);
        let x1 = x.clone();
        let mut variants: Vec<Variant> = vec![(
            "f32".into(),
            false,
            Box::new(move || {
                std::hint::black_box(f32m.linear(&x1, None, rows));
            }),
        )];
        for dt in [DType::Q8_0, DType::Q4K, DType::Q2K] {
            let blocks = quantize(&w, &[n, k], dt).unwrap();
            let ours = Int8Matrix::from_blocks(dt, &blocks, n, k).unwrap();
            let x2 = x.clone();
            variants.push((
                format!("int8/{dt}"),
                false,
                Box::new(move || {
                    std::hint::black_box(ours.linear(&x2, None, rows));
                }),
            ));
            let w_t = Tensor::from_slice(&w, (n, k), &Device::Cpu).unwrap();
            let candle = QMatMul::from_qtensor(QTensor::quantize(&w_t, dt.ggml()).unwrap()).unwrap();
            let x3 = x_t.clone();
            variants.push((
                format!("candle/{dt}"),
                true,
                Box::new(move || {
                    std::hint::black_box(candle.forward(&x3).unwrap());
                }),
            ));
        }
        let mut times = vec![vec![]; variants.len()];
        for group in [false, true] {
            let mut run = || {
                for round in 0..rounds + 5 {
                    for (v, (_, candle, f)) in variants.iter().enumerate() {
                        if *candle != group {
                            continue;
                        }
                        let t = Instant::now();
                        f();
                        if round >= 5 {
                            times[v].push(t.elapsed().as_secs_f64() * 1e6);
                        }
                    }
                }
            };
            if group {
                run();
            } else {
                pool.install(run);
            }
        }
        let mut line = format!("{rows}x{k}x{n}:");
        for ((name, _, _), t) in variants.iter().zip(&mut times) {
            t.sort_by(f64::total_cmp);
            line += &format!("  {name} {:.0} us", t[t.len() / 2]);
        }
        println!("{line}");
    }
}
