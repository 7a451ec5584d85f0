// The Hopper forward's named barriers and the ping-pong issue order of its two consumer
// warpgroups built on them.
#pragma once

#include <cutlass/arch/barrier.h>

namespace flash {

// Every named barrier of sm90/fwd_kernel.h, one id each. These are cutlass::arch::NamedBarrier's
// user ids: it adds ReservedNamedBarrierCount (8; hardware barrier 0 is __syncthreads', 1-7 are
// CUTLASS's own), so user ids 0-7 map to hardware barriers 8-15.
enum Sm90FwdNamedBarrier : int {
  // + consumer warpgroup (128 threads): the epilogue's O staging in shared memory.
  kOutputStagingWarpgroup0 = 1,  // to 3
  // Every consumer warpgroup: the zeroed V-tail rows of a tile are written.
  kVTailZeroed = 4,
  // + consumer warpgroup (256 threads: its 128 wait, the other's 128 arrive): it may issue.
  kIssueTurnWarpgroup0 = 5,  // and 6
};
static_assert(kIssueTurnWarpgroup0 + 1 + cutlass::arch::NamedBarrier::ReservedNamedBarrierCount <
              cutlass::arch::NamedBarrier::HardwareMaxNumNamedBarriers);

// Ping-pong: the two consumer warpgroups issue their GEMMs of a key block in turns, so that one
// warpgroup's softmax runs while the tensor cores work on the other's S = Q K^T and O += P V.
// Warpgroup 0 issues block n, passes the turn, and scores block n while warpgroup 1 issues block
// n; warpgroup 1 then passes the turn back and scores while warpgroup 0 issues block n - 1.
// Warpgroup 1 starts half an iteration behind: before any tile it hands warpgroup 0 the first turn.
//
// Pairing: the barrier of warpgroup w completes with w's 128 waiting threads and the other's 128
// arriving ones. A warpgroup passes (arrives) only after taking its own turn, which needs the
// other's previous pass, so the two strictly alternate and no barrier ever sees a second arrival
// before its wait has completed. Both warpgroups take one turn per key block of a tile, and the
// tile and its key-block count are the same for both (they share it), so the turns stay paired
// across tiles; a tile without key blocks (past a varlen sequence, write_empty_tile, a split with
// no share) takes no turn in either. At the end warpgroup 0 takes the turn handed over last, so
// that no arrival is left pending when the block exits.
//
// kEnabled false (Sm90FwdTraits::kGemmIssueTurns: head dims where the turns cost more than they
// hide) makes every member a no-op: each warpgroup issues as soon as its operands are ready.
template <bool kEnabled>
struct GemmIssueTurns {
  int warpgroup;  // consumer warpgroup, 0 or 1

  // Before the first tile.
  __device__ __forceinline__ void start() const {
    if (kEnabled && warpgroup == 1) cutlass::arch::NamedBarrier::arrive(256, kIssueTurnWarpgroup0);
  }
  // Before issuing the GEMMs of a key block.
  __device__ __forceinline__ void take() const {
    if (kEnabled) cutlass::arch::NamedBarrier::sync(256, kIssueTurnWarpgroup0 + warpgroup);
  }
  // Once they are issued (wgmma issue order, not completion: the other warpgroup's GEMMs queue
  // behind these on the tensor cores).
  __device__ __forceinline__ void pass() const {
    if (kEnabled) cutlass::arch::NamedBarrier::arrive(256, kIssueTurnWarpgroup0 + (1 - warpgroup));
  }
  // After the last tile: warpgroup 0 consumes the last pass (or, without any tile, the first).
  __device__ __forceinline__ void finish() const {
    if (kEnabled && warpgroup == 0) take();
  }
};

}  // namespace flash
