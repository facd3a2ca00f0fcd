// elementwise.cu: fill, add (out = a + b), add in place (acc += x) and row copies
// (dst[dst_idx[j]] = src[src_idx[j]]: the KV-cache append `scatter_rows` and the logits-row pick
// `gather_rows` of the Backend trait), in f32 and bf16 storage (f32 math, one rounding).
//
// Shapes: fill/add/add_inplace: n elements, flat. copy_rows: dst (R_dst, width), src (R_src, width),
// dst_idx and src_idx (pairs) row numbers, already checked in range by the launcher
// (src/backend/cuda/ops/elementwise.rs), which also removes repeated destinations of a scatter
// keeping the last (the CPU's sequential order), so no two pairs write one row: deterministic.
//
// Variants: one per op and dtype, grid-stride loops over elements (copy_rows: one block row per
// pair, threads over the width). Preconditions: any n (size_t), width >= 1, pairs >= 0.
//
// widen_bf16: out[i] = (float)inp[i], exact (the CUDA backend's f32 staging of bf16 operands for
// ops without a bf16 kernel; the way back is optimizer_round_bf16, round to nearest even).
//
// Failed ideas: none yet (no GPU measurements so far).

#include "common.cuh"

extern "C" __global__ void elementwise_fill_f32(float* buf, float value, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        buf[i] = value;
}

extern "C" __global__ void elementwise_fill_bf16(bf16* buf, float value, size_t n) {
    const bf16 v = f32_to_bf16(value);
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        buf[i] = v;
}

extern "C" __global__ void elementwise_add_f32(float* out, const float* a, const float* b, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = a[i] + b[i];
}

extern "C" __global__ void elementwise_add_bf16(bf16* out, const bf16* a, const bf16* b, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = f32_to_bf16(bf16_to_f32(a[i]) + bf16_to_f32(b[i]));
}

extern "C" __global__ void elementwise_add_inplace_f32(float* acc, const float* x, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        acc[i] += x[i];
}

extern "C" __global__ void elementwise_add_inplace_bf16(bf16* acc, const bf16* x, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        acc[i] = f32_to_bf16(bf16_to_f32(acc[i]) + bf16_to_f32(x[i]));
}

extern "C" __global__ void elementwise_copy_rows_f32(float* dst, const float* src, const int* dst_idx, const int* src_idx,
                                                     int pairs, int width) {
    for (int j = blockIdx.x; j < pairs; j += gridDim.x) {
        float* d = dst + (size_t)dst_idx[j] * width;
        const float* s = src + (size_t)src_idx[j] * width;
        for (int c = threadIdx.x; c < width; c += blockDim.x) d[c] = s[c];
    }
}

extern "C" __global__ void elementwise_copy_rows_bf16(bf16* dst, const bf16* src, const int* dst_idx, const int* src_idx,
                                                      int pairs, int width) {
    for (int j = blockIdx.x; j < pairs; j += gridDim.x) {
        bf16* d = dst + (size_t)dst_idx[j] * width;
        const bf16* s = src + (size_t)src_idx[j] * width;
        for (int c = threadIdx.x; c < width; c += blockDim.x) d[c] = s[c];
    }
}

extern "C" __global__ void elementwise_widen_bf16(float* out, const bf16* inp, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = bf16_to_f32(inp[i]);
}
