// Compile-time description of the backward dK/dV kernel: tile shape, the three warp layouts of its
// GEMMs, shared-memory layouts (with the transposed views the GEMMs read) and copy atoms.
#pragma once

#include <type_traits>

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

namespace flash {

using namespace cute;

template <int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_, typename Element_, int kStagesQdO_ = 1>
struct BwdKernelTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;  // query rows per step
  static constexpr int kBlockN = kBlockN_;  // keys owned by the thread block
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = kNWarps * 32;
  // Q/dO shared-memory stages: 2 lets the next step's Q and dO load during a whole step.
  static constexpr int kStagesQdO = kStagesQdO_;
  static_assert(kStagesQdO == 1 || kStagesQdO == 2);
  static_assert(kNWarps == 8, "the warp layouts below are written for 8 warps");

  using MmaAtom = std::conditional_t<std::is_same_v<Element, cutlass::half_t>,
                                     MMA_Atom<SM80_16x8x16_F32F16F16F32_TN>,
                                     MMA_Atom<SM80_16x8x16_F32BF16BF16F32_TN>>;
  // S = Q K^T and dP = dO V^T, (kBlockM x kBlockN): 2 x 4 warps, so each warp holds a 32 x 16
  // share of a 64-row tile and the accumulators stay small beside dK and dV.
  using TiledMmaSdP = TiledMMA<MmaAtom, Layout<Shape<_2, _4, _1>>, Tile<_32, _64, _16>>;
  // dV += P^T dO and dK += dS^T Q, (kBlockN x kHeadDim): 4 x 2 warps (head dims are multiples of 32).
  using TiledMmadKV = TiledMMA<MmaAtom, Layout<Shape<_4, _2, _1>>, Tile<_64, _32, _16>>;
  // dQ = dS K, (kBlockM x kHeadDim): 4 x 2 warps.
  using TiledMmadQ = TiledMMA<MmaAtom, Layout<Shape<_4, _2, _1>>, Tile<_64, _32, _16>>;
  static_assert(kBlockM % 64 == 0 && kBlockN % 64 == 0 && kHeadDim % 32 == 0);

  // Rows of kHeadDim elements, swizzled in 8-row atoms of 64 (or 32) columns as in the forward.
  static constexpr int kSmemAtomCols = kHeadDim % 64 == 0 ? 64 : 32;
  static constexpr int kSwizzleBits = kSmemAtomCols == 64 ? 3 : 2;
  using SmemLayoutAtom = decltype(composition(
      Swizzle<kSwizzleBits, 3, 3>{}, Layout<Shape<_8, Int<kSmemAtomCols>>, Stride<Int<kSmemAtomCols>, _1>>{}));
  using SmemLayoutQ = decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  using SmemLayoutKV = decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kBlockN>, Int<kHeadDim>>{}));
  // Transposed views, (kHeadDim, rows): the B operands of dV += P^T dO, dK += dS^T Q, dQ = dS K.
  using SmemLayoutQt = decltype(composition(SmemLayoutQ{}, make_layout(Shape<Int<kHeadDim>, Int<kBlockM>>{}, GenRowMajor{})));
  using SmemLayoutQtNoSwizzle = decltype(get_nonswizzle_portion(SmemLayoutQt{}));
  using SmemLayoutKVt = decltype(composition(SmemLayoutKV{}, make_layout(Shape<Int<kHeadDim>, Int<kBlockN>>{}, GenRowMajor{})));
  using SmemLayoutKVtNoSwizzle = decltype(get_nonswizzle_portion(SmemLayoutKVt{}));

  // P and dS, (kBlockM x kBlockN) in 64-column atoms; their transposes (kBlockN x kBlockM) are the
  // A operands of the dV and dK GEMMs.
  using SmemLayoutAtomPdS = decltype(composition(Swizzle<3, 3, 3>{}, Layout<Shape<_8, _64>, Stride<_64, _1>>{}));
  using SmemLayoutPdS = decltype(tile_to_shape(SmemLayoutAtomPdS{}, Shape<Int<kBlockM>, Int<kBlockN>>{}));
  using SmemLayoutPdSt = decltype(composition(SmemLayoutPdS{}, make_layout(Shape<Int<kBlockN>, Int<kBlockM>>{}, GenRowMajor{})));
  using SmemLayoutPdStNoSwizzle = decltype(get_nonswizzle_portion(SmemLayoutPdSt{}));

  using SmemCopyAtom = Copy_Atom<SM75_U32x4_LDSM_N, Element>;
  using SmemCopyAtomTransposed = Copy_Atom<SM75_U16x8_LDSM_T, Element>;
  using SmemCopyAtomStore = Copy_Atom<AutoVectorizingCopyWithAssumedAlignment<32>, Element>;

  static constexpr int kSmemQBytes = int(cosize(SmemLayoutQ{})) * int(sizeof(Element));
  static constexpr int kSmemKVBytes = int(cosize(SmemLayoutKV{})) * int(sizeof(Element));
  static constexpr int kSmemPdSBytes = int(cosize(SmemLayoutPdS{})) * int(sizeof(Element));
  // (Q | dO) x kStagesQdO | K | V | P | dS. One stage at head dim 256: 144 KB, inside sm_80's 163 KB;
  // two stages of 128-row tiles at head dim 64: 160 KB.
  static constexpr int kSmemBytes = kStagesQdO * 2 * kSmemQBytes + 2 * kSmemKVBytes + 2 * kSmemPdSBytes;
  static_assert(kSmemBytes <= 163 * 1024, "must fit an sm_80 thread block");

  // Global <-> shared copies (GmemTileCopy): 16-byte chunks, consecutive threads on one row.
  static constexpr int kElemsPerChunk = 16 / int(sizeof(Element));
  static constexpr int kChunksPerRow = kHeadDim / kElemsPerChunk;
  static constexpr int kThreadsPerRow = (kChunksPerRow & -kChunksPerRow) < 32 ? (kChunksPerRow & -kChunksPerRow) : 32;
  static constexpr int kRowsPerPass = kNThreads / kThreadsPerRow;
  static constexpr int kChunksPerThreadRow = kChunksPerRow / kThreadsPerRow;
  static_assert(kChunksPerRow % kThreadsPerRow == 0 && kNThreads % kThreadsPerRow == 0);
  static_assert(kBlockM % kRowsPerPass == 0 && kBlockN % kRowsPerPass == 0);
};

}  // namespace flash
