// KV-cache append: one warp per (entry, row, head) vector. New key rows are rotated (if rotary is
// on) and stored into their cache slot together with the value rows; query rows are rotated into
// a separate buffer. Rows past the cache's capacity, in a page outside the pool or at a cache batch
// index outside the cache are dropped, so bad cache_seqlens / block_table / cache_batch_idx values
// never touch memory out of bounds nor another sequence's rows; each is reported
// (common/index_guard.h) and raised by the dispatcher's next call.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/index_guard.h"
#include "common/kv_source.h"
#include "params/kvcache_append.h"

namespace flash {
namespace {

constexpr int kWarpsPerBlock = 4;

template <typename T> __device__ float to_float(T x);
template <> __device__ float to_float(__half x) { return __half2float(x); }
template <> __device__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ T from_float(float x);
template <> __device__ __half from_float(float x) { return __float2half_rn(x); }
template <> __device__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }

// dst[0, d) = src[0, d) with the first rotary_dim features rotated to position `pos` (fp32 math,
// one rounding). Lanes stride over features; each reads its pair partner from src.
template <typename T>
__device__ void rotate_row(const AppendKvParams& p, const T* src, T* dst, int pos, int lane) {
  const T* cos_row = static_cast<const T*>(p.cos_ptr) + int64_t(pos) * (p.rotary_dim / 2);
  const T* sin_row = static_cast<const T*>(p.sin_ptr) + int64_t(pos) * (p.rotary_dim / 2);
  const int half = p.rotary_dim / 2;
  for (int t = lane; t < p.d; t += 32) {
    if (t >= p.rotary_dim) {
      dst[t] = src[t];
      continue;
    }
    int j, first, second;
    bool is_first;
    if (p.interleaved) {
      j = t / 2, first = t & ~1, second = first + 1, is_first = (t & 1) == 0;
    } else {
      j = t < half ? t : t - half, first = j, second = j + half, is_first = t < half;
    }
    const float c = to_float(cos_row[j]), s = to_float(sin_row[j]);
    const float x0 = to_float(src[first]), x1 = to_float(src[second]);
    dst[t] = from_float<T>(is_first ? x0 * c - x1 * s : x0 * s + x1 * c);
  }
}

template <typename T>
__device__ void copy_row(const T* src, T* dst, int d, int lane) {
  for (int t = lane; t < d; t += 32) dst[t] = src[t];
}

template <typename T>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) kvcache_append_kernel(const __grid_constant__ AppendKvParams p) {
  const int lane = threadIdx.x % 32;
  const int item = blockIdx.x * kWarpsPerBlock + threadIdx.x / 32;
  const bool rotary = p.cos_ptr != nullptr;
  const int k_items = p.b * p.seqlen_new * p.h_k;

  if (blockIdx.x == 0) {
    for (int bi = threadIdx.x; bi < p.b; bi += blockDim.x) {
      // Reports cache_seqlens whose new rows would not fit; those rows are dropped below.
      p.seqused_out[bi] = guard_index(p.cache_seqlens[bi] + p.seqlen_new, p.seqlen_new, p.capacity, p.index_errors,
                                      kSeqlensOutOfRange);
    }
  }

  if (item < k_items) {
    const int hk = item % p.h_k;
    const int t = item / p.h_k % p.seqlen_new;
    const int bi = item / p.h_k / p.seqlen_new;
    const int row = p.cache_seqlens[bi] + t;
    if (row < 0 || row >= p.capacity) return;
    int64_t k_dst, v_dst;
    // A bad page or cache batch index drops the row (reported): clamped, it would overwrite another
    // sequence's cache.
    if (p.block_table != nullptr) {
      const PagedRow at = paged_row(p.block_table + bi * p.block_table_batch_stride, row, p.page_block_size);
      const int page = guard_page(at.entry, p.num_pages, p.index_errors);
      if (page != at.entry) return;
      k_dst = page * p.kcache_batch_stride + at.in_page * p.kcache_row_stride;
      v_dst = page * p.vcache_batch_stride + at.in_page * p.vcache_row_stride;
    } else {
      const int entry = p.cache_batch_idx == nullptr ? bi : p.cache_batch_idx[bi];
      const int cb = guard_index(entry, 0, p.num_cache_batches - 1, p.index_errors, kCacheBatchIdxOutOfRange);
      if (cb != entry) return;
      k_dst = cb * p.kcache_batch_stride + int64_t(row) * p.kcache_row_stride;
      v_dst = cb * p.vcache_batch_stride + int64_t(row) * p.vcache_row_stride;
    }
    k_dst += hk * p.kcache_head_stride;
    v_dst += hk * p.vcache_head_stride;
    const T* ksrc = static_cast<const T*>(p.knew_ptr) + bi * p.knew_batch_stride + t * p.knew_row_stride +
                    hk * p.knew_head_stride;
    const T* vsrc = static_cast<const T*>(p.vnew_ptr) + bi * p.vnew_batch_stride + t * p.vnew_row_stride +
                    hk * p.vnew_head_stride;
    T* kdst = static_cast<T*>(p.kcache_ptr) + k_dst;
    if (rotary) {
      rotate_row(p, ksrc, kdst, min(row, p.seqlen_ro - 1), lane);
    } else {
      copy_row(ksrc, kdst, p.d, lane);
    }
    copy_row(vsrc, static_cast<T*>(p.vcache_ptr) + v_dst, p.d, lane);
    return;
  }

  const int q_item = item - k_items;
  if (!rotary || q_item >= p.b * p.seqlen_q * p.h) return;
  const int hq = q_item % p.h;
  const int t = q_item / p.h % p.seqlen_q;
  const int bi = q_item / p.h / p.seqlen_q;
  const int pos = max(p.cache_seqlens[bi], 0) + (p.q_positions_per_row ? t : 0);
  const T* src = static_cast<const T*>(p.q_ptr) + bi * p.q_batch_stride + t * p.q_row_stride + hq * p.q_head_stride;
  T* dst = static_cast<T*>(p.qrot_ptr) + ((int64_t(bi) * p.seqlen_q + t) * p.h + hq) * p.d;
  rotate_row(p, src, dst, min(pos, p.seqlen_ro - 1), lane);
}

template <typename T>
void launch(const AppendKvParams& p, cudaStream_t stream) {
  const int items = p.b * p.seqlen_new * p.h_k + (p.cos_ptr != nullptr ? p.b * p.seqlen_q * p.h : 0);
  const int blocks = items > 0 ? (items + kWarpsPerBlock - 1) / kWarpsPerBlock : 1;
  kvcache_append_kernel<T><<<blocks, kWarpsPerBlock * 32, 0, stream>>>(p);
}

}  // namespace

void run_kvcache_append(const AppendKvParams& params, bool is_bf16, cudaStream_t stream) {
  if (is_bf16) {
    launch<__nv_bfloat16>(params, stream);
  } else {
    launch<__half>(params, stream);
  }
}

}  // namespace flash
