//! Snapshots of user-facing text: every kind of rejection message, config errors and the
//! rendered capability matrix. CI runs `cargo insta test --check`, so a changed message fails
//! until its snapshot is reviewed.

use moe_a2a::harness::{Cell, SHAPES};
use moe_a2a::quant::QuantScheme;
use moe_a2a::registry::{BackendRegistration, Capabilities, Limits};
use moe_a2a::{
    ActivationFormat, InputDtype, LayerConfig, MoeConfig, ParallelConfig, PlatformKind, QuantConfig, Registry,
    ScaleLayout,
};
use moe_a2a_tests::{cell, registry};

fn rejection(c: &Cell) -> String {
    let layer = c.layer().expect("a valid layer");
    registry()
        .check(&c.backend, &layer, PlatformKind::Host)
        .expect_err("the backend must refuse this request")
        .to_string()
}

#[test]
fn rejection_one_sided_without_expert_parallelism() {
    let c = Cell {
        parallel: ParallelConfig {
            tp: 1,
            dp: 2,
            ep: false,
            sp: false,
        },
        ..cell("nvlink-one-sided")
    };
    insta::assert_snapshot!(rejection(&c));
}

#[test]
fn rejection_two_sided_batched_experts() {
    let c = Cell {
        format: ActivationFormat::BatchedExperts,
        ..cell("nvlink-two-sided")
    };
    insta::assert_snapshot!(rejection(&c));
}

#[test]
fn rejection_allgather_batched_experts_nvfp4() {
    let c = Cell {
        format: ActivationFormat::BatchedExperts,
        quant: QuantConfig::new(QuantScheme::Nvfp4),
        ..cell("allgather-rs")
    };
    insta::assert_snapshot!(rejection(&c));
}

#[test]
fn rejection_limits_top_k_and_hidden() {
    let mut c = cell("nvlink-one-sided");
    c.shape.num_experts = 64;
    c.shape.top_k = 40;
    c.shape.hidden = 200;
    insta::assert_snapshot!(rejection(&c));
}

#[test]
fn rejection_a_host_only_backend_on_cuda_names_the_gpu_backends() {
    let r = Registry::from_registrations([&HOST_ONLY, moe_a2a::registry().get("nvlink-one-sided").expect("linked")]);
    let layer = cell("nvlink-one-sided").layer().expect("valid");
    let e = r.check("host-only", &layer, PlatformKind::Cuda).unwrap_err();
    insta::assert_snapshot!(e.to_string());
}

#[test]
fn unknown_backend_lists_the_registered_ones() {
    let layer = cell("nvlink-one-sided").layer().expect("valid");
    let e = registry().check("deepep", &layer, PlatformKind::Host).unwrap_err();
    insta::assert_snapshot!(e.to_string());
}

fn never_constructed(_: &LayerConfig, _: &moe_a2a::RankContext) -> moe_a2a::Result<Box<dyn moe_a2a::PrepareFinalize>> {
    Err(moe_a2a::MoeError::Unsupported(
        "a registration used only to test the registry's messages".to_string(),
    ))
}

const TINY: Capabilities = Capabilities {
    quant_schemes: &[QuantScheme::Bf16],
    deferred_quant: false,
    swizzled_scales: false,
    activation_formats: &[ActivationFormat::Standard],
    parallel_modes: &[moe_a2a::ParallelMode::Ep],
    platforms: &[PlatformKind::Host],
    needs_all_pairs_peer_access: false,
    gpu_per_rank: false,
    single_node: true,
    limits: Limits {
        max_ranks: 2,
        max_top_k: 2,
        hidden_multiple_of: 1,
        max_tokens_per_rank: 16,
    },
};

static FIRST: BackendRegistration = BackendRegistration {
    name: "twin",
    description: "first crate's twin",
    capabilities: TINY,
    construct: never_constructed,
};
static SECOND: BackendRegistration = BackendRegistration {
    name: "twin",
    description: "second crate's twin",
    capabilities: TINY,
    construct: never_constructed,
};

static HOST_ONLY: BackendRegistration = BackendRegistration {
    name: "host-only",
    description: "a backend without a GPU implementation",
    capabilities: Capabilities {
        quant_schemes: &QuantScheme::ALL,
        limits: Limits {
            max_ranks: 64,
            max_top_k: 32,
            hidden_multiple_of: 1,
            max_tokens_per_rank: 1 << 16,
        },
        ..TINY
    },
    construct: never_constructed,
};

#[test]
fn duplicate_names_are_an_error_naming_both() {
    let r = Registry::from_registrations([&FIRST, &SECOND]);
    insta::assert_snapshot!(r.get("twin").unwrap_err().to_string());
    assert!(r.registrations().next().is_none(), "a duplicated name is never served");
}

#[test]
fn config_errors_name_the_field_and_the_rule() {
    let moe = |e, k, h| MoeConfig::new(e, k, h, 16, InputDtype::Bf16);
    let ep2 = ParallelConfig::ep(2);
    let std = ActivationFormat::Standard;
    let cases: Vec<(&str, moe_a2a::Result<LayerConfig>)> = vec![
        (
            "top_k above experts",
            LayerConfig::new(moe(4, 5, 256), QuantConfig::new(QuantScheme::Bf16), ep2, std),
        ),
        (
            "zero hidden",
            LayerConfig::new(moe(8, 2, 0), QuantConfig::new(QuantScheme::Bf16), ep2, std),
        ),
        (
            "hidden not a multiple of the block",
            LayerConfig::new(moe(8, 2, 200), QuantConfig::new(QuantScheme::Fp8Block128), ep2, std),
        ),
        (
            "sp without tp",
            LayerConfig::new(
                moe(8, 2, 256),
                QuantConfig::new(QuantScheme::Bf16),
                ParallelConfig {
                    tp: 1,
                    dp: 4,
                    ep: true,
                    sp: true,
                },
                std,
            ),
        ),
        (
            "ep on one rank",
            LayerConfig::new(
                moe(8, 2, 256),
                QuantConfig::new(QuantScheme::Bf16),
                ParallelConfig::ep(1),
                std,
            ),
        ),
        (
            "unquantized scheme of the other dtype",
            LayerConfig::new(moe(8, 2, 256), QuantConfig::new(QuantScheme::Fp16), ep2, std),
        ),
        (
            "swizzled fp8 scales",
            LayerConfig::new(
                moe(8, 2, 256),
                QuantConfig::new(QuantScheme::Fp8PerToken).with_scale_layout(ScaleLayout::Swizzled128x4),
                ep2,
                std,
            ),
        ),
        (
            "deferring an unquantized scheme",
            LayerConfig::new(moe(8, 2, 256), QuantConfig::new(QuantScheme::Bf16).deferred(), ep2, std),
        ),
    ];
    let text: String = cases
        .into_iter()
        .map(|(name, r)| format!("{name}:\n  {}\n", r.expect_err(name)))
        .collect();
    insta::assert_snapshot!(text);
}

#[test]
fn capability_matrix() {
    insta::assert_snapshot!(registry().render_matrix());
}

#[test]
fn matrix_shapes_are_the_documented_ones() {
    let names: Vec<&str> = SHAPES.iter().map(|s| s.name).collect();
    assert_eq!(names, ["small-swiglu", "top1", "deepseek-v3"]);
    let ds = SHAPES[2];
    assert_eq!((ds.hidden, ds.num_experts, ds.top_k), (7168, 256, 8));
}
