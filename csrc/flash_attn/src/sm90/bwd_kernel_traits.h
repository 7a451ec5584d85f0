// Compile-time description of the Hopper backward kernel (sm90/bwd_kernel.h): tile shape, warp
// roles and register budgets, the five warpgroup GEMMs, the shared-memory layouts TMA writes and
// GMMA reads (and their transposed views), and the Q/dO pipeline.
//
// Everything is computed transposed, keys as the GMMA M dimension: a consumer warpgroup owns 64 of
// the block's keys, so S^T and dP^T (keys x queries) sit in its registers in the accumulator
// layout that is also the register A operand of dV += P^T dO and dK += dS^T Q; P and dS never go
// through shared memory for those two GEMMs. Only dS goes to shared memory, for dQ += dS K.
//
// kDeterministic: the key blocks add their dQ parts in a fixed order (sm90/bwd_dq_order.h), so dQ
// is bitwise the same from run to run; the rest of the kernel is the same.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cute/tensor.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cutlass/numeric_types.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include "plan/tile_sizes.h"

namespace flash {

using namespace cute;

template <int kHeadDim_, bool kIsBf16, bool kDeterministic_>
struct Sm90BwdTraits {
  using Element = std::conditional_t<kIsBf16, cutlass::bfloat16_t, cutlass::half_t>;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr bool kDeterministic = kDeterministic_;
  // The register budget below holds dK and dV (64 fp32 each per thread) beside S^T and dP^T of a
  // 64-query step (32 each) at head dim 128 only.
  static_assert(kHeadDim == 128, "the Hopper backward covers head dim 128");

  // kBlockN keys per thread block, kBlockM queries per step. Two consumer warpgroups split the
  // keys (64 each, one GMMA M-extent): dK and dV of a key stay in one warpgroup for the whole loop,
  // and S^T / dP^T come out in the layout of the register A operand of the dV and dK GEMMs.
  // Splitting the queries instead would need P^T and dS^T of all 64 keys x 128 queries in shared
  // memory for dV / dK (two extra 32 KiB stores and reads per step) and a cross-warpgroup sum of dK, dV.
  // 64 queries per step: 128 keys x 64 queries keeps S^T + dP^T at 64 registers; 128 queries
  // would need 128 and not fit beside dK + dV (128) under 240.
  static constexpr int kBlockM = kSm90BwdBlockM;
  static constexpr int kBlockN = 128;
  static constexpr int kNConsumerWarpgroups = kBlockN / 64;
  static constexpr int kNThreads = 128 * (1 + kNConsumerWarpgroups);  // producer warpgroup first
  static constexpr int kNConsumerThreads = 128 * kNConsumerWarpgroups;

  // Q/dO (and LSE/D) ring depth. Two stages: the next step's Q and dO land during the current step
  // (one step is ~5 GEMMs of 64 x 128 x 128-ish work, far longer than a 32 KiB TMA).
  static constexpr int kStages = 2;

  // setmaxnreg budgets: 128 * 24 + 256 * 240 = 64512 <= 65536.
  static constexpr int kProducerRegisters = 24;
  static constexpr int kConsumerRegisters = 240;
  static_assert(128 * kProducerRegisters + kNConsumerThreads * kConsumerRegisters <= 65536);

  // Warpgroups along M (keys) for S^T, dP^T, dK, dV; along N (head dim) for dQ, whose M is the
  // step's 64 queries: warpgroup w computes dQ[:, 64 w : 64 w + 64] over all 128 keys, so the two
  // warpgroups' dQ parts are disjoint and each element is added to global memory once.
  using WarpgroupsAlongM = Layout<Shape<Int<kNConsumerWarpgroups>, _1, _1>>;
  using WarpgroupsAlongN = Layout<Shape<_1, Int<kNConsumerWarpgroups>, _1>>;

  // S^T = K Q^T and dP^T = V dO^T: (keys x queries), reduction over d; all operands K-major.
  using TiledMmaSdP = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kBlockM>, Int<kHeadDim>>>(),
      WarpgroupsAlongM{}));
  // dV += P^T dO and dK += dS^T Q: (keys x d), reduction over the step's queries. A from registers;
  // B is dO / Q read as (d x queries), d contiguous: MN-major.
  using TiledMmadKV = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, Shape<_64, Int<kHeadDim>, Int<kBlockM>>, GMMA::Major::K,
                           GMMA::Major::MN>(),
      WarpgroupsAlongM{}));
  // dQ = dS K: (queries x d), reduction over the block's keys. A is dS read from the dS^T buffer
  // (queries contiguous: MN-major); B is K read as (d x keys), d contiguous: MN-major.
  using TiledMmadQ = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kHeadDim / kNConsumerWarpgroups>, Int<kBlockN>>,
                           GMMA::Major::MN, GMMA::Major::MN>(),
      WarpgroupsAlongN{}));

  // 128-byte swizzled tiles (one TMA box row = 64 elements = 128 bytes), as in the forward.
  // Q and dO: (queries, d, stage); K and V: (keys, d).
  using SmemLayoutQ = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{},
                                             Shape<Int<kBlockM>, Int<kHeadDim>, Int<kStages>>{}));
  using SmemLayoutK = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{},
                                             Shape<Int<kBlockN>, Int<kHeadDim>>{}));
  // Transposed views of the same bytes, (d, queries, stage) and (d, keys): a K-major SW128 atom
  // read the other way round is an MN-major SW128 atom, which GMMA takes with its transpose bit.
  using SmemLayoutQt = decltype(composition(
      SmemLayoutQ{}, make_layout(Shape<Int<kHeadDim>, Int<kBlockM>, Int<kStages>>{},
                                 make_stride(Int<kBlockM>{}, _1{}, Int<kBlockM * kHeadDim>{}))));
  using SmemLayoutKt = decltype(composition(
      SmemLayoutK{}, make_layout(Shape<Int<kHeadDim>, Int<kBlockN>>{}, make_stride(Int<kBlockN>{}, _1{}))));
  // dS^T (keys, queries, buffer), queries contiguous: 64 queries are one 128-byte swizzle row, so
  // the accumulator's neighbouring-query pairs store as stmatrix rows. Two buffers: a warpgroup may
  // write step s + 1's dS^T while the other still reads step s's in its dQ GEMM.
  static constexpr int kDsBuffers = 2;
  using SmemLayoutdSt = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{},
                                               Shape<Int<kBlockN>, Int<kBlockM>, Int<kDsBuffers>>{}));
  // dS (queries, keys, buffer): the dQ GEMM's A operand, MN-major.
  using SmemLayoutdS = decltype(composition(
      SmemLayoutdSt{}, make_layout(Shape<Int<kBlockM>, Int<kBlockN>, Int<kDsBuffers>>{},
                                   make_stride(Int<kBlockN>{}, _1{}, Int<kBlockM * kBlockN>{}))));
  using SmemCopyAtomdS = Copy_Atom<SM90_U32x4_STSM_N, Element>;
  // dK and dV leave through the K and V tiles (free once the last step's GEMMs completed).
  using SmemCopyAtomdKV = Copy_Atom<SM90_U32x4_STSM_N, Element>;

  using Pipeline = cutlass::PipelineTmaAsync<kStages>;
  using PipelineState = typename cutlass::PipelineState<kStages>;

  static constexpr uint32_t kQTileBytes = kBlockM * kHeadDim * sizeof(Element);
  static constexpr uint32_t kKTileBytes = kBlockN * kHeadDim * sizeof(Element);

  struct SharedStorage {
    // 1024-byte alignment: the swizzle pattern repeats every 8 rows of 128 bytes and TMA and GMMA
    // compute it from absolute shared-memory address bits.
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutQ>> q;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutQ>> dout;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutK>> k;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutK>> v;
    alignas(1024) cute::array_aligned<Element, cosize_v<SmemLayoutdSt>> ds;
    // Per stage, per query of the step: the forward's lse in log2 units (+inf past the sequence,
    // so P = 0 there) and D = rowsum(dO * O).
    alignas(16) float lse_log2[kStages][kBlockM];
    alignas(16) float dsum[kStages][kBlockM];
    typename Pipeline::SharedStorage pipeline_qdo;
    uint64_t lse_full[kStages];  // 32 arrivals: the producer's second warp wrote LSE and D
    uint64_t kv_full;            // transaction barrier of the K and V loads
  };
  static constexpr int kSmemBytes = int(sizeof(SharedStorage));
  static_assert(kSmemBytes <= 227 * 1024, "more than an H100 SM's shared memory per block");
};

}  // namespace flash
