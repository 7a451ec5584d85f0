// FlashAttention-2 forward: one thread block owns kBlockM query rows of one (batch, head) and
// walks key blocks from last to first with an online softmax. The Q tile stays in shared memory;
// K and V tiles stream in with cp.async, V's load overlapping S = Q K^T and the next K's load
// overlapping the softmax and O += P V.
//
// kIsSplit: the block covers only its split's share of the key blocks and writes an fp32 partial
// output and partial log-sum-exp, merged later by the combine kernel (common/epilogue.h); its
// rows may be a GQA group's packed queries (common/query_rows.h), which the plan sends to no
// other instantiation.
// kHasExtras: softcap, ALiBi and paged K/V; kHasDropout (unsplit kernel only): common/fwd_dropout.h.
// Each is a separate instantiation, so the kernels without them carry none of their code.
#pragma once

#include <cute/tensor.hpp>

#include "params/fwd_params.h"
#include "common/block_info.h"
#include "common/epilogue.h"
#include "common/fwd_dropout.h"
#include "common/gmem_copy.h"
#include "common/kernel_traits.h"
#include "common/kv_source.h"
#include "common/mma_utils.h"
#include "common/query_rows.h"
#include "common/score_mods.h"
#include "common/seq_info.h"
#include "common/softmax.h"

namespace flash {

using namespace cute;

template <typename Traits, bool kIsSplit, bool kHasExtras, bool kHasDropout = false>
__global__ void __launch_bounds__(Traits::kNThreads) flash_fwd_kernel(const __grid_constant__ FwdParams params) {
  static_assert(!(kIsSplit && kHasDropout), "dropout runs the unsplit kernel only");
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;

  extern __shared__ __align__(128) char smem_buf[];
  const int tidx = threadIdx.x;
  // Later query tiles first: under a causal mask they see the most keys, so the longest blocks
  // start in the first wave.
  const int m_block = gridDim.x - 1 - blockIdx.x;
  const int split_idx = kIsSplit ? blockIdx.y : 0;
  const int bidb = kIsSplit ? blockIdx.z / params.h : blockIdx.y;
  const int bidh = kIsSplit ? blockIdx.z % params.h : blockIdx.z;

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // Let the combine kernel (a programmatic dependent launch) start launching now; it waits for
  // this grid's completion before reading anything.
  if constexpr (kIsSplit) asm volatile("griddepcontrol.launch_dependents;");
#endif
  const FwdDropout<kHasDropout> dropout(params);
  const SeqInfo seq(params, bidb);
  const int m0 = m_block * kBlockM;
  if (m0 >= seq.seqlen_q) return;
  const int rows_in_tile = min(kBlockM, seq.seqlen_q - m0);
  // The mask compares keys with query positions (row r's is r / G when packed).
  const QueryRows rows = kIsSplit ? QueryRows(params) : QueryRows(1);
  const TilePositions positions = rows.positions(seq, m0, rows_in_tile);
  const int diag = positions.diag;
  const KeyBlocks range = visible_key_blocks<kBlockN, kIsSplit>(params, positions.seq, m0, positions.count, split_idx);
  if (range.empty()) {
    write_empty_tile<Traits, kIsSplit>(params, seq, bidb, bidh, split_idx, m_block, rows_in_tile);
    return;
  }

  // Shared memory: Q | K | V.
  Tensor sQ = make_tensor(make_smem_ptr(reinterpret_cast<Element*>(smem_buf)), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(sQ.data() + size(sQ), typename Traits::SmemLayoutKV{});
  Tensor sV = make_tensor(sK.data() + size(sK), typename Traits::SmemLayoutKV{});
  Tensor sVt = make_tensor(sV.data(), typename Traits::SmemLayoutVt{});
  Tensor sVtNoSwizzle = make_tensor(sV.data(), typename Traits::SmemLayoutVtNoSwizzle{});

  // Global <-> shared copies: per-thread base pointers, then one stride multiply per row.
  const GmemTileCopy<Traits> gcopy(tidx, params.d);
  Tensor tQsQ = gcopy.partition(sQ, tidx);
  Tensor tKsK = gcopy.partition(sK, tidx);
  Tensor tVsV = gcopy.partition(sV, tidx);
  const Element* q_base = static_cast<const Element*>(params.q_ptr) + seq.q_offset + bidh * params.q_head_stride;
  const KvPointers<Element> kv(params, seq, bidb, bidh, gcopy.r0, gcopy.col0);
  auto load_k = [&](int n_block) { load_key_block<false, kHasExtras>(gcopy, tKsK, params, seq, kv, n_block * kBlockN); };
  auto load_v = [&](int n_block) { load_key_block<true, kHasExtras>(gcopy, tVsV, params, seq, kv, n_block * kBlockN); };

  typename Traits::TiledMma tiled_mma;
  auto thr_mma = tiled_mma.get_thread_slice(tidx);
  Tensor tSrQ = thr_mma.partition_fragment_A(sQ);
  Tensor tSrK = thr_mma.partition_fragment_B(sK);
  Tensor tOrVt = thr_mma.partition_fragment_B(sVtNoSwizzle);
  Tensor acc_o = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kHeadDim>>{});

  auto smem_copy_q = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto smem_thr_copy_q = smem_copy_q.get_thread_slice(tidx);
  Tensor tSsQ = smem_thr_copy_q.partition_S(sQ);
  auto smem_copy_k = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto smem_thr_copy_k = smem_copy_k.get_thread_slice(tidx);
  Tensor tSsK = smem_thr_copy_k.partition_S(sK);
  auto smem_copy_v = make_tiled_copy_B(typename Traits::SmemCopyAtomTransposed{}, tiled_mma);
  auto smem_thr_copy_v = smem_copy_v.get_thread_slice(tidx);
  Tensor tOsVt = smem_thr_copy_v.partition_S(sVt);

  // (row, col) of every score and output element this thread holds.
  Tensor tScS = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  Tensor tScS_rc = rowcol_view(tScS);
  Tensor tOcO = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));

  const ScoreMods<kHasExtras> score_mods(params, bidb, bidh);

  int n_block = range.max - 1;
  load_query_rows(gcopy, tQsQ, q_base, params, rows, m0, rows_in_tile);
  cp_async_fence();
  load_k(n_block);
  cp_async_fence();
  clear(acc_o);

  constexpr int kRows = decltype(size<0>(rowcol_view(acc_o)))::value;
  OnlineSoftmax<kRows> softmax;

  for (bool first = true; n_block >= range.min; --n_block, first = false) {
    Tensor acc_s = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc_s);
    cp_async_wait<0>();
    __syncthreads();  // K[n_block] landed; every warp is done reading the previous V
    load_v(n_block);
    cp_async_fence();

    gemm_ss(acc_s, tSrQ, tSrK, tSsQ, tSsK, tiled_mma, smem_copy_q, smem_copy_k, smem_thr_copy_q, smem_thr_copy_k);

    Tensor s = rowcol_view(acc_s);
    const BlockCoords bc{m0, n_block * kBlockN, diag};
    score_mods.apply(acc_s, s, tScS_rc, bc);
    // rows_in_tile bounds a left window edge, which packed rows never have: it counts positions.
    if (block_needs_mask(bc, kBlockN, rows_in_tile, seq.seqlen_k, params.window_left, params.window_right)) {
      apply_mask(s, tScS_rc, bc, seq.seqlen_k, params.window_left, params.window_right,
                 [&](int r) { return rows.position(r); });
    }

    cp_async_wait<0>();
    __syncthreads();  // V[n_block] landed; every warp is done reading K
    if (n_block > range.min) {
      load_k(n_block - 1);
      cp_async_fence();
    }

    softmax.update(s, rowcol_view(acc_o), params.scale_softmax_log2, first);
    dropout.template apply<Element>(params, acc_s, tScS, bidb, bidh, m0, n_block * kBlockN, rows_in_tile, seq.seqlen_k);

    Tensor rP = convert_fragment<Element>(acc_s);
    Tensor tOrP = make_tensor(rP.data(), acc_to_a_operand_layout(rP.layout()));
    gemm_rs(acc_o, tOrP, tOrVt, tOsVt, tiled_mma, smem_copy_v, smem_thr_copy_v);
  }

  float lse[kRows];
  softmax.finalize(rowcol_view(acc_o), params.scale_softmax, kIsSplit ? -INFINITY : INFINITY, lse);
  scale_dropout_output<kHasDropout>(params, acc_o);
  constexpr OutputMode kMode = kIsSplit ? OutputMode::kSplitPartial : OutputMode::kDirect;
  Tensor sO = make_tensor(sQ.data(), typename Traits::SmemLayoutQ{});
  write_acc_output<Traits, kMode>(params, seq, OutputTile{bidb, bidh, split_idx, m0, rows_in_tile}, tidx, acc_o, lse,
                                  tOcO, sO, tiled_mma, gcopy);
}

}  // namespace flash
