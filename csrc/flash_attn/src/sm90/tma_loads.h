// TMA descriptors (CUtensorMap) of the Q, K and V^T tiles, built on the host from FwdParams and
// handed to the kernel as __grid_constant__ parameters, where the TMA unit reads them.
//
// Each map covers a whole tensor as (rows, head dim, heads, batch), head dim contiguous; the
// kernel selects its (batch, head) and tile by coordinates. Rows past the sequence and columns
// past d read as zeros (TMA's out-of-bounds fill), so ragged tiles need no predicates. TMA needs
// 16-byte aligned base pointers and row/head/batch strides that are multiples of 8 elements.
#pragma once

#include <utility>

#include <cute/tensor.hpp>
#include <cute/atom/copy_traits_sm90_tma.hpp>

#include "params/fwd_params.h"

namespace flash {

using namespace cute;

template <typename Traits>
auto make_tma_q(const FwdParams& p) {
  using Element = typename Traits::Element;
  Tensor q = make_tensor(make_gmem_ptr(static_cast<Element const*>(p.q_ptr)), make_shape(p.seqlen_q, p.d, p.h, p.b),
                         make_stride(p.q_row_stride, _1{}, p.q_head_stride, p.q_batch_stride));
  return make_tma_copy(SM90_TMA_LOAD{}, q, typename Traits::SmemLayoutQ{});
}

template <typename Traits>
auto make_tma_k(const FwdParams& p) {
  using Element = typename Traits::Element;
  Tensor k = make_tensor(make_gmem_ptr(static_cast<Element const*>(p.k_ptr)), make_shape(p.seqlen_k, p.d, p.h_k, p.b),
                         make_stride(p.k_row_stride, _1{}, p.k_head_stride, p.k_batch_stride));
  return make_tma_copy(SM90_TMA_LOAD{}, k, typename Traits::SmemLayoutK{}(_, _, _0{}));
}

// V read through its transpose (head dim, keys): the layout the P V GEMM wants its B operand in.
template <typename Traits>
auto make_tma_vt(const FwdParams& p) {
  using Element = typename Traits::Element;
  Tensor vt = make_tensor(make_gmem_ptr(static_cast<Element const*>(p.v_ptr)), make_shape(p.d, p.seqlen_k, p.h_k, p.b),
                          make_stride(_1{}, p.v_row_stride, p.v_head_stride, p.v_batch_stride));
  return make_tma_copy(SM90_TMA_LOAD{}, vt, typename Traits::SmemLayoutVt{}(_, _, _0{}));
}

// The coordinate extents the kernel indexes the maps with; the same as the host-side views above.
__device__ __forceinline__ auto q_extent(const FwdParams& p) { return make_shape(p.seqlen_q, p.d, p.h, p.b); }
__device__ __forceinline__ auto k_extent(const FwdParams& p) { return make_shape(p.seqlen_k, p.d, p.h_k, p.b); }
__device__ __forceinline__ auto vt_extent(const FwdParams& p) { return make_shape(p.d, p.seqlen_k, p.h_k, p.b); }

// Everything the kernel reads: the call's parameters and the three tensor maps.
template <typename Traits>
struct Sm90FwdArgs {
  FwdParams params;
  decltype(make_tma_q<Traits>(std::declval<const FwdParams&>())) tma_q;
  decltype(make_tma_k<Traits>(std::declval<const FwdParams&>())) tma_k;
  decltype(make_tma_vt<Traits>(std::declval<const FwdParams&>())) tma_vt;
};

template <typename Traits>
Sm90FwdArgs<Traits> make_sm90_fwd_args(const FwdParams& p) {
  return {p, make_tma_q<Traits>(p), make_tma_k<Traits>(p), make_tma_vt<Traits>(p)};
}

}  // namespace flash
