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
#pragma once
#include <type_traits>

#include "common.cuh"
#include "ptx.cuh"

namespace mla_gen {
namespace wgmma {

// ---- PTX primitives ------------------------------------------------------------------------------




// Generic-proxy writes to shared memory (st.shared, cp.async) -> visible to the async proxy (wgmma).
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// wgmma ordering: fence before the first wgmma that reads registers written by other instructions,
// commit the issued wgmmas as one group, wait until at most N groups are pending.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Pins accumulator registers at this point of the program: the compiler may not move their reads
// or writes across it (so nothing touches them while a wgmma that writes them is in flight).
template <int K>
__device__ __forceinline__ void fence_regs(float (&d)[K]) {
#pragma unroll
  for (int i = 0; i < K; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
template <int K, int J>
__device__ __forceinline__ void fence_regs(uint32_t (&a)[K][J]) {
#pragma unroll
  for (int i = 0; i < K; ++i)
#pragma unroll
    for (int j = 0; j < J; ++j) asm volatile("" : "+r"(a[i][j])::"memory");
}

// Shared-memory matrix descriptor: start address, leading and stride byte offsets (16-byte units),
// swizzle mode (1 = 128 B, 2 = 64 B, 3 = 32 B) in bits 62-63; base offset 0 (atoms are aligned).
__device__ __forceinline__ uint64_t make_desc(uint32_t addr, uint32_t lbo, uint32_t sbo, uint32_t mode) {
  return static_cast<uint64_t>((addr & 0x3FFFFu) >> 4) | (static_cast<uint64_t>(lbo >> 4) << 16) |
         (static_cast<uint64_t>(sbo >> 4) << 32) | (static_cast<uint64_t>(mode) << 62);
}
// The same descriptor `bytes` further on (the address field does not overflow: smem < 256 KB).
__device__ __forceinline__ uint64_t desc_add(uint64_t desc, uint32_t bytes) { return desc + (bytes >> 4); }

// wgmma.mma_async m64nNk16, fp32 accumulators d[N/2], A and B from shared memory (descriptors a, b),
// A K-major, B K-major (TransB 0) or MN-major (TransB 1); scale_d 0 overwrites d instead of adding.
// Accumulator layout: thread (warp w of the warpgroup, lane) holds d[4j + 2h + e] = D[16w + lane/4 + 8h]
// [8j + 2 (lane % 4) + e].
// (The macros below are generated: see the header of this section in the repository history.)
#define MLA_WGMMA_SS_N16(DT) \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %10, 0;\n" \
               "wgmma.mma_async.sync.aligned.m64n16k16.f32." DT "." DT " {" \
               "%0, %1, %2, %3, %4, %5, %6, %7" \
               "}, %8, %9, p, 1, 1, 0, %11;\n}\n" \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]) \
               : "l"(a), "l"(b), "r"(scale_d), "n"(TransB))
#define MLA_WGMMA_SS_N32(DT) \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n" \
               "wgmma.mma_async.sync.aligned.m64n32k16.f32." DT "." DT " {" \
               "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15" \
               "}, %16, %17, p, 1, 1, 0, %19;\n}\n" \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
                 "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]) \
               : "l"(a), "l"(b), "r"(scale_d), "n"(TransB))
#define MLA_WGMMA_SS_N64(DT) \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n" \
               "wgmma.mma_async.sync.aligned.m64n64k16.f32." DT "." DT " {" \
               "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
               "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31" \
               "}, %32, %33, p, 1, 1, 0, %35;\n}\n" \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
                 "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
                 "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
                 "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]) \
               : "l"(a), "l"(b), "r"(scale_d), "n"(TransB))
#define MLA_WGMMA_SS_N128(DT) \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n" \
               "wgmma.mma_async.sync.aligned.m64n128k16.f32." DT "." DT " {" \
               "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
               "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
               "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
               "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63" \
               "}, %64, %65, p, 1, 1, 0, %67;\n}\n" \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
                 "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
                 "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
                 "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
                 "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
                 "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
                 "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
                 "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]) \
               : "l"(a), "l"(b), "r"(scale_d), "n"(TransB))
#define MLA_WGMMA_SS_N256(DT) \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n" \
               "wgmma.mma_async.sync.aligned.m64n256k16.f32." DT "." DT " {" \
               "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
               "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
               "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
               "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, " \
               "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
               "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, " \
               "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, " \
               "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127" \
               "}, %128, %129, p, 1, 1, 0, %131;\n}\n" \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
                 "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
                 "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
                 "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
                 "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
                 "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
                 "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
                 "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), \
                 "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), \
                 "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), \
                 "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), \
                 "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), \
                 "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), \
                 "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), \
                 "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), \
                 "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127]) \
               : "l"(a), "l"(b), "r"(scale_d), "n"(TransB))

#define MLA_WGMMA_RS_N64(DT) \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n" \
               "wgmma.mma_async.sync.aligned.m64n64k16.f32." DT "." DT " {" \
               "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
               "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31" \
               "}, {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n" \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
                 "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
                 "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
                 "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]) \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(scale_d), "n"(TransB))
#define MLA_WGMMA_RS_N128(DT) \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n" \
               "wgmma.mma_async.sync.aligned.m64n128k16.f32." DT "." DT " {" \
               "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
               "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
               "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
               "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63" \
               "}, {%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n" \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
                 "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
                 "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
                 "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
                 "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
                 "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
                 "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
                 "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]) \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(scale_d), "n"(TransB))
#define MLA_WGMMA_RS_N256(DT) \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n" \
               "wgmma.mma_async.sync.aligned.m64n256k16.f32." DT "." DT " {" \
               "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
               "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
               "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
               "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, " \
               "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
               "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, " \
               "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, " \
               "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127" \
               "}, {%128, %129, %130, %131}, %132, p, 1, 1, %134;\n}\n" \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
                 "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
                 "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
                 "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
                 "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
                 "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
                 "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
                 "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), \
                 "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), \
                 "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), \
                 "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), \
                 "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), \
                 "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), \
                 "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), \
                 "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), \
                 "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127]) \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(scale_d), "n"(TransB))

template <int N, typename T, int TransB>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 2], uint64_t a, uint64_t b, int scale_d) {
  static_assert(std::is_same<T, __nv_bfloat16>::value || std::is_same<T, __half>::value, "16-bit inputs");
  constexpr bool kBf16 = std::is_same<T, __nv_bfloat16>::value;
  if constexpr (N == 16) {
    if constexpr (kBf16) MLA_WGMMA_SS_N16("bf16"); else MLA_WGMMA_SS_N16("f16");
  } else if constexpr (N == 32) {
    if constexpr (kBf16) MLA_WGMMA_SS_N32("bf16"); else MLA_WGMMA_SS_N32("f16");
  } else if constexpr (N == 64) {
    if constexpr (kBf16) MLA_WGMMA_SS_N64("bf16"); else MLA_WGMMA_SS_N64("f16");
  } else if constexpr (N == 128) {
    if constexpr (kBf16) MLA_WGMMA_SS_N128("bf16"); else MLA_WGMMA_SS_N128("f16");
  } else {
    static_assert(N == 256, "wgmma n: 16, 32, 64, 128 or 256");
    if constexpr (kBf16) MLA_WGMMA_SS_N256("bf16"); else MLA_WGMMA_SS_N256("f16");
  }
}

// The same with A (16 rows per warp, k16) in registers: a[0..3] = rows (g, g + 8) x k (2 (lane % 4), + 8),
// each a pair of 16-bit values, lower k in the low half (the m16n8k16 A fragment of each warp).
template <int N, typename T, int TransB>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t b, int scale_d) {
  static_assert(std::is_same<T, __nv_bfloat16>::value || std::is_same<T, __half>::value, "16-bit inputs");
  constexpr bool kBf16 = std::is_same<T, __nv_bfloat16>::value;
  if constexpr (N == 64) {
    if constexpr (kBf16) MLA_WGMMA_RS_N64("bf16"); else MLA_WGMMA_RS_N64("f16");
  } else if constexpr (N == 128) {
    if constexpr (kBf16) MLA_WGMMA_RS_N128("bf16"); else MLA_WGMMA_RS_N128("f16");
  } else {
    static_assert(N == 256, "wgmma_rs n: 64, 128 or 256");
    if constexpr (kBf16) MLA_WGMMA_RS_N256("bf16"); else MLA_WGMMA_RS_N256("f16");
  }
}

#undef MLA_WGMMA_SS_N16
#undef MLA_WGMMA_SS_N32
#undef MLA_WGMMA_SS_N64
#undef MLA_WGMMA_SS_N128
#undef MLA_WGMMA_SS_N256
#undef MLA_WGMMA_RS_N64
#undef MLA_WGMMA_RS_N128
#undef MLA_WGMMA_RS_N256

// Two fp32 -> one register of two 16-bit values (the lower column in the low half).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  const typename Vec2<T>::type v = from_float2<T>(make_float2(lo, hi));
  uint32_t u;
  memcpy(&u, &v, sizeof(u));
  return u;
}

// 2^x with one MUFU.EX2 (subnormal results flush to 0: such probabilities add nothing); 2^-inf = 0.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// An empty volatile asm the optimiser cannot see through (keeps cheap per-thread values from being
// hoisted out of loops and held in registers).
__device__ __forceinline__ int opaque(int v) {
  asm volatile("" : "+r"(v));
  return v;
}
template <typename T>
__device__ __forceinline__ const T* opaque(const T* v) {
  asm volatile("" : "+l"(v));
  return v;
}

// ---- end PTX primitives --------------------------------------------------------------------------

// A [ROWS][W] panel of 16-bit elements in wgmma swizzle atoms (see the header comment).
template <int W, int ROWS>
struct Panel {
  static_assert(W % 64 == 0 || W == 32 || W == 16, "panel width: 16, 32 or a multiple of 64");
  static_assert(ROWS % 8 == 0, "panel rows: whole 8-row atoms");
  static constexpr int kBlockCols = W % 64 == 0 ? 64 : W;
  static constexpr int kRowBytes = 2 * kBlockCols;  // 128, 64 or 32
  static constexpr int kChunks = kRowBytes / 16;    // 16-byte chunks per block row
  static constexpr int kBlocks = W / kBlockCols;
  static constexpr int kBlockBytes = ROWS * kRowBytes;
  static constexpr int kBytes = kBlocks * kBlockBytes;
  static constexpr uint32_t kMode = kRowBytes == 128 ? 1u : (kRowBytes == 64 ? 2u : 3u);
  static constexpr uint32_t kSbo = 8u * kRowBytes;  // one 8-row atom
  static constexpr int kSteps = W / 16;             // k16 steps when the panel is a K-major operand

  __device__ __forceinline__ static int swz(int row, int chunk) {
    if constexpr (kChunks == 8) return chunk ^ (row & 7);
    else if constexpr (kChunks == 4) return chunk ^ ((row >> 1) & 3);
    else return chunk ^ ((row >> 2) & 1);
  }
  // byte offset of 16-byte chunk c (0 .. W/8-1) of row r
  __device__ __forceinline__ static uint32_t off(int r, int c) {
    return static_cast<uint32_t>((c / kChunks) * kBlockBytes + r * kRowBytes + swz(r, c % kChunks) * 16);
  }
  // byte offset of k16 step ks (K-major operand): 32 bytes per step inside a row, then the next block
  static constexpr uint32_t step(int ks) {
    return static_cast<uint32_t>((ks * 32) / kRowBytes * kBlockBytes + (ks * 32) % kRowBytes);
  }
  // K-major descriptor of rows row0 .. of this panel at `base` (LBO unused with swizzling: 1)
  __device__ __forceinline__ static uint64_t desc(uint32_t base, int row0 = 0) {
    return make_desc(base + row0 * kRowBytes, 16u, kSbo, kMode);
  }

  // Copies one row: lane tl of a team of 8 copies chunks tl, tl + 8, ... from src (already advanced
  // by tl chunks); bytes = 0 zero-fills and reads nothing.
  template <typename T>
  __device__ __forceinline__ static void copy_row(uint32_t dst, int row, const T* src, int tl, int bytes) {
    src = opaque(src);  // chunk tl + 8 i is then src + 128 i bytes: immediates, not a register per chunk
    if constexpr (kChunks == 8) {
      const uint32_t d = dst + row * kRowBytes + swz(row, tl) * 16;
#pragma unroll
      for (int i = 0; i < kBlocks; ++i) cp_async_16(d + i * kBlockBytes, src + 64 * i, bytes);
    } else {
      if (tl < kChunks) cp_async_16(dst + row * kRowBytes + swz(row, tl) * 16, src, bytes);
    }
  }
};

template <class Cfg>
struct Layout {
  using KV = typename Cfg::KVType;
  static_assert(sizeof(typename Cfg::QType) == 2 && sizeof(KV) == 2, "16-bit q and kv");
  static constexpr int H = Cfg::kNumHeads, C = Cfg::kCkvDim, R = Cfg::kRopeDim, D = C + R;
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
  static constexpr int kOffP = kOffKV + S * kStageBytes;
  static constexpr int kRedBytes = 2 * M * 4;
  static constexpr int kOffRedMax = kOffP + PP::kBytes;
  static constexpr int kOffRedSum = kOffRedMax + kRedBytes;
  static constexpr int kSmemBytes = kOffRedSum + kRedBytes;
  static_assert(kSmemBytes == Cfg::kSmemBytes, "shared memory layout disagrees with VariantSpec.smem_bytes");

  // copy teams: 8 threads move 8 consecutive 16-byte chunks (128 bytes) of one row
  static constexpr int TEAMS = T / 8;
  static constexpr int TOK_ITERS = (N + TEAMS - 1) / TEAMS;
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
  using OutT = typename Cfg::OutType;
  using Out2 = typename Vec2<OutT>::type;
  using QN = typename L::QN;
  using QP = typename L::QP;
  using KN = typename L::KN;
  using KP = typename L::KP;
  using PP = typename L::PP;
  constexpr int H = L::H, C = L::C, M = L::M, N = L::N, S = L::S, NW = L::NW, CW = L::CW;
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
  const float scale_log2 = p.sm_scale * kLog2e;
  const int* block_table = reinterpret_cast<const int*>(p.block_table);
  const KV* ckv = reinterpret_cast<const KV*>(p.ckv);
  const KV* kpe = reinterpret_cast<const KV*>(p.kpe);
  const int team = tid >> 3, tl = tid & 7;

  // descriptors (uniform per warpgroup); stage st adds st * kStageBytes
  const uint64_t d_qn = QN::desc(s_qn), d_qp = QP::desc(s_qp), d_p = PP::desc(s_p);
  const uint64_t d_kn = KN::desc(s_kv, wg * NW);                 // this WG's token rows, ckv part
  const uint64_t d_kp = KP::desc(s_kv + KN::kBytes, wg * NW);    // and rope part
  // V: MN-major, n = this WG's CW columns (CW / 64 column blocks, LBO apart), k = tokens (8-row atoms)
  const uint64_t d_v = make_desc(s_kv + wg * (CW / 64) * KN::kBlockBytes, KN::kBlockBytes, 8u * KN::kRowBytes, 1u);
  // this lane's rows in red_max [2][M] (red_sum follows it)
  const uint32_t red_own = s_base + L::kOffRedMax + 4 * (wg * M + wrow + g);
  const uint32_t red_other = s_base + L::kOffRedMax + 4 * ((wg ^ 1) * M + wrow + g);

  for_each_segment<N>(p, part, [&](const Segment& seg) {
    const int b = seg.req;
    const int len = seg.len;
    const int n_tiles = seg.blk_hi - seg.blk_lo;
    const int* bt_row = block_table + static_cast<long long>(b) * p.block_table_stride;

    // ---- kv tile gather: token n of the tile is copied by team (n mod TEAMS); pages prefetched
    int pf_page[L::TOK_ITERS], pf_off[L::TOK_ITERS];
    auto prefetch_pages = [&](int blk) {
#pragma unroll
      for (int k = 0; k < L::TOK_ITERS; ++k) {
        const int t = blk * N + team + k * L::TEAMS;
        pf_page[k] = 0;
        pf_off[k] = -1;  // -1: past the length (zero fill)
        if (t < len && team + k * L::TEAMS < N) {
          pf_page[k] = bt_row[t / p.page_size];
          pf_off[k] = t % p.page_size;
        }
      }
    };
    auto issue_tile = [&](int stage) {
      const uint32_t dst_ckv = s_kv + stage * L::kStageBytes;
      const uint32_t dst_pe = dst_ckv + KN::kBytes;
#pragma unroll
      for (int k = 0; k < L::TOK_ITERS; ++k) {
        const int n = team + k * L::TEAMS;
        if (L::TOK_ITERS * L::TEAMS == N || n < N) {
          const bool valid = pf_off[k] >= 0;
          const long long page = pf_page[k], off = valid ? pf_off[k] : 0;
          const KV* src_ckv = ckv + (page * p.ckv_stride_page + off * p.ckv_stride_tok + tl * 8);
          const KV* src_pe = kpe + (page * p.kpe_stride_page + off * p.kpe_stride_tok + tl * 8);
          KN::copy_row(dst_ckv, n, src_ckv, tl, valid ? 16 : 0);
          KP::copy_row(dst_pe, n, src_pe, tl, valid ? 16 : 0);
        }
      }
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
        QN::copy_row(s_qn, m, src_n, tl, valid ? 16 : 0);
        QP::copy_row(s_qp, m, src_p, tl, valid ? 16 : 0);
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

      const uint32_t st_off = comp_stage * L::kStageBytes;
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
#pragma unroll
      for (int ks = 0; ks < QN::kSteps; ++ks)
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
      if (t_tile + N > mask_from) {  // the last tile(s): per-row causal / length limit
        const int t_lane = t_tile + wg * NW + 2 * tq;
        const int r_lane = opaque(row0 + wrow + g);
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const int r = r_lane + 8 * hh;
          const int limit = r < rows ? mask_from + r / H : len;
#pragma unroll
          for (int j = 0; j < NW / 8; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e)
              if (t_lane + 8 * j + e >= limit) x[4 * j + 2 * hh + e] = -INFINITY;
        }
      }
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
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const float neg_m = m_run[hh] == -INFINITY ? 0.f : -m_run[hh];
          lsum[hh] = 0.f;
#pragma unroll
          for (int j = 0; j < NW / 8; ++j) {
            const float p0 = fast_exp2(fmaf(x[4 * j + 2 * hh], scale_log2, neg_m));
            const float p1 = fast_exp2(fmaf(x[4 * j + 2 * hh + 1], scale_log2, neg_m));
            lsum[hh] += p0 + p1;
            const uint32_t u = pack2<KV>(p0, p1);
            // pa[kk] = the m64 x k16 A fragment of own tokens 16 kk .. 16 kk + 15 (n8 tiles j = 2 kk, 2 kk + 1)
            pa[j >> 1][2 * (j & 1) + hh] = u;
            sts_u32(s_p + PP::off(wrow + g + 8 * hh, wg * (NW / 8) + j) + 4 * tq, u);
          }
        }
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
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      float v = l_run[hh];
      v += __shfl_xor_sync(0xffffffffu, v, 1);
      v += __shfl_xor_sync(0xffffffffu, v, 2);
      l_run[hh] = v;
    }
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
      const float l = l_run[hh];
      const float inv = l > 0.f ? 1.f / l : 0.f;
      const float lse = l > 0.f ? (m_run[hh] + log2f(l)) * kLn2 : -INFINITY;
      const int col0 = wg * CW + 2 * tq;
      if (seg.split) {
        float* dst = reinterpret_cast<float*>(p.partial_o) + (static_cast<long long>(seg.slot) * rows + r) * C + col0;
#pragma unroll
        for (int j = 0; j < OV / 4; ++j)
          *reinterpret_cast<float2*>(dst + 8 * j) = make_float2(o[4 * j + 2 * hh] * inv, o[4 * j + 2 * hh + 1] * inv);
        if (wg == 0 && tq == 0)
          reinterpret_cast<float*>(p.partial_lse)[static_cast<long long>(seg.slot) * rows + r] = lse;
      } else {
        const int s = r / H, h = r % H;
        OutT* dst = reinterpret_cast<OutT*>(p.out) + b * p.out_stride_b + s * p.out_stride_s + h * p.out_stride_h + col0;
#pragma unroll
        for (int j = 0; j < OV / 4; ++j)
          *reinterpret_cast<Out2*>(dst + 8 * j) =
              from_float2<OutT>(make_float2(o[4 * j + 2 * hh] * inv, o[4 * j + 2 * hh + 1] * inv));
        if (p.lse && wg == 0 && tq == 0)
          reinterpret_cast<float*>(p.lse)[b * p.lse_stride_b + s * p.lse_stride_s + h] = lse;
      }
    }
    __syncthreads();  // the next segment rewrites Q, the kv stages and the exchange arrays
  });
}

}  // namespace wgmma
}  // namespace mla_gen
