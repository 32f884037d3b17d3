// How fast this GPU turns e4m3 pairs into f16x2: the cvt instruction (SASS F2FP.F16.E4M3.UNPACK_B) against the
// bit path (PRMT, LOP3, SHF: the value times 2^-8), in results per clock per SM at full occupancy. The fp8 kernels
// size their converting threads by it (PERF.md, twelfth session).
//   nvcc -arch=sm_90a -O3 -o /tmp/cvt_rate scripts/cvt_rate.cu && /tmp/cvt_rate
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>

__device__ __forceinline__ uint32_t cvt_pair(uint16_t v) {
  uint32_t r;
  asm volatile("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(r) : "h"(v));
  return r;
}
// the two bytes `sel` picks, each in the high byte of a 16-bit half: s.eeee.mmm -> fp16 s.0eeee.mmm0000000
__device__ __forceinline__ uint32_t bits_pair(uint32_t v, uint32_t sel) {
  const uint32_t t = __byte_perm(v, 0u, sel);
  return (t & 0x80008000u) | ((t & 0x7F007F00u) >> 1);
}

template <bool kCvt>
__global__ void convert_loop(const uint32_t* in, uint32_t* out, int iters) {
  const uint32_t v[4] = {in[threadIdx.x], in[threadIdx.x + 1], in[threadIdx.x + 2], in[threadIdx.x + 3]};
  uint32_t acc = 0;
  for (int i = 0; i < iters; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint32_t w = v[j] + i;  // four independent chains per thread
      acc ^= kCvt ? cvt_pair(w & 0xFFFFu) ^ cvt_pair(w >> 16) : bits_pair(w, 0x1404) ^ bits_pair(w, 0x3424);
    }
  }
  if (acc == 0x12345678u) out[0] = acc;  // keeps the loop
}

int main() {
  uint32_t *in, *out;
  cudaMalloc(&in, 4096);
  cudaMalloc(&out, 64);
  cudaMemset(in, 0x3c, 4096);
  int sms, khz;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, 0);
  const int iters = 4096, threads = 256, blocks = sms * 8;
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  for (int cvt = 1; cvt >= 0; --cvt) {
    float ms = 0.f;
    for (int rep = 0; rep < 2; ++rep) {  // the first run warms up
      cudaEventRecord(start);
      if (cvt) convert_loop<true><<<blocks, threads>>>(in, out, iters);
      else convert_loop<false><<<blocks, threads>>>(in, out, iters);
      cudaEventRecord(stop);
      cudaEventSynchronize(stop);
      cudaEventElapsedTime(&ms, start, stop);
    }
    const double pairs = double(blocks) * threads * iters * 8;
    printf("%-24s %.3f ms, %.1f f16x2 results per clock per SM (at the rated %d MHz)\n",
           cvt ? "cvt.rn.f16x2.e4m3x2" : "bits (prmt, lop3, shf)", ms, pairs / (ms * 1e-3) / (khz * 1e3) / sms,
           khz / 1000);
  }
  return cudaGetLastError() == cudaSuccess ? 0 : 1;
}
