// mla-gen family `seesaw`, its fp8_e4m3 path: the seesaw over the cache's own bytes with e4m3 tensor cores.
//
// Why: a 16-bit seesaw holds Q (72 KB) and two 72 KB kv tiles, so a pair's loads wait for the pair before it (the
// kernel's loop-carried chain, PERF.md), and converting e4m3 tiles into those fp16 buffers put the conversion on
// that chain too (1.5x the bf16 time at 128 heads). Here nothing is converted into shared memory:
//   - the producer warp loads the raw e4m3 tiles by TMA into a ring of kRing stages (narrow_e4m3.cuh's producer:
//     the ckv in C / 128 blocks of 128-byte swizzled rows, the rope in one block, bytes past R zero fill); a stage
//     is 40 KB at 512/64, so three fit beside Q and the loads run up to a pair and a half ahead;
//   - S = Q K^T by e4m3 wgmma straight from the stage: q is quantized per row (scaled to 224 at its largest
//     |value|) into two e4m3 parts hi + lo (about bf16's precision, narrow_e4m3.cuh), two k-chains into one
//     accumulator (m64n64k32, lo first), then x = S / scale;
//   - O^T = V^T P^T (fp16): V^T is wgmma's A operand in registers, built from the stage's bytes (LDS, PRMT, cvt;
//     narrow_e4m3.cuh e4m3_vt_fragment), P^T its B operand from shared memory ([row][token] fp16 = P as stored).
//     A thread's O^T rows are kPiece consecutive features of its warpgroup's half (WG w: features w C/2 ..), so
//     one 8-byte load per token (a k16 step ahead) feeds all four m-tiles, and its columns are query rows
//     8 j + 2 tq + e (16 rows). The rows of a request's last tile past its length are zeroed in the stage first.
// The seesaw is seesaw.cuh's (its lazy_softmax too): per pair, WG0 computes S0 over tile 2i, WG1 S1 over tile
// 2i + 1; WG0's softmax (lazy max, shared row state m) publishes P0 and m0, WG1's softmax of S1 against m0 (under
// WG0's P V) publishes P1 and m1; each warpgroup accumulates both tiles into its half of O^T: WG0 O^T_L +=
// V0_L^T P0^T, then V1_L^T P1^T; WG1 O^T_R += V0_R^T P0^T, then V1_R^T P1^T. O^T's columns are rows, so where a
// row's max moved (rare: > 8 in log2) a thread reads the scale the softmax published (red_m, by pair parity) for
// all 16 of its rows; a flag per softmax says whether any row moved.
// Epilogue: each warpgroup's fp32 O^T half staged row-major in q's dead panels in turn, copied out normalised.
// Every consumer warp arrives on a stage's empty barrier once its last read of the stage retired (count 8).
// P0 alternates between two buffers by pair parity (WG1's P0 V0_R of pair i may still read P0 when WG0 stores
// pair i + 1's; WG0 stores pair i + 2's only after WG1 passed pair i + 1's P1 hand-off, after it retired); P1 has
// one (WG1 stores pair i + 1's after the P0 hand-off, which WG0 reaches after its P1 V1_L retired).
// Shared memory (dynamic, 1024-byte aligned): q hi, q lo [64][C] e4m3 | q rope hi, lo [64][128] | the ring
// [kRing][64][C + 128] | P [3][64][64] fp16 | red_m (m, scale) [2 parity][2][2][64] fp32 | red_sum [2][64] |
// 1 / q scale [64] | move flags [2][2] u32 | the ring position (tiles before the segment) | full, empty mbarriers
// [kRing] each. 512/64: 80 + 120 + 24 + 2.8 KB.
#pragma once
#include "narrow_e4m3.cuh"
#include "wgmma.cuh"

namespace mla_gen {
namespace seesaw {

using namespace sm90;

template <class Cfg>
struct E4m3Layout {
  static constexpr int H = Cfg::kNumHeads, C = Cfg::kCkvDim, R = Cfg::kRopeDim;
  static constexpr int M = Cfg::kBlockM, N = Cfg::kBlockN, kRing = Cfg::kStages;
  static constexpr bool kDs = false;           // the producer's fp8_ds_mla branches (narrow_e4m3.cuh)
  static constexpr int MTW = C / 128;          // m-tiles of 64 features per warpgroup (its half of O^T)
  static constexpr int kPiece = 2 * MTW;       // bytes of a token row behind a thread's O^T rows (8 or 4)
  using QB = Panel<C / 2, M>;                  // e4m3 q ckv [M][C] (a 16-bit panel's bytes)
  using QR = Panel<64, M>;                     // e4m3 q rope [M][128] (R bytes used)
  using KB = Panel<C / 2, N>;                  // a stage's ckv
  using KR = Panel<64, N>;                     // a stage's rope (TMA zero-fills the bytes past R)
  using PP = Panel<N, M>;                      // P [M][N] fp16
  static constexpr int kScaleOff = KB::kBytes + KR::kBytes;  // (no scales: the producer's fp8_ds_mla offset)
  static constexpr int kStageBytes = kScaleOff;
  static constexpr int kTokenBytes = C + 128;  // the bytes a token's boxes bring
  static constexpr int kOffQHi = 0, kOffQLo = QB::kBytes, kOffQrHi = 2 * QB::kBytes;
  static constexpr int kOffQrLo = kOffQrHi + QR::kBytes;
  static constexpr int kOffRing = kOffQrLo + QR::kBytes;
  static constexpr int kOffP = kOffRing + kRing * kStageBytes;  // P0 (pair parity 0, 1), P1
  static constexpr int kOffRedM = kOffP + 3 * PP::kBytes;        // [2 parity][2: S0, S1][2: m, scale][M] fp32
  static constexpr int kOffRedSum = kOffRedM + 8 * M * 4;        // [2 warpgroups][M] fp32
  static constexpr int kOffInvS = kOffRedSum + 2 * M * 4;        // [M] fp32
  static constexpr int kOffFlags = kOffInvS + M * 4;             // [2 parity][2] u32: a row moved (pair + 1)
  static constexpr int kOffKBase = kOffFlags + 4 * 4;            // u32 [2]: the part's tiles, pairs before the segment
  static constexpr int kOffBars = kOffKBase + 8;                 // full [kRing], empty [kRing]
  static constexpr int kSmemBytes = kOffBars + 2 * kRing * 8;
  static_assert(kSmemBytes == Cfg::kSmemBytes, "shared memory layout disagrees with VariantSpec.smem_bytes");
  static_assert(kSmemBytes <= 227 * 1024, "seesaw e4m3: shared memory over the 227 KB a block may use on sm_90a");
  static_assert(M == 64 && N == 64 && Cfg::kWarps == 8 && Cfg::kThreads == 384, "64 rows, 64 tokens, 2 + 1 WGs");
  static_assert((C == 256 || C == 512) && (R == 32 || R == 64), "ckv 256 or 512, rope 32 or 64");
  static_assert(kRing >= 3, "a ring of at least three stages: the next pair's tiles load while a pair computes");
  static_assert(kOffRing % 1024 == 0 && kStageBytes % 1024 == 0 && kOffP % 1024 == 0 && QR::kBytes % 1024 == 0,
                "panels start on 1024-byte boundaries (swizzle atoms)");
  // registers after setmaxnreg within the CTA's pool of 384 x 168 (narrow_e4m3.cuh's producer fits 24)
  static constexpr int kConsumerRegs = 240, kProducerRegs = 24;
  static_assert(2 * 128 * kConsumerRegs + 128 * kProducerRegs <= 384 * 168, "setmaxnreg over the CTA's registers");
  // V^T fragment buffers (one m-tile's A each, a commit group) in flight per warpgroup: with four m-tiles a buffer
  // ptxas serialized every wgmma (C7512, registers), four one-m-tile buffers spill (PERF.md, twenty-fifth session)
  static constexpr int kABufs = 3;
};

// The consumers (warpgroups 0 and 1, threads 0-255); see the file's header.
template <class Cfg>
__device__ __forceinline__ void consume_e4m3(const DecodeParams& p, int part, uint32_t s_base) {
  using L = E4m3Layout<Cfg>;
  using Q = typename Cfg::QType;
  using QB = typename L::QB;
  using QR = typename L::QR;
  using KB = typename L::KB;
  using KR = typename L::KR;
  using PP = typename L::PP;
  using OutT = typename Cfg::OutType;
  constexpr int H = L::H, C = L::C, R = L::R, M = L::M, N = L::N, MTW = L::MTW, kRing = L::kRing;
  constexpr int SV = N / 2;          // S accumulators per thread (m64n64)
  constexpr int kWords = (L::kPiece + 3) / 4;
  const int tid = threadIdx.x, lane = tid & 31;
  const int warp = __shfl_sync(0xffffffffu, tid >> 5, 0);
  const int wg = warp >> 2, wq = warp & 3, wrow = 16 * wq;
  const int g = lane >> 2, tq = lane & 3;
  const int rows = p.s_q * H, row0 = blockIdx.x * M;
  const uint32_t s_ring = s_base + L::kOffRing, full = s_base + L::kOffBars, empty = full + 8 * kRing;
  const uint32_t s_red_m = s_base + L::kOffRedM, s_red_sum = s_base + L::kOffRedSum;
  const uint32_t s_inv = s_base + L::kOffInvS, s_flags = s_base + L::kOffFlags;
  const float scale_log2 = TensorScale<Cfg>(p, p.sm_scale * kLog2e).log2;
  // the part's tiles and pairs before this segment (the ring's position; red_m, the flags and P0 by the pair's
  // parity) live in shared memory, read per pair: two registers carried beside O^T and the fragments spilled
  const uint32_t s_kbase = s_base + L::kOffKBase, s_pbase = s_kbase + 4;

  for_each_segment<Cfg, kBarConsumers>(p, part, [&](const Segment& seg) {
    const int b = seg.req, len = seg.len, n_tiles = seg.blk_hi - seg.blk_lo;
    int pair_no = 0;  // the part's pairs before the current one (set at each pair's start)

    // ---- q: 4 threads a row; its largest |value| -> scale s = 224 / it; hi = e4m3(q s), lo = e4m3(q s - hi)
    {
      constexpr int TPR = 4, kChunks = (C + R) / 16, KQ = (kChunks + TPR - 1) / TPR;
      // (opaque: the row's shared-memory addresses are then made per segment, not hoisted and kept: registers)
      const int tq_id = opaque(tid), m = tq_id / TPR, tl = tq_id % TPR, r = row0 + m;
      const bool valid = r < rows;
      const int s = valid ? r / H : 0, h = valid ? r % H : 0;
      const Q* qn = reinterpret_cast<const Q*>(p.q_nope) + (b * p.q_nope_stride_b + s * p.q_nope_stride_s +
                                                            h * p.q_nope_stride_h);
      const Q* qp = reinterpret_cast<const Q*>(p.q_pe) + (b * p.q_pe_stride_b + s * p.q_pe_stride_s +
                                                         h * p.q_pe_stride_h);
      // chunk i: 16 values (2 x 16 bytes) of ckv chunk c = tl + 4 i, or of rope chunk c - C / 16; zeros past
      // kChunks. Read twice, for the row's maximum and then for the quantization (L1 hits), so that no copy of
      // the row stays live from one pass to the next (registers).
      auto load = [&](int i, uint4 (&x)[2]) {
        const int c = tl + TPR * i;
        const bool used = valid && c < kChunks;
        const uint4* src = reinterpret_cast<const uint4*>(c < C / 16 ? qn + 16 * c : qp + 16 * (c - C / 16));
        x[0] = used ? __ldg(src) : make_uint4(0u, 0u, 0u, 0u);
        x[1] = used ? __ldg(src + 1) : make_uint4(0u, 0u, 0u, 0u);
      };
      // the second read: ordered after the stores before it (asm volatile), so that the compiler does not hoist
      // all of them (registers); each hits L1
      auto load_ordered = [&](int i, uint4 (&x)[2]) {
        const int c = tl + TPR * i;
        const Q* src = c < C / 16 ? qn + 16 * c : qp + 16 * (c - C / 16);
        x[0] = valid ? ldg_ordered(src) : make_uint4(0u, 0u, 0u, 0u);
        x[1] = valid ? ldg_ordered(src + 8) : make_uint4(0u, 0u, 0u, 0u);
      };
      // the largest |value| from the 16-bit patterns (sign cleared, they order as the values do)
      uint32_t bits = 0u;
#pragma unroll
      for (int i = 0; i < KQ; ++i) {
        uint4 x[2];
        load(i, x);
#pragma unroll
        for (int k = 0; k < 2; ++k)
          bits = __vmaxu2(bits, __vmaxu2(__vmaxu2(x[k].x & 0x7FFF7FFFu, x[k].y & 0x7FFF7FFFu),
                                         __vmaxu2(x[k].z & 0x7FFF7FFFu, x[k].w & 0x7FFF7FFFu)));
      }
      bits = __vmaxu2(bits, __shfl_xor_sync(0xffffffffu, bits, 1));
      bits = __vmaxu2(bits, __shfl_xor_sync(0xffffffffu, bits, 2));
      bits = max(bits & 0xFFFFu, bits >> 16);
      const float amax = to_float2(*reinterpret_cast<const typename Vec2<Q>::type*>(&bits)).x;
      // (fast divisions: an IEEE division's slow path is a call, and calls cost registers)
      const float sc = amax > 0.f && amax < INFINITY ? __fdividef(224.f, amax) : 1.f;
      if (tl == 0) sts_f32(s_inv + 4 * m, __fdividef(1.f, sc));
#pragma unroll
      for (int i = 0; i < KQ; ++i) {
        const int c = tl + TPR * i;
        if (c >= kChunks) continue;
        uint4 x[2];
        load_ordered(i, x);
        const typename Vec2<Q>::type* x2 = reinterpret_cast<const typename Vec2<Q>::type*>(x);
        float v[16];
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const float2 f = to_float2(x2[e]);
          v[2 * e] = f.x, v[2 * e + 1] = f.y;
        }
        uint32_t hi[4], lo[4];
        narrow::quantize_hi_lo(v, sc, hi, lo);
        const bool ckv = c < C / 16;
        const uint32_t at_hi = ckv ? L::kOffQHi + QB::off(m, c) : L::kOffQrHi + QR::off(m, c - C / 16);
        const uint32_t at_lo = ckv ? L::kOffQLo + QB::off(m, c) : L::kOffQrLo + QR::off(m, c - C / 16);
        sts_v4(s_base + at_hi, hi[0], hi[1], hi[2], hi[3]);
        sts_v4(s_base + at_lo, lo[0], lo[1], lo[2], lo[3]);
      }
    }
    fence_proxy_async();  // -> visible to wgmma
    bar_sync(kBarConsumers, 256);

    float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
    const int mask_from = len - p.s_q + 1;  // causal: row r sees tokens t < mask_from + r / H
    // O^T of this warpgroup's half: o[mt][4 j + 2 h + e] = feature piece + 2 mt + h, query row 8 j + 2 tq + e
    float o[MTW][SV];
#pragma unroll
    for (int mt = 0; mt < MTW; ++mt)
#pragma unroll
      for (int i = 0; i < SV; ++i) o[mt][i] = 0.f;

    // S = Q K^T over the stage: the hi and the lo chain into one accumulator, ckv then rope
    auto qk = [&](float (&sc)[SV], uint32_t stage) {
      const uint64_t d_kb = KB::desc(stage), d_kr = KR::desc(stage + KB::kBytes);
      // (q's descriptors made here, not kept across the pair: registers)
      const uint64_t d_qhi = QB::desc(s_base + L::kOffQHi), d_qlo = QB::desc(s_base + L::kOffQLo);
      const uint64_t d_qrhi = QR::desc(s_base + L::kOffQrHi), d_qrlo = QR::desc(s_base + L::kOffQrLo);
#pragma unroll
      for (int i = 0; i < SV; ++i) sc[i] = 0.f;
      fence_regs(sc);
      wgmma_fence();
      // lo first: the tensor cores add a k32 step's products to the accumulator at ~14 bits of its magnitude
      // (DeepSeek-V3's fp8 GEMM note), so the small lo terms go in while the accumulator is small
#pragma unroll
      for (int part_q = 0; part_q < 2; ++part_q) {
        const uint64_t dq = part_q ? d_qhi : d_qlo, dr = part_q ? d_qrhi : d_qrlo;
#pragma unroll
        for (int ks = 0; ks < C / 32; ++ks)
          wgmma_ss_e4m3<N>(sc, desc_add(dq, QB::step(ks)), desc_add(d_kb, KB::step(ks)), 1);
#pragma unroll
        for (int ks = 0; ks < R / 32; ++ks)
          wgmma_ss_e4m3<N>(sc, desc_add(dr, QR::step(ks)), desc_add(d_kr, KR::step(ks)), 1);
      }
      wgmma_commit();
    };

    // Softmax of one tile's scores (seesaw.cuh lazy_softmax) after q's row scale: m_new, the own rows' scale, the
    // row sums of P; P to s_pt (fp16), m_new and scale to red_m; a moved row sets `flag` to pair_no + 1.
    auto softmax = [&](float (&sc)[SV], int it, bool present, const float (&m_ref)[2], float (&m_new)[2],
                       float (&scale)[2], float (&lsum)[2], uint32_t s_pt, uint32_t red_m, uint32_t flag) {
      const float inv_s[2] = {lds_f32(s_inv + 4 * (wrow + g)), lds_f32(s_inv + 4 * (wrow + g + 8))};
#pragma unroll
      for (int i = 0; i < SV; ++i) sc[i] *= inv_s[(i >> 1) & 1];
      const bool moved =
          lazy_softmax<H, N>(sc, present, (seg.blk_lo + it) * N, mask_from, len, opaque(row0 + wrow + g), rows, tq,
                             scale_log2, m_ref, m_new, scale, lsum, [&](int hh, int j, float p0, float p1) {
                               sts_u32(s_pt + PP::off(wrow + g + 8 * hh, j) + 4 * tq, pack2<__half>(p0, p1));
                             });
      if (tq == 0) {
        sts_f32(red_m + 4 * (wrow + g), m_new[0]);
        sts_f32(red_m + 4 * (wrow + g + 8), m_new[1]);
        sts_f32(red_m + 4 * (M + wrow + g), scale[0]);  // for O^T's columns (rescale_o)
        sts_f32(red_m + 4 * (M + wrow + g + 8), scale[1]);
      }
      if (moved) sts_u32(flag, static_cast<uint32_t>(pair_no + 1));
    };
    // own rows' l times scale
    auto rescale_l = [&](const float (&scale)[2]) {
      l_run[0] *= scale[0];
      l_run[1] *= scale[1];
    };
    // O^T's columns (rows 8 j + 2 tq + e) times the scales the softmax published at red, where it flagged a move
    // (no wgmma of O^T in flight)
    auto rescale_o = [&](uint32_t flag, uint32_t red) {
      if (lds_u32(flag) != static_cast<uint32_t>(pair_no + 1)) return;
#pragma unroll
      for (int j = 0; j < N / 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float f = lds_f32(red + 4 * (M + 8 * j + 2 * tq + e));  // the row's scale (1 where it did not move)
#pragma unroll
          for (int mt = 0; mt < MTW; ++mt) o[mt][4 * j + e] *= f, o[mt][4 * j + 2 + e] *= f;
        }
    };
    // Zeroes this warpgroup's features of the stage's token rows from `valid` on (a request's last tile: P is 0
    // there, but the rows may hold NaN bytes, and 0 x NaN is NaN), once every Q K^T that reads the stage is done,
    // then makes it visible to the warpgroup's loads (a select per load instead cost registers: spills)
    const int bar_local = wg ? kBarLocal1 : kBarLocal0;
    auto zero_tail = [&](uint32_t stage, int valid) {
      if (valid >= N) return;
      zero_rows_past<N, KB::kBlocks / 2, KB::kBlockBytes>(stage, valid, wg, tid & 127);
      bar_sync(bar_local, 128);
    };
    // O^T += V^T P^T over the stage's features of this warpgroup: A = V^T from the stage's bytes, B = P^T at s_pt
    // (a: the warpgroup's fragment buffers; kk0: k16 steps issued before in this pair, so that a buffer is
    // rewritten only once the wgmmas that read it retired, across both of a pair's calls)
    auto pv = [&](uint32_t stage, uint32_t s_pt, uint32_t (&a)[L::kABufs][4], int kk0) {
      const uint64_t d_pt = PP::desc(s_pt);
      // this thread's piece of a token row: features wg C/2 + kPiece (8 wq + g) .. + kPiece (its O^T rows), in
      // block / 16-byte chunk / byte (made here from an opaque thread index, not kept across the pair: registers)
      const int t_id = opaque(tid);
      const int piece = (t_id >> 7) * (C / 2) + L::kPiece * (8 * ((t_id >> 5) & 3) + ((t_id & 31) >> 2));
      const int piece_blk = piece / 128, piece_chunk = (piece % 128) / 16, piece_byte = piece % 16;
      uint32_t wb[2][4][kWords];  // the pieces of tokens 16 kk + 2 tq + {0, 1, 8, 9}, a k16 step ahead
      auto load_w = [&](int kk, uint32_t (&w)[4][kWords]) {
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const int t = 16 * kk + 2 * tq + (u & 1) + 8 * (u >> 1);
          const uint32_t addr =
              stage + piece_blk * KB::kBlockBytes + t * 128 + ((piece_chunk ^ (t & 7)) << 4) + piece_byte;
          if constexpr (kWords == 2) {
            const uint2 q2 = lds_v2(addr);
            w[u][0] = q2.x, w[u][1] = q2.y;
          } else {
            w[u][0] = lds_u32(addr);
          }
        }
      };
      load_w(0, wb[0]);
#pragma unroll
      for (int kk = 0; kk < N / 16; ++kk) {
        uint32_t(&w)[4][kWords] = wb[kk & 1];
        if (kk + 1 < N / 16) load_w(kk + 1, wb[(kk + 1) & 1]);
#pragma unroll
        for (int mt = 0; mt < MTW; ++mt) {  // a commit group per m-tile
          const int n = (kk0 + kk) * MTW + mt;  // groups issued before in this pair
          uint32_t(&f)[4] = a[n % L::kABufs];
          if (n >= L::kABufs) {
            wgmma_wait<L::kABufs - 1>();
            fence_regs(f);
          }
          narrow::e4m3_vt_fragment(w, mt, f);
          fence_regs(o[mt]);
          wgmma_fence();
          wgmma_rs<M, __half, 0>(o[mt], f, desc_add(d_pt, PP::step(kk)), 1);
          wgmma_commit();
        }
      }
    };
    auto retire_pv = [&]() {
      wgmma_wait<0>();
#pragma unroll
      for (int mt = 0; mt < MTW; ++mt) fence_regs(o[mt]);
    };
    auto release = [&](int st) {  // this warp is done with ring stage st
      if (lane == 0) mbarrier_arrive(empty + 8 * st);
    };

    for (int it = 0; it < n_tiles; it += 2) {
      pair_no = static_cast<int>(lds_u32(s_pbase)) + it / 2;
      const int k0 = static_cast<int>(lds_u32(s_kbase)) + it, k1 = k0 + 1, st0 = k0 % kRing, st1 = k1 % kRing;
      const uint32_t stage0 = s_ring + st0 * L::kStageBytes, stage1 = s_ring + st1 * L::kStageBytes;
      const bool has_k1 = it + 1 < n_tiles;
      const int par = pair_no & 1;
      const uint32_t s_p0 = s_base + L::kOffP + par * PP::kBytes, s_p1 = s_base + L::kOffP + 2 * PP::kBytes;
      const uint32_t red_m0 = s_red_m + 4 * M * (4 * par), red_m1 = red_m0 + 8 * M;  // m and scale of S0, S1
      const uint32_t flag0 = s_flags + 8 * par, flag1 = flag0 + 4;
      const int valid0 = len - (seg.blk_lo + it) * N, valid1 = valid0 - N;
      float sacc[SV];
      float m_mid[2], m_end[2], sc0[2], sc1[2], lsum[2];

      uint32_t frag[L::kABufs][4];
      if (wg == 0) {
        // ---- S0 = Q K0^T
        mbarrier_wait(full + 8 * st0, (k0 / kRing) & 1);
        qk(sacc, stage0);
        wgmma_wait<0>();
        fence_regs(sacc);
        // ---- softmax S0 against m_run -> m0; publish P0, m0
        softmax(sacc, it, true, m_run, m_mid, sc0, lsum, s_p0, red_m0, flag0);
        rescale_l(sc0);
        l_run[0] += lsum[0];
        l_run[1] += lsum[1];
        fence_proxy_async();
        bar_sync(kBarP0, 256);
        if (it > 0) rescale_o(flag0, red_m0);  // (a segment's first pair: O^T is still 0)
        // ---- O^T_L += V0_L^T P0^T, under the wait for P1
        zero_tail(stage0, valid0);
        pv(stage0, s_p0, frag, 0);
        // ---- P1, m1 from WG1: scale1 = 2^(m0 - m1)
        bar_sync(kBarP1, 256);
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          m_end[hh] = lds_f32(red_m1 + 4 * (wrow + g + 8 * hh));
          sc1[hh] = m_end[hh] != m_mid[hh] ? fast_exp2(m_mid[hh] - m_end[hh]) : 1.f;
        }
        rescale_l(sc1);
      } else {
        // ---- S1 = Q K1^T. Issued even without a K1 tile (its scores become -inf; a wgmma issue under a branch
        //      makes ptxas serialize the ones after it); only the wait depends on it.
        if (has_k1) mbarrier_wait(full + 8 * st1, (k1 / kRing) & 1);
        qk(sacc, stage1);
        // ---- P0, m0 from WG0: scale0 = 2^(m - m0)
        bar_sync(kBarP0, 256);
        wgmma_wait<0>();
        fence_regs(sacc);
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          m_mid[hh] = lds_f32(red_m0 + 4 * (wrow + g + 8 * hh));
          sc0[hh] = m_mid[hh] != m_run[hh] ? fast_exp2(m_run[hh] - m_mid[hh]) : 1.f;
        }
        rescale_l(sc0);
        // ---- softmax S1 against m0 -> m1 (under WG0's P0 V0_L); publish P1, m1
        softmax(sacc, it + 1, has_k1, m_mid, m_end, sc1, lsum, s_p1, red_m1, flag1);
        fence_proxy_async();
        bar_sync(kBarP1, 256);
        rescale_l(sc1);
        l_run[0] += lsum[0];
        l_run[1] += lsum[1];
        if (it > 0) rescale_o(flag0, red_m0);
        // ---- O^T_R += V0_R^T P0^T
        zero_tail(stage0, valid0);
        pv(stage0, s_p0, frag, 0);
      }
      // ---- both: O^T_half += V1_half^T P1^T (O^T first rescaled where WG1 moved a row: P0 V0 retired first)
      if (lds_u32(flag1) == static_cast<uint32_t>(pair_no + 1)) {
        retire_pv();
        rescale_o(flag1, red_m1);
      }
      if (has_k1) {
        zero_tail(stage1, valid1);
        pv(stage1, s_p1, frag, N / 16);
      }
      retire_pv();
      release(st0);
      if (has_k1) release(st1);
      m_run[0] = m_end[0];
      m_run[1] = m_end[1];
    }

    // ---- epilogue: row sums over the quad and both warpgroups, then O^T staged and written (below)
    l_run[0] = quad_sum(l_run[0]);
    l_run[1] = quad_sum(l_run[1]);
    if (tq == 0) {
      sts_f32(s_red_sum + 4 * (wg * M + wrow + g), l_run[0]);
      sts_f32(s_red_sum + 4 * (wg * M + wrow + g + 8), l_run[1]);
    }
    bar_sync(kBarConsumers, 256);  // (every consumer is past its last read of the ring position)
    if (tid == 0) {  // read again after the barriers below
      sts_u32(s_kbase, lds_u32(s_kbase) + n_tiles);
      sts_u32(s_pbase, lds_u32(s_pbase) + (n_tiles + 1) / 2);
    }
    // Each warpgroup's half in turn: its fp32 O^T columns staged row-major in Q's dead panels ([M][C / 2]: the two
    // halves do not fit at once), then copied out by the warpgroup in 4-value chunks, normalised by the row's sum
    // on the way (out rows in the out dtype, or a split's partial rows in fp32). The staging keeps the code that
    // reads O^T plain (registers: a thread's own rows would take a pointer per row beside O^T).
    constexpr int kHalfBytes = C / 2 * 4, kChunksLog2 = C == 512 ? 6 : 5;  // 16-byte chunks of a staged half row
    static_assert(kHalfBytes == 16 << kChunksLog2 && M * kHalfBytes <= 2 * QB::kBytes, "a half in Q's panels");
    using Out2 = typename Vec2<OutT>::type;
    const bool split = seg.split;
    const uint32_t red_last = s_red_m + 4 * M * (4 * (pair_no & 1) + 2);  // m1 of the segment's last pair
    const bool aligned = ((p.out | (p.out_stride_b | p.out_stride_s | p.out_stride_h) * sizeof(OutT)) & 7) == 0;
    // the cache's scale on the output, read here (not kept from the kernel's start: registers)
    const float out_scale = *opaque(reinterpret_cast<const float*>(p.kv_scale));
    // A staged row is C / (2 kPiece) slots of kPiece words, slot s holding features kPiece s ..; word w of slot s
    // of row r lies at word (w + rot(r, s)) mod kPiece of it, so that a warp's 32 stores of one word (8 slots x 4
    // rows) and its 32 reads of one word (16 or 32 slots of one row) each hit 32 banks (in order, the stores
    // conflicted 8 ways: PERF.md, twenty-fifth session).
    constexpr int SW = L::kPiece;
    auto rot = [](int r, int s) {
      return SW == 8 ? 2 * ((r >> 1) & 3) + ((s >> 2) & 1) + 2 * ((s >> 3) & 1) : ((r >> 1) & 3) + (s >> 3);
    };
#pragma unroll 1
    for (int w = 0; w < 2; ++w) {
      if (wg == w) {
        const int slot = 8 * wq + g, r_rot = rot(2 * tq, slot);  // (rows 8 j + 2 tq + e share rot)
        const uint32_t at = s_base + 2 * tq * kHalfBytes + slot * SW * 4;
#pragma unroll
        for (int mt = 0; mt < MTW; ++mt)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const uint32_t word = at + 4 * ((2 * mt + h + r_rot) & (SW - 1));
#pragma unroll
            for (int j = 0; j < N / 8; ++j)
#pragma unroll
              for (int e = 0; e < 2; ++e) sts_f32(word + (8 * j + e) * kHalfBytes, o[mt][4 * j + 2 * h + e]);
          }
      }
      // both warpgroups pass their own barrier each round: compute-sanitizer's racecheck pairs barrier instances
      // by count, and reported the other's round across the consumers' barrier below as a hazard otherwise
      bar_sync(bar_local, 128);
      if (wg == w) {
        for (int i = tid & 127; i < M << kChunksLog2; i += 128) {
          const int rl = i >> kChunksLog2, c = i & ((1 << kChunksLog2) - 1), r = row0 + rl;
          if (r >= rows) continue;
          const float l = lds_f32(s_red_sum + 4 * rl) + lds_f32(s_red_sum + 4 * (M + rl));
          const float inv = l > 0.f ? __fdividef(out_scale, l) : 0.f;  // l < 2^126
          const int slot = 4 * c / SW, w0 = 4 * c % SW, c_rot = rot(rl, slot);
          const uint32_t at = s_base + rl * kHalfBytes + slot * SW * 4;
          auto word = [&](int k) { return lds_f32(at + 4 * ((w0 + k + c_rot) & (SW - 1))) * inv; };
          const float4 v = make_float4(word(0), word(1), word(2), word(3));
          const int col = w * (C / 2) + 4 * c;
          if (w == 1 && c == 0) {
            // the row's lse (row_lse, with MUFU's log2: log2f's slow path is a call, whose registers beside the
            // other warpgroup's O^T spilled), from its sum and m_run, which is the last pair's m1 in red_m
            const float lse = l > 0.f ? (lds_f32(red_last + 4 * rl) + __log2f(l)) * kLn2 : -INFINITY;
            if (split) *ResultRows<Cfg>::partial_lse(p, seg.slot, r) = lse;
            else if (p.lse) *ResultRows<Cfg>::lse(p, seg.req, r) = lse;
          }
          if (split) {
            *reinterpret_cast<float4*>(ResultRows<Cfg>::partial(p, seg.slot, r) + col) = v;
          } else {
            OutT* dst = ResultRows<Cfg>::out(p, seg.req, r) + col;
            const Out2 lo = from_float2<OutT>(make_float2(v.x, v.y)), hi = from_float2<OutT>(make_float2(v.z, v.w));
            if (aligned) {
              *reinterpret_cast<uint2*>(dst) =
                  make_uint2(*reinterpret_cast<const uint32_t*>(&lo), *reinterpret_cast<const uint32_t*>(&hi));
            } else {
              dst[0] = lo.x, dst[1] = lo.y, dst[2] = hi.x, dst[3] = hi.y;
            }
          }
        }
      }
      bar_sync(kBarConsumers, 256);  // the staging area free (the last: for the next segment's Q, the exchanges)
    }
  });
}

// The e4m3 kernel (narrow_e4m3.cuh ring_kernel): both warpgroups read every stage (empty: all eight consumer warps).
template <class Cfg>
__device__ __forceinline__ void decode_e4m3(const TmaParams& tp) {
  using L = E4m3Layout<Cfg>;
  auto init = [](uint32_t s_base) {
#pragma unroll
    for (int i = 0; i < 4; ++i) sts_u32(s_base + L::kOffFlags + 4 * i, 0u);  // no pair has moved a row yet
    sts_u32(s_base + L::kOffKBase, 0u);                                       // the ring at its start
    sts_u32(s_base + L::kOffKBase + 4, 0u);                                   // no pair done
  };
  narrow::ring_kernel<Cfg, L, 8>(tp, init, [&](uint32_t s_base) { consume_e4m3<Cfg>(tp.p, blockIdx.y, s_base); });
}

}  // namespace seesaw
}  // namespace mla_gen
