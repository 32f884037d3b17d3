// How fast one CTA per SM streams a paged cache ([pages][64 tokens][TOK bytes], pages in a random order) into a
// ring of shared-memory stages: by TMA boxes as narrow_e4m3.cuh loads fp8_e4m3 tiles (128-byte box rows, which
// straddle two L2 lines on every odd 576-byte token), by 1-D bulk copies of whole pages, by 64-byte boxes, or by
// boxes over the page seen as 128-byte rows. The consumers only wait and release, so each time is the stream's
// floor for that way of loading (PERF.md, twenty-sixth session).
//   nvcc -std=c++17 -O3 -arch=sm_90a -o stream_bench scripts/stream_bench.cu && ./stream_bench TOK [STAGES]
//   (from the repository root or anywhere: it includes templates/ptx.cuh by its relative path)
//   TOK 576: fp8_e4m3, 656: fp8_ds_mla, 1152: bf16; STAGES: ring depth (default 3)
#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "../templates/ptx.cuh"  // mbarriers, bulk and TMA copies, as the kernels issue them

using namespace mla_gen;

#define CK(x)                                                           \
  do {                                                                  \
    const cudaError_t e = (x);                                          \
    if (e != cudaSuccess) {                                             \
      std::printf("%s: %s\n", #x, cudaGetErrorString(e));               \
      std::exit(1);                                                     \
    }                                                                   \
  } while (0)

constexpr int kPage = 64, kMaxStages = 8, kConsumerWarps = 8;
enum Mode { kBoxes128, kBulkPage, kBulkQuarters, kBoxes64, kRowBoxes };

struct Maps {
  CUtensorMap a, b;
};
struct Launch {
  const uint8_t* cache;
  const int* table;  // the pages, CTA c takes pages [c per_cta, (c + 1) per_cta)
  unsigned* sink;
  int tok_bytes, per_cta, stage_bytes, stages, box_rows;
};

// warp 8 lane 0 loads the pages into the ring; warps 0-7 wait for each stage and release it
template <Mode kMode>
__global__ void __launch_bounds__(288, 1) stream(const __grid_constant__ Maps maps, const Launch a) {
  extern __shared__ __align__(1024) uint8_t smem[];
  __shared__ uint64_t bars[2 * kMaxStages];
  const uint32_t full = smem_u32(bars), empty = full + 8 * a.stages, ring = smem_u32(smem);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (threadIdx.x == 0) {
    for (int i = 0; i < a.stages; ++i) mbarrier_init(full + 8 * i, 1), mbarrier_init(empty + 8 * i, kConsumerWarps);
    fence_mbarrier_init();
  }
  __syncthreads();
  const int* pages = a.table + blockIdx.x * a.per_cta;
  const uint32_t page_bytes = kPage * a.tok_bytes;
  if (warp == kConsumerWarps) {
    if (lane != 0) return;
    const uint64_t pol = l2_evict_first_policy();
    for (int k = 0; k < a.per_cta; ++k) {
      const int st = k % a.stages, page = pages[k];
      mbarrier_wait(empty + 8 * st, ((k / a.stages) & 1) ^ 1);
      const uint32_t dst = ring + st * a.stage_bytes, bar = full + 8 * st;
      const uint8_t* src = a.cache + static_cast<size_t>(page) * page_bytes;
      if (kMode == kBoxes128) {  // 4 ckv boxes of 128 B x 64 rows, a 128-wide rope box of 64 bytes (zero fill)
        mbarrier_arrive_expect_tx(bar, 5 * 8192);
        for (int b = 0; b < 4; ++b) tma_load_3d(dst + b * 8192, &maps.a, bar, b * 128, 0, page, pol);
        tma_load_3d(dst + 32768, &maps.b, bar, 0, 0, page, pol);
      } else if (kMode == kBulkPage) {
        mbarrier_arrive_expect_tx(bar, page_bytes);
        bulk_load(dst, src, page_bytes, bar, pol);
      } else if (kMode == kBulkQuarters) {
        mbarrier_arrive_expect_tx(bar, page_bytes);
        for (int c = 0; c < 4; ++c)
          bulk_load(dst + c * page_bytes / 4, src + c * page_bytes / 4, page_bytes / 4, bar, pol);
      } else if (kMode == kBoxes64) {  // 64-byte boxes (no row crosses an L2 line)
        mbarrier_arrive_expect_tx(bar, page_bytes);
        for (int b = 0; b < a.tok_bytes / 64; ++b) tma_load_3d(dst + b * 4096, &maps.a, bar, b * 64, 0, page, pol);
      } else {  // the page as [rows][128 B]: every box row one L2 line
        mbarrier_arrive_expect_tx(bar, page_bytes);
        for (int r = 0; r < static_cast<int>(page_bytes / 128); r += a.box_rows)
          tma_load_3d(dst + r * 128, &maps.a, bar, 0, r, page, pol);
      }
    }
    return;
  }
  unsigned acc = 0;
  for (int k = 0; k < a.per_cta; ++k) {
    const int st = k % a.stages;
    mbarrier_wait(full + 8 * st, (k / a.stages) & 1);
    acc += *reinterpret_cast<const unsigned*>(smem + st * a.stage_bytes + threadIdx.x * 64);
    __syncwarp();
    if (lane == 0) mbarrier_arrive(empty + 8 * st);
  }
  if (acc == 0x12345678u) a.sink[threadIdx.x] = acc;  // (keeps the reads)
}

typedef CUresult (*EncodeFn)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                             const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                             CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// a 3-D byte map {d0, d1, pages} with strides {s1, page bytes} and box {b0, b1, 1}
void make_map(CUtensorMap* m, const void* base, uint64_t d0, uint64_t d1, uint64_t pages, uint64_t s1,
              uint64_t s2, uint32_t b0, uint32_t b1, CUtensorMapSwizzle swizzle) {
  static EncodeFn encode = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q;
    CK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q));
    return reinterpret_cast<EncodeFn>(f);
  }();
  const cuuint64_t dims[3] = {d0, d1, pages}, strides[2] = {s1, s2};
  const cuuint32_t boxes[3] = {b0, b1, 1}, elem[3] = {1, 1, 1};
  const CUresult r = encode(m, CU_TENSOR_MAP_DATA_TYPE_UINT8, 3, const_cast<void*>(base), dims, strides, boxes,
                            elem, CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) std::printf("tensor map encoding failed: %d\n", static_cast<int>(r)), std::exit(1);
}

int main(int argc, char** argv) {
  const int tok = argc > 1 ? std::atoi(argv[1]) : 576;
  const int stages = std::min(argc > 2 ? std::atoi(argv[2]) : 3, kMaxStages);
  int sms = 0;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const int pages = 8192, per_cta = pages / sms;
  const size_t bytes = static_cast<size_t>(pages) * kPage * tok;
  const double read = static_cast<double>(per_cta) * sms * kPage * tok;
  uint8_t *cache, *copy, *flush;
  CK(cudaMalloc(&cache, bytes));
  CK(cudaMemset(cache, 1, bytes));
  CK(cudaMalloc(&copy, bytes));
  CK(cudaMalloc(&flush, 256 << 20));
  std::vector<int> order(pages);
  for (int i = 0; i < pages; ++i) order[i] = i;
  std::shuffle(order.begin(), order.end(), std::mt19937(7));
  int* table;
  CK(cudaMalloc(&table, pages * sizeof(int)));
  CK(cudaMemcpy(table, order.data(), pages * sizeof(int), cudaMemcpyHostToDevice));
  unsigned* sink;
  CK(cudaMalloc(&sink, 4096));
  cudaEvent_t t0, t1;
  CK(cudaEventCreate(&t0));
  CK(cudaEventCreate(&t1));
  auto median_us = [&](auto&& fn) {  // L2 flushed before each, 5 warm-up calls, median of 20
    std::vector<float> v;
    for (int i = 0; i < 25; ++i) {
      CK(cudaMemsetAsync(flush, i, 256 << 20));
      CK(cudaEventRecord(t0));
      fn();
      CK(cudaEventRecord(t1));
      CK(cudaEventSynchronize(t1));
      float ms = 0.f;
      CK(cudaEventElapsedTime(&ms, t0, t1));
      if (i >= 5) v.push_back(ms);
    }
    std::sort(v.begin(), v.end());
    return v[v.size() / 2] * 1e3f;
  };
  const float copy_us = median_us([&] { CK(cudaMemcpyAsync(copy, cache, bytes, cudaMemcpyDeviceToDevice)); });
  const double copy_gbps = 2.0 * bytes / copy_us / 1e3;
  std::printf("token %d B, %d stages, %d SMs, %d pages a CTA, %.1f MB read; copy %.0f GB/s (read + written)\n", tok,
              stages, sms, per_cta, read / 1e6, copy_gbps);
  Launch a{cache, table, sink, tok, per_cta, (std::max(kPage * tok, 40960) + 1023) / 1024 * 1024, stages, 0};
  Maps maps{};
  auto run = [&](auto kernel, const char* name) {
    const int smem = a.stages * a.stage_bytes;
    CK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    const float us = median_us([&] { kernel<<<sms, 288, smem>>>(maps, a); });
    CK(cudaGetLastError());
    std::printf("%-42s %8.1f us %6.0f GB/s %.3f of copy\n", name, us, read / us / 1e3, read / us / 1e3 / copy_gbps);
  };
  if (tok == 576) {
    make_map(&maps.a, cache, 576, kPage, pages, 576, kPage * 576, 128, kPage, CU_TENSOR_MAP_SWIZZLE_128B);
    make_map(&maps.b, cache + 512, 64, kPage, pages, 576, kPage * 576, 128, kPage, CU_TENSOR_MAP_SWIZZLE_128B);
    run(stream<kBoxes128>, "TMA boxes 128 B x 64 rows (narrow_e4m3)");
  }
  run(stream<kBulkPage>, "1-D bulk copy of each page");
  run(stream<kBulkQuarters>, "1-D bulk copies, four a page");
  if (tok % 64 == 0) {
    make_map(&maps.a, cache, tok, kPage, pages, tok, kPage * tok, 64, kPage, CU_TENSOR_MAP_SWIZZLE_64B);
    run(stream<kBoxes64>, "TMA boxes 64 B x 64 rows");
  }
  const int rows = kPage * tok / 128;
  int boxes = (rows + 255) / 256;  // a box holds at most 256 rows
  while (rows % boxes) ++boxes;
  a.box_rows = rows / boxes;
  make_map(&maps.a, cache, 128, rows, pages, 128, kPage * tok, 128, a.box_rows, CU_TENSOR_MAP_SWIZZLE_128B);
  run(stream<kRowBoxes>, "TMA boxes of the page's 128-byte rows");
  return 0;
}
