// Compile-time description of the Hopper backward kernel (sm90/bwd_kernel.h) per kernel head dim:
// how the consumer warpgroups split a block's work (its keys, or the head dimension), tile shape,
// warp roles and register budgets, the five warpgroup GEMMs, the shared-memory layouts TMA writes
// and GMMA reads (and their transposed views), and the Q/dO pipeline.
//
// kDeterministic: the key blocks add their dQ parts in a fixed order (sm90/bwd_dq_order.h), so dQ
// is bitwise the same from run to run; kHasDropout: the forward's dropout mask regenerated per step
// (common/dropout.h). Tiles, GEMMs, shared memory and pipeline are the same in every variant.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cute/tensor.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
// GMMA N = 48 (the dQ GEMM's per-warpgroup width at head dim 96) is one of CuTe's extended shapes,
// declared in these headers; see DqAtom below.
#include <cute/arch/mma_sm90_gmma_ext.hpp>
#include <cute/atom/mma_traits_sm90_gmma_ext.hpp>
#include <cutlass/numeric_types.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include "plan/tile_sizes.h"

namespace flash {

using namespace cute;

template <int kHeadDim_, bool kIsBf16, bool kDeterministic_, bool kHasDropout_ = false>
struct Sm90BwdTraits {
  using Element = std::conditional_t<kIsBf16, cutlass::bfloat16_t, cutlass::half_t>;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr bool kDeterministic = kDeterministic_;
  static constexpr bool kHasDropout = kHasDropout_;
  static_assert(kHeadDim == 64 || kHeadDim == 96 || kHeadDim == 128 || kHeadDim == 192 || kHeadDim == 256,
                "the Hopper backward covers kernel head dims 64, 96, 128, 192 and 256");

  // How the consumer warpgroups share a block's work (docs/SM90_BACKWARD.md has the budgets).
  //
  // Keys split (d <= 128): each warpgroup owns 64 of the block's keys (one GMMA M-extent), computes
  // S^T and dP^T (keys x queries) of its keys and holds dK and dV of its keys for the whole loop.
  // S^T / dP^T come out in the layout of the register A operand of dV += P^T dO and dK += dS^T Q,
  // so P and dS reach those GEMMs without shared memory, and no dK / dV sum crosses warpgroups.
  // Splitting the queries instead would need P^T and dS^T of all keys x kBlockM queries in shared
  // memory for dV / dK and a cross-warpgroup sum of dK, dV.
  //
  // Head dim split (d = 192, 256): dK and dV of a warpgroup's 64 keys x d are d fp32 registers
  // per thread (256 at d = 256, 192 at 192), which leave no room for S^T and dP^T (64 more at
  // 64-query steps) under 240. So the warpgroups split the head dimension instead: dK^T and dV^T
  // (d x keys) are accumulated with d as the GMMA M dimension, warpgroup w owning d-rows of its
  // M-tiles; S and dP (queries x keys) are split along the keys; and P and dS, which every
  // warpgroup's dV^T += dO^T P and dK^T += Q^T dS read in full, go through shared memory, as dS
  // already does for dQ.
  static constexpr bool kSplitHeadDim = kHeadDim > 128;

  // kBlockN keys per thread block, kBlockM queries per step, and the warpgroups, from the register
  // budget of a consumer thread (fp32 accumulators, 16-bit operands as packed pairs):
  //   d = 64: 128 queries per step, dK + dV 64 + S^T + dP^T 128 (+ P^T 32 while it is packed,
  //   kDvAfterDs). Twice the GEMM work per step amortises the step's fixed cost (barriers,
  //   pipeline waits, the lse / D reads) that 64-query steps pay at a GEMM depth of only 64.
  //   d = 96, 128: 64 queries, dK + dV 96 / 128 + S^T + dP^T 64 + P^T 16; 128 queries would need
  //   256 / 288.
  //   d = 256: 64 keys, two warpgroups of two d M-tiles each: dK^T + dV^T 128, dQ 64 (a
  //   warpgroup's 128 d-columns of 64 queries), S + dP 32 (32 keys each). 80 keys would fit the
  //   registers (160 + 64) but not shared memory with two Q/dO stages (see SharedStorage).
  //   d = 192: 96 keys, three warpgroups of one d M-tile each, at 160 registers (three consumer
  //   warpgroups share the register file): dK^T + dV^T 96, dQ 32, S + dP 32 (32 keys each).
  // kBlockM's and kBlockN's one home is plan/tile_sizes.h: the dispatcher sizes the deterministic
  // dQ counters by the one and counts a group's thread blocks by the other.
  static constexpr int kBlockM = sm90_bwd_block_m(kHeadDim);
  static constexpr int kBlockN = sm90_bwd_block_n(kHeadDim);
  static constexpr int kNConsumerWarpgroups = kHeadDim == 192 ? 3 : 2;
  static constexpr int kNThreads = 128 * (1 + kNConsumerWarpgroups);  // producer warpgroup first
  static constexpr int kNConsumerThreads = 128 * kNConsumerWarpgroups;
  // Where P^T goes to 16 bit for the dV GEMM (keys split). Converted as soon as it is computed,
  // the dV GEMM runs while dP^T completes, but P^T is then held twice (fp32 for dS^T, 16-bit for
  // the GEMM) beside S^T, dP^T, dK and dV. At 128 queries that is 64 + 32 + 64 + 64 = 224
  // registers before any address, and ptxas spills; converted after dS^T (one pass once dP^T has
  // completed), the fp32 values die as they are packed, and the peak is 192.
  static constexpr bool kDvAfterDs = !kSplitHeadDim && kBlockM == 128;
  // Dropout's keep flags drawn while the step's S and dP GEMMs run (they depend on positions
  // alone), where the registers allow: not beside 128-query S^T and dP^T (head dim 64: 332 spill
  // bytes, against 124 drawing them once S^T has landed).
  static constexpr bool kDropoutFlagsDuringGemms = !kDvAfterDs;

  // Q/dO (and LSE/D) ring depth. Two stages: the next step's Q and dO land during the current step
  // (one step is 5 GEMMs of kBlockN keys x kBlockM x kHeadDim, far longer than its Q and dO loads).
  static constexpr int kStages = 2;

  // Producer warps that write the lse and D of a step, 64 rows each (sm90/bwd_kernel.h,
  // bwd_produce_row_stats): at 24 registers a lane holds the loads of two rows, not four.
  static constexpr int kRowStatWarps = kBlockM / 64;

  // setmaxnreg budgets: 128 * 24 + 256 * 240 = 64512 <= 65536 with two consumer warpgroups,
  // 128 * 24 + 384 * 160 = 64512 with three.
  static constexpr int kProducerRegisters = 24;
  static constexpr int kConsumerRegisters = kNConsumerWarpgroups == 3 ? 160 : 240;
  static_assert(128 * kProducerRegisters + kNConsumerThreads * kConsumerRegisters <= 65536);

  using WarpgroupsAlongM = Layout<Shape<Int<kNConsumerWarpgroups>, _1, _1>>;
  using WarpgroupsAlongN = Layout<Shape<_1, Int<kNConsumerWarpgroups>, _1>>;

  // S and dP: keys split, S^T = K Q^T and dP^T = V dO^T (keys x queries), warpgroups along M
  // (keys); head dim split, S = Q K^T and dP = dO V^T (queries x keys), warpgroups along N (keys).
  // Reduction over d; all operands K-major. (kSdpRows x kSdpCols) is the accumulator tile.
  static constexpr int kSdpRows = kSplitHeadDim ? kBlockM : kBlockN;
  static constexpr int kSdpCols = kSplitHeadDim ? kBlockN : kBlockM;
  using SdpWarpgroups = std::conditional_t<kSplitHeadDim, WarpgroupsAlongN, WarpgroupsAlongM>;
  static constexpr int kSdpTileN = kSplitHeadDim ? kBlockN / kNConsumerWarpgroups : kBlockM;
  using TiledMmaSdP = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kSdpTileN>, Int<kHeadDim>>>(), SdpWarpgroups{}));

  // dK and dV, reduction over the step's queries, warpgroups along M. Keys split: dV += P^T dO and
  // dK += dS^T Q (keys x d), A from registers, B dO / Q read as (d x queries), d contiguous:
  // MN-major. Head dim split: dV^T += dO^T P and dK^T += Q^T dS (d x keys), A dO^T / Q^T (d
  // contiguous: MN-major), B P / dS read as (keys x queries) from their buffers, keys contiguous:
  // MN-major.
  using TiledMmadKV = std::conditional_t<
      kSplitHeadDim,
      decltype(make_tiled_mma(GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kBlockN>, Int<kBlockM>>,
                                                   GMMA::Major::MN, GMMA::Major::MN>(),
                              WarpgroupsAlongM{})),
      decltype(make_tiled_mma(GMMA::rs_op_selector<Element, Element, float, Shape<_64, Int<kHeadDim>, Int<kBlockM>>,
                                                   GMMA::Major::K, GMMA::Major::MN>(),
                              WarpgroupsAlongM{}))>;
  // The dK / dV accumulator tile: (keys x d), or (d x keys) with the head dim split.
  static constexpr int kDkvRows = kSplitHeadDim ? kHeadDim : kBlockN;
  static constexpr int kDkvCols = kSplitHeadDim ? kBlockN : kHeadDim;

  // dQ = dS K: (queries x d), reduction over the block's keys, split so that the warpgroups' parts
  // are disjoint and each element is added to global memory once: along M (queries, 64 each)
  // where the step has 64 queries per warpgroup, else along N (head dim): warpgroup w computes
  // dQ[:, w d / W : (w + 1) d / W] over all the block's keys. A is dS read from its buffer:
  // queries contiguous (keys split, the dS^T buffer: MN-major) or keys contiguous (head dim
  // split: K-major); B is K read as (d x keys), d contiguous: MN-major. At head dim 96 a
  // warpgroup's 48 columns need GMMA N = 48, which CuTe's selector offers only with its extended
  // shapes (otherwise three N = 16 instructions, each re-reading dS): named here.
  static constexpr bool kDqSplitsQueries = kBlockM == 64 * kNConsumerWarpgroups;
  using DqWarpgroups = std::conditional_t<kDqSplitsQueries, WarpgroupsAlongM, WarpgroupsAlongN>;
  static constexpr int kDqTileM = kDqSplitsQueries ? 64 : kBlockM;
  static constexpr int kDqTileN = kDqSplitsQueries ? kHeadDim : kHeadDim / kNConsumerWarpgroups;
  static constexpr GMMA::Major kDsMajorInDq = kSplitHeadDim ? GMMA::Major::K : GMMA::Major::MN;
  using DqAtom = std::conditional_t<
      kDqTileN == 48,
      std::conditional_t<kIsBf16, SM90::GMMA::MMA_64x48x16_F32BF16BF16_SS<kDsMajorInDq, GMMA::Major::MN>,
                         SM90::GMMA::MMA_64x48x16_F32F16F16_SS<kDsMajorInDq, GMMA::Major::MN>>,
      decltype(GMMA::ss_op_selector<Element, Element, float, Shape<Int<kDqTileM>, Int<kDqTileN>, Int<kBlockN>>,
                                    kDsMajorInDq, GMMA::Major::MN>())>;
  using TiledMmadQ = decltype(make_tiled_mma(DqAtom{}, DqWarpgroups{}));
  static_assert(decltype(size<1>(typename MMA_Traits<DqAtom>::Shape_MNK{}))::value == kDqTileN);
  // How a step's dQ reaches the fp32 accumulator. With the keys split, each warpgroup stores its
  // fp32 (kDqTileM x kDqTileN) tile to shared memory and one thread adds it into the accumulator
  // with one TMA reduce-add, where float2 atomics would send the tile as kDqTileM * kDqTileN / 2
  // separate reductions to L2. That thread is lane 0 of the dQ writer warp of the producer
  // warpgroup (bwd_write_dq), so that no consumer warpgroup's GEMMs wait while it issues the
  // reduce-adds and waits for them (and, deterministic, for the turn; sm90/bwd_dq_order.h).
  //
  // The head dim split has no shared memory to spare (224 KiB at head dim 256), but at 256 parts
  // of the step's Q and dO buffers are free once the warpgroup's own dQ, dV^T and dK^T GEMMs have
  // completed: warpgroup w's d-rows of dK^T += Q^T dS and dV^T += dO^T P are its GMMA M-tiles,
  // d in [64 w, 64 w + 64) and [128 + 64 w, 192 + 64 w) (TiledMmadKV: two warpgroups along M,
  // repeated), so it reads only those columns of Q and dO (every warpgroup's S and dP GEMMs,
  // which read all of Q and dO, completed before the step's consumer barrier): four 8 KiB
  // column blocks, and its dQ tile, 64 x 128 fp32, is 32 KiB. So in the default variant
  // (kDqTileInStage) each warpgroup stages the tile's four 32-column quarters there, and its
  // leader adds them by TMA; it releases the stage only once the reduce-adds have read it, a
  // step later. At 192 (three warpgroups, 12 KiB of Q and dO each for a 16 KiB tile) and in the
  // deterministic variants the atomics stay.
  static constexpr bool kDqTileInStage = kHeadDim == 256 && !kDeterministic;
  static constexpr bool kDqByTma = !kSplitHeadDim || kDqTileInStage;
  // The staged unit: the warpgroup's whole tile, or with kDqTileInStage one 32-column quarter
  // (64 x 32 fp32: one 8 KiB column block of a Q / dO stage).
  static constexpr int kDqStagedN = kDqTileInStage ? kDqTileN / 4 : kDqTileN;
  static_assert(!kDqTileInStage || (kNConsumerWarpgroups == 2 && kBlockM == 64 && kDqTileN == 128 &&
                                    kDqTileM * kDqStagedN * sizeof(float) == kBlockM * 64 * sizeof(Element)),
                "a dQ quarter fills one 64-column block of a Q / dO stage");
  // fp32 tiles, swizzled so that the accumulator fragment's stores do not conflict: 128-byte rows
  // (32 floats) where the tile width allows, else 64 (head dim 96: 48).
  using SmemAtomdQ = std::conditional_t<kDqStagedN % 32 == 0, GMMA::Layout_K_SW128_Atom<float>,
                                        GMMA::Layout_K_SW64_Atom<float>>;
  using SmemLayoutdQTile = decltype(tile_to_shape(SmemAtomdQ{}, Shape<Int<kDqTileM>, Int<kDqStagedN>>{}));
  using SmemLayoutdQ = decltype(tile_to_shape(SmemLayoutdQTile{}, Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  // One staged quarter's share of a warpgroup's accumulator fragment (kDqTileInStage): the C
  // fragment of a 64 x kDqStagedN GMMA, whose elements are a quarter of the 64 x kDqTileN
  // fragment's, in the same order.
  using TiledMmadQPart = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<Int<kDqTileM>, Int<kDqStagedN>, Int<kBlockN>>,
                           kDsMajorInDq, GMMA::Major::MN>()));

  // Swizzled tiles as in the forward (sm90/kernel_traits.h): one swizzle row, and one TMA box
  // row, is 128 bytes (64 elements) where the head dim is a multiple of 64, else 64 bytes (32
  // elements: head dim 96 is three of them). Q and dO: (queries, d, stage).
  static constexpr bool kSwizzle128 = kHeadDim % 64 == 0;
  using SmemAtomQ =
      std::conditional_t<kSwizzle128, GMMA::Layout_K_SW128_Atom<Element>, GMMA::Layout_K_SW64_Atom<Element>>;
  using SmemLayoutQ = decltype(tile_to_shape(SmemAtomQ{}, Shape<Int<kBlockM>, Int<kHeadDim>, Int<kStages>>{}));
  // kDqTileInStage: each 64-column block of a stage is one contiguous 8 KiB (the swizzle atoms
  // tile the rows first), where a dQ quarter goes (dq_quarter_in_stage, sm90/bwd_kernel.h).
  static_assert(!kDqTileInStage ||
                (SmemLayoutQ{}(0, 64, 0) == kBlockM * 64 && SmemLayoutQ{}(0, 192, 1) == kBlockM * (kHeadDim + 192)));
  // K and V: (keys, d). An MN-major GMMA operand starts at a swizzle-row boundary, and the dQ GEMM
  // reads K as (d x keys) from column kDqTileN on in its second warpgroup: 48 at head dim 96, a
  // multiple of 16 elements but not of 32, so K (and V, which shares its layout and TMA box) take
  // the 32-byte swizzle there. They are loaded once per block, so the narrower TMA boxes cost
  // nothing per step.
  static constexpr int kSwizzleKElems = kDqTileN % 64 == 0 ? 64 : kDqTileN % 32 == 0 ? 32 : 16;
  using SmemAtomK = std::conditional_t<
      kSwizzleKElems == 64, GMMA::Layout_K_SW128_Atom<Element>,
      std::conditional_t<kSwizzleKElems == 32, GMMA::Layout_K_SW64_Atom<Element>, GMMA::Layout_K_SW32_Atom<Element>>>;
  using SmemLayoutK = decltype(tile_to_shape(SmemAtomK{}, Shape<Int<kBlockN>, Int<kHeadDim>>{}));
  // Transposed views of the same bytes, (d, queries, stage) and (d, keys): a K-major swizzle atom
  // read the other way round is an MN-major one, which GMMA takes with its transpose bit.
  using SmemLayoutQt = decltype(composition(
      SmemLayoutQ{}, make_layout(Shape<Int<kHeadDim>, Int<kBlockM>, Int<kStages>>{},
                                 make_stride(Int<kBlockM>{}, _1{}, Int<kBlockM * kHeadDim>{}))));
  using SmemLayoutKt = decltype(composition(
      SmemLayoutK{}, make_layout(Shape<Int<kHeadDim>, Int<kBlockN>>{}, make_stride(Int<kBlockN>{}, _1{}))));

  // dS (and, with the head dim split, P) in shared memory, in the orientation of the S / dP
  // accumulator, whose neighbouring-column pairs store as stmatrix rows: (keys, queries, buffer)
  // with the keys split, 64 or 128 queries being one or two 128-byte swizzle rows; (queries, keys,
  // buffer) with the head dim split, 64 keys one 128-byte row, 96 keys three 64-byte rows (so a
  // warpgroup's 32 keys start at a swizzle-row boundary, as the dV^T / dK^T GEMMs' MN-major B
  // needs). Two buffers: a warpgroup may write step s + 1's while another still reads step s's in
  // its GEMMs.
  static constexpr int kDsBuffers = 2;
  using SmemAtomdS = std::conditional_t<kSdpCols % 64 == 0, GMMA::Layout_K_SW128_Atom<Element>,
                                        GMMA::Layout_K_SW64_Atom<Element>>;
  using SmemLayoutdSAcc =
      decltype(tile_to_shape(SmemAtomdS{}, Shape<Int<kSdpRows>, Int<kSdpCols>, Int<kDsBuffers>>{}));
  // The same bytes the other way round: (kSdpCols, kSdpRows, buffer).
  using SmemLayoutdSAccT = decltype(composition(
      SmemLayoutdSAcc{}, make_layout(Shape<Int<kSdpCols>, Int<kSdpRows>, Int<kDsBuffers>>{},
                                     make_stride(Int<kSdpRows>{}, _1{}, Int<kSdpRows * kSdpCols>{}))));
  // dS as (queries, keys, buffer): the dQ GEMM's A operand; dS^T as (keys, queries, buffer): the
  // dV^T / dK^T GEMMs' B operand with the head dim split (P^T likewise).
  using SmemLayoutdS = std::conditional_t<kSplitHeadDim, SmemLayoutdSAcc, SmemLayoutdSAccT>;
  using SmemLayoutdSt = std::conditional_t<kSplitHeadDim, SmemLayoutdSAccT, SmemLayoutdSAcc>;
  using SmemCopyAtomdS = Copy_Atom<SM90_U32x4_STSM_N, Element>;
  // dK and dV leave through the K and V tiles (free once the last step's GEMMs completed); with
  // the head dim split the accumulator is (d x keys) and stmatrix transposes it into (keys, d).
  using SmemCopyAtomdKV =
      Copy_Atom<std::conditional_t<kSplitHeadDim, SM90_U16x8_STSM_T, SM90_U32x4_STSM_N>, Element>;

  using Pipeline = cutlass::PipelineTmaAsync<kStages>;
  using PipelineState = typename cutlass::PipelineState<kStages>;

  static constexpr uint32_t kQTileBytes = kBlockM * kHeadDim * sizeof(Element);
  static constexpr uint32_t kKTileBytes = kBlockN * kHeadDim * sizeof(Element);

  // 1024-byte alignment: the swizzle pattern repeats every 8 rows of 128 bytes and TMA and GMMA
  // compute it from absolute shared-memory address bits.
  struct Tiles {
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutQ>> q;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutQ>> dout;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutK>> k;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutK>> v;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutdSAcc>> ds;
  };
  struct TilesWithP : Tiles {
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutdSAcc>> p;
  };
  // At head dims 64 and 128 the fp32 dQ tiles add 32 KiB to 160 (192 of the 227), at 96 24 KiB.
  struct TilesWithDq : Tiles {
    alignas(1024) cute::array_aligned<float, cosize_v<SmemLayoutdQ>> dq;
  };
  // At head dim 256: Q and dO 2 x 2 x 32 KiB, K and V 2 x 32 KiB, P and dS 2 x 2 x 8 KiB = 224 KiB
  // of the 227; 80 keys would add 2 x 8 + 4 x 2 KiB.
  struct SharedStorage
      : std::conditional_t<kSplitHeadDim, TilesWithP, std::conditional_t<kDqByTma, TilesWithDq, Tiles>> {
    // Per stage, per query of the step: the forward's lse in log2 units (+inf past the sequence,
    // so P = 0 there) and D = rowsum(dO * O).
    alignas(16) float lse_log2[kStages][kBlockM];
    alignas(16) float dsum[kStages][kBlockM];
    typename Pipeline::SharedStorage pipeline_qdo;
    uint64_t lse_full[kStages];  // 32 arrivals per row-stat warp: they wrote the stage's lse and D
    uint64_t kv_full;            // transaction barrier of the K and V loads
  };
  static constexpr int kSmemBytes = int(sizeof(SharedStorage));
  static_assert(kSmemBytes <= 227 * 1024, "more than an H100 SM's shared memory per block");
};

}  // namespace flash
