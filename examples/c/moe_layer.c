/*
 * moe_layer.c: one rank of a small MoE layer through moe-a2a's C ABI, as a process of its own.
 *
 * Start one process per rank with the environment launchers set (MASTER_ADDR, MASTER_PORT,
 * RANK, WORLD_SIZE; torchrun, mpirun, srun or `cargo xtask launch -n 2 -- ./moe_layer`).
 * Each rank dispatches its tokens with the backend named on the command line (default
 * nvlink-one-sided), runs its experts (expert e multiplies a token by e + 1), combines, and
 * checks its output against the same sum computed here; first through prepare/finalize with
 * the experts in between, then through the whole-layer runner with the experts as a callback.
 * It prints one line per check and exits non-zero on any error.
 *
 * Build (after `cargo build -p moe-a2a-capi`):
 *   cc -std=c11 -I include examples/c/moe_layer.c -L target/debug -lmoe_a2a_capi \
 *      -Wl,-rpath,target/debug -lm -o moe_layer
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moe_a2a.h"

enum { EXPERTS = 16, TOP_K = 4, HIDDEN = 128, TOKENS = 8 };

static uint16_t bf16_from_float(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest even */
    return (uint16_t)(u >> 16);
}

static float float_from_bf16(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Reports a failed call with the library's message and returns its status. */
static int failed(int status, const char *what) {
    if (status != MOE_STATUS_OK)
        fprintf(stderr, "%s: %s: %s\n", what, moe_status_name(status), moe_last_error());
    return status != MOE_STATUS_OK;
}

static MoeTensor host_tensor(void *data, int32_t dtype, int64_t rows, int64_t cols) {
    MoeTensor t = {0};
    t.data = data;
    t.dtype = dtype;
    t.ndim = 2;
    t.shape[0] = rows;
    t.shape[1] = cols;
    t.strides = NULL; /* contiguous */
    t.device_type = MOE_DEVICE_CPU;
    return t;
}

/* The experts of a Standard delivery: each received row's weighted sum over this rank's
 * experts (ids of -1 are another rank's, or padding). A bf16 delivery's rows are the tokens. */
static int32_t apply_experts(void *user_data, const MoeDelivery *d, const MoeTensor *out) {
    (void)user_data;
    if (d->format != MOE_FORMAT_STANDARD || d->scheme != MOE_QUANT_BF16) return 1;
    const int64_t rows = d->topk_ids.shape[0];
    const uint16_t *x = d->activations.data;
    const int32_t *ids = d->topk_ids.data;
    const float *w = d->topk_weights.data;
    uint16_t *y = out->data;
    for (int64_t r = 0; r < rows; ++r) {
        for (int h = 0; h < HIDDEN; ++h) {
            float sum = 0.0f;
            for (int k = 0; k < TOP_K; ++k) {
                const int32_t e = ids[r * TOP_K + k];
                if (e >= 0) sum += w[r * TOP_K + k] * (float)(e + 1) * float_from_bf16(x[r * HIDDEN + h]);
            }
            y[r * HIDDEN + h] = bf16_from_float(sum);
        }
    }
    return 0;
}

/* This rank's tokens (multiples of 1/8 in [-1, 1], exact in bf16), distinct experts per token,
 * and weights. */
static void make_inputs(uint32_t rank, uint16_t *x, int32_t *ids, float *w) {
    for (int t = 0; t < TOKENS; ++t) {
        for (int h = 0; h < HIDDEN; ++h)
            x[t * HIDDEN + h] = bf16_from_float((float)((t * 7 + h * 3 + (int)rank * 5) % 17) / 8.0f - 1.0f);
        for (int k = 0; k < TOP_K; ++k) {
            ids[t * TOP_K + k] = ((int)rank * 3 + t * 5 + k * (EXPERTS / TOP_K)) % EXPERTS;
            w[t * TOP_K + k] = (float)(k + 1) / 10.0f;
        }
    }
}

/* The largest error of `out` against the layer computed here, relative to the largest value. */
static double max_relative_error(const uint16_t *out, const uint16_t *x, const int32_t *ids, const float *w) {
    double worst = 0.0, largest = 1e-30;
    for (int t = 0; t < TOKENS; ++t)
        for (int h = 0; h < HIDDEN; ++h) {
            double want = 0.0;
            for (int k = 0; k < TOP_K; ++k)
                want += (double)w[t * TOP_K + k] * (ids[t * TOP_K + k] + 1) * float_from_bf16(x[t * HIDDEN + h]);
            const double err = fabs(float_from_bf16(out[t * HIDDEN + h]) - want);
            if (err > worst) worst = err;
            if (fabs(want) > largest) largest = fabs(want);
        }
    return worst / largest;
}

int main(int argc, char **argv) {
    const char *backend = argc > 1 ? argv[1] : "nvlink-one-sided";
    MoeWorld *world = NULL;
    if (failed(moe_world_from_env(&world), "joining the world")) return 1;
    uint32_t rank = 0, ranks = 0;
    if (failed(moe_world_rank(world, &rank, &ranks), "moe_world_rank")) return 1;

    MoeLayerSpec spec = {0};
    spec.num_experts = EXPERTS;
    spec.top_k = TOP_K;
    spec.hidden = HIDDEN;
    spec.max_tokens_per_rank = TOKENS;
    spec.input_dtype = MOE_DTYPE_BF16;
    spec.quant_scheme = MOE_QUANT_BF16;
    spec.tp = 1;
    spec.dp = ranks;
    spec.ep = 1;
    spec.activation_format = MOE_FORMAT_STANDARD;

    /* A request the backend cannot serve fails here, on every rank, saying why. */
    MoeLayerSpec too_wide = spec;
    too_wide.top_k = 64;
    too_wide.num_experts = 128;
    MoeLayer *refused = NULL;
    const int status = moe_layer_new(world, backend, &too_wide, &refused);
    if (status == MOE_STATUS_OK) moe_layer_free(refused);
    printf("rank %u: top_k 64 on %s: %s%s%s\n", rank, backend, moe_status_name(status),
           status == MOE_STATUS_OK ? "" : ": ", status == MOE_STATUS_OK ? "" : moe_last_error());

    static uint16_t x[TOKENS * HIDDEN], out[TOKENS * HIDDEN];
    static int32_t ids[TOKENS * TOP_K];
    static float w[TOKENS * TOP_K];
    make_inputs(rank, x, ids, w);
    const MoeTensor tokens = host_tensor(x, MOE_DTYPE_BF16, TOKENS, HIDDEN);
    const MoeTensor topk_ids = host_tensor(ids, MOE_DTYPE_I32, TOKENS, TOP_K);
    const MoeTensor topk_weights = host_tensor(w, MOE_DTYPE_F32, TOKENS, TOP_K);
    const MoeTensor output = host_tensor(out, MOE_DTYPE_BF16, TOKENS, HIDDEN);

    /* prepare -> the experts -> finalize, as an engine's modular MoE kernel does. */
    MoeLayer *layer = NULL;
    if (failed(moe_layer_new(world, backend, &spec, &layer), "moe_layer_new")) return 1;
    MoeLayerInfo info;
    if (failed(moe_layer_info(layer, &info), "moe_layer_info")) return 1;
    MoeDelivery delivery;
    if (failed(moe_layer_prepare(layer, &tokens, &topk_ids, &topk_weights, &delivery), "moe_layer_prepare")) return 1;
    if (apply_experts(NULL, &delivery, &delivery.expert_output) != 0) {
        moe_layer_abandon(layer, "unexpected delivery");
        return 1;
    }
    if (failed(moe_layer_finalize(layer, &delivery.expert_output, &output), "moe_layer_finalize")) return 1;
    /* On a GPU rank the call is only enqueued: wait reports what its kernels found. */
    if (failed(moe_layer_wait(layer), "moe_layer_wait")) return 1;
    double err = max_relative_error(out, x, ids, w);
    printf("rank %u of %u: prepare/finalize via %s (output reduced: %d, %lld rows received): max relative error %.1e: %s\n",
           rank, ranks, backend, info.output_is_reduced, (long long)delivery.topk_ids.shape[0], err,
           err < 1e-2 ? "ok" : "WRONG");
    moe_layer_free(layer);
    if (err >= 1e-2) return 1;

    /* The whole layer, the experts a callback. */
    MoeExperts experts = {apply_experts, NULL, MOE_FORMAT_STANDARD};
    MoeRunner *runner = NULL;
    if (failed(moe_runner_new(world, backend, &spec, &experts, &runner), "moe_runner_new")) return 1;
    memset(out, 0, sizeof out);
    if (failed(moe_runner_forward(runner, &tokens, &topk_ids, &topk_weights, &output), "moe_runner_forward")) return 1;
    if (failed(moe_runner_wait(runner), "moe_runner_wait")) return 1;
    err = max_relative_error(out, x, ids, w);
    printf("rank %u of %u: runner via %s: max relative error %.1e: %s\n", rank, ranks, backend, err,
           err < 1e-2 ? "ok" : "WRONG");
    moe_runner_free(runner);
    moe_world_free(world);
    return err < 1e-2 ? 0 : 1;
}
