// cuda_host.h: runs kernels/*.cu on the CPU. Force-included (g++ -include) before a kernel file
// when build.rs compiles it as host C++ (-std=c++20) into libsppo_kernels_host.a; the generated
// entry point `<kernel>_host(grid, block, args...)` calls sppo_host::launch.
//
// Model: one OS thread per CUDA thread; the blocks of a grid run one after another; one global
// mutex serialises launches (`__shared__` variables become function statics shared by the block
// running, and `cargo test` runs tests in parallel). threadIdx/blockIdx/blockDim/gridDim are
// thread-local (initial-exec TLS: about 1 ns per access instead of 4).
// - __syncthreads: a std::barrier over the block; a thread that returns drops out of it.
// - warp shuffles: each lane writes its value into a per-warp slot, waits on the warp's barrier,
//   reads its source lane; two alternating slot buffers make one wait per shuffle. Reading a lane
//   that has exited or does not exist gives NaN (the real GPU gives an undefined value).
// Limits: full-mask warp operations only (every lane of the warp must take part, as the kernels'
// FULL_MASK reductions do); no timeout on barriers (a kernel that deadlocks on the GPU hangs here
// too); `extern __shared__` (dynamic shared memory) is not supported yet; shared memory is not
// poisoned with NaN yet (DESIGN/RESOURCES describe how). Device-only code must sit under
// `#if SPPO_DEVICE_ONLY` (common.cuh) with a portable alternative.
#pragma once

#include <cuda_bf16.h>  // also host_defines.h and vector_types.h (uint3)

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <limits>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

// host_defines.h defines these as nothing on a host compiler; `__shared__` must be shared by the
// threads of a block, so it becomes `static` (safe because blocks run one at a time, under a lock).
#undef __shared__
#define __shared__ static
#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __host__
#define __host__
#undef __forceinline__
#define __forceinline__ inline
#define __launch_bounds__(...)

#define SPPO_TLS __attribute__((tls_model("initial-exec")))

inline thread_local uint3 threadIdx SPPO_TLS;
inline thread_local uint3 blockIdx SPPO_TLS;
inline thread_local uint3 blockDim SPPO_TLS;
inline thread_local uint3 gridDim SPPO_TLS;

namespace sppo_host {

constexpr int kWarp = 32;

struct Warp {
    explicit Warp(int lanes) : lanes(lanes), bar(lanes) {
        for (auto& buf : slots) {
            for (auto& s : buf) s = nan_bits();
        }
        for (auto& buf : tags) {
            for (auto& t : buf) t = ~0u;
        }
    }
    static uint64_t nan_bits() {
        // A NaN whether read back as float (low 4 bytes) or double.
        return 0xFFFFFFFFFFFFFFFFull;
    }
    int lanes;  // threads in this warp (the block's last warp may be partial)
    std::barrier<> bar;
    uint64_t slots[2][kWarp];
    // tags[b][lane]: the shuffle round (the lane's count of shuffles) that wrote slots[b][lane].
    // A reader takes a slot only if its tag is the reader's own round: a lane that has exited (or
    // skipped the shuffle) leaves an old tag, and the read gives NaN. Checking an "exited" flag
    // instead would race: a fast lane can finish the kernel before a slow one reads its slot.
    unsigned tags[2][kWarp];
};

struct Block {
    explicit Block(int threads) : bar(threads) {
        for (int first = 0; first < threads; first += kWarp) {
            warps.push_back(std::make_unique<Warp>(threads - first < kWarp ? threads - first : kWarp));
        }
    }
    std::barrier<> bar;
    std::vector<std::unique_ptr<Warp>> warps;
};

struct ThreadState {
    Block* block;
    int warp;
    int lane;
    unsigned shuffles;  // shuffles done by this lane: picks the slot buffer
};

inline thread_local ThreadState tls SPPO_TLS;

// Every lane publishes `v`, waits for the warp, then reads lane `src`. A `src` outside the warp
// gives `v` back when `keep_own` (as __shfl_down_sync past the last lane), else NaN.
template <class T>
inline T exchange(T v, int src, bool keep_own = false) {
    static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a type wider than 8 bytes");
    ThreadState& t = tls;
    Warp& w = *t.block->warps[t.warp];
    const unsigned round = t.shuffles++;
    const int buf = round & 1;
    uint64_t bits = Warp::nan_bits();
    std::memcpy(&bits, &v, sizeof(T));
    w.slots[buf][t.lane] = bits;
    w.tags[buf][t.lane] = round;
    w.bar.arrive_and_wait();
    uint64_t got = Warp::nan_bits();
    if (src >= 0 && src < w.lanes && w.tags[buf][src] == round) {
        got = w.slots[buf][src];
    } else if (keep_own && (src < 0 || src >= kWarp)) {
        return v;
    }
    T r;
    std::memcpy(&r, &got, sizeof(T));
    return r;
}

// Runs `body` as a CUDA grid. Returns 0, or 1 after printing why (bad launch shape, no threads).
template <class F>
int launch(const char* name, uint3 grid, uint3 block, F body) {
    static std::mutex launch_lock;
    std::lock_guard<std::mutex> guard(launch_lock);
    const long threads = (long)block.x * block.y * block.z;
    if (threads < 1 || threads > 1024 || grid.x < 1 || grid.y < 1 || grid.z < 1) {
        std::fprintf(stderr, "%s_host: bad launch: grid (%u, %u, %u), block (%u, %u, %u)\n", name, grid.x, grid.y,
                     grid.z, block.x, block.y, block.z);
        return 1;
    }
    try {
        for (unsigned bz = 0; bz < grid.z; bz++)
            for (unsigned by = 0; by < grid.y; by++)
                for (unsigned bx = 0; bx < grid.x; bx++) {
                    Block b((int)threads);
                    std::vector<std::thread> pool;
                    pool.reserve(threads);
                    for (long i = 0; i < threads; i++) {
                        pool.emplace_back([&, i] {
                            threadIdx = uint3{(unsigned)(i % block.x), (unsigned)(i / block.x % block.y),
                                              (unsigned)(i / ((long)block.x * block.y))};
                            blockIdx = uint3{bx, by, bz};
                            blockDim = block;
                            gridDim = grid;
                            tls = ThreadState{&b, (int)(i / kWarp), (int)(i % kWarp), 0};
                            body();
                            // Returning (or finishing) drops this thread from every later barrier.
                            b.warps[i / kWarp]->bar.arrive_and_drop();
                            b.bar.arrive_and_drop();
                        });
                    }
                    for (auto& th : pool) th.join();
                }
    } catch (const std::exception& e) {
        std::fprintf(stderr, "%s_host: %s\n", name, e.what());
        return 1;
    }
    return 0;
}

}  // namespace sppo_host

inline void __syncthreads() { sppo_host::tls.block->bar.arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { sppo_host::tls.block->warps[sppo_host::tls.warp]->bar.arrive_and_wait(); }

template <class T>
inline T __shfl_xor_sync(unsigned, T v, int lane_mask, int = 32) {
    return sppo_host::exchange(v, sppo_host::tls.lane ^ lane_mask);
}
template <class T>
inline T __shfl_sync(unsigned, T v, int src, int = 32) {
    return sppo_host::exchange(v, src);
}
template <class T>
inline T __shfl_down_sync(unsigned, T v, unsigned delta, int = 32) {
    return sppo_host::exchange(v, sppo_host::tls.lane + (int)delta, true);
}

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
