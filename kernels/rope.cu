// rope.cu: rotary position embedding, rotate-half layout (Hugging Face Llama), in place.
//
// x: (N, H, D) with D = head_dim even, half = D/2; cos, sin: (P, half); positions: (N), each < P.
// For row t, p = positions[t], head h, pair i < half, a = x[t,h,i], b = x[t,h,i+half]:
//   forward:  (a, b) <- (a*cos[p,i] - b*sin[p,i], b*cos[p,i] + a*sin[p,i])
//   backward: the transpose rotation: the same with sin negated (applied to the gradient).
// Math in f32. bf16 variants: x, cos, sin all bf16 (as HF casts cos/sin to the activation dtype),
// each result rounded once to bf16.
//
// Variants (launcher: src/backend/cuda/ops/rope.rs, enum RopeVariant):
//   rope_{forward,backward}_f32_naive       one thread per (row, head), looping over the pairs.
//   rope_{forward,backward}_{f32,bf16}_flat one thread per pair (t, h, i), grid-stride loop;
//                                           consecutive threads touch consecutive i (coalesced).
//
// Preconditions (checked by the launcher): D even and >= 2; positions in [0, P); naive:
// gridDim.x * blockDim.x >= N * H. In place: every element is read and written by one thread.
//
// Failed ideas: none yet (no GPU measurements so far).

#include "common.cuh"

__device__ __forceinline__ void rope_naive(float* x, const float* cos_t, const float* sin_t, const int* positions,
                                           int N, int H, int D, float sign) {
    const int th = blockIdx.x * blockDim.x + threadIdx.x;
    if (th >= N * H) return;
    const int t = th / H;
    const int half = D / 2;
    const size_t p = (size_t)positions[t];
    float* v = x + (size_t)th * D;
    for (int i = 0; i < half; i++) {
        const float c = cos_t[p * half + i];
        const float s = sign * sin_t[p * half + i];
        const float a = v[i];
        const float b = v[i + half];
        v[i] = a * c - b * s;
        v[i + half] = b * c + a * s;
    }
}

__device__ __forceinline__ float ld(const float* p, size_t i) { return p[i]; }
__device__ __forceinline__ float ld(const bf16* p, size_t i) { return bf16_to_f32(p[i]); }
__device__ __forceinline__ void st(float* p, size_t i, float v) { p[i] = v; }
__device__ __forceinline__ void st(bf16* p, size_t i, float v) { p[i] = f32_to_bf16(v); }

template <class T>
__device__ __forceinline__ void rope_flat(T* x, const T* cos_t, const T* sin_t, const int* positions, int N, int H,
                                          int D, float sign) {
    const int half = D / 2;
    const size_t total = (size_t)N * H * half;
    for (size_t k = (size_t)blockIdx.x * blockDim.x + threadIdx.x; k < total; k += (size_t)gridDim.x * blockDim.x) {
        const size_t th = k / half;  // (row, head)
        const size_t i = k - th * half;
        const size_t t = th / H;
        const size_t p = (size_t)positions[t];
        const float c = ld(cos_t, p * half + i);
        const float s = sign * ld(sin_t, p * half + i);
        T* v = x + th * D;
        const float a = ld(v, i);
        const float b = ld(v, i + half);
        st(v, i, a * c - b * s);
        st(v, i + half, b * c + a * s);
    }
}

extern "C" __global__ void rope_forward_f32_naive(float* x, const float* cos_t, const float* sin_t,
                                                  const int* positions, int N, int H, int D) {
    rope_naive(x, cos_t, sin_t, positions, N, H, D, 1.0f);
}

extern "C" __global__ void rope_backward_f32_naive(float* x, const float* cos_t, const float* sin_t,
                                                   const int* positions, int N, int H, int D) {
    rope_naive(x, cos_t, sin_t, positions, N, H, D, -1.0f);
}

extern "C" __global__ void rope_forward_f32_flat(float* x, const float* cos_t, const float* sin_t,
                                                 const int* positions, int N, int H, int D) {
    rope_flat<float>(x, cos_t, sin_t, positions, N, H, D, 1.0f);
}

extern "C" __global__ void rope_backward_f32_flat(float* x, const float* cos_t, const float* sin_t,
                                                  const int* positions, int N, int H, int D) {
    rope_flat<float>(x, cos_t, sin_t, positions, N, H, D, -1.0f);
}

extern "C" __global__ void rope_forward_bf16_flat(bf16* x, const bf16* cos_t, const bf16* sin_t,
                                                  const int* positions, int N, int H, int D) {
    rope_flat<bf16>(x, cos_t, sin_t, positions, N, H, D, 1.0f);
}

extern "C" __global__ void rope_backward_bf16_flat(bf16* x, const bf16* cos_t, const bf16* sin_t,
                                                   const int* positions, int N, int H, int D) {
    rope_flat<bf16>(x, cos_t, sin_t, positions, N, H, D, -1.0f);
}
