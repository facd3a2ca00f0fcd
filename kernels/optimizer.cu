// optimizer.cu: the optimizer over flat buffers (parameters, gradients and each optimizer state
// one buffer of n elements): gradient norm², scaling (clipping), AdamW and RMSprop steps.
// Semantics and rounding order are those of the f32 CPU reference, src/backend/cpu/optim.rs
// (torch's single-tensor AdamW / RMSprop: one f32 rounding per torch op, host scalars computed in
// f64 and rounded once to f32 by the launcher):
//
//   AdamW:   p = p * decay (when apply_decay); m = lerp(m, g, w1); v = (v * b2) + (one_minus_b2 * g) * g
//            p = p + (neg_step_size * m) / (sqrt(v) / bc2_sqrt + eps)
//   RMSprop: g' = g + wd * p (when apply_decay); s = (s * alpha) + (one_minus_alpha * g') * g'
//            p = p + (neg_lr * g') / (sqrt(s) + eps)
//   scale:   buf = buf * factor
//   norm²:   sum_i (double)g_i^2
// Every f32 operation goes through opt::mul/add/sub/div/sqrt: on the GPU the _rn intrinsics,
// which nvcc never contracts into fused multiply-adds (it would contract plain `a * b + c`, and
// torch's CPU kernels that the reference mirrors round each op), so the GPU result is bitwise the
// CPU's; on the host, plain operators (the host build is ISO C++20, where g++ does not contract).
//
// Kernels (launcher: src/backend/cuda/ops/optimizer.rs; all grid-stride over n, so any grid
// covers the buffer and the launcher caps the grid):
//   optimizer_norm_partials_f32  block b writes partials[b] = its threads' sums of g^2, each in
//                                f64 over elements i = b * 256 + t + k * grid * 256 in order of
//                                k, then a fixed shared-memory tree over the block's threads.
//   optimizer_norm_finish        one block: out[0] = sum of the partials (per thread in order,
//                                then the same tree). Two passes, no atomics: the result depends
//                                only on n and the grid, and f64 keeps it within 1e-15 relative
//                                of the CPU's (chunked f64) sum at 28M elements.
//   optimizer_scale_f32          buf *= factor.
//   optimizer_adamw_f32          the AdamW step on f32 parameters.
//   optimizer_adamw_bf16_master  the same step on f32 master weights, then params (bf16, what
//                                the model computes with) = round-to-nearest-even(master).
//   optimizer_rmsprop_f32        the RMSprop step (momentum 0, not centered) on f32 parameters.
//   optimizer_rmsprop_bf16_master  the same on f32 master weights, params = bf16(master).
//   optimizer_round_bf16         params = bf16(master): the bf16 copy of freshly loaded master
//                                weights before the first step.
// The bf16 variants keep gradients and states in f32 (the gradient buffer accumulates the
// micro-batches); RMSprop's decay term reads the master weight, as the f32 reference reads p.
// Stochastic rounding instead of master weights: not done; it saves the master buffer (4 bytes
// per parameter) but needs a measurement of its effect on SPPO's tiny-lr updates first.
//
// Preconditions (checked by the launcher): block (256, 1, 1) (the trees halve 256); grid >= 1
// (the finish kernel: grid 1); every buffer holds n elements (partials: grid); n may be 0 (the
// norm is then 0). Offsets are size_t (n may exceed 2^31). No alignment requirement (scalar
// loads); no warp shuffles.
//
// Failed ideas: none yet (no GPU measurements so far).

#include "common.cuh"

namespace opt {

constexpr int kThreads = 256;

#if SPPO_DEVICE_ONLY
__device__ __forceinline__ float mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float sub(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ float quot(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ float sqrt_rn(float a) { return __fsqrt_rn(a); }
#else
__device__ __forceinline__ float mul(float a, float b) { return a * b; }
__device__ __forceinline__ float add(float a, float b) { return a + b; }
__device__ __forceinline__ float sub(float a, float b) { return a - b; }
__device__ __forceinline__ float quot(float a, float b) { return a / b; }
__device__ __forceinline__ float sqrt_rn(float a) { return sqrtf(a); }
#endif

// ATen's scalar lerp (src/backend/cpu/optim.rs `lerp`): small weights step from start, large
// ones from end, so a weight of 1 returns end exactly.
__device__ __forceinline__ float lerp(float start, float end, float weight) {
    return fabsf(weight) < 0.5f ? add(start, mul(weight, sub(end, start)))
                                : sub(end, mul(sub(end, start), sub(1.0f, weight)));
}

__device__ __forceinline__ float adamw(float p, float g, float* m, float* v, float decay, int apply_decay, float w1,
                                       float b2, float one_minus_b2, float bc2_sqrt, float eps, float neg_step_size) {
    if (apply_decay) p = mul(p, decay);
    const float m_new = lerp(*m, g, w1);
    const float v_new = add(mul(*v, b2), mul(mul(one_minus_b2, g), g));
    const float denom = add(quot(sqrt_rn(v_new), bc2_sqrt), eps);
    *m = m_new;
    *v = v_new;
    return add(p, quot(mul(neg_step_size, m_new), denom));
}

__device__ __forceinline__ float rmsprop(float p, float g, float* s, float wd, int apply_decay, float alpha,
                                         float one_minus_alpha, float eps, float neg_lr) {
    // torch adds the decay to a copy of the gradient; the gradient buffer is untouched.
    if (apply_decay) g = add(g, mul(wd, p));
    const float s_new = add(mul(*s, alpha), mul(mul(one_minus_alpha, g), g));
    *s = s_new;
    return add(p, quot(mul(neg_lr, g), add(sqrt_rn(s_new), eps)));
}

__device__ __forceinline__ size_t first_index() { return (size_t)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ size_t grid_stride() { return (size_t)gridDim.x * blockDim.x; }

// Sum of v over the block's threads by a fixed tree; thread 0 gets it. `red` is __shared__
// double[kThreads].
__device__ __forceinline__ double block_tree_sum(double v, double* red) {
    const int t = threadIdx.x;
    red[t] = v;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
        if (t < stride) red[t] += red[t + stride];
        __syncthreads();
    }
    return red[0];
}

}  // namespace opt

extern "C" __global__ void optimizer_norm_partials_f32(double* partials, const float* grads, size_t n) {
    __shared__ double red[opt::kThreads];
    double acc = 0.0;
    for (size_t i = opt::first_index(); i < n; i += opt::grid_stride()) {
        const double g = (double)grads[i];
        acc += g * g;
    }
    const double total = opt::block_tree_sum(acc, red);
    if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

extern "C" __global__ void optimizer_norm_finish(double* out, const double* partials, int n_partials) {
    __shared__ double red[opt::kThreads];
    double acc = 0.0;
    for (int i = threadIdx.x; i < n_partials; i += blockDim.x) acc += partials[i];
    const double total = opt::block_tree_sum(acc, red);
    if (threadIdx.x == 0) out[0] = total;
}

extern "C" __global__ void optimizer_scale_f32(float* buf, size_t n, float factor) {
    for (size_t i = opt::first_index(); i < n; i += opt::grid_stride()) buf[i] = opt::mul(buf[i], factor);
}

extern "C" __global__ void optimizer_adamw_f32(float* params, const float* grads, float* m, float* v, size_t n,
                                               float decay, int apply_decay, float w1, float b2, float one_minus_b2,
                                               float bc2_sqrt, float eps, float neg_step_size) {
    for (size_t i = opt::first_index(); i < n; i += opt::grid_stride()) {
        params[i] = opt::adamw(params[i], grads[i], m + i, v + i, decay, apply_decay, w1, b2, one_minus_b2, bc2_sqrt,
                               eps, neg_step_size);
    }
}

extern "C" __global__ void optimizer_adamw_bf16_master(bf16* params, float* master, const float* grads, float* m,
                                                       float* v, size_t n, float decay, int apply_decay, float w1,
                                                       float b2, float one_minus_b2, float bc2_sqrt, float eps,
                                                       float neg_step_size) {
    for (size_t i = opt::first_index(); i < n; i += opt::grid_stride()) {
        const float p = opt::adamw(master[i], grads[i], m + i, v + i, decay, apply_decay, w1, b2, one_minus_b2,
                                   bc2_sqrt, eps, neg_step_size);
        master[i] = p;
        params[i] = f32_to_bf16(p);
    }
}

extern "C" __global__ void optimizer_rmsprop_f32(float* params, const float* grads, float* square_avg, size_t n,
                                                 float wd, int apply_decay, float alpha, float one_minus_alpha,
                                                 float eps, float neg_lr) {
    for (size_t i = opt::first_index(); i < n; i += opt::grid_stride()) {
        params[i] =
            opt::rmsprop(params[i], grads[i], square_avg + i, wd, apply_decay, alpha, one_minus_alpha, eps, neg_lr);
    }
}

extern "C" __global__ void optimizer_rmsprop_bf16_master(bf16* params, float* master, const float* grads,
                                                         float* square_avg, size_t n, float wd, int apply_decay,
                                                         float alpha, float one_minus_alpha, float eps, float neg_lr) {
    for (size_t i = opt::first_index(); i < n; i += opt::grid_stride()) {
        const float p =
            opt::rmsprop(master[i], grads[i], square_avg + i, wd, apply_decay, alpha, one_minus_alpha, eps, neg_lr);
        master[i] = p;
        params[i] = f32_to_bf16(p);
    }
}

extern "C" __global__ void optimizer_round_bf16(bf16* params, const float* master, size_t n) {
    for (size_t i = opt::first_index(); i < n; i += opt::grid_stride()) params[i] = f32_to_bf16(master[i]);
}
