// Clamping of index values read from user tensors, with the report of every value that needed it
// (params/index_errors.h says why and where the report goes). One home for every clamp of a page
// index, a sequence length, a left padding or a cache batch index.
#pragma once

#include "params/index_errors.h"

namespace flash {

// value clamped to [lo, hi]; an out-of-range value sets the argument's error word (a plain store:
// one word per argument, so concurrent reports never need an atomic on host memory).
__device__ __forceinline__ int guard_index(int value, int lo, int hi, unsigned* errors, IndexError which) {
  if (value < lo || value > hi) {
    if (errors != nullptr) errors[which] = 1u;
    value = value < lo ? lo : hi;
  }
  return value;
}

__device__ __forceinline__ int guard_page(int page, int num_pages, unsigned* errors) {
  return guard_index(page, 0, num_pages - 1, errors, kBlockTableOutOfRange);
}

}  // namespace flash
