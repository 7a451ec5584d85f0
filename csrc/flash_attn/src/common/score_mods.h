// Changes to the raw scores of one key block before the softmax: softcap, ALiBi bias and the
// visibility mask (sequence end, causal, sliding window). All work on (rows, cols) views of the
// accumulator and of its coordinate tensor.
#pragma once

#include <cmath>

#include <cute/tensor.hpp>

#include "params/fwd_params.h"

namespace flash {

using namespace cute;

// tanh from one exp2 and one division: accurate to ~1e-6 absolute, unlike tanh.approx
// (~5e-4 relative), which a softcap of 30 would turn into percent-level probability errors.
__device__ __forceinline__ float tanh_accurate(float x) {
  const float e = exp2f(x * 2.8853900817779268f);  // exp(2x)
  return 1.f - __fdividef(2.f, e + 1.f);
}

template <typename TS>
__device__ __forceinline__ void apply_softcap(TS& s, float softcap_in) {
  CUTE_UNROLL
  for (int i = 0; i < size(s); ++i) s(i) = tanh_accurate(s(i) * softcap_in);
}

// Geometry of one (query tile, key block) pair in sequence coordinates.
struct BlockCoords {
  int row0;  // first query row of the tile
  int col0;  // first key of the block
  int diag;  // seqlen_k - seqlen_q: key index aligned with query 0 (bottom-right causal)
};

// s -= slope * |i + diag - j|, with the slope already divided by the softmax scale.
template <typename TS, typename TC>
__device__ __forceinline__ void apply_alibi(TS& s, TC const& coord, BlockCoords const& bc, float slope) {
  CUTE_UNROLL
  for (int mi = 0; mi < size<0>(s); ++mi) {
    const int row = bc.row0 + get<0>(coord(mi, 0));
    CUTE_UNROLL
    for (int ni = 0; ni < size<1>(s); ++ni) {
      const int col = bc.col0 + get<1>(coord(0, ni));
      s(mi, ni) -= slope * float(abs(row + bc.diag - col));
    }
  }
}

// Softcap and ALiBi of one (batch, head), in the order the scores take them (before the mask).
// kEnabled is the instantiation's: the kernels without score modifiers pass false, read nothing
// and carry none of this code.
template <bool kEnabled>
struct ScoreMods {
  const FwdParams& p;
  float alibi_slope;  // divided by the softmax scale (see FwdParams); 0 without ALiBi

  __device__ __forceinline__ ScoreMods(const FwdParams& params, int bidb, int bidh)
      : p(params),
        alibi_slope(kEnabled && params.alibi_slopes_ptr != nullptr
                        ? params.alibi_slopes_ptr[bidb * params.alibi_slopes_batch_stride + bidh] / params.scale_softmax
                        : 0.f) {}

  // acc: the block's raw scores; s and coord: their (rows, cols) views.
  template <typename TAcc, typename TS, typename TC>
  __device__ __forceinline__ void apply(TAcc& acc, TS& s, TC const& coord, BlockCoords const& bc) const {
    if constexpr (kEnabled) {
      if (p.softcap_in > 0.f) apply_softcap(acc, p.softcap_in);
      if (p.alibi_slopes_ptr != nullptr) apply_alibi(s, coord, bc, alibi_slope);
    }
  }
};

// The query position of a block's row r, relative to bc.row0: the row itself, unless the rows are
// packed GQA queries (common/query_rows.h: r / G).
struct RowIsPosition {
  __device__ int operator()(int r) const { return r; }
};

// Scores of invisible keys become -inf: keys past seqlen_k and keys outside
// [i + diag - window_left, i + diag + window_right] (negative windows are unbounded), i the
// position of the row.
template <typename TS, typename TC, typename Position = RowIsPosition>
__device__ __forceinline__ void apply_mask(TS& s, TC const& coord, BlockCoords const& bc, int seqlen_k,
                                           int window_left, int window_right, Position const& position = {}) {
  CUTE_UNROLL
  for (int mi = 0; mi < size<0>(s); ++mi) {
    const int row = bc.row0 + position(get<0>(coord(mi, 0)));
    const int hi = window_right >= 0 ? min(seqlen_k - 1, row + bc.diag + window_right) : seqlen_k - 1;
    const int lo = window_left >= 0 ? row + bc.diag - window_left : 0;
    CUTE_UNROLL
    for (int ni = 0; ni < size<1>(s); ++ni) {
      const int col = bc.col0 + get<1>(coord(0, ni));
      if (col < lo || col > hi) s(mi, ni) = -INFINITY;
    }
  }
}

// Whether any score of the block needs the mask (the block straddles the sequence end or a
// window edge); interior blocks skip it.
__device__ __forceinline__ bool block_needs_mask(BlockCoords const& bc, int block_n, int rows_in_tile,
                                                 int seqlen_k, int window_left, int window_right) {
  return bc.col0 + block_n > seqlen_k ||
         (window_right >= 0 && bc.col0 + block_n - 1 > bc.row0 + bc.diag + window_right) ||
         (window_left >= 0 && bc.col0 < bc.row0 + rows_in_tile - 1 + bc.diag - window_left);
}

}  // namespace flash
