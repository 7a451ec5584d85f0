// FlashAttention-2 backward, dK / dV (and dQ by atomics): one thread block owns kBlockN keys of one
// (batch, kv head). K and V stay in shared memory; the block walks every query tile that sees its
// keys, for every query head of the GQA group in turn, so dK and dV accumulate in registers over
// the whole group with no atomics and a fixed order (deterministic). Per query tile:
//   S = Q K^T, dP = dO V^T                      (recomputed, never stored globally)
//   P = exp(S' - lse), dS = P * (dP - D)        (kernels/bwd_scores.h)
//   dV += P^T dO, dK += dS^T Q                  (P and dS through shared memory: the GEMMs read
//                                                them transposed, in another warp layout)
//   dQ_accum += dS K                            (fp32 atomics; skipped when deterministic, where
//                                                bwd_dq_kernel.h computes dQ instead)
// One Q/dO stage (Traits::kStagesQdO == 1): the next tile's Q and dO load while dQ is computed and
// added. Two stages: the next step's Q and dO load into the other stage right after the step's first
// barrier, so they have the whole step to land, and the barrier after the dK GEMM goes away.
// kHasDropout: the forward's dropout mask is regenerated per tile (common/dropout.h); a separate
// instantiation, so the kernels without dropout carry none of its code.
#pragma once

#include <cute/tensor.hpp>

#include "params/bwd_params.h"
#include "common/bwd_kernel_traits.h"
#include "common/gmem_copy.h"
#include "common/mma_utils.h"
#include "common/score_mods.h"
#include "common/seq_info.h"
#include "kernels/bwd_scores.h"

namespace flash {

using namespace cute;

__device__ __forceinline__ int bwd_ceil_div(int a, int b) { return (a + b - 1) / b; }

// acc[i], acc[i + 1] (neighbouring columns of one row) added to dst[0], dst[1]. sm_90 adds both with
// one vector atomic, halving the atomics of the dQ path.
__device__ __forceinline__ void atomic_add_pair(float* dst, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(dst), make_float2(a, b));
#else
  atomicAdd(dst, a);
  atomicAdd(dst + 1, b);
#endif
}

template <typename Traits, bool kHasExtras, bool kHasDropout = false>
__global__ void __launch_bounds__(Traits::kNThreads) flash_bwd_dkdv_kernel(const __grid_constant__ BwdParams params) {
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;

  extern __shared__ __align__(128) char smem_buf[];
  const int tidx = threadIdx.x;
  const int n_block = blockIdx.x, bidb = blockIdx.y, kv_head = blockIdx.z;
  const SeqInfo seq(params, bidb);
  const int n0 = n_block * kBlockN;
  if (n0 >= seq.seqlen_k) return;
  const int keys_in_block = min(kBlockN, seq.seqlen_k - n0);
  const int diag = seq.seqlen_k - seq.seqlen_q;

  // Query rows that see at least one key of this block: i + diag - window_left <= j and
  // j <= i + diag + window_right for some j in [n0, n0 + keys_in_block).
  const int row_lo = params.window_right >= 0 ? max(0, n0 - diag - params.window_right) : 0;
  const int row_hi = params.window_left >= 0
                         ? min(seq.seqlen_q, n0 + keys_in_block - diag + params.window_left)
                         : seq.seqlen_q;
  const int m_block_min = row_lo / kBlockM;
  const int m_blocks = row_hi > row_lo ? bwd_ceil_div(row_hi, kBlockM) - m_block_min : 0;
  const int steps = params.h_h_k_ratio * m_blocks;  // (query head of the group, query tile) pairs

  // Shared memory: (Q | dO) x kStages | K | V | P | dS. Stage 1 lies kQdOStageElems past stage 0 (a
  // multiple of the swizzle period), so its partitions are stage 0's with a shifted base.
  constexpr int kStages = Traits::kStagesQdO;
  Tensor sQ = make_tensor(make_smem_ptr(reinterpret_cast<Element*>(smem_buf)), typename Traits::SmemLayoutQ{});
  Tensor sdO = make_tensor(sQ.data() + size(sQ), typename Traits::SmemLayoutQ{});
  constexpr int kQdOStageElems = 2 * int(decltype(size(sQ))::value);
  static_assert(kStages == 1 || kQdOStageElems % 512 == 0, "a stage must start on a swizzle period");
  auto stage_of = [](auto const& t, int stage) {
    if constexpr (kStages == 1) {
      return t;
    } else {
      return make_tensor(t.data() + stage * kQdOStageElems, t.layout());
    }
  };
  Tensor sK = make_tensor(sQ.data() + kStages * kQdOStageElems, typename Traits::SmemLayoutKV{});
  Tensor sV = make_tensor(sK.data() + size(sK), typename Traits::SmemLayoutKV{});
  Tensor sP = make_tensor(sV.data() + size(sV), typename Traits::SmemLayoutPdS{});
  Tensor sdS = make_tensor(sP.data() + size(sP), typename Traits::SmemLayoutPdS{});
  Tensor sQt = make_tensor(sQ.data(), typename Traits::SmemLayoutQt{});
  Tensor sQtNoSwizzle = make_tensor(sQ.data(), typename Traits::SmemLayoutQtNoSwizzle{});
  Tensor sdOt = make_tensor(sdO.data(), typename Traits::SmemLayoutQt{});
  Tensor sdOtNoSwizzle = make_tensor(sdO.data(), typename Traits::SmemLayoutQtNoSwizzle{});
  Tensor sKt = make_tensor(sK.data(), typename Traits::SmemLayoutKVt{});
  Tensor sKtNoSwizzle = make_tensor(sK.data(), typename Traits::SmemLayoutKVtNoSwizzle{});
  Tensor sPt = make_tensor(sP.data(), typename Traits::SmemLayoutPdSt{});
  Tensor sPtNoSwizzle = make_tensor(sP.data(), typename Traits::SmemLayoutPdStNoSwizzle{});
  Tensor sdSt = make_tensor(sdS.data(), typename Traits::SmemLayoutPdSt{});
  Tensor sdStNoSwizzle = make_tensor(sdS.data(), typename Traits::SmemLayoutPdStNoSwizzle{});

  // Global -> shared copies.
  const GmemTileCopy<Traits> gcopy(tidx, params.d);
  Tensor tQsQ = gcopy.partition(sQ, tidx);
  Tensor tdOsdO = gcopy.partition(sdO, tidx);
  Tensor tKsK = gcopy.partition(sK, tidx);
  Tensor tVsV = gcopy.partition(sV, tidx);
  const Element* k_head = static_cast<const Element*>(params.k_ptr) + kv_head * params.k_head_stride;
  const Element* v_head = static_cast<const Element*>(params.v_ptr) + kv_head * params.v_head_stride;
  gcopy.load_strided(tKsK, k_head + seq.k_offset + int64_t(n0 + gcopy.r0) * params.k_row_stride + gcopy.col0,
                     params.k_row_stride, keys_in_block, k_head);
  gcopy.load_strided(tVsV, v_head + seq.v_offset + int64_t(n0 + gcopy.r0) * params.v_row_stride + gcopy.col0,
                     params.v_row_stride, keys_in_block, v_head);
  cp_async_fence();

  const int64_t do_offset = params.cu_seqlens_q != nullptr ? int64_t(seq.q_start) * params.do_row_stride
                                                           : int64_t(bidb) * params.do_batch_stride;
  // Step s: query head kv_head * ratio + s / m_blocks, query tile m_block_min + s % m_blocks.
  auto step_head = [&](int s) { return kv_head * params.h_h_k_ratio + s / m_blocks; };
  auto step_m0 = [&](int s) { return (m_block_min + s % m_blocks) * kBlockM; };
  auto load_q_do = [&](int s) {
    const int bidh = step_head(s), m0 = step_m0(s);
    const int rows = min(kBlockM, seq.seqlen_q - m0);
    const Element* q_head = static_cast<const Element*>(params.q_ptr) + seq.q_offset + bidh * params.q_head_stride;
    const Element* do_head = static_cast<const Element*>(params.do_ptr) + do_offset + bidh * params.do_head_stride;
    Tensor tQ = stage_of(tQsQ, s % kStages);
    Tensor tdO = stage_of(tdOsdO, s % kStages);
    gcopy.load_strided(tQ, q_head + int64_t(m0 + gcopy.r0) * params.q_row_stride + gcopy.col0,
                       params.q_row_stride, rows, q_head);
    gcopy.load_strided(tdO, do_head + int64_t(m0 + gcopy.r0) * params.do_row_stride + gcopy.col0,
                       params.do_row_stride, rows, do_head);
  };

  // S and dP: 2 x 4 warps over (kBlockM, kBlockN).
  typename Traits::TiledMmaSdP mma_sdp;
  auto thr_sdp = mma_sdp.get_thread_slice(tidx);
  Tensor tSrQ = thr_sdp.partition_fragment_A(sQ);
  Tensor tSrK = thr_sdp.partition_fragment_B(sK);
  Tensor tdPrdO = thr_sdp.partition_fragment_A(sdO);
  Tensor tdPrV = thr_sdp.partition_fragment_B(sV);
  auto copy_a_sdp = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, mma_sdp);
  auto thr_copy_a_sdp = copy_a_sdp.get_thread_slice(tidx);
  Tensor tSsQ = thr_copy_a_sdp.partition_S(sQ);
  Tensor tdPsdO = thr_copy_a_sdp.partition_S(sdO);
  auto copy_b_sdp = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, mma_sdp);
  auto thr_copy_b_sdp = copy_b_sdp.get_thread_slice(tidx);
  Tensor tSsK = thr_copy_b_sdp.partition_S(sK);
  Tensor tdPsV = thr_copy_b_sdp.partition_S(sV);
  auto copy_pds = make_tiled_copy_C(typename Traits::SmemCopyAtomStore{}, mma_sdp);
  auto thr_copy_pds = copy_pds.get_thread_slice(tidx);
  Tensor tPsP = thr_copy_pds.partition_D(sP);
  Tensor tdSsdS = thr_copy_pds.partition_D(sdS);
  Tensor tScS = thr_sdp.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  Tensor tScS_rc = rowcol_view(tScS);

  // dV and dK: 4 x 2 warps over (kBlockN, kHeadDim); both operands read transposed.
  typename Traits::TiledMmadKV mma_dkv;
  auto thr_dkv = mma_dkv.get_thread_slice(tidx);
  Tensor tdVrPt = thr_dkv.partition_fragment_A(sPtNoSwizzle);
  Tensor tdVrdOt = thr_dkv.partition_fragment_B(sdOtNoSwizzle);
  Tensor tdKrdSt = thr_dkv.partition_fragment_A(sdStNoSwizzle);
  Tensor tdKrQt = thr_dkv.partition_fragment_B(sQtNoSwizzle);
  auto copy_a_dkv = make_tiled_copy_A(typename Traits::SmemCopyAtomTransposed{}, mma_dkv);
  auto thr_copy_a_dkv = copy_a_dkv.get_thread_slice(tidx);
  Tensor tdVsPt = thr_copy_a_dkv.partition_S(sPt);
  Tensor tdKsdSt = thr_copy_a_dkv.partition_S(sdSt);
  auto copy_b_dkv = make_tiled_copy_B(typename Traits::SmemCopyAtomTransposed{}, mma_dkv);
  auto thr_copy_b_dkv = copy_b_dkv.get_thread_slice(tidx);
  Tensor tdVsdOt = thr_copy_b_dkv.partition_S(sdOt);
  Tensor tdKsQt = thr_copy_b_dkv.partition_S(sQt);
  Tensor acc_dk = partition_fragment_C(mma_dkv, Shape<Int<kBlockN>, Int<kHeadDim>>{});
  Tensor acc_dv = partition_fragment_C(mma_dkv, Shape<Int<kBlockN>, Int<kHeadDim>>{});
  clear(acc_dk);
  clear(acc_dv);

  // dQ: 4 x 2 warps over (kBlockM, kHeadDim); dS as stored, K transposed.
  typename Traits::TiledMmadQ mma_dq;
  auto thr_dq = mma_dq.get_thread_slice(tidx);
  Tensor tdQrdS = thr_dq.partition_fragment_A(sdS);
  Tensor tdQrKt = thr_dq.partition_fragment_B(sKtNoSwizzle);
  auto copy_a_dq = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, mma_dq);
  auto thr_copy_a_dq = copy_a_dq.get_thread_slice(tidx);
  Tensor tdQsdS = thr_copy_a_dq.partition_S(sdS);
  auto copy_b_dq = make_tiled_copy_B(typename Traits::SmemCopyAtomTransposed{}, mma_dq);
  auto thr_copy_b_dq = copy_b_dq.get_thread_slice(tidx);
  Tensor tdQsKt = thr_copy_b_dq.partition_S(sKt);
  Tensor tdQcdQ = thr_dq.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));

  constexpr int kRows = decltype(size<0>(tScS_rc))::value;
  RowStats<kRows> stats;
  [[maybe_unused]] const DropoutIf<kHasDropout> dropout(params);
  if (steps > 0) {
    load_q_do(0);
    stats.load(params, tScS_rc, bidb, step_head(0), seq.q_start, step_m0(0), min(kBlockM, seq.seqlen_q - step_m0(0)));
  }
  cp_async_fence();

  for (int s = 0; s < steps; ++s) {
    const int bidh = step_head(s), m0 = step_m0(s);
    const int rows_in_tile = min(kBlockM, seq.seqlen_q - m0);
    const int stage = s % kStages;
    cp_async_wait<0>();
    __syncthreads();  // Q, dO (and K, V) landed; the previous step is done with dS (and, two stages,
                      // with the other stage's Q and dO)
    if constexpr (kStages == 2) {
      if (s + 1 < steps) load_q_do(s + 1);
      cp_async_fence();
    }

    Tensor acc_s = partition_fragment_C(mma_sdp, Shape<Int<kBlockM>, Int<kBlockN>>{});
    Tensor acc_dp = partition_fragment_C(mma_sdp, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc_s);
    clear(acc_dp);
    gemm_ss(acc_s, tSrQ, tSrK, stage_of(tSsQ, stage), tSsK, mma_sdp, copy_a_sdp, copy_b_sdp, thr_copy_a_sdp,
            thr_copy_b_sdp);
    gemm_ss(acc_dp, tdPrdO, tdPrV, stage_of(tdPsdO, stage), tdPsV, mma_sdp, copy_a_sdp, copy_b_sdp, thr_copy_a_sdp,
            thr_copy_b_sdp);

    const BlockCoords bc{m0, n0, diag};
    const bool needs_mask =
        block_needs_mask(bc, kBlockN, rows_in_tile, seq.seqlen_k, params.window_left, params.window_right);
    const float alibi_slope = kHasExtras && params.alibi_slopes_ptr != nullptr
                                  ? params.alibi_slopes_ptr[bidb * params.alibi_slopes_batch_stride + bidh] /
                                        params.scale_softmax
                                  : 0.f;
    if constexpr (kHasDropout) {
      const auto keep = dropout.template keep_bits</*kPairedGroups=*/false>(acc_s, tScS, m0, n0,
                                                                            dropout.stream(bidb, bidh, params.h));
      scores_to_grads<kHasExtras, true>(acc_s, acc_dp, tScS_rc, params, bc, seq.seqlen_k, needs_mask, alibi_slope,
                                        stats, keep);
    } else {
      scores_to_grads<kHasExtras>(acc_s, acc_dp, tScS_rc, params, bc, seq.seqlen_k, needs_mask, alibi_slope, stats);
    }

    Tensor rP = convert_fragment<Element>(acc_s);
    Tensor rdS = convert_fragment<Element>(acc_dp);
    copy(copy_pds, thr_copy_pds.retile_S(rP), tPsP);
    copy(copy_pds, thr_copy_pds.retile_S(rdS), tdSsdS);
    __syncthreads();  // P and dS visible to every warp

    gemm_ss(acc_dv, tdVrPt, tdVrdOt, tdVsPt, stage_of(tdVsdOt, stage), mma_dkv, copy_a_dkv, copy_b_dkv,
            thr_copy_a_dkv, thr_copy_b_dkv);
    gemm_ss(acc_dk, tdKrdSt, tdKrQt, tdKsdSt, stage_of(tdKsQt, stage), mma_dkv, copy_a_dkv, copy_b_dkv,
            thr_copy_a_dkv, thr_copy_b_dkv);
    if constexpr (kStages == 1) __syncthreads();  // every warp is done with Q and dO: the next step's may land
    if (s + 1 < steps) {
      if constexpr (kStages == 1) load_q_do(s + 1);
      const int next_m0 = step_m0(s + 1);
      stats.load(params, tScS_rc, bidb, step_head(s + 1), seq.q_start, next_m0, min(kBlockM, seq.seqlen_q - next_m0));
    }
    if constexpr (kStages == 1) cp_async_fence();

    if (params.dq_accum_ptr != nullptr) {
      Tensor acc_dq = partition_fragment_C(mma_dq, Shape<Int<kBlockM>, Int<kHeadDim>>{});
      clear(acc_dq);
      gemm_ss(acc_dq, tdQrdS, tdQrKt, tdQsdS, tdQsKt, mma_dq, copy_a_dq, copy_b_dq, thr_copy_a_dq, thr_copy_b_dq);
      float* dq_tile = params.dq_accum_ptr +
                       (int64_t(bidh) * params.total_q_rows + seq.q_row(params, bidb, m0)) * kHeadDim;
      CUTE_UNROLL
      for (int i = 0; i < size(acc_dq); i += 2) {
        const int row = get<0>(tdQcdQ(i));
        if (row < rows_in_tile) atomic_add_pair(dq_tile + row * kHeadDim + get<1>(tdQcdQ(i)), acc_dq(i), acc_dq(i + 1));
      }
    }
  }

  // dS excluded softmax_scale; dK gets it once here.
  CUTE_UNROLL
  for (int i = 0; i < size(acc_dk); ++i) acc_dk(i) *= params.scale_grad;
  Tensor rdK = convert_fragment<Element>(acc_dk);
  Tensor rdV = convert_fragment<Element>(acc_dv);
  cp_async_wait<0>();
  __syncthreads();  // every warp is done reading K and V: dK and dV reuse their tiles
  auto copy_dkv = make_tiled_copy_C(typename Traits::SmemCopyAtomStore{}, mma_dkv);
  auto thr_copy_dkv = copy_dkv.get_thread_slice(tidx);
  copy(copy_dkv, thr_copy_dkv.retile_S(rdK), thr_copy_dkv.partition_D(sK));
  copy(copy_dkv, thr_copy_dkv.retile_S(rdV), thr_copy_dkv.partition_D(sV));
  __syncthreads();
  const bool varlen_k = params.cu_seqlens_k != nullptr;
  const int k_start = varlen_k ? params.cu_seqlens_k[bidb] : 0;
  Element* dk = static_cast<Element*>(params.dk_ptr) +
                (varlen_k ? int64_t(k_start) * params.dk_row_stride : int64_t(bidb) * params.dk_batch_stride) +
                kv_head * params.dk_head_stride + int64_t(n0 + gcopy.r0) * params.dk_row_stride + gcopy.col0;
  Element* dv = static_cast<Element*>(params.dv_ptr) +
                (varlen_k ? int64_t(k_start) * params.dv_row_stride : int64_t(bidb) * params.dv_batch_stride) +
                kv_head * params.dv_head_stride + int64_t(n0 + gcopy.r0) * params.dv_row_stride + gcopy.col0;
  gcopy.store_strided(tKsK, dk, params.dk_row_stride, keys_in_block);
  gcopy.store_strided(tVsV, dv, params.dv_row_stride, keys_in_block);
}

}  // namespace flash
