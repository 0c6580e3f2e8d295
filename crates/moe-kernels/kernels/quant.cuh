// quant.cuh: token quantization for dispatch payloads as device functions, bit-exact with
// moe-quant's quantize_token (docs/QUANT_SPEC.md section 3). Used by the quantization kernel
// (quant.cu), by the one-sided dispatch, which quantizes each token on the way to its
// destinations (one_sided.cu), and by experts that quantize their own input (experts.cu).
//
// Compiled after common.cuh in one NVRTC program, specialized by -D:
//   MOE_SCHEME      index in QuantScheme::ALL (MOE_SCHEME_* in common.cuh)
//   MOE_HIDDEN      elements per token, a size QuantScheme::wire_layout accepts for the scheme
//   MOE_INPUT_BF16  1: input elements are bf16 bits, 0: fp16 bits
// Input elements widen to f32 exactly, so the CPU reference applied to the widened token is the
// oracle whatever the input dtype.
//
// Work is split into units: a thread loads kUnitElems consecutive elements of a token with
// 16-byte loads, quantizes them in registers and hands 16 payload bytes (fewer in a token's last
// unit) and the unit's scale bytes to a sink, which stores them wherever the caller wants them
// (one buffer, every destination rank's slot, shared memory). A block quantizes a batch of
// tokens at once, so a large block keeps many units in flight whatever the hidden size, and
// each thread loads kUnroll units before it stores any, so that several loads are in flight.

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

// Whether the wire scheme is the input's 16-bit type: the payload is then the row itself with
// NaNs made canonical.
constexpr bool kPassthrough =
    (kScheme == MOE_SCHEME_BF16 && kInputBf16) || (kScheme == MOE_SCHEME_FP16 && !kInputBf16);
constexpr bool kSixteenBit = kScheme == MOE_SCHEME_BF16 || kScheme == MOE_SCHEME_FP16;

// Elements of a unit: whatever gives 16 payload bytes (8 16-bit, 16 fp8, 32 fp4 elements).
constexpr u32 kUnitElems = kSixteenBit ? 8u : kScheme == MOE_SCHEME_NVFP4 ? 32u : 16u;
constexpr u32 kUnitWords = kUnitElems / 2;  // u32 words of input, two elements each
constexpr u32 kUnits = (kHidden + kUnitElems - 1) / kUnitElems;
// Units of one scale block, held by neighbouring lanes of a warp (its amax is a shuffle among
// them): 8 for fp8-block128, 2 for mxfp8. nvfp4's two blocks are inside one unit; fp8-per-token
// reduces over the whole token first (moe_token_amax).
constexpr u32 kBlockUnits = kScheme == MOE_SCHEME_FP8_BLOCK128 ? 8u : kScheme == MOE_SCHEME_MXFP8 ? 2u : 1u;
// Units a thread loads before it stores any: 64 input bytes in flight per thread.
constexpr u32 kUnroll = kScheme == MOE_SCHEME_NVFP4 ? 2u : kSixteenBit ? 4u : 2u;

static_assert(kScheme == MOE_SCHEME_NVFP4 || kScheme == MOE_SCHEME_FP8_BLOCK128 || kScheme == MOE_SCHEME_MXFP8
                  ? kHidden % (kScheme == MOE_SCHEME_NVFP4 ? 16u : kBlockUnits * kUnitElems) == 0
                  : true,
              "a scale block is whole units (nvfp4: a token's last unit may hold one block of 16)");

// Spec 2.2 (fp4) and 2.1 (e4m3) maxima, as f32 divisors of the scale rules of section 3.
#define MOE_E2M1_MAX 6.0f
#define MOE_E4M3_MAX 448.0f
// Tokens a block quantizes together at most (the shared tables of a batch are sized by it).
#define MOE_BATCH_MAX 16

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

// Element i of a unit, widened exactly to f32.
__device__ __forceinline__ float unit_element(const u32 (&w)[kUnitWords], u32 i) {
    const u16 h = (u16)(w[i / 2] >> (16 * (i % 2)));
    return kInputBf16 ? moe_bf16_to_f32(h) : moe_fp16_to_f32(h);
}

// Loads unit `unit` of the token at `row`: 16-byte loads when the unit is whole and aligned,
// else element by element, with the elements past the token's end zero.
__device__ __forceinline__ void load_unit(const u16* row, u32 unit, u32 (&w)[kUnitWords]) {
    const u32 first = unit * kUnitElems;
    const u16* src = row + first;
    if (first + kUnitElems <= kHidden && (u64)src % 16 == 0) {
#pragma unroll
        for (u32 v = 0; v < kUnitWords / 4; ++v) {
            const uint4 x = ((const uint4*)src)[v];
            w[4 * v] = x.x;
            w[4 * v + 1] = x.y;
            w[4 * v + 2] = x.z;
            w[4 * v + 3] = x.w;
        }
    } else {
#pragma unroll
        for (u32 j = 0; j < kUnitWords; ++j) {
            const u32 lo = first + 2 * j < kHidden ? src[2 * j] : 0u;
            const u32 hi = first + 2 * j + 1 < kHidden ? src[2 * j + 1] : 0u;
            w[j] = lo | (hi << 16);
        }
    }
}

// Stores the first `bytes` (at most 16) of `w` little-endian at `dst` with the widest stores
// its alignment allows: the slot strides do not promise any.
__device__ __forceinline__ void moe_store_words(u8* dst, const u32 (&w)[4], u32 bytes) {
    // Unrolled loops with bounds inside keep `w` in registers (a loop up to a run-time count
    // would index it dynamically, through local memory).
    const u64 at = (u64)dst;
    if (bytes == 16 && at % 16 == 0) {
        *(uint4*)dst = make_uint4(w[0], w[1], w[2], w[3]);
    } else if (bytes % 8 == 0 && at % 8 == 0) {
#pragma unroll
        for (u32 j = 0; j < 2; ++j)
            if (8 * j < bytes) ((uint2*)dst)[j] = make_uint2(w[2 * j], w[2 * j + 1]);
    } else if (bytes % 4 == 0 && at % 4 == 0) {
#pragma unroll
        for (u32 j = 0; j < 4; ++j)
            if (4 * j < bytes) ((u32*)dst)[j] = w[j];
    } else if (bytes % 2 == 0 && at % 2 == 0) {
#pragma unroll
        for (u32 j = 0; j < 8; ++j)
            if (2 * j < bytes) ((u16*)dst)[j] = (u16)(w[j / 2] >> (16 * (j % 2)));
    } else {
#pragma unroll
        for (u32 j = 0; j < 16; ++j)
            if (j < bytes) dst[j] = (u8)(w[j / 4] >> (8 * (j % 4)));
    }
}

// nvfp4's scales take two bytes per unit, so the eight units of an aligned group of lanes
// (units u..u+7 of one token, u a multiple of 8) have 16 contiguous scale bytes: the group's
// first lane stores them in one vector store instead of eight 2-byte stores, each of which is
// a packet of its own on the way to a peer. Lanes of a group that does not qualify (a token's
// edge, a partial last pass, a token's last unit of one block) store their own bytes. Every
// lane of the warp must call it.
template <class Sink>
__device__ __forceinline__ void store_nvfp4_scales(const Sink& sink, u32 b, u32 u, bool active, u32 sf_pair,
                                                   u32 bytes) {
    const u32 all = 0xffffffffu;
    const u32 lane = threadIdx.x % 32, leader = lane & ~7u;
    const u32 group = 0xffu << leader;
    const u32 lead_b = __shfl_sync(all, b, leader), lead_u = __shfl_sync(all, u, leader);
    const bool in_run = active && bytes == 2 && b == lead_b && u == lead_u + (lane - leader);
    const bool packed = (__ballot_sync(all, in_run) & group) == group && lead_u % 8 == 0;
    // Even lanes pair their bytes with the next lane's; the leader collects the four pairs.
    const u32 word = sf_pair | (__shfl_down_sync(all, sf_pair, 1) << 16);
    u32 w[4] = {word, 0u, 0u, 0u};
#pragma unroll
    for (u32 j = 1; j < 4; ++j) w[j] = __shfl_sync(all, word, leader + 2 * j);
    if (packed) {
        if (lane == leader) sink.scales(b, 2 * u, w, 16);
    } else if (active) {
        const u32 own[4] = {sf_pair, 0u, 0u, 0u};
        sink.scales(b, 2 * u, own, bytes);
    }
}


// Spec 3.5 for the 16-element block `half` of a unit, of finite amax `amax`: u = gs * (a / 6),
// divide first; sf = e4m3(u) (u >= 0, so no sign bit; +Inf saturates to 0x7e) goes into its
// byte of `sf_pair`. Returns false when SF is 0 (every code of the block is then 0), else true
// with `r` = gs / SF, finite because the host checks 0 < gs <= 2^118 and SF >= 2^-9: the
// block's elements are x * r.
__device__ __forceinline__ bool moe_nvfp4_block_scale(float amax, float gs, u32 half, u32& sf_pair, float& r) {
    const u32 sf = moe_f32_to_e4m3(__fmul_rn(gs, __fdiv_rn(amax, MOE_E2M1_MAX)));
    sf_pair |= sf << (8 * half);
    const float sf_value = moe_e4m3_to_f32((u8)sf);
    if (sf_value == 0.0f) return false;
    r = __fdiv_rn(gs, sf_value);
    return true;
}

// nvfp4 on the FMA pipe where the generic code below keeps the integer pipe busy (the
// quantization kernel measured ALU-bound on an H200: 76% of its pipe, 33 instructions per
// element). Element codes are sums of saturated FP operations (each one instruction, round to
// nearest, subnormals kept) instead of integer work on the bits:
//   |y| in [0, 2]: rni(2 |y|), in [2, 4): 4 + rni(|y| - 2), in [4, 6): 6 + rni((|y| - 4) / 2),
//   then 7, with rni ties to even; that is rni(4 s1) + rni(2 s2 + s3) for s1 = sat(|y| / 2),
//   s2 = sat(|y| / 2 - 1) and s3 = sat(|y| / 2 - 2), every intermediate exact where it decides
//   the code. Equal to moe_f32_to_e2m1 for every f32 that is not a NaN (checked exhaustively on
//   the CPU over all 2^32 bit patterns when it was written; tests/e2m1_fma_formula.rs keeps
//   checking the same operations on the range where codes change); a NaN saturates to 0, so
//   moe_nvfp4_unit_finite below refuses units with a non-finite element, and quantize_unit runs
//   its generic path for them.
__device__ __forceinline__ float moe_abs_mul_sat(float a, float b) {
    float d;
    asm("{ .reg .f32 t; abs.f32 t, %1; mul.rn.sat.f32 %0, t, %2; }" : "=f"(d) : "f"(a), "f"(b));
    return d;
}
__device__ __forceinline__ float moe_abs_fma_sat(float a, float b, float c) {
    float d;
    asm("{ .reg .f32 t; abs.f32 t, %1; fma.rn.sat.f32 %0, t, %2, %3; }" : "=f"(d) : "f"(a), "f"(b), "f"(c));
    return d;
}

// The e2m1 magnitude code of y (not a NaN) plus 2 * 0x4b000000: the bits of the two rounded
// terms, whose f32 spacing at 2^23 is 1.
__device__ __forceinline__ u32 moe_e2m1_magnitude_biased(float y) {
    const float s1 = moe_abs_mul_sat(y, 0.5f);
    const float s2 = moe_abs_fma_sat(y, 0.5f, -1.0f);
    const float s3 = moe_abs_fma_sat(y, 0.5f, -2.0f);
    const float t1 = __fmaf_rn(s1, 4.0f, 8388608.0f);
    const float t23 = __fadd_rn(__fmaf_rn(s2, 2.0f, s3), 8388608.0f);
    return __float_as_uint(t1) + __float_as_uint(t23);
}

// What eight moe_e2m1_magnitude_biased terms, each shifted to its nibble, add up to beyond the
// codes (mod 2^32).
constexpr u32 kE2m1NibbleBias = 2u * 0x4b000000u * 0x11111111u;

__device__ __forceinline__ u32 moe_prmt(u32 a, u32 b, u32 selector) {
    u32 d;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(selector));
    return d;
}

// The sign bits of eight 16-bit elements (four words, element 2m in the low half of word m) at
// their e2m1 nibbles' bit 3: byte replication of each element's high byte by prmt, then the
// even elements' bytes and the odd elements' bytes interleaved.
__device__ __forceinline__ u32 moe_e2m1_signs(u32 w0, u32 w1, u32 w2, u32 w3) {
    const u32 p = moe_prmt(w0, w1, 0xfbd9u);  // signs of elements 0, 2, 1, 3 as 0x00 / 0xff bytes
    const u32 q = moe_prmt(w2, w3, 0xfbd9u);  // 4, 6, 5, 7
    const u32 even = moe_prmt(p, q, 0x5410u), odd = moe_prmt(p, q, 0x7632u);
    return (even & 0x08080808u) | (odd & 0x80808080u);
}

// Lane-wise maximum of two pairs of u16.
__device__ __forceinline__ u32 moe_max_u16x2(u32 a, u32 b) {
#if __CUDA_ARCH__ >= 900
    u32 d;
    asm("max.u16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    return d;
#else
    return moe_max_u32(a & 0xffffu, b & 0xffffu) | (moe_max_u32(a >> 16, b >> 16) << 16);
#endif
}

// Spec 3.5 for a unit with none of its elements NaN or infinite: the same bytes as the generic
// path in quantize_unit, which runs instead when this returns false (computing nothing).
template <u32 kWords>
__device__ __forceinline__ bool moe_nvfp4_unit_finite(const u32 (&w)[kWords], float gs, u32 (&out)[4], u32& sf_pair) {
    static_assert(kWords == 16, "an nvfp4 unit is 32 elements");
    // The magnitudes' bits of bf16 and fp16 alike compare like the values; the smallest
    // non-finite magnitude is Inf's.
    constexpr u32 kInfBits = kInputBf16 ? 0x7f80u : 0x7c00u;
    u32 half_amax[2];
#pragma unroll
    for (u32 half = 0; half < 2; ++half) {
        u32 m = w[8 * half] & 0x7fff7fffu;
#pragma unroll
        for (u32 j = 1; j < 8; ++j) m = moe_max_u16x2(m, w[8 * half + j] & 0x7fff7fffu);
        half_amax[half] = moe_max_u32(m & 0xffffu, m >> 16);
    }
    if (moe_max_u32(half_amax[0], half_amax[1]) >= kInfBits) return false;
#pragma unroll
    for (u32 half = 0; half < 2; ++half) {
        const float amax = kInputBf16 ? moe_bf16_to_f32((u16)half_amax[half]) : moe_fp16_to_f32((u16)half_amax[half]);
        float r;
        if (moe_nvfp4_block_scale(amax, gs, half, sf_pair, r)) {
#pragma unroll
            for (u32 j = 0; j < 2; ++j) {
                const u32 first = 8 * half + 4 * j;  // the output word's first input word
                u32 codes = 0;
#pragma unroll
                for (u32 n = 0; n < 8; ++n)
                    codes += moe_e2m1_magnitude_biased(__fmul_rn(unit_element(w, 2 * first + n), r)) << (4 * n);
                out[2 * half + j] =
                    (codes - kE2m1NibbleBias) | moe_e2m1_signs(w[first], w[first + 1], w[first + 2], w[first + 3]);
            }
        }
    }
    return true;
}

// Finite amax of a unit's elements (spec section 1 "amax").
__device__ __forceinline__ u32 unit_amax(const u32 (&w)[kUnitWords], u32 first, u32 count) {
    u32 amax = 0;
#pragma unroll
    for (u32 i = 0; i < kUnitElems; ++i)
        if (i >= first && i < first + count) amax = moe_max_u32(amax, moe_finite_abs_bits(unit_element(w, i)));
    return amax;
}

// Quantizes one unit (unit `u` of the batch's token `b`, whose elements are in `w`) and hands
// its bytes to the sink: sink.payload(b, offset, words, bytes) and sink.scales(b, offset, words,
// bytes) (the first `bytes` of the four words, little-endian, at most 16), offsets within the
// token's payload and scales. Every lane of the warp must call it,
// `active` or not, because block schemes reduce amax across lanes; inactive lanes store
// nothing. `token_amax` is the token's amax (fp8-per-token only).
template <class Sink>
__device__ __forceinline__ void quantize_unit(const u32 (&w)[kUnitWords], u32 b, u32 u, bool active, u32 token_amax,
                                              const Sink& sink, float fp8_static_scale, float nvfp4_global_scale) {
    const u32 elems = active ? min(kUnitElems, kHidden - u * kUnitElems) : 0u;
    u32 out[4] = {0u, 0u, 0u, 0u};
    if constexpr (kSixteenBit) {
        // Spec 3.1. The same 16-bit type: the encoding of a decoded value is the value itself,
        // except that every NaN becomes 0x7fff. Elements past the token's end are zero and not
        // stored.
#pragma unroll
        for (u32 j = 0; j < 4; ++j) {
            if constexpr (kPassthrough) {
                const u32 inf = kInputBf16 ? 0x7f80u : 0x7c00u;
                const u32 lo = (w[j] & 0x7fffu) > inf ? 0x7fffu : w[j] & 0xffffu;
                const u32 hi = ((w[j] >> 16) & 0x7fffu) > inf ? 0x7fffu : w[j] >> 16;
                out[j] = lo | (hi << 16);
            } else {
                const float lo = unit_element(w, 2 * j), hi = unit_element(w, 2 * j + 1);
                const u32 a = kScheme == MOE_SCHEME_BF16 ? moe_f32_to_bf16(lo) : moe_f32_to_fp16(lo);
                const u32 c = kScheme == MOE_SCHEME_BF16 ? moe_f32_to_bf16(hi) : moe_f32_to_fp16(hi);
                out[j] = a | (c << 16);
            }
        }
        if (active) sink.payload(b, 16 * u, out, 2 * elems);
    } else if constexpr (kScheme == MOE_SCHEME_NVFP4) {
        // Spec 3.5, per 16-element block (moe_nvfp4_block_scale); element 2j in the low nibble,
        // 2j + 1 in the high nibble (spec 2.2).
        const float gs = nvfp4_global_scale;
        u32 sf_pair = 0;
        const bool done = moe_nvfp4_unit_finite(w, gs, out, sf_pair);
#pragma unroll
        for (u32 half = 0; half < 2 && !done; ++half) {
            float r;
            if (moe_nvfp4_block_scale(__uint_as_float(unit_amax(w, 16 * half, 16)), gs, half, sf_pair, r)) {
#pragma unroll
                for (u32 j = 0; j < 2; ++j) {
                    u32 word = 0;
#pragma unroll
                    for (u32 n = 0; n < 8; ++n) {
                        const u32 i = 16 * half + 8 * j + n;
                        word |= moe_f32_to_e2m1(__fmul_rn(unit_element(w, i), r)) << (4 * n);
                    }
                    out[2 * half + j] = word;
                }
            }
        }
        if (active) sink.payload(b, 16 * u, out, elems / 2);
        store_nvfp4_scales(sink, b, u, active, sf_pair, elems / 16);
    } else if constexpr (kScheme == MOE_SCHEME_MXFP8) {
        // Spec 3.6: P = 2^(k - 127) and q = e4m3(x / P). The multiplier 2^(127 - k) is an exact
        // f32 (code 254 - k of e8m0, 2^-127 included), so x * 2^(127 - k) is the correctly
        // rounded value of the same real number as x / P: identical bits, subnormal and
        // overflowing quotients included, without a division per element.
        const u32 k = moe_e8m0_for_amax(group_max<kBlockUnits>(unit_amax(w, 0, kUnitElems)));
        const float inv_p = moe_e8m0_to_f32(254u - k);
#pragma unroll
        for (u32 j = 0; j < 4; ++j) {
            float q[4];
#pragma unroll
            for (u32 n = 0; n < 4; ++n) q[n] = __fmul_rn(unit_element(w, 4 * j + n), inv_p);
            out[j] = moe_f32x4_to_e4m3x4(q[0], q[1], q[2], q[3]);
        }
        if (active) {
            sink.payload(b, 16 * u, out, elems);
            const u32 scale[4] = {k, 0u, 0u, 0u};
            if (u % kBlockUnits == 0) sink.scales(b, u / kBlockUnits, scale, 1);
        }
    } else {
        // fp8: per tensor (spec 3.2), q = e4m3(x / s) with the host-checked static s > 0;
        // per token and per 128-block (3.3, 3.4), s = a / 448, not a multiplier 448 / a (this
        // keeps the roundtrip idempotent), and a zero s zeroes every code. Divisions are
        // correctly rounded (spec 1 "Arithmetic").
        float s = fp8_static_scale;
        if constexpr (kScheme == MOE_SCHEME_FP8_PER_TOKEN) {
            s = __fdiv_rn(__uint_as_float(token_amax), MOE_E4M3_MAX);
        } else if constexpr (kScheme == MOE_SCHEME_FP8_BLOCK128) {
            s = __fdiv_rn(__uint_as_float(group_max<kBlockUnits>(unit_amax(w, 0, kUnitElems))), MOE_E4M3_MAX);
        }
        const bool zero = kScheme != MOE_SCHEME_FP8_PER_TENSOR && s == 0.0f;
#pragma unroll
        for (u32 j = 0; j < 4; ++j) {
            float q[4];
#pragma unroll
            for (u32 n = 0; n < 4; ++n) q[n] = __fdiv_rn(unit_element(w, 4 * j + n), s);
            out[j] = zero ? 0u : moe_f32x4_to_e4m3x4(q[0], q[1], q[2], q[3]);
        }
        if (active) {
            sink.payload(b, 16 * u, out, elems);
            const u32 scale[4] = {__float_as_uint(s), 0u, 0u, 0u};
            if (kScheme != MOE_SCHEME_FP8_PER_TENSOR && u % (kScheme == MOE_SCHEME_FP8_PER_TOKEN ? kUnits : kBlockUnits) == 0)
                sink.scales(b, kScheme == MOE_SCHEME_FP8_PER_TOKEN ? 0u : 4 * (u / kBlockUnits), scale, 4);
        }
    }
}

// Quantizes the `count` (<= MOE_BATCH_MAX) tokens rows(0) .. rows(count - 1) with the whole
// block: every thread must call it. The (token, unit) items are spread over the threads in
// order, so a warp's lanes hold neighbouring units and a scale block's units share a warp (a
// token is whole scale blocks, so a block never straddles two tokens).
template <class Rows, class Sink>
__device__ void moe_quantize_batch(const Rows& rows, u32 count, const Sink& sink, float fp8_static_scale,
                                   float nvfp4_global_scale) {
    const u32 items = count * kUnits;
    __shared__ u32 s_token_amax[MOE_BATCH_MAX];
    if constexpr (kScheme == MOE_SCHEME_FP8_PER_TOKEN) {
        // One scale for the whole token: its amax first, through shared atomics (exact in any
        // order), then the units read the rows again (from cache).
        for (u32 b = threadIdx.x; b < count; b += blockDim.x) s_token_amax[b] = 0u;
        __syncthreads();
        for (u32 item = threadIdx.x; item < items; item += blockDim.x) {
            u32 w[kUnitWords];
            load_unit(rows(item / kUnits), item % kUnits, w);
            const u32 amax = unit_amax(w, 0, kUnitElems);
            if (amax != 0u) atomicMax(&s_token_amax[item / kUnits], amax);
        }
        __syncthreads();
    }
    const u32 lane = threadIdx.x % 32;
    // Warp-uniform bounds: every lane takes part in each unit's shuffles, even in a last,
    // partly used, pass.
    for (u32 base = threadIdx.x - lane; base < items; base += kUnroll * blockDim.x) {
        u32 w[kUnroll][kUnitWords];
#pragma unroll
        for (u32 j = 0; j < kUnroll; ++j) {
            const u32 item = base + j * blockDim.x + lane;
            if (item < items) {
                load_unit(rows(item / kUnits), item % kUnits, w[j]);
            } else {
#pragma unroll
                for (u32 n = 0; n < kUnitWords; ++n) w[j][n] = 0u;
            }
        }
#pragma unroll
        for (u32 j = 0; j < kUnroll; ++j) {
            if (base + j * blockDim.x >= items) break;
            const u32 item = base + j * blockDim.x + lane;
            const bool active = item < items;
            const u32 b = active ? item / kUnits : 0u;
            const u32 token_amax = kScheme == MOE_SCHEME_FP8_PER_TOKEN && active ? s_token_amax[b] : 0u;
            quantize_unit(w[j], b, active ? item % kUnits : 0u, active, token_amax, sink, fp8_static_scale,
                          nvfp4_global_scale);
        }
    }
    // The token amax table is rewritten by the block's next batch.
    if constexpr (kScheme == MOE_SCHEME_FP8_PER_TOKEN) __syncthreads();
}

// Asks L2 for the `count` rows of a batch, one 128-byte line per thread at a time, so that a
// caller with work to do before moe_quantize_batch (dispatch's routing) has them in flight
// meanwhile. Every thread must call it.
template <class Rows>
__device__ __forceinline__ void moe_prefetch_rows(const Rows& rows, u32 count) {
    constexpr u32 kLines = (kHidden * 2 + 127) / 128;
    for (u32 i = threadIdx.x; i < count * kLines; i += blockDim.x) {
        const u8* line = (const u8*)rows(i / kLines) + 128 * (i % kLines);
        asm volatile("prefetch.global.L2 [%0];" ::"l"(line));
    }
}

// Tokens a block quantizes per batch: enough units for kUnroll per thread.
__device__ __forceinline__ u32 moe_batch_tokens() {
    const u32 tokens = kUnroll * blockDim.x / kUnits;
    return tokens < 1u ? 1u : tokens > MOE_BATCH_MAX ? MOE_BATCH_MAX : tokens;
}

// Tokens in the batch of a block that takes tokens first, first + gridDim.x, ... (first <
// n_tokens), at most `per_pass` (moe_batch_tokens()).
__device__ __forceinline__ u32 moe_batch_count(u32 first, u32 n_tokens, u32 per_pass) {
    return min(per_pass, (n_tokens - first + gridDim.x - 1) / gridDim.x);
}
