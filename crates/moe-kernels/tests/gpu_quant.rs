//! GPU quantization is bit-exact with the CPU reference (`moe-quant`) for every scheme, on
//! random tokens over six decades, every bf16/fp16 bit pattern (NaN, ±Inf, subnormals, the
//! saturation edges), all-zero tokens and blocks; with one block per token, with a few blocks
//! that each quantize batches of tokens over several passes, and with blocks too small for one
//! pass to hold a token; a second `CudaDevice` of a device
//! runs on the process's kernel cache. Without a GPU each trial is reported as ignored with the
//! reason; `MOE_REQUIRE_GPU=1` makes that a failure.

use libtest_mimic::Failed;
use moe_kernels::source::QuantSpec;
use support::GpuTrials;

mod support;

fn main() {
    let mut trials = GpuTrials::new();
    for spec in QuantSpec::all() {
        trials.add(format!("quantize_bit_exact {spec}"), move || cases::quantize(spec));
    }
    trials.add("swizzle_128x4_matches_reference", cases::swizzle);
    trials.add("second_gpu_of_a_device_uses_the_cached_kernels", cases::second_gpu);
    trials.run()
}

#[cfg(not(feature = "cuda"))]
mod cases {
    use super::*;
    use support::no_gpu;

    pub fn quantize(_: QuantSpec) -> Result<(), Failed> {
        no_gpu()
    }

    pub fn swizzle() -> Result<(), Failed> {
        no_gpu()
    }

    pub fn second_gpu() -> Result<(), Failed> {
        no_gpu()
    }
}

#[cfg(feature = "cuda")]
mod cases {
    use moe_kernels::device::CudaDevice;
    use moe_kernels::nvrtc::PtxCache;
    use moe_quant::{QuantParams, QuantScheme, bf16, fp16, quantize_token, swizzle};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use moe_kernels::probe;
    use support::{failed, gpu};

    fn encode(v: f32, spec: &QuantSpec) -> u16 {
        if spec.input_bf16 {
            bf16::from_f32(v)
        } else {
            fp16::from_f32(v)
        }
    }

    fn decode(bits: u16, spec: &QuantSpec) -> f32 {
        if spec.input_bf16 {
            bf16::to_f32(bits)
        } else {
            fp16::to_f32(bits)
        }
    }

    /// Tokens that hit every rule of the spec: every 16-bit pattern of the input dtype, random
    /// tokens over six decades, all-zero tokens, tokens with all-zero blocks, and tokens with a
    /// NaN or infinity among ordinary values.
    fn tokens(spec: &QuantSpec) -> Vec<u16> {
        let h = spec.hidden;
        let mut rng = ChaCha8Rng::seed_from_u64(spec.hidden as u64 * 31 + spec.scheme_index() as u64);
        let mut x: Vec<u16> = (0..=u16::MAX).collect();
        x.resize(x.len().div_ceil(h) * h, 0);
        for t in 0..24 {
            let mag = 10f32.powf(rng.random_range(-3.0f32..3.0));
            let mut row: Vec<u16> = (0..h)
                .map(|_| encode(rng.random_range(-1.0f32..1.0) * mag, spec))
                .collect();
            match t % 6 {
                0 => row.fill(0),
                1 => row[..h / 2].fill(0),
                2 => row[rng.random_range(0..h)] = encode(f32::NAN, spec),
                3 => row[rng.random_range(0..h)] = encode(f32::INFINITY, spec),
                4 => row[rng.random_range(0..h)] = encode(448.0 * mag, spec),
                _ => {}
            }
            x.extend(row);
        }
        x
    }

    pub fn quantize(spec: QuantSpec) -> Result<(), Failed> {
        let gpu = gpu()?;
        let params = QuantParams {
            fp8_static_scale: 0.05,
            nvfp4_global_scale: 448.0 * 6.0 / 200.0,
        };
        let x = tokens(&spec);
        let wire = spec.scheme.wire_layout(spec.hidden).map_err(failed)?;
        let (pb, sb, h) = (wire.payload_bytes, wire.scale_bytes, spec.hidden);
        let mut want_p = vec![0u8; x.len() / h * pb];
        let mut want_s = vec![0u8; x.len() / h * sb];
        for t in 0..x.len() / h {
            let row: Vec<f32> = x[t * h..(t + 1) * h].iter().map(|b| decode(*b, &spec)).collect();
            let (p, s) = (&mut want_p[t * pb..(t + 1) * pb], &mut want_s[t * sb..(t + 1) * sb]);
            quantize_token(spec.scheme, &params, &row, p, s).map_err(failed)?;
        }
        // One block of 256 threads per token; 3 blocks of 256, each taking every third token in
        // batches of up to MOE_BATCH_MAX tokens per pass where the tokens are small; and 3 blocks
        // of 32 threads, too few for one pass to hold a large token (fp8-per-token then finds
        // the token's amax in a pass of its own).
        for (max_blocks, threads) in [(u32::MAX, 256), (3, 256), (3, 32)] {
            let (payload, scales) = gpu.quantize(&spec, &params, &x, max_blocks, threads).map_err(failed)?;
            for (what, got, want, bytes) in [("payload", &payload, &want_p, pb), ("scales", &scales, &want_s, sb)] {
                if let Some(i) = got.iter().zip(want.iter()).position(|(g, w)| g != w) {
                    return Err(format!(
                        "{spec} on at most {max_blocks} blocks of {threads}: token {} {what} byte {}: GPU 0x{:02x}, reference \
                         0x{:02x} (on {})",
                        i / bytes,
                        i % bytes,
                        got[i],
                        want[i],
                        gpu.describe()
                    )
                    .into());
                }
            }
        }
        Ok(())
    }

    pub fn swizzle() -> Result<(), Failed> {
        let gpu = gpu()?;
        let mut rng = ChaCha8Rng::seed_from_u64(128);
        for (rows, cols) in [(1, 1), (5, 3), (128, 4), (129, 448), (300, 7), (1024, 224)] {
            let linear: Vec<u8> = (0..rows * cols).map(|_| rng.random_range(1..=255u8)).collect();
            let got = gpu.swizzle_128x4(&linear, rows, cols).map_err(failed)?;
            let want = swizzle::swizzle_128x4(&linear, rows, cols);
            if got != want {
                let i = got
                    .iter()
                    .zip(&want)
                    .position(|(g, w)| g != w)
                    .unwrap_or(got.len().min(want.len()));
                return Err(format!("[{rows}, {cols}]: swizzled byte {i} differs (GPU vs reference)").into());
            }
        }
        Ok(())
    }

    /// A `CudaDevice` opened after another one of the same device was used and dropped (a rebuilt
    /// world) launches the modules that one loaded, without compiling them again, and gets the
    /// same bytes.
    pub fn second_gpu() -> Result<(), Failed> {
        probe::gpu_count()?;
        let spec = QuantSpec {
            scheme: QuantScheme::Nvfp4,
            hidden: 7168,
            input_bf16: true,
        };
        let params = QuantParams {
            fp8_static_scale: 0.05,
            nvfp4_global_scale: 448.0 * 6.0 / 200.0,
        };
        let x = tokens(&spec);
        let first = CudaDevice::new(0).map_err(failed)?;
        let want = first.quantize(&spec, &params, &x, u32::MAX, 256).map_err(failed)?;
        drop(first);
        let compiled = PtxCache::global().compilations();
        let second = CudaDevice::new(0).map_err(failed)?;
        let got = second.quantize(&spec, &params, &x, u32::MAX, 256).map_err(failed)?;
        if got != want {
            return Err(
                format!("{spec}: a second CudaDevice of device 0 quantized to other bytes than the first").into(),
            );
        }
        let recompiled = PtxCache::global().compilations() - compiled;
        if recompiled != 0 {
            return Err(format!("{spec}: a second CudaDevice of device 0 ran NVRTC {recompiled} more times").into());
        }
        Ok(())
    }
}
