// mla-gen family `seesaw`: FlashMLA's seesaw schedule on Hopper wgmma (sm_90a only), bf16/fp16 in, fp32 accumulate.
//
// Work: the same contract as wgmma.cuh (grid (row blocks, parts), 64 packed query rows r = s * heads + h per CTA,
// rows past s_q * heads are zero padding, never written; for_each_segment; out/lse or partial o/lse). Any head
// count is correct; it is measured ahead of wgmma from 40 packed rows up, where dispatch takes it (PERF.md).
//
// Threads: 1 CTA per SM of three warpgroups: two consumers, WG0 (warps 0-3) and WG1 (warps 4-7), and a producer
// (warps 8-11, a warp per kv buffer half: K0L, K0R, K1L, K1R, see below) that gives its registers
// to the consumers (setmaxnreg: 40 each, the consumers 232; 168 at launch). WG0 owns O_L = O[:, 0 .. C/2),
// WG1 owns O_R = O[:, C/2 .. C), fp32 in registers (C/4 per thread: 128 at C = 512). A segment's kv tiles are
// taken in PAIRS: tile 2i lives in buffer K0, tile 2i+1 in buffer K1 (a missing K1 at an odd count is skipped and
// counts as fully masked). Per pair (row state: a lazy running max m per row, the same in both WGs; each WG keeps
// its own partial row sum l, rescaled together with its half of O):
//   WG0: S0 = Q K0^T (m64n64k16, SS, C + R deep) -> softmax S0 against m: m0 = m unless a row max exceeds m by
//        more than 8 (log2 domain), then m0 = that max and scale0 = 2^(m - m0) rescales O_L, l0 -> P0 to shared
//        memory and m0 to red_max[0] (publish P0) -> O_L += P0 V0_L (RS: P0 from registers), retired and K0L
//        freed -> wait for P1 -> scale1 = 2^(m0 - m1) (1 unless WG1 moved m) rescales O_L, l0 ->
//        O_L += P1 V1_L (SS) -> m = m1.
//   WG1: S1 = Q K1^T -> wait for P0 (and S1) -> scale0 (from m, m0) rescales O_R, l1 -> O_R += P0 V0_R (SS, runs
//        while WG1 does its softmax) -> softmax S1 against m0 -> m1, scale1, P1 to shared memory and m1 to red_max[1]
//        (publish P1) -> scale1 rescales O_R, l1 (after P0 V0_R retired) -> O_R += P1 V1_R (RS) -> m = m1.
//   While one WG does exp/max, the tensor pipe runs the other's wgmma: S1 under softmax S0, P0 V0_{L,R} under
//   softmax S1, the next pair's S0 under WG1's last P V and its load wait. V = the first C columns of the same kv
//   tile read MN-major (as wgmma.cuh): the cache is read from HBM once.
//
// Loads (TMA, any page size): the cache is two 3-D tensor maps (ckv, kpe: {width, page_size, pages}), a box is
// 64 columns x b rows of one page, b = the largest power of two dividing the page size, at most 64 (sm90.cuh
// tma_box_rows); boxes wholly past the length are not loaded. Each kv buffer has an mbarrier per unit: its 2 C /
// 128 ckv column blocks and its rope panel ("full": one arrival, the producer's expect_tx of the unit's bytes).
// The halves: K0L = K0 ckv-left, K0R = K0 ckv-right + rope, K1L = K1 ckv-left + rope, K1R = K1 ckv-right (the
// rope goes with the half that frees last). Each half has a "free" mbarrier (count 4): every warp of the WG that
// reads the half last arrives on it once its wgmmas reading the half retired, and the producer warp of that
// half (warp 8 + 2 buffer + half) issues the next tile's boxes into it when it completes:
//   WG0 frees K0L after O_L += P0 V0_L, before waiting for P1  | K1L after O_L += P1 V1_L
//   WG1 frees K0R after O_R += P0 V0_R                         | K1R after O_R += P1 V1_R
// A pair frees K1 only where it has a K1 tile (produce); the producer runs on into the next segment's tiles.
// The loads are the kernel's loop-carried chain (K1's boxes go out at a pair's end and S1 needs them at the next
// pair's start; a 72 KB tile takes about 2800 cycles to land, PERF.md), so every half is freed as early as its
// readers allow. Where shared memory holds two pairs' buffers (4 stages, ckv 256: 197 KB), pair i computes in slot
// i % 2 (kv buffers 2 slot, 2 slot + 1, their own mbarriers and P0 / P1) and the producer fills the other slot,
// freed by pair i - 1, while it runs: the load leaves the chain. The boxes go out from producer warps, off the
// consumers' path (case 2: 312 -> 277 us, eighth session), one warp per half, so that K1R's boxes do not wait behind
// K0R's issue, with warp-uniform operands where a box is a whole tile (page sizes that 64 divides): a half's 4-5
// boxes then leave in ~350-450 cycles instead of ~800 (PERF.md, twenty-eighth session).
// Q K^T waits unit by unit (ckv-left, ckv-right, the rope), so its first k-steps run while later boxes land; a
// wgmma.fence after each wait keeps ptxas from serializing the wgmmas.
// The other WG's V half (WG0: K1 left blocks, WG1: K0 right blocks) is not waited for again: that WG waited in
// its Q K^T before the hand-off this WG synced on, which orders the TMA's writes before this WG's reads
// (pass_unit flips the parity bit only). Only a tile whose tail this WG zeroes waits for real, so that its
// stores follow the TMA's. A unit is re-armed only after the WG that waited for it passed the hand-off after
// its wait.
// V rows past the length in a request's last tile (whatever the page holds there, or an older tile where no box
// was loaded) are zeroed by the WG that multiplies them, before its P V: P is 0 there, but 0 x inf is NaN.
// Q comes in with cp.async at a segment's start (each WG its ckv half, WG1 the rope), waited for by all consumers.
//
// Barriers (named barrier.sync, ids 1 and 3-6; each id always with the same thread count, every use unconditional
// for its threads; all 384 threads meet only once, after the mbarrier inits). The cross ids hand P from one WG
// to the other; both sync, so the publishing WG also waits for the other to arrive (see bar_sync for why not
// bar.arrive):
//   1 CONSUMERS 256: the consumers' CTA barrier (Q loaded, the epilogue, merge_if_last's vote).
//   3 P0     256: WG0 stored P0 + m0 (fenced); WG1 reads m0 and issues P0 V0_R after it.
//   4 P1     256: WG1 stored P1 + m1 (fenced); WG0 reads m1 and issues P1 V1_L after it.
//   5 LOCAL0 128, 6 LOCAL1 128: inside WG0 / WG1, after zeroing V rows (visible to the WG's wgmma).
// WAR hazards: a buffer half is rewritten only after every WG that reads it waited for its wgmmas: the freeing
// WG's own (its four arrivals) and the other WG's, which retired before that WG reached P0 / P1, which the
// freeing WG synced on before freeing. P0 / P1 are rewritten only by a later pair of their slot, after its loads
// landed, issued after the slot's readers freed it. red_max[0] (m0) is rewritten at pair i+1 only after WG0 passed
// pair i's P1 hand-off, which WG1 reaches after reading m0; red_max[1] (m1) only after WG1 passed pair i+1's P0
// hand-off, which WG0 reaches after reading m1.
//
// Shared memory (dynamic, 1024-byte aligned, wgmma.cuh panels: 64-column blocks of 128-byte swizzled rows):
//   Q ckv [64][C] | Q rope [64][R] | kv buffers [S] (ckv [64][C] | rope [64][RK]; slot s: K0 = 2 s, K1 = 2 s + 1) |
//   red_max [2][64] fp32 | red_sum [2][64] fp32 | full mbarriers [S][2 C / 128 + 1] | free mbarriers [S][2].
// RK = R, or 64 when R < 64 (the columns past R are TMA's zero fill). P0 and P1 live in the first rope block of
// K0 / K1 (dead after that tile's Q K^T; freed together with the half that holds the rope), so 512/64 needs
// 72 + 2 x 72 + 1 KB + 176 B = 217 KB (2 stages); 256/32 with 4 stages 36 + 4 x 40 + 1 KB + 144 B = 197 KB.
// Epilogue: as wgmma.cuh (row sums over the quad and both WGs through red_sum; normalise; out + lse or partial),
// but out rows (16-byte aligned) go through Q's dead ckv panel and one bulk copy per row (cp.async.bulk).
#pragma once
#include "narrow_e4m3.cuh"
#include "wgmma.cuh"

namespace mla_gen {
namespace seesaw {

using namespace sm90;  // wgmma, descriptors, panels, mbarriers, TMA

// Named barriers (id, thread count), ordering the shared memory accesses of the participating threads like
// __syncthreads does. The hand-offs between the warpgroups sync on both sides: a bar.arrive on the publishing
// side would order the same accesses by the PTX memory model, but compute-sanitizer's racecheck does not
// model arrive -> sync and reports every hand-off as a hazard; both warpgroups reach each barrier in the
// same order (P0, P1 per pair, CONSUMERS per segment), so the symmetric syncs cannot deadlock.
// The warpgroups reach a cross barrier from different code (the two branches of wg == 0), which the
// .aligned form (bar.sync) does not allow: PTX asks all threads of the CTA to take an aligned barrier's
// branch alike, and synccheck reports "divergent threads" for it. barrier.sync is the unaligned form.
__device__ __forceinline__ void bar_sync(int id, int count) {
  asm volatile("barrier.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
enum : int { kBarConsumers = 1, kBarP0 = 3, kBarP1 = 4, kBarLocal0 = 5, kBarLocal1 = 6 };

template <class Cfg>
struct Layout {
  using KV = typename Cfg::KVType;
  static_assert(Cfg::kKVFormat == KVFormat::kKV16, "a 16-bit cache (fp8_e4m3: seesaw_e4m3.cuh)");
  static_assert(std::is_same<typename Cfg::QType, KV>::value && sizeof(KV) == 2, "16-bit q, the cache's type");
  static constexpr int H = Cfg::kNumHeads, C = Cfg::kCkvDim, R = Cfg::kRopeDim, D = C + R;
  static constexpr int M = Cfg::kBlockM, N = Cfg::kBlockN, S = Cfg::kStages, W = Cfg::kWarps;
  static constexpr int CW = C / 2;  // O columns per warpgroup
  using QN = Panel<C, M>;
  using QP = Panel<R, M>;
  using KN = Panel<C, N>;
  // The kv rope panel is stored 64 columns wide when R < 64 (TMA fills the columns past R with zeros): its
  // boxes then start on 128-byte rows at any page size (TMA asks 128-byte aligned shared destinations).
  static constexpr int RK = R % 64 == 0 ? R : 64;
  using KP = Panel<RK, N>;
  using PP = Panel<N, M>;
  static constexpr int HB = QN::kBlocks / 2;  // 64-column blocks per ckv half

  static constexpr int kOffQn = 0;
  static constexpr int kOffQp = QN::kBytes;
  static constexpr int kOffKV = kOffQp + QP::kBytes;  // kv buffers 0 .. S - 1: pair slot s holds K0 = 2 s, K1 = 2 s + 1
  static constexpr int kStageBytes = KN::kBytes + KP::kBytes;
  static constexpr int kPairSlots = S / 2;  // pairs in flight: pair i uses slot i % kPairSlots
  static constexpr int kSlotBytes = 2 * kStageBytes;
  static constexpr int kOffP0 = kOffKV + KN::kBytes;  // P0 / P1: the first rope block of K0 / K1 (slot 0; + slot bytes)
  static constexpr int kOffP1 = kOffP0 + kStageBytes;
  static constexpr int kRedBytes = 2 * M * 4;
  static constexpr int kOffRedMax = kOffKV + S * kStageBytes;
  static constexpr int kOffRedSum = kOffRedMax + kRedBytes;
  static constexpr int kUnits = 2 * HB + 1;  // TMA units of a kv buffer: its 64-column ckv blocks, the rope panel
  static constexpr int kOffBars = kOffRedSum + kRedBytes;  // an mbarrier per (buffer, unit): its boxes landed
  static constexpr int kOffFree = kOffBars + S * kUnits * 8;  // an mbarrier per (buffer, half): the consumers freed it
  static constexpr int kSmemBytes = kOffFree + S * 2 * 8;
  static_assert(kSmemBytes == Cfg::kSmemBytes, "shared memory layout disagrees with VariantSpec.smem_bytes");
  static_assert(kSmemBytes <= 227 * 1024, "seesaw: shared memory over the 227 KB a block may use on sm_90a");

  // Q copy teams of 8 threads per warpgroup: 16 teams, 4 rows each
  static constexpr int TEAMS = 16;
  static constexpr int ITERS = 4;

  static_assert(M == 64, "block_m: one wgmma m64 tile");
  static_assert(N == 64, "block_n: 64 tokens per tile (S = m64n64 per warpgroup)");
  static_assert(W == 8, "warps: two (consumer) warpgroups");
  // the consumers (warps 0-7) and the producer warpgroup (warps 8-11, one per kv buffer half)
  static constexpr int kThreads = 32 * W + 128;
  static_assert(kThreads == Cfg::kThreads, "block size disagrees with VariantSpec.threads");
  // registers per thread after setmaxnreg, within the CTA's pool: ptxas gives 384 threads 168 each at entry, and an
  // inc past 384 x 168 = 64512 waits forever (2 x 128 x 232 + 128 x 40 fills it exactly).
  static constexpr int kConsumerRegs = 232, kProducerRegs = 40;
  static_assert(2 * 128 * kConsumerRegs + 128 * kProducerRegs <= 384 * 168, "setmaxnreg over the CTA's registers");
  static_assert(S == 2 || S == 4, "stages: the kv tiles of one pair, or of two (the next pair's loads in flight)");
  static_assert(S * kUnits <= 32, "a full-barrier parity bit per (buffer, unit) in one 32-bit word");
  static_assert(CW == 64 || CW == 128 || CW == 256, "ckv: 128, 256 or 512 (C/2 is one wgmma n)");
  static_assert(KN::kRowBytes == 128 && QN::kRowBytes == 128 && QN::kBlockBytes == KN::kBlockBytes,
                "ckv panels of 64-column blocks, Q and kv blocks the same size (M == N)");
  static_assert(KP::kRowBytes == 128 && KP::kBlockBytes == PP::kBytes,
                "P in the rope panel: its first block must be a [64][64] 128-byte swizzled block like P");
  static_assert(kOffQp % 1024 == 0 && kOffKV % 1024 == 0 && kStageBytes % 1024 == 0 && KN::kBytes % 1024 == 0 &&
                    kOffP0 % 1024 == 0 && kOffP1 % 1024 == 0,
                "panels start on 1024-byte boundaries (swizzle atoms)");
};

// Copies ckv half `half` (HB 64-column blocks) of one row: lane tl of a team of 8 copies chunk tl of each block;
// src points at the row's element tl * 8. bytes = 0 zero-fills and reads nothing.
template <class P, typename T>
__device__ __forceinline__ void copy_half_row(uint32_t dst, int row, const T* src, int tl, int bytes, int half) {
  static_assert(P::kChunks == 8, "whole 64-column blocks");
  constexpr int HB = P::kBlocks / 2;
  src = opaque(src + half * HB * 64);
  const uint32_t d = dst + half * HB * P::kBlockBytes + row * P::kRowBytes + P::swz(row, tl) * 16;
#pragma unroll
  for (int i = 0; i < HB; ++i) cp_async_16(d + i * P::kBlockBytes, src + 64 * i, bytes);
}

// The producer of one half of one kv buffer of each pair (warp 8: K0L, 9: K0R, 10: K1L, 11: K1R; a warp per
// half so that a half's boxes go out as soon as its readers freed it, not behind another half's issue): walks the
// part's segments like the consumers and loads its half of every kv tile it owns (tile 2i into K0, 2i + 1 into
// K1; the rope panel with the half that the consumers free last: K0R, K1L), each once the consumers freed the
// half's previous tile in that slot. A pair without a K1 tile (odd count) is skipped by the K1 warps, and the
// consumers neither free K1 nor store P1 there after such a pair, so every phase of a free barrier belongs to a
// tile its warp loads: the consumers cannot complete the next phase before that warp issued the tile, and the
// warp is never two phases behind its barrier.
// Lane l issues the boxes of row groups l and l + 32 (b rows each, sm90.cuh tma_box_rows); each unit's
// mbarrier gets the bytes of the groups before the length (its one arrival). A tile's block-table entries are read
// before the warp waits for the free, so their latency hides behind that wait.
template <class Cfg>
__device__ __forceinline__ void produce(const TmaParams& tp, int part, int buf, int half, uint32_t s_k0,
                                        uint32_t s_full, uint32_t s_free) {
  using L = Layout<Cfg>;
  using KN = typename L::KN;
  using KP = typename L::KP;
  constexpr int N = L::N, HB = L::HB, U = L::kUnits;
  constexpr int kGroupIters = 2;  // ceil(64 groups of one row / 32 lanes)
  const DecodeParams& p = tp.p;
  const int lane = threadIdx.x & 31;
  const int box_rows = tma_box_rows(p.page_size);
  const int* block_table = reinterpret_cast<const int*>(p.block_table);
  const bool rope = (buf == 0) == (half == 1);
  uint32_t free_phase = 0;  // bit s: the parity this warp waits for next on its free barrier of pair slot s, flipped
  int pair_no = 0;          // pairs walked so far (over segments): pair i loads into slot i % kPairSlots
  // kv lines first out of L2: a tile is read by the row blocks of one part at about the same time, then never again,
  // while a split request's partials (written at a segment's end) are read back by the merge
  const uint64_t policy = l2_evict_first_policy();
  for_each_segment<Cfg, kBarConsumers, false>(p, part, [&](const Segment& seg) {
    const int len = seg.len, n_tiles = seg.blk_hi - seg.blk_lo;
    const int* bt_row = block_table + static_cast<long long>(seg.req) * p.block_table_stride;
    for (int it = 0; it < n_tiles; it += 2, ++pair_no) {
      const int slot = pair_no % L::kPairSlots, b = 2 * slot + buf;
      const int tile = it + buf, t0 = (seg.blk_lo + tile) * N;
      if (tile >= n_tiles) continue;  // a missing K1: no load, no free (see above)
      const uint32_t stage = s_k0 + b * L::kStageBytes;
      const uint32_t bars = s_full + 8 * b * U;  // the unit's boxes complete on its full mbarrier
      // the first wait on each free barrier passes (the phase before a fresh barrier's counts as complete)
      const uint32_t free_bar = s_free + 8 * (2 * b + half), free_parity = ((free_phase >> slot) & 1u) ^ 1u;
      free_phase ^= 1u << slot;
      if (box_rows == N) {  // whole-tile boxes, one a block, issued by lane 0 from uniform operands
        const auto [page, tok] = whole_tile_page(bt_row, t0, p.page_size);
        mbarrier_wait(free_bar, free_parity);
        if (lane == 0) {
#pragma unroll
          for (int blk = half * HB; blk < half * HB + HB; ++blk) {
            mbarrier_arrive_expect_tx(bars + 8 * blk, N * KN::kRowBytes);
            tma_load_3d(stage + blk * KN::kBlockBytes, &tp.ckv, bars + 8 * blk, blk * 64, tok, page, policy);
          }
          if (rope) {
            mbarrier_arrive_expect_tx(bars + 8 * 2 * HB, N * KP::kBlocks * KP::kRowBytes);
#pragma unroll
            for (int blk = 0; blk < KP::kBlocks; ++blk)
              tma_load_3d(stage + KN::kBytes + blk * KP::kBlockBytes, &tp.kpe, bars + 8 * 2 * HB, blk * KP::kBlockCols,
                          tok, page, policy);
          }
        }
        __syncwarp();
        continue;
      }
      const int groups = (min(len - t0, N) + box_rows - 1) / box_rows;
      int page[kGroupIters];  // read before the wait: the block table's latency hides behind it
#pragma unroll
      for (int k = 0; k < kGroupIters; ++k) {
        const int grp = lane + 32 * k;
        page[k] = grp < groups ? bt_row[(t0 + grp * box_rows) / p.page_size] : 0;
      }
      mbarrier_wait(free_bar, free_parity);
      if (lane == 0) {
#pragma unroll
        for (int blk = 0; blk < HB; ++blk)
          mbarrier_arrive_expect_tx(bars + 8 * (half * HB + blk), groups * box_rows * KN::kRowBytes);
        if (rope) mbarrier_arrive_expect_tx(bars + 8 * 2 * HB, groups * box_rows * KP::kBlocks * KP::kRowBytes);
      }
      __syncwarp();
#pragma unroll
      for (int k = 0; k < kGroupIters; ++k) {
        const int grp = lane + 32 * k;
        if (grp >= groups) continue;
        const int row = grp * box_rows, tok = (t0 + row) % p.page_size;
#pragma unroll
        for (int blk = half * HB; blk < half * HB + HB; ++blk)
          tma_load_3d(stage + blk * KN::kBlockBytes + row * KN::kRowBytes, &tp.ckv, bars + 8 * blk, blk * 64, tok,
                      page[k], policy);
        if (rope) {
#pragma unroll
          for (int blk = 0; blk < KP::kBlocks; ++blk)
            tma_load_3d(stage + KN::kBytes + blk * KP::kBlockBytes + row * KP::kRowBytes, &tp.kpe,
                        bars + 8 * 2 * HB, blk * KP::kBlockCols, tok, page[k], policy);
        }
      }
    }
  });
}

// One tile's softmax in the m16n8 C layout of an m64n64 accumulator (sc[4 j + 2 hh + e]: row row_lane + 8 hh of
// the CTA's rows, token t_tile + 8 j + 2 tq + e) against the lazy reference m_ref: a row moves only when its max
// exceeds m_ref by more than kRescaleLog2, then to that max. Masks a tile that reaches the causal / length limit
// (all of it when !present), writes m_new, scale = 2^(m_ref - m_new) (1 when not moved) and the row sums of P, and
// hands each pair of P to store(hh, j, p0, p1). Returns whether a row of this thread moved. Shared by the 16-bit
// kernel and seesaw_e4m3.cuh.
template <int H, int N, class StoreP>
__device__ __forceinline__ bool lazy_softmax(float (&sc)[N / 2], bool present, int t_tile, int mask_from, int len,
                                             int row_lane, int rows, int tq, float scale_log2, const float (&m_ref)[2],
                                             float (&m_new)[2], float (&scale)[2], float (&lsum)[2], StoreP&& store) {
  constexpr float kRescaleLog2 = 8.f;
  if (!present) {
#pragma unroll
    for (int i = 0; i < N / 2; ++i) sc[i] = -INFINITY;
  }
  if (present && t_tile + N > mask_from)  // the last tile(s): per-row causal / length limit
    mask_scores<H, N / 8>(t_tile + 2 * tq, row_lane, rows, mask_from, len,
                          [&](int hh, int j, int e) -> float& { return sc[4 * j + 2 * hh + e]; });
  float tmax[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int j = 0; j < N / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) tmax[e >> 1] = fmaxf(tmax[e >> 1], sc[4 * j + e]);
  bool moved = false;
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    float v = tmax[hh];
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
    v *= scale_log2;  // the scale is positive: max of the scaled scores
    const bool move = v > m_ref[hh] + kRescaleLog2;  // m_ref = -inf: any finite max moves
    moved |= move;
    m_new[hh] = move ? v : m_ref[hh];
    scale[hh] = move ? fast_exp2(m_ref[hh] - v) : 1.f;  // 0 when m_ref was -inf
  }
  exp_rows<N / 8>(sc, scale_log2, m_new, lsum, store);
  return moved;
}

// Zeroes token rows valid .. N - 1 of warpgroup wg's kHalfBlocks 128-byte column blocks of a kv stage (kBlockBytes
// apart; whole 128-byte rows, so the swizzle does not matter), from the warpgroup's 128 threads (tid: 0..127): the V
// rows past a request's length in its last tile. P is 0 there, but the rows may hold anything (an older tile, NaN
// bytes), and 0 x inf is NaN. Shared by both seesaw kernels (each then orders it before its P V).
template <int N, int kHalfBlocks, int kBlockBytes>
__device__ __forceinline__ void zero_rows_past(uint32_t stage, int valid, int wg, int tid) {
  const int chunks = kHalfBlocks * (N - valid) * 8;
  for (int i = tid; i < chunks; i += 128) {
    const int row = valid + (i >> 3) % (N - valid), blk = (i >> 3) / (N - valid);
    sts_v4(stage + (wg * kHalfBlocks + blk) * kBlockBytes + row * 128 + (i & 7) * 16, 0u, 0u, 0u, 0u);
  }
}

// The fp8_e4m3 path (seesaw_e4m3.cuh, included at the end of this file).
template <class Cfg>
__device__ __forceinline__ void decode_e4m3(const TmaParams& tp);

template <class Cfg>
__device__ __forceinline__ void decode_16bit(const TmaParams& tp) {
  using L = Layout<Cfg>;
  const DecodeParams& p = tp.p;
  using KV = typename Cfg::KVType;
  using Q = typename Cfg::QType;
  using QN = typename L::QN;
  using QP = typename L::QP;
  using KN = typename L::KN;
  using KP = typename L::KP;
  using PP = typename L::PP;
  constexpr int H = L::H, C = L::C, M = L::M, N = L::N, CW = L::CW, HB = L::HB;
  constexpr int SV = N / 2;   // S accumulators per thread (m64n64)
  constexpr int OV = CW / 2;  // O accumulators per thread

  extern __shared__ __align__(1024) unsigned char smem[];
  const uint32_t s_base = smem_u32(smem);
  if (s_base & 1023u) __trap();  // the swizzle atoms of the descriptors need 1024-byte alignment
  const uint32_t s_qn = s_base + L::kOffQn, s_qp = s_base + L::kOffQp;
  const uint32_t s_k0 = s_base + L::kOffKV, s_k1 = s_k0 + L::kStageBytes;
  const int tid = threadIdx.x, lane = tid & 31;
  // lane 0's value: the compiler then knows it is warp-uniform (descriptors live in uniform registers)
  const int warp = __shfl_sync(0xffffffffu, tid >> 5, 0);
  const int part = blockIdx.y;

  // ---- mbarriers. full[buf][unit] (units 0 .. 2 HB - 1 = the 64-column ckv blocks, 2 HB = the rope panel): the
  //      unit's boxes landed (one arrival: the producer's expect_tx). free[buf][half]: the four warps of the WG
  //      that frees the half (the last reader of its tile) are done with it.
  constexpr int U = L::kUnits;
  const uint32_t s_bars = s_base + L::kOffBars, s_free = s_base + L::kOffFree;
  if (tid == 0) {
#pragma unroll
    for (int i = 0; i < L::S * U; ++i) mbarrier_init(s_bars + 8 * i, 1);
#pragma unroll
    for (int i = 0; i < 2 * L::S; ++i) mbarrier_init(s_free + 8 * i, 4);
    fence_mbarrier_init();
  }
  __syncthreads();
  plan_part<Cfg>(p);  // (every thread: the work list of this CTA's part; its last barrier is all 384 threads')
  if (warp >= 8) {  // the consumers meet at kBarConsumers from here on
    setmaxnreg_dec<L::kProducerRegs>();
    produce<Cfg>(tp, part, (warp - 8) >> 1, warp & 1, s_k0, s_bars, s_free);
    return;
  }
  setmaxnreg_inc<L::kConsumerRegs>();

  const int wg = warp >> 2;                // 0: O_L, S0 over K0; 1: O_R, S1 over K1
  const int wrow = (warp & 3) * 16;        // first tile row of this warp in the m64 accumulators
  const int g = lane >> 2, tq = lane & 3;  // accumulator rows wrow + g (+ 8), columns 8 j + 2 tq (+ 1)
  const int team = (tid & 127) >> 3, tl = tid & 7;  // copy team inside the warpgroup
  const int rows = p.s_q * H;
  const int row0 = blockIdx.x * M;
  const float scale_log2 = p.sm_scale * kLog2e;
  // out rows by bulk copy (epilogue): 16-byte aligned rows; staged 16 bytes apart past their C values, so that
  // the 8 rows of a warp's shared store fall in different banks
  using OutT = typename Cfg::OutType;
  using Out2 = typename Vec2<OutT>::type;
  constexpr int kOutRowBytes = C * sizeof(OutT) + 16;
  static_assert(M * kOutRowBytes <= QN::kBytes + QP::kBytes, "seesaw: the staged out rows fit Q's panels");
  const bool bulk_out = ((p.out | (p.out_stride_b | p.out_stride_s | p.out_stride_h) * sizeof(OutT)) & 15) == 0;

  // ---- descriptors (warp-uniform). Q K^T over this WG's buffer: ckv, then the rope.
  const uint32_t s_kown = wg ? s_k1 : s_k0;
  const uint64_t d_qn = QN::desc(s_qn), d_qp = QP::desc(s_qp);
  const uint64_t d_kn = KN::desc(s_kown), d_kp = KP::desc(s_kown + KN::kBytes);
  // V of this WG's columns in K0 and K1: MN-major, LBO = one 64-column block, SBO = 8 token rows
  const uint64_t d_v0 = make_desc(s_k0 + wg * HB * KN::kBlockBytes, KN::kBlockBytes, 8u * KN::kRowBytes, 1u);
  const uint64_t d_v1 = desc_add(d_v0, L::kStageBytes);
  const uint32_t s_p0 = s_base + L::kOffP0, s_p1 = s_base + L::kOffP1;
  const uint64_t d_p0 = PP::desc(s_p0), d_p1 = PP::desc(s_p1);
  const uint32_t s_pown = wg ? s_p1 : s_p0;
  // this lane's rows in red_max[k] (k = 0: m0 from WG0, 1: m1 from WG1) and red_sum[wg]
  const uint32_t red_m0 = s_base + L::kOffRedMax + 4 * (wrow + g);
  const uint32_t red_m1 = red_m0 + 4 * M;
  const uint32_t red_own = s_base + L::kOffRedSum + 4 * (wg * M + wrow + g);
  const uint32_t red_other = s_base + L::kOffRedSum + 4 * ((wg ^ 1) * M + wrow + g);

  // Bit i of `phase`: the parity this thread waits for next on full barrier i.
  uint32_t phase = 0;
  auto wait_unit = [&](int buf, int unit) {
    const int i = buf * U + unit;
    mbarrier_wait(s_bars + 8 * i, (phase >> i) & 1u);
    phase ^= 1u << i;
  };
  // A unit another WG waited for before a hand-off: its parity bit flips; `wait` (a tail to zero) waits too.
  auto pass_unit = [&](int buf, int unit, bool wait) {
    if (wait) wait_unit(buf, unit);
    else phase ^= 1u << (buf * U + unit);
  };
  // This warp is done with half `half` of buffer `buf` (its wgmmas reading it retired): the producer may load
  // the next tile there once the WG's four warps said so. Every pair frees K0's halves, and K1's where it has K1.
  auto release = [&](int buf, int half) {
    if (lane == 0) mbarrier_arrive(s_free + 8 * (2 * buf + half));
  };
  const int bar_local = wg ? kBarLocal1 : kBarLocal0;

  int pair_no = 0;  // pairs done (over segments): pair i computes in slot i % kPairSlots, like the producer loads
  for_each_segment<Cfg, kBarConsumers>(p, part, [&](const Segment& seg) {
    const int b = seg.req;
    const int len = seg.len;
    const int n_tiles = seg.blk_hi - seg.blk_lo;
    uint32_t kv_off = 0;  // the current pair's slot: bytes from slot 0's K0 (its K0, K1, P0, P1 and descriptors)

    // Zeroes this WG's V columns (ckv half wg) of the rows past the length in `stage` when tile `it` is the
    // request's last and not full, then makes it visible to the WG's wgmma (before its P V).
    auto zero_tail = [&](uint32_t stage, int it) {
      const int valid = len - (seg.blk_lo + it) * N;
      if (valid >= N) return;
      zero_rows_past<N, HB, KN::kBlockBytes>(stage, valid, wg, tid & 127);
      fence_proxy_async();
      bar_sync(bar_local, 128);
    };

    // ---- prologue: Q by cp.async (own ckv half; WG1 also the rope), waited for by all consumers; the
    //      producer loads the kv tiles meanwhile
#pragma unroll
    for (int k = 0; k < L::ITERS; ++k) {
      const int m = team + k * L::TEAMS;
      const int r = opaque(row0 + m);
      const bool valid = r < rows;
      const int s = valid ? r / H : 0, h = valid ? r % H : 0;
      const Q* src_n = reinterpret_cast<const Q*>(p.q_nope) +
                       (b * p.q_nope_stride_b + s * p.q_nope_stride_s + h * p.q_nope_stride_h + tl * 8);
      copy_half_row<QN>(s_qn, m, src_n, tl, valid ? 16 : 0, wg);
      if (wg == 1) {
        const Q* src_p = reinterpret_cast<const Q*>(p.q_pe) +
                         (b * p.q_pe_stride_b + s * p.q_pe_stride_s + h * p.q_pe_stride_h + tl * 8);
        QP::copy_row(s_qp, m, src_p, tl, valid ? 16 : 0);
      }
    }
    cp_async_commit();
    cp_async_wait<0>();
    fence_proxy_async();
    bar_sync(kBarConsumers, 256);

    // ---- row state: rows wrow + g + 8 hh of the tile (the same rows in both warpgroups)
    float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
    // causal: row r (query token r / H) sees tokens t < len - s_q + r / H + 1; padding rows see t < len.
    // Tiles wholly below the smallest limit (len - s_q + 1) need no mask.
    const int mask_from = len - p.s_q + 1;
    float o[OV];
#pragma unroll
    for (int i = 0; i < OV; ++i) o[i] = 0.f;
    uint32_t pa[N / 16][4];  // own P as wgmma A fragments (k16 step kk = tokens 16 kk .. 16 kk + 15)
#pragma unroll
    for (int kk = 0; kk < N / 16; ++kk)
#pragma unroll
      for (int i = 0; i < 4; ++i) pa[kk][i] = 0u;

    // Softmax of one tile's scores (lazy_softmax): m_new, scale, the row sums of P, P as A fragments (pa), P to shared
    // memory at s_pown and m_new to red_m.
    auto softmax = [&](float (&sc)[SV], int it, bool present, const float (&m_ref)[2], float (&m_new)[2],
                       float (&scale)[2], float (&lsum)[2], uint32_t red_m) {
      lazy_softmax<H, N>(sc, present, (seg.blk_lo + it) * N, mask_from, len, opaque(row0 + wrow + g), rows, tq,
                         scale_log2, m_ref, m_new, scale, lsum, [&](int hh, int j, float p0, float p1) {
                           const uint32_t u = pack2<KV>(p0, p1);
                           pa[j >> 1][2 * (j & 1) + hh] = u;  // n8 tiles j = 2 kk, 2 kk + 1 form the k16 step kk
                           // (no P1 for a missing K1: its buffer may already take the next K1 tile's boxes)
                           if (present) sts_u32(s_pown + kv_off + PP::off(wrow + g + 8 * hh, j) + 4 * tq, u);
                         });
      if (tq == 0) {
        sts_f32(red_m, m_new[0]);
        sts_f32(red_m + 32, m_new[1]);
      }
    };
    // O and l of this thread's rows times scale (skipped when the whole warp has scale 1)
    auto rescale = [&](const float (&scale)[2]) {
      l_run[0] *= scale[0];
      l_run[1] *= scale[1];
      if (__any_sync(0xffffffffu, scale[0] != 1.f || scale[1] != 1.f)) {
#pragma unroll
        for (int j = 0; j < OV / 4; ++j) {
          o[4 * j + 0] *= scale[0];
          o[4 * j + 1] *= scale[0];
          o[4 * j + 2] *= scale[1];
          o[4 * j + 3] *= scale[1];
        }
      }
    };
    // S = Q K^T over buffer `buf` into sc: the ckv blocks left to right, then the rope, each once its mbarrier
    // completed (when `wait`); a wgmma.fence after each wait keeps ptxas from serializing the wgmmas (a wait is a
    // divergent spin loop). Left first in both WGs, although K1R's boxes now go out before K1L's: S1 over the right
    // half first was 1-3 % slower on cases 2 and 3 (PERF.md, twenty-eighth session).
    auto qk = [&](float (&sc)[SV], int buf, bool wait) {
      fence_regs(sc);
#pragma unroll
      for (int blk = 0; blk < 2 * HB; ++blk) {
        if (wait) wait_unit(buf, blk);
        wgmma_fence();
#pragma unroll
        for (int ks = 4 * blk; ks < 4 * blk + 4; ++ks)
          wgmma_ss<N, KV, 0>(sc, desc_add(d_qn, QN::step(ks)), desc_add(d_kn, kv_off + KN::step(ks)), 1);
      }
      if (wait) wait_unit(buf, 2 * HB);
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < QP::kSteps; ++ks)
        wgmma_ss<N, KV, 0>(sc, desc_add(d_qp, QP::step(ks)), desc_add(d_kp, kv_off + KP::step(ks)), 1);
      wgmma_commit();
    };

    for (int it = 0; it < n_tiles; it += 2, ++pair_no) {  // the pair: tile it in K0, tile it + 1 in K1
      const int slot = pair_no % L::kPairSlots, b0 = 2 * slot, b1 = b0 + 1;  // K0, K1: kv buffers b0, b1
      kv_off = slot * L::kSlotBytes;
      const uint32_t s_kv0 = s_k0 + kv_off, s_kv1 = s_k1 + kv_off;
      const uint64_t dv0 = desc_add(d_v0, kv_off), dv1 = desc_add(d_v1, kv_off);  // the slot's V and P
      const uint64_t dp0 = desc_add(d_p0, kv_off), dp1 = desc_add(d_p1, kv_off);
      const bool has_k1 = it + 1 < n_tiles;
      float sacc[SV];
#pragma unroll
      for (int i = 0; i < SV; ++i) sacc[i] = 0.f;
      float m_mid[2], m_end[2], sc0[2], sc1[2], lsum[2];

      if (wg == 0) {
        // ---- S0 = Q K0^T
        qk(sacc, b0, true);
        wgmma_wait<0>();
        fence_regs(sacc);

        // ---- softmax S0 against m_run -> m0; O_L, l0 rescaled (no wgmma of O_L in flight); publish P0, m0
        softmax(sacc, it, true, m_run, m_mid, sc0, lsum, red_m0);
        rescale(sc0);
        l_run[0] += lsum[0];
        l_run[1] += lsum[1];
        zero_tail(s_kv0, it);
        fence_proxy_async();
        bar_sync(kBarP0, 256);

        // ---- O_L += P0 V0_L (RS)
        fence_regs(o);
        fence_regs(pa);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < N / 16; ++kk) wgmma_rs<CW, KV, 1>(o, pa[kk], desc_add(dv0, 16 * kk * KN::kRowBytes), 1);
        wgmma_commit();

        wgmma_wait<0>();
        fence_regs(o);
        fence_regs(pa);
        release(b0, 0);  // K0L
        // ---- P1, m1 from WG1; scale1 = 2^(m0 - m1)
        bar_sync(kBarP1, 256);
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          m_end[hh] = lds_f32(red_m1 + 32 * hh);
          sc1[hh] = m_end[hh] != m_mid[hh] ? fast_exp2(m_mid[hh] - m_end[hh]) : 1.f;
        }
        rescale(sc1);

        // ---- O_L += P1 V1_L (SS)
        if (has_k1) {
#pragma unroll
          for (int blk = 0; blk < HB; ++blk) pass_unit(b1, blk, len - (seg.blk_lo + it + 1) * N < N);  // V1_L
          zero_tail(s_kv1, it + 1);
          fence_regs(o);
          wgmma_fence();
#pragma unroll
          for (int kk = 0; kk < N / 16; ++kk)
            wgmma_ss<CW, KV, 1>(o, desc_add(dp1, PP::step(kk)), desc_add(dv1, 16 * kk * KN::kRowBytes), 1);
          wgmma_commit();
        }
        wgmma_wait<0>();
        fence_regs(o);
        if (has_k1) release(b1, 0);  // K1L (ckv-left + rope, and P1); a missing K1 is not the producer's (produce)
      } else {
        // ---- S1 = Q K1^T. Issued even without a K1 tile (its scores are then overwritten by -inf in softmax, and
        //      the buffer may be taking the next K1 tile's boxes meanwhile; a wgmma issue under a branch makes ptxas
        //      serialize the following wgmmas); only the waits depend on it.
        qk(sacc, b1, has_k1);

        // ---- P0, m0 from WG0: scale0 = 2^(m - m0); O_R += P0 V0_R (SS) runs under this WG's softmax. S1 is
        //      waited for first (O_R is rescaled here, and ptxas would insert that wait anyway).
        bar_sync(kBarP0, 256);
#pragma unroll
        for (int blk = HB; blk < 2 * HB; ++blk) pass_unit(b0, blk, len - (seg.blk_lo + it) * N < N);  // V0_R
        wgmma_wait<0>();
        fence_regs(sacc);
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          m_mid[hh] = lds_f32(red_m0 + 32 * hh);
          sc0[hh] = m_mid[hh] != m_run[hh] ? fast_exp2(m_run[hh] - m_mid[hh]) : 1.f;
        }
        rescale(sc0);  // no wgmma of O_R in flight
        zero_tail(s_kv0, it);
        fence_regs(o);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < N / 16; ++kk)
          wgmma_ss<CW, KV, 1>(o, desc_add(dp0, PP::step(kk)), desc_add(dv0, 16 * kk * KN::kRowBytes), 1);
        wgmma_commit();

        // ---- softmax S1 against m0 -> m1; publish P1, m1
        softmax(sacc, it + 1, has_k1, m_mid, m_end, sc1, lsum, red_m1);
        fence_proxy_async();
        bar_sync(kBarP1, 256);
        wgmma_wait<0>();
        fence_regs(o);
        fence_regs(pa);
        release(b0, 1);  // K0R (ckv-right + rope, and P0)
        rescale(sc1);
        l_run[0] += lsum[0];
        l_run[1] += lsum[1];

        // ---- O_R += P1 V1_R (RS)
        if (has_k1) {
          zero_tail(s_kv1, it + 1);
          fence_regs(o);
          fence_regs(pa);
          wgmma_fence();
#pragma unroll
          for (int kk = 0; kk < N / 16; ++kk)
            wgmma_rs<CW, KV, 1>(o, pa[kk], desc_add(dv1, 16 * kk * KN::kRowBytes), 1);
          wgmma_commit();
        }
        wgmma_wait<0>();
        fence_regs(o);
        fence_regs(pa);
        if (has_k1) release(b1, 1);  // K1R
      }
      m_run[0] = m_end[0];
      m_run[1] = m_end[1];
    }

    // ---- epilogue: row sums over the quad and both warpgroups; normalise; write out/lse or the partial
    l_run[0] = quad_sum(l_run[0]);
    l_run[1] = quad_sum(l_run[1]);
    if (tq == 0) {
      sts_f32(red_own, l_run[0]);
      sts_f32(red_own + 32, l_run[1]);
    }
    bar_sync(kBarConsumers, 256);
    l_run[0] += lds_f32(red_other);
    l_run[1] += lds_f32(red_other + 32);

    const int r_lane = opaque(row0 + wrow + g);
    if (!seg.split && bulk_out) {
      // ---- out rows staged in Q's ckv panel (dead until the next segment's Q) and sent by one bulk copy each,
      //      so that no warp waits on its stores behind the other SMs' cache reads (PERF.md, eleventh session)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const float inv = l_run[hh] > 0.f ? 1.f / l_run[hh] : 0.f;
        const uint32_t dst = s_qn + (wrow + g + 8 * hh) * kOutRowBytes + (wg * CW + 2 * tq) * sizeof(OutT);
#pragma unroll
        for (int j = 0; j < OV / 4; ++j) {
          const Out2 v = from_float2<OutT>(make_float2(o[4 * j + 2 * hh] * inv, o[4 * j + 2 * hh + 1] * inv));
          sts_u32(dst + 8 * j * sizeof(OutT), *reinterpret_cast<const uint32_t*>(&v));
        }
        const int r = r_lane + 8 * hh;
        if (p.lse && wg == 0 && tq == 0 && r < rows)
          *ResultRows<Cfg>::lse(p, seg.req, r) = row_lse(l_run[hh], m_run[hh]);
      }
      fence_proxy_async();
      bar_sync(kBarConsumers, 256);
      if (tid < M && row0 + tid < rows) {
        bulk_store(ResultRows<Cfg>::out(p, seg.req, row0 + tid), s_qn + tid * kOutRowBytes, C * sizeof(OutT));
        bulk_commit();
        bulk_wait_read();  // before the barrier below, after which the next segment's Q lands there
      }
    } else {
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int r = r_lane + 8 * hh;
        if (r >= rows) continue;
        write_result_row<Cfg, OV / 4>(p, seg, r, wg * CW + 2 * tq, l_run[hh], m_run[hh], 1.f,
                                      wg == 0 && tq == 0,
                                      [&](int j) { return make_float2(o[4 * j + 2 * hh], o[4 * j + 2 * hh + 1]); });
      }
    }
    bar_sync(kBarConsumers, 256);  // the next segment rewrites Q and the exchange arrays
  });
}

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1) decode_kernel(const __grid_constant__ TmaParams tp) {
  if constexpr (Cfg::kKVFormat == KVFormat::kKVFp8Tensor) decode_e4m3<Cfg>(tp);
  else decode_16bit<Cfg>(tp);
}

template <class Cfg>
struct E4m3Layout;

// Encodes the cache's tensor maps (sm90.cuh cache_maps, reused while the cache stays the same) and launches the
// kernel.
template <class Cfg>
inline int launch_decode(const DecodeParams& p, uint64_t stream) {
  if constexpr (Cfg::kKVFormat == KVFormat::kKVFp8Tensor) {
    return narrow::launch_e4m3<Cfg, E4m3Layout<Cfg>>(decode_kernel<Cfg>, p, stream);
  } else {
    using L = Layout<Cfg>;
    constexpr CacheMapShape kShape = {L::C, 64, L::KN::kRowBytes, L::R, L::KP::kBlockCols, L::KP::kRowBytes, 2};
    TmaParams tp;
    const int err = cache_maps<L>(p, kShape, tp);
    return err ? err : launch_decode_kernel<Cfg>(decode_kernel<Cfg>, p, stream, tp);
  }
}

}  // namespace seesaw
}  // namespace mla_gen

#include "seesaw_e4m3.cuh"
