// Tile copies between global and shared memory in 16-byte chunks. Rows are addressed through a
// callable (row -> pointer), so contiguous, varlen and paged layouts share one loader.
#pragma once

#include <cute/tensor.hpp>
#include <cute/arch/copy_sm80.hpp>

namespace flash {

using namespace cute;

// Asynchronously copies rows [0, kRows) x cols [0, kHeadDim) into the swizzled shared tile `s`.
// Rows >= valid_rows and columns >= d are zero-filled by cp.async itself (src-size 0), so no
// separate stores race with the copies. `fallback` is any valid global address.
template <typename Traits, typename SmemTensor, typename RowPtr, typename Element>
__device__ __forceinline__ void load_tile_async(SmemTensor& s, RowPtr const& row_ptr, int valid_rows, int d,
                                                const Element* fallback, int tidx) {
  constexpr int kRows = decltype(size<0>(s))::value;
  const int r0 = tidx / Traits::kThreadsPerRow;
  const int c0 = tidx % Traits::kThreadsPerRow;
  CUTE_UNROLL
  for (int i = 0; i < kRows / Traits::kRowsPerPass; ++i) {
    const int r = r0 + i * Traits::kRowsPerPass;
    const bool row_ok = r < valid_rows;
    const Element* src_row = row_ok ? row_ptr(r) : fallback;
    CUTE_UNROLL
    for (int c = 0; c < Traits::kChunksPerThreadRow; ++c) {
      const int col = (c0 + c * Traits::kThreadsPerRow) * Traits::kElemsPerChunk;
      const bool ok = row_ok && col < d;
      const Element* src = ok ? src_row + col : fallback;
      SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<uint128_t>::copy(*reinterpret_cast<const uint128_t*>(src),
                                                      *reinterpret_cast<uint128_t*>(&s(r, col)), ok);
    }
  }
}

// Stores rows [0, valid_rows) x cols [0, d) of the shared tile `s` to global memory.
template <typename Traits, typename SmemTensor, typename RowPtr>
__device__ __forceinline__ void store_tile(SmemTensor const& s, RowPtr const& row_ptr, int valid_rows, int d,
                                           int tidx) {
  constexpr int kRows = decltype(size<0>(s))::value;
  const int r0 = tidx / Traits::kThreadsPerRow;
  const int c0 = tidx % Traits::kThreadsPerRow;
  CUTE_UNROLL
  for (int i = 0; i < kRows / Traits::kRowsPerPass; ++i) {
    const int r = r0 + i * Traits::kRowsPerPass;
    if (r >= valid_rows) continue;
    auto* dst_row = row_ptr(r);
    CUTE_UNROLL
    for (int c = 0; c < Traits::kChunksPerThreadRow; ++c) {
      const int col = (c0 + c * Traits::kThreadsPerRow) * Traits::kElemsPerChunk;
      if (col < d) {
        *reinterpret_cast<uint128_t*>(dst_row + col) = *reinterpret_cast<const uint128_t*>(&s(r, col));
      }
    }
  }
}

}  // namespace flash
