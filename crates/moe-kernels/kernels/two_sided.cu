// two_sided.cu: the nvlink-two-sided protocol on GPUs (the host platform runs the same one in
// backend-nvlink-two-sided; the workspace layout and slot layout come from the Rust side as
// byte offsets, so both platforms use one layout and deliver the same rows in the same order).
// Compiled after common.cuh and quant.cuh, specialized on the wire scheme: dispatch quantizes
// each token on the way into every destination's slot, as the one-sided dispatch does.
//
// A call is: plan, dispatch, [experts], combine_send, combine_reduce, all on the rank's stream,
// so no step needs the host: the round lives in device memory and a CUDA graph of the sequence
// replays correctly. One round per call: every flag of the call carries it.
//
//   plan            starts the call's round (round += 1, blocks-done counter = 0), numbers
//                   every send exactly as the host's SendPlan (per destination, in token
//                   order), writes this rank's send counts into row `me` of every peer's
//                   [ep, ep] count matrix and raises its counts flag there
//   dispatch        waits for every peer's counts, quantizes each token and writes it once per
//                   destination rank into that rank's dense receive region, raises its data
//                   flag on every peer and waits for every peer's; its last block zeroes the
//                   blocks-done counter for combine_send
//   combine_send    writes the expert output of each received row back into its source's dense
//                   combine region (the reverse all-to-all-v) and raises its combine flag there
//   combine_reduce  waits for every peer's replies, then sums each token's replies in f32 in
//                   ascending top-k order and writes the input dtype
//
// The round and the counter are reset inside plan and dispatch, not by kernels of their own: a
// launch costs the host 4-7 us on the machines we measure (docs/BENCHMARKS.md).
//
// Ordering (common.cuh): data stores to a peer, then a system fence in every block before it
// counts itself done; the last block then raises the flags with st.release.sys. Waiters load
// flags with ld.acquire.sys, and a barrier extends that to their block. No
// block ever waits for another block of its own grid, so any grid size is deadlock-free; the
// waits are all on other GPUs' kernels (or on this rank's earlier kernels, already finished).
// Every wait is bounded: on timeout the waiter records `peer + 1` in the status word and
// returns, and the host reports the rank instead of hanging.
//
// Status (common.cuh): the first error wins and is stored into the host-mapped mirror, which
// the host reads without synchronizing. A bad id in a device input (the plan kernel checks the
// ids) makes the plan publish the call abandoned, a weight that is not finite (each dispatch
// block checks its tokens' weights after sending them) the dispatch; a wait that fails (timeout, or a
// peer's word of another call, abandoned or past this one), or a count from a peer above
// max_tokens, marks it abandoned in every flag this rank raises at its peers, so every peer
// fails the same call; the later kernels of a failed call do nothing.

// Threads of the plan kernel's single block (TwoSidedLaunch::PLAN_THREADS on the Rust side).
#define MOE_PLAN_THREADS 1024
#define MOE_PLAN_WARPS (MOE_PLAN_THREADS / 32)

// Mirrors `TwoSidedParams` in crates/moe-kernels/src/two_sided.rs (repr(C)).
struct TwoSidedParams {
    PeerCall call;
    u64 done;        // u32: blocks of the running kernel that finished
    u64 expert_out;  // [ep * max_tokens, hidden] 16-bit: the experts' rows
    long long dispatch_region_off, combine_region_off;
    i32 slot_bytes, image_bytes, weights_offset;  // DispatchLayout: image = payload + scales
    i32 round_off, counts_off, counts_flag_off, data_flag_off, combine_flag_off;
};

static_assert(sizeof(TwoSidedParams) == 712, "TwoSidedParams no longer matches two_sided.rs");

// Where the scales start in a slot: the payload rounded up to 16 bytes
// (DispatchLayout::scales_offset, SLOT_ALIGN).
constexpr u32 kScalesOffset = (kPayloadBytes + 15u) / 16u * 16u;

__device__ __forceinline__ u32 moe_round(const TwoSidedParams& p) {
    return *(volatile u32*)moe_at(p.call.peers[p.call.me], p.round_off);
}

// Called by every thread of a block: `word` (an abandoned call's) in every flag this rank
// raises at every peer.
__device__ void moe_mark_abandoned(const TwoSidedParams& p, u32 word) {
    __syncthreads();
    const int flags[3] = {p.counts_flag_off, p.data_flag_off, p.combine_flag_off};
    for (int peer = threadIdx.x; peer < p.call.ep; peer += blockDim.x)
        for (int f = 0; f < 3; ++f) moe_st_release_sys((u32*)moe_at(p.call.peers[peer], flags[f] + 4 * p.call.me), word);
}

// Called by every thread of a block: waits for every peer's word of this call in the flag
// array at `flags_off`; when one fails the call, marks it abandoned and returns false.
__device__ bool moe_wait_call(const TwoSidedParams& p, int flags_off) {
    const u32 round = moe_round(p);
    if (moe_wait_flags(p.call, flags_off, moe_call_word(round, p.call.call_tag))) return true;
    moe_mark_abandoned(p, moe_abandoned_word(p.call, round));
    return false;
}

// This rank's copy of the [ep, ep] count matrix: entry s * ep + r is what source s sends to r.
__device__ __forceinline__ const u32* moe_counts(const TwoSidedParams& p) {
    return (const u32*)moe_at(p.call.peers[p.call.me], p.counts_off);
}

// The EP rank of top-k entry k of token t, or -1 (recording the error) when the id is out of
// range or repeats an earlier entry of the row.
__device__ int moe_target_of(const TwoSidedParams& p, int t, int k) {
    const i32* ids = (const i32*)p.call.ids;
    const i32 e = ids[t * p.call.top_k + k];
    bool valid = e >= 0 && e < p.call.num_experts;
    for (int j = 0; j < k; ++j) valid = valid && ids[t * p.call.top_k + j] != e;
    if (!valid) {
        moe_fail(p.call, MOE_STATUS_BAD_ID | (u32)t);
        return -1;
    }
    return ((const i32*)p.call.owner)[e];
}

// One block of MOE_PLAN_THREADS threads. Numbers the sends as the host's SendPlan does: token
// t goes to each rank that owns one of its experts once, carried by the first top-k entry whose
// expert lives there, in the slot that counts the tokens before t sent to that rank. Tokens are
// taken a tile of blockDim.x at a time, one per thread in token order: per rank, a warp ballot
// gives each token its rank among the warp's senders, and a scan over the warps (carried from
// tile to tile) gives each warp's first slot. Then publishes the counts row to every peer.
extern "C" __global__ void __launch_bounds__(MOE_PLAN_THREADS) moe_two_sided_plan(TwoSidedParams p) {
    __shared__ u32 s_ballot[MOE_PLAN_WARPS][MOE_MAX_RANKS];  // per warp and rank: lanes sending there
    __shared__ u32 s_first[MOE_PLAN_WARPS][MOE_MAX_RANKS];   // per warp and rank: its first slot
    __shared__ u32 s_count[MOE_MAX_RANKS];                   // per rank: tokens numbered so far
    i32* send_target = (i32*)p.call.send_target;
    i32* send_slot = (i32*)p.call.send_slot;
    const int k_n = p.call.top_k;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    const u32 lanes_below = (1u << lane) - 1u;
    // The call's round (read below, after barriers) and a zeroed counter for dispatch.
    if (threadIdx.x == 0) {
        *(u32*)p.done = 0u;
        u32* round = (u32*)moe_at(p.call.peers[p.call.me], p.round_off);
        *round = *round + 1u;
    }
    for (int r = threadIdx.x; r < p.call.ep; r += blockDim.x) s_count[r] = 0u;
    __syncthreads();
    for (int tile = 0; tile < p.call.n_tokens; tile += blockDim.x) {
        const int t = tile + threadIdx.x;
        u64 targets = 0;  // bit r: the token goes to rank r (ep <= 64)
        if (t < p.call.n_tokens)
            for (int k = 0; k < k_n; ++k) {
                const int target = moe_target_of(p, t, k);
                if (target >= 0) targets |= 1ull << target;
            }
        // Every lane votes, also past n_tokens: the ballot needs the whole warp.
        for (int r = 0; r < p.call.ep; ++r) {
            const u32 b = __ballot_sync(0xffffffffu, ((targets >> r) & 1ull) != 0ull);
            if (lane == 0) s_ballot[warp][r] = b;
        }
        __syncthreads();
        for (int r = threadIdx.x; r < p.call.ep; r += blockDim.x) {
            u32 run = s_count[r];
            for (int w = 0; w < warps; ++w) {
                s_first[w][r] = run;
                run += __popc(s_ballot[w][r]);
            }
            s_count[r] = run;
        }
        __syncthreads();
        if (t < p.call.n_tokens) {
            u64 seen = 0;
            for (int k = 0; k < k_n; ++k) {
                const int target = moe_target_of(p, t, k);
                const bool first = target >= 0 && ((seen >> target) & 1ull) == 0ull;
                if (target >= 0) seen |= 1ull << target;
                send_target[t * k_n + k] = target;
                send_slot[t * k_n + k] =
                    first ? (i32)(s_first[warp][target] + __popc(s_ballot[warp][target] & lanes_below)) : -1;
            }
        }
        // The next tile overwrites s_ballot and s_first.
        __syncthreads();
    }
    const u32 round = moe_round(p);
    for (int i = threadIdx.x; i < p.call.ep * p.call.ep; i += blockDim.x) {
        const int peer = i / p.call.ep, r = i % p.call.ep;
        *(u32*)moe_at(p.call.peers[peer], p.counts_off + 4 * (p.call.me * p.call.ep + r)) = s_count[r];
    }
    // A bad input of this call (or an error of an earlier one the host has not read yet)
    // publishes the call abandoned: every peer fails it.
    if (__syncthreads_or(moe_call_failed(p.call))) {
        moe_mark_abandoned(p, moe_abandoned_word(p.call, round));
        return;
    }
    moe_release_flags(p.call, p.counts_flag_off, moe_call_word(round, p.call.call_tag));
}

// 16-byte vectors a thread of the combine copy loads before it stores any: remote stores take
// microseconds to drain, so bandwidth comes from many in flight per thread.
constexpr int kCopyUnroll = 4;

// The rows of a dispatch batch: consecutive tokens from `first`.
struct TwoSidedRows {
    const TwoSidedParams& p;
    int first;
    __device__ __forceinline__ const u16* operator()(u32 b) const {
        return (const u16*)moe_at(p.call.tokens, ((long long)first + b) * p.call.hidden * 2);
    }
};

// Where dispatch stores a unit's bytes: the token's slot at each of its destinations, payload
// then scales (the slot's image).
struct TwoSidedSink {
    const TwoSidedParams& p;
    const int (&n_dest)[MOE_BATCH_MAX];
    const u64 (&dest_row)[MOE_BATCH_MAX][MOE_MAX_RANKS];

    __device__ __forceinline__ void payload(u32 b, u32 offset, const u32 (&w)[4], u32 bytes) const {
        for (int d = 0; d < n_dest[b]; ++d) moe_store_words((u8*)dest_row[b][d] + offset, w, bytes);
    }
    __device__ __forceinline__ void scales(u32 b, u32 offset, const u32 (&w)[4], u32 bytes) const {
        for (int d = 0; d < n_dest[b]; ++d) moe_store_words((u8*)dest_row[b][d] + kScalesOffset + offset, w, bytes);
    }
};

// Grid: max(n_tokens, 1) blocks at most (a rank without tokens still raises its data flags),
// 1024 threads. Each block takes a run of consecutive tokens, in batches of moe_batch_tokens():
// it lists every token's destinations (the ranks of its sends, from the plan), then quantizes
// the batch's units in registers (quant.cuh), each stored straight into every destination's
// slot, then writes each destination's top-k tail. Source me's tokens land in rank r's dispatch
// region from row sum(counts[s][r], s < me) on, the one in slot `slot` at `+slot`: sources
// packed in rank order, as the host does.
extern "C" __global__ void __launch_bounds__(1024) moe_two_sided_dispatch(TwoSidedParams p) {
    __shared__ int s_row[MOE_MAX_RANKS];  // per rank: the first row of this rank's tokens there
    __shared__ int s_n_dest[MOE_BATCH_MAX];
    __shared__ i32 s_dest_target[MOE_BATCH_MAX][MOE_MAX_RANKS];
    __shared__ u64 s_dest_row[MOE_BATCH_MAX][MOE_MAX_RANKS];  // address of the token's slot there
    if (__syncthreads_or(moe_call_failed(p.call))) return;
    if (!moe_wait_call(p, p.counts_flag_off)) return;
    const u32* counts = moe_counts(p);
    // Counts come from peers: one above max_tokens would place rows past the regions.
    bool counts_fit = true;
    for (int i = threadIdx.x; i < p.call.ep * p.call.ep; i += blockDim.x) {
        if (counts[i] > (u32)p.call.max_tokens) {
            moe_fail(p.call, MOE_STATUS_CALL | MOE_CALL_CORRUPT << 24 | (u32)(i / p.call.ep + 1), moe_call_word(moe_round(p), p.call.call_tag));
            counts_fit = false;
        }
    }
    if (!__syncthreads_and(counts_fit)) {
        moe_mark_abandoned(p, moe_abandoned_word(p.call, moe_round(p)));
        return;
    }
    for (int r = threadIdx.x; r < p.call.ep; r += blockDim.x) {
        u32 row = 0;
        for (int s = 0; s < p.call.me; ++s) row += counts[s * p.call.ep + r];
        s_row[r] = (int)row;
    }
    const i32* ids = (const i32*)p.call.ids;
    const float* weights = (const float*)p.call.weights;
    const i32* owner = (const i32*)p.call.owner;
    const i32* send_target = (const i32*)p.call.send_target;
    const i32* send_slot = (const i32*)p.call.send_slot;
    const int k_n = p.call.top_k;
    // ids, then weights, each padded to 16 bytes (DispatchLayout).
    const int tail_words = (p.weights_offset - p.image_bytes) / 4;
    const int per_block = (p.call.n_tokens + (int)gridDim.x - 1) / (int)gridDim.x;
    const int begin = (int)blockIdx.x * per_block, end = min(p.call.n_tokens, begin + per_block);
    const int per_pass = (int)moe_batch_tokens();
    for (int first = begin; first < end; first += per_pass) {
        const int count = min(per_pass, end - first);
        const TwoSidedRows rows{p, first};
        moe_prefetch_rows(rows, (u32)count);
        for (int b = threadIdx.x; b < count; b += blockDim.x) s_n_dest[b] = 0;
        // Also orders s_row's writes before the reads below.
        __syncthreads();
        for (int i = threadIdx.x; i < count * k_n; i += blockDim.x) {
            const int t = first + i / k_n;
            const int slot = send_slot[t * k_n + i % k_n];
            if (slot < 0) continue;
            const int target = send_target[t * k_n + i % k_n];
            // The destinations' order does not matter: each gets the same bytes.
            const int d = atomicAdd(&s_n_dest[i / k_n], 1);
            s_dest_target[i / k_n][d] = target;
            s_dest_row[i / k_n][d] =
                (u64)moe_at(p.call.peers[target], p.dispatch_region_off + (long long)(s_row[target] + slot) * p.slot_bytes);
        }
        __syncthreads();
        const TwoSidedSink sink{p, s_n_dest, s_dest_row};
        moe_quantize_batch(rows, (u32)count, sink, p.call.fp8_static_scale, p.call.nvfp4_global_scale);
        // Every destination's tail: -1 / 0.0 for experts it does not own (the contract's
        // convention) and zero padding, as moe_core::slots::write_routing writes.
        for (int i = threadIdx.x; i < count * p.call.ep * tail_words; i += blockDim.x) {
            const int j = i % tail_words, d = i / tail_words % p.call.ep, b = i / (tail_words * p.call.ep);
            if (d >= s_n_dest[b]) continue;
            const int t = first + b, target = s_dest_target[b][d];
            i32 id = j < k_n ? -1 : 0;
            float w = 0.0f;
            if (j < k_n) {
                const i32 e = ids[t * k_n + j];
                if (e >= 0 && e < p.call.num_experts && owner[e] == target) {
                    id = e;
                    w = weights[t * k_n + j];
                }
            }
            u8* dst = (u8*)s_dest_row[b][d];
            ((i32*)(dst + p.image_bytes))[j] = id;
            ((float*)(dst + p.weights_offset))[j] = w;
        }
        // The next batch rewrites the tables.
        __syncthreads();
    }
    // Every weight of the block's tokens must be finite, or the call is abandoned. Checked here,
    // apart from the loop above: in its tails loop, the check made the compiler lay the
    // quantization out again (four more copies of the division's slow path for nvfp4).
    for (int i = begin * k_n + threadIdx.x; i < end * k_n; i += blockDim.x)
        if (moe_not_finite(weights[i]))
            moe_fail(p.call, MOE_STATUS_BAD_WEIGHT | (u32)(i / k_n));
    if (!moe_last_block((u32*)p.done)) return;
    // Every block has counted itself; combine_send (the next kernel) counts from zero.
    if (threadIdx.x == 0) *(u32*)p.done = 0u;
    if (__syncthreads_or(moe_call_failed(p.call))) {
        moe_mark_abandoned(p, moe_abandoned_word(p.call, moe_round(p)));
        return;
    }
    moe_release_flags(p.call, p.data_flag_off, moe_call_word(moe_round(p), p.call.call_tag));
    moe_wait_call(p, p.data_flag_off);
}

// Grid: any, 1024 threads. Received row i from source s (rows of s start at sum(counts[s'][me],
// s' < s)) is s's reply row sum(counts[s][r], r < me) + (i - that start): replies packed in
// receiver order, as the host does. The rows are one stream of 16-byte vectors, each thread
// loading kCopyUnroll before it stores any. Then tells every peer its replies are written.
extern "C" __global__ void __launch_bounds__(1024) moe_two_sided_combine_send(TwoSidedParams p) {
    __shared__ int s_start[MOE_MAX_RANKS + 1];  // per source: its first received row; then the total
    __shared__ int s_reply[MOE_MAX_RANKS];      // per source: this rank's first reply row there
    const u32* counts = moe_counts(p);
    for (int s = threadIdx.x; s <= p.call.ep; s += blockDim.x) {
        u32 start = 0;
        for (int q = 0; q < s; ++q) start += counts[q * p.call.ep + p.call.me];
        s_start[s] = (int)start;
        if (s < p.call.ep) {
            u32 reply = 0;
            for (int r = 0; r < p.call.me; ++r) reply += counts[s * p.call.ep + r];
            s_reply[s] = (int)reply;
        }
    }
    __syncthreads();
    const int vecs = p.call.combine_row_bytes / 16;
    const long long items = (long long)s_start[p.call.ep] * vecs;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long base = (long long)blockIdx.x * blockDim.x + threadIdx.x; base < items; base += kCopyUnroll * stride) {
        uint4 x[kCopyUnroll];
#pragma unroll
        for (int u = 0; u < kCopyUnroll; ++u) {
            const long long item = base + u * stride;
            if (item < items) x[u] = ((const uint4*)p.expert_out)[item];
        }
#pragma unroll
        for (int u = 0; u < kCopyUnroll; ++u) {
            const long long item = base + u * stride;
            if (item >= items) break;
            const int row = (int)(item / vecs);
            // The source whose rows hold `row`; s_start[ep] > row ends the search.
            int s = 0;
            while (s_start[s + 1] <= row) ++s;
            uint4* dst = (uint4*)moe_at(
                p.call.peers[s], p.combine_region_off + (long long)(s_reply[s] + row - s_start[s]) * p.call.combine_slot_bytes);
            dst[item % vecs] = x[u];
        }
    }
    if (!moe_last_block((u32*)p.done)) return;
    // A failed dispatch abandoned the call: the replies copied above are not raised (checked
    // here, once, rather than by every block before its copy: they are harmless unraised).
    if (__syncthreads_or(moe_call_failed(p.call))) {
        moe_mark_abandoned(p, moe_abandoned_word(p.call, moe_round(p)));
        return;
    }
    moe_release_flags(p.call, p.combine_flag_off, moe_call_word(moe_round(p), p.call.call_tag));
}

// Grid: any (every block waits for the replies itself), 1024 threads. Sums each token's
// replies from the ranks it went to (moe_sum_rows: ascending top-k order from 0.0, bitwise the
// host's sum) and writes the input dtype. Reply of (token, k) sent to rank r in slot `slot` is
// row sum(counts[me][r'], r' < r) + slot of this rank's combine region (moe_combine_tokens).
extern "C" __global__ void __launch_bounds__(1024) moe_two_sided_combine_reduce(TwoSidedParams p) {
    __shared__ int s_reply[MOE_MAX_RANKS];  // per receiver: its first reply row here
    // After a failed dispatch the peers' combine flags hold their abandonment marks, or this
    // rank's status stops the wait at once.
    if (!moe_wait_call(p, p.combine_flag_off)) return;
    const u32* counts = moe_counts(p);
    for (int r = threadIdx.x; r < p.call.ep; r += blockDim.x) {
        u32 reply = 0;
        for (int q = 0; q < r; ++q) reply += counts[p.call.me * p.call.ep + q];
        s_reply[r] = (int)reply;
    }
    __syncthreads();
    // This rank's replies, read once rather than per row through the peers array.
    const u8* const replies = moe_at(p.call.peers[p.call.me], p.combine_region_off);
    const long long slot_bytes = p.call.combine_slot_bytes;
    moe_combine_tokens(p.call, [&](int target, int slot) {
        return (const uint4*)(replies + (s_reply[target] + slot) * slot_bytes);
    });
}

// One block: a call this rank does not run (its input was refused before the plan), or the
// call in flight (its experts failed), marked abandoned in every flag this rank raises at its
// peers. `call_tag` is the abandoned call's tag (MOE_ABANDONED and the reason);
// `abandon_advances` 1 starts the call (the round counter's + 1), 0 keeps the call in flight.
extern "C" __global__ void moe_two_sided_abandon(TwoSidedParams p) {
    __shared__ u32 s_round;
    if (threadIdx.x == 0) {
        u32* round = (u32*)moe_at(p.call.peers[p.call.me], p.round_off);
        s_round = *round + p.call.abandon_advances;
        *round = s_round;
    }
    __syncthreads();
    moe_mark_abandoned(p, (s_round & MOE_SEQ_MASK) | p.call.call_tag);
}
