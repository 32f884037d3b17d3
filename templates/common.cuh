// mla-gen: device code every family shares: dtype helpers, the split-kv plan each decode CTA makes of its
// part, the work-list walk and the split merge kernel. A variant's kernel.cu includes this once.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "params.h"
#include "ptx.cuh"

namespace mla_gen {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---- dtype helpers -------------------------------------------------------------------------------

template <typename T> struct Vec2;
template <> struct Vec2<__nv_bfloat16> { using type = __nv_bfloat162; };
template <> struct Vec2<__half> { using type = __half2; };

__device__ __forceinline__ float2 to_float2(__nv_bfloat162 v) { return __bfloat1622float2(v); }
__device__ __forceinline__ float2 to_float2(__half2 v) { return __half22float2(v); }

template <typename T> __device__ __forceinline__ typename Vec2<T>::type from_float2(float2 v);
template <> __device__ __forceinline__ __nv_bfloat162 from_float2<__nv_bfloat16>(float2 v) {
  return __float22bfloat162_rn(v);
}
template <> __device__ __forceinline__ __half2 from_float2<__half>(float2 v) { return __float22half2_rn(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// Two fp32 -> one register of two 16-bit values (the lower column in the low half).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  const typename Vec2<T>::type v = from_float2<T>(make_float2(lo, hi));
  uint32_t u;
  memcpy(&u, &v, sizeof(u));
  return u;
}

// ---- kv cache formats -----------------------------------------------------------------------------

// How the cache stores a token (generator/spec.py DType; mla_gen/fp8.py writes the fp8 ones):
//   kKV16        ckv and kpe in the variant's 16-bit KVType
//   kKVFp8Tensor one [.., C + R] e4m3 row per token, one fp32 scale for the tensor (params kv_scale)
//   kKVFp8DsMla  656 bytes per token: C = 512 e4m3 values, C / 128 fp32 scales, R = 64 bf16 rope values
enum class KVFormat { kKV16, kKVFp8Tensor, kKVFp8DsMla };

// Four e4m3 bytes (memory order) -> two half2 registers, lower bytes in the lower halves; exact (every
// e4m3 value is an fp16 value). sm_89+ has an instruction for it; before, the bits move by hand: an
// e4m3 byte s.eeee.mmm placed as fp16 s.0eeee.mmm0000000 is the value times 2^-8 (biases 7 and 15),
// subnormals included, and the e4m3 NaN (s.1111.111) is set explicitly.
__device__ __forceinline__ void e4m3x4_to_f16x4(uint32_t v, uint32_t& lo, uint32_t& hi) {
#if __CUDA_ARCH__ >= 890
  asm("{\n.reg .b16 l, h;\nmov.b32 {l, h}, %2;\ncvt.rn.f16x2.e4m3x2 %0, l;\ncvt.rn.f16x2.e4m3x2 %1, h;\n}"
      : "=r"(lo), "=r"(hi)
      : "r"(v));
#else
  const uint32_t nan = __vcmpeq4(v & 0x7F7F7F7Fu, 0x7F7F7F7Fu);  // 0xFF per NaN byte
  const __half2 k256 = __float2half2_rn(256.f);
  auto pair = [&](uint32_t sel, uint32_t nan_sel) {
    const uint32_t t = __byte_perm(v, 0u, sel);  // the two bytes in the high byte of each 16-bit half
    const uint32_t bits = (t & 0x80008000u) | ((t & 0x7F007F00u) >> 1);
    __half2 h;
    memcpy(&h, &bits, sizeof(h));
    h = __hmul2(h, k256);
    uint32_t u;
    memcpy(&u, &h, sizeof(u));
    return u | (__byte_perm(nan, 0u, nan_sel) & 0x7FFF7FFFu);
  };
  lo = pair(0x1404u, 0x1100u);
  hi = pair(0x3424u, 0x3322u);
#endif
}
// A 16-byte chunk of e4m3 values (memory order) -> the two 16-byte fp16 chunks at dst_lo (values 0-7)
// and dst_hi (values 8-15) in shared memory.
__device__ __forceinline__ void store_e4m3x16_as_f16(uint32_t dst_lo, uint32_t dst_hi, const uint4& v) {
  uint32_t h[8];
  e4m3x4_to_f16x4(v.x, h[0], h[1]);
  e4m3x4_to_f16x4(v.y, h[2], h[3]);
  e4m3x4_to_f16x4(v.z, h[4], h[5]);
  e4m3x4_to_f16x4(v.w, h[6], h[7]);
  sts_v4(dst_lo, h[0], h[1], h[2], h[3]);
  sts_v4(dst_hi, h[4], h[5], h[6], h[7]);
}
// Two bf16 -> two fp16 (values beyond fp16's range become inf; below it, subnormals or 0).
__device__ __forceinline__ uint32_t bf16x2_to_f16x2(uint32_t v) {
  __nv_bfloat162 b;
  memcpy(&b, &v, sizeof(v));
  const __half2 h = __float22half2_rn(__bfloat1622float2(b));
  uint32_t u;
  memcpy(&u, &h, sizeof(u));
  return u;
}

// An empty volatile asm the optimiser cannot see through: keeps cheap per-thread values (row divisions,
// pointer offsets) from being hoisted out of loops and held in registers.
__device__ __forceinline__ int opaque(int v) {
  asm volatile("" : "+r"(v));
  return v;
}
template <typename T>
__device__ __forceinline__ const T* opaque(const T* v) {
  asm volatile("" : "+l"(v));
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
// The sum over the quad of lanes 4 g .. 4 g + 3, which hold one accumulator row in the m16n8 C layout
// (mma.sync's, and each warp's part of wgmma's): lane 4 g + tq has columns 8 j + 2 tq, 8 j + 2 tq + 1.
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// ---- programmatic dependent launch (sm_90+; no-ops before) ------------------------------------------

// The decode and merge kernels are launched with programmatic stream serialization, so each may start while the
// kernel before it runs: it waits here before reading what that kernel wrote (the decode kernel: its inputs).
__device__ __forceinline__ void wait_for_previous_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void start_next_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// ---- work list -----------------------------------------------------------------------------------

// Number of kv blocks of a request, 0 when its length is invalid (shorter than s_q or longer than
// the pages the block table can hold). Planner and kernels must agree, so it lives here.
__device__ __forceinline__ int request_blocks(int len, const DecodeParams& p, int block_n) {
  const long long cap = static_cast<long long>(p.max_pages) * p.page_size;
  if (len < p.s_q || len < 1 || static_cast<long long>(len) > cap) return 0;
  return (len + block_n - 1) / block_n;
}

// One contiguous piece of one request's kv blocks that a part (CTA column) processes.
struct Segment {
  int req, len, blk_lo, blk_hi;
  bool split;  // the request is shared with other parts: write a partial (o, lse) to `slot`
  int slot;
};

// Where the results of packed query row r (= s * heads + h) of request b go: its output row and lse
// (a request that one part finishes, or the merge), or its row of a split's partial slot (fp32 o
// normalised by the split's own sum, and the split's lse).
template <class Cfg>
struct ResultRows {
  using OutT = typename Cfg::OutType;
  __device__ __forceinline__ static OutT* out(const DecodeParams& p, int b, int r) {
    const int s = r / Cfg::kNumHeads, h = r % Cfg::kNumHeads;
    return reinterpret_cast<OutT*>(p.out) + b * p.out_stride_b + s * p.out_stride_s + h * p.out_stride_h;
  }
  __device__ __forceinline__ static float* lse(const DecodeParams& p, int b, int r) {  // p.lse must be set
    const int s = r / Cfg::kNumHeads, h = r % Cfg::kNumHeads;
    return reinterpret_cast<float*>(p.lse) + b * p.lse_stride_b + s * p.lse_stride_s + h;
  }
  __device__ __forceinline__ static float* partial(const DecodeParams& p, int slot, int r) {
    return reinterpret_cast<float*>(p.partial_o) +
           (static_cast<long long>(slot) * (p.s_q * Cfg::kNumHeads) + r) * Cfg::kCkvDim;
  }
  __device__ __forceinline__ static float* partial_lse(const DecodeParams& p, int slot, int r) {
    return reinterpret_cast<float*>(p.partial_lse) + static_cast<long long>(slot) * (p.s_q * Cfg::kNumHeads) + r;
  }
};

// The causal / length mask of one thread's scores in the m16n8 C layout: score(hh, j, e) (a float&) is query row
// r_lane + 8 hh against kv token t_lane + 8 j + e, j < NJ. Row r (query token r / H) sees the tokens before
// mask_from + r / H; a padding row (r >= rows) those before len. Masked scores become -inf.
template <int H, int NJ, class Score>
__device__ __forceinline__ void mask_scores(int t_lane, int r_lane, int rows, int mask_from, int len, Score&& score) {
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int r = r_lane + 8 * hh;
    const int limit = r < rows ? mask_from + r / H : len;
#pragma unroll
    for (int j = 0; j < NJ; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e)
        if (t_lane + 8 * j + e >= limit) score(hh, j, e) = -INFINITY;
  }
}

// A row's lse (natural log) from its sum l and max m (log2 domain); -inf for a row that saw nothing.
__device__ __forceinline__ float row_lse(float l, float m) { return l > 0.f ? (m + log2f(l)) * kLn2 : -INFINITY; }

// The epilogue of one query row r of a segment, from one thread's part of it in the m16n8 C layout: the
// accumulator pairs pairs(j) (a float2) at columns col0 + 8 j, j < NJ, normalised by the row sum l (times
// out_scale, an fp8 cache's per-tensor scale), its lse from l and the running max m (log2 domain). A request
// the part finishes: out, and lse when asked; a split one: its partial row and partial lse. lse_writer: the one
// thread of the row that writes the lse.
template <class Cfg, int NJ, class Pairs>
__device__ __forceinline__ void write_result_row(const DecodeParams& p, const Segment& seg, int r, int col0, float l,
                                                 float m, float out_scale, bool lse_writer, Pairs&& pairs) {
  using OutT = typename Cfg::OutType;
  using Out2 = typename Vec2<OutT>::type;
  const float inv = l > 0.f ? out_scale / l : 0.f;
  const float lse = row_lse(l, m);
  if (seg.split) {
    float* dst = ResultRows<Cfg>::partial(p, seg.slot, r) + col0;
#pragma unroll
    for (int j = 0; j < NJ; ++j) {
      const float2 v = pairs(j);
      *reinterpret_cast<float2*>(dst + 8 * j) = make_float2(v.x * inv, v.y * inv);
    }
    if (lse_writer) *ResultRows<Cfg>::partial_lse(p, seg.slot, r) = lse;
  } else {
    OutT* dst = ResultRows<Cfg>::out(p, seg.req, r) + col0;
#pragma unroll
    for (int j = 0; j < NJ; ++j) {
      const float2 v = pairs(j);
      *reinterpret_cast<Out2*>(dst + 8 * j) = from_float2<OutT>(make_float2(v.x * inv, v.y * inv));
    }
    if (p.lse && lse_writer) *ResultRows<Cfg>::lse(p, seg.req, r) = lse;
  }
}

// The paged kv gather of the tensor-core families: token n of a kBlockN-token tile is copied by copy
// team n mod kTeams. lookup() reads the team's tokens' pages from the block table (early, so the latency
// hides under other work; any page size); for_each_row() then hands each of the team's token rows to the
// family's copy with its ckv and kpe sources (already advanced by the lane's 16-byte chunk tl) and the
// byte count (0 past the length: zero fill, nothing read).
template <typename KV, int kBlockN, int kTeams>
struct PagedRows {
  static constexpr int kIters = (kBlockN + kTeams - 1) / kTeams;
  int page[kIters], off[kIters];  // off -1: past the length

  __device__ __forceinline__ void lookup(const int* bt_row, int page_size, int len, int blk, int team) {
#pragma unroll
    for (int k = 0; k < kIters; ++k) {
      const int t = blk * kBlockN + team + k * kTeams;
      page[k] = 0;
      off[k] = -1;
      if (t < len && (kIters * kTeams == kBlockN || team + k * kTeams < kBlockN)) {
        page[k] = bt_row[t / page_size];
        off[k] = t % page_size;
      }
    }
  }

  // Element offset of the team's token row k in a cache with these strides (0 past the length).
  __device__ __forceinline__ long long row_offset(int k, long long stride_page, long long stride_tok) const {
    return off[k] >= 0 ? page[k] * stride_page + off[k] * stride_tok : 0;
  }

  template <typename Copy>
  __device__ __forceinline__ void for_each_row(const DecodeParams& p, int team, int tl, Copy&& copy) const {
    const KV* ckv = reinterpret_cast<const KV*>(p.ckv);
    const KV* kpe = reinterpret_cast<const KV*>(p.kpe);
#pragma unroll
    for (int k = 0; k < kIters; ++k) {
      const int n = team + k * kTeams;
      if (kIters * kTeams == kBlockN || n < kBlockN) {
        const bool valid = off[k] >= 0;
        const long long pg = page[k], o = valid ? off[k] : 0;
        copy(n, ckv + (pg * p.ckv_stride_page + o * p.ckv_stride_tok + tl * 8),
             kpe + (pg * p.kpe_stride_page + o * p.kpe_stride_tok + tl * 8), valid ? 16 : 0);
      }
    }
  }
};

// fp8_e4m3's one scale (value = e4m3 * kv_scale) never touches the tile: it multiplies the scores
// (`log2`, the softmax's scale in the log2 domain) and the normalised output (`out`). For every other
// cache format it is 1 and folds away.
template <class Cfg>
struct TensorScale {
  static constexpr bool kOn = Cfg::kKVFormat == KVFormat::kKVFp8Tensor;
  float kv, log2;
  __device__ __forceinline__ TensorScale(const DecodeParams& p, float sm_scale_log2)
      : kv(kOn ? *reinterpret_cast<const float*>(p.kv_scale) : 1.f), log2(kOn ? sm_scale_log2 * kv : sm_scale_log2) {}
  __device__ __forceinline__ float out(float x) const { return kOn ? x * kv : x; }
};

// fp8 caches for the families that keep several stages (mma, wgmma): the stages hold tokens as the cache
// stores them (cp.async of whole 16-byte chunks, rows unswizzled; fp8_ds_mla: all 656 bytes), and before
// a tile's MMAs every thread dequantizes a share of it into the family's fp16 tile (e4m3 -> f16 exact;
// fp8_ds_mla's per-group scales multiply in fp32, its bf16 rope becomes fp16; fp8_e4m3's one scale is
// the caller's, on scores and output). ckv_at(n, c) / rope_at(n, c): the shared address of fp16 chunk c
// (8 values) of token n in the family's swizzled ckv / rope sub-arrays.
template <class Cfg>
struct RawKVTile {
  static constexpr bool kDs = Cfg::kKVFormat == KVFormat::kKVFp8DsMla;
  static constexpr int C = Cfg::kCkvDim, R = Cfg::kRopeDim, N = Cfg::kBlockN;
  static_assert(!kDs || (C == 512 && R == 64), "fp8_ds_mla: 512 ckv + 64 rope");
  static constexpr int kRowBytes = kDs ? 656 : C + R;
  static constexpr int kChunks = kRowBytes / 16;
  static constexpr int kStageBytes = (N * kRowBytes + 127) / 128 * 128;

  // cp.async of the team's token rows of one tile into `stage` (zero fill past the length)
  template <class Pages, int kTeams>
  __device__ __forceinline__ static void issue(const Pages& pages, const DecodeParams& p, int team, int tl,
                                               uint32_t stage) {
    constexpr int kCkvChunks = kDs ? kChunks : C / 16;  // fp8_e4m3: ckv and kpe may be separate tensors
#pragma unroll
    for (int k = 0; k < Pages::kIters; ++k) {
      const int n = team + k * kTeams;
      if (Pages::kIters * kTeams == N || n < N) {
        const int bytes = pages.off[k] >= 0 ? 16 : 0;
        const uint8_t* ckv =
            reinterpret_cast<const uint8_t*>(p.ckv) + pages.row_offset(k, p.ckv_stride_page, p.ckv_stride_tok);
        const uint8_t* kpe =
            reinterpret_cast<const uint8_t*>(p.kpe) + pages.row_offset(k, p.kpe_stride_page, p.kpe_stride_tok);
        const uint32_t dst = stage + n * kRowBytes;
#pragma unroll
        for (int i = 0; i < (kChunks + 7) / 8; ++i) {
          const int c = tl + 8 * i;
          if (c < kChunks)
            cp_async_16(dst + 16 * c, c < kCkvChunks ? ckv + 16 * c : kpe + 16 * (c - kCkvChunks), bytes);
        }
      }
    }
  }

  // Part kPart of kParts of the raw tile at `stage` -> fp16, by kThreads threads: the ckv columns in kParts
  // equal column ranges, the rope with the last part (a family issues the MMAs over a part's columns while
  // the next part converts). A warp takes consecutive chunks of one kind (no divergence), and a thread
  // loads kBatch chunks before converting any: the shared loads' latency is paid once per batch, not per
  // chunk. A lane whose chunk lies in an odd 64-column block stores its high fp16 chunk first: with the
  // 128-byte swizzle the two stores of a warp then cover every 16-byte position of a row (the even ones
  // only would be a 2-way bank conflict).
  template <int kThreads, int kPart = 0, int kParts = 1, typename CkvAt, typename RopeAt>
  __device__ __forceinline__ static void dequantize(uint32_t stage, int tid, CkvAt&& ckv_at, RopeAt&& rope_at) {
    constexpr int kCkvChunks = C / 16, kRopeChunks = kDs ? R / 8 : R / 16;  // raw 16-byte chunks of a row
    static_assert(kCkvChunks % kParts == 0, "whole chunks per part");
    constexpr int kPartChunks = kCkvChunks / kParts, kChunk0 = kPart * kPartChunks;
    constexpr int kCkvWork = N * kPartChunks, kRopeWork = kPart == kParts - 1 ? N * kRopeChunks : 0;
    constexpr int kCkvIters = (kCkvWork + kThreads - 1) / kThreads;
    constexpr int kBatch = kCkvIters < 4 ? kCkvIters : 4;
    auto has = [&](int i) { return kCkvWork % kThreads == 0 || tid + i * kThreads < kCkvWork; };
    // 16 e4m3 values (times `sc`: fp8_ds_mla's group scale) -> fp16 chunks 2 c, 2 c + 1 of token n
    auto store_pair = [&](int n, int c, const uint4& v, float sc) {
      const bool high_first = (c >> 2) & 1;
      uint32_t h[8];
      e4m3x4_to_f16x4(high_first ? v.z : v.x, h[0], h[1]);
      e4m3x4_to_f16x4(high_first ? v.w : v.y, h[2], h[3]);
      e4m3x4_to_f16x4(high_first ? v.x : v.z, h[4], h[5]);
      e4m3x4_to_f16x4(high_first ? v.y : v.w, h[6], h[7]);
      if constexpr (kDs) {
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          __half2 x;
          memcpy(&x, &h[i], sizeof(x));
          const float2 f = __half22float2(x);
          x = __float22half2_rn(make_float2(f.x * sc, f.y * sc));
          memcpy(&h[i], &x, sizeof(x));
        }
      }
      sts_v4(ckv_at(n, 2 * c + high_first), h[0], h[1], h[2], h[3]);
      sts_v4(ckv_at(n, 2 * c + 1 - high_first), h[4], h[5], h[6], h[7]);
    };
#pragma unroll
    for (int i0 = 0; i0 < kCkvIters; i0 += kBatch) {
      uint4 v[kBatch];
      float sc[kBatch];
#pragma unroll
      for (int j = 0; j < kBatch; ++j) {
        const int w = tid + (i0 + j) * kThreads, n = w / kPartChunks, c = kChunk0 + w % kPartChunks;
        if (i0 + j < kCkvIters && has(i0 + j)) {
          v[j] = lds_v4(stage + n * kRowBytes + 16 * c);
          sc[j] = kDs ? lds_f32(stage + n * kRowBytes + C + 4 * (c / 8)) : 1.f;  // the scale of group c / 8
        }
      }
#pragma unroll
      for (int j = 0; j < kBatch; ++j) {
        const int w = tid + (i0 + j) * kThreads;
        if (i0 + j < kCkvIters && has(i0 + j)) store_pair(w / kPartChunks, kChunk0 + w % kPartChunks, v[j], sc[j]);
      }
    }
#pragma unroll
    for (int w = tid; w < kRopeWork; w += kThreads) {
      const int n = w / kRopeChunks, cr = w % kRopeChunks;
      const uint32_t src = stage + n * kRowBytes + C + (kDs ? 16 : 0) + 16 * cr;
      const uint4 v = lds_v4(src);
      if constexpr (kDs) {  // 8 bf16 rope values -> fp16 chunk cr
        sts_v4(rope_at(n, cr), bf16x2_to_f16x2(v.x), bf16x2_to_f16x2(v.y), bf16x2_to_f16x2(v.z),
               bf16x2_to_f16x2(v.w));
      } else {  // 16 e4m3 rope values -> fp16 chunks 2 cr, 2 cr + 1
        store_e4m3x16_as_f16(rope_at(n, 2 * cr), rope_at(n, 2 * cr + 1), v);
      }
    }
  }
};

// A split request of at most this many parts is merged inside the decode kernel by its last part; one
// of more parts would make that one CTA read too much, so the merge kernel spreads it over the GPU.
constexpr int kInlineMergeSplits = 4;

// One row of a split request of at most kInlineMergeSplits partials (merge_if_last): the exact log-sum-exp merge
// of the partials (o normalised per split, lse natural log) -> out, lse. One warp; the partials are read from L2
// (other SMs wrote them), all of the row's loads before the first use: one round trip per row. (A loop over the
// splits made two plus two per split, latency-bound: ~30k cycles per seesaw CTA on B128 S4096 H128.)
template <class Cfg>
__device__ __forceinline__ void merge_row(const DecodeParams& p, int b, int row, int lane, int num_splits,
                                          int first_slot) {
  using OutT = typename Cfg::OutType;
  using Rows = ResultRows<Cfg>;
  constexpr int S = kInlineMergeSplits;
  constexpr int kPairs = Cfg::kCkvDim / 2;
  constexpr int kIters = (kPairs + 31) / 32;
  float lk[S];
  float2 v[S][kIters];
#pragma unroll
  for (int k = 0; k < S; ++k) {
    const bool here = k < num_splits;
    lk[k] = here ? __ldcg(Rows::partial_lse(p, first_slot + k, row)) : -INFINITY;
    const float2* src = reinterpret_cast<const float2*>(Rows::partial(p, first_slot + (here ? k : 0), row));
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      const int c = lane + 32 * i;
      v[k][i] = here && c < kPairs ? __ldcg(src + c) : make_float2(0.f, 0.f);
    }
  }
  float m = -INFINITY;
#pragma unroll
  for (int k = 0; k < S; ++k) m = fmaxf(m, lk[k]);
  float sum = 0.f;
#pragma unroll
  for (int k = 0; k < S; ++k) sum += lk[k] == -INFINITY ? 0.f : __expf(lk[k] - m);
  const float lse = (m == -INFINITY || sum == 0.f) ? -INFINITY : m + __logf(sum);
  float2 acc[kIters];
#pragma unroll
  for (int i = 0; i < kIters; ++i) acc[i] = make_float2(0.f, 0.f);
#pragma unroll
  for (int k = 0; k < S; ++k) {
    const float w = lk[k] == -INFINITY ? 0.f : __expf(lk[k] - lse);
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      acc[i].x += w * v[k][i].x;
      acc[i].y += w * v[k][i].y;
    }
  }
  using Out2 = typename Vec2<OutT>::type;
  OutT* out = Rows::out(p, b, row);
#pragma unroll
  for (int i = 0; i < kIters; ++i) {
    const int c = lane + 32 * i;
    if (c < kPairs) reinterpret_cast<Out2*>(out)[c] = from_float2<OutT>(acc[i]);
  }
  if (p.lse && lane == 0) *Rows::lse(p, b, row) = lse;
}
// Most parts (CTA columns) a grid has, so most parts a request can span: the merge kernel keeps a request's split
// weights in shared memory (generator/select.py MAX_PARTS).
constexpr int kMergeMaxSplits = 2048;

// Whether `pred` holds in any of the threads that meet at CTA barrier `id` (0: __syncthreads, every thread of
// the CTA; else a named barrier of the kernel's 32 * Cfg::kWarps working threads, where more warps run beside
// them, e.g. seesaw's producer warpgroup).
template <class Cfg, int kBarrier>
__device__ __forceinline__ bool barrier_any(bool pred) {
  if constexpr (kBarrier == 0) {
    return __syncthreads_or(pred);
  } else {
    uint32_t any;
    asm volatile(
        "{\n.reg .pred p, q;\nsetp.ne.u32 p, %1, 0;\nbarrier.red.or.pred q, %2, %3, p;\nselp.u32 %0, 1, 0, q;\n}\n"
        : "=r"(any)
        : "r"(static_cast<uint32_t>(pred)), "n"(kBarrier), "n"(32 * Cfg::kWarps)
        : "memory");
    return any != 0;
  }
}

// After a CTA wrote its partial rows of split request `b` (num_splits parts, at most kInlineMergeSplits; its
// partial slots from first_slot on): the last of the request's parts to finish (an atomic ticket per request and
// row block) merges the request's rows of this row block. Every working thread (32 * Cfg::kWarps, meeting at
// barrier kBarrier) calls it.
template <class Cfg, int kBarrier = 0>
__device__ __forceinline__ void merge_if_last(const DecodeParams& p, int b, int num_splits, int first_slot) {
  __threadfence();  // this thread's partial writes, device-wide, before the ticket
  bool last = false;
  if (threadIdx.x == 0) {
    int* ticket = reinterpret_cast<int*>(p.tickets) + b * p.row_blocks + blockIdx.x;
    last = atomicAdd(ticket, 1) + 1 == num_splits;
    if (last) *ticket = 0;  // no other part touches it in this launch: ready for a run that reuses the plan
    __threadfence();  // the other parts' partials, seen through the ticket, before this CTA reads them
  }
  if (!barrier_any<Cfg, kBarrier>(last)) return;
  const int rows = p.s_q * Cfg::kNumHeads;
  const int row0 = blockIdx.x * Cfg::kBlockM, lane = threadIdx.x & 31;
  for (int m = threadIdx.x >> 5; m < Cfg::kBlockM && row0 + m < rows; m += Cfg::kWarps)
    merge_row<Cfg>(p, b, row0 + m, lane, num_splits, first_slot);
}

// ---- work list: each decode CTA plans its own part ---------------------------------------------------

// A decode CTA's row of the work list (part_info [num_parts][row_blocks][kPartInts] int32, written by the CTA's
// plan_part and read back by its for_each_segment): where its part begins and ends, (request, block), end
// exclusive; then the facts of the requests at its two ends, the only ones it can share with other parts: the
// first's length, number of parts, this part's partial slot and its first slot, and, where the part ends inside a
// request that begins in it, that request's number of parts and first slot (its slot in this part: it begins
// here). Requests between the two are whole.
constexpr int kPartInts = 12;
enum PartField : int {
  kBeginReq, kBeginBlk, kEndReq, kEndBlk,
  kFirstLen, kFirstSplits, kFirstSlot, kFirstOffset,
  kLastSplits, kLastOffset
};
static_assert(kFirstLen == 4 && kLastSplits == 8 && kPartInts % 4 == 0, "the row is read as int4, int4, int2");

// This CTA's row of the work list (kPartInts ints, 16-byte aligned).
__device__ __forceinline__ const int4* part_row(const DecodeParams& p, int part) {
  return reinterpret_cast<const int4*>(p.part_info) + (kPartInts / 4) * (part * p.row_blocks + blockIdx.x);
}

// Walks the segments of part `part` in order, calling fn(segment); a split segment's part then takes
// its ticket (merge_if_last, its CTA barrier `kBarrier`). fn must end with that barrier after its last
// shared-memory use. kMerge false: the walk alone (a producer warp that only loads the segments' tiles).
// The CTA's plan_part ran before.
template <class Cfg, int kBarrier = 0, bool kMerge = true, typename Fn>
__device__ __forceinline__ void for_each_segment(const DecodeParams& p, int part, Fn&& fn) {
  constexpr int kBlockN = Cfg::kBlockN;
  wait_for_previous_grid();  // the inputs (a no-op where plan_part waited)
  start_next_grid();         // the merge kernel may launch; it waits for this grid's results (again: a no-op)
  const int4* row = part_row(p, part);
  const int4 bounds = row[0], first = row[1];  // one round trip: the first segment's facts are in the row
  const int begin_req = bounds.x, begin_blk = bounds.y, end_req = bounds.z, end_blk = bounds.w;
  const int* seqlens = reinterpret_cast<const int*>(p.seqlens);
  const int last = end_req < p.batch - 1 ? end_req : p.batch - 1;
  // the request's facts, loaded at the top of each later iteration (so the row's copies are not live across fn)
  int len = first.x, num_splits = first.y, slot = first.z;
  for (int b = begin_req; b <= last; ++b) {
    if (b != begin_req) {
      len = seqlens[b];
      num_splits = 1, slot = 0;  // whole, unless the part ends inside it (where it ends at its block 0: not walked)
      if (b == end_req) {        // begun in this part, continued by the next
        const int2 tail = *reinterpret_cast<const int2*>(part_row(p, opaque(part)) + 2);
        num_splits = tail.x, slot = tail.y;
      }
    }
    const int nb = request_blocks(len, p, kBlockN);
    const int lo = b == begin_req ? begin_blk : 0;
    int hi = b == end_req ? end_blk : nb;
    hi = hi < nb ? hi : nb;
    if (lo >= hi) continue;
    const bool merge_here = kMerge && num_splits > 1 && num_splits <= kInlineMergeSplits;
    Segment seg{b, len, lo, hi, num_splits > 1, slot};
    fn(seg);
    if (merge_here) {  // the request's parts and first slot, read again (registers)
      const int* r = reinterpret_cast<const int*>(part_row(p, opaque(part)));
      const bool begun_before = b == begin_req;
      merge_if_last<Cfg, kBarrier>(p, b, r[begun_before ? kFirstSplits : kLastSplits],
                                   r[begun_before ? kFirstOffset : kLastOffset]);
    }
  }
}

// Block-wide exclusive scan of one value per thread (every thread of the CTA, at most 32 warps); returns the
// prefix and sets *total. scratch: 32 ints of shared memory, free again on return.
__device__ __forceinline__ int block_exclusive_scan(int v, int* total, int* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  int x = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) scratch[warp] = x;
  __syncthreads();
  if (warp == 0) {
    int w = lane < warps ? scratch[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, w, o);
      if (lane >= o) w += y;
    }
    if (lane < warps) scratch[lane] = w;
  }
  __syncthreads();
  const int before = (warp > 0 ? scratch[warp - 1] : 0) + x - v;
  *total = scratch[warps - 1];
  __syncthreads();  // scratch is reused by the next call
  return before;
}

// The work list, planned by every decode CTA for its own part at the kernel's start (every thread calls it,
// before the kernel uses the first 128 bytes of its shared memory: the scans' scratch). Splits the total cost
// (kv blocks + fixed_cost per request) evenly over `active` parts: part q starts at cost floor(q total /
// active), so loads differ by at most one block; mla_gen/schedule.py is the same plan (tests compare the two).
// A request of cost range [c, c + fixed_cost + nb) begins in the last part starting at or before c + fixed_cost
// and ends in the last starting before its end, so the parts it spans follow from c alone (no search).
// CTA (0, 0) also writes the request rows (req_info) and the merge kernel's list, sets the status bit and NaN rows
// for requests of invalid length (no part processes them), and lets the merge kernel launch only after those
// writes. p.replan 0: nothing; the rows of the CTA's last planned call are reused (the lengths did not change).
// Inlined: as a called function (__noinline__) a launch that reuses the rows ran ~1 us faster on small seesaw calls
// but a planned launch 1-4 us slower (PERF.md, twenty-seventh session; branch wip/plan-noinline).
template <class Cfg>
__device__ __forceinline__ void plan_part(const DecodeParams& p) {
  constexpr int kBlockN = Cfg::kBlockN;
  extern __shared__ int plan_scratch[];  // the kernel's dynamic shared memory, not in use yet
  // (for_each_segment waits for the inputs; the plan's code is laid out of the way of the call that skips it)
  if (__builtin_expect(!p.replan, 1)) return;
  wait_for_previous_grid();  // the lengths, and every other input an earlier kernel wrote
  const bool lead = blockIdx.x == 0 && blockIdx.y == 0;
  const int* seqlens = reinterpret_cast<const int*>(p.seqlens);
  int* row = reinterpret_cast<int*>(p.part_info) + kPartInts * (blockIdx.y * p.row_blocks + blockIdx.x);
  int* req_info = reinterpret_cast<int*>(p.req_info);
  int* merge_list = reinterpret_cast<int*>(p.merge_list);
  const int tid = threadIdx.x, nt = blockDim.x, part = blockIdx.y, fixed = p.fixed_cost;
  if (tid < kPartInts) row[tid] = tid == kBeginReq || tid == kEndReq ? p.batch : 0;  // an empty part's row
  // the total first, where the batch takes more than one pass (the part's cost range needs it)
  int total = -1;
  if (p.batch > nt) {
    total = 0;
    for (int base = 0; base < p.batch; base += nt) {
      const int b = base + tid;
      const int nb = b < p.batch ? request_blocks(seqlens[b], p, kBlockN) : 0;
      int chunk;
      block_exclusive_scan(nb > 0 ? nb + fixed : 0, &chunk, plan_scratch);
      total += chunk;
    }
  }
  int carry = 0, slot_carry = 0, listed = 0;
  bool invalid = false;
  for (int base = 0; base < p.batch; base += nt) {
    const int b = base + tid;
    const int len = b < p.batch ? seqlens[b] : 0;
    const int nb = b < p.batch ? request_blocks(len, p, kBlockN) : 0;
    const int cost = nb > 0 ? nb + fixed : 0;
    int chunk;
    const int cb = carry + block_exclusive_scan(cost, &chunk, plan_scratch);  // (the default row is written)
    carry += chunk;
    if (total < 0) total = chunk;  // one pass: this chunk is the batch
    const long long T = total;
    long long active = (T + p.min_part_cost - 1) / p.min_part_cost;  // parts worth their fixed costs
    active = active < 1 ? 1 : (active > p.num_parts ? p.num_parts : active);
    const long long x0 = part < active ? T * part / active : T;
    const long long x1 = part + 1 < active ? T * (part + 1) / active : T;
    int first_part = 0, num_splits = 0;
    if (nb > 0) {  // the last parts starting at or before cost cb + fixed, and before cb + fixed + nb
      const long long fp = ((cb + fixed + 1) * active - 1) / T, lp = ((cb + fixed + nb) * active - 1) / T;
      first_part = static_cast<int>(fp < active - 1 ? fp : active - 1);
      num_splits = static_cast<int>(lp < active - 1 ? lp : active - 1) - first_part + 1;
    }
    int chunk_slots;
    const int offset = slot_carry + block_exclusive_scan(num_splits > 1 ? num_splits : 0, &chunk_slots, plan_scratch);
    slot_carry += chunk_slots;
    if (nb > 0 && cb <= x0 && x0 < cb + cost) {  // the part begins in request b
      const long long into = x0 - cb - fixed;
      row[kBeginReq] = b;
      row[kBeginBlk] = into > 0 ? static_cast<int>(into) : 0;
      row[kFirstLen] = len;
      row[kFirstSplits] = num_splits;
      row[kFirstSlot] = num_splits > 1 ? offset + part - first_part : 0;
      row[kFirstOffset] = offset;
    }
    if (nb > 0 && cb <= x1 && x1 < cb + cost) {  // and ends in it
      const long long into = x1 - cb - fixed;
      row[kEndReq] = b;
      row[kEndBlk] = into > 0 ? static_cast<int>(into) : 0;
      if (into > 0 && x0 < cb) {  // begun in this part, continued by the next
        row[kLastSplits] = num_splits;
        row[kLastOffset] = offset;
      }
    }
    if (lead) {  // (block-uniform: the scan below is every thread's)
      if (b < p.batch) {
        req_info[4 * b + 0] = first_part;
        req_info[4 * b + 1] = num_splits;
        req_info[4 * b + 2] = offset;
        req_info[4 * b + 3] = cb;
      }
      invalid = __syncthreads_or(b < p.batch && nb == 0) || invalid;
      const bool wide = num_splits > kInlineMergeSplits;
      int chunk_wide;
      const int at = block_exclusive_scan(wide ? 1 : 0, &chunk_wide, plan_scratch);
      if (wide) merge_list[1 + listed + at] = b;
      listed += chunk_wide;
    }
  }
  if (lead) {
    if (tid == 0) merge_list[0] = listed;
    if (invalid) {  // requests of invalid length (rare): NaN rows, so the error cannot pass unnoticed
      if (tid == 0) atomicOr(reinterpret_cast<int*>(p.status), 1);
      using OutT = typename Cfg::OutType;
      constexpr int kRowElems = Cfg::kCkvDim;
      const int rows = p.s_q * Cfg::kNumHeads;
      const float nan = __int_as_float(0x7fffffff);
      for (int b = 0; b < p.batch; ++b) {
        if (request_blocks(seqlens[b], p, kBlockN) > 0) continue;
        for (int i = tid; i < rows * kRowElems; i += nt) {
          const int r = i / kRowElems;
          ResultRows<Cfg>::out(p, b, r)[i % kRowElems] = from_float<OutT>(nan);
          if (p.lse && i % kRowElems == 0) *ResultRows<Cfg>::lse(p, b, r) = nan;
        }
      }
    }
    __threadfence();  // the merge kernel reads merge_list's count before its wait: written first
  }
  __syncthreads();  // the row (for_each_segment reads it back), and the scratch free for the kernel
  start_next_grid();  // the merge kernel may launch; it waits for this grid's results
}

// ---- merge kernel: split requests of more than kInlineMergeSplits parts ----------------------------

// Grid-stride over units (listed request, row, chunk of kMergeCols columns), up to kMergeCtasPerPart CTAs per decode
// CTA. Lane l of each warp owns 4 columns of the chunk; warp w takes splits w, w + kMergeWarps, ... A unit's values go
// out by cp.async into shared memory from a rolled loop, kMergeStage splits at once, beside the splits' lse: one L2
// round trip for up to kMergeStage splits, from a loop the instruction cache holds after one pass (the decode kernel
// leaves it cold: 17 unrolled loads took 2 us a CTA just to issue). The first unit's lookups (the merge list and split
// counts, which decode CTA (0, 0) writes and fences before it lets this kernel launch, plan_part) run before the wait.
// Launched with programmatic dependent launch after the decode kernel, whose results it waits for; a CTA with no unit
// leaves before the wait. Small CTAs, many of them: 4 warps and 27 KB of shared memory, so 8 fit an SM and 8 per decode
// CTA are resident at once (b4long's 2048 units take two turns a CTA, not four). What is left after the decode kernel
// (b8long 4.1 us, b4long 7.0 us, case 5 6.3 us, an empty merge 0.3 us) and the designs measured against this one:
// PERF.md, twentieth and twenty-second sessions.
constexpr int kMergeWarps = 4;
constexpr int kMergeCols = 128;   // a unit's columns: 32 lanes x 4
constexpr int kMergeStage = 32;   // splits whose values are in flight at once: 16 KB of shared memory
constexpr int kMergeCtasPerPart = 8;  // the grid: at most this many CTAs per decode CTA

template <class Cfg>
__global__ void __launch_bounds__(kMergeWarps * 32) merge_kernel(const __grid_constant__ DecodeParams p) {
  using OutT = typename Cfg::OutType;
  using Out2 = typename Vec2<OutT>::type;
  using Rows = ResultRows<Cfg>;
  constexpr int kChunks = Cfg::kCkvDim / kMergeCols, kThreads = kMergeWarps * 32;
  static_assert(Cfg::kCkvDim % kMergeCols == 0, "ckv: whole chunks of kMergeCols columns");
  __shared__ float4 s_val[kMergeStage][32];   // the stage's partial values of this unit's chunk
  __shared__ float s_w[kMergeMaxSplits];      // each split's lse, then its weight exp(lse_k - max)
  __shared__ float s_red[2][kMergeWarps];
  __shared__ float4 s_acc[kMergeWarps][32];   // each warp's sum over its splits
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int* list = reinterpret_cast<const int*>(p.merge_list);
  const int* req_info = reinterpret_cast<const int*>(p.req_info);
  const int rows = p.s_q * Cfg::kNumHeads;
  const int units = __ldcg(list) * rows * kChunks;
  struct Unit {
    int b, row, col, num_splits, first;
  };
  auto lookup = [&](int u) {
    Unit w;
    w.b = __ldcg(list + 1 + u / (rows * kChunks));
    w.row = u / kChunks % rows;
    w.col = u % kChunks * kMergeCols + 4 * lane;
    w.num_splits = __ldcg(req_info + 4 * w.b + 1);
    w.first = __ldcg(req_info + 4 * w.b + 2);
    return w;
  };
  int u = blockIdx.x;
  // a CTA with no unit leaves before the wait (while the decode kernel runs); CTA 0 always waits, so this grid
  // still ends after the decode kernel's
  if (u >= units && u != 0) return;
  Unit w = u < units ? lookup(u) : Unit{};
  wait_for_previous_grid();
  for (; u < units; u += gridDim.x) {
    // values of splits [k0, k0 + kMergeStage): warp w copies splits k0 + w, k0 + w + kMergeWarps, ...
    auto issue = [&](int k0) {
      const int k1 = min(w.num_splits, k0 + kMergeStage);
      for (int k = k0 + warp; k < k1; k += kMergeWarps)
        cp_async_16(smem_u32(&s_val[k - k0][lane]), Rows::partial(p, w.first + k, w.row) + w.col, 16);
      cp_async_commit();
    };
    issue(0);
    float m = -INFINITY;
    for (int k = threadIdx.x; k < w.num_splits; k += kThreads) {
      s_w[k] = __ldcg(Rows::partial_lse(p, w.first + k, w.row));
      m = fmaxf(m, s_w[k]);
    }
    m = warp_max(m);
    if (lane == 0) s_red[0][warp] = m;
    __syncthreads();
    m = s_red[0][0];
#pragma unroll
    for (int i = 1; i < kMergeWarps; ++i) m = fmaxf(m, s_red[0][i]);
    float sum = 0.f;
    for (int k = threadIdx.x; k < w.num_splits; k += kThreads) {
      const float e = m == -INFINITY ? 0.f : __expf(s_w[k] - m);
      s_w[k] = e;
      sum += e;
    }
    sum = warp_sum(sum);
    if (lane == 0) s_red[1][warp] = sum;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int k0 = 0;;) {
      cp_async_wait<0>();
      __syncthreads();  // the stage's values, the weights and s_red[1]
      const int k1 = min(w.num_splits, k0 + kMergeStage);
      for (int k = k0 + warp; k < k1; k += kMergeWarps) {
        const float e = s_w[k];
        const float4 v = s_val[k - k0][lane];
        acc.x += e * v.x;
        acc.y += e * v.y;
        acc.z += e * v.z;
        acc.w += e * v.w;
      }
      k0 = k1;
      if (k0 >= w.num_splits) break;
      __syncthreads();  // every warp is done with the stage before the next one lands
      issue(k0);
    }
    s_acc[warp][lane] = acc;
    sum = 0.f;
#pragma unroll
    for (int i = 0; i < kMergeWarps; ++i) sum += s_red[1][i];
    __syncthreads();
    if (warp == 0) {
#pragma unroll
      for (int i = 1; i < kMergeWarps; ++i) {
        const float4 o = s_acc[i][lane];
        acc.x += o.x;
        acc.y += o.y;
        acc.z += o.z;
        acc.w += o.w;
      }
      const float inv = sum > 0.f ? 1.f / sum : 0.f;
      OutT* out = Rows::out(p, w.b, w.row) + w.col;
      reinterpret_cast<Out2*>(out)[0] = from_float2<OutT>(make_float2(acc.x * inv, acc.y * inv));
      reinterpret_cast<Out2*>(out)[1] = from_float2<OutT>(make_float2(acc.z * inv, acc.w * inv));
      if (p.lse && lane == 0 && w.col == 0)
        *Rows::lse(p, w.b, w.row) = (m == -INFINITY || sum == 0.f) ? -INFINITY : m + __logf(sum);
    }
    if (u + gridDim.x < units) {
      w = lookup(u + gridDim.x);
      __syncthreads();  // s_w, s_red, s_val and s_acc are rewritten by the next unit
    }
  }
}

// ---- host-side launch helpers ----------------------------------------------------------------------

// Raises the variant's decode kernel's dynamic shared-memory limit (Cfg::kSmemBytes, above 48 KB) on the current
// device, once per device (a bit per device index; devices past 63 on every call): the attribute write is a driver
// call that also waits for the runtime's pending copies, so it stays off the per-launch path. The value never
// changes, so threads racing the first write at worst write it twice; a launch sees the bit only after its write.
// (After a cudaDeviceReset the attribute is gone and the launch fails with an error naming it.)
template <class Cfg, typename Kernel>
inline int set_decode_smem_limit(Kernel kernel) {
  static std::atomic<unsigned long long> written{0};
  int device = 0;
  const cudaError_t got = cudaGetDevice(&device);
  if (got != cudaSuccess) return static_cast<int>(got);
  const unsigned long long bit = device < 64 ? 1ull << device : 0ull;
  if (written.load(std::memory_order_acquire) & bit) return 0;
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes);
  if (err == cudaSuccess) written.fetch_or(bit, std::memory_order_release);
  return static_cast<int>(err);
}

// Launches kernel(p) after the previous work on the stream; where the device has programmatic
// dependent launch (sm_90+), the launch overlaps the previous kernel, which the kernel waits for.
template <class Cfg, typename Kernel, typename Args>
inline int launch_dependent(Kernel kernel, dim3 grid, dim3 block, int smem, const Args& args, uint64_t stream) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = reinterpret_cast<cudaStream_t>(stream);
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attr;
  config.numAttrs = Cfg::kDependentLaunch ? 1 : 0;
  return static_cast<int>(cudaLaunchKernelEx(&config, kernel, args));
}

// A family's decode kernel on grid (row blocks of kBlockM, parts), Cfg::kThreads threads (32 * kWarps, more where
// a producer warpgroup runs beside them), kSmemBytes; its one argument is p, or `args` holding p and more
// (seesaw: the cache's tensor maps).
template <class Cfg, typename Kernel, typename Args = DecodeParams>
inline int launch_decode_kernel(Kernel kernel, const DecodeParams& p, uint64_t stream, const Args& args) {
  const int err = set_decode_smem_limit<Cfg>(kernel);
  if (err) return err;
  const int rows = p.s_q * Cfg::kNumHeads;
  if (p.row_blocks != (rows + Cfg::kBlockM - 1) / Cfg::kBlockM) return static_cast<int>(cudaErrorInvalidValue);
  return launch_dependent<Cfg>(kernel, dim3(p.row_blocks, p.num_parts), dim3(Cfg::kThreads), Cfg::kSmemBytes, args,
                               stream);
}
template <class Cfg, typename Kernel>
inline int launch_decode_kernel(Kernel kernel, const DecodeParams& p, uint64_t stream) {
  return launch_decode_kernel<Cfg>(kernel, p, stream, p);
}

// Whether the merge kernel can have work. Only a request over more than kInlineMergeSplits parts gives it
// some; a request spans at most the parts plan_part uses, min(num_parts, ceil(total / min_part_cost)),
// and total is at most every request at the block table's capacity. When even that bound stays within
// kInlineMergeSplits (small batches with short tables), the call launches one kernel, not two.
inline bool merge_may_have_work(const DecodeParams& p, int block_n) {
  const long long cap = static_cast<long long>(p.max_pages) * p.page_size;
  const long long total_max = static_cast<long long>(p.batch) * ((cap + block_n - 1) / block_n + p.fixed_cost);
  const long long worth = (total_max + p.min_part_cost - 1) / p.min_part_cost;
  return (worth < p.num_parts ? worth : p.num_parts) > kInlineMergeSplits;
}

// The merge kernel over a CTA per unit (listed request, row, column chunk) that can exist, at most
// kMergeCtasPerPart per decode CTA. A listed request spans more than kInlineMergeSplits parts, and the requests'
// parts overlap only where one ends and the next begins, so at most (num_parts + batch - 1) / (kInlineMergeSplits
// + 1) requests are listed.
template <class Cfg>
inline int launch_merge_kernel(const DecodeParams& p, uint64_t stream) {
  if (!merge_may_have_work(p, Cfg::kBlockN)) return 0;
  const long long listed = std::min<long long>(p.batch, (p.num_parts + p.batch - 1LL) / (kInlineMergeSplits + 1));
  const long long units = listed * p.s_q * Cfg::kNumHeads * (Cfg::kCkvDim / kMergeCols);
  const long long cap = static_cast<long long>(kMergeCtasPerPart) * p.row_blocks * p.num_parts;
  const int grid = static_cast<int>(std::max(1LL, std::min(units, cap)));
  return launch_dependent<Cfg>(merge_kernel<Cfg>, dim3(grid), dim3(kMergeWarps * 32), 0, p, stream);
}

}  // namespace mla_gen
