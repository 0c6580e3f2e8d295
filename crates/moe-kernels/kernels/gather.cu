// gather.cu: the kernels of allgather-rs on GPUs, around NCCL's collectives (the backend's
// cuda.rs enqueues them, all on the rank's stream):
//
//   prepare   moe_gather_routing        this rank's top-k rows into its send buffers, the
//                                       unused rows as padding, ids checked
//             (moe_quantize_tokens, quant.cu: the tokens into the payload and scale buffers)
//             (NCCL all-gather of payload, scales, ids and weights over the dispatch group)
//             moe_gather_mask_foreign   EP only: ids other ranks own become -1, weight 0
//             (moe_swizzle_128x4, quant.cu: when the experts take swizzled scales)
//   finalize  moe_gather_widen          the experts' 16-bit rows to f32
//             (NCCL reduce-scatter, f32 sum)
//             moe_gather_narrow         this rank's rows back to the input dtype, into `out`
//
// The conversions between the 16-bit input dtypes and f32 are the host's, bit for bit: the
// host platform's allgather-rs widens with `Tensor::to_f32` and narrows with
// `Tensor::store_f32` (the `half` crate), which keep a NaN's sign and payload and set its quiet
// bit, where common.cuh's encoders (the quantization spec's) map every NaN to 0x7fff.
//
// Status: like the protocol kernels, the routing kernel records MOE_STATUS_BAD_ID | token for a
// top-k row with an id outside [0, num_experts) or listed twice (the host does not read device
// inputs, so the kernel checks them); the first one wins. That id is dropped (-1, weight 0),
// the rest of the call goes on unchanged on every rank.

#define MOE_STATUS_BAD_ID 0x40000000u

// ---------------------------------------------------------------------------------------------
// The host's conversions (the `half` crate's, used by moe_core::Tensor)
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ float moe_host_bf16_to_f32(u32 h) {
    // A NaN gets its quiet bit (0x40 of the bf16, bit 22 of the f32); everything else is exact.
    if ((h & 0x7fffu) > 0x7f80u) h |= 0x40u;
    return __uint_as_float(h << 16);
}

__device__ __forceinline__ float moe_host_fp16_to_f32(u32 h) {
    const u32 exp = (h >> 10) & 0x1fu;
    const u32 mant = h & 0x3ffu;
    // A NaN keeps its sign and payload (shifted up) with the quiet bit set.
    if (exp == 0x1fu && mant != 0u) return __uint_as_float(((h & 0x8000u) << 16) | 0x7fc00000u | (mant << 13));
    return moe_fp16_to_f32((u16)h);
}

__device__ __forceinline__ u32 moe_host_f32_to_bf16(float v) {
    const u32 b = __float_as_uint(v);
    // A NaN keeps its sign and top payload bits with the quiet bit set; the rest rounds to
    // nearest even as in common.cuh.
    if ((b & MOE_F32_ABS) > MOE_F32_INF) return (b >> 16) | 0x40u;
    return moe_f32_to_bf16(v);
}

__device__ __forceinline__ u32 moe_host_f32_to_fp16(float v) {
    const u32 b = __float_as_uint(v);
    if ((b & MOE_F32_ABS) > MOE_F32_INF) return ((b >> 16) & 0x8000u) | 0x7e00u | ((b & MOE_F32_MANT) >> 13);
    return moe_f32_to_fp16(v);
}

__device__ __forceinline__ float moe_host_widen(u32 h, int bf16) {
    return bf16 ? moe_host_bf16_to_f32(h) : moe_host_fp16_to_f32(h);
}

// The host sums a rank's rows starting from +0.0 (HostRank::reduce_scatter_sum), NCCL from the
// first rank's value: the two differ only in the sign of a zero (-0.0 + -0.0 is -0.0, while
// +0.0 + -0.0 + -0.0 is +0.0), and every zero sum is +0.0 on the host. NaNs pass unchanged.
__device__ __forceinline__ u32 moe_host_narrow(u32 bits, int bf16) {
    if ((bits & MOE_F32_ABS) == 0u) bits = 0u;
    const float v = __uint_as_float(bits);
    return bf16 ? moe_host_f32_to_bf16(v) : moe_host_f32_to_fp16(v);
}

// ---------------------------------------------------------------------------------------------
// prepare
// ---------------------------------------------------------------------------------------------

// Mirrors `RoutingParams` in crates/moe-kernels/src/gather.rs (repr(C)).
struct GatherRoutingParams {
    u64 ids;          // [n_tokens, top_k] i32: this rank's top-k ids (a device input or staged)
    u64 weights;      // [n_tokens, top_k] f32
    u64 out_ids;      // [max_tokens, top_k] i32: the send buffer
    u64 out_weights;  // [max_tokens, top_k] f32
    u64 status;       // u32: 0 or the first error (see the header)
    i32 n_tokens, pad_end, top_k, num_experts;
};
static_assert(sizeof(GatherRoutingParams) == 56, "GatherRoutingParams must match its Rust mirror in gather.rs");

// Grid: any, one thread per top-k entry of rows [0, pad_end) (grid-striding). Row t < n_tokens
// gets the input's row, with each id outside [0, num_experts) or equal to an earlier id of its
// row replaced by -1 / 0.0 (and recorded); rows [n_tokens, pad_end) become padding (-1 / 0.0).
// The caller passes the rows an earlier call may have filled as pad_end, so the rows above it
// are padding already.
extern "C" __global__ void moe_gather_routing(GatherRoutingParams p) {
    const i32* ids = (const i32*)p.ids;
    const float* weights = (const float*)p.weights;
    const u64 entries = (u64)p.pad_end * (u64)p.top_k;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < entries; i += (u64)gridDim.x * blockDim.x) {
        const int t = (int)(i / (u64)p.top_k);
        const int k = (int)(i % (u64)p.top_k);
        i32 id = -1;
        float w = 0.0f;
        if (t < p.n_tokens) {
            const i32 e = ids[i];
            bool valid = e >= 0 && e < p.num_experts;
            for (int j = 0; j < k; ++j) valid = valid && ids[i - k + j] != e;
            if (valid) {
                id = e;
                w = weights[i];
            } else {
                atomicCAS((u32*)p.status, 0u, MOE_STATUS_BAD_ID | (u32)t);
            }
        }
        ((i32*)p.out_ids)[i] = id;
        ((float*)p.out_weights)[i] = w;
    }
}

// Mirrors `MaskParams` in crates/moe-kernels/src/gather.rs (repr(C)).
struct GatherMaskParams {
    u64 ids;      // [entries] i32, the gathered top-k ids, rewritten in place
    u64 weights;  // [entries] f32
    u64 owner;    // [num_experts] i32: the EP rank of each expert
    u64 entries;
    i32 num_experts, rank;
};
static_assert(sizeof(GatherMaskParams) == 40, "GatherMaskParams must match its Rust mirror in gather.rs");

// Grid: any, one thread per entry (grid-striding). The id convention for `rank`, as
// moe_core::routing::mask_foreign: an id below 0 or of an expert another rank owns becomes -1
// with weight 0.0. (Ids at or above num_experts cannot arrive, the routing kernel drops them;
// they are masked too rather than read out of `owner`.)
extern "C" __global__ void moe_gather_mask_foreign(GatherMaskParams p) {
    i32* ids = (i32*)p.ids;
    const i32* owner = (const i32*)p.owner;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < p.entries; i += (u64)gridDim.x * blockDim.x) {
        const i32 e = ids[i];
        if (e < 0 || e >= p.num_experts || owner[e] != p.rank) {
            ids[i] = -1;
            ((float*)p.weights)[i] = 0.0f;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// finalize
// ---------------------------------------------------------------------------------------------

// Grid: any (grid-striding). dst[i] = src[i] widened to f32 as the host does, for i < count;
// 16-bit values are bf16 (`bf16` != 0) or fp16. 16-byte vectors (8 values in, 8 out) when both
// addresses allow, then one value per thread for the rest.
extern "C" __global__ void moe_gather_widen(const u16* __restrict__ src, u32* __restrict__ dst, u64 count, int bf16) {
    const u64 first = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    u64 done = 0;
    if (((u64)src | (u64)dst) % 16 == 0) {
        const u64 vecs = count / 8;
        for (u64 v = first; v < vecs; v += stride) {
            const uint4 in = ((const uint4*)src)[v];
            const u32 h[4] = {in.x, in.y, in.z, in.w};
            u32 f[8];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                f[2 * j] = __float_as_uint(moe_host_widen(h[j] & 0xffffu, bf16));
                f[2 * j + 1] = __float_as_uint(moe_host_widen(h[j] >> 16, bf16));
            }
            ((uint4*)dst)[2 * v] = make_uint4(f[0], f[1], f[2], f[3]);
            ((uint4*)dst)[2 * v + 1] = make_uint4(f[4], f[5], f[6], f[7]);
        }
        done = vecs * 8;
    }
    for (u64 i = done + first; i < count; i += stride) dst[i] = __float_as_uint(moe_host_widen(src[i], bf16));
}

// Grid: any (grid-striding). dst[i] = src[i] (f32 bits) rounded to the 16-bit dtype as the host
// does, for i < count (see moe_host_narrow). 16-byte vectors when both addresses allow.
extern "C" __global__ void moe_gather_narrow(const u32* __restrict__ src, u16* __restrict__ dst, u64 count, int bf16) {
    const u64 first = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    u64 done = 0;
    if (((u64)src | (u64)dst) % 16 == 0) {
        const u64 vecs = count / 8;
        for (u64 v = first; v < vecs; v += stride) {
            const uint4 a = ((const uint4*)src)[2 * v];
            const uint4 b = ((const uint4*)src)[2 * v + 1];
            const u32 f[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
            u32 h[4];
#pragma unroll
            for (int j = 0; j < 4; ++j) h[j] = moe_host_narrow(f[2 * j], bf16) | (moe_host_narrow(f[2 * j + 1], bf16) << 16);
            ((uint4*)dst)[v] = make_uint4(h[0], h[1], h[2], h[3]);
        }
        done = vecs * 8;
    }
    for (u64 i = done + first; i < count; i += stride) dst[i] = (u16)moe_host_narrow(src[i], bf16);
}
