// Hopper (sm_90a) backward, dK / dV and dQ added into an fp32 accumulator, FlashAttention-3's
// algorithm.
//
// One thread block per (key block of kBlockN keys, batch, kv head). Warpgroup 0 produces: thread
// 0 loads K and V once and Q, dO of every step (TMA) into a two-stage ring; warps 1 to
// kRowStatWarps copy the step's lse (in log2 units) and D into shared memory beside them; with the
// keys split the next warp adds the consumers' dQ tiles (bwd_write_dq, in turns when
// deterministic), with the head dim split in deterministic mode its lane 0 passes the turns of the
// consumers' atomics on (bwd_pass_dq_turns). The
// other warpgroups consume; a step is one kBlockM-query block of one query head of the GQA group
// (every query head of the group in turn, as the SM80 kernel does, so dK and dV sum the group in
// registers). The traits (sm90/bwd_kernel_traits.h) choose how the consumers split the work.
//
// Keys split (kernel head dims 64, 96, 128; bwd_consume_keys_split): two warpgroups of 64 keys.
//   S^T = K Q^T, dP^T = V dO^T                  (SS)
//   P^T = exp2(S^T scale_log2 - lse_log2)       (registers; lse of a query column from smem)
//   dV += P^T dO                                (RS: P^T is the register A operand)
//   dS^T = P^T o (dP^T - D)                     (registers), stored to smem for dQ
//   dQ = dS K                                   (SS, both warpgroups' dS^T; each warpgroup owns
//                                                half of dQ's columns, or of its rows at 128-query
//                                                steps), staged as fp32 in shared memory and added
//                                                to the dQ accumulator by one TMA reduce-add per
//                                                warpgroup, issued by the dQ writer warp
//                                                (bwd_write_dq)
//   dK += dS^T Q                                (RS, issued after dQ: it runs while the dQ tile
//                                                is stored)
//
// Head dim split (kernel head dims 192, 256; bwd_consume_head_dim_split): W warpgroups, each
// kBlockN / W keys of S and dP and d / W rows of dK^T and dV^T.
//   S = Q K^T, dP = dO V^T                      (SS, the warpgroup's keys)
//   P = exp2(S scale_log2 - lse_log2)           (registers; lse of a query row from smem), to smem
//   dS = P o (dP - D)                           (registers), to smem
//   dQ = dS K                                   (SS, every warpgroup's dS; d-columns of the
//                                                warpgroup), added to the accumulator with float2
//                                                atomics, or at head dim 256 (default variant) by
//                                                TMA reduce-adds from the warpgroup's columns of
//                                                the step's Q and dO buffers (kDqTileInStage)
//   dV^T += dO^T P, dK^T += Q^T dS              (SS, every warpgroup's P / dS; d-rows of the
//                                                warpgroup)
//
// The atomics are add_dq_to_accumulator. In deterministic mode (Traits::kDeterministic) the key
// blocks take turns at each query block's rows in a fixed order (sm90/bwd_dq_order.h): with the
// keys split the dQ writer warp waits for the turn, adds both warpgroups' tiles and passes the turn
// once they have completed; with the head dim split the consumers wait (wait_for_dq_turn_of_step)
// before their atomics and a producer thread (bwd_pass_dq_turns) passes the turn on once the
// stage release that follows them completes.
//
// dK is scaled by scale_grad at the end (dS excludes the softmax scale, as in the SM80 kernels);
// the dQ convert kernel applies it to dQ.
//
// Dropout (Traits::kHasDropout): the forward's mask regenerated per step from Philox; P's dropped
// entries are negated in the accumulator (Dropout::keep_bits_gmma, drawn while the step's S and dP
// GEMMs run, and encode_dropped; where registers are short, drop_gmma once S has landed), so dV
// reads P o M / (1 - p) and
// dS = P o (dP o M / (1 - p) - D) without a register for the mask.
//
// Packed (varlen) q/k/v: one TMA map per packed tensor, sequences by row offset; the rows past a
// sequence that whole-block loads bring in are zeroed in shared memory (zero_rows_from).
//
// Scope: kernel head dims 64, 96, 128, 192, 256, batch-strided or packed (varlen) q/k/v, causal or
// not (any window), GQA, deterministic or not, dropout or not; no softcap, ALiBi.
#pragma once

#include <cmath>
#include <utility>

#include <cute/tensor.hpp>
#include <cute/atom/copy_traits_sm90_tma.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include "params/bwd_params.h"
#include "common/dropout.h"
#include "common/mma_utils.h"
#include "common/score_mods.h"
#include "common/seq_info.h"
#include "sm90/bwd_dq_order.h"
#include "sm90/bwd_kernel_traits.h"
#include "sm90/gmma_layouts.h"
#include "sm90/shared_window.h"
#include "sm90/tma_loads.h"
#include "sm90/warpgroup_gemm.h"

namespace flash {

using namespace cute;

// ---- TMA descriptors (host) ------------------------------------------------------------------
// Q and dO share the (rows, d, heads, batch) extent of the forward's Q map; K and V that of its K
// map. K and V are both read K-major here (V is the A operand of dP^T = V dO^T), so V needs no
// transposed map.

template <typename Traits>
auto make_bwd_tma_rows(const void* ptr, decltype(q_extent(std::declval<const FwdParams&>())) extent, bool packed,
                       int64_t row_stride, int64_t head_stride, int64_t batch_stride) {
  using Element = typename Traits::Element;
  const int64_t bstride = tma_batch_stride(packed, batch_stride, row_stride, get<0>(extent));
  Tensor t = make_tensor(make_gmem_ptr(static_cast<Element const*>(ptr)), extent,
                         make_stride(row_stride, _1{}, head_stride, bstride));
  return make_tma_copy(SM90_TMA_LOAD{}, t, typename Traits::SmemLayoutQ{}(_, _, _0{}));
}

template <typename Traits>
auto make_bwd_tma_keys(const void* ptr, decltype(k_extent(std::declval<const FwdParams&>())) extent, bool packed,
                       int64_t row_stride, int64_t head_stride, int64_t batch_stride) {
  using Element = typename Traits::Element;
  const int64_t bstride = tma_batch_stride(packed, batch_stride, row_stride, get<0>(extent));
  Tensor t = make_tensor(make_gmem_ptr(static_cast<Element const*>(ptr)), extent,
                         make_stride(row_stride, _1{}, head_stride, bstride));
  return make_tma_copy(SM90_TMA_LOAD{}, t, typename Traits::SmemLayoutK{});
}

// The fp32 dQ accumulator, [h][total_q_rows][kernel head dim], as (rows, d, heads): the target of
// the steps' TMA reduce-adds (Traits::kDqByTma), one warpgroup's dQ tile per box. A box reaching
// past a head's rows is clipped there; rows past a sequence inside the tensor (the next
// sequence's, or the next batch entry's) receive the tile's zeros (those rows' dS is 0).
__host__ __device__ __forceinline__ auto dq_accum_extent(const BwdParams& p, int head_dim) {
  return make_shape(p.total_q_rows, head_dim, p.h);
}

template <typename Traits>
auto make_bwd_tma_dq(const BwdParams& p) {
  Tensor t = make_tensor(make_gmem_ptr(p.dq_accum_ptr), dq_accum_extent(p, Traits::kHeadDim),
                         make_stride(int64_t(Traits::kHeadDim), _1{}, int64_t(p.total_q_rows) * Traits::kHeadDim));
  return make_tma_copy(SM90_TMA_REDUCE_ADD{}, t, typename Traits::SmemLayoutdQTile{});
}

template <typename Traits>
struct Sm90BwdArgs {
  BwdParams params;
  decltype(make_bwd_tma_rows<Traits>(nullptr, {}, false, 0, 0, 0)) tma_q, tma_do;
  decltype(make_bwd_tma_keys<Traits>(nullptr, {}, false, 0, 0, 0)) tma_k, tma_v;
  decltype(make_bwd_tma_dq<Traits>(std::declval<const BwdParams&>())) tma_dq;
};

template <typename Traits>
Sm90BwdArgs<Traits> make_sm90_bwd_args(const BwdParams& p) {
  const bool packed_q = p.cu_seqlens_q != nullptr, packed_k = p.cu_seqlens_k != nullptr;
  return {p,
          make_bwd_tma_rows<Traits>(p.q_ptr, q_extent(p), packed_q, p.q_row_stride, p.q_head_stride,
                                    p.q_batch_stride),
          make_bwd_tma_rows<Traits>(p.do_ptr, q_extent(p), packed_q, p.do_row_stride, p.do_head_stride,
                                    p.do_batch_stride),
          make_bwd_tma_keys<Traits>(p.k_ptr, k_extent(p), packed_k, p.k_row_stride, p.k_head_stride,
                                    p.k_batch_stride),
          make_bwd_tma_keys<Traits>(p.v_ptr, k_extent(p), packed_k, p.v_row_stride, p.v_head_stride,
                                    p.v_batch_stride),
          make_bwd_tma_dq<Traits>(p)};
}

// ---- Work of one thread block ------------------------------------------------------------------

// The query blocks that see key block n_block, and the steps (query head of the group, query block)
// the block walks; producer and consumers compute it alike. Each head's query blocks in order; in
// the deterministic variant's rotated walk (sm90/bwd_dq_order.h) from the key block's own index on,
// wrapping around. The rotation is derived from n0 where it is used rather than held: the
// producer warps run at 24 registers.
struct Sm90BwdWork {
  SeqInfo seq;
  int n0, keys_in_block, diag;
  int m_block_min, m_blocks, steps;
  int kv_head, bidb;
  bool rotated;

  __device__ int step_head(const BwdParams& p, int s) const { return kv_head * p.h_h_k_ratio + s / m_blocks; }
  template <int kBlockM, int kBlockN>
  __device__ int step_m0(int s) const {
    const int rotation = rotated ? n0 / kBlockN : 0;
    return (m_block_min + (s + rotation) % m_blocks) * kBlockM;
  }
};

template <typename Traits>
__device__ __forceinline__ Sm90BwdWork sm90_bwd_work(const BwdParams& p) {
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN;
  Sm90BwdWork w{SeqInfo(p, blockIdx.y), 0, 0, 0, 0, 0, 0, int(blockIdx.z), int(blockIdx.y), false};
  w.n0 = bwd_key_block<Traits::kDeterministic>() * kBlockN;
  w.keys_in_block = min(kBlockN, w.seq.seqlen_k - w.n0);
  w.diag = w.seq.seqlen_k - w.seq.seqlen_q;
  if (w.keys_in_block <= 0) return w;  // past a short varlen sequence: no steps, nothing written
  // Query rows that see a key of this block: i + diag - window_left <= j <= i + diag + window_right
  // for some j in [n0, n0 + keys_in_block).
  const int row_lo = p.window_right >= 0 ? max(0, w.n0 - w.diag - p.window_right) : 0;
  const int row_hi = p.window_left >= 0 ? min(w.seq.seqlen_q, w.n0 + w.keys_in_block - w.diag + p.window_left)
                                        : w.seq.seqlen_q;
  w.m_block_min = row_lo / kBlockM;
  w.m_blocks = row_hi > row_lo ? (row_hi + kBlockM - 1) / kBlockM - w.m_block_min : 0;
  w.steps = p.h_h_k_ratio * w.m_blocks;
  if constexpr (Traits::kDeterministic) {
    w.rotated = dq_walk_rotated<kBlockM, kBlockN>(p, w.seq);
  }
  return w;
}

// ---- Deterministic dQ order, per step (sm90/bwd_dq_order.h) ----------------------------------

// Consumer threads, right after issuing the step's dQ GEMM (so the wait overlaps it): returns once
// the key blocks before this one in the order have added into the step's dQ rows. Nothing in the
// default variant.
template <typename Traits>
__device__ __forceinline__ void wait_for_dq_turn_of_step(const BwdParams& p, const Sm90BwdWork& w, int bidh, int m0,
                                                         int rows_in_tile) {
  if constexpr (Traits::kDeterministic) {
    wait_for_dq_turn(dq_add_count<Traits::kBlockM>(p, w.bidb, bidh, m0 / Traits::kBlockM),
                     dq_adds_before<Traits::kBlockM, Traits::kBlockN>(p, w.seq, m0, rows_in_tile,
                                                                      w.n0 / Traits::kBlockN, w.rotated));
  }
}

// One producer thread (bwd_pass_dq_turns), once every consumer thread has released step s (each
// after its adds): the next key block's turn at step s's dQ rows.
template <typename Traits>
__device__ __forceinline__ void pass_dq_turn_of_step(const BwdParams& p, const Sm90BwdWork& w, int s) {
  constexpr int kBlockM = Traits::kBlockM;
  pass_dq_turn(dq_add_count<kBlockM>(p, w.bidb, w.step_head(p, s), w.step_m0<kBlockM, Traits::kBlockN>(s) / kBlockM));
}

// ---- Named barriers ------------------------------------------------------------------------

// Every named barrier of this kernel, one id each: cutlass::arch::NamedBarrier's user ids (it adds
// ReservedNamedBarrierCount, 8, so 0-7 map to hardware barriers 8-15).
enum Sm90BwdNamedBarrier : int {
  kBarrierConsumers = 1,   // every consumer thread
  kBarrierWarpgroup0 = 2,  // + consumer warpgroup (128 threads): 2 and 3
  kBarrierDqFull0 = 4,     // + consumer warpgroup, with the dQ writer (keys split): 4 and 5
  kBarrierDqEmpty0 = 6,    // the same: 6 and 7
};
static_assert(kBarrierDqEmpty0 + 1 + cutlass::arch::NamedBarrier::ReservedNamedBarrierCount <
              cutlass::arch::NamedBarrier::HardwareMaxNumNamedBarriers);

// ---- Producer ------------------------------------------------------------------------------

// Thread 0: K and V once, then Q and dO of every step into the ring (the pipeline's full barrier
// of the stage carries both loads' bytes).
template <typename Traits>
__device__ __forceinline__ void bwd_produce_tiles(const Sm90BwdArgs<Traits>& args,
                                                  typename Traits::SharedStorage& shared,
                                                  typename Traits::Pipeline& pipeline, const Sm90BwdWork& w) {
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN, kHeadDim = Traits::kHeadDim;
  const BwdParams& p = args.params;
  cute::prefetch_tma_descriptor(args.tma_q.get_tma_descriptor());
  cute::prefetch_tma_descriptor(args.tma_do.get_tma_descriptor());
  cute::prefetch_tma_descriptor(args.tma_k.get_tma_descriptor());
  cute::prefetch_tma_descriptor(args.tma_v.get_tma_descriptor());
  Tensor sQ = make_tensor(make_smem_ptr(shared.q.data()), typename Traits::SmemLayoutQ{});
  Tensor sdO = make_tensor(make_smem_ptr(shared.dout.data()), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(shared.k.data()), typename Traits::SmemLayoutK{});
  Tensor sV = make_tensor(make_smem_ptr(shared.v.data()), typename Traits::SmemLayoutK{});
  auto q_copy = args.tma_q.get_slice(_0{});
  auto do_copy = args.tma_do.get_slice(_0{});
  auto k_copy = args.tma_k.get_slice(_0{});
  auto v_copy = args.tma_v.get_slice(_0{});

  // A packed (varlen) tensor is one batch entry of its map; its sequences start at row offsets.
  const bool packed_q = p.cu_seqlens_q != nullptr, packed_k = p.cu_seqlens_k != nullptr;
  const int k_start = packed_k ? p.cu_seqlens_k[w.bidb] : 0;
  {
    Tensor mK = domain_offset(make_coord(k_start, _0{}),
                              args.tma_k.get_tma_tensor(k_extent(p))(_, _, w.kv_head, packed_k ? 0 : w.bidb));
    Tensor mV = domain_offset(make_coord(k_start, _0{}),
                              args.tma_v.get_tma_tensor(k_extent(p))(_, _, w.kv_head, packed_k ? 0 : w.bidb));
    const int n_block = bwd_key_block<Traits::kDeterministic>();
    Tensor gK = local_tile(mK, Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(n_block, _0{}));
    Tensor gV = local_tile(mV, Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(n_block, _0{}));
    cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&shared.kv_full, 2 * Traits::kKTileBytes);
    copy(args.tma_k.with(shared.kv_full), k_copy.partition_S(gK), k_copy.partition_D(sK));
    copy(args.tma_v.with(shared.kv_full), v_copy.partition_S(gV), v_copy.partition_D(sV));
  }

  Tensor tQsQ = q_copy.partition_D(sQ);  // (TMA, TMA_M, TMA_K, stage)
  Tensor tdOsdO = do_copy.partition_D(sdO);
  typename Traits::PipelineState write = cutlass::make_producer_start_state<typename Traits::Pipeline>();
#pragma unroll 1
  for (int s = 0; s < w.steps; ++s) {
    const int bidh = w.step_head(p, s), m_block = w.step_m0<kBlockM, Traits::kBlockN>(s) / kBlockM;
    const int q_batch = packed_q ? 0 : w.bidb;
    Tensor mQ = domain_offset(make_coord(w.seq.q_start, _0{}),
                              args.tma_q.get_tma_tensor(q_extent(p))(_, _, bidh, q_batch));
    Tensor mdO = domain_offset(make_coord(w.seq.q_start, _0{}),
                               args.tma_do.get_tma_tensor(q_extent(p))(_, _, bidh, q_batch));
    Tensor gQ = local_tile(mQ, Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(m_block, _0{}));
    Tensor gdO = local_tile(mdO, Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(m_block, _0{}));
    pipeline.producer_acquire(write);  // the leader also expects the stage's Q + dO bytes
    auto* full = pipeline.producer_get_barrier(write);
    copy(args.tma_q.with(*full), q_copy.partition_S(gQ), tQsQ(_, _, _, write.index()));
    copy(args.tma_do.with(*full), do_copy.partition_S(gdO), tdOsdO(_, _, _, write.index()));
    ++write;
  }
}

// Warps 1 to kRowStatWarps of the producer warpgroup: per step, the lse (times log2 e) and D of
// 64 of the step's query rows each into the stage's slots, once the consumers released the stage.
// Rows past the sequence get lse = +inf and D = 0, so their P and dS are exactly 0 whatever the
// zero-filled Q and dO give. first_row: the lane's first row of the step (lane + 64 per warp
// before this one); it writes that row and the row 32 below.
template <typename Traits>
__device__ __forceinline__ void bwd_produce_row_stats(const BwdParams& p, typename Traits::SharedStorage& shared,
                                                      typename Traits::Pipeline& pipeline, const Sm90BwdWork& w,
                                                      int first_row) {
  constexpr int kBlockM = Traits::kBlockM;
  constexpr float kLog2e = 1.4426950408889634f;
  // Kept small (24 registers after setmaxnreg): one step at a time, 32-bit row offsets from the
  // head's base pointers, two rows per lane (four spill; a 128-query step takes a second warp).
  const int rows_left0 = w.seq.seqlen_q - first_row;
  typename Traits::PipelineState write = cutlass::make_producer_start_state<typename Traits::Pipeline>();
#pragma unroll 1
  for (int s = 0; s < w.steps; ++s) {
    const int bidh = w.step_head(p, s), m0 = w.step_m0<kBlockM, Traits::kBlockN>(s);
    const int64_t head_off = w.bidb * p.lse_batch_stride + bidh * p.lse_head_stride +
                             int64_t(w.seq.q_start + m0 + first_row) * p.lse_row_stride;
    const float* lse = p.softmax_lse_ptr + head_off;
    const float* dsum = p.softmax_d_ptr + head_off;
    const int row_step = 32 * int(p.lse_row_stride);
    pipeline.producer_acquire(write);  // not the leader: only waits for the stage to be free
    CUTE_UNROLL
    for (int i = 0; i < 64 / 32; ++i) {
      const bool valid = m0 + 32 * i < rows_left0;
      shared.lse_log2[write.index()][first_row + 32 * i] = valid ? lse[i * row_step] * kLog2e : INFINITY;
      shared.dsum[write.index()][first_row + 32 * i] = valid ? dsum[i * row_step] : 0.f;
    }
    // mbarrier.arrive has release semantics: the stores above are visible to its waiters.
    cutlass::arch::ClusterBarrier::arrive(&shared.lse_full[write.index()]);
    ++write;
  }
}

// Deterministic mode, one thread of the producer warp after the row-stat warps: each step's
// stage release comes after every consumer thread added its part of the step's dQ (each releases
// after its adds), so once the release completes it passes the step's turn on to the next key
// block (sm90/bwd_dq_order.h). A thread of its own, not a row-stat lane: the turn's index
// arithmetic beside the row loads spills at their 24 registers (head dim 64).
template <typename Traits>
__device__ __forceinline__ void bwd_pass_dq_turns(const BwdParams& p, typename Traits::Pipeline& pipeline,
                                                  const Sm90BwdWork& w) {
  // Step s's release completes the empty barrier that the producer's acquire for step
  // s + kStages waits for.
  typename Traits::PipelineState released = cutlass::make_producer_start_state<typename Traits::Pipeline>();
  released.advance(Traits::kStages);
#pragma unroll 1
  for (int s = 0; s < w.steps; ++s, ++released) {
    pipeline.producer_acquire(released);  // not the leader: only waits
    pass_dq_turn_of_step<Traits>(p, w, s);
  }
}

// ---- Consumers -------------------------------------------------------------------------------

// S^T rows are keys, columns queries: -inf outside [lo, hi] of each query's visible keys.
template <typename TS, typename TC>
__device__ __forceinline__ void apply_mask_transposed(TS& st, TC const& coord, int n0, int m0, int diag,
                                                      int seqlen_k, int window_left, int window_right) {
  CUTE_UNROLL
  for (int ni = 0; ni < size<1>(st); ++ni) {
    const int row = m0 + get<1>(coord(0, ni));
    const int hi = window_right >= 0 ? min(seqlen_k - 1, row + diag + window_right) : seqlen_k - 1;
    const int lo = window_left >= 0 ? row + diag - window_left : 0;
    CUTE_UNROLL
    for (int mi = 0; mi < size<0>(st); ++mi) {
      const int col = n0 + get<0>(coord(mi, 0));
      if (col < lo || col > hi) st(mi, ni) = -INFINITY;
    }
  }
}

// Packed (varlen) tensors: whole-block TMA loads bring in the rows past a sequence -- the next
// sequence's, or past the last one whatever the tensor holds there (unused capacity, possibly
// NaN). Their probabilities are 0, but 0 x NaN is NaN in the GEMMs that read these tiles whole
// (dP = dO V^T, dV += P^T dO, dK += dS^T Q, dQ = dS K), so the consumers zero those rows of a
// (rows, d) tile in shared memory before its first read: K and V rows past the block's keys once
// per block, Q and dO rows past the step's queries in the step's stage. 16 bytes at a time (8
// consecutive head-dim elements stay contiguous under the swizzles). The thread index is opaque
// here, so that ptxas does not hoist this cold loop's addresses out of the step loop. The caller
// then fences (the zeros are generic-proxy writes; wgmma and the next TMA write of the stage go
// through the async proxy) and syncs the consumers (every one reads the whole tiles).
template <typename Traits, typename TTile>
__device__ __forceinline__ void zero_rows_from(TTile tile, int first_row, int rows) {
  using Element = typename Traits::Element;
  constexpr int kVecElems = 16 / int(sizeof(Element));
  constexpr int kVecsPerRow = Traits::kHeadDim / kVecElems;
  int tidx = int(threadIdx.x) - 128;
  asm volatile("" : "+r"(tidx));
#pragma unroll 1
  for (int i = tidx; i < (rows - first_row) * kVecsPerRow; i += Traits::kNConsumerThreads) {
    *reinterpret_cast<uint4*>(&tile(first_row + i / kVecsPerRow, (i % kVecsPerRow) * kVecElems)) =
        make_uint4(0, 0, 0, 0);
  }
}

// The rows past a packed sequence zeroed (zero_rows_from): K and V once the block's keys have
// landed, Q and dO of a step once its stage has. Both conditions are the same for every consumer.
template <typename Traits, typename TK>
__device__ __forceinline__ void zero_keys_past_sequence(const BwdParams& p, const Sm90BwdWork& w, TK& sK, TK& sV) {
  if (p.cu_seqlens_k != nullptr && w.keys_in_block < Traits::kBlockN) {
    zero_rows_from<Traits>(sK, w.keys_in_block, Traits::kBlockN);
    zero_rows_from<Traits>(sV, w.keys_in_block, Traits::kBlockN);
    cutlass::arch::fence_view_async_shared();
    cutlass::arch::NamedBarrier::sync(Traits::kNConsumerThreads, kBarrierConsumers);
  }
}
template <typename Traits, typename TQ>
__device__ __forceinline__ void zero_queries_past_sequence(const BwdParams& p, TQ& sQ, TQ& sdO, int stage,
                                                           int rows_in_tile) {
  if (p.cu_seqlens_q != nullptr && rows_in_tile < Traits::kBlockM) {
    zero_rows_from<Traits>(sQ(_, _, stage), rows_in_tile, Traits::kBlockM);
    zero_rows_from<Traits>(sdO(_, _, stage), rows_in_tile, Traits::kBlockM);
    cutlass::arch::fence_view_async_shared();
    cutlass::arch::NamedBarrier::sync(Traits::kNConsumerThreads, kBarrierConsumers);
  }
}

// Step s of a consumer loop: its query head, first query row, rows inside the sequence, Q/dO
// stage and P/dS buffer, once the stage's Q, dO (TMA) and lse, D (row-stat warps) have landed and
// the rows past a packed sequence are zeroed.
struct BwdConsumerStep {
  int bidh, m0, rows_in_tile, stage, buf;
};
template <typename Traits, typename TQ>
__device__ __forceinline__ BwdConsumerStep begin_consumer_step(const BwdParams& p,
                                                               typename Traits::SharedStorage& shared,
                                                               typename Traits::Pipeline& pipeline,
                                                               typename Traits::PipelineState const& read,
                                                               const Sm90BwdWork& w, int s, TQ& sQ, TQ& sdO) {
  const int m0 = w.step_m0<Traits::kBlockM, Traits::kBlockN>(s);
  const BwdConsumerStep step{w.step_head(p, s), m0, min(Traits::kBlockM, w.seq.seqlen_q - m0), read.index(),
                             s % Traits::kDsBuffers};
  pipeline.consumer_wait(read);
  cutlass::arch::ClusterBarrier::wait(&shared.lse_full[step.stage], read.phase());
  zero_queries_past_sequence<Traits>(p, sQ, sdO, step.stage, step.rows_in_tile);
  return step;
}

// A step's dQ (this thread's elements of the fp32 accumulator fragment, at coordinates tdQcdQ
// within the step's query rows) added into the dQ accumulator. Neighbouring accumulator elements
// are neighbouring d-columns of one query row: one float2 atomic each. Rows past the sequence
// carry dS = 0 and are skipped. Addresses are the thread's base plus compile-time offsets (its
// coordinates minus its first), folded into the atomics' immediates; the empty asm keeps the
// compiler from splitting the base offset back into per-element 64-bit offsets, which it would
// hoist out of the loop and spill. (On the offset, not the pointer: the pointer stays known to
// be global, so the atomics stay REDG.)
template <int kHeadDim, typename TAcc, typename TCoord>
__device__ __forceinline__ void add_dq_to_accumulator(const BwdParams& p, const Sm90BwdWork& w, TAcc const& acc_dq,
                                                      TCoord const& tdQcdQ, int bidh, int m0, int rows_in_tile) {
  const int row0 = get<0>(tdQcdQ(0)), col0 = get<1>(tdQcdQ(0));
  int64_t dq_offset = (int64_t(bidh) * p.total_q_rows + w.seq.q_row(p, w.bidb, m0) + row0) * kHeadDim + col0;
  asm("" : "+l"(dq_offset));
  float* dq_thread = p.dq_accum_ptr + dq_offset;
  CUTE_UNROLL
  for (int i = 0; i < size(acc_dq); i += 2) {
    const int drow = get<0>(tdQcdQ(i)) - row0, dcol = get<1>(tdQcdQ(i)) - col0;
    if (drow < rows_in_tile - row0) {
      atomicAdd(reinterpret_cast<float2*>(dq_thread + drow * kHeadDim + dcol), make_float2(acc_dq(i), acc_dq(i + 1)));
    }
  }
}

// A staged dQ tile (Traits::SmemLayoutdQTile, kDqTileM x kDqStagedN fp32 in shared memory) added
// into the dQ accumulator at tile (tile_m, tile_n) of the step's (kBlockM x kHeadDim) block by one
// TMA reduce-add (one thread; committed as a bulk async-group of its own).
template <typename Traits, typename TTile>
__device__ __forceinline__ void reduce_dq_tile_by_tma(const Sm90BwdArgs<Traits>& args, TTile const& dq_tile,
                                                      const Sm90BwdWork& w, int bidh, int m0, int tile_m,
                                                      int tile_n) {
  const BwdParams& p = args.params;
  Tensor mdQ = args.tma_dq.get_tma_tensor(dq_accum_extent(p, Traits::kHeadDim))(_, _, bidh);
  Tensor gdQ = local_tile(domain_offset(make_coord(w.seq.q_row(p, w.bidb, m0), _0{}), mdQ),
                          Shape<Int<Traits::kDqTileM>, Int<Traits::kDqStagedN>>{}, make_coord(tile_m, tile_n));
  auto tma = args.tma_dq.get_slice(_0{});
  copy(args.tma_dq, tma.partition_S(dq_tile), tma.partition_D(gdQ));
  tma_store_arrive();
}

// Keys split: a consumer warpgroup's dQ tile at (tile_m, tile_n) of the step's block in the dQ
// tiles' shared memory, added into the accumulator (reduce_dq_tile_by_tma).
template <typename Traits>
__device__ __forceinline__ void reduce_dq_tile_from_tiles(const Sm90BwdArgs<Traits>& args,
                                                          typename Traits::SharedStorage& shared,
                                                          const Sm90BwdWork& w, int bidh, int m0, int tile_m,
                                                          int tile_n) {
  Tensor sdQ = make_tensor(make_smem_ptr(shared.dq.data()), typename Traits::SmemLayoutdQ{});
  Tensor dq_tile = local_tile(sdQ, Shape<Int<Traits::kDqTileM>, Int<Traits::kDqStagedN>>{}, make_coord(tile_m, tile_n));
  reduce_dq_tile_by_tma<Traits>(args, dq_tile, w, bidh, m0, tile_m, tile_n);
}

// Head dim 256, default variant (Traits::kDqTileInStage): quarter k (dQ columns [32 k, 32 k + 32)
// of warpgroup w's tile) in one of the 64-column blocks of the step's Q and dO buffers that only
// warpgroup w's GEMMs read: Q's block w (k = 0) and 2 + w (k = 1), dO's likewise (k = 2, 3); each
// 64 x 32 fp32 in 8 KiB.
template <typename Traits>
__device__ __forceinline__ float* dq_quarter_in_stage(typename Traits::SharedStorage& shared, int stage,
                                                      int warpgroup, int quarter) {
  typename Traits::Element* buffer = quarter < 2 ? shared.q.data() : shared.dout.data();
  const int column_block = (quarter % 2) * 2 + warpgroup;
  return reinterpret_cast<float*>(buffer + (stage * Traits::kHeadDim + column_block * 64) * Traits::kBlockM);
}

// This thread's fp32 fragment values acc(first + i), i < size of its partition, into its
// partition (thr.partition_C) of a shared-memory tile, two adjacent columns per 8-byte
// st.shared: an accumulator fragment's values 2j and 2j + 1 are columns c and c + 1 of one row,
// c even, which the fp32 tiles' swizzles (16-byte units) keep adjacent. Through the tile's generic
// pointer nvcc issued 4-byte generic stores with 64-bit swizzle arithmetic and a MEMBAR ahead of
// the proxy fence that waited for them (sm90/shared_window.h). Head dim 256's dQ quarters take it;
// the keys split's whole dQ tile keeps CuTe's copy, which ran the head dim 128 backward 1-4% faster
// (H100, 2026-12-07).
template <typename ThrMma, typename SmemLayout, typename TAcc>
__device__ __forceinline__ void store_fragment_pairs(float* tile, SmemLayout layout, ThrMma const& thr, TAcc const& acc,
                                                     int first) {
  Tensor dst = thr.partition_C(make_tensor(make_smem_ptr(in_shared_window(tile)), layout));
  static_assert(decltype(size(dst))::value % 2 == 0);
  CUTE_UNROLL
  for (int i = 0; i < size(dst); i += 2) {
    store_shared_float2(window_address(&dst(i)), acc(first + i), acc(first + i + 1));
  }
}

// This thread's part of its warpgroup's dQ fragment to the warpgroup's quarters in the step's Q
// and dO buffers (Traits::kDqTileInStage), fenced for the TMA unit. Fragment elements
// [k n/4, (k + 1) n/4) are columns [32 k, 32 k + 32) (the GMMA C layout orders a thread's values
// by 8-column group last).
template <typename Traits, typename TAcc>
__device__ __forceinline__ void store_dq_quarters_in_stage(typename Traits::SharedStorage& shared,
                                                           TAcc const& acc_dq, int stage, int warpgroup) {
  int lane_in_warpgroup = int(threadIdx.x) % 128;
  asm volatile("" : "+r"(lane_in_warpgroup));
  auto thr = typename Traits::TiledMmadQPart{}.get_thread_slice(lane_in_warpgroup);
  constexpr int kPart = decltype(size(acc_dq))::value / 4;
  static_assert(decltype(size(thr.partition_C(make_tensor(make_smem_ptr(static_cast<float*>(nullptr)),
                                                          typename Traits::SmemLayoutdQTile{}))))::value == kPart,
                "a quarter's partition holds a quarter of the fragment");
  CUTE_UNROLL
  for (int quarter = 0; quarter < 4; ++quarter) {
    store_fragment_pairs(dq_quarter_in_stage<Traits>(shared, stage, warpgroup, quarter),
                         typename Traits::SmemLayoutdQTile{}, thr, acc_dq, quarter * kPart);
  }
  cutlass::arch::fence_view_async_shared();
}

// Where a consumer warpgroup's dQ tile sits in the step's block: its rows at 128-query steps
// (kDqSplitsQueries), else its columns.
template <typename Traits>
__device__ __forceinline__ int dq_tile_m(int warpgroup) {
  return Traits::kDqSplitsQueries ? warpgroup : 0;
}
template <typename Traits>
__device__ __forceinline__ int dq_tile_n(int warpgroup) {
  return Traits::kDqSplitsQueries ? 0 : warpgroup;
}

// This thread's part of its warpgroup's dQ fragment to the warpgroup's fp32 tile in shared memory,
// fenced for the TMA unit (generic-proxy stores, async-proxy reads). The tile is free: its
// previous reduce-add has read it. The thread index is opaque here so that the fragment's
// shared-memory addresses are computed where they are used, not held through the loop.
template <typename Traits, typename TAcc>
__device__ __forceinline__ void store_dq_tile(typename Traits::SharedStorage& shared, TAcc const& acc_dq) {
  Tensor sdQ = make_tensor(make_smem_ptr(shared.dq.data()), typename Traits::SmemLayoutdQ{});
  int consumer_tidx = int(threadIdx.x) - 128;
  asm volatile("" : "+r"(consumer_tidx));
  typename Traits::TiledMmadQ mma_dq;
  copy(acc_dq, mma_dq.get_thread_slice(consumer_tidx).partition_C(sdQ));
  cutlass::arch::fence_view_async_shared();
}

// The dQ writer's barriers (kBarrierDqFull0, kBarrierDqEmpty0), one of each per consumer
// warpgroup, each between its 128 threads and the writer warp: "full" (the consumers arrive once
// their tile is stored, the writer waits) and "empty" (the writer arrives once the tile's
// reduce-add has completed, the consumers wait before storing the next one).
constexpr int kDqWriterBarrierThreads = 128 + 32;

// The dQ writer warp with the keys split, all 32 lanes: per step, each consumer warpgroup's tile as
// it is stored, added by a TMA reduce-add (lane 0), then the tiles handed back once the reduce-adds
// have read them. Deterministic: lane 0 first waits for the step's turn, and the tiles go back
// only once the adds have completed and the turn is passed (sm90/bwd_dq_order.h). The issue and
// the waits for the TMA unit sit in this warp, not in a consumer thread, so no warpgroup's GEMMs
// wait for them.
template <typename Traits>
__device__ __forceinline__ void bwd_write_dq(const Sm90BwdArgs<Traits>& args, typename Traits::SharedStorage& shared,
                                             const Sm90BwdWork& w) {
  static_assert(Traits::kNConsumerWarpgroups == 2, "two full and two empty barriers");
  constexpr int kBlockM = Traits::kBlockM;
  const BwdParams& p = args.params;
  const bool lane0 = threadIdx.x % 32 == 0;
#pragma unroll 1
  for (int s = 0; s < w.steps; ++s) {
    const int bidh = w.step_head(p, s), m0 = w.step_m0<kBlockM, Traits::kBlockN>(s);
    [[maybe_unused]] int* count = nullptr;
    if constexpr (Traits::kDeterministic) {
      count = dq_add_count<kBlockM>(p, w.bidb, bidh, m0 / kBlockM);
      if (lane0) {
        wait_for_dq_turn(count, dq_adds_before<kBlockM, Traits::kBlockN>(p, w.seq, m0, min(kBlockM, w.seq.seqlen_q - m0),
                                                                         w.n0 / Traits::kBlockN, w.rotated));
      }
      // bar.sync is warp-aligned: the lanes reconverge after each lane-0 section.
      __syncwarp();
    }
    CUTE_UNROLL
    for (int wg = 0; wg < Traits::kNConsumerWarpgroups; ++wg) {
      cutlass::arch::NamedBarrier::sync(kDqWriterBarrierThreads, kBarrierDqFull0 + wg);
      if (lane0) {
        reduce_dq_tile_from_tiles<Traits>(args, shared, w, bidh, m0, dq_tile_m<Traits>(wg), dq_tile_n<Traits>(wg));
      }
      __syncwarp();
    }
    if (lane0) {
      if constexpr (Traits::kDeterministic) {
        pass_dq_turn_after_bulk_reduces(count);
      } else {
        tma_store_wait<0>();  // the reduce-adds have read the tiles
      }
    }
    __syncwarp();
    CUTE_UNROLL
    for (int wg = 0; wg < Traits::kNConsumerWarpgroups; ++wg) {
      cutlass::arch::NamedBarrier::arrive(kDqWriterBarrierThreads, kBarrierDqEmpty0 + wg);
    }
  }
}

// The block's dK and dV rows [group kRows, (group + 1) kRows) from the K and V tiles, where the
// consumers staged them, to global memory: 16 bytes per store, by the group's kThreads consumer
// threads (a warpgroup, or all of them). Rows past the sequence and columns past d stay unwritten.
template <typename Traits, int kRows, int kThreads, typename TK>
__device__ __forceinline__ void store_dkv_rows(const BwdParams& p, const Sm90BwdWork& w, TK const& sK, TK const& sV,
                                               int group) {
  using Element = typename Traits::Element;
  constexpr int kVecElems = 16 / sizeof(Element);
  constexpr int kVecsPerRow = Traits::kHeadDim / kVecElems;
  const bool packed_k = p.cu_seqlens_k != nullptr;
  const int k_start = packed_k ? p.cu_seqlens_k[w.bidb] : 0;
  Element* dk = static_cast<Element*>(p.dk_ptr) +
                (packed_k ? int64_t(k_start) * p.dk_row_stride : int64_t(w.bidb) * p.dk_batch_stride) +
                w.kv_head * p.dk_head_stride;
  Element* dv = static_cast<Element*>(p.dv_ptr) +
                (packed_k ? int64_t(k_start) * p.dv_row_stride : int64_t(w.bidb) * p.dv_batch_stride) +
                w.kv_head * p.dv_head_stride;
  const int thread = (int(threadIdx.x) - 128) % kThreads;
  CUTE_UNROLL
  for (int i = thread; i < kRows * kVecsPerRow; i += kThreads) {
    const int row = group * kRows + i / kVecsPerRow;
    const int col = (i % kVecsPerRow) * kVecElems;
    if (row < w.keys_in_block && col < p.d) {
      // 8 consecutive elements stay contiguous under the 128-, 64- and 32-byte swizzles (they
      // permute 16-byte units).
      *reinterpret_cast<uint4*>(dk + int64_t(w.n0 + row) * p.dk_row_stride + col) =
          *reinterpret_cast<const uint4*>(&sK(row, col));
      *reinterpret_cast<uint4*>(dv + int64_t(w.n0 + row) * p.dv_row_stride + col) =
          *reinterpret_cast<const uint4*>(&sV(row, col));
    }
  }
}

// The consumer loop with the keys split (Traits::kSplitHeadDim false): warpgroup w owns keys
// [64 w, 64 w + 64) of the block, their S^T, dP^T, dK and dV.
template <typename Traits>
__device__ __forceinline__ void bwd_consume_keys_split(const Sm90BwdArgs<Traits>& args,
                                                       typename Traits::SharedStorage& shared,
                                                       typename Traits::Pipeline& pipeline, const Sm90BwdWork& w) {
  const BwdParams& p = args.params;
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN, kHeadDim = Traits::kHeadDim;
  constexpr int kConsumerThreads = Traits::kNConsumerThreads;
  const int consumer_tidx = threadIdx.x - 128;
  const int warpgroup = consumer_tidx / 128;

  Tensor sQ = make_tensor(make_smem_ptr(shared.q.data()), typename Traits::SmemLayoutQ{});
  Tensor sdO = make_tensor(make_smem_ptr(shared.dout.data()), typename Traits::SmemLayoutQ{});
  Tensor sQt = make_tensor(make_smem_ptr(shared.q.data()), typename Traits::SmemLayoutQt{});
  Tensor sdOt = make_tensor(make_smem_ptr(shared.dout.data()), typename Traits::SmemLayoutQt{});
  Tensor sK = make_tensor(make_smem_ptr(shared.k.data()), typename Traits::SmemLayoutK{});
  Tensor sV = make_tensor(make_smem_ptr(shared.v.data()), typename Traits::SmemLayoutK{});
  Tensor sKt = make_tensor(make_smem_ptr(shared.k.data()), typename Traits::SmemLayoutKt{});
  Tensor sdSt = make_tensor(make_smem_ptr(shared.ds.data()), typename Traits::SmemLayoutdSt{});
  Tensor sdS = make_tensor(make_smem_ptr(shared.ds.data()), typename Traits::SmemLayoutdS{});

  // GMMA descriptor fragments: (MMA, MMA_M|N, MMA_K[, stage | buffer]).
  typename Traits::TiledMmaSdP mma_sdp;
  auto thr_sdp = mma_sdp.get_thread_slice(consumer_tidx);
  Tensor tSrK = thr_sdp.make_fragment_A(thr_sdp.partition_A(sK));
  Tensor tSrQ = thr_sdp.make_fragment_B(thr_sdp.partition_B(sQ));
  Tensor tdPrV = thr_sdp.make_fragment_A(thr_sdp.partition_A(sV));
  Tensor tdPrdO = thr_sdp.make_fragment_B(thr_sdp.partition_B(sdO));
  typename Traits::TiledMmadKV mma_dkv;
  auto thr_dkv = mma_dkv.get_thread_slice(consumer_tidx);
  Tensor tdVrdOt = thr_dkv.make_fragment_B(thr_dkv.partition_B(sdOt));
  Tensor tdKrQt = thr_dkv.make_fragment_B(thr_dkv.partition_B(sQt));
  typename Traits::TiledMmadQ mma_dq;
  auto thr_dq = mma_dq.get_thread_slice(consumer_tidx);
  Tensor tdQrdS = thr_dq.make_fragment_A(thr_dq.partition_A(sdS));
  Tensor tdQrKt = thr_dq.make_fragment_B(thr_dq.partition_B(sKt));

  // (key, query) of every S^T element this thread holds, relative to the block and the step.
  Tensor tScS = thr_sdp.partition_C(make_identity_tensor(Shape<Int<kBlockN>, Int<kBlockM>>{}));
  Tensor tScS_rc = gmma_rowcol_view(tScS);
  auto ds_copy = make_tiled_copy_C(typename Traits::SmemCopyAtomdS{}, mma_sdp);
  auto thr_ds_copy = ds_copy.get_thread_slice(consumer_tidx);

  Tensor acc_dk = partition_fragment_C(mma_dkv, Shape<Int<kBlockN>, Int<kHeadDim>>{});
  Tensor acc_dv = partition_fragment_C(mma_dkv, Shape<Int<kBlockN>, Int<kHeadDim>>{});
  clear(acc_dk);
  clear(acc_dv);
  [[maybe_unused]] const DropoutIf<Traits::kHasDropout> dropout(p);

  if (w.steps > 0) {
    cutlass::arch::ClusterTransactionBarrier::wait(&shared.kv_full, 0);
    zero_keys_past_sequence<Traits>(p, w, sK, sV);
  }
  typename Traits::PipelineState read;
  for (int s = 0; s < w.steps; ++s) {
    const auto [bidh, m0, rows_in_tile, stage, buf] =
        begin_consumer_step<Traits>(p, shared, pipeline, read, w, s, sQ, sdO);

    Tensor acc_s = partition_fragment_C(mma_sdp, Shape<Int<kBlockN>, Int<kBlockM>>{});
    Tensor acc_dp = partition_fragment_C(mma_sdp, Shape<Int<kBlockN>, Int<kBlockM>>{});
    warpgroup_gemm</*kZeroInit=*/true>(mma_sdp, tSrK, tSrQ(_, _, _, stage), acc_s);
    warpgroup_gemm</*kZeroInit=*/true>(mma_sdp, tdPrV, tdPrdO(_, _, _, stage), acc_dp);
    Tensor st = gmma_rowcol_view(acc_s);
    // Dropout: the step's keep flags (common/dropout.h), drawn while the GEMMs run where the
    // registers allow (Traits::kDropoutFlagsDuringGemms), else once S^T has landed.
    [[maybe_unused]] const auto keep = [&] {
      if constexpr (Traits::kHasDropout && Traits::kDropoutFlagsDuringGemms) {
        return dropout.template keep_bits_gmma</*kTransposed=*/true>(st, tScS_rc, w.n0, m0,
                                                                     dropout.stream(w.bidb, bidh, p.h));
      } else {
        return KeepAll{};
      }
    }();
    warpgroup_wait<1>();  // S^T has completed; dP^T may still run

    const BlockCoords bc{m0, w.n0, w.diag};
    if (block_needs_mask(bc, kBlockN, rows_in_tile, w.seq.seqlen_k, p.window_left, p.window_right)) {
      apply_mask_transposed(st, tScS_rc, w.n0, m0, w.diag, w.seq.seqlen_k, p.window_left, p.window_right);
    }
    // A thread's columns come in neighbouring pairs (gmma_layouts.h: ni even, ni + 1), so each
    // pair's lse and D are one 8-byte shared-memory load.
    static_assert(decltype(size<1>(st))::value % 2 == 0);
    CUTE_UNROLL
    for (int ni = 0; ni < size<1>(st); ni += 2) {
      const float2 lse = *reinterpret_cast<const float2*>(&shared.lse_log2[stage][get<1>(tScS_rc(0, ni))]);
      CUTE_UNROLL
      for (int mi = 0; mi < size<0>(st); ++mi) {
        st(mi, ni) = exp2f(fmaf(st(mi, ni), p.scale_softmax_log2, -lse.x));
        st(mi, ni + 1) = exp2f(fmaf(st(mi, ni + 1), p.scale_softmax_log2, -lse.y));
      }
    }
    // Dropout: the dropped entries of P^T negated (common/dropout.h).
    if constexpr (Traits::kHasDropout && Traits::kDropoutFlagsDuringGemms) {
      encode_dropped(acc_s, keep);
    } else if constexpr (Traits::kHasDropout) {
      dropout.template drop_gmma</*kTransposed=*/true, /*kEncode=*/true>(st, tScS_rc, w.n0, m0,
                                                                         dropout.stream(w.bidb, bidh, p.h));
    }
    // P^T (dropped and rescaled) as the register A operand of dV += P^T dO, issued before dS^T is
    // computed, or after it where the traits say the registers are short (kDvAfterDs).
    Tensor rP = make_fragment_like<Element>(acc_s);
    auto issue_dv = [&]() {
      Tensor converted = [&] {
        if constexpr (Traits::kHasDropout) {
          return dropped_probs<Element>(acc_s, p.dropout_scale);
        } else {
          return convert_fragment<Element>(acc_s);
        }
      }();
      CUTE_UNROLL
      for (int i = 0; i < size(rP); ++i) rP(i) = converted(i);
      Tensor tdVrP = make_tensor(rP.data(), gmma_acc_to_a_operand_layout(rP.layout()));
      warpgroup_gemm</*kZeroInit=*/false>(mma_dkv, tdVrP, tdVrdOt(_, _, _, stage), acc_dv);
    };
    if constexpr (!Traits::kDvAfterDs) issue_dv();
    warpgroup_wait<Traits::kDvAfterDs ? 0 : 1>();  // dP^T has completed (dV, if issued, may still run)

    Tensor dpt = gmma_rowcol_view(acc_dp);
    CUTE_UNROLL
    for (int ni = 0; ni < size<1>(dpt); ni += 2) {
      const float2 d2 = *reinterpret_cast<const float2*>(&shared.dsum[stage][get<1>(tScS_rc(0, ni))]);
      CUTE_UNROLL
      for (int mi = 0; mi < size<0>(dpt); ++mi) {
        CUTE_UNROLL
        for (int e = 0; e < 2; ++e) {
          const float d = e == 0 ? d2.x : d2.y;
          if constexpr (Traits::kHasDropout) {
            dpt(mi, ni + e) = dropped_ds(st(mi, ni + e), dpt(mi, ni + e), d, p.dropout_scale);
          } else {
            dpt(mi, ni + e) = st(mi, ni + e) * (dpt(mi, ni + e) - d);
          }
        }
      }
    }
    if constexpr (Traits::kDvAfterDs) issue_dv();
    Tensor rdS = convert_fragment<Element>(acc_dp);
    // dS^T into this step's buffer (stmatrix), made visible to the tensor cores' async proxy.
    copy(ds_copy, thr_ds_copy.retile_S(rdS), thr_ds_copy.partition_D(sdSt(_, _, buf)));
    cutlass::arch::fence_view_async_shared();

    // Both warpgroups' dS^T are in the buffer. The other buffer is free: each warpgroup waited for
    // its previous dQ GEMM (which read it) before arriving here.
    cutlass::arch::NamedBarrier::sync(kConsumerThreads, kBarrierConsumers);
    Tensor acc_dq = partition_fragment_C(mma_dq, Shape<Int<kBlockM>, Int<kHeadDim>>{});
    Tensor tdQrdS_buf = tdQrdS(_, _, _, buf);
    warpgroup_gemm</*kZeroInit=*/true>(mma_dq, tdQrdS_buf, tdQrKt, acc_dq);
    // dK += dS^T Q after dQ (it needs only this warpgroup's dS^T, in registers), so the tensor
    // cores run it while the dQ tile goes to shared memory below.
    Tensor tdKrdS = make_tensor(rdS.data(), gmma_acc_to_a_operand_layout(rdS.layout()));
    warpgroup_gemm</*kZeroInit=*/false>(mma_dkv, tdKrdS, tdKrQt(_, _, _, stage), acc_dk);
    warpgroup_wait<1>();  // dV and dQ have completed; dK may still run
    warpgroup_fence_operand(acc_dq);
    warpgroup_fence_operand(rP);

    // The step's dQ tile through shared memory into the accumulator (Traits::kDqByTma): once the
    // dQ writer has handed the previous one back, stored, then handed to the writer (bwd_write_dq).
    if (s > 0) cutlass::arch::NamedBarrier::sync(kDqWriterBarrierThreads, kBarrierDqEmpty0 + warpgroup);
    store_dq_tile<Traits>(shared, acc_dq);
    cutlass::arch::NamedBarrier::arrive(kDqWriterBarrierThreads, kBarrierDqFull0 + warpgroup);
    warpgroup_wait<0>();
    // rdS stays untouched until here, where dK (its last reader) has completed; then the stage's
    // Q and dO are free.
    warpgroup_fence_operand(acc_dk);
    warpgroup_fence_operand(rdS);
    pipeline.consumer_release(read);
    ++read;
  }
  // The last reduce-adds have read their tiles before the block's shared memory goes, and the
  // writer's last "empty" arrival is paired.
  if (w.steps > 0) cutlass::arch::NamedBarrier::sync(kDqWriterBarrierThreads, kBarrierDqEmpty0 + warpgroup);

  // Epilogue: dK (times scale_grad: dS excluded the softmax scale) and dV through the K and V
  // tiles, then 16-byte global stores of the warpgroup's 64 key rows.
  CUTE_UNROLL
  for (int i = 0; i < size(acc_dk); ++i) acc_dk(i) *= p.scale_grad;
  Tensor rdK = convert_fragment<Element>(acc_dk);
  Tensor rdV = convert_fragment<Element>(acc_dv);
  // Both warpgroups' last dQ GEMMs (which read all of K) have completed before K is overwritten.
  cutlass::arch::NamedBarrier::sync(kConsumerThreads, kBarrierConsumers);
  auto dkv_copy = make_tiled_copy_C(typename Traits::SmemCopyAtomdKV{}, mma_dkv);
  auto thr_dkv_copy = dkv_copy.get_thread_slice(consumer_tidx);
  copy(dkv_copy, thr_dkv_copy.retile_S(rdK), thr_dkv_copy.partition_D(sK));
  copy(dkv_copy, thr_dkv_copy.retile_S(rdV), thr_dkv_copy.partition_D(sV));
  // A warpgroup's stmatrix covers exactly its own 64 key rows, which only it stores below.
  cutlass::arch::NamedBarrier::sync(128, kBarrierWarpgroup0 + warpgroup);
  store_dkv_rows<Traits, 64, 128>(p, w, sK, sV, warpgroup);
}

// The consumer loop with the head dimension split (Traits::kSplitHeadDim): warpgroup w computes S
// and dP of the step for keys [w kBlockN / W, (w + 1) kBlockN / W), stores P and dS to shared
// memory, and, once every warpgroup's parts are there, accumulates its d-rows of dV^T += dO^T P
// and dK^T += Q^T dS and computes its d-columns of dQ = dS K.
template <typename Traits>
__device__ __forceinline__ void bwd_consume_head_dim_split(const Sm90BwdArgs<Traits>& args,
                                                           typename Traits::SharedStorage& shared,
                                                           typename Traits::Pipeline& pipeline,
                                                           const Sm90BwdWork& w) {
  const BwdParams& p = args.params;
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN, kHeadDim = Traits::kHeadDim;
  constexpr int kConsumerThreads = Traits::kNConsumerThreads;
  const int consumer_tidx = threadIdx.x - 128;
  // kDqTileInStage: each warpgroup's leader adds its dQ quarters by TMA and releases their stage a
  // step later, once the reduce-adds have read it (dq_stage: that stage's pipeline state).
  [[maybe_unused]] const int warpgroup = consumer_tidx / 128;
  [[maybe_unused]] const bool dq_leader = consumer_tidx % 128 == 0;
  [[maybe_unused]] typename Traits::PipelineState dq_stage;

  Tensor sQ = make_tensor(make_smem_ptr(shared.q.data()), typename Traits::SmemLayoutQ{});
  Tensor sdO = make_tensor(make_smem_ptr(shared.dout.data()), typename Traits::SmemLayoutQ{});
  Tensor sQt = make_tensor(make_smem_ptr(shared.q.data()), typename Traits::SmemLayoutQt{});
  Tensor sdOt = make_tensor(make_smem_ptr(shared.dout.data()), typename Traits::SmemLayoutQt{});
  Tensor sK = make_tensor(make_smem_ptr(shared.k.data()), typename Traits::SmemLayoutK{});
  Tensor sV = make_tensor(make_smem_ptr(shared.v.data()), typename Traits::SmemLayoutK{});
  Tensor sKt = make_tensor(make_smem_ptr(shared.k.data()), typename Traits::SmemLayoutKt{});
  Tensor sVt = make_tensor(make_smem_ptr(shared.v.data()), typename Traits::SmemLayoutKt{});
  // P and dS as (queries, keys, buffer), as their accumulators store them, and as (keys, queries,
  // buffer), the B operand of the dV^T and dK^T GEMMs.
  Tensor sP = make_tensor(make_smem_ptr(shared.p.data()), typename Traits::SmemLayoutdS{});
  Tensor sdS = make_tensor(make_smem_ptr(shared.ds.data()), typename Traits::SmemLayoutdS{});
  Tensor sPt = make_tensor(make_smem_ptr(shared.p.data()), typename Traits::SmemLayoutdSt{});
  Tensor sdSt = make_tensor(make_smem_ptr(shared.ds.data()), typename Traits::SmemLayoutdSt{});

  // GMMA descriptor fragments: (MMA, MMA_M|N, MMA_K[, stage | buffer]).
  typename Traits::TiledMmaSdP mma_sdp;
  auto thr_sdp = mma_sdp.get_thread_slice(consumer_tidx);
  Tensor tSrQ = thr_sdp.make_fragment_A(thr_sdp.partition_A(sQ));
  Tensor tSrK = thr_sdp.make_fragment_B(thr_sdp.partition_B(sK));
  Tensor tdPrdO = thr_sdp.make_fragment_A(thr_sdp.partition_A(sdO));
  Tensor tdPrV = thr_sdp.make_fragment_B(thr_sdp.partition_B(sV));
  typename Traits::TiledMmadKV mma_dkv;
  auto thr_dkv = mma_dkv.get_thread_slice(consumer_tidx);
  Tensor tdVrdOt = thr_dkv.make_fragment_A(thr_dkv.partition_A(sdOt));
  Tensor tdVrPt = thr_dkv.make_fragment_B(thr_dkv.partition_B(sPt));
  Tensor tdKrQt = thr_dkv.make_fragment_A(thr_dkv.partition_A(sQt));
  Tensor tdKrdSt = thr_dkv.make_fragment_B(thr_dkv.partition_B(sdSt));
  typename Traits::TiledMmadQ mma_dq;
  auto thr_dq = mma_dq.get_thread_slice(consumer_tidx);
  Tensor tdQrdS = thr_dq.make_fragment_A(thr_dq.partition_A(sdS));
  Tensor tdQrKt = thr_dq.make_fragment_B(thr_dq.partition_B(sKt));

  // (query, key) of every S element this thread holds, relative to the step and the block.
  Tensor tScS = thr_sdp.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  Tensor tScS_rc = gmma_rowcol_view(tScS);
  // (query, d) of every dQ element this thread holds.
  Tensor tdQcdQ = thr_dq.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  auto pds_copy = make_tiled_copy_C(typename Traits::SmemCopyAtomdS{}, mma_sdp);
  auto thr_pds_copy = pds_copy.get_thread_slice(consumer_tidx);

  Tensor acc_dkt = partition_fragment_C(mma_dkv, Shape<Int<kHeadDim>, Int<kBlockN>>{});
  Tensor acc_dvt = partition_fragment_C(mma_dkv, Shape<Int<kHeadDim>, Int<kBlockN>>{});
  clear(acc_dkt);
  clear(acc_dvt);
  [[maybe_unused]] const DropoutIf<Traits::kHasDropout> dropout(p);

  if (w.steps > 0) {
    cutlass::arch::ClusterTransactionBarrier::wait(&shared.kv_full, 0);
    zero_keys_past_sequence<Traits>(p, w, sK, sV);
  }
  typename Traits::PipelineState read;
  for (int s = 0; s < w.steps; ++s) {
    const auto [bidh, m0, rows_in_tile, stage, buf] =
        begin_consumer_step<Traits>(p, shared, pipeline, read, w, s, sQ, sdO);

    Tensor acc_s = partition_fragment_C(mma_sdp, Shape<Int<kBlockM>, Int<kBlockN>>{});
    Tensor acc_dp = partition_fragment_C(mma_sdp, Shape<Int<kBlockM>, Int<kBlockN>>{});
    Tensor tSrQ_stage = tSrQ(_, _, _, stage);
    Tensor tdPrdO_stage = tdPrdO(_, _, _, stage);
    warpgroup_gemm</*kZeroInit=*/true>(mma_sdp, tSrQ_stage, tSrK, acc_s);
    warpgroup_gemm</*kZeroInit=*/true>(mma_sdp, tdPrdO_stage, tdPrV, acc_dp);
    if constexpr (Traits::kDqTileInStage) {
      // While the GEMMs run: the previous step's dQ quarters have been read by now (they were
      // issued a step ago), and their stage goes back to the producer.
      if (dq_leader && s > 0) {
        tma_store_wait<0>();
        pipeline.consumer_release(dq_stage);
      }
    }
    Tensor sc = gmma_rowcol_view(acc_s);
    // Dropout: the step's keep flags, drawn while the GEMMs run (common/dropout.h).
    [[maybe_unused]] const auto keep = [&] {
      if constexpr (Traits::kHasDropout) {
        return dropout.template keep_bits_gmma</*kTransposed=*/false>(sc, tScS_rc, m0, w.n0,
                                                                      dropout.stream(w.bidb, bidh, p.h));
      } else {
        return KeepAll{};
      }
    }();
    warpgroup_wait<1>();  // S has completed; dP may still run

    const BlockCoords bc{m0, w.n0, w.diag};
    if (block_needs_mask(bc, kBlockN, rows_in_tile, w.seq.seqlen_k, p.window_left, p.window_right)) {
      apply_mask(sc, tScS_rc, bc, w.seq.seqlen_k, p.window_left, p.window_right);
    }
    CUTE_UNROLL
    for (int mi = 0; mi < size<0>(sc); ++mi) {
      const float lse = shared.lse_log2[stage][get<0>(tScS_rc(mi, 0))];
      CUTE_UNROLL
      for (int ni = 0; ni < size<1>(sc); ++ni) sc(mi, ni) = exp2f(fmaf(sc(mi, ni), p.scale_softmax_log2, -lse));
    }
    // P (dropped and rescaled) into this step's buffer (stmatrix); with dropout, the dropped
    // entries of sc negated first (common/dropout.h).
    Tensor rP = [&] {
      if constexpr (Traits::kHasDropout) {
        encode_dropped(acc_s, keep);
        return dropped_probs<Element>(acc_s, p.dropout_scale);
      } else {
        return convert_fragment<Element>(acc_s);
      }
    }();
    copy(pds_copy, thr_pds_copy.retile_S(rP), thr_pds_copy.partition_D(sP(_, _, buf)));
    // Every warpgroup's keys of P in the buffer (the generic-proxy stores made visible to the
    // tensor cores' async proxy first), so dV^T += dO^T P runs while dS is computed. The other
    // buffers are free: each warpgroup waited for its previous step's GEMMs (which read them)
    // before arriving here.
    cutlass::arch::fence_view_async_shared();
    cutlass::arch::NamedBarrier::sync(kConsumerThreads, kBarrierConsumers);
    Tensor tdVrdOt_stage = tdVrdOt(_, _, _, stage);
    warpgroup_gemm</*kZeroInit=*/false>(mma_dkv, tdVrdOt_stage, tdVrPt(_, _, _, buf), acc_dvt);
    warpgroup_wait<1>();  // dP has completed; dV^T may still run

    Tensor dp = gmma_rowcol_view(acc_dp);
    CUTE_UNROLL
    for (int mi = 0; mi < size<0>(dp); ++mi) {
      const float d = shared.dsum[stage][get<0>(tScS_rc(mi, 0))];
      CUTE_UNROLL
      for (int ni = 0; ni < size<1>(dp); ++ni) {
        if constexpr (Traits::kHasDropout) {
          dp(mi, ni) = dropped_ds(sc(mi, ni), dp(mi, ni), d, p.dropout_scale);
        } else {
          dp(mi, ni) = sc(mi, ni) * (dp(mi, ni) - d);
        }
      }
    }
    Tensor rdS = convert_fragment<Element>(acc_dp);
    copy(pds_copy, thr_pds_copy.retile_S(rdS), thr_pds_copy.partition_D(sdS(_, _, buf)));
    // Every warpgroup's keys of dS in the buffer, as for P above.
    cutlass::arch::fence_view_async_shared();
    cutlass::arch::NamedBarrier::sync(kConsumerThreads, kBarrierConsumers);

    // dQ before dK^T, so its atomics overlap the dK^T GEMM.
    Tensor acc_dq = partition_fragment_C(mma_dq, Shape<Int<kBlockM>, Int<kHeadDim>>{});
    Tensor tdQrdS_buf = tdQrdS(_, _, _, buf);
    warpgroup_gemm</*kZeroInit=*/true>(mma_dq, tdQrdS_buf, tdQrKt, acc_dq);
    Tensor tdKrQt_stage = tdKrQt(_, _, _, stage);
    warpgroup_gemm</*kZeroInit=*/false>(mma_dkv, tdKrQt_stage, tdKrdSt(_, _, _, buf), acc_dkt);
    if constexpr (Traits::kDqTileInStage) {
      // The warpgroup's three GEMMs have completed, so nothing reads its column blocks of the
      // stage's Q and dO any more (the other warpgroup's GEMMs read only theirs): the dQ quarters
      // go there.
      warpgroup_wait<0>();
      store_dq_quarters_in_stage<Traits>(shared, acc_dq, stage, warpgroup);
      cutlass::arch::NamedBarrier::sync(128, kBarrierWarpgroup0 + warpgroup);
      if (dq_leader) {
        CUTE_UNROLL
        for (int quarter = 0; quarter < 4; ++quarter) {
          Tensor dq_part = make_tensor(make_smem_ptr(dq_quarter_in_stage<Traits>(shared, stage, warpgroup, quarter)),
                                       typename Traits::SmemLayoutdQTile{});
          reduce_dq_tile_by_tma<Traits>(args, dq_part, w, bidh, m0, 0, 4 * warpgroup + quarter);
        }
        dq_stage = read;  // released once the reduce-adds have read it
      } else {
        pipeline.consumer_release(read);
      }
    } else {
      wait_for_dq_turn_of_step<Traits>(p, w, bidh, m0, rows_in_tile);  // while the GEMMs run
      warpgroup_wait<1>();  // dV^T and dQ have completed
      add_dq_to_accumulator<kHeadDim>(p, w, acc_dq, tdQcdQ, bidh, m0, rows_in_tile);
      warpgroup_wait<0>();
      // After the adds: in deterministic mode the release tells bwd_pass_dq_turns they are done.
      pipeline.consumer_release(read);
    }
    ++read;
  }
  if constexpr (Traits::kDqTileInStage) {
    // The last reduce-adds have read their quarters before the block's shared memory goes.
    if (dq_leader && w.steps > 0) {
      tma_store_wait<0>();
      pipeline.consumer_release(dq_stage);
    }
  }

  // Epilogue: dK^T (times scale_grad: dS excluded the softmax scale) and dV^T, transposed by
  // stmatrix into the K and V tiles as (keys, d), then 16-byte global stores of the block's rows,
  // each of which holds d-columns of every warpgroup.
  CUTE_UNROLL
  for (int i = 0; i < size(acc_dkt); ++i) acc_dkt(i) *= p.scale_grad;
  Tensor rdK = convert_fragment<Element>(acc_dkt);
  Tensor rdV = convert_fragment<Element>(acc_dvt);
  // Every warpgroup's last GEMMs reading K and V (S, dP, dQ) have completed before they are
  // overwritten.
  cutlass::arch::NamedBarrier::sync(kConsumerThreads, kBarrierConsumers);
  auto dkv_copy = make_tiled_copy_C(typename Traits::SmemCopyAtomdKV{}, mma_dkv);
  auto thr_dkv_copy = dkv_copy.get_thread_slice(consumer_tidx);
  copy(dkv_copy, thr_dkv_copy.retile_S(rdK), thr_dkv_copy.partition_D(sKt));
  copy(dkv_copy, thr_dkv_copy.retile_S(rdV), thr_dkv_copy.partition_D(sVt));
  cutlass::arch::NamedBarrier::sync(kConsumerThreads, kBarrierConsumers);
  store_dkv_rows<Traits, kBlockN, kConsumerThreads>(p, w, sK, sV, 0);
}

template <typename Traits>
__global__ void __launch_bounds__(Traits::kNThreads, 1)
    flash_bwd_sm90_kernel(const __grid_constant__ Sm90BwdArgs<Traits> args) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using SharedStorage = typename Traits::SharedStorage;
  using Pipeline = typename Traits::Pipeline;
  const BwdParams& params = args.params;

  extern __shared__ __align__(1024) char smem_buf[];
  SharedStorage& shared = *reinterpret_cast<SharedStorage*>(smem_buf);

  // Past a short varlen sequence: this block has no keys (and so no dK / dV rows) at all.
  {
    const int seqlen_k = params.cu_seqlens_k != nullptr
                             ? params.cu_seqlens_k[blockIdx.y + 1] - params.cu_seqlens_k[blockIdx.y]
                             : params.seqlen_k;
    if (bwd_key_block<Traits::kDeterministic>() * Traits::kBlockN >= seqlen_k) return;
  }

  const int warpgroup = threadIdx.x / 128;
  typename Pipeline::Params pipeline_params;
  pipeline_params.transaction_bytes = 2 * Traits::kQTileBytes;  // Q and dO of one step
  pipeline_params.role = warpgroup == 0 ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
  pipeline_params.is_leader = threadIdx.x == 0;
  pipeline_params.num_consumers = Traits::kNConsumerThreads;
  Pipeline pipeline(shared.pipeline_qdo, pipeline_params, Shape<_1, _1, _1>{});
  if (threadIdx.x == 0) {
    cutlass::arch::ClusterTransactionBarrier::init(&shared.kv_full, 1);
    CUTE_UNROLL
    for (int i = 0; i < Traits::kStages; ++i) {
      cutlass::arch::ClusterBarrier::init(&shared.lse_full[i], 32 * Traits::kRowStatWarps);
    }
  }
  cutlass::arch::fence_barrier_init();
  __syncthreads();  // barriers initialised before anyone arrives or waits on them

  // Each role derives the block's work after its register reconfiguration, so nothing computed
  // before it has to live through the producer's 24-register budget.
  if (warpgroup == 0) {
    cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegisters>();
    const int warp = threadIdx.x / 32;
    if (threadIdx.x == 0) {
      const Sm90BwdWork work = sm90_bwd_work<Traits>(params);
      if (work.steps > 0) bwd_produce_tiles<Traits>(args, shared, pipeline, work);
    } else if (warp >= 1 && warp <= Traits::kRowStatWarps) {
      const Sm90BwdWork work = sm90_bwd_work<Traits>(params);
      const int first_row = threadIdx.x % 32 + (Traits::kRowStatWarps == 1 ? 0 : (warp - 1) * 64);
      bwd_produce_row_stats<Traits>(params, shared, pipeline, work, first_row);
    }
    // Warp kRowStatWarps + 1 writes dQ (keys split; in turns when deterministic), or in
    // deterministic mode its lane 0 passes the turns of the consumers' atomics on (head dim split).
    if (warp == Traits::kRowStatWarps + 1) {
      if constexpr (!Traits::kSplitHeadDim) {
        bwd_write_dq<Traits>(args, shared, sm90_bwd_work<Traits>(params));
      } else if constexpr (Traits::kDeterministic) {
        if (threadIdx.x % 32 == 0) bwd_pass_dq_turns<Traits>(params, pipeline, sm90_bwd_work<Traits>(params));
      }
    }
  } else {
    cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegisters>();
    const Sm90BwdWork work = sm90_bwd_work<Traits>(params);
    if constexpr (Traits::kSplitHeadDim) {
      bwd_consume_head_dim_split<Traits>(args, shared, pipeline, work);
    } else {
      bwd_consume_keys_split<Traits>(args, shared, pipeline, work);
    }
  }
#endif
}

}  // namespace flash
