// common.cuh: fixed-width types, per-token wire sizes and the element codecs of
// docs/QUANT_SPEC.md, shared by every moe-a2a kernel.
//
// NVRTC compiles these sources without any CUDA toolkit header (DESIGN.md section 8), so the
// types are defined here and every conversion is bit arithmetic on __float_as_uint /
// __uint_as_float. Every f32 operation is written as an explicit round-to-nearest intrinsic
// (__fmul_rn, __fdiv_rn, __float2uint_rn), which is never contracted into an FMA nor replaced by
// an approximation, so the results do not depend on compiler flags (spec sections 1 and 8).
// The Rust side concatenates this file in front of the kernel sources into one NVRTC program.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef int i32;
typedef unsigned long long u64;

static_assert(sizeof(u8) == 1 && sizeof(u16) == 2 && sizeof(u32) == 4 && sizeof(u64) == 8,
              "moe fixed-width typedefs have the wrong sizes");

// ---------------------------------------------------------------------------------------------
// Schemes and wire sizes
// ---------------------------------------------------------------------------------------------

// Scheme ids: the index of the scheme in moe-quant's QuantScheme::ALL.
#define MOE_SCHEME_BF16 0
#define MOE_SCHEME_FP16 1
#define MOE_SCHEME_FP8_PER_TENSOR 2
#define MOE_SCHEME_FP8_PER_TOKEN 3
#define MOE_SCHEME_FP8_BLOCK128 4
#define MOE_SCHEME_NVFP4 5
#define MOE_SCHEME_MXFP8 6

// Elements covered by one scale (spec section 1 "Blocks"): the whole token for fp8-per-token,
// 0 for the schemes that send no scale.
__host__ __device__ constexpr u32 moe_scale_block(u32 scheme, u32 hidden) {
    return scheme == MOE_SCHEME_FP8_PER_TOKEN ? hidden
         : scheme == MOE_SCHEME_FP8_BLOCK128 ? 128u
         : scheme == MOE_SCHEME_NVFP4        ? 16u
         : scheme == MOE_SCHEME_MXFP8        ? 32u
                                             : 0u;
}

// Whether (scheme, hidden) is a layout QuantScheme::wire_layout accepts (spec section 4).
__host__ __device__ constexpr bool moe_layout_valid(u32 scheme, u32 hidden) {
    return scheme <= MOE_SCHEME_MXFP8 && hidden > 0 &&
           (moe_scale_block(scheme, hidden) == 0 || hidden % moe_scale_block(scheme, hidden) == 0);
}

// Payload bytes per token, as QuantScheme::wire_layout (spec section 4).
__host__ __device__ constexpr u32 moe_payload_bytes(u32 scheme, u32 hidden) {
    return scheme == MOE_SCHEME_BF16 || scheme == MOE_SCHEME_FP16 ? 2 * hidden
         : scheme == MOE_SCHEME_NVFP4                              ? hidden / 2
                                                                   : hidden;
}

// Scale bytes per token, as QuantScheme::wire_layout (spec section 4): f32 scales for the two
// dynamic fp8 schemes, one e4m3 byte per 16 elements for nvfp4, one e8m0 byte per 32 for mxfp8.
__host__ __device__ constexpr u32 moe_scale_bytes(u32 scheme, u32 hidden) {
    return scheme == MOE_SCHEME_FP8_PER_TOKEN || scheme == MOE_SCHEME_FP8_BLOCK128
               ? 4 * (hidden / moe_scale_block(scheme, hidden))
         : scheme == MOE_SCHEME_NVFP4 || scheme == MOE_SCHEME_MXFP8
               ? hidden / moe_scale_block(scheme, hidden)
               : 0u;
}

// ---------------------------------------------------------------------------------------------
// f32 helpers
// ---------------------------------------------------------------------------------------------

#define MOE_F32_SIGN 0x80000000u
#define MOE_F32_ABS 0x7fffffffu
#define MOE_F32_INF 0x7f800000u
#define MOE_F32_MANT 0x007fffffu

// Whether v is ±Inf or NaN (a router weight a dispatch refuses).
__device__ __forceinline__ bool moe_not_finite(float v) { return (__float_as_uint(v) & MOE_F32_INF) == MOE_F32_INF; }

// Bits of |v| when v is finite, else 0: the contribution of one element to amax (spec section 1
// "amax": NaN and ±Inf are skipped). For non-negative floats the order of the bit patterns is the
// numeric order, so an unsigned max over these bits is the spec's fmaxf, exactly.
__device__ __forceinline__ u32 moe_finite_abs_bits(float v) {
    const u32 a = __float_as_uint(v) & MOE_F32_ABS;
    return a < MOE_F32_INF ? a : 0u;
}

__device__ __forceinline__ u32 moe_max_u32(u32 a, u32 b) { return a > b ? a : b; }

// Stores f32 `v` as 4 little-endian bytes (spec section 1 "Byte order"), byte by byte because
// the caller's slot stride does not promise 4-byte alignment.
__device__ __forceinline__ void moe_store_f32_le(u8* p, float v) {
    const u32 b = __float_as_uint(v);
    p[0] = (u8)b;
    p[1] = (u8)(b >> 8);
    p[2] = (u8)(b >> 16);
    p[3] = (u8)(b >> 24);
}

// ---------------------------------------------------------------------------------------------
// bf16 and fp16 (spec section 2.4)
// ---------------------------------------------------------------------------------------------

// Exact: every bf16 is the f32 with the same top 16 bits.
__device__ __forceinline__ float moe_bf16_to_f32(u16 h) { return __uint_as_float((u32)h << 16); }

// Exact decode of IEEE binary16 by the hardware conversion, one instruction (every binary16,
// subnormals included, is an f32; without .ftz nothing is flushed). NaN stays a NaN (which one
// does not matter: spec section 2.4 encodes every NaN to 0x7fff and the fp8/fp4 encoders treat
// all NaNs alike; gather.cu keeps payloads itself).
__device__ __forceinline__ float moe_fp16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// Round to nearest even, overflow to ±Inf as IEEE RNE says (f32::MAX -> 0x7f80), every NaN ->
// 0x7fff. Adding 0x7fff plus the lowest kept bit rounds the dropped half-word to nearest even;
// a carry moves into the exponent, which is the correct next value (up to Inf).
__device__ __forceinline__ u16 moe_f32_to_bf16(float v) {
    const u32 b = __float_as_uint(v);
    if ((b & MOE_F32_ABS) > MOE_F32_INF) return 0x7fff;
    return (u16)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

// Round to nearest even with subnormals, overflow to ±Inf (65520 -> 0x7c00), every NaN -> 0x7fff.
__device__ __forceinline__ u16 moe_f32_to_fp16(float v) {
    const u32 b = __float_as_uint(v);
    const u32 a = b & MOE_F32_ABS;
    const u32 sign = (b >> 16) & 0x8000u;
    if (a > MOE_F32_INF) return 0x7fff;
    // 65520 = 0x477ff000 is the midpoint between 65504 (odd mantissa) and 2^16: it and all
    // larger magnitudes, Inf included, round to Inf.
    if (a >= 0x477ff000u) return (u16)(sign | 0x7c00u);
    u32 t, rest, half;
    if (a >= 0x38800000u) {
        // At least 2^-14, the smallest fp16 normal: rebias the exponent, keep 10 mantissa bits.
        t = (a >> 13) - ((127u - 15u) << 10);
        rest = a & 0x1fffu;
        half = 0x1000u;
    } else if (a >= 0x33000000u) {
        // In [2^-25, 2^-14): the result is n * 2^-24 with n the rounded (1.m) * 2^(E - 126),
        // i.e. the 24-bit significand shifted right by 126 - E (E in 102..=112, shift 24..=14).
        const u32 shift = 126u - (a >> 23);
        const u32 sig = (a & MOE_F32_MANT) | 0x00800000u;
        t = sig >> shift;
        rest = sig & ((1u << shift) - 1u);
        half = 1u << (shift - 1u);
    } else {
        // Below 2^-25 (the midpoint between 0 and 2^-24, which ties to 0): a signed zero.
        return (u16)sign;
    }
    // A carry out of the mantissa lands in the exponent, which is the correct next value.
    t += (rest > half || (rest == half && (t & 1u))) ? 1u : 0u;
    return (u16)(sign | t);
}

// ---------------------------------------------------------------------------------------------
// fp8 E4M3 (spec section 2.1)
// ---------------------------------------------------------------------------------------------

#define MOE_E4M3_MAX_CODE 0x7eu
#define MOE_E4M3_NAN_CODE 0x7fu
#define MOE_F32_BITS_448 0x43e00000u       // 1.75 * 2^8, the largest e4m3 magnitude
#define MOE_F32_BITS_2_POW_M6 0x3c800000u  // 2^-6, the smallest e4m3 normal

// Round to nearest even on the e4m3 grid, then saturate; the integer algorithm of spec 2.1
// step by step, so one code path serves every architecture.
__device__ __forceinline__ u8 moe_f32_to_e4m3(float v) {
    const u32 b = __float_as_uint(v);
    const u32 a = b & MOE_F32_ABS;
    // Step 1: every NaN, whatever its sign, is 0x7f.
    if (a > MOE_F32_INF) return MOE_E4M3_NAN_CODE;
    // Step 2: the sign survives even when the magnitude rounds to zero.
    const u32 sign = (b >> 24) & 0x80u;
    // Step 3: saturation, ±Inf included.
    if (a >= MOE_F32_BITS_448) return (u8)(sign | MOE_E4M3_MAX_CODE);
    // Step 4: the subnormal grid counts steps of 2^-9; the product by 512 is exact, so the only
    // rounding is the conversion to an integer, which rounds to nearest even. n = 8 is the code
    // of 2^-6.
    if (a < MOE_F32_BITS_2_POW_M6) {
        return (u8)(sign | __float2uint_rn(__fmul_rn(__uint_as_float(a), 512.0f)));
    }
    // Step 5: rebias the exponent (127 - 7 = 120) and keep 3 of the 23 mantissa bits, rounding
    // the dropped 20 to nearest even. A carry lands in the exponent (correct); t <= 0x7e
    // because a < 448.
    u32 t = (((a >> 23) - 120u) << 3) | ((a & MOE_F32_MANT) >> 20);
    const u32 rest = a & 0xfffffu;
    t += (rest > 0x80000u || (rest == 0x80000u && (t & 1u))) ? 1u : 0u;
    return (u8)(sign | t);
}

// Four e4m3 codes packed little-endian (a in bits 0-7, ..., d in bits 24-31). On sm_89 and
// later the hardware conversion does two at a time: cvt.rn.satfinite.e4m3x2.f32 matches spec
// 2.1 bit for bit (measured on sm_90a, spec section 8: every NaN to 0x7f, infinities to
// 0x7e / 0xfe, the same rounding and saturation); the GPU quantization test checks it on every
// 16-bit input pattern. Its first operand goes to the high byte.
__device__ __forceinline__ u32 moe_f32x4_to_e4m3x4(float a, float b, float c, float d) {
#if __CUDA_ARCH__ >= 890
    unsigned short lo, hi;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(lo) : "f"(b), "f"(a));
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(hi) : "f"(d), "f"(c));
    return (u32)lo | ((u32)hi << 16);
#else
    return (u32)moe_f32_to_e4m3(a) | ((u32)moe_f32_to_e4m3(b) << 8) | ((u32)moe_f32_to_e4m3(c) << 16) |
           ((u32)moe_f32_to_e4m3(d) << 24);
#endif
}

// Exact decode; both NaN codes give a positive quiet NaN (spec 2.1).
__device__ __forceinline__ float moe_e4m3_to_f32(u8 code) {
    const u32 mag = code & 0x7fu;
    if (mag == MOE_E4M3_NAN_CODE) return __uint_as_float(0x7fc00000u);
    const u32 exp = mag >> 3;
    const u32 mant = mag & 7u;
    // Subnormal codes are mant * 2^-9 (exact: small integer times a power of two).
    const u32 bits = exp == 0 ? __float_as_uint(__fmul_rn((float)mant, 0x1p-9f))
                              : ((exp + 120u) << 23) | (mant << 20);
    return __uint_as_float(bits | ((u32)(code & 0x80u) << 24));
}

// ---------------------------------------------------------------------------------------------
// FP4 E2M1 (spec section 2.2)
// ---------------------------------------------------------------------------------------------

// Low nibble: sign in bit 3, magnitude code 0..7 for 0, 0.5, 1, 1.5, 2, 3, 4, 6, rounded to
// nearest even (the table of spec 2.2) and saturated. Hopper has no e2m1 conversion
// instruction (spec section 8), so this is the only implementation; it is branch-free integer
// work on the bits, equal to the table's comparison chain for every one of the 2^32 inputs
// (checked exhaustively against it on the CPU when it replaced that chain):
// - |v| >= 6, infinities and NaNs: 7 (step 1: NaN saturates to +6, keeping the block's other
//   elements intact);
// - |v| < 1: the codes are 2|v| rounded to an integer (0, 0.5, 1 are codes 0, 1, 2): adding
//   2^23, where the f32 spacing is 1, rounds it to nearest even in one FMA (2|v| is exact);
// - 1 <= |v| < 6: codes 2..7 are (exponent, one mantissa bit) of the value rounded to one
//   mantissa bit, which the integer round-to-nearest-even on the bits gives (a carry moves to
//   the next binade, which is the correct next code).
__device__ __forceinline__ u32 moe_f32_to_e2m1(float v) {
    const u32 b = __float_as_uint(v);
    const u32 a = b & MOE_F32_ABS;
    const u32 sign = a > MOE_F32_INF ? 0u : (b >> 28) & 0x8u;
    const u32 small = __float_as_uint(__fmaf_rn(__uint_as_float(a), 2.0f, 8388608.0f)) - 0x4b000000u;
    const u32 normal = ((a + 0x1fffffu + ((a >> 22) & 1u)) >> 22) - 252u;
    const u32 mag = a >= 0x40c00000u ? 7u : a < 0x3f800000u ? small : normal;
    return sign | mag;
}

// ---------------------------------------------------------------------------------------------
// E8M0 (spec sections 2.3 and 3.6)
// ---------------------------------------------------------------------------------------------

// Exact decode of codes 0..=254: 2^(code - 127); code 0 is the f32 subnormal 2^-127.
__device__ __forceinline__ float moe_e8m0_to_f32(u32 code) {
    return __uint_as_float(code == 0 ? 0x00400000u : code << 23);
}

// mxfp8 scale code of a block with finite amax `amax_bits` (spec 3.6 step 2): the smallest
// 2^e with amax <= 448 * 2^e, from the bits of amax (448 = 1.75 * 2^8, and 0x600000 is the
// mantissa of 1.75). Zero and subnormal amax give code 0.
__device__ __forceinline__ u32 moe_e8m0_for_amax(u32 amax_bits) {
    const i32 be = (i32)((amax_bits >> 23) & 0xffu);
    if (be == 0) return 0u;
    const i32 k = be - 8 + ((amax_bits & MOE_F32_MANT) > 0x600000u ? 1 : 0);
    return (u32)(k < 0 ? 0 : k > 254 ? 254 : k);
}

// ---------------------------------------------------------------------------------------------
// Peer-memory protocols (one_sided.cu, two_sided.cu)
// ---------------------------------------------------------------------------------------------
//
// A protocol's params struct has `status` (the device address of two u32: the code, then the
// word of the call that recorded it), `status_mirror` (the code, in host-mapped memory the host
// reads without synchronizing), `timeout_cycles` and `call_tag` (the layer's bits of its call
// words, see below). Codes: 0; `peer + 1` for a timed-out wait; MOE_STATUS_BAD_ID | token for a
// top-k row with a bad id, MOE_STATUS_BAD_WEIGHT | token for one with a weight that is not
// finite; MOE_STATUS_CALL | kind << 24 | detail << 8 | (peer + 1) for a peer's call word that
// failed the wait (kind MOE_CALL_*). Mirrored on the Rust side by
// moe_kernels::status::{KernelStatus, status_result}.
//
// Call words (moe_core::call): every flag a call raises carries its word, the round's low 16
// bits | `call_tag` (layer index << 16 | layer digest << 23); an abandoned call's word has
// MOE_ABANDONED and the reason in place of the digest. A wait reads a peer's word as: this
// call (go on), an earlier call (wait on), this call's number with another identity or
// abandoned, or a later call (fail, recording which).

#define MOE_MAX_RANKS 64

// The head of every peer-memory protocol's parameter block (moe_kernels::peer_call::PeerCall
// mirrors it field for field): the rank, its call's tensors and own buffers, and the words of
// its call. The protocol helpers below read only this part.
struct PeerCall {
    u64 peers[MOE_MAX_RANKS];  // base of every rank's workspace, peer-mapped
    u64 tokens;                // [n_tokens, hidden] 16-bit input rows
    u64 ids;                   // [n_tokens, top_k] i32
    u64 weights;               // [n_tokens, top_k] f32
    u64 owner;                 // [num_experts] i32: EP rank of each expert
    u64 send_target;           // [max_tokens, top_k] i32: the rank of each (token, k)
    u64 send_slot;             // [max_tokens, top_k] i32: its slot there, -1 when not sent
    u64 status;                // u32[2]: 0 or an error, and the call word it concerns
    u64 status_mirror;         // u32 in host-mapped memory: the first error, for the host
    u64 out;                   // [n_tokens, hidden] 16-bit: the combined output
    long long timeout_cycles;  // the bound of every wait
    i32 ep, me, max_tokens, n_tokens, top_k, hidden, input_bf16, num_experts;
    i32 combine_slot_bytes, combine_row_bytes;  // a combine row, and its slot in the region
    float fp8_static_scale, nvfp4_global_scale;
    u32 call_tag;          // the layer's bits of its call words
    u32 abandon_advances;  // the abandon kernels: 1 starts a new call, 0 abandons the one in flight
};

static_assert(sizeof(PeerCall) == 648, "PeerCall no longer matches peer_call.rs");
#define MOE_STATUS_BAD_ID 0x40000000u
#define MOE_STATUS_CALL 0x20000000u
#define MOE_STATUS_BAD_WEIGHT 0x10000000u
#define MOE_CALL_MISMATCH 1u
#define MOE_CALL_ABANDONED 2u
#define MOE_CALL_AHEAD 3u
// A count a peer wrote is out of range (detail 0).
#define MOE_CALL_CORRUPT 4u
#define MOE_SEQ_MASK 0xffffu
#define MOE_LAYER_MASK 0x7f0000u
#define MOE_ABANDONED 0x80000000u
// moe_core::call::Abandon, as an abandoned word's reason.
#define MOE_WHY_INVALID_INPUT 1u
#define MOE_WHY_TIMEOUT 3u
#define MOE_WHY_PEER_FAILED 4u

__device__ __forceinline__ u32 moe_ld_acquire_sys(const u32* p) {
    u32 v;
    asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ void moe_st_release_sys(u32* p, u32 v) {
    asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ u64 moe_ld_acquire_sys(const u64* p) {
    u64 v;
    asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}
__device__ __forceinline__ void moe_st_release_sys(u64* p, u64 v) {
    asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ u8* moe_at(u64 base, long long offset) { return (u8*)base + offset; }

// The word of call `round` of the layer whose bits are `tag`.
__device__ __forceinline__ u32 moe_call_word(u32 round, u32 tag) { return (round & MOE_SEQ_MASK) | tag; }

// Records `code` for the call whose word is `word` unless an error is recorded already, and
// mirrors the code to the host.
__device__ void moe_fail(const PeerCall& p, u32 code, u32 word = 0u) {
    if (atomicCAS((u32*)p.status, 0u, code) == 0u) {
        ((volatile u32*)p.status)[1] = word;
        *(volatile u32*)p.status_mirror = code;
        __threadfence_system();
    }
}

// Whether this rank's call recorded an error that ends it: anything but nothing (a bad input
// ends it too, the call being abandoned at its dispatch).
__device__ __forceinline__ bool moe_call_failed(const PeerCall& p) {
    return *(volatile u32*)p.status != 0u;
}

// The abandoned word of call `round`, for the error this rank recorded: its input (a bad id or
// weight), a timed-out wait, or a peer's failed call.
__device__ u32 moe_abandoned_word(const PeerCall& p, u32 round) {
    const u32 code = *(volatile u32*)p.status;
    const u32 why = (code & (MOE_STATUS_BAD_ID | MOE_STATUS_BAD_WEIGHT)) != 0u ? MOE_WHY_INVALID_INPUT
                    : (code & MOE_STATUS_CALL) != 0u                          ? MOE_WHY_PEER_FAILED
                                                                              : MOE_WHY_TIMEOUT;
    return (round & MOE_SEQ_MASK) | (p.call_tag & MOE_LAYER_MASK) | why << 23 | MOE_ABANDONED;
}

// Waits until the flag (a u32, or the low half of a u64 flag word) holds `value`, this call's
// word, for at most timeout_cycles. Returns false, recording why, when the peer's word says it
// runs another call, abandoned this one or is past it, on timeout, or when this rank recorded
// another such failure already. A bad input recorded earlier does not stop the wait: the
// dispatch that found it publishes the call abandoned instead of waiting. Nor, with
// `past_corrupt`, does a peer's corrupt data (MOE_CALL_CORRUPT) that another block recorded:
// a block that checks what the peers wrote must see their words and check its part anyway.
// With `high`, a u64 flag's high half (what the peer published with its word, such as a count)
// is stored there when the word arrives, from the same load.
template <typename Word>
__device__ bool moe_wait_flag(const Word* flag, u32 value, int peer, const PeerCall& p, bool past_corrupt = false,
                              u32* high = nullptr) {
    const long long start = clock64();
    for (;;) {
        const Word full = moe_ld_acquire_sys(flag);
        const u32 word = (u32)full;
        if (word == value) {
            if (high != nullptr) *high = (u32)((u64)full >> 32);
            return true;
        }
        const u32 ahead = (word - value) & MOE_SEQ_MASK;
        if (ahead == 0u) {
            // This call's number, another identity or abandoned: layer and digest (or reason)
            // go to the host.
            const u32 kind = (word & MOE_ABANDONED) != 0u ? MOE_CALL_ABANDONED : MOE_CALL_MISMATCH;
            moe_fail(p, MOE_STATUS_CALL | kind << 24 | ((word >> 16) & 0x7fffu) << 8 | (u32)(peer + 1), value);
            return false;
        }
        if (ahead < 0x8000u) {
            moe_fail(p, MOE_STATUS_CALL | MOE_CALL_AHEAD << 24 | ahead << 8 | (u32)(peer + 1), value);
            return false;
        }
        const u32 status = *(volatile u32*)p.status;
        const bool corrupt = (status >> 24) == (MOE_STATUS_CALL >> 24 | MOE_CALL_CORRUPT);
        if (status != 0u && (status & (MOE_STATUS_BAD_ID | MOE_STATUS_BAD_WEIGHT)) == 0u && !(past_corrupt && corrupt))
            return false;
        if (clock64() - start > p.timeout_cycles) {
            moe_fail(p, (u32)(peer + 1), value);
            return false;
        }
    }
}

// Flag arrays and blocks-done counters, shared by the protocols. A flag array at `flags_off` in
// every rank's workspace has one Word (u32, or a u64 whose low half is the flag) per source
// rank; entry `source` of rank `rank` is at `p.peers[rank] + flags_off + sizeof(Word) *
// source`. Ordering uses as few system-scope fences as the PTX memory model allows (each is a
// MEMBAR.SYS, microseconds when a whole block issues it): a barrier synchronizes the threads of
// a block, so one thread's acquire (or release) followed (or preceded) by __syncthreads()
// covers the whole block's later reads (or earlier stores).

// Called by every thread of a block: raises this rank's entry of the flag array at `flags_off`
// on every peer to `round` (a call word) with st.release.sys (one thread per peer) after a barrier, so the
// flags publish every store of the block before the call (and, in the block moe_last_block
// chose, every store of the grid).
__device__ void moe_release_flags(const PeerCall& p, int flags_off, u32 round) {
    __syncthreads();
    for (int peer = threadIdx.x; peer < p.ep; peer += blockDim.x)
        moe_st_release_sys((u32*)moe_at(p.peers[peer], flags_off + 4 * p.me), round);
}

// Called by every thread of a block: waits until every peer's entry of this rank's flag array
// at `flags_off` holds `round` (a call word; one thread per peer, bounded). Returns whether all arrived, the
// same answer in every thread; when they did, what the flags guard is visible to the whole
// block (each flag was read with acquire, and the reduction is a barrier). With `highs` (shared
// memory, a word per peer), each arrived u64 flag's high half goes to highs[peer] (moe_wait_flag).
template <typename Word = u32>
__device__ bool moe_wait_flags(const PeerCall& p, int flags_off, u32 round, bool past_corrupt = false,
                               u32* highs = nullptr) {
    bool arrived = true;
    for (int peer = threadIdx.x; peer < p.ep; peer += blockDim.x)
        arrived = moe_wait_flag((const Word*)moe_at(p.peers[p.me], flags_off + (int)sizeof(Word) * peer), round, peer,
                                p, past_corrupt, highs == nullptr ? nullptr : highs + peer) &&
                  arrived;
    return __syncthreads_and(arrived) != 0;
}

__device__ __forceinline__ float moe_half_to_f32(u16 h, int bf16) {
    return bf16 ? moe_bf16_to_f32(h) : moe_fp16_to_f32(h);
}

__device__ __forceinline__ u16 moe_f32_to_half(float v, int bf16) {
    return bf16 ? moe_f32_to_bf16(v) : moe_f32_to_fp16(v);
}

// Vectors of a token each combine thread sums, and rows whose loads it issues before it adds
// any: loads over NVLink take microseconds, so throughput comes from many in flight, and all of
// a token's rows at once (two ranks: both) rather than one row after the other. Few enough
// registers for 1024 threads per block.
#define MOE_PULL_VECTORS 2

// The combines' sum of one work item: vectors g, g + groups, ... (MOE_PULL_VECTORS of them, those
// below `vecs`) of the 16-bit rows `row_of(k)` gives for the top-k entries that were sent
// (`send_slot[k]` >= 0), summed in f32 in ascending top-k order from 0.0 (bitwise reproducible
// and the host platform's order), written to `out` (the token's output row) in the input dtype.
// Only rows that exist are added: adding a zero would turn a -0.0 sum into +0.0.
template <class RowOf>
__device__ __forceinline__ void moe_sum_rows(const i32* send_slot, const RowOf& row_of, int top_k, int g, int groups,
                                             int vecs, int bf16, uint4* out) {
    // Fully unrolled loops over u and j keep acc and the loaded vectors in registers.
    float acc[MOE_PULL_VECTORS][8];
#pragma unroll
    for (int u = 0; u < MOE_PULL_VECTORS; ++u)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[u][j] = 0.0f;
    const auto add = [&](const uint4 (&x)[MOE_PULL_VECTORS]) {
#pragma unroll
        for (int u = 0; u < MOE_PULL_VECTORS; ++u) {
            const u32 w[4] = {x[u].x, x[u].y, x[u].z, x[u].w};
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[u][j] = __fadd_rn(acc[u][j], moe_half_to_f32((u16)(w[j / 2] >> (16 * (j % 2))), bf16));
        }
    };
    const auto load = [&](const uint4* row, uint4 (&x)[MOE_PULL_VECTORS]) {
#pragma unroll
        for (int u = 0; u < MOE_PULL_VECTORS; ++u) {
            const int v = g + u * groups;
            x[u] = v < vecs ? row[v] : make_uint4(0u, 0u, 0u, 0u);
        }
    };
    // Which entries were sent is read 32 at a time, with loads that do not wait on each other:
    // a row's address then waits for one load, not for a walk through the token's plan.
    for (int k0 = 0; k0 < top_k; k0 += 32) {
        const int n = min(32, top_k - k0);
        u32 sent = 0u;
#pragma unroll 8
        for (int j = 0; j < n; ++j) sent |= (u32)(send_slot[k0 + j] >= 0) << j;
        // The window's rows two at a time.
        while (sent != 0u) {
            const int first = k0 + __ffs(sent) - 1;
            sent &= sent - 1u;
            const bool pair = sent != 0u;
            const int second = k0 + __ffs(sent) - 1;
            if (pair) sent &= sent - 1u;
            uint4 a[MOE_PULL_VECTORS], b[MOE_PULL_VECTORS];
            load(row_of(first), a);
            if (pair) load(row_of(second), b);
            add(a);
            if (pair) add(b);
        }
    }
#pragma unroll
    for (int u = 0; u < MOE_PULL_VECTORS; ++u) {
        const int v = g + u * groups;
        if (v >= vecs) continue;
        u32 packed[4];
#pragma unroll
        for (int j = 0; j < 4; ++j)
            packed[j] = (u32)moe_f32_to_half(acc[u][2 * j], bf16) | ((u32)moe_f32_to_half(acc[u][2 * j + 1], bf16) << 16);
        out[v] = make_uint4(packed[0], packed[1], packed[2], packed[3]);
    }
}

// The combines' work, one item per (token, group of vectors, `groups` apart so that
// neighbouring threads read neighbouring 16-byte vectors), grid-strided: each token's rows, one
// per top-k entry that was sent (`send_slot` >= 0) at `row_at(target, slot)`, summed by
// moe_sum_rows into the token's row of `p.out`.
template <class RowAt>
__device__ __forceinline__ void moe_combine_tokens(const PeerCall& p, const RowAt& row_at) {
    const int vecs = p.hidden / 8;  // 8 16-bit elements per 16-byte vector
    const int groups = (vecs + MOE_PULL_VECTORS - 1) / MOE_PULL_VECTORS;
    const long long items = (long long)p.n_tokens * groups;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long item = (long long)blockIdx.x * blockDim.x + threadIdx.x; item < items; item += stride) {
        const int t = (int)(item / groups), g = (int)(item % groups);
        const i32* send_target = (const i32*)p.send_target + (long long)t * p.top_k;
        const i32* send_slot = (const i32*)p.send_slot + (long long)t * p.top_k;
        const auto row_of = [&](int k) { return row_at(send_target[k], send_slot[k]); };
        moe_sum_rows(send_slot, row_of, p.top_k, g, groups, vecs, p.input_bf16,
                     (uint4*)moe_at(p.out, (long long)t * p.hidden * 2));
    }
}

// Called by every thread: counts this block done on `done` and returns how many blocks of the
// grid counted themselves before it (the same in every thread): gridDim.x - 1 in the block
// that finishes last (moe_last_block). Each block's thread 0 fences at system scope after the
// barrier that follows the block's stores, then counts with an acquire atomic: a release
// pattern (fence, then the count) that the last block's count acquires at GPU scope, which
// holds every block of the grid. Causality order is transitive across scopes, so a
// system-scope release by any thread of the last block after this returns (ordered after the
// count by the barrier) covers every block's stores, without a second system fence.
__device__ u32 moe_block_ticket(u32* done) {
    __shared__ u32 ticket;
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence_system();
        asm volatile("atom.add.acquire.gpu.global.u32 %0, [%1], 1;" : "=r"(ticket) : "l"(done) : "memory");
    }
    __syncthreads();
    return ticket;
}

__device__ __forceinline__ bool moe_last_block(u32* done) { return moe_block_ticket(done) == gridDim.x - 1; }

// ---------------------------------------------------------------------------------------------
// Row copies and the 128x4 scale layout (spec section 5), shared by the delivery kernels and
// the experts that read what they deliver
// ---------------------------------------------------------------------------------------------

// Copies `bytes` bytes with the whole block, with the widest accesses both addresses and the
// length allow.
__device__ __forceinline__ void moe_copy_row(u8* dst, const u8* src, int bytes) {
    if (bytes % 16 == 0 && ((u64)dst | (u64)src) % 16 == 0) {
        for (int v = threadIdx.x; v < bytes / 16; v += blockDim.x) ((uint4*)dst)[v] = ((const uint4*)src)[v];
    } else if (bytes % 4 == 0 && ((u64)dst | (u64)src) % 4 == 0) {
        for (int v = threadIdx.x; v < bytes / 4; v += blockDim.x) ((u32*)dst)[v] = ((const u32*)src)[v];
    } else {
        for (int v = threadIdx.x; v < bytes; v += blockDim.x) dst[v] = src[v];
    }
}

// Bytes of the 128x4 swizzle of a [rows, cols] matrix: whole tiles of 128 rows by 4 columns
// (moe_quant::swizzle::swizzled_len).
__device__ __forceinline__ u64 moe_swizzled_len_128x4(u32 rows, u32 cols) {
    return ((u64)rows + 127) / 128 * 128 * (((u64)cols + 3) / 4 * 4);
}

// Offset of scale `col` of row `row` in the 128x4 swizzle of a matrix of `cols` scales per row
// (moe_quant::swizzle::offset_128x4).
__device__ __forceinline__ u64 moe_swizzled_offset_128x4(u32 row, u32 col, u32 cols) {
    const u64 col_tiles = ((u64)cols + 3) / 4;
    return (u64)(row / 128) * col_tiles * 512 + (u64)(col / 4) * 512 + (row % 32) * 16 + (row % 128 / 32) * 4 +
           col % 4;
}
