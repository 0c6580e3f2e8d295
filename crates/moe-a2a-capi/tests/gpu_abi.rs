//! The C ABI on a GPU (feature `cuda`): two ranks, each a process of its own (this binary run
//! again with the launchers' environment), join their GPU with a stream of the caller's
//! (`moe_world_use_gpu`) and run a layer on device tensors through the exported functions:
//! prepare / C experts / finalize, then the runner with the experts as a callback, on both
//! NVLink backends. The experts read the delivery and write their output through the caller's
//! stream, so every copy is ordered with the library's work on it; the output read back equals
//! the layer computed on the host. With `MOE_SHARE_GPUS=1` the ranks share one GPU. Without a
//! GPU each trial is reported as ignored with the reason; `MOE_REQUIRE_GPU=1` makes that a
//! failure.

use libtest_mimic::{Arguments, Failed, Trial};
use moe_kernels::probe::{ranks_skip_reason, trial_label};

const RANKS: usize = 2;
const BACKENDS: [&str; 2] = ["nvlink-one-sided", "nvlink-two-sided"];

fn main() {
    let mut args = Arguments::from_args();
    args.test_threads.get_or_insert(1);
    let skip = ranks_skip_reason(RANKS);
    let trials = BACKENDS
        .into_iter()
        .map(|backend| {
            let name = format!("device_tensors_through_the_c_abi_match_the_host {backend}");
            let test = name.clone();
            Trial::test(trial_label(name, skip.as_deref()), move || {
                cases::device_layer(&test, backend)
            })
            .with_ignored_flag(skip.is_some())
        })
        .collect();
    libtest_mimic::run(&args, trials).exit();
}

#[cfg(not(feature = "cuda"))]
mod cases {
    use super::*;

    pub fn device_layer(_: &str, _: &str) -> Result<(), Failed> {
        Err("built without the `cuda` feature (cargo test -p moe-a2a-capi --features cuda)".into())
    }
}

#[cfg(feature = "cuda")]
mod cases {
    use std::ffi::{CString, c_void};
    use std::sync::Arc;
    use std::time::Duration;

    use moe_a2a::harness::processes::{finish, free_port, spawn_rank};
    use moe_a2a_capi::layer::*;
    use moe_a2a_capi::runner::*;
    use moe_a2a_capi::status::{MoeStatus, last_error};
    use moe_a2a_capi::types::*;
    use moe_a2a_capi::world::*;
    use moe_kernels::buffer::DeviceBuffer;
    use moe_kernels::device::CudaDevice;

    use super::*;

    const EXPERTS: usize = 16;
    const TOP_K: usize = 4;
    const HIDDEN: usize = 128;
    const TOKENS: usize = 8;
    const CHILD_ENV: &str = "MOE_PROCESS_CHILD";

    fn bf16(v: f32) -> u16 {
        let u = v.to_bits();
        ((u + 0x7fff + ((u >> 16) & 1)) >> 16) as u16
    }

    fn f32_of(b: u16) -> f32 {
        f32::from_bits(u32::from(b) << 16)
    }

    /// Rank `rank`'s tokens (multiples of 1/8, exact in bf16), distinct experts, weights.
    fn inputs(rank: usize) -> (Vec<u16>, Vec<i32>, Vec<f32>) {
        let x = (0..TOKENS * HIDDEN)
            .map(|i| bf16(((i * 3 + rank * 5) % 17) as f32 / 8.0 - 1.0))
            .collect();
        let ids = (0..TOKENS * TOP_K)
            .map(|i| ((rank * 3 + i / TOP_K * 5 + i % TOP_K * (EXPERTS / TOP_K)) % EXPERTS) as i32)
            .collect();
        let w = (0..TOKENS * TOP_K).map(|i| (i % TOP_K + 1) as f32 / 10.0).collect();
        (x, ids, w)
    }

    fn device(buffer: &DeviceBuffer, dtype: MoeDtype, shape: &[usize], ordinal: usize) -> MoeTensor {
        let mut t = MoeTensor::ABSENT;
        t.data = buffer.ptr() as usize as *mut c_void;
        t.dtype = dtype as i32;
        t.ndim = shape.len() as i32;
        for (s, &d) in t.shape.iter_mut().zip(shape) {
            *s = d as i64;
        }
        t.device_type = MoeDevice::Cuda as i32;
        t.device_id = ordinal as i32;
        t
    }

    fn bytes<T: Copy>(v: &[T]) -> Vec<u8> {
        // Plain numbers, read as their bytes.
        let len = std::mem::size_of_val(v);
        // SAFETY: `v` is `len` initialized bytes of plain numbers.
        unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), len) }.to_vec()
    }

    /// The experts (expert e scales its token by e + 1, weighted), reading the delivery and
    /// writing their output through `user_data`, the caller's `CudaDevice` on the world's
    /// stream: the copies are ordered after the dispatch and before the combine.
    unsafe extern "C" fn experts(user_data: *mut c_void, d: *const MoeDelivery, out: *const MoeTensor) -> i32 {
        // SAFETY: `user_data` is the rank's CudaDevice, alive for the runner's life; the library
        // passes a live delivery and output on that GPU, of the shapes they claim.
        unsafe {
            let (gpu, d, out) = (&*(user_data as *const CudaDevice), &*d, &*out);
            let rows = d.topk_ids.shape[0] as usize;
            let mut x = vec![0u8; rows * HIDDEN * 2];
            let mut ids = vec![0u8; rows * TOP_K * 4];
            let mut ws = vec![0u8; rows * TOP_K * 4];
            let read = gpu.copy_to_host(d.activations.data as u64, &mut x).is_ok()
                && gpu.copy_to_host(d.topk_ids.data as u64, &mut ids).is_ok()
                && gpu.copy_to_host(d.topk_weights.data as u64, &mut ws).is_ok();
            if !read {
                return 1;
            }
            let word = |b: &[u8], i: usize| <[u8; 4]>::try_from(&b[4 * i..4 * i + 4]).expect("4 bytes");
            let mut y = vec![0u8; rows * HIDDEN * 2];
            for r in 0..rows {
                let scale: f32 = (0..TOP_K)
                    .map(|k| {
                        (
                            i32::from_le_bytes(word(&ids, r * TOP_K + k)),
                            f32::from_le_bytes(word(&ws, r * TOP_K + k)),
                        )
                    })
                    .filter(|&(e, _)| e >= 0)
                    .map(|(e, w)| w * (e + 1) as f32)
                    .sum();
                for h in 0..HIDDEN {
                    let i = r * HIDDEN + h;
                    let v = f32_of(u16::from_le_bytes([x[2 * i], x[2 * i + 1]])) * scale;
                    y[2 * i..2 * i + 2].copy_from_slice(&bf16(v).to_le_bytes());
                }
            }
            i32::from(gpu.copy_to_device(out.data as u64, &y).is_err())
        }
    }

    /// The largest error of `out` against the layer computed here, relative to the largest value.
    fn error(out: &[u16], x: &[u16], ids: &[i32], w: &[f32]) -> f64 {
        let (mut worst, mut largest) = (0.0f64, 1e-30f64);
        for t in 0..TOKENS {
            let scale: f64 = (0..TOP_K)
                .map(|k| f64::from(w[t * TOP_K + k]) * f64::from(ids[t * TOP_K + k] + 1))
                .sum();
            for h in 0..HIDDEN {
                let want = f64::from(f32_of(x[t * HIDDEN + h])) * scale;
                worst = worst.max((f64::from(f32_of(out[t * HIDDEN + h])) - want).abs());
                largest = largest.max(want.abs());
            }
        }
        worst / largest
    }

    /// In a rank's process: the layer through the C ABI on device tensors, both ways.
    fn act(backend: &str) -> Result<String, String> {
        let failed = |what: &str, status: MoeStatus| format!("{what}: {status:?}: {}", last_error());
        let config = moe_a2a::control::TcpConfig::from_env().map_err(|e| e.to_string())?;
        let ordinal = moe_kernels::probe::process_device(config.local_rank, config.local_world_size)?;
        // The caller's stream: the experts' copies and the library's kernels share it.
        let gpu = Arc::new(CudaDevice::new(ordinal).map_err(|e| e.to_string())?);
        let stream = gpu.stream().cu_stream() as *mut c_void;
        let mut world = std::ptr::null_mut();
        let backend_c = CString::new(backend).expect("no NUL");
        // SAFETY: live locals; the stream outlives the world (the CudaDevice is dropped last).
        unsafe {
            let status = moe_world_from_env(&mut world);
            if status != MoeStatus::Ok {
                return Err(failed("moe_world_from_env", status));
            }
            let status = moe_world_use_gpu(world, ordinal as i32, stream);
            if status != MoeStatus::Ok {
                return Err(failed("moe_world_use_gpu", status));
            }
        }
        let rank = config.rank;
        let (x, ids, w) = inputs(rank);
        let upload = |b: Vec<u8>| DeviceBuffer::from_bytes(&gpu, &b).map_err(|e| e.to_string());
        let (gx, gids, gw) = (upload(bytes(&x))?, upload(bytes(&ids))?, upload(bytes(&w))?);
        let gout = upload(vec![0xff; TOKENS * HIDDEN * 2])?;
        let tokens = device(&gx, MoeDtype::Bf16, &[TOKENS, HIDDEN], ordinal);
        let topk_ids = device(&gids, MoeDtype::I32, &[TOKENS, TOP_K], ordinal);
        let topk_weights = device(&gw, MoeDtype::F32, &[TOKENS, TOP_K], ordinal);
        let out = device(&gout, MoeDtype::Bf16, &[TOKENS, HIDDEN], ordinal);
        let spec = MoeLayerSpec {
            num_experts: EXPERTS as u32,
            top_k: TOP_K as u32,
            hidden: HIDDEN as u32,
            max_tokens_per_rank: TOKENS as u32,
            tp: 1,
            dp: RANKS as u32,
            ep: 1,
            ..MoeLayerSpec::default()
        };
        let read_out = || -> Result<Vec<u16>, String> {
            let mut raw = vec![0u8; TOKENS * HIDDEN * 2];
            gout.download(0, &mut raw).map_err(|e| e.to_string())?;
            Ok(raw.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect())
        };
        let mut report = String::new();
        // SAFETY: every descriptor describes live device memory of this GPU; the experts'
        // user data is `gpu`, alive past the layer and runner, which are freed here.
        unsafe {
            let mut layer = std::ptr::null_mut();
            let status = moe_layer_new(world, backend_c.as_ptr(), &spec, &mut layer);
            if status != MoeStatus::Ok {
                return Err(failed("moe_layer_new", status));
            }
            let mut delivery = std::mem::MaybeUninit::<MoeDelivery>::uninit();
            let status = moe_layer_prepare(layer, &tokens, &topk_ids, &topk_weights, delivery.as_mut_ptr());
            if status != MoeStatus::Ok {
                return Err(failed("moe_layer_prepare", status));
            }
            let d = delivery.assume_init();
            if d.activations.device_type != MoeDevice::Cuda as i32 {
                return Err("the delivery of device inputs is not on the GPU".into());
            }
            if experts(Arc::as_ptr(&gpu) as *mut c_void, &d, &d.expert_output) != 0 {
                return Err("the experts' copies failed".into());
            }
            for (what, status) in [
                ("moe_layer_finalize", moe_layer_finalize(layer, &d.expert_output, &out)),
                ("moe_layer_wait", moe_layer_wait(layer)),
            ] {
                if status != MoeStatus::Ok {
                    return Err(failed(what, status));
                }
            }
            moe_layer_free(layer);
            report += &format!("prepare/finalize error {:.1e}; ", error(&read_out()?, &x, &ids, &w));

            let callback = MoeExperts {
                apply: Some(experts),
                user_data: Arc::as_ptr(&gpu) as *mut c_void,
                activation_format: MoeFormat::Standard as i32,
            };
            let mut runner = std::ptr::null_mut();
            let status = moe_runner_new(world, backend_c.as_ptr(), &spec, &callback, &mut runner);
            if status != MoeStatus::Ok {
                return Err(failed("moe_runner_new", status));
            }
            gout.upload(0, &vec![0xff; TOKENS * HIDDEN * 2])
                .map_err(|e| e.to_string())?;
            for (what, status) in [
                (
                    "moe_runner_forward",
                    moe_runner_forward(runner, &tokens, &topk_ids, &topk_weights, &out),
                ),
                ("moe_runner_wait", moe_runner_wait(runner)),
            ] {
                if status != MoeStatus::Ok {
                    return Err(failed(what, status));
                }
            }
            moe_runner_free(runner);
            report += &format!("runner error {:.1e}", error(&read_out()?, &x, &ids, &w));
            moe_world_free(world);
        }
        Ok(report)
    }

    pub fn device_layer(test: &str, backend: &str) -> Result<(), Failed> {
        if let Ok(scenario) = std::env::var(CHILD_ENV) {
            match act(&scenario) {
                Ok(report) => println!("RESULT {report}"),
                Err(e) => println!("RESULT error: {e}"),
            }
            return Ok(());
        }
        let port = free_port();
        let ranks: Vec<_> = (0..RANKS).map(|r| spawn_rank(test, backend, port, r, RANKS)).collect();
        for (r, child) in ranks.into_iter().enumerate() {
            let (ok, out) = finish(child, Duration::from_secs(120));
            // libtest's "test <name> ... " precedes the child's first line of output.
            let line = out
                .lines()
                .find_map(|l| l.split_once("RESULT ").map(|(_, said)| said))
                .unwrap_or_default();
            let errors: Vec<f64> = line
                .split("error ")
                .skip(1)
                .filter_map(|s| s.split(|c: char| c == ';' || c.is_whitespace()).next()?.parse().ok())
                .collect();
            if !ok || errors.len() != 2 || errors.iter().any(|&e| e >= 1e-2) {
                return Err(format!("{backend}, rank {r} (exit ok: {ok}):\n{out}").into());
            }
        }
        Ok(())
    }
}
