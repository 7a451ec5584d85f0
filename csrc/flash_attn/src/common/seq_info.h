// Where one batch entry's queries and keys start, and how many there are, for padded, varlen,
// seqused_k, left-padded and kv-cache layouts.
#pragma once

#include "common/index_guard.h"
#include "params/fwd_params.h"

namespace flash {

struct SeqInfo {
  int q_start;     // first query row of this entry in a varlen q (0 when q is batch-strided)
  int seqlen_q;
  int seqlen_k;    // keys this entry attends (after left padding)
  int64_t q_offset;  // element offsets of row 0, head 0 of this entry
  int64_t o_offset;
  int64_t k_offset;  // unused with a block table
  int64_t v_offset;
  int k_row0;      // first key row (left padding) within the entry / its pages

  // seqused_k_value: p.seqused_k[bidb] where the caller has loaded it already, else -1 (a bad
  // value loaded early is loaded again here and reported as any other).
  __device__ SeqInfo(const FwdParams& p, int bidb, int seqused_k_value = -1) {
    if (p.cu_seqlens_q != nullptr) {
      q_start = p.cu_seqlens_q[bidb];
      seqlen_q = p.cu_seqlens_q[bidb + 1] - q_start;
      q_offset = int64_t(q_start) * p.q_row_stride;
      o_offset = int64_t(q_start) * p.o_row_stride;
    } else {
      q_start = 0;
      seqlen_q = p.seqlen_q;
      q_offset = int64_t(bidb) * p.q_batch_stride;
      o_offset = int64_t(bidb) * p.o_batch_stride;
    }
    const int kv_batch = p.cache_batch_idx == nullptr
                             ? bidb
                             : guard_index(p.cache_batch_idx[bidb], 0, p.num_cache_batches - 1, p.index_errors,
                                           kCacheBatchIdxOutOfRange);
    if (p.cu_seqlens_k != nullptr) {
      const int k_start = p.cu_seqlens_k[bidb];
      seqlen_k = p.seqused_k != nullptr ? p.seqused_k[bidb] : p.cu_seqlens_k[bidb + 1] - k_start;
      // Paged K/V: the block table holds p.seqlen_k rows per sequence; never look past it.
      if (p.block_table != nullptr) seqlen_k = min(seqlen_k, p.seqlen_k);
      k_offset = int64_t(k_start) * p.k_row_stride;
      v_offset = int64_t(k_start) * p.v_row_stride;
    } else {
      // seqused_k past the padded length would read other entries' (or no) rows.
      seqlen_k = p.seqused_k != nullptr
                     ? guard_index(seqused_k_value >= 0 ? seqused_k_value : p.seqused_k[bidb], 0, p.seqlen_k,
                                   p.index_errors, kSeqlensOutOfRange)
                     : p.seqlen_k;
      k_offset = int64_t(kv_batch) * p.k_batch_stride;
      v_offset = int64_t(kv_batch) * p.v_batch_stride;
    }
    k_row0 = p.leftpad_k != nullptr ? guard_index(p.leftpad_k[bidb], 0, seqlen_k, p.index_errors, kLeftpadOutOfRange)
                                    : 0;
    seqlen_k -= k_row0;
  }

  // Row index of query m of this entry among all partial-result rows (split-KV buffers).
  __device__ int q_row(const FwdParams& p, int bidb, int m) const {
    return (p.cu_seqlens_q != nullptr ? q_start : bidb * p.seqlen_q) + m;
  }
};

}  // namespace flash
