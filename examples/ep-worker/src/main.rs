//! ep-worker: one rank of a DeepSeek-V3-shaped MoE layer (256 experts, top-8, hidden 7168,
//! nvfp4 dispatch) as a process of its own. Start one per rank with the environment launchers
//! set (`MASTER_ADDR`, `MASTER_PORT`, `RANK`, `WORLD_SIZE`; see
//! `moe_a2a::control::TcpConfig::from_env`), for instance
//! `cargo xtask launch -n 2 -- target/debug/ep-worker` or
//! `torchrun --nproc-per-node 2 --no-python target/debug/ep-worker`. Each rank joins the world
//! over TCP, runs `--calls` calls of `--tokens` random tokens through the layer runner with the
//! `--backend` given (allgather-rs by default, which runs across hosts too; the peer-memory
//! backends need the ranks on one host, where their workspaces are memfd segments the
//! processes share), checks its output against the f64
//! oracle and prints the result; it exits non-zero on any error.

use std::process::ExitCode;
use std::sync::Arc;

use moe_a2a::control::{ControlPlane, TcpConfig, TcpControlPlane};
use moe_a2a::experts::{DiagonalExperts, ReferenceExperts};
use moe_a2a::host::HostRank;
use moe_a2a::quant::{QuantParams, QuantScheme, nvfp4_global_scale};
use moe_a2a::reference::{max_relative_error, reference_moe, roundtrip_tokens};
use moe_a2a::runner::MoeLayer;
use moe_a2a::shm::MemfdMemory;
use moe_a2a::{
    ActivationFormat, DType, InputDtype, LayerConfig, MoeConfig, ParallelConfig, QuantConfig, RankContext, Tensor,
};

/// What the command line asks.
struct Args {
    backend: String,
    tokens: usize,
    calls: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        backend: "allgather-rs".into(),
        tokens: 16,
        calls: 2,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("`{flag}` needs a value"))?;
        match flag.as_str() {
            "--backend" => args.backend = value,
            "--tokens" => args.tokens = value.parse().map_err(|e| format!("--tokens {value}: {e}"))?,
            "--calls" => args.calls = value.parse().map_err(|e| format!("--calls {value}: {e}"))?,
            other => {
                return Err(format!(
                    "unknown flag `{other}`; flags: --backend NAME, --tokens N, --calls N"
                ));
            }
        }
    }
    Ok(args)
}

/// Rank `rank`'s inputs for call `call`: tokens within +-2, distinct experts per token.
fn inputs(rank: usize, call: u64, tokens: usize) -> (Tensor, Tensor, Tensor) {
    let seed = rank * 1009 + call as usize * 7;
    let x: Vec<f32> = (0..tokens * 7168)
        .map(|i| ((i * 31 + seed) % 101) as f32 / 25.0 - 2.0)
        .collect();
    let ids: Vec<i32> = (0..tokens * 8)
        .map(|i| ((seed + i / 8 * 13 + i % 8 * 32) % 256) as i32)
        .collect();
    let weights: Vec<f32> = (0..tokens * 8).map(|i| (i % 8 + 1) as f32 / 36.0).collect();
    (
        Tensor::from_f32(DType::Bf16, &[tokens, 7168], &x),
        Tensor::from_i32(&[tokens, 8], &ids),
        Tensor::from_f32(DType::F32, &[tokens, 8], &weights),
    )
}

fn run(args: &Args) -> Result<(), String> {
    let config = TcpConfig::from_env().map_err(|e| e.to_string())?;
    let plane = TcpControlPlane::connect(&config).map_err(|e| e.to_string())?;
    let world = plane.world_size();
    // Workspaces in memory the processes share, for the peer-memory backends (ranks on one
    // host; allgather-rs needs none and runs across hosts).
    let rank = HostRank::over_shared(Arc::new(plane), Arc::new(MemfdMemory));
    let r = rank.rank();
    let moe = MoeConfig::new(256, 8, 7168, 128, InputDtype::Bf16);
    let quant = QuantConfig::new(QuantScheme::Nvfp4).with_params(QuantParams {
        fp8_static_scale: 1.0,
        nvfp4_global_scale: nvfp4_global_scale(2.0),
    });
    let layer = LayerConfig::new(moe, quant, ParallelConfig::ep(world), ActivationFormat::Standard)
        .map_err(|e| e.to_string())?;
    let function = Arc::new(DiagonalExperts::random(256, 7168, 7));
    let experts = Arc::new(ReferenceExperts::new(
        function.clone(),
        ActivationFormat::Standard,
        quant,
    ));
    let mut moe_layer = MoeLayer::new(
        moe_a2a::registry(),
        &args.backend,
        layer,
        experts,
        RankContext::Host(rank),
    )
    .map_err(|e| e.to_string())?;
    for call in 0..args.calls {
        let (tokens, ids, weights) = inputs(r, call, args.tokens);
        let mut out = Tensor::zeros(DType::Bf16, &[args.tokens, 7168]);
        moe_layer
            .forward(&tokens, &ids, &weights, &mut out)
            .map_err(|e| format!("call {call}: {e}"))?;
        let x = roundtrip_tokens(&quant, &tokens).map_err(|e| e.to_string())?;
        let want = reference_moe(function.as_ref(), &x, &ids.to_i32(), &weights.to_f32(), 8);
        let err = max_relative_error(&out.to_f32(), &want);
        if err > 1.6e-2 {
            return Err(format!(
                "call {call}: max relative error {err:.1e} against the oracle, above 1.6e-2"
            ));
        }
        println!(
            "rank {r} of {world}: call {call} of {} via {}: max relative error {err:.1e} (tolerance 1.6e-2): ok",
            args.tokens, args.backend
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    match parse_args().and_then(|args| run(&args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ep-worker: {e}");
            ExitCode::FAILURE
        }
    }
}
