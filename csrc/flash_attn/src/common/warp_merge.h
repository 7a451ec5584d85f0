// The decode kernel's warps split the keys of one query tile, each with its own online softmax; here
// their results are merged in shared memory by the log-sum-exp rule. Each warp's rows: lse_w
// (natural log; -inf without a visible key) and the normalised output o_w; the tile's
// lse = log sum_w exp(lse_w), output = sum_w exp(lse_w - lse) o_w.
#pragma once

#include <cmath>

#include <cute/tensor.hpp>

#include "common/mma_utils.h"

namespace flash {

using namespace cute;

// The warps' weighted outputs and the tile's lse in shared memory (over Q and the K/V rings, which
// are no longer needed). lse: [warp][row] the warps' lse, then [kNWarps][row] the tile's, then
// scratch; o: per warp kBlockM rows of kOStride floats -- the pad shifts each row by 4 banks, so
// the eight rows an MMA fragment store touches at once hit different banks (unpadded: 8-way
// conflicts).
template <typename Traits>
struct MergedTile {
  static constexpr int kBlockM = Traits::kBlockM;
  static constexpr int kHeadDim = Traits::kHeadDim;
  static constexpr int kNWarps = Traits::kNWarps;
  static constexpr int kOStride = Traits::kMergeRowStride;

  float* lse;
  float* o;

  __device__ explicit MergedTile(char* smem)
      : lse(reinterpret_cast<float*>(smem)), o(reinterpret_cast<float*>(smem + Traits::kSmemQBytes)) {}

  // Offset of element e = row * kHeadDim + col inside one warp's rows.
  __device__ static int o_index(int e) { return e / kHeadDim * kOStride + e % kHeadDim; }
  __device__ float* tile_lse() const { return lse + kNWarps * kBlockM; }
  __device__ float* scratch() const { return lse + (kNWarps + 1) * kBlockM; }

  // The tile's output at element e (4 elements): the warps' sum.
  __device__ float4 output(int e) const {
    float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
    CUTE_UNROLL
    for (int w = 0; w < kNWarps; ++w) {
      const float4 v = *reinterpret_cast<const float4*>(o + w * kBlockM * kOStride + o_index(e));
      sum.x += v.x, sum.y += v.y, sum.z += v.z, sum.w += v.w;
    }
    return sum;
  }
};

// Every warp's lse and its output scaled by exp(lse_w - lse) into shared memory (the tile's rows
// only: the rest is MMA padding). acc_o: the warp's normalised output, tOcO its (row, col)
// coordinates, lse_w its lse per accumulator row. Ends with the block synchronised.
template <typename Traits, typename AccO, typename CoordO>
__device__ __forceinline__ MergedTile<Traits> merge_warps(char* smem, AccO& acc_o, CoordO& tOcO, const float* lse_w,
                                                          int warp, int rows_in_tile) {
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kNWarps = Traits::kNWarps;
  constexpr int kOStride = Traits::kMergeRowStride;
  Tensor tOcO_rc = rowcol_view(tOcO);
  constexpr int kRows = decltype(size<0>(rowcol_view(acc_o)))::value;
  const MergedTile<Traits> tile(smem);
  __syncthreads();  // every warp is done with Q and its ring
  const bool writes_lse = get<1>(tOcO_rc(0, 0)) == 0;
  CUTE_UNROLL
  for (int mi = 0; mi < kRows; ++mi) {
    if (writes_lse) tile.lse[warp * kBlockM + get<0>(tOcO_rc(mi, 0))] = lse_w[mi];
  }
  __syncthreads();
  float scale[kRows];
  CUTE_UNROLL
  for (int mi = 0; mi < kRows; ++mi) {
    const int row = get<0>(tOcO_rc(mi, 0));
    float mx = -INFINITY;
    CUTE_UNROLL
    for (int w = 0; w < kNWarps; ++w) mx = fmaxf(mx, tile.lse[w * kBlockM + row]);
    float sum = 0.f;
    CUTE_UNROLL
    for (int w = 0; w < kNWarps; ++w) {
      const float l = tile.lse[w * kBlockM + row];
      sum += l == -INFINITY ? 0.f : __expf(l - mx);
    }
    const float lse = sum == 0.f ? -INFINITY : mx + __logf(sum);
    scale[mi] = lse_w[mi] == -INFINITY ? 0.f : __expf(lse_w[mi] - lse);
    if (warp == 0 && writes_lse) tile.tile_lse()[row] = lse;
  }
  Tensor o_rc = rowcol_view(acc_o);
  CUTE_UNROLL
  for (int mi = 0; mi < kRows; ++mi) {
    CUTE_UNROLL
    for (int ni = 0; ni < size<1>(o_rc); ++ni) o_rc(mi, ni) *= scale[mi];
  }
  CUTE_UNROLL
  for (int i = 0; i < size(acc_o); i += 2) {
    const int row = get<0>(tOcO(i)), col = get<1>(tOcO(i));
    if (row < rows_in_tile) {
      *reinterpret_cast<float2*>(tile.o + (warp * kBlockM + row) * kOStride + col) = make_float2(acc_o(i), acc_o(i + 1));
    }
  }
  __syncthreads();
  return tile;
}

}  // namespace flash
