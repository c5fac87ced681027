// CPU launcher of the fused perturbation kernels (bodies in cpu_kernels_impl.h). The kernels are
// compiled twice, for the baseline x86-64 ISA and for AVX2+FMA, and each call picks the variant this
// CPU runs (DZ_CPU_ISA=baseline forces the baseline). Arguments are checked in bindings.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "chain_args.h"
#include "dz_math.h"
#include "kernels.h"

// Every header is included above, so the target pragma below applies to the kernel bodies only.
#define DZ_CPU_NS baseline
#include "cpu_kernels_impl.h"
#undef DZ_CPU_NS

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)  // GCC's target pragma
#define DZ_HAVE_AVX2_VARIANT 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define DZ_CPU_NS avx2
#include "cpu_kernels_impl.h"
#undef DZ_CPU_NS
#pragma GCC pop_options
#endif

namespace dz {

namespace {
int isa_override = -1;  // -1: auto; 0: baseline; 1: avx2 (set_cpu_isa, for tests)

bool use_avx2() {
#ifdef DZ_HAVE_AVX2_VARIANT
  static const bool cpu = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  static const bool forced_base = [] {
    const char* e = std::getenv("DZ_CPU_ISA");
    return e && std::strcmp(e, "baseline") == 0;
  }();
  if (isa_override >= 0) return isa_override == 1 && cpu;
  return cpu && !forced_base;
#else
  return false;
#endif
}
}  // namespace

std::string cpu_isa() { return use_avx2() ? "avx2" : "baseline"; }

void set_cpu_isa(const std::string& isa) {
  TORCH_CHECK(isa == "auto" || isa == "baseline" || isa == "avx2", "isa must be auto, baseline or avx2, got ", isa);
  isa_override = isa == "auto" ? -1 : isa == "avx2" ? 1 : 0;
}

#ifdef DZ_HAVE_AVX2_VARIANT
#define DZ_CPU_CALL(fn, ...) (use_avx2() ? avx2::fn(__VA_ARGS__) : baseline::fn(__VA_ARGS__))
#else
#define DZ_CPU_CALL(fn, ...) baseline::fn(__VA_ARGS__)
#endif

at::Tensor conv1ch_delta_chain_cpu(const at::Tensor& delta, const at::Tensor& channel, const at::Tensor& weight,
                                   int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h,
                                   int64_t dil_w, int64_t bn_mode, const at::Tensor& bn_xhat,
                                   const at::Tensor& bn_inv_std, const at::Tensor& bn_weight,
                                   const at::Tensor& relu_base, int64_t pool_k, int64_t pool_s,
                                   const at::Tensor& pool_base, bool global_avg) {
  return DZ_CPU_CALL(conv1ch_delta_chain, delta, channel, weight, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                     bn_mode, bn_xhat, bn_inv_std, bn_weight, relu_base, pool_k, pool_s, pool_base, global_avg);
}

at::Tensor channel_chain_cpu(const at::Tensor& values, const at::Tensor& channel, int64_t bn_mode,
                             const at::Tensor& bn_xhat, const at::Tensor& bn_inv_std, const at::Tensor& bn_weight,
                             const at::Tensor& relu_base, int64_t pool_k, int64_t pool_s,
                             const at::Tensor& pool_base) {
  return DZ_CPU_CALL(channel_chain, values, channel, bn_mode, bn_xhat, bn_inv_std, bn_weight, relu_base, pool_k,
                     pool_s, pool_base);
}

at::Tensor conv_delta_chain_cpu(const at::Tensor& x, const at::Tensor& src_channel, const at::Tensor& off_h,
                                const at::Tensor& off_w, const at::Tensor& out_channel, double mu, int64_t stride_h,
                                int64_t stride_w, int64_t h_out, int64_t w_out, int64_t bn_mode,
                                const at::Tensor& bn_xhat, const at::Tensor& bn_inv_std, const at::Tensor& bn_weight,
                                const at::Tensor& relu_base, int64_t pool_k, int64_t pool_s,
                                const at::Tensor& pool_base) {
  return DZ_CPU_CALL(conv_delta_chain, x, src_channel, off_h, off_w, out_channel, mu, stride_h, stride_w, h_out,
                     w_out, bn_mode, bn_xhat, bn_inv_std, bn_weight, relu_base, pool_k, pool_s, pool_base);
}

at::Tensor bn_act_dense_cpu(const at::Tensor& values, int64_t bn_mode, const at::Tensor& bn_weight,
                            const at::Tensor& bn_bias, double eps, const at::Tensor& residual, bool relu,
                            int64_t pool_k, int64_t pool_s, bool global_avg) {
  return DZ_CPU_CALL(bn_act_dense, values, bn_mode, bn_weight, bn_bias, eps, residual, relu, pool_k, pool_s,
                     global_avg);
}

at::Tensor conv1ch_chain_cpu(const at::Tensor& delta, const at::Tensor& channel, const at::Tensor& weight,
                             int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h,
                             int64_t dil_w, const at::Tensor& base_out, int64_t bn_mode, const at::Tensor& bn_weight,
                             const at::Tensor& bn_bias, double eps, const at::Tensor& residual, bool relu,
                             int64_t pool_k, int64_t pool_s, bool global_avg) {
  return DZ_CPU_CALL(conv1ch_chain, delta, channel, weight, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, base_out,
                     bn_mode, bn_weight, bn_bias, eps, residual, relu, pool_k, pool_s, global_avg);
}

at::Tensor linear_weight_ce_cpu(const at::Tensor& x, const at::Tensor& logits, const at::Tensor& target,
                                const at::Tensor& idx, double mu) {
  return DZ_CPU_CALL(linear_weight_ce, x, logits, target, idx, mu);
}

at::Tensor linear_rank1_ce_cpu(const at::Tensor& values, const at::Tensor& channel, const at::Tensor& weight,
                               const at::Tensor& logits, const at::Tensor& target) {
  return DZ_CPU_CALL(linear_rank1_ce, values, channel, weight, logits, target);
}

at::Tensor linear_dense_ce_cpu(const at::Tensor& values, const at::Tensor& base, const at::Tensor& weight,
                               const at::Tensor& logits, const at::Tensor& target) {
  return DZ_CPU_CALL(linear_dense_ce, values, base, weight, logits, target);
}

}  // namespace dz
