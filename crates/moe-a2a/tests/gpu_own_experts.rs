//! The README's "Your own experts" on GPUs, whole: an engine's own expert kernel (its CUDA
//! source compiled here with NVRTC through cudarc, as an engine would load its own) behind
//! `moe_a2a::experts::Experts`. `apply` receives the delivery on the rank's GPU and enqueues
//! the kernel on the rank's stream, writing into the tensor `prepare` offers; `MoeLayer::forward`
//! runs the layer on device tensors on two ranks (sharing one GPU with `MOE_SHARE_GPUS=1`), for
//! each NVLink backend, and every rank's output is checked against the same math on the host.
//! Without the GPUs each trial is reported as ignored with the reason; `MOE_REQUIRE_GPU=1` makes
//! that a failure.

use libtest_mimic::{Arguments, Failed, Trial};
use moe_kernels::probe::{ranks_skip_reason, trial_label};

const RANKS: usize = 2;

fn main() {
    let mut args = Arguments::from_args();
    args.test_threads.get_or_insert(1);
    let skip = ranks_skip_reason(RANKS);
    let trials = [backend_nvlink_one_sided::NAME, backend_nvlink_two_sided::NAME]
        .into_iter()
        .map(|backend| {
            let name = format!("an_engines_own_expert_kernel_runs_behind_forward {backend}");
            Trial::test(trial_label(name, skip.as_deref()), move || own_experts::run(backend))
                .with_ignored_flag(skip.is_some())
        })
        .collect::<Vec<_>>();
    // The kernel's source compiles wherever NVRTC is (CI's CPU machine included).
    let nvrtc_skip = match moe_kernels::probe::nvrtc_status() {
        Err(reason) if !moe_kernels::probe::required(moe_kernels::probe::REQUIRE_NVRTC_ENV) => Some(reason),
        _ => None,
    };
    let mut trials = trials;
    trials.push(
        Trial::test(
            trial_label("the_engines_expert_kernel_compiles".to_string(), nvrtc_skip.as_deref()),
            own_experts::compiles,
        )
        .with_ignored_flag(nvrtc_skip.is_some()),
    );
    libtest_mimic::run(&args, trials).exit();
}

#[cfg(not(feature = "cuda"))]
mod own_experts {
    use super::*;

    pub fn run(_: &str) -> Result<(), Failed> {
        Err("built without the `cuda` feature (cargo test --features cuda)".into())
    }

    pub fn compiles() -> Result<(), Failed> {
        run("")
    }
}

#[cfg(feature = "cuda")]
mod own_experts {
    use std::sync::Arc;

    use moe_a2a::experts::Experts;
    use moe_a2a::host::{HostWorldConfig, run_host_world};
    use moe_a2a::quant::QuantScheme;
    use moe_a2a::runner::MoeLayer;
    use moe_a2a::{
        ActivationFormat, CudaRank, DType, Dispatched, ExpertOwnership, InputDtype, LayerConfig, MoeConfig, MoeError,
        ParallelConfig, QuantConfig, RankContext, Result, Tensor,
    };
    use moe_kernels::buffer::DeviceBuffer;
    use moe_kernels::cudarc::driver::{CudaFunction, LaunchConfig, PushKernelArg};
    use moe_kernels::cudarc::nvrtc::compile_ptx;
    use moe_kernels::device::CudaDevice;
    use moe_kernels::tensor::upload_tensor;
    use moe_kernels::world::{CudaWorld, CudaWorldRank};

    use super::*;

    const EXPERTS: usize = 8;
    const TOP_K: usize = 2;
    const HIDDEN: usize = 256;
    const TOKENS: usize = 16;

    /// The engine's kernel: each delivered row times the sum, over its experts that this rank
    /// holds (`[first, first + count)`), of the router weight times the expert's index plus one.
    /// Ids of -1 are skipped (another rank's expert, or a padding row); any other id is not
    /// this rank's to compute, so it is recorded in `foreign` as the contract asks.
    const KERNEL: &str = r#"
extern "C" __global__ void scale_by_expert(const unsigned short* x, const int* ids, const float* w,
                                           unsigned short* y, int rows, int hidden, int top_k,
                                           int first, int count, int* foreign) {
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        float scale = 0.0f;
        for (int j = 0; j < top_k; ++j) {
            const int e = ids[r * top_k + j];
            if (e == -1) continue;
            if (e < first || e >= first + count) {
                atomicExch(foreign, e + 1);
                continue;
            }
            scale += w[r * top_k + j] * (float)(e + 1);
        }
        for (int c = threadIdx.x; c < hidden; c += blockDim.x) {
            // A row no expert here takes is left at 0 (its activations are unspecified).
            const float v = scale == 0.0f ? 0.0f : __uint_as_float((unsigned)x[r * hidden + c] << 16) * scale;
            unsigned u = __float_as_uint(v);
            u += 0x7fffu + ((u >> 16) & 1u);
            y[r * hidden + c] = (unsigned short)(u >> 16);
        }
    }
}
"#;

    pub fn compiles() -> std::result::Result<(), Failed> {
        compile_ptx(KERNEL).map(drop).map_err(|e| Failed::from(e.to_string()))
    }

    /// The engine's experts of one rank: its kernel, loaded on the rank's GPU, and a word where
    /// the kernel records an id it was not meant to see.
    #[derive(Debug)]
    struct ScaleByExpert {
        gpu: Arc<CudaDevice>,
        kernel: CudaFunction,
        first: i32,
        count: i32,
        foreign: DeviceBuffer,
    }

    fn device_error(e: impl std::fmt::Display) -> MoeError {
        MoeError::Device(e.to_string())
    }

    impl ScaleByExpert {
        fn new(gpu: &Arc<CudaDevice>, layer: &LayerConfig, rank: usize) -> Result<Self> {
            let ptx = compile_ptx(KERNEL).map_err(device_error)?;
            let module = gpu.context().load_module(ptx).map_err(device_error)?;
            let mine = layer.placement().experts_of(rank);
            Ok(ScaleByExpert {
                gpu: gpu.clone(),
                kernel: module.load_function("scale_by_expert").map_err(device_error)?,
                first: mine[0] as i32,
                count: mine.len() as i32,
                foreign: DeviceBuffer::zeroed(gpu, 4).map_err(device_error)?,
            })
        }

        /// The foreign id the kernel recorded (plus one), 0 for none; waits for the stream.
        fn foreign(&self) -> Result<i32> {
            let mut word = [0u8; 4];
            self.foreign.download(0, &mut word).map_err(device_error)?;
            Ok(i32::from_le_bytes(word))
        }
    }

    /// The device address of a tensor on this rank's GPU.
    fn address(t: &Tensor, what: &str) -> Result<u64> {
        t.device_region()
            .map(|r| r.address())
            .ok_or_else(|| MoeError::InvalidInput {
                op: "ScaleByExpert::apply",
                detail: format!("{what} is in host memory; these experts run on the GPU"),
            })
    }

    impl Experts for ScaleByExpert {
        fn activation_format(&self) -> ActivationFormat {
            ActivationFormat::Standard
        }

        fn apply(&self, dispatched: &Dispatched, _: &ExpertOwnership, out: &mut Tensor) -> Result<()> {
            let Dispatched::Standard {
                activations,
                topk_ids,
                topk_weights,
            } = dispatched
            else {
                return Err(MoeError::Convention("these experts take the Standard format".into()));
            };
            let rows = topk_ids.shape()[0];
            let (x, ids, w, y) = (
                address(activations.data(), "the activations")?,
                address(topk_ids, "topk_ids")?,
                address(topk_weights, "topk_weights")?,
                address(out, "out")?,
            );
            let (rows_i, hidden, top_k) = (rows as i32, HIDDEN as i32, TOP_K as i32);
            let foreign = self.foreign.ptr();
            let mut launch = self.gpu.stream().launch_builder(&self.kernel);
            launch
                .arg(&x)
                .arg(&ids)
                .arg(&w)
                .arg(&y)
                .arg(&rows_i)
                .arg(&hidden)
                .arg(&top_k)
                .arg(&self.first)
                .arg(&self.count)
                .arg(&foreign);
            let cfg = LaunchConfig {
                grid_dim: (rows.clamp(1, 1024) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the delivery holds `rows` bf16 rows of HIDDEN values and [rows, TOP_K] ids
            // and weights, `out` [rows, HIDDEN] bf16 (the runner checked its shape), all on this
            // rank's GPU; `foreign` is 4 bytes; the arguments match the kernel's parameters.
            unsafe { launch.launch(cfg) }.map_err(device_error)?;
            Ok(())
        }
    }

    /// Rank `r`'s tokens, ids (every pair of experts, so both ranks get work) and weights.
    fn inputs(r: usize) -> (Tensor, Tensor, Tensor) {
        let x: Vec<f32> = (0..TOKENS * HIDDEN)
            .map(|i| ((i * 7 + r * 13) % 17) as f32 / 8.0 - 1.0)
            .collect();
        let ids: Vec<i32> = (0..TOKENS)
            .flat_map(|t| [(t % EXPERTS) as i32, ((t + 3 + r) % EXPERTS) as i32])
            .collect();
        let w: Vec<f32> = (0..TOKENS).flat_map(|t| [0.25 + 0.03 * t as f32, 0.5]).collect();
        (
            Tensor::from_f32(DType::Bf16, &[TOKENS, HIDDEN], &x),
            Tensor::from_i32(&[TOKENS, TOP_K], &ids),
            Tensor::from_f32(DType::F32, &[TOKENS, TOP_K], &w),
        )
    }

    pub fn run(backend: &str) -> std::result::Result<(), Failed> {
        let fail = |e: &dyn std::fmt::Display| Failed::from(e.to_string());
        let layer = LayerConfig::new(
            MoeConfig::new(EXPERTS, TOP_K, HIDDEN, TOKENS, InputDtype::Bf16),
            QuantConfig::new(QuantScheme::Bf16),
            ParallelConfig::ep(RANKS),
            ActivationFormat::Standard,
        )
        .map_err(|e| fail(&e))?;
        let world = Arc::new(CudaWorld::on_devices(&moe_kernels::probe::rank_devices(RANKS)?).map_err(|e| fail(&e))?);
        let results = run_host_world(HostWorldConfig::new(RANKS), |host| {
            let r = host.rank();
            let device = CudaWorldRank::new(world.clone(), r).map_err(device_error)?;
            let gpu = device.gpu().clone();
            let experts = Arc::new(ScaleByExpert::new(&gpu, &layer, r)?);
            let ctx = RankContext::Cuda(CudaRank::new(host.clone(), Arc::new(device)));
            let mut moe = MoeLayer::new(moe_a2a::registry(), backend, layer.clone(), experts.clone(), ctx)?;
            let (x, ids, w) = inputs(r);
            let mut out = upload_tensor(&gpu, &Tensor::zeros(DType::Bf16, &[TOKENS, HIDDEN]))?;
            moe.forward(
                &upload_tensor(&gpu, &x)?,
                &upload_tensor(&gpu, &ids)?,
                &upload_tensor(&gpu, &w)?,
                &mut out,
            )?;
            moe.wait()?;
            Ok((experts.foreign()?, x, ids, w, out.to_host()?))
        });
        for (r, result) in results.into_iter().enumerate() {
            let (foreign, x, ids, w, out) = result.map_err(|e| fail(&format!("{backend} rank {r}: {e}")))?;
            if foreign != 0 {
                return Err(fail(&format!(
                    "{backend} rank {r}: the experts were handed expert {}, not theirs",
                    foreign - 1
                )));
            }
            let (x, ids, w, out) = (x.to_f32(), ids.to_i32(), w.to_f32(), out.to_f32());
            for t in 0..TOKENS {
                let scale: f32 = (0..TOP_K)
                    .map(|j| w[t * TOP_K + j] * (ids[t * TOP_K + j] + 1) as f32)
                    .sum();
                for c in 0..HIDDEN {
                    let (got, want) = (out[t * HIDDEN + c], scale * x[t * HIDDEN + c]);
                    if (got - want).abs() > 2e-2 * want.abs().max(1.0) {
                        return Err(fail(&format!(
                            "{backend} rank {r} token {t} element {c}: {got}, want {want}"
                        )));
                    }
                }
            }
        }
        Ok(())
    }
}
