// Deterministic dQ: one thread block owns kBlockM query rows of one (batch, head) and walks its key
// blocks in order, recomputing S, dP, P and dS (kernels/bwd_scores.h) and accumulating dQ += dS K
// in registers. No atomics, so the result is bitwise reproducible; the dK/dV kernel then skips its
// dQ part. Forward-style tile: warps split the rows, so dS feeds the dQ MMA straight from registers
// (the accumulator of one MMA is the A operand of the next). K and V stream through a two-stage
// cp.async ring: block n + 1 loads while block n computes. kHasDropout: the forward's dropout mask
// is regenerated per block (common/dropout.h), in a separate instantiation.
#pragma once

#include <cute/tensor.hpp>

#include "params/bwd_params.h"
#include "common/gmem_copy.h"
#include "common/kernel_traits.h"
#include "common/mma_utils.h"
#include "common/score_mods.h"
#include "common/seq_info.h"
#include "kernels/bwd_scores.h"

namespace flash {

using namespace cute;

// Q | dO | (K | V) x 2 stages.
template <typename Traits>
constexpr int bwd_dq_smem_bytes() {
  return 2 * Traits::kSmemQBytes + 4 * Traits::kSmemKVBytes;
}

template <typename Traits, bool kHasExtras, bool kHasDropout = false>
__global__ void __launch_bounds__(Traits::kNThreads) flash_bwd_dq_kernel(const __grid_constant__ BwdParams params) {
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;

  extern __shared__ __align__(128) char smem_buf[];
  const int tidx = threadIdx.x;
  const int m_block = blockIdx.x, bidb = blockIdx.y, bidh = blockIdx.z;
  const SeqInfo seq(params, bidb);
  const int m0 = m_block * kBlockM;
  if (m0 >= seq.seqlen_q) return;
  const int rows_in_tile = min(kBlockM, seq.seqlen_q - m0);
  const int diag = seq.seqlen_k - seq.seqlen_q;

  // Key blocks any row of the tile sees (the forward's band).
  int n_block_min = 0;
  int n_block_max = (seq.seqlen_k + kBlockN - 1) / kBlockN;
  if (params.window_right >= 0) {
    n_block_max = min(n_block_max, max(0, (m0 + rows_in_tile + diag + params.window_right + kBlockN - 1) / kBlockN));
  }
  if (params.window_left >= 0) n_block_min = max(n_block_min, (m0 + diag - params.window_left) / kBlockN);

  Element* dq = static_cast<Element*>(params.dq_ptr) +
                (params.cu_seqlens_q != nullptr ? int64_t(seq.q_start) * params.dq_row_stride
                                                : int64_t(bidb) * params.dq_batch_stride) +
                bidh * params.dq_head_stride + int64_t(m0) * params.dq_row_stride;
  if (n_block_max <= n_block_min) {  // no key visible to any row: dQ = 0
    for (int i = tidx; i < rows_in_tile * params.d; i += Traits::kNThreads) {
      dq[int64_t(i / params.d) * params.dq_row_stride + i % params.d] = Element(0.f);
    }
    return;
  }

  Tensor sQ = make_tensor(make_smem_ptr(reinterpret_cast<Element*>(smem_buf)), typename Traits::SmemLayoutQ{});
  Tensor sdO = make_tensor(sQ.data() + size(sQ), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(sdO.data() + size(sdO), typename Traits::SmemLayoutKV{});
  Tensor sV = make_tensor(sK.data() + size(sK), typename Traits::SmemLayoutKV{});
  Tensor sKt = make_tensor(sK.data(), typename Traits::SmemLayoutVt{});
  Tensor sKtNoSwizzle = make_tensor(sK.data(), typename Traits::SmemLayoutVtNoSwizzle{});
  // Stage 1 of the K/V ring follows stage 0; every partition below shifts by this many elements
  // (a multiple of the swizzle period, so the swizzle pattern is unchanged).
  constexpr int kStageElems = 2 * int(decltype(size(sK))::value);

  const GmemTileCopy<Traits> gcopy(tidx, params.d);
  Tensor tQsQ = gcopy.partition(sQ, tidx);
  Tensor tdOsdO = gcopy.partition(sdO, tidx);
  Tensor tKsK = gcopy.partition(sK, tidx);
  Tensor tVsV = gcopy.partition(sV, tidx);
  const Element* q_head = static_cast<const Element*>(params.q_ptr) + seq.q_offset + bidh * params.q_head_stride;
  const Element* do_head = static_cast<const Element*>(params.do_ptr) +
                           (params.cu_seqlens_q != nullptr ? int64_t(seq.q_start) * params.do_row_stride
                                                           : int64_t(bidb) * params.do_batch_stride) +
                           bidh * params.do_head_stride;
  const int kv_head = bidh / params.h_h_k_ratio;
  const Element* k_head = static_cast<const Element*>(params.k_ptr) + kv_head * params.k_head_stride;
  const Element* v_head = static_cast<const Element*>(params.v_ptr) + kv_head * params.v_head_stride;
  auto load_kv = [&](int n_block, int stage) {
    const int j0 = n_block * kBlockN;
    Tensor tK = make_tensor(tKsK.data() + stage * kStageElems, tKsK.layout());
    Tensor tV = make_tensor(tVsV.data() + stage * kStageElems, tVsV.layout());
    gcopy.load_strided(tK, k_head + seq.k_offset + int64_t(j0 + gcopy.r0) * params.k_row_stride + gcopy.col0,
                       params.k_row_stride, seq.seqlen_k - j0, k_head);
    gcopy.load_strided(tV, v_head + seq.v_offset + int64_t(j0 + gcopy.r0) * params.v_row_stride + gcopy.col0,
                       params.v_row_stride, seq.seqlen_k - j0, v_head);
  };

  typename Traits::TiledMma tiled_mma;
  auto thr_mma = tiled_mma.get_thread_slice(tidx);
  Tensor tSrQ = thr_mma.partition_fragment_A(sQ);
  Tensor tSrK = thr_mma.partition_fragment_B(sK);
  Tensor tdPrdO = thr_mma.partition_fragment_A(sdO);
  Tensor tdPrV = thr_mma.partition_fragment_B(sV);
  Tensor tdQrKt = thr_mma.partition_fragment_B(sKtNoSwizzle);
  auto copy_a = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto thr_copy_a = copy_a.get_thread_slice(tidx);
  Tensor tSsQ = thr_copy_a.partition_S(sQ);
  Tensor tdPsdO = thr_copy_a.partition_S(sdO);
  auto copy_b = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto thr_copy_b = copy_b.get_thread_slice(tidx);
  Tensor tSsK = thr_copy_b.partition_S(sK);
  Tensor tdPsV = thr_copy_b.partition_S(sV);
  auto copy_kt = make_tiled_copy_B(typename Traits::SmemCopyAtomTransposed{}, tiled_mma);
  auto thr_copy_kt = copy_kt.get_thread_slice(tidx);
  Tensor tdQsKt = thr_copy_kt.partition_S(sKt);
  Tensor tScS = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  Tensor tScS_rc = rowcol_view(tScS);
  Tensor acc_dq = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kHeadDim>>{});
  clear(acc_dq);

  gcopy.load_strided(tQsQ, q_head + int64_t(m0 + gcopy.r0) * params.q_row_stride + gcopy.col0, params.q_row_stride,
                     rows_in_tile, q_head);
  gcopy.load_strided(tdOsdO, do_head + int64_t(m0 + gcopy.r0) * params.do_row_stride + gcopy.col0,
                     params.do_row_stride, rows_in_tile, do_head);
  load_kv(n_block_min, 0);
  cp_async_fence();
  constexpr int kRows = decltype(size<0>(tScS_rc))::value;
  RowStats<kRows> stats;
  stats.load(params, tScS_rc, bidb, bidh, seq.q_start, m0, rows_in_tile);
  const float alibi_slope = kHasExtras && params.alibi_slopes_ptr != nullptr
                                ? params.alibi_slopes_ptr[bidb * params.alibi_slopes_batch_stride + bidh] /
                                      params.scale_softmax
                                : 0.f;
  [[maybe_unused]] const DropoutIf<kHasDropout> dropout(params);

  for (int n_block = n_block_min; n_block < n_block_max; ++n_block) {
    const int stage = (n_block - n_block_min) & 1;
    if (n_block + 1 < n_block_max) {
      load_kv(n_block + 1, stage ^ 1);
      cp_async_fence();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // this stage's K and V (and Q, dO) landed

    const int shift = stage * kStageElems;
    Tensor acc_s = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
    Tensor acc_dp = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc_s);
    clear(acc_dp);
    gemm_ss(acc_s, tSrQ, tSrK, tSsQ, make_tensor(tSsK.data() + shift, tSsK.layout()), tiled_mma, copy_a, copy_b,
            thr_copy_a, thr_copy_b);
    gemm_ss(acc_dp, tdPrdO, tdPrV, tdPsdO, make_tensor(tdPsV.data() + shift, tdPsV.layout()), tiled_mma, copy_a,
            copy_b, thr_copy_a, thr_copy_b);

    const BlockCoords bc{m0, n_block * kBlockN, diag};
    const bool needs_mask =
        block_needs_mask(bc, kBlockN, rows_in_tile, seq.seqlen_k, params.window_left, params.window_right);
    if constexpr (kHasDropout) {
      const auto keep = dropout.template keep_bits</*kPairedGroups=*/true>(acc_s, tScS, m0, bc.col0,
                                                                           dropout.stream(bidb, bidh, params.h));
      scores_to_grads<kHasExtras, true>(acc_s, acc_dp, tScS_rc, params, bc, seq.seqlen_k, needs_mask, alibi_slope,
                                        stats, keep);
    } else {
      scores_to_grads<kHasExtras>(acc_s, acc_dp, tScS_rc, params, bc, seq.seqlen_k, needs_mask, alibi_slope, stats);
    }

    Tensor rdS = convert_fragment<Element>(acc_dp);
    Tensor tdQrdS = make_tensor(rdS.data(), acc_to_a_operand_layout(rdS.layout()));
    gemm_rs(acc_dq, tdQrdS, tdQrKt, make_tensor(tdQsKt.data() + shift, tdQsKt.layout()), tiled_mma, copy_kt,
            thr_copy_kt);
    __syncthreads();  // every warp is done with this stage: block n + 2 may load into it
  }

  // dS excluded softmax_scale; dQ gets it once here. Out through Q's tile for coalesced stores.
  CUTE_UNROLL
  for (int i = 0; i < size(acc_dq); ++i) acc_dq(i) *= params.scale_grad;
  Tensor rdQ = convert_fragment<Element>(acc_dq);
  auto copy_dq = make_tiled_copy_C(typename Traits::SmemCopyAtomO{}, tiled_mma);
  auto thr_copy_dq = copy_dq.get_thread_slice(tidx);
  copy(copy_dq, thr_copy_dq.retile_S(rdQ), thr_copy_dq.partition_D(sQ));
  __syncthreads();
  gcopy.store_strided(tQsQ, dq + int64_t(gcopy.r0) * params.dq_row_stride + gcopy.col0, params.dq_row_stride,
                      rows_in_tile);
}

}  // namespace flash
