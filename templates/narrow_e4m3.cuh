// mla-gen family `narrow`, its fp8 path (fp8_e4m3; fp8_ds_mla as E4m3Layout says): the cache's bytes are never
// turned into a 16-bit tile.
//
// Why: narrow's 16-bit path over an fp8 cache (each warpgroup converting its tile into an fp16 stage before
// its wgmma) ran no faster than over bf16: one warpgroup's convert -> Q K^T -> softmax -> P V chain per tile,
// two per SM, is the limit, and two fp16 stages fill shared memory (PERF.md, third and twelfth sessions).
// Here (PERF.md, fifteenth session):
//   - a producer warp (8) loads the raw e4m3 tiles by TMA into a ring of kRing stages (128-byte swizzled rows:
//     the ckv in C / 128 column blocks, the rope in one block whose bytes past R are TMA's zero fill);
//   - S^T = K Q^T by e4m3 wgmma straight from a stage: each query row is scaled to 224 at its largest |value| and
//     split into two e4m3 parts in that scale, hi = e4m3(q s) and lo = e4m3(q s - hi) (about bf16's precision);
//     the parts are the two row halves of one B operand (m64n(2 RN)k32), so a k step reads the stage's K once
//     (two n RN chains read it twice: shared memory, not the tensor cores, bounds this phase); x = (hi + lo) / s;
//   - O^T = V^T P^T with V^T as wgmma's A operand in registers, made from the stage's bytes: a thread's O^T
//     rows are 2 MT consecutive features (one 16- or 8-byte piece of a token row: O^T row 16 w + g + 8 h of
//     m-tile mt is feature 2 MT (8 w + g) + 2 mt + h), so per k16 step it loads its piece of 4 tokens, pairs
//     tokens with PRMT and converts pairs with cvt (e4m3 -> f16 exact); the epilogue puts the features back.
// The work contract and grid are narrow.cuh's, the softmax (lazy reference max) and the epilogue narrow_tile.cuh's.
// 384 threads: the two consumer warpgroups, and a producer warpgroup whose warp 8 loads (setmaxnreg: E4m3Layout).
#pragma once
#include "narrow_tile.cuh"
#include "sm90.cuh"

namespace mla_gen {
namespace narrow {

using namespace sm90;

constexpr int kBarConsumers = 1;  // the e4m3 kernel's named barrier of its 256 consumer threads

template <class Cfg>
struct E4m3Layout {
  static constexpr int H = Cfg::kNumHeads, C = Cfg::kCkvDim, R = Cfg::kRopeDim;
  static constexpr int RN = Cfg::kBlockM, N = Cfg::kBlockN, MT = C / 64;
  // fp8_ds_mla (656-byte tokens): the ckv's e4m3 bytes in scale groups of 128 with an fp32 scale each per token,
  // the rope in bf16. Q K^T keeps a chain per group (scaled per token after), the rope meets q's rope in bf16,
  // and P V multiplies each token's scale into V^T as it converts it: a warp's O^T rows are one group's features.
  static constexpr bool kDs = Cfg::kKVFormat == KVFormat::kKVFp8DsMla;
  static constexpr int G = kDs ? C / 128 : 1;  // scale groups a token (fp8_ds_mla; 1: the per-tensor scale)
  // raw stages: more than two take a tile's load off the chain (three and four measured even at ckv 512)
  static constexpr int kRing = C > 256 ? 3 : 4;
  // e4m3 q, rows 0 .. RN-1 its hi part and RN .. 2 RN-1 its lo part (a 16-bit Panel's bytes): the ckv, C bytes a
  // row in 128-byte rows of C / 128 blocks; the rope, one 128-byte block whose bytes past R are unused
  using QB = Panel<C / 2, 2 * RN>;
  using QR = Panel<64, 2 * RN>;
  using KB = Panel<C / 2, N>;   // a stage's ckv
  using KR = Panel<64, N>;      // a stage's rope (TMA zero-fills the bytes past R)
  using PP = Panel<N, RN>;      // P^T fp16 [RN][N]
  static constexpr int kScaleOff = KB::kBytes + KR::kBytes;  // fp8_ds_mla: a stage's token scales [N][G] fp32
  static constexpr int kStageBytes = kScaleOff + (kDs ? N * G * 4 : 0);
  static constexpr int kTokenBytes = C + 128 + (kDs ? 16 : 0);  // the bytes a token's boxes (and scales) bring
  static constexpr int kOffQ = 0, kOffQr = QB::kBytes;
  static constexpr int kOffRing = (kOffQr + QR::kBytes + 1023) / 1024 * 1024;
  static constexpr int kOffP = kOffRing + kRing * kStageBytes;  // [2] P^T panels
  static constexpr int kOStride = C + 4;                        // fp32 O staging row (+4: conflict-free columns)
  static constexpr int kOffO = kOffP + 2 * PP::kBytes;          // [2][RN][kOStride] fp32, an area per warpgroup
                                                                // (its own: the ring refills)
  static constexpr int kOffInvS = kOffO + 2 * RN * kOStride * 4;  // [RN] fp32: 1 / the row's q scale
  static constexpr int kOffWarpRed = kOffInvS + RN * 4;         // [2][4][RN] fp32
  static constexpr int kOffM = kOffWarpRed + 2 * 4 * RN * 4;    // [2][RN] fp32
  static constexpr int kOffLse = kOffM + 2 * RN * 4;            // [RN] fp32
  static constexpr int kOffBars = kOffLse + RN * 4;             // full [kRing], empty [kRing]
  static constexpr int kSmemBytes = kOffBars + 2 * kRing * 8;
  static_assert(kSmemBytes == Cfg::kSmemBytes, "shared memory layout disagrees with VariantSpec.smem_bytes");
  static_assert(kSmemBytes <= 227 * 1024, "narrow e4m3: shared memory over the 227 KB a block may use on sm_90a");
  static_assert(Cfg::kThreads == 384, "two consumer warpgroups and a producer warpgroup");
  static_assert(N == 64 && C % 128 == 0 && MT % 4 == 0 && R <= 128 && R % 32 == 0, "ckv 256 or 512, rope 32 or 64");
  static_assert(!kDs || (C == 512 && R == 64 && RN <= 16), "fp8_ds_mla: 512 ckv + 64 rope, 16 rows");
  static_assert(RN % 8 == 0 && RN <= 32, "8, 16, 24 or 32 rows");
  // q is quantized by kQTeam threads a row (a power of two: the row max is a shuffle reduction)
  static constexpr int kQTeam = RN <= 8 ? 32 : (RN <= 16 ? 16 : 8);
  static_assert(KB::kRowBytes == 128 && QB::kRowBytes == 128 && KR::kRowBytes == 128, "128-byte swizzled rows");
  static_assert(kOffRing % 1024 == 0 && kStageBytes % 1024 == 0 && kOffP % 1024 == 0 && PP::kBytes % 1024 == 0 &&
                    QB::kBytes % 1024 == 0 && QR::kBytes % 1024 == 0,
                "panels start on 1024-byte boundaries (swizzle atoms)");
  static constexpr int kPiece = 2 * MT;  // bytes of a token row behind a thread's O^T rows (16 or 8)
  // V^T fragment buffers of P V (a group of 4 m-tiles each): a group's wgmmas run while the next kABufs - 1 groups
  // are built. Three fit the consumers' 240 registers at ckv 512 (16 rows); at ckv 256 (up to 32 rows) three spill.
  static constexpr int kABufs = C > 256 && !kDs ? 3 : 2;  // fp8_ds_mla: the scales take the third's registers
  // setmaxnreg moves registers within the CTA's pool, the 168 a thread ptxas gives 384 threads at entry: an inc
  // past the pool waits forever. The producer warp fits 24 with 0 spills (18 used over fp8_e4m3).
  static constexpr int kConsumerRegs = 240, kProducerRegs = 24;
  static_assert(2 * 128 * kConsumerRegs + 128 * kProducerRegs <= 384 * 168, "setmaxnreg over the CTA's registers");
};

// e4m3 pair (the low 16 bits, lower byte first) -> f16x2, lower half first; exact
__device__ __forceinline__ uint32_t e4m3x2_lo_to_f16x2(uint32_t v) {
  uint32_t r;
  asm("{\n.reg .b16 l;\ncvt.u16.u32 l, %1;\ncvt.rn.f16x2.e4m3x2 %0, l;\n}" : "=r"(r) : "r"(v));
  return r;
}
// f16x2 product, for fp8_ds_mla's token scales on V^T
__device__ __forceinline__ uint32_t hmul2_bits(uint32_t a, uint32_t b) {
  uint32_t r;
  asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  return r;
}
// two floats -> two e4m3 bytes (a lower), saturated to +-448
__device__ __forceinline__ uint32_t f32x2_to_e4m3x2(float a, float b) {
  uint16_t r;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(b), "f"(a));
  return r;
}

// 16 values in the row scale sc -> their two e4m3 parts, hi = e4m3(x sc) and lo = e4m3(x sc - hi), 16 bytes each
// (memory order): about bf16's precision for q (the fp8 paths' Q K^T in e4m3)
__device__ __forceinline__ void quantize_hi_lo(const float (&v)[16], float sc, uint32_t (&hi)[4], uint32_t (&lo)[4]) {
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    hi[w] = lo[w] = 0u;
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const float a0 = v[4 * w + 2 * e] * sc, a1 = v[4 * w + 2 * e + 1] * sc;
      const uint32_t h2 = f32x2_to_e4m3x2(a0, a1);
      const uint32_t hb = e4m3x2_lo_to_f16x2(h2);
      __half2 back;
      memcpy(&back, &hb, sizeof(back));
      const uint32_t l2 = f32x2_to_e4m3x2(a0 - __low2float(back), a1 - __high2float(back));
      hi[w] |= h2 << (16 * e);
      lo[w] |= l2 << (16 * e);
    }
  }
}

// One m-tile's V^T A fragment (fp16, exact) from a thread's pieces of four token rows: w[u] holds the piece of
// tokens 2 tq + {0, 1, 8, 9} of a k16 step, and the m-tile's two O^T rows (features 2 mt, 2 mt + 1 of the piece)
// are its bytes 2 mt, 2 mt + 1: the tokens are paired by PRMT, then converted (rows g, g + 8 x k pairs, mma_rs)
template <int kWords>
__device__ __forceinline__ void e4m3_vt_fragment(const uint32_t (&w)[4][kWords], int mt, uint32_t (&f)[4]) {
  const uint32_t sel = (mt & 1) ? 0x7362u : 0x5140u;  // bytes 2 mt, 2 mt + 1 of two tokens, paired
  const uint32_t r01 = __byte_perm(w[0][mt >> 1], w[1][mt >> 1], sel);
  const uint32_t r89 = __byte_perm(w[2][mt >> 1], w[3][mt >> 1], sel);
  e4m3x4_to_f16x4(r01, f[0], f[1]);
  e4m3x4_to_f16x4(r89, f[2], f[3]);
}

// The producer warp: walks the part's segments like the consumers and loads each tile into ring stage k %
// kRing (k counts the part's tiles) once its consumers freed it. Where 64 divides the page size, a tile is one
// box per 128-column ckv block, the rope's (and the scales') from lane 0 with warp-uniform operands; otherwise the
// row groups before the length (lane l takes groups l and l + 32, b rows each: sm90.cuh tma_box_rows), C / 128
// ckv boxes and a rope box per group;
// fp8_ds_mla: also the tokens' 16 scale bytes, a box per group from the scale map (64 16-byte bulk copies a
// tile took case 1 from 104 to 241 us), or below 8-row boxes a bulk copy per token (lanes l, l + 32: tokens l,
// l + 32).
template <class Cfg, class L = E4m3Layout<Cfg>>
__device__ __forceinline__ void produce_e4m3(const TmaParams& tp, int part, uint32_t s_base) {
  constexpr int N = L::N, kRing = L::kRing;
  const DecodeParams& p = tp.p;
  const int lane = threadIdx.x & 31;
  const int box_rows = tma_box_rows(p.page_size);
  const int* block_table = reinterpret_cast<const int*>(p.block_table);
  const uint32_t full = s_base + L::kOffBars, empty = full + 8 * kRing;
  const uint64_t policy = l2_evict_first_policy();  // kv lines read once: first out of L2 (as seesaw's)
  int k = 0;  // the part's tiles so far
  for_each_segment<Cfg, kBarConsumers, false>(p, part, [&](const Segment& seg) {
    const int n_tiles = seg.blk_hi - seg.blk_lo;
    const int* bt_row = block_table + static_cast<long long>(seg.req) * p.block_table_stride;
    for (int it = 0; it < n_tiles; ++it, ++k) {
      const int st = k % kRing, t0 = (seg.blk_lo + it) * N;
      const uint32_t stage = s_base + L::kOffRing + st * L::kStageBytes;
      if (box_rows == N) {  // whole-tile boxes, one a block, issued by lane 0 from uniform operands
        const auto [page, tok] = whole_tile_page(bt_row, t0, p.page_size);
        mbarrier_wait(empty + 8 * st, ((k / kRing) & 1) ^ 1);
        if (lane == 0) {
          mbarrier_arrive_expect_tx(full + 8 * st, N * L::kTokenBytes);
#pragma unroll
          for (int blk = 0; blk < L::KB::kBlocks; ++blk)
            tma_load_3d(stage + blk * L::KB::kBlockBytes, &tp.ckv, full + 8 * st, blk * 128, tok, page, policy);
          tma_load_3d(stage + L::KB::kBytes, &tp.kpe, full + 8 * st, 0, tok, page, policy);
          if (L::kDs) tma_load_3d(stage + L::kScaleOff, &tp.scale, full + 8 * st, 0, tok, page, policy);
        }
        __syncwarp();
        continue;
      }
      const int groups = (min(seg.len - t0, N) + box_rows - 1) / box_rows;
      int page[2], tok_page[2];  // read before the wait: the block table's latency hides behind it
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int grp = lane + 32 * i;
        page[i] = grp < groups ? bt_row[(t0 + grp * box_rows) / p.page_size] : 0;
        if (L::kDs && box_rows < 8) tok_page[i] = grp < groups * box_rows ? bt_row[(t0 + grp) / p.page_size] : 0;
      }
      mbarrier_wait(empty + 8 * st, ((k / kRing) & 1) ^ 1);  // the first pass of a fresh barrier returns at once
      if (lane == 0) mbarrier_arrive_expect_tx(full + 8 * st, groups * box_rows * L::kTokenBytes);
      __syncwarp();
      if (L::kDs && box_rows < 8) {  // a box of fewer than 8 scale rows would land off TMA's 128-byte alignment
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int n = lane + 32 * i, t = t0 + n;  // the stage's token n
          if (n >= groups * box_rows) continue;
          const unsigned char* src = reinterpret_cast<const unsigned char*>(p.ckv) +
                                     static_cast<long long>(tok_page[i]) * p.ckv_stride_page +
                                     static_cast<long long>(t % p.page_size) * p.ckv_stride_tok + L::C;
          bulk_load(stage + L::kScaleOff + 16 * n, src, 16, full + 8 * st, policy);
        }
      }
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int grp = lane + 32 * i;
        if (grp >= groups) continue;
        const int row = grp * box_rows, tok = (t0 + row) % p.page_size;
#pragma unroll
        for (int blk = 0; blk < L::KB::kBlocks; ++blk)
          tma_load_3d(stage + blk * L::KB::kBlockBytes + row * 128, &tp.ckv, full + 8 * st, blk * 128, tok, page[i],
                      policy);
        tma_load_3d(stage + L::KB::kBytes + row * 128, &tp.kpe, full + 8 * st, 0, tok, page[i], policy);
        if (L::kDs && box_rows >= 8)
          tma_load_3d(stage + L::kScaleOff + row * 16, &tp.scale, full + 8 * st, 0, tok, page[i], policy);
      }
    }
  });
}

// The consumers of the e4m3 path (warpgroups 0 and 1, threads 0-255); see the file's header.
template <class Cfg>
__device__ __forceinline__ void consume_e4m3(const DecodeParams& p, int part, uint32_t s_base) {
  using L = E4m3Layout<Cfg>;
  using Q = typename Cfg::QType;
  using QB = typename L::QB;
  using QR = typename L::QR;
  using KB = typename L::KB;
  using PP = typename L::PP;
  constexpr int H = L::H, C = L::C, R = L::R, RN = L::RN, N = L::N, MT = L::MT, kRing = L::kRing;
  constexpr int SV = RN / 2;  // scores per thread of an m64nRN tile (the m64n(2 RN) accumulator holds twice that)
  constexpr int J = RN / 8;   // n8 column groups: a thread holds rows 8 j + 2 (lane % 4) + e
  constexpr int kWgThreads = 128;
  const int tid = threadIdx.x, lane = tid & 31;
  const int warp = __shfl_sync(0xffffffffu, tid >> 5, 0);
  const int wg = warp >> 2, wq = warp & 3;
  const int g = lane >> 2, tq = lane & 3;
  const int bar_id = 2 + wg;  // 1 is the consumers' (kBarConsumers)
  const int rows = p.s_q * H;
  const int row0 = blockIdx.x * RN;
  const uint32_t full = s_base + L::kOffBars, empty = full + 8 * kRing;
  const uint32_t s_pt = s_base + L::kOffP + wg * PP::kBytes, s_inv = s_base + L::kOffInvS;
  const uint32_t s_m = s_base + L::kOffM, s_lse = s_base + L::kOffLse;
  const WarpPlace place{wg, wq, g, tq, bar_id, s_base + L::kOffWarpRed};
  const uint64_t d_q = QB::desc(s_base + L::kOffQ), d_qr = QR::desc(s_base + L::kOffQr);
  const uint64_t d_pt = PP::desc(s_pt);
  // this thread's piece of a token row (O^T rows): byte 2 MT (8 wq + g) of the ckv, in block / 16-byte chunk / half
  const int piece = L::kPiece * (8 * wq + g);
  const int piece_blk = piece / 128, piece_chunk = (piece % 128) / 16, piece_half = piece % 16;
  const TensorScale<Cfg> scale(p, p.sm_scale * kLog2e);  // the per-tensor scale on the scores and the output
  const float scale_log2 = scale.log2;
  int k_base = 0;  // the part's tiles before this segment (the ring's position)

  for_each_segment<Cfg, kBarConsumers>(p, part, [&](const Segment& seg) {
    const int b = seg.req;
    const int len = seg.len;
    const int n_tiles = seg.blk_hi - seg.blk_lo;

    // ---- q: TPR threads a row (the rest idle); its largest |value| -> scale s = 224 / it;
    //      hi = e4m3(q s), lo = e4m3(q s - hi)
    {
      constexpr int TPR = L::kQTeam, kChunks = (C + R) / 16, KQ = (kChunks + TPR - 1) / TPR;
      const int m = tid / TPR, tl = tid % TPR, r = opaque(row0 + m);
      const bool valid = m < RN && r < rows;
      const int s = valid ? r / H : 0, h = valid ? r % H : 0;
      const Q* qn = reinterpret_cast<const Q*>(p.q_nope) + (b * p.q_nope_stride_b + s * p.q_nope_stride_s +
                                                            h * p.q_nope_stride_h);
      const Q* qp = reinterpret_cast<const Q*>(p.q_pe) + (b * p.q_pe_stride_b + s * p.q_pe_stride_s +
                                                         h * p.q_pe_stride_h);
      // every load issued before any is used, unconditionally (a padding row or chunk reads row 0's first chunk
      // and drops it): one round trip, not KQ, behind the ring's loads already queued
      uint4 raw[KQ][2];
#pragma unroll
      for (int i = 0; i < KQ; ++i) {
        const int c = tl + TPR * i;  // 16 values: ckv chunk c, or rope chunk c - C / 16
        const bool used = valid && c < kChunks;
        const int cc = used ? c : 0;
        const uint4* src = reinterpret_cast<const uint4*>(cc < C / 16 ? qn + 16 * cc : qp + 16 * (cc - C / 16));
        raw[i][0] = __ldg(src), raw[i][1] = __ldg(src + 1);
        if (!used) raw[i][0] = raw[i][1] = make_uint4(0u, 0u, 0u, 0u);  // 16-bit zeros
      }
      float v[KQ][16];
      float amax = 0.f;
#pragma unroll
      for (int i = 0; i < KQ; ++i) {
        const typename Vec2<Q>::type* x = reinterpret_cast<const typename Vec2<Q>::type*>(raw[i]);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const float2 f = to_float2(x[e]);
          v[i][2 * e] = f.x, v[i][2 * e + 1] = f.y;
          if (!L::kDs || tl + TPR * i < C / 16) amax = fmaxf(amax, fmaxf(fabsf(f.x), fabsf(f.y)));  // ds: ckv only
        }
      }
#pragma unroll
      for (int o = TPR / 2; o; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
      const float sc = amax > 0.f && amax < INFINITY ? 224.f / amax : 1.f;
      if (m < RN && tl == 0) sts_f32(s_inv + 4 * m, 1.f / sc);
#pragma unroll
      for (int i = 0; i < KQ; ++i) {
        const int c = tl + TPR * i;
        if (m >= RN || c >= kChunks) continue;
        if (L::kDs && c >= C / 16) {  // fp8_ds_mla: q's rope in bf16, unscaled, rows 0 .. RN-1 of the rope panel
          uint32_t b[8];
#pragma unroll
          for (int e = 0; e < 8; ++e) b[e] = pack2<__nv_bfloat16>(v[i][2 * e], v[i][2 * e + 1]);
          sts_v4(s_base + L::kOffQr + QR::off(m, 2 * (c - C / 16)), b[0], b[1], b[2], b[3]);
          sts_v4(s_base + L::kOffQr + QR::off(m, 2 * (c - C / 16) + 1), b[4], b[5], b[6], b[7]);
          continue;
        }
        uint32_t hi[4], lo[4];
        quantize_hi_lo(v[i], sc, hi, lo);
        const bool ckv = c < C / 16;
        const uint32_t at_hi = ckv ? L::kOffQ + QB::off(m, c) : L::kOffQr + QR::off(m, c - C / 16);
        const uint32_t at_lo = ckv ? L::kOffQ + QB::off(RN + m, c) : L::kOffQr + QR::off(RN + m, c - C / 16);
        sts_v4(s_base + at_hi, hi[0], hi[1], hi[2], hi[3]);
        sts_v4(s_base + at_lo, lo[0], lo[1], lo[2], lo[3]);
      }
    }
    fence_proxy_async();  // -> visible to wgmma
    named_barrier_sync(kBarConsumers, 256);
    float inv_s[J][2];  // 1 / the q scale of this thread's rows 8 j + 2 tq + e
#pragma unroll
    for (int j = 0; j < J; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) inv_s[j][e] = lds_f32(s_inv + 4 * (8 * j + 2 * tq + e));

    RowState<RN, MT> state;
    state.reset();
    const int mask_from = len - p.s_q + 1;  // causal: row r sees tokens t < mask_from + r / H

    for (int it = wg; it < n_tiles; it += 2) {
      const int k = k_base + it, st = k % kRing;
      const uint32_t stage = s_base + L::kOffRing + st * L::kStageBytes;
      const uint64_t d_kb = KB::desc(stage), d_kr = L::KR::desc(stage + KB::kBytes);
      // The full barrier's parity names this tile only once the stage's previous tile (k - kRing, the other
      // warpgroup's when kRing is odd) has landed: until then the barrier is a phase behind and the parity of
      // this tile's phase reads as done. So first the producer's own condition for loading this tile: the
      // previous tile released (a fresh barrier's first pass returns at once). Without it a warpgroup two
      // tiles ahead read a stage still filling and freed it early (unspecified launch failure in the bench).
      mbarrier_wait(empty + 8 * st, ((k / kRing) & 1) ^ 1);
      mbarrier_wait(full + 8 * st, (k / kRing) & 1);

      // ---- S^T = K Q^T: e4m3, columns 0 .. RN-1 against q's hi part and RN .. 2 RN-1 against its lo part;
      //      fp8_ds_mla: a chain per scale group (k32 steps 4 g .. 4 g + 3), two groups at a time (registers), each
      //      scaled per token once done, and the bf16 rope in a chain of its own
      float x[SV];  // x[4 j + 2 h + e] = score of token 16 wq + g + 8 h, row 8 j + 2 tq + e (before sm_scale)
      if constexpr (L::kDs) {
        float ckv[SV], accr[SV];
#pragma unroll
        for (int i = 0; i < SV; ++i) ckv[i] = 0.f;
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          float acc[2][2 * SV];
#pragma unroll
          for (int c = 0; c < 2; ++c)
#pragma unroll
            for (int i = 0; i < 2 * SV; ++i) acc[c][i] = 0.f;
#pragma unroll
          for (int i = 0; i < SV; ++i) accr[i] = 0.f;
          fence_regs(acc[0]);
          fence_regs(acc[1]);
          fence_regs(accr);
          wgmma_fence();
#pragma unroll
          for (int ks = 8 * half; ks < 8 * half + 8; ++ks)
            wgmma_ss_e4m3<2 * RN>(acc[(ks / 4) % 2], desc_add(d_kb, KB::step(ks)), desc_add(d_q, QB::step(ks)), 1);
          if (half == 1) {
#pragma unroll
            for (int ks = 0; ks < R / 16; ++ks)
              wgmma_ss_bf16<RN>(accr, desc_add(d_kr, L::KR::step(ks)), desc_add(d_qr, QR::step(ks)), 1);
          }
          wgmma_commit();
          wgmma_wait<0>();
          fence_regs(acc[0]);
          fence_regs(acc[1]);
          fence_regs(accr);
          float tsc[2][2];  // the scales of groups 2 half, 2 half + 1 of this thread's tokens 16 wq + g + 8 h
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const uint32_t at = stage + L::kScaleOff + 16 * (16 * wq + g + 8 * h) + 8 * half;
            const uint2 v = lds_v2(at);
            tsc[h][0] = __uint_as_float(v.x), tsc[h][1] = __uint_as_float(v.y);
          }
#pragma unroll
          for (int i = 0; i < SV; ++i)
#pragma unroll
            for (int c = 0; c < 2; ++c) ckv[i] += tsc[(i >> 1) & 1][c] * (acc[c][i] + acc[c][SV + i]);
        }
#pragma unroll
        for (int i = 0; i < SV; ++i) x[i] = ckv[i] * inv_s[i >> 2][i & 1] + accr[i];
      } else {
        float acc[2 * SV];
#pragma unroll
        for (int i = 0; i < 2 * SV; ++i) acc[i] = 0.f;
        fence_regs(acc);
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < C / 32; ++ks)
          wgmma_ss_e4m3<2 * RN>(acc, desc_add(d_kb, KB::step(ks)), desc_add(d_q, QB::step(ks)), 1);
#pragma unroll
        for (int ks = 0; ks < R / 32; ++ks)
          wgmma_ss_e4m3<2 * RN>(acc, desc_add(d_kr, L::KR::step(ks)), desc_add(d_qr, QR::step(ks)), 1);
        wgmma_commit();
        wgmma_wait<0>();
        fence_regs(acc);
#pragma unroll
        for (int i = 0; i < SV; ++i) x[i] = (acc[i] + acc[SV + i]) * inv_s[i >> 2][i & 1];  // hi column c, lo RN + c
      }

      // ---- softmax over tokens (narrow.cuh)
      const int t_tile = (seg.blk_lo + it) * N, valid = min(len - t_tile, N);
      softmax_tile<H, RN, MT>(x, state, place, t_tile, mask_from, len, row0, rows, scale_log2,
                              [&](int r, int t, int, float pv) {
                                sts_u16(s_pt + PP::off(r, t >> 3) + 2 * (t & 7), __half_as_ushort(__float2half_rn(pv)));
                              });

      // ---- O^T += V^T P^T: A = V^T from the stage's bytes, groups of 4 m-tiles in kABufs buffers (a group's
      //      registers are rewritten once the wgmmas of the group kABufs before have read them). Tokens past the
      //      length read as 0 (P is 0 there, but the stage may hold NaN bytes: 0 x NaN = NaN): only the last
      //      tile of a segment has such tokens, so the masking is a second copy of the phase, not a select per load.
      uint32_t a[L::kABufs][4][4];
      constexpr int kGroups = MT / 4;
      auto pv = [&](auto masked) {
#pragma unroll
        for (int kk = 0; kk < N / 16; ++kk) {
          uint32_t w[4][L::kPiece / 4];  // the piece of tokens 16 kk + 2 tq + {0, 1, 8, 9}
#pragma unroll
          for (int u = 0; u < 4; ++u) {
            const int t = 16 * kk + 2 * tq + (u & 1) + 8 * (u >> 1);
            const uint32_t addr = stage + piece_blk * KB::kBlockBytes + t * 128 + ((piece_chunk ^ (t & 7)) << 4) +
                                  piece_half;
            if constexpr (L::kPiece == 16) {
              const uint4 q4 = lds_v4(addr);
              w[u][0] = q4.x, w[u][1] = q4.y, w[u][2] = q4.z, w[u][3] = q4.w;
            } else {
              const uint2 q2 = lds_v2(addr);
              w[u][0] = q2.x, w[u][1] = q2.y;
            }
            if (decltype(masked)::value && t >= valid) {
#pragma unroll
              for (int i = 0; i < L::kPiece / 4; ++i) w[u][i] = 0u;
            }
          }
          [[maybe_unused]] uint32_t s01 = 0u, s89 = 0u;  // fp8_ds_mla: f16 scales of tokens (0, 1), (8, 9), group wq
          if constexpr (L::kDs) {
            float ts[4];
#pragma unroll
            for (int u = 0; u < 4; ++u) {
              const int t = 16 * kk + 2 * tq + (u & 1) + 8 * (u >> 1);
              ts[u] = lds_f32(stage + L::kScaleOff + 16 * t + 4 * wq);
              if (decltype(masked)::value && t >= valid) ts[u] = 0.f;  // a poisoned slot's scale may be NaN
            }
            s01 = pack2<__half>(ts[0], ts[1]), s89 = pack2<__half>(ts[2], ts[3]);
          }
#pragma unroll
          for (int gh = 0; gh < kGroups; ++gh) {
            const int gi = kGroups * kk + gh;
            uint32_t(&f)[4][4] = a[gi % L::kABufs];
            if (gi >= L::kABufs) {
              wgmma_wait<L::kABufs - 1>();
              fence_regs(f);
            }
#pragma unroll
            for (int q = 0; q < 4; ++q) {
              e4m3_vt_fragment(w, 4 * gh + q, f[q]);
              if constexpr (L::kDs) {
                f[q][0] = hmul2_bits(f[q][0], s01), f[q][1] = hmul2_bits(f[q][1], s01);
                f[q][2] = hmul2_bits(f[q][2], s89), f[q][3] = hmul2_bits(f[q][3], s89);
              }
            }
#pragma unroll
            for (int q = 0; q < 4; ++q) fence_regs(state.o[4 * gh + q]);
            wgmma_fence();
#pragma unroll
            for (int q = 0; q < 4; ++q)
              wgmma_rs<RN, __half, 0>(state.o[4 * gh + q], f[q], desc_add(d_pt, PP::step(kk)), 1);
            wgmma_commit();
          }
        }
      };
      if (valid < N) pv(std::true_type{});
      else pv(std::false_type{});
      wgmma_wait<0>();
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) fence_regs(state.o[mt]);
#pragma unroll
      for (int b = 0; b < L::kABufs; ++b) fence_regs(a[b]);
      if (lane == 0) mbarrier_arrive(empty + 8 * st);  // this warp is done with the stage
      named_barrier_sync(bar_id, kWgThreads);          // P^T and the warp maxima are free
    }
    k_base += n_tiles;
    // With an odd tile count WG 1 passes the last tile's three warpgroup barriers on its own, as in narrow.cuh
    // (nothing needs them; racecheck pairs barrier instances by count and otherwise reports the epilogue's exchange).
    if (wg == 1 && (n_tiles & 1)) {
      named_barrier_or(bar_id, kWgThreads, false);
      named_barrier_sync(bar_id, kWgThreads);
      named_barrier_sync(bar_id, kWgThreads);
    }

    // ---- epilogue (narrow_tile.cuh): O staged in its own two areas (the producer may be refilling the ring), the
    //      features put back in order
    write_segment<Cfg, RN, MT, true>(p, seg, state, place, s_m, s_lse, s_base + L::kOffO, scale.out(1.f),
                                     [&](int mt, int i) { return piece + 2 * mt + (i >> 1); },
                                     [] { named_barrier_sync(kBarConsumers, 256); });
  });
}

// The body of a kernel whose producer warp (8) fills a ring of raw e4m3 stages (produce_e4m3, layout L) for two
// consumer warpgroups: the ring's mbarriers (full: the producer's expect_tx and the boxes' bytes; empty:
// kEmptyArrivals consumer warps), init(s_base) for the kernel's own shared state, the last barrier of all 384
// threads, then the producer or consume(s_base) with the consumers' registers (setmaxnreg).
template <class Cfg, class L, int kEmptyArrivals, class Init, class Consume>
__device__ __forceinline__ void ring_kernel(const TmaParams& tp, Init&& init, Consume&& consume) {
  extern __shared__ __align__(1024) unsigned char smem[];
  const uint32_t s_base = smem_u32(smem);
  if (s_base & 1023u) __trap();  // the swizzle atoms of the descriptors need 1024-byte alignment
  const int tid = threadIdx.x, warp = __shfl_sync(0xffffffffu, tid >> 5, 0);
  if (tid == 0) {
    const uint32_t full = s_base + L::kOffBars;
#pragma unroll
    for (int i = 0; i < L::kRing; ++i) {
      mbarrier_init(full + 8 * i, 1);
      mbarrier_init(full + 8 * (L::kRing + i), kEmptyArrivals);
    }
    init(s_base);
    fence_mbarrier_init();
  }
  __syncthreads();
  plan_part<Cfg>(tp.p);  // (every thread: the work list of this CTA's part; the consumers meet at their own
  if (warp >= 8) {       // barriers from here on)
    setmaxnreg_dec<L::kProducerRegs>();
    if (warp == 8) produce_e4m3<Cfg, L>(tp, blockIdx.y, s_base);
    return;
  }
  setmaxnreg_inc<L::kConsumerRegs>();
  consume(s_base);
}

// The e4m3 kernel: each stage is one warpgroup's tile (empty: its four warps).
template <class Cfg>
__device__ __forceinline__ void decode_e4m3(const TmaParams& tp) {
  ring_kernel<Cfg, E4m3Layout<Cfg>, 4>(tp, [](uint32_t) {}, [&](uint32_t s_base) {
    consume_e4m3<Cfg>(tp.p, blockIdx.y, s_base);
  });
}

// Encodes the cache's maps (e4m3 bytes, 128-byte box rows: the ckv in 128-column boxes, the rope in one box of 128
// whose bytes past R are zero fill) and launches the kernel.
template <class Cfg, class L = E4m3Layout<Cfg>, typename Kernel>
inline int launch_e4m3(Kernel kernel, const DecodeParams& p, uint64_t stream) {
  // fp8_ds_mla: the rope as 128 bytes at byte 528 of each 656-byte token, in the same 128-byte swizzle as bf16
  constexpr CacheMapShape kShape = {L::C, 128, 128, L::kDs ? 2 * L::R : L::R, 128, 128, 1, L::kDs ? 16 : 0};
  DecodeParams mp = p;
  if constexpr (L::kDs) mp.kpe_stride_tok *= 2, mp.kpe_stride_page *= 2;  // bf16 elements -> bytes
  TmaParams tp;
  const int err = cache_maps<L>(mp, kShape, tp);
  tp.p = p;
  return err ? err : launch_decode_kernel<Cfg>(kernel, p, stream, tp);
}

}  // namespace narrow
}  // namespace mla_gen
