// Compile-time description of the decode kernel (kernels/decode_kernel.h): a 16-row query tile,
// warps that split the keys, per-warp shared-memory rings for K and V.
#pragma once

#include <type_traits>

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

#include "plan/tile_sizes.h"

namespace flash {

using namespace cute;

// Constants GmemTileCopy needs for `kThreads` threads copying rows of kHeadDim elements.
template <typename Element_, int kHeadDim, int kThreads, int kSmemAtomCols_>
struct RowCopyTraits {
  using Element = Element_;
  static constexpr int kSmemAtomCols = kSmemAtomCols_;
  static constexpr int kElemsPerChunk = 16 / int(sizeof(Element));
  static constexpr int kChunksPerRow = kHeadDim / kElemsPerChunk;
  static constexpr int kThreadsPerRow = (kChunksPerRow & -kChunksPerRow) < 32 ? (kChunksPerRow & -kChunksPerRow) : 32;
  static constexpr int kRowsPerPass = kThreads / kThreadsPerRow;
  static constexpr int kChunksPerThreadRow = kChunksPerRow / kThreadsPerRow;
  static_assert(kChunksPerRow % kThreadsPerRow == 0 && kThreads % kThreadsPerRow == 0);
};

template <int kHeadDim_, int kSubN_, int kStages_, int kNWarps_, typename Element_>
struct DecodeKernelTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kDecodeBlockM;
  static constexpr int kSubN = kSubN_;
  static constexpr int kStages = kStages_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = kNWarps * 32;
  static constexpr int kKeysPerRound = kNWarps * kSubN;
  static_assert(kHeadDim % 32 == 0 && kSubN % 16 == 0 && kStages >= 2);

  // One warp's MMA: 16 rows x 16 columns per step (two m16n8k16 atoms side by side, so ldmatrix
  // x4 serves both).
  using MmaAtom = std::conditional_t<std::is_same_v<Element, cutlass::half_t>,
                                     MMA_Atom<SM80_16x8x16_F32F16F16F32_TN>,
                                     MMA_Atom<SM80_16x8x16_F32BF16BF16F32_TN>>;
  using WarpMma = TiledMMA<MmaAtom, Layout<Shape<_1, _1, _1>>, Tile<_16, _16, _16>>;

  static constexpr int kSmemAtomCols = kHeadDim % 64 == 0 ? 64 : 32;
  static constexpr int kSwizzleBits = kSmemAtomCols == 64 ? 3 : 2;
  using SmemLayoutAtom = decltype(composition(
      Swizzle<kSwizzleBits, 3, 3>{}, Layout<Shape<_8, Int<kSmemAtomCols>>, Stride<Int<kSmemAtomCols>, _1>>{}));
  using SmemLayoutQ = decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  using SmemLayoutKV = decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kSubN>, Int<kHeadDim>>{}));
  using SmemLayoutVt = decltype(composition(SmemLayoutKV{}, make_layout(Shape<Int<kHeadDim>, Int<kSubN>>{}, GenRowMajor{})));
  using SmemLayoutVtNoSwizzle = decltype(get_nonswizzle_portion(SmemLayoutVt{}));

  using SmemCopyAtom = Copy_Atom<SM75_U32x4_LDSM_N, Element>;
  using SmemCopyAtomTransposed = Copy_Atom<SM75_U16x8_LDSM_T, Element>;

  // Every warp copies its own K / V rows; warp 0 copies Q.
  using WarpCopy = RowCopyTraits<Element, kHeadDim, 32, kSmemAtomCols>;
  static_assert(kBlockM % WarpCopy::kRowsPerPass == 0 && kSubN % WarpCopy::kRowsPerPass == 0);

  static constexpr int kTileElems = kSubN * kHeadDim;  // one K or V sub-block
  static constexpr int kSmemQBytes = kBlockM * kHeadDim * int(sizeof(Element));
  static constexpr int kSmemRingBytes = kNWarps * kStages * 2 * kTileElems * int(sizeof(Element));
  static constexpr int kMergeRowStride = kHeadDim + 4;  // floats: padded against bank conflicts
  static constexpr int kSmemMergeBytes = kNWarps * kBlockM * kMergeRowStride * 4;
  // Paged K/V: per warp, a ring of kStages + 1 slots of block-table entries (a 32-key sub-block
  // spans at most kMaxPages pages of >= 16 rows), after the K/V ring.
  static constexpr int kMaxPages = kSubN / 16 + 1;
  static constexpr int kPageSlots = kStages + 1;
  static constexpr int kPageSlotInts = kMaxPages <= 4 ? 4 : 8;
  static_assert(2 * (kSubN / 16) <= kPageSlotInts && kMaxPages <= kPageSlotInts,
                "a page slot holds a sub-block's 16-row group entries and their in-page rows, or its kMaxPages entries");
  static constexpr int kSmemPagesBytes = kNWarps * kPageSlots * kPageSlotInts * 4;
  static constexpr int kSmemBytes =
      kSmemQBytes + (kSmemRingBytes + kSmemPagesBytes > kSmemMergeBytes ? kSmemRingBytes + kSmemPagesBytes : kSmemMergeBytes);
  static_assert(kSmemBytes == decode_smem_bytes(kHeadDim, int(sizeof(Element))), "tile_sizes.h disagrees");
};

}  // namespace flash
