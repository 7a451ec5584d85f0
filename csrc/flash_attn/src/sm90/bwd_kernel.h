// Hopper (sm_90a) backward, dK / dV and dQ by atomics, FlashAttention-3's algorithm.
//
// One thread block per (key block of kBlockN = 128 keys, batch, kv head). Warpgroup 0 produces:
// thread 0 loads K and V once and Q, dO of every step (TMA) into a two-stage ring; warp 1 copies
// the step's lse (in log2 units) and D into shared memory beside them. Warpgroups 1 and 2 consume,
// 64 keys each; a step is one 64-query block of one query head of the GQA group (every query head
// of the group in turn, as the SM80 kernel does, so dK and dV sum the group in registers):
//   S^T = K Q^T, dP^T = V dO^T                  (SS)
//   P^T = exp2(S^T scale_log2 - lse_log2)       (registers; lse of a query column from smem)
//   dV += P^T dO                                (RS: P^T is the register A operand)
//   dS^T = P^T o (dP^T - D)                     (registers), stored to smem for dQ
//   dK += dS^T Q                                (RS)
//   dQ = dS K                                   (SS, both warpgroups' dS^T; warpgroup w owns
//                                                d-columns [64 w, 64 w + 64)), added to the fp32
//                                                dQ accumulator with float2 atomics (in a fixed
//                                                key-block order when deterministic:
//                                                sm90/bwd_dq_order.h)
// dK is scaled by scale_grad at the end (dS excludes the softmax scale, as in the SM80 kernels);
// the dQ convert kernel applies it to dQ.
//
// Scope: head dim 128, batch-strided q/k/v (packed varlen maps are built like the forward's but
// are not a target yet), causal or not (any window), GQA, deterministic or not; no softcap, ALiBi,
// dropout.
#pragma once

#include <cmath>
#include <utility>

#include <cute/tensor.hpp>
#include <cute/atom/copy_traits_sm90_tma.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include "params/bwd_params.h"
#include "common/mma_utils.h"
#include "common/score_mods.h"
#include "common/seq_info.h"
#include "sm90/bwd_dq_order.h"
#include "sm90/bwd_kernel_traits.h"
#include "sm90/gmma_layouts.h"
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

template <typename Traits>
struct Sm90BwdArgs {
  BwdParams params;
  decltype(make_bwd_tma_rows<Traits>(nullptr, {}, false, 0, 0, 0)) tma_q, tma_do;
  decltype(make_bwd_tma_keys<Traits>(nullptr, {}, false, 0, 0, 0)) tma_k, tma_v;
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
                                    p.v_batch_stride)};
}

// ---- Work of one thread block ------------------------------------------------------------------

// The query blocks that see key block n_block, and the steps (query head of the group, query block)
// the block walks; producer and consumers compute it alike.
struct Sm90BwdWork {
  SeqInfo seq;
  int n0, keys_in_block, diag;
  int m_block_min, m_blocks, steps;
  int kv_head, bidb;

  __device__ int step_head(const BwdParams& p, int s) const { return kv_head * p.h_h_k_ratio + s / m_blocks; }
  __device__ int step_m0(int s, int block_m) const { return (m_block_min + s % m_blocks) * block_m; }
};

template <typename Traits>
__device__ __forceinline__ Sm90BwdWork sm90_bwd_work(const BwdParams& p) {
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN;
  Sm90BwdWork w{SeqInfo(p, blockIdx.y), 0, 0, 0, 0, 0, 0, int(blockIdx.z), int(blockIdx.y)};
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
  return w;
}

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
    const int bidh = w.step_head(p, s), m_block = w.step_m0(s, kBlockM) / kBlockM;
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

// Warp 1 of the producer warpgroup: per step, the lse (times log2 e) and D of the step's 64 query
// rows into the stage's slots, once the consumers released the stage. Rows past the sequence get
// lse = +inf and D = 0, so their P and dS are exactly 0 whatever the zero-filled Q and dO give.
// Deterministic: a release also means the released step's dQ adds are done, so warp 1 passes that
// step's turn on to the next key block (sm90/bwd_dq_order.h), the last steps' after its loop.
template <typename Traits>
__device__ __forceinline__ void bwd_produce_row_stats(const BwdParams& p, typename Traits::SharedStorage& shared,
                                                      typename Traits::Pipeline& pipeline, const Sm90BwdWork& w,
                                                      int lane) {
  constexpr int kBlockM = Traits::kBlockM;
  constexpr float kLog2e = 1.4426950408889634f;
  // Kept small (24 registers after setmaxnreg): one step at a time, 32-bit row offsets from the
  // head's base pointers.
  const int rows_left0 = w.seq.seqlen_q - lane;
  constexpr int kStages = Traits::kStages;
  auto pass_turn_of_step = [&](int s) {
    if (s >= 0 && lane == 0) {
      pass_dq_turn(dq_add_count<kBlockM>(p, w.bidb, w.step_head(p, s), w.step_m0(s, kBlockM) / kBlockM));
    }
  };
  typename Traits::PipelineState write = cutlass::make_producer_start_state<typename Traits::Pipeline>();
#pragma unroll 1
  for (int s = 0; s < w.steps; ++s) {
    const int bidh = w.step_head(p, s), m0 = w.step_m0(s, kBlockM);
    const int64_t head_off = w.bidb * p.lse_batch_stride + bidh * p.lse_head_stride +
                             int64_t(w.seq.q_start + m0 + lane) * p.lse_row_stride;
    const float* lse = p.softmax_lse_ptr + head_off;
    const float* dsum = p.softmax_d_ptr + head_off;
    const int row_step = 32 * int(p.lse_row_stride);
    pipeline.producer_acquire(write);  // not the leader: only waits for the stage to be free
    if constexpr (Traits::kDeterministic) pass_turn_of_step(s - kStages);
    CUTE_UNROLL
    for (int i = 0; i < kBlockM / 32; ++i) {
      const bool valid = m0 + 32 * i < rows_left0;
      shared.lse_log2[write.index()][lane + 32 * i] = valid ? lse[i * row_step] * kLog2e : INFINITY;
      shared.dsum[write.index()][lane + 32 * i] = valid ? dsum[i * row_step] : 0.f;
    }
    // mbarrier.arrive has release semantics: the stores above are visible to its waiters.
    cutlass::arch::ClusterBarrier::arrive(&shared.lse_full[write.index()]);
    ++write;
  }
  if constexpr (Traits::kDeterministic) {
#pragma unroll 1
    for (int s = w.steps; s < w.steps + kStages; ++s, ++write) {
      pipeline.producer_acquire(write);
      pass_turn_of_step(s - kStages);
    }
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

template <typename Traits>
__device__ __forceinline__ void bwd_consume(const BwdParams& p, typename Traits::SharedStorage& shared,
                                            typename Traits::Pipeline& pipeline, const Sm90BwdWork& w) {
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN, kHeadDim = Traits::kHeadDim;
  constexpr int kConsumerThreads = Traits::kNConsumerThreads;
  const int consumer_tidx = threadIdx.x - 128;
  const int warpgroup = consumer_tidx / 128;
  // Named barriers (0 is __syncthreads'): 1 spans both consumer warpgroups, 2 and 3 one each.
  constexpr int kBarrierConsumers = 1, kBarrierWarpgroup0 = 2;

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
  // (query, d) of every dQ element this thread holds.
  Tensor tdQcdQ = thr_dq.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  auto ds_copy = make_tiled_copy_C(typename Traits::SmemCopyAtomdS{}, mma_sdp);
  auto thr_ds_copy = ds_copy.get_thread_slice(consumer_tidx);

  Tensor acc_dk = partition_fragment_C(mma_dkv, Shape<Int<kBlockN>, Int<kHeadDim>>{});
  Tensor acc_dv = partition_fragment_C(mma_dkv, Shape<Int<kBlockN>, Int<kHeadDim>>{});
  clear(acc_dk);
  clear(acc_dv);

  if (w.steps > 0) cutlass::arch::ClusterTransactionBarrier::wait(&shared.kv_full, 0);
  typename Traits::PipelineState read;
  for (int s = 0; s < w.steps; ++s) {
    const int bidh = w.step_head(p, s), m0 = w.step_m0(s, kBlockM);
    const int rows_in_tile = min(kBlockM, w.seq.seqlen_q - m0);
    const int stage = read.index();
    const int buf = s % Traits::kDsBuffers;
    pipeline.consumer_wait(read);
    cutlass::arch::ClusterBarrier::wait(&shared.lse_full[stage], read.phase());

    Tensor acc_s = partition_fragment_C(mma_sdp, Shape<Int<kBlockN>, Int<kBlockM>>{});
    Tensor acc_dp = partition_fragment_C(mma_sdp, Shape<Int<kBlockN>, Int<kBlockM>>{});
    warpgroup_gemm</*kZeroInit=*/true>(mma_sdp, tSrK, tSrQ(_, _, _, stage), acc_s);
    warpgroup_gemm</*kZeroInit=*/true>(mma_sdp, tdPrV, tdPrdO(_, _, _, stage), acc_dp);
    warpgroup_wait<1>();  // S^T has completed; dP^T may still run

    Tensor st = gmma_rowcol_view(acc_s);
    const BlockCoords bc{m0, w.n0, w.diag};
    if (block_needs_mask(bc, kBlockN, rows_in_tile, w.seq.seqlen_k, p.window_left, p.window_right)) {
      apply_mask_transposed(st, tScS_rc, w.n0, m0, w.diag, w.seq.seqlen_k, p.window_left, p.window_right);
    }
    CUTE_UNROLL
    for (int ni = 0; ni < size<1>(st); ++ni) {
      const float lse = shared.lse_log2[stage][get<1>(tScS_rc(0, ni))];
      CUTE_UNROLL
      for (int mi = 0; mi < size<0>(st); ++mi) st(mi, ni) = exp2f(fmaf(st(mi, ni), p.scale_softmax_log2, -lse));
    }
    // P^T as the register A operand of dV += P^T dO.
    Tensor rP = convert_fragment<Element>(acc_s);
    Tensor tdVrP = make_tensor(rP.data(), gmma_acc_to_a_operand_layout(rP.layout()));
    warpgroup_gemm</*kZeroInit=*/false>(mma_dkv, tdVrP, tdVrdOt(_, _, _, stage), acc_dv);
    warpgroup_wait<1>();  // dP^T has completed; dV may still run

    Tensor dpt = gmma_rowcol_view(acc_dp);
    CUTE_UNROLL
    for (int ni = 0; ni < size<1>(dpt); ++ni) {
      const float d = shared.dsum[stage][get<1>(tScS_rc(0, ni))];
      CUTE_UNROLL
      for (int mi = 0; mi < size<0>(dpt); ++mi) dpt(mi, ni) = st(mi, ni) * (dpt(mi, ni) - d);
    }
    Tensor rdS = convert_fragment<Element>(acc_dp);
    // dS^T into this step's buffer (stmatrix), made visible to the tensor cores' async proxy.
    copy(ds_copy, thr_ds_copy.retile_S(rdS), thr_ds_copy.partition_D(sdSt(_, _, buf)));
    cutlass::arch::fence_view_async_shared();
    Tensor tdKrdS = make_tensor(rdS.data(), gmma_acc_to_a_operand_layout(rdS.layout()));
    warpgroup_gemm</*kZeroInit=*/false>(mma_dkv, tdKrdS, tdKrQt(_, _, _, stage), acc_dk);

    // Both warpgroups' dS^T are in the buffer. The other buffer is free: each warpgroup waited for
    // its previous dQ GEMM (which read it) before arriving here.
    cutlass::arch::NamedBarrier::sync(kConsumerThreads, kBarrierConsumers);
    Tensor acc_dq = partition_fragment_C(mma_dq, Shape<Int<kBlockM>, Int<kHeadDim>>{});
    Tensor tdQrdS_buf = tdQrdS(_, _, _, buf);
    warpgroup_gemm</*kZeroInit=*/true>(mma_dq, tdQrdS_buf, tdQrKt, acc_dq);
    if constexpr (Traits::kDeterministic) {
      // This key block's turn to add into the step's dQ rows, waited for while the GEMM runs.
      wait_for_dq_turn(dq_add_count<kBlockM>(p, w.bidb, bidh, m0 / kBlockM),
                       dq_adds_before<kBlockN>(p, w.seq, m0, rows_in_tile, w.n0 / kBlockN));
    }
    warpgroup_wait<0>();
    // The register operands stay untouched until here, where their GEMMs have completed.
    warpgroup_fence_operand(rP);
    warpgroup_fence_operand(rdS);
    auto release_stage = [&] {
      pipeline.consumer_release(read);
      ++read;
    };
    // Deterministic: after the adds below, so the release tells warp 1 they are done.
    if constexpr (!Traits::kDeterministic) release_stage();

    // Neighbouring accumulator elements are neighbouring d-columns of one query row: one float2
    // atomic each. Rows past the sequence carry dS = 0 and are skipped. Addresses are the thread's
    // base plus compile-time offsets (its coordinates minus its first), folded into the atomics'
    // immediates; the empty asm keeps the compiler from splitting the base offset back into
    // per-element 64-bit offsets, which it would hoist out of the loop and spill. (On the offset,
    // not the pointer: the pointer stays known to be global, so the atomics stay REDG.)
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
    if constexpr (Traits::kDeterministic) release_stage();
  }

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

  constexpr int kVecElems = 16 / sizeof(Element);
  constexpr int kVecsPerRow = kHeadDim / kVecElems;
  const bool packed_k = p.cu_seqlens_k != nullptr;
  const int k_start = packed_k ? p.cu_seqlens_k[w.bidb] : 0;
  Element* dk = static_cast<Element*>(p.dk_ptr) +
                (packed_k ? int64_t(k_start) * p.dk_row_stride : int64_t(w.bidb) * p.dk_batch_stride) +
                w.kv_head * p.dk_head_stride;
  Element* dv = static_cast<Element*>(p.dv_ptr) +
                (packed_k ? int64_t(k_start) * p.dv_row_stride : int64_t(w.bidb) * p.dv_batch_stride) +
                w.kv_head * p.dv_head_stride;
  const int lane_in_warpgroup = consumer_tidx % 128;
  CUTE_UNROLL
  for (int i = lane_in_warpgroup; i < 64 * kVecsPerRow; i += 128) {
    const int row = warpgroup * 64 + i / kVecsPerRow;
    const int col = (i % kVecsPerRow) * kVecElems;
    if (row < w.keys_in_block && col < p.d) {
      // 8 consecutive elements stay contiguous under the 128-byte swizzle (it permutes 16-byte units).
      *reinterpret_cast<uint4*>(dk + int64_t(w.n0 + row) * p.dk_row_stride + col) =
          *reinterpret_cast<const uint4*>(&sK(row, col));
      *reinterpret_cast<uint4*>(dv + int64_t(w.n0 + row) * p.dv_row_stride + col) =
          *reinterpret_cast<const uint4*>(&sV(row, col));
    }
  }
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
    for (int i = 0; i < Traits::kStages; ++i) cutlass::arch::ClusterBarrier::init(&shared.lse_full[i], 32);
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
    } else if (warp == 1) {
      const Sm90BwdWork work = sm90_bwd_work<Traits>(params);
      bwd_produce_row_stats<Traits>(params, shared, pipeline, work, threadIdx.x % 32);
    }
  } else {
    cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegisters>();
    const Sm90BwdWork work = sm90_bwd_work<Traits>(params);
    bwd_consume<Traits>(params, shared, pipeline, work);
  }
#endif
}

}  // namespace flash
