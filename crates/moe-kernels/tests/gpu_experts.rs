//! The GPU diagonal experts (`CudaDiagonalExperts`) are bit-identical with the host reference
//! experts (`ReferenceExperts` over the same `DiagonalExperts`) on random deliveries: every wire
//! scheme, both activation formats, linear and 128x4-swizzled scales, deferred quantization
//! (the experts quantize bf16 / fp16 rows themselves), expert-parallel and tensor-parallel
//! ownership, padding rows, slots of other ranks, stale activations and negative weights. They
//! refuse host tensors, report id-convention violations through `check` as the host reports them,
//! and `apply` records into a CUDA graph (no host synchronization, no allocation). Without a GPU
//! each trial is reported as ignored with the reason; `MOE_REQUIRE_GPU=1` makes that a failure.

use std::fmt;

use libtest_mimic::Failed;
use moe_quant::QuantScheme;
use support::GpuTrials;

mod support;

/// One bit-exactness trial.
#[derive(Clone, Copy, Debug)]
struct Case {
    /// The layer's scheme (`QuantConfig::scheme`).
    scheme: QuantScheme,
    deferred: bool,
    swizzled: bool,
    batched: bool,
    /// Tensor-parallel shard 1 of 3 of every expert, rather than expert-parallel rank 1 of 3.
    tp: bool,
    input_bf16: bool,
    /// The DeepSeek-V3 shape (hidden 7168, 256 experts, top-8, rank 1 of 8) instead of the small
    /// one (hidden 256, 8 experts, top-4).
    deepseek: bool,
}

impl fmt::Display for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.scheme)?;
        if self.swizzled {
            f.write_str("+swizzled")?;
        }
        if self.deferred {
            f.write_str("+deferred")?;
        }
        let input = if self.input_bf16 { "bf16" } else { "fp16" };
        let format = if self.batched { "batched" } else { "standard" };
        let owner = if self.tp { "tp" } else { "ep" };
        write!(f, " in={input} {format} {owner}")?;
        if self.deepseek {
            f.write_str(" deepseek-v3")?;
        }
        Ok(())
    }
}

impl Case {
    /// Every scheme x {Standard, Batched} x {linear, swizzled where the scheme has one-byte
    /// scales} x {as sent, deferred where the scheme quantizes} x {EP, TP}, alternating the
    /// input dtype so that both outputs and both 16-bit wires are covered; plus the DeepSeek-V3
    /// shape.
    fn all() -> Vec<Case> {
        let mut v = Vec::new();
        for (index, scheme) in QuantScheme::ALL.into_iter().enumerate() {
            let quantized = !matches!(scheme, QuantScheme::Bf16 | QuantScheme::Fp16);
            for deferred in [false, true] {
                if deferred && !quantized {
                    continue;
                }
                let swizzles = matches!(scheme, QuantScheme::Nvfp4 | QuantScheme::Mxfp8) && !deferred;
                for swizzled in [false, true] {
                    if swizzled && !swizzles {
                        continue;
                    }
                    for batched in [false, true] {
                        for tp in [false, true] {
                            let input_bf16 = match scheme {
                                QuantScheme::Bf16 => true,
                                QuantScheme::Fp16 => false,
                                _ => (index + usize::from(deferred)).is_multiple_of(2),
                            };
                            v.push(Case {
                                scheme,
                                deferred,
                                swizzled,
                                batched,
                                tp,
                                input_bf16,
                                deepseek: false,
                            });
                        }
                    }
                }
            }
        }
        v.push(Case {
            scheme: QuantScheme::Nvfp4,
            deferred: false,
            swizzled: true,
            batched: false,
            tp: false,
            input_bf16: true,
            deepseek: true,
        });
        v
    }
}

fn main() {
    let mut trials = GpuTrials::new();
    for case in Case::all() {
        trials.add(format!("experts_bit_exact {case}"), move || cases::bit_exact(case));
    }
    trials.add("experts_refuse_host_tensors", cases::host_tensors);
    trials.add("experts_report_convention_violations_like_the_host", cases::violations);
    trials.add("experts_apply_records_into_a_cuda_graph", cases::graph);
    trials.run()
}

#[cfg(not(feature = "cuda"))]
mod cases {
    use super::*;
    use support::no_gpu;

    pub fn bit_exact(_: Case) -> Result<(), Failed> {
        no_gpu()
    }

    pub fn host_tensors() -> Result<(), Failed> {
        no_gpu()
    }

    pub fn violations() -> Result<(), Failed> {
        no_gpu()
    }

    pub fn graph() -> Result<(), Failed> {
        no_gpu()
    }
}

#[cfg(feature = "cuda")]
mod cases {
    use std::sync::Arc;

    use moe_core::experts::{DiagonalExperts, ExpertFunction, Experts, ReferenceExperts};
    use moe_core::tensor::POISON_BYTE;
    use moe_core::{
        ActivationFormat, Activations, DType, Dispatched, ExpertOwnership, ExpertPlacement, InputDtype, QuantConfig,
        ScaleLayout, Tensor,
    };
    use moe_kernels::buffer::DeviceBuffer;
    use moe_kernels::device::CudaDevice;
    use moe_kernels::experts::CudaDiagonalExperts;
    use moe_kernels::tensor::{device_tensor, upload_tensor};
    use moe_quant::{QuantParams, nvfp4_global_scale, quantize_token, swizzle};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use support::{failed, gpu};

    /// A layer's experts and one delivery to them, built on the host.
    struct Setup {
        function: DiagonalExperts,
        format: ActivationFormat,
        quant: QuantConfig,
        input: InputDtype,
        ownership: ExpertOwnership,
        dispatched: Dispatched,
    }

    impl Setup {
        fn new(case: &Case) -> Self {
            let (hidden, experts, top_k, ranks) = if case.deepseek {
                (7168, 256, 8, 8)
            } else {
                (256, 8, 4, 3)
            };
            let input = if case.input_bf16 {
                InputDtype::Bf16
            } else {
                InputDtype::F16
            };
            // Elements stay below 8 in magnitude: within the fp8 static scale's range (8 / 0.02
            // < 448) and the nvfp4 global scale's amax.
            let params = QuantParams {
                fp8_static_scale: 0.02,
                nvfp4_global_scale: nvfp4_global_scale(8.0),
            };
            let mut quant = QuantConfig::new(case.scheme).with_params(params);
            if case.swizzled {
                quant = quant.with_scale_layout(ScaleLayout::Swizzled128x4);
            }
            if case.deferred {
                quant = quant.deferred();
            }
            let ownership = if case.tp {
                ExpertOwnership::TensorSharded {
                    shard: 1,
                    shards: 3,
                    num_experts: experts,
                }
            } else {
                ExpertOwnership::Ep {
                    placement: Arc::new(ExpertPlacement::contiguous(experts, ranks)),
                    rank: 1,
                }
            };
            let seed = case
                .to_string()
                .bytes()
                .fold(7u64, |h, b| h.wrapping_mul(131) ^ u64::from(b));
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let function = DiagonalExperts::random(experts, hidden, rng.random());
            let wire = Wire::new(&quant, input, hidden);
            let local = ownership.local_experts();
            let (format, dispatched) = if case.batched {
                let (max_rows, n) = (130, local.len());
                let counts: Vec<i32> = (0..n)
                    .map(|li| match li % 4 {
                        0 => max_rows as i32,
                        1 => 0,
                        2 => rng.random_range(1..max_rows as i32),
                        _ => 1,
                    })
                    .collect();
                let mut rows = Rows::default();
                let mut weights = Vec::new();
                for count in &counts {
                    for r in 0..max_rows {
                        let live = r < *count as usize;
                        rows.push(&wire, &mut rng, live);
                        weights.push(if live {
                            rng.random_range(-1.0f32..1.0)
                        } else {
                            f32::from_bits(rng.random())
                        });
                    }
                }
                let dispatched = Dispatched::Batched {
                    activations: rows.activations(&wire, &[n, max_rows]),
                    expert_counts: Tensor::from_i32(&[n], &counts),
                    weights: Tensor::from_f32(DType::F32, &[n, max_rows], &weights),
                };
                (ActivationFormat::BatchedExperts, dispatched)
            } else {
                let n = 200;
                let mut rows = Rows::default();
                let (mut ids, mut weights) = (Vec::new(), Vec::new());
                for _ in 0..n {
                    let padding = rng.random_bool(0.1);
                    let mut live = false;
                    for _ in 0..top_k {
                        if padding || rng.random_bool(0.25) {
                            ids.push(-1);
                            weights.push(0.0);
                        } else {
                            ids.push(local[rng.random_range(0..local.len())] as i32);
                            weights.push(rng.random_range(-1.0f32..1.0));
                            live = true;
                        }
                    }
                    rows.push(&wire, &mut rng, live);
                }
                let dispatched = Dispatched::Standard {
                    activations: rows.activations(&wire, &[n]),
                    topk_ids: Tensor::from_i32(&[n, top_k], &ids),
                    topk_weights: Tensor::from_f32(DType::F32, &[n, top_k], &weights),
                };
                (ActivationFormat::Standard, dispatched)
            };
            Setup {
                function,
                format,
                quant,
                input,
                ownership,
                dispatched,
            }
        }

        fn out_shape(&self) -> Vec<usize> {
            let h = self.function.hidden();
            match &self.dispatched {
                Dispatched::Standard { topk_ids, .. } => vec![topk_ids.shape()[0], h],
                Dispatched::Batched { weights, .. } => vec![weights.shape()[0], weights.shape()[1], h],
            }
        }

        /// The host reference experts' output (poisoned first, so that it is all written).
        fn expected(&self) -> Result<Tensor, Failed> {
            let host = ReferenceExperts::new(Arc::new(self.function.clone()), self.format, self.quant);
            let mut out = Tensor::zeros(self.input.dtype(), &self.out_shape());
            out.poison();
            host.apply(&self.dispatched, &self.ownership, &mut out)
                .map_err(failed)?;
            Ok(out)
        }

        fn experts(&self, gpu: &Arc<CudaDevice>) -> Result<CudaDiagonalExperts, Failed> {
            CudaDiagonalExperts::new(
                gpu,
                &self.function,
                self.format,
                self.quant,
                self.input,
                &self.ownership,
            )
            .map_err(failed)
        }

        /// A poisoned output tensor on the GPU.
        fn device_out(&self, gpu: &Arc<CudaDevice>) -> Result<Tensor, Failed> {
            let shape = self.out_shape();
            let bytes = shape.iter().product::<usize>() * self.input.dtype().size();
            let buffer = DeviceBuffer::from_bytes(gpu, &vec![POISON_BYTE; bytes]).map_err(failed)?;
            device_tensor(&Arc::new(buffer), 0, self.input.dtype(), &shape).map_err(failed)
        }
    }

    /// The delivery with every tensor copied to the GPU.
    fn upload(gpu: &Arc<CudaDevice>, d: &Dispatched) -> Result<Dispatched, Failed> {
        let up = |t: &Tensor| upload_tensor(gpu, t).map_err(failed);
        let act = |a: &Activations| -> Result<Activations, Failed> {
            Ok(match a {
                Activations::Unscaled { scheme, data } => Activations::new(*scheme, up(data)?, None),
                Activations::Scaled {
                    scheme,
                    data,
                    scales,
                    layout,
                } => Activations::new(*scheme, up(data)?, Some((up(scales)?, *layout))),
            })
        };
        Ok(match d {
            Dispatched::Standard {
                activations,
                topk_ids,
                topk_weights,
            } => Dispatched::Standard {
                activations: act(activations)?,
                topk_ids: up(topk_ids)?,
                topk_weights: up(topk_weights)?,
            },
            Dispatched::Batched {
                activations,
                expert_counts,
                weights,
            } => Dispatched::Batched {
                activations: act(activations)?,
                expert_counts: up(expert_counts)?,
                weights: up(weights)?,
            },
        })
    }

    /// The received scheme and its per-row sizes.
    struct Wire {
        scheme: QuantScheme,
        params: QuantParams,
        layout: Option<ScaleLayout>,
        hidden: usize,
        payload_bytes: usize,
        scale_bytes: usize,
        scales_per_token: usize,
    }

    impl Wire {
        fn new(quant: &QuantConfig, input: InputDtype, hidden: usize) -> Self {
            let scheme = quant.wire_scheme(input);
            let w = scheme.wire_layout(hidden).expect("valid hidden");
            Wire {
                scheme,
                params: quant.params,
                layout: quant.received_scale_layout(input),
                hidden,
                payload_bytes: w.payload_bytes,
                scale_bytes: w.scale_bytes,
                scales_per_token: w.scales_per_token,
            }
        }
    }

    /// Received rows, built one at a time: quantized random tokens for rows the experts
    /// compute, random bytes (stale activations, NaN codes included) for the others.
    #[derive(Default)]
    struct Rows {
        payload: Vec<u8>,
        scales: Vec<u8>,
    }

    impl Rows {
        fn push(&mut self, wire: &Wire, rng: &mut ChaCha8Rng, live: bool) {
            let (p0, s0) = (self.payload.len(), self.scales.len());
            self.payload.resize(p0 + wire.payload_bytes, 0);
            self.scales.resize(s0 + wire.scale_bytes, 0);
            let (payload, scales) = (&mut self.payload[p0..], &mut self.scales[s0..]);
            if live {
                // Magnitudes over three decades, so that blocks get different scales.
                let x: Vec<f32> = (0..wire.hidden)
                    .map(|_| rng.random_range(-1.0f32..1.0) * 10f32.powf(rng.random_range(-2.0f32..0.9)))
                    .collect();
                quantize_token(wire.scheme, &wire.params, &x, payload, scales).expect("valid layout");
            } else {
                rng.fill(payload);
                rng.fill(scales);
            }
        }

        /// The rows as activations with leading dims `lead`, the scales of each matrix of the
        /// last leading dim swizzled when the experts want 128x4.
        fn activations(self, wire: &Wire, lead: &[usize]) -> Activations {
            let with_last = |last: usize| [lead, &[last]].concat();
            let data = Tensor::from_bytes(DType::U8, &with_last(wire.payload_bytes), self.payload).expect("sizes");
            let scales = wire.layout.map(|layout| {
                let tensor = match layout {
                    ScaleLayout::Linear => {
                        Tensor::from_bytes(DType::U8, &with_last(wire.scale_bytes), self.scales).expect("sizes")
                    }
                    ScaleLayout::Swizzled128x4 => {
                        let rows = *lead.last().expect("a leading dim");
                        let cols = wire.scales_per_token;
                        let swizzled: Vec<u8> = self
                            .scales
                            .chunks(rows * cols)
                            .flat_map(|m| swizzle::swizzle_128x4(m, rows, cols))
                            .collect();
                        Tensor::from_bytes(DType::U8, &[swizzled.len()], swizzled).expect("sizes")
                    }
                };
                (tensor, layout)
            });
            Activations::new(wire.scheme, data, scales)
        }
    }

    /// Whether two 16-bit outputs are the same value: equal bits, or both NaN (the GPU makes its
    /// own NaN payloads).
    fn same(got: u16, want: u16, dtype: DType) -> bool {
        let inf = if dtype == DType::Bf16 { 0x7f80 } else { 0x7c00 };
        got == want || ((got & 0x7fff) > inf && (want & 0x7fff) > inf)
    }

    /// Compares the GPU's output with the host's, bit for bit.
    fn compare(gpu: &CudaDevice, what: &str, got: &Tensor, want: &Tensor) -> Result<(), Failed> {
        let got = got.to_host().map_err(failed)?;
        if let Some(i) = got.first_poisoned() {
            return Err(format!("{what}: element {i} was not written (on {})", gpu.describe()).into());
        }
        let h = *want.shape().last().expect("a hidden dim");
        let bits = |t: &Tensor| -> Vec<u16> {
            t.bytes()
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect()
        };
        let (g, w) = (bits(&got), bits(want));
        match g.iter().zip(&w).position(|(g, w)| !same(*g, *w, want.dtype())) {
            None => Ok(()),
            Some(i) => Err(format!(
                "{what}: row {} element {}: GPU {:#06x}, host {:#06x} ({:?}, on {})",
                i / h,
                i % h,
                g[i],
                w[i],
                want.dtype(),
                gpu.describe()
            )
            .into()),
        }
    }

    pub fn bit_exact(case: Case) -> Result<(), Failed> {
        let gpu = gpu()?;
        let setup = Setup::new(&case);
        let want = setup.expected()?;
        let experts = setup.experts(&gpu)?;
        let dispatched = upload(&gpu, &setup.dispatched)?;
        let mut out = setup.device_out(&gpu)?;
        experts.apply(&dispatched, &setup.ownership, &mut out).map_err(failed)?;
        experts.check().map_err(failed)?;
        compare(&gpu, &case.to_string(), &out, &want)
    }

    fn standard_case() -> Case {
        Case {
            scheme: QuantScheme::Mxfp8,
            deferred: false,
            swizzled: true,
            batched: false,
            tp: false,
            input_bf16: true,
            deepseek: false,
        }
    }

    pub fn host_tensors() -> Result<(), Failed> {
        let gpu = gpu()?;
        let setup = Setup::new(&standard_case());
        let experts = setup.experts(&gpu)?;
        let mut host_out = Tensor::zeros(setup.input.dtype(), &setup.out_shape());
        let on = gpu.ordinal();
        let err = experts
            .apply(&setup.dispatched, &setup.ownership, &mut host_out)
            .expect_err("host tensors are refused")
            .to_string();
        let says = format!("is in host memory, this call needs it in GPU {on}");
        if !(err.contains("CudaDiagonalExperts::apply") && err.contains(&says)) {
            return Err(format!("unclear refusal of host tensors: {err}").into());
        }
        let dispatched = upload(&gpu, &setup.dispatched)?;
        let err = experts
            .apply(&dispatched, &setup.ownership, &mut host_out)
            .expect_err("a host output is refused")
            .to_string();
        if !err.contains("`out` is in host memory") {
            return Err(format!("unclear refusal of a host output: {err}").into());
        }
        Ok(())
    }

    /// Sets the id and weight of (row, slot) in a Standard delivery.
    fn with_slot(d: &Dispatched, row: usize, slot: usize, id: i32, weight: f32) -> Dispatched {
        let Dispatched::Standard {
            activations,
            topk_ids,
            topk_weights,
        } = d
        else {
            panic!("a Standard delivery")
        };
        let k = topk_ids.shape()[1];
        let (mut ids, mut weights) = (topk_ids.to_i32(), topk_weights.to_f32());
        ids[row * k + slot] = id;
        weights[row * k + slot] = weight;
        Dispatched::Standard {
            activations: activations.clone(),
            topk_ids: Tensor::from_i32(topk_ids.shape(), &ids),
            topk_weights: Tensor::from_f32(DType::F32, topk_weights.shape(), &weights),
        }
    }

    pub fn violations() -> Result<(), Failed> {
        let gpu = gpu()?;
        let setup = Setup::new(&standard_case());
        let experts = setup.experts(&gpu)?;
        let host = ReferenceExperts::new(Arc::new(setup.function.clone()), setup.format, setup.quant);
        // Expert 6 belongs to rank 2 of 3.
        let not_local = with_slot(&setup.dispatched, 7, 0, 6, 0.5);
        let both = with_slot(&not_local, 3, 1, -1, 0.5);
        for (what, d) in [
            ("-1 with a weight, then an expert elsewhere", both),
            ("an expert elsewhere", not_local),
        ] {
            let mut host_out = Tensor::zeros(setup.input.dtype(), &setup.out_shape());
            let want = host
                .apply(&d, &setup.ownership, &mut host_out)
                .expect_err("the host refuses the row");
            let mut out = setup.device_out(&gpu)?;
            experts
                .apply(&upload(&gpu, &d)?, &setup.ownership, &mut out)
                .map_err(failed)?;
            match experts.check() {
                Err(got) if got == want => {}
                got => return Err(format!("{what}: GPU check gave {got:?}, the host {want:?}").into()),
            }
            experts
                .check()
                .map_err(|e| format!("{what}: the record was not cleared: {e}"))?;
        }
        Ok(())
    }

    pub fn graph() -> Result<(), Failed> {
        let gpu = gpu()?;
        let case = Case {
            batched: true,
            ..standard_case()
        };
        let setup = Setup::new(&case);
        let want = setup.expected()?;
        let experts = setup.experts(&gpu)?;
        let dispatched = upload(&gpu, &setup.dispatched)?;
        let mut out = setup.device_out(&gpu)?;
        let graph = gpu
            .capture_graph(|| experts.apply(&dispatched, &setup.ownership, &mut out))
            .map_err(failed)?;
        graph.launch().map_err(failed)?;
        experts.check().map_err(failed)?;
        compare(&gpu, "graph replay", &out, &want)
    }
}
