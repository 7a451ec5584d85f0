// FlashAttention-2 forward: one thread block owns kBlockM query rows of one (batch, head) and
// walks key blocks from last to first with an online softmax. The Q tile stays in shared memory;
// K and V tiles stream in with cp.async, V's load overlapping S = Q K^T and the next K's load
// overlapping the softmax and O += P V.
//
// kIsSplit: the block covers only its split's share of the key blocks and writes an fp32 partial
// output and partial log-sum-exp, merged later by the combine kernel (split-KV decoding).
//
// kHasDropout (unsplit kernel only): P is dropped (common/dropout.h) after the row sums took it
// whole, so the log-sum-exp and the normaliser are those of the un-dropped softmax, as upstream;
// the output is scaled by 1 / (1 - p) once, at the end. A separate instantiation, so the kernels
// without dropout carry none of its code.
#pragma once

#include <cute/tensor.hpp>

#include "params/fwd_params.h"
#include "common/block_info.h"
#include "common/dropout.h"
#include "common/epilogue.h"
#include "common/gmem_copy.h"
#include "common/kernel_traits.h"
#include "common/mma_utils.h"
#include "common/score_mods.h"
#include "common/seq_info.h"
#include "common/softmax.h"

namespace flash {

using namespace cute;

// return_softmax: this block's P (dropped entries negated) into S_dmask, for the rows and keys
// inside the sequence. acc: the accumulator fragment of P, coord: its (row, key) in the tile.
template <typename Element, typename Frag, typename Coord>
__device__ __forceinline__ void write_s_dmask(const FwdParams& p, Frag const& acc, Coord const& coord, int bidb,
                                              int bidh, int row0, int col0, int rows, int seqlen_k) {
  Element* out = static_cast<Element*>(p.s_dmask_ptr) + bidb * p.s_dmask_batch_stride + bidh * p.s_dmask_head_stride;
  CUTE_UNROLL
  for (int i = 0; i < size(acc); ++i) {
    const int row = get<0>(coord(i)), col = col0 + get<1>(coord(i));
    if (row < rows && col < seqlen_k) out[int64_t(row0 + row) * p.s_dmask_row_stride + col] = Element(acc(i));
  }
}

template <typename Traits, bool kIsSplit, bool kHasExtras, bool kHasDropout = false>
__global__ void __launch_bounds__(Traits::kNThreads) flash_fwd_kernel(const __grid_constant__ FwdParams params) {
  static_assert(!(kIsSplit && kHasDropout), "dropout runs the unsplit kernel only");
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;

  extern __shared__ __align__(128) char smem_buf[];
  const int tidx = threadIdx.x;
  // Later query tiles first: under a causal mask they see the most keys, so the longest blocks
  // start in the first wave.
  const int m_block = gridDim.x - 1 - blockIdx.x;
  const int split_idx = kIsSplit ? blockIdx.y : 0;
  const int bidb = kIsSplit ? blockIdx.z / params.h : blockIdx.y;
  const int bidh = kIsSplit ? blockIdx.z % params.h : blockIdx.z;

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // Let the combine kernel (a programmatic dependent launch) start launching now; it waits for
  // this grid's completion before reading anything.
  if constexpr (kIsSplit) asm volatile("griddepcontrol.launch_dependents;");
#endif
  [[maybe_unused]] const DropoutIf<kHasDropout> dropout(params);
  if constexpr (kHasDropout) {
    // The (seed, offset) this call drew with, for the backward: written on the device, so a
    // CUDA-graph replay records its own.
    if (params.rng_state_ptr != nullptr && blockIdx.x == 0 && blockIdx.y == 0 && blockIdx.z == 0 && tidx == 0) {
      const PhiloxSeedOffset so = philox_seed_offset(params);
      params.rng_state_ptr[0] = int64_t(so.seed);
      params.rng_state_ptr[1] = int64_t(so.offset);
    }
  }
  const SeqInfo seq(params, bidb);
  const int m0 = m_block * kBlockM;
  if (m0 >= seq.seqlen_q) return;
  const int rows_in_tile = min(kBlockM, seq.seqlen_q - m0);
  const int diag = seq.seqlen_k - seq.seqlen_q;

  // Key blocks this thread block visits: its split's share, cut by the causal/window band.
  const int n_blocks_total = ceil_div_dev(seq.seqlen_k, kBlockN);
  int n_block_min = 0;
  int n_block_max = n_blocks_total;
  if constexpr (kIsSplit) {
    const int per_split = ceil_div_dev(n_blocks_total, params.num_splits);
    n_block_min = split_idx * per_split;
    n_block_max = min(n_block_max, n_block_min + per_split);
  }
  if (params.window_right >= 0) {
    n_block_max = min(n_block_max, ceil_div_dev(m0 + rows_in_tile + diag + params.window_right, kBlockN));
  }
  if (params.window_left >= 0) {
    n_block_min = max(n_block_min, (m0 + diag - params.window_left) / kBlockN);
  }
  if (n_block_max <= n_block_min) {
    write_empty_tile<Traits, kIsSplit>(params, seq, bidb, bidh, split_idx, m_block, rows_in_tile);
    return;
  }

  // Shared memory: Q | K | V.
  Tensor sQ = make_tensor(make_smem_ptr(reinterpret_cast<Element*>(smem_buf)), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(sQ.data() + size(sQ), typename Traits::SmemLayoutKV{});
  Tensor sV = make_tensor(sK.data() + size(sK), typename Traits::SmemLayoutKV{});
  Tensor sVt = make_tensor(sV.data(), typename Traits::SmemLayoutVt{});
  Tensor sVtNoSwizzle = make_tensor(sV.data(), typename Traits::SmemLayoutVtNoSwizzle{});

  // Global <-> shared copies: per-thread base pointers, then one stride multiply per row.
  const GmemTileCopy<Traits> gcopy(tidx, params.d);
  Tensor tQsQ = gcopy.partition(sQ, tidx);
  Tensor tKsK = gcopy.partition(sK, tidx);
  Tensor tVsV = gcopy.partition(sV, tidx);
  const Element* q_base = static_cast<const Element*>(params.q_ptr) + seq.q_offset + bidh * params.q_head_stride;
  const int kv_head = bidh / params.h_h_k_ratio;
  const Element* k_head = static_cast<const Element*>(params.k_ptr) + kv_head * params.k_head_stride + gcopy.col0;
  const Element* v_head = static_cast<const Element*>(params.v_ptr) + kv_head * params.v_head_stride + gcopy.col0;
  const Element* k_thread = k_head + seq.k_offset + int64_t(seq.k_row0 + gcopy.r0) * params.k_row_stride;
  const Element* v_thread = v_head + seq.v_offset + int64_t(seq.k_row0 + gcopy.r0) * params.v_row_stride;
  const int* block_table = params.block_table != nullptr ? params.block_table + bidb * params.block_table_batch_stride
                                                         : nullptr;
  auto load_kv = [&](auto& tS, const Element* head, const Element* thread, int64_t row_stride, int64_t page_stride,
                     int n_block) {
    const int j0 = n_block * kBlockN;
    if (kHasExtras && block_table != nullptr) {
      gcopy.load_paged(tS, head, seq.k_row0 + j0, seq.seqlen_k - j0, block_table, params.page_block_size,
                       params.num_pages, params.index_errors, page_stride, row_stride);
    } else {
      gcopy.load_strided(tS, thread + int64_t(j0) * row_stride, row_stride, seq.seqlen_k - j0, head);
    }
  };
  auto load_k = [&](int n_block) {
    load_kv(tKsK, k_head, k_thread, params.k_row_stride, params.k_batch_stride, n_block);
  };
  auto load_v = [&](int n_block) {
    load_kv(tVsV, v_head, v_thread, params.v_row_stride, params.v_batch_stride, n_block);
  };

  typename Traits::TiledMma tiled_mma;
  auto thr_mma = tiled_mma.get_thread_slice(tidx);
  Tensor tSrQ = thr_mma.partition_fragment_A(sQ);
  Tensor tSrK = thr_mma.partition_fragment_B(sK);
  Tensor tOrVt = thr_mma.partition_fragment_B(sVtNoSwizzle);
  Tensor acc_o = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kHeadDim>>{});

  auto smem_copy_q = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto smem_thr_copy_q = smem_copy_q.get_thread_slice(tidx);
  Tensor tSsQ = smem_thr_copy_q.partition_S(sQ);
  auto smem_copy_k = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto smem_thr_copy_k = smem_copy_k.get_thread_slice(tidx);
  Tensor tSsK = smem_thr_copy_k.partition_S(sK);
  auto smem_copy_v = make_tiled_copy_B(typename Traits::SmemCopyAtomTransposed{}, tiled_mma);
  auto smem_thr_copy_v = smem_copy_v.get_thread_slice(tidx);
  Tensor tOsVt = smem_thr_copy_v.partition_S(sVt);

  // (row, col) of every score and output element this thread holds.
  Tensor tScS = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  Tensor tScS_rc = rowcol_view(tScS);
  Tensor tOcO = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  Tensor tOcO_rc = rowcol_view(tOcO);

  const bool has_softcap = kHasExtras && params.softcap_in > 0.f;
  const bool has_alibi = kHasExtras && params.alibi_slopes_ptr != nullptr;
  const float alibi_slope =
      has_alibi ? params.alibi_slopes_ptr[bidb * params.alibi_slopes_batch_stride + bidh] / params.scale_softmax : 0.f;

  int n_block = n_block_max - 1;
  gcopy.load_strided(tQsQ, q_base + int64_t(m0 + gcopy.r0) * params.q_row_stride + gcopy.col0, params.q_row_stride,
                     rows_in_tile, q_base);
  cp_async_fence();
  load_k(n_block);
  cp_async_fence();
  clear(acc_o);

  constexpr int kRows = decltype(size<0>(rowcol_view(acc_o)))::value;
  OnlineSoftmax<kRows> softmax;

  for (bool first = true; n_block >= n_block_min; --n_block, first = false) {
    Tensor acc_s = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc_s);
    cp_async_wait<0>();
    __syncthreads();  // K[n_block] landed; every warp is done reading the previous V
    load_v(n_block);
    cp_async_fence();

    gemm_ss(acc_s, tSrQ, tSrK, tSsQ, tSsK, tiled_mma, smem_copy_q, smem_copy_k, smem_thr_copy_q, smem_thr_copy_k);

    Tensor s = rowcol_view(acc_s);
    const BlockCoords bc{m0, n_block * kBlockN, diag};
    if constexpr (kHasExtras) {
      if (has_softcap) apply_softcap(acc_s, params.softcap_in);
      if (has_alibi) apply_alibi(s, tScS_rc, bc, alibi_slope);
    }
    if (block_needs_mask(bc, kBlockN, rows_in_tile, seq.seqlen_k, params.window_left, params.window_right)) {
      apply_mask(s, tScS_rc, bc, seq.seqlen_k, params.window_left, params.window_right);
    }

    cp_async_wait<0>();
    __syncthreads();  // V[n_block] landed; every warp is done reading K
    if (n_block > n_block_min) {
      load_k(n_block - 1);
      cp_async_fence();
    }

    softmax.update(s, rowcol_view(acc_o), params.scale_softmax_log2, first);
    if constexpr (kHasDropout) {
      const int col0 = n_block * kBlockN;
      const uint64_t stream = dropout.stream(bidb, bidh, params.h);
      if (params.s_dmask_ptr != nullptr) {
        dropout.template apply<true>(acc_s, tScS, m0, col0, stream);
        write_s_dmask<Element>(params, acc_s, tScS, bidb, bidh, m0, col0, rows_in_tile, seq.seqlen_k);
        CUTE_UNROLL
        for (int i = 0; i < size(acc_s); ++i) acc_s(i) = signbit(acc_s(i)) ? 0.f : acc_s(i);
      } else {
        dropout.template apply<false>(acc_s, tScS, m0, col0, stream);
      }
    }

    Tensor rP = convert_fragment<Element>(acc_s);
    Tensor tOrP = make_tensor(rP.data(), acc_to_a_operand_layout(rP.layout()));
    gemm_rs(acc_o, tOrP, tOrVt, tOsVt, tiled_mma, smem_copy_v, smem_thr_copy_v);
  }

  float lse[kRows];
  softmax.finalize(rowcol_view(acc_o), params.scale_softmax, kIsSplit ? -INFINITY : INFINITY, lse);
  if constexpr (kHasDropout) {
    CUTE_UNROLL
    for (int i = 0; i < size(acc_o); ++i) acc_o(i) *= params.dropout_scale;
  }

  // The quad lane holding column 0 of a row writes that row's lse.
  const bool writes_lse = get<1>(tOcO_rc(0, 0)) == 0;

  if constexpr (kIsSplit) {
    const int64_t head_rows = (int64_t(split_idx) * params.h + bidh) * params.total_q_rows;
    const int r0 = seq.q_row(params, bidb, m0);
    CUTE_UNROLL
    for (int mi = 0; mi < kRows; ++mi) {
      const int row = get<0>(tOcO_rc(mi, 0));
      if (writes_lse && row < rows_in_tile) params.lseaccum_ptr[head_rows + r0 + row] = lse[mi];
    }
    // fp32 partials straight from registers: accumulator elements 2i and 2i+1 are neighbours
    // in a row.
    float* oacc = params.oaccum_ptr + (head_rows + r0) * kHeadDim;
    CUTE_UNROLL
    for (int i = 0; i < size(acc_o); i += 2) {
      const int row = get<0>(tOcO(i));
      const int col = get<1>(tOcO(i));
      if (row < rows_in_tile) {
        *reinterpret_cast<float2*>(oacc + int64_t(row) * kHeadDim + col) = make_float2(acc_o(i), acc_o(i + 1));
      }
    }
  } else {
    float* lse_out = params.softmax_lse_ptr + bidb * params.lse_batch_stride + bidh * params.lse_head_stride;
    CUTE_UNROLL
    for (int mi = 0; mi < kRows; ++mi) {
      const int row = get<0>(tOcO_rc(mi, 0));
      if (writes_lse && row < rows_in_tile) lse_out[int64_t(seq.q_start + m0 + row) * params.lse_row_stride] = lse[mi];
    }
    // Output through shared memory (Q's tile, no longer read) for 16-byte coalesced stores.
    Tensor rO = convert_fragment<Element>(acc_o);
    Tensor sO = make_tensor(sQ.data(), typename Traits::SmemLayoutQ{});
    auto smem_copy_o = make_tiled_copy_C(typename Traits::SmemCopyAtomO{}, tiled_mma);
    auto smem_thr_copy_o = smem_copy_o.get_thread_slice(tidx);
    Tensor taccOrO = smem_thr_copy_o.retile_S(rO);
    Tensor taccOsO = smem_thr_copy_o.partition_D(sO);
    copy(smem_copy_o, taccOrO, taccOsO);
    __syncthreads();
    Element* o_thread = static_cast<Element*>(params.o_ptr) + seq.o_offset + bidh * params.o_head_stride +
                        int64_t(m0 + gcopy.r0) * params.o_row_stride + gcopy.col0;
    Tensor tOsO = gcopy.partition(sO, tidx);
    gcopy.store_strided(tOsO, o_thread, params.o_row_stride, rows_in_tile);
  }
}

}  // namespace flash
