// swiglu.cu: the SwiGLU activation of the Llama MLP, elementwise on (N, I):
//   out   = silu(g) * u,  silu(g) = g * sigmoid(g),  sigmoid(g) = 1 / (1 + exp(-g))
//   dup   = dout * g * sigmoid(g)                                  (OVERWRITTEN)
//   dgate = dout * u * sigmoid(g) * (1 + g * (1 - sigmoid(g)))     (OVERWRITTEN)
// as src/backend/cpu/swiglu.rs, in f32 (expf, full precision: no fast math).
//
// Variants (launcher: src/backend/cuda/ops/swiglu.rs, enum SwigluVariant):
//   swiglu_{forward,backward}_f32_naive        one thread per element, grid covers all n.
//   swiglu_{forward,backward}_{f32,bf16}_grid  grid-stride loop over a capped grid; bf16 storage,
//                                              f32 math, each output rounded once to bf16.
// Scalar loads: no alignment requirement (views may start anywhere).
//
// Preconditions (checked by the launcher): all buffers hold n elements; naive:
// gridDim.x * blockDim.x >= n.
//
// Failed ideas: none yet (no GPU measurements so far).

#include "common.cuh"

__device__ __forceinline__ float ld(const float* p, size_t i) { return p[i]; }
__device__ __forceinline__ float ld(const bf16* p, size_t i) { return bf16_to_f32(p[i]); }
__device__ __forceinline__ void st(float* p, size_t i, float v) { p[i] = v; }
__device__ __forceinline__ void st(bf16* p, size_t i, float v) { p[i] = f32_to_bf16(v); }

__device__ __forceinline__ float sigmoidf(float g) { return 1.0f / (1.0f + expf(-g)); }

template <class T>
__device__ __forceinline__ void fwd_one(T* out, const T* gate, const T* up, size_t i) {
    const float g = ld(gate, i);
    st(out, i, g * sigmoidf(g) * ld(up, i));
}

template <class T>
__device__ __forceinline__ void bwd_one(T* dgate, T* dup, const T* dout, const T* gate, const T* up, size_t i) {
    const float g = ld(gate, i);
    const float u = ld(up, i);
    const float dy = ld(dout, i);
    const float s = sigmoidf(g);
    st(dup, i, dy * g * s);
    st(dgate, i, dy * u * s * (1.0f + g * (1.0f - s)));
}

extern "C" __global__ void swiglu_forward_f32_naive(float* out, const float* gate, const float* up, int n) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (size_t)n) fwd_one(out, gate, up, i);
}

extern "C" __global__ void swiglu_forward_f32_grid(float* out, const float* gate, const float* up, int n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)n; i += (size_t)gridDim.x * blockDim.x)
        fwd_one(out, gate, up, i);
}

extern "C" __global__ void swiglu_forward_bf16_grid(bf16* out, const bf16* gate, const bf16* up, int n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)n; i += (size_t)gridDim.x * blockDim.x)
        fwd_one(out, gate, up, i);
}

extern "C" __global__ void swiglu_backward_f32_naive(float* dgate, float* dup, const float* dout, const float* gate,
                                                     const float* up, int n) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (size_t)n) bwd_one(dgate, dup, dout, gate, up, i);
}

extern "C" __global__ void swiglu_backward_f32_grid(float* dgate, float* dup, const float* dout, const float* gate,
                                                    const float* up, int n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)n; i += (size_t)gridDim.x * blockDim.x)
        bwd_one(dgate, dup, dout, gate, up, i);
}

extern "C" __global__ void swiglu_backward_bf16_grid(bf16* dgate, bf16* dup, const bf16* dout, const bf16* gate,
                                                     const bf16* up, int n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)n; i += (size_t)gridDim.x * blockDim.x)
        bwd_one(dgate, dup, dout, gate, up, i);
}
