// One asynchronous warpgroup GEMM (wgmma): acc (+)= A * B over the whole K extent of the operands,
// issued as one commit group. The caller waits for it (warpgroup_wait) before reading acc or
// reusing A's registers or B's shared-memory stage.
#pragma once

#include <type_traits>

#include <cute/tensor.hpp>
#include <cute/arch/mma_sm90_gmma.hpp>

namespace flash {

using namespace cute;

// kZeroInit: the first k-slice overwrites acc (scale-out 0), so acc needs no clearing.
// A is either GMMA shared-memory descriptors or a register fragment (P); register operands and
// the accumulator are fenced so the compiler neither reorders nor reuses their registers while
// the tensor cores still read or write them.
template <bool kZeroInit, typename TiledMma, typename TA, typename TB, typename TC>
__device__ __forceinline__ void warpgroup_gemm(TiledMma& mma, TA& a, TB const& b, TC& c) {
  // Descriptor fragments hold GMMA descriptors, register fragments the operand's own elements.
  constexpr bool kAInRegisters = std::is_same_v<typename TA::value_type, typename TiledMma::ValTypeA>;
  if constexpr (kAInRegisters) warpgroup_fence_operand(a);
  warpgroup_fence_operand(c);
  warpgroup_arrive();
  if constexpr (kZeroInit) mma.accumulate_ = GMMA::ScaleOut::Zero;
  CUTE_UNROLL
  for (int k = 0; k < size<2>(a); ++k) {
    cute::gemm(mma, a(_, _, k), b(_, _, k), c);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
  warpgroup_fence_operand(c);
  if constexpr (kAInRegisters) warpgroup_fence_operand(a);
}

}  // namespace flash
