// mla-gen family `narrow`: what its two kernels share (narrow.cuh for 16-bit caches, narrow_e4m3.cuh for both
// fp8 formats): a warpgroup's row state, its softmax over a tile's tokens, and the segment's
// epilogue. Layout of a thread's values (wgmma m64nRN accumulators with the kv tokens on M): score / O^T
// element [4 j + 2 h + e] is token (or O^T row) 16 wq + g + 8 h and query row 8 j + 2 tq + e of the block.
#pragma once
#include "sm90.cuh"

namespace mla_gen {
namespace narrow {

using namespace sm90;

// A warpgroup's running state of its rows: the lazy reference max m (log2 domain), the row sums l of this
// thread's tokens, and O^T (MT m-tiles of 64 output columns, in the kernel's column order).
template <int RN, int MT>
struct RowState {
  static constexpr int J = RN / 8, SV = RN / 2;
  float m[J][2], l[J][2];
  float o[MT][SV];
  __device__ __forceinline__ void reset() {
#pragma unroll
    for (int j = 0; j < J; ++j) m[j][0] = m[j][1] = -INFINITY, l[j][0] = l[j][1] = 0.f;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int i = 0; i < SV; ++i) o[mt][i] = 0.f;
  }
};

// Where a thread of a consumer warpgroup stands: warp wq of warpgroup wg, lane g * 4 + tq, its warpgroup's
// named barrier, and the warp maxima / sums exchange array [2 wg][4 warps][RN] fp32.
struct WarpPlace {
  int wg, wq, g, tq, bar_id;
  uint32_t s_wred;
};

// One tile's softmax over its 64 tokens for the scores x, against the lazy reference m: a row moves only when
// its tile max exceeds m by more than 8 (log2 domain), then to that max (P = 2^(x scale - m) <= 2^8 otherwise;
// a row that has seen nothing keeps reference 0). Masks the tile when it reaches the causal / length limit
// (row r, query token r / H, sees tokens before mask_from + r / H; a padding row those before len), writes
// P^T through store_p(row, token, h, p), and ends with the warpgroup's barrier (P^T of all 4 warps stored);
// adds the rows' sums to st.l.
template <int H, int RN, int MT, class StoreP>
__device__ __forceinline__ void softmax_tile(float (&x)[RN / 2], RowState<RN, MT>& st, const WarpPlace& w, int t_tile,
                                             int mask_from, int len, int row0, int rows, float scale_log2,
                                             StoreP&& store_p) {
  constexpr int J = RN / 8, kWgThreads = 128;
  constexpr float kRescaleLog2 = 8.f;
  if (t_tile + 64 > mask_from) {  // the last tile(s): per-row causal / length limit
    const int r_lane = opaque(row0 + 2 * w.tq);
#pragma unroll
    for (int j = 0; j < J; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int r = r_lane + 8 * j + e;
        const int limit = r < rows ? mask_from + r / H : len;
#pragma unroll
        for (int h = 0; h < 2; ++h)
          if (t_tile + 16 * w.wq + w.g + 8 * h >= limit) x[4 * j + 2 * h + e] = -INFINITY;
      }
  }
  // tile max per row over this warp's 16 tokens (own 2, then lanes lane / 4); the scale is positive
  float wmax[J][2];
  bool move = false;
#pragma unroll
  for (int j = 0; j < J; ++j)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      float v = fmaxf(x[4 * j + e], x[4 * j + 2 + e]);
      v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 4));
      v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 8));
      v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 16));
      wmax[j][e] = v * scale_log2;
      move |= wmax[j][e] > st.m[j][e] + kRescaleLog2;
    }
  if (w.g == 0) {
#pragma unroll
    for (int j = 0; j < J; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e)
        sts_f32(w.s_wred + 4 * ((w.wg * 4 + w.wq) * RN + 8 * j + 2 * w.tq + e), wmax[j][e]);
  }
  float lsum[J][2];
  auto make_p = [&]() {  // P^T of this warp's tokens against m -> shared memory, lsum
#pragma unroll
    for (int j = 0; j < J; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float neg_m = st.m[j][e] == -INFINITY ? 0.f : -st.m[j][e];
        lsum[j][e] = 0.f;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float pv = exp2_scaled(x[4 * j + 2 * h + e], scale_log2, neg_m);
          lsum[j][e] += pv;
          store_p(8 * j + 2 * w.tq + e, 16 * w.wq + w.g + 8 * h, h, pv);
        }
      }
    fence_proxy_async();  // P^T -> visible to wgmma
  };
  make_p();
  // P^T and warp maxima published; some row must move (rare): the slow path
  if (named_barrier_or(w.bar_id, kWgThreads, move)) {
    float alpha[J][2];
    bool any = false;
#pragma unroll
    for (int j = 0; j < J; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int r = 8 * j + 2 * w.tq + e;
        float t = lds_f32(w.s_wred + 4 * ((w.wg * 4) * RN + r));
#pragma unroll
        for (int q = 1; q < 4; ++q) t = fmaxf(t, lds_f32(w.s_wred + 4 * ((w.wg * 4 + q) * RN + r)));
        alpha[j][e] = 1.f;
        if (t > st.m[j][e] + kRescaleLog2) {  // the same decision in every thread of the warpgroup
          alpha[j][e] = fast_exp2(st.m[j][e] - t);  // 0 when m was -inf
          st.m[j][e] = t;
          st.l[j][e] *= alpha[j][e];
          any = true;
        }
      }
    if (any) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int j = 0; j < J; ++j)
#pragma unroll
          for (int i = 0; i < 4; ++i) st.o[mt][4 * j + i] *= alpha[j][i & 1];
    }
    make_p();
  }
  named_barrier_sync(w.bar_id, kWgThreads);  // the recomputed P^T of all 4 warps (always: see the caller's loop)
#pragma unroll
  for (int j = 0; j < J; ++j) st.l[j][0] += lsum[j][0], st.l[j][1] += lsum[j][1];
}

// The segment's epilogue, by the 256 threads of the two consumer warpgroups (sync(): their CTA barrier): row
// sums over lanes and warps, the two warpgroups' (m, l, O) merged by log-sum-exp through s_m [2][RN] and the
// exchange array, O staged row-major [RN][C + 4] fp32 at s_o (o[mt][4 j + i] is output column col(mt, i)),
// normalised (times out_scale, an fp8_e4m3 cache's scale) and written: the request's out rows and lse, or the
// split's partial rows and lse. kTwoAreas: each warpgroup stages its scaled O in its own area (WG 1's right after
// WG 0's) and the row writer adds the two, one barrier and a read-modify-write pass fewer than one shared area
// (PERF.md, twenty-third session: the pass took 0.7 of the epilogue's 2.9 us).
template <class Cfg, int RN, int MT, bool kTwoAreas, class Col, class Sync>
__device__ __forceinline__ void write_segment(const DecodeParams& p, const Segment& seg, RowState<RN, MT>& st,
                                              const WarpPlace& w, uint32_t s_m, uint32_t s_lse, uint32_t s_o,
                                              float out_scale, Col&& col, Sync&& sync) {
  using OutT = typename Cfg::OutType;
  using Out2 = typename Vec2<OutT>::type;
  constexpr int J = RN / 8, C = Cfg::kCkvDim, kOStride = C + 4;
  const int rows = p.s_q * Cfg::kNumHeads, row0 = blockIdx.x * RN, tid = threadIdx.x;
#pragma unroll
  for (int j = 0; j < J; ++j)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      float v = st.l[j][e];
      v += __shfl_xor_sync(0xffffffffu, v, 4);
      v += __shfl_xor_sync(0xffffffffu, v, 8);
      v += __shfl_xor_sync(0xffffffffu, v, 16);
      st.l[j][e] = v;
    }
  sync();  // both warpgroups are done with their tiles: the exchange arrays (and in narrow.cuh the stages) are free
  if (w.g == 0) {
#pragma unroll
    for (int j = 0; j < J; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int r = 8 * j + 2 * w.tq + e;
        sts_f32(w.s_wred + 4 * ((w.wg * 4 + w.wq) * RN + r), st.l[j][e]);
        if (w.wq == 0) sts_f32(s_m + 4 * (w.wg * RN + r), st.m[j][e]);
      }
  }
  sync();
  float scale_own[J][2];
#pragma unroll
  for (int j = 0; j < J; ++j)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int r = 8 * j + 2 * w.tq + e;
      float mw[2], lw[2];
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        mw[k] = lds_f32(s_m + 4 * (k * RN + r));
        lw[k] = 0.f;
#pragma unroll
        for (int q = 0; q < 4; ++q) lw[k] += lds_f32(w.s_wred + 4 * ((k * 4 + q) * RN + r));
      }
      const float m = fmaxf(mw[0], mw[1]);
      const float a0 = mw[0] == -INFINITY ? 0.f : fast_exp2(mw[0] - m);
      const float a1 = mw[1] == -INFINITY ? 0.f : fast_exp2(mw[1] - m);
      const float l = a0 * lw[0] + a1 * lw[1];
      scale_own[j][e] = l > 0.f ? __fdividef(out_scale * (w.wg == 0 ? a0 : a1), l) : 0.f;  // l < 2^126
      if (w.wg == 0 && w.wq == 0 && w.g == 0) sts_f32(s_lse + 4 * r, row_lse(l, m));
    }
  // WG 0 stores its O rows, WG 1 adds its own (kTwoAreas: stores them in its own area)
  constexpr uint32_t kAreaBytes = RN * kOStride * 4;
  const uint32_t s_own = kTwoAreas ? s_o + w.wg * kAreaBytes : s_o;
  auto o_addr = [&](int mt, int j, int i) {  // O[row 8 j + 2 tq + (i & 1)][col(mt, i)]
    return s_own + 4 * ((8 * j + 2 * w.tq + (i & 1)) * kOStride + col(mt, i));
  };
  if (kTwoAreas || w.wg == 0) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int j = 0; j < J; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) sts_f32(o_addr(mt, j, i), st.o[mt][4 * j + i] * scale_own[j][i & 1]);
  }
  sync();
  if (!kTwoAreas) {
    if (w.wg == 1) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int j = 0; j < J; ++j)
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const uint32_t a = o_addr(mt, j, i);
            sts_f32(a, lds_f32(a) + st.o[mt][4 * j + i] * scale_own[j][i & 1]);
          }
    }
    sync();
  }
  // each thread 4 consecutive columns of a row
  constexpr int kQuads = C / 4;
  for (int idx = tid; idx < RN * kQuads; idx += 256) {
    const int rl = idx / kQuads, c = 4 * (idx % kQuads);
    const int r = row0 + rl;
    if (r >= rows) continue;
    const uint32_t at = s_o + 4 * (rl * kOStride + c);
    const uint4 u = lds_v4(at);
    float4 v = make_float4(__uint_as_float(u.x), __uint_as_float(u.y), __uint_as_float(u.z), __uint_as_float(u.w));
    if (kTwoAreas) {
      const uint4 u1 = lds_v4(at + kAreaBytes);
      v.x += __uint_as_float(u1.x), v.y += __uint_as_float(u1.y), v.z += __uint_as_float(u1.z);
      v.w += __uint_as_float(u1.w);
    }
    const float lse = lds_f32(s_lse + 4 * rl);
    if (seg.split) {
      float* dst = ResultRows<Cfg>::partial(p, seg.slot, r) + c;
      *reinterpret_cast<float4*>(dst) = v;
      if (c == 0) *ResultRows<Cfg>::partial_lse(p, seg.slot, r) = lse;
    } else {
      OutT* dst = ResultRows<Cfg>::out(p, seg.req, r) + c;
      reinterpret_cast<Out2*>(dst)[0] = from_float2<OutT>(make_float2(v.x, v.y));
      reinterpret_cast<Out2*>(dst)[1] = from_float2<OutT>(make_float2(v.z, v.w));
      if (p.lse && c == 0) *ResultRows<Cfg>::lse(p, seg.req, r) = lse;
    }
  }
  sync();  // the next segment rewrites Q, the staging and the exchange arrays
}

}  // namespace narrow
}  // namespace mla_gen
