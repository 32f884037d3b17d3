// mla-gen family `wgmma`: Hopper warpgroup MMA (wgmma.mma_async, sm_90a only), bf16/fp16 in, fp32 accumulate.
//
// Work: the same contract as simt.cuh and mma.cuh. Grid (row blocks, parts); a CTA takes kBlockM = 64
// packed query rows (r = s * heads + h; rows past s_q * heads are zero padding, never written) and
// walks the kv segments of its part (for_each_segment), one kBlockN-token tile at a time.
//
// Threads: two warpgroups (WG 0, WG 1; 256 threads, 1 CTA per SM); both compute, none only loads.
// Per kv tile:
//   1. S = Q K^T, split over tokens: WG w computes the 64 rows x NW = N / 2 tokens w*NW .. w*NW+NW-1
//      over the full C + R depth with wgmma m64n{NW}k16, both operands from shared memory (SS):
//      A = Q (K-major), B = the token rows of the kv tile (K-major: a token row is a column of K^T).
//      The k16 steps alternate between two accumulator sets (independent chains in the tensor pipe).
//      While it runs, the threads issue the cp.async gathers of tile it + S - 1.
//   2. Online softmax in the log2 domain (p = 2^(s * sm_scale * log2 e - m)) against a lazy reference
//      max m, the same in both WGs: m moves only when a row max exceeds it by more than 8 (so p <= 256,
//      and O and l are rescaled only then, in practice on a segment's first tile). Each WG computes P of
//      its half against the current m speculatively and publishes it (shared memory) with its tile row
//      max (quad-reduced, red_max); one barrier with an OR vote says whether any row must move m. If not
//      (the common case) that is the softmax's only barrier; else every thread takes the slow path:
//      both halves' maxima, new m, rescale, P recomputed, a second barrier. Masked scores are -inf; a
//      row that has seen nothing keeps m = -inf and uses 0 as its reference, so 2^x gives 0, never NaN.
//      Each WG keeps its own partial row sum.
//   3. O[:, w*CW .. w*CW+CW-1] += P V with wgmma m64n{CW}k16 (CW = C / 2), B = V = the first C columns
//      of the SAME kv tile read MN-major (imm-trans-b = 1, legal for 16-bit types): the cache is read
//      from HBM once. The own token half's P goes straight from registers (RS: the accumulator layout
//      of S is the A-fragment layout), the other half's P through shared memory (SS, K-major [64][N]).
//      O stays in fp32 registers: CW / 2 per thread (128 at C = 512).
//
// Shared memory (dynamic, 1024-byte aligned; every sub-array is a "panel" of 16-bit elements):
//   Q ckv [64][C] | Q rope [64][R] | stages x (kv ckv [N][C] | kv rope [N][R]) | P [64][N] |
//   red_max [2][64] fp32 | red_sum [2][64] fp32.
// A panel of width W is stored as W / 64 column blocks [rows][64] (128-byte rows, 128-byte swizzle:
// 16-byte chunk c of row r at chunk c ^ (r & 7)) when 64 divides W, else as one block of 64-byte rows
// (W = 32, 64-byte swizzle: c ^ ((r >> 1) & 3)) or 32-byte rows (W = 16, c ^ ((r >> 2) & 1)). These
// are exactly the canonical wgmma swizzle atoms (8 rows x row bytes), so the descriptors describe the
// panels directly: K-major with SBO = 8 rows (k16 step = +32 bytes inside a row, next block =
// +block bytes), and V MN-major with LBO = one column block (64 columns) and SBO = 8 token rows.
// 512/64, N = 64, 2 stages: 72 + 2 x 72 + 8 + 1 KB = 225 KB.
//
// Pipeline: kv tiles are gathered token by token like mma.cuh (any page size: each token row looks up
// its page in the block table, prefetched one tile ahead) with cp.async 16-byte copies (zero-fill
// past the length, so V rows past the length are 0), a team of 8 lanes per 128 contiguous bytes,
// kStages deep. Shared memory written by cp.async or st.shared and read by wgmma next is made visible
// to the async proxy (fence.proxy.async) before the CTA barrier that publishes it. Per tile: barrier
// (tile landed, previous stage free), QK issued, loads of tile it + S - 1 issued, QK wait, softmax,
// P + max vote barrier (+ the rare slow path), PV, wait. The Q tile is loaded with the
// first kv tile of each segment. Descriptors are built from a warp-uniform warpgroup index (uniform
// registers, no per-wgmma R2UR).
//
// fp8 caches: the stages hold the cache's bytes (cp.async, common.cuh RawKVTile) and every thread
// dequantizes a share of the current tile into one fp16 tile. In two parts: the first ckv half before
// QK, the second half and the rope while the QK k-steps over the first half run (a barrier between),
// so only the first half's conversion stands between the tile's arrival and its tensor work.
#pragma once
#include "sm90.cuh"

namespace mla_gen {
namespace wgmma {

using namespace sm90;

template <class Cfg>
struct Layout {
  using KV = typename Cfg::KVType;
  static constexpr int H = Cfg::kNumHeads, C = Cfg::kCkvDim, R = Cfg::kRopeDim, D = C + R;
  static constexpr bool kFp8 = Cfg::kKVFormat != KVFormat::kKV16;
  static_assert(sizeof(typename Cfg::QType) == 2 && sizeof(KV) == 2, "16-bit q and kv tiles");
  static_assert(std::is_same<typename Cfg::QType, KV>::value || (kFp8 && std::is_same<KV, __half>::value),
                "the q type is the tile type, except bf16 q over an fp8 cache (fp16 tiles)");
  static constexpr int M = Cfg::kBlockM, N = Cfg::kBlockN, S = Cfg::kStages, W = Cfg::kWarps;
  static constexpr int T = 32 * W;
  static constexpr int NW = N / 2;   // S tokens per warpgroup
  static constexpr int CW = C / 2;   // O columns per warpgroup
  using QN = Panel<C, M>;
  using QP = Panel<R, M>;
  using KN = Panel<C, N>;
  using KP = Panel<R, N>;
  using PP = Panel<N, M>;

  static constexpr int kOffQn = 0;
  static constexpr int kOffQp = QN::kBytes;
  static constexpr int kOffKV = kOffQp + QP::kBytes;
  static constexpr int kStageBytes = KN::kBytes + KP::kBytes;
  // fp8: the stages hold tokens as the cache stores them (common.cuh RawKVTile) and one fp16 tile (the
  // 16-bit stage layout, 1024-byte aligned) the current tile dequantized for the MMAs
  static constexpr int kRawStageBytes = kFp8 ? (RawKVTile<Cfg>::kStageBytes + 1023) / 1024 * 1024 : 0;
  static constexpr int kOffKV16 = kOffKV + S * kRawStageBytes;
  static constexpr int kOffP = kFp8 ? kOffKV16 + kStageBytes : kOffKV + S * kStageBytes;
  static constexpr int kRedBytes = 2 * M * 4;
  static constexpr int kOffRedMax = kOffP + PP::kBytes;
  static constexpr int kOffRedSum = kOffRedMax + kRedBytes;
  static constexpr int kSmemBytes = kOffRedSum + kRedBytes;
  static_assert(kSmemBytes == Cfg::kSmemBytes, "shared memory layout disagrees with VariantSpec.smem_bytes");

  // copy teams: 8 threads move 8 consecutive 16-byte chunks (128 bytes) of one row
  static constexpr int TEAMS = T / 8;
  static constexpr int Q_ITERS = (M + TEAMS - 1) / TEAMS;

  static_assert(M == 64, "block_m: one wgmma m64 tile");
  static_assert(W == 8, "warps: two warpgroups");
  static_assert(N == 32 || N == 64, "block_n: 32 or 64");
  static_assert(C % 128 == 0 && CW <= 256, "ckv: two halves of whole 64-column blocks, at most 256 each");
  static_assert(KN::kRowBytes == 128, "V is read MN-major from 128-byte swizzled column blocks");
  static_assert(S >= 2, "stages: at least 2");
  static_assert(kOffQp % 1024 == 0 && kOffKV % 1024 == 0 && kStageBytes % 1024 == 0 && KN::kBytes % 1024 == 0 &&
                    kOffP % 1024 == 0,
                "panels start on 1024-byte boundaries (swizzle atoms)");
};

template <class Cfg>
__global__ void __launch_bounds__(32 * Cfg::kWarps, 1) decode_kernel(const __grid_constant__ DecodeParams p) {
  using L = Layout<Cfg>;
  using KV = typename Cfg::KVType;
  using Q = typename Cfg::QType;
  using QN = typename L::QN;
  using QP = typename L::QP;
  using KN = typename L::KN;
  using KP = typename L::KP;
  using PP = typename L::PP;
  constexpr int H = L::H, M = L::M, N = L::N, S = L::S, NW = L::NW, CW = L::CW;
  constexpr int SV = NW / 2;  // S accumulators per thread
  constexpr int OV = CW / 2;  // O accumulators per thread

  extern __shared__ __align__(1024) unsigned char smem[];
  const uint32_t s_base = smem_u32(smem);
  if (s_base & 1023u) __trap();  // the swizzle atoms of the descriptors need 1024-byte alignment
  const uint32_t s_qn = s_base + L::kOffQn, s_qp = s_base + L::kOffQp;
  const uint32_t s_kv = s_base + L::kOffKV, s_p = s_base + L::kOffP;

  const int tid = threadIdx.x, lane = tid & 31;
  // lane 0's value: the compiler then knows it is warp-uniform (descriptors live in uniform registers)
  const int warp = __shfl_sync(0xffffffffu, tid >> 5, 0);
  const int wg = warp >> 2;            // warpgroup: its token half of S and column half of O
  const int wrow = (warp & 3) * 16;    // first tile row of this warp in the m64 accumulators
  const int g = lane >> 2, tq = lane & 3;  // accumulator rows wrow + g (+ 8), columns 8 j + 2 tq (+ 1)
  const int rows = p.s_q * H;
  const int row0 = blockIdx.x * M;
  const int part = blockIdx.y;
  const float sm_scale_log2 = p.sm_scale * kLog2e;
  const int* block_table = reinterpret_cast<const int*>(p.block_table);
  const int team = tid >> 3, tl = tid & 7;

  // descriptors (uniform per warpgroup); stage st adds st * kStageBytes (fp8: the one fp16 tile)
  const uint32_t s_tile = L::kFp8 ? s_base + L::kOffKV16 : s_kv;
  const uint64_t d_qn = QN::desc(s_qn), d_qp = QP::desc(s_qp), d_p = PP::desc(s_p);
  const uint64_t d_kn = KN::desc(s_tile, wg * NW);                 // this WG's token rows, ckv part
  const uint64_t d_kp = KP::desc(s_tile + KN::kBytes, wg * NW);    // and rope part
  // V: MN-major, n = this WG's CW columns (CW / 64 column blocks, LBO apart), k = tokens (8-row atoms)
  const uint64_t d_v = make_desc(s_tile + wg * (CW / 64) * KN::kBlockBytes, KN::kBlockBytes, 8u * KN::kRowBytes, 1u);
  // this lane's rows in red_max [2][M] (red_sum follows it)
  const uint32_t red_own = s_base + L::kOffRedMax + 4 * (wg * M + wrow + g);
  const uint32_t red_other = s_base + L::kOffRedMax + 4 * ((wg ^ 1) * M + wrow + g);

  plan_part<Cfg>(p);
  for_each_segment<Cfg>(p, part, [&](const Segment& seg) {
    const int b = seg.req;
    const int len = seg.len;
    const int n_tiles = seg.blk_hi - seg.blk_lo;
    const int* bt_row = block_table + static_cast<long long>(b) * p.block_table_stride;
    const TensorScale<Cfg> scale(p, sm_scale_log2);  // fp8_e4m3's scale on the scores and the output
    const float scale_log2 = scale.log2;

    // ---- kv tile gather (common.cuh PagedRows): pages looked up one tile ahead
    using Pages = PagedRows<KV, N, L::TEAMS>;
    using RawKV = RawKVTile<Cfg>;
    Pages pages;
    auto prefetch_pages = [&](int blk) { pages.lookup(bt_row, p.page_size, len, blk, team); };
    auto issue_tile = [&](int stage) {
      if constexpr (!L::kFp8) {
        const uint32_t dst_ckv = s_kv + stage * L::kStageBytes;
        const uint32_t dst_pe = dst_ckv + KN::kBytes;
        pages.for_each_row(p, team, tl, [&](int n, const KV* src_ckv, const KV* src_pe, int bytes) {
          KN::copy_row(dst_ckv, n, src_ckv, tl, bytes);
          KP::copy_row(dst_pe, n, src_pe, tl, bytes);
        });
      } else {
        RawKV::template issue<Pages, L::TEAMS>(pages, p, team, tl, s_kv + stage * L::kRawStageBytes);
      }
    };
    // fp8: part `part` of 2 (ckv columns 0 .. C/2-1; C/2 .. C-1 and the rope) of the raw tile of `stage` ->
    // the fp16 tile, all threads
    auto dequantize_tile = [&](int stage, auto part) {
      if constexpr (L::kFp8)
        RawKV::template dequantize<L::T, decltype(part)::value, 2>(
            s_kv + stage * L::kRawStageBytes, tid, [&](int n, int c) { return s_tile + KN::off(n, c); },
            [&](int n, int c) { return s_tile + KN::kBytes + KP::off(n, c); });
    };

    // ---- prologue: Q rows (zero padding) with tile 0, then tiles 1 .. S-2
#pragma unroll
    for (int k = 0; k < L::Q_ITERS; ++k) {
      const int m = team + k * L::TEAMS;
      if (L::Q_ITERS * L::TEAMS == M || m < M) {
        const int r = opaque(row0 + m);
        const bool valid = r < rows;
        const int s = valid ? r / H : 0, h = valid ? r % H : 0;
        const Q* src_n = reinterpret_cast<const Q*>(p.q_nope) +
                         (b * p.q_nope_stride_b + s * p.q_nope_stride_s + h * p.q_nope_stride_h + tl * 8);
        const Q* src_p = reinterpret_cast<const Q*>(p.q_pe) +
                         (b * p.q_pe_stride_b + s * p.q_pe_stride_s + h * p.q_pe_stride_h + tl * 8);
        if constexpr (std::is_same<Q, KV>::value) {
          QN::copy_row(s_qn, m, src_n, tl, valid ? 16 : 0);
          QP::copy_row(s_qp, m, src_p, tl, valid ? 16 : 0);
        } else {  // bf16 q over an fp8 cache: fp16 like the tiles
          QN::convert_row(s_qn, m, src_n, tl, valid);
          QP::convert_row(s_qp, m, src_p, tl, valid);
        }
      }
    }
    prefetch_pages(seg.blk_lo);
    int load_stage = 0;
#pragma unroll
    for (int i = 0; i < S - 1; ++i) {
      if (i < n_tiles) {
        issue_tile(load_stage);
        prefetch_pages(seg.blk_lo + i + 1);
      }
      cp_async_commit();
      load_stage = load_stage + 1 == S ? 0 : load_stage + 1;
    }

    // ---- per-thread row state: rows wrow + g + 8 hh of the tile (the same in both warpgroups)
    float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
    // causal: row r (query token r / H) sees tokens t < len - s_q + r / H + 1; padding rows see t < len.
    // Tiles wholly below the smallest limit (len - s_q + 1) need no mask.
    const int mask_from = len - p.s_q + 1;
    float o[OV];
#pragma unroll
    for (int i = 0; i < OV; ++i) o[i] = 0.f;

    uint32_t pa[NW / 16][4];  // P of the own token half as wgmma A fragments (live until its P V completes)
#pragma unroll
    for (int kk = 0; kk < NW / 16; ++kk)
#pragma unroll
      for (int i = 0; i < 4; ++i) pa[kk][i] = 0u;
    int comp_stage = 0;
    for (int it = 0; it < n_tiles; ++it) {
      cp_async_wait<S - 2>();
      fence_proxy_async();  // this thread's copies of tile `it` -> visible to wgmma
      __syncthreads();      // tile `it` is in shared memory; every warp is done with tile it-1 (its stage, P)
      const int raw_stage = comp_stage;
      if constexpr (L::kFp8) {
        dequantize_tile(raw_stage, std::integral_constant<int, 0>{});
        fence_proxy_async();  // the fp16 tile's first half -> visible to wgmma
        __syncthreads();
      }

      const uint32_t st_off = L::kFp8 ? 0u : comp_stage * L::kStageBytes;
      const uint64_t d_kn_s = desc_add(d_kn, st_off), d_kp_s = desc_add(d_kp, st_off), d_v_s = desc_add(d_v, st_off);
      comp_stage = comp_stage + 1 == S ? 0 : comp_stage + 1;

      // ---- S = Q K^T: 64 rows x this WG's NW tokens, k over C (ckv) then R (rope); k16 step ks
      //      accumulates into chain ks % QC (independent chains keep the tensor pipe busy)
      constexpr int QC = 2;
      float sacc[QC][SV];
#pragma unroll
      for (int c = 0; c < QC; ++c)
#pragma unroll
        for (int i = 0; i < SV; ++i) sacc[c][i] = 0.f;
#pragma unroll
      for (int c = 0; c < QC; ++c) fence_regs(sacc[c]);
      wgmma_fence();
      // fp8: the k-steps over the first ckv half run while the second half converts
      constexpr int KS1 = L::kFp8 ? QN::kSteps / 2 : QN::kSteps;
#pragma unroll
      for (int ks = 0; ks < KS1; ++ks)
        wgmma_ss<NW, KV, 0>(sacc[ks % QC], desc_add(d_qn, QN::step(ks)), desc_add(d_kn_s, KN::step(ks)), 1);
      if constexpr (L::kFp8) {
        dequantize_tile(raw_stage, std::integral_constant<int, 1>{});
        fence_proxy_async();  // the second half and the rope -> visible to wgmma
        __syncthreads();
      }
#pragma unroll
      for (int ks = KS1; ks < QN::kSteps; ++ks)
        wgmma_ss<NW, KV, 0>(sacc[ks % QC], desc_add(d_qn, QN::step(ks)), desc_add(d_kn_s, KN::step(ks)), 1);
#pragma unroll
      for (int ks = 0; ks < QP::kSteps; ++ks)
        wgmma_ss<NW, KV, 0>(sacc[(QN::kSteps + ks) % QC], desc_add(d_qp, QP::step(ks)), desc_add(d_kp_s, KP::step(ks)),
                            1);
      wgmma_commit();
      // the gathers of tile it + S - 1 (into the stage tile it-1 left) are issued while QK runs
      if (it + S - 1 < n_tiles) {
        issue_tile(load_stage);
        prefetch_pages(seg.blk_lo + it + S);
      }
      cp_async_commit();
      load_stage = load_stage + 1 == S ? 0 : load_stage + 1;
      wgmma_wait<0>();
#pragma unroll
      for (int c = 0; c < QC; ++c) fence_regs(sacc[c]);

      // ---- mask, tile row max of the raw scores (quad, then the other warpgroup through shared memory);
      //      the scale is positive, so max(s) * scale_log2 is the max of the scaled scores
      const int t_tile = (seg.blk_lo + it) * N;
      float x[SV];
#pragma unroll
      for (int i = 0; i < SV; ++i) {
        float v = sacc[0][i];
#pragma unroll
        for (int c = 1; c < QC; ++c) v += sacc[c][i];
        x[i] = v;
      }
      if (t_tile + N > mask_from)  // the last tile(s): per-row causal / length limit
        mask_scores<H, NW / 8>(t_tile + wg * NW + 2 * tq, opaque(row0 + wrow + g), rows, mask_from, len,
                               [&](int hh, int j, int e) -> float& { return x[4 * j + 2 * hh + e]; });
      float tmax[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int j = 0; j < NW / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) tmax[e >> 1] = fmaxf(tmax[e >> 1], x[4 * j + e]);
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        float v = tmax[hh];
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
        tmax[hh] = v * scale_log2;
      }

      // ---- online softmax with a lazy reference m_run (the same in both warpgroups): it moves only when
      //      a row max exceeds it by more than kRescaleLog2, so p = 2^(x - m_run) <= 2^8 (in range for bf16
      //      and fp16, fp32 sums) and O is rescaled only then (in practice on a segment's first tile).
      //      Speculatively, P of the own token half is computed against the current m_run and published
      //      (A fragments for the own P V, shared memory for the other warpgroup) together with this half's
      //      tile max; one barrier tells every thread whether any row anywhere needs to move m_run. If none
      //      does (the common case), that barrier was the only one of the softmax; otherwise all threads take
      //      the slow path: both halves' maxima, new m_run, rescale, P recomputed and published again.
      constexpr float kRescaleLog2 = 8.f;
      if (tq == 0) {
        sts_f32(red_own, tmax[0]);
        sts_f32(red_own + 32, tmax[1]);
      }
      // a row that has seen nothing has m_run = -inf: reference 0, and it needs a move once it sees a token
      const bool move = tmax[0] > m_run[0] + kRescaleLog2 || tmax[1] > m_run[1] + kRescaleLog2;
      float lsum[2];
      auto make_p = [&]() {  // P of the own half against m_run -> pa, shared memory, lsum
        exp_rows<NW / 8>(x, scale_log2, m_run, lsum, [&](int hh, int j, float p0, float p1) {
          const uint32_t u = pack2<KV>(p0, p1);
          // pa[kk] = the m64 x k16 A fragment of own tokens 16 kk .. 16 kk + 15 (n8 tiles j = 2 kk, 2 kk + 1)
          pa[j >> 1][2 * (j & 1) + hh] = u;
          sts_u32(s_p + PP::off(wrow + g + 8 * hh, wg * (NW / 8) + j) + 4 * tq, u);
        });
        fence_proxy_async();  // P -> visible to wgmma (the other warpgroup's)
      };
      make_p();
      if (__syncthreads_or(move)) {  // P and tile maxima of both halves published; some row must move
        float alpha[2];
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const float t = fmaxf(tmax[hh], lds_f32(red_other + 32 * hh));
          alpha[hh] = 1.f;
          if (t > m_run[hh] + kRescaleLog2) {  // the same decision in both warpgroups
            alpha[hh] = fast_exp2(m_run[hh] - t);  // 0 when m_run was -inf
            m_run[hh] = t;
            l_run[hh] *= alpha[hh];
          }
        }
        if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
          for (int j = 0; j < OV / 4; ++j) {
            o[4 * j + 0] *= alpha[0];
            o[4 * j + 1] *= alpha[0];
            o[4 * j + 2] *= alpha[1];
            o[4 * j + 3] *= alpha[1];
          }
        }
        make_p();
        __syncthreads();  // the recomputed P of both halves
      }
      l_run[0] += lsum[0];
      l_run[1] += lsum[1];

      // ---- O[:, wg * CW ..] += P V (V = the first C columns of the kv tile, MN-major): own tokens from
      //      registers, the other half from shared memory
      fence_regs(o);
      fence_regs(pa);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < NW / 16; ++kk)
        wgmma_rs<CW, KV, 1>(o, pa[kk], desc_add(d_v_s, (wg * NW + 16 * kk) * KN::kRowBytes), 1);
#pragma unroll
      for (int kk = 0; kk < NW / 16; ++kk) {
        const int kt = (wg ^ 1) * (NW / 16) + kk;  // the other warpgroup's k16 steps
        wgmma_ss<CW, KV, 1>(o, desc_add(d_p, PP::step(kt)), desc_add(d_v_s, kt * 16 * KN::kRowBytes), 1);
      }
      wgmma_commit();
      wgmma_wait<0>();
      fence_regs(o);
      fence_regs(pa);
    }
    cp_async_wait<0>();

    // ---- epilogue: row sums over the quad and both warpgroups; normalise; write out/lse or the partial
    l_run[0] = quad_sum(l_run[0]);
    l_run[1] = quad_sum(l_run[1]);
    if (tq == 0) {
      sts_f32(red_own + L::kRedBytes, l_run[0]);
      sts_f32(red_own + L::kRedBytes + 32, l_run[1]);
    }
    __syncthreads();
    l_run[0] += lds_f32(red_other + L::kRedBytes);
    l_run[1] += lds_f32(red_other + L::kRedBytes + 32);

    const int r_lane = opaque(row0 + wrow + g);
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int r = r_lane + 8 * hh;
      if (r >= rows) continue;
      write_result_row<Cfg, OV / 4>(p, seg, r, wg * CW + 2 * tq, l_run[hh], m_run[hh], scale.out(1.f),
                                    wg == 0 && tq == 0,
                                    [&](int j) { return make_float2(o[4 * j + 2 * hh], o[4 * j + 2 * hh + 1]); });
    }
    __syncthreads();  // the next segment rewrites Q, the kv stages and the exchange arrays
  });
}

}  // namespace wgmma
}  // namespace mla_gen
