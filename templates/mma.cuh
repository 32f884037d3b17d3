// mla-gen family `mma`: tensor cores via mma.sync.m16n8k16 (bf16/fp16 in, fp32 accumulate), sm_80+.
//
// Work: the same contract as simt.cuh. Grid (row blocks, parts); a CTA takes kBlockM packed query
// rows (r = s * heads + h; rows past s_q * heads are zero padding, never written) and walks the kv
// segments of its part (for_each_segment), one kBlockN-token tile at a time.
//
// Warps. A warp owns WR query rows (WR = 16 when kBlockM = 16, else 32: two m16 tiles, so every V
// fragment read from shared memory feeds two MMAs) and CW = C / WN output columns of O, where
// RG = kBlockM / WR row groups x WN column splits = kWarps. O stays in fp32 registers:
// WR * CW / 32 floats per thread (128 for WR 32 x CW 128). Per kv tile:
//   1. S = Q K^T, sharded over tokens: warp (rg, wn) computes its WR rows x NW = N / WN tokens over
//      the full C + R depth (A = Q rows by ldmatrix.x4, B = K rows by ldmatrix (non-trans): a token
//      row of the tile is a column of K^T, contiguous in k, which is the "col" B layout).
//   2. Online softmax in the log2 domain: x = s * sm_scale * log2(e); the row max of the tile is
//      reduced over the quad (shfl_xor 1, 2) and then over the WN warps of the row group through
//      shared memory (red_max). Each warp keeps the running max (identical in all WN warps) and its
//      own partial row sum (summed over the WN warps in the epilogue). Masked scores are -inf; a
//      row whose max is still -inf uses 0 as its reference, so exp2 gives 0, never NaN.
//   3. P (16-bit) goes to shared memory; after a row-group barrier each warp reads P of all N
//      tokens (ldmatrix.x4 as the A operand) and V = the first C columns of the SAME kv tile
//      (ldmatrix.x4.trans as the "row" B operand): the cache is read from HBM once.
//
// Shared memory (dynamic, 16-bit elements, every row split in 16-byte chunks):
//   q_nope [M][C] | q_pe [M][R] | stages x (kv_ckv [N][C] | kv_pe [N][R]) | P [M][N] |
//   red_max [WN][M] fp32 | red_sum [WN][M] fp32.
// ckv and kpe are separate sub-arrays so that each has a power-of-two-friendly chunk count per
// row (C/8 = 64 or 32, R/8 = 8 or 4). Swizzle: chunk c of row r is stored at chunk
// c ^ (r & 7) when the row has a multiple of 8 chunks, c ^ ((r >> 1) & 3) for 4 chunks,
// c ^ ((r >> 2) & 1) for 2. Every ldmatrix phase reads one 16-byte chunk column of 8 consecutive
// rows, and these land in 8 distinct 16-byte bank groups, for K (non-trans), V (trans), Q and P
// alike; the 32-bit P stores (8 rows x 4 words) hit 32 distinct banks too.
//
// Addressing: all lanes of an ldmatrix address rows = (lane & 7) mod 8, so a row's XOR is a
// per-lane constant; with 128-byte aligned groups of 8 chunks, k16 step j of an operand is
// (base ^ 32 (j & 3)) + 128 (j >> 2): one register per operand (ChunkAddr), no per-step tables.
// The 36-step (ckv) part of Q K^T runs as a rolled loop of 4-step groups.
//
// Pipeline: kv tiles are gathered token by token (any page size: each token row looks up its page
// in the block table, prefetched into registers one tile ahead) with cp.async 16-byte copies
// (zero-fill past the length: V rows past the length are 0, never garbage times p = 0), a team
// of 8 lanes per 128 contiguous bytes, kStages deep: tile i + kStages - 1 is issued while tile i
// is computed; one __syncthreads per tile plus two row-group barriers (max exchange, P exchange).
// The Q tile is loaded with the first kv tile of each segment. The tile defaults
// (generator/select.py) fill shared memory with stages: m16n32s5w4 (<= 16 heads), m32n32s5w4
// (<= 32) and m64n64s2w8 on sm_90a for 512/64.
#pragma once
#include "common.cuh"
#include "ptx.cuh"

namespace mla_gen {
namespace mma {

// ---- PTX primitives ------------------------------------------------------------------------------



// Barrier over the `threads` threads (whole warps) of one row group.
__device__ __forceinline__ void bar_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}


__device__ __forceinline__ void ldsm_x4(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x2(uint32_t addr, uint32_t (&r)[2]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// d += a * b for one m16n8k16 tile; T selects bf16 or fp16 inputs.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ---- end PTX primitives --------------------------------------------------------------------------

// Byte offset of 16-byte chunk `chunk` of row `row` in a swizzled [rows][kChunks] sub-array.
template <int kChunks>
__device__ __forceinline__ uint32_t swz(int row, int chunk) {
  static_assert(kChunks % 8 == 0 || kChunks == 4 || kChunks == 2 || kChunks == 1,
                "rows must hold 1, 2, 4 or a multiple of 8 chunks");
  int c;
  if constexpr (kChunks % 8 == 0) c = chunk ^ (row & 7);
  else if constexpr (kChunks == 4) c = chunk ^ ((row >> 1) & 3);
  else if constexpr (kChunks == 2) c = chunk ^ ((row >> 2) & 1);
  else c = chunk;
  return static_cast<uint32_t>((row * kChunks + c) * 16);
}

// Shared-memory address of the chunk chunk0 + 2 j + hi (k16 step j, hi = the lane's k half) in
// one row of a swizzled [rows][kChunks] array, for the rows an ldmatrix lane addresses.
// kXor (rows of 8k chunks, chunk0 a multiple of 8): the row's XOR touches only bits 4-6 of the byte
// offset, so with the 128-byte group aligned, step j is (base_j0 ^ 32 (j & 3)) + 128 (j >> 2): one
// register per operand, a LOP3 per ldmatrix and compile-time immediates for the rest. Otherwise
// (1 or 2 steps over rows of 2 or 4 chunks, or an unaligned chunk0) a register per step.
template <int kChunks, int kSteps, bool kChunk0Aligned = true>
struct ChunkAddr {
  static constexpr bool kXor = kChunks % 8 == 0 && kChunk0Aligned;
  static constexpr int J = kXor ? 1 : kSteps;
  uint32_t off[J];
  __device__ __forceinline__ void init(uint32_t base, int row, int chunk0, int hi) {
    if constexpr (kXor) {
      off[0] = base + swz<kChunks>(row, chunk0 + hi);
    } else {
#pragma unroll
      for (int j = 0; j < J; ++j) off[j] = base + swz<kChunks>(row, chunk0 + 2 * j + hi);
    }
  }
  // step j (a compile-time constant after unrolling) with `add` (a 128-byte aligned stage base) added
  __device__ __forceinline__ uint32_t at(int j, uint32_t add = 0) const {
    if constexpr (kXor) return ((add + off[0]) ^ (32u * static_cast<uint32_t>(j & 3))) + 128u * static_cast<uint32_t>(j >> 2);
    else return add + off[j];
  }
};

// Copies one row (a token of the kv tile, or a query row): the CC chunks at `a` into row `row` of
// the swizzled [.][CC] sub-array at dst_a and the RC chunks at `b` into the [.][RC] one at dst_b.
// A team of 8 lanes moves 128 contiguous bytes per copy; lane tl takes chunks tl, tl + 8, ... (the
// caller passes a and b already advanced by tl chunks). bytes = 0 zero-fills and reads nothing.
template <int CC, int RC, typename T>
__device__ __forceinline__ void copy_row(uint32_t dst_a, uint32_t dst_b, int row, const T* a, const T* b, int tl,
                                         int bytes) {
  a = opaque(a);  // chunk tl + 8 i is then a + 128 i bytes: immediates, not a register per chunk
  b = opaque(b);
  if constexpr (CC % 8 == 0) {
    const uint32_t d = dst_a + swz<CC>(row, tl);  // chunk tl + 8 i sits 128 i bytes further
#pragma unroll
    for (int i = 0; i < CC / 8; ++i) cp_async_16(d + 128u * i, a + 64 * i, bytes);
  } else {
    if (tl < CC) cp_async_16(dst_a + swz<CC>(row, tl), a, bytes);
  }
  if constexpr (RC % 8 == 0) {
    const uint32_t d = dst_b + swz<RC>(row, tl);
#pragma unroll
    for (int i = 0; i < RC / 8; ++i) cp_async_16(d + 128u * i, b + 64 * i, bytes);
  } else {
    if (tl < RC) cp_async_16(dst_b + swz<RC>(row, tl), b, bytes);
  }
}

// As copy_row for one sub-array, converting 16-bit bf16 (queries) to fp16 through registers.
template <int CC, typename T>
__device__ __forceinline__ void convert_row(uint32_t dst, int row, const T* a, int tl, bool valid) {
  static_assert(std::is_same<T, __nv_bfloat16>::value, "bf16 source");
#pragma unroll
  for (int i = 0; i < (CC + 7) / 8; ++i) {
    const int c = tl + 8 * i;
    if (CC % 8 == 0 || c < CC) {
      const uint4 v = valid ? __ldg(reinterpret_cast<const uint4*>(a + 64 * i)) : make_uint4(0u, 0u, 0u, 0u);
      sts_v4(dst + swz<CC>(row, c), bf16x2_to_f16x2(v.x), bf16x2_to_f16x2(v.y), bf16x2_to_f16x2(v.z),
             bf16x2_to_f16x2(v.w));
    }
  }
}

// One k16 step of S += Q K^T into accumulator set `acc`: A (Q) from the lane address qa (+16 rows
// per m16 tile), B (K) from kb (+16 token rows per n8 pair; x2 for a single n8 tile).
template <typename KV, int kChunks, int NACC, int RM, int NT>
__device__ __forceinline__ void qk_step(float (&sacc)[NACC][RM][NT][4], int acc, uint32_t qa, uint32_t kb) {
  constexpr uint32_t kTile16 = 16u * kChunks * 16u;  // bytes of 16 rows
  uint32_t af[RM][4];
#pragma unroll
  for (int mt = 0; mt < RM; ++mt) ldsm_x4(qa + mt * kTile16, af[mt]);
  if constexpr (NT == 1) {
    uint32_t bf[2];
    ldsm_x2(kb, bf);
#pragma unroll
    for (int mt = 0; mt < RM; ++mt) mma_16816<KV>(sacc[acc][mt][0], af[mt], bf[0], bf[1]);
  } else {
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      uint32_t bf[4];
      ldsm_x4(kb + np * kTile16, bf);
#pragma unroll
      for (int mt = 0; mt < RM; ++mt) {
        mma_16816<KV>(sacc[acc][mt][2 * np], af[mt], bf[0], bf[1]);
        mma_16816<KV>(sacc[acc][mt][2 * np + 1], af[mt], bf[2], bf[3]);
      }
    }
  }
}

// S += Q K^T over the KS k16 steps of one sub-array pair (ckv or rope, kChunks chunks per row);
// step ks accumulates into set (KS0 + ks) % NACC (NACC divides 4). Long XOR-addressed runs go in
// groups of 4 steps in a rolled loop (code size, and ptxas does not hoist 36 steps of addresses).
template <typename KV, int kChunks, int KS, int KS0, int NACC, int RM, int NT>
__device__ __forceinline__ void qk_steps(float (&sacc)[NACC][RM][NT][4], const ChunkAddr<kChunks, KS>& qt,
                                         const ChunkAddr<kChunks, KS>& kt, uint32_t k_base) {
  static_assert(4 % NACC == 0, "accumulator sets divide 4");
  if constexpr (ChunkAddr<kChunks, KS>::kXor && KS % 4 == 0 && KS > 4) {
    const uint32_t q0 = qt.off[0], k0 = k_base + kt.off[0];
#pragma unroll 1
    for (int k4 = 0; k4 < KS / 4; ++k4) {
      const uint32_t q = q0 + 128u * k4, k = k0 + 128u * k4;
#pragma unroll
      for (int j = 0; j < 4; ++j)
        qk_step<KV, kChunks>(sacc, (KS0 + j) % NACC, q ^ (32u * j), k ^ (32u * j));
    }
  } else {
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) qk_step<KV, kChunks>(sacc, (KS0 + ks) % NACC, qt.at(ks), kt.at(ks, k_base));
  }
}

template <class Cfg>
struct Layout {
  using KV = typename Cfg::KVType;
  static constexpr int H = Cfg::kNumHeads, C = Cfg::kCkvDim, R = Cfg::kRopeDim, D = C + R;
  static constexpr bool kFp8 = Cfg::kKVFormat != KVFormat::kKV16;
  static constexpr bool kDs = Cfg::kKVFormat == KVFormat::kKVFp8DsMla;
  static_assert(sizeof(typename Cfg::QType) == 2 && sizeof(KV) == 2, "16-bit q and kv tiles");
  static_assert(std::is_same<typename Cfg::QType, KV>::value || (kFp8 && std::is_same<KV, __half>::value),
                "the q type is the tile type, except bf16 q over an fp8 cache (fp16 tiles)");
  static_assert(!kDs || (C == 512 && R == 64), "fp8_ds_mla: 512 ckv + 64 rope");
  static constexpr int M = Cfg::kBlockM, N = Cfg::kBlockN, S = Cfg::kStages, W = Cfg::kWarps;
  static constexpr int T = 32 * W;
  static constexpr int WR = M >= 32 ? 32 : 16;  // rows per warp
  static constexpr int RM = WR / 16;            // m16 tiles per warp
  static constexpr int RG = M / WR;             // row groups
  static constexpr int WN = W / RG;             // warps per row group = column splits of O
  static constexpr int NW = N / WN;             // tokens per warp in S = Q K^T
  static constexpr int NT = NW / 8;             // n8 tiles per warp in S
  static constexpr int CW = C / WN;             // output columns per warp
  static constexpr int OT = CW / 8;             // n8 tiles per warp in O
  static constexpr int CC = C / 8, RC = R / 8, NC = N / 8;  // 16-byte chunks per row
  // independent accumulator sets in S = Q K^T, so the dependent MMA chains stay short
  static constexpr int QK_ACC = RM * NT >= 2 ? 1 : 2;

  static constexpr int kQBytes = M * D * 2;
  static constexpr int kStageCkvBytes = N * C * 2;
  static constexpr int kStageBytes = N * D * 2;
  static constexpr int kPBytes = M * N * 2;
  static constexpr int kRedBytes = WN * M * 4;
  static constexpr int kOffQPe = M * C * 2;
  static constexpr int kOffKV = kQBytes;
  // fp8: the stages hold tokens as the cache stores them (common.cuh RawKVTile), and one fp16 tile (the
  // 16-bit stage layout) holds the current tile dequantized for the MMAs
  static constexpr int kRawStageBytes = kFp8 ? RawKVTile<Cfg>::kStageBytes : 0;
  static constexpr int kOffKV16 = kOffKV + S * kRawStageBytes;
  static constexpr int kOffP = kFp8 ? kOffKV16 + kStageBytes : kOffKV + S * kStageBytes;
  static constexpr int kOffRedMax = kOffP + kPBytes;
  static constexpr int kOffRedSum = kOffRedMax + kRedBytes;
  static constexpr int kSmemBytes = kOffRedSum + kRedBytes;
  static_assert(kSmemBytes == Cfg::kSmemBytes, "shared memory layout disagrees with VariantSpec.smem_bytes");

  // copy teams: 8 threads move 8 consecutive 16-byte chunks (128 bytes) of one row
  static constexpr int TEAMS = T / 8;
  static constexpr int Q_ITERS = (M + TEAMS - 1) / TEAMS;

  static_assert(M == 16 || M == 32 || M == 64, "block_m: 16, 32 or 64");
  static_assert(W % RG == 0 && WN >= 1, "warps: a multiple of the row groups");
  static_assert(N % (8 * WN) == 0 && (NT == 1 || NT % 2 == 0), "block_n: whole n8 tiles (pairs) per warp");
  static_assert(C % (16 * WN) == 0, "ckv: whole n16 column pairs per warp");
  static_assert(C % 16 == 0 && R % 16 == 0, "k16 steps");
  static_assert(RM * OT * 4 <= 128, "O must fit in 128 fp32 registers per thread");
  static_assert(S >= 2, "stages: at least 2");
  static_assert(RG <= 4, "named barriers 1..RG");
  static_assert((CW / 8) % 8 == 0 || OT / 2 <= 4, "ckv columns per warp: at most 64 or a multiple of 64");
  static_assert(kQBytes % 128 == 0 && kStageBytes % 128 == 0 && kOffQPe % 128 == 0 && kStageCkvBytes % 128 == 0 &&
                kOffP % 128 == 0, "sub-arrays start on 128-byte boundaries (the XOR addressing needs it)");
};

template <class Cfg>
__global__ void __launch_bounds__(32 * Cfg::kWarps, 1) decode_kernel(const __grid_constant__ DecodeParams p) {
  using L = Layout<Cfg>;
  using KV = typename Cfg::KVType;
  using Q = typename Cfg::QType;
  constexpr int H = L::H, C = L::C, M = L::M, N = L::N, S = L::S;
  constexpr int RM = L::RM, WN = L::WN, NW = L::NW, NT = L::NT, CW = L::CW, OT = L::OT;
  constexpr int CC = L::CC, RC = L::RC, NC = L::NC;
  constexpr int QK_ACC = L::QK_ACC;

  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t s_base = smem_u32(smem);
  if (s_base & 127u) __trap();  // the swizzle's XOR addressing assumes 128-byte aligned dynamic smem
  const uint32_t s_qn = s_base, s_qp = s_base + L::kOffQPe;
  const uint32_t s_kv = s_base + L::kOffKV, s_p = s_base + L::kOffP;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int rg = warp / WN, wn = warp % WN;
  const int wrow = rg * L::WR;       // first tile row of this warp
  const int g = lane >> 2, tq = lane & 3;  // mma fragment coordinates: row g (and g + 8), columns 2tq, 2tq + 1
  const int rows = p.s_q * H;
  const int row0 = blockIdx.x * M;
  const int part = blockIdx.y;
  const float sm_scale_log2 = p.sm_scale * kLog2e;
  const int* block_table = reinterpret_cast<const int*>(p.block_table);
  const int team = tid >> 3, tl = tid & 7;

  // ldmatrix lane roles (see the layout notes in the header comment); every row an ldmatrix lane
  // addresses is (lane & 7) mod 8, so the swizzle is a per-lane constant and the per-step address
  // tables below are built once.
  const int a_row = wrow + (lane & 15);                             // A (Q, P): row of the m16 tile
  const int a_hi = lane >> 4;                                       //           k half
  const int kb_tok = wn * NW + (NT == 1 ? (lane & 7) : ((lane >> 4) << 3) + (lane & 7));  // B (K) token
  const int kb_hi = (lane >> 3) & 1;                                //           k half
  const int v_tok = lane & 15;                                      // B (V, trans): token in the k16 step
  const int v_hi = lane >> 4;                                       //           n8 tile of the pair
  ChunkAddr<CC, C / 16> qn_tab, kn_tab;
  ChunkAddr<RC, L::R / 16> qp_tab, kp_tab;
  ChunkAddr<CC, OT / 2, (CW / 8) % 8 == 0> v_tab;
  ChunkAddr<NC, N / 16> p_tab;
  qn_tab.init(s_qn, a_row, 0, a_hi);
  qp_tab.init(s_qp, a_row, 0, a_hi);
  kn_tab.init(0, kb_tok, 0, kb_hi);
  kp_tab.init(L::kStageCkvBytes, kb_tok, 0, kb_hi);
  v_tab.init(0, v_tok, wn * (CW / 8), v_hi);
  p_tab.init(s_p, a_row, 0, a_hi);
  // this lane's rows in red_max [WN][M] (red_sum follows it): row wrow + g (+ 16 mt + 8 hh)
  const uint32_t red_row = s_base + L::kOffRedMax + 4 * (wrow + g);

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
        const uint32_t dst_pe = dst_ckv + L::kStageCkvBytes;
        pages.for_each_row(p, team, tl, [&](int n, const KV* src_ckv, const KV* src_pe, int bytes) {
          copy_row<CC, RC>(dst_ckv, dst_pe, n, src_ckv, src_pe, tl, bytes);
        });
      } else {
        RawKV::template issue<Pages, L::TEAMS>(pages, p, team, tl, s_kv + stage * L::kRawStageBytes);
      }
    };
    const uint32_t s_kv16 = s_base + L::kOffKV16;
    auto dequantize_tile = [&](int stage) {  // fp8: the raw tile of `stage` -> the fp16 tile, all threads
      if constexpr (L::kFp8)
        RawKV::template dequantize<L::T>(
            s_kv + stage * L::kRawStageBytes, tid, [&](int n, int c) { return s_kv16 + swz<CC>(n, c); },
            [&](int n, int c) { return s_kv16 + L::kStageCkvBytes + swz<RC>(n, c); });
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
          copy_row<CC, RC>(s_qn, s_qp, m, src_n, src_p, tl, valid ? 16 : 0);
        } else {  // bf16 q over an fp8 cache: fp16 like the tiles
          convert_row<CC>(s_qn, m, src_n, tl, valid);
          convert_row<RC>(s_qp, m, src_p, tl, valid);
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

    // ---- per-thread row state: rows (mt, hh) = wrow + 16 mt + 8 hh + g of the tile
    float m_run[RM][2], l_run[RM][2];
#pragma unroll
    for (int mt = 0; mt < RM; ++mt)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        m_run[mt][hh] = -INFINITY;
        l_run[mt][hh] = 0.f;
      }
    // causal: row r (query token r / H) sees tokens t < len - s_q + r / H + 1; padding rows see t < len.
    // Tiles wholly below the smallest limit (len - s_q + 1) need no mask.
    const int mask_from = len - p.s_q + 1;
    float o[RM][OT][4];
#pragma unroll
    for (int mt = 0; mt < RM; ++mt)
#pragma unroll
      for (int nt = 0; nt < OT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[mt][nt][e] = 0.f;

    int comp_stage = 0;
    for (int it = 0; it < n_tiles; ++it) {
      cp_async_wait<S - 2>();
      __syncthreads();  // tile `it` is in shared memory; every warp is done with tile it-1's stage
      if (it + S - 1 < n_tiles) {
        issue_tile(load_stage);
        prefetch_pages(seg.blk_lo + it + S);
      }
      cp_async_commit();
      load_stage = load_stage + 1 == S ? 0 : load_stage + 1;

      uint32_t k_stage = s_kv + comp_stage * L::kStageBytes;
      if constexpr (L::kFp8) {
        dequantize_tile(comp_stage);
        __syncthreads();  // the fp16 tile of every thread
        k_stage = s_kv16;
      }
      comp_stage = comp_stage + 1 == S ? 0 : comp_stage + 1;

      // ---- S = Q K^T: this warp's WR rows x NW tokens, k over C (ckv) then R (rope)
      float sacc[QK_ACC][RM][NT][4];
#pragma unroll
      for (int a = 0; a < QK_ACC; ++a)
#pragma unroll
        for (int mt = 0; mt < RM; ++mt)
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) sacc[a][mt][nt][e] = 0.f;

      qk_steps<KV, CC, C / 16, 0>(sacc, qn_tab, kn_tab, k_stage);
      qk_steps<KV, RC, L::R / 16, C / 16>(sacc, qp_tab, kp_tab, k_stage);

      // ---- scale, mask, tile row max (quad, then the WN warps of the row group)
      const int t_tile = (seg.blk_lo + it) * N;
      float x[RM][NT][4];
      float tmax[RM][2];
#pragma unroll
      for (int mt = 0; mt < RM; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            float v = sacc[0][mt][nt][e];
#pragma unroll
            for (int a = 1; a < QK_ACC; ++a) v += sacc[a][mt][nt][e];
            x[mt][nt][e] = v * scale_log2;
          }
      if (t_tile + N > mask_from) {  // the last tile(s): per-row causal / length limit
        const int t_lane = t_tile + wn * NW + 2 * tq;
        const int r_lane = opaque(row0 + wrow + g);
#pragma unroll
        for (int mt = 0; mt < RM; ++mt)
          mask_scores<H, NT>(t_lane, r_lane + 16 * mt, rows, mask_from, len,
                             [&](int hh, int nt, int e) -> float& { return x[mt][nt][2 * hh + e]; });
      }
#pragma unroll
      for (int mt = 0; mt < RM; ++mt) {
        tmax[mt][0] = tmax[mt][1] = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) tmax[mt][e >> 1] = fmaxf(tmax[mt][e >> 1], x[mt][nt][e]);
      }
#pragma unroll
      for (int mt = 0; mt < RM; ++mt)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          float v = tmax[mt][hh];
          v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
          v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
          tmax[mt][hh] = v;
        }
      if constexpr (WN > 1) {
        if (tq == 0) {
#pragma unroll
          for (int mt = 0; mt < RM; ++mt)
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) sts_f32(red_row + 4 * (wn * M + 16 * mt + 8 * hh), tmax[mt][hh]);
        }
        bar_sync(1 + rg, 32 * WN);
#pragma unroll
        for (int mt = 0; mt < RM; ++mt)
#pragma unroll
          for (int hh = 0; hh < 2; ++hh) {
            float v = lds_f32(red_row + 4 * (16 * mt + 8 * hh));
#pragma unroll
            for (int j = 1; j < WN; ++j) v = fmaxf(v, lds_f32(red_row + 4 * (j * M + 16 * mt + 8 * hh)));
            tmax[mt][hh] = v;
          }
      }

      // ---- online softmax; P (16-bit) to shared memory
      float alpha[RM][2], m_use[RM][2];
#pragma unroll
      for (int mt = 0; mt < RM; ++mt)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const float m_new = fmaxf(m_run[mt][hh], tmax[mt][hh]);
          m_use[mt][hh] = m_new == -INFINITY ? 0.f : m_new;  // fully masked so far: p = 0, no NaN
          alpha[mt][hh] = exp2f(m_run[mt][hh] - m_use[mt][hh]);
          m_run[mt][hh] = m_new;
          l_run[mt][hh] *= alpha[mt][hh];
        }
#pragma unroll
      for (int mt = 0; mt < RM; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int hh = 0; hh < 2; ++hh) {
            const float p0 = exp2f(x[mt][nt][2 * hh] - m_use[mt][hh]);
            const float p1 = exp2f(x[mt][nt][2 * hh + 1] - m_use[mt][hh]);
            l_run[mt][hh] += p0 + p1;
            const int prow = wrow + 16 * mt + 8 * hh + g;
            const int pchunk = wn * (NW / 8) + nt;  // n8 tile = one 16-byte chunk of the P row
            sts_u32(s_p + swz<NC>(prow, pchunk) + 4 * tq, pack2<KV>(p0, p1));
          }
      bar_sync(1 + rg, 32 * WN);  // P of the whole row group is in shared memory

      // ---- O = O * alpha + P V (V = the first C columns of the kv tile, this warp's CW of them)
#pragma unroll
      for (int mt = 0; mt < RM; ++mt)
#pragma unroll
        for (int nt = 0; nt < OT; ++nt) {
          o[mt][nt][0] *= alpha[mt][0];
          o[mt][nt][1] *= alpha[mt][0];
          o[mt][nt][2] *= alpha[mt][1];
          o[mt][nt][3] *= alpha[mt][1];
        }
      auto pv_step = [&](uint32_t pa, uint32_t v_rows) {  // P at lane address pa; V rows of this k16 step
        uint32_t af[RM][4];
#pragma unroll
        for (int mt = 0; mt < RM; ++mt) ldsm_x4(pa + mt * (16u * NC * 16u), af[mt]);
#pragma unroll
        for (int np = 0; np < OT / 2; ++np) {
          uint32_t bf[4];
          ldsm_x4_trans(v_tab.at(np, v_rows), bf);
#pragma unroll
          for (int mt = 0; mt < RM; ++mt) {
            mma_16816<KV>(o[mt][2 * np], af[mt], bf[0], bf[1]);
            mma_16816<KV>(o[mt][2 * np + 1], af[mt], bf[2], bf[3]);
          }
        }
      };
      if constexpr (decltype(p_tab)::kXor && N / 16 >= 4) {
#pragma unroll 1
        for (int kt = 0; kt < N / 16; ++kt)
          pv_step((p_tab.off[0] + 128u * (kt >> 2)) ^ (32u * (kt & 3)), k_stage + kt * (16u * CC * 16u));
      } else {
#pragma unroll
        for (int kt = 0; kt < N / 16; ++kt) pv_step(p_tab.at(kt), k_stage + kt * (16u * CC * 16u));
      }
    }
    cp_async_wait<0>();

    // ---- epilogue: row sums over the quad and the WN warps; normalise; write out/lse or the partial
#pragma unroll
    for (int mt = 0; mt < RM; ++mt)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) l_run[mt][hh] = quad_sum(l_run[mt][hh]);
    if constexpr (WN > 1) {
      if (tq == 0) {
#pragma unroll
        for (int mt = 0; mt < RM; ++mt)
#pragma unroll
          for (int hh = 0; hh < 2; ++hh)
            sts_f32(red_row + L::kRedBytes + 4 * (wn * M + 16 * mt + 8 * hh), l_run[mt][hh]);
      }
      bar_sync(1 + rg, 32 * WN);
#pragma unroll
      for (int mt = 0; mt < RM; ++mt)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          float v = 0.f;
#pragma unroll
          for (int j = 0; j < WN; ++j) v += lds_f32(red_row + L::kRedBytes + 4 * (j * M + 16 * mt + 8 * hh));
          l_run[mt][hh] = v;
        }
    }
    const int r_lane = opaque(row0 + wrow + g);
#pragma unroll
    for (int mt = 0; mt < RM; ++mt)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int r = r_lane + 16 * mt + 8 * hh;
        if (r >= rows) continue;
        write_result_row<Cfg, OT>(p, seg, r, wn * CW + 2 * tq, l_run[mt][hh], m_run[mt][hh], scale.out(1.f),
                                  wn == 0 && tq == 0,
                                  [&](int nt) { return make_float2(o[mt][nt][2 * hh], o[mt][nt][2 * hh + 1]); });
      }
    __syncthreads();  // the next segment rewrites Q, the kv stages and the exchange arrays
  });
}

}  // namespace mma
}  // namespace mla_gen
