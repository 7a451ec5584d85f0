// Which query tiles each persistent block of the Hopper forward takes, in which order. The
// producer and the consumers of a block walk the same sequence, each with its own scheduler.
//
// Tiles are 128 query rows of one (batch, head). The blocks stride over units of work: a unit is
// one tile, or under a causal mask a pair of tiles, query blocks m_blocks - 1 - i and i of one
// head, whose key blocks sum to the same count for every i; so every unit costs the same and a
// static stride keeps the SMs evenly loaded. The units of one head are neighbours, so the blocks
// that read the same K/V run at the same time and share it through L2; the heavier tile of a pair
// comes first.
//
// kIsSplit: every unit once per split, the split's share of each tile's key blocks
// (common/block_info.h, split_share: equal shares of the tile's own blocks, so a causal pair still
// costs the same in every split). A head's units run split by split: those of one split read the
// same keys.
#pragma once

#include <cstdint>

#include "params/fwd_params.h"
#include "plan/tile_sizes.h"

namespace flash {

struct Sm90Tile {
  int m_block, bidb, bidh, split;
};

template <bool kIsSplit>
class Sm90TileScheduler {
 public:
  __host__ __device__ static bool pairs_blocks(const FwdParams& p) {
    return sm90_pairs_tiles(p.window_left, p.window_right);
  }

  __host__ __device__ static int units_per_head(const FwdParams& p, int m_blocks) {
    return pairs_blocks(p) ? (m_blocks + 1) / 2 : m_blocks;
  }

  // Units of the whole launch (the host sizes the grid by it).
  static int64_t num_units(const FwdParams& p, int m_blocks) {
    return int64_t(units_per_head(p, m_blocks)) * p.b * p.h * (kIsSplit ? p.num_splits : 1);
  }

  __device__ Sm90TileScheduler(const FwdParams& p, int m_blocks)
      : p_(p),
        m_blocks_(m_blocks),
        per_head_(units_per_head(p, m_blocks)),
        num_units_(per_head_ * p.b * p.h * (kIsSplit ? p.num_splits : 1)),
        paired_(pairs_blocks(p)),
        unit_(blockIdx.x) {}

  __device__ bool valid() const { return unit_ < num_units_; }

  // Unit u = ((batch * h + head) * splits + split) * per_head + i.
  __device__ Sm90Tile tile() const {
    const int group = unit_ / per_head_, i = unit_ % per_head_;
    const int bh = kIsSplit ? group / p_.num_splits : group;
    return {second_ ? i : m_blocks_ - 1 - i, bh / p_.h, bh % p_.h, kIsSplit ? group % p_.num_splits : 0};
  }

  __device__ void next() {
    const int i = unit_ % per_head_;
    if (paired_ && !second_ && i != m_blocks_ - 1 - i) {
      second_ = true;
      return;
    }
    second_ = false;
    unit_ += gridDim.x;
  }

 private:
  const FwdParams& p_;
  int m_blocks_, per_head_, num_units_;
  bool paired_;
  int unit_;
  bool second_ = false;
};

}  // namespace flash
