// Views of a warpgroup-MMA (GMMA) accumulator fragment: by (row, column), for the softmax and the
// masks, and as the register A operand of the next GMMA, so P never goes through shared memory.
#pragma once

#include <cute/tensor.hpp>

namespace flash {

using namespace cute;

// A 64 x N GMMA accumulator holds, per thread, values ((2 cols, 2 rows, N/8 col groups), MMA_M,
// MMA_N): neighbouring columns, then the row 8 below, then the next group of 8 columns. Viewed as
// (rows, cols) = ((2, MMA_M), ((2, N/8), MMA_N)), so a row can be walked whole; like the SM80
// layout, a row's other columns live in the 3 other lanes of the thread's quad.
template <typename AccLayout>
__device__ __forceinline__ auto gmma_acc_rowcol_layout(AccLayout const& acc) {
  static_assert(decltype(rank(acc))::value == 3 && decltype(rank<0>(acc))::value == 3);
  return make_layout(make_layout(layout<0, 1>(acc), layout<1>(acc)),
                     make_layout(make_layout(layout<0, 0>(acc), layout<0, 2>(acc)), layout<2>(acc)));
}

template <typename Engine, typename Layout>
__device__ __forceinline__ auto gmma_rowcol_view(Tensor<Engine, Layout>& t) {
  return make_tensor(t.data(), gmma_acc_rowcol_layout(t.layout()));
}

// The register A operand of a 64 x N x 16 GMMA has per thread values (2 cols, 2 rows, 2 col
// groups of 8) -- the accumulator layout of one 16-column slice. So an accumulator is an A operand
// once its col groups are paired: ((2, 2, N/8), MMA_M, MMA_N) -> ((2, 2, 2), MMA_M, (N/16, MMA_N)).
template <typename AccLayout>
__device__ __forceinline__ auto gmma_acc_to_a_operand_layout(AccLayout const& acc) {
  constexpr int kColGroups = decltype(size<0, 2>(acc))::value;
  static_assert(kColGroups % 2 == 0);
  auto paired = composition(layout<0, 2>(acc), Layout<Shape<_2, Int<kColGroups / 2>>>{});  // (2, N/16)
  return make_layout(make_layout(layout<0, 0>(acc), layout<0, 1>(acc), layout<0>(paired)), layout<1>(acc),
                     make_layout(layout<1>(paired), layout<2>(acc)));
}

}  // namespace flash
