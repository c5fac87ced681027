// CUDA kernels of the fused perturbation ops. The per-element math is dz_math.h, shared with the CPU
// launcher; semantics: deepzero_kernels/kernels/reference.py.
//
// Chains (channel_chain, conv_delta_chain, conv1ch_delta_chain, conv1ch_chain, bn_act_dense): the
// grid is 2-D, (item, slice), where an item is one (perturbation[, channel]) and a slice a contiguous
// run of at most chain_slice_elems of its elements, so that a call with one perturbation still fills
// the GPU. BatchNorm with batch statistics needs the item's statistics before any output, so it takes
// three launches: `*_stats_kernel` (single pass: each block sums its slice in double), `*_coef_kernel`
// (a thread per item merges its slices' partial sums in a fixed order: results depend neither on K nor
// on the launch order) and `*_out_kernel`; without it only the last runs. In-plane indices are 32-bit
// (the launchers check the sizes), convolution taps are template parameters for 1x1 and 3x3.
// Cross-entropy: one thread per (perturbation, sample).
//
// Part 1 (device code) uses raw pointers only. Part 2 (the ATen launchers, compiled when DZ_WITH_CUDA
// is defined, as in the extension build) needs torch's c10/cuda headers. Arguments are checked in
// bindings.cpp; index ranges are not (that would need a device sync): a kernel that meets an index
// out of range writes NaN for that item instead of reading out of bounds.
//
// Part 1 also compiles as plain C++ under DZ_CUDA_EMULATE (csrc/tests/cuda_emulate.h: one thread per
// block, blocks run in a loop), which is how the C++ tests check its indexing without a GPU; hence
// warp geometry from blockDim.
#ifndef DZ_CUDA_EMULATE
#include <cuda_runtime.h>
#endif

#include <cmath>
#include <cstdint>

#include "dz_math.h"

namespace dz {
namespace cuda {

constexpr int kThreads = 256;  // block size of the chain kernels (8 warps)

// Warp geometry of the launched block (32 on a GPU, whose blocks are multiples of 32 threads).
__device__ __forceinline__ int warp_width() { return blockDim.x < 32 ? int(blockDim.x) : 32; }

template <typename T>
__device__ __forceinline__ T nan_of() {
  return T(NAN);
}

// Sum of NV doubles over the block (deterministic order); every thread gets the sums. sh: NV * 32.
template <int NV>
__device__ void block_sum(double (&v)[NV], double* sh) {
  const int ws = warp_width(), nw = int(blockDim.x) / ws, lane = threadIdx.x % ws, wid = threadIdx.x / ws;
#pragma unroll
  for (int q = 0; q < NV; ++q)
    for (int o = ws / 2; o > 0; o >>= 1) v[q] += __shfl_down_sync(0xffffffffu, v[q], o);
  if (lane == 0)
#pragma unroll
    for (int q = 0; q < NV; ++q) sh[q * 32 + wid] = v[q];
  __syncthreads();
  if (wid == 0) {
#pragma unroll
    for (int q = 0; q < NV; ++q) {
      double x = lane < nw ? sh[q * 32 + lane] : 0.0;
      for (int o = ws / 2; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
      if (lane == 0) sh[q * 32] = x;
    }
  }
  __syncthreads();
#pragma unroll
  for (int q = 0; q < NV; ++q) v[q] = sh[q * 32];
  __syncthreads();  // sh may be reused
}

__device__ __forceinline__ double warp_sum(double x) {
  for (int o = warp_width() / 2; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
  return x;
}

template <typename T>
__device__ __forceinline__ T nan_max(T m, T v) {  // max that propagates NaN, as torch's max_pool2d
  return (v > m || v != v) ? v : m;
}

// An item's n elements cut into S slices of len (the last may be shorter); block (item, y) takes
// slice y. Depends on n only, so an item's result does not depend on the other items of the call.
struct Slices {
  int n, S, len;
  __device__ int lo() const { return int(blockIdx.y) * len; }
  __device__ int hi() const { return lo() + len < n ? lo() + len : n; }
};

// ------------------------------------------------------------------------ sources
// A source gives an item's values: `valid(item)`, and `at(item)` (one-channel chains) or `at(k, c)`
// (dense chains), a functor of (sample b, in-plane index r) with the item's pointers bound once.

// 32-bit geometry of a single-input-channel convolution (the launchers check the sizes).
struct ConvGeom {
  int H, W, kh, kw, sh, sw, ph, pw, dh, dw, Wo;
};

// Output element r of the convolution of one (H, W) plane with one filter, zero padding. TAPS > 0
// fixes a TAPS x TAPS filter at compile time (the loops unroll); 0 reads the size from g.
template <int TAPS, typename T>
__device__ __forceinline__ T conv_at(const T* in, const T* wt, const ConvGeom& g, int r) {
  const int i = r / g.Wo, j = r - i * g.Wo, kh = TAPS ? TAPS : g.kh, kw = TAPS ? TAPS : g.kw;
  T s = T(0);
#pragma unroll
  for (int u = 0; u < kh; ++u) {
    const int y = i * g.sh + u * g.dh - g.ph;
    if (y < 0 || y >= g.H) continue;
#pragma unroll
    for (int v = 0; v < kw; ++v) {
      const int x = j * g.sw + v * g.dw - g.pw;
      if (x >= 0 && x < g.W) s += wt[u * kw + v] * in[y * g.W + x];
    }
  }
  return s;
}

// Values given as (B, K, HW) [one-channel] or (B, K, C, HW) [dense].
template <typename T>
struct PlaneAt {
  const T* p;
  int64_t bstride;
  __device__ T operator()(int b, int r) const { return p[b * bstride + r]; }
};

template <typename T>
struct ValuesSrcD {
  const T* v;
  int64_t K, HW;
  __device__ bool valid(int64_t) const { return true; }
  __device__ PlaneAt<T> at(int64_t k) const { return {v + k * HW, K * HW}; }
};

// The input delta of a weight perturbation gathered from the layer input: x[b, c, i*sh + oh, j*sw + ow] * mu.
template <typename T>
struct GatherAt {
  const T* x;
  int64_t bstride;
  int Hx, Wx, Wo, sh, sw, oh, ow;
  T mu;
  __device__ T operator()(int b, int r) const {
    const int i0 = r / Wo, i = i0 * sh + oh, j = (r - i0 * Wo) * sw + ow;
    if (i < 0 || i >= Hx || j < 0 || j >= Wx) return T(0);
    return x[b * bstride + i * Wx + j] * mu;
  }
};

template <typename T>
struct GatherSrcD {
  const T* x;
  int64_t Cin;
  int Hx, Wx, Wo, sh, sw;
  const int64_t *c, *oh, *ow;
  T mu;
  __device__ bool valid(int64_t k) const { return c[k] >= 0 && c[k] < Cin; }
  __device__ GatherAt<T> at(int64_t k) const {
    return {x + c[k] * Hx * Wx, Cin * Hx * Wx, Hx, Wx, Wo, sh, sw, int(oh[k]), int(ow[k]), mu};
  }
};

// The next conv of a one-channel delta: item = k * Cout + co is output channel co of perturbation k.
template <int TAPS, typename T>
struct Conv1chAt {
  const T *in, *wt;
  int64_t bstride;
  ConvGeom g;
  __device__ T operator()(int b, int r) const { return conv_at<TAPS>(in + b * bstride, wt, g, r); }
};

template <int TAPS, typename T>
struct Conv1chSrcD {
  const T *delta, *weight;
  const int64_t* ch;
  int64_t K, Cout, Cin;
  ConvGeom g;
  __device__ bool valid(int64_t item) const { return ch[item / Cout] >= 0 && ch[item / Cout] < Cin; }
  __device__ Conv1chAt<TAPS, T> at(int64_t item) const {
    const int64_t k = item / Cout, co = item - k * Cout, HW = int64_t(g.H) * g.W;
    return {delta + k * HW, weight + (co * Cin + ch[k]) * g.kh * g.kw, K * HW, g};
  }
};

// base_out[b, co] + the single-input-channel conv of delta[b, k] with weight[co, ch[k]] (conv1ch_chain).
template <int TAPS, typename T>
struct ConvPlusBaseAt {
  const T *in, *wt, *base;
  int64_t bstride, base_bstride;
  ConvGeom g;
  __device__ T operator()(int b, int r) const {
    return base[b * base_bstride + r] + conv_at<TAPS>(in + b * bstride, wt, g, r);  // base + dz, as the reference
  }
};

template <int TAPS, typename T>
struct ConvSrcD {
  const T *delta, *weight, *base;
  const int64_t* ch;
  int64_t K, Cin, Cout, Ho;
  ConvGeom g;
  __device__ bool valid(int64_t k) const { return ch[k] >= 0 && ch[k] < Cin; }
  __device__ ConvPlusBaseAt<TAPS, T> at(int64_t k, int64_t co) const {
    const int64_t HW = int64_t(g.H) * g.W, HWo = Ho * g.Wo;
    return {delta + k * HW, weight + (co * Cin + ch[k]) * g.kh * g.kw, base + co * HWo, K * HW, Cout * HWo, g};
  }
};

// ------------------------------------------------------------------------ one-channel chain
template <typename T, typename Src>
__device__ __forceinline__ bool onech_valid(const OneChArgs<T>& a, const Src& src, int64_t k) {
  const int64_t c = a.ch[k];
  return !((a.C && (c < 0 || c >= a.C)) || !src.valid(k));
}

// Slice y of item k: the delta's moments sum d, sum d^2, sum x_hat d -> part[(k * S + y) * 3 + q].
template <typename T, typename Src>
__global__ void __launch_bounds__(kThreads) onech_stats_kernel(OneChArgs<T> a, Src src, Slices sl, double* part) {
  __shared__ double sh[3 * 32];
  const int64_t k = blockIdx.x;
  if (!onech_valid(a, src, k)) return;  // the coef and out kernels write NaN
  const auto f = src.at(k);
  const int HW = int(a.H * a.W);
  const T* xh = a.xhat + a.ch[k] * HW;
  const int64_t xs = a.C * HW;
  double s[3] = {0.0, 0.0, 0.0};
  for (int e = sl.lo() + int(threadIdx.x); e < sl.hi(); e += int(blockDim.x)) {
    const int b = e / HW, r = e - b * HW;
    const double d = double(f(b, r));
    s[0] += d;
    s[1] += d * d;
    s[2] += double(xh[b * xs + r]) * d;
  }
  block_sum<3>(s, sh);
  if (threadIdx.x == 0)
    for (int q = 0; q < 3; ++q) part[(k * sl.S + blockIdx.y) * 3 + q] = s[q];
}

// One thread per item: the slices' sums in order -> the BatchNorm change coefficients (bn_delta_coef).
template <typename T, typename Src>
__global__ void onech_coef_kernel(OneChArgs<T> a, Src src, int S, int n, const double* part, double* coef) {
  const int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= a.K || !onech_valid(a, src, k)) return;
  double s[3] = {0.0, 0.0, 0.0};
  for (int y = 0; y < S; ++y)
    for (int q = 0; q < 3; ++q) s[q] += part[(k * S + y) * 3 + q];
  const int64_t c = a.ch[k];
  const BnCoef cf = bn_delta_coef(s[0], s[1], s[2], double(n), double(a.inv_std[c]), double(a.bnw[c]));
  coef[k * 3] = cf.c0, coef[k * 3 + 1] = cf.c1, coef[k * 3 + 2] = cf.c2;
}

// Slice y of item k's output: BatchNorm change -> ReLU change -> [max pool change]; sl counts outputs.
template <typename T, typename Src>
__global__ void __launch_bounds__(kThreads) onech_out_kernel(OneChArgs<T> a, Src src, Slices sl, const double* coef) {
  const int64_t k = blockIdx.x, c = a.ch[k];
  const bool pooled = a.relu_base && a.pk;
  const int HW = int(a.H * a.W), W = int(a.W), HWp = int(a.Hp * a.Wp), Wp = int(a.Wp);
  const int plane = pooled ? HWp : HW;
  T* out = a.out + k * plane;
  const int64_t os = a.K * plane;  // out[b, k] = out + b * os
  if (!onech_valid(a, src, k)) {
    for (int e = sl.lo() + int(threadIdx.x); e < sl.hi(); e += int(blockDim.x))
      out[(e / plane) * os + e % plane] = nan_of<T>();
    return;
  }
  const auto f = src.at(k);
  const int64_t cs = a.C * HW;  // sample stride of the (B, C, H, W) base tensors
  const T* xh = a.xhat ? a.xhat + c * HW : nullptr;
  const T* x0 = a.relu_base ? a.relu_base + c * HW : nullptr;
  T c0 = T(0), c1 = T(0), c2 = T(0);
  if (a.bn_mode == BnMode::Batch) c0 = T(coef[k * 3]), c1 = T(coef[k * 3 + 1]), c2 = T(coef[k * 3 + 2]);
  const T w2 = a.bn_mode == BnMode::Running ? a.bnw[c] : T(1);
  auto bn = [&](int b, int r) -> T {
    const T d = f(b, r);
    if (a.bn_mode == BnMode::Batch) return (c0 + xh[b * cs + r] * c1) + d * c2;
    return a.bn_mode == BnMode::Running ? d * w2 : d;
  };
  if (!x0) {
    for (int e = sl.lo() + int(threadIdx.x); e < sl.hi(); e += int(blockDim.x)) {
      const int b = e / HW, r = e - b * HW;
      out[b * os + r] = bn(b, r);
    }
  } else if (!pooled) {
    for (int e = sl.lo() + int(threadIdx.x); e < sl.hi(); e += int(blockDim.x)) {
      const int b = e / HW, r = e - b * HW;
      out[b * os + r] = relu_delta(x0[b * cs + r], bn(b, r));
    }
  } else {  // the perturbed ReLU input's argmax per window, the exact change there (relu_pool_delta)
    const T* pb = a.pool_base + c * HWp;
    const int64_t ps = a.C * HWp;
    const int H = int(a.H), pk = int(a.pk), st = int(a.ps);
    for (int e = sl.lo() + int(threadIdx.x); e < sl.hi(); e += int(blockDim.x)) {
      const int b = e / HWp, q = e - b * HWp, ip = q / Wp, jp = q - ip * Wp;
      const int r0 = ip * st, r1 = r0 + pk < H ? r0 + pk : H, q0 = jp * st, q1 = q0 + pk < W ? q0 + pk : W;
      const T* xb = x0 + b * cs;
      T best = -INFINITY, bx = T(0), bd = T(0);
      bool first = true;
      for (int i = r0; i < r1; ++i)
        for (int j = q0; j < q1; ++j) {
          const T d = bn(b, i * W + j), v = xb[i * W + j] + d;
          if (first || v > best || (v != v && best == best)) {
            best = v;
            bx = xb[i * W + j];
            bd = d;
            first = false;
          }
        }
      out[b * os + q] = relu_pool_delta(bx, bd, pb[b * ps + q]);
    }
  }
}

// ----------------------------------------------------------------------------- dense chain
template <typename T>
struct DenseValuesSrcD {
  const T* v;
  int64_t K, C, HW;
  __device__ bool valid(int64_t) const { return true; }
  __device__ PlaneAt<T> at(int64_t k, int64_t c) const { return {v + (k * C + c) * HW, K * C * HW}; }
};

// Slice y of item (k, c): its values' count, mean and M2 (shifted sums in double: one pass, no
// cancellation) -> part[(kc * S + y) * 3 + q].
template <typename T, typename Src>
__global__ void __launch_bounds__(kThreads) dense_stats_kernel(DenseArgs<T> a, Src src, Slices sl, double* part) {
  __shared__ double sh[2 * 32];
  const int64_t kc = blockIdx.x, k = kc / a.C, c = kc - k * a.C;
  if (!src.valid(k)) return;
  const auto f = src.at(k, c);
  const int HW = int(a.H * a.W), lo = sl.lo(), hi = sl.hi();
  const double shift = double(f(lo / HW, lo % HW));
  double s[2] = {0.0, 0.0};
  for (int e = lo + int(threadIdx.x); e < hi; e += int(blockDim.x)) {
    const int b = e / HW;
    const double d = double(f(b, e - b * HW)) - shift;
    s[0] += d;
    s[1] += d * d;
  }
  block_sum<2>(s, sh);
  if (threadIdx.x == 0) {
    const Moments m = moments_shifted(double(hi - lo), shift, s[0], s[1]);
    double* p = part + (kc * sl.S + blockIdx.y) * 3;
    p[0] = m.n, p[1] = m.mean, p[2] = m.m2;
  }
}

// One thread per item: the slices' moments merged in order (Chan) -> mean and 1/sqrt(var + eps).
template <typename T>
__global__ void dense_coef_kernel(DenseArgs<T> a, int S, const double* part, double* coef) {
  const int64_t kc = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (kc >= a.K * a.C) return;
  Moments m{0.0, 0.0, 0.0};
  for (int y = 0; y < S; ++y) {
    const double* p = part + (kc * S + y) * 3;
    m = chan_merge(m, Moments{p[0], p[1], p[2]});
  }
  coef[kc * 2] = m.mean, coef[kc * 2 + 1] = 1.0 / sqrt(m.m2 / m.n + a.eps);
}

// BatchNorm -> residual -> ReLU -> max pool -> [global average] of item (k, c). Without the global
// average sl counts output elements; with it, samples (a warp per sample, warp-shuffle sums).
template <typename T, typename Src>
__global__ void __launch_bounds__(kThreads) dense_out_kernel(DenseArgs<T> a, Src src, Slices sl, const double* coef) {
  const int64_t kc = blockIdx.x, k = kc / a.C, c = kc - k * a.C;
  const int HW = int(a.H * a.W), H = int(a.H), W = int(a.W), Wp = int(a.Wp);
  const int HWp = a.pk ? int(a.Hp * a.Wp) : HW;
  const int plane = a.gavg ? 1 : HWp;
  T* out = a.out + kc * plane;
  const int64_t os = a.K * a.C * plane;  // out[b, k, c] = out + b * os
  if (!src.valid(k)) {
    if (a.gavg)
      for (int b = sl.lo() + int(threadIdx.x); b < sl.hi(); b += int(blockDim.x)) out[b * os] = nan_of<T>();
    else
      for (int e = sl.lo() + int(threadIdx.x); e < sl.hi(); e += int(blockDim.x))
        out[(e / plane) * os + e % plane] = nan_of<T>();
    return;
  }
  const auto f = src.at(k, c);
  T mean = T(0), rstd = T(0);
  if (a.bn_mode == BnMode::Batch) mean = T(coef[kc * 2]), rstd = T(coef[kc * 2 + 1]);
  const bool bn = a.bn_mode != BnMode::None;
  const T w = bn ? a.bnw[c] : T(1), bb = bn ? a.bnb[c] : T(0);
  const T* res = a.residual ? a.residual + c * HW : nullptr;
  const int64_t rs = a.C * HW;
  auto post = [&](int b, int r) -> T {  // BatchNorm -> residual -> ReLU, in the reference's order
    const T v = f(b, r);
    T y = a.bn_mode == BnMode::Batch     ? ((v - mean) * rstd) * w + bb
          : a.bn_mode == BnMode::Running ? v * w + bb
                                         : v;
    if (res) y += res[b * rs + r];
    if (a.relu) y = y > T(0) ? y : (y != y ? y : T(0));
    return y;
  };
  const int pk = int(a.pk), ps = int(a.ps);
  auto pooled = [&](int b, int q) -> T {  // output q of the (clipped, ceil-mode) max pool
    if (!pk) return post(b, q);
    const int ip = q / Wp, jp = q - ip * Wp;
    const int r0 = ip * ps, r1 = r0 + pk < H ? r0 + pk : H, q0 = jp * ps, q1 = q0 + pk < W ? q0 + pk : W;
    T m = -INFINITY;
    for (int i = r0; i < r1; ++i)
      for (int j = q0; j < q1; ++j) m = nan_max(m, post(b, i * W + j));
    return m;
  };
  if (!a.gavg) {
    for (int e = sl.lo() + int(threadIdx.x); e < sl.hi(); e += int(blockDim.x)) {
      const int b = e / HWp, q = e - b * HWp;
      out[b * os + q] = pooled(b, q);
    }
    return;
  }
  const int ws = warp_width(), nw = int(blockDim.x) / ws, lane = threadIdx.x % ws, wid = threadIdx.x / ws;
  for (int b = sl.lo() + wid; b < sl.hi(); b += nw) {
    double s = 0.0;
    for (int q = lane; q < HWp; q += ws) s += double(pooled(b, q));
    s = warp_sum(s);
    if (lane == 0) out[b * os] = T(s / double(HWp));
  }
}

// ------------------------------------------------------------------------- cross-entropy
// One thread per (k, b); the base log-softmax of sample b is recomputed per thread (N logits), which
// keeps the call to one launch.
template <typename T>
__global__ void weight_ce_kernel(const T* x, const T* logits, const int64_t* target, const int64_t* idx, T mu,
                                 int64_t K, int64_t B, int64_t N, int64_t Nin, double* out) {
  const int64_t kb = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (kb >= K * B) return;
  const int64_t k = kb / B, b = kb % B, y = target[b], id = idx[k];
  if (id < 0 || id >= N * Nin || y < 0 || y >= N) {
    out[kb] = NAN;
    return;
  }
  const int64_t i = id / Nin, j = id % Nin;
  const T* l = logits + b * N;
  const double lse = logsumexp_row(l, N);
  const double d = double(T(x[b * Nin + j] * mu));  // the change rounds in the data type
  double r = ce_coord(exp(double(l[i]) - lse), d, y == i);
  if (!isfinite(r)) r = ce_direct(l, N, y, lse, [&](int64_t q) { return q == i ? d : 0.0; });
  out[kb] = r;
}

template <typename T>
__global__ void rank1_ce_kernel(const T* values, const int64_t* channel, const T* weight, const T* logits,
                                const int64_t* target, int64_t K, int64_t B, int64_t N, int64_t Nin, double* out) {
  const int64_t kb = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (kb >= K * B) return;
  const int64_t k = kb / B, b = kb % B, y = target[b], c = channel[k];
  if (c < 0 || c >= Nin || y < 0 || y >= N) {
    out[kb] = NAN;
    return;
  }
  const T v = values[b * K + k];
  const T* l = logits + b * N;
  auto delta = [&](int64_t q) { return double(T(v * weight[q * Nin + c])); };
  const double lse = logsumexp_row(l, N);
  double s = 0.0;
  for (int64_t q = 0; q < N; ++q) s += exp(double(l[q]) - lse) * expm1(delta(q));
  double r = log1p(s) - delta(y);
  if (!isfinite(r)) r = ce_direct(l, N, y, lse, delta);
  out[kb] = r;
}

template <typename T>
__global__ void dense_ce_kernel(const T* values, const T* base, const T* weight, const T* logits,
                                const int64_t* target, int64_t K, int64_t B, int64_t N, int64_t Nin, double* out) {
  const int64_t kb = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (kb >= K * B) return;
  const int64_t k = kb / B, b = kb % B, y = target[b];
  if (y < 0 || y >= N) {
    out[kb] = NAN;
    return;
  }
  const T* vr = values + (b * K + k) * Nin;
  const T* br = base + b * Nin;
  const T* l = logits + b * N;
  auto delta = [&](int64_t q) {  // (values - base) @ weight.T, rounded to the data type as the reference
    const T* wr = weight + q * Nin;
    double s = 0.0;
    for (int64_t j = 0; j < Nin; ++j) s += double(T(vr[j] - br[j])) * double(wr[j]);
    return double(T(s));
  };
  const double lse = logsumexp_row(l, N);
  double s = 0.0;
  for (int64_t q = 0; q < N; ++q) s += exp(double(l[q]) - lse) * expm1(delta(q));
  double r = log1p(s) - delta(y);
  if (!isfinite(r)) r = ce_direct(l, N, y, lse, delta);
  out[kb] = r;
}

}  // namespace cuda
}  // namespace dz

// ================================================================================ ATen launchers
#if defined(DZ_WITH_CUDA) || defined(DZ_CUDA_EMULATE)
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <type_traits>

#include "chain_args.h"
#include "kernels.h"

#ifndef DZ_CUDA_EMULATE
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#define DZ_DEVICE_GUARD(t) c10::cuda::CUDAGuard dz_guard_(t.device())
// BLOCK: the block cooperates (barriers); FLAT: independent threads. The same launch on a GPU.
#define DZ_LAUNCH_BLOCK(kernel, grid, block, smem, ...)                                      \
  do {                                                                                       \
    kernel<<<grid, block, smem, c10::cuda::getCurrentCUDAStream()>>>(__VA_ARGS__);           \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                                          \
  } while (0)
#define DZ_LAUNCH_FLAT DZ_LAUNCH_BLOCK
#endif

namespace dz {

// Elements per block of the chain kernels (16 per thread at 256 threads): enough work per block to
// hide the reduction, and slices enough per item that one perturbation fills an H100/H200. The C++
// tests set it small so that tiny items are split too.
inline int64_t chain_slice_elems = 4096;

namespace {

unsigned blocks_for(int64_t n, int threads) { return unsigned((n + threads - 1) / threads); }

// The kernels index inside an item with 32-bit ints: every per-item size must fit.
void check_int32(int64_t n) {
  TORCH_CHECK(n < (int64_t(1) << 31), "deepzero CUDA kernels: ", n,
              " elements per perturbation exceed their 32-bit indexing; use a smaller batch or the torch backend");
}

// The slicing of an item of n elements (see cuda::Slices): at most 65535 slices (the grid's y).
cuda::Slices slices_for(int64_t n, int64_t per_block = chain_slice_elems) {
  check_int32(n);
  int64_t len = std::max<int64_t>(per_block, (n + 65534) / 65535);
  len = std::max<int64_t>(1, std::min(len, n));
  return cuda::Slices{int(n), int(std::max<int64_t>(1, (n + len - 1) / len)), int(len)};
}

void check_items(int64_t items) {
  TORCH_CHECK(items < (int64_t(1) << 31), "deepzero CUDA kernels: ", items, " work items exceed the grid");
}

// 32-bit convolution geometry.
cuda::ConvGeom conv_geom(int64_t H, int64_t W, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph,
                         int64_t pw, int64_t dh, int64_t dw, int64_t Wo) {
  for (int64_t v : {H * W, kh * kw, sh, sw, ph, pw, dh, dw, Wo}) check_int32(v);
  return cuda::ConvGeom{int(H), int(W), int(kh), int(kw), int(sh), int(sw), int(ph), int(pw), int(dh), int(dw), int(Wo)};
}

// Calls f with std::integral_constant<int, TAPS>: 3 and 1 for square 3x3 / 1x1 filters (unrolled
// taps), 0 for any other size.
template <typename F>
void with_taps(int64_t kh, int64_t kw, F&& f) {
  if (kh == 3 && kw == 3)
    f(std::integral_constant<int, 3>());
  else if (kh == 1 && kw == 1)
    f(std::integral_constant<int, 1>());
  else
    f(std::integral_constant<int, 0>());
}

// The one-channel chains: [statistics -> coefficients ->] outputs.
template <typename T, typename Src>
void launch_onech(const OneChArgs<T>& a, const Src& src, const at::TensorOptions& opt) {
  if (a.K == 0 || a.B == 0) return;
  check_items(a.K);
  const bool pooled = a.relu_base && a.pk;
  const cuda::Slices out_sl = slices_for(a.B * (pooled ? a.Hp * a.Wp : a.H * a.W));
  at::Tensor coef;
  if (a.bn_mode == BnMode::Batch) {
    const cuda::Slices st = slices_for(a.B * a.H * a.W);
    const at::Tensor part = at::empty({a.K * st.S * 3}, opt.dtype(at::kDouble));
    coef = at::empty({a.K * 3}, opt.dtype(at::kDouble));
    auto stats = cuda::onech_stats_kernel<T, Src>;
    DZ_LAUNCH_BLOCK(stats, dim3(unsigned(a.K), unsigned(st.S)), cuda::kThreads, 0, a, src, st, part.data_ptr<double>());
    auto coefs = cuda::onech_coef_kernel<T, Src>;
    DZ_LAUNCH_FLAT(coefs, blocks_for(a.K, 128), 128, 0, a, src, st.S, st.n, part.data_ptr<double>(),
                   coef.data_ptr<double>());
  }
  auto kernel = cuda::onech_out_kernel<T, Src>;
  DZ_LAUNCH_BLOCK(kernel, dim3(unsigned(a.K), unsigned(out_sl.S)), cuda::kThreads, 0, a, src, out_sl,
                  coef.defined() ? coef.data_ptr<double>() : nullptr);
}

// The dense chains: [statistics -> mean and 1/std ->] outputs.
template <typename T, typename Src>
void launch_dense(const DenseArgs<T>& a, const Src& src, const at::TensorOptions& opt) {
  const int64_t items = a.K * a.C;
  if (items == 0 || a.B == 0) return;
  check_items(items);
  const int64_t HW = a.H * a.W, HWp = a.pk ? a.Hp * a.Wp : HW;
  at::Tensor coef;
  if (a.bn_mode == BnMode::Batch) {
    const cuda::Slices st = slices_for(a.B * HW);
    const at::Tensor part = at::empty({items * st.S * 3}, opt.dtype(at::kDouble));
    coef = at::empty({items * 2}, opt.dtype(at::kDouble));
    auto stats = cuda::dense_stats_kernel<T, Src>;
    DZ_LAUNCH_BLOCK(stats, dim3(unsigned(items), unsigned(st.S)), cuda::kThreads, 0, a, src, st,
                    part.data_ptr<double>());
    auto coefs = cuda::dense_coef_kernel<T>;
    DZ_LAUNCH_FLAT(coefs, blocks_for(items, 128), 128, 0, a, st.S, part.data_ptr<double>(), coef.data_ptr<double>());
  }
  check_int32(a.B * HW);  // the pre-pool planes are indexed too
  // with the global average a block takes whole samples (about chain_slice_elems inputs)
  const cuda::Slices out_sl = a.gavg ? slices_for(a.B, std::max<int64_t>(1, chain_slice_elems / HW))
                                     : slices_for(a.B * HWp);
  auto kernel = cuda::dense_out_kernel<T, Src>;
  DZ_LAUNCH_BLOCK(kernel, dim3(unsigned(items), unsigned(out_sl.S)), cuda::kThreads, 0, a, src, out_sl,
                  coef.defined() ? coef.data_ptr<double>() : nullptr);
}

}  // namespace

at::Tensor channel_chain_cuda(const at::Tensor& values, const at::Tensor& channel, int64_t bn_mode,
                              const at::Tensor& bn_xhat, const at::Tensor& bn_inv_std, const at::Tensor& bn_weight,
                              const at::Tensor& relu_base, int64_t pool_k, int64_t pool_s,
                              const at::Tensor& pool_base) {
  DZ_DEVICE_GUARD(values);
  const int64_t B = values.size(0), K = values.size(1), H = values.size(2), W = values.size(3);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "channel_chain_cuda", [&] {
    auto a = onech_args<scalar_t>(B, K, H, W, channel, bn_mode, bn_xhat, bn_inv_std, bn_weight, relu_base, pool_k,
                                  pool_s, pool_base, out, values.options());
    launch_onech(a, cuda::ValuesSrcD<scalar_t>{values.data_ptr<scalar_t>(), K, H * W}, values.options());
  });
  return out;
}

at::Tensor conv1ch_delta_chain_cuda(const at::Tensor& delta, const at::Tensor& channel, const at::Tensor& weight,
                                    int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h,
                                    int64_t dil_w, int64_t bn_mode, const at::Tensor& bn_xhat,
                                    const at::Tensor& bn_inv_std, const at::Tensor& bn_weight,
                                    const at::Tensor& relu_base, int64_t pool_k, int64_t pool_s,
                                    const at::Tensor& pool_base, bool global_avg) {
  DZ_DEVICE_GUARD(delta);
  const int64_t B = delta.size(0), K = delta.size(1), H = delta.size(2), W = delta.size(3);
  const int64_t Cout = weight.size(0), Cin = weight.size(1), kh = weight.size(2), kw = weight.size(3);
  const int64_t Ho = conv_out_size(H, kh, stride_h, pad_h, dil_h), Wo = conv_out_size(W, kw, stride_w, pad_w, dil_w);
  const at::Tensor items = at::arange(Cout, channel.options()).repeat({K});
  const cuda::ConvGeom g = conv_geom(H, W, kh, kw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, Wo);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(delta.scalar_type(), "conv1ch_delta_chain_cuda", [&] {
    auto a = onech_args<scalar_t>(B, K * Cout, Ho, Wo, items, bn_mode, bn_xhat, bn_inv_std, bn_weight, relu_base,
                                  pool_k, pool_s, pool_base, out, delta.options());
    with_taps(kh, kw, [&](auto taps) {
      cuda::Conv1chSrcD<decltype(taps)::value, scalar_t> src{
          delta.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), channel.data_ptr<int64_t>(), K, Cout, Cin, g};
      launch_onech(a, src, delta.options());
    });
  });
  out = out.view({B, K, Cout, out.size(2), out.size(3)});
  return global_avg ? out.mean({3, 4}, true) : out;
}

at::Tensor conv_delta_chain_cuda(const at::Tensor& x, const at::Tensor& src_channel, const at::Tensor& off_h,
                                 const at::Tensor& off_w, const at::Tensor& out_channel, double mu, int64_t stride_h,
                                 int64_t stride_w, int64_t h_out, int64_t w_out, int64_t bn_mode,
                                 const at::Tensor& bn_xhat, const at::Tensor& bn_inv_std, const at::Tensor& bn_weight,
                                 const at::Tensor& relu_base, int64_t pool_k, int64_t pool_s,
                                 const at::Tensor& pool_base) {
  DZ_DEVICE_GUARD(x);
  const int64_t B = x.size(0), K = src_channel.numel();
  for (int64_t v : {x.size(2) * x.size(3), w_out, stride_h, stride_w}) check_int32(v);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_delta_chain_cuda", [&] {
    auto a = onech_args<scalar_t>(B, K, h_out, w_out, out_channel, bn_mode, bn_xhat, bn_inv_std, bn_weight,
                                  relu_base, pool_k, pool_s, pool_base, out, x.options());
    cuda::GatherSrcD<scalar_t> src{x.data_ptr<scalar_t>(), x.size(1), int(x.size(2)), int(x.size(3)), int(w_out),
                                   int(stride_h), int(stride_w),
                                   src_channel.data_ptr<int64_t>(), off_h.data_ptr<int64_t>(),
                                   off_w.data_ptr<int64_t>(), scalar_t(mu)};
    launch_onech(a, src, x.options());
  });
  return out;
}

at::Tensor bn_act_dense_cuda(const at::Tensor& values, int64_t bn_mode, const at::Tensor& bn_weight,
                             const at::Tensor& bn_bias, double eps, const at::Tensor& residual, bool relu,
                             int64_t pool_k, int64_t pool_s, bool global_avg) {
  DZ_DEVICE_GUARD(values);
  const int64_t B = values.size(0), K = values.size(1), C = values.size(2), H = values.size(3), W = values.size(4);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "bn_act_dense_cuda", [&] {
    auto a = dense_args<scalar_t>(B, K, C, H, W, bn_mode, bn_weight, bn_bias, eps, residual, relu, pool_k, pool_s,
                                  global_avg, out, values.options());
    launch_dense(a, cuda::DenseValuesSrcD<scalar_t>{values.data_ptr<scalar_t>(), K, C, H * W}, values.options());
  });
  return out;
}

at::Tensor conv1ch_chain_cuda(const at::Tensor& delta, const at::Tensor& channel, const at::Tensor& weight,
                              int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h,
                              int64_t dil_w, const at::Tensor& base_out, int64_t bn_mode,
                              const at::Tensor& bn_weight, const at::Tensor& bn_bias, double eps,
                              const at::Tensor& residual, bool relu, int64_t pool_k, int64_t pool_s,
                              bool global_avg) {
  DZ_DEVICE_GUARD(delta);
  const int64_t B = delta.size(0), K = delta.size(1), H = delta.size(2), W = delta.size(3);
  const int64_t Cout = weight.size(0), Ho = base_out.size(2), Wo = base_out.size(3);
  const int64_t kh = weight.size(2), kw = weight.size(3);
  const cuda::ConvGeom g = conv_geom(H, W, kh, kw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, Wo);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(delta.scalar_type(), "conv1ch_chain_cuda", [&] {
    auto a = dense_args<scalar_t>(B, K, Cout, Ho, Wo, bn_mode, bn_weight, bn_bias, eps, residual, relu, pool_k,
                                  pool_s, global_avg, out, delta.options());
    with_taps(kh, kw, [&](auto taps) {
      cuda::ConvSrcD<decltype(taps)::value, scalar_t> src{delta.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                                                          base_out.data_ptr<scalar_t>(), channel.data_ptr<int64_t>(),
                                                          K, weight.size(1), Cout, Ho, g};
      launch_dense(a, src, delta.options());
    });
  });
  return out;
}

at::Tensor linear_weight_ce_cuda(const at::Tensor& x, const at::Tensor& logits, const at::Tensor& target,
                                 const at::Tensor& idx, double mu) {
  DZ_DEVICE_GUARD(x);
  const int64_t B = logits.size(0), N = logits.size(1), K = idx.numel();
  at::Tensor out = at::empty({K, B}, logits.options().dtype(at::kDouble));
  if (K * B == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "linear_weight_ce_cuda", [&] {
    auto kernel = cuda::weight_ce_kernel<scalar_t>;
    DZ_LAUNCH_FLAT(kernel, blocks_for(K * B, 128), 128, 0, x.data_ptr<scalar_t>(), logits.data_ptr<scalar_t>(),
                   target.data_ptr<int64_t>(), idx.data_ptr<int64_t>(), scalar_t(mu), K, B, N, x.size(1),
                   out.data_ptr<double>());
  });
  return out;
}

at::Tensor linear_rank1_ce_cuda(const at::Tensor& values, const at::Tensor& channel, const at::Tensor& weight,
                                const at::Tensor& logits, const at::Tensor& target) {
  DZ_DEVICE_GUARD(values);
  const int64_t B = logits.size(0), N = logits.size(1), K = values.size(1);
  at::Tensor out = at::empty({K, B}, logits.options().dtype(at::kDouble));
  if (K * B == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "linear_rank1_ce_cuda", [&] {
    auto kernel = cuda::rank1_ce_kernel<scalar_t>;
    DZ_LAUNCH_FLAT(kernel, blocks_for(K * B, 128), 128, 0, values.data_ptr<scalar_t>(), channel.data_ptr<int64_t>(),
                   weight.data_ptr<scalar_t>(), logits.data_ptr<scalar_t>(), target.data_ptr<int64_t>(), K, B, N,
                   weight.size(1), out.data_ptr<double>());
  });
  return out;
}

at::Tensor linear_dense_ce_cuda(const at::Tensor& values, const at::Tensor& base, const at::Tensor& weight,
                                const at::Tensor& logits, const at::Tensor& target) {
  DZ_DEVICE_GUARD(values);
  const int64_t B = logits.size(0), N = logits.size(1), K = values.size(1);
  at::Tensor out = at::empty({K, B}, logits.options().dtype(at::kDouble));
  if (K * B == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "linear_dense_ce_cuda", [&] {
    auto kernel = cuda::dense_ce_kernel<scalar_t>;
    DZ_LAUNCH_FLAT(kernel, blocks_for(K * B, 128), 128, 0, values.data_ptr<scalar_t>(), base.data_ptr<scalar_t>(),
                   weight.data_ptr<scalar_t>(), logits.data_ptr<scalar_t>(), target.data_ptr<int64_t>(), K, B, N,
                   values.size(2), out.data_ptr<double>());
  });
  return out;
}

}  // namespace dz
#endif  // DZ_WITH_CUDA || DZ_CUDA_EMULATE
