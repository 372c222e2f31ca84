// CPU emulation of the CUDA subset Loft's kernels use, so the same .cu files compile with the
// host C++ compiler (C++20) and run in `cargo test` on machines without a GPU.
//
// Execution model:
// - A launch runs its blocks one after another; a block's threads are OS threads (one per CUDA
//   thread, reused from block to block), so `threadIdx`/`blockIdx` are thread_local variables.
// - Exactly one thread of a block runs at a time, in a fixed order, until it reaches a
//   synchronisation point (`__syncthreads`, a warp shuffle or vote, `__syncwarp`) or returns;
//   then the next thread in the order takes over. A barrier releases its waiters once every
//   participant has arrived. The schedule is therefore deterministic, and a missing
//   `__syncthreads` shows as a wrong result every time, not once in a while: a thread reads
//   shared memory that the threads after it in the order have not yet written. Tests run
//   kernels in both orders (`loft_emu_set_reverse_order`) to catch a race in either direction.
// - `__syncthreads` reached by some threads after others have returned, or by a subset of the
//   block, is a deadlock here: the emulator aborts with a message instead of hanging.
// - `__shared__` variables are function-local statics: shared by the block's threads, and
//   since blocks run one at a time, each block sees its own contents (left over from the
//   previous block, never zeroed, as on a GPU).
// - Warp shuffles and votes exchange values through per-warp slots between two warp barriers,
//   over the warp's existing lanes (the last warp of a block may be partial).
// - Atomics are std::atomic_ref operations.
// - `__half` and `__nv_bfloat16` are 16-bit structs; conversions from float round to nearest
//   even, as `__float2half`/`__float2bfloat16` do.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <math.h>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <condition_variable>
#include <thread>
#include <vector>

#define LOFT_CPU_EMULATION 1

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;
constexpr int warpSize = 32;

// ---------------------------------------------------------------------------------------------
// 16-bit floating-point types.

struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

namespace loft_emu {

inline uint32_t f32_bits(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  return x;
}
inline float bits_f32(uint32_t x) {
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

inline uint16_t f32_to_f16_bits(float f) {
  uint32_t x = f32_bits(f);
  uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t abs = x & 0x7fffffffu;
  if (abs >= 0x7f800000u) return sign | (abs > 0x7f800000u ? 0x7e00u : 0x7c00u);
  if (abs >= 0x477ff000u) return sign | 0x7c00u;  // 65520 and up round to infinity
  if (abs < 0x38800000u) {                          // below 2^-14: a subnormal (or zero)
    // A multiple of 2^-24; the scaling by a power of two is exact, nearbyint rounds to even.
    uint32_t r = (uint32_t)std::nearbyint(bits_f32(abs) * 16777216.0f);
    return (uint16_t)(sign | r);
  }
  uint32_t mant = abs & 0x7fffffu;
  uint32_t exp = (abs >> 23) - 127 + 15;
  uint32_t h = (exp << 10) | (mant >> 13);
  uint32_t rest = mant & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h++;
  return (uint16_t)(sign | h);
}

inline float f16_bits_to_f32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0) {
    float v = (float)mant * (1.0f / 16777216.0f);
    return (h & 0x8000u) ? -v : v;
  }
  if (exp == 31) return bits_f32(sign | 0x7f800000u | (mant << 13));
  return bits_f32(sign | ((exp - 15 + 127) << 23) | (mant << 13));
}

inline uint16_t f32_to_bf16_bits(float f) {
  uint32_t x = f32_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u);
  x += 0x7fffu + ((x >> 16) & 1u);
  return (uint16_t)(x >> 16);
}

inline float bf16_bits_to_f32(uint16_t b) { return bits_f32((uint32_t)b << 16); }

}  // namespace loft_emu

inline __half __float2half(float f) { return __half{loft_emu::f32_to_f16_bits(f)}; }
inline __half __float2half_rn(float f) { return __float2half(f); }
inline float __half2float(__half h) { return loft_emu::f16_bits_to_f32(h.bits); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16{loft_emu::f32_to_bf16_bits(f)}; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __float2bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return loft_emu::bf16_bits_to_f32(b.bits); }

// ---------------------------------------------------------------------------------------------
// Math intrinsics with CUDA's names.

using std::isfinite;
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __saturatef(float x) { return std::min(1.0f, std::max(0.0f, x)); }

// ---------------------------------------------------------------------------------------------
// The scheduler.

namespace loft_emu {

inline std::atomic<bool> reverse_order{false};

enum class State : uint8_t { Run, BlockWait, WarpWait, Done };

// A thread's turn to run: a binary semaphore on a mutex and a condition variable (libstdc++
// 12's std::binary_semaphore can miss a wake-up, GCC bug 104928).
struct Baton {
  std::mutex m;
  std::condition_variable cv;
  bool go = false;
  void release() {
    {
      std::lock_guard<std::mutex> lock(m);
      go = true;
    }
    cv.notify_one();
  }
  void acquire() {
    std::unique_lock<std::mutex> lock(m);
    cv.wait(lock, [this] { return go; });
    go = false;
  }
};

struct Launch {
  int n;                        // threads per block
  unsigned long long nblocks;   // blocks in the grid
  unsigned long long block = 0; // the block now running
  std::vector<std::unique_ptr<Baton>> baton;
  std::vector<State> state;
  std::vector<int> order;  // order[k]: the thread that runs k-th
  std::vector<int> pos;    // pos[thread]: its place in the order
  int block_waiting = 0;
  int done = 0;
  std::vector<int> warp_waiting;
  std::vector<uint64_t> warp_slot;  // one exchange slot per thread
  std::function<void()> body;

  Launch(int threads, unsigned long long blocks)
      : n(threads), nblocks(blocks), state(threads, State::Run), order(threads), pos(threads),
        warp_waiting((threads + 31) / 32, 0), warp_slot(threads, 0) {
    for (int i = 0; i < n; i++) baton.push_back(std::make_unique<Baton>());
    for (int k = 0; k < n; k++) order[k] = reverse_order.load() ? n - 1 - k : k;
    for (int k = 0; k < n; k++) pos[order[k]] = k;
  }

  int warp_lanes(int warp) const { return std::min(32, n - warp * 32); }

  [[noreturn]] void deadlock(const char* why) {
    std::fprintf(stderr, "cpu_emulation: deadlock in block %llu: %s\n", block, why);
    std::fflush(stderr);
    std::abort();
  }

  // The next runnable thread after `me` in the order (`me` itself last), or -1.
  int next_runnable(int me) const {
    for (int k = 1; k <= n; k++) {
      int t = order[(pos[me] + k) % n];
      if (state[t] == State::Run) return t;
    }
    return -1;
  }

  // Hands the baton on from `me` (which has just waited, or finished) and, unless `me`
  // finished, returns once `me` holds it again.
  void pass(int me) {
    int next = next_runnable(me);
    if (next == me) return;
    if (next < 0) {
      if (done < n) {
        deadlock(block_waiting > 0
                     ? "__syncthreads reached by some threads while others returned or wait on a warp"
                     : "a warp barrier (shuffle, vote, __syncwarp) not reached by every lane of its warp");
      }
      // The block has ended: start the next one (or release everyone to exit).
      block++;
      done = 0;
      std::fill(state.begin(), state.end(), State::Run);
      if (block < nblocks) {
        baton[order[0]]->release();
      } else {
        for (int t = 0; t < n; t++) baton[t]->release();
      }
      return;  // the finished thread waits for its baton at the top of its loop
    }
    // Read before the hand-over: once `next` runs it may end the block and reset every state.
    bool finished = state[me] == State::Done;
    baton[next]->release();
    if (!finished) baton[me]->acquire();
  }

  void syncthreads(int me) {
    state[me] = State::BlockWait;
    if (++block_waiting == n) {
      block_waiting = 0;
      for (int t = 0; t < n; t++) state[t] = State::Run;
    }
    pass(me);
  }

  void syncwarp(int me) {
    int warp = me / 32;
    state[me] = State::WarpWait;
    if (++warp_waiting[warp] == warp_lanes(warp)) {
      warp_waiting[warp] = 0;
      for (int t = warp * 32; t < warp * 32 + warp_lanes(warp); t++) state[t] = State::Run;
    }
    pass(me);
  }

  void finish(int me) {
    state[me] = State::Done;
    done++;
    pass(me);
  }
};

inline thread_local Launch* current = nullptr;
inline thread_local int current_thread = 0;

inline dim3 unflatten(unsigned long long i, dim3 d) {
  return dim3((unsigned)(i % d.x), (unsigned)((i / d.x) % d.y), (unsigned)(i / ((unsigned long long)d.x * d.y)));
}

// Runs `body` (the kernel call) on a grid of `grid` blocks of `block` threads.
// One launch at a time in the process: gridDim/blockDim and every `__shared__` (a function
// static, possibly in a helper several kernels call) are process-wide. (A static inside the
// template below would be one mutex per kernel, letting two kernels overlap.)
inline std::mutex one_launch_at_a_time;

template <class F>
void launch(dim3 grid, dim3 block, F&& body) {
  std::lock_guard<std::mutex> guard(one_launch_at_a_time);
  int n = (int)(block.x * block.y * block.z);
  unsigned long long nblocks = (unsigned long long)grid.x * grid.y * grid.z;
  if (n <= 0 || n > 1024 || nblocks == 0) {
    std::fprintf(stderr, "cpu_emulation: bad launch: %d threads per block, %llu blocks\n", n, nblocks);
    std::abort();
  }
  gridDim = grid;
  blockDim = block;
  Launch L(n, nblocks);
  L.body = std::function<void()>(body);
  std::vector<std::thread> threads;
  threads.reserve(n);
  for (int t = 0; t < n; t++) {
    threads.emplace_back([&L, t, block, grid] {
      current = &L;
      current_thread = t;
      threadIdx = unflatten((unsigned long long)t, block);
      for (;;) {
        L.baton[t]->acquire();
        if (L.block >= L.nblocks) return;
        blockIdx = unflatten(L.block, grid);
        L.body();
        L.finish(t);
      }
    });
  }
  L.baton[L.order[0]]->release();
  for (auto& th : threads) th.join();
}

template <class T>
T warp_exchange(T value, int src_lane) {
  static_assert(sizeof(T) <= 8, "warp exchange of a value over 8 bytes");
  Launch& L = *current;
  int me = current_thread;
  int warp = me / 32;
  uint64_t slot = 0;
  std::memcpy(&slot, &value, sizeof(T));
  L.warp_slot[me] = slot;
  L.syncwarp(me);
  int lanes = L.warp_lanes(warp);
  // A source lane outside the warp reads the caller's own value, as CUDA does for width 32.
  int src = (src_lane >= 0 && src_lane < lanes) ? warp * 32 + src_lane : me;
  T out;
  std::memcpy(&out, &L.warp_slot[src], sizeof(T));
  L.syncwarp(me);  // nobody overwrites a slot before every lane has read
  return out;
}

}  // namespace loft_emu

// ---------------------------------------------------------------------------------------------
// Synchronisation, warp intrinsics, atomics.

inline void __syncthreads() { loft_emu::current->syncthreads(loft_emu::current_thread); }
inline void __syncwarp(unsigned = 0xffffffffu) { loft_emu::current->syncwarp(loft_emu::current_thread); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <class T>
T __shfl_sync(unsigned, T v, int src_lane, int width = 32) {
  int lane = loft_emu::current_thread % 32;
  int base = lane - lane % width;
  return loft_emu::warp_exchange(v, base + src_lane % width);
}
template <class T>
T __shfl_xor_sync(unsigned, T v, int lane_mask, int width = 32) {
  int lane = loft_emu::current_thread % 32;
  int src = lane ^ lane_mask;
  if (src / width != lane / width) src = lane;  // outside the segment: its own value
  return loft_emu::warp_exchange(v, src);
}
template <class T>
T __shfl_down_sync(unsigned, T v, unsigned delta, int width = 32) {
  int lane = loft_emu::current_thread % 32;
  int src = lane + (int)delta;
  if (src / width != lane / width) src = lane;
  return loft_emu::warp_exchange(v, src);
}

inline unsigned __ballot_sync(unsigned, int predicate) {
  loft_emu::Launch& L = *loft_emu::current;
  int me = loft_emu::current_thread;
  int warp = me / 32;
  L.warp_slot[me] = predicate ? 1 : 0;
  L.syncwarp(me);
  unsigned ballot = 0;
  for (int lane = 0; lane < L.warp_lanes(warp); lane++) {
    if (L.warp_slot[warp * 32 + lane]) ballot |= 1u << lane;
  }
  L.syncwarp(me);
  return ballot;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __any_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }
inline int __all_sync(unsigned mask, int predicate) {
  loft_emu::Launch& L = *loft_emu::current;
  int lanes = L.warp_lanes(loft_emu::current_thread / 32);
  unsigned all = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1);
  return __ballot_sync(mask, predicate) == all;
}

template <class T>
T atomicAdd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value);
}
inline float atomicMax(float* address, float value) {
  std::atomic_ref<float> a(*address);
  float old = a.load();
  while (old < value && !a.compare_exchange_weak(old, value)) {
  }
  return old;
}
inline int atomicMax(int* address, int value) {
  std::atomic_ref<int> a(*address);
  int old = a.load();
  while (old < value && !a.compare_exchange_weak(old, value)) {
  }
  return old;
}
inline unsigned atomicOr(unsigned* address, unsigned value) { return std::atomic_ref<unsigned>(*address).fetch_or(value); }
inline unsigned atomicCAS(unsigned* address, unsigned compare, unsigned value) {
  std::atomic_ref<unsigned>(*address).compare_exchange_strong(compare, value);
  return compare;
}

// An extern "C" entry point `emu_NAME(grid, block, PARAMS)` that launches kernel NAME under the
// emulation; PARAMS and ARGS are parenthesised lists. The tests call these through FFI.
#define LOFT_UNPAREN(...) __VA_ARGS__
#define LOFT_EMU_ENTRY(name, params, args)                                          \
  extern "C" void emu_##name(dim3 grid, dim3 block, LOFT_UNPAREN params) {         \
    loft_emu::launch(grid, block, [&] { name args; });                              \
  }
