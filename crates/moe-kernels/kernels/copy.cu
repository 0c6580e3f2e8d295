// copy.cu: plain copies: the peer-copy ceiling the communication kernels are measured against,
// and the delivery of received slots as the Standard format's tensors.

// 16-byte vector copies from
// local memory into a peer's, on the grid the caller chooses (the same as the kernel it measures).
extern "C" __global__ void moe_copy_16b(const uint4* __restrict__ src, uint4* __restrict__ dst, u64 vecs) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < vecs; i += (u64)gridDim.x * blockDim.x)
        dst[i] = src[i];
}

// Mirrors `DeliverParams` in crates/moe-kernels/src/deliver.rs (repr(C)).
struct DeliverParams {
    u64 slots;  // received slots (DispatchLayout): row r at slots + r * slot_bytes
    u64 counts;  // u32 rows each source sent, `counts_stride` words apart
    u64 payload, scales, ids, weights;  // [rows, payload_bytes], [rows, scale_bytes], [rows, top_k] x2
    u64 owner;  // [num_experts] i32: the EP rank of each expert
    u64 status, status_mirror;  // the rank's status word (u32[2]) and its host-mapped mirror
    i32 counts_stride, sources, segment, rows;
    i32 slot_bytes, payload_bytes, scales_offset, scale_bytes, ids_offset, weights_offset, top_k;
    i32 num_experts, me;
};
static_assert(sizeof(DeliverParams) == 128, "DeliverParams must match its Rust mirror in deliver.rs");

// The source of received row `r`: `r / segment`, or with segment 0 the source whose dense
// range holds it.
__device__ int moe_row_source(const DeliverParams& p, int r) {
    if (p.segment != 0) return r / p.segment;
    const u32* counts = (const u32*)p.counts;
    u32 end = 0;
    for (int s = 0; s < p.sources; ++s) {
        end += counts[(long long)s * p.counts_stride];
        if ((u32)r < end) return s;
    }
    return p.sources - 1;
}

// Grid: any, one row per block at a time. Turns the slots a dispatch left in this rank's
// workspace into the Standard delivery's separate tensors, as the host's ReceivedRows does:
// rows a source filled get their payload, scales, ids and weights; every other row is padding,
// ids -1 and weights 0 (its payload is unspecified and left alone). Rows are either `segment`
// per source (row s * segment + t, filled when t < count[s]) or, with segment 0, dense in
// source order (filled when r < the sum of the counts).
//
// A peer's ids are checked before the experts see them (as ReceivedRows::check_ids does on the
// host): each is -1 or an expert this rank owns. A row with any other id is delivered as
// padding, and the status records the source (MOE_CALL_CORRUPT, detail 1), so the call fails on
// this rank and its combine abandons it at every peer.
extern "C" __global__ void moe_deliver_standard(DeliverParams p) {
    __shared__ int s_filled_dense;
    __shared__ int s_foreign;
    const u32* counts = (const u32*)p.counts;
    const i32* owner = (const i32*)p.owner;
    if (p.segment == 0) {
        if (threadIdx.x == 0) {
            u32 total = 0;
            for (int s = 0; s < p.sources; ++s) total += counts[(long long)s * p.counts_stride];
            s_filled_dense = (int)total;
        }
        __syncthreads();
    }
    for (int r = blockIdx.x; r < p.rows; r += gridDim.x) {
        const bool filled = p.segment == 0
                                ? r < s_filled_dense
                                : (u32)(r % p.segment) < counts[(long long)(r / p.segment) * p.counts_stride];
        const u8* slot = (const u8*)p.slots + (long long)r * p.slot_bytes;
        if (threadIdx.x == 0) s_foreign = 0;
        __syncthreads();
        if (filled) {
            for (int j = threadIdx.x; j < p.top_k; j += blockDim.x) {
                const i32 id = ((const i32*)(slot + p.ids_offset))[j];
                if (id != -1 && (id < 0 || id >= p.num_experts || owner[id] != p.me)) s_foreign = 1;
            }
        }
        __syncthreads();
        const bool delivered = filled && s_foreign == 0;
        if (filled && !delivered && threadIdx.x == 0) {
            const u32 code = MOE_STATUS_CALL | MOE_CALL_CORRUPT << 24 | 1u << 8 | (u32)(moe_row_source(p, r) + 1);
            if (atomicCAS((u32*)p.status, 0u, code) == 0u) {
                *(volatile u32*)p.status_mirror = code;
                __threadfence_system();
            }
        }
        if (delivered) {
            moe_copy_row((u8*)p.payload + (long long)r * p.payload_bytes, slot, p.payload_bytes);
            moe_copy_row((u8*)p.scales + (long long)r * p.scale_bytes, slot + p.scales_offset, p.scale_bytes);
        }
        for (int j = threadIdx.x; j < p.top_k; j += blockDim.x) {
            i32 id = -1;
            float w = 0.0f;
            if (delivered) {
                id = ((const i32*)(slot + p.ids_offset))[j];
                w = ((const float*)(slot + p.weights_offset))[j];
            }
            ((i32*)p.ids)[(long long)r * p.top_k + j] = id;
            ((float*)p.weights)[(long long)r * p.top_k + j] = w;
        }
        // s_foreign is reset for the next row only after every thread has read it.
        __syncthreads();
    }
}
