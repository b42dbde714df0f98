// The GGUF quantizers, written once over GCC vector types of W float lanes and included by
// ggml_quant_{scalar,avx2,avx512}.cpp inside their own namespace after defining W and vsqrt
// (and a target pragma): W = 4 (SSE2, the x86-64 baseline), 8 (AVX2), 16 (AVX-512).
// No headers here: everything below is compiled for that file's ISA only.
//
// Exactness: every float operation of ggml-quants.c is done in the same order on fp32 values
// (the build has -ffp-contract=off, so a*b+c stays two roundings). Searches (make_qkx2/3,
// make_qx) run one group per lane, each lane's sums strictly sequential; the scalar steps
// between (per-super-block scale codes, make_qp_quants) are literal ports in plain floats.

typedef float vf __attribute__((vector_size(4 * W)));
typedef int32_t vi __attribute__((vector_size(4 * W)));
typedef uint16_t vh __attribute__((vector_size(2 * W)));
typedef uint8_t vb __attribute__((vector_size(W)));
typedef int8_t vsb __attribute__((vector_size(W)));

constexpr float kEps = 1e-15f;  // GROUP_MAX_EPS
constexpr int CH_K = 16;        // super-blocks per chunk (a 16 KB fp32 copy stays in L1)
constexpr int CH_L = 128;       // 32-blocks per chunk

static inline vf splat(float s) { vf v = {}; return v + s; }
static inline vi splati(int s) { vi v = {}; return v + s; }
static inline vf loadv(const float* p) { vf v; __builtin_memcpy(&v, p, sizeof v); return v; }
static inline void storev(float* p, vf v) { __builtin_memcpy(p, &v, sizeof v); }
static inline void storevi(int32_t* p, vi v) { __builtin_memcpy(p, &v, sizeof v); }
static inline vf vabs(vf v) { return (vf)((vi)v & 0x7fffffff); }
static inline vf tof(vi v) { return __builtin_convertvector(v, vf); }
// nearest_int: the 12582912 (1.5 * 2^23) trick, bit for bit, for any input
static inline vi vnearest(vf v) { return ((vi)(v + 12582912.f) & 0x7fffff) - 0x400000; }
static inline vi vclamp(vi v, int lo, int hi) {
  const vi h = splati(hi), l = splati(lo);
  v = h < v ? h : v;
  return l > v ? l : v;
}
static inline bool any(vi m) {
  for (int l = 0; l < W; ++l)
    if (m[l]) return true;
  return false;
}

static inline int nearest_s(float f) {
  const float v = f + 12582912.f;
  int i;
  __builtin_memcpy(&i, &v, 4);
  return (i & 0x7fffff) - 0x400000;
}
// fp32 -> fp16 bits, round to nearest even (what GGML_FP32_TO_FP16 computes)
static inline uint16_t f32_to_f16(float f) {
  uint32_t x;
  __builtin_memcpy(&x, &f, 4);
  const uint16_t sign = (x >> 16) & 0x8000;
  const uint32_t a = x & 0x7fffffff;
  if (a > 0x7f800000) return sign | 0x7e00;
  if (a >= 0x47800000) return sign | 0x7c00;
  if (a >= 0x38800000) {  // a normal half: rebias the exponent, round the 13 dropped bits
    const uint32_t m = a - 0x38000000;
    return sign | static_cast<uint16_t>((m + 0x0fff + ((m >> 13) & 1)) >> 13);
  }
  // subnormal half: |f| * 2^24 is exact, then round to an integer (ties to even)
  return sign | static_cast<uint16_t>(nearest_s(__builtin_fabsf(f) * 16777216.f));
}
static inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16, em = h & 0x7fff;
  uint32_t bits;
  if (em >= 0x7c00) {
    bits = sign | 0x7f800000 | ((em & 0x3ff) << 13);
  } else {
    float v;
    const uint32_t t = em << 13;
    __builtin_memcpy(&v, &t, 4);
    v *= 0x1p112f;  // exact, also for subnormal halves
    __builtin_memcpy(&bits, &v, 4);
    bits |= sign;
  }
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}
static inline void put16(uint8_t* p, uint16_t v) { __builtin_memcpy(p, &v, 2); }

// Elements [e0, e0 + cnt) of the input as fp32 into dst (cnt a multiple of W); true if any
// is inf/nan.
static bool load_f32(const Job& j, int64_t e0, int64_t cnt, float* dst) {
  vi bad = {};
  const vi expo = splati(0x7f800000);
  if (j.kind == F32) {
    const float* s = static_cast<const float*>(j.x) + e0;
    for (int64_t i = 0; i < cnt; i += W) {
      const vf v = loadv(s + i);
      storev(dst + i, v);
      bad |= ((vi)v & expo) == expo;
    }
  } else {
    const uint16_t* s = static_cast<const uint16_t*>(j.x) + e0;
    for (int64_t i = 0; i < cnt; i += W) {
      vh h;
      __builtin_memcpy(&h, s + i, sizeof h);
      const vi u = __builtin_convertvector(h, vi);
      vi bits;
      if (j.kind == BF16) {
        bits = u << 16;
      } else {  // fp16: normal and subnormal halves by one exact multiply, inf/nan by bits
        const vi em = u & 0x7fff;
        const vi normal = (vi)((vf)(em << 13) * 0x1p112f);
        bits = (em >= 0x7c00 ? ((em << 13) | expo) : normal) | ((u & 0x8000) << 16);
      }
      storev(dst + i, (vf)bits);
      bad |= (bits & expo) == expo;
    }
  }
  return any(bad);
}

// out[i][lane] = src[lane * stride + i] for the first nl lanes, 0 in the others.
template <int N>
static inline void tile(const float* src, int64_t stride, int nl, vf* out) {
  float t[N * W];
  for (int l = 0; l < W; ++l)
    for (int i = 0; i < N; ++i) t[i * W + l] = l < nl ? src[l * stride + i] : 0.f;
  for (int i = 0; i < N; ++i) out[i] = loadv(t + i * W);
}
template <int N>
static inline void tile_ptrs(const float* const* src, int nl, vf* out) {
  float t[N * W];
  for (int l = 0; l < W; ++l)
    for (int i = 0; i < N; ++i) t[i * W + l] = l < nl ? src[l][i] : 0.f;
  for (int i = 0; i < N; ++i) out[i] = loadv(t + i * W);
}

static inline const float* qw_row(const Job& j, int64_t row) {
  return j.qw + (row / (j.rows / j.qw_groups)) * j.n;
}

// ---- make_qkx2_quants / make_qkx3_quants (weights given, use_mad = false), n = 32 -------
// One group per lane. Returns the scale and the_min; the accepted trial's iscale and min give
// its L again (L = clamp(nearest_int(iscale * (x - min)))), needed only where the stored
// scale code turns out 0. Constant lanes get acc_is = 0, so that L = 0 as in the C code.
struct QkxOut {
  vf scale, the_min, acc_is, acc_mn;
};
template <int NMAX, bool QKX3>
static inline QkxOut qkx_search(const vf* X, const vf* Wt, const float* steps, int nsteps) {
  const vf zero = {};
  vf mn = X[0], mx = X[0], sum_w = Wt[0];
  vf sum_x = sum_w * X[0];
  for (int i = 1; i < 32; ++i) {
    mn = X[i] < mn ? X[i] : mn;
    mx = X[i] > mx ? X[i] : mx;
    sum_w += Wt[i];
    sum_x += Wt[i] * X[i];
  }
  mn = mn > zero ? zero : mn;
  const vi cst = QKX3 ? (mx <= mn) : (mx == mn);
  const vf mn0 = mn;
  const vf mxe = cst ? mn + 1.f : mx;  // constant lanes return before any trial: keep them finite
  vf iscale = splat(static_cast<float>(NMAX)) / (mxe - mn);
  vf scale = splat(1.f) / iscale;
  vf best = zero;
  for (int i = 0; i < 32; ++i) {
    const vf lf = tof(vclamp(vnearest(iscale * (X[i] - mn)), 0, NMAX));
    vf diff = scale * lf + mn - X[i];
    diff = diff * diff;
    best += Wt[i] * diff;
  }
  vf acc_is = iscale, acc_mn = mn;
  vf Lf[32];
  for (int k = 0; k < nsteps; ++k) {
    const vf isc = splat(steps[k]) / (mxe - mn);
    vf sl = zero, sl2 = zero, sxl = zero;
    for (int i = 0; i < 32; ++i) {
      const vf lf = tof(vclamp(vnearest(isc * (X[i] - mn)), 0, NMAX));
      Lf[i] = lf;
      const vf wl = Wt[i] * lf;
      sl += wl;
      sl2 += wl * lf;
      sxl += wl * X[i];
    }
    const vf D = sum_w * sl2 - sl * sl;
    vf ts = (sum_w * sxl - sum_x * sl) / D;
    vf tm = (sl2 * sum_x - sl * sxl) / D;
    const vi pos = tm > zero;
    tm = pos ? zero : tm;
    ts = pos ? sxl / sl2 : ts;
    vf err = zero;
    for (int i = 0; i < 32; ++i) {
      vf diff = ts * Lf[i] + tm - X[i];
      diff = diff * diff;
      err += Wt[i] * diff;
    }
    const vi acc = (D > zero) & (err < best);
    best = acc ? err : best;
    scale = acc ? ts : scale;
    acc_is = acc ? isc : acc_is;
    acc_mn = acc ? mn : acc_mn;
    mn = acc ? tm : mn;
  }
  QkxOut o;
  o.scale = cst ? zero : scale;
  o.the_min = -(cst ? mn0 : mn);
  o.acc_is = cst ? zero : acc_is;
  o.acc_mn = cst ? zero : acc_mn;
  return o;
}

// ---- make_qx_quants(n, nmax, x, L, rmse_type = 1, qw), one group per lane -----------------
// Wt: qw, or x*x without an imatrix. L of the result = zero ? 0 : nmax + clamp(nearest_int(
// acc_is * x), -nmax, nmax - 1).
struct QxOut {
  vf scale, acc_is;
  vi zero;
};
template <int N, int NMAX>
static inline QxOut qx_search(const vf* X, const vf* Wt) {
  const vf zero = {};
  vf amax = zero, mx = zero;
  for (int i = 0; i < N; ++i) {
    const vf ax = vabs(X[i]);
    const vi u = ax > amax;
    amax = u ? ax : amax;
    mx = u ? X[i] : mx;
  }
  const vi z = amax < kEps;
  mx = z ? splat(1.f) : mx;
  vf WX[N];
  for (int i = 0; i < N; ++i) WX[i] = Wt[i] * X[i];
  auto sums = [&](vf isc, vf& slx, vf& sl2) {
    slx = zero;
    sl2 = zero;
    for (int i = 0; i < N; ++i) {
      const vf lf = tof(vclamp(vnearest(isc * X[i]), -NMAX, NMAX - 1));
      slx += WX[i] * lf;
      sl2 += (Wt[i] * lf) * lf;
    }
  };
  vf iscale = splat(static_cast<float>(-NMAX)) / mx, slx, sl2;
  sums(iscale, slx, sl2);
  vf scale = sl2 != zero ? slx / sl2 : zero;
  vf best = scale * slx;
  vf acc_is = iscale;
  for (int is = -9; is <= 9; ++is) {
    if (is == 0) continue;
    const vf isc = splat(-(static_cast<float>(NMAX) + 0.1f * static_cast<float>(is))) / mx;
    sums(isc, slx, sl2);
    const vi ok = (sl2 > zero) & (slx * slx > best * sl2);
    scale = ok ? slx / sl2 : scale;
    best = ok ? scale * slx : best;
    acc_is = ok ? isc : acc_is;
  }
  QxOut o;
  o.scale = z ? zero : scale;
  o.acc_is = acc_is;
  o.zero = z;
  return o;
}

// ---- make_qp_quants: per super-block, 8 values; a literal port (uint8_t L wraps as in C) --
static float make_qp(int n, int nmax, const float* x, uint8_t* L, const float* qw) {
  float max = 0;
  for (int i = 0; i < n; ++i) max = max > x[i] ? max : x[i];
  if (max < kEps) {
    for (int i = 0; i < n; ++i) L[i] = 0;
    return 0.f;
  }
  float iscale = nmax / max;
  for (int i = 0; i < n; ++i) L[i] = static_cast<uint8_t>(nearest_s(iscale * x[i]));
  const float scale = 1 / iscale;
  float best_mse = 0;
  for (int i = 0; i < n; ++i) {
    const float diff = x[i] - scale * L[i];
    best_mse += qw[i] * diff * diff;
  }
  for (int is = -4; is <= 4; ++is) {
    if (is == 0) continue;
    const float iscale_is = (0.1f * is + nmax) / max;
    const float scale_is = 1 / iscale_is;
    float mse = 0;
    for (int i = 0; i < n; ++i) {
      int l = nearest_s(iscale_is * x[i]);
      l = nmax < l ? nmax : l;
      const float diff = x[i] - scale_is * l;
      mse += qw[i] * diff * diff;
    }
    if (mse < best_mse) {
      best_mse = mse;
      iscale = iscale_is;
    }
  }
  float sumlx = 0, suml2 = 0;
  for (int i = 0; i < n; ++i) {
    int l = nearest_s(iscale * x[i]);
    l = nmax < l ? nmax : l;
    L[i] = static_cast<uint8_t>(l);
    sumlx += qw[i] * x[i] * l;
    suml2 += qw[i] * l * l;
  }
  for (int itry = 0; itry < 5; ++itry) {
    int n_changed = 0;
    for (int i = 0; i < n; ++i) {
      const float w = qw[i];
      float slx = sumlx - w * x[i] * L[i];
      float sl2 = suml2 - w * L[i] * L[i];
      if (slx > 0 && sl2 > 0) {
        int new_l = nearest_s(x[i] * sl2 / slx);
        new_l = nmax < new_l ? nmax : new_l;
        if (new_l != L[i]) {
          slx += w * x[i] * new_l;
          sl2 += w * new_l * new_l;
          if (slx * slx * suml2 > sumlx * sumlx * sl2) {
            L[i] = static_cast<uint8_t>(new_l);
            sumlx = slx;
            suml2 = sl2;
            ++n_changed;
          }
        }
      }
    }
    if (!n_changed) break;
  }
  return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

#include "ggml_quant_kq.h"
#include "ggml_quant_legacy.h"

static bool quantize_units(const Job& j, int64_t u0, int64_t u1) {
  bool bad = false;
  const int64_t ch = j.type >= Q4_K ? CH_K : CH_L;
  for (int64_t u = u0; u < u1; u += ch) {
    const int nu = static_cast<int>(u1 - u < ch ? u1 - u : ch);
    switch (j.type) {
      case Q4_K: bad |= chunk_k45<15>(j, u, nu); break;
      case Q5_K: bad |= chunk_k45<31>(j, u, nu); break;
      case Q6_K: bad |= chunk_q6k(j, u, nu); break;
      case Q8_0: bad |= chunk_q8_0(j, u, nu); break;
      case Q4_0: bad |= chunk_q45_0<8>(j, u, nu); break;
      default: bad |= chunk_q45_0<16>(j, u, nu); break;
    }
  }
  return bad;
}

static bool row_sigma2(const Job& j, int64_t r0, int64_t r1, float* out) {
  // W rows at a time, each row's sum its own chain (in order), the chains interleaved
  bool bad = false;
  const int64_t n = j.n;
  float buf[W][256];
  for (int64_t rb = r0; rb < r1; rb += W) {
    const int nr = static_cast<int>(r1 - rb < W ? r1 - rb : W);
    float acc[W] = {};
    for (int64_t c0 = 0; c0 < n; c0 += 256) {
      const int cn = static_cast<int>(n - c0 < 256 ? n - c0 : 256);
      for (int r = 0; r < nr; ++r) bad |= load_f32(j, (rb + r) * n + c0, cn, buf[r]);
      for (int c = 0; c < cn; ++c)
        for (int r = 0; r < nr; ++r) acc[r] += buf[r][c] * buf[r][c];
    }
    for (int r = 0; r < nr; ++r) out[rb + r] = acc[r] / static_cast<float>(n);
  }
  return bad;
}
