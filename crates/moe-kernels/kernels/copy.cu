// copy.cu: the peer-copy ceiling the communication kernels are measured against.

// 16-byte vector copies from
// local memory into a peer's, on the grid the caller chooses (the same as the kernel it measures).
extern "C" __global__ void moe_copy_16b(const uint4* __restrict__ src, uint4* __restrict__ dst, u64 vecs) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < vecs; i += (u64)gridDim.x * blockDim.x)
        dst[i] = src[i];
}
