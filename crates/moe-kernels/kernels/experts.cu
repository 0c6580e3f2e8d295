// experts.cu: the diagonal reference experts (moe_core::experts::DiagonalExperts run by
// ReferenceExperts, y = d_e * x + b_e on the rank's shard of the hidden dimension) on the GPU,
// reading what a GPU backend delivered in place, bit-identical with the host experts.
//
// Compiled after common.cuh, and after quant.cuh when the experts quantize themselves,
// specialized by -D:
//   MOE_WIRE_SCHEME  index in QuantScheme::ALL of the received rows' scheme
//   MOE_HIDDEN       elements per row
//   MOE_REQUANTIZE   1: the rows are bf16 / fp16 from a deferred dispatch and the experts own
//                    quantization, so each row is quantized to quant.cuh's MOE_SCHEME and back
//                    before the experts read it (ReferenceExperts::decode_rows); MOE_INPUT_BF16
//                    then names the received 16-bit type. 0: rows are dequantized as received.
//
// Bit-exactness: the host computes in f32 with Rust operators, which never contract into an
// FMA. Here every operation is an explicit round-to-nearest intrinsic, applied in the host's
// order, so the results do not depend on compiler flags. NaN payloads are not reproduced (the
// GPU's arithmetic makes its own NaN): a NaN stays a NaN.

#if !defined(MOE_WIRE_SCHEME) || !defined(MOE_HIDDEN) || !defined(MOE_REQUANTIZE)
#error "experts.cu needs -DMOE_WIRE_SCHEME, -DMOE_HIDDEN and -DMOE_REQUANTIZE"
#endif

constexpr u32 kWire = MOE_WIRE_SCHEME;
constexpr u32 kRowElems = MOE_HIDDEN;

static_assert(moe_layout_valid(kWire, kRowElems),
              "MOE_WIRE_SCHEME must be 0..=6 and MOE_HIDDEN a positive multiple of its block "
              "(QuantScheme::wire_layout)");

constexpr u32 kWirePayloadBytes = moe_payload_bytes(kWire, kRowElems);
constexpr u32 kWireScaleBytes = moe_scale_bytes(kWire, kRowElems);
// Bytes of one scale: f32 for the two dynamic fp8 schemes, one e4m3 / e8m0 byte otherwise.
__host__ __device__ constexpr u32 moe_scale_size(u32 scheme) {
    return scheme == MOE_SCHEME_FP8_PER_TOKEN || scheme == MOE_SCHEME_FP8_BLOCK128 ? 4u : 1u;
}
constexpr u32 kWireScalesPerRow = kWireScaleBytes / moe_scale_size(kWire);

#if MOE_REQUANTIZE
static_assert(kWire == (kInputBf16 ? MOE_SCHEME_BF16 : MOE_SCHEME_FP16) && kHidden == kRowElems,
              "requantization reads the received 16-bit row as quant.cuh's input row");
#endif

// Slots of one Standard row the kernel stages in shared memory; the host checks top_k.
#define MOE_EXPERTS_MAX_TOP_K 64

// The kernels' parameter block, passed by value; mirrors `ExpertsParams` in experts.rs field
// for field. Tensors are row-major; a format's unused pointers are null.
struct ExpertsParams {
    // Received payload: row r of matrix m at byte (m * rows + r) * kWirePayloadBytes.
    const u8* payload;
    // Received scales: linear rows of kWireScaleBytes, or each matrix of `rows` rows in the
    // 128x4 swizzle (`swizzled`), matrix m at m * swizzled_len(rows, kWireScalesPerRow).
    const u8* scales;
    // Standard: [rows, top_k] global expert ids and router weights.
    const i32* ids;
    // Standard: [rows, top_k]; BatchedExperts: [matrices, rows], one weight per row.
    const float* weights;
    // BatchedExperts: [matrices] rows filled per local expert.
    const i32* counts;
    // [local experts, kRowElems] diagonal and bias, in local-index order.
    const float* expert_scale;
    const float* expert_bias;
    // [num_experts]: local index of each global expert, -1 where this rank does not compute it.
    const i32* local_of;
    // [matrices * rows, kRowElems] in the input dtype.
    u16* out;
    // The lowest violation key of the id convention (see report_violation); u64 max when none.
    u64* status;
    // Rows per matrix: all rows (Standard), or rows per local expert (BatchedExperts).
    i32 rows;
    // 1 (Standard) or the number of local experts (BatchedExperts).
    i32 matrices;
    i32 top_k;
    i32 num_experts;
    i32 swizzled;
    i32 out_bf16;
    // The shard's range of the hidden dimension, [shard_begin, shard_end).
    i32 shard_begin;
    i32 shard_end;
    float fp8_static_scale;
    float nvfp4_global_scale;
};
static_assert(sizeof(ExpertsParams) == 120, "ExpertsParams must match its Rust mirror in experts.rs");

// ---------------------------------------------------------------------------------------------
// Decoding (moe_quant::dequantize_token, element by element)
// ---------------------------------------------------------------------------------------------

// Little-endian loads byte by byte: rows and scales sit at any byte offset of their tensors.
__device__ __forceinline__ u32 load_u16_le(const u8* p) { return (u32)p[0] | ((u32)p[1] << 8); }

__device__ __forceinline__ float load_f32_le(const u8* p) {
    return __uint_as_float((u32)p[0] | ((u32)p[1] << 8) | ((u32)p[2] << 16) | ((u32)p[3] << 24));
}

// Exact decode of an e2m1 nibble (spec 2.2): magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6. From code 2
// on, code m is 2^((m >> 1) - 1) * (1 + (m & 1) / 2); code 1 is 0.5; the sign is bit 3.
__device__ __forceinline__ float moe_e2m1_to_f32(u32 code) {
    const u32 m = code & 7u;
    const u32 mag = m >= 2 ? (((m >> 1) + 126u) << 23) | ((m & 1u) << 22) : m == 1 ? 0x3f000000u : 0u;
    return __uint_as_float(mag | ((code & 8u) << 28));
}

// Exact decode of every e8m0 code, 255 included, which is NaN (spec 2.3; common.cuh's decoder
// covers the codes an encoder writes, 0..=254).
__device__ __forceinline__ float moe_e8m0_code_to_f32(u32 code) {
    return code == 255u ? __uint_as_float(0x7fc00000u) : moe_e8m0_to_f32(code);
}

// Element i of a row of SCHEME (HIDDEN elements) with payload `q`, where scale_at(b) is the
// first byte of the row's b-th scale: moe_quant::dequantize_token's value for that element,
// with its operations in its order.
template <u32 SCHEME, u32 HIDDEN, class ScaleAt>
__device__ __forceinline__ float dequantize_element(const u8* q, const ScaleAt& scale_at, u32 i,
                                                    float fp8_static_scale, float nvfp4_global_scale) {
    if constexpr (SCHEME == MOE_SCHEME_BF16) {
        return moe_bf16_to_f32((u16)load_u16_le(q + 2 * i));
    } else if constexpr (SCHEME == MOE_SCHEME_FP16) {
        return moe_fp16_to_f32((u16)load_u16_le(q + 2 * i));
    } else if constexpr (SCHEME == MOE_SCHEME_NVFP4) {
        // Element 2j in the low nibble of byte j, 2j + 1 in the high nibble; (e2m1 * sf) / gs.
        const u32 byte = q[i / 2];
        const u32 code = (i & 1u) ? byte >> 4 : byte & 0xfu;
        const float sf = moe_e4m3_to_f32(*scale_at(i / 16));
        return __fdiv_rn(__fmul_rn(moe_e2m1_to_f32(code), sf), nvfp4_global_scale);
    } else {
        // The e4m3 schemes: e4m3(q) * s, with s the static, f32 or e8m0 scale of the block.
        float s;
        if constexpr (SCHEME == MOE_SCHEME_FP8_PER_TENSOR) {
            s = fp8_static_scale;
        } else if constexpr (SCHEME == MOE_SCHEME_MXFP8) {
            s = moe_e8m0_code_to_f32(*scale_at(i / 32));
        } else {
            s = load_f32_le(scale_at(i / moe_scale_block(SCHEME, HIDDEN)));
        }
        return __fmul_rn(moe_e4m3_to_f32(q[i]), s);
    }
}

// The scales of received row r of matrix m, where the layout puts them.
struct WireScales {
    // Linear: the row's first scale byte. Swizzled: the matrix's first byte.
    const u8* base;
    u32 row;
    bool swizzled;

    __device__ __forceinline__ const u8* operator()(u32 b) const {
        return swizzled ? base + moe_swizzled_offset_128x4(row, b, kWireScalesPerRow)
                        : base + b * moe_scale_size(kWire);
    }
};

__device__ __forceinline__ WireScales wire_scales(const ExpertsParams& p, u32 m, u32 r) {
    if (p.swizzled) {
        const u64 matrix_bytes = moe_swizzled_len_128x4((u32)p.rows, kWireScalesPerRow);
        return WireScales{p.scales + m * matrix_bytes, r, true};
    }
    return WireScales{p.scales + ((u64)m * p.rows + r) * kWireScaleBytes, r, false};
}

// Where the experts read a row's elements from: `load` sets it up for row r of matrix m with the
// whole block (every thread calls it, with the same row), then `operator()` gives element i as
// ReferenceExperts::decode_rows computes it. `kShared`: the row lives in shared memory, so the
// block must synchronize before loading its next row.
#if MOE_REQUANTIZE
// The received row quantized to the experts' own scheme (quant.cuh's kScheme), then dequantized
// with that scheme element by element.
struct OwnRow {
    u8 payload[kPayloadBytes];
    u8 scales[kScaleBytes > 0 ? kScaleBytes : 1];
};

// The one row moe_quantize_batch reads, and where its bytes go.
struct OneRow {
    const u16* row;
    __device__ __forceinline__ const u16* operator()(u32) const { return row; }
};

struct OwnRowSink {
    OwnRow& own;
    __device__ __forceinline__ void payload(u32, u32 offset, const u32 (&w)[4], u32 bytes) const {
        moe_store_words(own.payload + offset, w, bytes);
    }
    __device__ __forceinline__ void scales(u32, u32 offset, const u32 (&w)[4], u32 bytes) const {
        moe_store_words(own.scales + offset, w, bytes);
    }
};

struct RowInput {
    static constexpr bool kShared = true;
    OwnRow& own;

    __device__ __forceinline__ void load(const ExpertsParams& p, u32 m, u32 r) {
        // Rows are 2 * kRowElems bytes apart and the host checked that the payload is 2-byte
        // aligned, so the row is a u16 array.
        const u8* row = p.payload + ((u64)m * (u32)p.rows + r) * kWirePayloadBytes;
        moe_quantize_batch(OneRow{reinterpret_cast<const u16*>(row)}, 1, OwnRowSink{own}, p.fp8_static_scale,
                           p.nvfp4_global_scale);
        __syncthreads();
    }

    __device__ __forceinline__ float operator()(const ExpertsParams& p, u32 i) const {
        const u8* scales = own.scales;
        const auto scale_at = [scales](u32 b) { return scales + b * moe_scale_size(kScheme); };
        return dequantize_element<kScheme, kRowElems>(own.payload, scale_at, i, p.fp8_static_scale,
                                                      p.nvfp4_global_scale);
    }
};
#else
// The received row, dequantized element by element where it lies.
struct RowInput {
    static constexpr bool kShared = false;
    const u8* row;
    WireScales scales;

    __device__ __forceinline__ void load(const ExpertsParams& p, u32 m, u32 r) {
        row = p.payload + ((u64)m * (u32)p.rows + r) * kWirePayloadBytes;
        scales = wire_scales(p, m, r);
    }

    __device__ __forceinline__ float operator()(const ExpertsParams& p, u32 i) const {
        return dequantize_element<kWire, kRowElems>(row, scales, i, p.fp8_static_scale, p.nvfp4_global_scale);
    }
};
#endif

// ---------------------------------------------------------------------------------------------
// The experts
// ---------------------------------------------------------------------------------------------

// DiagonalExperts::forward_shard at element i for local expert `local`: d * x + b inside the
// shard's range, 0 outside (the host's zero is then weighted and summed like any output).
__device__ __forceinline__ float expert_output(const ExpertsParams& p, i32 local, u32 i, float x) {
    if ((i32)i < p.shard_begin || (i32)i >= p.shard_end) return 0.0f;
    const u64 at = (u64)local * kRowElems + i;
    return __fadd_rn(__fmul_rn(p.expert_scale[at], x), p.expert_bias[at]);
}

// Tensor::store_f32 into the input dtype: round to nearest even.
__device__ __forceinline__ void store_output(const ExpertsParams& p, u64 at, float v) {
    p.out[at] = p.out_bf16 ? moe_f32_to_bf16(v) : moe_f32_to_fp16(v);
}

// Violations of the id convention (moe_core::contract), as the host experts name them.
#define MOE_VIOLATION_WEIGHTED_SKIP 0u  // an id below 0 whose weight is not 0.0
#define MOE_VIOLATION_NOT_LOCAL 1u      // an id of an expert this rank does not compute

// Keeps the violation the host experts would report, the first in (row, slot) order, whatever
// order the blocks run in: the key orders by row (bits 39..63, rows < 2^24), then slot (33..38,
// slots < 64), and carries the kind (bit 32) and the weight's bits or the id (0..31). At one
// (row, slot) there is one violation, so the minimum key is the first.
__device__ __forceinline__ void report_violation(u64* status, u32 row, u32 slot, u32 kind, u32 value) {
    atomicMin(status, ((u64)row << 39) | ((u64)slot << 33) | ((u64)kind << 32) | value);
}

// Standard format, one block per row (grid-striding): row r's output is the sum over its top-k
// slots in order, skipping ids below 0, of weight * forward_shard(expert, x_r), accumulated in
// f32 from 0 and stored in the input dtype. Rows without a slot this rank computes (padding)
// are zeros and their activations, which may be stale, are never read. A slot that breaks the
// id convention is reported through `status` and skipped. blockDim.x a multiple of 32.
extern "C" __global__ void moe_diagonal_experts_standard(const ExpertsParams p) {
    __shared__ i32 slot_local[MOE_EXPERTS_MAX_TOP_K];
    __shared__ float slot_weight[MOE_EXPERTS_MAX_TOP_K];
#if MOE_REQUANTIZE
    __shared__ OwnRow own;
    RowInput input{own};
#else
    RowInput input{};
#endif
    for (u32 row = blockIdx.x; row < (u32)p.rows; row += gridDim.x) {
        int any = 0;
        for (u32 j = threadIdx.x; j < (u32)p.top_k; j += blockDim.x) {
            const u64 at = (u64)row * (u32)p.top_k + j;
            const i32 id = p.ids[at];
            const float w = p.weights[at];
            i32 local = -1;
            if (id < 0) {
                // NaN weights are reported too: they compare unequal to 0.0, as on the host.
                if (w != 0.0f) report_violation(p.status, row, j, MOE_VIOLATION_WEIGHTED_SKIP, __float_as_uint(w));
            } else {
                if (id < p.num_experts) local = p.local_of[id];
                if (local < 0) report_violation(p.status, row, j, MOE_VIOLATION_NOT_LOCAL, (u32)id);
            }
            slot_local[j] = local;
            slot_weight[j] = w;
            any |= local >= 0;
        }
        // The barrier also publishes the slot tables; `compute` is uniform over the block.
        const bool compute = __syncthreads_or(any) != 0;
        if (compute) input.load(p, 0, row);
        for (u32 i = threadIdx.x; i < kRowElems; i += blockDim.x) {
            float acc = 0.0f;
            if (compute) {
                const float x = input(p, i);
                for (i32 j = 0; j < p.top_k; ++j) {
                    const i32 local = slot_local[j];
                    if (local < 0) continue;
                    acc = __fadd_rn(acc, __fmul_rn(slot_weight[j], expert_output(p, local, i, x)));
                }
            }
            store_output(p, (u64)row * kRowElems + i, acc);
        }
        // The slot tables (and a row input in shared memory) are rewritten for the next row.
        __syncthreads();
    }
}

// BatchedExperts format, one block per (local expert, row) (grid-striding): rows below the
// expert's count get weight * forward_shard(expert, x), the others zeros, whose activations
// and weights are never read. blockDim.x a multiple of 32.
extern "C" __global__ void moe_diagonal_experts_batched(const ExpertsParams p) {
#if MOE_REQUANTIZE
    __shared__ OwnRow own;
    RowInput input{own};
#else
    RowInput input{};
#endif
    const u32 total = (u32)p.matrices * (u32)p.rows;
    for (u32 row = blockIdx.x; row < total; row += gridDim.x) {
        const u32 local = row / (u32)p.rows;
        const u32 r = row % (u32)p.rows;
        // Unsigned like the host's `r < count as usize`, where a negative count sign-extends to
        // a huge one and covers every row. Uniform over the block.
        const bool compute = r < (u32)p.counts[local];
        if (compute) input.load(p, local, r);
        const float w = compute ? p.weights[row] : 0.0f;
        for (u32 i = threadIdx.x; i < kRowElems; i += blockDim.x) {
            float y = 0.0f;
            if (compute) {
                y = __fmul_rn(expert_output(p, (i32)local, i, input(p, i)), w);
            }
            store_output(p, (u64)row * kRowElems + i, y);
        }
        // A row input in shared memory is rewritten for the block's next row.
        if (RowInput::kShared) __syncthreads();
    }
}
