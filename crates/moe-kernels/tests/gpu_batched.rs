//! The device-side BatchedExperts delivery (`BatchedDelivery::launch`) is byte-identical with
//! the host's `ReceivedRows::into_batched`, and its reduction (`BatchedDelivery::reduce`)
//! bit-identical with `moe_core::slots::reduce_batched`, on random received rows: padding rows,
//! rows with no, one or several local experts (now and then one listed twice), weights with any
//! bits; bf16, fp8 1x128-block and nvfp4 rows with linear and 128x4-swizzled scales; 0, 1, 3 and
//! 8 local experts placed out of order; rows given as whole dispatch slots and as separate
//! arrays; bf16 and fp16 expert outputs, reduced into rows with and without room between them
//! (and with a stride that rules out 16-byte vectors). A second launch with fewer rows filled
//! must zero the weights the first one left, and both must record into a CUDA graph (no host
//! synchronization, no allocation). Without a GPU each trial is reported as ignored with the
//! reason; `MOE_REQUIRE_GPU=1` makes that a failure.

use std::fmt;

use libtest_mimic::Failed;
use moe_quant::QuantScheme;
use support::GpuTrials;

mod support;

/// One bit-exactness trial.
#[derive(Clone, Copy, Debug)]
struct Case {
    scheme: QuantScheme,
    swizzled: bool,
    local_experts: usize,
    /// Rows as whole dispatch slots (one stride for every field) rather than separate arrays.
    slot_major: bool,
    /// The experts' output dtype: bf16, else fp16.
    out_bf16: bool,
    /// Bytes between reduced rows beyond the row itself: 0, 2 (no 16-byte vectors) or 32.
    dst_pad: usize,
    /// The DeepSeek-V3 shape (hidden 7168, top-8, 32 local experts) instead of the small one
    /// (hidden 256, top-4).
    deepseek: bool,
}

impl fmt::Display for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.scheme)?;
        if self.swizzled {
            f.write_str("+swizzled")?;
        }
        let rows = if self.slot_major { "slot-major" } else { "field-major" };
        let out = if self.out_bf16 { "bf16" } else { "fp16" };
        write!(
            f,
            " experts={} {rows} out={out} pad={}",
            self.local_experts, self.dst_pad
        )?;
        if self.deepseek {
            f.write_str(" deepseek-v3")?;
        }
        Ok(())
    }
}

impl Case {
    /// bf16, fp8 1x128 block, nvfp4 linear and swizzled x {0, 1, 3, 8} local experts x
    /// {slot-major, field-major}, alternating the output dtype and the reduced rows' padding;
    /// plus the DeepSeek-V3 shape.
    fn all() -> Vec<Case> {
        let schemes = [
            (QuantScheme::Bf16, false),
            (QuantScheme::Fp8Block128, false),
            (QuantScheme::Nvfp4, false),
            (QuantScheme::Nvfp4, true),
        ];
        let mut v = Vec::new();
        for (scheme, swizzled) in schemes {
            for local_experts in [0, 1, 3, 8] {
                for slot_major in [true, false] {
                    let n = v.len();
                    v.push(Case {
                        scheme,
                        swizzled,
                        local_experts,
                        slot_major,
                        out_bf16: (n / 2 + n).is_multiple_of(2),
                        dst_pad: [0, 2, 32][n % 3],
                        deepseek: false,
                    });
                }
            }
        }
        v.push(Case {
            scheme: QuantScheme::Nvfp4,
            swizzled: true,
            local_experts: 32,
            slot_major: true,
            out_bf16: true,
            dst_pad: 0,
            deepseek: true,
        });
        v
    }
}

fn main() {
    let mut trials = GpuTrials::new();
    for case in Case::all() {
        trials.add(format!("batched_bit_exact {case}"), move || cases::bit_exact(case));
    }
    trials.add("batched_launch_and_reduce_record_into_a_cuda_graph", cases::graph);
    trials.add(
        "batched_delivery_drops_slots_beyond_the_rows_per_expert",
        cases::overflow,
    );
    trials.add("batched_delivery_refuses_what_its_kernels_cannot_read", cases::refusals);
    trials.run()
}

#[cfg(not(feature = "cuda"))]
mod cases {
    use super::*;
    use support::no_gpu;

    pub fn bit_exact(_: Case) -> Result<(), Failed> {
        no_gpu()
    }

    pub fn graph() -> Result<(), Failed> {
        no_gpu()
    }

    pub fn refusals() -> Result<(), Failed> {
        no_gpu()
    }

    pub fn overflow() -> Result<(), Failed> {
        no_gpu()
    }
}

#[cfg(feature = "cuda")]
mod cases {
    use std::sync::Arc;

    use moe_core::slots::{ReceivedRows, reduce_batched, write_routing};
    use moe_core::tensor::POISON_BYTE;
    use moe_core::{Activations, DType, DispatchLayout, Dispatched, ExpertPlacement, ScaleLayout, Tensor};
    use moe_kernels::batched::{BatchedDelivery, StandardRows};
    use moe_kernels::buffer::DeviceBuffer;
    use moe_kernels::device::CudaDevice;
    use moe_quant::swizzle;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use support::{failed, gpu};

    /// The rank whose rows are delivered, of three.
    const RANK: usize = 1;

    /// A case's layer: its dispatch layout, the placement (rank 1 of 3 owns every third
    /// expert, so local and global order differ from a contiguous block), the scales the
    /// experts consume and the received rows per launch.
    struct Setup {
        layout: DispatchLayout,
        placement: ExpertPlacement,
        scale_layout: Option<ScaleLayout>,
        rows: usize,
        out: DType,
        dst_stride: usize,
        slot_major: bool,
    }

    impl Setup {
        fn new(case: &Case) -> Self {
            let (hidden, top_k, rows) = if case.deepseek { (7168, 8, 520) } else { (256, 4, 1100) };
            let wire = case.scheme.wire_layout(hidden).expect("valid hidden");
            let layout = DispatchLayout {
                scheme: case.scheme,
                wire,
                top_k,
                hidden,
                combine_row_bytes: 2 * hidden,
            };
            // With no local experts, ranks 0 and 2 own everything.
            let experts = if case.local_experts == 0 {
                6
            } else {
                3 * case.local_experts
            };
            let owners: Vec<u32> = (0..experts as u32)
                .map(|e| {
                    if case.local_experts == 0 {
                        2 * (e % 2)
                    } else {
                        (e + 2) % 3
                    }
                })
                .collect();
            let placement = ExpertPlacement::from_map(&owners, experts, 3).expect("valid map");
            assert_eq!(placement.local_count(RANK), case.local_experts);
            let scale_layout = case.scheme.has_scales().then_some(if case.swizzled {
                ScaleLayout::Swizzled128x4
            } else {
                ScaleLayout::Linear
            });
            let out = if case.out_bf16 { DType::Bf16 } else { DType::F16 };
            Setup {
                layout,
                placement,
                scale_layout,
                rows,
                out,
                dst_stride: 2 * hidden + case.dst_pad,
                slot_major: case.slot_major,
            }
        }

        fn delivery(&self, gpu: &Arc<CudaDevice>) -> Result<BatchedDelivery, Failed> {
            BatchedDelivery::new(gpu, self.layout, self.rows, &self.placement, RANK, self.scale_layout).map_err(failed)
        }

        /// Random received rows as dispatch slots, rows from `filled` on padding (all ids
        /// -1). A filled row lists each slot's expert with probability 1/2, mostly distinct
        /// local experts (now and then one twice, which `into_batched` also regroups, as long
        /// as no expert gets more than `rows` rows); every other slot is -1. With fewer rows
        /// filled, local expert 1 gets none. Payload, scales and weights are random bits, -1
        /// slots' weights included (they must not travel).
        fn slots(&self, rng: &mut ChaCha8Rng, filled: usize) -> Vec<u8> {
            let mut taken = vec![0usize; self.placement.local_count(RANK)];
            let local: Vec<usize> = self
                .placement
                .experts_of(RANK)
                .into_iter()
                .enumerate()
                .filter(|&(li, _)| filled == self.rows || li != 1)
                .map(|(_, e)| e)
                .collect();
            let padding: Vec<bool> = (0..self.rows).map(|r| r >= filled || rng.random_bool(0.15)).collect();
            self.image(rng, |rng, r, ids| {
                if padding[r] || local.is_empty() || !rng.random_bool(0.5) {
                    return -1;
                }
                let unused: Vec<usize> = local.iter().copied().filter(|e| !ids.contains(&(*e as i32))).collect();
                let id = if rng.random_bool(0.03) {
                    local[rng.random_range(0..local.len())]
                } else if unused.is_empty() {
                    return -1;
                } else {
                    unused[rng.random_range(0..unused.len())]
                };
                let li = self.placement.local_index(id);
                if taken[li] == self.rows {
                    return -1;
                }
                taken[li] += 1;
                id as i32
            })
        }

        /// Received rows as dispatch slots with random payload, scales and weights (any bits
        /// now and then), slot by slot ids from `id(rng, row, ids so far)`.
        fn image(&self, rng: &mut ChaCha8Rng, mut id: impl FnMut(&mut ChaCha8Rng, usize, &[i32]) -> i32) -> Vec<u8> {
            let d = &self.layout;
            let mut image = vec![0u8; self.rows * d.slot_bytes()];
            for (r, slot) in image.chunks_exact_mut(d.slot_bytes()).enumerate() {
                rng.fill(&mut slot[..d.wire.payload_bytes]);
                rng.fill(&mut slot[d.scales_offset()..d.scales_offset() + d.wire.scale_bytes]);
                let mut ids: Vec<i32> = Vec::with_capacity(d.top_k);
                for _ in 0..d.top_k {
                    let next = id(rng, r, &ids);
                    ids.push(next);
                }
                let weights: Vec<f32> = (0..d.top_k)
                    .map(|_| {
                        if rng.random_bool(0.05) {
                            f32::from_bits(rng.random())
                        } else {
                            rng.random_range(-1.0f32..1.0)
                        }
                    })
                    .collect();
                write_routing(d, &ids, &weights, None, &mut slot[d.ids_offset()..]);
            }
            image
        }

        /// The host delivery of `image` and its per-expert source rows (the sending rank plays
        /// no part in it: every row is marked as rank 0's).
        fn expected(&self, image: &[u8]) -> Result<(Dispatched, Vec<Vec<usize>>), Failed> {
            let mut rows = ReceivedRows::new(self.layout, self.rows);
            for (r, slot) in image.chunks_exact(self.layout.slot_bytes()).enumerate() {
                rows.fill(r, 0, slot);
            }
            rows.into_batched(&self.placement, RANK, self.scale_layout)
                .map_err(failed)
        }

        /// The batched row of each (row, slot) as the host assigns them (`into_batched`'s
        /// walk), -1 for slots of no local expert.
        fn expected_slot_rows(&self, image: &[u8]) -> Vec<i32> {
            let d = &self.layout;
            let mut next = vec![0usize; self.placement.local_count(RANK)];
            let mut out = Vec::with_capacity(self.rows * d.top_k);
            for slot in image.chunks_exact(d.slot_bytes()) {
                for j in 0..d.top_k {
                    let at = d.ids_offset() + 4 * j;
                    let id = i32::from_le_bytes(slot[at..at + 4].try_into().expect("4 bytes"));
                    out.push(if id < 0 {
                        -1
                    } else {
                        let li = self.placement.local_index(id as usize);
                        next[li] += 1;
                        (li * self.rows + next[li] - 1) as i32
                    });
                }
            }
            out
        }
    }

    /// The received rows on the GPU, as the case lays them out.
    struct Input {
        buffers: Vec<DeviceBuffer>,
        rows: StandardRows,
    }

    impl Input {
        fn new(gpu: &Arc<CudaDevice>, setup: &Setup, image: &[u8]) -> Result<Self, Failed> {
            let d = &setup.layout;
            if setup.slot_major {
                let slots = DeviceBuffer::from_bytes(gpu, image).map_err(failed)?;
                let rows = StandardRows::slot_major(slots.ptr(), d, setup.rows);
                return Ok(Input {
                    buffers: vec![slots],
                    rows,
                });
            }
            let buffers = Self::fields(d, image)
                .iter()
                .map(|bytes| DeviceBuffer::from_bytes(gpu, bytes).map_err(failed))
                .collect::<Result<Vec<_>, _>>()?;
            let rows = StandardRows::field_major(
                buffers[0].ptr(),
                buffers[1].ptr(),
                buffers[2].ptr(),
                buffers[3].ptr(),
                d,
                setup.rows,
            );
            Ok(Input { buffers, rows })
        }

        /// The payload, scales, ids and weights of every slot, each field dense.
        fn fields(d: &DispatchLayout, image: &[u8]) -> [Vec<u8>; 4] {
            let spans = [
                (d.payload_offset(), d.wire.payload_bytes),
                (d.scales_offset(), d.wire.scale_bytes),
                (d.ids_offset(), 4 * d.top_k),
                (d.weights_offset(), 4 * d.top_k),
            ];
            spans.map(|(at, len)| {
                image
                    .chunks_exact(d.slot_bytes())
                    .flat_map(|slot| &slot[at..at + len])
                    .copied()
                    .collect()
            })
        }

        /// Overwrites the rows with `image`, in place (the delivery keeps its addresses).
        fn rewrite(&self, setup: &Setup, image: &[u8]) -> Result<(), Failed> {
            if setup.slot_major {
                return self.buffers[0].upload(0, image).map_err(failed);
            }
            for (buffer, bytes) in self.buffers.iter().zip(Self::fields(&setup.layout, image)) {
                buffer.upload(0, &bytes).map_err(failed)?;
            }
            Ok(())
        }
    }

    fn host(t: &Tensor) -> Result<Tensor, Failed> {
        t.to_host().map_err(failed)
    }

    fn parts(d: &Dispatched) -> Result<(&Activations, &Tensor, &Tensor), Failed> {
        match d {
            Dispatched::Batched {
                activations,
                expert_counts,
                weights,
            } => Ok((activations, expert_counts, weights)),
            Dispatched::Standard { .. } => Err("a Standard delivery where Batched was expected".into()),
        }
    }

    fn scales(a: &Activations) -> Option<&Tensor> {
        match a {
            Activations::Scaled { scales, .. } => Some(scales),
            Activations::Unscaled { .. } => None,
        }
    }

    /// The GPU delivery against the host's: shapes, counts, every weight (zeros beyond the
    /// counts included), the payload and linear scales of the rows below the counts, and for
    /// swizzled scales every byte but those of rows between a count and the rows per expert
    /// (unspecified), the padding included; then the batched row of every slot.
    fn check_delivery(
        what: &str,
        setup: &Setup,
        delivery: &BatchedDelivery,
        want: &Dispatched,
        want_slot_rows: &[i32],
    ) -> Result<(), Failed> {
        let got = delivery.dispatched().map_err(failed)?;
        let (ga, gc, gw) = parts(&got)?;
        let (wa, wc, ww) = parts(want)?;
        let shapes = |a: &Activations, c: &Tensor, w: &Tensor| {
            (
                a.data().shape().to_vec(),
                scales(a).map(|s| s.shape().to_vec()),
                c.shape().to_vec(),
                w.shape().to_vec(),
            )
        };
        if shapes(ga, gc, gw) != shapes(wa, wc, ww) {
            return Err(format!(
                "{what}: shapes {:?}, the host's {:?}",
                shapes(ga, gc, gw),
                shapes(wa, wc, ww)
            )
            .into());
        }
        let counts = host(gc)?.to_i32();
        if counts != wc.to_i32() {
            return Err(format!("{what}: counts {counts:?}, the host's {:?}", wc.to_i32()).into());
        }
        let (rows, d) = (setup.rows, &setup.layout);
        let weights = host(gw)?.to_f32();
        let want_weights = ww.to_f32();
        if let Some(i) = (0..weights.len()).find(|&i| weights[i].to_bits() != want_weights[i].to_bits()) {
            return Err(format!(
                "{what}: expert {} row {} weighs {:?}, on the host {:?} (count {})",
                i / rows,
                i % rows,
                weights[i],
                want_weights[i],
                counts[i / rows]
            )
            .into());
        }
        let filled_rows_match = |name: &str, got: &Tensor, want: &Tensor, width: usize| -> Result<(), Failed> {
            let got = host(got)?;
            for (li, &count) in counts.iter().enumerate() {
                for i in 0..count as usize {
                    let at = (li * rows + i) * width;
                    if got.bytes()[at..at + width] != want.bytes()[at..at + width] {
                        return Err(format!("{what}: {name} of expert {li} row {i} differs from the host's").into());
                    }
                }
            }
            Ok(())
        };
        filled_rows_match("payload", ga.data(), wa.data(), d.wire.payload_bytes)?;
        match (scales(ga), scales(wa), setup.scale_layout) {
            (None, None, None) => {}
            (Some(g), Some(w), Some(ScaleLayout::Linear)) => filled_rows_match("scales", g, w, d.wire.scale_bytes)?,
            (Some(g), Some(w), Some(ScaleLayout::Swizzled128x4)) => {
                let got = host(g)?;
                let cols = d.wire.scales_per_token;
                let matrix = swizzle::swizzled_len(rows, cols);
                for (li, &count) in counts.iter().enumerate() {
                    for m in 0..rows.next_multiple_of(128) {
                        let unspecified = m >= count as usize && m < rows;
                        for c in 0..cols.next_multiple_of(4) {
                            let at = li * matrix + swizzle::offset_128x4(m, c, cols);
                            if !(unspecified && c < cols) && got.bytes()[at] != w.bytes()[at] {
                                return Err(format!(
                                    "{what}: swizzled scale ({m}, {c}) of expert {li} (count {count}) is {:#04x}, on the host {:#04x}",
                                    got.bytes()[at],
                                    w.bytes()[at]
                                )
                                .into());
                            }
                        }
                    }
                }
            }
            other => return Err(format!("{what}: scales {:?}", other.2).into()),
        }
        let slot_rows = host(&delivery.slot_rows().map_err(failed)?)?.to_i32();
        if let Some(at) = (0..slot_rows.len()).find(|&at| slot_rows[at] != want_slot_rows[at]) {
            return Err(format!(
                "{what}: row {} slot {} went to batched row {}, on the host {}",
                at / d.top_k,
                at % d.top_k,
                slot_rows[at],
                want_slot_rows[at]
            )
            .into());
        }
        Ok(())
    }

    /// Random weighted expert rows for the rows below the counts (magnitudes over six
    /// decades, so that the order of the sum shows in its rounding) and NaN for the others,
    /// which a reduction that read them would show.
    fn expert_output(rng: &mut ChaCha8Rng, setup: &Setup, sources: &[Vec<usize>]) -> Tensor {
        let (rows, h) = (setup.rows, setup.layout.hidden);
        let mut y = vec![f32::NAN; sources.len() * rows * h];
        for (li, s) in sources.iter().enumerate() {
            for v in &mut y[li * rows * h..(li * rows + s.len()) * h] {
                *v = rng.random_range(-1.0f32..1.0) * 10f32.powf(rng.random_range(-3.0f32..3.0));
            }
        }
        Tensor::from_f32(setup.out, &[sources.len(), rows, h], &y)
    }

    /// Whether two 16-bit values are the same: equal bits, or both NaN.
    fn same(got: u16, want: u16, dtype: DType) -> bool {
        let inf = if dtype == DType::Bf16 { 0x7f80 } else { 0x7c00 };
        got == want || ((got & 0x7fff) > inf && (want & 0x7fff) > inf)
    }

    /// Reduces `y` on the GPU into poisoned rows of the case's stride and compares every
    /// element with the host reduction; the bytes between rows must stay untouched.
    fn check_reduce(
        what: &str,
        gpu: &Arc<CudaDevice>,
        setup: &Setup,
        delivery: &BatchedDelivery,
        y: &Tensor,
        sources: &[Vec<usize>],
    ) -> Result<(), Failed> {
        let (rows, h) = (setup.rows, setup.layout.hidden);
        let want = reduce_batched(sources, y, rows, h, setup.out).map_err(failed)?;
        let y_dev = DeviceBuffer::from_bytes(gpu, y.bytes()).map_err(failed)?;
        let dst = DeviceBuffer::from_bytes(gpu, &vec![POISON_BYTE; rows * setup.dst_stride]).map_err(failed)?;
        // SAFETY: `y_dev` holds [local_experts, rows, hidden] elements of the output dtype and
        // `dst` rows of dst_stride bytes, both live until the download below synchronizes.
        unsafe { delivery.reduce(y_dev.ptr(), dst.ptr(), setup.dst_stride, setup.out) }.map_err(failed)?;
        compare_rows(what, gpu, setup, &dst, &want)
    }

    fn compare_rows(
        what: &str,
        gpu: &CudaDevice,
        setup: &Setup,
        dst: &DeviceBuffer,
        want: &Tensor,
    ) -> Result<(), Failed> {
        let (rows, h) = (setup.rows, setup.layout.hidden);
        let mut got = vec![0u8; rows * setup.dst_stride];
        dst.download(0, &mut got).map_err(failed)?;
        for r in 0..rows {
            let row = &got[r * setup.dst_stride..(r + 1) * setup.dst_stride];
            if row[2 * h..].iter().any(|&b| b != POISON_BYTE) {
                return Err(format!("{what}: bytes after row {r} were written").into());
            }
            for e in 0..h {
                let g = u16::from_le_bytes([row[2 * e], row[2 * e + 1]]);
                let at = 2 * (r * h + e);
                let w = u16::from_le_bytes([want.bytes()[at], want.bytes()[at + 1]]);
                if !same(g, w, setup.out) {
                    return Err(format!(
                        "{what}: reduced row {r} element {e}: GPU {g:#06x}, host {w:#06x} ({:?}, on {})",
                        setup.out,
                        gpu.describe()
                    )
                    .into());
                }
            }
        }
        Ok(())
    }

    fn seed(case: &Case) -> u64 {
        case.to_string()
            .bytes()
            .fold(7u64, |h, b| h.wrapping_mul(131) ^ u64::from(b))
    }

    pub fn bit_exact(case: Case) -> Result<(), Failed> {
        let gpu = gpu()?;
        let setup = Setup::new(&case);
        let mut rng = ChaCha8Rng::seed_from_u64(seed(&case));
        let delivery = setup.delivery(&gpu)?;
        let image = setup.slots(&mut rng, setup.rows);
        let input = Input::new(&gpu, &setup, &image)?;
        // All rows, then a quarter: the second launch must zero the weights the first left.
        for (round, filled) in [setup.rows, setup.rows / 4].into_iter().enumerate() {
            let what = format!("{case}, launch {}", round + 1);
            let image = if round == 0 {
                image.clone()
            } else {
                let image = setup.slots(&mut rng, filled);
                input.rewrite(&setup, &image)?;
                image
            };
            let (want, sources) = setup.expected(&image)?;
            // SAFETY: `input` holds `rows` rows of the layout at its strides on this GPU,
            // uploaded (and synchronized) before, and alive until the checks download.
            unsafe { delivery.launch(&input.rows) }.map_err(failed)?;
            check_delivery(&what, &setup, &delivery, &want, &setup.expected_slot_rows(&image))?;
            let y = expert_output(&mut rng, &setup, &sources);
            check_reduce(&what, &gpu, &setup, &delivery, &y, &sources)?;
        }
        Ok(())
    }

    fn graph_case() -> Case {
        Case {
            scheme: QuantScheme::Nvfp4,
            swizzled: true,
            local_experts: 3,
            slot_major: false,
            out_bf16: false,
            dst_pad: 32,
            deepseek: false,
        }
    }

    pub fn graph() -> Result<(), Failed> {
        let gpu = gpu()?;
        let case = graph_case();
        let setup = Setup::new(&case);
        let mut rng = ChaCha8Rng::seed_from_u64(seed(&case) ^ 1);
        let delivery = setup.delivery(&gpu)?;
        let input = Input::new(&gpu, &setup, &setup.slots(&mut rng, setup.rows))?;
        // A launch outside the graph first: it leaves weights the replay must zero, and the
        // capture then finds the kernel handles cached.
        // SAFETY: `input` holds `rows` rows of the layout on this GPU; the upload below waits
        // for the stream, so the launch has run before the rows change.
        unsafe { delivery.launch(&input.rows) }.map_err(failed)?;
        let image = setup.slots(&mut rng, setup.rows / 4);
        input.rewrite(&setup, &image)?;
        let (want, sources) = setup.expected(&image)?;
        let y = expert_output(&mut rng, &setup, &sources);
        let want_rows = reduce_batched(&sources, &y, setup.rows, setup.layout.hidden, setup.out).map_err(failed)?;
        let y_dev = DeviceBuffer::from_bytes(&gpu, y.bytes()).map_err(failed)?;
        let dst = DeviceBuffer::from_bytes(&gpu, &vec![POISON_BYTE; setup.rows * setup.dst_stride]).map_err(failed)?;
        let graph = gpu
            .capture_graph(|| {
                let device = |e: moe_kernels::KernelError| moe_core::MoeError::Device(e.to_string());
                // SAFETY: the input rows, the expert output and `dst` are live buffers of the
                // sizes the calls require, kept until after the replay is downloaded.
                unsafe { delivery.launch(&input.rows) }.map_err(device)?;
                // SAFETY: as above.
                unsafe { delivery.reduce(y_dev.ptr(), dst.ptr(), setup.dst_stride, setup.out) }.map_err(device)
            })
            .map_err(failed)?;
        graph.launch().map_err(failed)?;
        check_delivery(
            "graph replay",
            &setup,
            &delivery,
            &want,
            &setup.expected_slot_rows(&image),
        )?;
        compare_rows("graph replay", &gpu, &setup, &dst, &want_rows)
    }

    pub fn refusals() -> Result<(), Failed> {
        let gpu = gpu()?;
        let setup = Setup::new(&graph_case());
        let expect_err = |what: &str, r: Result<(), moe_kernels::KernelError>, says: &str| -> Result<(), Failed> {
            match r {
                Err(e) if e.to_string().contains(says) => Ok(()),
                other => Err(format!("{what}: expected an error saying {says:?}, got {other:?}").into()),
            }
        };
        let new = |scale_layout, rank| {
            BatchedDelivery::new(&gpu, setup.layout, setup.rows, &setup.placement, rank, scale_layout).map(|_| ())
        };
        expect_err("no scale layout for nvfp4", new(None, RANK), "has scales")?;
        expect_err(
            "a rank outside the placement",
            new(setup.scale_layout, 3),
            "outside the placement",
        )?;
        let mut wide = setup.layout;
        wide.top_k = moe_kernels::batched::MAX_TOP_K + 1;
        expect_err(
            "top_k above the kernels' bound",
            BatchedDelivery::new(&gpu, wide, setup.rows, &setup.placement, RANK, setup.scale_layout).map(|_| ()),
            "top_k",
        )?;

        let delivery = setup.delivery(&gpu)?;
        let image = vec![0u8; setup.rows * setup.layout.slot_bytes()];
        let input = Input::new(&gpu, &setup, &image)?;
        let fewer = StandardRows {
            rows: setup.rows - 1,
            ..input.rows
        };
        let misaligned = StandardRows {
            ids: input.rows.ids + 2,
            ..input.rows
        };
        let short = StandardRows {
            payload_stride: setup.layout.wire.payload_bytes - 1,
            ..input.rows
        };
        // SAFETY: each call is refused before it enqueues anything.
        unsafe {
            expect_err("another row count", delivery.launch(&fewer), "rows given")?;
            expect_err("misaligned ids", delivery.launch(&misaligned), "4-byte aligned")?;
            expect_err("a short payload stride", delivery.launch(&short), "payload stride")?;
            expect_err(
                "an f32 expert output",
                delivery.reduce(0, 0, setup.dst_stride, DType::F32),
                "bf16 or fp16",
            )?;
            expect_err(
                "a short dst stride",
                delivery.reduce(0, 0, 2 * setup.layout.hidden - 2, setup.out),
                "shorter than a row",
            )?;
        }
        Ok(())
    }

    /// Every row lists the one local expert in every slot, so the expert gets `top_k` times
    /// more rows than it has (the host's `into_batched` panics there; masked dispatches never
    /// get there, since their ids are distinct). The kernels must stay in bounds: the first
    /// `rows` slots in (row, slot) order are placed, the others dropped, and the count is
    /// `rows`.
    pub fn overflow() -> Result<(), Failed> {
        let gpu = gpu()?;
        let case = Case {
            scheme: QuantScheme::Nvfp4,
            swizzled: false,
            local_experts: 1,
            slot_major: false,
            out_bf16: true,
            dst_pad: 0,
            deepseek: false,
        };
        let setup = Setup::new(&case);
        let mut rng = ChaCha8Rng::seed_from_u64(seed(&case) ^ 2);
        let expert = setup.placement.experts_of(RANK)[0] as i32;
        let image = setup.image(&mut rng, |_, _, _| expert);
        let (d, rows, k) = (&setup.layout, setup.rows, setup.layout.top_k);
        // The first `rows` (row, slot) pairs, in order: batched row i is slot i % k of row i / k.
        let (pb, sb) = (d.wire.payload_bytes, d.wire.scale_bytes);
        let per_row = |at: usize, len: usize| -> Vec<u8> {
            (0..rows)
                .flat_map(|i| image[(i / k) * d.slot_bytes() + at..][..len].to_vec())
                .collect()
        };
        let weights: Vec<u8> = (0..rows)
            .flat_map(|i| image[(i / k) * d.slot_bytes() + d.weights_offset() + 4 * (i % k)..][..4].to_vec())
            .collect();
        let want = Dispatched::Batched {
            activations: Activations::new(
                d.scheme,
                Tensor::from_bytes(DType::U8, &[1, rows, pb], per_row(d.payload_offset(), pb)).map_err(failed)?,
                Some((
                    Tensor::from_bytes(DType::U8, &[1, rows, sb], per_row(d.scales_offset(), sb)).map_err(failed)?,
                    ScaleLayout::Linear,
                )),
            ),
            expert_counts: Tensor::from_i32(&[1], &[rows as i32]),
            weights: Tensor::from_bytes(DType::F32, &[1, rows], weights).map_err(failed)?,
        };
        let slot_rows: Vec<i32> = (0..rows * k).map(|i| if i < rows { i as i32 } else { -1 }).collect();
        let delivery = setup.delivery(&gpu)?;
        let input = Input::new(&gpu, &setup, &image)?;
        // SAFETY: `input` holds `rows` rows of the layout on this GPU, alive until the checks.
        unsafe { delivery.launch(&input.rows) }.map_err(failed)?;
        check_delivery("overflowing expert", &setup, &delivery, &want, &slot_rows)?;
        let sources = vec![(0..rows).map(|i| i / k).collect::<Vec<_>>()];
        let y = expert_output(&mut rng, &setup, &sources);
        check_reduce("overflowing expert", &gpu, &setup, &delivery, &y, &sources)
    }
}
