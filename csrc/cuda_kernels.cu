// CUDA kernels of the fused perturbation ops: one launch per kernel call, one block per (perturbation,
// channel) work item for the chains (shared-memory reductions of the statistics, in double), one
// thread per (perturbation, sample) for the cross-entropy kernels. The per-element math is dz_math.h,
// shared with the CPU launcher; semantics: deepzero_kernels/kernels/reference.py.
//
// Part 1 (device code) uses raw pointers only. Part 2 (the ATen launchers, compiled when DZ_WITH_CUDA
// is defined, as in the extension build) needs torch's c10/cuda headers. Arguments are checked in
// bindings.cpp; index ranges are not (that would need a device sync): a kernel that meets an index
// out of range writes NaN for that item instead of reading out of bounds.
//
// Part 1 also compiles as plain C++ under DZ_CUDA_EMULATE (csrc/tests/cuda_emulate.h: one thread per
// block, blocks run in a loop), which is how the C++ tests check its indexing without a GPU; hence
// warp geometry from blockDim and the DZ_DYNAMIC_SMEM macro.
#ifndef DZ_CUDA_EMULATE
#include <cuda_runtime.h>
#define DZ_DYNAMIC_SMEM(type, name) extern __shared__ type name[]
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

// ------------------------------------------------------------------------ one-channel chain
template <typename T>
struct ValuesSrcD {
  const T* v;
  int64_t K, HW;
  __device__ bool valid(int64_t) const { return true; }
  __device__ T operator()(int64_t b, int64_t k, int64_t r) const { return v[(b * K + k) * HW + r]; }
};

template <typename T>
struct GatherSrcD {
  const T* x;
  int64_t Cin, Hx, Wx, Wo, sh, sw;
  const int64_t *c, *oh, *ow;
  T mu;
  __device__ bool valid(int64_t k) const { return c[k] >= 0 && c[k] < Cin; }
  __device__ T operator()(int64_t b, int64_t k, int64_t r) const {
    const int64_t i = (r / Wo) * sh + oh[k], j = (r % Wo) * sw + ow[k];
    if (i < 0 || i >= Hx || j < 0 || j >= Wx) return T(0);
    return x[((b * Cin + c[k]) * Hx + i) * Wx + j] * mu;
  }
};

// The next conv of a one-channel delta, element r of plane (b, item), item = k * Cout + co.
template <typename T>
struct Conv1chSrcD {
  const T *delta, *weight;
  const int64_t* ch;
  int64_t K, Cout, Cin, H, W, kh, kw, sh, sw, ph, pw, dh, dw, Wo;
  __device__ bool valid(int64_t item) const { return ch[item / Cout] >= 0 && ch[item / Cout] < Cin; }
  __device__ T operator()(int64_t b, int64_t item, int64_t r) const {
    const int64_t k = item / Cout, co = item % Cout, i = r / Wo, j = r % Wo;
    const T* in = delta + (b * K + k) * H * W;
    const T* wt = weight + (co * Cin + ch[k]) * kh * kw;
    T s = T(0);
    for (int64_t u = 0; u < kh; ++u) {
      const int64_t y = i * sh + u * dh - ph;
      if (y < 0 || y >= H) continue;
      for (int64_t v = 0; v < kw; ++v) {
        const int64_t x = j * sw + v * dw - pw;
        if (x >= 0 && x < W) s += wt[u * kw + v] * in[y * W + x];
      }
    }
    return s;
  }
};

template <typename T, typename Src>
__global__ void __launch_bounds__(kThreads) onech_kernel(OneChArgs<T> a, Src src) {
  __shared__ double sh[3 * 32];
  const int64_t k = blockIdx.x, HW = a.H * a.W, n = a.B * HW, HWp = a.Hp * a.Wp;
  const int64_t c = a.ch[k];
  const bool pooled = a.relu_base && a.pk;
  if ((a.C && (c < 0 || c >= a.C)) || !src.valid(k)) {
    const int64_t plane = pooled ? HWp : HW;
    for (int64_t e = threadIdx.x; e < a.B * plane; e += blockDim.x)
      a.out[((e / plane) * a.K + k) * plane + e % plane] = nan_of<T>();
    return;
  }
  T c0 = T(0), c1 = T(0), c2 = T(0);
  if (a.bn_mode == BnMode::Batch) {
    double s[3] = {0.0, 0.0, 0.0};
    for (int64_t e = threadIdx.x; e < n; e += blockDim.x) {
      const int64_t b = e / HW, r = e % HW;
      const double d = double(src(b, k, r));
      s[0] += d;
      s[1] += d * d;
      s[2] += double(a.xhat[(b * a.C + c) * HW + r]) * d;
    }
    block_sum<3>(s, sh);
    const BnCoef cf = bn_delta_coef(s[0], s[1], s[2], double(n), double(a.inv_std[c]), double(a.bnw[c]));
    c0 = T(cf.c0), c1 = T(cf.c1), c2 = T(cf.c2);
  }
  const T w2 = a.bn_mode == BnMode::Running ? a.bnw[c] : T(1);
  auto bn = [&](int64_t b, int64_t r) -> T {
    const T d = src(b, k, r);
    if (a.bn_mode == BnMode::Batch) return (c0 + a.xhat[(b * a.C + c) * HW + r] * c1) + d * c2;
    return a.bn_mode == BnMode::Running ? d * w2 : d;
  };
  if (!a.relu_base) {
    for (int64_t e = threadIdx.x; e < n; e += blockDim.x) {
      const int64_t b = e / HW, r = e % HW;
      a.out[(b * a.K + k) * HW + r] = bn(b, r);
    }
  } else if (!a.pk) {
    for (int64_t e = threadIdx.x; e < n; e += blockDim.x) {
      const int64_t b = e / HW, r = e % HW;
      a.out[(b * a.K + k) * HW + r] = relu_delta(a.relu_base[(b * a.C + c) * HW + r], bn(b, r));
    }
  } else {  // the perturbed ReLU input's argmax per window, the exact change there (relu_pool_delta)
    for (int64_t e = threadIdx.x; e < a.B * HWp; e += blockDim.x) {
      const int64_t b = e / HWp, q = e % HWp, ip = q / a.Wp, jp = q % a.Wp;
      const int64_t r0 = ip * a.ps, r1 = imin(r0 + a.pk, a.H), q0 = jp * a.ps, q1 = imin(q0 + a.pk, a.W);
      const T* x0 = a.relu_base + (b * a.C + c) * HW;
      T best = -INFINITY, bx = T(0), bd = T(0);
      bool first = true;
      for (int64_t i = r0; i < r1; ++i)
        for (int64_t j = q0; j < q1; ++j) {
          const T d = bn(b, i * a.W + j), v = x0[i * a.W + j] + d;
          if (first || v > best || (v != v && best == best)) {
            best = v;
            bx = x0[i * a.W + j];
            bd = d;
            first = false;
          }
        }
      a.out[(b * a.K + k) * HWp + q] = relu_pool_delta(bx, bd, a.pool_base[(b * a.C + c) * HWp + q]);
    }
  }
}

// ----------------------------------------------------------------------------- dense chain
template <typename T>
struct DenseValuesSrcD {
  const T* v;
  int64_t K, C, HW;
  __device__ bool valid(int64_t) const { return true; }
  __device__ T operator()(int64_t b, int64_t k, int64_t c, int64_t r) const {
    return v[((b * K + k) * C + c) * HW + r];
  }
};

// base_out[b, co] + single-input-channel conv of delta[b, k] with weight[co, ch[k]] (zero padding).
template <typename T>
struct ConvSrcD {
  const T *delta, *weight, *base;
  const int64_t* ch;
  int64_t K, H, W, Cin, Cout, kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo;
  __device__ bool valid(int64_t k) const { return ch[k] >= 0 && ch[k] < Cin; }
  __device__ T operator()(int64_t b, int64_t k, int64_t co, int64_t r) const {
    const int64_t i = r / Wo, j = r % Wo;
    const T* in = delta + (b * K + k) * H * W;
    const T* wt = weight + (co * Cin + ch[k]) * kh * kw;
    T acc = T(0);
    for (int64_t u = 0; u < kh; ++u) {
      const int64_t y = i * sh - ph + u * dh;
      if (y < 0 || y >= H) continue;
      for (int64_t v = 0; v < kw; ++v) {
        const int64_t x = j * sw - pw + v * dw;
        if (x >= 0 && x < W) acc += wt[u * kw + v] * in[y * W + x];
      }
    }
    return base[(b * Cout + co) * Ho * Wo + r] + acc;  // base + dz, as the reference
  }
};

// One block per (k, c): statistics over (B, H, W) in two passes (double), then BatchNorm -> residual
// -> ReLU -> max pool -> global average. With `cache`, the item's pre-BatchNorm values are kept in
// dynamic shared memory between the passes instead of being recomputed.
template <typename T, typename Src>
__global__ void __launch_bounds__(kThreads) dense_kernel(DenseArgs<T> a, Src src, bool cache) {
  DZ_DYNAMIC_SMEM(double, smem_d);  // double: aligned for T
  T* vc = reinterpret_cast<T*>(smem_d);
  __shared__ double sh[32];
  const int64_t kc = blockIdx.x, k = kc / a.C, c = kc % a.C, HW = a.H * a.W, n = a.B * HW;
  const int64_t HWp = a.pk ? a.Hp * a.Wp : HW;
  if (!src.valid(k)) {
    const int64_t plane = a.gavg ? 1 : HWp;
    for (int64_t e = threadIdx.x; e < a.B * plane; e += blockDim.x)
      a.out[((e / plane) * a.K + k) * a.C * plane + c * plane + e % plane] = nan_of<T>();
    return;
  }
  const bool use_cache = cache && a.bn_mode == BnMode::Batch;
  auto val = [&](int64_t b, int64_t r) -> T { return use_cache ? vc[b * HW + r] : src(b, k, c, r); };
  T mean = T(0), rstd = T(0);
  if (a.bn_mode == BnMode::Batch) {
    double s[1] = {0.0};
    for (int64_t e = threadIdx.x; e < n; e += blockDim.x) {
      const T v = src(e / HW, k, c, e % HW);
      if (use_cache) vc[e] = v;
      s[0] += double(v);
    }
    block_sum<1>(s, sh);  // also orders the cache writes before the reads below
    const double m = s[0] / double(n);
    double q[1] = {0.0};
    for (int64_t e = threadIdx.x; e < n; e += blockDim.x) {
      const double dv = double(val(e / HW, e % HW)) - m;
      q[0] += dv * dv;
    }
    block_sum<1>(q, sh);
    mean = T(m), rstd = T(1.0 / sqrt(q[0] / double(n) + a.eps));
  }
  const bool bn = a.bn_mode != BnMode::None;
  const T w = bn ? a.bnw[c] : T(1), bb = bn ? a.bnb[c] : T(0);
  auto post = [&](int64_t b, int64_t r) -> T {  // BatchNorm -> residual -> ReLU, in the reference's order
    const T v = val(b, r);
    T y = a.bn_mode == BnMode::Batch     ? ((v - mean) * rstd) * w + bb
          : a.bn_mode == BnMode::Running ? v * w + bb
                                         : v;
    if (a.residual) y += a.residual[(b * a.C + c) * HW + r];
    if (a.relu) y = y > T(0) ? y : (y != y ? y : T(0));
    return y;
  };
  auto pooled = [&](int64_t b, int64_t q) -> T {  // output q of the (clipped, ceil-mode) max pool
    if (!a.pk) return post(b, q);
    const int64_t ip = q / a.Wp, jp = q % a.Wp;
    const int64_t r0 = ip * a.ps, r1 = imin(r0 + a.pk, a.H), q0 = jp * a.ps, q1 = imin(q0 + a.pk, a.W);
    T m = -INFINITY;
    for (int64_t i = r0; i < r1; ++i)
      for (int64_t j = q0; j < q1; ++j) m = nan_max(m, post(b, i * a.W + j));
    return m;
  };
  if (!a.gavg) {
    for (int64_t e = threadIdx.x; e < a.B * HWp; e += blockDim.x) {
      const int64_t b = e / HWp, q = e % HWp;
      a.out[((b * a.K + k) * a.C + c) * HWp + q] = pooled(b, q);
    }
    return;
  }
  // global average: one warp per sample, warp-shuffle sums (deterministic)
  const int ws = warp_width(), nw = int(blockDim.x) / ws, lane = threadIdx.x % ws, wid = threadIdx.x / ws;
  for (int64_t b = wid; b < a.B; b += nw) {
    double s = 0.0;
    for (int64_t q = lane; q < HWp; q += ws) s += double(pooled(b, q));
    s = warp_sum(s);
    if (lane == 0) a.out[(b * a.K + k) * a.C + c] = T(s / double(HWp));
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
namespace {

unsigned blocks_for(int64_t n, int threads) { return unsigned((n + threads - 1) / threads); }

// Shared memory for caching an item's B*H*W pre-BatchNorm values, when it fits without opt-in.
constexpr size_t kCacheLimit = 48 * 1024 - 32 * sizeof(double);

template <typename T, typename Src>
void launch_dense(const DenseArgs<T>& a, const Src& src) {
  if (a.K * a.C == 0) return;
  const size_t bytes = size_t(a.B * a.H * a.W) * sizeof(T);
  const bool cache = a.bn_mode == BnMode::Batch && bytes <= kCacheLimit;
  auto kernel = cuda::dense_kernel<T, Src>;
  DZ_LAUNCH_BLOCK(kernel, unsigned(a.K * a.C), cuda::kThreads, cache ? bytes : 0, a, src, cache);
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
    if (K == 0) return;
    cuda::ValuesSrcD<scalar_t> src{values.data_ptr<scalar_t>(), K, H * W};
    auto kernel = cuda::onech_kernel<scalar_t, decltype(src)>;
    DZ_LAUNCH_BLOCK(kernel, unsigned(K), cuda::kThreads, 0, a, src);
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
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(delta.scalar_type(), "conv1ch_delta_chain_cuda", [&] {
    auto a = onech_args<scalar_t>(B, K * Cout, Ho, Wo, items, bn_mode, bn_xhat, bn_inv_std, bn_weight, relu_base,
                                  pool_k, pool_s, pool_base, out, delta.options());
    if (K == 0) return;
    cuda::Conv1chSrcD<scalar_t> src{delta.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                                    channel.data_ptr<int64_t>(), K, Cout, Cin, H, W, kh, kw, stride_h, stride_w,
                                    pad_h, pad_w, dil_h, dil_w, Wo};
    auto kernel = cuda::onech_kernel<scalar_t, decltype(src)>;
    DZ_LAUNCH_BLOCK(kernel, unsigned(K * Cout), cuda::kThreads, 0, a, src);
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
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_delta_chain_cuda", [&] {
    auto a = onech_args<scalar_t>(B, K, h_out, w_out, out_channel, bn_mode, bn_xhat, bn_inv_std, bn_weight,
                                  relu_base, pool_k, pool_s, pool_base, out, x.options());
    if (K == 0) return;
    cuda::GatherSrcD<scalar_t> src{x.data_ptr<scalar_t>(), x.size(1), x.size(2), x.size(3), w_out, stride_h,
                                   stride_w, src_channel.data_ptr<int64_t>(), off_h.data_ptr<int64_t>(),
                                   off_w.data_ptr<int64_t>(), scalar_t(mu)};
    auto kernel = cuda::onech_kernel<scalar_t, decltype(src)>;
    DZ_LAUNCH_BLOCK(kernel, unsigned(K), cuda::kThreads, 0, a, src);
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
    launch_dense(a, cuda::DenseValuesSrcD<scalar_t>{values.data_ptr<scalar_t>(), K, C, H * W});
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
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(delta.scalar_type(), "conv1ch_chain_cuda", [&] {
    auto a = dense_args<scalar_t>(B, K, Cout, Ho, Wo, bn_mode, bn_weight, bn_bias, eps, residual, relu, pool_k,
                                  pool_s, global_avg, out, delta.options());
    cuda::ConvSrcD<scalar_t> src{delta.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                                 base_out.data_ptr<scalar_t>(), channel.data_ptr<int64_t>(), K, H, W, weight.size(1),
                                 Cout, weight.size(2), weight.size(3), stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                                 Ho, Wo};
    launch_dense(a, src);
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
