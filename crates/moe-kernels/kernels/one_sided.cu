// one_sided.cu: the nvlink-one-sided protocol on GPUs (the host platform runs the same one in
// backend-nvlink-one-sided; the workspace layout and slot layout come from the Rust side as
// byte offsets, so both platforms use one layout). Compiled after common.cuh and quant.cuh, so
// the module is specialized on the wire scheme like the quantization kernel.
//
// A call is: dispatch, [experts write their rows into this rank's combine region], combine,
// all on the rank's stream, so no step needs the host: the round and the send counters live in
// device memory (dispatch's last block advances the one, which combine uses too, and resets
// the other for the next call) and a CUDA graph of the sequence replays correctly.
//
// Dispatch quantizes each token on the way (fused quantize-and-send): a thread quantizes a unit
// of a token in registers (quant.cuh) and stores it into every destination's slot, so the
// quantized tokens never make a round trip through memory. A 16-bit wire scheme equal to the
// input dtype sends the input row as it is.
//
// Ordering (common.cuh): data stores to a peer, then a system fence in every block before it
// counts itself done; the last block then stores each peer's count and the round in one 8-byte
// dispatch word with st.release.sys (a separate count store would need its own round trip to
// become visible before the flag). Waiters load flags with ld.acquire.sys. Every wait is bounded: on
// timeout the waiter records `peer + 1` in the status word and returns, and the host reports
// the rank instead of hanging.
//
// Status (common.cuh): the first error wins and is stored into the host-mapped mirror, which
// the host reads without synchronizing. A bad id or weight in a device input (the host does not
// read them, so the kernel checks them) makes the dispatch publish the call abandoned; a wait
// that fails (timeout, or a peer's word of another call, abandoned or past this one) marks it
// abandoned in every flag this rank raises at its peers, so every peer fails the same call.
// What the peers wrote is checked before the experts read it in place (each count in dispatch's
// last block, every id by the last blocks of dispatch, see moe_check_blocks): a count or an id
// out of range fails the call the same way, naming the source.

#define MOE_MAX_TOPK 32

// Mirrors `OneSidedParams` in crates/moe-kernels/src/one_sided.rs (repr(C)).
struct OneSidedParams {
    PeerCall call;
    i32 payload_bytes, scale_bytes;  // one slot's row in the payload and scales regions
    // The dispatch words at dispatch_flag_off have 8 bytes per source (the round's word, then
    // the count); the other arrays have 4 bytes per source.
    i32 round_off, dispatch_flag_off, combine_flag_off, padded_tail_off;
    i32 payload_region_off, scales_region_off, ids_region_off, weights_region_off, combine_region_off;
    u64 counters;  // [ep + 1] u32: per-target send counters, then blocks done
    u64 trace;     // 0, or u64[MOE_TRACE_WORDS]: phase stamps of the call (see moe_trace_*)
};

static_assert(sizeof(OneSidedParams) == 712, "OneSidedParams no longer matches one_sided.rs");

// Phase stamps for profiling (moe_kernels::one_sided::TracePoint mirrors the indices): when
// `trace` is set, thread 0 of a block records %globaltimer (ns) at each point, the earliest
// block's at the kernels' starts and the latest block's (or the last block's) elsewhere, so a
// profile shows where a call's time goes without changing what it does. The host resets the
// words before a call (starts to ~0, the others to 0).
#define MOE_TRACE_WORDS 16
enum MoeTracePoint {
    kTraceDispatchStart = 0,    // earliest block enters dispatch
    kTraceRouted = 1,           // latest block has its batch's slots and destinations
    kTraceSent = 2,             // latest block has issued all its stores
    kTraceLast = 3,             // the last block knows it is last (every block fenced)
    kTracePublished = 4,        // the last block has released the dispatch words
    kTracePeersSeen = 5,        // the last block has every peer's dispatch word
    kTraceDispatchDone = 6,     // the latest checker (moe_check_blocks) has checked its ids
    kTraceChecking = 7,         // the latest checker's wait for the peers' words has ended
    kTraceCombineStart = 8,     // earliest block enters combine
    kTraceCombineReleased = 9,  // latest block has raised its combine flags
    kTraceCombineSeen = 10,     // latest block has every peer's combine flag
    kTraceCombineDone = 11,     // latest block has written its sums
    kTracePadded = 12,          // the last block has reset the unfilled rows
};

__device__ __forceinline__ u64 moe_globaltimer() {
    u64 t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// Called by thread 0 (or any one thread) of a block.
__device__ __forceinline__ void moe_trace_first(const OneSidedParams& p, MoeTracePoint point) {
    if (p.trace != 0) atomicMin((unsigned long long*)p.trace + point, (unsigned long long)moe_globaltimer());
}
__device__ __forceinline__ void moe_trace_latest(const OneSidedParams& p, MoeTracePoint point) {
    if (p.trace != 0) atomicMax((unsigned long long*)p.trace + point, (unsigned long long)moe_globaltimer());
}

__device__ __forceinline__ u32* moe_round_word(const OneSidedParams& p) {
    return (u32*)moe_at(p.call.peers[p.call.me], p.round_off);
}

// Called by every thread of a block: `word` (an abandoned call's) in every flag this rank
// raises at every peer: the low half of its dispatch word, and its combine flag.
__device__ void moe_mark_abandoned(const OneSidedParams& p, u32 word) {
    __syncthreads();
    for (int peer = threadIdx.x; peer < p.call.ep; peer += blockDim.x) {
        moe_st_release_sys((u32*)moe_at(p.call.peers[peer], p.dispatch_flag_off + 8 * p.call.me), word);
        moe_st_release_sys((u32*)moe_at(p.call.peers[peer], p.combine_flag_off + 4 * p.call.me), word);
    }
    // The padded tails assumed the call's rows; peers may have stored some: reset every
    // unfilled row at the next dispatch.
    if (threadIdx.x == 0) *(volatile u32*)(moe_at(p.call.peers[p.call.me], p.padded_tail_off + 4 * p.call.ep)) = 0u;
}

// Last block of dispatch, after every peer's flag: a source's count above max_tokens fails the
// call (MOE_CALL_CORRUPT, detail 0, naming the source) and every row of that source becomes
// padding; the slots no token filled this round must read as padding (ids -1, weights 0)
// because the experts read the regions in place. The ids of the filled rows are checked next
// (moe_check_ids).
//
// Resets the rows between each source's count and its padded tail (rows known to be padding
// already), then records the new tail. The tails count rows of a layer of `max_tokens` slots
// per source, recorded after them (padded_tails[ep]): after a round of a layer of another
// max_tokens sharing the workspace they say nothing, and every unfilled row is reset. No peer
// writes here again before this rank's combine publish, which stream order puts after this
// kernel. `peer_count[s]`: the count in source s's dispatch word, as the wait for it loaded it.
__device__ void moe_pad_unfilled(const OneSidedParams& p, const u32* peer_count) {
    // Every source's rows to reset are found at once, one thread per source, so the reset waits
    // for one round of loads and two barriers however many ranks there are.
    __shared__ int s_count[MOE_MAX_RANKS], s_end[MOE_MAX_RANKS];
    u8* me = (u8*)p.call.peers[p.call.me];
    const int k = p.call.top_k;
    u32* frame = (u32*)(me + p.padded_tail_off + 4 * p.call.ep);
    u32* tails = (u32*)(me + p.padded_tail_off);
    for (int s = threadIdx.x; s < p.call.ep; s += blockDim.x) {
        const bool same_frame = *(volatile u32*)frame == (u32)p.call.max_tokens;
        const u32 count = peer_count[s];
        const bool corrupt = count > (u32)p.call.max_tokens;
        if (corrupt) moe_fail(p.call, MOE_STATUS_CALL | MOE_CALL_CORRUPT << 24 | (u32)(s + 1));
        s_count[s] = corrupt ? 0 : (int)count;
        // A source whose count is corrupt may have written any of its rows: reset them all.
        const bool tail_known = same_frame && !corrupt;
        s_end[s] = p.call.max_tokens - (tail_known ? (int)min(*(volatile u32*)(tails + s), (u32)p.call.max_tokens) : 0);
    }
    // Every read of the frame and the tails is before their writes below.
    __syncthreads();
    i32* ids_region = (i32*)(me + p.ids_region_off);
    float* weights_region = (float*)(me + p.weights_region_off);
    for (int s = 0; s < p.call.ep; ++s) {
        const long long first = (long long)s * p.call.max_tokens;
        i32* ids = ids_region + first * k;
        float* weights = weights_region + first * k;
        for (long long i = (long long)s_count[s] * k + threadIdx.x; i < (long long)s_end[s] * k; i += blockDim.x) {
            ids[i] = -1;
            weights[i] = 0.0f;
        }
    }
    for (int s = threadIdx.x; s < p.call.ep; s += blockDim.x) tails[s] = (u32)(p.call.max_tokens - s_count[s]);
    if (threadIdx.x == 0) *frame = (u32)p.call.max_tokens;
}

// Experts whose owner the check reads from shared memory (the others', from global memory).
#define MOE_CHECK_OWNERS 1024

// Whether `id`, read from a peer, is -1 or an expert this rank owns.
__device__ __forceinline__ bool moe_id_is_ours(const OneSidedParams& p, const i32* s_owner, i32 id) {
    if (id == -1) return true;
    if (id < 0 || id >= p.call.num_experts) return false;
    const i32 owner = id < MOE_CHECK_OWNERS ? s_owner[id] : ((const i32*)p.call.owner)[id];
    return owner == p.call.me;
}

// Quads of ids (4 consecutive ids, one 16-byte load) a thread of the check loads before it
// checks any; MOE_CHECK_IDS_PER_THREAD is defined in front of this file by source.rs, whose
// launcher sizes dispatch's grid by it.
#define MOE_CHECK_QUADS (MOE_CHECK_IDS_PER_THREAD / 4)
// The status of a filled row with a foreign id; the low byte is the source + 1.
#define MOE_CORRUPT_ID (MOE_STATUS_CALL | MOE_CALL_CORRUPT << 24 | 1u << 8)

// The blocks of dispatch that check the ids the peers wrote besides the last block (which
// publishes, waits and resets the unfilled rows): the ones that finish sending just before it,
// enough that each thread checks MOE_CHECK_IDS_PER_THREAD of the ids of the peers' slots (this
// rank's own rows are not checked, see moe_check_ids), the rest of the grid at most; none in a
// grid of one block, whose block checks them all. One block alone reads 64 Ki ids in about 20 us, and a kernel of its own after
// dispatch costs a launch on the host and a gap on the stream; these blocks are on the SMs
// already, and each check is a few dependent loads once the peers' words are in, beside the
// last block's reset rather than after it. (32-bit: at most 64 ranks x 65536 tokens x 32 ids.)
__device__ __forceinline__ u32 moe_check_blocks(const OneSidedParams& p) {
    const u32 ids = (u32)max(p.call.ep - 1, 1) * (u32)p.call.max_tokens * (u32)p.call.top_k;
    const u32 per_block = blockDim.x * MOE_CHECK_IDS_PER_THREAD;
    return min(gridDim.x - 1, max(1u, (ids + per_block - 1) / per_block));
}

// Called by every thread of a checker, before it waits for the peers: the owners of the first
// MOE_CHECK_OWNERS experts into `s_owner`, so the check after the wait reads them from shared
// memory.
__device__ void moe_load_owners(const OneSidedParams& p, i32* s_owner) {
    for (int e = threadIdx.x; e < min(p.call.num_experts, MOE_CHECK_OWNERS); e += blockDim.x)
        s_owner[e] = ((const i32*)p.call.owner)[e];
}

// The place in the ids region of id `i` of those a check covers, every source's in rank order
// but source `skip`'s (none where `skip` < 0), and its source. 32-bit: at most 64 ranks x 65536
// tokens x 32 ids.
__device__ __forceinline__ u32 moe_checked_id(u32 i, u32 source_ids, int skip, u32* source) {
    u32 s = i / source_ids;
    const u32 in_source = i - s * source_ids;
    if (skip >= 0 && s >= (u32)skip) ++s;
    *source = s;
    return s * source_ids + in_source;
}

// Called by every thread of a checker (moe_check_blocks) once its wait for the peers' dispatch
// words ended, after moe_load_owners: what the peers wrote is checked before the experts read
// it in place (zero-copy), part `part` of `parts`: the rows each peer filled (`peer_count`, as
// the wait loaded it), or with `every_row` (the wait failed, so the counts say nothing) every
// row of every source, this rank's too (its unfilled rows were not reset). This rank's own
// rows were written by this dispatch from its own routing, so they are not checked otherwise.
// Every id of a checked row must be -1 or an expert this rank owns; a row with any other id
// becomes padding and fails the call (MOE_CALL_CORRUPT, detail 1, naming the source, unless it
// failed already), so no expert sees an id it could index out of range with. Returns whether
// this block found one (the same answer in every thread); the caller then abandons the call at
// every peer.
//
// Whatever else failed the call, every checker checks its part: the experts may run before the
// host reads the status, and every bad row must be padding by then. A source whose count is
// out of range is skipped (moe_pad_unfilled makes all its rows padding and fails the call).
// Each thread's ids are at fixed places of the region, so its loads wait for nothing but the
// peers' words.
__device__ bool moe_check_ids(const OneSidedParams& p, const i32* s_owner, const u32* peer_count, int part, int parts,
                              bool every_row) {
    u8* me = (u8*)p.call.peers[p.call.me];
    const u32 k = (u32)p.call.top_k;
    const u32 source_ids = (u32)p.call.max_tokens * k;
    const int skip = every_row ? -1 : p.call.me;
    const u32 total = (u32)(every_row ? p.call.ep : p.call.ep - 1) * source_ids;
    // The ids of source s's filled rows (none for a count out of range).
    const auto filled_ids = [&](u32 s) -> u32 {
        const u32 count = peer_count[s];
        return every_row ? source_ids : count > (u32)p.call.max_tokens ? 0u : count * k;
    };
    i32* ids_region = (i32*)(me + p.ids_region_off);
    float* weights_region = (float*)(me + p.weights_region_off);
    // A quad (4 ids, one 16-byte load) lies in one source where each source's ids are a
    // multiple of 4 from a 16-byte aligned region; otherwise each id is placed on its own.
    const bool vector = ((u64)ids_region & 15u) == 0 && source_ids % 4 == 0;
    const u32 per_block = blockDim.x * MOE_CHECK_QUADS;
    bool corrupt = false;
    for (u32 base = (u32)part * per_block; 4 * base < total; base += (u32)parts * per_block) {
        u32 filled[MOE_CHECK_QUADS];  // bit j: id j of the quad is in a filled row
        i32 id[MOE_CHECK_QUADS][4];
#pragma unroll
        for (int u = 0; u < MOE_CHECK_QUADS; ++u) {
            const u32 first = 4 * (base + (u32)u * blockDim.x + threadIdx.x);
            filled[u] = 0u;
            if (vector) {
                u32 s;
                const u32 at = moe_checked_id(first, source_ids, skip, &s);
                if (first < total) {
                    const u32 in_source = at - s * source_ids, n = filled_ids(s);
                    filled[u] = n <= in_source ? 0u : n - in_source >= 4u ? 15u : (1u << (n - in_source)) - 1u;
                }
                if (filled[u] != 0u) {
                    const int4 v = *(const int4*)(ids_region + at);
                    id[u][0] = v.x, id[u][1] = v.y, id[u][2] = v.z, id[u][3] = v.w;
                }
            } else {
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    u32 s;
                    const u32 at = moe_checked_id(first + j, source_ids, skip, &s);
                    if (first + j < total && at - s * source_ids < filled_ids(s)) {
                        filled[u] |= 1u << j;
                        id[u][j] = ids_region[at];
                    }
                }
            }
        }
#pragma unroll
        for (int u = 0; u < MOE_CHECK_QUADS; ++u) {
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                if ((filled[u] >> j & 1u) == 0u || moe_id_is_ours(p, s_owner, id[u][j])) continue;
                u32 source;
                const u32 row = moe_checked_id(4 * (base + (u32)u * blockDim.x + threadIdx.x) + j, source_ids, skip, &source) / k;
                moe_fail(p.call, MOE_CORRUPT_ID | (source + 1));
                corrupt = true;
                // Threads finding bad ids of one row store the same padding.
                for (u32 i = 0; i < k; ++i) {
                    ids_region[row * k + i] = -1;
                    weights_region[row * k + i] = 0.0f;
                }
            }
        }
    }
    return __syncthreads_or(corrupt) != 0;
}

// Called by every thread of dispatch's last block, once every other block has counted itself
// done (the counters are final): publishes each peer's count with call `round`, leaves the
// counters at zero for the next call, waits for every peer's word and resets the unfilled
// rows. A bad input of this call (or an error of an earlier one the host has not read yet)
// publishes the call abandoned: every peer fails it. Returns whether every peer's word of the
// call was seen (false: the call is abandoned at every peer already).
__device__ bool moe_dispatch_last_block(const OneSidedParams& p, u32 round, u32* peer_count) {
    u32* counters = (u32*)p.counters;
    if (threadIdx.x == 0) moe_trace_latest(p, kTraceLast);
    const bool refused = __syncthreads_or(moe_call_failed(p.call)) != 0;
    const u32 word = refused ? moe_abandoned_word(p.call, round) : moe_call_word(round, p.call.call_tag);
    for (int peer = threadIdx.x; peer < p.call.ep; peer += blockDim.x) {
        const u32 count = atomicAdd(&counters[peer], 0u);
        moe_st_release_sys((u64*)moe_at(p.call.peers[peer], p.dispatch_flag_off + 8 * p.call.me), ((u64)count << 32) | word);
    }
    __syncthreads();
    if (threadIdx.x == 0) moe_trace_latest(p, kTracePublished);
    for (int i = threadIdx.x; i <= p.call.ep; i += blockDim.x) counters[i] = 0u;
    if (threadIdx.x == 0) *moe_round_word(p) = round;
    const bool seen = !refused && moe_wait_flags<u64>(p.call, p.dispatch_flag_off, word, true, peer_count);
    if (!seen) {
        moe_mark_abandoned(p, refused ? word : moe_abandoned_word(p.call, round));
        return false;
    }
    if (threadIdx.x == 0) moe_trace_latest(p, kTracePeersSeen);
    // A count out of range fails the call here. The checkers read only the rows the peers
    // filled, and this resets only the others.
    moe_pad_unfilled(p, peer_count);
    if (threadIdx.x == 0) moe_trace_latest(p, kTracePadded);
    return true;
}

// Where dispatch stores a unit's bytes: the token's slot at each of its destinations.
struct DispatchSink {
    const OneSidedParams& p;
    const int (&n_dest)[MOE_BATCH_MAX];
    const i32 (&dest_target)[MOE_BATCH_MAX][MOE_MAX_TOPK];
    const i32 (&dest_slot)[MOE_BATCH_MAX][MOE_MAX_TOPK];

    __device__ __forceinline__ u8* slot_row(u32 b, int d, int region_off, int row_bytes) const {
        const long long at = (long long)p.call.me * p.call.max_tokens + dest_slot[b][d];
        return moe_at(p.call.peers[dest_target[b][d]], region_off + at * row_bytes);
    }
    __device__ __forceinline__ void payload(u32 b, u32 offset, const u32 (&w)[4], u32 bytes) const {
        for (int d = 0; d < n_dest[b]; ++d)
            moe_store_words(slot_row(b, d, p.payload_region_off, p.payload_bytes) + offset, w, bytes);
    }
    __device__ __forceinline__ void scales(u32 b, u32 offset, const u32 (&w)[4], u32 bytes) const {
        for (int d = 0; d < n_dest[b]; ++d)
            moe_store_words(slot_row(b, d, p.scales_region_off, p.scale_bytes) + offset, w, bytes);
    }
};

struct DispatchRows {
    const OneSidedParams& p;
    u32 first, step;
    __device__ __forceinline__ const u16* operator()(u32 b) const {
        return (const u16*)moe_at(p.call.tokens, ((long long)first + (long long)b * step) * p.call.hidden * 2);
    }
};

// Grid: any (one_sided.rs gives it a block per token, or moe_check_blocks + 1 if more, up to
// the SMs given to communication; a rank without tokens still publishes its zero counts);
// blockDim.x any multiple of 32 up to 1024. A block takes tokens blockIdx.x, blockIdx.x +
// gridDim.x, ... in batches of moe_batch_tokens(): it routes the batch (slots from the
// per-destination counters, the top-k ids and weights to every destination), then quantizes
// the batch's units, each stored straight into every destination's slot. The last block to
// finish publishes the counts, waits for the peers' and resets the unfilled rows; the blocks
// that finish just before it wait for the peers' words too and check the ids the peers wrote
// (moe_check_blocks). Expects the counters at zero (as
// allocated, and as the previous call's last block leaves them).
// Bounded to 1024 threads so that the compiler keeps to 64 registers, which lets every block
// run 1024 threads (without the bound nvfp4's dispatch takes 70 and gets fewer threads; at 64 it
// does not spill).
extern "C" __global__ void __launch_bounds__(1024) moe_one_sided_dispatch(OneSidedParams p) {
    // Per batch token b and top-k entry k: the expert id, its weight, the owner of the expert
    // (-1 out of range) and the target rank (-1 for a bad id); then the token's destinations.
    __shared__ i32 s_id[MOE_BATCH_MAX][MOE_MAX_TOPK];
    __shared__ float s_weight[MOE_BATCH_MAX][MOE_MAX_TOPK];
    __shared__ i32 s_owner[MOE_BATCH_MAX][MOE_MAX_TOPK];
    __shared__ i32 s_target[MOE_BATCH_MAX][MOE_MAX_TOPK];
    __shared__ i32 s_dest_target[MOE_BATCH_MAX][MOE_MAX_TOPK];
    __shared__ i32 s_dest_slot[MOE_BATCH_MAX][MOE_MAX_TOPK];
    __shared__ int s_n_dest[MOE_BATCH_MAX];
    const i32* ids = (const i32*)p.call.ids;
    const float* weights = (const float*)p.call.weights;
    const i32* owner = (const i32*)p.call.owner;
    u32* counters = (u32*)p.counters;
    const int k_n = p.call.top_k;
    const u32 per_pass = moe_batch_tokens();
    if (threadIdx.x == 0) moe_trace_first(p, kTraceDispatchStart);
    for (u32 first = blockIdx.x; first < (u32)p.call.n_tokens; first += gridDim.x * per_pass) {
        const u32 count = moe_batch_count(first, (u32)p.call.n_tokens, per_pass);
        const u32 entries = count * (u32)k_n;
        const DispatchRows rows{p, first, gridDim.x};
        moe_prefetch_rows(rows, count);
        // Each entry's target rank, -1 for a bad id (out of range or listed twice; the token
        // still goes to its other experts).
        for (u32 i = threadIdx.x; i < entries; i += blockDim.x) {
            const u32 b = i / k_n;
            const int k = (int)(i % k_n);
            const long long t = (long long)first + (long long)b * gridDim.x;
            const i32 e = ids[t * k_n + k];
            const i32 e_owner = e >= 0 && e < p.call.num_experts ? owner[e] : -1;
            bool valid = e_owner >= 0;
            for (int j = 0; j < k; ++j) valid = valid && ids[t * k_n + j] != e;
            if (!valid) moe_fail(p.call, MOE_STATUS_BAD_ID | (u32)t);
            if (moe_not_finite(weights[t * k_n + k]))
                moe_fail(p.call, MOE_STATUS_BAD_WEIGHT | (u32)t);
            s_id[b][k] = e;
            s_weight[b][k] = weights[t * k_n + k];
            s_owner[b][k] = e_owner;
            s_target[b][k] = valid ? e_owner : -1;
            if (k == 0) s_n_dest[b] = 0;
        }
        __syncthreads();
        // One slot per (token, destination rank), taken by the first entry going there.
        for (u32 i = threadIdx.x; i < entries; i += blockDim.x) {
            const u32 b = i / k_n;
            const int k = (int)(i % k_n);
            const long long t = (long long)first + (long long)b * gridDim.x;
            const i32 target = s_target[b][k];
            bool first_here = target >= 0;
            for (int j = 0; j < k; ++j) first_here = first_here && s_target[b][j] != target;
            const int slot = first_here ? (int)atomicAdd(&counters[target], 1u) : -1;
            ((i32*)p.call.send_target)[t * k_n + k] = target;
            ((i32*)p.call.send_slot)[t * k_n + k] = slot;
            if (first_here) {
                // The destinations' order does not matter: each gets the same bytes.
                const int d = atomicAdd(&s_n_dest[b], 1);
                s_dest_target[b][d] = target;
                s_dest_slot[b][d] = slot;
            }
        }
        __syncthreads();
        if (threadIdx.x == 0) moe_trace_latest(p, kTraceRouted);
        // Every destination gets the token's top-k row, with -1 / 0.0 for the experts it does
        // not own (the contract's convention).
        for (u32 i = threadIdx.x; i < entries; i += blockDim.x) {
            const u32 b = i / k_n;
            const int k = (int)(i % k_n);
            const i32 e = s_id[b][k];
            for (int d = 0; d < s_n_dest[b]; ++d) {
                const i32 target = s_dest_target[b][d];
                const long long at = (long long)p.call.me * p.call.max_tokens + s_dest_slot[b][d];
                const bool here = s_owner[b][k] == target;
                ((i32*)moe_at(p.call.peers[target], p.ids_region_off + at * k_n * 4))[k] = here ? e : -1;
                ((float*)moe_at(p.call.peers[target], p.weights_region_off + at * k_n * 4))[k] = here ? s_weight[b][k] : 0.0f;
            }
        }
        const DispatchSink sink{p, s_n_dest, s_dest_target, s_dest_slot};
        moe_quantize_batch(rows, count, sink, p.call.fp8_static_scale,
                           p.call.nvfp4_global_scale);
        // The batch tables are rewritten by the next batch.
        __syncthreads();
    }
    if (threadIdx.x == 0) moe_trace_latest(p, kTraceSent);
    // The call's round: the last block advances the round word only after every block has
    // counted itself done, so every block reads the old value here.
    __shared__ u32 s_round;
    if (threadIdx.x == 0) s_round = *(volatile const u32*)moe_round_word(p) + 1u;
    const u32 ticket = moe_block_ticket(counters + p.call.ep);
    const u32 round = s_round;
    const u32 checkers = moe_check_blocks(p);
    const u32 first_checker = gridDim.x - 1 - checkers;
    if (ticket < first_checker) return;
    const bool last = ticket == gridDim.x - 1;
    const bool checks = !last || checkers == 0;
    __shared__ i32 s_check_owner[MOE_CHECK_OWNERS];
    // Each source's count, from the load that saw its dispatch word.
    __shared__ u32 s_peer_count[MOE_MAX_RANKS];
    if (checks) moe_load_owners(p, s_check_owner);
    // Each checker waits for the peers' words itself, so it checks while the last block resets
    // the unfilled rows, not after a signal from it.
    const bool seen = last ? moe_dispatch_last_block(p, round, s_peer_count)
                           : moe_wait_flags<u64>(p.call, p.dispatch_flag_off, moe_call_word(round, p.call.call_tag), true,
                                                 s_peer_count);
    if (!last && threadIdx.x == 0) moe_trace_latest(p, kTraceChecking);
    // However its wait ended, a checker checks its part: where it saw every peer's word of the
    // call, the rows the peers filled; where it did not (a peer late, past the call, abandoned
    // it, or ran another layer's call into this workspace), every row, because the experts may
    // run before the host reads the status and such a peer's rows could hold anything. The call
    // has failed then, and is abandoned at every peer.
    const bool corrupt = checks && moe_check_ids(p, s_check_owner, s_peer_count, last ? 0 : (int)(ticket - first_checker),
                                                 max((int)checkers, 1), !seen);
    // The last block also abandons a call whose count was out of range.
    if (corrupt || (last && seen && __syncthreads_or(moe_call_failed(p.call))))
        moe_mark_abandoned(p, moe_abandoned_word(p.call, round));
    if (p.trace != 0) {
        __syncthreads();
        if (threadIdx.x == 0) moe_trace_latest(p, kTraceDispatchDone);
    }
}

// Grid: any (more blocks keep more remote loads in flight). The experts wrote the row of every
// received token into this rank's combine region at the (source, slot) it arrived in
// (zero-copy: no staging pass), in earlier work on this stream; every block tells every peer
// so (the same round from every block, so no block waits for another of its grid), then waits
// for every peer's rows and sums each token's rows from the ranks it went to in f32, in
// ascending top-k order (bitwise reproducible, and the same order as the host platform), and
// writes the input dtype (moe_combine_tokens).
extern "C" __global__ void __launch_bounds__(1024) moe_one_sided_combine(OneSidedParams p) {
    // The call's round, which its dispatch advanced; a failed dispatch marked the call
    // abandoned at every peer already.
    const u32 round = *(volatile const u32*)moe_round_word(p);
    if (__syncthreads_or(moe_call_failed(p.call))) return;
    const u32 word = moe_call_word(round, p.call.call_tag);
    if (threadIdx.x == 0) moe_trace_first(p, kTraceCombineStart);
    moe_release_flags(p.call, p.combine_flag_off, word);
    if (threadIdx.x == 0) moe_trace_latest(p, kTraceCombineReleased);
    if (!moe_wait_flags(p.call, p.combine_flag_off, word)) {
        moe_mark_abandoned(p, moe_abandoned_word(p.call, round));
        return;
    }
    if (threadIdx.x == 0) moe_trace_latest(p, kTraceCombineSeen);
    moe_combine_tokens(p.call, [&](int target, int slot) {
        return (const uint4*)moe_at(p.call.peers[target], p.combine_region_off +
                                                         ((long long)p.call.me * p.call.max_tokens + slot) * p.call.combine_slot_bytes);
    });
    if (p.trace != 0) {
        __syncthreads();
        if (threadIdx.x == 0) moe_trace_latest(p, kTraceCombineDone);
    }
}

// One block: a call this rank does not run (its input was refused before dispatch), or the
// call in flight (its experts failed), marked abandoned in every flag this rank raises at its
// peers. `call_tag` is the abandoned call's tag (MOE_ABANDONED and the reason);
// `abandon_advances` 1 starts the call (the round counter's + 1), 0 keeps the call in flight.
extern "C" __global__ void moe_one_sided_abandon(OneSidedParams p) {
    __shared__ u32 s_round;
    if (threadIdx.x == 0) {
        u32* round_word = moe_round_word(p);
        s_round = *round_word + p.call.abandon_advances;
        *round_word = s_round;
    }
    __syncthreads();
    moe_mark_abandoned(p, (s_round & MOE_SEQ_MASK) | p.call.call_tag);
}
