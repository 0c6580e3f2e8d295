// quant.cuh: token quantization for dispatch payloads as device functions, bit-exact with
// moe-quant's quantize_token (docs/QUANT_SPEC.md section 3). Used by the quantization kernel
// (quant.cu) and by the dispatch kernels, which quantize each token on the way to its
// destinations (one_sided.cu).
//
// Compiled after common.cuh in one NVRTC program, specialized by -D:
//   MOE_SCHEME      index in QuantScheme::ALL (MOE_SCHEME_* in common.cuh)
//   MOE_HIDDEN      elements per token, a size QuantScheme::wire_layout accepts for the scheme
//   MOE_INPUT_BF16  1: input elements are bf16 bits, 0: fp16 bits
// Input elements widen to f32 exactly, so the CPU reference applied to the widened token is the
// oracle whatever the input dtype.

#if !defined(MOE_SCHEME) || !defined(MOE_HIDDEN) || !defined(MOE_INPUT_BF16)
#error "quant.cu needs -DMOE_SCHEME, -DMOE_HIDDEN and -DMOE_INPUT_BF16"
#endif

constexpr u32 kScheme = MOE_SCHEME;
constexpr u32 kHidden = MOE_HIDDEN;
constexpr bool kInputBf16 = MOE_INPUT_BF16 != 0;

static_assert(moe_layout_valid(kScheme, kHidden),
              "MOE_SCHEME must be 0..=6 and MOE_HIDDEN a positive multiple of its block "
              "(QuantScheme::wire_layout)");

constexpr u32 kPayloadBytes = moe_payload_bytes(kScheme, kHidden);
constexpr u32 kScaleBytes = moe_scale_bytes(kScheme, kHidden);

// Spec 2.2 (fp4) and 2.1 (e4m3) maxima, as f32 divisors of the scale rules of section 3.
#define MOE_E2M1_MAX 6.0f
#define MOE_E4M3_MAX 448.0f

// Element i of a token, widened exactly to f32.
__device__ __forceinline__ float load_element(const u16* row, u32 i) {
    return kInputBf16 ? moe_bf16_to_f32(row[i]) : moe_fp16_to_f32(row[i]);
}

// Max over aligned groups of LANES lanes (LANES a power of two dividing 32). Every lane of the
// warp must call it: the butterfly uses the full mask, and xor offsets below LANES never leave
// the group. Exact in any order (spec section 1 "amax").
template <u32 LANES>
__device__ __forceinline__ u32 group_max(u32 v) {
#pragma unroll
    for (u32 offset = LANES / 2; offset > 0; offset /= 2) {
        v = moe_max_u32(v, __shfl_xor_sync(0xffffffffu, v, offset));
    }
    return v;
}

// bf16, fp16 (spec 3.1) and fp8-per-tensor (spec 3.2): each element on its own.
template <u32 SCHEME>
__device__ void quantize_elementwise(const u16* x, u8* q, float fp8_static_scale) {
    static_assert(kPayloadBytes == (SCHEME == MOE_SCHEME_FP8_PER_TENSOR ? 1 : 2) * kHidden &&
                      kScaleBytes == 0,
                  "the loop below writes exactly the wire_layout bytes");
    for (u32 i = threadIdx.x; i < kHidden; i += blockDim.x) {
        const float v = load_element(x, i);
        if constexpr (SCHEME == MOE_SCHEME_FP8_PER_TENSOR) {
            // q = e4m3(x / s), a correctly rounded division (spec 1 "Arithmetic"). The host
            // checks that s is finite and > 0 (spec 3.2) before launching.
            q[i] = moe_f32_to_e4m3(__fdiv_rn(v, fp8_static_scale));
        } else {
            const u16 h = SCHEME == MOE_SCHEME_BF16 ? moe_f32_to_bf16(v) : moe_f32_to_fp16(v);
            // Little-endian, byte by byte: the slot stride does not promise 2-byte alignment.
            q[2 * i] = (u8)h;
            q[2 * i + 1] = (u8)(h >> 8);
        }
    }
}

// fp8-per-token (spec 3.3): one scale for the whole token, so amax is a block-wide reduction.
// A template like the other paths, so that it is only instantiated for its own scheme.
template <u32 SCHEME>
__device__ void quantize_fp8_per_token(const u16* x, u8* q, u8* scale) {
    static_assert(SCHEME == MOE_SCHEME_FP8_PER_TOKEN && kPayloadBytes == kHidden &&
                      kScaleBytes == 4,
                  "one e4m3 byte per element and one f32 scale per token");
    __shared__ u32 warp_amax[32];
    u32 amax = 0;
    for (u32 i = threadIdx.x; i < kHidden; i += blockDim.x) {
        amax = moe_max_u32(amax, moe_finite_abs_bits(load_element(x, i)));
    }
    amax = group_max<32>(amax);
    if (threadIdx.x % 32 == 0) warp_amax[threadIdx.x / 32] = amax;
    __syncthreads();
    for (u32 w = 0; w < blockDim.x / 32; ++w) amax = moe_max_u32(amax, warp_amax[w]);
    // warp_amax is written again for the block's next token only after every thread read it.
    __syncthreads();

    // s = a / 448, not a multiplier 448 / a: this keeps the roundtrip idempotent (spec 3.3).
    const float s = __fdiv_rn(__uint_as_float(amax), MOE_E4M3_MAX);
    if (threadIdx.x == 0) moe_store_f32_le(scale, s);
    for (u32 i = threadIdx.x; i < kHidden; i += blockDim.x) {
        // A zero scale (no finite non-zero element, or a / 448 underflowed) zeroes every code.
        q[i] = s == 0.0f ? 0 : moe_f32_to_e4m3(__fdiv_rn(load_element(x, i), s));
    }
}

// fp8-block128 (spec 3.4), nvfp4 (spec 3.5) and mxfp8 (spec 3.6): blocks of 128, 16 or 32
// elements. A thread takes PER_THREAD consecutive elements (a chunk) and LANES = block /
// PER_THREAD neighbouring lanes of one warp hold one block, so the block amax is a shuffle
// reduction within the warp. nvfp4 takes 2 elements per thread: one packed payload byte.
template <u32 SCHEME>
__device__ void quantize_blocked(const u16* x, u8* q, u8* scales, float nvfp4_global_scale) {
    constexpr u32 BLOCK = moe_scale_block(SCHEME, kHidden);
    constexpr u32 PER_THREAD = SCHEME == MOE_SCHEME_NVFP4 ? 2 : BLOCK / 32;
    constexpr u32 LANES = BLOCK / PER_THREAD;
    constexpr u32 CHUNKS = kHidden / PER_THREAD;
    static_assert(LANES <= 32 && 32 % LANES == 0, "a block must fit an aligned lane group");
    static_assert(kPayloadBytes == (SCHEME == MOE_SCHEME_NVFP4 ? CHUNKS : kHidden) &&
                      kScaleBytes == kHidden / BLOCK * (SCHEME == MOE_SCHEME_FP8_BLOCK128 ? 4 : 1),
                  "the chunks below write exactly the wire_layout bytes");

    const u32 lane = threadIdx.x % 32;
    // The loop runs on warp-uniform chunk bases, so every lane of a warp takes part in each
    // shuffle even in the last, partly used, pass. CHUNKS is a multiple of LANES (MOE_HIDDEN is
    // a multiple of the block), so a lane group is either all active or all idle.
    for (u32 base = threadIdx.x - lane; base < CHUNKS; base += blockDim.x) {
        const u32 chunk = base + lane;
        const bool active = chunk < CHUNKS;
        float v[PER_THREAD];
        u32 amax = 0;
#pragma unroll
        for (u32 j = 0; j < PER_THREAD; ++j) {
            v[j] = active ? load_element(x, chunk * PER_THREAD + j) : 0.0f;
            amax = moe_max_u32(amax, moe_finite_abs_bits(v[j]));
        }
        amax = group_max<LANES>(amax);
        if (!active) continue;

        const u32 block = chunk / LANES;
        const bool writes_scale = chunk % LANES == 0;
        if constexpr (SCHEME == MOE_SCHEME_FP8_BLOCK128) {
            // Spec 3.4 (the rule of 3.3 per block): s = a / 448, zero scale -> zero codes.
            const float s = __fdiv_rn(__uint_as_float(amax), MOE_E4M3_MAX);
            if (writes_scale) moe_store_f32_le(scales + 4 * block, s);
#pragma unroll
            for (u32 j = 0; j < PER_THREAD; ++j) {
                q[chunk * PER_THREAD + j] = s == 0.0f ? 0 : moe_f32_to_e4m3(__fdiv_rn(v[j], s));
            }
        } else if constexpr (SCHEME == MOE_SCHEME_NVFP4) {
            // Spec 3.5: u = gs * (a / 6), divide first; sf = e4m3(u) (u >= 0, so no sign bit;
            // +Inf saturates to 0x7e). The host checks 0 < gs <= 2^118 before launching.
            const float gs = nvfp4_global_scale;
            const u8 sf = moe_f32_to_e4m3(
                __fmul_rn(gs, __fdiv_rn(__uint_as_float(amax), MOE_E2M1_MAX)));
            if (writes_scale) scales[block] = sf;
            const float sf_value = moe_e4m3_to_f32(sf);
            u8 packed = 0;
            if (sf_value != 0.0f) {
                // r = gs / SF, finite because gs <= 2^118 and SF >= 2^-9; elements are x * r.
                const float r = __fdiv_rn(gs, sf_value);
                // Spec 2.2 packing: element 2j in the low nibble, 2j + 1 in the high nibble.
                packed = (u8)(moe_f32_to_e2m1(__fmul_rn(v[0], r)) |
                              (moe_f32_to_e2m1(__fmul_rn(v[1], r)) << 4));
            }
            q[chunk] = packed;
        } else {
            static_assert(SCHEME == MOE_SCHEME_MXFP8, "quantize_blocked serves schemes 4, 5, 6");
            // Spec 3.6: P = 2^(k - 127) and q = e4m3(x / P). The multiplier 2^(127 - k) is an
            // exact f32 (code 254 - k of e8m0, 2^-127 included), so x * 2^(127 - k) is the
            // correctly rounded value of the same real number as x / P: identical bits, subnormal
            // and overflowing quotients included, without a division per element.
            const u32 k = moe_e8m0_for_amax(amax);
            if (writes_scale) scales[block] = (u8)k;
            const float inv_p = moe_e8m0_to_f32(254u - k);
#pragma unroll
            for (u32 j = 0; j < PER_THREAD; ++j) {
                q[chunk * PER_THREAD + j] = moe_f32_to_e4m3(__fmul_rn(v[j], inv_p));
            }
        }
    }
}

// Quantizes one token of kHidden 16-bit elements `row` into kPayloadBytes at `q` and
// kScaleBytes at `scales` (not touched for schemes without scales), with the whole block:
// every thread of the block must call it. q and scales may be global or shared memory.
__device__ __forceinline__ void moe_quantize_token(const u16* row, u8* q, u8* scales, float fp8_static_scale,
                                                   float nvfp4_global_scale) {
    if constexpr (kScheme <= MOE_SCHEME_FP8_PER_TENSOR) {
        quantize_elementwise<kScheme>(row, q, fp8_static_scale);
    } else if constexpr (kScheme == MOE_SCHEME_FP8_PER_TOKEN) {
        quantize_fp8_per_token<kScheme>(row, q, scales);
    } else {
        quantize_blocked<kScheme>(row, q, scales, nvfp4_global_scale);
    }
}

// Whether the wire payload is the input row itself (a 16-bit scheme equal to the input dtype):
// dispatch then sends the row as it is.
constexpr bool kPassthrough =
    (kScheme == MOE_SCHEME_BF16 && kInputBf16) || (kScheme == MOE_SCHEME_FP16 && !kInputBf16);
