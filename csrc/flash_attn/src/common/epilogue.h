// Where a query tile's result goes. One OutputMode per launch:
//   kDirect         one split: the output in the input dtype and softmax_lse (no combine launch);
//   kSplitPartial   this split's fp32 partial output and lse at its slice of the partial buffers
//                   ([split][head][row][d]), merged later by the combine kernel;
//   kClusterMerged  (decode, sm_90) the splits of a tile are one thread-block cluster; split 0
//                   merges the others' results from their shared memory, in split order
//                   (deterministic): no partials in global memory, no combine launch.
// The prefill and split kernels write from their MMA accumulators (write_acc_output; the Hopper
// forward's split partials with write_acc_split_partial), the decode kernel from its warps' merged
// tile in shared memory (write_merged, common/warp_merge.h).
// Rows without a visible key give output 0 and softmax_lse = +inf, as upstream.
#pragma once

#include <cmath>
#include <type_traits>

#include <cooperative_groups.h>
#include <cute/arch/cluster_sm90.hpp>
#include <cute/tensor.hpp>

#include "common/mma_utils.h"
#include "common/query_rows.h"
#include "common/seq_info.h"
#include "params/fwd_params.h"
#include "plan/tile_sizes.h"

namespace flash {

using namespace cute;

enum class OutputMode { kDirect, kSplitPartial, kClusterMerged };
template <OutputMode kMode>
using OutputModeC = std::integral_constant<OutputMode, kMode>;

// f(OutputModeC<mode>) with this launch's mode (decode: chosen at run time, once per tile).
template <typename F>
__device__ __forceinline__ void with_output_mode(const FwdParams& p, F&& f) {
  if (p.num_splits == 1) {
    f(OutputModeC<OutputMode::kDirect>{});
  } else if (p.cluster_merge) {
    f(OutputModeC<OutputMode::kClusterMerged>{});
  } else {
    f(OutputModeC<OutputMode::kSplitPartial>{});
  }
}

// The query tile one thread block writes: rows [m0, m0 + rows) of head bidh of batch entry bidb,
// laid out by query_rows (the decode kernel's packed rows; the identity elsewhere).
struct OutputTile {
  int bidb, bidh, split_idx, m0, rows;
  QueryRows query_rows = QueryRows(1);
};

// Rows of this tile have no visible key in this block range: output 0 and the empty lse (kIsSplit:
// this split's partial, -inf). Written by kThreads threads from thread kFirstThread on (the
// Hopper kernel's consumer warpgroups; every thread of the block elsewhere). rows: where the
// tile's rows live in the output (the decode kernel's packed rows; the identity elsewhere).
template <typename Traits, bool kIsSplit, int kFirstThread = 0, int kThreads = Traits::kNThreads>
__device__ void write_empty_tile(const FwdParams& p, const SeqInfo& seq, int bidb, int bidh, int split_idx,
                                 int m_block, int rows_in_tile, const QueryRows& rows = QueryRows(1)) {
  using Element = typename Traits::Element;
  constexpr int kHeadDim = Traits::kHeadDim;
  const int tidx = threadIdx.x - kFirstThread;
  const int m0 = m_block * Traits::kBlockM;
  if constexpr (kIsSplit) {
    const int64_t head_rows = (int64_t(split_idx) * p.h + bidh) * p.total_q_rows;
    for (int i = tidx; i < rows_in_tile * kHeadDim; i += kThreads) {
      const int r = seq.q_row(p, bidb, m0 + i / kHeadDim);
      p.oaccum_ptr[(head_rows + r) * kHeadDim + i % kHeadDim] = 0.f;
    }
    for (int i = tidx; i < rows_in_tile; i += kThreads) {
      p.lseaccum_ptr[head_rows + seq.q_row(p, bidb, m0 + i)] = -INFINITY;
    }
  } else {
    Element* o = static_cast<Element*>(p.o_ptr) + seq.o_offset + bidh * p.o_head_stride;
    for (int i = tidx; i < rows_in_tile * p.d; i += kThreads) {
      o[rows.offset(m0 + i / p.d, p.o_row_stride, p.o_group_stride) + i % p.d] = Element(0.f);
    }
    for (int i = tidx; i < rows_in_tile; i += kThreads) {
      p.softmax_lse_ptr[bidb * p.lse_batch_stride + bidh * p.lse_head_stride +
                        rows.offset(seq.q_start + m0 + i, p.lse_row_stride, p.lse_group_stride)] = INFINITY;
    }
  }
}

// kSplitPartial from an MMA accumulator (SM80 or GMMA): this thread's fp32 partial output, straight
// from registers (accumulator elements 2i and 2i+1 are neighbours in a row), and lse[] (one per
// accumulator row). tOcO gives each element's (row, col) in the tile, tOcO_rc is its (rows, cols)
// view; the quad lane holding column 0 of a row writes the row's lse.
template <int kHeadDim, typename AccO, typename CoordO, typename CoordORowCol>
__device__ __forceinline__ void write_acc_split_partial(const FwdParams& p, const SeqInfo& seq, const OutputTile& t,
                                                        const AccO& acc_o, const float* lse, const CoordO& tOcO,
                                                        const CoordORowCol& tOcO_rc) {
  constexpr int kRows = decltype(size<0>(tOcO_rc))::value;
  const bool writes_lse = get<1>(tOcO_rc(0, 0)) == 0;
  const int64_t head_rows = (int64_t(t.split_idx) * p.h + t.bidh) * p.total_q_rows;
  const int r0 = seq.q_row(p, t.bidb, t.m0);
  CUTE_UNROLL
  for (int mi = 0; mi < kRows; ++mi) {
    const int row = get<0>(tOcO_rc(mi, 0));
    if (writes_lse && row < t.rows) p.lseaccum_ptr[head_rows + r0 + row] = lse[mi];
  }
  float* oacc = p.oaccum_ptr + (head_rows + r0) * kHeadDim;
  CUTE_UNROLL
  for (int i = 0; i < size(acc_o); i += 2) {
    const int row = get<0>(tOcO(i)), col = get<1>(tOcO(i));
    if (row < t.rows) *reinterpret_cast<float2*>(oacc + int64_t(row) * kHeadDim + col) = make_float2(acc_o(i), acc_o(i + 1));
  }
}

// Prefill and split kernels: acc_o (normalised) and lse[] (one per accumulator row) of this thread,
// tOcO their (row, col) in the tile. The quad lane holding column 0 of a row writes its lse.
// kSplitPartial: write_acc_split_partial; kDirect: the output through shared memory sO (Q's tile,
// no longer read) for 16-byte coalesced stores.
template <typename Traits, OutputMode kMode, typename AccO, typename CoordO, typename SmemO, typename Mma,
          typename Copy>
__device__ __forceinline__ void write_acc_output(const FwdParams& p, const SeqInfo& seq, const OutputTile& t,
                                                 int tidx, AccO& acc_o, const float* lse, CoordO& tOcO,
                                                 SmemO& sO, const Mma& tiled_mma, const Copy& gcopy) {
  Tensor tOcO_rc = rowcol_view(tOcO);
  constexpr int kRows = decltype(size<0>(tOcO_rc))::value;
  if constexpr (kMode == OutputMode::kSplitPartial) {
    write_acc_split_partial<Traits::kHeadDim>(p, seq, t, acc_o, lse, tOcO, tOcO_rc);
  } else {
    static_assert(kMode == OutputMode::kDirect);
    const bool writes_lse = get<1>(tOcO_rc(0, 0)) == 0;
    float* lse_out = p.softmax_lse_ptr + t.bidb * p.lse_batch_stride + t.bidh * p.lse_head_stride;
    CUTE_UNROLL
    for (int mi = 0; mi < kRows; ++mi) {
      const int row = get<0>(tOcO_rc(mi, 0));
      if (writes_lse && row < t.rows) lse_out[int64_t(seq.q_start + t.m0 + row) * p.lse_row_stride] = lse[mi];
    }
    Tensor rO = convert_fragment<typename Traits::Element>(acc_o);
    auto smem_copy_o = make_tiled_copy_C(typename Traits::SmemCopyAtomO{}, tiled_mma);
    auto smem_thr_copy_o = smem_copy_o.get_thread_slice(tidx);
    copy(smem_copy_o, smem_thr_copy_o.retile_S(rO), smem_thr_copy_o.partition_D(sO));
    __syncthreads();
    auto* o_thread = static_cast<typename Traits::Element*>(p.o_ptr) + seq.o_offset + t.bidh * p.o_head_stride +
                     int64_t(t.m0 + gcopy.r0) * p.o_row_stride + gcopy.col0;
    Tensor tOsO = gcopy.partition(sO, tidx);
    gcopy.store_strided(tOsO, o_thread, p.o_row_stride, t.rows);
  }
}

// The tile's final output and softmax_lse: value(e) gives 4 output elements at e = row * kHeadDim +
// col, lse_of(row) the row's natural-log lse (-inf without a visible key: written as +inf).
template <typename Traits, typename Value, typename Lse>
__device__ __forceinline__ void write_final(const FwdParams& p, const SeqInfo& seq, const OutputTile& t, int tidx,
                                            const Value& value, const Lse& lse_of) {
  using Element = typename Traits::Element;
  constexpr int kHeadDim = Traits::kHeadDim;
  const QueryRows& rows = t.query_rows;
  float* lse_out = p.softmax_lse_ptr + t.bidb * p.lse_batch_stride + t.bidh * p.lse_head_stride;
  if (tidx < t.rows) {
    const float lse = lse_of(tidx);
    lse_out[rows.offset(seq.q_start + t.m0 + tidx, p.lse_row_stride, p.lse_group_stride)] =
        lse == -INFINITY ? INFINITY : lse;
  }
  Element* o = static_cast<Element*>(p.o_ptr) + seq.o_offset + t.bidh * p.o_head_stride;
  for (int e = tidx * 4; e < t.rows * kHeadDim; e += Traits::kNThreads * 4) {
    const int row = e / kHeadDim, col = e % kHeadDim;
    if (col >= p.d) continue;  // d is a multiple of 8: 4 columns are all in or all out
    const float4 v = value(e);
    Element out[4] = {Element(v.x), Element(v.y), Element(v.z), Element(v.w)};
    *reinterpret_cast<uint2*>(o + rows.offset(t.m0 + row, p.o_row_stride, p.o_group_stride) + col) =
        *reinterpret_cast<const uint2*>(out);
  }
}

// This split's fp32 partial: lse and output rows at the split's slice of the partial buffers
// ([split][head][row][d]).
template <typename Traits, typename Value, typename Lse>
__device__ __forceinline__ void write_split_partial(const FwdParams& p, const SeqInfo& seq, const OutputTile& t,
                                                    int tidx, const Value& value, const Lse& lse_of) {
  constexpr int kHeadDim = Traits::kHeadDim;
  const int64_t head_rows = (int64_t(t.split_idx) * p.h + t.bidh) * p.total_q_rows;
  const int r0 = seq.q_row(p, t.bidb, t.m0);
  if (tidx < t.rows) p.lseaccum_ptr[head_rows + r0 + tidx] = lse_of(tidx);
  float* oacc = p.oaccum_ptr + (head_rows + r0) * kHeadDim;
  for (int e = tidx * 4; e < t.rows * kHeadDim; e += Traits::kNThreads * 4) {
    *reinterpret_cast<float4*>(oacc + e) = value(e);
  }
}

// kClusterMerged: each split leaves its merged tile (Merged: common/warp_merge.h) in its own
// shared memory, and split 0 merges them through distributed shared memory.
template <typename Traits, typename Merged>
__device__ __forceinline__ void write_cluster_merged(const FwdParams& p, const SeqInfo& seq, const OutputTile& t,
                                                     int tidx, const Merged& tile) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kHeadDim = Traits::kHeadDim;
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  for (int e = tidx * 4; e < t.rows * kHeadDim; e += Traits::kNThreads * 4) {
    *reinterpret_cast<float4*>(tile.o + Merged::o_index(e)) = tile.output(e);  // in place over warp 0's slot: one thread per e
  }
  cluster.sync();  // every split's result is in its shared memory (a releasing arrive)
  if (cluster.block_rank() == 0) {
    const int splits = int(cluster.num_blocks());
    float* weight = tile.scratch();  // [split][row], then the merged lse per row
    static_assert((Traits::kNWarps + 2 + kMaxClusterSplits) * kBlockM * 4 <= Traits::kSmemQBytes,
                  "the cluster merge's weights must fit in Q's shared memory");
    if (tidx < t.rows) {
      // Every split's lse of this row in registers at once (one round of remote loads).
      float l[kMaxClusterSplits];
      float mx = -INFINITY;
      CUTE_UNROLL
      for (int r = 0; r < kMaxClusterSplits; ++r) {
        l[r] = r < splits ? cluster.map_shared_rank(tile.lse, r)[Traits::kNWarps * kBlockM + tidx] : -INFINITY;
        mx = fmaxf(mx, l[r]);
      }
      float sum = 0.f;
      CUTE_UNROLL
      for (int r = 0; r < kMaxClusterSplits; ++r) sum += l[r] == -INFINITY ? 0.f : __expf(l[r] - mx);
      const float lse = sum == 0.f ? -INFINITY : mx + __logf(sum);
      CUTE_UNROLL
      for (int r = 0; r < kMaxClusterSplits; ++r) {
        if (r < splits) weight[r * kBlockM + tidx] = l[r] == -INFINITY ? 0.f : __expf(l[r] - lse);
      }
      weight[splits * kBlockM + tidx] = lse;
    }
    __syncthreads();
    write_final<Traits>(
        p, seq, t, tidx,
        [&](int e) {
          const int row = e / kHeadDim;
          float4 v[kMaxClusterSplits];  // every split's values first (one round of remote loads)
          CUTE_UNROLL
          for (int r = 0; r < kMaxClusterSplits; ++r) {
            if (r < splits) v[r] = *reinterpret_cast<const float4*>(cluster.map_shared_rank(tile.o, r) + Merged::o_index(e));
          }
          float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
          CUTE_UNROLL
          for (int r = 0; r < kMaxClusterSplits; ++r) {  // fixed order: deterministic
            if (r < splits) {
              const float w = weight[r * kBlockM + row];
              sum.x += w * v[r].x, sum.y += w * v[r].y, sum.z += w * v[r].z, sum.w += w * v[r].w;
            }
          }
          return sum;
        },
        [&](int row) { return weight[splits * kBlockM + row]; });
  }
  // Split 0 has read every split's shared memory before any block exits. A relaxed arrive: split
  // 0's remote loads are complete (their values were stored), and its output stores need not be
  // visible to the cluster -- a releasing arrive waited for them (~1 us of the b1 epilogue).
  cute::cluster_arrive_relaxed();
  cute::cluster_wait();
#else
  __trap();  // the dispatcher asks for a cluster merge only on sm_90+, whose code has it
#endif
}

// Decode: the warps' merged tile (common/warp_merge.h) to where kMode sends it.
template <typename Traits, OutputMode kMode, typename Merged>
__device__ __forceinline__ void write_merged(const FwdParams& p, const SeqInfo& seq, const OutputTile& t, int tidx,
                                             const Merged& tile) {
  auto value = [&](int e) { return tile.output(e); };
  auto lse_of = [&](int row) { return tile.tile_lse()[row]; };
  if constexpr (kMode == OutputMode::kDirect) {
    write_final<Traits>(p, seq, t, tidx, value, lse_of);
  } else if constexpr (kMode == OutputMode::kClusterMerged) {
    write_cluster_merged<Traits>(p, seq, t, tidx, tile);
  } else {
    write_split_partial<Traits>(p, seq, t, tidx, value, lse_of);
  }
}

}  // namespace flash
