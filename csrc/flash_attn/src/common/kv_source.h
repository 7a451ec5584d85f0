// Where a sequence's key / value rows lie in global memory, and how a kernel brings a block of them
// into shared memory. The layout is a compile-time choice, so each kernel carries only its own code
// and registers:
//   kStrided      rows at a fixed stride from the sequence's first key row;
//   kPagedRows    a block table, rows at any alignment (left padding): each row (prefill) or each
//                 decode sub-block's up to kMaxPages pages look their page up; strided rows when the
//                 call has no block table (one kernel serves both);
//   kPagedGroups  a block table, no left padding: key row j of the sequence is row j of its pages,
//                 and every 16-row group of a decode sub-block lies in one page.
// Page indices read from the block table are clamped (and reported) by guard_page.
#pragma once

#include <cute/tensor.hpp>
#include <cute/arch/copy_sm80.hpp>
#include <cutlass/fast_math.h>

#include "common/block_info.h"
#include "common/gmem_copy.h"
#include "common/index_guard.h"
#include "common/seq_info.h"
#include "params/fwd_params.h"

namespace flash {

enum class KvLayout { kStrided, kPagedRows, kPagedGroups };

// The block-table entry (of one sequence's table row) that holds sequence row `row`, and the
// row's offset inside that page.
struct PagedRow {
  int entry;
  int in_page;
};
__device__ __forceinline__ PagedRow paged_row(const int* table_row, int row, int page_size) {
  return {table_row[row / page_size], row % page_size};
}

// A thread's K / V base pointers for copy chunk (r0, col0): `head` at row 0 of the kv head (of
// page 0 when paged), `rows` at the sequence's first key row (strided), and the sequence's row of
// the block table (nullptr without one).
template <typename Element>
struct KvPointers {
  const Element* k_head;
  const Element* v_head;
  const Element* k_rows;
  const Element* v_rows;
  const int* block_table;

  __device__ KvPointers(const FwdParams& p, const SeqInfo& seq, int bidb, int bidh, int r0, int col0) {
    const int kv_head = bidh / p.h_h_k_ratio;
    k_head = static_cast<const Element*>(p.k_ptr) + kv_head * p.k_head_stride + col0;
    v_head = static_cast<const Element*>(p.v_ptr) + kv_head * p.v_head_stride + col0;
    k_rows = k_head + seq.k_offset + int64_t(seq.k_row0 + r0) * p.k_row_stride;
    v_rows = v_head + seq.v_offset + int64_t(seq.k_row0 + r0) * p.v_row_stride;
    block_table = p.block_table != nullptr ? p.block_table + bidb * p.block_table_batch_stride : nullptr;
  }
};

// Prefill / split kernels: key block rows [j0, j0 + kBlockN) of K (kIsV false) or V into tS, one
// table lookup per row when the call is paged (kMayPage: the extras kernel), else strided.
template <bool kIsV, bool kMayPage, typename Copy, typename TS, typename Element>
__device__ __forceinline__ void load_key_block(const Copy& gcopy, TS& tS, const FwdParams& p, const SeqInfo& seq,
                                               const KvPointers<Element>& kv, int j0) {
  const Element* head = kIsV ? kv.v_head : kv.k_head;
  const int64_t row_stride = kIsV ? p.v_row_stride : p.k_row_stride;
  if (kMayPage && kv.block_table != nullptr) {
    gcopy.load_paged(tS, head, seq.k_row0 + j0, seq.seqlen_k - j0, kv.block_table, p.page_block_size, p.num_pages,
                     p.index_errors, kIsV ? p.v_batch_stride : p.k_batch_stride, row_stride);
  } else {
    gcopy.load_strided(tS, (kIsV ? kv.v_rows : kv.k_rows) + int64_t(j0) * row_stride, row_stride, seq.seqlen_k - j0,
                       head);
  }
}

// One warp's K/V sub-blocks (kSubN rows) of one (sequence, kv head) for the decode kernel.
//
// The paged layouts keep, per warp, a ring of Traits::kPageSlots slots after the K/V rings: slot
// j % kPageSlots holds the block-table entries of the warp's j-th sub-block, copied (cp.async) from
// the block table kStages sub-blocks before they are needed, inside an earlier stage's commit
// group -- no register holds an in-flight load, no load-use stall sits in front of the K/V copies.
// kPagedGroups stores each group's in-page row beside its entry (plain stores by the same lanes).
template <typename Traits, KvLayout kLayout>
struct DecodeKvSource {
  using Element = typename Traits::Element;
  using Copy = GmemTileCopy<typename Traits::WarpCopy>;
  static constexpr int kSubN = Traits::kSubN;
  static constexpr int kStages = Traits::kStages;
  static constexpr int kGroups = kSubN / 16;
  static constexpr int kMaxPages = Traits::kMaxPages;

  const FwdParams& p;
  const cutlass::FastDivmod& page_div;  // row -> (entry, in-page row) for kPagedGroups
  const int* block_table;               // this sequence's row of the table; nullptr without one
  int* page_ring;                       // this warp's slots
  int lane;
  bool has_table;  // block_table != nullptr, decided once: the score-modifier loop spills less than
                   // when each load re-tests the pointer

  __device__ DecodeKvSource(const FwdParams& p_, const cutlass::FastDivmod& page_div_, char* smem, int bidb, int warp,
                            int lane_)
      : p(p_),
        page_div(page_div_),
        block_table(p_.block_table != nullptr ? p_.block_table + bidb * p_.block_table_batch_stride : nullptr),
        page_ring(reinterpret_cast<int*>(smem + Traits::kSmemQBytes + Traits::kSmemRingBytes) +
                  warp * Traits::kPageSlots * Traits::kPageSlotInts),
        lane(lane_),
        has_table(block_table != nullptr) {}

  // Whether this call reads pages (the paged-groups kernel always has a block table).
  __device__ bool paged() const {
    return kLayout == KvLayout::kPagedGroups || (kLayout == KvLayout::kPagedRows && has_table);
  }

  __device__ int* slot(int j) const { return page_ring + (j % Traits::kPageSlots) * Traits::kPageSlotInts; }

  // kPagedGroups, slot j <- sub-block sb: lane g < kGroups copies group g's entry and stores its
  // in-page row. Rows past the block table's p.seqlen_k rows, or an unused slot, copy zeros.
  __device__ void fetch_groups(int j, int sb, bool used) const {
    if (lane < kGroups) {
      const int row = sb * kSubN + 16 * lane;
      int entry, in_page;
      page_div(entry, in_page, row);
      const bool ok = used && row < p.seqlen_k;
      int* s = slot(j);
      SM80_CP_ASYNC_CACHEALWAYS_ZFILL<int32_t>::copy(block_table[ok ? entry : 0], s[lane], ok);
      s[kGroups + lane] = in_page;
    }
  }

  // kPagedRows, slot j <- the warp's j-th sub-block: lane q < kMaxPages copies the q-th entry the
  // sub-block touches (zeros past the sequence, or past the warp's last sub-block).
  template <int kNWarps>
  __device__ void fetch_pages(int j, const RoundRobinBlocks<kNWarps>& blocks, const SeqInfo& seq) const {
    if (lane < kMaxPages) {
      const int entry = (seq.k_row0 + blocks.block(j) * kSubN) / p.page_block_size + lane;
      const bool used = j < blocks.count && entry * p.page_block_size < seq.k_row0 + seq.seqlen_k;
      SM80_CP_ASYNC_CACHEALWAYS_ZFILL<int32_t>::copy(used ? block_table[entry] : block_table[0], slot(j)[lane], used);
    }
  }

  // Without a window's left edge a split's first sub-blocks are rounds s, s + S, ... whatever the
  // sequence lengths are: kPagedGroups fetches their entries before the lengths load, so the
  // block-table read overlaps the length reads instead of following them.
  // kStrided, a contiguous cache whose lengths come from seqused_k (cache_seqlens): the K rows of
  // the warp's first sub-block are asked of L2 while the length loads, so their copy, issued once
  // it lands, hits L2 instead of paying a second DRAM round trip (V is needed only after the
  // softmax, by when its copy has landed). Their place does not depend on the length without a
  // batch index, left padding or a window's left edge, and rows past the length but inside the
  // cache's p.seqlen_k rows are allocated (a wasted read at worst). The kernel issues the length's
  // load before this (decode_kernel.h): behind the prefetches it started ~300 instructions later.
  __device__ bool fetches_early() const { return kLayout == KvLayout::kPagedGroups && p.window_left < 0; }
  __device__ bool prefetches_early() const {
    return kLayout == KvLayout::kStrided && p.seqused_k != nullptr && p.cu_seqlens_k == nullptr &&
           p.cache_batch_idx == nullptr && p.leftpad_k == nullptr && p.window_left < 0;
  }
  __device__ void fetch_before_lengths(int split_idx, int warp, int bidb, int bidh) const {
    if (fetches_early()) {
      CUTE_UNROLL
      for (int j = 0; j < kStages; ++j) {
        fetch_groups(j, RoundRobinBlocks<Traits::kNWarps>::block_of_round(split_idx + j * p.num_splits, warp), true);
      }
      cp_async_fence();
    } else if (prefetches_early()) {
      const Element* k = static_cast<const Element*>(p.k_ptr) + bidb * p.k_batch_stride +
                         (bidh / p.h_h_k_ratio) * p.k_head_stride;
      const int row0 = RoundRobinBlocks<Traits::kNWarps>::block_of_round(split_idx, warp) * kSubN;
      prefetch_rows_to_l2<kSubN, Traits::kHeadDim>(k + int64_t(row0) * p.k_row_stride, min(kSubN, p.seqlen_k - row0),
                                                   p.k_row_stride, p.d, lane);
    }
  }

  // The entries of the warp's first kStages sub-blocks (unless fetch_before_lengths did), landed
  // and visible to the whole warp.
  template <int kNWarps>
  __device__ void fetch_first(const RoundRobinBlocks<kNWarps>& blocks, const SeqInfo& seq) const {
    if constexpr (kLayout == KvLayout::kPagedGroups) {
      if (!fetches_early()) {
        CUTE_UNROLL
        for (int j = 0; j < kStages; ++j) fetch_groups(j, blocks.block(j), j < blocks.count);
        cp_async_fence();
      }
      cp_async_wait<0>();
      __syncwarp();  // every lane's entries and offsets are in the ring
    } else if constexpr (kLayout == KvLayout::kPagedRows) {
      if (has_table) {
        CUTE_UNROLL
        for (int j = 0; j < kStages; ++j) fetch_pages(j, blocks, seq);
        cp_async_fence();
        cp_async_wait<0>();
        __syncwarp();  // every lane's entries are in the ring
      }
    }
  }

  template <int kNWarps>
  __device__ void fetch_next(int j, const RoundRobinBlocks<kNWarps>& blocks, const SeqInfo& seq) const {
    if constexpr (kLayout == KvLayout::kPagedGroups) {
      fetch_groups(j, blocks.block(j), j < blocks.count);
    } else if constexpr (kLayout == KvLayout::kPagedRows) {
      fetch_pages(j, blocks, seq);
    }
  }

  // A sub-block inside the sequence with the whole head dim used: its copies need no predicates.
  // (A bool of its own: ptxas then keeps the rolled predicated copies out of the full path.)
  __device__ static bool full_sub_block(int sb, bool full_width, const SeqInfo& seq) {
    return full_width && (sb + 1) * kSubN <= seq.seqlen_k;
  }

  // The warp's i-th sub-block (block sb of the sequence) into tK / tV; first the entries of its
  // (i + kStages)-th. full_width: the head dim fills the tile. A full sub-block copies without
  // predicates (every sub-block but the last when d == kHeadDim); the predicated copies run
  // rolled so that ptxas keeps them out of the full path.
  template <int kNWarps, typename TK, typename TV>
  __device__ void load(TK& tK, TV& tV, int i, int sb, bool full_width, const RoundRobinBlocks<kNWarps>& blocks,
                       const SeqInfo& seq, const Copy& gcopy, const KvPointers<Element>& kv) const {
    const int valid_rows = seq.seqlen_k - sb * kSubN;
    const int* s = slot(i);
    if constexpr (kLayout == KvLayout::kPagedGroups) {
      fetch_next(i + kStages, blocks, seq);  // landed when needed
      int page[kGroups], in_page[kGroups];
      CUTE_UNROLL
      for (int g = 0; g < kGroups; ++g) {
        // A group past the sequence's length copies nothing; its entry (fetched before the length
        // was known) may be any padding value, so it is neither used nor reported.
        page[g] = 16 * g < valid_rows ? guard_page(s[g], p.num_pages, p.index_errors) : 0;
        in_page[g] = s[kGroups + g];
      }
      if (full_sub_block(sb, full_width, seq)) {
        gcopy.template load_paged_groups<true>(tK, kv.k_head, page, in_page, valid_rows, p.k_batch_stride, p.k_row_stride);
        gcopy.template load_paged_groups<true>(tV, kv.v_head, page, in_page, valid_rows, p.v_batch_stride, p.v_row_stride);
      } else {
        gcopy.template load_paged_groups<false, true>(tK, kv.k_head, page, in_page, valid_rows, p.k_batch_stride,
                                                      p.k_row_stride);
        gcopy.template load_paged_groups<false, true>(tV, kv.v_head, page, in_page, valid_rows, p.v_batch_stride,
                                                      p.v_row_stride);
      }
    } else if (kLayout == KvLayout::kPagedRows && paged()) {
      fetch_next(i + kStages, blocks, seq);
      int pages[kMaxPages];
      CUTE_UNROLL
      for (int q = 0; q < kMaxPages; ++q) pages[q] = guard_page(s[q], p.num_pages, p.index_errors);
      const int row0 = seq.k_row0 + sb * kSubN;
      const int offset = row0 - row0 / p.page_block_size * p.page_block_size;
      gcopy.load_paged_prefetched(tK, kv.k_head, offset, valid_rows, pages, p.page_block_size, p.k_batch_stride,
                                  p.k_row_stride);
      gcopy.load_paged_prefetched(tV, kv.v_head, offset, valid_rows, pages, p.page_block_size, p.v_batch_stride,
                                  p.v_row_stride);
    } else {
      const int j0 = sb * kSubN;
      const Element* k_src = kv.k_rows + int64_t(j0) * p.k_row_stride;
      const Element* v_src = kv.v_rows + int64_t(j0) * p.v_row_stride;
      if (full_sub_block(sb, full_width, seq)) {
        gcopy.template load_strided<true>(tK, k_src, p.k_row_stride, valid_rows, kv.k_head);
        gcopy.template load_strided<true>(tV, v_src, p.v_row_stride, valid_rows, kv.v_head);
      } else {
        gcopy.template load_strided<false, true>(tK, k_src, p.k_row_stride, valid_rows, kv.k_head);
        gcopy.template load_strided<false, true>(tV, v_src, p.v_row_stride, valid_rows, kv.v_head);
      }
    }
  }
};

}  // namespace flash
