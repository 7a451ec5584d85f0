// Deterministic mode of the Hopper backward (Sm90BwdTraits::kDeterministic): the fixed order in
// which the key blocks add their dQ parts into the fp32 accumulator.
//
// Every key block that sees query block m (kBlockM rows) of query head h in batch entry b adds a
// kBlockM x d part into the same accumulator rows. fp32 addition is not associative, so with free
// atomics the arrival order shows in the last bits of dQ. Here the key blocks take turns: one int
// per (b, h, m) counts the key blocks that have added into those rows, and a key block adds when
// the count reaches its place in a fixed order. Within a turn each element gets one addition, so
// the float2 atomics stay (no read-modify-write round trip).
//
// The order. The key blocks that see query block m are the contiguous range [lo, hi) that
// visible_key_blocks (common/block_info.h) gives for its rows: exactly the key blocks whose walk
// (sm90_bwd_work) includes m, under any causal or window mask. They add in descending key-block
// order, block n after the hi - 1 - n blocks above it. Under a causal or window mask key block n
// starts at the query blocks of its diagonal, so the higher key blocks of a head reach a query
// block first; ascending turns would hold every key block to the pace of block 0, the one that
// walks the most query blocks (in a schedule simulation of the causal benchmark grid, 1.6-2.0x
// the unordered kernel's time, against 1.00-1.07x descending). Without a right window edge every
// key block walks the same query blocks in lockstep, and either order costs the same.
//
// The rotated walk (BwdParams::dq_walk_rotated). Without any mask that bounds rows, that lockstep
// is the cost: all N key blocks of a group reach query block m at the same step and add one after
// the other, so key block k lags k turns and the group ends N turns late (783f623, H200:
// deterministic / default time 1.22-1.34 at non-causal 512-2k keys at head dims 192 and 256). Where
// a sequence has N <= M (its query blocks), key block n walks the M query blocks from block n on,
// wrapping around, so it reaches block m at step (m - n) mod M: at each step the group's key
// blocks add into different query blocks. The adds into block m go in the order of those steps;
// each then waits for an add a step earlier, which is done. With more key blocks than query
// blocks (cross-attention to longer keys) the lockstep stays.
//
// No deadlock. Thread block x owns key block gridDim.x - 1 - x (bwd_key_block), so a block waits
// only for blocks of its own (batch, kv head) with a lower x, i.e. a lower linear block index. This
// assumes that the hardware starts the thread blocks of a grid in increasing linear index (x
// fastest), which CUDA does not promise but its GPUs do: then every block with a lower index has
// started and is finished or resident, the lowest unfinished block waits for nobody, finishes and
// frees its SM, and so on. Within a block nothing waits in a circle: with atomics, the thread that
// passes the turns passes a step's turn on once the consumers released that step, waiting for
// nothing else; with the dQ writer, the writer waits for the turn (earlier blocks only) and for the
// step's tiles, which the consumers store after waiting only for the previous step's tiles to be
// handed back, which the writer did before it waited again. The grid is one thread block per key
// block, not persistent; a persistent grid would keep the argument only if each block took tiles in
// increasing linear order and finished one before taking the next. GQA: a block walks the query
// heads of its group one after the other; each (b, h, m) has its own count, and every key block
// waiting on it belongs to the same kv head, so to the same run of linear indices. The rotated walk
// breaks that argument: a key block waits for key blocks that reach block m at earlier steps, lower
// ones (higher linear indices, started later) among them. There every block of the group must be
// resident at once: the dispatcher rotates only groups of at most half the SMs (plan/heuristics.h,
// sm90_bwd_rotated_dq_walk). The blocks of earlier groups wait only within their groups, so they
// finish and free their SMs, and in increasing launch order a group's last blocks then start.
//
// Who does what. Keys split (head dims 64, 96, 128; !Traits::kSplitHeadDim), the dQ writer warp:
// warp kRowStatWarps + 1 of the producer warpgroup. Per step it waits for the turn (lane 0,
// acquire; overlapped with the consumers' step), then for each consumer warpgroup's fp32 dQ tile
// (named barrier "dQ tile full", sm90/bwd_kernel.h), issues the tiles' TMA reduce-adds, waits
// until they have completed (cp.async.bulk.wait_group 0: written, not only read) and passes the
// turn (release at GPU scope, after a proxy fence: the reduce-adds are async-proxy writes); then
// it hands the tiles back ("dQ tile empty"). The consumers neither wait for turns nor for L2:
// they store their tile, arrive, and wait only for the previous step's tile to be empty, a step
// later. A turn is held from the acquire to the pass, about one L2 round trip of the reduce-adds.
//
// Head dim split (192, 256; float2 atomics in the deterministic variants): after issuing a step's
// dQ, dV^T and dK^T GEMMs each consumer thread reads the count (acquire) until its turn, overlapped
// with the GEMMs, adds its part with atomics and then releases the step's Q/dO stage (mbarrier
// arrive: release at block scope, so the adds happen before it). The stage's empty barrier counts
// one arrival per consumer thread (a one-block cluster, so every thread signals), so it completes
// only after all of the step's adds. Lane 0 of the warp after the row-stat warps waits for that
// completion and raises the count (release at GPU scope, cumulative: the consumers' adds are
// performed before the new count is seen). The TMA thread and the row-stat warps keep their pace.
#pragma once

#include <cstdint>

#include "params/bwd_params.h"
#include "common/block_info.h"
#include "common/seq_info.h"

namespace flash {

// The key block that thread block x owns: the last one first in deterministic mode (see above);
// the default order starts with key block 0, the one most query blocks see under a causal mask.
template <bool kDeterministic>
__device__ __forceinline__ int bwd_key_block() {
  return kDeterministic ? int(gridDim.x - 1 - blockIdx.x) : int(blockIdx.x);
}

// The count of query block m_block of query head bidh in batch entry bidb.
template <int kBlockM>
__device__ __forceinline__ int* dq_add_count(const BwdParams& p, int bidb, int bidh, int m_block) {
  const int q_blocks = (p.seqlen_q + kBlockM - 1) / kBlockM;
  return p.dq_add_count_ptr + (int64_t(bidb) * p.h + bidh) * q_blocks + m_block;
}

// Whether a sequence's key blocks walk rotated: where the dispatcher allows it and the sequence
// has no more key blocks than query blocks (each key block then starts at a query block of its
// own).
template <int kBlockM, int kBlockN>
__device__ __forceinline__ bool dq_walk_rotated(const BwdParams& p, const SeqInfo& seq) {
  return p.dq_walk_rotated && ceil_div_dev(seq.seqlen_k, kBlockN) <= ceil_div_dev(seq.seqlen_q, kBlockM);
}

// Rotated walk: how many of the sequence's k_blocks key blocks add into query block m_block before
// key block n_block. Key block n starts at query block n and reaches m_block at step
// (m_block - n) mod M; the ones that reach it earlier are n + 1, ..., m_block, cyclically (mod M),
// those below k_blocks.
__host__ __device__ __forceinline__ int dq_adds_before_rotated(int m_block, int k_blocks, int n_block) {
  return n_block <= m_block ? (m_block < k_blocks - 1 ? m_block : k_blocks - 1) - n_block
                            : k_blocks - n_block + m_block;
}

// How many key blocks add into query rows [m0, m0 + rows_in_tile) before key block n_block.
// kBlockM-row query blocks; `rotated`: the sequence's walk (dq_walk_rotated).
template <int kBlockM, int kBlockN>
__device__ __forceinline__ int dq_adds_before(const BwdParams& p, const SeqInfo& seq, int m0, int rows_in_tile,
                                              int n_block, bool rotated) {
  if (rotated) return dq_adds_before_rotated(m0 / kBlockM, ceil_div_dev(seq.seqlen_k, kBlockN), n_block);
  return visible_key_blocks<kBlockN>(p, seq, m0, rows_in_tile).max - 1 - n_block;
}

// Returns once `adds_before` key blocks have added into the count's rows. The acquire load orders
// this thread's later adds after theirs; the proxy fence extends that to the TMA reduce-adds the
// dQ writer issues next (async proxy).
__device__ __forceinline__ void wait_for_dq_turn(const int* count, int adds_before) {
  if (adds_before == 0) return;
  int done;
  do {
    asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(done) : "l"(count) : "memory");
  } while (done < adds_before);
  asm volatile("fence.proxy.async.global;" : : : "memory");
}

// One thread of the block, once the step's adds into the count's rows are performed: the next key
// block's turn.
__device__ __forceinline__ void pass_dq_turn(int* count) {
  asm volatile("red.release.gpu.global.add.s32 [%0], 1;" : : "l"(count) : "memory");
}

// The dQ writer, after issuing (and committing) the step's TMA reduce-adds: waits until they have
// completed, their writes included (not .read, which only frees the shared-memory source), orders
// them before the generic-proxy release, and passes the turn.
__device__ __forceinline__ void pass_dq_turn_after_bulk_reduces(int* count) {
  asm volatile("cp.async.bulk.wait_group 0;" : : : "memory");
  asm volatile("fence.proxy.async.global;" : : : "memory");
  pass_dq_turn(count);
}

}  // namespace flash
