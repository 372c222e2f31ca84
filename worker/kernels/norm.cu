// GroupNorm and LayerNorm, forward and backward, with an optional SiLU after the affine
// (every resnet's norm1/norm2 and the UNet's/VAE's conv_norm_out are followed by one).
//
// Layout: x is contiguous and viewed as R rows of N elements; each row is one group of
// statistics (GroupNorm: row = sample·G + group, N = (C/G)·HW; LayerNorm: row = token,
// N = C). Element i of row r belongs to channel c = (r mod G)·cpg + i / inner
// (GroupNorm: cpg = C/G, inner = HW; LayerNorm: G = 1, cpg = C, inner = 1).
//
// Forward: μ = mean(x), r = 1/√(var(x) + ε) (biased variance, f32, Welford per thread and
// Chan's combination across threads), x̂ = (x − μ)·r, z = x̂·γ_c + β_c, y = z or silu(z).
// Only μ and r are kept for the backward.
// Backward, with g = dy (or dy·silu'(z), silu'(z) = σ(z)·(1 + z·(1 − σ(z)))) and ĝ = g·γ_c:
//   dx = r·(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂)),   dγ_c = Σ g·x̂,   dβ_c = Σ g
// (dx per row; dγ, dβ summed over every element of channel c in every row).
#include "common.cuh"

namespace {

struct Welford {
  float n, mean, m2;
};

__device__ __forceinline__ Welford welford_combine(Welford a, Welford b) {
  float n = a.n + b.n;
  if (n == 0.0f) return a;
  float delta = b.mean - a.mean;
  float wb = b.n / n;
  return Welford{n, a.mean + delta * wb, a.m2 + b.m2 + delta * delta * a.n * wb};
}

__device__ __forceinline__ float sigmoid(float z) { return 1.0f / (1.0f + expf(-z)); }

__device__ __forceinline__ float affine(const float* gamma, const float* beta, int c, float xhat) {
  float z = xhat * gamma[c];
  return beta ? z + beta[c] : z;
}

// dy, or dy·silu'(z): the gradient at the affine's output.
template <bool SILU>
__device__ __forceinline__ float affine_output_grad(float dy, const float* gamma, const float* beta, int c, float xhat) {
  if (!SILU) return dy;
  float z = affine(gamma, beta, c, xhat);
  float s = sigmoid(z);
  return dy * s * (1.0f + z * (1.0f - s));
}

// One block per row.
template <class T, bool SILU>
__device__ void norm_forward(const T* __restrict__ x, const float* __restrict__ gamma, const float* __restrict__ beta,
                             T* __restrict__ y, float* __restrict__ mean_out, float* __restrict__ rstd_out, int N,
                             int G, int cpg, int inner, float eps) {
  __shared__ Welford partial[32];
  const long long row = blockIdx.x;
  const T* xr = x + row * N;
  T* yr = y + row * N;
  Welford w{0.0f, 0.0f, 0.0f};
  for (int i = threadIdx.x; i < N; i += blockDim.x) {
    float v = loft::to_f32(xr[i]);
    w.n += 1.0f;
    float delta = v - w.mean;
    w.mean += delta / w.n;
    w.m2 += delta * (v - w.mean);
  }
  for (int offset = 16; offset > 0; offset >>= 1) {
    Welford o{__shfl_xor_sync(0xffffffffu, w.n, offset), __shfl_xor_sync(0xffffffffu, w.mean, offset),
              __shfl_xor_sync(0xffffffffu, w.m2, offset)};
    w = welford_combine(w, o);
  }
  int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) partial[warp] = w;
  __syncthreads();
  Welford total = partial[0];
  for (int k = 1; k < (int)(blockDim.x / 32); k++) total = welford_combine(total, partial[k]);
  float mean = total.mean;
  float rstd = rsqrtf(total.m2 / (float)N + eps);
  if (threadIdx.x == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
  int channel0 = (int)(row % G) * cpg;
  for (int i = threadIdx.x; i < N; i += blockDim.x) {
    int c = channel0 + i / inner;
    float z = affine(gamma, beta, c, (loft::to_f32(xr[i]) - mean) * rstd);
    yr[i] = loft::from_f32<T>(SILU ? z * sigmoid(z) : z);
  }
}

// dx: one block per row.
template <class T, bool SILU>
__device__ void norm_backward_input(const T* __restrict__ x, const float* __restrict__ gamma, const float* __restrict__ beta,
                                    const float* __restrict__ mean_in, const float* __restrict__ rstd_in,
                                    const T* __restrict__ dy, T* __restrict__ dx, int N, int G, int cpg, int inner) {
  const long long row = blockIdx.x;
  const T* xr = x + row * N;
  const T* dyr = dy + row * N;
  T* dxr = dx + row * N;
  float mean = mean_in[row], rstd = rstd_in[row];
  int channel0 = (int)(row % G) * cpg;
  float sum_g = 0.0f, sum_gx = 0.0f;
  for (int i = threadIdx.x; i < N; i += blockDim.x) {
    int c = channel0 + i / inner;
    float xhat = (loft::to_f32(xr[i]) - mean) * rstd;
    float ghat = affine_output_grad<SILU>(loft::to_f32(dyr[i]), gamma, beta, c, xhat) * gamma[c];
    sum_g += ghat;
    sum_gx += ghat * xhat;
  }
  float mean_g = loft::block_sum(sum_g) / (float)N;
  float mean_gx = loft::block_sum(sum_gx) / (float)N;
  for (int i = threadIdx.x; i < N; i += blockDim.x) {
    int c = channel0 + i / inner;
    float xhat = (loft::to_f32(xr[i]) - mean) * rstd;
    float ghat = affine_output_grad<SILU>(loft::to_f32(dyr[i]), gamma, beta, c, xhat) * gamma[c];
    dxr[i] = loft::from_f32<T>(rstd * (ghat - mean_g - xhat * mean_gx));
  }
}

// GroupNorm's dγ, dβ: one block per channel, over every sample and position of it.
template <class T, bool SILU>
__device__ void group_norm_backward_affine(const T* __restrict__ x, const float* __restrict__ gamma,
                                           const float* __restrict__ beta, const float* __restrict__ mean_in,
                                           const float* __restrict__ rstd_in, const T* __restrict__ dy,
                                           float* __restrict__ dgamma, float* __restrict__ dbeta, int B, int C, int G,
                                           int inner) {
  const int c = blockIdx.x;
  const int cpg = C / G;
  float sum_gx = 0.0f, sum_g = 0.0f;
  const long long per_channel = (long long)B * inner;
  for (long long k = threadIdx.x; k < per_channel; k += blockDim.x) {
    int b = (int)(k / inner), s = (int)(k % inner);
    long long idx = ((long long)b * C + c) * inner + s;
    long long row = (long long)b * G + c / cpg;
    float xhat = (loft::to_f32(x[idx]) - mean_in[row]) * rstd_in[row];
    float g = affine_output_grad<SILU>(loft::to_f32(dy[idx]), gamma, beta, c, xhat);
    sum_gx += g * xhat;
    sum_g += g;
  }
  sum_gx = loft::block_sum(sum_gx);
  sum_g = loft::block_sum(sum_g);
  if (threadIdx.x == 0) {
    dgamma[c] = sum_gx;
    if (dbeta) dbeta[c] = sum_g;
  }
}

// LayerNorm's dγ, dβ: blocks of 32 columns × 8 rows of threads; each block sums its 32
// columns over every row (coalesced along the columns), then over its 8 row lanes.
template <class T>
__device__ void layer_norm_backward_affine(const T* __restrict__ x, const float* __restrict__ mean_in,
                                           const float* __restrict__ rstd_in, const T* __restrict__ dy,
                                           float* __restrict__ dgamma, float* __restrict__ dbeta, int R, int C) {
  __shared__ float part_gx[8][33];
  __shared__ float part_g[8][33];
  int tx = threadIdx.x, ty = threadIdx.y;
  int c = blockIdx.x * 32 + tx;
  float sum_gx = 0.0f, sum_g = 0.0f;
  if (c < C) {
    for (int r = ty; r < R; r += 8) {
      long long idx = (long long)r * C + c;
      float xhat = (loft::to_f32(x[idx]) - mean_in[r]) * rstd_in[r];
      float g = loft::to_f32(dy[idx]);
      sum_gx += g * xhat;
      sum_g += g;
    }
  }
  part_gx[ty][tx] = sum_gx;
  part_g[ty][tx] = sum_g;
  __syncthreads();
  if (ty == 0 && c < C) {
    float a = 0.0f, b = 0.0f;
    for (int k = 0; k < 8; k++) {
      a += part_gx[k][tx];
      b += part_g[k][tx];
    }
    dgamma[c] = a;
    if (dbeta) dbeta[c] = b;
  }
}

}  // namespace

// Entry points per dtype and activation. γ and β are f32 whatever x's dtype; `beta` and `dbeta`
// may be null (no bias).
#define LOFT_NORM_KERNELS(T, SUFFIX)                                                                              \
  extern "C" __global__ void loft_norm_fwd_##SUFFIX(const T* x, const float* gamma, const float* beta, T* y, float* mean,   \
                                                   float* rstd, int N, int G, int cpg, int inner, float eps) {     \
    norm_forward<T, false>(x, gamma, beta, y, mean, rstd, N, G, cpg, inner, eps);                                  \
  }                                                                                                                \
  extern "C" __global__ void loft_norm_silu_fwd_##SUFFIX(const T* x, const float* gamma, const float* beta, T* y,          \
                                                        float* mean, float* rstd, int N, int G, int cpg, int inner, \
                                                        float eps) {                                              \
    norm_forward<T, true>(x, gamma, beta, y, mean, rstd, N, G, cpg, inner, eps);                                   \
  }                                                                                                                \
  extern "C" __global__ void loft_norm_bwd_dx_##SUFFIX(const T* x, const float* gamma, const float* beta, const float* mean, \
                                                      const float* rstd, const T* dy, T* dx, int N, int G, int cpg,  \
                                                      int inner) {                                                \
    norm_backward_input<T, false>(x, gamma, beta, mean, rstd, dy, dx, N, G, cpg, inner);                          \
  }                                                                                                                \
  extern "C" __global__ void loft_norm_silu_bwd_dx_##SUFFIX(const T* x, const float* gamma, const float* beta,             \
                                                           const float* mean, const float* rstd, const T* dy, T* dx, \
                                                           int N, int G, int cpg, int inner) {                    \
    norm_backward_input<T, true>(x, gamma, beta, mean, rstd, dy, dx, N, G, cpg, inner);                           \
  }                                                                                                                \
  extern "C" __global__ void loft_group_norm_bwd_affine_##SUFFIX(                                                  \
      const T* x, const float* gamma, const float* beta, const float* mean, const float* rstd, const T* dy, float* dgamma, \
      float* dbeta, int B, int C, int G, int inner) {                                                             \
    group_norm_backward_affine<T, false>(x, gamma, beta, mean, rstd, dy, dgamma, dbeta, B, C, G, inner);          \
  }                                                                                                                \
  extern "C" __global__ void loft_group_norm_silu_bwd_affine_##SUFFIX(                                             \
      const T* x, const float* gamma, const float* beta, const float* mean, const float* rstd, const T* dy, float* dgamma, \
      float* dbeta, int B, int C, int G, int inner) {                                                             \
    group_norm_backward_affine<T, true>(x, gamma, beta, mean, rstd, dy, dgamma, dbeta, B, C, G, inner);           \
  }                                                                                                                \
  extern "C" __global__ void loft_layer_norm_bwd_affine_##SUFFIX(const T* x, const float* mean, const float* rstd, \
                                                                const T* dy, float* dgamma, float* dbeta, int R,   \
                                                                int C) {                                          \
    layer_norm_backward_affine<T>(x, mean, rstd, dy, dgamma, dbeta, R, C);                                         \
  }

LOFT_NORM_KERNELS(float, f32)
LOFT_NORM_KERNELS(__half, f16)
LOFT_NORM_KERNELS(__nv_bfloat16, bf16)

#ifdef LOFT_CPU_EMULATION
#define LOFT_NORM_EMU(T, SUFFIX)                                                                                     \
  LOFT_EMU_ENTRY(loft_norm_fwd_##SUFFIX,                                                                             \
                 (const T* x, const float* gamma, const float* beta, T* y, float* mean, float* rstd, int N, int G, int cpg,   \
                  int inner, float eps),                                                                             \
                 (x, gamma, beta, y, mean, rstd, N, G, cpg, inner, eps))                                             \
  LOFT_EMU_ENTRY(loft_norm_silu_fwd_##SUFFIX,                                                                        \
                 (const T* x, const float* gamma, const float* beta, T* y, float* mean, float* rstd, int N, int G, int cpg,   \
                  int inner, float eps),                                                                             \
                 (x, gamma, beta, y, mean, rstd, N, G, cpg, inner, eps))                                             \
  LOFT_EMU_ENTRY(loft_norm_bwd_dx_##SUFFIX,                                                                          \
                 (const T* x, const float* gamma, const float* beta, const float* mean, const float* rstd, const T* dy, T* dx, \
                  int N, int G, int cpg, int inner),                                                                 \
                 (x, gamma, beta, mean, rstd, dy, dx, N, G, cpg, inner))                                             \
  LOFT_EMU_ENTRY(loft_norm_silu_bwd_dx_##SUFFIX,                                                                     \
                 (const T* x, const float* gamma, const float* beta, const float* mean, const float* rstd, const T* dy, T* dx, \
                  int N, int G, int cpg, int inner),                                                                 \
                 (x, gamma, beta, mean, rstd, dy, dx, N, G, cpg, inner))                                             \
  LOFT_EMU_ENTRY(loft_group_norm_bwd_affine_##SUFFIX,                                                                \
                 (const T* x, const float* gamma, const float* beta, const float* mean, const float* rstd, const T* dy,       \
                  float* dgamma, float* dbeta, int B, int C, int G, int inner),                                      \
                 (x, gamma, beta, mean, rstd, dy, dgamma, dbeta, B, C, G, inner))                                    \
  LOFT_EMU_ENTRY(loft_group_norm_silu_bwd_affine_##SUFFIX,                                                           \
                 (const T* x, const float* gamma, const float* beta, const float* mean, const float* rstd, const T* dy,       \
                  float* dgamma, float* dbeta, int B, int C, int G, int inner),                                      \
                 (x, gamma, beta, mean, rstd, dy, dgamma, dbeta, B, C, G, inner))                                    \
  LOFT_EMU_ENTRY(loft_layer_norm_bwd_affine_##SUFFIX,                                                                \
                 (const T* x, const float* mean, const float* rstd, const T* dy, float* dgamma, float* dbeta, int R,  \
                  int C),                                                                                            \
                 (x, mean, rstd, dy, dgamma, dbeta, R, C))
LOFT_NORM_EMU(float, f32)
LOFT_NORM_EMU(__half, f16)
LOFT_NORM_EMU(__nv_bfloat16, bf16)
#endif
