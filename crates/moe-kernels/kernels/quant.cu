// quant.cu: the GPU token quantization kernel (the device functions are in quant.cuh) and the
// 128x4 scale swizzle (docs/QUANT_SPEC.md section 5).

// Batch entry b of a block's pass is token first + b * step.
struct StridedTokens {
    u32 first, step;
    __device__ __forceinline__ u64 token(u32 b) const { return (u64)first + (u64)b * step; }
};

struct StridedRows {
    const u16* x;
    StridedTokens tokens;
    __device__ __forceinline__ const u16* operator()(u32 b) const { return x + tokens.token(b) * kHidden; }
};

struct StridedSink {
    u8* payload_base;
    u8* scales_base;
    u64 payload_stride, scale_stride;
    StridedTokens tokens;
    __device__ __forceinline__ void payload(u32 b, u32 offset, const u32 (&w)[4], u32 bytes) const {
        moe_store_words(payload_base + tokens.token(b) * payload_stride + offset, w, bytes);
    }
    __device__ __forceinline__ void scales(u32 b, u32 offset, const u32 (&w)[4], u32 bytes) const {
        moe_store_words(scales_base + tokens.token(b) * scale_stride + offset, w, bytes);
    }
};

// Quantizes n_tokens tokens of MOE_HIDDEN 16-bit elements (x, row-major) into payload bytes
// (token t at payload + t * payload_stride, kPayloadBytes of them) and scale bytes (token t at
// scales + t * scale_stride, kScaleBytes of them; scales is not touched for schemes without
// scales). Every payload and scale byte of a token is written; bytes between a token's bytes
// and the next stride are not. A block takes tokens blockIdx.x, blockIdx.x + gridDim.x, ... in
// batches of moe_batch_tokens(); blockDim.x any multiple of 32 up to 1024. fp8_static_scale is
// used by scheme 2 only, nvfp4_global_scale by scheme 5 only; the host validates them (spec
// 3.2, 3.5).
extern "C" __global__ void moe_quantize_tokens(const u16* __restrict__ x, int n_tokens,
                                               u8* __restrict__ payload, int payload_stride,
                                               u8* __restrict__ scales, int scale_stride,
                                               float fp8_static_scale, float nvfp4_global_scale) {
    const u32 per_pass = moe_batch_tokens();
    for (u32 first = blockIdx.x; first < (u32)n_tokens; first += gridDim.x * per_pass) {
        const u32 count = moe_batch_count(first, (u32)n_tokens, per_pass);
        const StridedTokens tokens{first, gridDim.x};
        const StridedSink sink{payload, scales, (u64)(u32)payload_stride, (u64)(u32)scale_stride, tokens};
        moe_quantize_batch(StridedRows{x, tokens}, count, sink, fp8_static_scale, nvfp4_global_scale);
    }
}

// The 128x4 layout of spec section 5 (moe_quant::swizzle): the [rows, cols] byte matrix
// `linear`, padded with zeros to [round_up(rows, 128), round_up(cols, 4)], stored as 512-byte
// tiles of 128 rows x 4 columns, row tiles outermost, where row r and column c of a tile sit at
// (r % 32) * 16 + (r / 32) * 4 + c. Each thread walks output bytes (grid-stride) and reads the
// element the byte holds, or writes 0 for padding, so every output byte is written exactly once.
// Any grid and block shape.
extern "C" __global__ void moe_swizzle_128x4(const u8* __restrict__ linear, int rows, int cols,
                                             u8* __restrict__ out) {
    const u64 col_tiles = ((u64)cols + 3) / 4;
    const u64 row_tile_bytes = col_tiles * 512;
    const u64 total = ((u64)rows + 127) / 128 * row_tile_bytes;
    for (u64 o = (u64)blockIdx.x * blockDim.x + threadIdx.x; o < total;
         o += (u64)gridDim.x * blockDim.x) {
        const u64 in_tile = o % 512;
        const u64 row = o / row_tile_bytes * 128 + (in_tile % 16) / 4 * 32 + in_tile / 16;
        const u64 col = o % row_tile_bytes / 512 * 4 + in_tile % 4;
        out[o] = row < (u64)rows && col < (u64)cols ? linear[row * (u64)cols + col] : 0;
    }
}
