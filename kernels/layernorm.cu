// layernorm.cu: LayerNorm as Hugging Face BERT computes it (torch.nn.LayerNorm), forward and
// backward, as src/backend/cpu/layernorm.rs:
//
//   mean[r] = mean_c inp[r,c];  var = mean_c (inp[r,c] - mean)^2  (biased: / C, two passes)
//   rstd[r] = 1 / sqrt(var + eps)                                   mean, rstd: (N) f32, saved
//   out[r,c] = (inp[r,c] - mean[r]) * rstd[r] * weight[c] + bias[c]
// Backward, per row with xhat_c = (inp_c - mean) * rstd, g_c = weight_c * dout_c:
//   dinp[r,c] += rstd * (g_c - mean_j g_j - xhat_c * mean_j (g_j xhat_j))
//   dweight[c] += sum_r dout[r,c] * xhat[r,c];   dbias[c] += sum_r dout[r,c]
// All three ACCUMULATE. Sums in f32 (the CPU reference uses f64; the difference is summation
// rounding). Shapes: inp, out, dout, dinp: (N, C); weight, bias, dweight, dbias: (C).
//
// Variants (launcher: src/backend/cuda/ops/layernorm.rs, enum LayerNormVariant):
//   layernorm_forward_f32_naive    one thread per row, strided loads: the reference.
//   layernorm_forward_{f32,bf16}_warp  one warp per row, lanes stride the row (coalesced), xor-
//                                  shuffle sums; bf16 inp/weight/bias/out, f32 math and mean/rstd,
//                                  out rounded once to bf16.
//   layernorm_backward_f32_naive   thread t computes dinp row t (t < N) and dweight, dbias column t
//                                  (t < C), rows in order: deterministic, no atomics.
//   layernorm_backward_f32_warp    two kernels: layernorm_backward_dinp_f32_warp (one warp per
//                                  row) and layernorm_backward_params_f32_col (one thread per
//                                  column summing rows in order: consecutive threads read
//                                  consecutive columns, coalesced; deterministic, no atomics).
//
// Preconditions (checked by the launcher): N >= 1, C >= 1; warp kernels need blockDim.x a
// multiple of 32 and gridDim.x * (blockDim.x / 32) >= N; thread-per-row/column kernels need
// gridDim.x * blockDim.x >= their count. Whole warps exit together (full-mask shuffles legal).
//
// Failed ideas: none yet (no GPU measurements so far).

#include "common.cuh"

__device__ __forceinline__ float ld(const float* p, size_t i) { return p[i]; }
__device__ __forceinline__ float ld(const bf16* p, size_t i) { return bf16_to_f32(p[i]); }
__device__ __forceinline__ void st(float* p, size_t i, float v) { p[i] = v; }
__device__ __forceinline__ void st(bf16* p, size_t i, float v) { p[i] = f32_to_bf16(v); }

extern "C" __global__ void layernorm_forward_f32_naive(float* out, float* mean, float* rstd, const float* inp,
                                                       const float* weight, const float* bias, int N, int C,
                                                       float eps) {
    const int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= N) return;
    const float* x = inp + (size_t)r * C;
    float* y = out + (size_t)r * C;
    float sum = 0.0f;
    for (int c = 0; c < C; c++) sum += x[c];
    const float mu = sum / (float)C;
    float sq = 0.0f;
    for (int c = 0; c < C; c++) {
        const float d = x[c] - mu;
        sq += d * d;
    }
    const float s = 1.0f / sqrtf(sq / (float)C + eps);
    for (int c = 0; c < C; c++) y[c] = (x[c] - mu) * s * weight[c] + bias[c];
    mean[r] = mu;
    rstd[r] = s;
}

template <class T>
__device__ __forceinline__ void forward_warp(T* out, float* mean, float* rstd, const T* inp, const T* weight,
                                             const T* bias, int N, int C, float eps) {
    const int lane = threadIdx.x % WARP_SIZE;
    const int r = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    if (r >= N) return;  // uniform across the warp
    const size_t row = (size_t)r * C;
    float sum = 0.0f;
    for (int c = lane; c < C; c += WARP_SIZE) sum += ld(inp, row + c);
    const float mu = warp_reduce_sum(sum) / (float)C;
    float sq = 0.0f;
    for (int c = lane; c < C; c += WARP_SIZE) {
        const float d = ld(inp, row + c) - mu;
        sq += d * d;
    }
    const float s = 1.0f / sqrtf(warp_reduce_sum(sq) / (float)C + eps);
    for (int c = lane; c < C; c += WARP_SIZE)
        st(out, row + c, (ld(inp, row + c) - mu) * s * ld(weight, c) + ld(bias, c));
    if (lane == 0) {
        mean[r] = mu;
        rstd[r] = s;
    }
}

extern "C" __global__ void layernorm_forward_f32_warp(float* out, float* mean, float* rstd, const float* inp,
                                                      const float* weight, const float* bias, int N, int C,
                                                      float eps) {
    forward_warp(out, mean, rstd, inp, weight, bias, N, C, eps);
}

extern "C" __global__ void layernorm_forward_bf16_warp(bf16* out, float* mean, float* rstd, const bf16* inp,
                                                       const bf16* weight, const bf16* bias, int N, int C,
                                                       float eps) {
    forward_warp(out, mean, rstd, inp, weight, bias, N, C, eps);
}

extern "C" __global__ void layernorm_backward_f32_naive(float* dinp, float* dweight, float* dbias, const float* dout,
                                                        const float* inp, const float* weight, const float* mean,
                                                        const float* rstd, int N, int C) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t < N) {
        const size_t row = (size_t)t * C;
        const float mu = mean[t];
        const float r = rstd[t];
        float g_sum = 0.0f;
        float gx_sum = 0.0f;
        for (int c = 0; c < C; c++) {
            const float xhat = (inp[row + c] - mu) * r;
            const float g = weight[c] * dout[row + c];
            g_sum += g;
            gx_sum += g * xhat;
        }
        const float g_mean = g_sum / (float)C;
        const float gx_mean = gx_sum / (float)C;
        for (int c = 0; c < C; c++) {
            const float xhat = (inp[row + c] - mu) * r;
            dinp[row + c] += r * (weight[c] * dout[row + c] - g_mean - xhat * gx_mean);
        }
    }
    if (t < C) {
        float dw = 0.0f;
        float db = 0.0f;
        for (int row = 0; row < N; row++) {
            const size_t i = (size_t)row * C + t;
            const float dy = dout[i];
            dw += dy * ((inp[i] - mean[row]) * rstd[row]);
            db += dy;
        }
        dweight[t] += dw;
        dbias[t] += db;
    }
}

extern "C" __global__ void layernorm_backward_dinp_f32_warp(float* dinp, const float* dout, const float* inp,
                                                            const float* weight, const float* mean,
                                                            const float* rstd, int N, int C) {
    const int lane = threadIdx.x % WARP_SIZE;
    const int t = blockIdx.x * (blockDim.x / WARP_SIZE) + threadIdx.x / WARP_SIZE;
    if (t >= N) return;  // uniform across the warp
    const size_t row = (size_t)t * C;
    const float mu = mean[t];
    const float r = rstd[t];
    float g_sum = 0.0f;
    float gx_sum = 0.0f;
    for (int c = lane; c < C; c += WARP_SIZE) {
        const float xhat = (inp[row + c] - mu) * r;
        const float g = weight[c] * dout[row + c];
        g_sum += g;
        gx_sum += g * xhat;
    }
    const float g_mean = warp_reduce_sum(g_sum) / (float)C;
    const float gx_mean = warp_reduce_sum(gx_sum) / (float)C;
    for (int c = lane; c < C; c += WARP_SIZE) {
        const float xhat = (inp[row + c] - mu) * r;
        dinp[row + c] += r * (weight[c] * dout[row + c] - g_mean - xhat * gx_mean);
    }
}

extern "C" __global__ void layernorm_backward_params_f32_col(float* dweight, float* dbias, const float* dout,
                                                             const float* inp, const float* mean, const float* rstd,
                                                             int N, int C) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float dw = 0.0f;
    float db = 0.0f;
    for (int row = 0; row < N; row++) {
        const size_t i = (size_t)row * C + c;
        const float dy = dout[i];
        dw += dy * ((inp[i] - mean[row]) * rstd[row]);
        db += dy;
    }
    dweight[c] += dw;
    dbias[c] += db;
}
