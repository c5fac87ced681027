// Entry points of the native backend, one per kernel of deepzero_kernels/kernels/reference.py, with
// the same positional arguments (absent optional tensors are empty tensors). bindings.cpp checks the
// arguments (check_* below) and dispatches on the device to the _cpu or _cuda function.
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace dz {

#define DZ_KERNEL_SIGNATURES(SUFFIX)                                                                         \
  at::Tensor channel_chain_##SUFFIX(const at::Tensor& values, const at::Tensor& channel, int64_t bn_mode,    \
                                    const at::Tensor& bn_xhat, const at::Tensor& bn_inv_std,                 \
                                    const at::Tensor& bn_weight, const at::Tensor& relu_base, int64_t pool_k, \
                                    int64_t pool_s, const at::Tensor& pool_base);                             \
  at::Tensor conv_delta_chain_##SUFFIX(                                                                      \
      const at::Tensor& x, const at::Tensor& src_channel, const at::Tensor& off_h, const at::Tensor& off_w,  \
      const at::Tensor& out_channel, double mu, int64_t stride_h, int64_t stride_w, int64_t h_out,           \
      int64_t w_out, int64_t bn_mode, const at::Tensor& bn_xhat, const at::Tensor& bn_inv_std,               \
      const at::Tensor& bn_weight, const at::Tensor& relu_base, int64_t pool_k, int64_t pool_s,              \
      const at::Tensor& pool_base);                                                                          \
  at::Tensor bn_act_dense_##SUFFIX(const at::Tensor& values, int64_t bn_mode, const at::Tensor& bn_weight,   \
                                   const at::Tensor& bn_bias, double eps, const at::Tensor& residual,        \
                                   bool relu, int64_t pool_k, int64_t pool_s, bool global_avg);              \
  at::Tensor conv1ch_chain_##SUFFIX(                                                                         \
      const at::Tensor& delta, const at::Tensor& channel, const at::Tensor& weight, int64_t stride_h,        \
      int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w,                          \
      const at::Tensor& base_out, int64_t bn_mode, const at::Tensor& bn_weight, const at::Tensor& bn_bias,   \
      double eps, const at::Tensor& residual, bool relu, int64_t pool_k, int64_t pool_s, bool global_avg);   \
  at::Tensor conv1ch_delta_chain_##SUFFIX(                                                                   \
      const at::Tensor& delta, const at::Tensor& channel, const at::Tensor& weight, int64_t stride_h,        \
      int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w, int64_t bn_mode,         \
      const at::Tensor& bn_xhat, const at::Tensor& bn_inv_std, const at::Tensor& bn_weight,                  \
      const at::Tensor& relu_base, int64_t pool_k, int64_t pool_s, const at::Tensor& pool_base,              \
      bool global_avg);                                                                                      \
  at::Tensor linear_weight_ce_##SUFFIX(const at::Tensor& x, const at::Tensor& logits,                        \
                                       const at::Tensor& target, const at::Tensor& idx, double mu);          \
  at::Tensor linear_rank1_ce_##SUFFIX(const at::Tensor& values, const at::Tensor& channel,                   \
                                      const at::Tensor& weight, const at::Tensor& logits,                    \
                                      const at::Tensor& target);                                             \
  at::Tensor linear_dense_ce_##SUFFIX(const at::Tensor& values, const at::Tensor& base,                      \
                                      const at::Tensor& weight, const at::Tensor& logits,                    \
                                      const at::Tensor& target);

DZ_KERNEL_SIGNATURES(cpu)

// The CPU kernels' instruction set ("avx2" or "baseline", chosen per call from the CPU, DZ_CPU_ISA and
// set_cpu_isa("auto" | "baseline" | "avx2"), the latter for tests).
std::string cpu_isa();
void set_cpu_isa(const std::string& isa);
#if defined(DZ_WITH_CUDA) || defined(DZ_CUDA_EMULATE)  // emulated: csrc/tests/cuda_emulate.h
DZ_KERNEL_SIGNATURES(cuda)
#endif

}  // namespace dz
