// Merges split-KV partials: for each (head, query row), out = sum_s exp(lse_s - lse) * o_s with
// lse = log(sum_s exp(lse_s)). One warp per row; each lane owns kHeadDim / 32 columns.
#pragma once

#include <cmath>

#include <cute/tensor.hpp>

#include "common/query_rows.h"
#include "params/fwd_params.h"
#include "plan/tile_sizes.h"

namespace flash {

constexpr int kCombineWarps = 4;

__device__ __forceinline__ float warp_allreduce_max(float x) {
  for (int offset = 16; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, offset));
  return x;
}

__device__ __forceinline__ float warp_allreduce_sum(float x) {
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffff, x, offset);
  return x;
}

// Merges the splits of one (head, partial row r); the partials are read once, through L2 (ld.cg).
template <int kHeadDim, typename Element>
__device__ void combine_row(const FwdParams& p, int bidh, int r, int lane) {
  constexpr int kSplitsPerLane = kMaxSplits / 32;
  constexpr int kColsPerLane = kHeadDim / 32;
  constexpr int kVec = kColsPerLane % 4 == 0 ? 4 : kColsPerLane % 2 == 0 ? 2 : 1;
  using Vec = cute::conditional_t<kVec == 4, float4, cute::conditional_t<kVec == 2, float2, float>>;

  const int64_t split_stride = int64_t(p.h) * p.total_q_rows;
  const int64_t row = int64_t(bidh) * p.total_q_rows + r;

  // Lane l holds the partial lse of splits l, l + 32, ...
  float lse_s[kSplitsPerLane];
  float lse_max = -INFINITY;
  CUTE_UNROLL
  for (int i = 0; i < kSplitsPerLane; ++i) {
    const int s = lane + 32 * i;
    lse_s[i] = s < p.num_splits ? __ldcg(p.lseaccum_ptr + s * split_stride + row) : -INFINITY;
    lse_max = fmaxf(lse_max, lse_s[i]);
  }
  lse_max = warp_allreduce_max(lse_max);
  float sum = 0.f;
  CUTE_UNROLL
  for (int i = 0; i < kSplitsPerLane; ++i) sum += lse_s[i] == -INFINITY ? 0.f : __expf(lse_s[i] - lse_max);
  sum = warp_allreduce_sum(sum);
  const bool empty = sum == 0.f || sum != sum;
  const float lse = empty ? INFINITY : lse_max + __logf(sum);
  CUTE_UNROLL
  for (int i = 0; i < kSplitsPerLane; ++i) lse_s[i] = empty || lse_s[i] == -INFINITY ? 0.f : __expf(lse_s[i] - lse);

  float acc[kColsPerLane];
  CUTE_UNROLL
  for (int j = 0; j < kColsPerLane; ++j) acc[j] = 0.f;
  CUTE_UNROLL
  for (int i = 0; i < kSplitsPerLane; ++i) {
    if (32 * i >= p.num_splits) break;
    for (int l = 0; l < 32 && 32 * i + l < p.num_splits; ++l) {
      const float w = __shfl_sync(0xffffffff, lse_s[i], l);
      if (w == 0.f) continue;  // uniform across the warp
      const float* src = p.oaccum_ptr + ((32 * i + l) * split_stride + row) * kHeadDim + lane * kColsPerLane;
      CUTE_UNROLL
      for (int j = 0; j < kColsPerLane; j += kVec) {
        const Vec v = __ldcg(reinterpret_cast<const Vec*>(src + j));
        const float* vf = reinterpret_cast<const float*>(&v);
        CUTE_UNROLL
        for (int t = 0; t < kVec; ++t) acc[j + t] = fmaf(w, vf[t], acc[j + t]);
      }
    }
  }

  int64_t o_off, lse_off;
  if (p.cu_seqlens_q != nullptr) {  // r is the varlen query row itself
    o_off = r * p.o_row_stride;
    lse_off = r * p.lse_row_stride;
  } else {
    const QueryRows rows(p);
    const int b = r / p.seqlen_q, m = r % p.seqlen_q;
    o_off = b * p.o_batch_stride + rows.offset(m, p.o_row_stride, p.o_group_stride);
    lse_off = b * p.lse_batch_stride + rows.offset(m, p.lse_row_stride, p.lse_group_stride);
  }
  if (lane == 0) p.softmax_lse_ptr[lse_off + bidh * p.lse_head_stride] = lse;
  Element* out = static_cast<Element*>(p.o_ptr) + o_off + bidh * p.o_head_stride + lane * kColsPerLane;
  CUTE_UNROLL
  for (int j = 0; j < kColsPerLane; ++j) {
    if (lane * kColsPerLane + j < p.d) out[j] = Element(acc[j]);
  }
}

template <int kHeadDim, typename Element>
__global__ void __launch_bounds__(kCombineWarps * 32) flash_fwd_combine_kernel(const __grid_constant__ FwdParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");  // launched early (programmatic dependent launch): wait for the partials
#endif
  const int warp = blockIdx.x * kCombineWarps + threadIdx.x / 32;
  if (warp >= p.h * p.total_q_rows) return;
  combine_row<kHeadDim, Element>(p, warp / p.total_q_rows, warp % p.total_q_rows, threadIdx.x % 32);
}

}  // namespace flash
