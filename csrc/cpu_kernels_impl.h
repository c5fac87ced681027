// Body of the CPU kernels, included twice by cpu_kernels.cpp: once for the baseline ISA and once
// under `#pragma GCC target("avx2,fma")`, each time in its own namespace DZ_CPU_NS (internal linkage),
// so one build runs everywhere and uses 256-bit vectors where the CPU has them. No include guard.
//
// OpenMP over (perturbation, channel) or (perturbation, sample) work items; each item runs its whole
// chain (gather / single-channel conv -> BatchNorm statistics -> BatchNorm apply -> residual -> ReLU
// -> max pool -> global average) on cache-resident planes held in small per-thread buffers, with no
// intermediate tensors. Statistics are accumulated in double in a fixed order (per sample, then over
// samples in order), so the result does not depend on the number of threads.

namespace dz {
namespace {
namespace DZ_CPU_NS {

int num_threads() { return std::max(1, at::get_num_threads()); }

// sum of f(e), e < n, in double over 8 independent lanes: vectorises without reassociation flags and
// is deterministic.
template <typename F>
double dsum(int64_t n, F f) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t e = 0;
  for (; e + 8 <= n; e += 8)
    for (int l = 0; l < 8; ++l) acc[l] += f(e + l);
  double s = 0;
  for (int l = 0; l < 8; ++l) s += acc[l];
  for (; e < n; ++e) s += f(e);
  return s;
}

// ---------------------------------------------------------------------------------- pooling
// Max of clipped ceil-mode windows of the (H, W) plane t into o (Hp, Wp); rm is a W-long scratch row.
// NaN propagates as in torch's max_pool2d.
template <typename T>
void max_pool_plane(const T* __restrict t, int64_t H, int64_t W, int64_t pk, int64_t ps, int64_t Hp,
                    int64_t Wp, T* __restrict rm, T* __restrict o) {
  for (int64_t ip = 0; ip < Hp; ++ip) {
    const int64_t r0 = ip * ps, r1 = imin(r0 + pk, H);
    // column-wise max over the window's rows: contiguous, vectorises over W
    for (int64_t j = 0; j < W; ++j) rm[j] = t[r0 * W + j];
    for (int64_t r = r0 + 1; r < r1; ++r) {
      const T* row = t + r * W;
      for (int64_t j = 0; j < W; ++j) rm[j] = (row[j] > rm[j] || row[j] != row[j]) ? row[j] : rm[j];
    }
    T* orow = o + ip * Wp;
    if (pk == 2 && ps == 2) {  // the common 2x2/2 pool: pairs, the last one maybe clipped
      for (int64_t jp = 0; jp < W / 2; ++jp) {
        T a = rm[2 * jp], b = rm[2 * jp + 1];
        orow[jp] = (b > a || b != b) ? b : a;
      }
      if (W & 1) orow[Wp - 1] = rm[W - 1];
    } else {
      for (int64_t jp = 0; jp < Wp; ++jp) {
        const int64_t c0 = jp * ps, c1 = imin(c0 + pk, W);
        T m = rm[c0];
        for (int64_t c = c0 + 1; c < c1; ++c) m = (rm[c] > m || rm[c] != rm[c]) ? rm[c] : m;
        orow[jp] = m;
      }
    }
  }
}

// ------------------------------------------------------------------------ one-channel chain
// The channel-local chain after a one-channel delta: (B, K, H, W) in, (B, K, H', W') out.
// Source of the chain's input: the delta plane (b, k), read from a tensor ...
template <typename T>
struct ValuesSrc {
  const T* v;
  int64_t K, HW;
  const T* plane(int64_t b, int64_t k, T*) const { return v + (b * K + k) * HW; }
};

// planes[b] = the delta plane (b, k) for every sample, computed planes written to buf (B * HW); a
// source that computes all samples' planes better at once has fill_all.
template <typename T, typename Src>
void fill_planes(const Src& src, int64_t B, int64_t HW, int64_t k, T* buf, const T** planes) {
  if constexpr (requires { src.fill_all(k, buf, planes); })
    src.fill_all(k, buf, planes);
  else
    for (int64_t b = 0; b < B; ++b) planes[b] = src.plane(b, k, buf + b * HW);
}

// ... or gathered from the conv input: mu * x[b, c[k], i*sh + oh[k], j*sw + ow[k]], zero outside.
template <typename T>
struct GatherSrc {
  const T* x;
  int64_t Cin, Hx, Wx, Ho, Wo, sh, sw;
  const int64_t *c, *oh, *ow;
  T mu;
  const T* plane(int64_t b, int64_t k, T* __restrict buf) const {
    const T* __restrict xp = x + (b * Cin + c[k]) * Hx * Wx;
    const int64_t offh = oh[k], offw = ow[k];
    int64_t jlo, jhi;
    valid_range(Wx, Wo, sw, offw, &jlo, &jhi);
    for (int64_t i = 0; i < Ho; ++i) {
      T* o = buf + i * Wo;
      const int64_t r = i * sh + offh;
      if (r < 0 || r >= Hx) {
        for (int64_t j = 0; j < Wo; ++j) o[j] = T(0);
        continue;
      }
      const T* row = xp + r * Wx;
      for (int64_t j = 0; j < jlo; ++j) o[j] = T(0);
      if (sw == 1) {
        for (int64_t j = jlo; j < jhi; ++j) o[j] = row[j + offw] * mu;
      } else {
        for (int64_t j = jlo; j < jhi; ++j) o[j] = row[j * sw + offw] * mu;
      }
      for (int64_t j = jhi; j < Wo; ++j) o[j] = T(0);
    }
    return buf;
  }
};

// sum d, sum d^2, sum x_hat d over one plane, in double (8 lanes each, see dsum).
template <typename T>
void moments(const T* __restrict d, const T* __restrict xh, int64_t n, double* s) {
  double a1[8] = {0, 0, 0, 0, 0, 0, 0, 0}, a2[8] = {0, 0, 0, 0, 0, 0, 0, 0}, a3[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t e = 0;
  for (; e + 8 <= n; e += 8)
    for (int l = 0; l < 8; ++l) {
      const double dv = d[e + l];
      a1[l] += dv;
      a2[l] += dv * dv;
      a3[l] += double(xh[e + l]) * dv;
    }
  double s1 = 0, s2 = 0, sx = 0;
  for (int l = 0; l < 8; ++l) s1 += a1[l], s2 += a2[l], sx += a3[l];
  for (; e < n; ++e) {
    const double dv = d[e];
    s1 += dv, s2 += dv * dv, sx += double(xh[e]) * dv;
  }
  s[0] = s1;
  s[1] = s2;
  s[2] = sx;
}

// BatchNorm coefficients of perturbation k from its per-sample moments part[3*b ...], summed in b order.
template <typename T>
BnCoef onech_coef(const OneChArgs<T>& a, int64_t k, const double* part) {
  double s[3] = {0, 0, 0};
  for (int64_t b = 0; b < a.B; ++b)
    for (int q = 0; q < 3; ++q) s[q] += part[3 * b + q];
  const int64_t c = a.ch[k];
  return bn_delta_coef(s[0], s[1], s[2], double(a.B * a.H * a.W), double(a.inv_std[c]), double(a.bnw[c]));
}

// Apply the chain to delta plane d of item (k, b) and write its output plane to o. t: H*W, rm: W scratch.
template <typename T>
void onech_apply_to(const OneChArgs<T>& a, int64_t k, int64_t b, const T* __restrict d, const BnCoef& cf,
                    T* __restrict t, T* __restrict rm, T* __restrict o_plane) {
  const int64_t HW = a.H * a.W, c = a.ch[k], off = (b * a.C + c) * HW;
  // BatchNorm delta, in the reference's order: (c0 + x_hat c1) + d c2, or d * w.
  if (a.bn_mode == BnMode::Batch) {
    const T c0 = T(cf.c0), c1 = T(cf.c1), c2 = T(cf.c2);
    const T* __restrict xh = a.xhat + off;
    for (int64_t e = 0; e < HW; ++e) t[e] = (c0 + xh[e] * c1) + d[e] * c2;
  } else if (a.bn_mode == BnMode::Running) {
    const T w = a.bnw[c];
    for (int64_t e = 0; e < HW; ++e) t[e] = d[e] * w;
  } else {
    for (int64_t e = 0; e < HW; ++e) t[e] = d[e];
  }
  if (!a.relu_base) {
    T* __restrict o = o_plane;
    for (int64_t e = 0; e < HW; ++e) o[e] = t[e];
    return;
  }
  const T* __restrict x0 = a.relu_base + off;
  if (!a.pk) {
    T* __restrict o = o_plane;
    for (int64_t e = 0; e < HW; ++e) o[e] = relu_delta(x0[e], t[e]);
    return;
  }
  const int64_t HWp = a.Hp * a.Wp;
  T* __restrict o = o_plane;
  const T* __restrict pb = a.pool_base + (b * a.C + c) * HWp;
  // The window's change from its base output m0 (relu of the base input's max, >= 0): with
  // g = (x0 - m0) + d per element (x0 - m0 <= 0, exact where it matters) and G = max g over the
  // window, relu(max(x0 + d)) - m0 = max(G, -m0). No pooled values are subtracted.
  auto nanmax = [](T u, T v) { return (v > u || v != v) ? v : u; };  // max_pool_plane's order
  if (a.pk == 2 && a.ps == 2) {  // the common 2x2/2 pool: one pass, each window in registers
    for (int64_t ip = 0; ip < a.Hp; ++ip) {
      const int64_t r0 = 2 * ip;
      const bool two = r0 + 1 < a.H;
      const T *__restrict t0 = t + r0 * a.W, *__restrict x00 = x0 + r0 * a.W;
      const T *__restrict t1 = two ? t0 + a.W : t0, *__restrict x01 = two ? x00 + a.W : x00;
      const T* __restrict pr = pb + ip * a.Wp;
      T* __restrict orow = o + ip * a.Wp;
      for (int64_t jp = 0; jp < a.W / 2; ++jp) {
        const T m = pr[jp];
        const int64_t j = 2 * jp;
        const T g0 = nanmax((x00[j] - m) + t0[j], (x01[j] - m) + t1[j]);
        const T g1 = nanmax((x00[j + 1] - m) + t0[j + 1], (x01[j + 1] - m) + t1[j + 1]);
        const T g = nanmax(g0, g1);
        orow[jp] = g > -m || g != g ? g : -m;
      }
      if (a.W & 1) {  // the clipped last window: one column
        const T m = pr[a.Wp - 1];
        const int64_t j = a.W - 1;
        const T g = nanmax((x00[j] - m) + t0[j], (x01[j] - m) + t1[j]);
        orow[a.Wp - 1] = g > -m || g != g ? g : -m;
      }
    }
    return;
  }
  if (a.pk == a.ps && a.W <= 1024) {  // non-overlapping windows: g per element, then a plain max pool
    T mrow[1024];  // m0 of each column's window, for the rows of one pooled row
    for (int64_t ip = 0; ip < a.Hp; ++ip) {
      for (int64_t jp = 0; jp < a.Wp; ++jp)
        for (int64_t j = jp * a.ps; j < imin(jp * a.ps + a.ps, a.W); ++j) mrow[j] = pb[ip * a.Wp + jp];
      for (int64_t i = ip * a.ps; i < imin(ip * a.ps + a.ps, a.H); ++i) {
        T* __restrict ti = t + i * a.W;
        const T* __restrict xi = x0 + i * a.W;
        for (int64_t j = 0; j < a.W; ++j) ti[j] = (xi[j] - mrow[j]) + ti[j];
      }
    }
    max_pool_plane(t, a.H, a.W, a.pk, a.ps, a.Hp, a.Wp, rm, o);
    for (int64_t e = 0; e < HWp; ++e) o[e] = o[e] > -pb[e] || o[e] != o[e] ? o[e] : -pb[e];
    return;
  }
  for (int64_t ip = 0; ip < a.Hp; ++ip) {  // overlapping windows: G per window
    const int64_t r0 = ip * a.ps, r1 = imin(r0 + a.pk, a.H);
    for (int64_t jp = 0; jp < a.Wp; ++jp) {
      const int64_t q0 = jp * a.ps, q1 = imin(q0 + a.pk, a.W);
      const T m0 = pb[ip * a.Wp + jp];
      T g = -INFINITY;
      for (int64_t i = r0; i < r1; ++i)
        for (int64_t j = q0; j < q1; ++j) {
          const T v = (x0[i * a.W + j] - m0) + t[i * a.W + j];
          g = (v > g || v != v) ? v : g;
        }
      o[ip * a.Wp + jp] = g > -m0 || g != g ? g : -m0;
    }
  }
}

// The output plane of item (k, b), or with a.gavg its mean (in double) from the scratch plane ob.
template <typename T>
void onech_apply(const OneChArgs<T>& a, int64_t k, int64_t b, const T* __restrict d, const BnCoef& cf,
                 T* __restrict t, T* __restrict rm, T* __restrict ob) {
  const int64_t plane = (a.relu_base && a.pk) ? a.Hp * a.Wp : a.H * a.W;
  if (!a.gavg) return onech_apply_to(a, k, b, d, cf, t, rm, a.out + (b * a.K + k) * plane);
  onech_apply_to(a, k, b, d, cf, t, rm, ob);
  a.out[b * a.K + k] = T(dsum(plane, [&](int64_t e) { return double(ob[e]); }) / double(plane));
}

template <typename T, typename Src>
void run_onech(const OneChArgs<T>& a, const Src& src) {
  const int nt = num_threads();
  const int64_t HW = a.H * a.W, B = a.B, K = a.K;
  const bool stats = a.bn_mode == BnMode::Batch;
  if (K >= 2 * nt) {
    // One item per perturbation: its statistics pass and apply pass run back to back on data that is
    // still in this core's cache.
#pragma omp parallel num_threads(nt)
    {
      // All B delta planes of one perturbation stay in this buffer (B*H*W, cache-sized at the
      // suite's sizes), so the apply pass reuses the statistics pass's gather instead of redoing it.
      std::vector<T> dbuf(B * HW), t(HW), rm(a.W), ob(a.gavg ? HW : 0);
      std::vector<const T*> planes(B);
      std::vector<double> part(3 * B);
#pragma omp for schedule(dynamic, 1)
      for (int64_t k = 0; k < K; ++k) {
        BnCoef cf{0, 0, 0};
        fill_planes(src, B, HW, k, dbuf.data(), planes.data());
        if (stats) {
          const T* xh = a.xhat + a.ch[k] * HW;
          for (int64_t b = 0; b < B; ++b) moments(planes[b], xh + b * a.C * HW, HW, &part[3 * b]);
          cf = onech_coef(a, k, part.data());
        }
        for (int64_t b = 0; b < B; ++b) onech_apply(a, k, b, planes[b], cf, t.data(), rm.data(), ob.data());
      }
    }
  } else {
    // Few perturbations: items (k, b), the statistics reduced between two parallel loops.
    std::vector<double> part(stats ? 3 * K * B : 0);
    std::vector<BnCoef> coef(K, BnCoef{0, 0, 0});
#pragma omp parallel num_threads(nt)
    {
      std::vector<T> dbuf(HW), t(HW), rm(a.W), ob(a.gavg ? HW : 0);
      if (stats) {
#pragma omp for schedule(static)
        for (int64_t kb = 0; kb < K * B; ++kb) {
          const int64_t k = kb / B, b = kb % B;
          moments(src.plane(b, k, dbuf.data()), a.xhat + (b * a.C + a.ch[k]) * HW, HW, &part[3 * kb]);
        }
#pragma omp for schedule(static)
        for (int64_t k = 0; k < K; ++k) coef[k] = onech_coef(a, k, &part[3 * k * B]);
      }
#pragma omp for schedule(static)
      for (int64_t kb = 0; kb < K * B; ++kb) {
        const int64_t k = kb / B, b = kb % B;
        onech_apply(a, k, b, src.plane(b, k, dbuf.data()), coef[k], t.data(), rm.data(), ob.data());
      }
    }
  }
}

// ----------------------------------------------------------------------------- dense chain
// BatchNorm (statistics per (k, c) over (B, H, W)) -> + residual -> ReLU -> max pool -> global average
// on (B, K, C, H, W) values; one work item per (k, c).
// Sources of the dense chain's pre-BatchNorm planes of item (k, c): fill() sets planes[b] to the
// (H, W) plane of sample b, written into vbuf (B * H * W) when it has to be computed. `Local` is
// per-thread state.
template <typename T>
struct DenseValuesSrc {
  const T* v;
  int64_t B, K, C, HW;
  struct Local {
    explicit Local(const DenseValuesSrc&) {}
  };
  void fill(Local&, int64_t k, int64_t c, T*, const T** planes) const {
    for (int64_t b = 0; b < B; ++b) planes[b] = v + ((b * K + k) * C + c) * HW;
  }
};

// o[e] = sum_t w[t] * p[t][e] for e < n, NT taps unrolled: one vectorised pass, sums in registers.
template <typename T, int NT>
void taps_fixed(const T* const* p, const T* w, int64_t n, T* __restrict o) {
  T wr[NT];
  const T* __restrict pr[NT];
  for (int t = 0; t < NT; ++t) wr[t] = w[t], pr[t] = p[t];
  for (int64_t e = 0; e < n; ++e) {
    T s = T(0);
#pragma GCC unroll 32
    for (int t = 0; t < NT; ++t) s += wr[t] * pr[t][e];
    o[e] = s;
  }
}

template <typename T>
void taps_any(const T* const* p, const T* w, int64_t nt, int64_t n, T* __restrict o) {
  switch (nt) {
    case 1: return taps_fixed<T, 1>(p, w, n, o);
    case 4: return taps_fixed<T, 4>(p, w, n, o);
    case 9: return taps_fixed<T, 9>(p, w, n, o);
    case 25: return taps_fixed<T, 25>(p, w, n, o);
    default:
      for (int64_t e = 0; e < n; ++e) o[e] = T(0);
      for (int64_t t = 0; t < nt; ++t) {
        const T* __restrict pt = p[t];
        const T wt = w[t];
        for (int64_t e = 0; e < n; ++e) o[e] += wt * pt[e];
      }
  }
}

// ... or the next conv of a one-channel delta, one (Ho, Wo) plane per item (k, co) = (item / Cout,
// item % Cout): conv of delta[b, k] (input channel ch[k]) with weight[co, ch[k]], zero padding.
// With unit strides the taps run over zero-padded copies of the B input planes of perturbation k
// (kept per thread for its consecutive items (k, co) of one call) at the padded pitch: one long
// vectorised loop per plane.
template <typename T>
struct Conv1chPlaneSrc {
  const T *delta, *weight;
  const int64_t* ch;
  int64_t B, K, Cout, Cin, H, W, kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo;
  uint64_t call;  // unique per launch: keys the per-thread padded copy
  struct Cache {
    uint64_t call = 0;
    int64_t k = -1;
    std::vector<T> pad, run;
  };
  bool flat() const { return sh == 1 && sw == 1 && kh * kw <= 64; }
  // The B zero-padded input planes of perturbation k, stacked (kept per thread for its consecutive
  // items (k, co) of one call).
  Cache& padded(int64_t k) const {
    static thread_local Cache cache;
    const int64_t Hq = H + 2 * ph, Wq = W + 2 * pw;
    if (cache.call != call || cache.k != k) {
      cache.pad.assign(B * Hq * Wq, T(0));
      for (int64_t bb = 0; bb < B; ++bb) {
        const T* __restrict src = delta + (bb * K + k) * H * W;
        T* __restrict q = cache.pad.data() + bb * Hq * Wq + ph * Wq + pw;
        for (int64_t r = 0; r < H; ++r)
          for (int64_t j = 0; j < W; ++j) q[r * Wq + j] = src[r * W + j];
      }
      cache.call = call, cache.k = k;
    }
    return cache;
  }
  // Conv of planes [b0, b0 + nb) of the padded stack at the padded pitch into cache.run, then the
  // (Ho, Wo) outputs to buf. The run stops after the last plane's last output: (nb - 1) planes and
  // (Ho - 1) rows at the padded pitch plus Wo (outputs that straddle a border are dropped).
  void flat_run(Cache& c, int64_t b0, int64_t nb, const T* wt, T* __restrict buf) const {
    const int64_t Hq = H + 2 * ph, Wq = W + 2 * pw, n = (nb - 1) * Hq * Wq + (Ho - 1) * Wq + Wo;
    const T* p[64];
    const T* padb = c.pad.data() + b0 * Hq * Wq;
    for (int64_t u = 0; u < kh; ++u)
      for (int64_t v = 0; v < kw; ++v) p[u * kw + v] = padb + u * dh * Wq + v * dw;
    if (int64_t(c.run.size()) < n) c.run.resize(n);
    taps_any(p, wt, kh * kw, n, c.run.data());
    for (int64_t b = 0; b < nb; ++b)
      for (int64_t i = 0; i < Ho; ++i)
        for (int64_t j = 0; j < Wo; ++j) buf[(b * Ho + i) * Wo + j] = c.run[b * Hq * Wq + i * Wq + j];
  }
  // All B planes of item at once: one long vectorised run over the stack instead of B short ones.
  void fill_all(int64_t item, T* buf, const T** planes) const {
    const int64_t k = item / Cout, co = item % Cout;
    for (int64_t b = 0; b < B; ++b) planes[b] = buf + b * Ho * Wo;
    if (!flat()) {
      for (int64_t b = 0; b < B; ++b) plane(b, item, buf + b * Ho * Wo);
      return;
    }
    flat_run(padded(k), 0, B, weight + (co * Cin + ch[k]) * kh * kw, buf);
  }
  const T* plane(int64_t b, int64_t item, T* __restrict buf) const {
    const int64_t k = item / Cout, co = item % Cout;
    const T* __restrict in = delta + (b * K + k) * H * W;
    const T* wt = weight + (co * Cin + ch[k]) * kh * kw;
    if (flat()) {
      flat_run(padded(k), b, 1, wt, buf);
      return buf;
    }
    for (int64_t e = 0; e < Ho * Wo; ++e) buf[e] = T(0);
    for (int64_t u = 0; u < kh; ++u)
      for (int64_t v = 0; v < kw; ++v) {
        const T wv = wt[u * kw + v];
        const int64_t offh = u * dh - ph, offw = v * dw - pw;
        int64_t jlo, jhi;
        valid_range(W, Wo, sw, offw, &jlo, &jhi);
        for (int64_t i = 0; i < Ho; ++i) {
          const int64_t r = i * sh + offh;
          if (r < 0 || r >= H) continue;
          const T* __restrict row = in + r * W;
          T* __restrict o = buf + i * Wo;
          if (sw == 1) {
            for (int64_t j = jlo; j < jhi; ++j) o[j] += wv * row[j + offw];
          } else {
            for (int64_t j = jlo; j < jhi; ++j) o[j] += wv * row[j * sw + offw];
          }
        }
      }
    return buf;
  }
};

// base_out[b, co] + conv of delta[b, k] (one input channel) with weight[co, ch[k]] (kh x kw taps).
// The B input planes of perturbation k are zero-padded and stacked once per thread and k (a thread's
// consecutive items share k), so the taps need no bounds checks. With unit strides the convolution of
// all B planes is one flat run over the stack at the padded pitch (outputs that straddle a border
// are computed and dropped): long vectorised loops instead of short rows.
template <typename T>
struct ConvSrc {
  const T *delta, *weight, *base;
  const int64_t* ch;
  int64_t B, K, H, W, Cin, Cout, kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo;
  int64_t Hq() const { return H + 2 * ph; }
  int64_t Wq() const { return W + 2 * pw; }
  struct Local {
    std::vector<T> pad, run;
    std::vector<const T*> p;
    int64_t k = -1;
    explicit Local(const ConvSrc& s)
        : pad(s.B * s.Hq() * s.Wq(), T(0)), run(s.sh == 1 && s.sw == 1 ? s.B * s.Hq() * s.Wq() : 0),
          p(s.kh * s.kw) {}
  };
  void load(Local& L, int64_t k) const {
    const int64_t Hq_ = Hq(), Wq_ = Wq();
    for (int64_t b = 0; b < B; ++b) {  // the borders stay zero from the constructor
      const T* __restrict in = delta + (b * K + k) * H * W;
      T* __restrict q = L.pad.data() + b * Hq_ * Wq_ + ph * Wq_ + pw;
      for (int64_t r = 0; r < H; ++r)
        for (int64_t j = 0; j < W; ++j) q[r * Wq_ + j] = in[r * W + j];
    }
    L.k = k;
  }
  void fill(Local& L, int64_t k, int64_t co, T* __restrict vbuf, const T** planes) const {
    if (L.k != k) load(L, k);
    const int64_t Hq_ = Hq(), Wq_ = Wq(), nt = kh * kw, HW = Ho * Wo;
    const T* wt = weight + (co * Cin + ch[k]) * nt;
    for (int64_t b = 0; b < B; ++b) planes[b] = vbuf + b * HW;
    if (sh == 1 && sw == 1) {
      for (int64_t u = 0; u < kh; ++u)
        for (int64_t v = 0; v < kw; ++v) L.p[u * kw + v] = L.pad.data() + u * dh * Wq_ + v * dw;
      T* __restrict run = L.run.data();
      taps_any(L.p.data(), wt, nt, (B - 1) * Hq_ * Wq_ + (Ho - 1) * Wq_ + Wo, run);
      for (int64_t b = 0; b < B; ++b) {
        const T* __restrict bs = base + (b * Cout + co) * HW;
        const T* __restrict rb = run + b * Hq_ * Wq_;
        T* __restrict o = vbuf + b * HW;
        for (int64_t i = 0; i < Ho; ++i)
          for (int64_t j = 0; j < Wo; ++j) o[i * Wo + j] = bs[i * Wo + j] + rb[i * Wq_ + j];
      }
      return;
    }
    for (int64_t b = 0; b < B; ++b) {
      const T* P = L.pad.data() + b * Hq_ * Wq_;
      const T* __restrict bs = base + (b * Cout + co) * HW;
      for (int64_t i = 0; i < Ho; ++i) {
        T* __restrict o = vbuf + b * HW + i * Wo;
        for (int64_t j = 0; j < Wo; ++j) o[j] = T(0);
        for (int64_t u = 0; u < kh; ++u) {
          const T* __restrict row = P + (i * sh + u * dh) * Wq_;
          for (int64_t v = 0; v < kw; ++v) {
            const T wv = wt[u * kw + v];
            const T* __restrict rv = row + v * dw;
            for (int64_t j = 0; j < Wo; ++j) o[j] += wv * rv[j * sw];
          }
        }
        for (int64_t j = 0; j < Wo; ++j) o[j] = bs[i * Wo + j] + o[j];
      }
    }
  }
};

// BatchNorm (Batch: ((v - mean) * rstd) * w + b, the reference's order; Running: v * w + b), residual
// and ReLU in one pass; the variants are compiled separately so each loop is branch-free.
template <typename T, BnMode MODE, bool RES, bool RELU>
void affine_act(const T* __restrict v, const T* __restrict res, T m, T r, T w, T bb, int64_t n, T* __restrict t) {
  for (int64_t e = 0; e < n; ++e) {
    T y = MODE == BnMode::Batch ? ((v[e] - m) * r) * w + bb : MODE == BnMode::Running ? v[e] * w + bb : v[e];
    if (RES) y += res[e];
    if (RELU) y = y > T(0) ? y : (y != y ? y : T(0));  // NaN propagates, as clamp_min
    t[e] = y;
  }
}

template <typename T, BnMode MODE>
void affine_act_mode(bool relu, const T* v, const T* res, T m, T r, T w, T bb, int64_t n, T* t) {
  if (res) {
    relu ? affine_act<T, MODE, true, true>(v, res, m, r, w, bb, n, t)
         : affine_act<T, MODE, true, false>(v, res, m, r, w, bb, n, t);
  } else {
    relu ? affine_act<T, MODE, false, true>(v, res, m, r, w, bb, n, t)
         : affine_act<T, MODE, false, false>(v, res, m, r, w, bb, n, t);
  }
}

// Everything after the statistics, for the plane v of item (b, k, c).
template <typename T>
void dense_apply(const DenseArgs<T>& a, int64_t b, int64_t k, int64_t c, const T* __restrict v, T mean, T rstd,
                 T* __restrict t, T* __restrict rm, T* __restrict pbuf) {
  const int64_t HW = a.H * a.W, item = (b * a.K + k) * a.C + c;
  const T* res = a.residual ? a.residual + (b * a.C + c) * HW : nullptr;
  const bool bn = a.bn_mode != BnMode::None;
  const T w = bn ? a.bnw[c] : T(1), bb = bn ? a.bnb[c] : T(0);
  T* dst = a.pk || a.gavg ? t : a.out + item * HW;  // without pool or average: straight to the output
  if (a.bn_mode == BnMode::Batch)
    affine_act_mode<T, BnMode::Batch>(a.relu, v, res, mean, rstd, w, bb, HW, dst);
  else if (a.bn_mode == BnMode::Running)
    affine_act_mode<T, BnMode::Running>(a.relu, v, res, mean, rstd, w, bb, HW, dst);
  else
    affine_act_mode<T, BnMode::None>(a.relu, v, res, mean, rstd, w, bb, HW, dst);
  const T* r = dst;
  int64_t n = HW;
  if (a.pk) {
    T* o = a.gavg ? pbuf : a.out + item * a.Hp * a.Wp;
    max_pool_plane(t, a.H, a.W, a.pk, a.ps, a.Hp, a.Wp, rm, o);
    r = o, n = a.Hp * a.Wp;
  }
  if (a.gavg) a.out[item] = T(dsum(n, [&](int64_t e) { return double(r[e]); }) / double(n));
}

template <typename T, typename Src>
void run_dense(const DenseArgs<T>& a, const Src& src) {
  const int nt = num_threads();
  const int64_t HW = a.H * a.W, B = a.B, KC = a.K * a.C;
#pragma omp parallel num_threads(nt) if (KC > 1)
  {
    // the item's B planes stay cache-resident between the statistics passes and the apply pass
    std::vector<T> vbuf(B * HW), t(HW), rm(a.W), pbuf(a.Hp * a.Wp);
    std::vector<const T*> planes(B);
    typename Src::Local local(src);
    // static: consecutive items of a thread share k, so the conv input stays loaded
#pragma omp for schedule(static)
    for (int64_t kc = 0; kc < KC; ++kc) {
      const int64_t k = kc / a.C, c = kc % a.C;
      src.fill(local, k, c, vbuf.data(), planes.data());
      T tm = T(0), rstd = T(0);
      if (a.bn_mode == BnMode::Batch) {  // two-pass statistics in double, as the reference
        // computed planes are contiguous in vbuf: one long run; tensor planes are strided by K * C
        const bool flat = planes[0] == vbuf.data();
        const int64_t runs = flat ? 1 : B, len = flat ? B * HW : HW;
        double s = 0;
        for (int64_t b = 0; b < runs; ++b) {
          const T* __restrict v = planes[b];
          s += dsum(len, [&](int64_t e) { return double(v[e]); });
        }
        const double n = double(B * HW), mean = s / n;
        double q = 0;
        for (int64_t b = 0; b < runs; ++b) {
          const T* __restrict v = planes[b];
          q += dsum(len, [&](int64_t e) {
            const double dv = double(v[e]) - mean;
            return dv * dv;
          });
        }
        tm = T(mean), rstd = T(1.0 / std::sqrt(q / n + a.eps));
      }
      for (int64_t b = 0; b < B; ++b) dense_apply(a, b, k, c, planes[b], tm, rstd, t.data(), rm.data(), pbuf.data());
    }
  }
}

// ------------------------------------------------------------------------- cross-entropy
// log-softmax of the base logits in double: logits, logsumexp and probabilities per sample.
struct Softmax {
  std::vector<double> l, p, lse;
};

template <typename T>
Softmax softmax(const at::Tensor& logits) {
  const int64_t B = logits.size(0), N = logits.size(1);
  const T* lg = logits.data_ptr<T>();
  Softmax s;
  s.l.resize(B * N), s.p.resize(B * N), s.lse.resize(B);
  for (int64_t b = 0; b < B; ++b) {
    s.lse[b] = logsumexp_row(lg + b * N, N);
    for (int64_t j = 0; j < N; ++j) {
      s.l[b * N + j] = double(lg[b * N + j]);
      s.p[b * N + j] = std::exp(s.l[b * N + j] - s.lse[b]);
    }
  }
  return s;
}

// y = expm1(x) elementwise: a Taylor polynomial that vectorises (exact to rounding for |x| < 0.5),
// then libm's expm1 for the rare larger arguments (and NaN).
inline void expm1_array(const double* __restrict x, int64_t n, double* __restrict y) {
  for (int64_t e = 0; e < n; ++e) {
    const double v = x[e];
    double r = 1.0;
#pragma GCC unroll 20
    for (int q = 18; q >= 2; --q) r = 1.0 + v * (1.0 / q) * r;  // x (1 + x/2 (1 + x/3 (...)))
    y[e] = v * r;
  }
  for (int64_t e = 0; e < n; ++e)
    if (!(std::fabs(x[e]) < 0.5)) y[e] = std::expm1(x[e]);
}

// Cross-entropy changes of the B samples of one perturbation from their logit changes D (B x N):
// log1p(sum_j p_j expm1(d_j)) - d_y, with the logsumexp fallback. E: B x N scratch.
inline void ce_block(const Softmax& sm, int64_t B, int64_t N, const int64_t* tg, const double* D, double* E,
                     double* o) {
  expm1_array(D, B * N, E);
  for (int64_t b = 0; b < B; ++b) {
    const double *p = sm.p.data() + b * N, *d = D + b * N, *ex = E + b * N;
    double s = 0;
    for (int64_t j = 0; j < N; ++j) s += p[j] * ex[j];
    double r = std::log1p(s) - d[tg[b]];
    if (!std::isfinite(r))
      r = ce_direct(sm.l.data() + b * N, N, tg[b], sm.lse[b], [&](int64_t j) { return d[j]; });
    o[b] = r;
  }
}

// ------------------------------------------------------------------------------ entry points
at::Tensor channel_chain(const at::Tensor& values, const at::Tensor& channel, int64_t bn_mode,
                         const at::Tensor& bn_xhat, const at::Tensor& bn_inv_std, const at::Tensor& bn_weight,
                         const at::Tensor& relu_base, int64_t pool_k, int64_t pool_s,
                         const at::Tensor& pool_base) {
  const int64_t B = values.size(0), K = values.size(1), H = values.size(2), W = values.size(3);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "channel_chain_cpu", [&] {
    auto a = onech_args<scalar_t>(B, K, H, W, channel, bn_mode, bn_xhat, bn_inv_std, bn_weight, relu_base, pool_k,
                                  pool_s, pool_base, out, values.options());
    run_onech(a, ValuesSrc<scalar_t>{values.data_ptr<scalar_t>(), K, H * W});
  });
  return out;
}

at::Tensor conv_delta_chain(const at::Tensor& x, const at::Tensor& src_channel, const at::Tensor& off_h,
                            const at::Tensor& off_w, const at::Tensor& out_channel, double mu, int64_t stride_h,
                            int64_t stride_w, int64_t h_out, int64_t w_out, int64_t bn_mode,
                            const at::Tensor& bn_xhat, const at::Tensor& bn_inv_std, const at::Tensor& bn_weight,
                            const at::Tensor& relu_base, int64_t pool_k, int64_t pool_s,
                            const at::Tensor& pool_base) {
  const int64_t B = x.size(0), K = src_channel.numel();
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_delta_chain_cpu", [&] {
    auto a = onech_args<scalar_t>(B, K, h_out, w_out, out_channel, bn_mode, bn_xhat, bn_inv_std, bn_weight,
                                  relu_base, pool_k, pool_s, pool_base, out, x.options());
    GatherSrc<scalar_t> src{x.data_ptr<scalar_t>(), x.size(1), x.size(2), x.size(3), h_out, w_out, stride_h,
                            stride_w, src_channel.data_ptr<int64_t>(), off_h.data_ptr<int64_t>(),
                            off_w.data_ptr<int64_t>(), scalar_t(mu)};
    run_onech(a, src);
  });
  return out;
}

at::Tensor conv1ch_delta_chain(const at::Tensor& delta, const at::Tensor& channel, const at::Tensor& weight,
                               int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h,
                               int64_t dil_w, int64_t bn_mode, const at::Tensor& bn_xhat, const at::Tensor& bn_inv_std,
                               const at::Tensor& bn_weight, const at::Tensor& relu_base, int64_t pool_k, int64_t pool_s,
                               const at::Tensor& pool_base, bool global_avg) {
  const int64_t B = delta.size(0), K = delta.size(1), H = delta.size(2), W = delta.size(3);
  const int64_t Cout = weight.size(0), Cin = weight.size(1), kh = weight.size(2), kw = weight.size(3);
  const int64_t Ho = conv_out_size(H, kh, stride_h, pad_h, dil_h), Wo = conv_out_size(W, kw, stride_w, pad_w, dil_w);
  // Items (k, co): the one-channel chain over K * Cout planes, item k * Cout + co changing channel co.
  const at::Tensor items = at::arange(Cout, channel.options()).repeat({K});
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(delta.scalar_type(), "conv1ch_delta_chain_cpu", [&] {
    auto a = onech_args<scalar_t>(B, K * Cout, Ho, Wo, items, bn_mode, bn_xhat, bn_inv_std, bn_weight, relu_base,
                                  pool_k, pool_s, pool_base, out, delta.options());
    if (global_avg) {  // one mean per (b, k, co): the planes stay in the threads' scratch
      out = at::empty({B, K * Cout, 1, 1}, delta.options());
      a.out = out.numel() ? out.data_ptr<scalar_t>() : nullptr;
      a.gavg = true;
    }
    static std::atomic<uint64_t> calls{0};
    Conv1chPlaneSrc<scalar_t> src{delta.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                                  channel.data_ptr<int64_t>(), B, K, Cout, Cin, H, W, kh, kw, stride_h,
                                  stride_w, pad_h, pad_w, dil_h, dil_w, Ho, Wo, ++calls};
    run_onech(a, src);
  });
  return out.view({B, K, Cout, out.size(2), out.size(3)});
}

at::Tensor bn_act_dense(const at::Tensor& values, int64_t bn_mode, const at::Tensor& bn_weight,
                        const at::Tensor& bn_bias, double eps, const at::Tensor& residual, bool relu,
                        int64_t pool_k, int64_t pool_s, bool global_avg) {
  const int64_t B = values.size(0), K = values.size(1), C = values.size(2), H = values.size(3), W = values.size(4);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "bn_act_dense_cpu", [&] {
    auto a = dense_args<scalar_t>(B, K, C, H, W, bn_mode, bn_weight, bn_bias, eps, residual, relu, pool_k, pool_s,
                                  global_avg, out, values.options());
    run_dense(a, DenseValuesSrc<scalar_t>{values.data_ptr<scalar_t>(), B, K, C, H * W});
  });
  return out;
}

at::Tensor conv1ch_chain(const at::Tensor& delta, const at::Tensor& channel, const at::Tensor& weight,
                         int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h,
                         int64_t dil_w, const at::Tensor& base_out, int64_t bn_mode, const at::Tensor& bn_weight,
                         const at::Tensor& bn_bias, double eps, const at::Tensor& residual, bool relu,
                         int64_t pool_k, int64_t pool_s, bool global_avg) {
  const int64_t B = delta.size(0), K = delta.size(1), H = delta.size(2), W = delta.size(3);
  const int64_t Cout = weight.size(0), Cin = weight.size(1), kh = weight.size(2), kw = weight.size(3);
  const int64_t Ho = base_out.size(2), Wo = base_out.size(3);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(delta.scalar_type(), "conv1ch_chain_cpu", [&] {
    auto a = dense_args<scalar_t>(B, K, Cout, Ho, Wo, bn_mode, bn_weight, bn_bias, eps, residual, relu, pool_k,
                                  pool_s, global_avg, out, delta.options());
    ConvSrc<scalar_t> src{delta.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), base_out.data_ptr<scalar_t>(),
                          channel.data_ptr<int64_t>(), B, K, H, W, Cin, Cout, kh, kw, stride_h, stride_w, pad_h,
                          pad_w, dil_h, dil_w, Ho, Wo};
    run_dense(a, src);
  });
  return out;
}

// The CE loops live outside AT_DISPATCH (no #pragma inside a macro argument).
template <typename T>
void weight_ce(const at::Tensor& x, const at::Tensor& logits, const at::Tensor& target, const at::Tensor& idx,
               double mu, double* o) {
  const int64_t B = logits.size(0), N = logits.size(1), Nin = x.size(1), K = idx.numel();
  const int64_t *tg = target.data_ptr<int64_t>(), *ix = idx.data_ptr<int64_t>();
  const Softmax sm = softmax<T>(logits);
  const T* xp = x.data_ptr<T>();
  const T m = T(mu);
#pragma omp parallel for schedule(static) num_threads(num_threads()) if (K * B > 4096)
  for (int64_t kb = 0; kb < K * B; ++kb) {
    const int64_t k = kb / B, b = kb % B, i = ix[k] / Nin, j = ix[k] % Nin, y = tg[b];
    const double d = double(T(xp[b * Nin + j] * m));  // the change rounds in the data type
    double r = ce_coord(sm.p[b * N + i], d, y == i);
    if (!std::isfinite(r))
      r = ce_direct(sm.l.data() + b * N, N, y, sm.lse[b], [&](int64_t q) { return q == i ? d : 0.0; });
    o[kb] = r;
  }
}

// One item per perturbation k: its (B x N) logit changes, then ce_block.
template <typename T>
void rank1_ce(const at::Tensor& values, const at::Tensor& channel, const at::Tensor& weight, const at::Tensor& logits,
              const at::Tensor& target, double* o) {
  const int64_t B = logits.size(0), N = logits.size(1), K = values.size(1), Nin = weight.size(1);
  const int64_t *tg = target.data_ptr<int64_t>(), *ch = channel.data_ptr<int64_t>();
  const Softmax sm = softmax<T>(logits);
  const T *v = values.data_ptr<T>(), *w = weight.data_ptr<T>();
#pragma omp parallel num_threads(num_threads()) if (K * B * N > 16384)
  {
    std::vector<double> D(B * N), E(B * N);
#pragma omp for schedule(static)
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t b = 0; b < B; ++b) {
        const T vb = v[b * K + k];
        for (int64_t n = 0; n < N; ++n) D[b * N + n] = double(T(vb * w[n * Nin + ch[k]]));  // rounds in T
      }
      ce_block(sm, B, N, tg, D.data(), E.data(), o + k * B);
    }
  }
}

// The logit changes (values - base) @ weight.T are a GEMM: ATen's (MKL/oneDNN) in the data type,
// exactly the reference's expression; then one item per perturbation k as above.
template <typename T>
void dense_ce(const at::Tensor& values, const at::Tensor& base, const at::Tensor& weight, const at::Tensor& logits,
              const at::Tensor& target, double* o) {
  const int64_t B = logits.size(0), N = logits.size(1), K = values.size(1);
  const int64_t* tg = target.data_ptr<int64_t>();
  const Softmax sm = softmax<T>(logits);
  const at::Tensor delta = at::matmul(values - base.unsqueeze(1), weight.t()).contiguous();  // (B, K, N)
  const T* dl = delta.data_ptr<T>();
#pragma omp parallel num_threads(num_threads()) if (K * B * N > 16384)
  {
    std::vector<double> D(B * N), E(B * N);
#pragma omp for schedule(static)
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t b = 0; b < B; ++b)
        for (int64_t n = 0; n < N; ++n) D[b * N + n] = double(dl[(b * K + k) * N + n]);
      ce_block(sm, B, N, tg, D.data(), E.data(), o + k * B);
    }
  }
}

at::Tensor linear_weight_ce(const at::Tensor& x, const at::Tensor& logits, const at::Tensor& target,
                            const at::Tensor& idx, double mu) {
  at::Tensor out = at::empty({idx.numel(), logits.size(0)}, logits.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "linear_weight_ce_cpu",
                             [&] { weight_ce<scalar_t>(x, logits, target, idx, mu, out.data_ptr<double>()); });
  return out;
}

at::Tensor linear_rank1_ce(const at::Tensor& values, const at::Tensor& channel, const at::Tensor& weight,
                           const at::Tensor& logits, const at::Tensor& target) {
  at::Tensor out = at::empty({values.size(1), logits.size(0)}, logits.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "linear_rank1_ce_cpu", [&] {
    rank1_ce<scalar_t>(values, channel, weight, logits, target, out.data_ptr<double>());
  });
  return out;
}

at::Tensor linear_dense_ce(const at::Tensor& values, const at::Tensor& base, const at::Tensor& weight,
                           const at::Tensor& logits, const at::Tensor& target) {
  at::Tensor out = at::empty({values.size(1), logits.size(0)}, logits.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "linear_dense_ce_cpu", [&] {
    dense_ce<scalar_t>(values, base, weight, logits, target, out.data_ptr<double>());
  });
  return out;
}

}  // namespace DZ_CPU_NS
}  // namespace
}  // namespace dz
