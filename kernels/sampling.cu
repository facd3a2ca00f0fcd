// sampling.cu: one token per row of logits: temperature -> top-k -> top-p -> min-p -> one
// inverse-CDF draw with the row's uniform, the exact procedure of the module doc of
// src/sampling.rs (the CPU sampler), so that given the same logits and the same uniform
// (crate::rng::RngKey::uniform, computed on the host) the GPU picks the same token.
//
//   x[i] = l[i] / temperature + 0.0 (f32, IEEE division; -0.0 -> +0.0); candidates: x > -inf
//   canonical order: x descending, ties by id ascending; key(x) = f32 order as u32 order
//   w[i] = exp((double)x[i] - (double)m) (f64), m = max x; S = candidates with x >= t_k and w > 0
//   top-p: walk S in canonical order, keep while the mass before a token is < top_p * sum_S w
//   min-p: keep w >= min_p; draw: target = u * sum_K w, first kept token whose running sum > target
//
// Shapes: logits (rows, V) f32; uniforms (rows) f32 in [0, 1); tokens, status (rows) int.
// status[r]: 0 ok (tokens[r] = the token); 1 a NaN or +inf logit (tokens[r] = its lowest index);
// 2 every logit -inf; 3 l / temperature overflows to +inf (tokens[r] = lowest such index). The
// launcher (src/backend/cuda/ops/sampling.rs) turns non-zero statuses into errors naming the row
// and the token, with the CPU sampler's wording.
//
// Variants (launcher enum SamplingVariant):
//   sampling_draw_f32_search  one block per row. Every threshold of the canonical order (the
//     top-k value, the top-p cut, the draw) is found by a bitwise binary search over the 32-bit
//     order key: 32 passes over the row, each a block-wide count or f64 mass of the tokens above a
//     candidate key; inside the threshold's group of tied x (one weight w), the cut among ids
//     ascending is a second search over id bits. No sort, no atomics, no shared arrays beyond the
//     32-slot reduction scratch, deterministic, any blockDim.x multiple of 32 up to 1024. About 140
//     passes per row: fine for decode batches; a radix-histogram version is the obvious next step.
//
// Sums: f64, block tree order (the CPU's canonical-order sums differ by rounding; the CPU module
// doc bounds what that can change: a cutoff within ~1e-15 relative of a threshold, ~1e-12 per
// token). Inside a tied group the running sums are taken one weight at a time, as the CPU does.
//
// Preconditions (launcher): 1 <= V <= 2^30; gridDim.x == rows; blockDim.x a multiple of 32, <= 1024;
// temperature >= 0 finite; top_k >= 0; 0 < top_p <= 1; 0 <= min_p <= 1; u in [0, 1).
//
// Failed ideas: none yet (no GPU measurements so far).

#include "common.cuh"

namespace smp {

constexpr int kNone = 0x7fffffff;

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }

// The bits of an f32 (the host build has no __float_as_uint).
__device__ __forceinline__ unsigned f32_bits(float x) {
#if SPPO_DEVICE_ONLY
    return __float_as_uint(x);
#else
    unsigned b;
    memcpy(&b, &x, sizeof b);
    return b;
#endif
}

__device__ __forceinline__ float bits_f32(unsigned b) {
#if SPPO_DEVICE_ONLY
    return __uint_as_float(b);
#else
    float x;
    memcpy(&x, &b, sizeof x);
    return x;
#endif
}

// f32 order as u32 order (x has no -0.0). Every non-NaN x has key > 0 (-inf: 0x007fffff).
__device__ __forceinline__ unsigned order_key(float x) {
    const unsigned b = f32_bits(x);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float key_value(unsigned key) {
    return bits_f32((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

__device__ __forceinline__ double warp_sum_f64(double v) {
    for (int o = WARP_SIZE / 2; o > 0; o /= 2) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ int warp_sum_i32(int v) {
    for (int o = WARP_SIZE / 2; o > 0; o /= 2) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ int warp_min_i32(int v) {
    for (int o = WARP_SIZE / 2; o > 0; o /= 2) v = imin(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

__device__ __forceinline__ float warp_max_f32(float v) {
    for (int o = WARP_SIZE / 2; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// Block-wide reductions; every thread gets the (bitwise identical) result. Each syncs before
// reusing its scratch, so calls may follow each other.
__device__ double block_sum_f64(double v, double* s) {
    const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE, n = blockDim.x / WARP_SIZE;
    v = warp_sum_f64(v);
    __syncthreads();
    if (lane == 0) s[warp] = v;
    __syncthreads();
    return warp_sum_f64(lane < n ? s[lane] : 0.0);
}

__device__ int block_sum_i32(int v, int* s) {
    const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE, n = blockDim.x / WARP_SIZE;
    v = warp_sum_i32(v);
    __syncthreads();
    if (lane == 0) s[warp] = v;
    __syncthreads();
    return warp_sum_i32(lane < n ? s[lane] : 0);
}

__device__ int block_min_i32(int v, int* s) {
    const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE, n = blockDim.x / WARP_SIZE;
    v = warp_min_i32(v);
    __syncthreads();
    if (lane == 0) s[warp] = v;
    __syncthreads();
    return warp_min_i32(lane < n ? s[lane] : kNone);
}

__device__ float block_max_f32(float v, float* s) {
    const int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE, n = blockDim.x / WARP_SIZE;
    v = warp_max_f32(v);
    __syncthreads();
    if (lane == 0) s[warp] = v;
    __syncthreads();
    return warp_max_f32(lane < n ? s[lane] : -INFINITY);
}

// One row's truncation state: everything a thread needs to classify token i.
struct Row {
    const float* l;
    int V;
    float t;        // temperature
    double m;       // max x
    unsigned tk;    // top-k: keep key >= tk (0: off)
    unsigned cut_key;  // top-p: keep key > cut_key, or key == cut_key and id <= cut_id
    int cut_id;        //        (cut_key 0: off)
    double min_p;   // keep w >= min_p (0: off)

    __device__ float x(int i) const { return l[i] / t + 0.0f; }
    __device__ double w(float x) const { return exp((double)x - m); }
    // In S: a candidate, within top-k, weight not underflowed. Sets key and weight.
    __device__ bool in_s(int i, unsigned& key, double& wt) const {
        const float xi = x(i);
        if (!(xi > -INFINITY)) return false;
        key = order_key(xi);
        if (key < tk) return false;
        wt = w(xi);
        return wt > 0.0;
    }
    // In K: kept after top-p and min-p.
    __device__ bool in_k(int i, unsigned& key, double& wt) const {
        if (!in_s(i, key, wt)) return false;
        if (cut_key != 0 && (key < cut_key || (key == cut_key && i > cut_id))) return false;
        return wt >= min_p;
    }
};

// The `rank`-th smallest id (1-based) among tokens of `pred` with key == group: the smallest c
// with count(id <= c) >= rank, by a bitwise search for the largest v with count(id < v) < rank.
template <class Pred>
__device__ int nth_id_in_group(const Row& r, Pred pred, unsigned group, int rank, int* si) {
    int bits = 0;
    while (bits < 30 && (1 << bits) < r.V) bits++;  // V <= 2^30 (launcher)
    int v = 0;
    for (int b = bits - 1; b >= 0; b--) {
        const int c = v | (1 << b);
        int cnt = 0;
        for (int i = threadIdx.x; i < c && i < r.V; i += blockDim.x) {
            unsigned key;
            double wt;
            cnt += pred(i, key, wt) && key == group;
        }
        if (block_sum_i32(cnt, si) < rank) v = c;
    }
    return v;
}

}  // namespace smp

extern "C" __global__ void sampling_draw_f32_search(int* tokens, int* status, const float* logits, const float* uniforms,
                                                    int rows, int V, float temperature, int top_k, float top_p,
                                                    float min_p) {
    using namespace smp;
    __shared__ double sd[32];
    __shared__ int si[32];
    __shared__ float sf[32];
    __shared__ int s_result;
    const int row = blockIdx.x;
    if (row >= rows) return;  // uniform across the block
    const float* l = logits + (size_t)row * V;

    // Step 0: NaN and +inf logits (`!(l < inf)`), lowest index.
    int bad = kNone;
    for (int i = threadIdx.x; i < V; i += blockDim.x)
        if (!(l[i] < INFINITY)) bad = imin(bad, i);
    bad = block_min_i32(bad, si);
    if (bad != kNone) {
        if (threadIdx.x == 0) status[row] = 1, tokens[row] = bad;
        return;
    }

    // Step 1: greedy: the lowest id of the maximal logit.
    if (temperature == 0.0f) {
        float best = -INFINITY;
        for (int i = threadIdx.x; i < V; i += blockDim.x) best = fmaxf(best, l[i]);
        best = block_max_f32(best, sf);
        int id = kNone;
        if (best > -INFINITY)
            for (int i = threadIdx.x; i < V; i += blockDim.x)
                if (l[i] == best) id = imin(id, i);
        id = block_min_i32(id, si);
        if (threadIdx.x == 0) {
            if (id == kNone) status[row] = 2, tokens[row] = 0;
            else status[row] = 0, tokens[row] = id;
        }
        return;
    }

    // Step 2: temperature, candidates, overflow, max.
    Row r{l, V, temperature, 0.0, 0u, 0u, kNone, 0.0};
    float m = -INFINITY;
    int overflow = kNone, n_cand = 0;
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        const float x = r.x(i);
        if (x > -INFINITY) {
            if (!(x < INFINITY)) overflow = imin(overflow, i);
            m = fmaxf(m, x);
            n_cand++;
        }
    }
    overflow = block_min_i32(overflow, si);
    if (overflow != kNone) {
        if (threadIdx.x == 0) status[row] = 3, tokens[row] = overflow;
        return;
    }
    m = block_max_f32(m, sf);
    n_cand = block_sum_i32(n_cand, si);
    if (n_cand == 0) {
        if (threadIdx.x == 0) status[row] = 2, tokens[row] = 0;
        return;
    }
    r.m = (double)m;

    // Step 4: top-k: tk = the largest key v with count(key >= v) >= k (the k-th largest x's key).
    if (top_k > 0 && top_k < n_cand) {
        unsigned v = 0;
        for (int b = 31; b >= 0; b--) {
            const unsigned c = v | (1u << b);
            int cnt = 0;
            for (int i = threadIdx.x; i < V; i += blockDim.x) {
                const float x = r.x(i);
                cnt += x > -INFINITY && order_key(x) >= c;
            }
            if (block_sum_i32(cnt, si) >= top_k) v = c;
        }
        r.tk = v;
    }

    // Mass of S (or K) strictly above key v.
    auto mass_above = [&](unsigned v, bool kept) {
        double s = 0.0;
        for (int i = threadIdx.x; i < V; i += blockDim.x) {
            unsigned key;
            double wt;
            if ((kept ? r.in_k(i, key, wt) : r.in_s(i, key, wt)) && key > v) s += wt;
        }
        return block_sum_f64(s, sd);
    };
    // The largest key v with mass_above(v) > bound (strict) or >= bound.
    auto search = [&](double bound, bool kept, bool strict) {
        unsigned v = 0;
        for (int b = 31; b >= 0; b--) {
            const unsigned c = v | (1u << b);
            const double s = mass_above(c, kept);
            if (strict ? s > bound : s >= bound) v = c;
        }
        return v;
    };
    // Tokens of S (or K) with key == group.
    auto group_count = [&](unsigned group, bool kept) {
        int cnt = 0;
        for (int i = threadIdx.x; i < V; i += blockDim.x) {
            unsigned key;
            double wt;
            cnt += (kept ? r.in_k(i, key, wt) : r.in_s(i, key, wt)) && key == group;
        }
        return block_sum_i32(cnt, si);
    };
    auto pred_s = [&](int i, unsigned& key, double& wt) { return r.in_s(i, key, wt); };
    auto pred_k = [&](int i, unsigned& key, double& wt) { return r.in_k(i, key, wt); };

    // Step 6: top-p. mass_above(0) = Z >= limit, so the search finds the last key v with
    // mass_above(v) >= limit; the walk stops inside the group of key v + 1 (a key of S, since the
    // mass changes there), after the first keep_n of its ids, each of weight w.
    if (top_p < 1.0f) {
        const double z = mass_above(0, false);
        const double limit = (double)top_p * z;
        const unsigned cut = search(limit, false, false) + 1;
        const double above = mass_above(cut, false);
        const int n_group = group_count(cut, false);
        if (threadIdx.x == 0) {
            const double w = r.w(key_value(cut));
            double mass = above;
            int keep = 0;
            while (keep < n_group && mass < limit) mass += w, keep++;
            s_result = keep;
        }
        __syncthreads();
        const int keep = s_result;
        __syncthreads();  // s_result is reused below
        r.cut_id = nth_id_in_group(r, pred_s, cut, keep, si);
        r.cut_key = cut;
    }
    // Step 7: min-p.
    r.min_p = (double)min_p;

    // Step 8: draw. g(v) = kept mass above key v; the token's group is the smallest key a with
    // g(a) <= target, one above the last key whose g is > target.
    const double total = mass_above(0, true);
    const double target = (double)uniforms[row] * total;
    int token;
    if (!(total > target)) {
        // Rounding left no token: the last kept one (smallest key, then largest id).
        unsigned v = 0;
        for (int b = 31; b >= 0; b--) {
            const unsigned c = v | (1u << b);
            int cnt = 0;
            for (int i = threadIdx.x; i < V; i += blockDim.x) {
                unsigned key;
                double wt;
                cnt += r.in_k(i, key, wt) && key < c;
            }
            if (block_sum_i32(cnt, si) == 0) v = c;
        }
        token = nth_id_in_group(r, pred_k, v, group_count(v, true), si);
    } else {
        const unsigned group = search(target, true, true) + 1;
        const double above = mass_above(group, true);
        const int n_group = group_count(group, true);
        if (threadIdx.x == 0) {
            const double w = r.w(key_value(group));
            double c = above;
            int j = 0;
            while (j < n_group - 1) {
                c += w;
                if (target < c) break;
                j++;
            }
            s_result = j;
        }
        __syncthreads();
        const int j = s_result;
        token = nth_id_in_group(r, pred_k, group, j + 1, si);
    }
    if (threadIdx.x == 0) status[row] = 0, tokens[row] = token;
}
