// Fused multi-head attention, forward and backward (the FlashAttention-2 algorithm on CUDA
// cores): no score map ever reaches global memory; the forward keeps each query's
// log-sum-exp, and the backward recomputes the probabilities tile by tile from it.
//
// Layout: q (B, Nq, H, D), k and v (B, Nk, H, D), out (B, Nq, H, D), all contiguous, i.e. the
// (B, N, H·D) tensors of the models as they are; lse and rowdot are (B, Nq, H) f32. Inputs are
// f32, f16 or bf16; every product, sum and exponential is f32.
//
// Forward, per query row i and key tile j (scale = 1/√D):
//   s_j = scale·q_i·k_j,  m' = max(m, max_j s_j),  l' = l·e^(m−m') + Σ_j e^(s_j−m'),
//   acc' = acc·e^(m−m') + Σ_j e^(s_j−m')·v_j;   out_i = acc/l,  lse_i = m + ln l.
// Backward, with δ_i = Σ_e dO_ie·out_ie (rowdot) and p_ij = e^(s_ij − lse_i):
//   dv_j = Σ_i p_ij·dO_i,  dp_ij = dO_i·v_j,  ds_ij = p_ij·(dp_ij − δ_i),
//   dk_j = scale·Σ_i ds_ij·q_i,  dq_i = scale·Σ_j ds_ij·k_j.
// The backward runs one block per key tile (dk, dv accumulate in registers, written once);
// dq sums over key tiles with atomicAdd into an f32 buffer.
//
// Work split: four threads per row (a query in the forward, a key in the backward), each
// holding every fourth element of the row (element e·4 + part), so a row's dot product is
// four partial sums, exchanged through shared memory.
#include "common.cuh"

namespace {

constexpr int FWD_ROWS = 32;  // queries per forward block (4 threads each: 128 threads)
constexpr int BWD_KEYS = 16;  // keys per backward block (4 threads each: 64 threads)
constexpr int BWD_QUERIES = 16;  // queries per backward tile


__device__ __forceinline__ long long offset(int b, int n, int h, int N, int H, int D) {
  return (((long long)b * N + n) * H + h) * D;
}

template <class T, int D>
__device__ void attention_forward(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                  T* __restrict__ out, float* __restrict__ lse, int H, int Nq, int Nk, float scale) {
  constexpr int S = D / 4;
  // Keys per tile: the K and V tiles and the partial sums fit in 48 KB of shared memory.
  constexpr int BC = D > 80 ? 16 : 32;
  constexpr int THREADS = FWD_ROWS * 4;
  __shared__ float ks[BC][D];
  __shared__ float vs[BC][D];
  __shared__ float partial[BC][THREADS];
  const int b = blockIdx.y / H, h = blockIdx.y % H;
  const int t = threadIdx.x, row = t / 4, part = t % 4;
  const int i = blockIdx.x * FWD_ROWS + row;
  const bool valid = i < Nq;

  float qr[S], acc[S];
  const T* qrow = q + offset(b, valid ? i : 0, h, Nq, H, D);
  for (int e = 0; e < S; e++) {
    qr[e] = valid ? loft::to_f32(qrow[e * 4 + part]) * scale : 0.0f;
    acc[e] = 0.0f;
  }
  float m = -INFINITY, l = 0.0f;
  for (int k0 = 0; k0 < Nk; k0 += BC) {
    __syncthreads();  // every thread is done with the previous tile
    for (int idx = t; idx < BC * D; idx += THREADS) {
      int j = idx / D, e = idx % D;
      bool in = k0 + j < Nk;
      long long o = offset(b, in ? k0 + j : 0, h, Nk, H, D) + e;
      ks[j][e] = in ? loft::to_f32(k[o]) : 0.0f;
      vs[j][e] = in ? loft::to_f32(v[o]) : 0.0f;
    }
    __syncthreads();
    for (int j = 0; j < BC; j++) {
      float dot = 0.0f;
      for (int e = 0; e < S; e++) dot += qr[e] * ks[j][e * 4 + part];
      partial[j][t] = dot;
    }
    __syncwarp();  // a row's four threads are in one warp
    float s[BC];
    float tile_max = -INFINITY;
    const int row0 = row * 4;
    for (int j = 0; j < BC; j++) {
      float dot = partial[j][row0] + partial[j][row0 + 1] + partial[j][row0 + 2] + partial[j][row0 + 3];
      s[j] = k0 + j < Nk ? dot : -INFINITY;
      tile_max = fmaxf(tile_max, s[j]);
    }
    float m_new = fmaxf(m, tile_max);  // finite: every tile holds at least one key
    float correction = expf(m - m_new);
    l *= correction;
    for (int e = 0; e < S; e++) acc[e] *= correction;
    for (int j = 0; j < BC; j++) {
      float p = expf(s[j] - m_new);
      l += p;
      for (int e = 0; e < S; e++) acc[e] += p * vs[j][e * 4 + part];
    }
    m = m_new;
    __syncwarp();  // the partial sums are read before the next tile overwrites them
  }
  if (valid) {
    T* orow = out + offset(b, i, h, Nq, H, D);
    float inv = 1.0f / l;
    for (int e = 0; e < S; e++) orow[e * 4 + part] = loft::from_f32<T>(acc[e] * inv);
    if (part == 0) lse[((long long)b * Nq + i) * H + h] = m + logf(l);
  }
}

// δ_i = Σ_e dO_ie·out_ie: one thread per (b, i, h) row.
template <class T>
__device__ void attention_rowdot(const T* __restrict__ out, const T* __restrict__ dout, float* __restrict__ rowdot,
                                 long long rows, int D) {
  long long r = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  float sum = 0.0f;
  for (int e = 0; e < D; e++) sum += loft::to_f32(out[r * D + e]) * loft::to_f32(dout[r * D + e]);
  rowdot[r] = sum;
}

template <class T, int D>
__device__ void attention_backward(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                   const T* __restrict__ dout, const float* __restrict__ lse,
                                   const float* __restrict__ rowdot, float* __restrict__ dq, T* __restrict__ dk,
                                   T* __restrict__ dv, int H, int Nq, int Nk, float scale) {
  constexpr int S = D / 4;
  constexpr int THREADS = BWD_KEYS * 4;
  constexpr int QB = BWD_QUERIES;
  __shared__ float ks[BWD_KEYS][D];
  __shared__ float qs[QB][D];
  __shared__ float dos[QB][D];
  __shared__ float lse_s[QB];
  __shared__ float rowdot_s[QB];
  __shared__ float partial_s[QB][THREADS];
  __shared__ float partial_dp[QB][THREADS];
  __shared__ float ds_s[QB][BWD_KEYS];
  const int b = blockIdx.y / H, h = blockIdx.y % H;
  const int t = threadIdx.x, key = t / 4, part = t % 4;
  const int j = blockIdx.x * BWD_KEYS + key;
  const bool valid = j < Nk;

  for (int idx = t; idx < BWD_KEYS * D; idx += THREADS) {
    int kk = idx / D, e = idx % D;
    int jj = blockIdx.x * BWD_KEYS + kk;
    ks[kk][e] = jj < Nk ? loft::to_f32(k[offset(b, jj, h, Nk, H, D) + e]) : 0.0f;
  }
  float vr[S], dk_acc[S], dv_acc[S];
  const T* vrow = v + offset(b, valid ? j : 0, h, Nk, H, D);
  for (int e = 0; e < S; e++) {
    vr[e] = valid ? loft::to_f32(vrow[e * 4 + part]) : 0.0f;
    dk_acc[e] = 0.0f;
    dv_acc[e] = 0.0f;
  }
  for (int q0 = 0; q0 < Nq; q0 += QB) {
    __syncthreads();  // the previous query tile is consumed (and the K tile loaded)
    for (int idx = t; idx < QB * D; idx += THREADS) {
      int ii = idx / D, e = idx % D;
      bool in = q0 + ii < Nq;
      long long o = offset(b, in ? q0 + ii : 0, h, Nq, H, D) + e;
      qs[ii][e] = in ? loft::to_f32(q[o]) : 0.0f;
      dos[ii][e] = in ? loft::to_f32(dout[o]) : 0.0f;
    }
    for (int ii = t; ii < QB; ii += THREADS) {
      bool in = q0 + ii < Nq;
      long long r = ((long long)b * Nq + (in ? q0 + ii : 0)) * H + h;
      lse_s[ii] = in ? lse[r] : INFINITY;  // p = e^(s − ∞) = 0 for rows past the end
      rowdot_s[ii] = in ? rowdot[r] : 0.0f;
    }
    __syncthreads();
    for (int ii = 0; ii < QB; ii++) {
      float sq = 0.0f, sd = 0.0f;
      for (int e = 0; e < S; e++) {
        sq += qs[ii][e * 4 + part] * ks[key][e * 4 + part];
        sd += dos[ii][e * 4 + part] * vr[e];
      }
      partial_s[ii][t] = sq;
      partial_dp[ii][t] = sd;
    }
    __syncwarp();
    const int t0 = key * 4;
    for (int ii = 0; ii < QB; ii++) {
      float s = scale * (partial_s[ii][t0] + partial_s[ii][t0 + 1] + partial_s[ii][t0 + 2] + partial_s[ii][t0 + 3]);
      float dp = partial_dp[ii][t0] + partial_dp[ii][t0 + 1] + partial_dp[ii][t0 + 2] + partial_dp[ii][t0 + 3];
      float p = valid ? expf(s - lse_s[ii]) : 0.0f;
      float ds = p * (dp - rowdot_s[ii]);
      for (int e = 0; e < S; e++) {
        dv_acc[e] += p * dos[ii][e * 4 + part];
        dk_acc[e] += ds * qs[ii][e * 4 + part];
      }
      if (part == 0) ds_s[ii][key] = ds;
    }
    __syncthreads();
    // dq_i += scale·Σ_j ds_ij·k_j over this block's keys.
    for (int idx = t; idx < QB * D; idx += THREADS) {
      int ii = idx / D, e = idx % D;
      if (q0 + ii >= Nq) continue;
      float sum = 0.0f;
      for (int kk = 0; kk < BWD_KEYS; kk++) sum += ds_s[ii][kk] * ks[kk][e];
      atomicAdd(&dq[offset(b, q0 + ii, h, Nq, H, D) + e], scale * sum);
    }
  }
  if (valid) {
    T* dkrow = dk + offset(b, j, h, Nk, H, D);
    T* dvrow = dv + offset(b, j, h, Nk, H, D);
    for (int e = 0; e < S; e++) {
      dkrow[e * 4 + part] = loft::from_f32<T>(scale * dk_acc[e]);
      dvrow[e * 4 + part] = loft::from_f32<T>(dv_acc[e]);
    }
  }
}

}  // namespace

#define LOFT_ATTENTION_HEAD(T, SUFFIX, D)                                                                           \
  extern "C" __global__ void __launch_bounds__(FWD_ROWS * 4) loft_attention_fwd_##SUFFIX##_d##D(                     \
      const T* q, const T* k, const T* v, T* out, float* lse, int H, int Nq, int Nk, float scale) {                 \
    attention_forward<T, D>(q, k, v, out, lse, H, Nq, Nk, scale);                                                    \
  }                                                                                                                  \
  extern "C" __global__ void __launch_bounds__(BWD_KEYS * 4) loft_attention_bwd_##SUFFIX##_d##D(                     \
      const T* q, const T* k, const T* v, const T* dout, const float* lse, const float* rowdot, float* dq, T* dk,    \
      T* dv, int H, int Nq, int Nk, float scale) {                                                                   \
    attention_backward<T, D>(q, k, v, dout, lse, rowdot, dq, dk, dv, H, Nq, Nk, scale);                              \
  }

#define LOFT_ATTENTION_DTYPE(T, SUFFIX)                                                                             \
  extern "C" __global__ void loft_attention_rowdot_##SUFFIX(const T* out, const T* dout, float* rowdot,             \
                                                            long long rows, int D) {                                \
    attention_rowdot<T>(out, dout, rowdot, rows, D);                                                                 \
  }                                                                                                                  \
  LOFT_ATTENTION_HEAD(T, SUFFIX, 40)                                                                                \
  LOFT_ATTENTION_HEAD(T, SUFFIX, 64)                                                                                \
  LOFT_ATTENTION_HEAD(T, SUFFIX, 80)                                                                                \
  LOFT_ATTENTION_HEAD(T, SUFFIX, 128)                                                                               \
  LOFT_ATTENTION_HEAD(T, SUFFIX, 160)

LOFT_ATTENTION_DTYPE(float, f32)
LOFT_ATTENTION_DTYPE(__half, f16)
LOFT_ATTENTION_DTYPE(__nv_bfloat16, bf16)

#ifdef LOFT_CPU_EMULATION
// Emulated entry points that take the head size at run time.
#define LOFT_ATTENTION_EMU_CASE(SUFFIX, D, KIND, ARGS) \
  case D:                                               \
    loft_emu::launch(grid, block, [&] { loft_attention_##KIND##_##SUFFIX##_d##D ARGS; }); \
    break;
#define LOFT_ATTENTION_EMU_SWITCH(SUFFIX, KIND, ARGS)                                  \
  switch (D) {                                                                         \
    LOFT_ATTENTION_EMU_CASE(SUFFIX, 40, KIND, ARGS)                                    \
    LOFT_ATTENTION_EMU_CASE(SUFFIX, 64, KIND, ARGS)                                    \
    LOFT_ATTENTION_EMU_CASE(SUFFIX, 80, KIND, ARGS)                                    \
    LOFT_ATTENTION_EMU_CASE(SUFFIX, 128, KIND, ARGS)                                   \
    LOFT_ATTENTION_EMU_CASE(SUFFIX, 160, KIND, ARGS)                                   \
    default:                                                                           \
      std::fprintf(stderr, "cpu_emulation: no attention kernel for head size %d\n", D); \
      std::abort();                                                                    \
  }
#define LOFT_ATTENTION_EMU(T, SUFFIX)                                                                         \
  LOFT_EMU_ENTRY(loft_attention_rowdot_##SUFFIX, (const T* out, const T* dout, float* rowdot, long long rows, int D), \
                 (out, dout, rowdot, rows, D))                                                                \
  extern "C" void emu_attention_fwd_##SUFFIX(dim3 grid, dim3 block, int D, const T* q, const T* k, const T* v, \
                                             T* out, float* lse, int H, int Nq, int Nk, float scale) {        \
    LOFT_ATTENTION_EMU_SWITCH(SUFFIX, fwd, (q, k, v, out, lse, H, Nq, Nk, scale))                             \
  }                                                                                                           \
  extern "C" void emu_attention_bwd_##SUFFIX(dim3 grid, dim3 block, int D, const T* q, const T* k, const T* v, \
                                             const T* dout, const float* lse, const float* rowdot, float* dq,  \
                                             T* dk, T* dv, int H, int Nq, int Nk, float scale) {               \
    LOFT_ATTENTION_EMU_SWITCH(SUFFIX, bwd, (q, k, v, dout, lse, rowdot, dq, dk, dv, H, Nq, Nk, scale))        \
  }
LOFT_ATTENTION_EMU(float, f32)
LOFT_ATTENTION_EMU(__half, f16)
LOFT_ATTENTION_EMU(__nv_bfloat16, bf16)
#endif
