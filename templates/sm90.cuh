// mla-gen: what the Hopper (sm_90a) families share: async-proxy fences, wgmma ordering, shared-memory
// matrix descriptors, the generated wgmma wrappers, and Panel, a [rows][width] tile of 16-bit elements
// stored in wgmma's 128/64/32-byte swizzle atoms (see Panel).
#pragma once
#include <cuda.h>  // CUtensorMap and its enums (the encoder itself is reached through the runtime)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cudaTypedefs.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common.cuh"
#include "ptx.cuh"
#include "wgmma_ops.cuh"

namespace mla_gen {
namespace sm90 {

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
template <int J>
__device__ __forceinline__ void fence_regs(uint32_t (&a)[J]) {
#pragma unroll
  for (int j = 0; j < J; ++j) asm volatile("" : "+r"(a[j])::"memory");
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

// wgmma.mma_async m64nNk16 (generated wrappers: wgmma_ops.cuh.jinja, rendered for the variant's dtype).
// wgmma_ss: A and B from shared memory, A K-major unless TransA; B K-major (TransB 0) or MN-major (1).
// wgmma_rs: A from registers. scale_d 0 overwrites d instead of adding.
template <int N, typename T, int TransB, int TransA = 0>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 2], uint64_t a, uint64_t b, int scale_d) {
  static_assert(std::is_same<T, wgmma_ops::Element>::value, "wgmma_ops.cuh was rendered for another dtype");
  wgmma_ops::mma_ss<N, TransA, TransB>(d, a, b, scale_d);
}
template <int N, typename T, int TransB>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t b, int scale_d) {
  static_assert(std::is_same<T, wgmma_ops::Element>::value, "wgmma_ops.cuh was rendered for another dtype");
  wgmma_ops::mma_rs<N, TransB>(d, a, b, scale_d);
}

// D (+)= A B, m64nNk32, e4m3 A and B K-major from shared memory (a k32 step is 32 bytes, like a 16-bit k16 step).
template <int N>
__device__ __forceinline__ void wgmma_ss_e4m3(float (&d)[N / 2], uint64_t a, uint64_t b, int scale_d) {
  wgmma_ops::mma_ss_e4m3<N>(d, a, b, scale_d);
}
// D (+)= A B, m64nNk16, bf16 A and B K-major from shared memory, whatever the variant's dtype.
template <int N>
__device__ __forceinline__ void wgmma_ss_bf16(float (&d)[N / 2], uint64_t a, uint64_t b, int scale_d) {
  wgmma_ops::mma_ss_bf16<N>(d, a, b, scale_d);
}

// 2^x with one MUFU.EX2 (subnormal results flush to 0: such probabilities add nothing); 2^-inf = 0.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// A softmax probability 2^(x scale - m) where m = x_max * scale is a row's (or a lazy reference's) max of the
// scaled scores: the product rounds before the subtraction, as m's did, so the max score gives exactly 2^0 and
// no p exceeds 2^(m's lag) at any scale. One fused multiply-add would keep the product exact: at scaled scores
// of ~1e10 (a huge sm_scale) its difference to the rounded m is ~1e3, 2^1e3 = inf, and the row turns NaN.
__device__ __forceinline__ float exp2_scaled(float x, float scale, float neg_m) {
  return fast_exp2(__fmul_rn(x, scale) + neg_m);
}

// P = 2^(x scale - m) over the two rows a thread holds of an m64nN accumulator (m16n8 C layout: x[4 j + 2 hh + e] is
// row hh, n8 tile j, column e) against each row's m (-inf for a row that has seen nothing: reference 0, so
// 2^-inf = 0, never NaN); the row sums go to lsum, each pair of P to store(hh, j, p0, p1). Shared by seesaw's
// lazy_softmax and wgmma's make_p.
template <int NJ, int K, class Store>
__device__ __forceinline__ void exp_rows(const float (&x)[K], float scale, const float (&m)[2], float (&lsum)[2],
                                         Store&& store) {
  static_assert(K >= 4 * NJ, "NJ n8 tiles of 4 values a thread");
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const float neg_m = m[hh] == -INFINITY ? 0.f : -m[hh];
    lsum[hh] = 0.f;
#pragma unroll
    for (int j = 0; j < NJ; ++j) {
      const float p0 = exp2_scaled(x[4 * j + 2 * hh], scale, neg_m);
      const float p1 = exp2_scaled(x[4 * j + 2 * hh + 1], scale, neg_m);
      lsum[hh] += p0 + p1;
      store(hh, j, p0, p1);
    }
  }
}

// Moves this warp's register budget to N (every warp of the warpgroup executes it): a producer warpgroup gives
// registers back (dec) so that the consumer warpgroups can take them (inc, which waits until they are free).
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}
// ---- end PTX primitives --------------------------------------------------------------------------

// A [ROWS][W] panel of 16-bit elements in wgmma swizzle atoms. A panel of width W is stored as W / 64
// column blocks [rows][64] (128-byte rows, 128-byte swizzle: 16-byte chunk c of row r at chunk c ^ (r & 7))
// when 64 divides W, else as one block of 64-byte rows (W = 32, 64-byte swizzle: c ^ ((r >> 1) & 3)) or
// 32-byte rows (W = 16, c ^ ((r >> 2) & 1)). These are exactly the canonical wgmma swizzle atoms (8 rows x
// row bytes), so descriptors describe panels directly: K-major with SBO = 8 rows (k16 step = +32 bytes
// inside a row, next block = +block bytes); MN-major (128-byte rows only) with LBO = one column block
// (64 columns) and SBO = 8 rows.
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

  // Converts one row of 16-bit values S (bf16 queries) into this panel's fp16: lane tl of a team of 8
  // converts chunks tl, tl + 8, ... from src (already advanced by tl chunks); !valid stores zeros.
  template <typename S>
  __device__ __forceinline__ static void convert_row(uint32_t dst, int row, const S* src, int tl, bool valid) {
    static_assert(std::is_same<S, __nv_bfloat16>::value, "bf16 source");
    constexpr int kRowChunks = kChunks * kBlocks;
#pragma unroll
    for (int i = 0; i < (kRowChunks + 7) / 8; ++i) {
      if (kRowChunks % 8 == 0 || tl + 8 * i < kRowChunks) {
        const uint4 v = valid ? __ldg(reinterpret_cast<const uint4*>(src + 64 * i)) : make_uint4(0u, 0u, 0u, 0u);
        sts_v4(dst + off(row, tl + 8 * i), bf16x2_to_f16x2(v.x), bf16x2_to_f16x2(v.y), bf16x2_to_f16x2(v.z),
               bf16x2_to_f16x2(v.w));
      }
    }
  }
};

// ---- host: tensor maps of a paged cache ------------------------------------------------------------

// TMA box rows for a page size: the largest power of two that divides it, at most 64, so that a box
// never crosses a page and 64-token tiles are whole boxes.
__host__ __device__ inline int tma_box_rows(int page_size) {
  const int low = page_size & -page_size;
  return low < 64 ? low : 64;
}

// Where a TMA box is a whole 64-token tile (64 divides the page size): the tile's page (every lane reads the same
// block-table entry) and its first token inside the page, made warp-uniform by a redux, whose result ptxas keeps in
// a uniform register. A copy whose operands live in per-lane registers is issued inside a loop over the lanes'
// distinct values; with these it is issued as it stands (a half's boxes: ~800 -> ~350 cycles; PERF.md,
// twenty-eighth session).
struct TilePage {
  int page, tok;
};
__device__ __forceinline__ TilePage whole_tile_page(const int* bt_row, int t0, int page_size) {
  return {__reduce_max_sync(0xffffffffu, bt_row[t0 / page_size]), __reduce_max_sync(0xffffffffu, t0 % page_size)};
}

// cuTensorMapEncodeTiled from the driver, found once through the runtime (no libcuda link); null if absent.
inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess)
      f = nullptr;
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

// The map of one paged cache array [num_pages, page_size, width] of elem_bytes-byte values (element strides,
// last dim contiguous) as dims {width, page_size, num_pages}: a box is box_cols x tma_box_rows(page_size)
// x 1 page, landing in shared memory as `row_bytes`-byte swizzled rows (128, 64 or 32: the Panel atoms), or
// dense and unswizzled when row_bytes is 0 (fp8_ds_mla's per-token scales).
inline int encode_paged_map(CUtensorMap* map, uint64_t base, int width, int page_size, int num_pages,
                            int64_t stride_tok, int64_t stride_page, int box_cols, int row_bytes, int elem_bytes = 2) {
  const PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
  if (!encode) return static_cast<int>(cudaErrorNotSupported);
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(width), static_cast<cuuint64_t>(page_size),
                              static_cast<cuuint64_t>(num_pages)};
  // strides of dims 1 and 2 in bytes; a page of one token has no token stride of its own: give TMA the row
  const cuuint64_t strides[2] = {static_cast<cuuint64_t>(elem_bytes * (page_size > 1 ? stride_tok : width)),
                                 static_cast<cuuint64_t>(elem_bytes * stride_page)};
  const cuuint32_t box[3] = {static_cast<cuuint32_t>(box_cols), static_cast<cuuint32_t>(tma_box_rows(page_size)), 1u};
  const cuuint32_t elem_strides[3] = {1u, 1u, 1u};
  const CUtensorMapSwizzle swizzle = row_bytes == 128  ? CU_TENSOR_MAP_SWIZZLE_128B
                                     : row_bytes == 64 ? CU_TENSOR_MAP_SWIZZLE_64B
                                     : row_bytes == 32 ? CU_TENSOR_MAP_SWIZZLE_32B
                                                       : CU_TENSOR_MAP_SWIZZLE_NONE;
  const CUtensorMapDataType type = elem_bytes == 1 ? CU_TENSOR_MAP_DATA_TYPE_UINT8 : CU_TENSOR_MAP_DATA_TYPE_UINT16;
  const CUresult r = encode(map, type, 3, reinterpret_cast<void*>(base), dims, strides, box, elem_strides,
                            CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? 0 : static_cast<int>(cudaErrorInvalidValue);
}

// The argument of a decode kernel that loads the cache by TMA: the params and the cache's two tensor maps.
struct TmaParams {
  DecodeParams p;
  CUtensorMap ckv, kpe, scale;  // scale: the bytes after each token's ckv (fp8_ds_mla's scales), where asked
};

// How a kernel's boxes see the cache (encode_paged_map's arguments per array): the array's width in elements, a
// box's columns, the shared-memory row bytes (a Panel's swizzle; 0: dense), and the element size of both;
// scale_bytes > 0 also maps that many bytes after each token's ckv width, whole rows landing dense.
struct CacheMapShape {
  int ckv_width, ckv_box_cols, ckv_row_bytes, kpe_width, kpe_box_cols, kpe_row_bytes, elem_bytes, scale_bytes;
};

// Encodes the cache's maps into tp. They depend only on the cache's pointers, strides and page counts, which an
// engine passes unchanged call after call: the thread's last maps (one memo per Tag, a kernel's layout type) are
// reused while those stay the same (a small call's host time, issue 12).
template <class Tag>
inline int cache_maps(const DecodeParams& p, const CacheMapShape& shape, TmaParams& tp) {
  struct Maps {
    int64_t key[8];
    CUtensorMap ckv, kpe, scale;
  };
  thread_local Maps last = {};  // a zero key: nothing encoded yet (a real key's page size is never 0)
  const int64_t key[8] = {static_cast<int64_t>(p.ckv), static_cast<int64_t>(p.kpe), p.page_size, p.num_pages,
                          p.ckv_stride_tok, p.ckv_stride_page, p.kpe_stride_tok, p.kpe_stride_page};
  if (std::memcmp(key, last.key, sizeof(key)) != 0) {
    int err = encode_paged_map(&last.ckv, p.ckv, shape.ckv_width, p.page_size, p.num_pages, p.ckv_stride_tok,
                               p.ckv_stride_page, shape.ckv_box_cols, shape.ckv_row_bytes, shape.elem_bytes);
    if (!err)
      err = encode_paged_map(&last.kpe, p.kpe, shape.kpe_width, p.page_size, p.num_pages, p.kpe_stride_tok,
                             p.kpe_stride_page, shape.kpe_box_cols, shape.kpe_row_bytes, shape.elem_bytes);
    if (!err && shape.scale_bytes > 0)
      err = encode_paged_map(&last.scale, p.ckv + static_cast<uint64_t>(shape.ckv_width) * shape.elem_bytes,
                             shape.scale_bytes, p.page_size, p.num_pages, p.ckv_stride_tok * shape.elem_bytes,
                             p.ckv_stride_page * shape.elem_bytes, shape.scale_bytes, 0, 1);
    if (err) {
      std::memset(last.key, 0, sizeof(last.key));
      return err;
    }
    std::memcpy(last.key, key, sizeof(key));
  }
  tp.p = p;
  tp.ckv = last.ckv;
  tp.kpe = last.kpe;
  tp.scale = last.scale;
  return 0;
}

}  // namespace sm90
}  // namespace mla_gen
