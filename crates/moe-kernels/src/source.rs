//! Kernel sources, their specializations and the NVRTC options that build them. Nothing here
//! needs CUDA, so option rendering is tested on every machine.

use std::fmt;

use moe_quant::QuantScheme;

/// Shared device helpers (typedefs, bit conversions), prepended to every module.
pub const COMMON_CUH: &str = include_str!("../kernels/common.cuh");
/// Quantization and scale-swizzle kernels.
pub const QUANT_CU: &str = include_str!("../kernels/quant.cu");
/// The nvlink-one-sided protocol: begin, dispatch, combine stage and combine pull.
pub const ONE_SIDED_CU: &str = include_str!("../kernels/one_sided.cu");
/// The nvlink-two-sided protocol: begin, plan, dispatch, combine send and combine reduce.
pub const TWO_SIDED_CU: &str = include_str!("../kernels/two_sided.cu");

/// The kernel functions of the quantization module.
pub const QUANTIZE_TOKENS: &str = "moe_quantize_tokens";
/// The 128x4 scale swizzle.
pub const SWIZZLE_128X4: &str = "moe_swizzle_128x4";

/// The one-sided kernels.
pub const ONE_SIDED_BEGIN: &str = "moe_one_sided_begin";
/// One-sided dispatch.
pub const ONE_SIDED_DISPATCH: &str = "moe_one_sided_dispatch";
/// One-sided combine, staging step.
pub const ONE_SIDED_COMBINE_STAGE: &str = "moe_one_sided_combine_stage";
/// One-sided combine, pull step.
pub const ONE_SIDED_COMBINE_PULL: &str = "moe_one_sided_combine_pull";
/// The peer-copy ceiling kernel.
pub const COPY_16B: &str = "moe_copy_16b";

/// The two-sided kernels: a new round.
pub const TWO_SIDED_BEGIN: &str = "moe_two_sided_begin";
/// Two-sided send numbering and count exchange.
pub const TWO_SIDED_PLAN: &str = "moe_two_sided_plan";
/// Two-sided dense dispatch.
pub const TWO_SIDED_DISPATCH: &str = "moe_two_sided_dispatch";
/// Two-sided combine, the reverse all-to-all-v of the expert rows.
pub const TWO_SIDED_COMBINE_SEND: &str = "moe_two_sided_combine_send";
/// Two-sided combine, the per-token sum of the replies.
pub const TWO_SIDED_COMBINE_REDUCE: &str = "moe_two_sided_combine_reduce";

/// One NVRTC program: a source file and, where it has one, its specialization.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Module {
    Quant(QuantSpec),
    OneSided,
    TwoSided,
}

impl fmt::Display for Module {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Module::Quant(spec) => spec.fmt(f),
            Module::OneSided | Module::TwoSided => f.write_str(self.file()),
        }
    }
}

impl Module {
    /// The file name NVRTC reports errors against.
    pub fn file(&self) -> &'static str {
        match self {
            Module::Quant(_) => "quant.cu",
            Module::OneSided => "one_sided.cu",
            Module::TwoSided => "two_sided.cu",
        }
    }

    /// The full source NVRTC compiles: the common header, then the module.
    pub fn source(&self) -> String {
        let body = match self {
            Module::Quant(_) => QUANT_CU,
            Module::OneSided => ONE_SIDED_CU,
            Module::TwoSided => TWO_SIDED_CU,
        };
        format!("{COMMON_CUH}\n{body}")
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
        if let Module::Quant(spec) = self {
            o.push(format!("-DMOE_SCHEME={}", spec.scheme_index()));
            o.push(format!("-DMOE_HIDDEN={}", spec.hidden));
            o.push(format!("-DMOE_INPUT_BF16={}", u8::from(spec.input_bf16)));
        }
        o
    }

    /// The kernel entry points the module must contain.
    pub fn entries(&self) -> &'static [&'static str] {
        match self {
            Module::Quant(_) => &[QUANTIZE_TOKENS, SWIZZLE_128X4],
            Module::OneSided => &[
                ONE_SIDED_BEGIN,
                ONE_SIDED_DISPATCH,
                ONE_SIDED_COMBINE_STAGE,
                ONE_SIDED_COMBINE_PULL,
            ],
            Module::TwoSided => &[
                TWO_SIDED_BEGIN,
                TWO_SIDED_PLAN,
                TWO_SIDED_DISPATCH,
                TWO_SIDED_COMBINE_SEND,
                TWO_SIDED_COMBINE_REDUCE,
            ],
        }
    }

    /// Every module and specialization CI compiles.
    pub fn all() -> Vec<Module> {
        let mut v: Vec<Module> = QuantSpec::all().into_iter().map(Module::Quant).collect();
        v.push(Module::OneSided);
        v.push(Module::TwoSided);
        v
    }
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
        write!(f, "quant.cu[{} hidden={} in={input}]", self.scheme, self.hidden)
    }
}

impl QuantSpec {
    /// The scheme's index in [`QuantScheme::ALL`], which is what the kernel's `MOE_SCHEME` means.
    pub fn scheme_index(&self) -> usize {
        QuantScheme::ALL
            .iter()
            .position(|s| *s == self.scheme)
            .expect("every scheme is in ALL")
    }

    /// Every specialization CI compiles: each scheme at hidden 128 and 7168 (the DeepSeek-V3
    /// shape), for bf16 and fp16 inputs.
    pub fn all() -> Vec<QuantSpec> {
        let mut v = Vec::new();
        for scheme in QuantScheme::ALL {
            for hidden in [128, 7168] {
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
        assert_eq!(spec.to_string(), "quant.cu[nvfp4 hidden=7168 in=bf16]");
    }

    #[test]
    fn the_protocol_modules_have_no_specialization_defines() {
        for module in [Module::OneSided, Module::TwoSided] {
            let o = module.nvrtc_options("sm_90a");
            assert!(o.iter().all(|f| !f.starts_with("-D")), "{module}: {o:?}");
        }
        assert_eq!(Module::TwoSided.to_string(), "two_sided.cu");
        assert_eq!(Module::all().len(), 7 * 2 * 2 + 2);
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
        assert_eq!(QuantSpec::all().len(), 7 * 2 * 2);
    }
}
