// gelu.cu: the exact (erf) GELU of BERT (`hidden_act: "gelu"`), elementwise, as
// src/backend/cpu/gelu.rs (NOT the tanh approximation):
//   gelu(x)  = x * Phi(x),            Phi(x) = 1/2 (1 + erf(x / sqrt 2)) = 1/2 erfc(-x / sqrt 2)
//   gelu'(x) = Phi(x) + x * phi(x),   phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
//   dinp = dout * gelu'(inp)          (OVERWRITTEN)
//
// Variants (launcher: src/backend/cuda/ops/gelu.rs, enum GeluVariant):
//   gelu_{forward,backward}_f32_naive        one thread per element, math in f64 (erf, exp) exactly
//                                            as the CPU reference: the reference (slow on GPUs
//                                            with few f64 units).
//   gelu_{forward,backward}_{f32,bf16}_grid  grid-stride loop, f32 math. Phi via erfcf(-x/sqrt 2),
//                                            not 1 + erff(.): for negative x, 1 + erf cancels
//                                            (x = -3 loses ~9 bits); erfc keeps full relative
//                                            accuracy in the tail. bf16: each output rounded once.
//
// Preconditions (checked by the launcher): buffers hold n elements; naive: gridDim.x * blockDim.x
// >= n.
//
// Failed ideas: none yet (no GPU measurements so far).

#include "common.cuh"

__device__ __forceinline__ float ld(const float* p, size_t i) { return p[i]; }
__device__ __forceinline__ float ld(const bf16* p, size_t i) { return bf16_to_f32(p[i]); }
__device__ __forceinline__ void st(float* p, size_t i, float v) { p[i] = v; }
__device__ __forceinline__ void st(bf16* p, size_t i, float v) { p[i] = f32_to_bf16(v); }

#define GELU_FRAC_1_SQRT_2 0.70710678118654752440
#define GELU_FRAC_1_SQRT_2PI 0.39894228040143267794

__device__ __forceinline__ double cdf_f64(double x) { return 0.5 * (1.0 + erf(x * GELU_FRAC_1_SQRT_2)); }

__device__ __forceinline__ float cdf_f32(float x) { return 0.5f * erfcf(-x * (float)GELU_FRAC_1_SQRT_2); }

__device__ __forceinline__ float gelu_f32(float x) { return x * cdf_f32(x); }

__device__ __forceinline__ float gelu_grad_f32(float x) {
    return cdf_f32(x) + x * (float)GELU_FRAC_1_SQRT_2PI * expf(-0.5f * x * x);
}

extern "C" __global__ void gelu_forward_f32_naive(float* out, const float* inp, int n) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)n) return;
    const double x = (double)inp[i];
    out[i] = (float)(x * cdf_f64(x));
}

extern "C" __global__ void gelu_backward_f32_naive(float* dinp, const float* dout, const float* inp, int n) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)n) return;
    const double x = (double)inp[i];
    const float grad = (float)(cdf_f64(x) + x * GELU_FRAC_1_SQRT_2PI * exp(-0.5 * x * x));
    dinp[i] = dout[i] * grad;
}

template <class T>
__device__ __forceinline__ void forward_grid(T* out, const T* inp, int n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)n; i += (size_t)gridDim.x * blockDim.x)
        st(out, i, gelu_f32(ld(inp, i)));
}

template <class T>
__device__ __forceinline__ void backward_grid(T* dinp, const T* dout, const T* inp, int n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)n; i += (size_t)gridDim.x * blockDim.x)
        st(dinp, i, ld(dout, i) * gelu_grad_f32(ld(inp, i)));
}

extern "C" __global__ void gelu_forward_f32_grid(float* out, const float* inp, int n) { forward_grid(out, inp, n); }

extern "C" __global__ void gelu_forward_bf16_grid(bf16* out, const bf16* inp, int n) { forward_grid(out, inp, n); }

extern "C" __global__ void gelu_backward_f32_grid(float* dinp, const float* dout, const float* inp, int n) {
    backward_grid(dinp, dout, inp, n);
}

extern "C" __global__ void gelu_backward_bf16_grid(bf16* dinp, const bf16* dout, const bf16* inp, int n) {
    backward_grid(dinp, dout, inp, n);
}
