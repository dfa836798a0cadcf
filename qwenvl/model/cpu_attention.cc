// Fused attention within segments for MindSpore's CPU backend (Custom "aot" kernels, `qwenvl/model/cpu_attention.py`):
// softmax(q k^T * scale + mask) v, the mask given by segment ids (and causality) as `attention.SegmentAttention`
// describes them, with an online softmax over blocks of keys (flash attention's scheme): no (rows x keys) tensor
// is written, the backward pass recomputes each block's probabilities from the saved log-sum-exp.
//
// Layouts: q (B, H, L, D), k and v (B, Hkv, L, D) float32, segment ids (B, L) int32, scale (1,) float32;
// the output is (B, L, H, D) (the layout the output projection reads), the log-sum-exp (B, H, L). The backward
// pass returns dq (B, H, L, D) and dk, dv (B, Hkv, L, D), each summed over the kv head's query heads.
// D must be one of the instantiated head sizes (a multiple of 16 up to 128); the entry points return 2 otherwise.
// Vectors are GCC/Clang vector extensions of 16 floats: built with -march=native they are AVX-512 registers.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <climits>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int W = 16;            // floats per vector
constexpr int R = 4;             // query rows per pass (their key loads shared)
constexpr int KB = 64;           // keys per block (a multiple of W)
constexpr int NV = KB / W;
constexpr float MASKED = -1e30f;

typedef float vf __attribute__((vector_size(64), aligned(4), may_alias));
typedef int32_t vi __attribute__((vector_size(64), aligned(4), may_alias));

inline vf splat(float x) { return vf{} + x; }
inline vf load(const float* p) { return *reinterpret_cast<const vf*>(p); }
inline void store(float* p, vf x) { *reinterpret_cast<vf*>(p) = x; }
inline vi loadi(const int32_t* p) { return *reinterpret_cast<const vi*>(p); }

inline vf exp_nonpos(vf x) {  // e^x for x <= 0 (~2e-7 relative), 0 below -87
  vf clamped = x < -87.0f ? splat(-87.0f) : x;
  vf t = clamped * 1.4426950408889634f;
  vf n = (t + 12582912.0f) - 12582912.0f;  // round to nearest
  vf f = (t - n) * 0.6931471805599453f;
  vf p = 1.0f + f * (1.0f + f * (0.5f + f * (0.16666667f + f * (0.041666668f + f * (0.008333334f + f * 0.0013888889f)))));
  vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf result = p * (vf)bits;  // a vector cast reinterprets the bits
  return x < -87.0f ? splat(0.0f) : result;
}

// horizontal max / sum by halving: four shuffles instead of fifteen dependent scalar steps
template <typename Op>
inline float reduce(vf x, Op op) {
  x = op(x, __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));
  x = op(x, __builtin_shufflevector(x, x, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));
  x = op(x, __builtin_shufflevector(x, x, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));
  x = op(x, __builtin_shufflevector(x, x, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14));
  return x[0];
}
inline float hmax(vf x) {
  return reduce(x, [](vf a, vf b) { return a > b ? a : b; });
}
inline float hsum(vf x) {
  return reduce(x, [](vf a, vf b) { return a + b; });
}

inline int32_t row_segment(int32_t s) { return s < 0 ? -s - 1 : s; }

struct Shape {
  int64_t B, H, Hk, L, D;
};

// One (batch, kv head)'s keys in the layouts the loops read, padded to whole blocks (padding keys never match).
struct Keys {
  int64_t L, LP, D;
  std::vector<float> kt, vt;          // (D, LP)
  std::vector<int32_t> seg;           // (LP,)
  std::vector<int32_t> lo, hi;        // per block: min / max segment id

  void load(const float* k, const float* v, const int32_t* sg, int64_t length, int64_t dim, bool with_v) {
    L = length, D = dim, LP = (length + KB - 1) / KB * KB;
    kt.assign(D * LP, 0.0f);
    vt.assign(with_v ? D * LP : 0, 0.0f);
    seg.assign(LP, INT32_MIN);
    for (int64_t j = 0; j < L; ++j) {
      seg[j] = sg[j];
      for (int64_t d = 0; d < D; ++d) {
        kt[d * LP + j] = k[j * D + d];
        if (with_v) vt[d * LP + j] = v[j * D + d];
      }
    }
    int64_t nb = LP / KB;
    lo.assign(nb, INT32_MAX);
    hi.assign(nb, INT32_MIN);
    for (int64_t j = 0; j < L; ++j) {
      lo[j / KB] = std::min(lo[j / KB], sg[j]);
      hi[j / KB] = std::max(hi[j / KB], sg[j]);
    }
  }
};

// acc[r][:] = rows[r] . cols[:, j0 : j0 + KB] for R rows (R x D) against columns stored transposed (D x LP):
// each column vector is loaded once for all R rows
template <int D>
inline void block_products(const float* rows, const float* cols, int64_t LP, int64_t j0, vf acc[R][NV]) {
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c] = splat(0.0f);
  for (int d = 0; d < D; ++d) {
    const float* cd = cols + d * LP + j0;
    vf cv[NV];
    for (int c = 0; c < NV; ++c) cv[c] = load(cd + c * W);
    for (int r = 0; r < R; ++r) {
      vf x = splat(rows[r * D + d]);
      for (int c = 0; c < NV; ++c) acc[r][c] += x * cv[c];
    }
  }
}

// scores of rows [i0, i0 + R) (scaled queries qs: R x D) against block `blk`, masked, into s (R x KB); false if
// the block has no visible key for any of the rows
template <int D>
inline bool block_scores(const Keys& keys, const float* qs, const int32_t* rs, int64_t i0, int rows, bool causal,
                         int64_t blk, float* s) {
  const int64_t j0 = blk * KB;
  bool any = false;
  for (int r = 0; r < rows; ++r) any |= rs[r] >= keys.lo[blk] && rs[r] <= keys.hi[blk];
  if (!any) return false;
  vf acc[R][NV];
  block_products<D>(qs, keys.kt.data(), keys.LP, j0, acc);
  vi lane;
  for (int i = 0; i < W; ++i) lane[i] = i;
  for (int c = 0; c < NV; ++c) {
    vi sg = loadi(keys.seg.data() + j0 + c * W);
    vi pos = lane + static_cast<int32_t>(j0 + c * W);
    for (int r = 0; r < R; ++r) {
      vi keep = sg == rs[r];
      if (causal) keep &= pos <= static_cast<int32_t>(i0 + r);
      store(s + r * KB + c * W, keep ? acc[r][c] : splat(MASKED));
    }
  }
  return true;
}

template <int D>
void forward_rows(const Keys& keys, const float* v, const float* q, const int32_t* sg, float scale, bool causal,
                  int64_t i0, int rows, float* out, int64_t out_stride, float* lse) {
  constexpr int DV = D / W;
  float qs[R * D], s[R * KB];
  int32_t rs[R];
  for (int r = 0; r < R; ++r) {
    int rr = std::min(r, rows - 1);  // a short last pass repeats its last row
    rs[r] = row_segment(sg[i0 + rr]);
    for (int d = 0; d < D; ++d) qs[r * D + d] = q[(i0 + rr) * D + d] * scale;
  }
  vf o[R][DV];
  float m[R], l[R];
  for (int r = 0; r < R; ++r) {
    m[r] = MASKED, l[r] = 0.0f;
    for (int c = 0; c < DV; ++c) o[r][c] = splat(0.0f);
  }
  const int64_t last = causal ? i0 + rows - 1 : keys.L - 1;
  for (int64_t blk = 0; blk * KB <= last; ++blk) {
    if (!block_scores<D>(keys, qs, rs, i0, rows, causal, blk, s)) continue;
    for (int r = 0; r < R; ++r) {
      vf mx = load(s + r * KB);
      for (int c = 1; c < NV; ++c) mx = mx > load(s + r * KB + c * W) ? mx : load(s + r * KB + c * W);
      const float mb = hmax(mx);
      if (mb == MASKED) {
        for (int c = 0; c < NV; ++c) store(s + r * KB + c * W, splat(0.0f));
        continue;
      }
      const float mnew = std::max(m[r], mb);
      const float corr = mnew > m[r] ? std::exp(m[r] - mnew) : 1.0f;  // rescale only when the max moves
      vf sum = splat(0.0f);
      for (int c = 0; c < NV; ++c) {
        vf sc = load(s + r * KB + c * W);
        vf p = exp_nonpos(sc - mnew);
        p = sc == MASKED ? splat(0.0f) : p;
        store(s + r * KB + c * W, p);
        sum += p;
      }
      l[r] = l[r] * corr + hsum(sum);
      m[r] = mnew;
      if (corr != 1.0f)
        for (int c = 0; c < DV; ++c) o[r][c] *= corr;
    }
    const float* vb = v + blk * KB * D;
    const int64_t n = std::min<int64_t>(KB, keys.L - blk * KB);
    for (int64_t jj = 0; jj < n; ++jj) {
      vf vv[DV];
      for (int c = 0; c < DV; ++c) vv[c] = load(vb + jj * D + c * W);
      for (int r = 0; r < R; ++r) {
        vf p = splat(s[r * KB + jj]);
        for (int c = 0; c < DV; ++c) o[r][c] += p * vv[c];
      }
    }
  }
  for (int r = 0; r < rows; ++r) {
    const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
    for (int c = 0; c < DV; ++c) store(out + (i0 + r) * out_stride + c * W, o[r][c] * inv);
    lse[i0 + r] = l[r] > 0.0f ? m[r] + std::log(l[r]) : -MASKED;
  }
}

template <int D>
void forward(const Shape& sh, bool causal, const float* q, const float* k, const float* v, const int32_t* seg,
             float scale, float* out, float* lse) {
  const int64_t B = sh.B, H = sh.H, L = sh.L, rep = sh.H / sh.Hk;
  const int64_t chunks = (L + 63) / 64;
#pragma omp parallel
  {
    Keys keys;
    int64_t loaded = -1;
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < B * H * chunks; ++task) {
      const int64_t bh = task / chunks, b = bh / H, h = bh % H, kv = b * sh.Hk + h / rep;
      if (loaded != kv) {
        keys.load(k + kv * L * D, nullptr, seg + b * L, L, D, false);
        loaded = kv;
      }
      const int64_t start = (task % chunks) * 64, stop = std::min(L, start + 64);
      for (int64_t i0 = start; i0 < stop; i0 += R)
        forward_rows<D>(keys, v + kv * L * D, q + bh * L * D, seg + b * L, scale, causal, i0,
                        static_cast<int>(std::min<int64_t>(R, stop - i0)), out + (b * L * H + h) * D, H * D,
                        lse + bh * L);
    }
  }
}

template <int D>
void backward(const Shape& sh, bool causal, const float* q, const float* k, const float* v, const int32_t* seg,
              float scale, const float* out, const float* dout, const float* lse, float* dq, float* dk, float* dv) {
  constexpr int DV = D / W;
  const int64_t B = sh.B, H = sh.H, L = sh.L, rep = sh.H / sh.Hk;
#pragma omp parallel
  {
    Keys keys;
    int64_t loaded = -1;
    std::vector<float> dka, dva;
#pragma omp for schedule(dynamic)
    for (int64_t kv = 0; kv < B * sh.Hk; ++kv) {  // a kv head and its query heads: dk, dv summed over the group
      const int64_t b = kv / sh.Hk;
      const int32_t* sg = seg + b * L;
      if (loaded != kv) {
        keys.load(k + kv * L * D, v + kv * L * D, sg, L, D, true);
        loaded = kv;
      }
      dka.assign(keys.LP * D, 0.0f);
      dva.assign(keys.LP * D, 0.0f);
      const float* kb = k + kv * L * D;
      const int64_t row_blocks = (L + R - 1) / R;
      for (int64_t step = 0; step < rep * row_blocks; ++step) {
        const int64_t h = (kv % sh.Hk) * rep + step / row_blocks, bh = b * H + h, i0 = step % row_blocks * R;
        const int rows = static_cast<int>(std::min<int64_t>(R, L - i0));
        float qs[R * D], g[R * D], s[R * KB], ds[R * KB], li[R], delta[R];
        int32_t rs[R];
        vf dqa[R][DV];
        for (int r = 0; r < R; ++r) {
          const bool real = r < rows;
          const int64_t row = bh * L + i0 + std::min(r, rows - 1);
          const int64_t at = ((b * L + i0 + std::min(r, rows - 1)) * H + h) * D;  // in (B, L, H, D)
          rs[r] = row_segment(sg[i0 + std::min(r, rows - 1)]);
          float dl = 0.0f;
          for (int d = 0; d < D; ++d) {
            qs[r * D + d] = q[row * D + d] * scale;
            g[r * D + d] = real ? dout[at + d] : 0.0f;
            dl += g[r * D + d] * out[at + d];
          }
          delta[r] = dl;
          li[r] = lse[row];
          for (int c = 0; c < DV; ++c) dqa[r][c] = splat(0.0f);
        }
        const int64_t last = causal ? i0 + rows - 1 : L - 1;
        for (int64_t blk = 0; blk * KB <= last; ++blk) {
          if (!block_scores<D>(keys, qs, rs, i0, rows, causal, blk, s)) continue;
          const int64_t j0 = blk * KB;
          // dP = dO V^T for the block, then dS = P (dP - delta)
          vf dp[R][NV];
          block_products<D>(g, keys.vt.data(), keys.LP, j0, dp);
          for (int r = 0; r < R; ++r)
            for (int c = 0; c < NV; ++c) {
              vf sc = load(s + r * KB + c * W);
              vf p = exp_nonpos(sc - li[r]);
              p = sc == MASKED ? splat(0.0f) : p;
              store(s + r * KB + c * W, p);
              store(ds + r * KB + c * W, p * (dp[r][c] - delta[r]));
            }
          const int64_t n = std::min<int64_t>(KB, L - j0);
          vf qv[R][DV], gv[R][DV];  // in registers for the key loop (its stores could alias the arrays)
          for (int r = 0; r < R; ++r)
            for (int c = 0; c < DV; ++c) {
              qv[r][c] = load(qs + r * D + c * W);
              gv[r][c] = load(g + r * D + c * W);
            }
          for (int64_t jj = 0; jj < n; ++jj) {
            vf kk[DV], dkj[DV], dvj[DV];
            float* dkp = dka.data() + (j0 + jj) * D;
            float* dvp = dva.data() + (j0 + jj) * D;
            for (int c = 0; c < DV; ++c) {
              kk[c] = load(kb + (j0 + jj) * D + c * W);
              dkj[c] = load(dkp + c * W);
              dvj[c] = load(dvp + c * W);
            }
            for (int r = 0; r < R; ++r) {
              vf dsv = splat(ds[r * KB + jj]), pv = splat(s[r * KB + jj]);
              for (int c = 0; c < DV; ++c) {
                dqa[r][c] += dsv * kk[c];
                dkj[c] += dsv * qv[r][c];
                dvj[c] += pv * gv[r][c];
              }
            }
            for (int c = 0; c < DV; ++c) {
              store(dkp + c * W, dkj[c]);
              store(dvp + c * W, dvj[c]);
            }
          }
        }
        for (int r = 0; r < rows; ++r)
          for (int c = 0; c < DV; ++c) store(dq + (bh * L + i0 + r) * D + c * W, dqa[r][c] * scale);
      }
      std::memcpy(dk + kv * L * D, dka.data(), sizeof(float) * L * D);
      std::memcpy(dv + kv * L * D, dva.data(), sizeof(float) * L * D);
    }
  }
}

Shape shape_of(int64_t** shapes) { return Shape{shapes[0][0], shapes[0][1], shapes[1][1], shapes[0][2], shapes[0][3]}; }

// run(std::integral_constant<int, D>) for the instantiated head size D: 0, or 2 for another size
template <typename Run>
int with_head_dim(int64_t dim, Run run) {
  switch (dim) {
#define CASE(N) \
  case N: run(std::integral_constant<int, N>{}); return 0;
    CASE(16) CASE(32) CASE(48) CASE(64) CASE(80) CASE(96) CASE(128)
#undef CASE
    default: return 2;
  }
}

// forward: q, k, v, seg, scale -> out, lse; backward: q, k, v, seg, scale, out, dout, lse -> dq, dk, dv
template <bool CAUSAL, bool BACKWARD>
int entry(int nparam, void** p, int64_t** shapes) {
  if (nparam != (BACKWARD ? 11 : 7)) return 1;
  const Shape sh = shape_of(shapes);
  auto* f = static_cast<float**>(static_cast<void*>(p));
  const auto* seg = static_cast<const int32_t*>(p[3]);
  return with_head_dim(sh.D, [&](auto dim) {
    if constexpr (BACKWARD)
      backward<dim()>(sh, CAUSAL, f[0], f[1], f[2], seg, *f[4], f[5], f[6], f[7], f[8], f[9], f[10]);
    else
      forward<dim()>(sh, CAUSAL, f[0], f[1], f[2], seg, *f[4], f[5], f[6]);
  });
}

}  // namespace

#define ENTRY(NAME, BODY)                                                                                        \
  extern "C" int NAME(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes, void* stream, \
                      void* extra) {                                                                             \
    return BODY(nparam, params, shapes);                                                                         \
  }
ENTRY(attention_forward_causal, (entry<true, false>))
ENTRY(attention_forward_full, (entry<false, false>))
ENTRY(attention_backward_causal, (entry<true, true>))
ENTRY(attention_backward_full, (entry<false, true>))

// Shape and type inference in C++ (MindSpore calls `<kernel>InferShape` / `<kernel>InferType` when the Custom op has
// no Python infer functions): graphs whose outputs MindSpore types at run time compile their kernels where a Python
// infer function cannot be called ("The prim is not a PrimitivePy").
enum TypeId : int {};

static std::vector<std::vector<int64_t>> forward_shapes(int64_t** shapes) {
  const int64_t* q = shapes[0];
  return {{q[0], q[2], q[1], q[3]}, {q[0], q[1], q[2]}};  // out (B, L, H, D), lse (B, H, L)
}

static std::vector<std::vector<int64_t>> backward_shapes(int64_t** shapes) {
  return {std::vector<int64_t>(shapes[0], shapes[0] + 4), std::vector<int64_t>(shapes[1], shapes[1] + 4),
          std::vector<int64_t>(shapes[2], shapes[2] + 4)};  // dq like q, dk like k, dv like v
}

#define INFER(NAME, SHAPES, OUTPUTS)                                                                         \
  extern "C" std::vector<std::vector<int64_t>> NAME##InferShape(int* ndims, int64_t** shapes, void* extra) { \
    return SHAPES(shapes);                                                                                   \
  }                                                                                                          \
  extern "C" std::vector<TypeId> NAME##InferType(std::vector<TypeId> types, void* extra) {                   \
    return std::vector<TypeId>(OUTPUTS, types[0]); /* float32, as q */                                       \
  }
INFER(attention_forward_causal, forward_shapes, 2)
INFER(attention_forward_full, forward_shapes, 2)
INFER(attention_backward_causal, backward_shapes, 3)
INFER(attention_backward_full, backward_shapes, 3)
