// Prototype of an fp8_e4m3 decode loop for few heads that keeps no 16-bit copy of the cache (PERF.md, fifteenth
// session): the kernel the narrow family's fp8 path would become, reduced to what decides its speed and its
// correctness: 16 query rows (H16, s_q 1), page 64, lengths a multiple of 64, one CTA per request, no split.
//   - a producer warp loads raw e4m3 tiles by TMA into a ring of kStages stages (36 KB each);
//   - S^T = K Q^T by e4m3 wgmma straight from the raw tile, q quantized per row to e4m3 twice (hi and the rest,
//     lo, in the same scale: about bf16's precision, the same tensor work as a bf16 Q K^T);
//   - O^T = V^T P^T with V^T as the A operand in registers, made from the raw bytes (4 shared loads, PRMT, cvt per
//     k16 step and thread); the O^T rows are permuted features (a thread's 16 features are one 16-byte chunk).
// Built and timed by scripts/proto_narrow_fp8.py; not part of the product.
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>

#include <cstdint>

namespace proto {

#ifndef PROTO_STAGES
#define PROTO_STAGES 4
#endif
constexpr int RN = 16, N = 64, C = 512, R = 64, kStages = PROTO_STAGES;
constexpr int kRawCkv = N * C, kRawRope = N * R, kStageBytes = kRawCkv + kRawRope;  // 32 KB + 4 KB
// shared memory: q hi / lo (ckv [RN][C] as 4 blocks of 128-byte rows, rope [RN][R] of 64-byte rows), the ring,
// P^T per consumer warpgroup ([RN][N] fp16, 128-byte rows), row state, mbarriers
constexpr int kOffQhi = 0, kOffQlo = RN * C, kOffQrHi = 2 * RN * C, kOffQrLo = kOffQrHi + RN * R;
constexpr int kOffRing = 2 * RN * (C + R);  // 18432: a multiple of 1024
constexpr int kOffPt = kOffRing + kStages * kStageBytes;
constexpr int kOffInvS = kOffPt + 2 * RN * N * 2;
constexpr int kOffWred = kOffInvS + RN * 4;          // [2 wg][4 warps][RN] fp32
constexpr int kOffState = kOffWred + 2 * 4 * RN * 4;  // m [2][RN], l [2][RN]
constexpr int kOffBars = kOffState + 4 * RN * 4;      // full [S], empty [S]
constexpr int kSmem = kOffBars + 2 * kStages * 8;
constexpr int kOStride = C + 4;  // fp32 O staging over the ring at the end
static_assert(kOffRing % 1024 == 0 && kStageBytes % 1024 == 0 && kOffPt % 1024 == 0, "swizzle atoms");
static_assert(RN * kOStride * 4 <= kStages * kStageBytes, "O staging fits the ring");

struct Params {
  const __nv_bfloat16* q;  // [B][RN][C + R]
  const int* block_table;  // [B][max_pages]
  __nv_bfloat16* out;      // [B][RN][C]
  int max_pages, seqlen;
  float sm_scale_log2, kv_scale;
};
struct TmaParams {
  Params p;
  CUtensorMap ckv, rope;
};

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ uint64_t make_desc(uint32_t addr, uint32_t sbo, uint32_t mode) {
  return static_cast<uint64_t>((addr & 0x3FFFFu) >> 4) | (1ull << 16) | (static_cast<uint64_t>(sbo >> 4) << 32) |
         (static_cast<uint64_t>(mode) << 62);
}
__device__ __forceinline__ void bar_init(uint32_t b, int n) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(b), "r"(n) : "memory");
}
__device__ __forceinline__ void bar_expect(uint32_t b, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(b), "r"(bytes) : "memory");
}
__device__ __forceinline__ void bar_arrive(uint32_t b) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(b) : "memory");
}
__device__ __forceinline__ void bar_wait(uint32_t b, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred d;\nW:\nmbarrier.try_wait.parity.shared::cta.b64 d, [%0], %1;\n@!d bra W;\n}" ::"r"(b),
      "r"(parity)
      : "memory");
}
__device__ __forceinline__ void tma_3d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1, int c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5}], "
      "[%2];" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2)
      : "memory");
}
__device__ __forceinline__ void named_sync(int id, int n) { asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(n)); }
__device__ __forceinline__ void fence_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }
__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int K>
__device__ __forceinline__ void wg_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(K) : "memory");
}
template <int K>
__device__ __forceinline__ void pin(float (&d)[K]) {
#pragma unroll
  for (int i = 0; i < K; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
template <int K>
__device__ __forceinline__ void pin(uint32_t (&d)[K]) {
#pragma unroll
  for (int i = 0; i < K; ++i) asm volatile("" : "+r"(d[i])::"memory");
}
// D (+)= A B, m64n16k32, e4m3 x e4m3 -> f32, A and B K-major from shared memory
__device__ __forceinline__ void mma_e4m3(float (&d)[8], uint64_t a, uint64_t b, int acc) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %10, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n16k32.f32.e4m3.e4m3 {%0, %1, %2, %3, %4, %5, %6, %7}, %8, %9, p, 1, 1;\n}"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
      : "l"(a), "l"(b), "r"(acc));
}
// D += A B, m64n16k16 f16, A from registers, B K-major from shared memory
__device__ __forceinline__ void mma_f16_rs(float (&d)[8], const uint32_t (&a)[4], uint64_t b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %13, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n16k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7}, {%8, %9, %10, %11}, "
      "%12, p, 1, 1, 0;\n}"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
}
__device__ __forceinline__ uint32_t e4m3x2_to_f16x2(uint32_t v16) {  // the low 16 bits: lower byte -> lower half
  uint32_t r;
  asm("{\n.reg .b16 l;\ncvt.u16.u32 l, %1;\ncvt.rn.f16x2.e4m3x2 %0, l;\n}" : "=r"(r) : "r"(v16));
  return r;
}
__device__ __forceinline__ uint16_t f32x2_to_e4m3x2(float lo, float hi) {
  uint16_t r;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
  return r;
}
__device__ __forceinline__ float e4m3_to_f32(uint32_t byte) {
  const uint32_t h = e4m3x2_to_f16x2(byte & 0xFFu);
  return __half2float(__ushort_as_half(static_cast<unsigned short>(h & 0xFFFFu)));
}
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
// byte offset of 16-byte chunk c of row r in a panel of 128-byte rows (128-byte swizzle), `rows` rows per block
__device__ __forceinline__ uint32_t off128(int r, int c, int rows) {
  return static_cast<uint32_t>((c >> 3) * rows * 128 + r * 128 + (((c & 7) ^ (r & 7)) << 4));
}
// ... of 64-byte rows (64-byte swizzle)
__device__ __forceinline__ uint32_t off64(int r, int c) {
  return static_cast<uint32_t>(r * 64 + ((c ^ ((r >> 1) & 3)) << 4));
}

__global__ void __launch_bounds__(384, 1) decode(const __grid_constant__ TmaParams tp) {
  const Params& p = tp.p;
  extern __shared__ __align__(1024) unsigned char smem[];
  const uint32_t s = smem_u32(smem);
  const int tid = threadIdx.x, lane = tid & 31, warp = __shfl_sync(0xffffffffu, tid >> 5, 0);
  const int b = blockIdx.x, n_tiles = p.seqlen / N;
  const uint32_t full = s + kOffBars, empty = full + 8 * kStages;
  if (tid == 0) {
    for (int i = 0; i < kStages; ++i) bar_init(full + 8 * i, 1), bar_init(empty + 8 * i, 4);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  if (warp >= 8) {  // ---- producer: warp 8 (its lanes hold the pages of 32 tiles, read a chunk ahead; lane 0 issues)
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
    if (warp == 8) {
      const int* bt = p.block_table + static_cast<int64_t>(b) * p.max_pages;
      int next = lane < n_tiles ? bt[lane] : 0;
      for (int base = 0; base < n_tiles; base += 32) {
        const int pages = next;
        next = base + 32 + lane < n_tiles ? bt[base + 32 + lane] : 0;
        for (int i = base; i < n_tiles && i < base + 32; ++i) {
          const int page = __shfl_sync(0xffffffffu, pages, i - base);  // page 64: tile i is one page
          if (lane == 0) {
            const int st = i % kStages;
            bar_wait(empty + 8 * st, ((i / kStages) & 1) ^ 1);
            const uint32_t dst = s + kOffRing + st * kStageBytes;
            bar_expect(full + 8 * st, kStageBytes);
#pragma unroll
            for (int blk = 0; blk < 4; ++blk)
              tma_3d(dst + blk * N * 128, &tp.ckv, full + 8 * st, blk * 128, 0, page);
            tma_3d(dst + kRawCkv, &tp.rope, full + 8 * st, 0, 0, page);
          }
          __syncwarp();
        }
      }
    }
    return;
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");

  // ---- q: per row, scale to 224 at its largest |value|, hi = e4m3(q s), lo = e4m3(q s - hi); 16 threads a row
  {
    const int r = tid >> 4, tl = tid & 15;
    const __nv_bfloat16* qrow = p.q + (static_cast<int64_t>(b) * RN + r) * (C + R);
    float v[3][16];
    float mx = 0.f;
#pragma unroll
    for (int k = 0; k < 3; ++k) {
      const int c = tl + 16 * k;  // 16-value chunk: 0..31 ckv, 32..35 rope
#pragma unroll
      for (int i = 0; i < 16; ++i) v[k][i] = 0.f;
      if (c < 36) {
        const uint4* src = reinterpret_cast<const uint4*>(qrow + 16 * c);
        uint4 w[2] = {src[0], src[1]};
        const __nv_bfloat16* h = reinterpret_cast<const __nv_bfloat16*>(w);
#pragma unroll
        for (int i = 0; i < 16; ++i) v[k][i] = __bfloat162float(h[i]), mx = fmaxf(mx, fabsf(v[k][i]));
      }
    }
#pragma unroll
    for (int o = 8; o; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    const float sc = mx > 0.f ? 224.f / mx : 1.f;
    if (tl == 0) reinterpret_cast<float*>(smem + kOffInvS)[r] = 1.f / sc;
#pragma unroll
    for (int k = 0; k < 3; ++k) {
      const int c = tl + 16 * k;
      if (c >= 36) continue;
      uint32_t hi[4], lo[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        uint32_t hw = 0, lw = 0;
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float a = v[k][4 * i + 2 * e] * sc, a1 = v[k][4 * i + 2 * e + 1] * sc;
          const uint16_t h2 = f32x2_to_e4m3x2(a, a1);
          const float ha = e4m3_to_f32(h2 & 0xFFu), hb = e4m3_to_f32(h2 >> 8);
          const uint16_t l2 = f32x2_to_e4m3x2(a - ha, a1 - hb);
          hw |= static_cast<uint32_t>(h2) << (16 * e);
          lw |= static_cast<uint32_t>(l2) << (16 * e);
        }
        hi[i] = hw, lo[i] = lw;
      }
      const uint32_t oh = c < 32 ? kOffQhi + off128(r, c, RN) : kOffQrHi + off64(r, c - 32);
      const uint32_t ol = c < 32 ? kOffQlo + off128(r, c, RN) : kOffQrLo + off64(r, c - 32);
      *reinterpret_cast<uint4*>(smem + oh) = make_uint4(hi[0], hi[1], hi[2], hi[3]);
      *reinterpret_cast<uint4*>(smem + ol) = make_uint4(lo[0], lo[1], lo[2], lo[3]);
    }
  }
  fence_async();
  named_sync(1, 256);

  const int wg = warp >> 2, wq = warp & 3, g = lane >> 2, tq = lane & 3;
  const float* inv_s = reinterpret_cast<const float*>(smem + kOffInvS);
  float rs[2][2];  // 1 / scale of this thread's rows 8 j + 2 tq + e
#pragma unroll
  for (int j = 0; j < 2; ++j)
#pragma unroll
    for (int e = 0; e < 2; ++e) rs[j][e] = inv_s[8 * j + 2 * tq + e];
  const uint32_t s_pt = s + kOffPt + wg * RN * N * 2;
  float* wred = reinterpret_cast<float*>(smem + kOffWred);
  float m_run[2][2], l_run[2][2], o[8][8];
#pragma unroll
  for (int j = 0; j < 2; ++j) m_run[j][0] = m_run[j][1] = -INFINITY, l_run[j][0] = l_run[j][1] = 0.f;
#pragma unroll
  for (int mt = 0; mt < 8; ++mt)
#pragma unroll
    for (int i = 0; i < 8; ++i) o[mt][i] = 0.f;
  const int bar_id = 2 + wg;

  for (int it = wg; it < n_tiles; it += 2) {
    const int st = it % kStages;
    const uint32_t stage = s + kOffRing + st * kStageBytes;
    bar_wait(full + 8 * st, (it / kStages) & 1);

    // ---- S^T = K Q^T: e4m3, hi and lo chains
    float shi[8], slo[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) shi[i] = slo[i] = 0.f;
    pin(shi), pin(slo);
    wg_fence();
#ifndef PROTO_NO_QK
#pragma unroll
    for (int ks = 0; ks < 16; ++ks) {
      const uint32_t kb = (ks >> 2) * N * 128 + (ks & 3) * 32, qb = (ks >> 2) * RN * 128 + (ks & 3) * 32;
      mma_e4m3(shi, make_desc(stage + kb, 1024, 1), make_desc(s + kOffQhi + qb, 1024, 1), 1);
      mma_e4m3(slo, make_desc(stage + kb, 1024, 1), make_desc(s + kOffQlo + qb, 1024, 1), 1);
    }
#pragma unroll
    for (int ks = 0; ks < 2; ++ks) {
      mma_e4m3(shi, make_desc(stage + kRawCkv + 32 * ks, 512, 2), make_desc(s + kOffQrHi + 32 * ks, 512, 2), 1);
      mma_e4m3(slo, make_desc(stage + kRawCkv + 32 * ks, 512, 2), make_desc(s + kOffQrLo + 32 * ks, 512, 2), 1);
    }
#endif
    wg_commit();
    wg_wait<0>();
    pin(shi), pin(slo);

    // ---- softmax over tokens (exact running max per row). x[4 j + 2 h + e]: token 16 wq + g + 8 h, row 8 j + 2 tq + e
    float x[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) x[i] = (shi[i] + slo[i]) * rs[i >> 2][i & 1];
    float tmax[2][2];
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float v = fmaxf(x[4 * j + e], x[4 * j + 2 + e]);
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 4));
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 8));
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 16));
        if (g == 0) wred[(wg * 4 + wq) * RN + 8 * j + 2 * tq + e] = v;
      }
    named_sync(bar_id, 128);
    float alpha[2][2];
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int r = 8 * j + 2 * tq + e;
        float t = wred[(wg * 4) * RN + r];
#pragma unroll
        for (int w = 1; w < 4; ++w) t = fmaxf(t, wred[(wg * 4 + w) * RN + r]);
        const float mn = fmaxf(m_run[j][e], t * p.sm_scale_log2);
        alpha[j][e] = m_run[j][e] == -INFINITY ? 0.f : ex2(m_run[j][e] - mn);
        m_run[j][e] = mn;
        l_run[j][e] *= alpha[j][e];
        tmax[j][e] = mn;
      }
#pragma unroll
    for (int mt = 0; mt < 8; ++mt)
#pragma unroll
      for (int i = 0; i < 8; ++i) o[mt][i] *= alpha[(i >> 2)][i & 1];
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float pv = ex2(x[4 * j + 2 * h + e] * p.sm_scale_log2 - tmax[j][e]);
          l_run[j][e] += pv;
          const int r = 8 * j + 2 * tq + e, t = 16 * wq + g + 8 * h;
          *reinterpret_cast<__half*>(smem + kOffPt + wg * RN * N * 2 + off128(r, t >> 3, RN) + 2 * (t & 7)) =
              __float2half_rn(pv);
        }
    fence_async();
    named_sync(bar_id, 128);  // P^T of the 4 warps; the maxima read

    // ---- O^T += V^T P^T: V^T fragments from the raw tile (thread chunk 8 wq + g: features 16 (8 wq + g) ..)
    // groups of 4 m-tiles (one half of a k16 step), double-buffered: a buffer is rewritten once the wgmmas of
    // the group before the last have read it
    uint32_t a[2][4][4];
#ifndef PROTO_NO_PV
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      uint4 X[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int t = 16 * kk + 2 * tq + (u & 1) + 8 * (u >> 1);
        X[u] = *reinterpret_cast<const uint4*>(smem + (stage - s) + wq * N * 128 + t * 128 + ((g ^ (t & 7)) << 4));
      }
      const uint32_t* w0 = reinterpret_cast<const uint32_t*>(&X[0]);
      const uint32_t* w1 = reinterpret_cast<const uint32_t*>(&X[1]);
      const uint32_t* w2 = reinterpret_cast<const uint32_t*>(&X[2]);
      const uint32_t* w3 = reinterpret_cast<const uint32_t*>(&X[3]);
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int gi = 2 * kk + half;
        uint32_t(&f)[4][4] = a[gi & 1];
        if (gi >= 2) {
          wg_wait<1>();  // group gi - 2 read these registers
          pin(f[0]), pin(f[1]), pin(f[2]), pin(f[3]);
        }
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int mt = 4 * half + q;
          const uint32_t sel = (mt & 1) ? 0x7362u : 0x5140u;
          const uint32_t r01 = __byte_perm(w0[mt >> 1], w1[mt >> 1], sel);
          const uint32_t r89 = __byte_perm(w2[mt >> 1], w3[mt >> 1], sel);
          f[q][0] = e4m3x2_to_f16x2(r01 & 0xFFFFu);
          f[q][1] = e4m3x2_to_f16x2(r01 >> 16);
          f[q][2] = e4m3x2_to_f16x2(r89 & 0xFFFFu);
          f[q][3] = e4m3x2_to_f16x2(r89 >> 16);
        }
#pragma unroll
        for (int q = 0; q < 4; ++q) pin(o[4 * half + q]);
        wg_fence();
#pragma unroll
        for (int q = 0; q < 4; ++q) mma_f16_rs(o[4 * half + q], f[q], make_desc(s_pt + 32 * kk, 1024, 1));
        wg_commit();
      }
    }
    wg_wait<0>();
#pragma unroll
    for (int mt = 0; mt < 8; ++mt) pin(o[mt]);
#pragma unroll
    for (int q = 0; q < 4; ++q) pin(a[0][q]), pin(a[1][q]);
#endif
    if (lane == 0) bar_arrive(empty + 8 * st);
  }

  // ---- epilogue: row sums, the two warpgroups merged, O un-permuted into fp32 rows over the ring
#pragma unroll
  for (int j = 0; j < 2; ++j)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      float v = l_run[j][e];
      v += __shfl_xor_sync(0xffffffffu, v, 4);
      v += __shfl_xor_sync(0xffffffffu, v, 8);
      v += __shfl_xor_sync(0xffffffffu, v, 16);
      l_run[j][e] = v;
    }
  named_sync(1, 256);
  float* ms = reinterpret_cast<float*>(smem + kOffState);
  if (g == 0)
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int r = 8 * j + 2 * tq + e;
        wred[(wg * 4 + wq) * RN + r] = l_run[j][e];
        if (wq == 0) ms[wg * RN + r] = m_run[j][e];
      }
  named_sync(1, 256);
  float sc_own[2][2];
#pragma unroll
  for (int j = 0; j < 2; ++j)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int r = 8 * j + 2 * tq + e;
      float mw[2], lw[2];
#pragma unroll
      for (int w = 0; w < 2; ++w) {
        mw[w] = ms[w * RN + r];
        lw[w] = wred[(w * 4) * RN + r] + wred[(w * 4 + 1) * RN + r] + wred[(w * 4 + 2) * RN + r] +
                wred[(w * 4 + 3) * RN + r];
      }
      const float m = fmaxf(mw[0], mw[1]);
      const float a0 = mw[0] == -INFINITY ? 0.f : ex2(mw[0] - m), a1 = mw[1] == -INFINITY ? 0.f : ex2(mw[1] - m);
      const float l = a0 * lw[0] + a1 * lw[1];
      sc_own[j][e] = l > 0.f ? p.kv_scale * (wg == 0 ? a0 : a1) / l : 0.f;
    }
  float* os = reinterpret_cast<float*>(smem + kOffRing);
  // o[mt][4 j + 2 h + e] = O[row 8 j + 2 tq + e][feature 16 (8 wq + g) + 2 mt + h]
  auto o_at = [&](int mt, int i) -> float& {
    const int j = i >> 2, h = (i >> 1) & 1, e = i & 1;
    return os[(8 * j + 2 * tq + e) * kOStride + 16 * (8 * wq + g) + 2 * mt + h];
  };
  if (wg == 0)
#pragma unroll
    for (int mt = 0; mt < 8; ++mt)
#pragma unroll
      for (int i = 0; i < 8; ++i) o_at(mt, i) = o[mt][i] * sc_own[i >> 2][i & 1];
  named_sync(1, 256);
  if (wg == 1)
#pragma unroll
    for (int mt = 0; mt < 8; ++mt)
#pragma unroll
      for (int i = 0; i < 8; ++i) o_at(mt, i) += o[mt][i] * sc_own[i >> 2][i & 1];
  named_sync(1, 256);
  for (int idx = tid; idx < RN * C / 2; idx += 256) {
    const int r = idx / (C / 2), c = 2 * (idx % (C / 2));
    reinterpret_cast<__nv_bfloat162*>(p.out + (static_cast<int64_t>(b) * RN + r) * C)[c / 2] =
        __floats2bfloat162_rn(os[r * kOStride + c], os[r * kOStride + c + 1]);
  }
}

PFN_cuTensorMapEncodeTiled_v12000 encoder() {
  void* f = nullptr;
  cudaDriverEntryPointQueryResult found;
  cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &found);
  return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
}

int encode(CUtensorMap* map, const uint8_t* base, int width, int box, int num_pages, int tok_stride,
           CUtensorMapSwizzle swz) {
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(width), 64, static_cast<cuuint64_t>(num_pages)};
  const cuuint64_t strides[2] = {static_cast<cuuint64_t>(tok_stride), static_cast<cuuint64_t>(tok_stride) * 64};
  const cuuint32_t boxd[3] = {static_cast<cuuint32_t>(box), 64, 1}, es[3] = {1, 1, 1};
  return encoder()(map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 3, const_cast<uint8_t*>(base), dims, strides, boxd, es,
                   CU_TENSOR_MAP_INTERLEAVE_NONE, swz, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                   CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
}

}  // namespace proto

// cache [num_pages][64][tok_stride] e4m3, the first 576 bytes of a token used (one scale, kv_scale); q [B][16][576]
// bf16; out [B][16][512] bf16
extern "C" int proto_decode(const void* q, const void* cache, const int* block_table, void* out, int batch,
                            int seqlen, int num_pages, int max_pages, int tok_stride, float sm_scale, float kv_scale,
                            void* stream) {
  using namespace proto;
  TmaParams tp;
  tp.p = {reinterpret_cast<const __nv_bfloat16*>(q), block_table, reinterpret_cast<__nv_bfloat16*>(out), max_pages,
          seqlen, sm_scale * 1.4426950408889634f * kv_scale, kv_scale};
  const uint8_t* c = reinterpret_cast<const uint8_t*>(cache);
  if (encode(&tp.ckv, c, C, 128, num_pages, tok_stride, CU_TENSOR_MAP_SWIZZLE_128B) ||
      encode(&tp.rope, c + C, R, 64, num_pages, tok_stride, CU_TENSOR_MAP_SWIZZLE_64B))
    return -1;
  static bool attr = false;
  if (!attr) {
    cudaFuncSetAttribute(decode, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
    attr = true;
  }
  decode<<<batch, 384, kSmem, reinterpret_cast<cudaStream_t>(stream)>>>(tp);
  return static_cast<int>(cudaGetLastError());
}
