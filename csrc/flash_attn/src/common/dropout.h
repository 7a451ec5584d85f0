// Attention dropout: whether probability P[b, h, i, j] is kept, as a pure function of
// (seed, offset, b, h, i, j), so the forward and the backward kernels regenerate the same mask
// from the same Philox words and no mask is ever stored.
//
// Counter layout. The kernels hold scores in SM80 m16n8k16 accumulator fragments, (i, j) = (query
// row, key) in every kernel (forward and both backward kernels). In a 16 x 8 tile, a lane owns 4
// elements: (r, c), (r, c + 1), (r + 8, c), (r + 8, c + 1) with r = lane / 4, c = 2 * (lane % 4).
// One Philox call serves those 4 elements, one 32-bit word each:
//   counter = (j / 8,  (i / 16) * 32 + (i % 8) * 4 + (j % 8) / 2,  low and high half of offset + b * h + h_idx)
//   key     = seed
//   word    = (j % 2) + 2 * ((i / 8) % 2)
// The tile and lane come from (i, j) alone, so a kernel whose warps tile S differently (the
// dK/dV kernel's 2 x 4 warps, whose n-steps are 32 keys apart) still draws the same word for the
// same element. Element kept iff word < keep_threshold = round((1 - p) * 2^32): p at 32-bit
// resolution. PyTorch's generator reserves b * h counters per call (philox_cuda_state), one
// 128-bit counter stream per (batch, head), so calls never share counters.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cute/tensor.hpp>

#include "params/fwd_params.h"
#include "common/philox.h"

namespace flash {

using namespace cute;

// The seed and offset of this call. Outside CUDA-graph capture they are plain values; inside, the
// generator's seed and offset live in device memory that every replay advances (PyTorch's
// graph-safe Philox state), read here at run time; the backward reads the forward's rng_state.
struct PhiloxSeedOffset {
  uint64_t seed;
  uint64_t offset;
};

__device__ __forceinline__ PhiloxSeedOffset philox_seed_offset(const FwdParams& p) {
  const uint64_t seed = p.philox_seed_ptr != nullptr ? uint64_t(*p.philox_seed_ptr) : p.philox_seed;
  const uint64_t base = p.philox_offset_ptr != nullptr ? uint64_t(*p.philox_offset_ptr) : 0;
  return {seed, base + p.philox_offset};
}

// Keep flags of a fragment's elements, one bit each, by linear register index.
template <int kSize>
struct KeepBits {
  uint32_t words[(kSize + 31) / 32];
  __device__ __forceinline__ bool test(int i) const { return (words[i / 32] >> (i % 32)) & 1u; }
};

// Keep flags without dropout: every element kept.
struct KeepAll {
  __device__ __forceinline__ bool test(int) const { return true; }
};

class Dropout {
 public:
  __device__ explicit Dropout(const FwdParams& p) : keep_threshold_(p.dropout_keep_threshold) {
    const PhiloxSeedOffset so = philox_seed_offset(p);
    key_ = make_uint2(uint32_t(so.seed), uint32_t(so.seed >> 32));
    offset_ = so.offset;
  }

  // The counter stream of one (batch entry, query head).
  __device__ __forceinline__ uint64_t stream(int bidb, int bidh, int num_heads) const {
    return offset_ + uint64_t(bidb) * uint64_t(num_heads) + uint64_t(bidh);
  }

  // P of dropped elements: zero, or (kEncode) negated, the sign S_dmask reports drops by.
  // acc: an SM80 accumulator fragment (4 values, MMA_M, MMA_N); coord: the identity tensor
  // partitioned like it; row0 / col0: sequence position of the tile's (0, 0).
  template <bool kEncode, typename Frag, typename Coord>
  __device__ __forceinline__ void apply(Frag& acc, Coord const& coord, int row0, int col0, uint64_t stream) const {
    for_each_tile(coord, row0, col0, stream, [&](int m, int n, uint4 words) {
      const uint32_t w[4] = {words.x, words.y, words.z, words.w};
      CUTE_UNROLL
      for (int v = 0; v < 4; ++v) {
        const bool keep = w[v] < keep_threshold_;
        if constexpr (kEncode) {
          acc(v, m, n) = keep ? acc(v, m, n) : -acc(v, m, n);
        } else {
          acc(v, m, n) = keep ? acc(v, m, n) : 0.f;
        }
      }
    });
  }

  // Keep flags of every element of `acc`, for kernels that apply the mask to two tensors.
  template <typename Frag, typename Coord>
  __device__ __forceinline__ auto keep_bits(Frag const& acc, Coord const& coord, int row0, int col0,
                                            uint64_t stream) const {
    constexpr int kSize = decltype(size(acc))::value;
    KeepBits<kSize> bits;
    CUTE_UNROLL
    for (int i = 0; i < (kSize + 31) / 32; ++i) bits.words[i] = 0u;
    for_each_tile(coord, row0, col0, stream, [&](int m, int n, uint4 words) {
      const uint32_t w[4] = {words.x, words.y, words.z, words.w};
      CUTE_UNROLL
      for (int v = 0; v < 4; ++v) {
        const int idx = acc.layout()(v, m, n);
        bits.words[idx / 32] |= uint32_t(w[v] < keep_threshold_) << (idx % 32);
      }
    });
    return bits;
  }

 private:
  // One Philox call per 16 x 8 tile of the fragment; f(m, n, words) gets the words of the
  // tile's 4 values in register order (value v at +8 * (v / 2) rows, +(v % 2) keys from value 0,
  // the m16n8 accumulator layout of the SM80 MMA atoms every kernel here uses).
  template <typename Coord, typename F>
  __device__ __forceinline__ void for_each_tile(Coord const& coord, int row0, int col0, uint64_t stream,
                                                F&& f) const {
    static_assert(decltype(size<0>(coord))::value == 4, "an SM80 m16n8 accumulator fragment");
    CUTE_UNROLL
    for (int m = 0; m < size<1>(coord); ++m) {
      CUTE_UNROLL
      for (int n = 0; n < size<2>(coord); ++n) {
        const int i = row0 + get<0>(coord(0, m, n));
        const int j = col0 + get<1>(coord(0, m, n));
        const uint4 counter = make_uint4(uint32_t(j) >> 3, ((uint32_t(i) >> 4) << 5) | ((uint32_t(i) & 7u) << 2) |
                                                               ((uint32_t(j) & 7u) >> 1),
                                         uint32_t(stream), uint32_t(stream >> 32));
        f(m, n, philox4x32_10(counter, key_));
      }
    }
  }

  uint2 key_;
  uint64_t offset_;
  uint32_t keep_threshold_;
};

// Kernels without dropout hold this instead: nothing to construct, no registers.
struct NoDropout {
  __device__ explicit NoDropout(const FwdParams&) {}
};

template <bool kHasDropout>
using DropoutIf = std::conditional_t<kHasDropout, Dropout, NoDropout>;

}  // namespace flash
