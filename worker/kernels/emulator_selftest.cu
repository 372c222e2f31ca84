// Kernels that test the CPU emulation itself (run only under it, by worker/tests/kernel_emulation.rs).
#include "common.cuh"

// A shared-memory tree reduction with a barrier at each level: one sum per block.
extern "C" __global__ void selftest_tree_sum(const float* x, float* out, int n) {
  __shared__ float buf[256];
  int t = threadIdx.x;
  int i = blockIdx.x * blockDim.x + t;
  buf[t] = i < n ? x[i] : 0.0f;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (t < stride) buf[t] += buf[t + stride];
    __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = buf[0];
}

// The same reduction without the barriers: a race that must give a wrong sum.
extern "C" __global__ void selftest_tree_sum_racy(const float* x, float* out, int n) {
  __shared__ float buf[256];
  int t = threadIdx.x;
  int i = blockIdx.x * blockDim.x + t;
  buf[t] = i < n ? x[i] : 0.0f;
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (t < stride) buf[t] += buf[t + stride];
  }
  if (t == 0) out[blockIdx.x] = buf[0];
}

// A warp-shuffle reduction and a vote: per block, the sum (block_sum) and how many elements are
// negative (counted with __ballot_sync), the total accumulated across blocks with atomicAdd.
extern "C" __global__ void selftest_shuffle_sum(const float* x, float* sums, float* total, unsigned* negatives, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  float v = i < n ? x[i] : 0.0f;
  float s = loft::block_sum(v);
  unsigned ballot = __ballot_sync(0xffffffffu, v < 0.0f);
  if (threadIdx.x % 32 == 0) atomicAdd(negatives, (unsigned)__popc(ballot));
  if (threadIdx.x == 0) {
    sums[blockIdx.x] = s;
    atomicAdd(total, s);
  }
}

// A barrier inside a branch that only some threads take: the emulator must report a deadlock
// (on a GPU it is undefined behaviour).
extern "C" __global__ void selftest_divergent_barrier(float* out) {
  if (threadIdx.x < 16) __syncthreads();
  out[threadIdx.x] = 1.0f;
}

#ifdef LOFT_CPU_EMULATION
LOFT_EMU_ENTRY(selftest_tree_sum, (const float* x, float* out, int n), (x, out, n))
LOFT_EMU_ENTRY(selftest_tree_sum_racy, (const float* x, float* out, int n), (x, out, n))
LOFT_EMU_ENTRY(selftest_shuffle_sum, (const float* x, float* sums, float* total, unsigned* negatives, int n),
               (x, sums, total, negatives, n))
LOFT_EMU_ENTRY(selftest_divergent_barrier, (float* out), (out))
#endif
