// Per-element math of the fused perturbation kernels, shared by the CPU launcher (cpu_kernels.cpp)
// and the CUDA kernels (cuda_kernels.cu). No ATen here: nvcc compiles this for the device.
// The semantics are those of deepzero_kernels/kernels/reference.py; the comments name the
// reference expression each function mirrors, so that float32 rounding follows it closely.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define DZ_HD __host__ __device__ __forceinline__
#else
#define DZ_HD inline
#endif

namespace dz {

// The BatchNorm in a chain; the same values as deepzero_kernels.kernels.BnMode (Python), which the
// operators receive as an int (see chain_args.h: bn_mode_of checks and converts it).
enum class BnMode : int64_t {
  None = 0,     // no BatchNorm
  Batch = 1,    // batch statistics (training mode): each perturbation's own mean and variance
  Running = 2,  // running statistics (eval mode): a fixed per-channel affine y = x * w + b
};

// Arguments of the one-channel chain ((B, K, H, W) delta -> (B, K, H', W') change), the same for the
// CPU and CUDA launchers.
template <typename T>
struct OneChArgs {
  int64_t B, K, C, H, W, Hp, Wp;
  const int64_t* ch;  // channel of each perturbation
  BnMode bn_mode;
  const T *xhat, *inv_std, *bnw, *relu_base;
  int64_t pk, ps;
  const T* pool_base;
  T* out;
  bool gavg = false;  // write the mean of each output plane (B, K) instead (CPU conv1ch_delta_chain)
};

// Arguments of the dense chain: BatchNorm (statistics per (k, c) over (B, H, W)) -> + residual ->
// ReLU -> max pool -> global average on (B, K, C, H, W) values.
template <typename T>
struct DenseArgs {
  int64_t B, K, C, H, W, Hp, Wp;
  BnMode bn_mode;
  const T *bnw, *bnb;
  double eps;
  const T* residual;
  bool relu, gavg;
  int64_t pk, ps;
  T* out;
};


// Clamped integer helpers (std::min/max are not device functions everywhere).
DZ_HD int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
DZ_HD int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

// Floor division for possibly negative numerators (C++ '/' truncates towards zero).
DZ_HD int64_t floordiv(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

// The output positions j in [0, n_out) whose input index j*stride + off lies in [0, n): [*lo, *hi).
// Lets inner loops run branch-free over the valid range (zero padding outside).
DZ_HD void valid_range(int64_t n, int64_t n_out, int64_t stride, int64_t off, int64_t* lo, int64_t* hi) {
  // j*stride + off >= 0  <=>  j >= ceil(-off / stride);  j*stride + off < n  <=>  j <= floor((n - 1 - off) / stride)
  int64_t a = off >= 0 ? 0 : (-off + stride - 1) / stride;
  int64_t b = floordiv(n - 1 - off, stride) + 1;
  *lo = imin(imax(a, 0), n_out);
  *hi = imax(imin(b, n_out), *lo);
}

// ReLU delta relu(x0 + d) - relu(x0), as reference.channel_chain writes it:
// where(x0 > 0, maximum(d, -x0), clamp_min(x0 + d, 0)). Written as selects so loops vectorise.
template <typename T>
DZ_HD T relu_delta(T x0, T d) {
  T pos = d > -x0 ? d : -x0;
  T s = x0 + d;
  T neg = s > T(0) ? s : T(0);
  return x0 > T(0) ? pos : neg;
}

// ReLU -> max pool change of one window, exact: the perturbed window's argmax holds base input bx and
// change bd; m0 is the base output (relu of the base input's max). With m0 > 0 the change is
// relu_delta(m0, (bx - m0) + bd) = max((bx - m0) + bd, -m0); with m0 == 0 (the base max <= 0) it is
// relu(bx + bd). No difference of two pooled values is taken (reference.channel_chain).
template <typename T>
DZ_HD T relu_pool_delta(T bx, T bd, T m0) {
  if (m0 > T(0)) {
    const T g = (bx - m0) + bd;
    return g > -m0 ? g : -m0;
  }
  const T s = bx + bd;
  return s > T(0) ? s : (s != s ? s : T(0));
}

// Ceil-mode max pool without padding: window p covers [p*s, min(p*s + k, n)) (clipped at the border;
// every window starts inside, see reference.pool_out).
DZ_HD int64_t pool_out(int64_t n, int64_t k, int64_t s) { return n >= k ? (n - k + s - 1) / s + 1 : 1; }

// Output length of a convolution along one dim (pad on each side), formulas.conv_out_size; < 1 when the
// dilated kernel does not fit the padded input.
DZ_HD int64_t conv_out_size(int64_t n, int64_t k, int64_t stride, int64_t pad, int64_t dil) {
  return floordiv(n + 2 * pad - dil * (k - 1) - 1, stride) + 1;
}

// Coefficients of the BatchNorm (batch statistics) output change for one (perturbation, channel):
// out' - out = c0 + x_hat * c1 + delta * c2, from the moments of delta over the n reduced elements
// (s1 = sum delta, s2 = sum delta^2, sxd = sum x_hat * delta). Same algebra as ops.batch_norm_delta:
// var' - var = 2 E[x_hat delta] + E[delta^2] - E[delta]^2, and the change of 1/std is formed without
// subtracting two nearly equal numbers. Computed in double whatever the data type.
struct BnCoef {
  double c0, c1, c2;
};

DZ_HD BnCoef bn_delta_coef(double s1, double s2, double sxd, double n, double inv_std, double weight) {
  double d_mean = s1 / n;
  double d_var = (2.0 * sxd + s2) / n - d_mean * d_mean;
  double std_ = 1.0 / inv_std;
  double new_inv = 1.0 / sqrt(std_ * std_ + d_var);
  double d_inv = -d_var * inv_std * new_inv / (std_ + 1.0 / new_inv);
  d_inv *= weight;
  new_inv *= weight;
  BnCoef c;
  c.c0 = -d_mean * new_inv;
  c.c1 = d_inv;
  c.c2 = new_inv;
  return c;
}

// Count, mean and sum of squared deviations (M2) of a set of values, in double.
struct Moments {
  double n, mean, m2;
};

// The moments of n values from their sums shifted by one of them (s1 = sum (v - shift), s2 =
// sum (v - shift)^2): one pass, and no cancellation as long as the shift lies within the values' spread.
DZ_HD Moments moments_shifted(double n, double shift, double s1, double s2) {
  const double d = s1 / n;
  return Moments{n, shift + d, s2 - s1 * d};
}

// The moments of the union of two sets (Chan et al.'s pairwise update).
DZ_HD Moments chan_merge(Moments a, Moments b) {
  if (b.n == 0.0) return a;
  if (a.n == 0.0) return b;
  const double n = a.n + b.n, d = b.mean - a.mean, f = b.n / n;
  return Moments{n, a.mean + d * f, a.m2 + b.m2 + d * d * a.n * f};
}

// Closed-form cross-entropy change of sample b when only logit i changes by d:
// log1p(p_i expm1(d)) - d [i == y] (ops.cross_entropy_delta with coords). Non-finite only when p_i
// rounded to 1 and d is very negative; the caller then uses ce_direct.
DZ_HD double ce_coord(double p_i, double d, bool hit) { return log1p(p_i * expm1(d)) - (hit ? d : 0.0); }

// Fallback: logsumexp(logits + delta) - logsumexp(logits) - delta_y in double, with the delta given as
// a function of the coordinate (ops.cross_entropy_delta's `direct`).
template <typename L, typename DeltaAt>
DZ_HD double ce_direct(const L* logits, int64_t n, int64_t y, double lse0, DeltaAt delta_at) {
  double m = -INFINITY;
  for (int64_t j = 0; j < n; ++j) {
    double v = double(logits[j]) + delta_at(j);
    m = v > m ? v : m;
  }
  double s = 0.0;
  for (int64_t j = 0; j < n; ++j) s += exp(double(logits[j]) + delta_at(j) - m);
  return (m + log(s)) - lse0 - delta_at(y);
}

// logsumexp of a row in double (max-shifted).
template <typename T>
DZ_HD double logsumexp_row(const T* x, int64_t n) {
  double m = -INFINITY;
  for (int64_t j = 0; j < n; ++j) m = double(x[j]) > m ? double(x[j]) : m;
  double s = 0.0;
  for (int64_t j = 0; j < n; ++j) s += exp(double(x[j]) - m);
  return m + log(s);
}

}  // namespace dz
