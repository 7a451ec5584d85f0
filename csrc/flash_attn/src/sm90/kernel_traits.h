// Compile-time description of the Hopper forward kernel: tile shape, warp roles and their
// register budgets, the two warpgroup GEMMs (S = Q K^T from shared memory, O += P V with P in
// registers), the shared-memory layouts TMA writes and GMMA reads, and the K/V pipelines.
#pragma once

#include <type_traits>

#include <cute/tensor.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cutlass/numeric_types.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

namespace flash {

using namespace cute;

template <int kHeadDim_, bool kIsBf16>
struct Sm90FwdTraits {
  using Element = std::conditional_t<kIsBf16, cutlass::bfloat16_t, cutlass::half_t>;
  static constexpr int kHeadDim = kHeadDim_;
  // The tile shape and register budget below hold the S and O accumulators of head dims 64 and 128.
  static_assert(kHeadDim == 64 || kHeadDim == 128, "the Hopper forward covers head dims 64 and 128");

  // One 128-row query tile per thread block; each consumer warpgroup owns 64 of its rows (one
  // GMMA M-extent), so a row's softmax never leaves its warpgroup.
  static constexpr int kBlockM = 128;
  static constexpr int kBlockN = 128;
  static constexpr int kNConsumerWarpgroups = kBlockM / 64;
  static constexpr int kNThreads = 128 * (1 + kNConsumerWarpgroups);  // producer warpgroup first
  static constexpr int kNConsumerThreads = 128 * kNConsumerWarpgroups;

  // K and V ring depth: two stages let the producer fetch block n-1 while block n is consumed;
  // a third would not fit beside Q and O (3 * 64 KiB + 2 * 32 KiB > 227 KiB).
  static constexpr int kStages = 2;

  // setmaxnreg budgets. The producer only issues TMA, so it gives registers to the consumers,
  // which hold the S and O accumulators (64 fp32 each), P and the softmax state:
  // 128 * 24 + 256 * 240 = 64512 <= 65536 registers of the SM.
  static constexpr int kProducerRegisters = 24;
  static constexpr int kConsumerRegisters = 240;
  static_assert(128 * kProducerRegisters + kNConsumerThreads * kConsumerRegisters <= 65536);

  // The consumer warpgroups tile M: warpgroup w computes rows [64 w, 64 w + 64) of both GEMMs.
  using ConsumerWarpgroups = Layout<Shape<Int<kNConsumerWarpgroups>, _1, _1>>;
  // S = Q K^T: Q (M x d) and K (N x d) both K-major in shared memory.
  using TiledMmaQK = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kBlockN>, Int<kHeadDim>>>(),
      ConsumerWarpgroups{}));
  // O += P V: P (M x N) from registers, V read as (d x N) with d contiguous, i.e. MN-major.
  using TiledMmaPV = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, Shape<_64, Int<kHeadDim>, Int<kBlockN>>, GMMA::Major::K,
                           GMMA::Major::MN>(),
      ConsumerWarpgroups{}));

  // 128-byte swizzled layouts: one TMA box row is 64 elements (128 bytes), and GMMA reads the
  // same swizzle through its smem descriptors without bank conflicts.
  using SmemLayoutQ = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{},
                                             Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  using SmemLayoutK = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{},
                                             Shape<Int<kBlockN>, Int<kHeadDim>, Int<kStages>>{}));
  // V lands in shared memory already viewed as V^T (d x N): TMA reads gmem V through the same
  // transposed view, so no transpose ever happens in shared memory. The 64-wide d atoms are
  // stacked along the keys first, so 64 d-columns of all kBlockN keys are contiguous and one
  // TMA box (64 x kBlockN) fills them; stacked along d first, a box would cover only 8 keys.
  using SmemLayoutVt = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<Element>{},
                                              Shape<Int<kHeadDim>, Int<kBlockN>, Int<kStages>>{},
                                              Step<_2, _1, _3>{}));

  // O leaves through its own shared-memory tile (stmatrix, then 16-byte global stores), so the
  // next tile's Q may already be loading while a block writes this tile's output.
  using SmemLayoutO = SmemLayoutQ;
  using SmemCopyAtomO = Copy_Atom<SM90_U32x4_STSM_N, Element>;

  using Pipeline = cutlass::PipelineTmaAsync<kStages>;
  using PipelineState = typename cutlass::PipelineState<kStages>;

  static constexpr uint32_t kQTileBytes = kBlockM * kHeadDim * sizeof(Element);
  static constexpr uint32_t kKVTileBytes = kBlockN * kHeadDim * sizeof(Element);

  struct SharedStorage {
    // 1024-byte alignment: the 128-byte swizzle pattern repeats every 8 rows of 128 bytes, and
    // TMA and GMMA compute it from absolute shared-memory address bits.
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutQ>> q;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutK>> k;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutVt>> v;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutO>> o;
    typename Pipeline::SharedStorage pipeline_k;
    typename Pipeline::SharedStorage pipeline_v;
    uint64_t q_full;   // transaction barrier of a tile's Q load
    uint64_t q_empty;  // every consumer thread has issued and completed its last S GEMM of the tile
  };
  static constexpr int kSmemBytes = int(sizeof(SharedStorage));
  static_assert(kSmemBytes <= 227 * 1024, "more than an H100 SM's shared memory per block");
};

}  // namespace flash
