// Compile-time description of one forward kernel: tile shape, MMA, shared-memory layouts and the
// copy atoms between shared memory and registers.
#pragma once

#include <type_traits>

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

namespace flash {

using namespace cute;

template <int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_, typename Element_>
struct FwdKernelTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = kNWarps * 32;
  static_assert(kHeadDim % 32 == 0 && kBlockM % (16 * kNWarps) == 0 && kBlockN % 16 == 0);

  // Warps tile the M dimension; each warp owns kBlockM / kNWarps query rows and all columns,
  // so row-wise softmax needs only shuffles inside a quad of lanes.
  using MmaAtom = std::conditional_t<std::is_same_v<Element, cutlass::half_t>,
                                     MMA_Atom<SM80_16x8x16_F32F16F16F32_TN>,
                                     MMA_Atom<SM80_16x8x16_F32BF16BF16F32_TN>>;
  using TiledMma = TiledMMA<MmaAtom, Layout<Shape<Int<kNWarps>, _1, _1>>, Tile<Int<16 * kNWarps>, _16, _16>>;

  // Shared memory rows are kHeadDim elements, swizzled in 8-row atoms of 64 (or 32) columns so
  // that 16-byte cp.async writes and ldmatrix reads hit distinct banks.
  static constexpr int kSmemAtomCols = kHeadDim % 64 == 0 ? 64 : 32;
  static constexpr int kSwizzleBits = kSmemAtomCols == 64 ? 3 : 2;
  using SmemLayoutAtom = decltype(composition(
      Swizzle<kSwizzleBits, 3, 3>{}, Layout<Shape<_8, Int<kSmemAtomCols>>, Stride<Int<kSmemAtomCols>, _1>>{}));
  using SmemLayoutQ = decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  using SmemLayoutKV = decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kBlockN>, Int<kHeadDim>>{}));
  // V seen as (head dim, keys): the B operand of O += P V.
  using SmemLayoutVt = decltype(composition(SmemLayoutKV{}, make_layout(Shape<Int<kHeadDim>, Int<kBlockN>>{}, GenRowMajor{})));
  using SmemLayoutVtNoSwizzle = decltype(get_nonswizzle_portion(SmemLayoutVt{}));

  using SmemCopyAtom = Copy_Atom<SM75_U32x4_LDSM_N, Element>;
  using SmemCopyAtomTransposed = Copy_Atom<SM75_U16x8_LDSM_T, Element>;
  using SmemCopyAtomO = Copy_Atom<AutoVectorizingCopyWithAssumedAlignment<32>, Element>;

  static constexpr int kSmemQBytes = int(cosize(SmemLayoutQ{})) * int(sizeof(Element));
  static constexpr int kSmemKVBytes = int(cosize(SmemLayoutKV{})) * int(sizeof(Element));
  static constexpr int kSmemBytes = kSmemQBytes + 2 * kSmemKVBytes;

  // Global <-> shared copies move 16-byte chunks. A row of kHeadDim elements is
  // kChunksPerRow chunks; consecutive threads take consecutive chunks of a row (coalesced).
  static constexpr int kElemsPerChunk = 16 / int(sizeof(Element));
  static constexpr int kChunksPerRow = kHeadDim / kElemsPerChunk;
  // The largest power of two dividing the row's chunk count, at most a warp (head dim 96: 4).
  static constexpr int kThreadsPerRow = (kChunksPerRow & -kChunksPerRow) < 32 ? (kChunksPerRow & -kChunksPerRow) : 32;
  static constexpr int kRowsPerPass = kNThreads / kThreadsPerRow;
  static constexpr int kChunksPerThreadRow = kChunksPerRow / kThreadsPerRow;
  static_assert(kChunksPerRow % kThreadsPerRow == 0 && kNThreads % kThreadsPerRow == 0);
  static_assert(kBlockM % kRowsPerPass == 0 && kBlockN % kRowsPerPass == 0);
};

}  // namespace flash
