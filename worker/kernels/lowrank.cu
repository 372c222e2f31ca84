// Rebuild-mode weights of LoHa and LoKr, fused: the product, the scale, the add to the frozen
// weight and the rounding to its dtype in one pass (candle would write and re-read ΔW and its
// intermediates); and their backward without materialising ΔW.
//
// LoHa (P1 = w1a·w1b, P2 = w2a·w2b from cuBLAS, every tensor viewed flat with n elements):
//   W′ = W + α·P1⊙P2;   dP1 = α·G⊙P2,  dP2 = α·G⊙P1   (G = dL/dW′, both in one pass).
// LoKr (w1 a×b, w2 c×e, W′ viewed (a·c)×(b·e); a conv's w2 is (c, d·kh·kw)):
//   W′[i·c+k, j·e+q] = W[…] + α·w1[i,j]·w2[k,q];
//   dw1[i,j] = α·Σ_{k,q} G[i·c+k, j·e+q]·w2[k,q],   dw2[k,q] = α·Σ_{i,j} G[i·c+k, j·e+q]·w1[i,j].
// α = multiplier × rank scale. Inputs f32/f16/bf16, arithmetic f32, the merged weight rounded
// once; the LoKr factor gradients are f32.
#include "common.cuh"

namespace {

template <class T>
__device__ void loha_merge(const T* __restrict__ w, const T* __restrict__ p1, const T* __restrict__ p2,
                           T* __restrict__ out, long long n, float alpha) {
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
    out[i] = loft::from_f32<T>(loft::to_f32(w[i]) + alpha * (loft::to_f32(p1[i]) * loft::to_f32(p2[i])));
  }
}

template <class T>
__device__ void loha_grad(const T* __restrict__ g, const T* __restrict__ p1, const T* __restrict__ p2,
                          T* __restrict__ dp1, T* __restrict__ dp2, long long n, float alpha) {
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
    float ag = alpha * loft::to_f32(g[i]);
    dp1[i] = loft::from_f32<T>(ag * loft::to_f32(p2[i]));
    dp2[i] = loft::from_f32<T>(ag * loft::to_f32(p1[i]));
  }
}

template <class T>
__device__ void lokr_merge(const T* __restrict__ w, const T* __restrict__ w1, const T* __restrict__ w2,
                           T* __restrict__ out, int a, int b, int c, int e, float alpha) {
  const long long cols = (long long)b * e, n = (long long)a * c * cols;
  for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < n; idx += (long long)gridDim.x * blockDim.x) {
    long long row = idx / cols, col = idx % cols;
    int i = (int)(row / c), k = (int)(row % c), j = (int)(col / e), q = (int)(col % e);
    float kron = loft::to_f32(w1[(long long)i * b + j]) * loft::to_f32(w2[(long long)k * e + q]);
    out[idx] = loft::from_f32<T>(loft::to_f32(w[idx]) + alpha * kron);
  }
}

// dw1: one block per element (i, j) of w1, summing over its c×e tile of G.
template <class T>
__device__ void lokr_grad_w1(const T* __restrict__ g, const T* __restrict__ w2, float* __restrict__ dw1, int a, int b,
                             int c, int e, float alpha) {
  const int i = blockIdx.x / b, j = blockIdx.x % b;
  const long long cols = (long long)b * e;
  float sum = 0.0f;
  for (long long t = threadIdx.x; t < (long long)c * e; t += blockDim.x) {
    int k = (int)(t / e), q = (int)(t % e);
    sum += loft::to_f32(g[((long long)i * c + k) * cols + (long long)j * e + q]) * loft::to_f32(w2[t]);
  }
  sum = loft::block_sum(sum);
  if (threadIdx.x == 0) dw1[blockIdx.x] = alpha * sum;
}

// dw2: one thread per element (k, q) of w2, summing over the a×b tiles (a·b is small).
template <class T>
__device__ void lokr_grad_w2(const T* __restrict__ g, const T* __restrict__ w1, float* __restrict__ dw2, int a, int b,
                             int c, int e, float alpha) {
  const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= (long long)c * e) return;
  const int k = (int)(t / e), q = (int)(t % e);
  const long long cols = (long long)b * e;
  float sum = 0.0f;
  for (int i = 0; i < a; i++) {
    for (int j = 0; j < b; j++) {
      sum += loft::to_f32(g[((long long)i * c + k) * cols + (long long)j * e + q]) * loft::to_f32(w1[i * b + j]);
    }
  }
  dw2[t] = alpha * sum;
}

}  // namespace

#define LOFT_LOWRANK_KERNELS(T, SUFFIX)                                                                              \
  extern "C" __global__ void loft_loha_merge_##SUFFIX(const T* w, const T* p1, const T* p2, T* out, long long n,      \
                                                      float alpha) {                                                \
    loha_merge<T>(w, p1, p2, out, n, alpha);                                                                         \
  }                                                                                                                  \
  extern "C" __global__ void loft_loha_grad_##SUFFIX(const T* g, const T* p1, const T* p2, T* dp1, T* dp2,           \
                                                     long long n, float alpha) {                                     \
    loha_grad<T>(g, p1, p2, dp1, dp2, n, alpha);                                                                     \
  }                                                                                                                  \
  extern "C" __global__ void loft_lokr_merge_##SUFFIX(const T* w, const T* w1, const T* w2, T* out, int a, int b,    \
                                                      int c, int e, float alpha) {                                  \
    lokr_merge<T>(w, w1, w2, out, a, b, c, e, alpha);                                                                \
  }                                                                                                                  \
  extern "C" __global__ void loft_lokr_grad_w1_##SUFFIX(const T* g, const T* w2, float* dw1, int a, int b, int c,    \
                                                        int e, float alpha) {                                       \
    lokr_grad_w1<T>(g, w2, dw1, a, b, c, e, alpha);                                                                  \
  }                                                                                                                  \
  extern "C" __global__ void loft_lokr_grad_w2_##SUFFIX(const T* g, const T* w1, float* dw2, int a, int b, int c,    \
                                                        int e, float alpha) {                                       \
    lokr_grad_w2<T>(g, w1, dw2, a, b, c, e, alpha);                                                                  \
  }

LOFT_LOWRANK_KERNELS(float, f32)
LOFT_LOWRANK_KERNELS(__half, f16)
LOFT_LOWRANK_KERNELS(__nv_bfloat16, bf16)

#ifdef LOFT_CPU_EMULATION
#define LOFT_LOWRANK_EMU(T, SUFFIX)                                                                                  \
  LOFT_EMU_ENTRY(loft_loha_merge_##SUFFIX, (const T* w, const T* p1, const T* p2, T* out, long long n, float alpha), \
                 (w, p1, p2, out, n, alpha))                                                                        \
  LOFT_EMU_ENTRY(loft_loha_grad_##SUFFIX,                                                                            \
                 (const T* g, const T* p1, const T* p2, T* dp1, T* dp2, long long n, float alpha),                   \
                 (g, p1, p2, dp1, dp2, n, alpha))                                                                   \
  LOFT_EMU_ENTRY(loft_lokr_merge_##SUFFIX,                                                                           \
                 (const T* w, const T* w1, const T* w2, T* out, int a, int b, int c, int e, float alpha),            \
                 (w, w1, w2, out, a, b, c, e, alpha))                                                               \
  LOFT_EMU_ENTRY(loft_lokr_grad_w1_##SUFFIX,                                                                         \
                 (const T* g, const T* w2, float* dw1, int a, int b, int c, int e, float alpha),                    \
                 (g, w2, dw1, a, b, c, e, alpha))                                                                   \
  LOFT_EMU_ENTRY(loft_lokr_grad_w2_##SUFFIX,                                                                         \
                 (const T* g, const T* w1, float* dw2, int a, int b, int c, int e, float alpha),                    \
                 (g, w1, dw2, a, b, c, e, alpha))
LOFT_LOWRANK_EMU(float, f32)
LOFT_LOWRANK_EMU(__half, f16)
LOFT_LOWRANK_EMU(__nv_bfloat16, bf16)
#endif
