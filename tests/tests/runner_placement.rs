//! Where `MoeLayer::forward`'s tensors may be: all in host memory, or all on the rank's GPU.
//! Tensors in two places, and device tensors on a rank of the host platform, are refused
//! before anything reads them, naming the tensor apart and what to pass instead, on every
//! rank (each gives the same call) and for every built-in backend. The device tensors here
//! stand for memory no test reads: the refusal comes first.

use std::sync::Arc;

use moe_a2a::harness::make_inputs;
use moe_a2a::host::{HostWorldConfig, run_host_world};
use moe_a2a::{DeviceMemory, DeviceRegion, MoeError, Result, Tensor};
use moe_a2a_tests::{cell, layers_on};

/// Memory on GPU 3 that no one may read.
#[derive(Debug)]
struct NotRead {
    len: usize,
}

impl DeviceMemory for NotRead {
    fn ordinal(&self) -> usize {
        3
    }
    fn address(&self) -> u64 {
        0x5000_0000
    }
    fn len(&self) -> usize {
        self.len
    }
    fn read(&self, _: usize, _: &mut [u8]) -> Result<()> {
        Err(MoeError::Device("the test's stand-in memory was read".into()))
    }
}

/// A tensor of `like`'s dtype and shape on GPU 3.
fn on_gpu(like: &Tensor) -> Tensor {
    let len = like.bytes().len();
    let region = DeviceRegion::new(Arc::new(NotRead { len }), 0, len).expect("region");
    Tensor::on_device(like.dtype(), like.shape(), region).expect("device tensor")
}

/// Every rank's `forward` error, for every built-in backend, with `place` choosing which of
/// (tokens, ids, weights, out) move to GPU 3.
fn refusals(place: [bool; 4]) -> Vec<(String, String)> {
    let mut all = Vec::new();
    for backend in moe_a2a::BUILTIN_BACKENDS {
        let c = cell(backend);
        let layer = c.layer().expect("valid");
        let errs = run_host_world(HostWorldConfig::new(2), |rank| {
            let r = rank.rank();
            let mut moe_layer = layers_on(std::slice::from_ref(&c), &rank)?.remove(0);
            let inp = &make_inputs(&c, &layer, 0)[r];
            let out = Tensor::zeros(inp.tokens.dtype(), inp.tokens.shape());
            let mut t = [inp.tokens.clone(), inp.topk_ids.clone(), inp.topk_weights.clone(), out];
            for (t, moved) in t.iter_mut().zip(place) {
                if moved {
                    *t = on_gpu(t);
                }
            }
            let [tokens, ids, weights, mut out] = t;
            Ok(moe_layer.forward(&tokens, &ids, &weights, &mut out).unwrap_err())
        });
        for e in errs {
            all.push((backend.to_string(), e.expect("rank ran").to_string()));
        }
    }
    all
}

#[test]
fn tensors_in_two_places_are_refused_naming_the_tensor_apart() {
    for (backend, e) in refusals([false, false, false, true]) {
        assert!(
            e.contains("`out` is in GPU 3 while `tokens` is in host memory")
                && e.contains("all in host memory or all on the rank's GPU"),
            "{backend}: {e}"
        );
    }
    for (backend, e) in refusals([true, false, true, true]) {
        assert!(
            e.contains("`topk_ids` is in host memory while `tokens` is in GPU 3"),
            "{backend}: {e}"
        );
    }
}

#[test]
fn device_tensors_on_a_rank_of_the_host_platform_are_refused_saying_what_to_build() {
    for (backend, e) in refusals([true; 4]) {
        assert!(
            e.contains("the tensors are on GPU 3") && e.contains("RankContext::Cuda"),
            "{backend}: {e}"
        );
    }
}
