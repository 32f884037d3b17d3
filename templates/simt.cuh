// mla-gen family `simt`: CUDA cores, fp32 accumulation, any arch (the correctness baseline).
//
// Grid (row blocks, parts). A CTA takes kBlockM packed query rows (row = s * heads + h) and walks
// the kv segments of its part: per kBlockN-token tile it loads the tile into shared memory
// (16-byte vectors, page by page), computes scores with one warp per token (lanes split the
// ckv+rope dims), runs the online softmax with one warp per row, and accumulates P.V with each
// thread owning column pairs of every row.
#pragma once
#include "common.cuh"

namespace mla_gen {
namespace simt {

template <class Cfg>
struct Layout {
  static constexpr int kDim = Cfg::kCkvDim + Cfg::kRopeDim;
  static constexpr int kThreads = 32 * Cfg::kWarps;
  static constexpr int kQBytes = Cfg::kBlockM * kDim * 4;
  static constexpr int kKVBytes = Cfg::kBlockN * kDim * sizeof(typename Cfg::KVType);
  static constexpr int kSBytes = Cfg::kBlockM * Cfg::kBlockN * 4;
  static constexpr int kRowBytes = 3 * Cfg::kBlockM * 4;
  static constexpr int kSmemBytes = kQBytes + kKVBytes + kSBytes + kRowBytes;
  static_assert(kSmemBytes == Cfg::kSmemBytes, "shared memory layout disagrees with VariantSpec.smem_bytes");
  static_assert(Cfg::kCkvDim % (2 * kThreads) == 0, "each thread owns whole column pairs");
  static_assert(kDim % 8 == 0, "16-byte vector loads");
  static_assert(Cfg::kBlockN % 4 == 0 && Cfg::kBlockN <= 64, "tile tokens: multiple of 4, at most 64");
};

template <class Cfg>
__global__ void __launch_bounds__(32 * Cfg::kWarps, 1)
decode_kernel(const __grid_constant__ DecodeParams p) {
  using L = Layout<Cfg>;
  using Q = typename Cfg::QType;
  using KV = typename Cfg::KVType;
  using KV2 = typename Vec2<KV>::type;
  using Q2 = typename Vec2<Q>::type;
  static_assert(Cfg::kKVFormat == KVFormat::kKV16, "no fp8 cache path in this family (generator/spec.py FP8_FAMILIES)");
  constexpr int H = Cfg::kNumHeads, C = Cfg::kCkvDim, D = L::kDim;
  constexpr int M = Cfg::kBlockM, N = Cfg::kBlockN, W = Cfg::kWarps, T = L::kThreads;
  constexpr int kPairs = D / 2;                 // bf16x2 pairs per token
  constexpr int kPairIters = (kPairs + 31) / 32;
  constexpr int kColPairs = C / (2 * T);        // output column pairs per thread
  constexpr int kChunks = D / 8;                // 16-byte chunks per token
  constexpr int kCkvChunks = C / 8;

  extern __shared__ float4 smem_f4[];
  float* q_s = reinterpret_cast<float*>(smem_f4);                               // [M][D] fp32
  KV* kv_s = reinterpret_cast<KV*>(reinterpret_cast<char*>(q_s) + L::kQBytes);  // [N][D]
  float* s_s = reinterpret_cast<float*>(reinterpret_cast<char*>(kv_s) + L::kKVBytes);  // [M][N]
  float* row_max = s_s + M * N;  // running max, log2 domain
  float* row_sum = row_max + M;
  float* row_alpha = row_sum + M;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int rows = p.s_q * H;
  const int row0 = blockIdx.x * M;
  const int part = blockIdx.y;
  const float scale_log2 = p.sm_scale * kLog2e;
  const int* block_table = reinterpret_cast<const int*>(p.block_table);

  plan_part<Cfg>(p);
  for_each_segment<Cfg>(p, part, [&](const Segment& seg) {
    const int b = seg.req;
    // ---- query rows -> fp32 shared memory; padded rows are zero
    for (int idx = tid; idx < M * kChunks; idx += T) {
      const int m = idx / kChunks, ch = idx % kChunks, r = row0 + m;
      float vals[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      if (r < rows) {
        const int s = r / H, h = r % H;
        const Q* src = ch < kCkvChunks
            ? reinterpret_cast<const Q*>(p.q_nope) + b * p.q_nope_stride_b + s * p.q_nope_stride_s + h * p.q_nope_stride_h + ch * 8
            : reinterpret_cast<const Q*>(p.q_pe) + b * p.q_pe_stride_b + s * p.q_pe_stride_s + h * p.q_pe_stride_h + (ch - kCkvChunks) * 8;
        const uint4 raw = *reinterpret_cast<const uint4*>(src);
        const Q2* v2 = reinterpret_cast<const Q2*>(&raw);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float2 f = to_float2(v2[j]);
          vals[2 * j] = f.x;
          vals[2 * j + 1] = f.y;
        }
      }
#pragma unroll
      for (int j = 0; j < 8; ++j) q_s[m * D + ch * 8 + j] = vals[j];
    }
    if (tid < M) { row_max[tid] = -INFINITY; row_sum[tid] = 0.f; }
    float2 acc[M][kColPairs];
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
      for (int k = 0; k < kColPairs; ++k) acc[m][k] = make_float2(0.f, 0.f);

    for (int blk = seg.blk_lo; blk < seg.blk_hi; ++blk) {
      const int t0 = blk * N;
      __syncthreads();  // the previous tile's readers are done with kv_s and s_s
      // ---- kv tile: token t of page block_table[b][t / page_size], zero past the length
      for (int idx = tid; idx < N * kChunks; idx += T) {
        const int n = idx / kChunks, ch = idx % kChunks, t = t0 + n;
        uint4 raw = make_uint4(0u, 0u, 0u, 0u);
        if (t < seg.len) {
          const long long page = block_table[b * p.block_table_stride + t / p.page_size];
          const int off = t % p.page_size;
          const KV* src = ch < kCkvChunks
              ? reinterpret_cast<const KV*>(p.ckv) + page * p.ckv_stride_page + off * p.ckv_stride_tok + ch * 8
              : reinterpret_cast<const KV*>(p.kpe) + page * p.kpe_stride_page + off * p.kpe_stride_tok + (ch - kCkvChunks) * 8;
          raw = *reinterpret_cast<const uint4*>(src);
        }
        *reinterpret_cast<uint4*>(kv_s + n * D + ch * 8) = raw;
      }
      __syncthreads();
      // ---- scores: a warp per token, lanes over dim pairs, then a warp reduction per row
      for (int n = warp; n < N; n += W) {
        float2 k2[kPairIters];
#pragma unroll
        for (int i = 0; i < kPairIters; ++i) {
          const int pi = lane + 32 * i;
          k2[i] = pi < kPairs ? to_float2(reinterpret_cast<const KV2*>(kv_s + n * D)[pi]) : make_float2(0.f, 0.f);
        }
#pragma unroll 4
        for (int m = 0; m < M; ++m) {
          float dot = 0.f;
#pragma unroll
          for (int i = 0; i < kPairIters; ++i) {
            const int pi = lane + 32 * i;
            if (pi < kPairs) {
              const float2 q2 = reinterpret_cast<const float2*>(q_s + m * D)[pi];
              dot = fmaf(q2.x, k2[i].x, fmaf(q2.y, k2[i].y, dot));
            }
          }
          dot = warp_sum(dot);
          if (lane == 0) s_s[m * N + n] = dot;
        }
      }
      __syncthreads();
      // ---- online softmax: a warp per row, lanes over tokens (causal for s_q > 1)
      for (int m = warp; m < M; m += W) {
        const int r = row0 + m;
        const int limit = r < rows ? seg.len - p.s_q + r / H + 1 : seg.len;
        float x[(N + 31) / 32];
        float tile_max = -INFINITY;
#pragma unroll
        for (int i = 0; i < (N + 31) / 32; ++i) {
          const int n = lane + 32 * i;
          x[i] = (n < N && t0 + n < limit) ? s_s[m * N + n] * scale_log2 : -INFINITY;
          tile_max = fmaxf(tile_max, x[i]);
        }
        tile_max = warp_max(tile_max);
        const float m_old = row_max[m];
        const float m_new = fmaxf(m_old, tile_max);
        float sum = 0.f;
#pragma unroll
        for (int i = 0; i < (N + 31) / 32; ++i) {
          const int n = lane + 32 * i;
          const float pv = m_new == -INFINITY ? 0.f : exp2f(x[i] - m_new);
          sum += pv;
          if (n < N) s_s[m * N + n] = pv;
        }
        sum = warp_sum(sum);
        // Every lane read row_max[m] above; lane 0 rewrites it below. The shuffles in warp_sum do
        // not order shared-memory accesses, so order them explicitly (racecheck's hazard otherwise).
        __syncwarp();
        if (lane == 0) {
          const float alpha = m_new == -INFINITY ? 1.f : exp2f(m_old - m_new);
          row_alpha[m] = alpha;
          row_sum[m] = row_sum[m] * alpha + sum;
          row_max[m] = m_new;
        }
      }
      __syncthreads();
      // ---- O = O * alpha + P V; V is the first C columns of the same tile
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const float a = row_alpha[m];
#pragma unroll
        for (int k = 0; k < kColPairs; ++k) { acc[m][k].x *= a; acc[m][k].y *= a; }
      }
      for (int n = 0; n < N; n += 4) {
        float2 v[4][kColPairs];
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
          for (int k = 0; k < kColPairs; ++k)
            v[j][k] = to_float2(reinterpret_cast<const KV2*>(kv_s + (n + j) * D)[tid + T * k]);
#pragma unroll
        for (int m = 0; m < M; ++m) {
          const float4 pm = *reinterpret_cast<const float4*>(s_s + m * N + n);
#pragma unroll
          for (int k = 0; k < kColPairs; ++k) {
            acc[m][k].x += pm.x * v[0][k].x + pm.y * v[1][k].x + pm.z * v[2][k].x + pm.w * v[3][k].x;
            acc[m][k].y += pm.x * v[0][k].y + pm.y * v[1][k].y + pm.z * v[2][k].y + pm.w * v[3][k].y;
          }
        }
      }
    }
    __syncthreads();
    // ---- epilogue: normalise; final rows go to out/lse, split rows to the partial slot
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const int r = row0 + m;
      if (r >= rows) continue;
      const float l = row_sum[m];
      const float inv = l > 0.f ? 1.f / l : 0.f;
      const float lse = l > 0.f ? (row_max[m] + log2f(l)) * kLn2 : -INFINITY;
      if (seg.split) {
        float2* dst = reinterpret_cast<float2*>(ResultRows<Cfg>::partial(p, seg.slot, r));
#pragma unroll
        for (int k = 0; k < kColPairs; ++k) dst[tid + T * k] = make_float2(acc[m][k].x * inv, acc[m][k].y * inv);
        if (tid == 0) *ResultRows<Cfg>::partial_lse(p, seg.slot, r) = lse;
      } else {
        using Out2 = typename Vec2<typename Cfg::OutType>::type;
        Out2* dst = reinterpret_cast<Out2*>(ResultRows<Cfg>::out(p, b, r));
#pragma unroll
        for (int k = 0; k < kColPairs; ++k)
          dst[tid + T * k] = from_float2<typename Cfg::OutType>(make_float2(acc[m][k].x * inv, acc[m][k].y * inv));
        if (p.lse && tid == 0) *ResultRows<Cfg>::lse(p, b, r) = lse;
      }
    }
    __syncthreads();  // q_s and the row state are rewritten by the next segment
  });
}

}  // namespace simt
}  // namespace mla_gen
