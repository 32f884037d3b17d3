// mla-gen family `narrow`: Hopper wgmma (sm_90a only) with the kv tokens on wgmma's M axis and the packed
// query rows on N, for few rows (heads x s_q up to 32 at ckv 512, 40 at ckv 256).
//
// Why: wgmma's M is 64. The wgmma family puts query rows on M, so 16 heads are padded to 64 rows and
// three quarters of its tensor work and softmax are waste, which on an H200 costs more than the memory
// time at 16 heads. Here S^T = K Q^T (M = the 64 tokens of a kv tile, N = RN query rows, k = C + R) and
// O^T = V^T P^T (M = 64 output columns per m-tile, N = RN, k = tokens): rows are padded to 8 only.
//
// Work: the contract of the other families. Grid (row blocks of RN = kBlockM packed rows r = s * heads + h,
// parts); a CTA walks the kv segments of its part (for_each_segment) in 64-token tiles.
//
// Threads: two warpgroups, each an independent pipeline over alternate tiles of a segment (WG w takes
// tiles w, w + 2, ...) with its own kv stage, P buffer, running max and sums: one warpgroup's softmax
// and waits run under the other's tensor work, and both keep a tile of loads in flight. They meet
// only at segment boundaries (the Q load; the epilogue that merges their softmax states).
// Phases per tile, in one warpgroup (128 threads, named barrier 1 + wg):
//   load     the WG's previous iteration issued this tile's cp.async gathers (token rows looked up in
//            the block table: any page size; zero fill past the length); wait, fence.proxy.async, barrier.
//   QK       S^T = K Q^T: wgmma m64nRNk16, A = the tile's token rows (K-major), B = Q (K-major), k16
//            steps over C then R alternating two accumulator chains.
//   softmax  over tokens (the M axis: lanes lane / 4 and the 4 warps) against a lazy reference max m per
//            row shared by the warpgroup: P^T = 2^(s * scale * log2 e - m) is computed speculatively and
//            stored, each warp publishes its tile max per row, and one barrier-reduction (bar.red.or)
//            says whether some row's max passed m + 8. Rarely (a segment's first tile) all threads then
//            take the slow path: the warpgroup's tile max, new m, O and l rescaled, P recomputed; then a
//            second barrier. So p <= 2^8 and a row that has seen nothing (m = -inf) uses reference 0.
//   PV       O^T += V^T P^T: wgmma m64nRNk16 per 64-column m-tile, A = V^T = the first C columns of the
//            same kv tile read MN-major (imm-trans-a 1: the cache is read once), B = P^T (K-major [RN][64]).
//   next     wait, barrier (stage and P free in all 4 warps), issue the gathers of the WG's next tile.
// Epilogue per segment: both warpgroups' (m, l, O) meet in shared memory (log-sum-exp merge), O is
// normalised and written row-major (out, or the split's fp32 partial and lse, as the other families).
//
// fp8 caches (both formats) take a kernel of their own, with no 16-bit copy of the cache: narrow_e4m3.cuh.
//
// Shared memory (1024-byte aligned panels, see sm90.cuh Panel): Q ckv [RN][C] | Q rope [RN][R] |
// 2 stages (kv ckv [64][C] | kv rope [64][R]) | P^T [2][RN][64] | per-warp row max/sum [2][4][RN] fp32 |
// m [2][RN] fp32 | lse [RN] fp32. The epilogue stages O as [RN][C + 4] fp32 over the kv stages (an area per
// warpgroup where two fit: Layout::kTwoAreas).
#pragma once
#include "narrow_e4m3.cuh"
#include "narrow_tile.cuh"
#include "sm90.cuh"

namespace mla_gen {
namespace narrow {

using namespace sm90;

template <class Cfg>
struct Layout {
  using KV = typename Cfg::KVType;
  static constexpr int H = Cfg::kNumHeads, C = Cfg::kCkvDim, R = Cfg::kRopeDim;
  static_assert(Cfg::kKVFormat == KVFormat::kKV16, "fp8 caches: narrow_e4m3.cuh");
  static_assert(std::is_same<typename Cfg::QType, KV>::value && sizeof(KV) == 2, "16-bit q and kv of one type");
  static constexpr int RN = Cfg::kBlockM, N = Cfg::kBlockN, W = Cfg::kWarps;
  static constexpr int MT = C / 64;   // m64 tiles of O^T
  using QN = Panel<C, RN>;
  using QP = Panel<R, RN>;
  using KN = Panel<C, N>;
  using KP = Panel<R, N>;
  using PP = Panel<N, RN>;

  static constexpr int align(int x) { return (x + 1023) / 1024 * 1024; }
  static constexpr int kOffQn = 0;
  static constexpr int kOffQp = align(QN::kBytes);
  static constexpr int kOffKV = align(kOffQp + QP::kBytes);
  static constexpr int kStageBytes = KN::kBytes + KP::kBytes;
  static constexpr int kOffP = kOffKV + 2 * kStageBytes;      // [2] P^T panels
  static constexpr int kOffWarpRed = kOffP + 2 * PP::kBytes;  // [2][4][RN] fp32
  static constexpr int kOffM = kOffWarpRed + 2 * 4 * RN * 4;  // [2][RN] fp32
  static constexpr int kOffLse = kOffM + 2 * RN * 4;          // [RN] fp32
  static constexpr int kSmemBytes = kOffLse + RN * 4;
  static_assert(kSmemBytes == Cfg::kSmemBytes, "shared memory layout disagrees with VariantSpec.smem_bytes");
  static constexpr int kOStride = C + 4;  // fp32 staging row: +4 floats keep the column writes conflict-free
  static_assert(RN * kOStride * 4 <= 2 * kStageBytes, "the O staging fits over the kv stages");
  static constexpr bool kTwoAreas = 2 * RN * kOStride * 4 <= 2 * kStageBytes;  // a staging area per warpgroup

  static_assert(N == 64, "block_n: one wgmma m64 tile of tokens");
  static_assert(W == 8, "warps: two warpgroups");
  static_assert(RN % 8 == 0 && RN >= 8 && RN <= 64, "block_m: 8..64 rows, a multiple of 8 (wgmma n)");
  static_assert(C % 64 == 0 && MT * RN / 2 <= 128, "O^T accumulators: at most 128 per thread");
  static_assert(KN::kRowBytes == 128, "V is read MN-major from 128-byte swizzled column blocks");
  static_assert(kOffKV % 1024 == 0 && kStageBytes % 1024 == 0 && KN::kBytes % 1024 == 0 && kOffP % 1024 == 0 &&
                    PP::kBytes % 1024 == 0,
                "panels start on 1024-byte boundaries (swizzle atoms)");
};

// The body of the 16-bit path; fp8 caches take narrow_e4m3.cuh's.
template <class Cfg>
__device__ __forceinline__ void decode_16(const DecodeParams& p) {
  using L = Layout<Cfg>;
  using KV = typename Cfg::KVType;
  using Q = typename Cfg::QType;
  using QN = typename L::QN;
  using QP = typename L::QP;
  using KN = typename L::KN;
  using KP = typename L::KP;
  using PP = typename L::PP;
  constexpr int H = L::H, RN = L::RN, N = L::N, MT = L::MT;
  constexpr int SV = RN / 2;  // accumulators per thread of one m64nRN tile (narrow_tile.cuh's layout)
  constexpr int kWgThreads = 128;
  constexpr int TEAMS = kWgThreads / 8;  // copy teams of 8 lanes (128 contiguous bytes) per warpgroup
  constexpr int Q_ITERS = (RN + 2 * TEAMS - 1) / (2 * TEAMS);

  extern __shared__ __align__(1024) unsigned char smem[];
  const uint32_t s_base = smem_u32(smem);
  if (s_base & 1023u) __trap();  // the swizzle atoms of the descriptors need 1024-byte alignment
  const uint32_t s_qn = s_base + L::kOffQn, s_qp = s_base + L::kOffQp;

  const int tid = threadIdx.x, lane = tid & 31;
  const int warp = __shfl_sync(0xffffffffu, tid >> 5, 0);  // warp-uniform (descriptors in uniform registers)
  const int wg = warp >> 2, wq = warp & 3;
  const int g = lane >> 2, tq = lane & 3;  // accumulator tokens 16 wq + g (+ 8), rows 8 j + 2 tq (+ 1)
  const int bar_id = 1 + wg;
  const int rows = p.s_q * H;
  const int row0 = blockIdx.x * RN;
  const int part = blockIdx.y;
  const float scale_log2 = p.sm_scale * kLog2e;
  const int* block_table = reinterpret_cast<const int*>(p.block_table);
  const int team = (tid & (kWgThreads - 1)) >> 3, tl = tid & 7;

  // this warpgroup's stage and P^T buffer; descriptors (uniform per warpgroup)
  const uint32_t s_stage = s_base + L::kOffKV + wg * L::kStageBytes;
  const uint32_t s_pt = s_base + L::kOffP + wg * PP::kBytes;
  const uint64_t d_qn = QN::desc(s_qn), d_qp = QP::desc(s_qp), d_pt = PP::desc(s_pt);
  const uint64_t d_kn = KN::desc(s_stage), d_kp = KP::desc(s_stage + KN::kBytes);
  // V^T: MN-major A, m = 64 columns of one column block, k = tokens (8-row atoms SBO apart)
  const uint64_t d_vt = make_desc(s_stage, KN::kBlockBytes, 8u * KN::kRowBytes, 1u);
  const uint32_t s_m = s_base + L::kOffM, s_lse = s_base + L::kOffLse;
  const WarpPlace place{wg, wq, g, tq, bar_id, s_base + L::kOffWarpRed};

  plan_part<Cfg>(p);
  for_each_segment<Cfg>(p, part, [&](const Segment& seg) {
    const int b = seg.req;
    const int len = seg.len;
    const int n_tiles = seg.blk_hi - seg.blk_lo;
    const int* bt_row = block_table + static_cast<long long>(b) * p.block_table_stride;

    // ---- load (common.cuh PagedRows): token n of a tile is copied by team n mod TEAMS of the warpgroup,
    //      cp.async into the stage
    using Pages = PagedRows<KV, N, TEAMS>;
    Pages pages;
    auto prefetch_pages = [&](int blk) { pages.lookup(bt_row, p.page_size, len, blk, team); };
    auto issue_tile = [&]() {
      pages.for_each_row(p, team, tl, [&](int n, const KV* src_ckv, const KV* src_pe, int bytes) {
        KN::copy_row(s_stage, n, src_ckv, tl, bytes);
        KP::copy_row(s_stage + KN::kBytes, n, src_pe, tl, bytes);
      });
    };

    // Q rows (zero padding past the last row) by all 256 threads, then each WG's first tile
#pragma unroll
    for (int k = 0; k < Q_ITERS; ++k) {
      const int m = (tid >> 3) + k * 2 * TEAMS;
      if (Q_ITERS * 2 * TEAMS == RN || m < RN) {
        const int r = opaque(row0 + m);
        const bool valid = r < rows;
        const int s = valid ? r / H : 0, h = valid ? r % H : 0;
        QN::copy_row(s_qn, m,
                     reinterpret_cast<const Q*>(p.q_nope) +
                         (b * p.q_nope_stride_b + s * p.q_nope_stride_s + h * p.q_nope_stride_h + tl * 8),
                     tl, valid ? 16 : 0);
        QP::copy_row(s_qp, m,
                     reinterpret_cast<const Q*>(p.q_pe) +
                         (b * p.q_pe_stride_b + s * p.q_pe_stride_s + h * p.q_pe_stride_h + tl * 8),
                     tl, valid ? 16 : 0);
      }
    }
    cp_async_commit();
    if (wg < n_tiles) {
      prefetch_pages(seg.blk_lo + wg);
      issue_tile();
    }
    cp_async_commit();
    cp_async_wait<1>();   // this thread's Q copies
    fence_proxy_async();  // -> visible to wgmma
    __syncthreads();      // Q of every thread

    // ---- per-thread row state: rows 8 j + 2 tq + e of the block (the same in the warpgroup's threads)
    RowState<RN, MT> state;
    state.reset();
    // causal: row r (query token r / H) sees tokens t < len - s_q + r / H + 1; padding rows see t < len.
    const int mask_from = len - p.s_q + 1;

    for (int it = wg; it < n_tiles; it += 2) {
      cp_async_wait<0>();
      fence_proxy_async();  // this thread's copies (stores) of the tile -> visible to wgmma
      named_barrier_sync(bar_id, kWgThreads);

      // ---- QK: S^T = K Q^T, 64 tokens x RN rows. Independent accumulator chains keep the tensor pipe
      //      busy: k16 steps alternate over two.
      constexpr int NC = 2;
      float sacc[NC][SV];
#pragma unroll
      for (int c = 0; c < NC; ++c)
#pragma unroll
        for (int i = 0; i < SV; ++i) sacc[c][i] = 0.f;
#pragma unroll
      for (int c = 0; c < NC; ++c) fence_regs(sacc[c]);
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < QN::kSteps; ++ks)
        wgmma_ss<RN, KV, 0>(sacc[ks % 2], desc_add(d_kn, KN::step(ks)), desc_add(d_qn, QN::step(ks)), 1);
#pragma unroll
      for (int ks = 0; ks < QP::kSteps; ++ks)
        wgmma_ss<RN, KV, 0>(sacc[(QN::kSteps + ks) % 2], desc_add(d_kp, KP::step(ks)),
                            desc_add(d_qp, QP::step(ks)), 1);
      wgmma_commit();
      const bool more = it + 2 < n_tiles;
      if (more) prefetch_pages(seg.blk_lo + it + 2);  // block-table reads overlap the tensor work
      wgmma_wait<0>();
#pragma unroll
      for (int c = 0; c < NC; ++c) fence_regs(sacc[c]);

      // ---- softmax over tokens: x[4 j + 2 h + e] = score of token 16 wq + g + 8 h, row 8 j + 2 tq + e
      float x[SV];
#pragma unroll
      for (int i = 0; i < SV; ++i) x[i] = sacc[0][i] + sacc[1][i];
      const int t_tile = (seg.blk_lo + it) * N;
      softmax_tile<H, RN, MT>(x, state, place, t_tile, mask_from, len, row0, rows, scale_log2,
                              [&](int r, int t, int, float pv) {
                                const KV pk = from_float<KV>(pv);
                                uint16_t bits;
                                memcpy(&bits, &pk, sizeof(bits));
                                sts_u16(s_pt + PP::off(r, t >> 3) + 2 * (t & 7), bits);
                              });

      // ---- PV: O^T[64 mt ..][rows] += V^T P^T, k = the tile's 64 tokens
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) fence_regs(state.o[mt]);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < N / 16; ++kk)
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
          wgmma_ss<RN, KV, 0, 1>(state.o[mt], desc_add(d_vt, mt * KN::kBlockBytes + 16 * kk * KN::kRowBytes),
                                 desc_add(d_pt, PP::step(kk)), 1);
      wgmma_commit();
      wgmma_wait<0>();
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) fence_regs(state.o[mt]);

      // ---- next: the stage and P^T are free once every warp of the warpgroup is past its wait
      named_barrier_sync(bar_id, kWgThreads);
      if (more) issue_tile();
      cp_async_commit();
    }
    // Both warpgroups pass the same named barriers, four per tile: with an odd tile count WG 1 passes
    // the last tile's four on its own. (Nothing needs them; compute-sanitizer's racecheck pairs barrier
    // instances by count and otherwise reports the epilogue's exchange between the warpgroups.)
    if (wg == 1 && (n_tiles & 1)) {
      named_barrier_sync(bar_id, kWgThreads);
      named_barrier_or(bar_id, kWgThreads, false);
      named_barrier_sync(bar_id, kWgThreads);
      named_barrier_sync(bar_id, kWgThreads);
    }
    cp_async_wait<0>();

    // ---- epilogue (narrow_tile.cuh), O staged over the kv stages
    write_segment<Cfg, RN, MT, L::kTwoAreas>(
        p, seg, state, place, s_m, s_lse, s_base + L::kOffKV, 1.f,
        [&](int mt, int i) { return 64 * mt + 16 * wq + g + 8 * (i >> 1); }, [] { __syncthreads(); });
  });
}

// fp8 caches: the kernel takes the cache's tensor maps beside the params (narrow_e4m3.cuh)
template <class Cfg>
constexpr bool kFp8 = Cfg::kKVFormat == KVFormat::kKVFp8Tensor || Cfg::kKVFormat == KVFormat::kKVFp8DsMla;
template <class Cfg>
using KernelArg = std::conditional_t<kFp8<Cfg>, TmaParams, DecodeParams>;

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1) decode_kernel(const __grid_constant__ KernelArg<Cfg> arg) {
  if constexpr (kFp8<Cfg>) decode_e4m3<Cfg>(arg);
  else decode_16<Cfg>(arg);
}

template <class Cfg>
inline int launch_decode(const DecodeParams& p, uint64_t stream) {
  if constexpr (kFp8<Cfg>) return launch_e4m3<Cfg>(decode_kernel<Cfg>, p, stream);
  else return launch_decode_kernel<Cfg>(decode_kernel<Cfg>, p, stream);
}

}  // namespace narrow
}  // namespace mla_gen
