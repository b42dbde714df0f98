// Q8_0, Q4_0, Q5_0 of ggml_quant_body.h (one scale per block of 32). The _ref quantizers are
// element-wise within a block (32 / W vectors each); the imatrix variants of Q4_0/Q5_0 run
// make_qx_quants one block per lane.
constexpr int NV = 32 / W;

static inline float hmax(vf m) {  // of finite values: any order gives the same
  for (int s = W / 2; s >= 1; s /= 2) {
    vi idx;
    for (int l = 0; l < W; ++l) idx[l] = (l + s) & (W - 1);
    const vf sh = __builtin_shuffle(m, idx);
    m = m > sh ? m : sh;
  }
  return m[0];
}

// (int8_t) roundf(v), as x86 C computes it: round half away from zero, then a truncating
// 32-bit conversion (out of range, inf and nan give 0x80000000) whose low byte is kept.
static inline vi roundf_i32(vf v) {
  const vi t = __builtin_convertvector(v, vi);
  const vf tf = tof(t), diff = v - tf;  // exact for |v| < 2^23
  const vf one = splat(1.f), zero = {};
  vf r = tf + (diff >= 0.5f ? one : zero) - (diff <= -0.5f ? one : zero);
  r = vabs(v) >= 8388608.f ? v : r;  // already an integer (or inf)
  return __builtin_convertvector(r, vi);
}

// One 32-value block into v[0..NV) and its largest magnitude (the legacy types' amax).
static inline float load_block_amax(const float* x, vf* v) {
  vf m = {};
  for (int k = 0; k < NV; ++k) {
    v[k] = loadv(x + k * W);
    const vf a = vabs(v[k]);
    m = m > a ? m : a;
  }
  return hmax(m);
}

static bool chunk_q8_0(const Job& j, int64_t u0, int nb) {
  float xb[CH_L * 32];
  const bool bad = load_f32(j, u0 * 32, int64_t(nb) * 32, xb);
  for (int b = 0; b < nb; ++b) {
    const float* x = xb + 32 * b;
    uint8_t* y = j.out + (u0 + b) * 34;
    vf v[NV];
    const float amax = load_block_amax(x, v);
    const float d = amax / ((1 << 7) - 1);
    const float id = d ? 1.0f / d : 0.0f;
    put16(y, f32_to_f16(d));
    for (int k = 0; k < NV; ++k) {
      const vsb q = __builtin_convertvector(roundf_i32(v[k] * id), vsb);
      __builtin_memcpy(y + 2 + k * W, &q, W);
    }
  }
  return bad;
}

// Pack 32 codes (0 .. 2*HALF-1, as bytes) of a Q4_0 (HALF 8) / Q5_0 (HALF 16) block.
template <int HALF>
static inline void pack_q45_0(const uint8_t* L, uint16_t d16, uint8_t* y) {
  put16(y, d16);
  if (HALF == 8) {
    for (int i = 0; i < 16; ++i) y[2 + i] = static_cast<uint8_t>(L[i] | (L[i + 16] << 4));
    return;
  }
  uint32_t qh = 0;
  for (int i = 0; i < 16; ++i) {
    y[6 + i] = static_cast<uint8_t>((L[i] & 0x0F) | ((L[i + 16] & 0x0F) << 4));
    qh |= ((L[i] & 0x10u) >> 4) << i;
    qh |= ((L[i + 16] & 0x10u) >> 4) << (i + 16);
  }
  __builtin_memcpy(y + 2, &qh, 4);
}

template <int HALF>
static bool chunk_q45_0(const Job& j, int64_t u0, int nb) {
  float xb[CH_L * 32];
  const bool bad = load_f32(j, u0 * 32, int64_t(nb) * 32, xb);
  const int64_t bytes = HALF == 8 ? 18 : 22;
  if (!j.qw) {  // quantize_row_q{4,5}_0_ref
    for (int b = 0; b < nb; ++b) {
      const float* x = xb + 32 * b;
      uint8_t* y = j.out + (u0 + b) * bytes;
      vf v[NV];
      const float amax = load_block_amax(x, v);
      float max = 0.0f;  // the first value of largest magnitude (the C loop's strict '<')
      if (amax > 0) {
        uint32_t at = 0;
        for (int k = 0; k < NV; ++k) at |= vmovmask(vabs(v[k]) == amax) << (k * W);
        max = x[__builtin_ctz(at)];
      }
      const float d = max / -HALF;
      const float id = d ? 1.0f / d : 0.0f;
      put16(y, f32_to_f16(d));
      vi L[NV];
      for (int k = 0; k < NV; ++k) {
        const vi t = __builtin_convertvector(v[k] * id + (HALF + 0.5f), vi);
        const vi s8 = (t << 24) >> 24;  // (int8_t)
        L[k] = splati(2 * HALF - 1) < s8 ? splati(2 * HALF - 1) : s8;
      }
      uint8_t* qs = y + (HALF == 8 ? 2 : 6);
      uint32_t qh = 0;
      for (int k = 0; k < NV / 2; ++k) {  // byte i: value i (low nibble), value i + 16 (high)
        const vi lo = L[k], hi = L[k + NV / 2];
        const vb q = __builtin_convertvector(HALF == 8 ? lo | (hi << 4) : (lo & 0xF) | ((hi & 0xF) << 4), vb);
        __builtin_memcpy(qs + k * W, &q, W);
      }
      if (HALF == 16) {  // bit i of qh: the 5th bit of value i
        for (int k = 0; k < NV; ++k) qh |= vmovmask((L[k] & 0x10) != 0) << (k * W);
        __builtin_memcpy(y + 2, &qh, 4);
      }
    }
    return bad;
  }
  // quantize_row_q{4,5}_0_impl: weight = qw * sqrtf(sigma2 + x*x), sigma2 of the whole row
  const int64_t bpr = j.n / 32;
  for (int b0 = 0; b0 < nb; b0 += W) {
    const int nl = nb - b0 < W ? nb - b0 : W;
    vf X[32], Wt[32];
    tile<32>(xb + 32 * b0, 32, nl, X);
    const float* qp[W];
    float sg[W];
    for (int l = 0; l < W; ++l) {
      const int64_t blk = u0 + b0 + (l < nl ? l : nl - 1), row = blk / bpr;
      qp[l] = qw_row(j, row) + (blk % bpr) * 32;
      sg[l] = j.row_sigma2[row];
    }
    tile_ptrs<32>(qp, nl, Wt);
    const vf sgv = loadv(sg);
    for (int i = 0; i < 32; ++i) Wt[i] = Wt[i] * vsqrt(sgv + X[i] * X[i]);
    const QxOut o = qx_search<32, HALF>(X, Wt);
    int32_t Lt[32][W];
    for (int i = 0; i < 32; ++i) {
      const vi l = vclamp(vnearest(o.acc_is * X[i]), -HALF, HALF - 1) + HALF;
      storevi(Lt[i], o.zero ? splati(0) : l);
    }
    float d[W];
    storev(d, o.scale);
    for (int l = 0; l < nl; ++l) {
      uint8_t L[32];
      for (int i = 0; i < 32; ++i) L[i] = static_cast<uint8_t>(Lt[i][l]);
      pack_q45_0<HALF>(L, f32_to_f16(d[l]), j.out + (u0 + b0 + l) * bytes);
    }
  }
  return bad;
}
