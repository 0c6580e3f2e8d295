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
    i32 counts_stride, sources, segment, rows;
    i32 slot_bytes, payload_bytes, scales_offset, scale_bytes, ids_offset, weights_offset, top_k;
};
static_assert(sizeof(DeliverParams) == 96, "DeliverParams must match its Rust mirror in deliver.rs");

// Grid: any, one row per block at a time. Turns the slots a dispatch left in this rank's
// workspace into the Standard delivery's separate tensors, as the host's ReceivedRows does:
// rows a source filled get their payload, scales, ids and weights; every other row is padding,
// ids -1 and weights 0 (its payload is unspecified and left alone). Rows are either `segment`
// per source (row s * segment + t, filled when t < count[s]) or, with segment 0, dense in
// source order (filled when r < the sum of the counts).
extern "C" __global__ void moe_deliver_standard(DeliverParams p) {
    __shared__ int s_filled_dense;
    const u32* counts = (const u32*)p.counts;
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
        if (filled) {
            moe_copy_row((u8*)p.payload + (long long)r * p.payload_bytes, slot, p.payload_bytes);
            moe_copy_row((u8*)p.scales + (long long)r * p.scale_bytes, slot + p.scales_offset, p.scale_bytes);
        }
        for (int j = threadIdx.x; j < p.top_k; j += blockDim.x) {
            i32 id = -1;
            float w = 0.0f;
            if (filled) {
                id = ((const i32*)(slot + p.ids_offset))[j];
                w = ((const float*)(slot + p.weights_offset))[j];
            }
            ((i32*)p.ids)[(long long)r * p.top_k + j] = id;
            ((float*)p.weights)[(long long)r * p.top_k + j] = w;
        }
    }
}
