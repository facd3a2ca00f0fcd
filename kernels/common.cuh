// common.cuh: helpers shared by every kernels/*.cu.
//
// defines: bf16 <-> f32 conversions (bf16_to_f32, f32_to_bf16), warp reductions
// (warp_reduce_sum, warp_reduce_max), block reductions over warps (block_reduce_sum),
// WARP_SIZE, FULL_MASK, and the SPPO_* portability macros.
//
// Conventions: every kernel is `extern "C"`, named {concern}_{direction}_{dtype}_{variant}, and
// accumulates in f32 whatever its storage dtype. Sizes are `int` (launchers check they fit);
// element offsets are computed in `size_t` (rows * dim can exceed 2^31).
//
// Portability: these files will also be compiled as host C++ for CPU tests (see build.rs). Keep
// device-only constructs (inline PTX, tensor cores, async copies) behind `#if SPPO_DEVICE_ONLY`
// with a portable fallback, and use only the intrinsics listed here.
#pragma once

#include <cuda_bf16.h>
#include <stddef.h>

#define WARP_SIZE 32
#define FULL_MASK 0xffffffffu

// True when compiling device code for a real GPU (nvcc's device pass); false on the host pass and
// for the future host-C++ build, so code under it needs a portable alternative.
#if defined(__CUDA_ARCH__)
#define SPPO_DEVICE_ONLY 1
#else
#define SPPO_DEVICE_ONLY 0
#endif

typedef __nv_bfloat16 bf16;

__device__ __forceinline__ float bf16_to_f32(bf16 x) { return __bfloat162float(x); }

// Round to nearest even, as PyTorch's `.to(torch.bfloat16)`.
__device__ __forceinline__ bf16 f32_to_bf16(float x) { return __float2bfloat16_rn(x); }

// Sum over the 32 lanes of a warp; every lane gets the total. All 32 lanes must call it.
// Butterfly (xor) order: the result is bitwise identical on every lane.
__device__ __forceinline__ float warp_reduce_sum(float v) {
    for (int offset = WARP_SIZE / 2; offset > 0; offset /= 2) {
        v += __shfl_xor_sync(FULL_MASK, v, offset);
    }
    return v;
}

__device__ __forceinline__ float warp_reduce_max(float v) {
    for (int offset = WARP_SIZE / 2; offset > 0; offset /= 2) {
        v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, offset));
    }
    return v;
}

// Sum over all threads of a block (blockDim.x a multiple of 32, at most 1024); every thread gets
// the total. `scratch` is __shared__ float[32]; the function syncs before reusing it, so calls
// may follow each other with the same scratch.
__device__ __forceinline__ float block_reduce_sum(float v, float* scratch) {
    const int lane = threadIdx.x % WARP_SIZE;
    const int warp = threadIdx.x / WARP_SIZE;
    const int n_warps = blockDim.x / WARP_SIZE;
    v = warp_reduce_sum(v);
    __syncthreads();  // a previous call may still be reading scratch
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < n_warps ? scratch[lane] : 0.0f;
    return warp_reduce_sum(v);
}
