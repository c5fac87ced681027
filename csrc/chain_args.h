// Host side of the chain kernels, shared by the CPU and CUDA launchers: the argument structs of
// dz_math.h filled from (already checked) tensors, with the output allocated. Absent optional
// tensors arrive empty and become null pointers; the operators' int bn_mode becomes a BnMode here.
#pragma once

#include <ATen/ATen.h>

#include "dz_math.h"

namespace dz {

// The operators take the BatchNorm mode as an int (the value of deepzero_kernels.kernels.BnMode).
inline BnMode bn_mode_of(int64_t v) {
  TORCH_CHECK(v >= 0 && v <= 2, "bn_mode must be 0 (none), 1 (batch statistics) or 2 (running statistics), got ",
              v);
  return static_cast<BnMode>(v);
}

template <typename T>
const T* ptr(const at::Tensor& t) {
  return t.numel() ? t.data_ptr<T>() : nullptr;
}

template <typename T>
OneChArgs<T> onech_args(int64_t B, int64_t K, int64_t H, int64_t W, const at::Tensor& channel, int64_t bn_mode,
                        const at::Tensor& bn_xhat, const at::Tensor& bn_inv_std, const at::Tensor& bn_weight,
                        const at::Tensor& relu_base, int64_t pool_k, int64_t pool_s, const at::Tensor& pool_base,
                        at::Tensor& out, const at::TensorOptions& opt) {
  OneChArgs<T> a;
  a.B = B, a.K = K, a.H = H, a.W = W;
  a.bn_mode = bn_mode_of(bn_mode);
  a.C = relu_base.numel() ? relu_base.size(1) : a.bn_mode != BnMode::None ? bn_weight.size(0) : 0;
  a.ch = channel.data_ptr<int64_t>();
  a.xhat = ptr<T>(bn_xhat), a.inv_std = ptr<T>(bn_inv_std), a.bnw = ptr<T>(bn_weight);
  a.relu_base = ptr<T>(relu_base);
  a.pk = pool_k, a.ps = pool_s;
  a.pool_base = ptr<T>(pool_base);
  a.Hp = pool_k ? pool_base.size(2) : H;
  a.Wp = pool_k ? pool_base.size(3) : W;
  out = at::empty({B, K, a.Hp, a.Wp}, opt);
  a.out = out.numel() ? out.data_ptr<T>() : nullptr;
  return a;
}

template <typename T>
DenseArgs<T> dense_args(int64_t B, int64_t K, int64_t C, int64_t H, int64_t W, int64_t bn_mode,
                        const at::Tensor& bn_weight, const at::Tensor& bn_bias, double eps, const at::Tensor& residual,
                        bool relu, int64_t pool_k, int64_t pool_s, bool global_avg, at::Tensor& out,
                        const at::TensorOptions& opt) {
  DenseArgs<T> a;
  a.B = B, a.K = K, a.C = C, a.H = H, a.W = W;
  a.bn_mode = bn_mode_of(bn_mode);
  a.bnw = ptr<T>(bn_weight), a.bnb = ptr<T>(bn_bias);
  a.eps = eps;
  a.residual = ptr<T>(residual);
  a.relu = relu, a.gavg = global_avg;
  a.pk = pool_k, a.ps = pool_s;
  a.Hp = pool_k ? pool_out(H, pool_k, pool_s) : H;
  a.Wp = pool_k ? pool_out(W, pool_k, pool_s) : W;
  out = global_avg ? at::empty({B, K, C}, opt) : at::empty({B, K, C, a.Hp, a.Wp}, opt);
  a.out = out.numel() ? out.data_ptr<T>() : nullptr;
  return a;
}

}  // namespace dz
