// Tile shapes of the forward kernels, as constexpr functions of the head dim.
// Shared by the launch templates (which instantiate them) and the split heuristic (which needs
// the key-block size), so neither can drift from the other. No CUDA/CUTLASS includes.
#pragma once

namespace flash {

// Kernel head dims: a head dim d runs on the smallest of these that is >= d.
constexpr int kKernelHeadDims[] = {32, 64, 96, 128, 192, 256};

constexpr int round_up_headdim(int d) {
  return d <= 32 ? 32 : d <= 64 ? 64 : d <= 96 ? 96 : d <= 128 ? 128 : d <= 192 ? 192 : 256;
}

struct TileShape {
  int block_m;
  int block_n;
  int warps;
};

// Prefill / general forward. Per thread, a 4-warp tile holds (block_m / 64) * (block_n + headdim)
// fp32 accumulators; keeping that near 192 leaves room for operands under 255 registers.
// Head dims 192 and 256 need 8 warps for the same.
constexpr TileShape fwd_tile(int headdim) {
  return headdim <= 32   ? TileShape{128, 128, 4}
         : headdim <= 96  ? TileShape{128, 64, 4}
         : headdim <= 128 ? TileShape{128, 32, 4}  // H100: 0.89-1.03x torch FA2 vs 0.85-0.98x for 128x64
                          : TileShape{128, 64, 8};
}

// Split-KV forward (decoding). Few query rows, so a 64-row tile; 128-key blocks (64 past head
// dim 128, for registers) so each thread block streams many bytes per barrier.
constexpr TileShape splitkv_tile(int headdim) {
  return headdim <= 128 ? TileShape{64, 128, 4} : TileShape{64, 64, 4};
}

// Hopper forward (sm90/kernel_traits.h, where the choice is explained): 128 query rows, two
// consumer warpgroups and a producer; 128-key blocks up to head dim 128, 80 beyond (registers).
constexpr TileShape sm90_fwd_tile(int headdim) {
  return headdim <= 128 ? TileShape{128, 128, 12} : TileShape{128, 80, 12};
}

// Hopper forward at head dims 192 and 256 over short keys: 64-key blocks instead of 80 when the
// longest key sequence is at most kSm90ShortKeysMax keys. 512 keys are 6.4 blocks of 80, so the
// last of 7 runs its GEMMs and softmax over 48 padding keys (12% of the tile's work), and every
// block pays the same fixed O rescale and pipeline waits; 8 blocks of 64 have no padding. On an
// H200 against the 80-key blocks of commit c1f67f2 (2026-12-07), 64-key blocks ran 512 keys 4-6%
// faster at both head dims, causal or not, and 1,024 keys (13 blocks of 80, 2.5% padding) 3.5%
// slower without a mask, so the bound is 512. Only the plain kernel (unsplit, no block table, no
// score modifiers, no dropout) has the 64-key instantiation.
constexpr int kSm90ShortKeysBlockN = 64;
constexpr int kSm90ShortKeysMax = 512;
constexpr bool sm90_fwd_short_keys(int headdim, int max_seqlen_k) {
  return sm90_fwd_tile(headdim).block_n != 128 && max_seqlen_k <= kSm90ShortKeysMax;
}

// Whether the Hopper forward's scheduler (sm90/tile_scheduler.h) makes one unit of work of query
// blocks i and m_blocks - 1 - i of a head: under a causal band (bounded right, unbounded left),
// where a query block's key count grows with its index, so every pair costs the same.
constexpr bool sm90_pairs_tiles(int window_left, int window_right) { return window_left < 0 && window_right >= 0; }

// Hopper forward at head dim 64 without a mask: 192-row tiles and three consumer warpgroups
// (sm90/kernel_traits.h says why) when the call has at least a wave of such tiles. On an H100
// (2026-12-07, benchmarks/RESULTS.md, "Run at commit 6e9b387") they ran 0.99x at 512-1k keys and
// 1.055-1.175x from 2k against 128-row tiles without a mask, but 0.73-0.89x at 512-2k under the
// causal one: 192-row tiles break the causal pairs' balance (at 512 keys a head is a pair of 4 + 2
// key blocks beside a lone tile of 3) and mask more of each diagonal block. Only the plain kernel
// (unsplit, no block table, no score modifiers, no dropout) has the 192-row instantiation; with
// fewer tiles than SMs, 128-row tiles keep more SMs busy.
constexpr int kSm90WideRowsBlockM = 192;
constexpr bool sm90_fwd_wide_rows(int headdim, int window_left, int window_right, long long wide_tiles,
                                  int num_sms) {
  return headdim == 64 && window_left < 0 && window_right < 0 && wide_tiles >= num_sms;
}

// Whether the Hopper forward has paged instantiations (a block table) at this kernel head dim, and
// whether it reads a paged K/V cache of this page size. Each key block must lie inside one page
// (one TMA box per block), so the page size is a multiple of the key block. Only the 128-key blocks
// (head dims up to 128) have them: the 80-key blocks of head dims 192 and 256 divide no
// power-of-two page size, and page sizes that are multiples of 80 are not worth four more kernels
// per file.
constexpr bool sm90_fwd_has_paged(int headdim) { return sm90_fwd_tile(headdim).block_n == 128; }
constexpr bool sm90_fwd_reads_pages(int headdim, int page_block_size) {
  return sm90_fwd_has_paged(headdim) && page_block_size % sm90_fwd_tile(headdim).block_n == 0;
}

// Decode forward (at most kDecodeBlockM query rows per (batch, head) after the GQA swap): one
// 16-row MMA tile, and the warps split the keys instead of the rows, each warp streaming its own
// kSubN-key sub-blocks through a kStages-deep cp.async ring with its own online softmax; the
// warps' partial results are merged in shared memory at the end. A 64-row tile would spend 63/64
// of its MMAs and shared-memory reads on padding rows for one query.
constexpr int kDecodeBlockM = 16;

struct DecodeTile {
  int sub_n;   // keys per warp step
  int stages;  // cp.async ring depth per warp
  int warps;
};

constexpr DecodeTile decode_tile(int headdim) {
  return headdim <= 128 ? DecodeTile{32, 2, 4} : DecodeTile{16, 2, 4};
}

// Keys one decode thread block consumes per round (every warp one sub-block): the key-block unit
// of the split heuristic for decode.
constexpr int decode_keys_per_round(int headdim) { return decode_tile(headdim).sub_n * decode_tile(headdim).warps; }

constexpr int decode_smem_bytes(int headdim, int elem_bytes = 2) {
  const DecodeTile t = decode_tile(headdim);
  const int q = kDecodeBlockM * headdim * elem_bytes;
  const int max_pages = t.sub_n / 16 + 1;
  const int page_ring = t.warps * (t.stages + 1) * (max_pages <= 4 ? 4 : 8) * 4;  // paged K/V block-table entries
  const int ring = t.warps * t.stages * 2 * t.sub_n * headdim * elem_bytes + page_ring;
  const int merge = t.warps * kDecodeBlockM * (headdim + 4) * 4;  // fp32 partial outputs (rows padded), reuses the ring
  return q + (ring > merge ? ring : merge);
}

// Resident decode blocks per SM on a 228 KB (sm_90) shared-memory SM, 1 KB reserved per block.
constexpr int decode_blocks_per_sm(int headdim) {
  const int n = (228 * 1024) / (decode_smem_bytes(headdim) + 1024);
  return n < 1 ? 1 : n > 8 ? 8 : n;
}

constexpr int kMaxSplits = 128;

// Largest split count merged inside a thread-block cluster (the portable cluster size on sm_90).
constexpr int kMaxClusterSplits = 8;

}  // namespace flash

namespace flash {

// Backward dK/dV kernel: one thread block owns block_n keys of one (batch, kv head) and walks the
// query tiles of every query head of its GQA group; dK and dV accumulate in registers over the
// whole walk, so per thread (2 * block_n * headdim) / (32 * warps) fp32 values stay live. 8 warps
// and 64-row query tiles keep that at 128 up to head dim 256 (128 keys up to head dim 128, 64
// beyond), like FlashAttention-2's tiles.
constexpr TileShape bwd_tile(int headdim) {
  return headdim <= 128 ? TileShape{64, 128, 8} : TileShape{64, 64, 8};
}

// The dK/dV kernel without softcap, ALiBi or dropout. Head dim 64: 128 x 128 tiles (query x key,
// FlashAttention-2's) with two Q/dO shared-memory stages (bwd_kernel_traits.h), so the next query
// tile loads during a whole step; measured fastest on H100 (backward 0.76-0.86x torch FA2, against
// 0.69-0.76x for bwd_tile's 64 x 128 with one stage). Other head dims, and the softcap/ALiBi and
// dropout kernels at every head dim, keep bwd_tile with one stage: two stages at bwd_tile's shapes
// measured slower at head dims 64 and 128.
constexpr TileShape bwd_tile_plain(int headdim) {
  return headdim == 64 ? TileShape{128, 128, 8} : bwd_tile(headdim);
}

constexpr int bwd_qdo_stages_plain(int headdim) { return headdim == 64 ? 2 : 1; }

// Deterministic dQ kernel: one thread block owns block_m query rows of one (batch, head) and walks
// its key blocks in order (forward-style: warps split the rows, dS stays in registers as the A
// operand of dQ += dS K). The dQ accumulator holds headdim / 2 fp32 values per thread; shorter key
// blocks past head dim 128 keep S and dP small beside it.
constexpr TileShape bwd_dq_tile(int headdim) {
  return headdim <= 128 ? TileShape{64, 64, 4} : TileShape{64, 32, 4};
}

// Hopper backward: query rows per step at kernel head dim `headdim` (Sm90BwdTraits::kBlockM;
// sm90/bwd_kernel_traits.h says why 128 at 64 and 64 elsewhere). The dispatcher also sizes the
// deterministic mode's dQ order counters with it: one per (batch, head, query block of this size).
constexpr int sm90_bwd_block_m(int headdim) { return headdim == 64 ? 128 : 64; }

// Hopper backward: keys per thread block (Sm90BwdTraits::kBlockN, where the choice is explained).
// The dispatcher counts a (batch, kv head)'s thread blocks with it (plan/heuristics.h,
// sm90_bwd_rotated_dq_walk).
constexpr int sm90_bwd_block_n(int headdim) { return headdim <= 128 ? 128 : headdim == 192 ? 96 : 64; }

}  // namespace flash
