// Parameters and entry point of the KV-cache append kernel (flash_attn_with_kvcache): writes the
// new keys / values into the cache (contiguous or paged) before attention, applying rotary
// embedding to the new keys, and writes a rotated copy of q. Plain C++: the dispatcher includes
// this without CUDA kernels or CUTLASS.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace flash {

struct AppendKvParams {
  // New keys / values: (b, seqlen_new, h_k, d), strides in elements.
  const void* knew_ptr;
  const void* vnew_ptr;
  int64_t knew_batch_stride, knew_row_stride, knew_head_stride;
  int64_t vnew_batch_stride, vnew_row_stride, vnew_head_stride;

  // The cache: (b_cache, capacity, h_k, d), or pages (num_pages, page_block_size, h_k, d) with a
  // block table; for pages the batch strides are the page strides.
  void* kcache_ptr;
  void* vcache_ptr;
  int64_t kcache_batch_stride, kcache_row_stride, kcache_head_stride;
  int64_t vcache_batch_stride, vcache_row_stride, vcache_head_stride;
  const int* block_table;  // nullable
  int64_t block_table_batch_stride;
  int page_block_size;
  int num_pages;
  int capacity;  // rows per sequence: cache seqlen, or max_blocks_per_seq * page_block_size

  const int* cache_seqlens;    // end of each entry's valid cache: new row t goes to cache_seqlens[b] + t
  const int* cache_batch_idx;  // nullable: cache batch row of each entry, clamped to [0, num_cache_batches)
  int num_cache_batches;
  unsigned* index_errors;      // nullable: reports of clamped index values (params/index_errors.h)
  int b, seqlen_new, h_k, d;
  int* seqused_out;            // cache_seqlens[b] + seqlen_new, clamped to capacity

  // Rotary embedding (cos_ptr nullable): cos/sin (seqlen_ro, rotary_dim / 2), row-contiguous.
  const void* cos_ptr;
  const void* sin_ptr;
  int rotary_dim, seqlen_ro;
  bool interleaved;  // pairs (2j, 2j+1), else (j, j + rotary_dim / 2)

  // q rotated into qrot (contiguous (b, seqlen_q, h, d)) when rotary is on. Query row t sits at
  // position cache_seqlens[b] + t when q_positions_per_row, else every row at cache_seqlens[b].
  const void* q_ptr;
  int64_t q_batch_stride, q_row_stride, q_head_stride;
  void* qrot_ptr;
  int seqlen_q, h;
  bool q_positions_per_row;
};

void run_kvcache_append(const AppendKvParams& params, bool is_bf16, cudaStream_t stream);

}  // namespace flash
