// Tile copies between global and shared memory in 16-byte chunks.
//
// Thread t owns row r0 = t / kThreadsPerRow of every kRowsPerPass-row slab and chunks
// c0 + c * kThreadsPerRow of that row (consecutive threads read consecutive chunks: coalesced).
// Shared-memory addresses come from a CuTe partition of the swizzled tile, so only the loop
// indices vary at run time; global addresses are one base pointer per thread plus a row stride,
// or a block-table lookup per row for paged K/V.
#pragma once

#include <cute/tensor.hpp>
#include <cute/arch/copy_sm80.hpp>

#include "common/index_guard.h"

namespace flash {

using namespace cute;

// One warp asks L2 for the first `rows` (at most kMaxRows) rows of `cols` (at most kMaxCols)
// elements each (row r at base + r * row_stride elements), one 128-byte line per lane and request.
// A hint only: nothing waits for it and no register holds its data; it lets copies issued later
// (once their predicates are known) hit L2.
template <int kMaxRows, int kMaxCols, typename Element>
__device__ __forceinline__ void prefetch_rows_to_l2(const Element* base, int rows, int64_t row_stride, int cols,
                                                    int lane) {
  constexpr int kMaxLinesPerRow = (kMaxCols * int(sizeof(Element)) + 127) / 128;
  constexpr int kLines = kMaxRows * kMaxLinesPerRow;
  const int row_bytes = cols * int(sizeof(Element));
  CUTE_UNROLL
  for (int i0 = 0; i0 < kLines; i0 += 32) {
    const int i = i0 + lane, row = i / kMaxLinesPerRow, line_bytes = i % kMaxLinesPerRow * 128;
    if ((kLines % 32 == 0 || i < kLines) && row < rows && line_bytes < row_bytes) {
      const char* line = reinterpret_cast<const char*>(base + int64_t(row) * row_stride) + line_bytes;
      asm volatile("prefetch.global.L2 [%0];" ::"l"(line));
    }
  }
}

template <typename Traits>
struct GmemTileCopy {
  using Element = typename Traits::Element;
  static constexpr int kRowsPerPass = Traits::kRowsPerPass;
  static constexpr int kChunkStride = Traits::kThreadsPerRow * Traits::kElemsPerChunk;  // elements
  using ThreadLayout = Layout<Shape<Int<kRowsPerPass>, Int<Traits::kThreadsPerRow>>, Stride<Int<Traits::kThreadsPerRow>, _1>>;
  using TiledCopy = decltype(make_tiled_copy(Copy_Atom<UniversalCopy<uint128_t>, Element>{}, ThreadLayout{},
                                             Layout<Shape<_1, Int<Traits::kElemsPerChunk>>>{}));

  int r0;               // this thread's row within each slab
  int col0;             // element column of this thread's first chunk
  uint32_t chunk_mask;  // bit c: chunk c lies inside the real head dim

  __device__ GmemTileCopy(int tidx, int d)
      : r0(tidx / Traits::kThreadsPerRow), col0((tidx % Traits::kThreadsPerRow) * Traits::kElemsPerChunk) {
    chunk_mask = 0;
    CUTE_UNROLL
    for (int c = 0; c < Traits::kChunksPerThreadRow; ++c) chunk_mask |= uint32_t(col0 + c * kChunkStride < d) << c;
  }

  // This thread's chunks of a shared tile: (chunk elements, slab, chunk).
  template <typename SmemTensor>
  __device__ auto partition(SmemTensor& s, int tidx) const {
    return TiledCopy{}.get_thread_slice(tidx).partition_D(s);
  }

  // Shared address of this thread's chunk c in slab i. Slabs start on 8-row swizzle-atom
  // boundaries when kRowsPerPass % 8 == 0; the swizzle then leaves the slab offset untouched, so
  // slab i is slab 0 plus a constant and the compiler keeps one address instead of one per slab.
  template <typename TS>
  __device__ static auto chunk_ptr(TS& tS, int i, int c) {
    if constexpr (kRowsPerPass % 8 == 0) {
      // kRowsPerPass rows = kRowsPerPass / 8 atoms down; atoms of 8 x kSmemAtomCols elements are
      // stacked along rows first (tile_to_shape's column-major atom order).
      constexpr int kSlabStride = kRowsPerPass * Traits::kSmemAtomCols;
      return &tS(0, 0, c) + i * kSlabStride;
    } else {
      return &tS(0, i, c);
    }
  }

  __device__ static void cp_async(const Element* src, Element* dst, bool ok) {
    SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<uint128_t>::copy(*reinterpret_cast<const uint128_t*>(src),
                                                    *reinterpret_cast<uint128_t*>(dst), ok);
  }

  // A chunk known to lie inside the tensor: no predicate, no fallback address.
  __device__ static void cp_async_unmasked(const Element* src, Element* dst) {
    SM80_CP_ASYNC_CACHEGLOBAL<uint128_t>::copy(*reinterpret_cast<const uint128_t*>(src),
                                              *reinterpret_cast<uint128_t*>(dst));
  }

  // Row pass i of the tile from `src` (this thread's first chunk of that row). Rows >= valid_rows
  // and chunks past the head dim are zero-filled (cp.async src-size 0), so no plain stores race
  // with the copies; `fallback` is any valid global address. kFull: the caller knows the row is
  // valid and the head dim fills the tile: no predicate and no select (a tile's 16-32 row
  // predicates overflow the predicate registers, so the compiler packs and unpacks them per copy).
  template <bool kFull, typename TS>
  __device__ void copy_pass(TS& tS, int i, const Element* src, int valid_rows, const Element* fallback) const {
    const bool row_ok = r0 + i * kRowsPerPass < valid_rows;
    CUTE_UNROLL
    for (int c = 0; c < size<2>(tS); ++c) {
      if constexpr (kFull) {
        cp_async_unmasked(src + c * kChunkStride, chunk_ptr(tS, i, c));
      } else {
        const bool ok = row_ok && (chunk_mask >> c & 1);
        cp_async(ok ? src + c * kChunkStride : fallback, chunk_ptr(tS, i, c), ok);
      }
    }
  }

  // kPasses row passes from pass `first`, rows at a fixed stride from `src`. kRolled keeps the loop
  // rolled, for a path that runs once per sequence beside an unrolled kFull one: ptxas if-converts
  // two unrolled variants of a branch into one predicated block that issues both (the decode loop's
  // copies: ~400 instructions per sub-block where the kFull path alone is ~130), but it cannot
  // predicate a loop.
  template <bool kFull, bool kRolled, int kPasses, typename TS>
  __device__ void copy_passes(TS& tS, int first, const Element* src, int64_t row_stride, int valid_rows,
                              const Element* fallback) const {
    if constexpr (kRolled) {
#pragma unroll 1
      for (int j = 0; j < kPasses; ++j) {
        copy_pass<kFull>(tS, first + j, src, valid_rows, fallback);
        src += int64_t(kRowsPerPass) * row_stride;
      }
    } else {
      CUTE_UNROLL
      for (int j = 0; j < kPasses; ++j) {
        copy_pass<kFull>(tS, first + j, src + int64_t(j * kRowsPerPass) * row_stride, valid_rows, fallback);
      }
    }
  }

  // Rows anywhere: row_ptr(r) points at row r of the tile (its column 0). Rows >= valid_rows are
  // zero-filled and row_ptr is not asked for them.
  template <typename TS, typename RowPtr>
  __device__ void load_rows(TS& tS, const RowPtr& row_ptr, int valid_rows, const Element* fallback) const {
    CUTE_UNROLL
    for (int i = 0; i < size<1>(tS); ++i) {
      const int r = r0 + i * kRowsPerPass;
      copy_pass<false>(tS, i, r < valid_rows ? row_ptr(r) + col0 : fallback, valid_rows, fallback);
    }
  }

  // Rows at a fixed stride. `src` points at this thread's first chunk of row r0 of the tile.
  template <bool kFull = false, bool kRolled = false, typename TS>
  __device__ void load_strided(TS& tS, const Element* src, int64_t row_stride, int valid_rows,
                               const Element* fallback) const {
    copy_passes<kFull, kRolled, decltype(size<1>(tS))::value>(tS, 0, src, row_stride, valid_rows, fallback);
  }

  // Paged rows: tile row r is sequence row first_row + r, found in page
  // block_table[row / page_size] at offset row % page_size. `head_base` points at this
  // thread's first chunk of row 0 of page 0 for the kv head.
  template <typename TS>
  __device__ void load_paged(TS& tS, const Element* head_base, int first_row, int valid_rows, const int* block_table,
                             int page_size, int num_pages, unsigned* index_errors, int64_t page_stride,
                             int64_t row_stride) const {
    CUTE_UNROLL
    for (int i = 0; i < size<1>(tS); ++i) {
      const bool row_ok = r0 + i * kRowsPerPass < valid_rows;
      const int row = first_row + r0 + i * kRowsPerPass;
      const int page = row_ok ? guard_page(block_table[row / page_size], num_pages, index_errors) : 0;
      const Element* src = head_base + int64_t(page) * page_stride + int64_t(row % page_size) * row_stride;
      copy_pass<false>(tS, i, src, valid_rows, head_base);
    }
  }

  // Paged rows in 16-row groups that each lie inside one page (page sizes are multiples of 16 and
  // the tile starts on a group boundary): group g is rows in_page[g] .. + 15 of page page[g], both
  // looked up beforehand. One address per group, then rows at a fixed stride as in load_strided
  // (kFull, kRolled likewise).
  template <bool kFull, bool kRolled = false, int kGroups, typename TS>
  __device__ void load_paged_groups(TS& tS, const Element* head_base, const int (&page)[kGroups],
                                    const int (&in_page)[kGroups], int valid_rows, int64_t page_stride,
                                    int64_t row_stride) const {
    constexpr int kPassesPerGroup = 16 / kRowsPerPass;
    static_assert(16 % kRowsPerPass == 0 && decltype(size<1>(tS))::value == kGroups * kPassesPerGroup);
    CUTE_UNROLL
    for (int g = 0; g < kGroups; ++g) {
      const Element* src = head_base + int64_t(page[g]) * page_stride + int64_t(in_page[g] + r0) * row_stride;
      copy_passes<kFull, kRolled, kPassesPerGroup>(tS, g * kPassesPerGroup, src, row_stride, valid_rows, head_base);
    }
  }

  // Paged rows at any alignment (left padding that is not a multiple of 16), pages looked up
  // beforehand: tile row r lies `first_offset + r` rows past the start of page pages[0], pages
  // following one another in `pages`. When first_offset is a multiple of 16 every 16-row group
  // sits in one page (one lookup per group); otherwise each row finds its page.
  template <int kMaxPages, typename TS>
  __device__ void load_paged_prefetched(TS& tS, const Element* head_base, int first_offset, int valid_rows,
                                        const int (&pages)[kMaxPages], int page_size, int64_t page_stride,
                                        int64_t row_stride) const {
    constexpr int kGroupRows = 16;
    constexpr int kPasses = decltype(size<1>(tS))::value;
    constexpr int kPassesPerGroup = kGroupRows / kRowsPerPass;
    static_assert(kGroupRows % kRowsPerPass == 0 && kPasses % kPassesPerGroup == 0);
    // Row offset `in_page` from the start of pages[0] -> (page, offset inside it), by selects.
    auto locate = [&](int in_page) {
      int page = pages[0];
      CUTE_UNROLL
      for (int p = 1; p < kMaxPages; ++p) {
        const bool next = in_page >= page_size;
        page = next ? pages[p] : page;
        in_page = next ? in_page - page_size : in_page;
      }
      return head_base + int64_t(page) * page_stride + int64_t(in_page) * row_stride;
    };
    if (first_offset % kGroupRows == 0) {
      const int64_t pass_stride = kRowsPerPass * row_stride;
      CUTE_UNROLL
      for (int g = 0; g < kPasses / kPassesPerGroup; ++g) {
        const Element* src = locate(first_offset + g * kGroupRows + r0);
        CUTE_UNROLL
        for (int j = 0; j < kPassesPerGroup; ++j, src += pass_stride) {
          copy_pass<false>(tS, g * kPassesPerGroup + j, src, valid_rows, head_base);
        }
      }
    } else {
      CUTE_UNROLL
      for (int i = 0; i < kPasses; ++i) {
        copy_pass<false>(tS, i, locate(first_offset + r0 + i * kRowsPerPass), valid_rows, head_base);
      }
    }
  }

  // Shared tile -> global rows [0, valid_rows); `dst` points at this thread's first chunk of row r0.
  template <typename TS>
  __device__ void store_strided(TS const& tS, Element* dst, int64_t row_stride, int valid_rows) const {
    CUTE_UNROLL
    for (int i = 0; i < size<1>(tS); ++i) {
      if (r0 + i * kRowsPerPass >= valid_rows) continue;
      Element* row = dst + int64_t(i * kRowsPerPass) * row_stride;
      CUTE_UNROLL
      for (int c = 0; c < size<2>(tS); ++c) {
        if (chunk_mask >> c & 1) {
          *reinterpret_cast<uint128_t*>(row + c * kChunkStride) = *reinterpret_cast<const uint128_t*>(chunk_ptr(tS, i, c));
        }
      }
    }
  }
};

}  // namespace flash
