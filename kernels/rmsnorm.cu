// rmsnorm.cu: RMSNorm (Llama, Zhang & Sennrich 2019 eq. 4), forward and backward.
//
//   rstd[r] = 1 / sqrt(mean_c(inp[r,c]^2) + eps)        (N) f32, saved for backward
//   out[r,c] = inp[r,c] * rstd[r] * weight[c]
// Shapes: inp, out: (N, C) row-major; weight: (C); rstd: (N) f32 in every variant. All sums in f32.
//
// Variants (launcher: src/backend/cuda/ops/rmsnorm.rs, enum RmsNormVariant):
//   rmsnorm_forward_f32_naive   one thread per row; strided loads (uncoalesced): the reference.
//   rmsnorm_forward_f32_warp    one warp per row, lanes stride the row (coalesced), xor-shuffle sum.
//   rmsnorm_forward_bf16_warp   as f32_warp with bf16 inp/weight/out; rounds like Hugging Face
//                               LlamaRMSNorm: out = bf16(weight * bf16(inp * rstd)).
//   rmsnorm_backward_f32_naive  thread t computes dinp row t (t < N) and dweight column t (t < C):
//                               deterministic, no atomics; both ACCUMULATE (+=).
//
// Preconditions (checked by the launcher): N >= 1, C >= 1, N * C fits the buffers; the warp
// variants need blockDim.x a multiple of 32 and gridDim.x * (blockDim.x / 32) >= N; the naive
// ones need gridDim.x * blockDim.x >= N (backward: >= max(N, C)). No alignment requirement
// (scalar loads). Whole warps exit together, so the full-mask shuffles are always legal.
//
// Failed ideas: none yet (no GPU measurements so far).

#include "common.cuh"

extern "C" __global__ void rmsnorm_forward_f32_naive(float* out, float* rstd, const float* inp, const float* weight,
                                                     int N, int C, float eps) {
    const int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= N) return;
    const float* x = inp + (size_t)r * C;
    float* y = out + (size_t)r * C;
    float sum_sq = 0.0f;
    for (int c = 0; c < C; c++) sum_sq += x[c] * x[c];
    const float s = 1.0f / sqrtf(sum_sq / (float)C + eps);
    for (int c = 0; c < C; c++) y[c] = x[c] * s * weight[c];
    rstd[r] = s;
}

extern "C" __global__ void rmsnorm_forward_f32_warp(float* out, float* rstd, const float* inp, const float* weight,
                                                    int N, int C, float eps) {
    const int lane = threadIdx.x % WARP_SIZE;
    const int r = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    if (r >= N) return;  // uniform across the warp
    const float* x = inp + (size_t)r * C;
    float* y = out + (size_t)r * C;
    float sum_sq = 0.0f;
    for (int c = lane; c < C; c += WARP_SIZE) sum_sq += x[c] * x[c];
    sum_sq = warp_reduce_sum(sum_sq);
    const float s = 1.0f / sqrtf(sum_sq / (float)C + eps);
    for (int c = lane; c < C; c += WARP_SIZE) y[c] = x[c] * s * weight[c];
    if (lane == 0) rstd[r] = s;
}

extern "C" __global__ void rmsnorm_forward_bf16_warp(bf16* out, float* rstd, const bf16* inp, const bf16* weight,
                                                     int N, int C, float eps) {
    const int lane = threadIdx.x % WARP_SIZE;
    const int r = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    if (r >= N) return;  // uniform across the warp
    const bf16* x = inp + (size_t)r * C;
    bf16* y = out + (size_t)r * C;
    float sum_sq = 0.0f;
    for (int c = lane; c < C; c += WARP_SIZE) {
        const float v = bf16_to_f32(x[c]);
        sum_sq += v * v;
    }
    sum_sq = warp_reduce_sum(sum_sq);
    const float s = 1.0f / sqrtf(sum_sq / (float)C + eps);
    for (int c = lane; c < C; c += WARP_SIZE) {
        const float normed = bf16_to_f32(f32_to_bf16(bf16_to_f32(x[c]) * s));
        y[c] = f32_to_bf16(bf16_to_f32(weight[c]) * normed);
    }
    if (lane == 0) rstd[r] = s;
}

// With n = inp * rstd and out = n * weight (per row, r = rstd[row]):
//   dinp[c]    += r * weight[c] * dout[c] - inp[c] * r^3 / C * sum_j dout[j] * weight[j] * inp[j]
//   dweight[c] += sum_rows dout[c] * inp[c] * r
extern "C" __global__ void rmsnorm_backward_f32_naive(float* dinp, float* dweight, const float* dout, const float* inp,
                                                      const float* weight, const float* rstd, int N, int C) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t < N) {
        const float* x = inp + (size_t)t * C;
        const float* dy = dout + (size_t)t * C;
        float* dx = dinp + (size_t)t * C;
        const float r = rstd[t];
        float dot = 0.0f;
        for (int c = 0; c < C; c++) dot += dy[c] * weight[c] * x[c];
        const float k = r * r * r * dot / (float)C;
        for (int c = 0; c < C; c++) dx[c] += r * weight[c] * dy[c] - x[c] * k;
    }
    if (t < C) {
        float acc = 0.0f;
        for (int row = 0; row < N; row++) {
            const size_t i = (size_t)row * C + t;
            acc += dout[i] * inp[i] * rstd[row];
        }
        dweight[t] += acc;
    }
}
