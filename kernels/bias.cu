// bias.cu: the bias of a Linear layer, broadcast over rows, and its backward:
//   bias_add:      out[r, c] += bias[c]                 out: (N, C), bias: (C)
//   bias_backward: dbias[c]  += sum_r dout[r, c]        ACCUMULATES, deterministic (no atomics)
// as src/backend/cpu/bias.rs. Sums in f32, rows in increasing order.
//
// Variants (launcher: src/backend/cuda/ops/bias.rs, enum BiasVariant):
//   bias_add_f32_naive            one thread per element, grid covers N * C.
//   bias_add_{f32,bf16}_grid      grid-stride loop over a capped grid; bf16: out = bf16(out + bias).
//   bias_backward_f32_naive       one thread per column summing all N rows (consecutive threads
//                                 read consecutive columns: coalesced, but only C threads).
//   bias_backward_f32_grid        two passes, parallel over rows as well as columns:
//                                 bias_backward_partials_f32_grid, grid (ceil(C/block), chunks):
//                                 thread (c, k) sums rows [k*rows_per_chunk, (k+1)*rows_per_chunk)
//                                 of column c into partials[k, c]; then
//                                 bias_backward_finish_f32_grid, one thread per column, adds
//                                 partials[0..chunks, c] in chunk order to dbias[c]. Fixed order at
//                                 every step: deterministic run to run, no atomics.
//
// Preconditions (checked by the launcher): N * C fits the buffers; partials holds chunks * C;
// naive variants: the grid covers their work (N * C, or C threads).
//
// Failed ideas: none yet (no GPU measurements so far).

#include "common.cuh"

extern "C" __global__ void bias_add_f32_naive(float* out, const float* bias, int N, int C) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)N * C) return;
    out[i] += bias[i % C];
}

extern "C" __global__ void bias_add_f32_grid(float* out, const float* bias, int N, int C) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)N * C; i += (size_t)gridDim.x * blockDim.x)
        out[i] += bias[i % C];
}

extern "C" __global__ void bias_add_bf16_grid(bf16* out, const bf16* bias, int N, int C) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)N * C; i += (size_t)gridDim.x * blockDim.x)
        out[i] = f32_to_bf16(bf16_to_f32(out[i]) + bf16_to_f32(bias[i % C]));
}

extern "C" __global__ void bias_backward_f32_naive(float* dbias, const float* dout, int N, int C) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float acc = 0.0f;
    for (int r = 0; r < N; r++) acc += dout[(size_t)r * C + c];
    dbias[c] += acc;
}

extern "C" __global__ void bias_backward_partials_f32_grid(float* partials, const float* dout, int N, int C,
                                                      int rows_per_chunk) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    const int k = blockIdx.y;
    const int lo = k * rows_per_chunk;
    const int hi = lo + rows_per_chunk < N ? lo + rows_per_chunk : N;
    float acc = 0.0f;
    for (int r = lo; r < hi; r++) acc += dout[(size_t)r * C + c];
    partials[(size_t)k * C + c] = acc;
}

extern "C" __global__ void bias_backward_finish_f32_grid(float* dbias, const float* partials, int chunks, int C) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float acc = 0.0f;
    for (int k = 0; k < chunks; k++) acc += partials[(size_t)k * C + c];
    dbias[c] += acc;
}
