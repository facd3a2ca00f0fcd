// logprobs.cu: the LM head fused with log-prob gathering, forward and backward, over chunks of
// tokens so the (tokens, vocab) logits are never materialised; only a (chunk, vocab) f32 scratch.
// Semantics are those of the f32 CPU reference, src/backend/cpu/logprobs.rs:
//
//   z[t, v] = hidden[t] . weight[v]                 (logits of row t)
//   lse[t]  = log sum_v exp(z[t, v])                (natural log)
//   logp[t] = z[t, targets[t]] - lse[t]
//   backward, with g = dlogp[t]: dz[t, v] = g (onehot(targets[t])[v] - exp(z[t, v] - lse[t]))
//            dhidden[t] = sum_v dz[t, v] weight[v]   (OVERWRITTEN)
//            dweight[v] += sum_t dz[t, v] hidden[t]  (ACCUMULATED: a parameter gradient)
// Rows with targets[t] < 0 (prompt tokens, padding) are skipped: the launcher passes only the
// active rows (`rows`, ascending) and zero-fills logp, lse (forward) and dhidden (backward) when
// some row is masked; their dweight contribution is nothing.
//
// Shapes: hidden, dhidden: (N, C) T; weight: (V, C) T; dweight: (V, C) f32 (the f32 gradient
// accumulator, in both variants); targets: (N) int; logp, lse, dlogp: (N) f32;
// rows: (R) int, the active rows of this chunk; z: (R, V) f32 scratch (logits, then dz in place).
// T is f32 or bf16; every sum is in f32; bf16 outputs are rounded once on store.
//
// Kernels (launcher: src/backend/cuda/ops/logprobs.rs), per chunk of R active rows:
//   logprobs_logits_{f32,bf16}      z = hidden[rows] . weight^T: block per 16 rows x 16 vocab
//                                   entries, C streamed through shared memory 64 at a time.
//   logprobs_forward_rows           block per row: max, sum of exp (block reductions), writes
//                                   lse[t] and logp[t].
//   logprobs_dlogits                thread per element of z: z becomes dz (in place).
//   logprobs_dhidden_{f32,bf16}     dhidden[rows] = dz . weight: block per 16 rows x 16 dims,
//                                   V streamed 64 at a time.
//   logprobs_dweight_{f32,bf16}     dweight += dz^T . hidden[rows]: block per 16 vocab x 16 dims,
//                                   the chunk's rows streamed 64 at a time.
// Forward = logits, forward_rows per chunk; backward = logits, dlogits, dhidden, dweight per
// chunk. Every output element is written by one thread in a fixed order (chunks run in order on
// one stream): deterministic, no atomics.
//
// Launch configuration: 256 threads for every kernel. logits: grid (ceil(V/16), ceil(R/16));
// forward_rows: (R); dlogits: (ceil(R*V/256)); dhidden: (ceil(C/16), ceil(R/16)); dweight:
// (ceil(C/16), ceil(V/16)). Static shared memory: 2 x 16 x 65 floats (8.3 KB) for logits and
// dhidden (64 x 17 for its weight tile), 2 x 64 x 17 floats (8.7 KB) for dweight.
//
// Preconditions (checked by the launcher): dim, vocab >= 1; every active row's target < vocab;
// N, dim, vocab fit int (offsets are computed in size_t); ceil(V/16) <= 65535 (grid.y of
// dweight) and ceil(R*V/256) fits grid.x. No alignment requirement (scalar loads).
//
// Failed ideas: none yet. These are plain tiled products; cuBLAS (bf16 in, f32 accumulate) for
// the three products, with these kernels kept as the check, is the next step.

#include "common.cuh"

namespace logprobs {

constexpr int kThreads = 256;
constexpr int kTile = 16;   // output tile side: 16 x 16 = 256 threads, one element each
constexpr int kChunk = 64;  // reduction-dimension slice held in shared memory
static_assert(kTile * kTile == kThreads, "one output element per thread");

__device__ __forceinline__ float ld(const float* p, size_t i) { return p[i]; }
__device__ __forceinline__ float ld(const bf16* p, size_t i) { return bf16_to_f32(p[i]); }
__device__ __forceinline__ void st(float* p, size_t i, float v) { p[i] = v; }
__device__ __forceinline__ void st(bf16* p, size_t i, float v) { p[i] = f32_to_bf16(v); }
__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }

// Max over all threads of the block (blockDim.x a multiple of 32); every thread gets it.
// `scratch` is __shared__ float[32]; syncs before reusing it, as block_reduce_sum.
__device__ __forceinline__ float block_reduce_max(float v, float* scratch) {
    const int lane = threadIdx.x % WARP_SIZE;
    const int warp = threadIdx.x / WARP_SIZE;
    const int n_warps = blockDim.x / WARP_SIZE;
    v = warp_reduce_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < n_warps ? scratch[lane] : -INFINITY;
    return warp_reduce_max(v);
}

template <class T>
__device__ void logits(float* z, const T* hidden, const T* weight, const int* rows, int n_rows, int dim, int vocab) {
    __shared__ float h_s[kTile * (kChunk + 1)];  // (rows, chunk of C), padded rows
    __shared__ float w_s[kTile * (kChunk + 1)];  // (vocab entries, chunk of C)
    const int r0 = blockIdx.y * kTile, v0 = blockIdx.x * kTile;
    const int nr = imin(kTile, n_rows - r0), nv = imin(kTile, vocab - v0);
    const int r = threadIdx.x / kTile, c = threadIdx.x % kTile;
    float acc = 0.0f;
    for (int k0 = 0; k0 < dim; k0 += kChunk) {
        const int kn = imin(kChunk, dim - k0);
        for (int idx = threadIdx.x; idx < kTile * kn; idx += blockDim.x) {
            const int i = idx / kn, k = idx - i * kn;
            if (i < nr) h_s[i * (kChunk + 1) + k] = ld(hidden, (size_t)rows[r0 + i] * dim + k0 + k);
            if (i < nv) w_s[i * (kChunk + 1) + k] = ld(weight, (size_t)(v0 + i) * dim + k0 + k);
        }
        __syncthreads();
        if (r < nr && c < nv) {
            const float* h = h_s + r * (kChunk + 1);
            const float* w = w_s + c * (kChunk + 1);
            for (int k = 0; k < kn; k++) acc += h[k] * w[k];
        }
        __syncthreads();
    }
    if (r < nr && c < nv) z[(size_t)(r0 + r) * vocab + v0 + c] = acc;
}

__device__ void forward_rows(float* logp, float* lse, const float* z, const int* targets, const int* rows,
                             int vocab) {
    __shared__ float scratch[32];
    const float* zr = z + (size_t)blockIdx.x * vocab;
    float m = -INFINITY;
    for (int v = threadIdx.x; v < vocab; v += blockDim.x) m = fmaxf(m, zr[v]);
    m = block_reduce_max(m, scratch);
    float s = 0.0f;
    for (int v = threadIdx.x; v < vocab; v += blockDim.x) s += expf(zr[v] - m);
    s = block_reduce_sum(s, scratch);
    if (threadIdx.x == 0) {
        const int t = rows[blockIdx.x];
        const float l = m + logf(s);
        lse[t] = l;
        logp[t] = zr[targets[t]] - l;
    }
}

__device__ void dlogits(float* z, const float* dlogp, const float* lse, const int* targets, const int* rows,
                        int n_rows, int vocab) {
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)n_rows * vocab) return;
    const int r = (int)(idx / vocab), v = (int)(idx % vocab);
    const int t = rows[r];
    const float g = dlogp[t];
    z[idx] = -g * expf(z[idx] - lse[t]) + (v == targets[t] ? g : 0.0f);
}

template <class T>
__device__ void dhidden(T* dh, const float* dz, const T* weight, const int* rows, int n_rows, int dim, int vocab) {
    __shared__ float dz_s[kTile * (kChunk + 1)];  // (rows, chunk of V)
    __shared__ float w_s[kChunk * (kTile + 1)];   // (chunk of V, dims)
    const int r0 = blockIdx.y * kTile, c0 = blockIdx.x * kTile;
    const int nr = imin(kTile, n_rows - r0), nc = imin(kTile, dim - c0);
    const int r = threadIdx.x / kTile, c = threadIdx.x % kTile;
    float acc = 0.0f;
    for (int u0 = 0; u0 < vocab; u0 += kChunk) {
        const int un = imin(kChunk, vocab - u0);
        for (int idx = threadIdx.x; idx < kTile * un; idx += blockDim.x) {
            const int i = idx / un, u = idx - i * un;  // consecutive threads: consecutive vocab
            if (i < nr) dz_s[i * (kChunk + 1) + u] = dz[(size_t)(r0 + i) * vocab + u0 + u];
        }
        for (int idx = threadIdx.x; idx < un * kTile; idx += blockDim.x) {
            const int u = idx / kTile, j = idx - u * kTile;  // consecutive threads: consecutive dims
            if (j < nc) w_s[u * (kTile + 1) + j] = ld(weight, (size_t)(u0 + u) * dim + c0 + j);
        }
        __syncthreads();
        if (r < nr && c < nc) {
            for (int u = 0; u < un; u++) acc += dz_s[r * (kChunk + 1) + u] * w_s[u * (kTile + 1) + c];
        }
        __syncthreads();
    }
    if (r < nr && c < nc) st(dh, (size_t)rows[r0 + r] * dim + c0 + c, acc);
}

template <class T>
__device__ void dweight(float* dw, const float* dz, const T* hidden, const int* rows, int n_rows, int dim, int vocab) {
    __shared__ float dz_s[kChunk * (kTile + 1)];  // (chunk of rows, vocab entries)
    __shared__ float h_s[kChunk * (kTile + 1)];   // (chunk of rows, dims)
    const int v0 = blockIdx.y * kTile, c0 = blockIdx.x * kTile;
    const int nv = imin(kTile, vocab - v0), nc = imin(kTile, dim - c0);
    const int v = threadIdx.x / kTile, c = threadIdx.x % kTile;
    float acc = 0.0f;
    for (int i0 = 0; i0 < n_rows; i0 += kChunk) {
        const int in = imin(kChunk, n_rows - i0);
        for (int idx = threadIdx.x; idx < in * kTile; idx += blockDim.x) {
            const int i = idx / kTile, j = idx - i * kTile;
            if (j < nv) dz_s[i * (kTile + 1) + j] = dz[(size_t)(i0 + i) * vocab + v0 + j];
            if (j < nc) h_s[i * (kTile + 1) + j] = ld(hidden, (size_t)rows[i0 + i] * dim + c0 + j);
        }
        __syncthreads();
        if (v < nv && c < nc) {
            for (int i = 0; i < in; i++) acc += dz_s[i * (kTile + 1) + v] * h_s[i * (kTile + 1) + c];
        }
        __syncthreads();
    }
    if (v < nv && c < nc) dw[(size_t)(v0 + v) * dim + c0 + c] += acc;
}

}  // namespace logprobs

// ---- entry points (signatures spelled out: build.rs parses them) ----

extern "C" __global__ void __launch_bounds__(256)
    logprobs_logits_f32(float* z, const float* hidden, const float* weight, const int* rows, int n_rows, int dim,
                        int vocab) {
    logprobs::logits(z, hidden, weight, rows, n_rows, dim, vocab);
}

extern "C" __global__ void __launch_bounds__(256)
    logprobs_logits_bf16(float* z, const bf16* hidden, const bf16* weight, const int* rows, int n_rows, int dim,
                         int vocab) {
    logprobs::logits(z, hidden, weight, rows, n_rows, dim, vocab);
}

extern "C" __global__ void __launch_bounds__(256)
    logprobs_forward_rows(float* logp, float* lse, const float* z, const int* targets, const int* rows, int vocab) {
    logprobs::forward_rows(logp, lse, z, targets, rows, vocab);
}

extern "C" __global__ void __launch_bounds__(256)
    logprobs_dlogits(float* z, const float* dlogp, const float* lse, const int* targets, const int* rows,
                     int n_rows, int vocab) {
    logprobs::dlogits(z, dlogp, lse, targets, rows, n_rows, vocab);
}

extern "C" __global__ void __launch_bounds__(256)
    logprobs_dhidden_f32(float* dhidden, const float* dz, const float* weight, const int* rows, int n_rows, int dim,
                         int vocab) {
    logprobs::dhidden(dhidden, dz, weight, rows, n_rows, dim, vocab);
}

extern "C" __global__ void __launch_bounds__(256)
    logprobs_dhidden_bf16(bf16* dhidden, const float* dz, const bf16* weight, const int* rows, int n_rows, int dim,
                          int vocab) {
    logprobs::dhidden(dhidden, dz, weight, rows, n_rows, dim, vocab);
}

extern "C" __global__ void __launch_bounds__(256)
    logprobs_dweight_f32(float* dweight, const float* dz, const float* hidden, const int* rows, int n_rows, int dim,
                         int vocab) {
    logprobs::dweight(dweight, dz, hidden, rows, n_rows, dim, vocab);
}

extern "C" __global__ void __launch_bounds__(256)
    logprobs_dweight_bf16(float* dweight, const float* dz, const bf16* hidden, const int* rows, int n_rows, int dim,
                          int vocab) {
    logprobs::dweight(dweight, dz, hidden, rows, n_rows, dim, vocab);
}
