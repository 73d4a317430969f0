//! Quantised matmul strategies on diffusion shapes: the whole canvas (L rows)
//! goes through every linear layer on every step, so this is gemm, not gemv.
//!
//! Compares, per (rows, in, out, dtype):
//! - `qmatmul`: candle's QMatMul over the GGML blocks;
//! - `dense`: f32 gemm on weights dequantised once at load;
//! - `deq+gemm`: dequantise on every call, then f32 gemm (RAM of `qmatmul`).
//!
//! Run: `cargo bench -p aios-core --bench matmul`

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use std::time::Duration;

use aios_core::format::DType;

fn bench(c: &mut Criterion) {
    let dev = Device::Cpu;
    // (in, out): tiny model (D=256) and edge config (D=768) layers.
    let layers = [(256, 768), (256, 1024), (1024, 256), (768, 2304), (768, 3072), (3072, 768)];
    let mut g = c.benchmark_group("linear");
    g.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
    for rows in [64usize, 128] {
        for (k, n) in layers {
            let x = Tensor::randn(0f32, 1.0, (rows, k), &dev).unwrap();
            let w = (Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap() * 0.05).unwrap();
            let dense_t = w.t().unwrap();
            g.bench_function(BenchmarkId::new(format!("dense/{rows}x{k}x{n}"), "f32"), |b| {
                b.iter(|| x.matmul(&dense_t).unwrap())
            });
            for dt in [DType::Q8_0, DType::Q4K, DType::Q2K] {
                let q = QTensor::quantize(&w, dt.ggml()).unwrap();
                let deq = q.dequantize(&dev).unwrap();
                let qm = QMatMul::from_qtensor(QTensor::quantize(&w, dt.ggml()).unwrap()).unwrap();
                let id = format!("{rows}x{k}x{n}");
                g.bench_function(BenchmarkId::new(format!("qmatmul/{id}"), dt.alias()), |b| {
                    b.iter(|| qm.forward(&x).unwrap())
                });
                g.bench_function(BenchmarkId::new(format!("deq+gemm/{id}"), dt.alias()), |b| {
                    b.iter(|| x.matmul(&q.dequantize(&dev).unwrap().t().unwrap()).unwrap())
                });
                drop(deq);
            }
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
