// Which keys a query tile visits: the key blocks its rows can see (sequence end, causal / local
// window, varlen lengths through SeqInfo) and, with split KV, the share one split (and, in the
// decode kernel, one warp) takes. Query rows are bottom-right aligned: row m sees key
// m + seqlen_k - seqlen_q on the diagonal.
#pragma once

#include "common/seq_info.h"
#include "params/fwd_params.h"

namespace flash {

__device__ __forceinline__ int ceil_div_dev(int a, int b) { return (a + b - 1) / b; }

// Key blocks [min, max).
struct KeyBlocks {
  int min;
  int max;
  __device__ bool empty() const { return max <= min; }
};

// The key blocks of kBlockN keys that query rows [m0, m0 + rows_in_tile) visit: the sequence's
// blocks (with kContiguousSplit, split split_idx's contiguous share of them), cut by the window's
// right edge (0 for causal) and left edge.
template <int kBlockN, bool kContiguousSplit = false>
__device__ __forceinline__ KeyBlocks visible_key_blocks(const FwdParams& p, const SeqInfo& seq, int m0,
                                                        int rows_in_tile, int split_idx = 0) {
  const int diag = seq.seqlen_k - seq.seqlen_q;
  const int n_blocks = ceil_div_dev(seq.seqlen_k, kBlockN);
  KeyBlocks r{0, n_blocks};
  if constexpr (kContiguousSplit) {
    const int per_split = ceil_div_dev(n_blocks, p.num_splits);
    r.min = split_idx * per_split;
    r.max = min(r.max, r.min + per_split);
  }
  if (p.window_right >= 0) r.max = min(r.max, ceil_div_dev(m0 + rows_in_tile + diag + p.window_right, kBlockN));
  if (p.window_left >= 0) r.min = max(r.min, (m0 + diag - p.window_left) / kBlockN);
  return r;
}

// Split split_idx of num_splits of a tile's visible key blocks r: contiguous shares whose sizes
// differ by at most one block (empty ones when r has fewer blocks than splits). The Hopper forward
// splits this way rather than by the sequence's blocks (visible_key_blocks' kContiguousSplit), so
// the splits of one tile cost the same and a causal pair of tiles (sm90/tile_scheduler.h) costs
// the same in every split. 32-bit products: n <= 2^31 / 64 blocks of at least 64 keys, times at
// most kMaxSplits = 128 splits, is below 2^32.
__device__ __forceinline__ KeyBlocks split_share(KeyBlocks r, int split_idx, int num_splits) {
  const unsigned n = unsigned(max(0, r.max - r.min));
  return {r.min + int(n * unsigned(split_idx) / unsigned(num_splits)),
          r.min + int(n * unsigned(split_idx + 1) / unsigned(num_splits))};
}

// Decode: key blocks dealt in rounds of kNWarps, one block per warp, and rounds dealt to the splits
// in turn: split s of S takes rounds s, s + S, s + 2S, ... At any moment the splits of a head read
// neighbouring rounds, so the whole grid sweeps K/V nearly sequentially (contiguous shares put tens
// of concurrent streams at large power-of-two-ish distances: 2-5x slower at 32768 keys and 4-6
// splits). A warp's i-th block is block(i), i < count, inside the range.
template <int kNWarps>
struct RoundRobinBlocks {
  int first_round;  // this split's first round with a block of the range for this warp
  int count;        // blocks of this (split, warp)
  int num_splits;
  int warp;

  __device__ RoundRobinBlocks(KeyBlocks range, int split_idx, int num_splits_, int warp_)
      : num_splits(num_splits_), warp(warp_) {
    const int round_lo = max(0, ceil_div_dev(range.min - warp, kNWarps));                  // first round in the range
    const int round_hi = range.max - warp > 0 ? (range.max - warp - 1) / kNWarps + 1 : 0;  // one past the last
    first_round = split_idx + max(0, ceil_div_dev(round_lo - split_idx, num_splits)) * num_splits;
    count = first_round < round_hi ? ceil_div_dev(round_hi - first_round, num_splits) : 0;
  }

  __device__ static int block_of_round(int round, int warp) { return round * kNWarps + warp; }
  __device__ int block(int i) const { return block_of_round(first_round + i * num_splits, warp); }
};

}  // namespace flash
