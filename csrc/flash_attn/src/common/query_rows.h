// Where a tile's query rows live. Unpacked, row r of (batch, head) is query r of that head. With
// G query heads of a GQA group packed into the rows (FwdParams::pack_groups = G > 1: a few
// queries per sequence, all in one tile of the decode or the split kernel), the kernel's head h
// stands for query heads h * G .. h * G + G - 1 (the whole group of its kv head, or a part of it)
// and row r is query r / G of query head h * G + r % G: those G heads then read each K/V block
// once, in one thread block, where G blocks would each stream it.
#pragma once

#include <cstdint>

#include "common/seq_info.h"
#include "params/fwd_params.h"

namespace flash {

// What the mask and visible_key_blocks compare with keys for one tile: its sequence with seqlen_q
// counted in query positions, the diagonal's key offset, and how many positions the tile spans.
struct TilePositions {
  SeqInfo seq;
  int diag;   // seqlen_k - positions: the key index aligned with position 0 (bottom-right causal)
  int count;  // positions of the tile's rows
};

struct QueryRows {
  int groups;  // G; 1 when unpacked

  __device__ explicit QueryRows(const FwdParams& p) : groups(p.pack_groups > 1 ? p.pack_groups : 1) {}
  __device__ explicit QueryRows(int groups_) : groups(groups_) {}

  __device__ bool packed() const { return groups > 1; }
  // The query's index in its sequence: what the causal mask and the window compare with keys.
  __device__ int position(int r) const { return r / groups; }
  // Rows [m0, m0 + rows_in_tile) of seq as positions. A packed tile holds every row (m0 = 0), so
  // m0 is the tile's first position either way.
  __device__ TilePositions positions(const SeqInfo& seq, int m0, int rows_in_tile) const {
    SeqInfo in_positions = seq;
    in_positions.seqlen_q = seq.seqlen_q / groups;
    return {in_positions, seq.seqlen_k - in_positions.seqlen_q, position(m0 + rows_in_tile - 1) - m0 + 1};
  }
  // Elements from row 0 of the (batch, head) to row r, in a tensor with these strides.
  __device__ int64_t offset(int r, int64_t row_stride, int64_t group_stride) const {
    return int64_t(r / groups) * row_stride + int64_t(r % groups) * group_stride;
  }
};

// Rows [m0, m0 + valid_rows) of q into shared memory through gcopy (common/gmem_copy.h; tQsQ its
// partition of the Q tile), q_base pointing at row 0 of the (batch, head): at q's row stride, or
// through the packed map.
template <typename Copy, typename TS, typename Element>
__device__ __forceinline__ void load_query_rows(const Copy& gcopy, TS& tQsQ, const Element* q_base, const FwdParams& p,
                                                const QueryRows& rows, int m0, int valid_rows) {
  if (rows.packed()) {
    gcopy.load_rows(
        tQsQ, [&](int r) { return q_base + rows.offset(m0 + r, p.q_row_stride, p.q_group_stride); }, valid_rows,
        q_base);
  } else {
    gcopy.load_strided(tQsQ, q_base + int64_t(m0 + gcopy.r0) * p.q_row_stride + gcopy.col0, p.q_row_stride,
                       valid_rows, q_base);
  }
}

}  // namespace flash
