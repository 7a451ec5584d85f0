// Hopper (sm_90a) forward, FlashAttention-3 style. NOT YET DISPATCHED OR RUN: nothing calls
// run_fwd_sm90 yet, and the kernel has only been compiled, never executed; its results are
// unverified until a GPU test compares it with the SM80 kernel.
//
// One thread block owns a 128-row query tile of one (batch, head) and walks key blocks from last
// to first. Warpgroup 0 is the producer: one thread issues TMA loads of Q once and of K and V per
// key block into a two-stage shared-memory ring (mbarrier pipelines). Warpgroups 1 and 2 are
// consumers, 64 query rows each: S = Q K^T by wgmma from shared memory, the online softmax in
// registers, then O += P V by wgmma with P taken straight from the S accumulator's registers.
//
// Scope: head dim 128, batch-strided (dense) q/k/v, no varlen/paged/left-padded/seqused keys, no
// softcap, ALiBi, dropout or split-KV; causal and sliding windows by FwdParams::window_left/right.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include "params/fwd_params.h"
#include "common/mma_utils.h"
#include "common/score_mods.h"
#include "common/seq_info.h"
#include "common/softmax.h"
#include "kernels/fwd_kernel.h"
#include "sm90/gmma_layouts.h"
#include "sm90/kernel_traits.h"
#include "sm90/tma_loads.h"
#include "sm90/warpgroup_gemm.h"

namespace flash {

using namespace cute;

// Key blocks [first, last] a query tile visits, cut by the causal / sliding-window band; the
// masked diagonal blocks are at the ends of the range, every block between is visited unmasked.
struct KeyBlockRange {
  int min;  // first block
  int max;  // one past the last block
};

__device__ __forceinline__ KeyBlockRange key_block_range(const FwdParams& p, int seqlen_k, int m0, int rows_in_tile,
                                                         int diag, int block_n) {
  KeyBlockRange r{0, ceil_div_dev(seqlen_k, block_n)};
  if (p.window_right >= 0) r.max = min(r.max, ceil_div_dev(m0 + rows_in_tile + diag + p.window_right, block_n));
  if (p.window_left >= 0) r.min = max(r.min, (m0 + diag - p.window_left) / block_n);
  return r;
}

// Producer: Q once, then K and V of every key block, last block first (the consumers' order).
// Run by one thread; each load completes on its stage's full barrier with the tile's byte count.
template <typename Traits>
__device__ __forceinline__ void load_tiles(const Sm90FwdArgs<Traits>& args, typename Traits::SharedStorage& shared,
                                           typename Traits::Pipeline& pipeline_k,
                                           typename Traits::Pipeline& pipeline_v, int m_block, int bidb, int bidh,
                                           int bidh_kv, KeyBlockRange blocks) {
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN, kHeadDim = Traits::kHeadDim;
  const FwdParams& p = args.params;
  cute::prefetch_tma_descriptor(args.tma_q.get_tma_descriptor());
  cute::prefetch_tma_descriptor(args.tma_k.get_tma_descriptor());
  cute::prefetch_tma_descriptor(args.tma_vt.get_tma_descriptor());

  Tensor gQ = local_tile(args.tma_q.get_tma_tensor(q_extent(p))(_, _, bidh, bidb),
                         Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(m_block, _0{}));
  Tensor sQ = make_tensor(make_smem_ptr(shared.q.data()), typename Traits::SmemLayoutQ{});
  auto q_copy = args.tma_q.get_slice(_0{});
  cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&shared.q_full, Traits::kQTileBytes);
  copy(args.tma_q.with(shared.q_full), q_copy.partition_S(gQ), q_copy.partition_D(sQ));

  // (tile rows, tile cols, key block) in gmem, (tile rows, tile cols, stage) in smem.
  Tensor gK = local_tile(args.tma_k.get_tma_tensor(k_extent(p))(_, _, bidh_kv, bidb),
                         Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(_, _0{}));
  Tensor gVt = local_tile(args.tma_vt.get_tma_tensor(vt_extent(p))(_, _, bidh_kv, bidb),
                          Shape<Int<kHeadDim>, Int<kBlockN>>{}, make_coord(_0{}, _));
  Tensor sK = make_tensor(make_smem_ptr(shared.k.data()), typename Traits::SmemLayoutK{});
  Tensor sVt = make_tensor(make_smem_ptr(shared.v.data()), typename Traits::SmemLayoutVt{});
  auto k_copy = args.tma_k.get_slice(_0{});
  auto v_copy = args.tma_vt.get_slice(_0{});
  Tensor tKgK = k_copy.partition_S(gK);
  Tensor tKsK = k_copy.partition_D(sK);
  Tensor tVgVt = v_copy.partition_S(gVt);
  Tensor tVsVt = v_copy.partition_D(sVt);

  typename Traits::PipelineState write = cutlass::make_producer_start_state<typename Traits::Pipeline>();
  for (int n_block = blocks.max - 1; n_block >= blocks.min; --n_block) {
    // K first: the consumers release K's stage right after S = Q K^T, long before V's.
    pipeline_k.producer_acquire(write);
    copy(args.tma_k.with(*pipeline_k.producer_get_barrier(write)), tKgK(_, _, _, n_block),
         tKsK(_, _, _, write.index()));
    pipeline_v.producer_acquire(write);
    copy(args.tma_vt.with(*pipeline_v.producer_get_barrier(write)), tVgVt(_, _, _, n_block),
         tVsVt(_, _, _, write.index()));
    ++write;
  }
}

// Consumer warpgroup (consumer_tidx in [0, 256)): the attention of its 64 query rows, then the
// output through shared memory and the log-sum-exp.
template <typename Traits>
__device__ __forceinline__ void attend_rows(const FwdParams& p, typename Traits::SharedStorage& shared,
                                            typename Traits::Pipeline& pipeline_k,
                                            typename Traits::Pipeline& pipeline_v, const SeqInfo& seq, int bidb,
                                            int bidh, int m0, int rows_in_tile, KeyBlockRange blocks) {
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN, kHeadDim = Traits::kHeadDim;
  const int consumer_tidx = threadIdx.x - 128;
  const int warpgroup = consumer_tidx / 128;
  const int diag = seq.seqlen_k - seq.seqlen_q;

  typename Traits::TiledMmaQK mma_qk;
  typename Traits::TiledMmaPV mma_pv;
  auto thr_qk = mma_qk.get_thread_slice(consumer_tidx);
  auto thr_pv = mma_pv.get_thread_slice(consumer_tidx);

  Tensor sQ = make_tensor(make_smem_ptr(shared.q.data()), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(shared.k.data()), typename Traits::SmemLayoutK{});
  Tensor sVt = make_tensor(make_smem_ptr(shared.v.data()), typename Traits::SmemLayoutVt{});
  // GMMA shared-memory descriptors: (MMA, MMA_M|N, MMA_K[, stage]).
  Tensor tSrQ = thr_qk.make_fragment_A(thr_qk.partition_A(sQ));
  Tensor tSrK = thr_qk.make_fragment_B(thr_qk.partition_B(sK));
  Tensor tOrVt = thr_pv.make_fragment_B(thr_pv.partition_B(sVt));

  Tensor acc_o = partition_fragment_C(mma_pv, Shape<Int<kBlockM>, Int<kHeadDim>>{});
  clear(acc_o);
  // (row, key) of every score this thread holds, relative to the tile and the key block.
  Tensor tScS = thr_qk.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  Tensor tScS_rc = gmma_rowcol_view(tScS);
  constexpr int kRows = decltype(size<0>(tScS_rc))::value;
  OnlineSoftmax<kRows> softmax;

  cutlass::arch::ClusterTransactionBarrier::wait(&shared.q_full, 0);
  typename Traits::PipelineState read;
  bool first = true;
  for (int n_block = blocks.max - 1; n_block >= blocks.min; --n_block, first = false) {
    Tensor acc_s = partition_fragment_C(mma_qk, Shape<Int<kBlockM>, Int<kBlockN>>{});
    pipeline_k.consumer_wait(read);
    warpgroup_gemm</*kZeroInit=*/true>(mma_qk, tSrQ, tSrK(_, _, _, read.index()), acc_s);
    warpgroup_wait<0>();
    pipeline_k.consumer_release(read);

    Tensor s = gmma_rowcol_view(acc_s);
    const BlockCoords bc{m0, n_block * kBlockN, diag};
    if (block_needs_mask(bc, kBlockN, rows_in_tile, seq.seqlen_k, p.window_left, p.window_right)) {
      apply_mask(s, tScS_rc, bc, seq.seqlen_k, p.window_left, p.window_right);
    }
    softmax.update(s, gmma_rowcol_view(acc_o), p.scale_softmax_log2, first);

    Tensor rP = convert_fragment<Element>(acc_s);
    Tensor tOrP = make_tensor(rP.data(), gmma_acc_to_a_operand_layout(rP.layout()));
    pipeline_v.consumer_wait(read);
    warpgroup_gemm</*kZeroInit=*/false>(mma_pv, tOrP, tOrVt(_, _, _, read.index()), acc_o);
    warpgroup_wait<0>();
    pipeline_v.consumer_release(read);
    ++read;
  }

  float lse[kRows];
  softmax.finalize(gmma_rowcol_view(acc_o), p.scale_softmax, INFINITY, lse);

  Tensor tOcO = thr_pv.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  Tensor tOcO_rc = gmma_rowcol_view(tOcO);
  // The quad lane holding column 0 of a row writes that row's lse.
  if (get<1>(tOcO_rc(0, 0)) == 0) {
    float* lse_out = p.softmax_lse_ptr + bidb * p.lse_batch_stride + bidh * p.lse_head_stride;
    CUTE_UNROLL
    for (int mi = 0; mi < kRows; ++mi) {
      const int row = get<0>(tOcO_rc(mi, 0));
      if (row < rows_in_tile) lse_out[int64_t(seq.q_start + m0 + row) * p.lse_row_stride] = lse[mi];
    }
  }

  // O into this warpgroup's rows of Q's tile (stmatrix), then 16-byte coalesced global stores.
  Tensor rO = convert_fragment<Element>(acc_o);
  Tensor sO = make_tensor(make_smem_ptr(shared.q.data()), typename Traits::SmemLayoutQ{});
  auto o_copy = make_tiled_copy_C(typename Traits::SmemCopyAtomO{}, mma_pv);
  auto thr_o_copy = o_copy.get_thread_slice(consumer_tidx);
  copy(o_copy, thr_o_copy.retile_S(rO), thr_o_copy.partition_D(sO));
  cutlass::arch::NamedBarrier::sync(128, warpgroup);

  constexpr int kVecElems = 16 / sizeof(Element);
  constexpr int kVecsPerRow = kHeadDim / kVecElems;
  Element* o = static_cast<Element*>(p.o_ptr) + seq.o_offset + bidh * p.o_head_stride;
  const int lane_in_warpgroup = consumer_tidx % 128;
  CUTE_UNROLL
  for (int i = lane_in_warpgroup; i < 64 * kVecsPerRow; i += 128) {
    const int row = warpgroup * 64 + i / kVecsPerRow;
    const int col = (i % kVecsPerRow) * kVecElems;
    if (row < rows_in_tile && col < p.d) {
      // 8 consecutive elements stay contiguous under the 128-byte swizzle (it permutes 16-byte units).
      *reinterpret_cast<uint4*>(o + int64_t(m0 + row) * p.o_row_stride + col) =
          *reinterpret_cast<const uint4*>(&sO(row, col));
    }
  }
}

template <typename Traits>
__global__ void __launch_bounds__(Traits::kNThreads, 1)
    flash_fwd_sm90_kernel(const __grid_constant__ Sm90FwdArgs<Traits> args) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using SharedStorage = typename Traits::SharedStorage;
  using Pipeline = typename Traits::Pipeline;
  constexpr int kBlockM = Traits::kBlockM;
  const FwdParams& params = args.params;

  extern __shared__ __align__(1024) char smem_buf[];
  SharedStorage& shared = *reinterpret_cast<SharedStorage*>(smem_buf);

  // Later query tiles first: under a causal mask they see the most keys, so the longest blocks
  // start in the first wave.
  const int m_block = gridDim.x - 1 - blockIdx.x;
  const int bidb = blockIdx.y;
  const int bidh = blockIdx.z;
  const int bidh_kv = bidh / params.h_h_k_ratio;
  const SeqInfo seq(params, bidb);
  const int m0 = m_block * kBlockM;
  const int rows_in_tile = min(kBlockM, seq.seqlen_q - m0);
  const KeyBlockRange blocks =
      key_block_range(params, seq.seqlen_k, m0, rows_in_tile, seq.seqlen_k - seq.seqlen_q, Traits::kBlockN);
  if (blocks.max <= blocks.min) {
    write_empty_tile<Traits, false>(params, seq, bidb, bidh, 0, m_block, rows_in_tile);
    return;
  }

  const int warpgroup = threadIdx.x / 128;
  typename Pipeline::Params pipeline_params;
  pipeline_params.transaction_bytes = Traits::kKVTileBytes;
  pipeline_params.role =
      warpgroup == 0 ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
  pipeline_params.is_leader = threadIdx.x == 0;
  pipeline_params.num_consumers = Traits::kNConsumerThreads;
  Pipeline pipeline_k(shared.pipeline_k, pipeline_params, Shape<_1, _1, _1>{});
  Pipeline pipeline_v(shared.pipeline_v, pipeline_params, Shape<_1, _1, _1>{});
  if (threadIdx.x == 0) cutlass::arch::ClusterTransactionBarrier::init(&shared.q_full, 1);
  cutlass::arch::fence_barrier_init();
  __syncthreads();  // barriers initialised before anyone arrives or waits on them

  if (warpgroup == 0) {
    cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegisters>();
    // The pipeline's leader thread (is_leader above) is the only one that loads.
    if (threadIdx.x == 0) load_tiles<Traits>(args, shared, pipeline_k, pipeline_v, m_block, bidb, bidh, bidh_kv, blocks);
  } else {
    cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegisters>();
    attend_rows<Traits>(params, shared, pipeline_k, pipeline_v, seq, bidb, bidh, m0, rows_in_tile, blocks);
  }
#endif
}

}  // namespace flash
