// TMA descriptors (CUtensorMap) of the Q, K and V^T tiles the forward loads and of the O boxes it
// stores, built on the host from FwdParams and handed to the kernel as __grid_constant__
// parameters, where the TMA unit reads them.
//
// Each map covers a whole tensor as (rows, head dim, heads, batch), head dim contiguous (a paged
// K/V cache as (page rows, head dim, heads, pages)); the kernel selects its (batch, head) and tile
// by coordinates. Rows past the tensor and columns past d read as zeros (TMA's out-of-bounds
// fill); rows past a packed sequence read the next one's, which the score mask (keys) and the row
// predicates of the output (queries) leave out. TMA needs 16-byte aligned base pointers and
// strides that are multiples of 8 elements.
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>

#include <cute/tensor.hpp>
#include <cute/atom/copy_traits_sm90_tma.hpp>

#include "params/fwd_params.h"

namespace flash {

using namespace cute;

// The extents each map covers, the same on host and device: (rows, head dim, heads, batches).
// A batch-strided tensor is (seqlen, d, heads, batch); a packed (varlen) one is all its rows as
// one batch entry, and a tile addresses its sequence by a row offset (sm90_tile_rows). The packed
// tensor's batch stride is never used (one entry) but must be a positive multiple of 16 bytes.
__host__ __device__ __forceinline__ auto q_extent(const FwdParams& p) {
  return make_shape(p.cu_seqlens_q ? p.total_q_rows : p.seqlen_q, p.d, p.h, p.cu_seqlens_q ? 1 : p.b);
}
// A paged cache (a block table) is (page rows, d, heads, pages), whether the call is batch-strided
// or varlen: its key blocks each lie inside one page (plan/tile_sizes.h, sm90_fwd_reads_pages),
// and the producer addresses a block by its page and its row offset there.
template <bool kPaged = false>
__host__ __device__ __forceinline__ auto k_extent(const FwdParams& p) {
  if constexpr (kPaged) {
    return make_shape(p.page_block_size, p.d, p.h_k, p.num_pages);
  } else {
    return make_shape(p.cu_seqlens_k ? p.total_k_rows : p.seqlen_k, p.d, p.h_k, p.cu_seqlens_k ? 1 : p.b);
  }
}
template <bool kPaged = false>
__host__ __device__ __forceinline__ auto vt_extent(const FwdParams& p) {
  const auto k = k_extent<kPaged>(p);
  return make_shape(get<1>(k), get<0>(k), get<2>(k), get<3>(k));
}
// The map a call's K and V^T loads read: the paged one where it has a block table.
inline auto k_map_extent(const FwdParams& p) { return p.block_table ? k_extent<true>(p) : k_extent<false>(p); }
inline auto vt_map_extent(const FwdParams& p) { return p.block_table ? vt_extent<true>(p) : vt_extent<false>(p); }
// A packed (varlen) K/V tensor, as opposed to a batch-strided or paged one.
inline bool packed_kv(const FwdParams& p) { return p.cu_seqlens_k && !p.block_table; }

inline int64_t tma_batch_stride(bool packed, int64_t batch_stride, int64_t row_stride, int rows) {
  return packed ? std::max<int64_t>(row_stride * rows, 8) : batch_stride;
}

// One tensor map: the global tensor (base, extents, strides) and the shared-memory tile one
// load fills.
template <typename Element, typename Extent, typename Stride, typename SmemTile>
auto make_tma_map(const void* ptr, Extent extent, Stride stride, SmemTile smem_tile) {
  return make_tma_copy(SM90_TMA_LOAD{}, make_tensor(make_gmem_ptr(static_cast<Element const*>(ptr)), extent, stride),
                       smem_tile);
}

template <typename Traits>
auto make_tma_q(const FwdParams& p) {
  const auto extent = q_extent(p);
  const int64_t batch_stride = tma_batch_stride(p.cu_seqlens_q, p.q_batch_stride, p.q_row_stride, get<0>(extent));
  return make_tma_map<typename Traits::Element>(p.q_ptr, extent,
                                                make_stride(p.q_row_stride, _1{}, p.q_head_stride, batch_stride),
                                                typename Traits::SmemLayoutQ{});
}

template <typename Traits>
auto make_tma_k(const FwdParams& p) {
  const auto extent = k_map_extent(p);
  const int64_t batch_stride = tma_batch_stride(packed_kv(p), p.k_batch_stride, p.k_row_stride, get<0>(extent));
  return make_tma_map<typename Traits::Element>(p.k_ptr, extent,
                                                make_stride(p.k_row_stride, _1{}, p.k_head_stride, batch_stride),
                                                typename Traits::SmemLayoutK{}(_, _, _0{}));
}

// V read through its transpose (head dim, keys): the layout the P V GEMM wants its B operand in.
template <typename Traits>
auto make_tma_vt(const FwdParams& p) {
  const auto extent = vt_map_extent(p);
  const int64_t batch_stride = tma_batch_stride(packed_kv(p), p.v_batch_stride, p.v_row_stride, get<1>(extent));
  return make_tma_map<typename Traits::Element>(p.v_ptr, extent,
                                                make_stride(_1{}, p.v_row_stride, p.v_head_stride, batch_stride),
                                                typename Traits::SmemLayoutVt{}(_, _, _0{}));
}

// O, in Q's extents, stored a warpgroup's 64 rows by one swizzle atom's columns at a time
// (Traits::SmemLayoutOBox): rows past a batch-strided sequence and columns past d are not written
// (TMA clips its boxes at the extents).
template <typename Traits>
auto make_tma_o(const FwdParams& p) {
  const auto extent = q_extent(p);
  const int64_t batch_stride = tma_batch_stride(p.cu_seqlens_q, p.o_batch_stride, p.o_row_stride, get<0>(extent));
  Tensor o = make_tensor(make_gmem_ptr(static_cast<typename Traits::Element*>(p.o_ptr)), extent,
                         make_stride(p.o_row_stride, _1{}, p.o_head_stride, batch_stride));
  return make_tma_copy(SM90_TMA_STORE{}, o, typename Traits::SmemLayoutOBox{});
}

// Everything the kernel reads: the call's parameters and the four tensor maps.
template <typename Traits>
struct Sm90FwdArgs {
  FwdParams params;
  decltype(make_tma_q<Traits>(std::declval<const FwdParams&>())) tma_q;
  decltype(make_tma_k<Traits>(std::declval<const FwdParams&>())) tma_k;
  decltype(make_tma_vt<Traits>(std::declval<const FwdParams&>())) tma_vt;
  decltype(make_tma_o<Traits>(std::declval<const FwdParams&>())) tma_o;
};

// stores_o: whether the kernel stores O by TMA (Traits::kOStoredByTma, and not a split kernel,
// whose partials go elsewhere); else O's map is left empty, since encoding a map is host time on
// every call.
template <typename Traits>
Sm90FwdArgs<Traits> make_sm90_fwd_args(const FwdParams& p, bool stores_o) {
  using TmaO = decltype(make_tma_o<Traits>(p));
  return {p, make_tma_q<Traits>(p), make_tma_k<Traits>(p), make_tma_vt<Traits>(p),
          stores_o ? make_tma_o<Traits>(p) : TmaO{}};
}

}  // namespace flash
