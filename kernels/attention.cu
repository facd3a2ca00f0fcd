// attention.cu: scaled dot-product attention over packed variable-length sequences, forward and
// backward, causal (optionally sliding-window, Mistral) or bidirectional (BERT), grouped-query.
// Semantics are those of the f32 CPU reference, src/backend/cpu/attention.rs:
//
//   For query row i of a sequence (position p = k_len - q_len + i), key j is visible iff
//   j <= p && (window == 0 || p - j < window) when causal, always when bidirectional.
//   s_ij = scale * q_i . k_j
//   forward:  lse_i = log sum_j exp(s_ij) (natural log), P_ij = exp(s_ij - lse_i),
//             out_i = sum_j P_ij v_j
//   backward: D_i = dout_i . out_i, dS_ij = P_ij (dout_i . v_j - D_i),
//             dq_i = scale sum_j dS_ij k_j, dk_j = scale sum_i dS_ij q_i, dv_j = sum_i P_ij dout_i
//   (Dao et al. 2022, FlashAttention, Alg. 1 forward and Alg. 2 backward, eqs. in Appendix B.)
//
// Shapes (T is f32 or bf16; lse and delta are f32 in every variant):
//   q, out, dout, dq: (Nq, n_heads, head_dim) T      lse, delta: (Nq, n_heads) f32
//   k, v, dk, dv:     (Nk, n_kv_heads, head_dim) T
//   seqs: (n_seqs, 4) int = q_start, q_len, k_start, k_len per sequence (AttnSeq)
//   tiles: (grid.x, 2) int = sequence index, first row (query index or key index within the
//          sequence) of the tile each block handles; built by the launcher for the kernel's tile
//          height, so no block is wasted on short sequences of a packed batch.
// Query head h reads kv head h / (n_heads / n_kv_heads): K/V are never replicated. `causal` is
// 0 or 1; `window` is 0 (no window) or the Mistral window, >= 1. All arithmetic is f32; bf16
// variants convert on load and round once on store.
//
// Kernels (launcher: src/backend/cuda/ops/attention.rs, enum AttentionVariant):
//   attention_forward_{f32,bf16}_naive       thread per (query row, head), two passes over the
//                                             keys (max, then sum and weighted values): the check.
//   attention_forward_{f32,bf16}_fused       block per (16-query tile, head): flash-attention
//                                             style, key tiles of 8 streamed through shared memory
//                                             with an online softmax; the T x T matrix is never
//                                             stored, only a 16 x 8 tile of scores.
//   attention_backward_delta_{f32,bf16}      thread per (query row, head): delta = dout . out.
//   attention_backward_dq_{f32,bf16}_naive   thread per (query row, head), loop over its keys.
//   attention_backward_dq_{f32,bf16}_fused   block per (8-query tile, head), key tiles of 8.
//   attention_backward_dkdv_{f32,bf16}_naive thread per (key row, kv head), loop over the group's
//                                             heads and the queries that see the key.
//   attention_backward_dkdv_{f32,bf16}_fused block per (8-key tile, kv head): keeps its dk, dv
//                                             rows in registers while it streams 8-query tiles
//                                             of every head of the group.
// Backward = delta, then dq and dkdv (independent). Why two passes instead of atomics: the block
// that owns a key tile sums dk, dv over all its queries and the group's heads itself, and the
// block that owns a query tile sums dq over its keys itself, so every output element is written
// by exactly one thread, once, in a fixed order: no races, no atomics, bitwise deterministic.
// The price is recomputing P and dS twice (once per pass), about 1.4x the flops of the atomic
// dq variant (FlashAttention-2 sec. 3.2); acceptable for this first portable version.
//
// Launch configuration (the launcher's `*_launch`): fused forward 128 threads = 16 rows x 8
// lanes; fused backward 64 threads = 8 rows x 8 lanes; naive and delta 64 threads, one row
// each. grid = (tiles, heads) with heads = n_heads (forward, dq) or n_kv_heads (dkdv); delta:
// (ceil(Nq * n_heads / 64), 1). A thread of a fused kernel owns one row of its block's tile and
// dims lane, lane + 8, lane + 16, ... of it (at most 256 / 8 = 32 accumulators per output).
// Static shared memory: fused forward (16 + 8 + 8) x 257 + 128 floats = 33.4 KB; fused backward
// 4 x 8 x 257 + 128 floats = 33.4 KB (under the 48 KB static limit; rows are padded to
// head_dim + 1 floats so that the 8 rows read by a warp fall in different banks).
//
// Preconditions (checked by the launcher): 1 <= head_dim <= 256; n_heads a multiple of
// n_kv_heads; every sequence inside the buffers with 0 <= q_len <= k_len; query ranges disjoint;
// for backward also key ranges disjoint (a dkdv block overwrites its rows); window < max k_len
// (a larger window is passed as 0); every index fits int, offsets are computed in size_t. Rows
// outside every sequence: forward leaves them untouched; backward's launcher zero-fills dq (dk,
// dv) first when some row is uncovered, as the kernels write covered rows only. No alignment
// requirement (scalar loads). No warp shuffles: tiles go through shared memory and
// __syncthreads, taken by every thread of the block (loop bounds are uniform per block).
//
// Failed ideas: none yet (no GPU measurements so far). Tensor cores (mma/wgmma) come later,
// behind a switch, with this file's portable path kept for the host harness.

#include "common.cuh"

// Full unrolling keeps the per-lane accumulator arrays in registers on the GPU; the host
// compiler does not know the pragma (and would warn), so it gets nothing.
#if defined(__CUDACC__)
#define ATTN_UNROLL _Pragma("unroll")
#else
#define ATTN_UNROLL
#endif

namespace attn {

constexpr int kMaxHeadDim = 256;
constexpr int kStride = kMaxHeadDim + 1;  // shared row capacity: head_dim + 1 floats at most
constexpr int kLanes = 8;                 // threads sharing one row of a tile
constexpr int kPerLane = kMaxHeadDim / kLanes;
constexpr int kFwdRows = 16;  // fused forward: query rows per block
constexpr int kFwdKeys = 8;   // fused forward: keys per tile (one per lane)
constexpr int kBwdRows = 8;   // fused backward: query rows per tile
constexpr int kBwdKeys = 8;   // fused backward: keys per tile
static_assert(kFwdKeys == kLanes && kBwdKeys == kLanes && kBwdRows == kLanes, "score tile: one entry per thread");

struct Seq {
    int q_start, q_len, k_start, k_len;
    // Position of query 0 among the keys: the queries are the last q_len positions.
    __device__ int offset() const { return k_len - q_len; }
};

__device__ __forceinline__ Seq load_seq(const int* seqs, int s) {
    const int* e = seqs + 4 * (size_t)s;
    return Seq{e[0], e[1], e[2], e[3]};
}

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }
__device__ __forceinline__ int imax(int a, int b) { return a > b ? a : b; }

struct Mask {
    int causal;
    int window;  // 0: none

    __device__ bool visible(int p, int j) const { return !causal || (j <= p && (window == 0 || p - j < window)); }

    // Keys [*lo, *hi) that some query at positions p_first..p_last may see.
    __device__ void keys_for(int p_first, int p_last, int k_len, int* lo, int* hi) const {
        if (!causal) {
            *lo = 0;
            *hi = k_len;
            return;
        }
        *lo = window == 0 ? 0 : imax(0, p_first - window + 1);
        *hi = p_last + 1;
    }

    // Query indices [*lo, *hi) of `seq` that may see some key in j_first..j_last.
    __device__ void queries_for(const Seq& seq, int j_first, int j_last, int* lo, int* hi) const {
        int p_lo = 0, p_hi = seq.k_len - 1;  // positions, inclusive
        if (causal) {
            p_lo = j_first;
            // window < k_len (launcher), so j_last + window - 1 cannot overflow.
            if (window != 0) p_hi = imin(p_hi, j_last + window - 1);
        }
        *lo = imax(0, p_lo - seq.offset());
        *hi = imin(seq.q_len, p_hi - seq.offset() + 1);
    }
};

__device__ __forceinline__ float ld(const float* p, size_t i) { return p[i]; }
__device__ __forceinline__ float ld(const bf16* p, size_t i) { return bf16_to_f32(p[i]); }
__device__ __forceinline__ void st(float* p, size_t i, float v) { p[i] = v; }
__device__ __forceinline__ void st(bf16* p, size_t i, float v) { p[i] = f32_to_bf16(v); }

// Copies rows first_row .. first_row + n_rows of one head (elements head_off .. head_off +
// head_dim of rows of row_elems elements) into dst with row stride head_dim + 1, as f32.
// Consecutive threads read consecutive elements (coalesced).
template <class T>
__device__ void load_tile(float* dst, const T* src, int first_row, int n_rows, int row_elems, int head_off,
                          int head_dim) {
    const int stride = head_dim + 1;
    for (int idx = threadIdx.x; idx < n_rows * head_dim; idx += blockDim.x) {
        const int r = idx / head_dim;
        const int d = idx - r * head_dim;
        dst[r * stride + d] = ld(src, (size_t)(first_row + r) * row_elems + head_off + d);
    }
}

__device__ __forceinline__ float dot_shared(const float* a, const float* b, int n) {
    float acc = 0.0f;
    for (int d = 0; d < n; d++) acc += a[d] * b[d];
    return acc;
}

template <class A, class B>
__device__ __forceinline__ float dot_global(const A* a, size_t a_off, const B* b, size_t b_off, int n) {
    float acc = 0.0f;
    for (int d = 0; d < n; d++) acc += ld(a, a_off + d) * ld(b, b_off + d);
    return acc;
}

// ---- forward ----

template <class T>
__device__ void forward_naive(T* out, float* lse, const T* q, const T* k, const T* v, const int* seqs,
                              const int* tiles, int n_heads, int n_kv_heads, int head_dim, float scale, int causal,
                              int window) {
    const Seq seq = load_seq(seqs, tiles[2 * blockIdx.x]);
    const int i = tiles[2 * blockIdx.x + 1] + threadIdx.x;
    if (i >= seq.q_len) return;
    const int h = blockIdx.y;
    const int kv = h / (n_heads / n_kv_heads);
    const int q_row = n_heads * head_dim, kv_row = n_kv_heads * head_dim;
    const Mask mask{causal, window};
    const int p = seq.offset() + i;
    int lo, hi;
    mask.keys_for(p, p, seq.k_len, &lo, &hi);
    const size_t row = (size_t)seq.q_start + i;
    const size_t q_off = row * q_row + (size_t)h * head_dim;
    auto kv_off = [&](int j) { return (size_t)(seq.k_start + j) * kv_row + (size_t)kv * head_dim; };

    float m = -INFINITY;
    for (int j = lo; j < hi; j++) {
        if (mask.visible(p, j)) m = fmaxf(m, scale * dot_global(q, q_off, k, kv_off(j), head_dim));
    }
    float acc[kMaxHeadDim];
    for (int d = 0; d < head_dim; d++) acc[d] = 0.0f;
    float l = 0.0f;
    for (int j = lo; j < hi; j++) {
        if (!mask.visible(p, j)) continue;
        const float e = expf(scale * dot_global(q, q_off, k, kv_off(j), head_dim) - m);
        l += e;
        for (int d = 0; d < head_dim; d++) acc[d] += e * ld(v, kv_off(j) + d);
    }
    const float inv = 1.0f / l;
    for (int d = 0; d < head_dim; d++) st(out, q_off + d, acc[d] * inv);
    lse[row * n_heads + h] = m + logf(l);
}

template <class T>
__device__ void forward_fused(T* out, float* lse, const T* q, const T* k, const T* v, const int* seqs,
                              const int* tiles, int n_heads, int n_kv_heads, int head_dim, float scale, int causal,
                              int window) {
    __shared__ float q_s[kFwdRows * kStride];   // (rows, head_dim + 1)
    __shared__ float k_s[kFwdKeys * kStride];   // (keys, head_dim + 1)
    __shared__ float v_s[kFwdKeys * kStride];   // (keys, head_dim + 1)
    __shared__ float s_s[kFwdRows * kFwdKeys];  // scaled scores, -inf where hidden

    const Seq seq = load_seq(seqs, tiles[2 * blockIdx.x]);
    const int i0 = tiles[2 * blockIdx.x + 1];
    const int rows = imin(kFwdRows, seq.q_len - i0);
    const int h = blockIdx.y;
    const int kv = h / (n_heads / n_kv_heads);
    const int q_row = n_heads * head_dim, kv_row = n_kv_heads * head_dim;
    const int stride = head_dim + 1;
    const Mask mask{causal, window};
    const int p0 = seq.offset() + i0;
    const int r = threadIdx.x / kLanes;  // this thread's query row in the tile
    const int c = threadIdx.x % kLanes;  // its lane: key c of a score tile, dims c + 8 * n of the output
    const int p = p0 + r;
    int lo, hi;
    mask.keys_for(p0, p0 + rows - 1, seq.k_len, &lo, &hi);

    load_tile(q_s, q, seq.q_start + i0, rows, q_row, h * head_dim, head_dim);
    // Online softmax (Milakov & Gimelshein 2018): m is the running max, l the running sum of
    // exp(s - m), acc the running sum of exp(s - m) v; rescaled by exp(m_old - m_new) as m grows.
    // The 8 lanes of a row compute the same m and l redundantly, so they need no exchange.
    float m = -INFINITY, l = 0.0f;
    float acc[kPerLane];
ATTN_UNROLL
    for (int n = 0; n < kPerLane; n++) acc[n] = 0.0f;

    for (int j0 = lo; j0 < hi; j0 += kFwdKeys) {
        const int nk = imin(kFwdKeys, hi - j0);
        load_tile(k_s, k, seq.k_start + j0, nk, kv_row, kv * head_dim, head_dim);
        load_tile(v_s, v, seq.k_start + j0, nk, kv_row, kv * head_dim, head_dim);
        __syncthreads();  // q_s (first tile), k_s, v_s loaded
        float s = -INFINITY;
        if (r < rows && c < nk && mask.visible(p, j0 + c)) {
            s = scale * dot_shared(q_s + r * stride, k_s + c * stride, head_dim);
        }
        s_s[r * kFwdKeys + c] = s;
        __syncthreads();  // the whole score tile written
        if (r < rows) {
            float tile_max = -INFINITY;
            for (int kj = 0; kj < nk; kj++) tile_max = fmaxf(tile_max, s_s[r * kFwdKeys + kj]);
            const float m_new = fmaxf(m, tile_max);
            if (m_new > -INFINITY) {  // else no key of this row seen yet: nothing to add
                const float correction = expf(m - m_new);  // 0 on the first visible tile (m = -inf)
                l *= correction;
ATTN_UNROLL
                for (int n = 0; n < kPerLane; n++) acc[n] *= correction;
                for (int kj = 0; kj < nk; kj++) {
                    const float e = expf(s_s[r * kFwdKeys + kj] - m_new);  // 0 for hidden keys
                    l += e;
                    const float* vr = v_s + kj * stride;
ATTN_UNROLL
                    for (int n = 0; n < kPerLane; n++) {
                        const int d = c + kLanes * n;
                        if (d < head_dim) acc[n] += e * vr[d];
                    }
                }
                m = m_new;
            }
        }
        __syncthreads();  // done reading k_s, v_s, s_s before the next tile overwrites them
    }
    if (r < rows) {
        // Every query sees at least itself (causal) or one key (k_len >= q_len >= 1): l >= 1.
        const size_t row = (size_t)seq.q_start + i0 + r;
        const float inv = 1.0f / l;
ATTN_UNROLL
        for (int n = 0; n < kPerLane; n++) {
            const int d = c + kLanes * n;
            if (d < head_dim) st(out, row * q_row + (size_t)h * head_dim + d, acc[n] * inv);
        }
        if (c == 0) lse[row * n_heads + h] = m + logf(l);
    }
}

// ---- backward ----

template <class T>
__device__ void backward_delta(float* delta, const T* dout, const T* out, int rows, int head_dim) {
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= rows) return;
    delta[idx] = dot_global(dout, (size_t)idx * head_dim, out, (size_t)idx * head_dim, head_dim);
}

template <class T>
__device__ void backward_dq_naive(T* dq, const T* dout, const T* q, const T* k, const T* v, const float* lse,
                                  const float* delta, const int* seqs, const int* tiles, int n_heads,
                                  int n_kv_heads, int head_dim, float scale, int causal, int window) {
    const Seq seq = load_seq(seqs, tiles[2 * blockIdx.x]);
    const int i = tiles[2 * blockIdx.x + 1] + threadIdx.x;
    if (i >= seq.q_len) return;
    const int h = blockIdx.y;
    const int kv = h / (n_heads / n_kv_heads);
    const int q_row = n_heads * head_dim, kv_row = n_kv_heads * head_dim;
    const Mask mask{causal, window};
    const int p = seq.offset() + i;
    int lo, hi;
    mask.keys_for(p, p, seq.k_len, &lo, &hi);
    const size_t row = (size_t)seq.q_start + i;
    const size_t q_off = row * q_row + (size_t)h * head_dim;
    const float row_lse = lse[row * n_heads + h], row_delta = delta[row * n_heads + h];
    float acc[kMaxHeadDim];
    for (int d = 0; d < head_dim; d++) acc[d] = 0.0f;
    for (int j = lo; j < hi; j++) {
        if (!mask.visible(p, j)) continue;
        const size_t kv_off = (size_t)(seq.k_start + j) * kv_row + (size_t)kv * head_dim;
        const float prob = expf(scale * dot_global(q, q_off, k, kv_off, head_dim) - row_lse);
        const float ds = prob * (dot_global(dout, q_off, v, kv_off, head_dim) - row_delta);
        for (int d = 0; d < head_dim; d++) acc[d] += ds * ld(k, kv_off + d);
    }
    for (int d = 0; d < head_dim; d++) st(dq, q_off + d, scale * acc[d]);
}

template <class T>
__device__ void backward_dkdv_naive(T* dk, T* dv, const T* dout, const T* q, const T* k, const T* v,
                                    const float* lse, const float* delta, const int* seqs, const int* tiles,
                                    int n_heads, int n_kv_heads, int head_dim, float scale, int causal, int window) {
    const Seq seq = load_seq(seqs, tiles[2 * blockIdx.x]);
    const int j = tiles[2 * blockIdx.x + 1] + threadIdx.x;
    if (j >= seq.k_len) return;
    const int kv = blockIdx.y;
    const int group = n_heads / n_kv_heads;
    const int q_row = n_heads * head_dim, kv_row = n_kv_heads * head_dim;
    const Mask mask{causal, window};
    int lo, hi;
    mask.queries_for(seq, j, j, &lo, &hi);
    const size_t kv_off = (size_t)(seq.k_start + j) * kv_row + (size_t)kv * head_dim;
    float dk_acc[kMaxHeadDim], dv_acc[kMaxHeadDim];
    for (int d = 0; d < head_dim; d++) dk_acc[d] = dv_acc[d] = 0.0f;
    for (int hg = 0; hg < group; hg++) {
        const int h = kv * group + hg;
        for (int i = lo; i < hi; i++) {
            if (!mask.visible(seq.offset() + i, j)) continue;
            const size_t row = (size_t)seq.q_start + i;
            const size_t q_off = row * q_row + (size_t)h * head_dim;
            const float prob = expf(scale * dot_global(q, q_off, k, kv_off, head_dim) - lse[row * n_heads + h]);
            const float ds = prob * (dot_global(dout, q_off, v, kv_off, head_dim) - delta[row * n_heads + h]);
            for (int d = 0; d < head_dim; d++) {
                dv_acc[d] += prob * ld(dout, q_off + d);
                dk_acc[d] += ds * ld(q, q_off + d);
            }
        }
    }
    for (int d = 0; d < head_dim; d++) {
        st(dk, kv_off + d, scale * dk_acc[d]);
        st(dv, kv_off + d, dv_acc[d]);
    }
}

template <class T>
__device__ void backward_dq_fused(T* dq, const T* dout, const T* q, const T* k, const T* v, const float* lse,
                                  const float* delta, const int* seqs, const int* tiles, int n_heads,
                                  int n_kv_heads, int head_dim, float scale, int causal, int window) {
    __shared__ float q_s[kBwdRows * kStride];    // (rows, head_dim + 1)
    __shared__ float do_s[kBwdRows * kStride];   // (rows, head_dim + 1)
    __shared__ float k_s[kBwdKeys * kStride];    // (keys, head_dim + 1)
    __shared__ float v_s[kBwdKeys * kStride];    // (keys, head_dim + 1)
    __shared__ float ds_s[kBwdRows * kBwdKeys];  // dS, 0 where hidden

    const Seq seq = load_seq(seqs, tiles[2 * blockIdx.x]);
    const int i0 = tiles[2 * blockIdx.x + 1];
    const int rows = imin(kBwdRows, seq.q_len - i0);
    const int h = blockIdx.y;
    const int kv = h / (n_heads / n_kv_heads);
    const int q_row = n_heads * head_dim, kv_row = n_kv_heads * head_dim;
    const int stride = head_dim + 1;
    const Mask mask{causal, window};
    const int p0 = seq.offset() + i0;
    const int r = threadIdx.x / kLanes;  // query row in the tile (scores and accumulation)
    const int c = threadIdx.x % kLanes;  // key c of a score tile; dims c + 8 * n of dq
    const size_t row = (size_t)seq.q_start + i0 + r;
    int lo, hi;
    mask.keys_for(p0, p0 + rows - 1, seq.k_len, &lo, &hi);

    load_tile(q_s, q, seq.q_start + i0, rows, q_row, h * head_dim, head_dim);
    load_tile(do_s, dout, seq.q_start + i0, rows, q_row, h * head_dim, head_dim);
    const float row_lse = r < rows ? lse[row * n_heads + h] : 0.0f;
    const float row_delta = r < rows ? delta[row * n_heads + h] : 0.0f;
    float acc[kPerLane];
ATTN_UNROLL
    for (int n = 0; n < kPerLane; n++) acc[n] = 0.0f;

    for (int j0 = lo; j0 < hi; j0 += kBwdKeys) {
        const int nk = imin(kBwdKeys, hi - j0);
        load_tile(k_s, k, seq.k_start + j0, nk, kv_row, kv * head_dim, head_dim);
        load_tile(v_s, v, seq.k_start + j0, nk, kv_row, kv * head_dim, head_dim);
        __syncthreads();
        float ds = 0.0f;
        if (r < rows && c < nk && mask.visible(p0 + r, j0 + c)) {
            const float prob = expf(scale * dot_shared(q_s + r * stride, k_s + c * stride, head_dim) - row_lse);
            ds = prob * (dot_shared(do_s + r * stride, v_s + c * stride, head_dim) - row_delta);
        }
        ds_s[r * kBwdKeys + c] = ds;
        __syncthreads();
        if (r < rows) {
            for (int kj = 0; kj < nk; kj++) {
                const float w = ds_s[r * kBwdKeys + kj];
                const float* kr = k_s + kj * stride;
ATTN_UNROLL
                for (int n = 0; n < kPerLane; n++) {
                    const int d = c + kLanes * n;
                    if (d < head_dim) acc[n] += w * kr[d];
                }
            }
        }
        __syncthreads();
    }
    if (r < rows) {
ATTN_UNROLL
        for (int n = 0; n < kPerLane; n++) {
            const int d = c + kLanes * n;
            if (d < head_dim) st(dq, row * q_row + (size_t)h * head_dim + d, scale * acc[n]);
        }
    }
}

template <class T>
__device__ void backward_dkdv_fused(T* dk, T* dv, const T* dout, const T* q, const T* k, const T* v,
                                    const float* lse, const float* delta, const int* seqs, const int* tiles,
                                    int n_heads, int n_kv_heads, int head_dim, float scale, int causal, int window) {
    __shared__ float k_s[kBwdKeys * kStride];    // (keys, head_dim + 1)
    __shared__ float v_s[kBwdKeys * kStride];    // (keys, head_dim + 1)
    __shared__ float q_s[kBwdRows * kStride];    // (rows, head_dim + 1)
    __shared__ float do_s[kBwdRows * kStride];   // (rows, head_dim + 1)
    __shared__ float p_s[kBwdRows * kBwdKeys];   // P, 0 where hidden
    __shared__ float ds_s[kBwdRows * kBwdKeys];  // dS, 0 where hidden

    const Seq seq = load_seq(seqs, tiles[2 * blockIdx.x]);
    const int j0 = tiles[2 * blockIdx.x + 1];
    const int nk = imin(kBwdKeys, seq.k_len - j0);
    const int kv = blockIdx.y;
    const int group = n_heads / n_kv_heads;
    const int q_row = n_heads * head_dim, kv_row = n_kv_heads * head_dim;
    const int stride = head_dim + 1;
    const Mask mask{causal, window};
    // Score step: thread (qr, c) = (query row of the tile, key c). Accumulation step: thread owns
    // key row kj = threadIdx.x / 8 of the tile and dims c + 8 * n of its dk and dv.
    const int qr = threadIdx.x / kLanes;
    const int kj = threadIdx.x / kLanes;
    const int c = threadIdx.x % kLanes;
    int lo, hi;
    mask.queries_for(seq, j0, j0 + nk - 1, &lo, &hi);

    load_tile(k_s, k, seq.k_start + j0, nk, kv_row, kv * head_dim, head_dim);
    load_tile(v_s, v, seq.k_start + j0, nk, kv_row, kv * head_dim, head_dim);
    float dk_acc[kPerLane], dv_acc[kPerLane];
ATTN_UNROLL
    for (int n = 0; n < kPerLane; n++) dk_acc[n] = dv_acc[n] = 0.0f;

    for (int hg = 0; hg < group; hg++) {
        const int h = kv * group + hg;
        for (int i0 = lo; i0 < hi; i0 += kBwdRows) {
            const int nr = imin(kBwdRows, hi - i0);
            load_tile(q_s, q, seq.q_start + i0, nr, q_row, h * head_dim, head_dim);
            load_tile(do_s, dout, seq.q_start + i0, nr, q_row, h * head_dim, head_dim);
            __syncthreads();  // k_s, v_s (first tile), q_s, do_s loaded
            float prob = 0.0f, ds = 0.0f;
            if (qr < nr && c < nk && mask.visible(seq.offset() + i0 + qr, j0 + c)) {
                const size_t row = (size_t)seq.q_start + i0 + qr;
                prob = expf(scale * dot_shared(q_s + qr * stride, k_s + c * stride, head_dim) - lse[row * n_heads + h]);
                ds = prob * (dot_shared(do_s + qr * stride, v_s + c * stride, head_dim) - delta[row * n_heads + h]);
            }
            p_s[qr * kBwdKeys + c] = prob;
            ds_s[qr * kBwdKeys + c] = ds;
            __syncthreads();
            if (kj < nk) {
                for (int i = 0; i < nr; i++) {
                    const float pw = p_s[i * kBwdKeys + kj], dw = ds_s[i * kBwdKeys + kj];
                    const float* qi = q_s + i * stride;
                    const float* doi = do_s + i * stride;
ATTN_UNROLL
                    for (int n = 0; n < kPerLane; n++) {
                        const int d = c + kLanes * n;
                        if (d < head_dim) {
                            dv_acc[n] += pw * doi[d];
                            dk_acc[n] += dw * qi[d];
                        }
                    }
                }
            }
            __syncthreads();  // done reading q_s, do_s, p_s, ds_s before the next tile
        }
    }
    if (kj < nk) {
        const size_t kv_off = (size_t)(seq.k_start + j0 + kj) * kv_row + (size_t)kv * head_dim;
ATTN_UNROLL
        for (int n = 0; n < kPerLane; n++) {
            const int d = c + kLanes * n;
            if (d < head_dim) {
                st(dk, kv_off + d, scale * dk_acc[n]);
                st(dv, kv_off + d, dv_acc[n]);
            }
        }
    }
}

}  // namespace attn

// ---- entry points: {concern}_{direction}_{dtype}_{variant} ----
// Signatures are spelled out (no macros): build.rs parses them to generate the host entry points.

extern "C" __global__ void __launch_bounds__(64)
    attention_forward_f32_naive(float* out, float* lse, const float* q, const float* k, const float* v,
                                const int* seqs, const int* tiles, int n_heads, int n_kv_heads, int head_dim,
                                float scale, int causal, int window) {
    attn::forward_naive(out, lse, q, k, v, seqs, tiles, n_heads, n_kv_heads, head_dim, scale, causal, window);
}

extern "C" __global__ void __launch_bounds__(64)
    attention_forward_bf16_naive(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v,
                                 const int* seqs, const int* tiles, int n_heads, int n_kv_heads, int head_dim,
                                 float scale, int causal, int window) {
    attn::forward_naive(out, lse, q, k, v, seqs, tiles, n_heads, n_kv_heads, head_dim, scale, causal, window);
}

extern "C" __global__ void __launch_bounds__(128)
    attention_forward_f32_fused(float* out, float* lse, const float* q, const float* k, const float* v,
                                const int* seqs, const int* tiles, int n_heads, int n_kv_heads, int head_dim,
                                float scale, int causal, int window) {
    attn::forward_fused(out, lse, q, k, v, seqs, tiles, n_heads, n_kv_heads, head_dim, scale, causal, window);
}

extern "C" __global__ void __launch_bounds__(128)
    attention_forward_bf16_fused(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v,
                                 const int* seqs, const int* tiles, int n_heads, int n_kv_heads, int head_dim,
                                 float scale, int causal, int window) {
    attn::forward_fused(out, lse, q, k, v, seqs, tiles, n_heads, n_kv_heads, head_dim, scale, causal, window);
}

extern "C" __global__ void __launch_bounds__(64)
    attention_backward_delta_f32(float* delta, const float* dout, const float* out, int rows, int head_dim) {
    attn::backward_delta(delta, dout, out, rows, head_dim);
}

extern "C" __global__ void __launch_bounds__(64)
    attention_backward_delta_bf16(float* delta, const bf16* dout, const bf16* out, int rows, int head_dim) {
    attn::backward_delta(delta, dout, out, rows, head_dim);
}

extern "C" __global__ void __launch_bounds__(64)
    attention_backward_dq_f32_naive(float* dq, const float* dout, const float* q, const float* k, const float* v,
                                    const float* lse, const float* delta, const int* seqs, const int* tiles,
                                    int n_heads, int n_kv_heads, int head_dim, float scale, int causal, int window) {
    attn::backward_dq_naive(dq, dout, q, k, v, lse, delta, seqs, tiles, n_heads, n_kv_heads, head_dim, scale,
                            causal, window);
}

extern "C" __global__ void __launch_bounds__(64)
    attention_backward_dq_bf16_naive(bf16* dq, const bf16* dout, const bf16* q, const bf16* k, const bf16* v,
                                     const float* lse, const float* delta, const int* seqs, const int* tiles,
                                     int n_heads, int n_kv_heads, int head_dim, float scale, int causal, int window) {
    attn::backward_dq_naive(dq, dout, q, k, v, lse, delta, seqs, tiles, n_heads, n_kv_heads, head_dim, scale,
                            causal, window);
}

extern "C" __global__ void __launch_bounds__(64)
    attention_backward_dq_f32_fused(float* dq, const float* dout, const float* q, const float* k, const float* v,
                                    const float* lse, const float* delta, const int* seqs, const int* tiles,
                                    int n_heads, int n_kv_heads, int head_dim, float scale, int causal, int window) {
    attn::backward_dq_fused(dq, dout, q, k, v, lse, delta, seqs, tiles, n_heads, n_kv_heads, head_dim, scale,
                            causal, window);
}

extern "C" __global__ void __launch_bounds__(64)
    attention_backward_dq_bf16_fused(bf16* dq, const bf16* dout, const bf16* q, const bf16* k, const bf16* v,
                                     const float* lse, const float* delta, const int* seqs, const int* tiles,
                                     int n_heads, int n_kv_heads, int head_dim, float scale, int causal, int window) {
    attn::backward_dq_fused(dq, dout, q, k, v, lse, delta, seqs, tiles, n_heads, n_kv_heads, head_dim, scale,
                            causal, window);
}

extern "C" __global__ void __launch_bounds__(64)
    attention_backward_dkdv_f32_naive(float* dk, float* dv, const float* dout, const float* q, const float* k,
                                      const float* v, const float* lse, const float* delta, const int* seqs,
                                      const int* tiles, int n_heads, int n_kv_heads, int head_dim, float scale,
                                      int causal, int window) {
    attn::backward_dkdv_naive(dk, dv, dout, q, k, v, lse, delta, seqs, tiles, n_heads, n_kv_heads, head_dim, scale,
                              causal, window);
}

extern "C" __global__ void __launch_bounds__(64)
    attention_backward_dkdv_bf16_naive(bf16* dk, bf16* dv, const bf16* dout, const bf16* q, const bf16* k,
                                       const bf16* v, const float* lse, const float* delta, const int* seqs,
                                       const int* tiles, int n_heads, int n_kv_heads, int head_dim, float scale,
                                       int causal, int window) {
    attn::backward_dkdv_naive(dk, dv, dout, q, k, v, lse, delta, seqs, tiles, n_heads, n_kv_heads, head_dim, scale,
                              causal, window);
}

extern "C" __global__ void __launch_bounds__(64)
    attention_backward_dkdv_f32_fused(float* dk, float* dv, const float* dout, const float* q, const float* k,
                                      const float* v, const float* lse, const float* delta, const int* seqs,
                                      const int* tiles, int n_heads, int n_kv_heads, int head_dim, float scale,
                                      int causal, int window) {
    attn::backward_dkdv_fused(dk, dv, dout, q, k, v, lse, delta, seqs, tiles, n_heads, n_kv_heads, head_dim, scale,
                              causal, window);
}

extern "C" __global__ void __launch_bounds__(64)
    attention_backward_dkdv_bf16_fused(bf16* dk, bf16* dv, const bf16* dout, const bf16* q, const bf16* k,
                                       const bf16* v, const float* lse, const float* delta, const int* seqs,
                                       const int* tiles, int n_heads, int n_kv_heads, int head_dim, float scale,
                                       int causal, int window) {
    attn::backward_dkdv_fused(dk, dv, dout, q, k, v, lse, delta, seqs, tiles, n_heads, n_kv_heads, head_dim, scale,
                              causal, window);
}
