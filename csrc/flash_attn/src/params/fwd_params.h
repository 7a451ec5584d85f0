// Parameters of one forward attention call, packed by flash_api.cpp and read by the kernels.
// Plain C++ on purpose: the dispatcher includes this without CUDA/CUTLASS headers.
#pragma once

#include <cstdint>

namespace flash {

struct FwdParams {
  // Tensors. Strides are in elements; the last dimension (head dim) is contiguous.
  const void* q_ptr;
  const void* k_ptr;
  const void* v_ptr;
  void* o_ptr;
  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t v_batch_stride, v_row_stride, v_head_stride;
  int64_t o_batch_stride, o_row_stride, o_head_stride;

  // softmax_lse (fp32). Element (b, h, m) lives at
  //   b * lse_batch_stride + h * lse_head_stride + (q_start(b) + m) * lse_row_stride
  // where q_start(b) is cu_seqlens_q[b] for varlen queries and 0 otherwise.
  float* softmax_lse_ptr;
  int64_t lse_batch_stride, lse_head_stride, lse_row_stride;

  // Several queries of G query heads of a GQA group packed into one tile's rows (the plan's
  // pack_groups, the decode and split kernels only; common/query_rows.h): row r of head bidh is
  // query r / G of query head bidh * G + r % G, at (r / G) * row_stride + (r % G) * group_stride in
  // q, out and softmax_lse, with G = pack_groups (the whole group or a part of it; the kv head is
  // bidh / h_h_k_ratio as ever). 0: rows are the head's queries.
  int pack_groups;
  int64_t q_group_stride, o_group_stride, lse_group_stride;

  // Shapes. seqlen_q / seqlen_k are the (max) padded lengths; d is the real head dim,
  // at most the kernel's compile-time head dim.
  int b, h, h_k, h_h_k_ratio;
  int seqlen_q, seqlen_k;
  int d;

  // Variable lengths (all int32, nullable). q and k sides are independent: q may be
  // batch-strided while k is varlen (the GQA seqlen/ngroups swap does this).
  const int* cu_seqlens_q;
  const int* cu_seqlens_k;
  int total_k_rows;  // rows of a packed (varlen) k / v: the Hopper kernel's TMA extent
  const int* seqused_k;   // number of keys used per batch entry
  const int* leftpad_k;   // keys to skip at the start of each batch entry
  const int* cache_batch_idx;  // k/v batch index per q batch entry (kv cache), clamped to [0, num_cache_batches)
  int num_cache_batches;

  // Paged KV: k/v are (num_blocks, page_block_size, h_k, d) and row j of batch b lives in
  // page block_table[b * block_table_batch_stride + j / page_block_size].
  const int* block_table;
  int64_t block_table_batch_stride;
  int page_block_size;
  int num_pages;  // page indices are clamped to [0, num_pages): a bad table never reads out of bounds

  // Error words of bad index values (params/index_errors.h), kNumIndexErrors of them, in mapped
  // host memory; nullable.
  unsigned* index_errors;

  // Scores: s = q.k; with softcap, s = tanh(s * softcap_in) and the softmax multiplier is softcap.
  // p = exp2(s * scale_softmax_log2 - max), lse = max * scale_softmax + log(sum).
  float scale_softmax;
  float scale_softmax_log2;
  float softcap_in;  // 0 when softcap is off
  // ALiBi: bias -slope * |i + sk - sq - j| added to the scaled score (fp32 slopes, nullable).
  const float* alibi_slopes_ptr;
  int64_t alibi_slopes_batch_stride;

  // Masking: key j is visible to query i iff
  //   i + sk - sq - window_left <= j <= i + sk - sq + window_right   (a negative window is unbounded).
  // Causal is window_right == 0 with window_left unbounded.
  int window_left, window_right;

  // Split-KV. With split_kernel the forward kernel (split tile; on the Hopper forward its split
  // instantiation) writes fp32 partials of its num_splits key ranges (num_splits may be 1) here,
  // merged by the combine kernel. Partial rows are indexed by r = q_start(b) + m, or
  // b * seqlen_q + m without cu_seqlens_q; there are total_q_rows of them per (split, head).
  bool split_kernel;
  bool decode_kernel;  // with split_kernel: the 16-row decode kernel (flash_decode_kernel.h) writes the partials
  int num_splits;
  float* oaccum_ptr;       // [num_splits][h][total_q_rows][kHeadDim]
  float* lseaccum_ptr;     // [num_splits][h][total_q_rows]
  int total_q_rows;
  int device;      // the CUDA device the call runs on (per-device launch state without a cudaGetDevice)
  int num_sms;     // its multiprocessors (persistent grids)
  bool allow_pdl;  // device supports programmatic dependent launch (sm_90+): overlap the combine's launch
  // Decode kernel, sm_90, 2 <= num_splits <= kMaxClusterSplits: the splits of a query tile run as one
  // thread-block cluster and merge through distributed shared memory (no partials, no combine).
  bool cluster_merge;
  // Decode kernel, one split, sm_90: blocks launch in clusters of two (consecutive heads), so
  // every busy TPC holds two blocks and a one-wave grid's blocks stream at one rate.
  bool decode_pair_clusters;

  // Dropout (prefill forward and backward only; the dispatcher never plans split or decode
  // kernels with it). Element kept iff its 8-bit Philox value < dropout_keep_threshold, i.e.
  // round((1 - p) * 256) in [1, 256] (common/dropout.h); kept probabilities are scaled by
  // dropout_scale = 1 / (1 - p), upstream's scale. Only the dropout instantiations read these fields.
  uint32_t dropout_keep_threshold;
  float dropout_scale;
  // Philox seed and offset (common/dropout.h): seed = *philox_seed_ptr if set, else philox_seed;
  // offset = (*philox_offset_ptr if set, else 0) + philox_offset. Pointers while a CUDA graph is
  // captured (PyTorch's generator state in device memory, advanced per replay) and in the
  // backward (the forward's rng_state); plain values otherwise.
  uint64_t philox_seed, philox_offset;
  const int64_t* philox_seed_ptr;
  const int64_t* philox_offset_ptr;
  // Forward: the (seed, offset) it used, written by one thread for the backward; nullable.
  int64_t* rng_state_ptr;
  // Forward with return_softmax: P = exp(s - running max) per visited element, dropped ones
  // negated, in the input dtype at b * s_dmask_batch_stride + h * s_dmask_head_stride +
  // i * s_dmask_row_stride + j (i, j within the sequence); nullable.
  void* s_dmask_ptr;
  int64_t s_dmask_batch_stride, s_dmask_head_stride, s_dmask_row_stride;
};

// Softcap or ALiBi: the launch picks the kernels' score-modifier instantiations.
inline bool has_score_mods(const FwdParams& p) { return p.softcap_in > 0.f || p.alibi_slopes_ptr != nullptr; }

}  // namespace flash
