// Hopper (sm_90a) forward, FlashAttention-3 style, persistent.
//
// Each thread block stays on its SM and takes query tiles (of one (batch, head); 128 rows, or 192
// in head dim 64's kernel for calls without a mask) in the order of sm90/tile_scheduler.h.
// Warpgroup 0 is the producer: one thread issues TMA loads of each tile's Q and of K and V per key
// block (last block first) into two-stage shared-memory rings (mbarrier pipelines), running ahead
// into the next tile while the consumers finish this one. Warpgroups 1, 2 (and 3 with 192 rows) are
// consumers, 64 query rows each: S = Q K^T by wgmma from shared memory, the online softmax in
// registers while the tensor cores run the previous block's O += P V, with P taken straight from
// the S accumulator's registers. At head dims from 128 on the two consumer warpgroups issue their
// GEMMs in turns (ping-pong, sm90/fwd_named_barriers.h), so that one's softmax runs under the
// other's GEMMs.
//
// Scope: kernel head dims 64, 96, 128, 192 and 256 (tile, layouts and shared-memory use per head
// dim in sm90/kernel_traits.h), batch-strided or packed (varlen) q/k/v, seqused_k; causal and
// sliding windows by FwdParams::window_left/right; softcap and ALiBi in their own instantiation
// (kHasScoreMods), so the plain kernel's softmax step carries none of their code; split-KV in
// its own (kIsSplit: a unit of work is one split of a tile, whose fp32 partial output and lse the
// combine kernel merges); a paged K/V cache in its own (kPaged: a block table, page sizes that are
// multiples of the key block, so that each block is one TMA box inside one page; only the producer
// differs); dropout in its own (kHasDropout: the plain kernel, mask drawn per key block,
// common/dropout.h); no left-padded keys, no cache_batch_idx, no S_dmask.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include "params/fwd_params.h"
#include "common/block_info.h"
#include "common/epilogue.h"
#include "common/index_guard.h"
#include "common/mma_utils.h"
#include "common/fwd_dropout.h"
#include "common/score_mods.h"
#include "common/seq_info.h"
#include "common/softmax.h"
#include "sm90/fwd_named_barriers.h"
#include "sm90/gmma_layouts.h"
#include "sm90/kernel_traits.h"
#include "sm90/shared_window.h"
#include "sm90/tile_scheduler.h"
#include "sm90/tma_loads.h"
#include "sm90/warpgroup_gemm.h"

namespace flash {

using namespace cute;

// Key blocks of a tile and its rows, as both roles compute them.
struct Sm90TileWork {
  SeqInfo seq;
  int m0, rows_in_tile;
  KeyBlocks blocks;
};

template <typename Traits, bool kIsSplit>
__device__ __forceinline__ Sm90TileWork sm90_tile_work(const FwdParams& p, const Sm90Tile& tile) {
  const SeqInfo seq(p, tile.bidb);
  const int m0 = tile.m_block * Traits::kBlockM;
  const int rows_in_tile = min(Traits::kBlockM, seq.seqlen_q - m0);
  KeyBlocks blocks = visible_key_blocks<Traits::kBlockN>(p, seq, m0, rows_in_tile);
  if constexpr (kIsSplit) blocks = split_share(blocks, tile.split, p.num_splits);
  return {seq, m0, rows_in_tile, blocks};
}

// Producer, one thread: per tile, Q once Q's buffer is free, then K and V of every key block, last
// block first (the consumers' order). Each load completes on its stage's full barrier with the
// tile's byte count; the K/V pipeline states run on across tiles.
// kPaged: key block n lies in page block_table[b][n / blocks per page], at block n % blocks per
// page of it. The next block's table entry is read before this block's stages are acquired; ptxas
// moves it into a uniform register (TMA coordinates are uniform) right after the load, so the
// thread waits for it there, and what hides the lookup is the producer's lead of kStages blocks
// over the consumers. Only the entries of blocks the tile visits are read: each holds at least one
// key of the sequence, so padding past its length (any value, such as -1) is never read or
// reported. A bad entry is clamped and reported (guard_page), as the SM80 kernels do.
template <typename Traits, bool kIsSplit, bool kPaged>
__device__ __forceinline__ void produce_tiles(const Sm90FwdArgs<Traits>& args, typename Traits::SharedStorage& shared,
                                              typename Traits::Pipeline& pipeline_k,
                                              typename Traits::Pipeline& pipeline_v, int m_blocks) {
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN, kHeadDim = Traits::kHeadDim;
  const FwdParams& p = args.params;
  cute::prefetch_tma_descriptor(args.tma_q.get_tma_descriptor());
  cute::prefetch_tma_descriptor(args.tma_k.get_tma_descriptor());
  cute::prefetch_tma_descriptor(args.tma_vt.get_tma_descriptor());
  Tensor sK = make_tensor(make_smem_ptr(shared.k.data()), typename Traits::SmemLayoutK{});
  Tensor sVt = make_tensor(make_smem_ptr(shared.v.data()), typename Traits::SmemLayoutVt{});
  auto q_copy = args.tma_q.get_slice(_0{});
  auto k_copy = args.tma_k.get_slice(_0{});
  auto v_copy = args.tma_vt.get_slice(_0{});

  typename Traits::PipelineState write = cutlass::make_producer_start_state<typename Traits::Pipeline>();
  int q_loads = 0;
  for (Sm90TileScheduler<kIsSplit> tiles(p, m_blocks); tiles.valid(); tiles.next()) {
    const Sm90Tile tile = tiles.tile();
    const Sm90TileWork work = sm90_tile_work<Traits, kIsSplit>(p, tile);
    // Past a short varlen sequence, or no visible key block (the consumers write that tile).
    if (work.rows_in_tile <= 0 || work.blocks.empty()) continue;
    const int bidh_kv = tile.bidh / p.h_h_k_ratio;
    // kPaged: this sequence's row of the block table, and the entry of the tile's first (last) block.
    const int* table_row = nullptr;
    int blocks_per_page = 1, entry = 0;
    if constexpr (kPaged) {
      table_row = p.block_table + tile.bidb * p.block_table_batch_stride;
      blocks_per_page = p.page_block_size / kBlockN;
      entry = table_row[(work.blocks.max - 1) / blocks_per_page];
    }

    // Parity 1 on a fresh barrier passes at once: the first tile of each Q buffer needs no release.
    const int q_stage = Traits::q_stage(q_loads);
    cutlass::arch::ClusterBarrier::wait(&shared.q_empty[q_stage], Traits::q_parity(q_loads) ^ 1);
    Tensor sQ = make_tensor(make_smem_ptr(Traits::q_tile(shared, q_stage)), typename Traits::SmemLayoutQ{});
    // A packed (varlen) tensor is one batch entry of the map; its sequences start at row offsets.
    Tensor mQ = domain_offset(make_coord(work.seq.q_start, _0{}),
                              args.tma_q.get_tma_tensor(q_extent(p))(_, _, tile.bidh, p.cu_seqlens_q ? 0 : tile.bidb));
    Tensor gQ = local_tile(mQ, Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(tile.m_block, _0{}));
    cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&shared.q_full[q_stage], Traits::kQTileBytes);
    copy(args.tma_q.with(shared.q_full[q_stage]), q_copy.partition_S(gQ), q_copy.partition_D(sQ));
    ++q_loads;

    if constexpr (kPaged) {
      // (tile rows, tile cols, block in page, page) in gmem, (tile rows, tile cols, stage) in smem.
      Tensor mK = args.tma_k.get_tma_tensor(k_extent<true>(p))(_, _, bidh_kv, _);
      Tensor mVt = args.tma_vt.get_tma_tensor(vt_extent<true>(p))(_, _, bidh_kv, _);
      Tensor gK = local_tile(mK, Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(_, _0{}, _));
      Tensor gVt = local_tile(mVt, Shape<Int<kHeadDim>, Int<kBlockN>>{}, make_coord(_0{}, _, _));
      Tensor tKgK = k_copy.partition_S(gK);
      Tensor tKsK = k_copy.partition_D(sK);
      Tensor tVgVt = v_copy.partition_S(gVt);
      Tensor tVsVt = v_copy.partition_D(sVt);
      // Not unrolled: one table read and one guard per block either way, and the producer's code
      // stays small (unrolled, ptxas repeats the divisions and the error report per copy).
#pragma unroll 1
      for (int n_block = work.blocks.max - 1; n_block >= work.blocks.min; --n_block) {
        const int next_entry = n_block > work.blocks.min ? table_row[(n_block - 1) / blocks_per_page] : 0;
        const int page = guard_page(entry, p.num_pages, p.index_errors);
        const int block_in_page = n_block % blocks_per_page;
        pipeline_k.producer_acquire(write);
        copy(args.tma_k.with(*pipeline_k.producer_get_barrier(write)), tKgK(_, _, _, block_in_page, page),
             tKsK(_, _, _, write.index()));
        pipeline_v.producer_acquire(write);
        copy(args.tma_vt.with(*pipeline_v.producer_get_barrier(write)), tVgVt(_, _, _, block_in_page, page),
             tVsVt(_, _, _, write.index()));
        ++write;
        entry = next_entry;
      }
    } else {
      // (tile rows, tile cols, key block) in gmem, (tile rows, tile cols, stage) in smem.
      const int k_start = p.cu_seqlens_k ? p.cu_seqlens_k[tile.bidb] : 0;
      const int kv_batch = p.cu_seqlens_k ? 0 : tile.bidb;
      Tensor mK = domain_offset(make_coord(k_start, _0{}),
                                args.tma_k.get_tma_tensor(k_extent<false>(p))(_, _, bidh_kv, kv_batch));
      Tensor mVt = domain_offset(make_coord(_0{}, k_start),
                                 args.tma_vt.get_tma_tensor(vt_extent<false>(p))(_, _, bidh_kv, kv_batch));
      Tensor gK = local_tile(mK, Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(_, _0{}));
      Tensor gVt = local_tile(mVt, Shape<Int<kHeadDim>, Int<kBlockN>>{}, make_coord(_0{}, _));
      Tensor tKgK = k_copy.partition_S(gK);
      Tensor tKsK = k_copy.partition_D(sK);
      Tensor tVgVt = v_copy.partition_S(gVt);
      Tensor tVsVt = v_copy.partition_D(sVt);
      for (int n_block = work.blocks.max - 1; n_block >= work.blocks.min; --n_block) {
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
  }
}

// Consumer warpgroup (consumer_tidx in [0, kNConsumerThreads)): the attention of its 64 query rows
// of one tile, then the output through shared memory and the log-sum-exp (kIsSplit: this split's
// fp32 partial output and lse, from registers). q_loads: the Q loads before this tile's (its Q
// buffer and parity, Traits::q_stage / q_parity); read_k / read_v: the K/V pipeline states, carried
// from tile to tile; turns: this warpgroup's GEMM issue turns, one per key block; tma_o: O's tensor
// map (Traits::kOStoredByTma).
template <typename Traits, bool kIsSplit, bool kHasScoreMods, bool kHasDropout>
__device__ __forceinline__ void attend_rows(const FwdParams& p, const decltype(Sm90FwdArgs<Traits>::tma_o)& tma_o,
                                            typename Traits::SharedStorage& shared,
                                            typename Traits::Pipeline& pipeline_k,
                                            typename Traits::Pipeline& pipeline_v,
                                            typename Traits::PipelineState& read_k,
                                            typename Traits::PipelineState& read_v, const Sm90Tile& tile,
                                            const Sm90TileWork& work, int q_loads,
                                            const GemmIssueTurns<Traits::kGemmIssueTurns>& turns) {
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN, kHeadDim = Traits::kHeadDim;
  const int consumer_tidx = threadIdx.x - 128;
  const int warpgroup = consumer_tidx / 128;
  const SeqInfo& seq = work.seq;
  const int m0 = work.m0, rows_in_tile = work.rows_in_tile, bidb = tile.bidb, bidh = tile.bidh;
  const KeyBlocks blocks = work.blocks;
  const int diag = seq.seqlen_k - seq.seqlen_q;

  typename Traits::TiledMmaQK mma_qk;
  typename Traits::TiledMmaPV mma_pv;
  auto thr_qk = mma_qk.get_thread_slice(consumer_tidx);
  auto thr_pv = mma_pv.get_thread_slice(consumer_tidx);

  const int q_stage = Traits::q_stage(q_loads);
  Tensor sQ = make_tensor(make_smem_ptr(shared.q.data()), typename Traits::SmemLayoutQBuffers{});
  Tensor sK = make_tensor(make_smem_ptr(shared.k.data()), typename Traits::SmemLayoutK{});
  Tensor sVt = make_tensor(make_smem_ptr(shared.v.data()), typename Traits::SmemLayoutVt{});
  // GMMA shared-memory descriptors: (MMA, MMA_M|N, MMA_K[, stage]).
  Tensor tSrQ_buffers = thr_qk.make_fragment_A(thr_qk.partition_A(sQ));
  Tensor tSrQ = tSrQ_buffers(_, _, _, Traits::kQStages == 1 ? 0 : q_stage);
  Tensor tSrK = thr_qk.make_fragment_B(thr_qk.partition_B(sK));
  Tensor tOrVt = thr_pv.make_fragment_B(thr_pv.partition_B(sVt));
  // Q's descriptors (one per 16 columns of d) are loop invariants, and ptxas holds them in 2 x d/16
  // registers through the main loop. At head dim 256 only the plain kernel has room for them (with
  // score modifiers 76 bytes spill, 5 loads of them per key block; with split partials 12 bytes,
  // per tile); the others derive them per block from a copy of the first that is opaque to the
  // compiler (an add per descriptor).
  constexpr bool kQDescriptorsPerBlock = kHeadDim == 256 && (kHasScoreMods || kIsSplit);
  auto q_operand = [&]() {
    if constexpr (kQDescriptorsPerBlock) {
      GMMA::DescriptorIterator q_desc = tSrQ.data();
      asm volatile("" : "+r"(q_desc.desc_.reg32_[0]));
      return make_tensor(q_desc, tSrQ.layout());
    } else {
      return tSrQ;
    }
  };

  Tensor acc_o = partition_fragment_C(mma_pv, Shape<Int<kBlockM>, Int<kHeadDim>>{});
  clear(acc_o);
  // (row, key) of every score this thread holds, relative to the tile and the key block.
  Tensor tScS = thr_qk.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  Tensor tScS_rc = gmma_rowcol_view(tScS);
  constexpr int kRows = decltype(size<0>(tScS_rc))::value;
  OnlineSoftmax<kRows, Traits::kSoftmaxFolds> softmax;

  // S of block n is scored while the tensor cores still run O += P V of block n + 1: the S GEMM
  // and the P V GEMM are issued back to back, the softmax waits only for the first, and O is
  // rescaled once the second is done. K runs one block ahead of V, so each has its own state.
  Tensor acc_s = partition_fragment_C(mma_qk, Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor s = gmma_rowcol_view(acc_s);
  const ScoreMods<kHasScoreMods> score_mods(p, bidb, bidh);
  // The raw scores of block n_block to what the softmax takes: softcap and ALiBi, then the mask.
  auto score_block = [&](int n_block) {
    const BlockCoords bc{m0, n_block * kBlockN, diag};
    score_mods.apply(acc_s, s, tScS_rc, bc);
    if (block_needs_mask(bc, kBlockN, rows_in_tile, seq.seqlen_k, p.window_left, p.window_right)) {
      apply_mask(s, tScS_rc, bc, seq.seqlen_k, p.window_left, p.window_right);
    }
  };
  // P of the block whose P V GEMM is next, as the register A operand; it stays untouched until
  // that GEMM has completed. With dropout, P's dropped entries are zeroed after the softmax took
  // the row sums (common/fwd_dropout.h: the normaliser is the undropped one), and O is scaled by
  // 1 / (1 - p) at the end. The mask is drawn there, not while the S GEMM runs: its cost is the
  // integer work, which the other consumer warpgroup's GEMMs overlap either way, and drawn where
  // it is used it needs no flags kept across the softmax (one select per element instead of a bit
  // set, a bit test and a sign change).
  [[maybe_unused]] const DropoutIf<kHasDropout> dropout(p);
  Tensor rP = make_fragment_like<Element>(acc_s);
  Tensor tOrP = make_tensor(rP.data(), gmma_acc_to_a_operand_layout(rP.layout()));
  auto p_from_s = [&]([[maybe_unused]] int n_block) {
    if constexpr (kHasDropout) {
      dropout.template drop_gmma</*kTransposed=*/false, /*kEncode=*/false>(s, tScS_rc, m0, n_block * kBlockN,
                                                                          dropout.stream(bidb, bidh, p.h));
    }
    Tensor converted = convert_fragment<Element>(acc_s);
    CUTE_UNROLL
    for (int i = 0; i < size(rP); ++i) rP(i) = converted(i);
  };

  cutlass::arch::ClusterTransactionBarrier::wait(&shared.q_full[q_stage], Traits::q_parity(q_loads));
  int n_block = blocks.max - 1;
  pipeline_k.consumer_wait(read_k);
  turns.take();
  warpgroup_gemm</*kZeroInit=*/true>(mma_qk, tSrQ, tSrK(_, _, _, read_k.index()), acc_s);
  turns.pass();
  {
    warpgroup_wait<0>();
    pipeline_k.consumer_release(read_k);
    ++read_k;
    score_block(n_block);
    softmax.update(s, gmma_rowcol_view(acc_o), p.scale_softmax_log2, /*is_first=*/true);
    p_from_s(n_block);
  }

  // Keys past seqlen_k in the last visited key block arrive with whatever the tensor holds there:
  // the next packed sequence, unused cache slots past seqused_k, rows past cu_seqlens_k[-1]. Their
  // probabilities are 0, but 0 x NaN is NaN in the P V GEMM, so the consumers zero those V rows
  // in shared memory before its first read: this block's V is the first the P V GEMM takes. It is
  // done here, outside the main loop, because inside it (at the P V GEMM's wait) ptxas keeps the
  // count and the zeroing's addresses live through the loop, which spills at head dim 256. The
  // waits on this stage in the loop below then pass at once (it is not released before its GEMM).
  if (const int valid_keys = seq.seqlen_k - (blocks.max - 1) * kBlockN; valid_keys < kBlockN) {
    pipeline_v.consumer_wait(read_v);
    Tensor sV = sVt(_, _, read_v.index());  // (head dim, keys)
    // 16 bytes at a time: 8 consecutive head-dim elements of a key stay contiguous under the 128-
    // and 64-byte swizzles. The thread index is opaque here, as the epilogue's below, so that
    // ptxas does not hoist this loop's per-thread addresses out of the tile loop (they spill).
    constexpr int kVecsPerKey = kHeadDim * int(sizeof(Element)) / 16;
    int zero_tidx = consumer_tidx;
    asm volatile("" : "+r"(zero_tidx));
#pragma unroll 1
    for (int i = zero_tidx; i < (kBlockN - valid_keys) * kVecsPerKey; i += Traits::kNConsumerThreads) {
      *reinterpret_cast<uint4*>(&sV((i % kVecsPerKey) * (16 / int(sizeof(Element))), valid_keys + i / kVecsPerKey)) =
          make_uint4(0, 0, 0, 0);
    }
    // The zeros are generic-proxy writes; wgmma reads (and the next TMA load writes) through the
    // async proxy. This barrier spans both consumer warpgroups, which share the stage; both pass
    // it once per tile or not at all (the condition is the tile's), so its arrivals pair up even
    // when one warpgroup runs a tile ahead. Only V's stage is written: where O is staged in Q's
    // buffer (kOStagedInQ), Q is untouched here, and Q's release still follows the epilogue.
    // It cannot deadlock with the issue turns: the only turn each warpgroup waits for in this tile
    // before it is the first block's, which warpgroup 0 gets from warpgroup 1's last pass of its
    // previous tile (or its start) and warpgroup 1 from warpgroup 0's first-block pass; both
    // passes precede the passer's arrival here, and no turn is awaited between them and it.
    cutlass::arch::fence_view_async_shared();
    cutlass::arch::NamedBarrier::sync(Traits::kNConsumerThreads, kVTailZeroed);
  }

  for (--n_block; n_block >= blocks.min; --n_block) {
    pipeline_k.consumer_wait(read_k);
    Tensor tSrQ_block = q_operand();
    turns.take();
    warpgroup_gemm</*kZeroInit=*/true>(mma_qk, tSrQ_block, tSrK(_, _, _, read_k.index()), acc_s);
    pipeline_v.consumer_wait(read_v);
    warpgroup_gemm</*kZeroInit=*/false>(mma_pv, tOrP, tOrVt(_, _, _, read_v.index()), acc_o);
    turns.pass();
    warpgroup_wait<1>();  // the S GEMM, issued first, has completed
    pipeline_k.consumer_release(read_k);
    ++read_k;
    score_block(n_block);
    float o_correction[kRows];
    // The lagging max pays at head dim 256 without dropout, where the skipped correction is 128
    // multiplies per thread: +2-4% from 1k keys on an H100 (2026-12-06); at 64 and 128 the
    // forward ran 2-4% slower with it, at 192 0-3% (benchmarks/NOTES.md, item 98).
    constexpr bool kKeepMaxWithinLag = kHeadDim == 256 && !kHasDropout;
    const bool o_corrected =
        softmax.template update_deferred<kKeepMaxWithinLag>(s, p.scale_softmax_log2, o_correction);
    warpgroup_wait<0>();
    pipeline_v.consumer_release(read_v);
    ++read_v;
    if (o_corrected) softmax.rescale_output(gmma_rowcol_view(acc_o), o_correction);
    p_from_s(n_block);
  }
  // The last P V GEMM takes no turn: it has no softmax of this warpgroup to hide, and the other
  // warpgroup's tile end or next tile's first S GEMM is all it could delay.
  // Every S GEMM of this tile has completed in this thread: Q's buffer may take the next tile
  // (unless O is staged there: then after the epilogue, below; split partials are not staged).
  constexpr bool kOStagedInQ = Traits::kOStagedInQ && !kIsSplit;
  if constexpr (!kOStagedInQ) cutlass::arch::ClusterBarrier::arrive(&shared.q_empty[q_stage]);
  pipeline_v.consumer_wait(read_v);
  warpgroup_gemm</*kZeroInit=*/false>(mma_pv, tOrP, tOrVt(_, _, _, read_v.index()), acc_o);
  warpgroup_wait<0>();
  pipeline_v.consumer_release(read_v);
  ++read_v;

  scale_dropout_output<kHasDropout>(p, acc_o);
  float lse[kRows];
  // A split's rows without a visible key: lse -inf, which the combine kernel weighs 0.
  softmax.finalize(gmma_rowcol_view(acc_o), p.scale_softmax, kIsSplit ? -INFINITY : INFINITY, lse);

  // The epilogue's shared- and global-memory addresses depend only on the thread index, so ptxas
  // hoists them out of the tile loop and keeps them live through the main loop; where the traits
  // say there is no room for them (kEpilogueAddressesPerTile), or the score modifiers take it,
  // the index they derive from is opaque to the compiler, so they are computed per tile.
  auto epilogue_thread_index = [&]() {
    int tidx = consumer_tidx;
    if constexpr (Traits::kEpilogueAddressesPerTile || kHasScoreMods) asm volatile("" : "+r"(tidx));
    return tidx;
  };
  if constexpr (kIsSplit) {
    Tensor tOcO = mma_pv.get_thread_slice(epilogue_thread_index())
                      .partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
    write_acc_split_partial<kHeadDim>(p, seq, OutputTile{bidb, bidh, tile.split, m0, rows_in_tile}, acc_o, lse,
                                      tOcO, gmma_rowcol_view(tOcO));
    return;
  }
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

  const int epilogue_tidx = epilogue_thread_index();

  // O into this warpgroup's rows of the O tile (stmatrix), then out by TMA store or by 16-byte
  // coalesced global stores. The warpgroup's staging barrier: the first sync keeps the previous
  // tile's stores from reading rows this tile overwrites (a TMA store's reads have completed in its
  // issuing thread, which waits for them first), and (kOStagedInQ) keeps this warpgroup's rows of
  // Q from being overwritten before all its 128 threads have waited for their last GEMM; the
  // second publishes the rows to the warpgroup, or to the TMA unit after the proxy fence.
  // A packed sequence's partial warpgroup of rows takes the stores: its box would overwrite the
  // next sequence's rows, which are inside the packed tensor's extent.
  const int lane_in_warpgroup = epilogue_tidx % 128;
  const bool o_by_tma =
      Traits::kOStoredByTma && (!p.cu_seqlens_q || rows_in_tile >= (warpgroup + 1) * 64);
  if constexpr (Traits::kOStoredByTma) {
    if (lane_in_warpgroup == 0) tma_store_wait<0>();
  }
  Tensor rO = convert_fragment<Element>(acc_o);
  Tensor sO = make_tensor(make_smem_ptr(Traits::o_tile(shared)), typename Traits::SmemLayoutO{});
  auto o_copy = make_tiled_copy_C(typename Traits::SmemCopyAtomO{}, mma_pv);
  auto thr_o_copy = o_copy.get_thread_slice(epilogue_tidx);
  cutlass::arch::NamedBarrier::sync(128, kOutputStagingWarpgroup0 + warpgroup);
  copy(o_copy, thr_o_copy.retile_S(rO), thr_o_copy.partition_D(sO));
  if (o_by_tma) cutlass::arch::fence_view_async_shared();
  cutlass::arch::NamedBarrier::sync(128, kOutputStagingWarpgroup0 + warpgroup);
  if constexpr (Traits::kOStoredByTma) {
    if (o_by_tma) {
      if (lane_in_warpgroup == 0) {
        constexpr int kAtomCols = Traits::kAtomCols;
        Tensor mO = domain_offset(make_coord(seq.q_start, _0{}),
                                  tma_o.get_tma_tensor(q_extent(p))(_, _, bidh, p.cu_seqlens_q ? 0 : bidb));
        Tensor gO = local_tile(mO, Shape<_64, Int<kAtomCols>>{}, make_coord(m0 / 64 + warpgroup, _));
        auto o_tma = tma_o.get_slice(_0{});
        CUTE_UNROLL
        for (int c = 0; c < kHeadDim / kAtomCols; ++c) {
          Tensor sBox = make_tensor(make_smem_ptr(Traits::o_tile(shared) + (c * kBlockM + warpgroup * 64) * kAtomCols),
                                    typename Traits::SmemLayoutOBox{});
          copy(tma_o, o_tma.partition_S(sBox), o_tma.partition_D(gO(_, _, c)));
        }
        tma_store_arrive();
      }
      return;
    }
  }

  constexpr int kVecElems = 16 / sizeof(Element);
  constexpr int kVecsPerRow = kHeadDim / kVecElems;
  Element* o = static_cast<Element*>(p.o_ptr) + seq.o_offset + bidh * p.o_head_stride;
  // The O tile read by ld.shared (sm90/shared_window.h: through its generic pointer nvcc emitted
  // generic 16-byte loads with the swizzle computed on 64-bit addresses).
  Tensor sO_window =
      make_tensor(make_smem_ptr(in_shared_window(Traits::o_tile(shared))), typename Traits::SmemLayoutO{});
  CUTE_UNROLL
  for (int i = lane_in_warpgroup; i < 64 * kVecsPerRow; i += 128) {
    const int row = warpgroup * 64 + i / kVecsPerRow;
    const int col = (i % kVecsPerRow) * kVecElems;
    if (row < rows_in_tile && col < p.d) {
      // 8 consecutive elements stay contiguous under the 128- and 64-byte swizzles (they permute
      // 16-byte units).
      *reinterpret_cast<uint4*>(o + int64_t(m0 + row) * p.o_row_stride + col) =
          load_shared_16_bytes(window_address(&sO_window(row, col)));
    }
  }
  if constexpr (kOStagedInQ) {
    // This thread's reads of the O tile have completed (their values are in its global stores), so
    // Q's buffer may take the next tile. The proxy fence orders these generic-proxy reads before
    // the TMA (async-proxy) write of the next Q that the producer issues once all have arrived.
    cutlass::arch::fence_view_async_shared();
    cutlass::arch::ClusterBarrier::arrive(&shared.q_empty[q_stage]);
  }
}

template <typename Traits, bool kIsSplit, bool kHasScoreMods, bool kPaged, bool kHasDropout = false>
__global__ void __launch_bounds__(Traits::kNThreads, 1)
    flash_fwd_sm90_kernel(const __grid_constant__ Sm90FwdArgs<Traits> args) {
  static_assert(!(kHasDropout && (kIsSplit || kHasScoreMods || kPaged)), "dropout is a variant of the plain kernel");
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  // Let the combine kernel (a programmatic dependent launch) start launching now; it waits for
  // this grid's completion before reading anything.
  if constexpr (kIsSplit) asm volatile("griddepcontrol.launch_dependents;");
  using SharedStorage = typename Traits::SharedStorage;
  using Pipeline = typename Traits::Pipeline;
  const FwdParams& params = args.params;

  extern __shared__ __align__(1024) char smem_buf[];
  SharedStorage& shared = *reinterpret_cast<SharedStorage*>(smem_buf);

  const int m_blocks = (params.seqlen_q + Traits::kBlockM - 1) / Traits::kBlockM;
  const int warpgroup = threadIdx.x / 128;
  if constexpr (kHasDropout) record_rng_state(params);
  typename Pipeline::Params pipeline_params;
  pipeline_params.transaction_bytes = Traits::kKVTileBytes;
  pipeline_params.role =
      warpgroup == 0 ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
  pipeline_params.is_leader = threadIdx.x == 0;
  pipeline_params.num_consumers = Traits::kNConsumerThreads;
  Pipeline pipeline_k(shared.pipeline_k, pipeline_params, Shape<_1, _1, _1>{});
  Pipeline pipeline_v(shared.pipeline_v, pipeline_params, Shape<_1, _1, _1>{});
  if (threadIdx.x == 0) {
    CUTE_UNROLL
    for (int i = 0; i < Traits::kQStages; ++i) {
      cutlass::arch::ClusterTransactionBarrier::init(&shared.q_full[i], 1);
      cutlass::arch::ClusterBarrier::init(&shared.q_empty[i], Traits::kNConsumerThreads);
    }
  }
  cutlass::arch::fence_barrier_init();
  __syncthreads();  // barriers initialised before anyone arrives or waits on them

  if (warpgroup == 0) {
    cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegisters>();
    // The pipeline's leader thread (is_leader above) is the only one that loads.
    if (threadIdx.x == 0) produce_tiles<Traits, kIsSplit, kPaged>(args, shared, pipeline_k, pipeline_v, m_blocks);
  } else {
    cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegisters>();
    typename Traits::PipelineState read_k, read_v;
    const GemmIssueTurns<Traits::kGemmIssueTurns> turns{warpgroup - 1};
    turns.start();
    int q_loads = 0;
    for (Sm90TileScheduler<kIsSplit> tiles(params, m_blocks); tiles.valid(); tiles.next()) {
      const Sm90Tile tile = tiles.tile();
      const Sm90TileWork work = sm90_tile_work<Traits, kIsSplit>(params, tile);
      if (work.rows_in_tile <= 0) continue;  // past the end of a short varlen sequence
      if (work.blocks.empty()) {
        write_empty_tile<Traits, kIsSplit, /*kFirstThread=*/128, Traits::kNConsumerThreads>(
            params, work.seq, tile.bidb, tile.bidh, tile.split, tile.m_block, work.rows_in_tile);
        continue;
      }
      attend_rows<Traits, kIsSplit, kHasScoreMods, kHasDropout>(params, args.tma_o, shared, pipeline_k, pipeline_v,
                                                                read_k, read_v, tile, work, q_loads, turns);
      ++q_loads;
    }
    turns.finish();
    // The last TMA stores of O read the O tile until they complete: the block's shared memory
    // stays allocated until then.
    if constexpr (Traits::kOStoredByTma) {
      if (threadIdx.x % 128 == 0) tma_store_wait<0>();
    }
  }
#endif
}

}  // namespace flash
