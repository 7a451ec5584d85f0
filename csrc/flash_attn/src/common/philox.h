// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011): a
// counter-based generator, so any thread can draw the random words of any counter directly, in
// any order, with no state in memory. Dropout relies on that: the forward and every backward
// kernel regenerate the same mask from (seed, counter) instead of storing it.
//
// Written here rather than taken from curand: this toolchain ships no curand headers, and the
// kernels need only the bare block function, not curand's per-thread state and skip-ahead.
#pragma once

#include <cstdint>

namespace flash {

// The 4 x 32-bit words of Philox4x32-10 for one 128-bit counter and 64-bit key.
__device__ __forceinline__ uint4 philox4x32_10(uint4 counter, uint2 key) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
  uint4 c = counter;
  uint2 k = key;
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t lo0 = kMul0 * c.x, hi0 = __umulhi(kMul0, c.x);
    const uint32_t lo1 = kMul1 * c.z, hi1 = __umulhi(kMul1, c.z);
    c = make_uint4(hi1 ^ c.y ^ k.x, lo1, hi0 ^ c.w ^ k.y, lo0);
    k.x += kWeyl0;
    k.y += kWeyl1;
  }
  return c;
}

}  // namespace flash
