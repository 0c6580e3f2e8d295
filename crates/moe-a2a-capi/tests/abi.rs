//! The C ABI's contract, driven through its exported functions by ranks that are threads, each
//! joined over the TCP rendezvous on 127.0.0.1: refusals name the argument, a rank's refused
//! input fails its peers' same call promptly, and the group's next call succeeds; a
//! BatchedExperts delivery is described expert-major; the runner with C experts reduces a TP
//! output exactly once.

use std::ffi::{CStr, c_void};
use std::time::{Duration, Instant};

use moe_a2a::control::TcpConfig;
use moe_a2a_capi::layer::*;
use moe_a2a_capi::runner::*;
use moe_a2a_capi::status::{MoeStatus, last_error};
use moe_a2a_capi::types::*;
use moe_a2a_capi::world::*;

const EXPERTS: usize = 8;
const TOP_K: usize = 2;
const HIDDEN: usize = 32;
const TOKENS: usize = 4;

fn spec(ranks: u32) -> MoeLayerSpec {
    MoeLayerSpec {
        num_experts: EXPERTS as u32,
        top_k: TOP_K as u32,
        hidden: HIDDEN as u32,
        max_tokens_per_rank: TOKENS as u32,
        tp: 1,
        dp: ranks,
        ep: 1,
        ..MoeLayerSpec::default()
    }
}

fn tensor<T>(data: &mut [T], dtype: MoeDtype, shape: &[usize]) -> MoeTensor {
    let mut t = MoeTensor::ABSENT;
    t.data = data.as_mut_ptr() as *mut c_void;
    t.dtype = dtype as i32;
    t.ndim = shape.len() as i32;
    for (s, &d) in t.shape.iter_mut().zip(shape) {
        *s = d as i64;
    }
    t
}

/// One rank's call inputs: ones for tokens (bf16 0x3f80), experts `k * 4 + t % 4`, weight 0.5.
struct Call {
    x: Vec<u16>,
    ids: Vec<i32>,
    w: Vec<f32>,
    out: Vec<u16>,
    /// The ids the last prepare delivered to this rank's experts.
    delivered: Vec<i32>,
}

impl Call {
    fn new() -> Call {
        Call {
            x: vec![0x3f80; TOKENS * HIDDEN],
            ids: (0..TOKENS * TOP_K)
                .map(|i| ((i % TOP_K) * 4 + i / TOP_K % 4) as i32)
                .collect(),
            w: vec![0.5; TOKENS * TOP_K],
            out: vec![0; TOKENS * HIDDEN],
            delivered: Vec::new(),
        }
    }

    /// prepare, experts that copy their rows (so the output is the weights' sum, 1.0), finalize.
    fn run(&mut self, layer: *mut MoeLayer) -> MoeStatus {
        let tokens = tensor(&mut self.x, MoeDtype::Bf16, &[TOKENS, HIDDEN]);
        let ids = tensor(&mut self.ids, MoeDtype::I32, &[TOKENS, TOP_K]);
        let w = tensor(&mut self.w, MoeDtype::F32, &[TOKENS, TOP_K]);
        let out = tensor(&mut self.out, MoeDtype::Bf16, &[TOKENS, HIDDEN]);
        let mut delivery = std::mem::MaybeUninit::<MoeDelivery>::uninit();
        // SAFETY: every descriptor describes a live Vec of its shape; the delivery's tensors
        // are read within the call, before the layer's next prepare.
        unsafe {
            let status = moe_layer_prepare(layer, &tokens, &ids, &w, delivery.as_mut_ptr());
            if status != MoeStatus::Ok {
                return status;
            }
            let d = delivery.assume_init();
            self.delivered = weigh_rows(&d, &d.expert_output, 1.0);
            moe_layer_finalize(layer, &d.expert_output, &out)
        }
    }
}

/// Runs `body(rank, world)` on `ranks` threads, each joined to one world over TCP, and returns
/// their results in rank order.
fn world_of<T: Send>(ranks: usize, body: impl Fn(usize, *mut MoeWorld) -> T + Sync) -> Vec<T> {
    let port = TcpConfig::free_local_port().expect("a free port");
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..ranks)
            .map(|rank| {
                let body = &body;
                s.spawn(move || {
                    let options = MoeTcpOptions {
                        master_addr: c"127.0.0.1".as_ptr(),
                        master_port: u32::from(port),
                        rank: rank as u32,
                        world_size: ranks as u32,
                        local_rank: rank as u32,
                        local_world_size: ranks as u32,
                        run_id: u64::from(port),
                        timeout_ms: 10_000,
                    };
                    let mut world = std::ptr::null_mut();
                    // SAFETY: live locals.
                    let status = unsafe { moe_world_connect(&options, &mut world) };
                    assert_eq!(status, MoeStatus::Ok, "rank {rank}: {}", last_error());
                    let result = body(rank, world);
                    // SAFETY: the world is freed once, after its layers.
                    unsafe { moe_world_free(world) };
                    result
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("a rank thread")).collect()
    })
}

fn new_layer(world: *mut MoeWorld, backend: &CStr, ranks: u32) -> *mut MoeLayer {
    let mut layer = std::ptr::null_mut();
    // SAFETY: live locals and a live world.
    let status = unsafe { moe_layer_new(world, backend.as_ptr(), &spec(ranks), &mut layer) };
    assert_eq!(status, MoeStatus::Ok, "{}", last_error());
    layer
}

#[test]
fn a_refused_input_on_one_rank_fails_its_peers_call_promptly_and_the_next_call_succeeds() {
    for backend in [c"nvlink-one-sided", c"nvlink-two-sided", c"allgather-rs"] {
        let results = world_of(2, |rank, world| {
            let layer = new_layer(world, backend, 2);
            let mut call = Call::new();
            if rank == 1 {
                call.ids[3] = 99;
            }
            let start = Instant::now();
            let first = (call.run(layer), last_error(), start.elapsed());
            let mut good = Call::new();
            let second = (good.run(layer), last_error());
            // SAFETY: freed once.
            unsafe { moe_layer_free(layer) };
            (first, second, good.out)
        });
        let name = backend.to_str().unwrap();
        let ((s1, m1, _), _, _) = &results[1];
        assert_eq!(*s1, MoeStatus::InvalidArgument, "{name}: rank 1: {m1}");
        assert!(m1.contains("99"), "{name}: rank 1's message names the id: {m1}");
        let ((s0, m0, took), _, _) = &results[0];
        assert_eq!(*s0, MoeStatus::PeerFailed, "{name}: rank 0: {m0}");
        assert!(m0.contains("rank 1"), "{name}: rank 0's message names rank 1: {m0}");
        assert!(
            *took < Duration::from_secs(5),
            "{name}: rank 0 waited {took:?}, not promptly"
        );
        for (rank, (_, (status, message), out)) in results.iter().enumerate() {
            assert_eq!(*status, MoeStatus::Ok, "{name}: rank {rank}'s next call: {message}");
            assert!(
                out.iter().all(|&v| v == 0x3f80),
                "{name}: rank {rank}'s next call is not 1.0"
            );
        }
    }
}

#[test]
fn malformed_descriptors_and_calls_out_of_order_are_refused_naming_what_is_wrong() {
    world_of(1, |_, world| {
        let mut spec1 = spec(1);
        spec1.ep = 0;
        let mut layer = std::ptr::null_mut();
        // SAFETY: live locals and world.
        let status = unsafe { moe_layer_new(world, c"allgather-rs".as_ptr(), &spec1, &mut layer) };
        assert_eq!(status, MoeStatus::Ok, "{}", last_error());
        let mut call = Call::new();
        let mut out = vec![0u16; TOKENS * HIDDEN];
        let out_t = tensor(&mut out, MoeDtype::Bf16, &[TOKENS, HIDDEN]);
        // SAFETY: each descriptor describes live memory or is deliberately malformed in a way
        // the library must catch before reading.
        unsafe {
            let status = moe_layer_finalize(layer, &out_t, &out_t);
            assert_eq!(status, MoeStatus::InvalidArgument);
            assert!(last_error().contains("moe_layer_prepare first"), "{}", last_error());

            let mut tokens = tensor(&mut call.x, MoeDtype::Bf16, &[TOKENS, HIDDEN]);
            let ids = tensor(&mut call.ids, MoeDtype::I32, &[TOKENS, TOP_K]);
            let w = tensor(&mut call.w, MoeDtype::F32, &[TOKENS, TOP_K]);
            let mut delivery = std::mem::MaybeUninit::<MoeDelivery>::uninit();
            let strides = [1i64, TOKENS as i64];
            tokens.strides = strides.as_ptr();
            let status = moe_layer_prepare(layer, &tokens, &ids, &w, delivery.as_mut_ptr());
            assert_eq!(status, MoeStatus::InvalidArgument);
            assert!(last_error().contains("`tokens` has strides"), "{}", last_error());

            tokens.strides = std::ptr::null();
            tokens.device_type = MoeDevice::Cuda as i32;
            let status = moe_layer_prepare(layer, &tokens, &ids, &w, delivery.as_mut_ptr());
            assert_eq!(status, MoeStatus::Unsupported);
            assert!(last_error().contains("`tokens` is on GPU 0"), "{}", last_error());

            tokens.device_type = MoeDevice::Cpu as i32;
            tokens.dtype = 42;
            let status = moe_layer_prepare(layer, &tokens, &ids, &w, delivery.as_mut_ptr());
            assert_eq!(status, MoeStatus::InvalidArgument);
            assert!(last_error().contains("`tokens.dtype` = 42"), "{}", last_error());

            let status = moe_layer_prepare(layer, &tokens, &ids, &w, std::ptr::null_mut());
            assert_eq!(status, MoeStatus::InvalidArgument);
            assert!(last_error().contains("`delivery` is NULL"), "{}", last_error());

            let status = moe_layer_info(std::ptr::null(), &mut MoeLayerInfo::default());
            assert_eq!(status, MoeStatus::InvalidArgument);
            assert!(last_error().contains("`layer` is NULL"), "{}", last_error());

            // A call after the refusals runs: prepared twice without a finalize is refused,
            // then the next call runs.
            tokens.dtype = MoeDtype::Bf16 as i32;
            assert_eq!(
                moe_layer_prepare(layer, &tokens, &ids, &w, delivery.as_mut_ptr()),
                MoeStatus::Ok
            );
            let status = moe_layer_prepare(layer, &tokens, &ids, &w, delivery.as_mut_ptr());
            assert_eq!(status, MoeStatus::InvalidArgument);
            assert!(last_error().contains("never finalized"), "{}", last_error());
            assert_eq!(call.run(layer), MoeStatus::Ok, "{}", last_error());
            assert!(call.out.iter().all(|&v| v == 0x3f80));
            moe_layer_free(layer);
        }
    });
}

/// Without the GPU platform, joining a GPU is refused saying which build has it; a world stays
/// usable on the host.
#[cfg(not(feature = "cuda"))]
#[test]
fn a_build_without_the_gpu_platform_refuses_a_gpu_naming_the_feature() {
    world_of(1, |_, world| {
        // SAFETY: a live world; a null stream.
        let status = unsafe { moe_world_use_gpu(world, 0, std::ptr::null_mut()) };
        assert_eq!(status, MoeStatus::Unsupported);
        assert!(last_error().contains("feature `cuda`"), "{}", last_error());
        // SAFETY: a live world.
        let status = unsafe { moe_world_use_gpu(world, -1, std::ptr::null_mut()) };
        assert_eq!(status, MoeStatus::InvalidArgument);
        assert!(last_error().contains("`device_id` = -1"), "{}", last_error());
    });
}

/// A BatchedExperts layer delivers expert-major descriptors: rows `[local, max_rows, bytes]`,
/// per-expert counts and weights, no ids; experts that weigh each row by hand combine to the
/// tokens themselves (the weights of each token sum to one).
#[test]
fn a_batched_experts_delivery_is_described_expert_major() {
    let results = world_of(2, |_, world| {
        let mut spec = spec(2);
        spec.activation_format = MoeFormat::BatchedExperts as i32;
        let mut layer = std::ptr::null_mut();
        let mut call = Call::new();
        // SAFETY: live locals, a live world; the delivery is read before the next prepare.
        unsafe {
            let status = moe_layer_new(world, c"nvlink-one-sided".as_ptr(), &spec, &mut layer);
            assert_eq!(status, MoeStatus::Ok, "{}", last_error());
            let tokens = tensor(&mut call.x, MoeDtype::Bf16, &[TOKENS, HIDDEN]);
            let ids = tensor(&mut call.ids, MoeDtype::I32, &[TOKENS, TOP_K]);
            let w = tensor(&mut call.w, MoeDtype::F32, &[TOKENS, TOP_K]);
            let out = tensor(&mut call.out, MoeDtype::Bf16, &[TOKENS, HIDDEN]);
            let mut delivery = std::mem::MaybeUninit::<MoeDelivery>::uninit();
            let status = moe_layer_prepare(layer, &tokens, &ids, &w, delivery.as_mut_ptr());
            assert_eq!(status, MoeStatus::Ok, "{}", last_error());
            let d = delivery.assume_init();
            assert_eq!(d.format, MoeFormat::BatchedExperts as i32);
            assert!(d.topk_ids.data.is_null() && d.topk_weights.data.is_null());
            let local = EXPERTS / 2;
            assert_eq!((d.activations.ndim, d.activations.shape[0]), (3, local as i64));
            assert_eq!((d.expert_counts.ndim, d.expert_counts.shape[0]), (1, local as i64));
            assert_eq!(d.expert_weights.ndim, 2);
            let max_rows = d.expert_weights.shape[1] as usize;
            assert_eq!(
                &d.expert_output.shape[..3],
                &[local as i64, max_rows as i64, HIDDEN as i64]
            );
            let counts = std::slice::from_raw_parts(d.expert_counts.data as *const i32, local);
            let weights = std::slice::from_raw_parts(d.expert_weights.data as *const f32, local * max_rows);
            let x = std::slice::from_raw_parts(d.activations.data as *const u16, local * max_rows * HIDDEN);
            let y = std::slice::from_raw_parts_mut(d.expert_output.data as *mut u16, local * max_rows * HIDDEN);
            for (e, &count) in counts.iter().enumerate() {
                for r in 0..count as usize {
                    let row = e * max_rows + r;
                    for h in 0..HIDDEN {
                        let v = f32::from_bits(u32::from(x[row * HIDDEN + h]) << 16) * weights[row];
                        y[row * HIDDEN + h] = (v.to_bits() >> 16) as u16;
                    }
                }
            }
            let status = moe_layer_finalize(layer, &d.expert_output, &out);
            assert_eq!(status, MoeStatus::Ok, "{}", last_error());
            moe_layer_free(layer);
        }
        call.out
    });
    for (rank, out) in results.iter().enumerate() {
        assert!(
            out.iter().all(|&v| v == 0x3f80),
            "rank {rank}: the tokens did not come back as 1.0"
        );
    }
}

/// Writes each Standard row of `d` weighted by the sum of its delivered weights, times
/// `factor`, into `out` (bf16 rows); returns the delivered ids.
///
/// # Safety
/// `d` and `out` describe live host memory of the shapes they claim.
unsafe fn weigh_rows(d: &MoeDelivery, out: &MoeTensor, factor: f32) -> Vec<i32> {
    let rows = d.topk_ids.shape[0] as usize;
    // SAFETY: this function's contract.
    let (ids, ws, x, y) = unsafe {
        (
            std::slice::from_raw_parts(d.topk_ids.data as *const i32, rows * TOP_K),
            std::slice::from_raw_parts(d.topk_weights.data as *const f32, rows * TOP_K),
            std::slice::from_raw_parts(d.activations.data as *const u16, rows * HIDDEN),
            std::slice::from_raw_parts_mut(out.data as *mut u16, rows * HIDDEN),
        )
    };
    for r in 0..rows {
        let weight: f32 = (0..TOP_K)
            .filter(|&k| ids[r * TOP_K + k] >= 0)
            .map(|k| ws[r * TOP_K + k])
            .sum();
        for h in 0..HIDDEN {
            let v = f32::from_bits(u32::from(x[r * HIDDEN + h]) << 16) * weight * factor;
            y[r * HIDDEN + h] = (v.to_bits() >> 16) as u16;
        }
    }
    ids.to_vec()
}

/// Experts holding half of every expert (a TP shard of two): each received row's weighted sum
/// over its experts, halved. The runner's TP all-reduce must add the two halves exactly once.
unsafe extern "C" fn half_of_every_expert(_: *mut c_void, d: *const MoeDelivery, out: *const MoeTensor) -> i32 {
    // SAFETY: the runner passes a live Standard delivery and its output, both host memory of
    // the shapes they claim, for the call.
    unsafe { weigh_rows(&*d, &*out, 0.5) };
    0
}

/// Under TP, allgather-rs leaves partial sums (`output_is_reduced` 0, as the C ABI reports);
/// the runner reduces them exactly once: each TP rank's half comes back as the whole token.
#[test]
fn the_runner_reduces_a_tp_output_exactly_once_through_the_c_abi() {
    let results = world_of(2, |_, world| {
        let mut spec = spec(1);
        (spec.tp, spec.dp, spec.ep) = (2, 1, 0);
        let experts = MoeExperts {
            apply: Some(half_of_every_expert),
            user_data: std::ptr::null_mut(),
            activation_format: MoeFormat::Standard as i32,
        };
        let mut call = Call::new();
        let (mut layer, mut runner) = (std::ptr::null_mut(), std::ptr::null_mut());
        let mut info = MoeLayerInfo::default();
        // SAFETY: live locals and world; the runner and layer are freed once.
        unsafe {
            let status = moe_layer_new(world, c"allgather-rs".as_ptr(), &spec, &mut layer);
            assert_eq!(status, MoeStatus::Ok, "{}", last_error());
            assert_eq!(moe_layer_info(layer, &mut info), MoeStatus::Ok);
            moe_layer_free(layer);
            let status = moe_runner_new(world, c"allgather-rs".as_ptr(), &spec, &experts, &mut runner);
            assert_eq!(status, MoeStatus::Ok, "{}", last_error());
            let tokens = tensor(&mut call.x, MoeDtype::Bf16, &[TOKENS, HIDDEN]);
            let ids = tensor(&mut call.ids, MoeDtype::I32, &[TOKENS, TOP_K]);
            let w = tensor(&mut call.w, MoeDtype::F32, &[TOKENS, TOP_K]);
            let out = tensor(&mut call.out, MoeDtype::Bf16, &[TOKENS, HIDDEN]);
            let status = moe_runner_forward(runner, &tokens, &ids, &w, &out);
            assert_eq!(status, MoeStatus::Ok, "{}", last_error());
            assert_eq!(moe_runner_wait(runner), MoeStatus::Ok);
            moe_runner_free(runner);
        }
        (info.output_is_reduced, call.out)
    });
    for (rank, (reduced, out)) in results.iter().enumerate() {
        assert_eq!(*reduced, 0, "rank {rank}: allgather-rs under TP leaves partial sums");
        assert!(
            out.iter().all(|&v| v == 0x3f80),
            "rank {rank}: the halves were not summed exactly once (0x3f00 is a missing reduce, 0x4000 a double one): {:#x}",
            out[0]
        );
    }
}

/// A rank that aborts the world fails its peer's waiting call promptly with the reason, far
/// inside the timeout.
#[test]
fn an_aborted_world_fails_a_peers_waiting_call_promptly_with_the_reason() {
    let results = world_of(2, |rank, world| {
        let layer = new_layer(world, c"nvlink-two-sided", 2);
        let started = Instant::now();
        let result = if rank == 0 {
            std::thread::sleep(Duration::from_millis(300));
            // SAFETY: a live world and a static reason.
            let status = unsafe { moe_world_abort(world, c"the engine hit a fatal error".as_ptr()) };
            (status, String::new(), started.elapsed())
        } else {
            let mut call = Call::new();
            (call.run(layer), last_error(), started.elapsed())
        };
        // SAFETY: freed once.
        unsafe { moe_layer_free(layer) };
        result
    });
    assert_eq!(results[0].0, MoeStatus::Ok);
    let (status, message, took) = &results[1];
    assert_eq!(*status, MoeStatus::PeerFailed, "{message}");
    assert!(
        message.contains("rank 0 aborted the world: the engine hit a fatal error"),
        "{message}"
    );
    assert!(
        *took < Duration::from_secs(5),
        "rank 1 waited {took:?}, not promptly (timeout 10 s)"
    );
}

/// A layer placed by an expert map (expert e on rank e % 2, as load balancing might place them)
/// routes each token to the owners the map names: the tokens come back whole, on every backend
/// that takes a map; a map naming a rank outside the world is refused naming the expert.
#[test]
fn an_expert_map_places_the_experts_and_a_bad_one_is_refused() {
    let map: Vec<u32> = (0..EXPERTS as u32).map(|e| e % 2).collect();
    let bad: Vec<u32> = (0..EXPERTS as u32).map(|e| if e == 5 { 7 } else { 0 }).collect();
    let results = world_of(2, |_, world| {
        let mut spec = spec(2);
        spec.expert_map = bad.as_ptr();
        let mut layer = std::ptr::null_mut();
        // SAFETY: live locals, maps of EXPERTS entries, a live world.
        let refused = unsafe { moe_layer_new(world, c"nvlink-one-sided".as_ptr(), &spec, &mut layer) };
        let refusal = last_error();
        spec.expert_map = map.as_ptr();
        let mut outs = Vec::new();
        for backend in [c"nvlink-one-sided", c"nvlink-two-sided", c"allgather-rs"] {
            // SAFETY: as above; the layer is freed once.
            unsafe {
                let status = moe_layer_new(world, backend.as_ptr(), &spec, &mut layer);
                assert_eq!(status, MoeStatus::Ok, "{backend:?}: {}", last_error());
                let mut call = Call::new();
                assert_eq!(call.run(layer), MoeStatus::Ok, "{backend:?}: {}", last_error());
                moe_layer_free(layer);
                outs.push((call.out, call.delivered));
            }
        }
        (refused, refusal, outs)
    });
    for (rank, (refused, refusal, outs)) in results.iter().enumerate() {
        assert_eq!(*refused, MoeStatus::InvalidArgument, "rank {rank}: {refusal}");
        assert!(refusal.contains("expert 5 -> rank 7"), "rank {rank}: {refusal}");
        for (out, delivered) in outs {
            assert!(
                out.iter().all(|&v| v == 0x3f80),
                "rank {rank}: the tokens did not come back whole"
            );
            let mut placed = delivered.iter().filter(|&&e| e >= 0).peekable();
            assert!(
                placed.peek().is_some(),
                "rank {rank}: no expert of its own was delivered"
            );
            assert!(
                placed.all(|&e| e as usize % 2 == rank),
                "rank {rank} was delivered experts the map gives the other rank: {delivered:?}"
            );
        }
    }
}
