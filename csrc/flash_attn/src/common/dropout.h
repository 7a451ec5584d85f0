// Attention dropout: whether probability P[b, h, i, j] is kept, as a pure function of
// (seed, offset, b, h, i, j), so the forward and the backward kernels regenerate the same mask
// from the same Philox words and no mask is ever stored.
//
// Counter layout. One Philox call serves 16 elements, (i, j) = (query row, key):
//   rows {i0, i0 + 1, i0 + 8, i0 + 9} x keys {j0, j0 + 1, j0 + 8, j0 + 9},  i0 = i & ~9, j0 = j & ~9
//   counter = (j0, i0, low and high half of offset + b * h + h_idx),  key = seed
// and element (i, j) takes byte 2 * ((i >> 3) & 1) + ((j >> 3) & 1) of word 2 * (i & 1) + (j & 1)
// of the call's four. Kept iff that byte < keep_threshold = round((1 - p) * 256), clamped to
// [1, 256]: p at 8-bit resolution, as upstream's 8-bit threshold. Dropout's cost is the Philox
// rounds' integer work, which the GEMMs do not hide, so a call's 128 bits serve as many elements
// as they can.
//
// The group is what two lanes hold of two neighbouring 8-column groups of an m16n8 accumulator
// fragment: lane l holds rows r, r + 8 and columns c, c + 1 of each group, lane l ^ 4 rows r ^ 1
// and r ^ 1 + 8 -- in the SM80 kernels (mma.sync) and in each warp of a Hopper warpgroup MMA, of S
// (rows are query rows) or of S^T (rows are keys: the Hopper backward with the keys split; the
// layout is symmetric in i and j). A lane's 8 elements are two of the four words (those of its
// row parity), so of two groups each lane of the pair draws one and they trade the other lane's
// words (two shuffles). The tile and lane come from (i, j) alone, so every kernel draws the same
// byte for the same element. PyTorch's generator reserves b * h counters per call
// (philox_cuda_state), one 128-bit counter stream per (batch, head), so calls never share
// counters.
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
  __device__ explicit Dropout(const FwdParams& p)
      // byte < threshold  <=>  (byte << 24 | any low bits) <= (threshold - 1) << 24 | 0xFFFFFF, which
      // holds for threshold 256 too and tests a byte where it lies in its word (kept()).
      : keep_limit_(((p.dropout_keep_threshold - 1u) << 24) | 0xFFFFFFu) {
    const PhiloxSeedOffset so = philox_seed_offset(p);
    key_ = make_uint2(uint32_t(so.seed), uint32_t(so.seed >> 32));
    offset_ = so.offset;
  }

  // The counter stream of one (batch entry, query head).
  __device__ __forceinline__ uint64_t stream(int bidb, int bidh, int num_heads) const {
    return offset_ + uint64_t(bidb) * uint64_t(num_heads) + uint64_t(bidh);
  }

  // P of dropped elements: zero, or (kEncode) negated, the sign S_dmask reports drops by.
  // acc: an SM80 accumulator fragment (4 values, MMA_M, MMA_N) whose neighbouring n-tiles are
  // neighbouring 8-key groups (the forward's warps split the rows); coord: the identity tensor
  // partitioned like it; row0 / col0: sequence position of the tile's (0, 0), multiples of 16.
  template <bool kEncode, typename Frag, typename Coord>
  __device__ __forceinline__ void apply(Frag& acc, Coord const& coord, int row0, int col0, uint64_t stream) const {
    Tensor acc_rc = rowcol_view(acc);
    for_each_element</*kTransposed=*/false, /*kPairedGroups=*/true>(
        acc_rc, rowcol_view(coord), row0, col0, stream, [&](int r, int c, bool kept) {
          if constexpr (kEncode) {
            acc_rc(r, c) = kept ? acc_rc(r, c) : -acc_rc(r, c);
          } else {
            acc_rc(r, c) = kept ? acc_rc(r, c) : 0.f;
          }
        });
  }

  // Keep flags of every element of an SM80 accumulator fragment, by register index, for kernels
  // that apply the mask to two tensors. kPairedGroups: neighbouring n-tiles are neighbouring 8-key
  // groups (warps split the rows: the dQ kernel); else they lie further apart (the dK/dV kernel's
  // 2 x 4 warps), so each n-tile is half of a call's group and the other half, another warp's,
  // goes unused here.
  template <bool kPairedGroups, typename Frag, typename Coord>
  __device__ __forceinline__ auto keep_bits(Frag& acc, Coord const& coord, int row0, int col0,
                                            uint64_t stream) const {
    Tensor acc_rc = rowcol_view(acc);
    auto bits = KeepBits<decltype(size(acc))::value>::none();
    for_each_element</*kTransposed=*/false, kPairedGroups>(
        acc_rc, rowcol_view(coord), row0, col0, stream,
        [&](int r, int c, bool kept) { bits.set(acc_rc.layout()(r, c), kept); });
    return bits;
  }

  // Hopper warpgroup-MMA fragments, viewed by (row, column) (sm90/gmma_layouts.h,
  // gmma_rowcol_view): a thread holds rows r and r + 8 of its warp's 16, and columns c, c + 1 of
  // every 8-column group, the groups in order. kTransposed: the fragment is S^T (rows are keys,
  // columns query rows: the Hopper backward with the keys split); else S (rows are query rows,
  // columns keys). coord_rc: (row, column) of each element within the tile; row0 / col0: the
  // sequence position of the tile's (0, 0), multiples of 16. Lanes l and l ^ 4 trade words, so
  // every lane of the warp must get here together.

  // Keep flags of every element, by the fragment's register index. They depend on positions
  // alone, so a kernel can draw them while the GEMM that produces the fragment still runs.
  template <bool kTransposed, typename RC, typename Coord>
  __device__ __forceinline__ auto keep_bits_gmma(RC const& frag, Coord const& coord_rc, int row0, int col0,
                                                 uint64_t stream) const {
    auto bits = KeepBits<decltype(size(frag))::value>::none();
    for_each_element<kTransposed, /*kPairedGroups=*/true>(
        frag, coord_rc, row0, col0, stream, [&](int r, int c, bool kept) { bits.set(frag.layout()(r, c), kept); });
    return bits;
  }

  // P's dropped entries, drawn here: negated in place (kEncode: P >= 0, so the sign carries the
  // mask to every later use without a register of its own; a masked 0 stays 0), or zeroed for a
  // single use (the forward's P V operand).
  template <bool kTransposed, bool kEncode, typename RC, typename Coord>
  __device__ __forceinline__ void drop_gmma(RC& frag, Coord const& coord_rc, int row0, int col0,
                                            uint64_t stream) const {
    for_each_element<kTransposed, /*kPairedGroups=*/true>(
        frag, coord_rc, row0, col0, stream, [&](int r, int c, bool kept) {
          if constexpr (kEncode) {
            frag(r, c) = kept ? frag(r, c) : -frag(r, c);
          } else {
            frag(r, c) = kept ? frag(r, c) : 0.f;
          }
        });
  }

 private:
  // The four words of the group holding element (i, j).
  __device__ __forceinline__ uint4 group_words(int i, int j, uint64_t stream) const {
    const uint4 counter = make_uint4(uint32_t(j) & ~9u, uint32_t(i) & ~9u, uint32_t(stream), uint32_t(stream >> 32));
    return philox4x32_10(counter, key_);
  }

  // Whether the element whose value is byte `byte` of `word` is kept.
  __device__ __forceinline__ bool kept(uint32_t word, int byte) const {
    return (word << (24 - 8 * byte)) <= keep_limit_;
  }

  // Of a call's words, the two a lane of row parity `parity` uses, by the column parity w: word
  // 2 * parity + w of S, 2 * w + parity of S^T.
  template <bool kTransposed>
  __device__ __forceinline__ static uint32_t lane_word(uint4 const& words, bool parity, int w) {
    if constexpr (kTransposed) {
      return w == 0 ? (parity ? words.y : words.x) : (parity ? words.w : words.z);
    } else {
      return w == 0 ? (parity ? words.z : words.x) : (parity ? words.w : words.y);
    }
  }

  // f(row, column, kept) for every element of a (row, column) fragment view: rows in pairs
  // (r, r + 8), columns in pairs (c, c + 1) of 8-column groups. kPairedGroups: the groups come in
  // pairs 8 columns apart, each pair starting at a multiple of 16 (one call's columns); else each
  // group is half of its call. A unit is what one call serves of this lane: a row pair by a group
  // pair (or by one group). Of units u and u + 1 the lane of row parity q draws u + q, keeps the
  // words of its parity and hands the others to lane ^ 4 (whose rows have the other parity); an
  // odd last unit both lanes draw.
  template <bool kTransposed, bool kPairedGroups, typename RC, typename Coord, typename F>
  __device__ __forceinline__ void for_each_element(RC const& frag, Coord const& coord_rc, int row0, int col0,
                                                   uint64_t stream, F&& f) const {
    constexpr int kRows = decltype(size<0>(frag))::value, kCols = decltype(size<1>(frag))::value;
    constexpr int kUnitCols = kPairedGroups ? 4 : 2;
    static_assert(kRows % 2 == 0 && kCols % kUnitCols == 0, "rows in pairs (r, r + 8), columns in whole units");
    constexpr int kUnitsPerRowPair = kCols / kUnitCols, kUnits = kRows / 2 * kUnitsPerRowPair;
    CUTE_UNROLL
    for (int u = 0; u < kUnits; u += 2) {
      // Fragment (row, column) of the first element of units u and u + 1, and its (i, j).
      int r[2], c[2], i[2], j[2];
      CUTE_UNROLL
      for (int k = 0; k < 2; ++k) {
        const int unit = u + k < kUnits ? u + k : u;
        r[k] = 2 * (unit / kUnitsPerRowPair);
        c[k] = kUnitCols * (unit % kUnitsPerRowPair);
        const int row = row0 + get<0>(coord_rc(r[k], c[k])), col = col0 + get<1>(coord_rc(r[k], c[k]));
        i[k] = kTransposed ? col : row;
        j[k] = kTransposed ? row : col;
      }
      const bool q = (kTransposed ? j[0] : i[0]) & 1;
      // words[k][w]: this lane's word of unit u + k for column parity w.
      uint32_t words[2][2];
      if (u + 1 < kUnits) {
        const uint4 drawn = group_words(q ? i[1] : i[0], q ? j[1] : j[0], stream);
        const uint32_t take0 = __shfl_xor_sync(0xFFFFFFFFu, lane_word<kTransposed>(drawn, !q, 0), 4);
        const uint32_t take1 = __shfl_xor_sync(0xFFFFFFFFu, lane_word<kTransposed>(drawn, !q, 1), 4);
        const uint32_t mine0 = lane_word<kTransposed>(drawn, q, 0), mine1 = lane_word<kTransposed>(drawn, q, 1);
        words[0][0] = q ? take0 : mine0;
        words[0][1] = q ? take1 : mine1;
        words[1][0] = q ? mine0 : take0;
        words[1][1] = q ? mine1 : take1;
      } else {
        const uint4 drawn = group_words(i[0], j[0], stream);
        words[0][0] = lane_word<kTransposed>(drawn, q, 0);
        words[0][1] = lane_word<kTransposed>(drawn, q, 1);
        words[1][0] = words[0][0];
        words[1][1] = words[0][1];
      }
      CUTE_UNROLL
      for (int k = 0; k < 2; ++k) {
        if (u + k < kUnits) {
          // Bit 3 of the unit's first column (0 with paired groups; a lone group's own).
          const int col_bit3 = kPairedGroups ? 0 : ((kTransposed ? i[k] : j[k]) >> 3) & 1;
          CUTE_UNROLL
          for (int dr = 0; dr < 2; ++dr) {
            CUTE_UNROLL
            for (int dc = 0; dc < kUnitCols; ++dc) {
              // Row dr: bit 3 of the row is dr; column dc: parity dc % 2, bit 3 dc / 2 + col_bit3.
              // The byte is 2 * (bit 3 of i) + (bit 3 of j).
              const int cb3 = dc / 2 + col_bit3;
              const int byte = kTransposed ? 2 * cb3 + dr : 2 * dr + cb3;
              f(r[k] + dr, c[k] + dc, kept(words[k][dc % 2], byte));
            }
          }
        }
      }
    }
  }

  uint2 key_;
  uint64_t offset_;
  uint32_t keep_limit_;
};

// P's dropped entries negated in place, from flags drawn earlier (Dropout::keep_bits_gmma of frag;
// see drop_gmma).
template <typename Frag, int kSize>
__device__ __forceinline__ void encode_dropped(Frag& frag, KeepBits<kSize> const& bits) {
  static_assert(decltype(size(frag))::value == kSize);
  CUTE_UNROLL
  for (int i = 0; i < kSize; ++i) frag(i) = bits.test(i) ? frag(i) : -frag(i);
}

// The probabilities dV += P^T dO reads from a fragment drop_gmma / encode_dropped marked: dropped entries 0, kept
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
