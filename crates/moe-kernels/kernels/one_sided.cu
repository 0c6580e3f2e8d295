// one_sided.cu: the nvlink-one-sided protocol on GPUs (the host platform runs the same one in
// backend-nvlink-one-sided; the workspace layout and slot layout come from the Rust side as
// byte offsets, so both platforms use one layout).
//
// A call is: begin (round += 1, counters = 0), dispatch, [experts], begin, combine_stage,
// combine_pull, all on the rank's stream, so no step needs the host: the round lives in device
// memory and a CUDA graph of the sequence replays correctly.
//
// Ordering: data stores to a peer, then __threadfence_system() in every block before it counts
// itself done; the last block then stores the counts (relaxed) and, after a system fence, the
// flag with st.release.sys. Waiters load flags with ld.acquire.sys. Every wait is bounded: on
// timeout the waiter records `peer + 1` in the status word and returns, and the host reports
// the rank instead of hanging.

#define MOE_MAX_RANKS 64
#define MOE_MAX_TOPK 32

// Mirrors `OneSidedParams` in crates/moe-kernels/src/one_sided.rs (repr(C)).
struct OneSidedParams {
    u64 peers[MOE_MAX_RANKS];  // base of every rank's workspace, peer-mapped
    i32 ep, me, max_tokens, n_tokens, top_k, hidden, input_bf16;
    i32 slot_bytes, image_bytes, weights_offset;  // DispatchLayout: image = payload + scales
    i32 combine_slot_bytes, combine_row_bytes;
    i32 round_off, recv_count_off, dispatch_flag_off, combine_flag_off;
    i32 dispatch_region_off, combine_region_off;
    u64 images;       // [n_tokens, image_bytes] quantized tokens (payload then scales)
    u64 ids;          // [n_tokens, top_k] i32
    u64 weights;      // [n_tokens, top_k] f32
    u64 owner;        // [num_experts] i32: EP rank of each expert
    u64 send_target;  // [max_tokens, top_k] i32, written by dispatch for combine
    u64 send_slot;    // [max_tokens, top_k] i32: slot at the target, -1 when not sent
    u64 counters;     // [ep + 1] u32: per-target send counters, then blocks done
    u64 status;       // u32: 0, or 1 + the peer a wait timed out on
    u64 expert_out;   // [ep * max_tokens, hidden] 16-bit: the experts' rows
    u64 out;          // [n_tokens, hidden] 16-bit: the combined output
    long long timeout_cycles;
};

__device__ __forceinline__ u32 moe_ld_acquire_sys(const u32* p) {
    u32 v;
    asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ void moe_st_release_sys(u32* p, u32 v) {
    asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ void moe_st_relaxed_sys(u32* p, u32 v) {
    asm volatile("st.relaxed.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ u8* moe_at(u64 base, long long offset) { return (u8*)base + offset; }

// Waits until *flag == value, for at most timeout_cycles; on timeout (or when another waiter
// already timed out) records the peer and returns false.
__device__ bool moe_wait_flag(const u32* flag, u32 value, int peer, const OneSidedParams& p) {
    u32* status = (u32*)p.status;
    long long start = clock64();
    while (moe_ld_acquire_sys(flag) != value) {
        if (*(volatile u32*)status != 0u) return false;
        if (clock64() - start > p.timeout_cycles) {
            atomicCAS(status, 0u, (u32)(peer + 1));
            return false;
        }
    }
    return true;
}

__device__ __forceinline__ u32 moe_round(const OneSidedParams& p) {
    return *(volatile u32*)moe_at(p.peers[p.me], p.round_off);
}

// One block: a new round and zeroed counters.
extern "C" __global__ void moe_one_sided_begin(OneSidedParams p) {
    u32* counters = (u32*)p.counters;
    for (int i = threadIdx.x; i <= p.ep; i += blockDim.x) counters[i] = 0u;
    if (threadIdx.x == 0) {
        u32* round = (u32*)moe_at(p.peers[p.me], p.round_off);
        *round = *round + 1u;
    }
}

// Counts this block done; returns true in the block that finishes last. Every block's stores
// are fenced at system scope first, so the last block's later release covers all of them.
__device__ bool moe_last_block(const OneSidedParams& p) {
    __shared__ bool last;
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence_system();
        u32 done = atomicAdd((u32*)p.counters + p.ep, 1u);
        last = (done == gridDim.x - 1);
    }
    __syncthreads();
    return last;
}

// Grid: max(n_tokens, 1) blocks (a rank without tokens still publishes its zero counts).
extern "C" __global__ void moe_one_sided_dispatch(OneSidedParams p) {
    __shared__ i32 s_target[MOE_MAX_TOPK];
    __shared__ i32 s_slot[MOE_MAX_TOPK];
    const i32* ids = (const i32*)p.ids;
    const float* weights = (const float*)p.weights;
    const i32* owner = (const i32*)p.owner;
    u32* counters = (u32*)p.counters;
    const int k_n = p.top_k;
    // ids, then weights, each padded to 16 bytes (DispatchLayout).
    const int tail_words = ((k_n * 4 + 15) / 16) * 4;
    for (int t = blockIdx.x; t < p.n_tokens; t += gridDim.x) {
        if (threadIdx.x < k_n) {
            const int k = threadIdx.x;
            const int target = owner[ids[t * k_n + k]];
            bool first = true;
            for (int j = 0; j < k; ++j) first = first && owner[ids[t * k_n + j]] != target;
            const int slot = first ? (int)atomicAdd(&counters[target], 1u) : -1;
            s_target[k] = target;
            s_slot[k] = slot;
            ((i32*)p.send_target)[t * k_n + k] = target;
            ((i32*)p.send_slot)[t * k_n + k] = slot;
        }
        __syncthreads();
        const uint4* src = (const uint4*)moe_at(p.images, (long long)t * p.image_bytes);
        const int vecs = p.image_bytes / 16;
        for (int k = 0; k < k_n; ++k) {
            const int slot = s_slot[k];
            if (slot < 0) continue;
            const int target = s_target[k];
            u8* dst = moe_at(p.peers[target],
                             p.dispatch_region_off + ((long long)p.me * p.max_tokens + slot) * p.slot_bytes);
            uint4* d = (uint4*)dst;
            for (int v = threadIdx.x; v < vecs; v += blockDim.x) d[v] = src[v];
            // The receiver gets -1 / 0.0 for experts it does not own (the contract's convention).
            i32* tail_ids = (i32*)(dst + p.image_bytes);
            float* tail_w = (float*)(dst + p.weights_offset);
            for (int j = threadIdx.x; j < tail_words; j += blockDim.x) {
                i32 id = j < k_n ? -1 : 0;
                float w = 0.0f;
                if (j < k_n) {
                    const i32 e = ids[t * k_n + j];
                    if (owner[e] == target) {
                        id = e;
                        w = weights[t * k_n + j];
                    }
                }
                tail_ids[j] = id;
                tail_w[j] = w;
            }
        }
        __syncthreads();
    }
    if (!moe_last_block(p)) return;
    const u32 round = moe_round(p);
    for (int peer = threadIdx.x; peer < p.ep; peer += blockDim.x) {
        const u32 count = atomicAdd(&counters[peer], 0u);
        moe_st_relaxed_sys((u32*)moe_at(p.peers[peer], p.recv_count_off + 4 * p.me), count);
    }
    __syncthreads();
    __threadfence_system();
    for (int peer = threadIdx.x; peer < p.ep; peer += blockDim.x)
        moe_st_release_sys((u32*)moe_at(p.peers[peer], p.dispatch_flag_off + 4 * p.me), round);
    for (int peer = threadIdx.x; peer < p.ep; peer += blockDim.x)
        moe_wait_flag((const u32*)moe_at(p.peers[p.me], p.dispatch_flag_off + 4 * peer), round, peer, p);
}

// Grid: any. Copies the experts' row of every received token into this rank's combine region
// at the (source, slot) it arrived in, then tells every peer its rows are staged.
extern "C" __global__ void moe_one_sided_combine_stage(OneSidedParams p) {
    u8* ws = (u8*)p.peers[p.me];
    const int rows = p.ep * p.max_tokens;
    const int vecs = p.combine_row_bytes / 16;
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        const int s = r / p.max_tokens, t = r % p.max_tokens;
        const u32 count = *(volatile u32*)(ws + p.recv_count_off + 4 * s);
        if ((u32)t >= count) continue;
        const uint4* src = (const uint4*)moe_at(p.expert_out, (long long)r * p.combine_row_bytes);
        uint4* dst = (uint4*)(ws + p.combine_region_off + (long long)r * p.combine_slot_bytes);
        for (int v = threadIdx.x; v < vecs; v += blockDim.x) dst[v] = src[v];
    }
    if (!moe_last_block(p)) return;
    const u32 round = moe_round(p);
    __threadfence_system();
    for (int peer = threadIdx.x; peer < p.ep; peer += blockDim.x)
        moe_st_release_sys((u32*)moe_at(p.peers[peer], p.combine_flag_off + 4 * p.me), round);
}

__device__ __forceinline__ float moe_half_to_f32(u16 h, int bf16) {
    return bf16 ? moe_bf16_to_f32(h) : moe_fp16_to_f32(h);
}

__device__ __forceinline__ u16 moe_f32_to_half(float v, int bf16) {
    return bf16 ? moe_f32_to_bf16(v) : moe_f32_to_fp16(v);
}

// Vectors each thread of combine_pull loads before it adds: loads over NVLink take microseconds,
// so throughput comes from many in flight, not from one per thread.
#define MOE_PULL_UNROLL 4

// Grid: any (more blocks keep more remote loads in flight). Waits for every peer's staged
// rows, then sums each token's rows from the ranks it went to in f32, in ascending top-k order
// (bitwise reproducible, and the same order as the host platform), and writes the input dtype.
// Work items are (token, group of vectors); a group's vectors are `groups` apart so that
// neighbouring threads read neighbouring 16-byte vectors.
extern "C" __global__ void moe_one_sided_combine_pull(OneSidedParams p) {
    __shared__ int ok;
    if (threadIdx.x == 0) ok = 1;
    __syncthreads();
    const u32 round = moe_round(p);
    for (int peer = threadIdx.x; peer < p.ep; peer += blockDim.x)
        if (!moe_wait_flag((const u32*)moe_at(p.peers[p.me], p.combine_flag_off + 4 * peer), round, peer, p))
            ok = 0;
    __syncthreads();
    if (!ok) return;
    asm volatile("fence.acq_rel.sys;" ::: "memory");
    const i32* send_target = (const i32*)p.send_target;
    const i32* send_slot = (const i32*)p.send_slot;
    const int vecs = p.hidden / 8;  // 8 16-bit elements per 16-byte vector
    const int groups = (vecs + MOE_PULL_UNROLL - 1) / MOE_PULL_UNROLL;
    const long long items = (long long)p.n_tokens * groups;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long item = (long long)blockIdx.x * blockDim.x + threadIdx.x; item < items; item += stride) {
        const int t = (int)(item / groups), g = (int)(item % groups);
        float acc[MOE_PULL_UNROLL][8];
        for (int u = 0; u < MOE_PULL_UNROLL; ++u)
            for (int j = 0; j < 8; ++j) acc[u][j] = 0.0f;
        for (int k = 0; k < p.top_k; ++k) {
            const int slot = send_slot[t * p.top_k + k];
            if (slot < 0) continue;
            const int target = send_target[t * p.top_k + k];
            const uint4* row = (const uint4*)moe_at(
                p.peers[target],
                p.combine_region_off + ((long long)p.me * p.max_tokens + slot) * p.combine_slot_bytes);
            uint4 x[MOE_PULL_UNROLL];
            for (int u = 0; u < MOE_PULL_UNROLL; ++u) {
                const int v = g + u * groups;
                x[u] = v < vecs ? row[v] : make_uint4(0u, 0u, 0u, 0u);
            }
            for (int u = 0; u < MOE_PULL_UNROLL; ++u) {
                const u32 w[4] = {x[u].x, x[u].y, x[u].z, x[u].w};
                for (int j = 0; j < 8; ++j) {
                    const u16 h = (u16)(w[j / 2] >> (16 * (j % 2)));
                    acc[u][j] = __fadd_rn(acc[u][j], moe_half_to_f32(h, p.input_bf16));
                }
            }
        }
        uint4* out = (uint4*)moe_at(p.out, (long long)t * p.hidden * 2);
        for (int u = 0; u < MOE_PULL_UNROLL; ++u) {
            const int v = g + u * groups;
            if (v >= vecs) continue;
            u32 packed[4];
            for (int j = 0; j < 4; ++j)
                packed[j] = (u32)moe_f32_to_half(acc[u][2 * j], p.input_bf16) |
                            ((u32)moe_f32_to_half(acc[u][2 * j + 1], p.input_bf16) << 16);
            out[v] = make_uint4(packed[0], packed[1], packed[2], packed[3]);
        }
    }
}

// The peer-copy ceiling the one-sided kernels are measured against: 16-byte vector copies from
// local memory into a peer's, with the same grid settings as dispatch.
extern "C" __global__ void moe_copy_16b(const uint4* __restrict__ src, uint4* __restrict__ dst, u64 vecs) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < vecs; i += (u64)gridDim.x * blockDim.x)
        dst[i] = src[i];
}
