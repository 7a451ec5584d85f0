// Attention dropout: whether probability P[b, h, i, j] is kept, as a pure function of
// (seed, offset, b, h, i, j), so the forward and the backward kernels regenerate the same mask
// from the same Philox words and no mask is ever stored.
//
// Counter layout. One Philox call serves 8 elements, (i, j) = (query row, key):
//   rows {i0, i0 + 8} x keys {j0, j0 + 1, j0 + 8, j0 + 9},  i0 = i & ~8, j0 = j & ~9
//   counter = (j0, i0, low and high half of offset + b * h + h_idx),  key = seed
// and element (i, j) takes 16-bit value (j & 1) * 4 + ((j >> 3) & 1) * 2 + ((i >> 3) & 1) of the
// call's 128 bits (value k: bits 16 (k % 2) of word k / 2). The group is what a lane of an m16n8
// accumulator fragment holds of two neighbouring 8-key columns -- rows r and r + 8, keys c, c + 1
// of each column -- in the SM80 kernels (mma.sync) and in each warp of a Hopper warpgroup MMA, so
// a kernel whose fragment holds both columns makes one call per 8 elements; one whose
// neighbouring n-steps lie further apart (the SM80 dK/dV kernel's 2 x 4 warps) makes it per
// column and uses half. A fragment of S^T (keys as rows: the Hopper backward with the keys split)
// holds keys r, r + 8 and rows c, c + 1 of two columns: the lanes of r and r ^ 1 each make one of
// the two calls their elements need and swap halves (two shuffles). The tile and lane come from
// (i, j) alone, so every kernel draws the same value for the same element. Element kept iff
// value < keep_threshold = round((1 - p) * 2^16): p at 16-bit resolution. PyTorch's generator
// reserves b * h counters per call (philox_cuda_state), one 128-bit counter stream per (batch,
// head), so calls never share counters.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include <cute/tensor.hpp>

#include "params/fwd_params.h"
#include "common/mma_utils.h"
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
  __device__ __forceinline__ static KeepBits none() {
    KeepBits bits;
    CUTE_UNROLL
    for (int i = 0; i < (kSize + 31) / 32; ++i) bits.words[i] = 0u;
    return bits;
  }
  __device__ __forceinline__ void set(int i, bool kept) { words[i / 32] |= uint32_t(kept) << (i % 32); }
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
    for_each_tile(coord, row0, col0, stream, [&](int m, int n, const uint32_t (&value)[4]) {
      CUTE_UNROLL
      for (int v = 0; v < 4; ++v) {
        const bool keep = value[v] < keep_threshold_;
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
    auto bits = KeepBits<decltype(size(acc))::value>::none();
    for_each_tile(coord, row0, col0, stream, [&](int m, int n, const uint32_t (&value)[4]) {
      CUTE_UNROLL
      for (int v = 0; v < 4; ++v) bits.set(acc.layout()(v, m, n), value[v] < keep_threshold_);
    });
    return bits;
  }

  // Hopper warpgroup-MMA fragments, viewed by (row, column) (sm90/gmma_layouts.h,
  // gmma_rowcol_view): a thread holds rows r and r + 8 of its warp's 16, and columns c, c + 1 of
  // every 8-column group, the groups in order. kTransposed: the fragment is S^T (rows are keys,
  // columns query rows: the Hopper backward with the keys split); else S (rows are query rows,
  // columns keys). coord_rc: (row, column) of each element within the tile; row0 / col0: the
  // sequence position of the tile's (0, 0), multiples of 16. Each pair of column groups is one
  // call per thread: with S, the group of its 8 elements; with S^T, the lanes of keys r and r ^ 1
  // (lanes l and l ^ 4) each make one of the two calls their elements need and trade the halves
  // the other one uses, so every lane of the warp must get here together.

  // Keep flags of every element, by the fragment's register index. They depend on positions
  // alone, so a kernel can draw them while the GEMM that produces the fragment still runs.
  template <bool kTransposed, typename RC, typename Coord>
  __device__ __forceinline__ auto keep_bits_gmma(RC const& frag, Coord const& coord_rc, int row0, int col0,
                                                 uint64_t stream) const {
    auto bits = KeepBits<decltype(size(frag))::value>::none();
    for_each_gmma_element<kTransposed>(frag, coord_rc, row0, col0, stream,
                                       [&](int r, int c, bool kept) { bits.set(frag.layout()(r, c), kept); });
    return bits;
  }

  // P's dropped entries negated in place, drawn here (P >= 0, so the sign carries the mask to
  // every later use without a register of its own; a masked 0 stays 0).
  template <bool kTransposed, typename RC, typename Coord>
  __device__ __forceinline__ void encode_gmma(RC& frag, Coord const& coord_rc, int row0, int col0,
                                              uint64_t stream) const {
    for_each_gmma_element<kTransposed>(frag, coord_rc, row0, col0, stream, [&](int r, int c, bool kept) {
      frag(r, c) = kept ? frag(r, c) : -frag(r, c);
    });
  }

  // The call of the group holding element (i, j).
  __device__ __forceinline__ uint4 group_words(int i, int j, uint64_t stream) const {
    const uint4 counter = make_uint4(uint32_t(j) & ~9u, uint32_t(i) & ~8u, uint32_t(stream), uint32_t(stream >> 32));
    return philox4x32_10(counter, key_);
  }

 private:
  // f(row, column, kept) for every element of a Hopper fragment (see keep_bits_gmma).
  template <bool kTransposed, typename RC, typename Coord, typename F>
  __device__ __forceinline__ void for_each_gmma_element(RC const& frag, Coord const& coord_rc, int row0, int col0,
                                                        uint64_t stream, F&& f) const {
    static_assert(decltype(size<0>(frag))::value % 2 == 0 && decltype(size<1>(frag))::value % 4 == 0,
                  "rows in pairs (r, r + 8), columns in pairs of 8-column groups");
    CUTE_UNROLL
    for (int a = 0; a < size<0>(frag); a += 2) {
      CUTE_UNROLL
      for (int b = 0; b < size<1>(frag); b += 4) {
        const int row = row0 + get<0>(coord_rc(a, b)), col = col0 + get<1>(coord_rc(a, b));
        // lo[g] / hi[g]: the words of the element at +8 rows of the fragment's first row being
        // 0 / 1 (bit 3 of the key, S^T; of the query row, S) -- per call g this thread uses.
        uint32_t lo[2], hi[2];
        if constexpr (kTransposed) {
          // Keys row, row + 8; query rows col, col + 1, col + 8, col + 9: calls (col) and (col + 1),
          // each over keys {row & ~1, +1, +8, +9}. This lane makes the call of its key's parity.
          const bool odd_key = row & 1;
          const uint4 words = group_words(col + (odd_key ? 1 : 0), row, stream);
          const uint32_t give0 = odd_key ? words.x : words.z, give1 = odd_key ? words.y : words.w;
          const uint32_t take0 = __shfl_xor_sync(0xFFFFFFFFu, give0, 4);
          const uint32_t take1 = __shfl_xor_sync(0xFFFFFFFFu, give1, 4);
          // Values of this lane's key parity: words x, y of a call for even keys, z, w for odd.
          lo[0] = odd_key ? take0 : words.x;
          hi[0] = odd_key ? take1 : words.y;
          lo[1] = odd_key ? words.z : take0;
          hi[1] = odd_key ? words.w : take1;
        } else {
          const uint4 words = group_words(row, col, stream);
          lo[0] = words.x;  // keys col, col + 8 (the key's parity is the column's: g = 0)
          hi[0] = words.y;
          lo[1] = words.z;  // keys col + 1, col + 9
          hi[1] = words.w;
        }
        CUTE_UNROLL
        for (int dr = 0; dr < 2; ++dr) {
          CUTE_UNROLL
          for (int dc = 0; dc < 4; ++dc) {
            // Column b + dc: +(dc % 2) (key parity, S; query row parity, S^T), +8 * (dc / 2).
            // With S^T the call is chosen by the query row's parity (dc % 2) and the word by bit 3
            // of the key (dr), the half by bit 3 of the query row (dc / 2); with S the call by
            // the key's parity (dc % 2), the word by bit 3 of the key (dc / 2), the half by bit 3
            // of the query row (dr).
            const int g = dc % 2;
            const bool word_hi = kTransposed ? dr : dc / 2;
            const bool upper_half = kTransposed ? dc / 2 : dr;
            const uint32_t word = word_hi ? hi[g] : lo[g];
            const uint32_t value = upper_half ? word >> 16 : word & 0xFFFFu;
            f(a + dr, b + dc, value < keep_threshold_);
          }
        }
      }
    }
  }

  // One Philox call per 16 x 8 tile of the fragment (half of it used; a group spans two
  // columns). The tiles' rows start at multiples of 16 and their keys at multiples of 8, so a
  // tile's 4 elements share value 0's group; f(m, n, values) gets the 16-bit values of the tile's 4 elements in register order
  // (value v at +8 * (v / 2) rows, +(v % 2) keys from value 0, the m16n8 accumulator layout of the
  // SM80 MMA atoms these kernels use).
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
        const uint4 words = group_words(i, j, stream);
        // Value 0's row has bit 3 clear: values 0 / 1 take the low halves, 2 / 3 (8 rows below) the
        // high ones; even keys words x / y, odd keys z / w, by bit 3 of the key. Selected, not
        // indexed, so the words stay in registers.
        const bool key_bit3 = (j >> 3) & 1;
        const uint32_t even_key = key_bit3 ? words.y : words.x, odd_key = key_bit3 ? words.w : words.z;
        const uint32_t value[4] = {even_key & 0xFFFFu, odd_key & 0xFFFFu, even_key >> 16, odd_key >> 16};
        f(m, n, value);
      }
    }
  }

  uint2 key_;
  uint64_t offset_;
  uint32_t keep_threshold_;
};

// P's dropped entries negated in place, from flags drawn earlier (Dropout::keep_bits_gmma of frag;
// see encode_gmma).
template <typename Frag, int kSize>
__device__ __forceinline__ void encode_dropped(Frag& frag, KeepBits<kSize> const& bits) {
  static_assert(decltype(size(frag))::value == kSize);
  CUTE_UNROLL
  for (int i = 0; i < kSize; ++i) frag(i) = bits.test(i) ? frag(i) : -frag(i);
}

// The probabilities dV += P^T dO reads from a fragment encode_gmma / encode_dropped marked: dropped entries 0, kept
// ones times 1 / (1 - p), converted to the GEMM's element type in pairs.
template <typename To, typename Engine, typename Layout>
__device__ __forceinline__ auto dropped_probs(Tensor<Engine, Layout> const& encoded, float dropout_scale) {
  return convert_fragment<To>(encoded, [dropout_scale](float x) { return fmaxf(x, 0.f) * dropout_scale; });
}

// dS of one element from its encoded probability x (negative: dropped) and dP:
// P o (dP o M / (1 - p) - D), the undropped P times the dropped, rescaled dP.
__device__ __forceinline__ float dropped_ds(float x, float dp, float d, float dropout_scale) {
  return fabsf(x) * ((signbit(x) ? 0.f : dp * dropout_scale) - d);
}

// Kernels without dropout hold this instead: nothing to construct, no registers.
struct NoDropout {
  __device__ explicit NoDropout(const FwdParams&) {}
};

template <bool kHasDropout>
using DropoutIf = std::conditional_t<kHasDropout, Dropout, NoDropout>;

}  // namespace flash
