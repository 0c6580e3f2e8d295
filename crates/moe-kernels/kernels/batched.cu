// batched.cu: the BatchedExperts format on the GPU, both directions.
//
// Delivery: a rank's received Standard rows regrouped expert-major, byte for byte what
// moe_core's ReceivedRows::into_batched builds on the host. Local expert li's i-th row is the
// i-th received row, in ascending row order, that lists li (a row that lists li twice gets two
// rows, in slot order), so the placement is an ordered prefix scan, not an atomic append. Blocks
// cover chunks of rows, hence two passes over the same ids: moe_batched_count counts the
// matches of each (chunk, expert), moe_batched_place adds up the earlier chunks' counts and scans
// inside its chunk. moe_batched_copy then moves the payload and scales of every placed row.
//
// Reduction: each received row's batched expert rows summed back into one row, bit-identical
// with moe_core::slots::reduce_batched: f32 from 0.0 in ascending (expert, row) order, rounded
// to the dtype to nearest even.

// Rows per block of the count and place kernels, which is their blockDim.x (the scan gives each
// thread one row).
#define MOE_BATCHED_CHUNK 512
// Top-k slots of one row the reduction stages in shared memory; the host checks top_k.
#define MOE_BATCHED_MAX_TOP_K 64

// Scale modes of BatchedParams::scale_mode.
#define MOE_BATCHED_NO_SCALES 0
#define MOE_BATCHED_LINEAR_SCALES 1
#define MOE_BATCHED_SWIZZLED_SCALES 2

// Mirrors `BatchedParams` in crates/moe-kernels/src/batched.rs (repr(C)).
struct BatchedParams {
    // The received Standard rows: field f of row r at f_in + r * f_in_stride (bytes). ids and
    // weights are 4-byte aligned, with 4-byte aligned strides (checked by the host).
    u64 payload_in, scales_in, ids_in, weights_in;
    u64 payload_in_stride, scales_in_stride, ids_in_stride, weights_in_stride;
    // [num_experts] i32: each expert's local index on this rank, -1 for the other ranks' experts.
    u64 local_of;
    // [local_experts, chunks] i32: matches of each (expert, chunk), from count to place.
    u64 chunk_counts;
    // [rows, top_k] i32: the batched row (li * rows + i) of each received (row, slot), -1 where
    // the slot names no local expert. What the reduction sums.
    u64 slot_row;
    // Outputs: [local_experts, rows, payload_bytes]; scales as [local_experts, rows, scale_bytes]
    // (linear) or one 128x4 swizzle of [rows, scales_per_token] per expert; [local_experts] i32
    // counts; [local_experts, rows] f32 weights.
    u64 payload, scales, counts, weights;
    i32 rows, top_k, num_experts, local_experts, chunks;
    i32 payload_bytes, scale_bytes, scales_per_token, scale_mode;
};
static_assert(sizeof(BatchedParams) == 160, "BatchedParams must match its Rust mirror");

// Local index named by slot j of received row r, -1 when the slot names no expert of this rank
// (-1 ids, and ids outside [0, num_experts) or of other ranks, which masked ids never are).
__device__ __forceinline__ i32 moe_batched_slot_local(const BatchedParams& p, u32 r, u32 j) {
    const i32 id = ((const i32*)(p.ids_in + (u64)r * p.ids_in_stride))[j];
    return id >= 0 && id < p.num_experts ? ((const i32*)p.local_of)[id] : -1;
}

// How many slots of received row r name local expert li.
__device__ __forceinline__ u32 moe_batched_matches(const BatchedParams& p, u32 r, i32 li) {
    u32 m = 0;
    for (u32 j = 0; j < (u32)p.top_k; ++j) m += moe_batched_slot_local(p, r, j) == li;
    return m;
}

// Exclusive prefix sum of `v` over the block in thread order, and the block's total in `total`.
// blockDim.x a multiple of 32, at most 1024; every thread of the block calls it. Ends with a
// barrier, so it can be called again right away.
__device__ __forceinline__ u32 moe_block_exclusive_scan(u32 v, u32* total) {
    __shared__ u32 warp_sums[32];
    const u32 lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    u32 x = v;
    for (u32 o = 1; o < 32; o <<= 1) {
        const u32 y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o) x += y;
    }
    if (lane == 31) warp_sums[warp] = x;
    __syncthreads();
    if (warp == 0) {
        u32 s = lane < warps ? warp_sums[lane] : 0u;
        for (u32 o = 1; o < 32; o <<= 1) {
            const u32 y = __shfl_up_sync(0xffffffffu, s, o);
            if (lane >= o) s += y;
        }
        // Every lane read its word before the shuffles, so the inclusive sums can replace them.
        warp_sums[lane] = s;
    }
    __syncthreads();
    const u32 before = warp == 0 ? 0u : warp_sums[warp - 1];
    *total = warp_sums[warps - 1];
    __syncthreads();
    return before + x - v;
}

// Grid (chunks, local_experts), MOE_BATCHED_CHUNK threads: chunk_counts[li][c] = the slots of
// rows [c * CHUNK, (c + 1) * CHUNK) that name local expert li.
extern "C" __global__ void moe_batched_count(const BatchedParams p) {
    const i32 li = (i32)blockIdx.y;
    const u32 r = blockIdx.x * blockDim.x + threadIdx.x;
    const u32 m = r < (u32)p.rows ? moe_batched_matches(p, r, li) : 0u;
    u32 total;
    moe_block_exclusive_scan(m, &total);
    if (threadIdx.x == 0) ((i32*)p.chunk_counts)[(u64)li * p.chunks + blockIdx.x] = (i32)total;
}

// Grid (chunks, max(local_experts, 1)), MOE_BATCHED_CHUNK threads, after moe_batched_count.
// Block (c, li) places the rows of chunk c that name li after those of the earlier chunks:
// slot_row and the weight of each, the weights of positions [c * CHUNK, (c + 1) * CHUNK) at or
// beyond li's count (0.0, as the host leaves them), and, for c = 0, li's count. Slots that name
// no local expert get slot_row -1 from the blocks of li = 0, so every slot_row and every weight
// is written by exactly one block. With no local experts the grid has one row of blocks, which
// only write those -1s.
extern "C" __global__ void moe_batched_place(const BatchedParams p) {
    const i32 li = (i32)blockIdx.y;
    const u32 r = blockIdx.x * blockDim.x + threadIdx.x;
    const bool row = r < (u32)p.rows;
    i32* slot_row = (i32*)p.slot_row + (u64)r * p.top_k;
    if (li == 0 && row) {
        for (u32 j = 0; j < (u32)p.top_k; ++j) {
            if (moe_batched_slot_local(p, r, j) < 0) slot_row[j] = -1;
        }
    }
    if (li >= p.local_experts) return;  // uniform over the block
    const i32* chunk_counts = (const i32*)p.chunk_counts + (u64)li * p.chunks;
    u32 earlier = 0, all = 0;
    for (u32 c = threadIdx.x; c < (u32)p.chunks; c += blockDim.x) {
        const u32 n = (u32)chunk_counts[c];
        all += n;
        if (c < blockIdx.x) earlier += n;
    }
    u32 start, count, unused;
    moe_block_exclusive_scan(earlier, &start);
    moe_block_exclusive_scan(all, &count);
    const u32 m = row ? moe_batched_matches(p, r, li) : 0u;
    u32 at = start + moe_block_exclusive_scan(m, &unused);
    float* weights = (float*)p.weights + (u64)li * p.rows;
    if (m != 0) {
        const float* w_in = (const float*)(p.weights_in + (u64)r * p.weights_in_stride);
        for (u32 j = 0; j < (u32)p.top_k; ++j) {
            if (moe_batched_slot_local(p, r, j) != li) continue;
            // Only rows that list li more than once can take it past `rows` rows (where the
            // host panics); those slots are dropped, so no id makes the kernels write out of
            // bounds.
            const bool fits = at < (u32)p.rows;
            slot_row[j] = fits ? (i32)((u64)li * p.rows + at) : -1;
            if (fits) weights[at] = w_in[j];
            ++at;
        }
    }
    // Position r of li is beyond the count in this launch, whatever an earlier launch left there.
    if (row && r >= count) weights[r] = 0.0f;
    if (blockIdx.x == 0 && threadIdx.x == 0) ((i32*)p.counts)[li] = (i32)(count < (u32)p.rows ? count : (u32)p.rows);
}

// Any grid (one received row per block at a time), any block, after moe_batched_place: copies
// row r's payload and scales to each batched row slot_row gives it. Swizzled scales go straight
// to their place in their expert's 128x4 matrix; the padding of those matrices is never written
// (zero since allocation, as the host pads). Batched rows beyond the counts are not touched.
extern "C" __global__ void moe_batched_copy(const BatchedParams p) {
    const u32 cols = (u32)p.scales_per_token;
    const u64 matrix_bytes = moe_swizzled_len_128x4((u32)p.rows, cols);
    for (u32 r = blockIdx.x; r < (u32)p.rows; r += gridDim.x) {
        const u8* payload = (const u8*)(p.payload_in + (u64)r * p.payload_in_stride);
        const u8* scales = (const u8*)(p.scales_in + (u64)r * p.scales_in_stride);
        for (u32 j = 0; j < (u32)p.top_k; ++j) {
            const i32 b = ((const i32*)p.slot_row)[(u64)r * p.top_k + j];
            if (b < 0) continue;  // uniform over the block
            moe_copy_row((u8*)p.payload + (u64)b * p.payload_bytes, payload, p.payload_bytes);
            if (p.scale_mode == MOE_BATCHED_LINEAR_SCALES) {
                moe_copy_row((u8*)p.scales + (u64)b * p.scale_bytes, scales, p.scale_bytes);
            } else if (p.scale_mode == MOE_BATCHED_SWIZZLED_SCALES) {
                const u32 li = (u32)b / (u32)p.rows, i = (u32)b % (u32)p.rows;
                u8* matrix = (u8*)p.scales + li * matrix_bytes;
                for (u32 c = threadIdx.x; c < cols; c += blockDim.x) {
                    matrix[moe_swizzled_offset_128x4(i, c, cols)] = scales[c];
                }
            }
        }
    }
}

// Mirrors `ReduceParams` in crates/moe-kernels/src/batched.rs (repr(C)).
struct ReduceParams {
    // [local_experts, rows, hidden] bf16 / fp16, the experts' weighted rows.
    u64 expert_output;
    // Row r of the result at dst + r * dst_row_stride.
    u64 dst, dst_row_stride;
    // The delivery's [rows, top_k] batched row of each slot.
    u64 slot_row;
    i32 rows, top_k, hidden, bf16;
};
static_assert(sizeof(ReduceParams) == 48, "ReduceParams must match its Rust mirror");

__device__ __forceinline__ float moe_batched_to_f32(u16 h, bool bf16) {
    return bf16 ? moe_bf16_to_f32(h) : moe_fp16_to_f32(h);
}

__device__ __forceinline__ u16 moe_batched_from_f32(float v, bool bf16) {
    return bf16 ? moe_f32_to_bf16(v) : moe_f32_to_fp16(v);
}

// Any grid (one received row per block at a time), blockDim.x >= top_k. Row r of dst becomes
// the sum of its slots' batched rows in ascending batched-row order, which is the host's
// (expert, row) order; rows with no local slot become +0.0. 16-byte vectors when the hidden
// size, both addresses and the stride allow, 16-bit elements otherwise (2-byte aligned,
// checked by the host).
extern "C" __global__ void moe_batched_reduce(const ReduceParams p) {
    __shared__ i32 staged[MOE_BATCHED_MAX_TOP_K];
    __shared__ i32 order[MOE_BATCHED_MAX_TOP_K];
    const bool bf16 = p.bf16 != 0;
    const u64 row_bytes = (u64)p.hidden * 2;
    const bool vectors = p.hidden % 8 == 0 && (p.expert_output | p.dst | p.dst_row_stride) % 16 == 0;
    const u8* rows_in = (const u8*)p.expert_output;
    for (u32 r = blockIdx.x; r < (u32)p.rows; r += gridDim.x) {
        if (threadIdx.x < (u32)p.top_k) staged[threadIdx.x] = ((const i32*)p.slot_row)[(u64)r * p.top_k + threadIdx.x];
        __syncthreads();
        // Batched rows are distinct, so a slot's rank among the valid ones is its place in order.
        const i32 b = threadIdx.x < (u32)p.top_k ? staged[threadIdx.x] : -1;
        if (b >= 0) {
            u32 rank = 0;
            for (u32 j = 0; j < (u32)p.top_k; ++j) rank += staged[j] >= 0 && staged[j] < b;
            order[rank] = b;
        }
        // Also the barrier that publishes `order`.
        const u32 n = (u32)__syncthreads_count(b >= 0);
        u8* out = (u8*)p.dst + (u64)r * p.dst_row_stride;
        if (vectors) {
            for (u32 v = threadIdx.x; v < (u32)p.hidden / 8; v += blockDim.x) {
                float acc[8];
                for (int e = 0; e < 8; ++e) acc[e] = 0.0f;
                for (u32 s = 0; s < n; ++s) {
                    const uint4 x = ((const uint4*)(rows_in + (u64)order[s] * row_bytes))[v];
                    const u32 words[4] = {x.x, x.y, x.z, x.w};
                    for (int e = 0; e < 8; ++e) {
                        const u16 h = (u16)(words[e / 2] >> (16 * (e % 2)));
                        acc[e] = __fadd_rn(acc[e], moe_batched_to_f32(h, bf16));
                    }
                }
                u32 packed[4];
                for (int w = 0; w < 4; ++w) {
                    packed[w] = (u32)moe_batched_from_f32(acc[2 * w], bf16) |
                                ((u32)moe_batched_from_f32(acc[2 * w + 1], bf16) << 16);
                }
                uint4 y;
                y.x = packed[0];
                y.y = packed[1];
                y.z = packed[2];
                y.w = packed[3];
                ((uint4*)out)[v] = y;
            }
        } else {
            for (u32 e = threadIdx.x; e < (u32)p.hidden; e += blockDim.x) {
                float acc = 0.0f;
                for (u32 s = 0; s < n; ++s) {
                    const u16 h = ((const u16*)(rows_in + (u64)order[s] * row_bytes))[e];
                    acc = __fadd_rn(acc, moe_batched_to_f32(h, bf16));
                }
                ((u16*)out)[e] = moe_batched_from_f32(acc, bf16);
            }
        }
        // `staged` and `order` are rewritten for the block's next row.
        __syncthreads();
    }
}
