// K-quants (Q4_K, Q5_K, Q6_K) of ggml_quant_body.h: a chunk of super-blocks at a time, the
// scale searches one sub-block per lane, then per super-block the scale codes and the final
// re-quantization with the stored (fp16, 6/8-bit) scales, element-wise in vectors.

// L = clamp(nearest_int((x + dm) / d)) of 32 values, or the search's L where d == 0.
template <int NMAX>
static inline void k45_requant(const float* x, float d, float dm, float acc_is, float acc_mn, uint8_t* L) {
  if (!d) {
    for (int i = 0; i < 32; ++i) {
      int l = nearest_s(acc_is * (x[i] - acc_mn));
      L[i] = static_cast<uint8_t>(l < 0 ? 0 : l > NMAX ? NMAX : l);
    }
    return;
  }
  for (int i = 0; i < 32; i += W) {
    const vb b = __builtin_convertvector(vclamp(vnearest((loadv(x + i) + dm) / d), 0, NMAX), vb);
    __builtin_memcpy(L + i, &b, W);
  }
}

template <int NMAX>
static void k45_finish(const float* x, const uint8_t* ls, const uint8_t* lm, uint16_t d16, uint16_t m16,
                       const float* acc_is, const float* acc_mn, uint8_t* y) {
  uint8_t s[12];
  for (int j = 0; j < 8; ++j) {
    if (j < 4) {
      s[j] = ls[j];
      s[j + 4] = lm[j];
    } else {
      s[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4);
      s[j - 4] |= ((ls[j] >> 4) << 6);
      s[j] |= ((lm[j] >> 4) << 6);
    }
  }
  put16(y, d16);
  put16(y + 2, m16);
  __builtin_memcpy(y + 4, s, 12);
  const float dd = f16_to_f32(d16), dmf = f16_to_f32(m16);
  uint8_t L[QK_K];
  for (int j = 0; j < 8; ++j) {
    uint8_t sc, m;  // get_scale_min_k4
    if (j < 4) {
      sc = s[j] & 63;
      m = s[j + 4] & 63;
    } else {
      sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
      m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
    const float d = dd * sc;
    k45_requant<NMAX>(x + 32 * j, d, d ? dmf * m : 0.f, acc_is[j], acc_mn[j], L + 32 * j);
  }
  if (NMAX == 15) {
    uint8_t* q = y + 16;
    for (int j = 0; j < QK_K; j += 64, q += 32)
      for (int l = 0; l < 32; ++l) q[l] = L[j + l] | (L[j + l + 32] << 4);
  } else {
    uint8_t* qh = y + 16;
    uint8_t* ql = y + 48;
    for (int l = 0; l < 32; ++l) qh[l] = 0;
    uint8_t m1 = 1, m2 = 2;
    for (int n = 0; n < QK_K; n += 64, ql += 32) {
      for (int l = 0; l < 32; ++l) {
        int l1 = L[n + l], l2 = L[n + l + 32];
        if (l1 > 15) { l1 -= 16; qh[l] |= m1; }
        if (l2 > 15) { l2 -= 16; qh[l] |= m2; }
        ql[l] = static_cast<uint8_t>(l1 | (l2 << 4));
      }
      m1 <<= 2;
      m2 <<= 2;
    }
  }
}

// quantize_row_q{4,5}_K_ref (no qw) or quantize_row_q{4,5}_K_impl, super-blocks [u0, u0 + nsb)
template <int NMAX>
static bool chunk_k45(const Job& j, int64_t u0, int nsb) {
  float xb[CH_K * QK_K];
  const bool bad = load_f32(j, u0 * QK_K, int64_t(nsb) * QK_K, xb);
  const bool imp = j.qw != nullptr;
  float scales[CH_K * 8], mins[CH_K * 8], ais[CH_K * 8], amn[CH_K * 8], sw[CH_K * 8], sig[CH_K];
  // trial numerators rmin + rdelta*is + nmax of the ref (q4: -1, 0.1, 20; q5: -0.5, 0.1, 15)
  // and of the impl (-0.9, 0.05, 36)
  float steps[37];
  const float rmin = imp ? -0.9f : NMAX == 15 ? -1.f : -0.5f, rdelta = imp ? 0.05f : 0.1f;
  const int nsteps = (imp ? 36 : NMAX == 15 ? 20 : 15) + 1;
  for (int is = 0; is < nsteps; ++is) steps[is] = rmin + rdelta * is + NMAX;
  const int64_t bpr = j.n / QK_K;
  if (imp) {  // sigma2 = 2 * sum(x*x) / 256 over each super-block, the sums interleaved
    float acc[CH_K] = {};
    for (int l = 0; l < QK_K; ++l)
      for (int s = 0; s < nsb; ++s) acc[s] += xb[s * QK_K + l] * xb[s * QK_K + l];
    for (int s = 0; s < nsb; ++s) sig[s] = 2 * acc[s] / QK_K;
  }
  const int ng = nsb * 8;
  for (int g0 = 0; g0 < ng; g0 += W) {
    const int nl = ng - g0 < W ? ng - g0 : W;
    vf X[32], Wt[32];
    tile<32>(xb + g0 * 32, 32, nl, X);
    QkxOut o;
    if (!imp) {
      vf s2 = {};
      for (int i = 0; i < 32; ++i) s2 += X[i] * X[i];
      const vf av = vsqrt(s2 / 32.f);
      for (int i = 0; i < 32; ++i) Wt[i] = av + vabs(X[i]);
      o = qkx_search<NMAX, false>(X, Wt, steps, nsteps);
    } else {
      const float* qp[W];
      float sg[W];
      for (int l = 0; l < W; ++l) {
        const int g = g0 + (l < nl ? l : nl - 1);
        const int64_t sb = u0 + g / 8;
        qp[l] = qw_row(j, sb / bpr) + (sb % bpr) * QK_K + (g % 8) * 32;
        sg[l] = sig[g / 8];
      }
      vf Q[32];
      tile_ptrs<32>(qp, nl, Q);
      const vf sgv = loadv(sg);
      vf s = {};
      for (int i = 0; i < 32; ++i) {
        Wt[i] = Q[i] * vsqrt(sgv + X[i] * X[i]);
        s += Wt[i];
      }
      float st[W];
      storev(st, s);
      for (int l = 0; l < nl; ++l) sw[g0 + l] = st[l];
      o = qkx_search<NMAX, true>(X, Wt, steps, nsteps);
    }
    float t[4][W];
    storev(t[0], o.scale);
    storev(t[1], o.the_min);
    storev(t[2], o.acc_is);
    storev(t[3], o.acc_mn);
    for (int l = 0; l < nl; ++l) {
      scales[g0 + l] = t[0][l];
      mins[g0 + l] = t[1][l];
      ais[g0 + l] = t[2][l];
      amn[g0 + l] = t[3][l];
    }
  }
  for (int s = 0; s < nsb; ++s) {
    const float* sc = scales + 8 * s;
    const float* mi = mins + 8 * s;
    uint8_t ls[8], lm[8];
    uint16_t d16, m16;
    if (!imp) {
      float max_scale = 0, max_min = 0;
      for (int k = 0; k < 8; ++k) {
        if (sc[k] > max_scale) max_scale = sc[k];
        if (mi[k] > max_min) max_min = mi[k];
      }
      const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
      const float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
      for (int k = 0; k < 8; ++k) {
        const uint8_t a = static_cast<uint8_t>(nearest_s(inv_scale * sc[k]));
        const uint8_t b = static_cast<uint8_t>(nearest_s(inv_min * mi[k]));
        ls[k] = 63 < a ? 63 : a;
        lm[k] = 63 < b ? 63 : b;
      }
      d16 = f32_to_f16(max_scale / 63.f);
      m16 = f32_to_f16(max_min / 63.f);
    } else {
      const float d_block = make_qp(8, 63, sc, ls, sw + 8 * s);
      const float m_block = make_qp(8, 63, mi, lm, sw + 8 * s);
      if (NMAX == 31) {  // quantize_row_q5_K_impl clamps the codes, q4_K_impl does not
        for (int k = 0; k < 8; ++k) {
          ls[k] = 63 < ls[k] ? 63 : ls[k];
          lm[k] = 63 < lm[k] ? 63 : lm[k];
        }
      }
      d16 = f32_to_f16(d_block);
      m16 = f32_to_f16(m_block);
    }
    k45_finish<NMAX>(xb + s * QK_K, ls, lm, d16, m16, ais + 8 * s, amn + 8 * s,
                     j.out + (u0 + s) * unit_bytes(j.type));
  }
  return bad;
}

// quantize_row_q6_K_ref (no qw) or quantize_row_q6_K_impl (make_qx_quants with qw itself)
static bool chunk_q6k(const Job& j, int64_t u0, int nsb) {
  float xb[CH_K * QK_K];
  const bool bad = load_f32(j, u0 * QK_K, int64_t(nsb) * QK_K, xb);
  float scales[CH_K * 16], ais[CH_K * 16];
  uint8_t zf[CH_K * 16];
  const int64_t bpr = j.n / QK_K;
  const int ng = nsb * 16;
  for (int g0 = 0; g0 < ng; g0 += W) {
    const int nl = ng - g0 < W ? ng - g0 : W;
    vf X[16], Wt[16];
    tile<16>(xb + g0 * 16, 16, nl, X);
    if (j.qw) {
      const float* qp[W];
      for (int l = 0; l < W; ++l) {
        const int g = g0 + (l < nl ? l : nl - 1);
        const int64_t sb = u0 + g / 16;
        qp[l] = qw_row(j, sb / bpr) + (sb % bpr) * QK_K + (g % 16) * 16;
      }
      tile_ptrs<16>(qp, nl, Wt);
    } else {
      for (int i = 0; i < 16; ++i) Wt[i] = X[i] * X[i];
    }
    const QxOut o = qx_search<16, 32>(X, Wt);
    float t[2][W];
    int32_t z[W];
    storev(t[0], o.scale);
    storev(t[1], o.acc_is);
    storevi(z, o.zero);
    for (int l = 0; l < nl; ++l) {
      scales[g0 + l] = t[0][l];
      ais[g0 + l] = t[1][l];
      zf[g0 + l] = z[l] != 0;
    }
  }
  for (int s = 0; s < nsb; ++s) {
    uint8_t* y = j.out + (u0 + s) * 210;
    const float* sc = scales + 16 * s;
    const float* x = xb + s * QK_K;
    float max_scale = 0, max_abs = 0;
    for (int ib = 0; ib < 16; ++ib) {
      const float a = __builtin_fabsf(sc[ib]);
      if (a > max_abs) {
        max_abs = a;
        max_scale = sc[ib];
      }
    }
    if (max_abs < kEps) {
      for (int b = 0; b < 210; ++b) y[b] = 0;
      continue;
    }
    const float iscale = -128.f / max_scale;
    const uint16_t d16 = f32_to_f16(1 / iscale);
    int8_t q8[16];
    for (int ib = 0; ib < 16; ++ib) {
      const int v = nearest_s(iscale * sc[ib]);
      q8[ib] = static_cast<int8_t>(127 < v ? 127 : v);
    }
    const float dd = f16_to_f32(d16);
    uint8_t L[QK_K];
    for (int g = 0; g < 16; ++g) {
      const float d = dd * q8[g];
      const float* xg = x + 16 * g;
      if (!d) {
        const int k = 16 * s + g;
        for (int i = 0; i < 16; ++i) {
          int l = nearest_s(ais[k] * xg[i]);
          l = l < -32 ? -32 : l > 31 ? 31 : l;
          L[16 * g + i] = zf[k] ? 0 : static_cast<uint8_t>(l + 32);
        }
        continue;
      }
      for (int i = 0; i < 16; i += W) {
        const vi l = vclamp(vnearest(loadv(xg + i) / d), -32, 31) + 32;
        const vb b = __builtin_convertvector(l, vb);
        __builtin_memcpy(L + 16 * g + i, &b, W);
      }
    }
    uint8_t* ql = y;
    uint8_t* qh = y + 128;
    for (int jj = 0; jj < QK_K; jj += 128, ql += 64, qh += 32) {
      for (int l = 0; l < 32; ++l) {
        const uint8_t* Lj = L + jj + l;
        ql[l] = (Lj[0] & 0xF) | ((Lj[64] & 0xF) << 4);
        ql[l + 32] = (Lj[32] & 0xF) | ((Lj[96] & 0xF) << 4);
        qh[l] = (Lj[0] >> 4) | ((Lj[32] >> 4) << 2) | ((Lj[64] >> 4) << 4) | ((Lj[96] >> 4) << 6);
      }
    }
    __builtin_memcpy(y + 192, q8, 16);
    put16(y + 208, d16);
  }
  return bad;
}
