// Where a sequence's key / value rows lie in global memory. Paged K/V: a per-sequence row of the
// block table names the page of each page_size-row stretch of the sequence; the page index read
// from it is clamped (and reported) by guard_page (common/index_guard.h) where it is used.
#pragma once

namespace flash {

// The block-table entry (of one sequence's table row) that holds sequence row `row`, and the
// row's offset inside that page.
struct PagedRow {
  int entry;
  int in_page;
};

__device__ __forceinline__ PagedRow paged_row(const int* table_row, int row, int page_size) {
  return {table_row[row / page_size], row % page_size};
}

}  // namespace flash
