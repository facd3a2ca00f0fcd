// embedding.cu: token embedding, forward (gather rows) and backward (scatter-add rows).
//
//   forward:  out[t, c] = table[ids[t], c]                  out: (N, C), table: (V, C), ids: (N)
//   backward: dtable[ids[t], c] += dout[t, c]               repeated ids ACCUMULATE, in token order
//
// Variants (launcher: src/backend/cuda/ops/embedding.rs, enum EmbeddingVariant):
//   embedding_forward_f32_naive    one thread per token row, copies the row (strided, uncoalesced).
//   embedding_forward_{f32,bf16}_coalesced
//                                  one thread per element (grid-stride loop): coalesced. bf16 is
//                                  an exact copy of the bf16 table.
//   embedding_backward_f32_naive   one thread per column c, scanning all N tokens in order:
//                                  dtable[ids[t], c] += dout[t, c]. No two threads share an
//                                  element, so no atomics; deterministic. The reference.
//   embedding_backward_f32_coalesced
//                                  the launcher sorts (id, token) pairs by id (stable: tokens in
//                                  order within an id) into a CSR list: uniq[u] (U distinct ids),
//                                  starts[u]..starts[u+1] a segment of order[] (token indices).
//                                  One block per distinct id (grid-stride over u), threads stride
//                                  the C columns (coalesced), each sums its segment in token order
//                                  into a register starting from dtable's value, then stores once.
//                                  Same addition order as the naive kernel and the CPU reference,
//                                  so bitwise identical to both; no float atomics, no contention
//                                  on repeated ids, and no rescanning of all N ids per row.
//
// Preconditions (checked by the launcher): every id in [0, V) (the launcher rejects an
// out-of-range id with an error naming it, as the CPU reference does); N * C fits the buffers;
// naive forward: gridDim.x * blockDim.x >= N; naive backward: >= C. The others loop.
//
// Failed ideas: none yet (no GPU measurements so far).

#include "common.cuh"

extern "C" __global__ void embedding_forward_f32_naive(float* out, const float* table, const int* ids, int N, int C) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= N) return;
    const float* src = table + (size_t)ids[t] * C;
    float* dst = out + (size_t)t * C;
    for (int c = 0; c < C; c++) dst[c] = src[c];
}

extern "C" __global__ void embedding_forward_f32_coalesced(float* out, const float* table, const int* ids, int N, int C) {
    const size_t total = (size_t)N * C;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const size_t t = i / C;
        const size_t c = i - t * C;
        out[i] = table[(size_t)ids[t] * C + c];
    }
}

extern "C" __global__ void embedding_forward_bf16_coalesced(bf16* out, const bf16* table, const int* ids, int N, int C) {
    const size_t total = (size_t)N * C;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const size_t t = i / C;
        const size_t c = i - t * C;
        out[i] = table[(size_t)ids[t] * C + c];
    }
}

extern "C" __global__ void embedding_backward_f32_naive(float* dtable, const float* dout, const int* ids, int N, int C) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    for (int t = 0; t < N; t++) dtable[(size_t)ids[t] * C + c] += dout[(size_t)t * C + c];
}

extern "C" __global__ void embedding_backward_f32_coalesced(float* dtable, const float* dout, const int* uniq,
                                                         const int* starts, const int* order, int U, int C) {
    for (int u = blockIdx.x; u < U; u += gridDim.x) {
        float* row = dtable + (size_t)uniq[u] * C;
        const int lo = starts[u];
        const int hi = starts[u + 1];
        for (int c = threadIdx.x; c < C; c += blockDim.x) {
            float acc = row[c];
            for (int k = lo; k < hi; k++) acc += dout[(size_t)order[k] * C + c];
            row[c] = acc;
        }
    }
}
