// Per-row kernels of the backward. Preprocessing: D = rowsum(dO * O) per (query row, head) in
// fp32, the term every dS of that row subtracts (dS = P * (dP - D)), and, for the atomic dQ path,
// zeroing of the row's fp32 dQ accumulator so the dK/dV blocks can add into it. Conversion: the
// accumulated dQ to the input dtype. One warp per row: a row of head dim <= 256 is at most 32
// chunks of 16 bytes, one per lane.
#pragma once

#include <cute/tensor.hpp>

#include "params/bwd_params.h"
#include "common/seq_info.h"

namespace flash {

constexpr int kBwdRowWarps = 8;    // warps per block of the per-row kernels
constexpr int kBwdRowsPerBlock = 64;

template <int kHeadDim, typename Element>
__global__ void __launch_bounds__(kBwdRowWarps * 32) flash_bwd_preprocess_kernel(const __grid_constant__ BwdParams p) {
  constexpr int kElems = 16 / int(sizeof(Element));
  const int bidb = blockIdx.y, bidh = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const SeqInfo seq(p, bidb);
  const int col = lane * kElems;
  const Element* o_head = static_cast<const Element*>(p.o_ptr) + seq.o_offset + bidh * p.o_head_stride;
  const Element* do_head = static_cast<const Element*>(p.do_ptr) +
                           (p.cu_seqlens_q != nullptr ? int64_t(seq.q_start) * p.do_row_stride
                                                      : int64_t(bidb) * p.do_batch_stride) +
                           bidh * p.do_head_stride;
  for (int r = warp; r < kBwdRowsPerBlock; r += kBwdRowWarps) {
    const int m = blockIdx.x * kBwdRowsPerBlock + r;
    if (m >= seq.seqlen_q) break;
    float sum = 0.f;
    if (col < p.d) {
      const uint4 o_raw = *reinterpret_cast<const uint4*>(o_head + int64_t(m) * p.o_row_stride + col);
      const uint4 do_raw = *reinterpret_cast<const uint4*>(do_head + int64_t(m) * p.do_row_stride + col);
      const Element* o = reinterpret_cast<const Element*>(&o_raw);
      const Element* g = reinterpret_cast<const Element*>(&do_raw);
      CUTE_UNROLL
      for (int i = 0; i < kElems; ++i) sum += float(o[i]) * float(g[i]);
    }
    CUTE_UNROLL
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    if (lane == 0) {
      p.softmax_d_ptr[bidb * p.lse_batch_stride + bidh * p.lse_head_stride +
                      int64_t(seq.q_start + m) * p.lse_row_stride] = sum;
    }
    if (p.dq_accum_ptr != nullptr) {
      float4* acc = reinterpret_cast<float4*>(
          p.dq_accum_ptr + (int64_t(bidh) * p.total_q_rows + seq.q_row(p, bidb, m)) * kHeadDim);
      for (int i = lane; i < kHeadDim / 4; i += 32) acc[i] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
  }
}

// dQ = softmax_scale * the fp32 accumulator, in the input dtype, written through dq's strides.
template <int kHeadDim, typename Element>
__global__ void __launch_bounds__(kBwdRowWarps * 32) flash_bwd_convert_dq_kernel(const __grid_constant__ BwdParams p) {
  constexpr int kElems = 16 / int(sizeof(Element));
  const int bidb = blockIdx.y, bidh = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const SeqInfo seq(p, bidb);
  const int col = lane * kElems;
  if (col >= p.d) return;
  Element* dq_head = static_cast<Element*>(p.dq_ptr) +
                     (p.cu_seqlens_q != nullptr ? int64_t(seq.q_start) * p.dq_row_stride
                                                : int64_t(bidb) * p.dq_batch_stride) +
                     bidh * p.dq_head_stride;
  for (int r = warp; r < kBwdRowsPerBlock; r += kBwdRowWarps) {
    const int m = blockIdx.x * kBwdRowsPerBlock + r;
    if (m >= seq.seqlen_q) break;
    const float* acc = p.dq_accum_ptr + (int64_t(bidh) * p.total_q_rows + seq.q_row(p, bidb, m)) * kHeadDim + col;
    uint4 out_raw;
    Element* out = reinterpret_cast<Element*>(&out_raw);
    CUTE_UNROLL
    for (int i = 0; i < kElems; i += 4) {
      const float4 a = *reinterpret_cast<const float4*>(acc + i);
      out[i] = Element(a.x * p.scale_grad);
      out[i + 1] = Element(a.y * p.scale_grad);
      out[i + 2] = Element(a.z * p.scale_grad);
      out[i + 3] = Element(a.w * p.scale_grad);
    }
    *reinterpret_cast<uint4*>(dq_head + int64_t(m) * p.dq_row_stride + col) = out_raw;
  }
}

}  // namespace flash
