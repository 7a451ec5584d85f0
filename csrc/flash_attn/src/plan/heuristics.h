// Decisions the dispatcher takes from shapes alone: whether to fold GQA query groups into the
// query-row dimension, how many key splits to run (bound to Python as
// flash_attn.num_splits_heuristic so CPU tests check them), and the deterministic Hopper
// backward's walk. Pure host functions (no CUDA, no torch).
#pragma once

#include <algorithm>

#include "plan/tile_sizes.h"

namespace flash {

inline int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Resident split-kernel thread blocks per SM (shared memory allows two of the 64-row tiles).
constexpr int kSplitBlocksPerSm = 2;

// Fraction of the SMs whose thread blocks, each streaming at its kernel's top rate, already
// saturate DRAM. The decode kernel (its warps stream separate keys): one block reads up to
// ~60 GB/s, the card ~3.1 TB/s, about 52 of 132 SMs on an H100; paged K/V alike. The split
// kernel's 64-row tile (its four warps work through one key block at a time) needs about twice as
// many: on an H100 at 4813d15 (the GQA packing), 32 / 8 heads with 8 and 16 queries (32 and 64
// packed rows, 8 tiles a sequence) ran fastest at 4 splits over 4 sequences and 12-15 over one,
// where 0.4 planned 2 and 7-8 (1.24-1.41x the best time).
constexpr float kDecodeSaturatingSmFraction = 0.4f;
constexpr float kSplitSaturatingSmFraction = 0.8f;

// Decode splits merge inside a thread-block cluster (sm_90) when 2..kMaxClusterSplits of them run
// and the whole grid takes at most this fraction of the SMs: every cluster must be resident at
// once, and clusters pack per GPC (H100: 14-18 SMs a GPC), so a grid near the SM count does not
// fit in one wave (b1 32/32 with 4 splits, 128 blocks in clusters of 4: 1.45x the 3-split time).
constexpr float kClusterSmFraction = 0.75f;

inline bool cluster_mergeable(long long blocks, int splits, int num_sms) {
  return splits >= 2 && splits <= kMaxClusterSplits && blocks * splits <= kClusterSmFraction * num_sms;
}

// Splits of at least this many key blocks are long: the streaming rate of a partial last wave,
// not the blocks' fixed costs, decides between split counts.
constexpr int kLongSplitBlocks = 64;

// The combine kernel's cost beyond a cluster merge, in the model's units (one key block at one
// block's top rate, ~1 us on H100): a second kernel and the fp32 partials' round trip.
constexpr float kCombineCost = 1.0f;

// Number of key splits for a grid of `blocks` thread blocks (batch x heads x query tiles), each
// over `n_blocks` key blocks, with `blocks_per_sm` resident blocks per SM. Time model, in units
// of one key block read at a single block's top rate:
//   sum over waves of (key blocks per split / rate + 1) + merge
// where rate = min(1, saturating SMs / the wave's blocks) is each block's share of the DRAM
// bandwidth (a few blocks stream faster each than a full GPU's worth), +1 is a block's fixed cost
// (Q, the first DRAM round trip, the epilogue) and merge = 0.1 per split for the partials (with a
// 3% margin it breaks ties towards fewer splits), plus kCombineCost unless the splits merge in a
// cluster (`cluster_merge`: the decode kernel). Splitting pays when too few blocks run to
// saturate DRAM; a partial last wave is cheap (its blocks stream faster), so grids of more than
// one wave rarely split. Measured against full sweeps in
// benchmarks/sweep_num_splits.py (contiguous and paged; --grid rows for the split tile).
//
// kv_sharing: how many of the grid's blocks read the same K/V (the kernel heads of a kv head: its
// query heads unpacked, or the parts of its group packed into rows). Such blocks run together and
// their reads meet in L2, so DRAM saturates only at kv_sharing times as many blocks.
inline int num_splits_heuristic(int blocks, int num_sms, int n_blocks, int max_splits, int blocks_per_sm,
                                bool cluster_merge, int kv_sharing, float saturating_sm_fraction) {
  if (blocks <= 0 || n_blocks <= 1) return 1;
  const int slots = num_sms * blocks_per_sm;
  const float saturating = std::max(1.0f, saturating_sm_fraction * num_sms * std::max(1, kv_sharing));
  max_splits = std::min({max_splits, n_blocks, slots});
  int best = 1;
  float best_cost = 3.0e38f;
  for (int s = 1; s <= max_splits; ++s) {
    const int per_split = ceil_div(n_blocks, s);
    // More splits that leave the longest split as long as before only add partials.
    if (s > 1 && ceil_div(n_blocks, s - 1) == per_split) continue;
    const long long total = static_cast<long long>(blocks) * s;
    // A wave of n blocks takes per_split / rate(n) + 1; a partial last wave has fewer blocks, each
    // with a larger share of the bandwidth (b16 2048 12/12: 192 single-split blocks, 1.45 waves,
    // 73.2 us against 76.7 for the 3 waves of 2 splits).
    auto wave_cost = [&](long long n) {
      const float rate = std::min(1.0f, saturating / static_cast<float>(n));
      return per_split / rate + 1.0f;
    };
    const long long full_waves = total / slots, last_wave = total % slots;
    // How much faster the few blocks of a last wave stream depends on the card. For long splits
    // after full waves, a last wave of at most half the slots is charged a full wave's time: b16
    // 12/12 at 8192 / 32768 keys (1.45 waves in one split) ran 2 splits 4-5% faster than 1 on two
    // H100s and within +0.8 / -1.4% of it on others.
    const bool slow_tail = full_waves > 0 && 2 * last_wave <= slots && per_split >= kLongSplitBlocks;
    const float merge = s == 1 ? 0.f
                        : 0.1f * s + (cluster_merge && cluster_mergeable(blocks, s, num_sms) ? 0.f : kCombineCost);
    const float tail = last_wave == 0 ? 0.f : wave_cost(slow_tail ? slots : last_wave);
    const float cost = static_cast<float>(full_waves) * wave_cost(slots) + tail + merge;
    // A larger count must win by 3%: near-ties (large grids, where splits only shuffle wave
    // quantisation) keep fewer partials.
    if (cost < 0.97f * best_cost) {
      best_cost = cost;
      best = s;
    }
  }
  return best;
}

// The Hopper forward's fixed cost per unit of work (a query tile, or one split of it), in key blocks
// of that tile: Q's load, the pipelines' fill and drain, the epilogue.
constexpr int kSm90UnitFixedBlocks = 2;

// The cost of merging the Hopper forward's splits, in key blocks: the combine launch and its tail
// (kSm90MergeFixedBlocks), and per wave of units the fp32 partials written and read back, which,
// unlike K and V, no two units share through L2 (kSm90MergeBlocksPerWave: a 128-row partial is
// as many bytes as a 128-key block of K and V, streamed by every SM at once).
constexpr float kSm90MergeFixedBlocks = 4.0f;
constexpr float kSm90MergeBlocksPerWave = 4.0f;

// Splits for the Hopper forward (persistent, one unit of work per SM at a time;
// sm90/tile_scheduler.h): `units` units (a query tile, or under a causal band a pair of tiles)
// over `unit_blocks` key blocks each. The kernel is compute-bound, so a grid of fewer units than
// SMs leaves SMs idle for the whole call; s splits make units x s units of unit_blocks / s key
// blocks. Time model, in key blocks of one unit on one SM:
//   waves x (ceil(unit_blocks / s) + kSm90UnitFixedBlocks) + merge,  waves = ceil(units x s / SMs),
//   merge = kSm90MergeFixedBlocks + kSm90MergeBlocksPerWave x (units x s / SMs)   (s > 1).
// Splitting must win by 10% over one split, and a larger count by 3% over a smaller one (near-ties
// keep fewer partials). Against the sweep of 1-32 splits on an H100 (sweep_num_splits.py --grid
// prefill, 65-1024 queries over 8k-128k keys, causal or not) it picks the fastest count in 18 of
// 18 cells; counting tiles instead of pairs under a causal mask picked half the splits needed
// (1.43-2.06x the fastest time at 256 and 1024 queries).
inline int sm90_num_splits(long long units, int num_sms, int unit_blocks, int max_splits) {
  if (units <= 0 || unit_blocks <= 1) return 1;
  max_splits = std::min(max_splits, unit_blocks);
  auto cost = [&](int s) {
    const long long split_units = units * s;
    const long long waves = (split_units + num_sms - 1) / num_sms;
    const float merge =
        s == 1 ? 0.f : kSm90MergeFixedBlocks + kSm90MergeBlocksPerWave * static_cast<float>(split_units) / num_sms;
    return static_cast<float>(waves) * (ceil_div(unit_blocks, s) + kSm90UnitFixedBlocks) + merge;
  };
  const float unsplit = cost(1);
  int best = 1;
  float best_cost = unsplit;
  for (int s = 2; s <= max_splits; ++s) {
    if (ceil_div(unit_blocks, s - 1) == ceil_div(unit_blocks, s)) continue;  // as long a split, more partials
    const float c = cost(s);
    if (c < 0.9f * unsplit && c < 0.97f * best_cost) {
      best_cost = c;
      best = s;
    }
  }
  return best;
}

// The Hopper forward's units per (batch, head) and key blocks per unit for seqlen_q queries over
// seqlen_k keys (bottom-right aligned): a query tile sees every key block, or under a causal band
// (`pairs`) query block j sees those up to the diagonal's, and the pair of blocks 0 and
// m_blocks - 1 sums both.
struct Sm90Units {
  int per_head;
  int unit_blocks;
};
inline Sm90Units sm90_units(int seqlen_q, int seqlen_k, TileShape tile, bool pairs) {
  const int m_blocks = ceil_div(seqlen_q, tile.block_m);
  const int n_blocks = std::max(1, ceil_div(seqlen_k, tile.block_n));
  if (!pairs) return {m_blocks, n_blocks};
  auto visible = [&](int j) {
    const long long last_key = static_cast<long long>(seqlen_k) - seqlen_q + static_cast<long long>(j + 1) * tile.block_m;
    return static_cast<int>(std::clamp<long long>((last_key + tile.block_n - 1) / tile.block_n, 0, n_blocks));
  };
  const int unit_blocks = visible(m_blocks - 1) + (m_blocks > 1 ? visible(0) : 0);
  return {(m_blocks + 1) / 2, std::max(1, unit_blocks)};
}

struct ForwardPlan {
  bool swap_seqlen_ngroups;  // run query groups of a kv head as the query rows of one head
  int seqlen_q;              // query rows per (batch, head) the kernel sees
  int num_heads;             // heads the kernel sees
  int num_splits;
  // Run the split kernel + combine, also for a heuristic num_splits == 1 when the query tile is
  // short: its 64-row, 128-key tile streams K/V far better at decode than the prefill tile. An
  // explicit num_splits = 1 keeps upstream's behaviour: the unsplit forward kernel.
  bool split_kernel;
  // num_splits > 1 with more query rows than the split tile holds: the Hopper forward takes these
  // splits where it applies (its split instantiation), the SM80 split kernel elsewhere.
  bool prefill_splits;
  bool decode_kernel;  // the split kernel is the 16-row decode kernel
  // The decode splits of a query tile may run as one thread-block cluster that merges them in
  // shared memory (no partials, no combine launch; the dispatcher adds the sm_90 condition):
  // see cluster_mergeable. A grid beyond one wave of clusters merges with the combine kernel
  // (b16 s2048 12/12, 2 splits in clusters: 82.3 us against 78.7).
  bool cluster_merge;
  long long tiles;  // thread blocks per split: batch x heads x query tiles of the kernel chosen
  // Several queries per sequence with query heads of a kv head packed into the rows of one decode
  // or split tile (common/query_rows.h): query heads per kernel head (the whole group or a part
  // of it); 1 = not packed.
  int pack_groups = 1;
};

// The plan for one forward call, from the caller's shapes. `requested` is the user's num_splits:
// 0 = heuristic, 1 = never split, n > 1 = n splits clamped to the number of key blocks.
// Split-KV is considered whenever a query tile holds every query row of a (batch, head) -- every
// decoding step (max_seqlen_q == 1) whatever the head layout, and the few queries per sequence of
// speculative verification or chunked decode (up to the split tile's 64 rows) -- since then the
// grid is batch x heads blocks, too few to stream K/V at full bandwidth at small batch; an
// explicit n > 1 is honoured for any seqlen_q.
// `can_swap` is false when rows of a group would differ: a window or ALiBi (per position / head),
// or a varlen batch that is not exactly one query per sequence. `can_pack`: a group's heads may
// also be packed with several queries each (no ALiBi, no left window edge, batch-strided queries;
// the mask then compares keys with each row's query position). `sm90_prefill`: the Hopper
// forward can take the call (compute capability 9.0, the dispatcher's sm90_forward_possible); the
// heuristic then also splits longer query lengths, over the Hopper forward's units
// (sm90_num_splits), which pair query tiles under a causal band (`sm90_pairs`, sm90_pairs_tiles).
inline ForwardPlan plan_forward(int batch, int num_heads, int num_heads_k, int max_seqlen_q,
                                int max_seqlen_k, int headdim, bool can_swap, bool can_pack, int num_sms,
                                int requested, bool sm90_prefill = false, bool sm90_pairs = false) {
  ForwardPlan plan{false, max_seqlen_q, num_heads, 1, false, false, false, false, 0};
  const int kernel_hdim = round_up_headdim(headdim);
  const TileShape split_tile = splitkv_tile(kernel_hdim);
  // One query per sequence and several query heads per kv head: the heads of a group share
  // every key, so they become the rows of one query tile.
  const int groups = num_heads / std::max(1, num_heads_k);
  if (max_seqlen_q == 1 && groups > 1 && can_swap) {
    plan.swap_seqlen_ngroups = true;
    plan.seqlen_q = groups;
    plan.num_heads = num_heads_k;
  } else if (max_seqlen_q > 1 && groups > 1 && can_pack && requested != 1 &&
             groups * max_seqlen_q <= split_tile.block_m) {
    // A few queries per sequence (speculative verification): query heads of a group and their
    // queries together fill one tile, which reads each K/V block once for all of them. Unpacked,
    // the group's heads are separate thread blocks that stream the same K/V and meet in L2 only
    // while they run in step (H200, a4b2374, 16 sequences x 16k keys, 32 query / 8 kv heads: 2
    // queries 1.66x the time of one). Only where the decode or split kernel runs: an explicit
    // num_splits = 1 keeps upstream's unsplit kernel, which reads rows at one stride.
    // The whole group where its rows fit the decode kernel's tile; past that, the largest part of
    // the group (at least two heads) whose rows still fit it, since the split kernel's tile runs
    // slower (H100, 4813d15, 32 / 8 heads with 8 queries, 32 packed rows at their best split count:
    // 18.8 / 34.0 us at 4k keys over 1 / 4 sequences, against 17.8 / 32.3 unpacked in the decode
    // kernel); the whole group in the split tile only where no such part exists.
    int pack = groups;
    if (groups * max_seqlen_q > kDecodeBlockM) {
      for (int part = groups / 2; part >= 2; --part) {
        if (groups % part == 0 && part * max_seqlen_q <= kDecodeBlockM) {
          pack = part;
          break;
        }
      }
    }
    plan.pack_groups = pack;
    plan.seqlen_q = pack * max_seqlen_q;
    plan.num_heads = num_heads / pack;
  }
  // Up to kDecodeBlockM rows: the decode kernel (16-row tile, warps split the keys); otherwise
  // the split forward kernel's 64-row tile.
  const bool decode = plan.seqlen_q <= kDecodeBlockM;
  const int block_m = decode ? kDecodeBlockM : split_tile.block_m;
  const int block_n = decode ? decode_keys_per_round(kernel_hdim) : split_tile.block_n;
  const int blocks_per_sm = decode ? decode_blocks_per_sm(kernel_hdim) : kSplitBlocksPerSm;
  const int n_blocks = std::max(1, ceil_div(max_seqlen_k, block_n));
  const long long blocks = static_cast<long long>(batch) * plan.num_heads * ceil_div(plan.seqlen_q, block_m);
  const bool short_queries = plan.seqlen_q <= split_tile.block_m;
  if (requested > 1) {
    plan.num_splits = std::min({requested, n_blocks, kMaxSplits});
  } else if (requested == 0 && short_queries) {
    const int kv_sharing = plan.num_heads / std::max(1, num_heads_k);  // 1 once a whole group is one tile's rows
    plan.num_splits = num_splits_heuristic(static_cast<int>(std::min<long long>(blocks, 1 << 30)), num_sms, n_blocks,
                                           kMaxSplits, blocks_per_sm, decode, kv_sharing,
                                           decode ? kDecodeSaturatingSmFraction : kSplitSaturatingSmFraction);
  } else if (requested == 0 && sm90_prefill) {
    // At most one split per key block of a tile (a pair's splits share each tile's own blocks).
    const TileShape tile = sm90_fwd_tile(kernel_hdim);
    const Sm90Units u = sm90_units(plan.seqlen_q, max_seqlen_k, tile, sm90_pairs);
    plan.num_splits = sm90_num_splits(static_cast<long long>(batch) * plan.num_heads * u.per_head, num_sms,
                                      u.unit_blocks, std::min(kMaxSplits, ceil_div(max_seqlen_k, tile.block_n)));
  }
  // Packed rows run the decode or split kernel even where an explicit num_splits > 1 is cut to one
  // split (fewer key blocks than splits): only those kernels read rows through the packed map.
  plan.split_kernel = plan.num_splits > 1 || (requested == 0 && short_queries) || plan.pack_groups > 1;
  plan.prefill_splits = plan.num_splits > 1 && !short_queries;
  plan.decode_kernel = plan.split_kernel && decode;
  plan.cluster_merge = plan.decode_kernel && cluster_mergeable(blocks, plan.num_splits, num_sms);
  plan.tiles = blocks;
  return plan;
}

// Deterministic Hopper backward (sm90/bwd_dq_order.h): whether the key blocks of a (batch, kv
// head) walk the query blocks from rotated starts instead of in lockstep. Only without a mask that
// bounds rows (every key block then sees every query block), and only where the group's
// key_blocks thread blocks take at most half the SMs: in the rotated order a block waits for
// blocks of its group that start after it, so the whole group must be resident at once; the
// other half leaves room for whatever else shares the GPU (two such kernels cannot then fill it
// with waiting blocks).
inline bool sm90_bwd_rotated_dq_walk(int window_left, int window_right, int key_blocks, int num_sms) {
  return window_left < 0 && window_right < 0 && 2 * key_blocks <= num_sms;
}

}  // namespace flash
