// Decode forward: at most 16 query rows of one (batch, head) -- one query at decode, the query
// heads of a GQA group after the seqlen/ngroups swap, or a few queries of each head of a group
// packed into the rows (common/query_rows.h) -- against a split's range of keys.
//
// The 16-row tile fills one m16n8k16 MMA row block, so the warps split the keys instead of the
// rows: warp w takes key sub-blocks w, w + kNWarps, ... of kSubN keys each, streams them through
// its own kStages-deep cp.async ring and runs its own online softmax, synchronising only with
// itself (__syncwarp). Q stays in registers. At the end the warps' results are merged in shared
// memory by the log-sum-exp rule (common/warp_merge.h) and written where the launch's output mode
// sends them (common/epilogue.h). Which sub-blocks a split and a warp take: common/block_info.h;
// where K/V rows come from: common/kv_source.h.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/fast_math.h>

#include "kernels/decode_kernel_traits.h"
#include "params/fwd_params.h"
#include "common/block_info.h"
#include "common/epilogue.h"
#include "common/gmem_copy.h"
#include "common/kv_source.h"
#include "common/mma_utils.h"
#include "common/query_rows.h"
#include "common/score_mods.h"
#include "common/seq_info.h"
#include "common/softmax.h"
#include "common/warp_merge.h"

namespace flash {

using namespace cute;

// kScoreMods: softcap and ALiBi; kPaged: K/V through a block table. Each gets its own
// instantiation so the common kernel carries none of their code or registers (the paged loop spilled
// heavily while it shared one kernel with the score modifiers). The paged-only kernel requires no
// left padding (the launch sends paged calls with left padding to the score-modifier kernel, which
// pages any alignment). kPacked: the rows are a GQA group's heads with a few queries each
// (FwdParams::pack_groups, common/query_rows.h); without it the map is the identity at compile
// time, so a call with one row per query runs none of the packed map's divisions, branches or
// row-by-row Q loads (with the map read at run time, an H100 ran the one-query decode grid 0.5-1 us
// a call slower than before the packing: benchmarks/NOTES.md, item 140).
template <typename Traits, bool kScoreMods, bool kPaged, bool kPacked>
__global__ void __launch_bounds__(Traits::kNThreads)
flash_decode_kernel(const __grid_constant__ FwdParams params, const cutlass::FastDivmod page_div) {
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kSubN = Traits::kSubN;
  constexpr int kStages = Traits::kStages;
  constexpr int kNWarps = Traits::kNWarps;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr KvLayout kKvLayout = !kPaged ? KvLayout::kStrided : kScoreMods ? KvLayout::kPagedRows : KvLayout::kPagedGroups;

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");  // the combine kernel may start launching
#endif
  extern __shared__ __align__(128) char smem_buf[];
  const int tidx = threadIdx.x;
  const int warp = tidx / 32;
  const int lane = tidx % 32;
  const int m_block = blockIdx.x;
  const int split_idx = blockIdx.y;
  const int bidb = blockIdx.z / params.h;
  const int bidh = blockIdx.z % params.h;

  const DecodeKvSource<Traits, kKvLayout> kv_src(params, page_div, smem_buf, bidb, warp, lane);
  const QueryRows rows = kPacked ? QueryRows(params) : QueryRows(1);
  // A kv-cache's length first, so that its request leaves before the prefetches' (-1: SeqInfo
  // loads it itself).
  const int seqused_k_early = kv_src.prefetches_early() ? params.seqused_k[bidb] : -1;
  kv_src.fetch_before_lengths(split_idx, warp, bidb, bidh);
  if (warp == 0 && kv_src.prefetches_early() && params.cu_seqlens_q == nullptr) {
    // Q's rows too, or its copy would be the one left waiting on DRAM once the lengths land.
    // Packed rows (one tile holds them all): each query head's queries.
    const Element* q_head = static_cast<const Element*>(params.q_ptr) + bidb * params.q_batch_stride +
                            bidh * params.q_head_stride + int64_t(m_block * kBlockM) * params.q_row_stride;
    const int queries = min(kBlockM, params.seqlen_q - m_block * kBlockM) / rows.groups;
    for (int g = 0; g < rows.groups; ++g) {
      prefetch_rows_to_l2<kBlockM, kHeadDim>(q_head + g * params.q_group_stride, queries, params.q_row_stride,
                                             params.d, lane);
    }
  }

  const SeqInfo seq(params, bidb, seqused_k_early);
  const int m0 = m_block * kBlockM;
  if (m0 >= seq.seqlen_q) {
    cp_async_wait<0>();  // no copy into shared memory outlives the block
    return;
  }
  const int rows_in_tile = min(kBlockM, seq.seqlen_q - m0);
  // The mask compares keys with query positions (row r's is r / G when packed).
  const TilePositions positions = rows.positions(seq, m0, rows_in_tile);
  const int diag = positions.diag;
  const KeyBlocks range = visible_key_blocks<kSubN>(params, positions.seq, m0, positions.count);
  if (range.empty()) {  // the same for every split of the tile (a cluster exits as one)
    if (params.num_splits == 1 || params.cluster_merge) {
      if (split_idx == 0) write_empty_tile<Traits, false>(params, seq, bidb, bidh, split_idx, m_block, rows_in_tile, rows);
    } else {
      write_empty_tile<Traits, true>(params, seq, bidb, bidh, split_idx, m_block, rows_in_tile);
    }
    cp_async_wait<0>();
    return;
  }

  // Shared memory: Q | per-warp rings of (K, V) sub-blocks.
  Tensor sQ = make_tensor(make_smem_ptr(reinterpret_cast<Element*>(smem_buf)), typename Traits::SmemLayoutQ{});
  Element* ring = reinterpret_cast<Element*>(smem_buf + Traits::kSmemQBytes) + warp * kStages * 2 * Traits::kTileElems;
  auto stage_k = [&](int s) { return make_tensor(make_smem_ptr(ring + (2 * s) * Traits::kTileElems), typename Traits::SmemLayoutKV{}); };
  auto stage_v = [&](int s) { return make_tensor(make_smem_ptr(ring + (2 * s + 1) * Traits::kTileElems), typename Traits::SmemLayoutKV{}); };
  auto stage_vt = [&](int s) { return make_tensor(make_smem_ptr(ring + (2 * s + 1) * Traits::kTileElems), typename Traits::SmemLayoutVt{}); };

  using Copy = GmemTileCopy<typename Traits::WarpCopy>;
  const Copy gcopy(lane, params.d);
  const Element* q_base = static_cast<const Element*>(params.q_ptr) + seq.q_offset + bidh * params.q_head_stride;
  if (warp == 0) {
    Tensor tQsQ = gcopy.partition(sQ, lane);
    load_query_rows(gcopy, tQsQ, q_base, params, rows, m0, rows_in_tile);
  }
  cp_async_fence();

  const KvPointers<Element> kv(params, seq, bidb, bidh, gcopy.r0, gcopy.col0);
  const bool full_width = params.d == kHeadDim;
  static_assert(Traits::kKeysPerRound == kNWarps * kSubN);
  const RoundRobinBlocks<kNWarps> blocks(range, split_idx, params.num_splits, warp);
  kv_src.fetch_first(blocks, seq);
  // This warp's i-th sub-block into ring stage i % kStages (one commit group per sub-block, empty
  // past the end so the group count stays uniform).
  auto load_stage = [&](int i) {
    if (i < blocks.count) {
      const int sb = blocks.block(i);
      Tensor sK = stage_k(i % kStages);
      Tensor sV = stage_v(i % kStages);
      Tensor tK = gcopy.partition(sK, lane);
      Tensor tV = gcopy.partition(sV, lane);
      kv_src.load(tK, tV, i, sb, full_width, blocks, seq, gcopy, kv);
    }
    cp_async_fence();
  };
  CUTE_UNROLL
  for (int i = 0; i < kStages - 1; ++i) load_stage(i);

  typename Traits::WarpMma mma;
  auto thr_mma = mma.get_thread_slice(lane);
  Tensor tSrQ = thr_mma.partition_fragment_A(sQ);
  Tensor tSrK = thr_mma.partition_fragment_B(stage_k(0));
  Tensor tOrVt = thr_mma.partition_fragment_B(make_tensor(make_smem_ptr(ring), typename Traits::SmemLayoutVtNoSwizzle{}));
  Tensor acc_o = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kHeadDim>>{});
  clear(acc_o);

  auto smem_copy_q = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, mma);
  auto smem_thr_copy_q = smem_copy_q.get_thread_slice(lane);
  auto smem_copy_k = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, mma);
  auto smem_thr_copy_k = smem_copy_k.get_thread_slice(lane);
  auto smem_copy_v = make_tiled_copy_B(typename Traits::SmemCopyAtomTransposed{}, mma);
  auto smem_thr_copy_v = smem_copy_v.get_thread_slice(lane);

  Tensor tScS = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kSubN>>{}));
  Tensor tScS_rc = rowcol_view(tScS);
  Tensor tOcO = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));

  const ScoreMods<kScoreMods> score_mods(params, bidb, bidh);

  // Q: wait for warp 0's copy (its group is the oldest), then all of it into registers.
  cp_async_wait<kStages - 1>();
  __syncthreads();
  copy(smem_copy_q, smem_thr_copy_q.partition_S(sQ), smem_thr_copy_q.retile_D(tSrQ));

  constexpr int kRows = decltype(size<0>(rowcol_view(acc_o)))::value;
  OnlineSoftmax<kRows> softmax;

  for (int i = 0; i < blocks.count; ++i) {
    load_stage(i + kStages - 1);
    cp_async_wait<kStages - 1>();
    __syncwarp();  // sub-block i landed for every lane
    const int s = i % kStages;
    const int sb = blocks.block(i);

    Tensor acc_s = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kSubN>>{});
    clear(acc_s);
    gemm_rs(acc_s, tSrQ, tSrK, smem_thr_copy_k.partition_S(stage_k(s)), mma, smem_copy_k, smem_thr_copy_k);

    Tensor sc = rowcol_view(acc_s);
    const BlockCoords bc{m0, sb * kSubN, diag};
    score_mods.apply(acc_s, sc, tScS_rc, bc);
    // rows_in_tile bounds a left window edge, which packed rows never have: it counts positions.
    if (block_needs_mask(bc, kSubN, rows_in_tile, seq.seqlen_k, params.window_left, params.window_right)) {
      apply_mask(sc, tScS_rc, bc, seq.seqlen_k, params.window_left, params.window_right,
                 [&](int r) { return rows.position(r); });
    }
    softmax.template update</*kSkipUnmoved=*/true>(sc, rowcol_view(acc_o), params.scale_softmax_log2, i == 0);

    Tensor rP = convert_fragment<Element>(acc_s);
    Tensor tOrP = make_tensor(rP.data(), acc_to_a_operand_layout(rP.layout()));
    gemm_rs_n_outer(acc_o, tOrP, tOrVt, smem_thr_copy_v.partition_S(stage_vt(s)), mma, smem_copy_v, smem_thr_copy_v);
    __syncwarp();  // every lane is done reading stage s before it is refilled
  }
  cp_async_wait<0>();

  // This warp's normalised output and lse per row (-inf without a visible key).
  float lse_w[kRows];
  if (blocks.count > 0) {
    softmax.finalize(rowcol_view(acc_o), params.scale_softmax, -INFINITY, lse_w);
  } else {
    CUTE_UNROLL
    for (int mi = 0; mi < kRows; ++mi) lse_w[mi] = -INFINITY;
  }
  const MergedTile<Traits> merged = merge_warps<Traits>(smem_buf, acc_o, tOcO, lse_w, warp, rows_in_tile);
  const OutputTile out_tile{bidb, bidh, split_idx, m0, rows_in_tile, rows};
  with_output_mode(params, [&](auto mode) { write_merged<Traits, decltype(mode)::value>(params, seq, out_tile, tidx, merged); });
}

}  // namespace flash
