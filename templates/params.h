// mla-gen: the one parameter block shared by the launcher (plain C++) and the kernels.
// Pointers travel as uint64 so the launcher needs neither CUDA nor torch headers.
#pragma once
#include <cstdint>

namespace mla_gen {

struct DecodeParams {
  // Queries q_nope [B, s_q, H, C] and q_pe [B, s_q, H, R]; element strides, last dim contiguous.
  uint64_t q_nope = 0;
  int64_t q_nope_stride_b = 0, q_nope_stride_s = 0, q_nope_stride_h = 0;
  uint64_t q_pe = 0;
  int64_t q_pe_stride_b = 0, q_pe_stride_s = 0, q_pe_stride_h = 0;
  // Paged latent cache ckv [num_pages, page_size, C] and kpe [num_pages, page_size, R].
  uint64_t ckv = 0;
  int64_t ckv_stride_page = 0, ckv_stride_tok = 0;
  uint64_t kpe = 0;
  int64_t kpe_stride_page = 0, kpe_stride_tok = 0;
  // fp8 caches (the variant's kKVFormat, common.cuh): ckv and kpe then point at bytes of the one cache
  // and their strides count bytes, except kpe of fp8_ds_mla (bf16 rope values: elements). kv_scale: the
  // fp8_e4m3 cache's scale, float32 [1] on the device (value = e4m3 * scale); fp8_ds_mla's scales are
  // inside each token (bytes 512 .. 527 after ckv).
  uint64_t kv_scale = 0;
  // block_table [B, max_pages] int32 (row stride), cache_seqlens [B] int32.
  uint64_t block_table = 0;
  int64_t block_table_stride = 0;
  uint64_t seqlens = 0;
  // Output [B, s_q, H, C] in the query dtype; lse [B, s_q, H] fp32 natural log (0 = not wanted).
  uint64_t out = 0;
  int64_t out_stride_b = 0, out_stride_s = 0, out_stride_h = 0;
  uint64_t lse = 0;
  int64_t lse_stride_b = 0, lse_stride_s = 0;
  // Split-kv workspace, owned by the runtime's plan:
  //   partial_o [max_partials, s_q*H, C] fp32, partial_lse [max_partials, s_q*H] fp32,
  //   part_info [num_parts, row_blocks, 12] int32: each decode CTA's plan of its part (common.cuh kPartInts),
  //   req_info [B, 4] int32 = first_part, num_splits (0: invalid length), partial_offset, cost_begin,
  //   status [1] int32: bit 0 set when some length was invalid (that request's output is NaN),
  //   tickets [B, row_blocks] int32: parts of a split request that have written their partial (zero between
  //   calls: the part that completes the count resets it and, when the request has at most kInlineMergeSplits
  //   parts, merges the request's rows, common.cuh), merge_list [1 + B] int32: the number of requests with more
  //   parts, then those requests (the merge kernel's work). The decode kernel writes them all (plan_part).
  uint64_t partial_o = 0;
  uint64_t partial_lse = 0;
  uint64_t part_info = 0;
  uint64_t req_info = 0;
  uint64_t status = 0;
  uint64_t tickets = 0;
  uint64_t merge_list = 0;
  int32_t batch = 0, s_q = 0, page_size = 0, num_pages = 0, max_pages = 0;
  // num_parts: CTA columns of the grid; the plan uses min(num_parts, ceil(total / min_part_cost))
  // of them so short batches are not cut into slivers; fixed_cost: blocks charged per request.
  int32_t num_parts = 0, max_partials = 0, fixed_cost = 0, min_part_cost = 1;
  int32_t row_blocks = 0;  // CTAs along the packed query rows (gridDim.x of the decode launch)
  // 1: the decode kernel plans the work list from the lengths; 0: it reuses its last call's (same lengths)
  int32_t replan = 1;
  float sm_scale = 0.f;
};

}  // namespace mla_gen

// The C entry points of a variant's shared object (kernel.cu), found by the launcher with dlsym: a
// plain C interface, so a variant depends on no Python version. Launches return a cudaError_t value
// (0 = success); mla_gen_params_hash names the params.h the variant was built from, so a launcher
// never hands a variant a DecodeParams of another layout.
#define MLA_GEN_EXPORT extern "C" __attribute__((visibility("default")))
MLA_GEN_EXPORT const char* mla_gen_variant_id();
MLA_GEN_EXPORT const char* mla_gen_params_hash();
MLA_GEN_EXPORT int mla_gen_decode(const mla_gen::DecodeParams* params, uint64_t stream);
MLA_GEN_EXPORT int mla_gen_merge(const mla_gen::DecodeParams* params, uint64_t stream);
MLA_GEN_EXPORT int mla_gen_max_active_ctas(int* num);  // decode CTAs resident per SM on the current device
MLA_GEN_EXPORT const char* mla_gen_error_string(int code);
