//! Kernel sources, their specializations and the NVRTC options that build them. Nothing here
//! needs CUDA, so option rendering is tested on every machine.

use std::fmt;

use moe_quant::QuantScheme;

/// Shared device helpers (typedefs, bit conversions), prepended to every module.
pub const COMMON_CUH: &str = include_str!("../kernels/common.cuh");
/// Token quantization as device functions, specialized on the wire scheme; in front of every
/// module that quantizes.
pub const QUANT_CUH: &str = include_str!("../kernels/quant.cuh");
/// The quantization kernel and the scale swizzle.
pub const QUANT_CU: &str = include_str!("../kernels/quant.cu");
/// The nvlink-one-sided protocol: fused quantize-and-dispatch, and combine (publish, pull, sum).
pub const ONE_SIDED_CU: &str = include_str!("../kernels/one_sided.cu");
/// The nvlink-two-sided protocol: plan, dispatch, combine send and combine reduce.
pub const TWO_SIDED_CU: &str = include_str!("../kernels/two_sided.cu");
/// The peer-copy ceiling kernel.
pub const COPY_CU: &str = include_str!("../kernels/copy.cu");
/// The diagonal reference experts on the GPU.
pub const EXPERTS_CU: &str = include_str!("../kernels/experts.cu");
/// allgather-rs around NCCL: routing rows, EP masking, and the f32 widening and narrowing of
/// the combine.
pub const GATHER_CU: &str = include_str!("../kernels/gather.cu");
/// The BatchedExperts format on the device: its delivery and the combine-side reduction.
pub const BATCHED_CU: &str = include_str!("../kernels/batched.cu");

/// The kernel functions of the quantization module.
pub const QUANTIZE_TOKENS: &str = "moe_quantize_tokens";
/// The 128x4 scale swizzle.
pub const SWIZZLE_128X4: &str = "moe_swizzle_128x4";

/// One-sided dispatch (quantizes each token on the way).
pub const ONE_SIDED_DISPATCH: &str = "moe_one_sided_dispatch";
/// The slot ids (of the peers' `(ep - 1) * max_tokens * top_k`) each thread of one-sided
/// dispatch's checkers reads, in 16-byte loads: the kernel checks the ids the peers wrote with
/// as many of its last blocks as that takes, and its launcher gives it at least as many
/// blocks. One block checking 64 Ki ids takes about 20 us, and a check kernel of its own costs
/// about 6 us of host time and 5 us on the stream (docs/BENCHMARKS.md, seventh session).
pub const ONE_SIDED_CHECK_IDS_PER_THREAD: u64 = 16;
/// One-sided combine: tells the peers the experts' rows are in place, then pulls and sums.
pub const ONE_SIDED_COMBINE: &str = "moe_one_sided_combine";
/// Marks a call abandoned in the one-sided flags (`one_sided.cu`).
pub const ONE_SIDED_ABANDON: &str = "moe_one_sided_abandon";
/// Two-sided: slot numbering and the count exchange.
pub const TWO_SIDED_PLAN: &str = "moe_two_sided_plan";
/// Two-sided dispatch: the dense all-to-all-v.
pub const TWO_SIDED_DISPATCH: &str = "moe_two_sided_dispatch";
/// Two-sided combine: the replies back to their sources.
pub const TWO_SIDED_COMBINE_SEND: &str = "moe_two_sided_combine_send";
/// Two-sided combine: the per-token sum of the replies.
pub const TWO_SIDED_COMBINE_REDUCE: &str = "moe_two_sided_combine_reduce";
/// Marks a call abandoned in the two-sided flags (`two_sided.cu`).
pub const TWO_SIDED_ABANDON: &str = "moe_two_sided_abandon";
/// The peer-copy ceiling kernel.
pub const COPY_16B: &str = "moe_copy_16b";
/// Received slots into the Standard delivery's tensors, on the device.
pub const DELIVER_STANDARD: &str = "moe_deliver_standard";
/// allgather-rs: this rank's top-k rows into its send buffers, padded and checked.
pub const GATHER_ROUTING: &str = "moe_gather_routing";
/// allgather-rs: the gathered ids of experts other ranks own to -1 (EP).
pub const GATHER_MASK_FOREIGN: &str = "moe_gather_mask_foreign";
/// allgather-rs: 16-bit expert output rows to f32, as the host widens them.
pub const GATHER_WIDEN: &str = "moe_gather_widen";
/// allgather-rs: f32 sums to the 16-bit output, as the host rounds them.
pub const GATHER_NARROW: &str = "moe_gather_narrow";

/// Batched delivery, first pass: each (chunk of received rows, local expert)'s matches.
pub const BATCHED_COUNT: &str = "moe_batched_count";
/// Batched delivery, second pass: each matching slot's batched row, weights, counts.
pub const BATCHED_PLACE: &str = "moe_batched_place";
/// Batched delivery, last pass: payload and scales of each placed row.
pub const BATCHED_COPY: &str = "moe_batched_copy";
/// The combine-side sum of each received row's batched expert rows.
pub const BATCHED_REDUCE: &str = "moe_batched_reduce";

/// Diagonal experts over Standard rows (the top-k sum of one received token per row).
pub const DIAGONAL_EXPERTS_STANDARD: &str = "moe_diagonal_experts_standard";
/// Diagonal experts over BatchedExperts rows (one weighted row per local expert and token).
pub const DIAGONAL_EXPERTS_BATCHED: &str = "moe_diagonal_experts_batched";

/// One NVRTC program: a source file and, where it has one, its specialization.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Module {
    Quant(QuantSpec),
    /// The one-sided protocol, specialized on the wire scheme its dispatch quantizes to.
    OneSided(QuantSpec),
    /// The two-sided protocol, specialized on the wire scheme its dispatch quantizes to.
    TwoSided(QuantSpec),
    /// Plain copies: the peer-copy ceiling and the device-side delivery of received slots.
    Copy,
    /// The diagonal reference experts, specialized on the rows they read.
    Experts(ExpertsSpec),
    /// allgather-rs's kernels around NCCL (the quantization and swizzle are the Quant module's).
    Gather,
    /// The BatchedExperts delivery and its reduction (sizes are launch parameters: one module
    /// serves every layout).
    Batched,
}

impl fmt::Display for Module {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Module::Quant(spec) => write!(f, "quant.cu[{spec}]"),
            Module::OneSided(spec) => write!(f, "one_sided.cu[{spec}]"),
            Module::TwoSided(spec) => write!(f, "two_sided.cu[{spec}]"),
            Module::Experts(spec) => write!(f, "experts.cu[{spec}]"),
            Module::Copy | Module::Gather | Module::Batched => f.write_str(self.file()),
        }
    }
}

impl Module {
    /// The file name NVRTC reports errors against.
    pub fn file(&self) -> &'static str {
        match self {
            Module::Quant(_) => "quant.cu",
            Module::OneSided(_) => "one_sided.cu",
            Module::TwoSided(_) => "two_sided.cu",
            Module::Copy => "copy.cu",
            Module::Experts(_) => "experts.cu",
            Module::Gather => "gather.cu",
            Module::Batched => "batched.cu",
        }
    }

    /// The full source NVRTC compiles: the common header, the quantization functions where the
    /// module quantizes, then the module.
    pub fn source(&self) -> String {
        let body = match self {
            Module::Quant(_) => QUANT_CU,
            Module::OneSided(_) => ONE_SIDED_CU,
            Module::TwoSided(_) => TWO_SIDED_CU,
            Module::Copy => COPY_CU,
            Module::Experts(_) => EXPERTS_CU,
            Module::Gather => GATHER_CU,
            Module::Batched => BATCHED_CU,
        };
        if let Module::OneSided(_) = self {
            // The one bound both the kernel and its launcher go by.
            format!(
                "{COMMON_CUH}\n{QUANT_CUH}\n#define MOE_CHECK_IDS_PER_THREAD {ONE_SIDED_CHECK_IDS_PER_THREAD}\n{body}"
            )
        } else if self.quant_spec().is_some() {
            format!("{COMMON_CUH}\n{QUANT_CUH}\n{body}")
        } else {
            format!("{COMMON_CUH}\n{body}")
        }
    }

    /// The specialization of quant.cuh the module is compiled with: the wire scheme of the
    /// modules that quantize for dispatch, and the experts' own scheme (applied to the received
    /// 16-bit rows) for experts that own quantization.
    fn quant_spec(&self) -> Option<QuantSpec> {
        match self {
            Module::Experts(spec) => spec.requantize.map(|scheme| QuantSpec {
                scheme,
                hidden: spec.hidden,
                input_bf16: spec.wire == QuantScheme::Bf16,
            }),
            _ => self.spec().copied(),
        }
    }

    /// The wire scheme specialization, for modules that quantize for dispatch.
    pub fn spec(&self) -> Option<&QuantSpec> {
        match self {
            Module::Quant(spec) | Module::OneSided(spec) | Module::TwoSided(spec) => Some(spec),
            Module::Copy | Module::Experts(_) | Module::Gather | Module::Batched => None,
        }
    }

    /// NVRTC options for `arch` (for example `sm_90a`).
    pub fn nvrtc_options(&self, arch: &str) -> Vec<String> {
        let mut o = vec![
            format!("--gpu-architecture={arch}"),
            "--std=c++17".to_string(),
            "-lineinfo".to_string(),
            // Bit-exactness with the CPU reference: no contraction into FMA, IEEE division.
            "--fmad=false".to_string(),
            "--prec-div=true".to_string(),
            "--ftz=false".to_string(),
        ];
        if let Some(spec) = self.quant_spec() {
            o.push(format!("-DMOE_SCHEME={}", spec.scheme_index()));
            o.push(format!("-DMOE_HIDDEN={}", spec.hidden));
            o.push(format!("-DMOE_INPUT_BF16={}", u8::from(spec.input_bf16)));
        }
        if let Module::Experts(spec) = self {
            o.push(format!("-DMOE_WIRE_SCHEME={}", scheme_index(spec.wire)));
            o.push(format!("-DMOE_REQUANTIZE={}", u8::from(spec.requantize.is_some())));
            // With quant.cuh in front, its specialization above already gave the hidden size.
            if spec.requantize.is_none() {
                o.push(format!("-DMOE_HIDDEN={}", spec.hidden));
            }
        }
        o
    }

    /// The kernel entry points the module must contain.
    pub fn entries(&self) -> &'static [&'static str] {
        match self {
            Module::Quant(_) => &[QUANTIZE_TOKENS, SWIZZLE_128X4],
            Module::OneSided(_) => &[ONE_SIDED_DISPATCH, ONE_SIDED_COMBINE, ONE_SIDED_ABANDON],
            Module::TwoSided(_) => &[
                TWO_SIDED_PLAN,
                TWO_SIDED_DISPATCH,
                TWO_SIDED_COMBINE_SEND,
                TWO_SIDED_COMBINE_REDUCE,
                TWO_SIDED_ABANDON,
            ],
            Module::Copy => &[COPY_16B, DELIVER_STANDARD],
            Module::Experts(_) => &[DIAGONAL_EXPERTS_STANDARD, DIAGONAL_EXPERTS_BATCHED],
            Module::Gather => &[GATHER_ROUTING, GATHER_MASK_FOREIGN, GATHER_WIDEN, GATHER_NARROW],
            Module::Batched => &[BATCHED_COUNT, BATCHED_PLACE, BATCHED_COPY, BATCHED_REDUCE],
        }
    }

    /// Every module and specialization CI compiles.
    pub fn all() -> Vec<Module> {
        let specs = QuantSpec::all();
        let quant = specs.iter().copied().map(Module::Quant);
        let one_sided = specs.iter().copied().map(Module::OneSided);
        let two_sided = specs.iter().copied().map(Module::TwoSided);
        let experts = ExpertsSpec::all().into_iter().map(Module::Experts);
        quant
            .chain(one_sided)
            .chain(two_sided)
            .chain([Module::Copy, Module::Gather, Module::Batched])
            .chain(experts)
            .collect()
    }
}

/// The index of `scheme` in [`QuantScheme::ALL`], which is what the kernels' scheme defines mean.
fn scheme_index(scheme: QuantScheme) -> usize {
    QuantScheme::ALL
        .iter()
        .position(|s| *s == scheme)
        .expect("every scheme is in ALL")
}

/// What a quantization module is specialized on: NVRTC builds one module per value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct QuantSpec {
    pub scheme: QuantScheme,
    pub hidden: usize,
    /// Input elements are bf16 (`true`) or fp16 (`false`).
    pub input_bf16: bool,
}

impl fmt::Display for QuantSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let input = if self.input_bf16 { "bf16" } else { "fp16" };
        write!(f, "{} hidden={} in={input}", self.scheme, self.hidden)
    }
}

impl QuantSpec {
    /// The scheme's index in [`QuantScheme::ALL`], which is what the kernel's `MOE_SCHEME` means.
    pub fn scheme_index(&self) -> usize {
        scheme_index(self.scheme)
    }

    /// Every specialization CI compiles and the GPU quantization test checks: each scheme at
    /// every size of [`COMPILED_HIDDEN`] and at a ragged size that ends in a partial
    /// unit of work or leaves rows unaligned for vector loads and stores (100 elements where
    /// any size goes, else three scale blocks: nvfp4 48, one unit of 32 and one of 16), for
    /// bf16 and fp16 inputs.
    pub fn all() -> Vec<QuantSpec> {
        let mut v = Vec::new();
        for scheme in QuantScheme::ALL {
            let ragged = scheme.block_size().map_or(100, |block| 3 * block);
            for hidden in COMPILED_HIDDEN.into_iter().chain([ragged]) {
                for input_bf16 in [true, false] {
                    v.push(QuantSpec {
                        scheme,
                        hidden,
                        input_bf16,
                    });
                }
            }
        }
        v
    }
}

/// Hidden sizes every hidden-specialized module is compiled for in CI: those of the test
/// matrix's shapes (`moe_core::harness::SHAPES`, checked by a test here), 7168 being
/// DeepSeek-V3's.
pub const COMPILED_HIDDEN: [usize; 3] = [128, 256, 7168];

/// What the experts module is specialized on: the scheme of the rows it reads, the hidden size,
/// and, for experts that own quantization, the scheme they quantize those rows to first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ExpertsSpec {
    /// The scheme the rows were received in.
    pub wire: QuantScheme,
    pub hidden: usize,
    /// `Some(scheme)`: the rows are bf16 or fp16 (`wire`, from a deferred dispatch) and the
    /// experts quantize each to `scheme` and back before computing, as
    /// `moe_core::experts::ReferenceExperts` does.
    pub requantize: Option<QuantScheme>,
}

impl fmt::Display for ExpertsSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.requantize {
            Some(own) => write!(f, "{}->{own} hidden={}", self.wire, self.hidden),
            None => write!(f, "{} hidden={}", self.wire, self.hidden),
        }
    }
}

impl ExpertsSpec {
    /// Every specialization CI compiles: rows of each scheme as received, and bf16 / fp16 rows
    /// requantized to each other scheme, at every size of [`COMPILED_HIDDEN`].
    pub fn all() -> Vec<ExpertsSpec> {
        let mut v = Vec::new();
        for hidden in COMPILED_HIDDEN {
            for wire in QuantScheme::ALL {
                v.push(ExpertsSpec {
                    wire,
                    hidden,
                    requantize: None,
                });
            }
            for wire in [QuantScheme::Bf16, QuantScheme::Fp16] {
                for own in QuantScheme::ALL.into_iter().filter(|s| *s != wire) {
                    v.push(ExpertsSpec {
                        wire,
                        hidden,
                        requantize: Some(own),
                    });
                }
            }
        }
        v
    }
}

/// The NVRTC architecture for a compute capability: the arch-specific `a` form on Hopper and
/// Blackwell (needed for their architecture-specific instructions), plain otherwise.
pub fn arch_for(major: i32, minor: i32) -> String {
    if major >= 9 {
        format!("sm_{major}{minor}a")
    } else {
        format!("sm_{major}{minor}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kernel specialization the matrix runs on GPUs must be one CI compiles without a GPU,
    /// or a kernel that does not compile for it shows only on a GPU host.
    #[test]
    fn matrix_shapes_are_compiled_in_ci() {
        for s in moe_core::harness::SHAPES {
            assert!(
                COMPILED_HIDDEN.contains(&s.hidden),
                "shape {} has hidden {}, which COMPILED_HIDDEN ({COMPILED_HIDDEN:?}) lacks: add it there",
                s.name,
                s.hidden
            );
        }
    }

    #[test]
    fn options_name_the_arch_the_specialization_and_no_fma() {
        let spec = QuantSpec {
            scheme: QuantScheme::Nvfp4,
            hidden: 7168,
            input_bf16: true,
        };
        assert_eq!(
            Module::Quant(spec).nvrtc_options("sm_90a"),
            [
                "--gpu-architecture=sm_90a",
                "--std=c++17",
                "-lineinfo",
                "--fmad=false",
                "--prec-div=true",
                "--ftz=false",
                "-DMOE_SCHEME=5",
                "-DMOE_HIDDEN=7168",
                "-DMOE_INPUT_BF16=1",
            ]
        );
        assert_eq!(Module::Quant(spec).to_string(), "quant.cu[nvfp4 hidden=7168 in=bf16]");
        assert_eq!(
            Module::OneSided(spec).nvrtc_options("sm_90a"),
            Module::Quant(spec).nvrtc_options("sm_90a")
        );
    }

    #[test]
    fn every_wire_specialization_has_a_quant_a_one_sided_and_a_two_sided_module() {
        let all = Module::all();
        assert_eq!(all.len(), 3 * QuantSpec::all().len() + 3 + ExpertsSpec::all().len());
        for spec in QuantSpec::all() {
            for module in [Module::Quant(spec), Module::OneSided(spec), Module::TwoSided(spec)] {
                assert!(all.contains(&module), "{module} is not compiled in CI");
            }
        }
        for module in [Module::OneSided, Module::TwoSided] {
            let module = module(QuantSpec::all()[0]);
            assert!(module.source().contains("moe_quantize_batch"));
            assert_eq!(
                module.nvrtc_options("sm_90a"),
                Module::Quant(QuantSpec::all()[0]).nvrtc_options("sm_90a")
            );
        }
    }

    #[test]
    fn experts_options_name_the_wire_scheme_and_quant_cuh_only_when_they_requantize() {
        let received = ExpertsSpec {
            wire: QuantScheme::Mxfp8,
            hidden: 7168,
            requantize: None,
        };
        let module = Module::Experts(received);
        assert_eq!(module.to_string(), "experts.cu[mxfp8 hidden=7168]");
        assert_eq!(
            module.nvrtc_options("sm_90a")[6..],
            ["-DMOE_WIRE_SCHEME=6", "-DMOE_REQUANTIZE=0", "-DMOE_HIDDEN=7168"]
        );
        assert!(!module.source().contains(QUANT_CUH));
        assert!(module.source().contains(DIAGONAL_EXPERTS_BATCHED));

        let deferred = ExpertsSpec {
            wire: QuantScheme::Fp16,
            hidden: 128,
            requantize: Some(QuantScheme::Nvfp4),
        };
        let module = Module::Experts(deferred);
        assert_eq!(module.to_string(), "experts.cu[fp16->nvfp4 hidden=128]");
        assert_eq!(
            module.nvrtc_options("sm_90a")[6..],
            [
                "-DMOE_SCHEME=5",
                "-DMOE_HIDDEN=128",
                "-DMOE_INPUT_BF16=0",
                "-DMOE_WIRE_SCHEME=1",
                "-DMOE_REQUANTIZE=1",
            ]
        );
        assert!(module.source().contains(QUANT_CUH));
    }

    #[test]
    fn every_experts_specialization_is_compiled_and_valid() {
        let all = ExpertsSpec::all();
        assert_eq!(all.len(), COMPILED_HIDDEN.len() * (7 + 2 * 6));
        for spec in &all {
            spec.wire
                .wire_layout(spec.hidden)
                .expect("valid hidden for the wire scheme");
            if let Some(own) = spec.requantize {
                assert!(matches!(spec.wire, QuantScheme::Bf16 | QuantScheme::Fp16), "{spec}");
                own.wire_layout(spec.hidden)
                    .expect("valid hidden for the experts' scheme");
            }
            assert!(Module::all().contains(&Module::Experts(*spec)), "{spec}");
        }
    }

    #[test]
    fn hopper_gets_the_arch_specific_target() {
        assert_eq!(arch_for(9, 0), "sm_90a");
        assert_eq!(arch_for(10, 0), "sm_100a");
        assert_eq!(arch_for(8, 0), "sm_80");
    }

    #[test]
    fn every_specialization_is_a_valid_wire_layout() {
        for spec in QuantSpec::all() {
            spec.scheme
                .wire_layout(spec.hidden)
                .expect("valid hidden for the scheme");
        }
        assert_eq!(QuantSpec::all().len(), 7 * (COMPILED_HIDDEN.len() + 1) * 2);
    }
}
