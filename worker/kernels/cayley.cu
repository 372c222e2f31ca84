// The batched Cayley transform of DIAG-OFT and BOFT: for each skew-symmetric block Q (b×b),
//   R = (I + Q)(I − Q)⁻¹
// by Gauss–Jordan elimination of [I − Q | I + Q | I] in f64, one block of threads per matrix.
// I + Q and I − Q commute (both are polynomials in Q), so the eliminated middle part is
// (I − Q)⁻¹(I + Q) = R, and the right part is (I − Q)⁻¹, which the backward uses:
//   dQ = dR·B⁻ᵀ + B⁻ᵀ·Aᵀ·dR·B⁻ᵀ   (A = I + Q, B = I − Q).
// I − Q with Q skew has eigenvalues 1 − iλ (|·| ≥ 1): no pivoting is needed.
//
// `work` is (n, b, 3b) f64 and holds the result: columns b..2b are R, 2b..3b are B⁻¹.
#include "common.cuh"

namespace {

template <class T>
__device__ void cayley(const T* __restrict__ q, double* __restrict__ work, int b) {
  __shared__ double factor[256];  // the pivot column, read before the rows change (b ≤ 256)
  const long long m = blockIdx.x;
  const T* qm = q + m * b * b;
  double* wm = work + m * b * 3 * b;
  const int cols = 3 * b;
  for (int idx = threadIdx.x; idx < b * cols; idx += blockDim.x) {
    int r = idx / cols, c = idx % cols;
    double v;
    if (c < b) {
      v = (r == c ? 1.0 : 0.0) - (double)loft::to_f32(qm[r * b + c]);
    } else if (c < 2 * b) {
      v = (r == c - b ? 1.0 : 0.0) + (double)loft::to_f32(qm[r * b + c - b]);
    } else {
      v = r == c - 2 * b ? 1.0 : 0.0;
    }
    wm[idx] = v;
  }
  __syncthreads();
  for (int p = 0; p < b; p++) {
    // Scale the pivot row (its pivot element last, after the others have read it).
    double pivot = wm[p * cols + p];
    __syncthreads();
    for (int c = threadIdx.x; c < cols; c += blockDim.x) wm[p * cols + c] /= pivot;
    for (int r = threadIdx.x; r < b; r += blockDim.x) factor[r] = wm[r * cols + p];
    __syncthreads();
    // Eliminate column p from every other row.
    for (int idx = threadIdx.x; idx < b * cols; idx += blockDim.x) {
      int r = idx / cols, c = idx % cols;
      if (r != p) wm[idx] -= factor[r] * wm[p * cols + c];
    }
    __syncthreads();
  }
}

}  // namespace

#define LOFT_CAYLEY_KERNEL(T, SUFFIX)                                                           \
  extern "C" __global__ void loft_cayley_##SUFFIX(const T* q, double* work, int b) { cayley<T>(q, work, b); }
LOFT_CAYLEY_KERNEL(float, f32)
LOFT_CAYLEY_KERNEL(__half, f16)
LOFT_CAYLEY_KERNEL(__nv_bfloat16, bf16)

#ifdef LOFT_CPU_EMULATION
LOFT_EMU_ENTRY(loft_cayley_f32, (const float* q, double* work, int b), (q, work, b))
#endif
