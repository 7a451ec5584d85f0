// Compile-time description of the Hopper forward kernel: tile shape, warp roles and their
// register budgets, the two warpgroup GEMMs (S = Q K^T from shared memory, O += P V with P in
// registers), the shared-memory layouts TMA writes and GMMA reads, and the K/V pipelines.
#pragma once

#include <type_traits>

#include <cute/tensor.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
// GMMA N = 80 (the key block of head dims 192 and 256) is one of CuTe's extended shapes, declared in
// these headers; see QKAtom below.
#include <cute/arch/mma_sm90_gmma_ext.hpp>
#include <cute/atom/mma_traits_sm90_gmma_ext.hpp>
#include <cutlass/numeric_types.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include "plan/tile_sizes.h"

namespace flash {

using namespace cute;

template <int kHeadDim_, bool kIsBf16, int kBlockN_ = sm90_fwd_tile(kHeadDim_).block_n,
          int kBlockM_ = sm90_fwd_tile(kHeadDim_).block_m>
struct Sm90FwdTraits {
  using Element = std::conditional_t<kIsBf16, cutlass::bfloat16_t, cutlass::half_t>;
  static constexpr int kHeadDim = kHeadDim_;
  static_assert(kHeadDim == 64 || kHeadDim == 96 || kHeadDim == 128 || kHeadDim == 192 || kHeadDim == 256,
                "the Hopper forward covers kernel head dims 64, 96, 128, 192 and 256");

  // One query tile per thread block; each consumer warpgroup owns 64 of its rows (one GMMA
  // M-extent), so a row's softmax never leaves its warpgroup. 128 rows (two consumers), or at head
  // dim 64 without a mask also 192 (three; kSm90WideRowsBlockM, whose comment says when): there a
  // key block's two GEMMs take about as long as its softmax's exponentials, so with two
  // warpgroups the tensor cores idle while both are in their softmax. Three consumers of 160
  // registers hold S 64 + O 32 + P 32 (see kBlockN).
  static constexpr int kBlockM = kBlockM_;
  static_assert(kBlockM == sm90_fwd_tile(kHeadDim).block_m ||
                (kBlockM == kSm90WideRowsBlockM && kHeadDim == 64));
  // Keys per block. A consumer thread holds kBlockN / 2 fp32 of S, kHeadDim / 2 fp32 of O and
  // kBlockN / 4 registers of P (16-bit pairs) within its 240 registers, and the block's shared
  // memory holds Q, kStages stages of K and of V^T and the O tile within 227 KiB:
  //   d <= 128: 128 keys (at 128: S 64 + O 64 + P 32 = 160 registers; 192 KiB).
  //   d = 192, 256: 80 keys. 128 keys would hold S 64 + O 128 + P 32 = 224 registers at 256 before
  //   any address or softmax state, and 4 stages of 128 x 256 K/V tiles alone are 256 KiB; with
  //   80 keys, 256 holds S 40 + O 128 + P 20 = 188 and 192 holds 156. 80 rather than 64: each
  //   block pays a fixed O rescale (d / 2 multiplies) and pipeline waits, which more keys amortise.
  //   At 192, 112 keys would also fit (S 56 + O 96 + P 28; 216 KiB with O staged in Q's buffer),
  //   but O in Q's buffer puts the next tile's Q load behind the epilogue (kOStagedInQ); 80 keys
  //   keep O's own tile and share 256's GMMA shape.
  // The P V GEMM's K extent is kBlockN, so it must be a multiple of 16; the S GEMM's N extent is
  // kBlockN, one GMMA instruction wide (QKAtom).
  //   Over short keys, 192 and 256 also have 64-key blocks (kSm90ShortKeysBlockN, whose comment
  //   says when and why).
  // (plan/tile_sizes.h holds the shapes, shared with the split heuristic.)
  static constexpr int kBlockN = kBlockN_;
  static_assert(kBlockN == sm90_fwd_tile(kHeadDim).block_n ||
                (kBlockN == kSm90ShortKeysBlockN && sm90_fwd_tile(kHeadDim).block_n != 128));
  static_assert(kBlockN % 16 == 0);
  static constexpr int kNConsumerWarpgroups = kBlockM / 64;
  static constexpr int kNThreads = 128 * (1 + kNConsumerWarpgroups);  // producer warpgroup first
  static_assert(kBlockM != sm90_fwd_tile(kHeadDim).block_m ||
                kNThreads == 32 * sm90_fwd_tile(kHeadDim).warps);
  static constexpr int kNConsumerThreads = 128 * kNConsumerWarpgroups;

  // The online softmax's folds per row (common/softmax.h): four at head dim 128, where the tensor
  // cores bound the loop, so that the row max and sum chains (32 columns at 128 keys) stop holding
  // the softmax between the GEMMs (+0.5-2.3% on an H100: benchmarks/RESULTS.md, "Run at commit
  // 6e9b387").
  // Head dim 64's loop is bound by the exponentials' issue (benchmarks/NOTES.md, items 105 and
  // 118): there one accumulator keeps a row's exponentials overlapping the next row's max chain.
  // 96 is like 128 but has not been measured; 192 and 256 have rows of 40 or 32 columns and the
  // fullest registers (with folds the head dim 256 dropout kernel spilled 16-20 bytes).
  static constexpr int kSoftmaxFolds = kHeadDim == 128 ? 4 : 1;

  // K and V ring depth: two stages let the producer fetch block n-1 while block n is consumed;
  // a third would not fit beside Q and O at head dim 128 (3 * 64 KiB + 2 * 32 KiB > 227 KiB).
  static constexpr int kStages = 2;

  // Where O waits between the registers and its global stores. In its own tile, the next
  // tile's Q loads while this tile's output leaves (the producer waits at most for the last S GEMM).
  // At head dim 256 there is no room for it: Q 64 KiB + K 2 x 40 KiB + V^T 2 x 40 KiB = 224 KiB,
  // and a fourth 64 KiB tile would make 288. O is then staged in Q's buffer, and the consumers
  // release Q's buffer (q_empty) only after their last read of O, so the next Q loads after the
  // epilogue. Head dim 192 fits its own tile: 48 + 2 x 30 + 2 x 30 + 48 = 216 KiB.
  static constexpr bool kOStagedInQ = kHeadDim == 256;

  // Q buffers. With two, the producer loads the next tile's Q as soon as this tile starts (once
  // the tile before released that buffer), so it has a whole tile to land; with one it loads only
  // after this tile's last S GEMM, and at short key lengths the consumers' last block and epilogue
  // are shorter than the load, which they then wait for at the next tile. Two fit up to head dim
  // 128 (128: Q 2 x 32 KiB + K, V 2 x 2 x 32 KiB + O 32 KiB = 224 KiB); at 192 (216 KiB with one)
  // and 256 (O staged in Q) there is no room.
  static constexpr int kQStages = kHeadDim <= 128 ? 2 : 1;
  static_assert(!kOStagedInQ || kQStages == 1, "O is staged in the one Q buffer");

  // Whether the epilogue computes its addresses per tile (fwd_kernel.h, attend_rows) instead of
  // letting ptxas hoist them out of the tile loop and hold them through the main loop. Held, they
  // spill at head dims 192 and 256 (one per-thread stmatrix address and one 64-bit load address
  // per 16 columns of O beside a main loop of S 40 + O 96 or 128 + P 20 registers: 4 bytes of
  // spill at 192, 236 at 256); at 64, 96 and 128 they fit, and holding them saves their
  // recomputation per tile.
  static constexpr bool kEpilogueAddressesPerTile = kHeadDim > 128 || kNConsumerWarpgroups == 3;

  // Whether the two consumer warpgroups issue their GEMMs in turns (GemmIssueTurns,
  // sm90/fwd_named_barriers.h). Measured on an H100 (2026-12-06, benchmarks/RESULTS.md): at head
  // dim 64 the turns cost 2-5% from 2k keys on (a key block's GEMMs are shorter than the softmax
  // they would hide, so a warpgroup waits for its turn instead), at 128 and 256 they gain 0-4%.
  static constexpr bool kGemmIssueTurns = kHeadDim >= 128;
  static_assert(!kGemmIssueTurns || kNConsumerWarpgroups == 2, "the issue turns pair two consumer warpgroups");

  // setmaxnreg budgets. The producer only issues TMA, so it gives registers to the consumers,
  // which hold the S and O accumulators, P and the softmax state (see kBlockN):
  // 128 * 24 + 256 * 240 = 64512 <= 65536 registers of the SM (128 * 24 + 384 * 160 with three).
  static constexpr int kProducerRegisters = 24;
  static constexpr int kConsumerRegisters = kNConsumerWarpgroups == 2 ? 240 : 160;
  static_assert(128 * kProducerRegisters + kNConsumerThreads * kConsumerRegisters <= 65536);

  // The consumer warpgroups tile M: warpgroup w computes rows [64 w, 64 w + 64) of both GEMMs.
  using ConsumerWarpgroups = Layout<Shape<Int<kNConsumerWarpgroups>, _1, _1>>;
  // S = Q K^T: Q (M x d) and K (N x d) both K-major in shared memory. One instruction spans the
  // whole key block, so Q's 64 x 16 slice is read from shared memory once per k-step. CuTe's
  // ss_op_selector offers N = 80 only when CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED is defined before
  // its headers (otherwise it builds 80 from five N = 16 atoms, each re-reading Q), so the atom is
  // named here; the other key blocks (128) are in the selector's base set.
  using QKAtom = std::conditional_t<
      kBlockN == 80,
      std::conditional_t<kIsBf16, SM90::GMMA::MMA_64x80x16_F32BF16BF16_SS<GMMA::Major::K, GMMA::Major::K>,
                         SM90::GMMA::MMA_64x80x16_F32F16F16_SS<GMMA::Major::K, GMMA::Major::K>>,
      decltype(GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kBlockN>, Int<kHeadDim>>>())>;
  using TiledMmaQK = decltype(make_tiled_mma(QKAtom{}, ConsumerWarpgroups{}));
  static_assert(decltype(size<1>(typename MMA_Traits<QKAtom>::Shape_MNK{}))::value == kBlockN);
  // O += P V: P (M x N) from registers, V read as (d x N) with d contiguous, i.e. MN-major.
  using TiledMmaPV = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, Shape<_64, Int<kHeadDim>, Int<kBlockN>>, GMMA::Major::K,
                           GMMA::Major::MN>(),
      ConsumerWarpgroups{}));

  // Swizzled layouts that TMA writes and GMMA reads (through its smem descriptors) without bank
  // conflicts. A swizzle atom's row is as wide as its swizzle: 128 bytes = 64 elements, 64 bytes =
  // 32. The head dim must be a whole number of atom rows, and a TMA box is at most one atom row
  // wide (make_tma_copy issues one box per atom column of the tile). 64, 128, 192 and 256 take the
  // 128-byte swizzle; 96 = 3 x 32 takes the 64-byte one (three 32-column boxes per tile), which
  // keeps one layout for the whole tile instead of a 64 + 32 split with two atoms.
  static constexpr bool kSwizzle128 = kHeadDim % 64 == 0;
  using SmemAtomKMajor =
      std::conditional_t<kSwizzle128, GMMA::Layout_K_SW128_Atom<Element>, GMMA::Layout_K_SW64_Atom<Element>>;
  using SmemAtomMNMajor =
      std::conditional_t<kSwizzle128, GMMA::Layout_MN_SW128_Atom<Element>, GMMA::Layout_MN_SW64_Atom<Element>>;
  using SmemLayoutQ = decltype(tile_to_shape(SmemAtomKMajor{}, Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  using SmemLayoutK = decltype(tile_to_shape(SmemAtomKMajor{}, Shape<Int<kBlockN>, Int<kHeadDim>, Int<kStages>>{}));
  // The Q buffers as (rows, d, buffer), buffer b at b x cosize(Q) (q_tile): the consumers take a
  // tile's Q descriptors as the first buffer's plus the buffer's offset, as K's per stage.
  using SmemLayoutQBuffers =
      decltype(tile_to_shape(SmemAtomKMajor{}, Shape<Int<kBlockM>, Int<kHeadDim>, Int<kQStages>>{}));
  static_assert(SmemLayoutQBuffers{}(0, 0, kQStages - 1) == (kQStages - 1) * cosize_v<SmemLayoutQ>);
  // V lands in shared memory already viewed as V^T (d x N): TMA reads gmem V through the same
  // transposed view, so no transpose ever happens in shared memory. The d atoms (64 or 32 wide)
  // are stacked along the keys first, so that many d-columns of all kBlockN keys are contiguous
  // and one TMA box (atom width x kBlockN) fills them; stacked along d first, a box would cover
  // only 8 keys.
  using SmemLayoutVt = decltype(tile_to_shape(SmemAtomMNMajor{}, Shape<Int<kHeadDim>, Int<kBlockN>, Int<kStages>>{},
                                              Step<_2, _1, _3>{}));

  // O goes through shared memory (stmatrix, then TMA or 16-byte global stores) in Q's layout: in
  // its own tile, or in Q's (kOStagedInQ). Each consumer warpgroup writes and reads only its own 64 rows,
  // the rows its S GEMMs read from Q, so staging O in Q's buffer never overwrites Q rows that the
  // other warpgroup's S GEMM may still be reading.
  using SmemLayoutO = SmemLayoutQ;
  using SmemCopyAtomO = Copy_Atom<SM90_U32x4_STSM_N, Element>;

  // Whether a warpgroup's 64 rows of O leave the O tile by TMA store (one thread issues it, the
  // copy runs on while the warpgroup goes on to its next tile) rather than by its threads' 16-byte
  // stores. Not where O is staged in Q's buffer (head dim 256), which the next Q load must wait
  // for. One box is 64 rows by one swizzle atom's columns: in the O tile (SmemLayoutQ's atoms
  // stacked along the rows first) warpgroup w's rows of atom column c are one contiguous, aligned
  // 64-row block, at c * kBlockM + w * 64 rows of atom width, laid out as SmemLayoutOBox.
  static constexpr bool kOStoredByTma = !kOStagedInQ;
  static constexpr int kAtomCols = kSwizzle128 ? 64 : 32;
  using SmemLayoutOBox = decltype(tile_to_shape(SmemAtomKMajor{}, Shape<_64, Int<kAtomCols>>{}));
  static_assert(kHeadDim % kAtomCols == 0);
  static_assert(SmemLayoutO{}(64, 0) == 64 * kAtomCols &&
                    (kHeadDim == kAtomCols || SmemLayoutO{}(0, kAtomCols) == kBlockM * kAtomCols) &&
                    cosize_v<SmemLayoutOBox> == 64 * kAtomCols,
                "a warpgroup's rows of one atom column of O are one contiguous box");

  using Pipeline = cutlass::PipelineTmaAsync<kStages>;
  using PipelineState = typename cutlass::PipelineState<kStages>;

  static constexpr uint32_t kQTileBytes = kBlockM * kHeadDim * sizeof(Element);
  static constexpr uint32_t kKVTileBytes = kBlockN * kHeadDim * sizeof(Element);

  // 1024-byte alignment: the 128-byte swizzle pattern repeats every 8 rows of 128 bytes (the
  // 64-byte one every 4 rows of 128), and TMA and GMMA compute it from absolute shared-memory
  // address bits.
  struct QKVTiles {
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutQ> * kQStages> q;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutK>> k;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutVt>> v;
  };
  struct QKVOTiles : QKVTiles {
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutO>> o;
  };
  struct SharedStorage : std::conditional_t<kOStagedInQ, QKVTiles, QKVOTiles> {
    typename Pipeline::SharedStorage pipeline_k;
    typename Pipeline::SharedStorage pipeline_v;
    uint64_t q_full[kQStages];  // transaction barrier of a tile's Q load, per Q buffer
    // A Q buffer is free: every consumer thread has completed its last S GEMM of the tile (with
    // kOStagedInQ: has also read its last value of the O staged there).
    uint64_t q_empty[kQStages];
  };
  // The Q buffer of the tile with this many Q loads before it, and the parity of its load on that
  // buffer's barriers (both sides count the tiles with work alike).
  __device__ static int q_stage(int q_loads) { return q_loads % kQStages; }
  __device__ static int q_parity(int q_loads) { return (q_loads / kQStages) & 1; }
  __device__ static Element* q_tile(SharedStorage& shared, int stage) {
    return shared.q.data() + stage * cosize_v<SmemLayoutQ>;
  }
  // The O staging tile.
  __device__ static Element* o_tile(SharedStorage& shared) {
    if constexpr (kOStagedInQ) {
      return shared.q.data();
    } else {
      return shared.o.data();
    }
  }
  static constexpr int kSmemBytes = int(sizeof(SharedStorage));
  static_assert(kSmemBytes <= 227 * 1024, "more than an H100 SM's shared memory per block");
};

}  // namespace flash
