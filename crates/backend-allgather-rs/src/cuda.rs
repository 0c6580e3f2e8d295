//! allgather-rs on NVIDIA GPUs: the quantized tokens, top-k ids and weights are all-gathered
//! with NCCL over the dispatch group, each rank contributing `max_tokens` rows (padding rows
//! carry ids -1), so no rank needs the others' counts first and nothing waits for the host;
//! the experts' rows are reduce-scattered back in f32.
//!
//! This is the transport only: `dispatch` and `combine` upload inputs from, and download what
//! was received and the combined output to, host tensors, so host experts run in between.
//! `upload_inputs`, `launch_dispatch` and `launch_combine` are the steady-state path they are
//! built from: the launches enqueue kernels and collectives on the rank's stream and neither
//! allocates nor waits for the host.

use std::sync::Arc;

use moe_core::slots::{self, ReceivedRows};
use moe_core::{DispatchLayout, Dispatched, ExpertPlacement, LayerConfig, MoeError, PrepareInput, Result, Tensor};
use moe_kernels::cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use moe_kernels::cudarc::nccl::{Comm, Id, ReduceOp};
use moe_kernels::gpu::Gpu;
use moe_kernels::source::{Module, QuantSpec};

fn device(e: impl std::fmt::Display) -> MoeError {
    MoeError::Device(e.to_string())
}

fn nccl(op: &'static str) -> impl Fn(moe_kernels::cudarc::nccl::result::NcclError) -> MoeError {
    move |e| MoeError::Device(format!("NCCL {op}: {e:?}"))
}

/// One rank's all-gather backend on its GPU.
#[derive(Debug)]
pub struct GpuAllGather {
    layer: LayerConfig,
    dispatch: DispatchLayout,
    gpu: Arc<Gpu>,
    comm: Comm,
    group: Vec<usize>,
    rank: usize,
    /// `Some` under EP: received ids of experts other ranks own become -1.
    placement: Option<ExpertPlacement>,
    n_tokens: usize,
    tokens: CudaSlice<u16>,
    images: CudaSlice<u8>,
    ids: CudaSlice<i32>,
    weights: CudaSlice<f32>,
    all_images: CudaSlice<u8>,
    all_ids: CudaSlice<i32>,
    all_weights: CudaSlice<f32>,
    expert_out: CudaSlice<f32>,
    reduced: CudaSlice<f32>,
}

/// The dispatch group of `rank`: its DP group, or every rank under sequence parallelism.
pub fn group_of(layer: &LayerConfig, rank: usize) -> Vec<usize> {
    let p = layer.parallel;
    if p.sp { p.world_group() } else { p.dp_group(rank) }
}

impl GpuAllGather {
    /// World rank `rank` on `gpu`, joining the NCCL communicator `id` of its dispatch group
    /// (collective: every member of the group constructs at the same time). Allocates and
    /// loads its kernels here, before any collective runs.
    pub fn new(layer: &LayerConfig, gpu: Arc<Gpu>, rank: usize, id: Id) -> Result<Self> {
        let d = layer.dispatch_layout();
        let group = group_of(layer, rank);
        let me = group
            .iter()
            .position(|&r| r == rank)
            .expect("a rank is in its own group");
        let (g, max, k, h) = (
            group.len(),
            layer.dispatch_tokens_bound(),
            layer.moe.top_k,
            layer.moe.hidden,
        );
        gpu.preload(&Module::Quant(QuantSpec::of_layer(layer)))
            .map_err(device)?;
        let s: Arc<CudaStream> = gpu.stream().clone();
        // NCCL takes the device from the thread's current context, which nothing above is
        // sure to have set (a cached module loads nothing).
        gpu.context().bind_to_thread().map_err(device)?;
        let comm = Comm::from_rank(s.clone(), me, g, id).map_err(nccl("comm init"))?;
        let image = d.ids_offset();
        Ok(GpuAllGather {
            layer: layer.clone(),
            dispatch: d,
            comm,
            group,
            rank,
            placement: layer.parallel.ep.then(|| layer.placement()),
            n_tokens: 0,
            tokens: s.alloc_zeros(max * h).map_err(device)?,
            images: s.alloc_zeros(max * image).map_err(device)?,
            ids: s.alloc_zeros(max * k).map_err(device)?,
            weights: s.alloc_zeros(max * k).map_err(device)?,
            all_images: s.alloc_zeros(g * max * image).map_err(device)?,
            all_ids: s.alloc_zeros(g * max * k).map_err(device)?,
            all_weights: s.alloc_zeros(g * max * k).map_err(device)?,
            expert_out: s.alloc_zeros(g * max * h).map_err(device)?,
            reduced: s.alloc_zeros(max * h).map_err(device)?,
            gpu,
        })
    }

    fn max_tokens(&self) -> usize {
        self.layer.dispatch_tokens_bound()
    }

    /// The rank's GPU (for timing with events on its stream).
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// Uploads this call's tokens, ids and weights. Ids and weights are padded to `max_tokens`
    /// rows (ids -1, weights 0) because every rank gathers all `max_tokens` rows of each peer:
    /// the padding must route nowhere.
    pub fn upload_inputs(&mut self, input: PrepareInput<'_>) -> Result<()> {
        let (k, max, n) = (self.dispatch.top_k, self.max_tokens(), input.num_tokens());
        let s = self.gpu.stream().clone();
        let tokens: Vec<u16> = input
            .tokens()
            .bytes()
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        let mut ids = vec![-1i32; max * k];
        let mut weights = vec![0f32; max * k];
        ids[..n * k].copy_from_slice(&input.topk_ids().to_i32());
        weights[..n * k].copy_from_slice(&input.topk_weights().to_f32());
        s.memcpy_htod(&tokens, &mut self.tokens.slice_mut(..tokens.len()))
            .map_err(device)?;
        s.memcpy_htod(&ids, &mut self.ids).map_err(device)?;
        s.memcpy_htod(&weights, &mut self.weights).map_err(device)?;
        self.n_tokens = n;
        Ok(())
    }

    /// Enqueues the quantization of the uploaded tokens and the all-gathers of the images, ids
    /// and weights over the group, on this rank's stream; nothing waits for the host. Takes
    /// `&mut self` because NCCL writes the gathered buffers.
    pub fn launch_dispatch(&mut self) -> Result<()> {
        let d = self.dispatch;
        let s = self.gpu.stream().clone();
        let image = d.ids_offset();
        {
            let (x, _x) = self.tokens.device_ptr(&s);
            let (img, _img) = self.images.device_ptr_mut(&s);
            // SAFETY: `tokens` holds n <= max_tokens tokens of `hidden` 16-bit values, `images`
            // max_tokens rows of `image` bytes with the scales at `scales_offset` in each row.
            unsafe {
                self.gpu.quantize_raw(
                    &QuantSpec::of_layer(&self.layer),
                    &self.layer.quant.params,
                    x,
                    self.n_tokens,
                    img,
                    image,
                    img + d.scales_offset() as u64,
                    image,
                )
            }
            .map_err(device)?;
        }
        self.comm
            .all_gather(&self.images, &mut self.all_images)
            .map_err(nccl("all_gather images"))?;
        self.comm
            .all_gather(&self.ids, &mut self.all_ids)
            .map_err(nccl("all_gather ids"))?;
        self.comm
            .all_gather(&self.weights, &mut self.all_weights)
            .map_err(nccl("all_gather weights"))?;
        Ok(())
    }

    /// Enqueues the f32 reduce-scatter of the experts' rows (whatever the expert output buffer
    /// holds, `[group * max_tokens, hidden]`) into this rank's `max_tokens` output rows, on
    /// this rank's stream; nothing waits for the host.
    pub fn launch_combine(&mut self) -> Result<()> {
        self.comm
            .reduce_scatter(&self.expert_out, &mut self.reduced, &ReduceOp::Sum)
            .map_err(nccl("reduce_scatter"))?;
        Ok(())
    }

    /// Quantizes this rank's tokens and all-gathers tokens, ids and weights over the group;
    /// returns what this rank's experts get (Standard format, downloaded).
    pub fn dispatch(&mut self, input: PrepareInput<'_>) -> Result<Dispatched> {
        self.upload_inputs(input)?;
        self.launch_dispatch()?;
        let d = self.dispatch;
        let (k, max, image) = (d.top_k, self.max_tokens(), d.ids_offset());
        let s = self.gpu.stream().clone();
        let all_images = s.clone_dtoh(&self.all_images).map_err(device)?;
        let all_ids = s.clone_dtoh(&self.all_ids).map_err(device)?;
        let all_weights = s.clone_dtoh(&self.all_weights).map_err(device)?;

        let rows = self.group.len() * max;
        let mut received = ReceivedRows::new(d, rows);
        let mut slot = vec![0u8; d.slot_bytes()];
        for r in 0..rows {
            slot[..image].copy_from_slice(&all_images[r * image..(r + 1) * image]);
            let (ids, w) = (&all_ids[r * k..(r + 1) * k], &all_weights[r * k..(r + 1) * k]);
            slots::write_routing(&d, ids, w, None, &mut slot[image..]);
            received.fill(r, &slot);
        }
        if let Some(placement) = &self.placement {
            received.mask_foreign(self.rank, placement);
        }
        let scale_layout = self.layer.quant.received_scale_layout(self.layer.moe.input_dtype);
        received.into_standard(scale_layout)
    }

    /// Reduce-scatters the experts' rows (`[group * max_tokens, hidden]`) in f32 and writes
    /// this rank's tokens into `out` (`[n, hidden]`).
    pub fn combine(&mut self, expert_output: &Tensor, out: &mut Tensor) -> Result<()> {
        let dtype = self.layer.moe.input_dtype.dtype();
        let (max, h, n) = (self.max_tokens(), self.dispatch.hidden, self.n_tokens);
        expert_output.expect("combine", "expert_output", dtype, &[self.group.len() * max, h])?;
        out.expect("combine", "out", dtype, &[n, h])?;
        let s = self.gpu.stream().clone();
        s.memcpy_htod(&expert_output.to_f32(), &mut self.expert_out)
            .map_err(device)?;
        self.launch_combine()?;
        let reduced = s.clone_dtoh(&self.reduced).map_err(device)?;
        out.store_f32(0, &reduced[..n * h]);
        Ok(())
    }
}

/// A fresh NCCL communicator id, made once per group and handed to each member.
pub fn new_comm_id() -> Result<Id> {
    Id::new().map_err(nccl("get unique id"))
}
