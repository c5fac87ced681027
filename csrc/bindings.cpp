// Registration of the native backend. The seven kernels are PyTorch operators deepzero::<name>
// (TORCH_LIBRARY), with a CPU implementation and, under DZ_WITH_CUDA, a CUDA one, so the dispatcher
// picks the device and torch.compile can trace them (their fake implementations, the output shapes,
// are registered from Python: deepzero_kernels/kernels/native.py). The pybind11 module
// deepzero_kernels._native, whose import loads this library, keeps the helpers (has_cuda, cpu_isa).
//
// Every operator checks its arguments with TORCH_CHECK (a Python RuntimeError, never a crash) even
// though the Python wrappers in deepzero_kernels/kernels/validate.py check first: the operators may be
// called directly. Index ranges are checked on CPU; on CUDA that would need a device sync, so the CUDA
// kernels guard their indices instead (an out-of-range index gives NaN output, never an out-of-bounds
// access).
#include <torch/extension.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "chain_args.h"
#include "dz_math.h"
#include "kernels.h"

namespace dz {
namespace {

// dtype, device, contiguity and shape of a tensor that belongs with `ref` (-1 in `shape`: any size).
void check(const at::Tensor& t, const char* name, const at::Tensor& ref, std::vector<int64_t> shape,
           bool optional = false, at::ScalarType dtype = at::ScalarType::Undefined) {
  if (optional && t.numel() == 0) return;
  const auto want = dtype == at::ScalarType::Undefined ? ref.scalar_type() : dtype;
  TORCH_CHECK(t.scalar_type() == want, name, " must have dtype ", want, ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), ", expected ", ref.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.dim() == int64_t(shape.size()), name, " must have ", shape.size(), " dims, got ", t.dim());
  for (size_t i = 0; i < shape.size(); ++i)
    TORCH_CHECK(shape[i] < 0 || t.size(i) == shape[i], name, " has size ", t.size(i), " in dim ", i, ", expected ",
                shape[i]);
}

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
              " must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// int64 index tensor of n entries in [0, hi) (the range is checked on CPU only, see above).
void check_index(const at::Tensor& t, const char* name, const at::Tensor& ref, int64_t n, int64_t hi) {
  check(t, name, ref, {n}, false, at::kLong);
  if (n && t.is_cpu()) {
    const int64_t* p = t.data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i)
      TORCH_CHECK(p[i] >= 0 && p[i] < hi, name, " out of range: ", p[i], " not in [0, ", hi, ")");
  }
}

void check_pool(int64_t pool_k, int64_t pool_s) {
  TORCH_CHECK((pool_k == 0 && pool_s == 0) || (pool_s >= 1 && pool_s <= pool_k),
              "pool_k and pool_s must both be 0 or satisfy 1 <= pool_s <= pool_k, got ", pool_k, ", ", pool_s);
}

// The one-channel chain's arguments; returns the channel count C (0 when nothing needs it).
int64_t check_onech(const at::Tensor& ref, int64_t B, int64_t H, int64_t W, int64_t bn_mode, const at::Tensor& bn_xhat,
                    const at::Tensor& bn_inv_std, const at::Tensor& bn_weight, const at::Tensor& relu_base,
                    int64_t pool_k, int64_t pool_s, const at::Tensor& pool_base) {
  const BnMode mode = bn_mode_of(bn_mode);
  TORCH_CHECK(B >= 1 && H >= 1 && W >= 1, "empty batch or plane: B, H, W = ", B, ", ", H, ", ", W);
  const bool bn = mode != BnMode::None;
  const int64_t C = relu_base.numel() ? relu_base.size(1) : bn ? (bn_weight.dim() ? bn_weight.size(0) : 0) : 0;
  TORCH_CHECK(C >= 1 || (!bn && !relu_base.numel()), "bn_weight / relu_base must not be empty");
  check(relu_base, "relu_base", ref, {B, C, H, W}, true);
  if (bn) check(bn_weight, "bn_weight", ref, {C});
  if (mode == BnMode::Batch) {
    check(bn_xhat, "bn_xhat", ref, {B, C, H, W});
    check(bn_inv_std, "bn_inv_std", ref, {C});
  }
  check_pool(pool_k, pool_s);
  if (pool_k) {
    TORCH_CHECK(relu_base.numel(), "a max pool in the chain needs a ReLU before it (relu_base)");
    check(pool_base, "pool_base", ref, {B, C, pool_out(H, pool_k, pool_s), pool_out(W, pool_k, pool_s)});
  }
  return C;
}

void check_dense(const at::Tensor& ref, int64_t B, int64_t C, int64_t H, int64_t W, int64_t bn_mode,
                 const at::Tensor& bn_weight, const at::Tensor& bn_bias, double eps, const at::Tensor& residual,
                 int64_t pool_k, int64_t pool_s) {
  const BnMode mode = bn_mode_of(bn_mode);
  TORCH_CHECK(B >= 1 && H >= 1 && W >= 1, "empty batch or plane: B, H, W = ", B, ", ", H, ", ", W);
  if (mode != BnMode::None) {
    check(bn_weight, "bn_weight", ref, {C});
    check(bn_bias, "bn_bias", ref, {C});
  }
  if (mode == BnMode::Batch) TORCH_CHECK(std::isfinite(eps) && eps > 0, "eps must be finite and > 0, got ", eps);
  check(residual, "residual", ref, {B, C, H, W}, true);
  check_pool(pool_k, pool_s);
}

// ------------------------------------------------------------------------ argument checks per operator
void check_channel_chain(const at::Tensor& values, const at::Tensor& channel, int64_t bn_mode,
                         const at::Tensor& bn_xhat, const at::Tensor& bn_inv_std, const at::Tensor& bn_weight,
                         const at::Tensor& relu_base, int64_t pool_k, int64_t pool_s, const at::Tensor& pool_base) {
  check_float(values, "values");
  check(values, "values", values, {-1, -1, -1, -1});
  const int64_t B = values.size(0), K = values.size(1), H = values.size(2), W = values.size(3);
  const int64_t C = check_onech(values, B, H, W, bn_mode, bn_xhat, bn_inv_std, bn_weight, relu_base, pool_k, pool_s,
                                pool_base);
  TORCH_CHECK(C > 0, "nothing to do: give a BatchNorm (bn_mode 1/2) or a ReLU (relu_base)");
  check_index(channel, "channel", values, K, C);
}

void check_conv_delta_chain(const at::Tensor& x, const at::Tensor& src_channel, const at::Tensor& off_h,
                            const at::Tensor& off_w, const at::Tensor& out_channel, double mu, int64_t stride_h,
                            int64_t stride_w, int64_t h_out, int64_t w_out, int64_t bn_mode, const at::Tensor& bn_xhat,
                            const at::Tensor& bn_inv_std, const at::Tensor& bn_weight, const at::Tensor& relu_base,
                            int64_t pool_k, int64_t pool_s, const at::Tensor& pool_base) {
  check_float(x, "x");
  check(x, "x", x, {-1, -1, -1, -1});
  TORCH_CHECK(std::isfinite(mu), "mu must be finite, got ", mu);
  TORCH_CHECK(stride_h >= 1 && stride_w >= 1, "strides must be >= 1");
  TORCH_CHECK(x.size(2) >= 1 && x.size(3) >= 1, "x has an empty plane");
  const int64_t K = src_channel.numel();
  const int64_t C = check_onech(x, x.size(0), h_out, w_out, bn_mode, bn_xhat, bn_inv_std, bn_weight, relu_base,
                                pool_k, pool_s, pool_base);
  check_index(src_channel, "src_channel", x, K, x.size(1));
  check_index(out_channel, "out_channel", x, K, C ? C : INT64_MAX);  // C = 0: the channel is not read
  check(off_h, "off_h", x, {K}, false, at::kLong);
  check(off_w, "off_w", x, {K}, false, at::kLong);
}

void check_bn_act_dense(const at::Tensor& values, int64_t bn_mode, const at::Tensor& bn_weight,
                        const at::Tensor& bn_bias, double eps, const at::Tensor& residual, bool relu, int64_t pool_k,
                        int64_t pool_s, bool global_avg) {
  check_float(values, "values");
  check(values, "values", values, {-1, -1, -1, -1, -1});
  check_dense(values, values.size(0), values.size(2), values.size(3), values.size(4), bn_mode, bn_weight, bn_bias, eps,
              residual, pool_k, pool_s);
}

// The next conv of one-channel deltas delta (B, K, H, W) of input channels `channel` (conv1ch_chain,
// conv1ch_delta_chain): its checks and output shape.
struct Conv1chShape {
  int64_t B, Cout, Ho, Wo;
};

Conv1chShape check_conv1ch(const at::Tensor& delta, const at::Tensor& channel, const at::Tensor& weight,
                           int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h,
                           int64_t dil_w) {
  check_float(delta, "delta");
  check(delta, "delta", delta, {-1, -1, -1, -1});
  check(weight, "weight", delta, {-1, -1, -1, -1});
  TORCH_CHECK(stride_h >= 1 && stride_w >= 1 && dil_h >= 1 && dil_w >= 1 && pad_h >= 0 && pad_w >= 0,
              "stride and dilation must be >= 1 and padding >= 0");
  const int64_t B = delta.size(0), K = delta.size(1), H = delta.size(2), W = delta.size(3);
  const int64_t Cout = weight.size(0), kh = weight.size(2), kw = weight.size(3);
  TORCH_CHECK(kh >= 1 && kw >= 1 && weight.size(1) >= 1 && Cout >= 1, "weight must not be empty");
  const int64_t Ho = conv_out_size(H, kh, stride_h, pad_h, dil_h), Wo = conv_out_size(W, kw, stride_w, pad_w, dil_w);
  TORCH_CHECK(Ho >= 1 && Wo >= 1, "the convolution has an empty output");
  check_index(channel, "channel", delta, K, weight.size(1));
  return {B, Cout, Ho, Wo};
}

void check_conv1ch_chain(const at::Tensor& delta, const at::Tensor& channel, const at::Tensor& weight,
                         int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w,
                         const at::Tensor& base_out, int64_t bn_mode, const at::Tensor& bn_weight,
                         const at::Tensor& bn_bias, double eps, const at::Tensor& residual, bool relu, int64_t pool_k,
                         int64_t pool_s, bool global_avg) {
  const Conv1chShape g = check_conv1ch(delta, channel, weight, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w);
  const int64_t B = g.B, Cout = g.Cout, Ho = g.Ho, Wo = g.Wo;
  check(base_out, "base_out", delta, {B, Cout, Ho, Wo});
  check_dense(delta, B, Cout, Ho, Wo, bn_mode, bn_weight, bn_bias, eps, residual, pool_k, pool_s);
}

void check_conv1ch_delta_chain(const at::Tensor& delta, const at::Tensor& channel, const at::Tensor& weight,
                               int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h,
                               int64_t dil_w, int64_t bn_mode, const at::Tensor& bn_xhat, const at::Tensor& bn_inv_std,
                               const at::Tensor& bn_weight, const at::Tensor& relu_base, int64_t pool_k, int64_t pool_s,
                               const at::Tensor& pool_base, bool global_avg) {
  (void)global_avg;
  const Conv1chShape g = check_conv1ch(delta, channel, weight, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w);
  const int64_t B = g.B, Cout = g.Cout, Ho = g.Ho, Wo = g.Wo;
  const int64_t C = check_onech(delta, B, Ho, Wo, bn_mode, bn_xhat, bn_inv_std, bn_weight, relu_base, pool_k, pool_s,
                                pool_base);
  TORCH_CHECK(C == Cout, "the chain after the conv has ", C, " channels, the conv has ", Cout, " outputs");
}

void check_ce(const at::Tensor& ref, const at::Tensor& logits, const at::Tensor& target) {
  check(logits, "logits", ref, {-1, -1});
  TORCH_CHECK(logits.size(0) >= 1 && logits.size(1) >= 1, "logits must not be empty");
  check_index(target, "target", ref, logits.size(0), logits.size(1));
}

void check_linear_weight_ce(const at::Tensor& x, const at::Tensor& logits, const at::Tensor& target,
                            const at::Tensor& idx, double mu) {
  check_float(x, "x");
  check_ce(x, logits, target);
  check(x, "x", x, {logits.size(0), -1});
  TORCH_CHECK(std::isfinite(mu), "mu must be finite, got ", mu);
  check_index(idx, "idx", x, idx.numel(), logits.size(1) * x.size(1));
}

void check_linear_rank1_ce(const at::Tensor& values, const at::Tensor& channel, const at::Tensor& weight,
                           const at::Tensor& logits, const at::Tensor& target) {
  check_float(values, "values");
  check_ce(values, logits, target);
  check(values, "values", values, {logits.size(0), -1});
  check(weight, "weight", values, {logits.size(1), -1});
  check_index(channel, "channel", values, values.size(1), weight.size(1));
}

void check_linear_dense_ce(const at::Tensor& values, const at::Tensor& base, const at::Tensor& weight,
                           const at::Tensor& logits, const at::Tensor& target) {
  check_float(values, "values");
  check_ce(values, logits, target);
  check(values, "values", values, {logits.size(0), -1, -1});
  check(base, "base", values, {logits.size(0), values.size(2)});
  check(weight, "weight", values, {logits.size(1), values.size(2)});
}

// The implementation of an operator on one device: its checks, then that device's kernel.
template <auto Check, auto Kernel>
struct Checked;
template <typename... A, void (*Check)(A...), at::Tensor (*Kernel)(A...)>
struct Checked<Check, Kernel> {
  static at::Tensor run(A... a) {
    Check(a...);
    return Kernel(a...);
  }
};

bool has_cuda() {
#ifdef DZ_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace
}  // namespace dz

// The schemas: the arguments of deepzero_kernels/kernels/reference.py, in its order (absent optional
// tensors are empty tensors; bn_mode is the int value of kernels.BnMode).
TORCH_LIBRARY(deepzero, m) {
  m.def("channel_chain(Tensor values, Tensor channel, int bn_mode, Tensor bn_xhat, Tensor bn_inv_std, "
        "Tensor bn_weight, Tensor relu_base, int pool_k, int pool_s, Tensor pool_base) -> Tensor");
  m.def("conv_delta_chain(Tensor x, Tensor src_channel, Tensor off_h, Tensor off_w, Tensor out_channel, float mu, "
        "int stride_h, int stride_w, int h_out, int w_out, int bn_mode, Tensor bn_xhat, Tensor bn_inv_std, "
        "Tensor bn_weight, Tensor relu_base, int pool_k, int pool_s, Tensor pool_base) -> Tensor");
  m.def("bn_act_dense(Tensor values, int bn_mode, Tensor bn_weight, Tensor bn_bias, float eps, Tensor residual, "
        "bool relu, int pool_k, int pool_s, bool global_avg) -> Tensor");
  m.def("conv1ch_chain(Tensor delta, Tensor channel, Tensor weight, int stride_h, int stride_w, int pad_h, "
        "int pad_w, int dil_h, int dil_w, Tensor base_out, int bn_mode, Tensor bn_weight, Tensor bn_bias, float eps, "
        "Tensor residual, bool relu, int pool_k, int pool_s, bool global_avg) -> Tensor");
  m.def("conv1ch_delta_chain(Tensor delta, Tensor channel, Tensor weight, int stride_h, int stride_w, int pad_h, "
        "int pad_w, int dil_h, int dil_w, int bn_mode, Tensor bn_xhat, Tensor bn_inv_std, Tensor bn_weight, "
        "Tensor relu_base, int pool_k, int pool_s, Tensor pool_base, bool global_avg) -> Tensor");
  m.def("linear_weight_ce(Tensor x, Tensor logits, Tensor target, Tensor idx, float mu) -> Tensor");
  m.def("linear_rank1_ce(Tensor values, Tensor channel, Tensor weight, Tensor logits, Tensor target) -> Tensor");
  m.def("linear_dense_ce(Tensor values, Tensor base, Tensor weight, Tensor logits, Tensor target) -> Tensor");
}

#define DZ_IMPL(m, name, dev) m.impl(#name, &dz::Checked<&dz::check_##name, &dz::name##_##dev>::run)
#define DZ_IMPL_ALL(m, dev)               \
  DZ_IMPL(m, channel_chain, dev);         \
  DZ_IMPL(m, conv_delta_chain, dev);      \
  DZ_IMPL(m, bn_act_dense, dev);          \
  DZ_IMPL(m, conv1ch_chain, dev);         \
  DZ_IMPL(m, conv1ch_delta_chain, dev);   \
  DZ_IMPL(m, linear_weight_ce, dev);      \
  DZ_IMPL(m, linear_rank1_ce, dev);       \
  DZ_IMPL(m, linear_dense_ce, dev)

TORCH_LIBRARY_IMPL(deepzero, CPU, m) { DZ_IMPL_ALL(m, cpu); }

#ifdef DZ_WITH_CUDA
TORCH_LIBRARY_IMPL(deepzero, CUDA, m) { DZ_IMPL_ALL(m, cuda); }
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "deepzero_kernels native backend (C++/OpenMP and CUDA): importing it registers the operators "
            "torch.ops.deepzero.*; semantics: deepzero_kernels.kernels.reference";
  m.def("has_cuda", &dz::has_cuda, "whether the extension was built with CUDA kernels");
  m.def("cpu_isa", &dz::cpu_isa, "instruction set of the CPU kernels: 'avx2' or 'baseline'");
  m.def("set_cpu_isa", &dz::set_cpu_isa, "force the CPU kernels' instruction set: 'auto', 'baseline' or 'avx2'");
}
