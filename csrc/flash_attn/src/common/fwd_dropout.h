// Dropout in the prefill forward (kHasDropout of kernels/fwd_kernel.h and sm90/fwd_kernel.h). P is dropped after the row
// sums took it whole, so the log-sum-exp and the normaliser are those of the un-dropped softmax, as
// upstream; the output is scaled by 1 / (1 - p) once, at the end. The keep / drop decision itself:
// common/dropout.h. Without dropout every step is empty, so those kernels carry none of its code.
#pragma once

#include <cmath>
#include <cstdint>

#include <cute/tensor.hpp>

#include "common/dropout.h"
#include "params/fwd_params.h"

namespace flash {

using namespace cute;

// return_softmax: this block's P (dropped entries negated) into S_dmask, for the rows and keys
// inside the sequence. acc: the accumulator fragment of P, coord: its (row, key) in the tile.
template <typename Element, typename Frag, typename Coord>
__device__ __forceinline__ void write_s_dmask(const FwdParams& p, Frag const& acc, Coord const& coord, int bidb,
                                              int bidh, int row0, int col0, int rows, int seqlen_k) {
  Element* out = static_cast<Element*>(p.s_dmask_ptr) + bidb * p.s_dmask_batch_stride + bidh * p.s_dmask_head_stride;
  CUTE_UNROLL
  for (int i = 0; i < size(acc); ++i) {
    const int row = get<0>(coord(i)), col = col0 + get<1>(coord(i));
    if (row < rows && col < seqlen_k) out[int64_t(row0 + row) * p.s_dmask_row_stride + col] = Element(acc(i));
  }
}

// The (seed, offset) this call draws with go to rng_state for the backward: written on the device
// by one thread of the grid, so a CUDA-graph replay records its own.
__device__ __forceinline__ void record_rng_state(const FwdParams& p) {
  if (p.rng_state_ptr != nullptr && blockIdx.x == 0 && blockIdx.y == 0 && blockIdx.z == 0 && threadIdx.x == 0) {
    const PhiloxSeedOffset so = philox_seed_offset(p);
    p.rng_state_ptr[0] = int64_t(so.seed);
    p.rng_state_ptr[1] = int64_t(so.offset);
  }
}

// O times 1 / (1 - p) once every block is in, the kept probabilities' scale (upstream's).
template <bool kHasDropout, typename Frag>
__device__ __forceinline__ void scale_dropout_output(const FwdParams& p, Frag& acc_o) {
  if constexpr (kHasDropout) {
    CUTE_UNROLL
    for (int i = 0; i < size(acc_o); ++i) acc_o(i) *= p.dropout_scale;
  }
}

template <bool kHasDropout>
struct FwdDropout {
  [[maybe_unused]] const DropoutIf<kHasDropout> dropout;

  __device__ explicit FwdDropout(const FwdParams& p) : dropout(p) {
    if constexpr (kHasDropout) record_rng_state(p);
  }

  // P of key block col0 (acc_s, tScS its (row, key) in the tile), query rows from m0.
  template <typename Element, typename Frag, typename Coord>
  __device__ __forceinline__ void apply(const FwdParams& p, Frag& acc_s, Coord const& tScS, int bidb, int bidh, int m0,
                                        int col0, int rows_in_tile, int seqlen_k) const {
    if constexpr (kHasDropout) {
      const uint64_t stream = dropout.stream(bidb, bidh, p.h);
      if (p.s_dmask_ptr != nullptr) {
        dropout.template apply<true>(acc_s, tScS, m0, col0, stream);
        write_s_dmask<Element>(p, acc_s, tScS, bidb, bidh, m0, col0, rows_in_tile, seqlen_k);
        CUTE_UNROLL
        for (int i = 0; i < size(acc_s); ++i) acc_s(i) = signbit(acc_s(i)) ? 0.f : acc_s(i);
      } else {
        dropout.template apply<false>(acc_s, tScS, m0, col0, stream);
      }
    }
  }
};

}  // namespace flash
