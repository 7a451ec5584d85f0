// Register-level helpers around CuTe's SM80 MMA: shared->register pipelined GEMMs, fragment
// layout views and type conversion.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/numeric_conversion.h>

namespace flash {

using namespace cute;

// acc += A * B with both operands in shared memory. The ldmatrix for k-slice k+1 is issued
// before the MMAs of slice k so shared-memory latency hides behind tensor-core work.
template <typename Acc, typename RA, typename RB, typename SA, typename SB, typename TiledMma,
          typename CopyA, typename CopyB, typename ThrCopyA, typename ThrCopyB>
__device__ __forceinline__ void gemm_ss(Acc& acc, RA& rA, RB& rB, SA const& sA, SB const& sB,
                                        TiledMma const& mma, CopyA const& copy_a, CopyB const& copy_b,
                                        ThrCopyA const& thr_copy_a, ThrCopyB const& thr_copy_b) {
  Tensor rA_view = thr_copy_a.retile_D(rA);
  Tensor rB_view = thr_copy_b.retile_D(rB);
  copy(copy_a, sA(_, _, _0{}), rA_view(_, _, _0{}));
  copy(copy_b, sB(_, _, _0{}), rB_view(_, _, _0{}));
  CUTE_UNROLL
  for (int k = 0; k < size<2>(rA); ++k) {
    if (k < size<2>(rA) - 1) {
      copy(copy_a, sA(_, _, k + 1), rA_view(_, _, k + 1));
      copy(copy_b, sB(_, _, k + 1), rB_view(_, _, k + 1));
    }
    cute::gemm(mma, rA(_, _, k), rB(_, _, k), acc);
  }
}

// acc += A * B with A already in registers (the probabilities P) and B in shared memory.
template <typename Acc, typename RA, typename RB, typename SB, typename TiledMma, typename CopyB,
          typename ThrCopyB>
__device__ __forceinline__ void gemm_rs(Acc& acc, RA const& rA, RB& rB, SB const& sB, TiledMma const& mma,
                                        CopyB const& copy_b, ThrCopyB const& thr_copy_b) {
  Tensor rB_view = thr_copy_b.retile_D(rB);
  copy(copy_b, sB(_, _, _0{}), rB_view(_, _, _0{}));
  CUTE_UNROLL
  for (int k = 0; k < size<2>(rA); ++k) {
    if (k < size<2>(rA) - 1) copy(copy_b, sB(_, _, k + 1), rB_view(_, _, k + 1));
    cute::gemm(mma, rA(_, _, k), rB(_, _, k), acc);
  }
}

// acc += A * B like gemm_rs, but walking B one copy n-step at a time (all its k-slices) instead of
// one k-slice at a time (all of N): for a short K and a wide N -- P V at decode, K = 32 keys, N =
// the head dim -- only a few registers of B are live, not a k-slice of the whole head dim (8
// instead of 32 per slice at head dim 128). A copy n-step (one ldmatrix.x4) fills the registers of
// several MMA n-steps; the MMAs whose registers it filled run right after it (the offsets are
// compile-time constants, so the test folds away). One-row-block MMA tiles only (MMA_M = 1).
template <typename Acc, typename RA, typename RB, typename SB, typename TiledMma, typename CopyB,
          typename ThrCopyB>
__device__ __forceinline__ void gemm_rs_n_outer(Acc& acc, RA const& rA, RB& rB, SB const& sB, TiledMma const& mma,
                                                CopyB const& copy_b, ThrCopyB const& thr_copy_b) {
  static_assert(decltype(size<1>(rA))::value == 1, "one MMA row block");
  Tensor rB_view = thr_copy_b.retile_D(rB);
  static_assert(decltype(size<2>(rB_view))::value == decltype(size<2>(rB))::value, "copy and MMA k-steps differ");
  CUTE_UNROLL
  for (int c = 0; c < size<1>(rB_view); ++c) {
    copy(copy_b, sB(_, c, _), rB_view(_, c, _));
    CUTE_UNROLL
    for (int n = 0; n < size<1>(rB); ++n) {
      bool filled = false;  // MMA n-step n's first register is one this copy wrote
      CUTE_UNROLL
      for (int v = 0; v < size<0>(rB_view); ++v) filled |= rB.layout()(0, n, 0) == rB_view.layout()(v, c, 0);
      if (filled) {
        CUTE_UNROLL
        for (int k = 0; k < size<2>(rB); ++k) cute::gemm(mma, rA(_, 0, k), rB(_, n, k), acc(_, 0, n));
      }
    }
  }
}

// An SM80 accumulator fragment ((2 cols, 2 rows), MMA_M, MMA_N) viewed as (rows, cols):
// ((2, MMA_M), (2, MMA_N)), so softmax can walk whole rows.
template <typename Layout>
__device__ __forceinline__ auto acc_rowcol_layout(Layout const& acc) {
  static_assert(decltype(rank(acc))::value == 3 && decltype(size<0>(acc))::value == 4);
  auto l = logical_divide(acc, Shape<_2>{});  // ((2, 2), MMA_M, MMA_N)
  return make_layout(make_layout(get<0, 1>(l), get<1>(l)), make_layout(get<0, 0>(l), get<2>(l)));
}

template <typename Engine, typename Layout>
__device__ __forceinline__ auto rowcol_view(Tensor<Engine, Layout>& t) {
  return make_tensor(t.data(), acc_rowcol_layout(t.layout()));
}
template <typename Engine, typename Layout>
__device__ __forceinline__ auto rowcol_view(Tensor<Engine, Layout> const& t) {
  return make_tensor(t.data(), acc_rowcol_layout(t.layout()));
}

// Two neighbouring n-tiles of an accumulator (16 x 8 each) hold exactly the registers of one
// m16n8k16 A operand, so P can feed the next MMA without a trip through shared memory:
// ((2, 2), MMA_M, MMA_N) -> ((4, 2), MMA_M, MMA_N / 2).
template <typename Layout>
__device__ __forceinline__ auto acc_to_a_operand_layout(Layout const& acc) {
  static_assert(decltype(size<0>(acc))::value == 4 && decltype(size<2>(acc))::value % 2 == 0);
  auto l = logical_divide(acc, Shape<X, X, _2>{});  // (4, MMA_M, (2, MMA_N / 2))
  return make_layout(make_layout(get<0>(l), get<2, 0>(l)), get<1>(l), get<2, 1>(l));
}

// The value itself: convert_fragment's default.
struct SameValue {
  template <typename T>
  __device__ __forceinline__ T operator()(T x) const { return x; }
};

// fp32 fragment -> 16-bit fragment of the same layout, two elements per conversion instruction;
// each element through `f` first.
template <typename To, typename Engine, typename Layout, typename F = SameValue>
__device__ __forceinline__ auto convert_fragment(Tensor<Engine, Layout> const& src, F f = {}) {
  using From = typename Engine::value_type;
  Tensor dst = make_fragment_like<To>(src);
  constexpr int N = decltype(size(src))::value;
  static_assert(N % 2 == 0);
  cutlass::NumericArrayConverter<To, From, 2> convert;
  CUTE_UNROLL
  for (int i = 0; i < N; i += 2) {
    cutlass::Array<From, 2> in;
    in[0] = f(src(i));
    in[1] = f(src(i + 1));
    cutlass::Array<To, 2> out = convert(in);
    dst(i) = out[0];
    dst(i + 1) = out[1];
  }
  return dst;
}

template <typename T>
__device__ __forceinline__ T quad_allreduce_max(T x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
  return fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
}

template <typename T>
__device__ __forceinline__ T quad_allreduce_sum(T x) {
  x += __shfl_xor_sync(0xffffffff, x, 2);
  return x + __shfl_xor_sync(0xffffffff, x, 1);
}

}  // namespace flash
