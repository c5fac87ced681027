// C++ tests of the native kernels (run by ctest): the CPU kernels (both instruction-set variants)
// against plain scalar loops in double on small random inputs, and the CUDA kernels, run on the CPU
// through cuda_emulate.h, against the CPU kernels. Exit status: the number of failed checks.
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "tests/cuda_emulate.h"
// after the emulation macros:
#include "cuda_kernels.cu"
#include "kernels.h"

namespace {

using dz::BnMode;

int failures = 0, checks = 0;

// |got - want| <= tol * max(|want|_max, floor), elementwise.
void expect_close(const std::string& what, const at::Tensor& got, const at::Tensor& want, double tol,
                  double floor = 1e-3) {
  ++checks;
  if (got.sizes() != want.sizes()) {
    std::printf("FAIL %s: shape %s != %s\n", what.c_str(), c10::str(got.sizes()).c_str(),
                c10::str(want.sizes()).c_str());
    ++failures;
    return;
  }
  const at::Tensor g = got.to(at::kDouble), w = want.to(at::kDouble);
  const double scale = std::max(w.numel() ? w.abs().max().item<double>() : 1.0, floor);
  const double err = g.numel() ? (g - w).abs().max().item<double>() : 0.0;
  if (!(err <= tol * scale)) {
    std::printf("FAIL %s: max abs err %.3e > %.1e * %.3e\n", what.c_str(), err, tol, scale);
    ++failures;
  }
}

at::Tensor D(const at::Tensor& t) { return t.to(at::kDouble).contiguous(); }

int64_t pool_len(int64_t n, int64_t k, int64_t s) { return dz::pool_out(n, k, s); }

// Clipped ceil-mode max pool of a (H, W) plane.
std::vector<double> pool_plane(const double* t, int64_t H, int64_t W, int64_t k, int64_t s) {
  const int64_t Hp = pool_len(H, k, s), Wp = pool_len(W, k, s);
  std::vector<double> o(Hp * Wp);
  for (int64_t i = 0; i < Hp; ++i)
    for (int64_t j = 0; j < Wp; ++j) {
      double m = -INFINITY;
      for (int64_t r = i * s; r < std::min(i * s + k, H); ++r)
        for (int64_t c = j * s; c < std::min(j * s + k, W); ++c) m = std::max(m, t[r * W + c]);
      o[i * Wp + j] = m;
    }
  return o;
}

// ---------------------------------------------------------------- naive one-channel chain
// The definition: the BatchNorm output with the changed channel's own statistics minus the base one
// (statistics recomputed from scratch), then ReLU and pool of perturbed minus base.
at::Tensor naive_onech(const at::Tensor& values_, const at::Tensor& channel, BnMode mode, const at::Tensor& xhat_,
                       const at::Tensor& inv_, const at::Tensor& bnw_, const at::Tensor& relu_base_, int64_t pk,
                       int64_t ps, const at::Tensor& pool_base_) {
  const at::Tensor values = D(values_);
  const int64_t B = values.size(0), K = values.size(1), H = values.size(2), W = values.size(3), HW = H * W;
  const bool batch = mode == BnMode::Batch, bn = mode != BnMode::None;
  const at::Tensor xhat = batch ? D(xhat_) : xhat_, inv = batch ? D(inv_) : inv_;
  const at::Tensor bnw = bn ? D(bnw_) : bnw_, x0t = relu_base_.numel() ? D(relu_base_) : relu_base_;
  const at::Tensor pbt = pk ? D(pool_base_) : pool_base_;
  const int64_t C = x0t.numel() ? x0t.size(1) : bn ? bnw.size(0) : 0;
  const int64_t Hp = pk ? pool_len(H, pk, ps) : H, Wp = pk ? pool_len(W, pk, ps) : W;
  at::Tensor out = at::zeros({B, K, Hp, Wp}, at::kDouble);
  const double* v = values.data_ptr<double>();
  double* o = out.data_ptr<double>();
  for (int64_t k = 0; k < K; ++k) {
    const int64_t c = channel[k].item<int64_t>();
    std::vector<double> d(B * HW);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t r = 0; r < HW; ++r) d[b * HW + r] = v[(b * K + k) * HW + r];
    if (batch) {
      const double* xh = xhat.data_ptr<double>();
      const double iv = inv.data_ptr<double>()[c], w = bnw.data_ptr<double>()[c];
      double var0 = 0, mean = 0, var = 0;
      for (int64_t b = 0; b < B; ++b)
        for (int64_t r = 0; r < HW; ++r) {
          const double x = xh[(b * C + c) * HW + r];
          var0 += x * x;
          mean += x + d[b * HW + r];
        }
      var0 /= double(B * HW), mean /= double(B * HW);
      for (int64_t b = 0; b < B; ++b)
        for (int64_t r = 0; r < HW; ++r) var += std::pow(xh[(b * C + c) * HW + r] + d[b * HW + r] - mean, 2);
      var /= double(B * HW);
      const double sd = std::sqrt(var - var0 + 1.0 / (iv * iv));
      for (int64_t b = 0; b < B; ++b)
        for (int64_t r = 0; r < HW; ++r) {
          const double x = xh[(b * C + c) * HW + r];
          d[b * HW + r] = w * ((x + d[b * HW + r] - mean) / sd - x * iv);
        }
    } else if (mode == BnMode::Running) {
      for (double& e : d) e *= bnw.data_ptr<double>()[c];
    }
    for (int64_t b = 0; b < B; ++b) {
      double* ob = o + (b * K + k) * Hp * Wp;
      const double* db = d.data() + b * HW;
      if (!x0t.numel()) {
        std::copy(db, db + HW, ob);
        continue;
      }
      const double* x0 = x0t.data_ptr<double>() + (b * C + c) * HW;
      std::vector<double> t(HW);
      for (int64_t r = 0; r < HW; ++r) t[r] = std::max(x0[r] + db[r], 0.0);
      if (!pk) {
        for (int64_t r = 0; r < HW; ++r) ob[r] = t[r] - std::max(x0[r], 0.0);
        continue;
      }
      const std::vector<double> p = pool_plane(t.data(), H, W, pk, ps);
      const double* pb = pbt.data_ptr<double>() + (b * C + c) * Hp * Wp;
      for (int64_t q = 0; q < Hp * Wp; ++q) ob[q] = p[q] - pb[q];
    }
  }
  return out;
}

// ---------------------------------------------------------------------- naive dense chain
at::Tensor naive_dense(const at::Tensor& values_, BnMode mode, const at::Tensor& bnw_, const at::Tensor& bnb_,
                       double eps, const at::Tensor& residual_, bool relu, int64_t pk, int64_t ps, bool gavg) {
  const at::Tensor v = D(values_);
  const int64_t B = v.size(0), K = v.size(1), C = v.size(2), H = v.size(3), W = v.size(4), HW = H * W;
  const int64_t Hp = pk ? pool_len(H, pk, ps) : H, Wp = pk ? pool_len(W, pk, ps) : W;
  at::Tensor out = gavg ? at::zeros({B, K, C}, at::kDouble) : at::zeros({B, K, C, Hp, Wp}, at::kDouble);
  const double* vp = v.data_ptr<double>();
  for (int64_t k = 0; k < K; ++k)
    for (int64_t c = 0; c < C; ++c) {
      auto at_ = [&](int64_t b, int64_t r) { return vp[((b * K + k) * C + c) * HW + r]; };
      double mean = 0, var = 0;
      for (int64_t b = 0; b < B; ++b)
        for (int64_t r = 0; r < HW; ++r) mean += at_(b, r);
      mean /= double(B * HW);
      for (int64_t b = 0; b < B; ++b)
        for (int64_t r = 0; r < HW; ++r) var += std::pow(at_(b, r) - mean, 2);
      var /= double(B * HW);
      for (int64_t b = 0; b < B; ++b) {
        std::vector<double> t(HW);
        for (int64_t r = 0; r < HW; ++r) {
          double y = at_(b, r);
          if (mode == BnMode::Batch)
            y = (y - mean) / std::sqrt(var + eps) * D(bnw_)[c].item<double>() + D(bnb_)[c].item<double>();
          if (mode == BnMode::Running) y = y * D(bnw_)[c].item<double>() + D(bnb_)[c].item<double>();
          if (residual_.numel()) y += D(residual_).data_ptr<double>()[(b * C + c) * HW + r];
          t[r] = relu ? std::max(y, 0.0) : y;
        }
        if (pk) t = pool_plane(t.data(), H, W, pk, ps);
        if (gavg) {
          double s = 0;
          for (double e : t) s += e;
          out.data_ptr<double>()[(b * K + k) * C + c] = s / double(t.size());
        } else {
          std::copy(t.begin(), t.end(), out.data_ptr<double>() + ((b * K + k) * C + c) * Hp * Wp);
        }
      }
    }
  return out;
}

// v[b, k] = base_out + conv of the one-channel input delta[b, k] at channel[k], plain loops.
at::Tensor naive_conv1ch_values(const at::Tensor& delta_, const at::Tensor& channel, const at::Tensor& weight_,
                                int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw,
                                const at::Tensor& base_) {
  const at::Tensor delta = D(delta_), weight = D(weight_), base = D(base_);
  const int64_t B = delta.size(0), K = delta.size(1), H = delta.size(2), W = delta.size(3);
  const int64_t Co = weight.size(0), Ci = weight.size(1), kh = weight.size(2), kw = weight.size(3);
  const int64_t Ho = base.size(2), Wo = base.size(3);
  at::Tensor v = at::zeros({B, K, Co, Ho, Wo}, at::kDouble);
  auto dp = delta.accessor<double, 4>();
  auto wp = weight.accessor<double, 4>();
  auto bp = base.accessor<double, 4>();
  auto vp = v.accessor<double, 5>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t k = 0; k < K; ++k) {
      const int64_t ch = channel[k].item<int64_t>();
      (void)Ci;
      for (int64_t o = 0; o < Co; ++o)
        for (int64_t i = 0; i < Ho; ++i)
          for (int64_t j = 0; j < Wo; ++j) {
            double s = 0;
            for (int64_t u = 0; u < kh; ++u)
              for (int64_t q = 0; q < kw; ++q) {
                const int64_t y = i * sh - ph + u * dh, x = j * sw - pw + q * dw;
                if (y >= 0 && y < H && x >= 0 && x < W) s += wp[o][ch][u][q] * dp[b][k][y][x];
              }
            vp[b][k][o][i][j] = bp[b][o][i][j] + s;
          }
    }
  return v;
}

// logsumexp(logits + delta) - logsumexp(logits) - delta_y per (k, b); delta (K, B, N) double.
at::Tensor naive_ce(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& delta) {
  const at::Tensor l = D(logits).unsqueeze(0);
  const at::Tensor d_y = delta.gather(2, target.view({1, -1, 1}).expand({delta.size(0), -1, 1})).squeeze(2);
  return at::logsumexp(l + delta, 2) - at::logsumexp(l, 2) - d_y;
}

// ------------------------------------------------------------------------------- cases
const char* dname(at::ScalarType t) { return t == at::kFloat ? "f32" : "f64"; }
double tol_exact(at::ScalarType t) { return t == at::kFloat ? 2e-4 : 1e-9; }   // vs the double definition
double tol_same(at::ScalarType t) { return t == at::kFloat ? 2e-5 : 1e-12; }   // emulated CUDA vs CPU

// Runs f(tag) with the emulated CUDA chains at their default slicing and with every item cut into
// slices of 7 and of 1 elements, so that the multi-block statistics and their merge are exercised.
template <typename F>
void for_each_slicing(F f) {
  const int64_t dflt = dz::chain_slice_elems;
  for (int64_t s : {dflt, int64_t(7), int64_t(1)}) {
    dz::chain_slice_elems = s;
    f(" slice" + std::to_string(s));
  }
  dz::chain_slice_elems = dflt;
}

struct ConvCase {
  int64_t B, Ci, H, W, Co, kh, kw, st, pad, dil;
  BnMode mode;
  bool relu;
  int64_t pk, ps, K;
};

void test_conv_delta_chain(const ConvCase& cs, at::ScalarType dt) {
  const std::string name = "conv_delta_chain[B" + std::to_string(cs.B) + " H" + std::to_string(cs.H) + " W" +
                           std::to_string(cs.W) + " k" + std::to_string(cs.kh) + "x" + std::to_string(cs.kw) +
                           " s" + std::to_string(cs.st) + " p" + std::to_string(cs.pad) + " d" +
                           std::to_string(cs.dil) + " bn" + std::to_string(int(cs.mode)) + " pool" +
                           std::to_string(cs.pk) + " K" + std::to_string(cs.K) + " " + dname(dt) + "]";
  auto opt = at::TensorOptions().dtype(dt);
  const int64_t Ho = dz::conv_out_size(cs.H, cs.kh, cs.st, cs.pad, cs.dil);
  const int64_t Wo = dz::conv_out_size(cs.W, cs.kw, cs.st, cs.pad, cs.dil);
  const at::Tensor x = at::randn({cs.B, cs.Ci, cs.H, cs.W}, opt);
  const at::Tensor src = at::randint(cs.Ci, {cs.K}, at::kLong), outc = at::randint(cs.Co, {cs.K}, at::kLong);
  const at::Tensor oh = at::randint(cs.kh, {cs.K}, at::kLong) * cs.dil - cs.pad;
  const at::Tensor ow = at::randint(cs.kw, {cs.K}, at::kLong) * cs.dil - cs.pad;
  const at::Tensor z = at::randn({cs.B, cs.Co, Ho, Wo}, at::kDouble);
  const at::Tensor xhat = (z - z.mean({0, 2, 3}, true)).to(dt).contiguous();
  const at::Tensor inv = at::rsqrt(xhat.to(at::kDouble).pow(2).mean({0, 2, 3}) + 1e-5).to(dt);
  const at::Tensor bnw = (at::rand({cs.Co}, at::kDouble) + 0.5).to(dt);
  const at::Tensor e = at::empty({0}, opt);
  const at::Tensor x0 = cs.relu ? at::randn({cs.B, cs.Co, Ho, Wo}, opt) : e;
  at::Tensor pb = e;
  if (cs.pk) {
    const at::Tensor r = D(x0).clamp_min(0);
    pb = at::empty({cs.B, cs.Co, pool_len(Ho, cs.pk, cs.ps), pool_len(Wo, cs.pk, cs.ps)}, at::kDouble);
    for (int64_t p = 0; p < cs.B * cs.Co; ++p) {
      auto q = pool_plane(r.data_ptr<double>() + p * Ho * Wo, Ho, Wo, cs.pk, cs.ps);
      std::copy(q.begin(), q.end(), pb.data_ptr<double>() + p * q.size());
    }
    pb = pb.to(dt);
  }
  const double mu = 3e-2;
  const bool batch = cs.mode == BnMode::Batch, bn = cs.mode != BnMode::None;
  const at::Tensor bx = batch ? xhat : e, bi = batch ? inv : e, bw = bn ? bnw : e;
  const int64_t mode = int64_t(cs.mode);  // the operators' int
  // the definition: the gathered delta (plain loops), then the chain
  at::Tensor vals = at::zeros({cs.B, cs.K, Ho, Wo}, at::kDouble);
  const at::Tensor xd = D(x);
  for (int64_t b = 0; b < cs.B; ++b)
    for (int64_t k = 0; k < cs.K; ++k)
      for (int64_t i = 0; i < Ho; ++i)
        for (int64_t j = 0; j < Wo; ++j) {
          const int64_t r = i * cs.st + oh[k].item<int64_t>(), c = j * cs.st + ow[k].item<int64_t>();
          if (r >= 0 && r < cs.H && c >= 0 && c < cs.W)
            vals[b][k][i][j] = double(at::Scalar(x[b][src[k]][r][c].item()).to<double>() *
                                      (dt == at::kFloat ? double(float(mu)) : mu));
        }
  const at::Tensor want = naive_onech(vals, outc, cs.mode, bx, bi, bw, x0, cs.pk, cs.ps, pb);
  for (const char* isa : {"baseline", "avx2"}) {
    dz::set_cpu_isa(isa);
    const at::Tensor got = dz::conv_delta_chain_cpu(x, src, oh, ow, outc, mu, cs.st, cs.st, Ho, Wo, mode, bx, bi,
                                                    bw, x0, cs.pk, cs.ps, pb);
    expect_close(name + " cpu-" + dz::cpu_isa() + " vs definition", got, want, tol_exact(dt), mu);
  }
  dz::set_cpu_isa("auto");
  const at::Tensor cpu = dz::conv_delta_chain_cpu(x, src, oh, ow, outc, mu, cs.st, cs.st, Ho, Wo, mode, bx, bi, bw,
                                                  x0, cs.pk, cs.ps, pb);
  for_each_slicing([&](const std::string& tag) {
    const at::Tensor gpu = dz::conv_delta_chain_cuda(x, src, oh, ow, outc, mu, cs.st, cs.st, Ho, Wo, mode, bx, bi,
                                                     bw, x0, cs.pk, cs.ps, pb);
    expect_close(name + " cuda(emulated" + tag + ") vs cpu", gpu, cpu, tol_same(dt), mu);
  });
  // channel_chain on the same chain: the values are given instead of gathered
  if (bn || cs.relu) {
    const at::Tensor v = at::randn({cs.B, cs.K, Ho, Wo}, opt) * 0.05;
    const at::Tensor w2 = naive_onech(v, outc, cs.mode, bx, bi, bw, x0, cs.pk, cs.ps, pb);
    const at::Tensor c2 = dz::channel_chain_cpu(v, outc, mode, bx, bi, bw, x0, cs.pk, cs.ps, pb);
    expect_close(name + " channel_chain cpu vs definition", c2, w2, tol_exact(dt), 0.05);
    for_each_slicing([&](const std::string& tag) {
      expect_close(name + " channel_chain cuda(emulated" + tag + ") vs cpu",
                   dz::channel_chain_cuda(v, outc, mode, bx, bi, bw, x0, cs.pk, cs.ps, pb), c2, tol_same(dt), 0.05);
    });
  }
}

struct DenseCase {
  int64_t B, K, Ci, H, W, Co, kh, kw, st, pad, dil;
  BnMode mode;
  bool res, relu;
  int64_t pk, ps;
  bool gavg;
};

void test_dense(const DenseCase& cs, at::ScalarType dt) {
  const std::string name = "conv1ch/bn_act_dense[B" + std::to_string(cs.B) + " K" + std::to_string(cs.K) + " H" +
                           std::to_string(cs.H) + " W" + std::to_string(cs.W) + " k" + std::to_string(cs.kh) + "x" +
                           std::to_string(cs.kw) + " s" + std::to_string(cs.st) + " p" + std::to_string(cs.pad) +
                           " d" + std::to_string(cs.dil) + " bn" + std::to_string(int(cs.mode)) + " pool" +
                           std::to_string(cs.pk) + (cs.gavg ? " gavg " : " ") + dname(dt) + "]";
  auto opt = at::TensorOptions().dtype(dt);
  const int64_t Ho = dz::conv_out_size(cs.H, cs.kh, cs.st, cs.pad, cs.dil);
  const int64_t Wo = dz::conv_out_size(cs.W, cs.kw, cs.st, cs.pad, cs.dil);
  const at::Tensor e = at::empty({0}, opt);
  const at::Tensor weight = at::randn({cs.Co, cs.Ci, cs.kh, cs.kw}, opt);
  const at::Tensor base = at::randn({cs.B, cs.Co, Ho, Wo}, opt), delta = at::randn({cs.B, cs.K, cs.H, cs.W}, opt);
  const at::Tensor channel = at::randint(cs.Ci, {cs.K}, at::kLong);
  const bool bn = cs.mode != BnMode::None;
  const at::Tensor bnw = bn ? at::rand({cs.Co}, opt) + 0.5 : e, bnb = bn ? at::randn({cs.Co}, opt) : e;
  const int64_t mode = int64_t(cs.mode);  // the operators' int
  const at::Tensor res = cs.res ? at::randn({cs.B, cs.Co, Ho, Wo}, opt) : e;
  const double eps = 1e-5;
  const at::Tensor v = naive_conv1ch_values(delta, channel, weight, cs.st, cs.st, cs.pad, cs.pad, cs.dil, cs.dil, base);
  const at::Tensor want = naive_dense(v, cs.mode, bnw, bnb, eps, res, cs.relu, cs.pk, cs.ps, cs.gavg);
  const at::Tensor vt = v.to(dt).contiguous();
  const at::Tensor want_d = naive_dense(vt, cs.mode, bnw, bnb, eps, res, cs.relu, cs.pk, cs.ps, cs.gavg);
  for (const char* isa : {"baseline", "avx2"}) {
    dz::set_cpu_isa(isa);
    const at::Tensor got = dz::conv1ch_chain_cpu(delta, channel, weight, cs.st, cs.st, cs.pad, cs.pad, cs.dil, cs.dil,
                                                 base, mode, bnw, bnb, eps, res, cs.relu, cs.pk, cs.ps, cs.gavg);
    expect_close(name + " conv1ch cpu-" + dz::cpu_isa() + " vs definition", got, want, tol_exact(dt));
    const at::Tensor gd = dz::bn_act_dense_cpu(vt, mode, bnw, bnb, eps, res, cs.relu, cs.pk, cs.ps, cs.gavg);
    expect_close(name + " bn_act_dense cpu-" + dz::cpu_isa() + " vs definition", gd, want_d, tol_exact(dt));
  }
  dz::set_cpu_isa("auto");
  const at::Tensor cpu = dz::conv1ch_chain_cpu(delta, channel, weight, cs.st, cs.st, cs.pad, cs.pad, cs.dil, cs.dil,
                                               base, mode, bnw, bnb, eps, res, cs.relu, cs.pk, cs.ps, cs.gavg);
  const at::Tensor cpu_d = dz::bn_act_dense_cpu(vt, mode, bnw, bnb, eps, res, cs.relu, cs.pk, cs.ps, cs.gavg);
  for_each_slicing([&](const std::string& tag) {
    const at::Tensor gpu = dz::conv1ch_chain_cuda(delta, channel, weight, cs.st, cs.st, cs.pad, cs.pad, cs.dil,
                                                  cs.dil, base, mode, bnw, bnb, eps, res, cs.relu, cs.pk, cs.ps,
                                                  cs.gavg);
    expect_close(name + " conv1ch cuda(emulated" + tag + ") vs cpu", gpu, cpu, tol_same(dt));
    expect_close(name + " bn_act_dense cuda(emulated" + tag + ") vs cpu",
                 dz::bn_act_dense_cuda(vt, mode, bnw, bnb, eps, res, cs.relu, cs.pk, cs.ps, cs.gavg), cpu_d,
                 tol_same(dt));
  });
}

// conv1ch_delta_chain: the next conv of a one-channel delta (no base), then the one-channel chain of
// each (perturbation, output channel) item, optionally averaged over the plane.
void test_conv1ch_delta(const DenseCase& cs, at::ScalarType dt) {
  const std::string name = "conv1ch_delta_chain[B" + std::to_string(cs.B) + " K" + std::to_string(cs.K) + " H" +
                           std::to_string(cs.H) + " W" + std::to_string(cs.W) + " k" + std::to_string(cs.kh) + "x" +
                           std::to_string(cs.kw) + " s" + std::to_string(cs.st) + " bn" + std::to_string(int(cs.mode)) +
                           " pool" + std::to_string(cs.pk) + (cs.gavg ? " gavg " : " ") + dname(dt) + "]";
  auto opt = at::TensorOptions().dtype(dt);
  const int64_t Ho = dz::conv_out_size(cs.H, cs.kh, cs.st, cs.pad, cs.dil);
  const int64_t Wo = dz::conv_out_size(cs.W, cs.kw, cs.st, cs.pad, cs.dil);
  const at::Tensor e = at::empty({0}, opt);
  const at::Tensor weight = at::randn({cs.Co, cs.Ci, cs.kh, cs.kw}, opt);
  const at::Tensor delta = at::randn({cs.B, cs.K, cs.H, cs.W}, opt) * 0.05;
  const at::Tensor channel = at::randint(cs.Ci, {cs.K}, at::kLong);
  const at::Tensor z = at::randn({cs.B, cs.Co, Ho, Wo}, at::kDouble);
  const at::Tensor xhat = (z - z.mean({0, 2, 3}, true)).to(dt).contiguous();
  const at::Tensor inv = at::rsqrt(xhat.to(at::kDouble).pow(2).mean({0, 2, 3}) + 1e-5).to(dt);
  const at::Tensor bnw = (at::rand({cs.Co}, at::kDouble) + 0.5).to(dt);
  const bool batch = cs.mode == BnMode::Batch, bn = cs.mode != BnMode::None;
  const at::Tensor bx = batch ? xhat : e, bi = batch ? inv : e, bw = bn ? bnw : e;
  const at::Tensor x0 = cs.relu ? at::randn({cs.B, cs.Co, Ho, Wo}, opt) : e;
  const int64_t pk = cs.relu ? cs.pk : 0;
  at::Tensor pb = e;
  if (pk) {
    const at::Tensor r = D(x0).clamp_min(0);
    pb = at::empty({cs.B, cs.Co, pool_len(Ho, pk, cs.ps), pool_len(Wo, pk, cs.ps)}, at::kDouble);
    for (int64_t p = 0; p < cs.B * cs.Co; ++p) {
      auto q = pool_plane(r.data_ptr<double>() + p * Ho * Wo, Ho, Wo, pk, cs.ps);
      std::copy(q.begin(), q.end(), pb.data_ptr<double>() + p * q.size());
    }
    pb = pb.to(dt);
  }
  const int64_t mode = int64_t(cs.mode);
  const at::Tensor v = naive_conv1ch_values(delta, channel, weight, cs.st, cs.st, cs.pad, cs.pad, cs.dil, cs.dil,
                                            at::zeros({cs.B, cs.Co, Ho, Wo}, at::kDouble));
  const at::Tensor items = at::arange(cs.Co, at::kLong).repeat({cs.K});
  at::Tensor want = naive_onech(v.view({cs.B, cs.K * cs.Co, Ho, Wo}), items, cs.mode, bx, bi, bw, x0, pk, cs.ps, pb);
  want = want.view({cs.B, cs.K, cs.Co, want.size(2), want.size(3)});
  if (cs.gavg) want = want.mean({3, 4}, true);
  auto cpu_call = [&] {
    return dz::conv1ch_delta_chain_cpu(delta, channel, weight, cs.st, cs.st, cs.pad, cs.pad, cs.dil, cs.dil, mode,
                                       bx, bi, bw, x0, pk, cs.ps, pb, cs.gavg);
  };
  for (const char* isa : {"baseline", "avx2"}) {
    dz::set_cpu_isa(isa);
    expect_close(name + " cpu-" + dz::cpu_isa() + " vs definition", cpu_call(), want, tol_exact(dt), 0.05);
  }
  dz::set_cpu_isa("auto");
  const at::Tensor cpu = cpu_call();
  for_each_slicing([&](const std::string& tag) {
    const at::Tensor gpu = dz::conv1ch_delta_chain_cuda(delta, channel, weight, cs.st, cs.st, cs.pad, cs.pad, cs.dil,
                                                        cs.dil, mode, bx, bi, bw, x0, pk, cs.ps, pb, cs.gavg);
    expect_close(name + " cuda(emulated" + tag + ") vs cpu", gpu, cpu, tol_same(dt), 0.05);
  });
}

void test_ce(int64_t B, int64_t Nin, int64_t N, int64_t K, at::ScalarType dt, bool extreme) {
  const std::string name = "cross-entropy[B" + std::to_string(B) + " Nin" + std::to_string(Nin) + " N" +
                           std::to_string(N) + " K" + std::to_string(K) + (extreme ? " extreme " : " ") + dname(dt) +
                           "]";
  auto opt = at::TensorOptions().dtype(dt);
  at::Tensor logits = at::randn({B, N}, opt) * 3, x = at::randn({B, Nin}, opt);
  if (extreme) {  // p rounds to 1 and the change is hugely negative: the logsumexp fallback
    logits.select(1, 0).fill_(60.0);
    x.select(1, 0).fill_(-1000.0);
  }
  const at::Tensor target = at::randint(N, {B}, at::kLong), idx = at::randint(N * Nin, {K}, at::kLong);
  if (extreme) idx[0] = 0;
  const double mu = 0.7;
  const double mut = dt == at::kFloat ? double(float(mu)) : mu;
  // linear_weight_ce: logit idx // Nin changes by mu * x[:, idx % Nin]
  at::Tensor dw = at::zeros({K, B, N}, at::kDouble);
  for (int64_t k = 0; k < K; ++k) {
    const int64_t i = idx[k].item<int64_t>() / Nin, j = idx[k].item<int64_t>() % Nin;
    dw.select(0, k).select(1, i).copy_((x.select(1, j) * mut).to(dt).to(at::kDouble));
  }
  const at::Tensor ww = naive_ce(logits, target, dw);
  const at::Tensor values = at::randn({B, K}, opt) * 0.5, channel = at::randint(Nin, {K}, at::kLong);
  const at::Tensor weight = at::randn({N, Nin}, opt);
  const at::Tensor dr = (values.t().unsqueeze(2) * weight.t().index_select(0, channel).unsqueeze(1)).to(at::kDouble);
  const at::Tensor wr = naive_ce(logits, target, dr);
  const at::Tensor dense = at::randn({B, K, Nin}, opt);
  const at::Tensor dd = at::matmul(D(dense) - D(x).unsqueeze(1), D(weight).t()).transpose(0, 1).contiguous();
  const at::Tensor wd = naive_ce(logits, target, dd);
  const double tol = tol_exact(dt);
  for (const char* isa : {"baseline", "avx2"}) {
    dz::set_cpu_isa(isa);
    const std::string n = name + " cpu-" + dz::cpu_isa();
    expect_close(n + " linear_weight_ce", dz::linear_weight_ce_cpu(x, logits, target, idx, mu), ww, tol);
    expect_close(n + " linear_rank1_ce", dz::linear_rank1_ce_cpu(values, channel, weight, logits, target), wr, tol);
    expect_close(n + " linear_dense_ce", dz::linear_dense_ce_cpu(dense, x, weight, logits, target), wd, tol);
  }
  dz::set_cpu_isa("auto");
  const std::string n = name + " cuda(emulated) vs cpu";
  expect_close(n + " linear_weight_ce", dz::linear_weight_ce_cuda(x, logits, target, idx, mu),
               dz::linear_weight_ce_cpu(x, logits, target, idx, mu), 1e-12);
  expect_close(n + " linear_rank1_ce", dz::linear_rank1_ce_cuda(values, channel, weight, logits, target),
               dz::linear_rank1_ce_cpu(values, channel, weight, logits, target), 1e-12);
  // the CPU kernel takes the logit changes from ATen's GEMM (accumulating in the data type), the CUDA
  // kernel accumulates in double: float32 agrees to float32 rounding only
  expect_close(n + " linear_dense_ce", dz::linear_dense_ce_cuda(dense, x, weight, logits, target),
               dz::linear_dense_ce_cpu(dense, x, weight, logits, target), tol_same(dt));
}

}  // namespace

int main() {
  at::manual_seed(0);
  constexpr BnMode kNo = BnMode::None, kBa = BnMode::Batch, kRu = BnMode::Running;
  const ConvCase conv_cases[] = {
      {4, 3, 8, 8, 5, 3, 3, 1, 1, 1, kBa, true, 2, 2, 7},     {3, 2, 7, 5, 4, 3, 3, 2, 1, 1, kBa, true, 2, 2, 5},
      {2, 3, 9, 9, 3, 3, 3, 1, 2, 2, kRu, true, 3, 2, 6},     {5, 4, 6, 6, 6, 1, 1, 1, 0, 1, kBa, false, 0, 0, 4},
      {1, 2, 5, 5, 3, 3, 3, 1, 0, 1, kNo, true, 0, 0, 3},     {3, 3, 1, 1, 2, 1, 1, 1, 0, 1, kBa, true, 0, 0, 2},
      {2, 3, 5, 7, 3, 2, 3, 2, 2, 2, kBa, true, 3, 3, 1},     {2, 2, 11, 11, 3, 3, 3, 2, 2, 1, kBa, true, 2, 1, 13},
      {2, 2, 4, 4, 3, 3, 3, 1, 1, 1, kNo, false, 0, 0, 3},
  };
  const DenseCase dense_cases[] = {
      {4, 3, 3, 8, 8, 5, 3, 3, 1, 1, 1, kBa, true, true, 0, 0, true},
      {3, 4, 4, 8, 8, 3, 3, 3, 1, 1, 1, kBa, false, true, 2, 2, true},
      {2, 5, 3, 7, 5, 4, 3, 3, 2, 1, 1, kRu, false, true, 2, 2, false},
      {3, 2, 2, 6, 6, 3, 3, 3, 1, 2, 2, kBa, true, false, 0, 0, false},
      {1, 1, 2, 4, 4, 2, 1, 1, 1, 0, 1, kBa, false, true, 3, 2, false},
      {2, 3, 3, 5, 9, 7, 2, 3, 1, 0, 1, kNo, true, true, 3, 3, true},
      {2, 6, 5, 1, 1, 3, 1, 1, 1, 0, 1, kBa, false, true, 0, 0, false},
      {3, 2, 2, 9, 7, 4, 3, 3, 2, 2, 2, kBa, true, true, 2, 1, false},
      {2, 3, 2, 6, 6, 2, 5, 5, 1, 2, 1, kBa, false, true, 0, 0, true},  // 5x5 taps
  };
  for (at::ScalarType dt : {at::kFloat, at::kDouble}) {
    for (const auto& cs : conv_cases) test_conv_delta_chain(cs, dt);
    for (const auto& cs : dense_cases) {
      test_dense(cs, dt);
      test_conv1ch_delta(cs, dt);
    }
    test_ce(6, 5, 4, 9, dt, false);
    test_ce(17, 33, 10, 40, dt, false);
    test_ce(3, 4, 3, 5, dt, true);
  }
  std::printf("%d of %d checks failed\n", failures, checks);
  return failures ? 1 : 0;
}
