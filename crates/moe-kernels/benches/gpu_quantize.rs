//! GPU benchmark of token quantization alone: `moe_quantize_tokens`, which runs the quant.cuh
//! code that the dispatch kernels of nvlink-one-sided and nvlink-two-sided quantize with, on
//! one GPU, at the DeepSeek-V3 hidden size (7168, bf16 and fp16 input, random tokens over six
//! decades).
//! It isolates the quantization's own cost from the NVLink transfers it is fused with, so it
//! can be measured on a machine with one GPU.
//!
//! Per scheme and token count, on two grids: one block of 256 threads per token (what
//! allgather-rs launches) and one block of 1024 threads per SM taking tokens in batches (the
//! shape of the fused dispatch): CUDA events around each launch, median of 30 after 5
//! warm-up. "GB/s" counts the input rows read plus the payload and scale bytes written; the
//! ceiling row is `moe_copy_16b` copying the input rows on every SM (the same bytes read, as
//! many written), and "ceiling / row" is its time over the row's.
//!
//! Run on a GPU host: `cargo bench -p moe-kernels --features cuda --bench gpu_quantize`, or
//! `cargo xtask gpu-bundle` here and `bash gpu-bundle/bench.sh` there.
//! `MOE_BENCH_SCHEMES=nvfp4,bf16`, `MOE_BENCH_TOKENS=4096` and `MOE_BENCH_INPUTS=bf16` measure
//! fewer cells (every scheme at 128 and 4096 tokens from both input dtypes by default). Without
//! the `cuda` feature or a GPU it says why and exits.

#[cfg(not(feature = "cuda"))]
fn main() {
    println!(
        "gpu_quantize: built without the `cuda` feature (cargo bench -p moe-kernels --features cuda); nothing measured"
    );
}

#[cfg(feature = "cuda")]
fn main() {
    if let Err(e) = bench::run() {
        eprintln!("gpu_quantize: {e}");
        std::process::exit(1);
    }
}

#[cfg(feature = "cuda")]
mod bench {
    use std::sync::Arc;

    use moe_kernels::bench_env::{env_list, positive_count, scheme_among};
    use moe_kernels::buffer::DeviceBuffer;
    use moe_kernels::cudarc::driver::CudaEvent;
    use moe_kernels::cudarc::driver::sys::CUevent_flags;
    use moe_kernels::device::CudaDevice;
    use moe_kernels::one_sided::OneSidedLaunch;
    use moe_kernels::probe;
    use moe_kernels::source::QuantSpec;
    use moe_quant::{QuantParams, QuantScheme, bf16, fp16};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    const HIDDEN: usize = 7168;
    const WARMUP: usize = 5;
    const ITERS: usize = 30;
    const TOKENS: [usize; 2] = [128, 4096];
    /// Input dtypes by name: bf16 (`true`) and fp16.
    const INPUTS: [(&str, bool); 2] = [("bf16", true), ("fp16", false)];
    /// The block size of `CudaDevice::quantize_raw` (one block per token).
    const PER_TOKEN_THREADS: u32 = 256;

    type Res<T> = Result<T, String>;

    fn err(e: impl std::fmt::Display) -> String {
        e.to_string()
    }

    pub fn run() -> Res<()> {
        if let Some(reason) = probe::gpu_skip_reason(1) {
            println!("gpu_quantize: {reason}; nothing measured");
            return Ok(());
        }
        let schemes = env_list("MOE_BENCH_SCHEMES", &QuantScheme::ALL, scheme_among(&QuantScheme::ALL))?;
        let tokens = env_list("MOE_BENCH_TOKENS", &TOKENS, positive_count)?;
        let inputs = env_list("MOE_BENCH_INPUTS", &INPUTS, parse_input)?;
        let gpu = Arc::new(CudaDevice::new(0).map_err(err)?);
        let sms = gpu.sm_count().map_err(err)?;
        let params = QuantParams {
            fp8_static_scale: 0.05,
            nvfp4_global_scale: 448.0 * 6.0 / 200.0,
        };
        println!(
            "{}, hidden {HIDDEN}; median of {ITERS} after {WARMUP} warm-up; times in us\n",
            gpu.describe()
        );
        println!("| scheme | input | tokens | grid | quantize us | GB/s (read + written) | ceiling / row |");
        println!("|---|---|---|---|---|---|---|");
        for (&n, &(input, input_bf16)) in tokens.iter().flat_map(|n| inputs.iter().map(move |i| (n, i))) {
            let x = DeviceBuffer::from_bytes(&gpu, le_bytes(&random_tokens(n, input_bf16)).as_slice()).map_err(err)?;
            let copy = DeviceBuffer::zeroed(&gpu, x.bytes()).map_err(err)?;
            let every_sm = OneSidedLaunch {
                max_blocks: sms,
                threads_per_block: 1024,
            };
            let ceiling = time(&gpu, || {
                // SAFETY: both buffers hold the n input rows, a multiple of 16 bytes.
                unsafe { gpu.copy_16b(x.ptr(), copy.ptr(), x.bytes(), every_sm) }.map_err(err)
            })?;
            println!(
                "| copy ceiling | {input} | {n} | {sms} x 1024 | {ceiling:.1} | {:.0} | 1.00 |",
                2.0 * x.bytes() as f64 / ceiling / 1e3
            );
            for &scheme in &schemes {
                let spec = QuantSpec {
                    scheme,
                    hidden: HIDDEN,
                    input_bf16,
                };
                let wire = scheme.wire_layout(HIDDEN).map_err(err)?;
                let payload = DeviceBuffer::zeroed(&gpu, n * wire.payload_bytes).map_err(err)?;
                let scales = DeviceBuffer::zeroed(&gpu, n * wire.scale_bytes).map_err(err)?;
                let moved = (x.bytes() + n * (wire.payload_bytes + wire.scale_bytes)) as f64;
                for (grid, max_blocks, threads) in [
                    ("1 block/token x 256".to_string(), u32::MAX, PER_TOKEN_THREADS),
                    (format!("{sms} x 1024"), sms, 1024),
                ] {
                    let us = time(&gpu, || {
                        // SAFETY: x holds n rows of HIDDEN 16-bit values, payload and scales n
                        // rows of the scheme's wire sizes, all on this GPU.
                        unsafe {
                            gpu.quantize_raw_on(
                                &spec,
                                &params,
                                x.ptr(),
                                n,
                                payload.ptr(),
                                wire.payload_bytes,
                                scales.ptr(),
                                wire.scale_bytes,
                                max_blocks,
                                threads,
                            )
                        }
                        .map_err(err)
                    })?;
                    println!(
                        "| {} | {input} | {n} | {grid} | {us:.1} | {:.0} | {:.2} |",
                        scheme.name(),
                        moved / us / 1e3,
                        ceiling / us
                    );
                }
            }
        }
        Ok(())
    }

    /// Median time of `launch` on the GPU's stream, in microseconds.
    fn time(gpu: &CudaDevice, launch: impl Fn() -> Res<()>) -> Res<f64> {
        let event = || {
            gpu.context()
                .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(err)
        };
        let pairs: Vec<(CudaEvent, CudaEvent)> = (0..ITERS).map(|_| Ok((event()?, event()?))).collect::<Res<_>>()?;
        for _ in 0..WARMUP {
            launch()?;
        }
        for (start, end) in &pairs {
            start.record(gpu.stream()).map_err(err)?;
            launch()?;
            end.record(gpu.stream()).map_err(err)?;
        }
        gpu.stream().synchronize().map_err(err)?;
        let mut us = pairs
            .iter()
            .map(|(start, end)| Ok(f64::from(start.elapsed_ms(end).map_err(err)?) * 1e3))
            .collect::<Res<Vec<f64>>>()?;
        us.sort_by(f64::total_cmp);
        Ok(us[us.len() / 2])
    }

    /// `n` tokens of HIDDEN bf16 or fp16 values: uniform in [-1, 1] times a magnitude per token
    /// drawn over six decades, so that every scale block has a different amax.
    fn random_tokens(n: usize, input_bf16: bool) -> Vec<u16> {
        let encode = if input_bf16 { bf16::from_f32 } else { fp16::from_f32 };
        let mut rng = ChaCha8Rng::seed_from_u64(7168);
        let mut x = Vec::with_capacity(n * HIDDEN);
        for _ in 0..n {
            let mag = 10f32.powf(rng.random_range(-3.0f32..3.0));
            x.extend((0..HIDDEN).map(|_| encode(rng.random_range(-1.0f32..1.0) * mag)));
        }
        x
    }

    fn le_bytes(x: &[u16]) -> Vec<u8> {
        x.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    fn parse_input(entry: &str) -> Res<(&'static str, bool)> {
        INPUTS
            .into_iter()
            .find(|(name, _)| *name == entry)
            .ok_or_else(|| "want bf16 or fp16".to_string())
    }
}
