// Multi-tensor optimizer steps: one launch updates every trained tensor (instead of several
// kernels per tensor), and one launch gathers every gradient's sum of squares and whether any
// element is not finite (for gradient clipping and fp16 loss scaling).
//
// The host lists the tensors: `ptrs` holds each tensor's buffers' device addresses
// (PTRS_PER_TENSOR per tensor), `numel` their sizes, and `chunks` the work split, two entries
// per block: (tensor index, first element); a block covers `chunk_len` elements of one tensor
// (65536 on a GPU; the tests use short chunks to cross many boundaries).
// Per-tensor scalars (different learning rates per group, different step counts per tensor)
// are in `scalars` (SCALARS_PER_TENSOR per tensor). Parameters, gradients and states are f32.
//
// AdamW (torch.optim.AdamW, the order of Loft's host loop, optim/adamw.rs), per element:
//   p ← p·(1 − lr·wd);  m ← torch_lerp(m, g, 1 − β1);  v ← v·β2 + (1 − β2)·g·g;
//   v̂ ← max(v̂, v) if amsgrad else v;  p ← p − (lr/bc1)·m / (√v̂/√bc2 + ε)
// Lion (lion_pytorch, optim/lion.rs):
//   p ← p·(1 − lr·wd);  p ← p − lr·sign(m·β1 + (1 − β1)·g);  m ← m·β2 + (1 − β2)·g
// Before either, g ← g·grad_scale when a scale is given (1/loss scale × the clipping
// coefficient, computed on the device), and nothing changes when `skip` is set (a non-finite
// gradient under fp16 loss scaling: the step is skipped, as GradScaler skips it).
#include "common.cuh"

namespace {

constexpr int THREADS = 256;

// torch.lerp's two formulas (the one that is exact at each end).
__device__ __forceinline__ float torch_lerp(float start, float end, float weight) {
  return fabsf(weight) < 0.5f ? start + weight * (end - start) : end - (end - start) * (1.0f - weight);
}

__device__ __forceinline__ float sign_of(float x) { return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : 0.0f); }

struct Chunk {
  int tensor;
  long long begin, end;
};

__device__ __forceinline__ Chunk chunk_of(const long long* chunks, const long long* numel, long long chunk_len) {
  int tensor = (int)chunks[2 * blockIdx.x];
  long long begin = chunks[2 * blockIdx.x + 1];
  long long end = begin + chunk_len < numel[tensor] ? begin + chunk_len : numel[tensor];
  return Chunk{tensor, begin, end};
}

__device__ __forceinline__ float grad_multiplier(const float* grad_scale) { return grad_scale ? *grad_scale : 1.0f; }

// The f64 sum of `v` over the block's THREADS threads, returned to every thread; ends with a
// barrier, so it may be called again at once.
__device__ __forceinline__ double block_sum_f64(double v) {
  __shared__ double partial[THREADS / 32];
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
  __syncthreads();
  double total = 0.0;
  for (int w = 0; w < THREADS / 32; w++) total += partial[w];
  __syncthreads();
  return total;
}

}  // namespace

// Σg² per tensor (f64, atomically added into `sumsq[tensor]`, which starts at zero) and a flag
// set when any element is NaN or infinite. ptrs: one per tensor (the gradient).
template <class T>
__device__ void grad_stats(const unsigned long long* ptrs, const long long* numel, const long long* chunks, long long chunk_len,
                           double* sumsq, unsigned* nonfinite) {
  Chunk c = chunk_of(chunks, numel, chunk_len);
  const T* g = reinterpret_cast<const T*>(ptrs[c.tensor]);
  double sum = 0.0;
  int bad = 0;
  for (long long i = c.begin + threadIdx.x; i < c.end; i += THREADS) {
    float x = loft::to_f32(g[i]);
    bad |= !isfinite(x);
    sum += (double)x * (double)x;
  }
  bad = __any_sync(0xffffffffu, bad);
  if (threadIdx.x % 32 == 0 && bad) atomicOr(nonfinite, 1u);
  double total = block_sum_f64(sum);
  if (threadIdx.x == 0) atomicAdd(&sumsq[c.tensor], total);
}

// ptrs per tensor: param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq (0 without amsgrad).
// scalars per tensor: 1 − lr·wd, lr/bc1, √bc2.
extern "C" __global__ void __launch_bounds__(THREADS)
    loft_multi_adamw_f32(const unsigned long long* ptrs, const float* scalars, const long long* numel,
                         const long long* chunks, long long chunk_len, float w1, float b2, float w2, float eps, int decay_on,
                         const float* grad_scale, const unsigned* skip) {
  if (skip && *skip) return;
  Chunk c = chunk_of(chunks, numel, chunk_len);
  const unsigned long long* tp = ptrs + 5 * c.tensor;
  float* p = reinterpret_cast<float*>(tp[0]);
  const float* g = reinterpret_cast<const float*>(tp[1]);
  float* m = reinterpret_cast<float*>(tp[2]);
  float* v = reinterpret_cast<float*>(tp[3]);
  float* vmax = reinterpret_cast<float*>(tp[4]);
  const float decay = scalars[3 * c.tensor], step_size = scalars[3 * c.tensor + 1], bc2_sqrt = scalars[3 * c.tensor + 2];
  const float gs = grad_multiplier(grad_scale);
  for (long long i = c.begin + threadIdx.x; i < c.end; i += THREADS) {
    float gi = grad_scale ? g[i] * gs : g[i];
    float pi = p[i];
    if (decay_on) pi *= decay;
    float mi = torch_lerp(m[i], gi, w1);
    float vi = v[i] * b2 + w2 * gi * gi;
    float vv = vi;
    if (vmax) {
      vv = fmaxf(vmax[i], vi);
      vmax[i] = vv;
    }
    float denom = sqrtf(vv) / bc2_sqrt + eps;
    pi += -step_size * (mi / denom);
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
  }
}

// ptrs per tensor: param, grad, exp_avg. scalars per tensor: 1 − lr·wd, −lr.
extern "C" __global__ void __launch_bounds__(THREADS)
    loft_multi_lion_f32(const unsigned long long* ptrs, const float* scalars, const long long* numel,
                        const long long* chunks, long long chunk_len, float b1, float w1, float b2, float w2, const float* grad_scale,
                        const unsigned* skip) {
  if (skip && *skip) return;
  Chunk c = chunk_of(chunks, numel, chunk_len);
  const unsigned long long* tp = ptrs + 3 * c.tensor;
  float* p = reinterpret_cast<float*>(tp[0]);
  const float* g = reinterpret_cast<const float*>(tp[1]);
  float* m = reinterpret_cast<float*>(tp[2]);
  const float decay = scalars[2 * c.tensor], neg_lr = scalars[2 * c.tensor + 1];
  const float gs = grad_multiplier(grad_scale);
  for (long long i = c.begin + threadIdx.x; i < c.end; i += THREADS) {
    float gi = grad_scale ? g[i] * gs : g[i];
    float pi = p[i] * decay;
    float update = sign_of(m[i] * b1 + w1 * gi);
    pi += neg_lr * update;
    p[i] = pi;
    m[i] = m[i] * b2 + w2 * gi;
  }
}

// Prodigy (prodigyopt 1.1.2, the order of optim/prodigy.rs), two launches a step with the
// d estimate computed on the host between them from per-tensor sums.
// Pass 1, per element (g ← g + wd·p first with coupled weight decay):
//   m ← m·β1 + d(1 − β1)·g (β1 > 0);  v ← v·β2 + d²(1 − β2)·g·g;
//   every slice_p-th element j = i/slice_p:  dot += g·(p0_j − p),  s_j ← s_j·β3 + α·g,  |s| sum;
// `dots` and `abs_sums` (f64, per tensor, zero at the start) receive the sums.
// ptrs per tensor: param, grad, p0, s, exp_avg (0 without β1), exp_avg_sq.
extern "C" __global__ void __launch_bounds__(THREADS)
    loft_prodigy_pass1_f32(const unsigned long long* ptrs, const long long* numel, const long long* chunks,
                           long long chunk_len, int slice_p, float coupled_wd, float b1, float a1, float b2, float a2,
                           float alpha, float b3, double* dots, double* abs_sums) {
  Chunk c = chunk_of(chunks, numel, chunk_len);
  const unsigned long long* tp = ptrs + 6 * c.tensor;
  const float* p = reinterpret_cast<const float*>(tp[0]);
  const float* g = reinterpret_cast<const float*>(tp[1]);
  const float* p0 = reinterpret_cast<const float*>(tp[2]);
  float* s = reinterpret_cast<float*>(tp[3]);
  float* m = reinterpret_cast<float*>(tp[4]);
  float* v = reinterpret_cast<float*>(tp[5]);
  double dot = 0.0, abs_sum = 0.0;
  for (long long i = c.begin + threadIdx.x; i < c.end; i += THREADS) {
    float gi = g[i];
    if (coupled_wd != 0.0f) gi += coupled_wd * p[i];
    if (m) m[i] = m[i] * b1 + a1 * gi;
    v[i] = v[i] * b2 + a2 * gi * gi;
    if (i % slice_p == 0) {
      long long j = i / slice_p;
      dot += (double)gi * (double)(p0[j] - p[i]);
      float sj = s[j] * b3 + alpha * gi;
      s[j] = sj;
      abs_sum += (double)fabsf(sj);
    }
  }
  double total_dot = block_sum_f64(dot);
  double total_abs = block_sum_f64(abs_sum);
  if (threadIdx.x == 0) {
    atomicAdd(&dots[c.tensor], total_dot);
    atomicAdd(&abs_sums[c.tensor], total_abs);
  }
}

// Pass 2, per element, with the new d in ε·d and the old d in dlr:
//   p ← p + (−wd·dlr)·p (decoupled);  p ← p − dlr·m/(√v + ε·d)  (β1 > 0)
//   or p ← p − dlr·d·g/(√v + ε·d)  (β1 = 0, g with the coupled decay as in pass 1).
// ptrs per tensor: param, grad, exp_avg (0 without β1), exp_avg_sq.
extern "C" __global__ void __launch_bounds__(THREADS)
    loft_prodigy_pass2_f32(const unsigned long long* ptrs, const long long* numel, const long long* chunks,
                           long long chunk_len, float coupled_wd, float decoupled_decay, float eps_d, float neg_dlr,
                           float neg_dlr_d) {
  Chunk c = chunk_of(chunks, numel, chunk_len);
  const unsigned long long* tp = ptrs + 4 * c.tensor;
  float* p = reinterpret_cast<float*>(tp[0]);
  const float* g = reinterpret_cast<const float*>(tp[1]);
  const float* m = reinterpret_cast<const float*>(tp[2]);
  const float* v = reinterpret_cast<const float*>(tp[3]);
  for (long long i = c.begin + threadIdx.x; i < c.end; i += THREADS) {
    float pi = p[i];
    float denom = sqrtf(v[i]) + eps_d;
    if (decoupled_decay != 0.0f) pi += decoupled_decay * pi;
    if (m) {
      pi += neg_dlr * (m[i] / denom);
    } else {
      float gi = g[i];
      if (coupled_wd != 0.0f) gi += coupled_wd * p[i];
      pi += neg_dlr_d * (gi / denom);
    }
    p[i] = pi;
  }
}

// AdamW8bit (bitsandbytes 0.50's blockwise 8-bit Adam, the order of optim/adamw8bit.rs).
// One block of 256 threads per quantization block of 256 elements: dequantise m and v
// (code[q]·absmax), step them and the parameter, then requantise each with its new absmax
// through the codebook's 65536-entry nearest-code table:
//   m ← m·β1 + (1 − β1)·g;  v ← v·β2 + (1 − β2)·g·g;  p ← p·(1 − lr·wd) (wd > 0);
//   p ← p + (−lr/bc1)·m / (√v/√bc2 + ε).
// ptrs per tensor: param, grad, m codes (u8), m absmax, v codes (u8), v absmax.
// scalars per tensor: 1 − lr·wd, −lr/bc1, √bc2.
__device__ __forceinline__ unsigned char nearest_code(const unsigned char* lut, float normed) {
  float x = fminf(fmaxf(normed, -1.0f), 1.0f);
  if (x != x) return lut[0];  // NaN (Rust's `as usize` of NaN is 0)
  return lut[(int)((x + 1.0f) * 0.5f * 65535.0f + 0.5f)];
}

__device__ __forceinline__ float block_max(float v) {
  __shared__ float partial[32];
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
  __syncthreads();
  float m = 0.0f;
  for (int w = 0; w < (int)(blockDim.x / 32); w++) m = fmaxf(m, partial[w]);
  __syncthreads();
  return m;
}

extern "C" __global__ void __launch_bounds__(THREADS)
    loft_adamw8bit_blocks_f32(const unsigned long long* ptrs, const float* scalars, const long long* numel,
                              const long long* chunks, const float* signed_code, const float* unsigned_code,
                              const unsigned char* signed_lut, const unsigned char* unsigned_lut, float b1, float w1,
                              float b2, float w2, float eps, int decay_on) {
  Chunk c = chunk_of(chunks, numel, THREADS);
  const unsigned long long* tp = ptrs + 6 * c.tensor;
  float* p = reinterpret_cast<float*>(tp[0]);
  const float* g = reinterpret_cast<const float*>(tp[1]);
  unsigned char* mq = reinterpret_cast<unsigned char*>(tp[2]);
  float* mabs = reinterpret_cast<float*>(tp[3]);
  unsigned char* vq = reinterpret_cast<unsigned char*>(tp[4]);
  float* vabs = reinterpret_cast<float*>(tp[5]);
  const float decay = scalars[3 * c.tensor], step_size = scalars[3 * c.tensor + 1], c2 = scalars[3 * c.tensor + 2];
  const long long blk = c.begin / THREADS;
  const long long i = c.begin + threadIdx.x;
  const bool valid = i < c.end;
  float mf = 0.0f, vf = 0.0f;
  if (valid) {
    mf = signed_code[mq[i]] * mabs[blk];
    vf = unsigned_code[vq[i]] * vabs[blk];
    float gi = g[i];
    mf = mf * b1 + w1 * gi;
    vf = vf * b2 + w2 * gi * gi;
    float denom = sqrtf(vf) / c2 + eps;
    float pi = p[i];
    if (decay_on) pi *= decay;
    pi += (step_size * mf) / denom;
    p[i] = pi;
  }
  // Every thread has read the old absmax before block_max's first barrier.
  float amax_m = block_max(fabsf(mf));
  float amax_v = block_max(fabsf(vf));
  if (threadIdx.x == 0) {
    mabs[blk] = amax_m;
    vabs[blk] = amax_v;
  }
  if (valid) {
    mq[i] = amax_m == 0.0f ? 0 : nearest_code(signed_lut, mf * (1.0f / amax_m));
    vq[i] = amax_v == 0.0f ? 0 : nearest_code(unsigned_lut, vf * (1.0f / amax_v));
  }
}

// AdamW8bit's 32-bit moments (tensors under min_8bit_size; bitsandbytes' 32-bit kernel):
//   m ← m·β1 + (1 − β1)·g;  v ← v·β2 + (1 − β2)·g·g;  p ← p·(1 − lr·wd) (wd > 0);
//   p ← p + (−lr·√bc2/bc1)·(m / (√v + ε·√bc2)).
// ptrs per tensor: param, grad, m, v. scalars per tensor: 1 − lr·wd, −lr·√bc2/bc1, ε·√bc2.
extern "C" __global__ void __launch_bounds__(THREADS)
    loft_adamw8bit_full_f32(const unsigned long long* ptrs, const float* scalars, const long long* numel,
                            const long long* chunks, long long chunk_len, float b1, float w1, float b2, float w2,
                            int decay_on) {
  Chunk c = chunk_of(chunks, numel, chunk_len);
  const unsigned long long* tp = ptrs + 4 * c.tensor;
  float* p = reinterpret_cast<float*>(tp[0]);
  const float* g = reinterpret_cast<const float*>(tp[1]);
  float* m = reinterpret_cast<float*>(tp[2]);
  float* v = reinterpret_cast<float*>(tp[3]);
  const float decay = scalars[3 * c.tensor], step_size = scalars[3 * c.tensor + 1], eps_c2 = scalars[3 * c.tensor + 2];
  for (long long i = c.begin + threadIdx.x; i < c.end; i += THREADS) {
    float gi = g[i];
    float mi = m[i] * b1 + w1 * gi;
    float vi = v[i] * b2 + w2 * gi * gi;
    float pi = p[i];
    if (decay_on) pi *= decay;
    pi += step_size * (mi / (sqrtf(vi) + eps_c2));
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
  }
}

// Adafactor (transformers' Adafactor, the order of optim/adafactor.rs), four launches a step:
//   sums:    Σp² per tensor; factored tensors (lead × r × c): Σ_j (g² + ε1) per row and
//            Σ_i (g² + ε1) per column (f64, atomically added into zeroed buffers);
//   (the host reads Σp², sets each tensor's lr from its RMS, and β2t = 1 − step^decay_rate)
//   factors: one block per factored tensor: row ← row·β2t + (1 − β2t)·rowsum/c,
//            col ← col·β2t + (1 − β2t)·colsum/r, and each lead's row mean;
//   update:  u = g/√(row_i/rowmean)/√col_j (factored) or v ← v·β2t + (1 − β2t)·(g² + ε1),
//            u = g/√v; Σu² per tensor;
//   apply:   u ← u / max(RMS(u)/clip_threshold, 1) · lr;  m ← m·β1 + (1 − β1)·u, u = m (β1);
//            p ← p + (−wd·lr)·p (wd);  p ← p − u.
// ptrs per tensor (ADAFACTOR_PTRS): param, grad, row, col, row_sum (f64), col_sum (f64),
// row_mean, exp_avg_sq, update scratch, exp_avg (0 where unused).
// dims per tensor: lead, r, c (r = 0: not factored).
// scalars per tensor: β2t, 1 − β2t, lr, −wd·lr.
#define ADAFACTOR_PTRS 10

extern "C" __global__ void __launch_bounds__(THREADS)
    loft_adafactor_sums_f32(const unsigned long long* ptrs, const long long* dims, const long long* numel,
                            const long long* chunks, long long chunk_len, float eps1, double* param_sumsq) {
  Chunk c = chunk_of(chunks, numel, chunk_len);
  const unsigned long long* tp = ptrs + ADAFACTOR_PTRS * c.tensor;
  const float* p = reinterpret_cast<const float*>(tp[0]);
  const float* g = reinterpret_cast<const float*>(tp[1]);
  double* row_sum = reinterpret_cast<double*>(tp[4]);
  double* col_sum = reinterpret_cast<double*>(tp[5]);
  const long long r = dims[3 * c.tensor + 1], cols = dims[3 * c.tensor + 2];
  double sum = 0.0;
  for (long long i = c.begin + threadIdx.x; i < c.end; i += THREADS) {
    sum += (double)p[i] * (double)p[i];
    if (r > 0) {
      double sq = (double)(g[i] * g[i] + eps1);
      long long lead = i / (r * cols), rem = i % (r * cols);
      atomicAdd(&row_sum[lead * r + rem / cols], sq);
      atomicAdd(&col_sum[lead * cols + rem % cols], sq);
    }
  }
  double total = block_sum_f64(sum);
  if (threadIdx.x == 0) atomicAdd(&param_sumsq[c.tensor], total);
}

// One block per factored tensor (`tensors` lists their indices).
extern "C" __global__ void __launch_bounds__(THREADS)
    loft_adafactor_factors_f32(const unsigned long long* ptrs, const long long* dims, const float* scalars,
                               const int* tensors) {
  const int t = tensors[blockIdx.x];
  const unsigned long long* tp = ptrs + ADAFACTOR_PTRS * t;
  float* row = reinterpret_cast<float*>(tp[2]);
  float* col = reinterpret_cast<float*>(tp[3]);
  const double* row_sum = reinterpret_cast<const double*>(tp[4]);
  const double* col_sum = reinterpret_cast<const double*>(tp[5]);
  float* row_mean = reinterpret_cast<float*>(tp[6]);
  const long long lead = dims[3 * t], r = dims[3 * t + 1], cols = dims[3 * t + 2];
  const float b2 = scalars[4 * t], w2 = scalars[4 * t + 1];
  for (long long k = threadIdx.x; k < lead * r; k += THREADS) row[k] = row[k] * b2 + w2 * (float)(row_sum[k] / (double)cols);
  for (long long k = threadIdx.x; k < lead * cols; k += THREADS) col[k] = col[k] * b2 + w2 * (float)(col_sum[k] / (double)r);
  __syncthreads();
  for (long long b = 0; b < lead; b++) {
    double sum = 0.0;
    for (long long i = threadIdx.x; i < r; i += THREADS) sum += (double)row[b * r + i];
    double total = block_sum_f64(sum);
    if (threadIdx.x == 0) row_mean[b] = (float)(total / (double)r);
  }
}

extern "C" __global__ void __launch_bounds__(THREADS)
    loft_adafactor_update_f32(const unsigned long long* ptrs, const long long* dims, const float* scalars,
                              const long long* numel, const long long* chunks, long long chunk_len, float eps1,
                              double* update_sumsq) {
  Chunk c = chunk_of(chunks, numel, chunk_len);
  const unsigned long long* tp = ptrs + ADAFACTOR_PTRS * c.tensor;
  const float* g = reinterpret_cast<const float*>(tp[1]);
  const float* row = reinterpret_cast<const float*>(tp[2]);
  const float* col = reinterpret_cast<const float*>(tp[3]);
  const float* row_mean = reinterpret_cast<const float*>(tp[6]);
  float* v = reinterpret_cast<float*>(tp[7]);
  float* u = reinterpret_cast<float*>(tp[8]);
  const long long r = dims[3 * c.tensor + 1], cols = dims[3 * c.tensor + 2];
  const float b2 = scalars[4 * c.tensor], w2 = scalars[4 * c.tensor + 1];
  double sum = 0.0;
  for (long long i = c.begin + threadIdx.x; i < c.end; i += THREADS) {
    float ui;
    if (r > 0) {
      long long lead = i / (r * cols), rem = i % (r * cols);
      long long ri = rem / cols, cj = rem % cols;
      float rf = 1.0f / sqrtf(row[lead * r + ri] / row_mean[lead]);
      float cf = 1.0f / sqrtf(col[lead * cols + cj]);
      ui = rf * cf * g[i];
    } else {
      float vi = v[i] * b2 + w2 * (g[i] * g[i] + eps1);
      v[i] = vi;
      ui = (1.0f / sqrtf(vi)) * g[i];
    }
    u[i] = ui;
    sum += (double)ui * (double)ui;
  }
  double total = block_sum_f64(sum);
  if (threadIdx.x == 0) atomicAdd(&update_sumsq[c.tensor], total);
}

extern "C" __global__ void __launch_bounds__(THREADS)
    loft_adafactor_apply_f32(const unsigned long long* ptrs, const float* scalars, const long long* numel,
                             const long long* chunks, long long chunk_len, const double* update_sumsq,
                             float clip_threshold, float b1, float w1, int beta1_on, int decay_on) {
  Chunk c = chunk_of(chunks, numel, chunk_len);
  const unsigned long long* tp = ptrs + ADAFACTOR_PTRS * c.tensor;
  float* p = reinterpret_cast<float*>(tp[0]);
  const float* u = reinterpret_cast<const float*>(tp[8]);
  float* m = reinterpret_cast<float*>(tp[9]);
  const float lr = scalars[4 * c.tensor + 2], decay = scalars[4 * c.tensor + 3];
  // torch: norm(2) as an f32 tensor / sqrt(numel), as optim/adafactor.rs's rms().
  const float rms = (float)sqrt(update_sumsq[c.tensor]) / (float)sqrt((double)numel[c.tensor]);
  const float clip = fmaxf(rms / clip_threshold, 1.0f);
  for (long long i = c.begin + threadIdx.x; i < c.end; i += THREADS) {
    float ui = u[i] / clip * lr;
    if (beta1_on) {
      float mi = m[i] * b1 + w1 * ui;
      m[i] = mi;
      ui = mi;
    }
    float pi = p[i];
    if (decay_on) pi += decay * pi;
    pi += -ui;
    p[i] = pi;
  }
}

#define LOFT_GRAD_STATS(T, SUFFIX)                                                                                   \
  extern "C" __global__ void __launch_bounds__(THREADS) loft_multi_grad_stats_##SUFFIX(                             \
      const unsigned long long* ptrs, const long long* numel, const long long* chunks, long long chunk_len, double* sumsq,              \
      unsigned* nonfinite) {                                                                                         \
    grad_stats<T>(ptrs, numel, chunks, chunk_len, sumsq, nonfinite);                                                            \
  }
LOFT_GRAD_STATS(float, f32)
LOFT_GRAD_STATS(__half, f16)
LOFT_GRAD_STATS(__nv_bfloat16, bf16)

#ifdef LOFT_CPU_EMULATION
LOFT_EMU_ENTRY(loft_multi_adamw_f32,
               (const unsigned long long* ptrs, const float* scalars, const long long* numel, const long long* chunks, long long chunk_len,
                float w1, float b2, float w2, float eps, int decay_on, const float* grad_scale, const unsigned* skip),
               (ptrs, scalars, numel, chunks, chunk_len, w1, b2, w2, eps, decay_on, grad_scale, skip))
LOFT_EMU_ENTRY(loft_multi_lion_f32,
               (const unsigned long long* ptrs, const float* scalars, const long long* numel, const long long* chunks, long long chunk_len,
                float b1, float w1, float b2, float w2, const float* grad_scale, const unsigned* skip),
               (ptrs, scalars, numel, chunks, chunk_len, b1, w1, b2, w2, grad_scale, skip))
LOFT_EMU_ENTRY(loft_prodigy_pass1_f32,
               (const unsigned long long* ptrs, const long long* numel, const long long* chunks, long long chunk_len,
                int slice_p, float coupled_wd, float b1, float a1, float b2, float a2, float alpha, float b3,
                double* dots, double* abs_sums),
               (ptrs, numel, chunks, chunk_len, slice_p, coupled_wd, b1, a1, b2, a2, alpha, b3, dots, abs_sums))
LOFT_EMU_ENTRY(loft_prodigy_pass2_f32,
               (const unsigned long long* ptrs, const long long* numel, const long long* chunks, long long chunk_len,
                float coupled_wd, float decoupled_decay, float eps_d, float neg_dlr, float neg_dlr_d),
               (ptrs, numel, chunks, chunk_len, coupled_wd, decoupled_decay, eps_d, neg_dlr, neg_dlr_d))
LOFT_EMU_ENTRY(loft_adamw8bit_blocks_f32,
               (const unsigned long long* ptrs, const float* scalars, const long long* numel, const long long* chunks,
                const float* signed_code, const float* unsigned_code, const unsigned char* signed_lut,
                const unsigned char* unsigned_lut, float b1, float w1, float b2, float w2, float eps, int decay_on),
               (ptrs, scalars, numel, chunks, signed_code, unsigned_code, signed_lut, unsigned_lut, b1, w1, b2, w2, eps,
                decay_on))
LOFT_EMU_ENTRY(loft_adamw8bit_full_f32,
               (const unsigned long long* ptrs, const float* scalars, const long long* numel, const long long* chunks,
                long long chunk_len, float b1, float w1, float b2, float w2, int decay_on),
               (ptrs, scalars, numel, chunks, chunk_len, b1, w1, b2, w2, decay_on))
LOFT_EMU_ENTRY(loft_adafactor_sums_f32,
               (const unsigned long long* ptrs, const long long* dims, const long long* numel, const long long* chunks,
                long long chunk_len, float eps1, double* param_sumsq),
               (ptrs, dims, numel, chunks, chunk_len, eps1, param_sumsq))
LOFT_EMU_ENTRY(loft_adafactor_factors_f32,
               (const unsigned long long* ptrs, const long long* dims, const float* scalars, const int* tensors),
               (ptrs, dims, scalars, tensors))
LOFT_EMU_ENTRY(loft_adafactor_update_f32,
               (const unsigned long long* ptrs, const long long* dims, const float* scalars, const long long* numel,
                const long long* chunks, long long chunk_len, float eps1, double* update_sumsq),
               (ptrs, dims, scalars, numel, chunks, chunk_len, eps1, update_sumsq))
LOFT_EMU_ENTRY(loft_adafactor_apply_f32,
               (const unsigned long long* ptrs, const float* scalars, const long long* numel, const long long* chunks,
                long long chunk_len, const double* update_sumsq, float clip_threshold, float b1, float w1,
                int beta1_on, int decay_on),
               (ptrs, scalars, numel, chunks, chunk_len, update_sumsq, clip_threshold, b1, w1, beta1_on, decay_on))
LOFT_EMU_ENTRY(loft_multi_grad_stats_f32,
               (const unsigned long long* ptrs, const long long* numel, const long long* chunks, long long chunk_len, double* sumsq,
                unsigned* nonfinite),
               (ptrs, numel, chunks, chunk_len, sumsq, nonfinite))
LOFT_EMU_ENTRY(loft_multi_grad_stats_f16,
               (const unsigned long long* ptrs, const long long* numel, const long long* chunks, long long chunk_len, double* sumsq,
                unsigned* nonfinite),
               (ptrs, numel, chunks, chunk_len, sumsq, nonfinite))
LOFT_EMU_ENTRY(loft_multi_grad_stats_bf16,
               (const unsigned long long* ptrs, const long long* numel, const long long* chunks, long long chunk_len, double* sumsq,
                unsigned* nonfinite),
               (ptrs, numel, chunks, chunk_len, sumsq, nonfinite))
#endif
