// Decode forward: at most 16 query rows of one (batch, head) -- one query at decode, or the query
// heads of a GQA group after the seqlen/ngroups swap -- against a split's range of keys.
//
// The 16-row tile fills one m16n8k16 MMA row block, so the warps split the keys instead of the
// rows: warp w takes key sub-blocks w, w + kNWarps, ... of kSubN keys each, streams them through
// its own kStages-deep cp.async ring and runs its own online softmax, synchronising only with
// itself (__syncwarp). Q stays in registers. At the end the warps' results are merged in shared
// memory by the log-sum-exp rule and written as this split's fp32 partial, which the combine
// kernel merges across splits (as for the split forward kernel).
#pragma once

#include <cooperative_groups.h>
#include <cute/arch/cluster_sm90.hpp>
#include <cute/tensor.hpp>
#include <cutlass/fast_math.h>

#include "kernels/decode_kernel_traits.h"
#include "kernels/fwd_kernel.h"
#include "params/fwd_params.h"
#include "common/gmem_copy.h"
#include "common/mma_utils.h"
#include "common/score_mods.h"
#include "common/seq_info.h"
#include "common/softmax.h"

namespace flash {

using namespace cute;

// kScoreMods: softcap and ALiBi; kPaged: K/V through a block table. Each gets its own
// instantiation so the common kernel carries none of their code or registers (the paged loop spilled
// heavily while it shared one kernel with the score modifiers). The paged-only kernel requires no
// left padding (the launch sends paged calls with left padding to the score-modifier kernel, which
// pages any alignment).
template <typename Traits, bool kScoreMods, bool kPaged>
__global__ void __launch_bounds__(Traits::kNThreads)
flash_decode_kernel(const __grid_constant__ FwdParams params, const cutlass::FastDivmod page_div) {
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kSubN = Traits::kSubN;
  constexpr int kStages = Traits::kStages;
  constexpr int kNWarps = Traits::kNWarps;
  constexpr int kHeadDim = Traits::kHeadDim;

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");  // the combine kernel may start launching
#endif
  extern __shared__ __align__(128) char smem_buf[];
  const int tidx = threadIdx.x;
  const int warp = tidx / 32;
  const int lane = tidx % 32;
  const int m_block = blockIdx.x;
  const int split_idx = blockIdx.y;
  const int bidb = blockIdx.z / params.h;
  const int bidh = blockIdx.z % params.h;

  // Paged K/V in the paged-only kernel (no left padding: key row j of the sequence is row j of its
  // pages, and every 16-row group of a sub-block lies in one page). Per warp, a shared ring of
  // kPageSlots slots: slot j % kPageSlots holds sub-block j's kGroups page entries, copied
  // (cp.async) from the block table kStages sub-blocks before they are needed inside an earlier
  // stage's commit group -- no register holds an in-flight load, no load-use stall sits in front
  // of the K/V copies -- and their in-page row offsets (plain stores by the same lanes).
  constexpr bool kGroupPaged = kPaged && !kScoreMods;
  constexpr int kGroups = kSubN / 16;
  static_assert(2 * kGroups <= Traits::kPageSlotInts);
  int* page_ring = reinterpret_cast<int*>(smem_buf + Traits::kSmemQBytes + Traits::kSmemRingBytes) +
                   warp * Traits::kPageSlots * Traits::kPageSlotInts;
  const int* block_table = params.block_table != nullptr ? params.block_table + bidb * params.block_table_batch_stride
                                                         : nullptr;
  const bool paged = kGroupPaged || (kPaged && block_table != nullptr);  // the paged-only kernel always has a table
  auto fetch_groups = [&](int j, int sb, bool used) {  // lane g < kGroups: group g of sub-block sb
    if (lane < kGroups) {
      const int row = sb * kSubN + 16 * lane;
      int entry, in_page;
      page_div(entry, in_page, row);
      const bool ok = used && row < params.seqlen_k;  // seqlen_k: the rows the block table addresses
      int* slot = page_ring + (j % Traits::kPageSlots) * Traits::kPageSlotInts;
      SM80_CP_ASYNC_CACHEALWAYS_ZFILL<int32_t>::copy(block_table[ok ? entry : 0], slot[lane], ok);
      slot[kGroups + lane] = in_page;
    }
  };
  // Without a window's left edge, split s's first sub-blocks are rounds s, s + S, ... whatever the
  // sequence lengths are: their page entries are fetched before the lengths load, so the
  // block-table read overlaps the length reads instead of following them.
  const bool early_pages = kGroupPaged && paged && params.window_left < 0;
  if (early_pages) {
    CUTE_UNROLL
    for (int j = 0; j < kStages; ++j) fetch_groups(j, (split_idx + j * params.num_splits) * kNWarps + warp, true);
    cp_async_fence();
  }

  const SeqInfo seq(params, bidb);
  const int m0 = m_block * kBlockM;
  if (m0 >= seq.seqlen_q) {
    cp_async_wait<0>();  // no copy into shared memory outlives the block
    return;
  }
  const int rows_in_tile = min(kBlockM, seq.seqlen_q - m0);
  const int diag = seq.seqlen_k - seq.seqlen_q;

  // Keys come in rounds of kNWarps * kSubN (one sub-block per warp). Split s of S takes rounds
  // s, s + S, s + 2S, ...: at any moment the splits of a head read neighbouring rounds, so the
  // whole grid sweeps K/V nearly sequentially. (Contiguous ranges per split put tens of
  // concurrent streams at large power-of-two-ish distances; at 32768 keys and 4-6 splits that
  // ran 2-5x slower.) Sub-blocks are cut by the sequence end and the causal / window band.
  int sb_min = 0;
  int sb_max = ceil_div_dev(seq.seqlen_k, kSubN);
  if (params.window_right >= 0) {
    sb_max = min(sb_max, ceil_div_dev(m0 + rows_in_tile + diag + params.window_right, kSubN));
  }
  if (params.window_left >= 0) sb_min = max(sb_min, (m0 + diag - params.window_left) / kSubN);
  // One split: this block's result is final, written in the input dtype with softmax_lse (no
  // combine launch); otherwise an fp32 partial for the combine kernel.
  const bool direct = params.num_splits == 1;
  if (sb_max <= sb_min) {  // the same for every split of the tile (a cluster exits as one)
    if (direct || params.cluster_merge) {
      if (split_idx == 0) write_empty_tile<Traits, false>(params, seq, bidb, bidh, split_idx, m_block, rows_in_tile);
    } else {
      write_empty_tile<Traits, true>(params, seq, bidb, bidh, split_idx, m_block, rows_in_tile);
    }
    cp_async_wait<0>();
    return;
  }

  // Shared memory: Q | per-warp rings of (K, V) sub-blocks.
  Tensor sQ = make_tensor(make_smem_ptr(reinterpret_cast<Element*>(smem_buf)), typename Traits::SmemLayoutQ{});
  Element* ring = reinterpret_cast<Element*>(smem_buf + Traits::kSmemQBytes) + warp * kStages * 2 * Traits::kTileElems;
  auto stage_k = [&](int s) { return make_tensor(make_smem_ptr(ring + (2 * s) * Traits::kTileElems), typename Traits::SmemLayoutKV{}); };
  auto stage_v = [&](int s) { return make_tensor(make_smem_ptr(ring + (2 * s + 1) * Traits::kTileElems), typename Traits::SmemLayoutKV{}); };
  auto stage_vt = [&](int s) { return make_tensor(make_smem_ptr(ring + (2 * s + 1) * Traits::kTileElems), typename Traits::SmemLayoutVt{}); };

  using Copy = GmemTileCopy<typename Traits::WarpCopy>;
  const Copy gcopy(lane, params.d);
  const Element* q_base = static_cast<const Element*>(params.q_ptr) + seq.q_offset + bidh * params.q_head_stride;
  if (warp == 0) {
    Tensor tQsQ = gcopy.partition(sQ, lane);
    gcopy.load_strided(tQsQ, q_base + int64_t(m0 + gcopy.r0) * params.q_row_stride + gcopy.col0, params.q_row_stride,
                       rows_in_tile, q_base);
  }
  cp_async_fence();

  const int kv_head = bidh / params.h_h_k_ratio;
  const Element* k_head = static_cast<const Element*>(params.k_ptr) + kv_head * params.k_head_stride + gcopy.col0;
  const Element* v_head = static_cast<const Element*>(params.v_ptr) + kv_head * params.v_head_stride + gcopy.col0;
  const Element* k_thread = k_head + seq.k_offset + int64_t(seq.k_row0 + gcopy.r0) * params.k_row_stride;
  const Element* v_thread = v_head + seq.v_offset + int64_t(seq.k_row0 + gcopy.r0) * params.v_row_stride;
  // A sub-block inside the sequence with the whole head dim used (warp-uniform): its copies need
  // no predicates (every sub-block but the last when d == kHeadDim).
  const bool full_width = params.d == kHeadDim;
  auto full_sub_block = [&](int sb) { return full_width && (sb + 1) * kSubN <= seq.seqlen_k; };
  // This warp's sub-blocks: sb(i) = (first_round + i * S) * kNWarps + warp, inside [sb_min, sb_max).
  static_assert(Traits::kKeysPerRound == kNWarps * kSubN);
  const int num_splits = params.num_splits;
  const int round_lo = max(0, ceil_div_dev(sb_min - warp, kNWarps));       // first round in the band
  const int round_hi = sb_max - warp > 0 ? (sb_max - warp - 1) / kNWarps + 1 : 0;  // one past the last
  const int first_round = split_idx + max(0, ceil_div_dev(round_lo - split_idx, num_splits)) * num_splits;
  const int my_count = first_round < round_hi ? ceil_div_dev(round_hi - first_round, num_splits) : 0;
  auto sub_block = [&](int i) { return (first_round + i * num_splits) * kNWarps + warp; };
  // Paged K/V in the score-modifier kernel, at any alignment (left padding): lane p < kMaxPages
  // copies the p-th page entry that sub-block j touches into the same ring.
  constexpr int kMaxPages = Traits::kMaxPages;
  auto fetch_pages = [&](int j) {
    if (lane < kMaxPages) {
      const int entry = (seq.k_row0 + sub_block(j) * kSubN) / params.page_block_size + lane;
      const bool used = j < my_count && entry * params.page_block_size < seq.k_row0 + seq.seqlen_k;
      SM80_CP_ASYNC_CACHEALWAYS_ZFILL<int32_t>::copy(used ? block_table[entry] : block_table[0],
                                                     page_ring[(j % Traits::kPageSlots) * Traits::kPageSlotInts + lane], used);
    }
  };
  if (paged && !early_pages) {
    CUTE_UNROLL
    for (int j = 0; j < kStages; ++j) {
      if constexpr (kGroupPaged) {
        fetch_groups(j, sub_block(j), j < my_count);
      } else {
        fetch_pages(j);
      }
    }
    cp_async_fence();
  }
  if (paged) {
    cp_async_wait<0>();
    __syncwarp();  // every lane's entries and offsets are in the ring
  }
  // This warp's i-th sub-block into ring stage i % kStages (one commit group per sub-block, empty
  // past the end so the group count stays uniform).
  auto load_stage = [&](int i) {
    if (i < my_count) {
      const int sb = sub_block(i);
      const int valid_rows = seq.seqlen_k - sb * kSubN;
      Tensor sK = stage_k(i % kStages);
      Tensor sV = stage_v(i % kStages);
      Tensor tK = gcopy.partition(sK, lane);
      Tensor tV = gcopy.partition(sV, lane);
      const int* slot = page_ring + (i % Traits::kPageSlots) * Traits::kPageSlotInts;
      if constexpr (kGroupPaged) {
        fetch_groups(i + kStages, sub_block(i + kStages), i + kStages < my_count);  // landed when needed
        int page[kGroups], in_page[kGroups];
        CUTE_UNROLL
        for (int g = 0; g < kGroups; ++g) {
          page[g] = guard_page(slot[g], params.num_pages, params.index_errors);
          in_page[g] = slot[kGroups + g];
        }
        // Predicate-free copies for full sub-blocks; the predicated ones for the last, rolled so
        // that ptxas keeps them out of the full path.
        if (full_sub_block(sb)) {
          gcopy.template load_paged_groups<true>(tK, k_head, page, in_page, valid_rows, params.k_batch_stride,
                                                 params.k_row_stride);
          gcopy.template load_paged_groups<true>(tV, v_head, page, in_page, valid_rows, params.v_batch_stride,
                                                 params.v_row_stride);
        } else {
          gcopy.template load_paged_groups<false, true>(tK, k_head, page, in_page, valid_rows, params.k_batch_stride,
                                                        params.k_row_stride);
          gcopy.template load_paged_groups<false, true>(tV, v_head, page, in_page, valid_rows, params.v_batch_stride,
                                                        params.v_row_stride);
        }
      } else if (kPaged && paged) {
        fetch_pages(i + kStages);
        int pages[kMaxPages];
        CUTE_UNROLL
        for (int p = 0; p < kMaxPages; ++p) pages[p] = guard_page(slot[p], params.num_pages, params.index_errors);
        const int row0 = seq.k_row0 + sb * kSubN;
        const int offset = row0 - row0 / params.page_block_size * params.page_block_size;
        gcopy.load_paged_prefetched(tK, k_head, offset, valid_rows, pages, params.page_block_size,
                                    params.k_batch_stride, params.k_row_stride);
        gcopy.load_paged_prefetched(tV, v_head, offset, valid_rows, pages, params.page_block_size,
                                    params.v_batch_stride, params.v_row_stride);
      } else {
        const int j0 = sb * kSubN;
        const Element* k_src = k_thread + int64_t(j0) * params.k_row_stride;
        const Element* v_src = v_thread + int64_t(j0) * params.v_row_stride;
        if (full_sub_block(sb)) {
          gcopy.template load_strided<true>(tK, k_src, params.k_row_stride, valid_rows, k_head);
          gcopy.template load_strided<true>(tV, v_src, params.v_row_stride, valid_rows, v_head);
        } else {  // the sequence's last sub-block, or a head dim short of the tile
          gcopy.template load_strided<false, true>(tK, k_src, params.k_row_stride, valid_rows, k_head);
          gcopy.template load_strided<false, true>(tV, v_src, params.v_row_stride, valid_rows, v_head);
        }
      }
    }
    cp_async_fence();
  };
  CUTE_UNROLL
  for (int i = 0; i < kStages - 1; ++i) load_stage(i);

  typename Traits::WarpMma mma;
  auto thr_mma = mma.get_thread_slice(lane);
  Tensor tSrQ = thr_mma.partition_fragment_A(sQ);
  Tensor tSrK = thr_mma.partition_fragment_B(stage_k(0));
  Tensor tOrVt = thr_mma.partition_fragment_B(make_tensor(make_smem_ptr(ring), typename Traits::SmemLayoutVtNoSwizzle{}));
  Tensor acc_o = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kHeadDim>>{});
  clear(acc_o);

  auto smem_copy_q = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, mma);
  auto smem_thr_copy_q = smem_copy_q.get_thread_slice(lane);
  auto smem_copy_k = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, mma);
  auto smem_thr_copy_k = smem_copy_k.get_thread_slice(lane);
  auto smem_copy_v = make_tiled_copy_B(typename Traits::SmemCopyAtomTransposed{}, mma);
  auto smem_thr_copy_v = smem_copy_v.get_thread_slice(lane);

  Tensor tScS = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kSubN>>{}));
  Tensor tScS_rc = rowcol_view(tScS);
  Tensor tOcO = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  Tensor tOcO_rc = rowcol_view(tOcO);

  const bool has_softcap = kScoreMods && params.softcap_in > 0.f;
  const bool has_alibi = kScoreMods && params.alibi_slopes_ptr != nullptr;
  const float alibi_slope =
      has_alibi ? params.alibi_slopes_ptr[bidb * params.alibi_slopes_batch_stride + bidh] / params.scale_softmax : 0.f;

  // Q: wait for warp 0's copy (its group is the oldest), then all of it into registers.
  cp_async_wait<kStages - 1>();
  __syncthreads();
  copy(smem_copy_q, smem_thr_copy_q.partition_S(sQ), smem_thr_copy_q.retile_D(tSrQ));

  constexpr int kRows = decltype(size<0>(rowcol_view(acc_o)))::value;
  OnlineSoftmax<kRows> softmax;

  for (int i = 0; i < my_count; ++i) {
    load_stage(i + kStages - 1);
    cp_async_wait<kStages - 1>();
    __syncwarp();  // sub-block i landed for every lane
    const int s = i % kStages;
    const int sb = sub_block(i);

    Tensor acc_s = partition_fragment_C(mma, Shape<Int<kBlockM>, Int<kSubN>>{});
    clear(acc_s);
    gemm_rs(acc_s, tSrQ, tSrK, smem_thr_copy_k.partition_S(stage_k(s)), mma, smem_copy_k, smem_thr_copy_k);

    Tensor sc = rowcol_view(acc_s);
    const BlockCoords bc{m0, sb * kSubN, diag};
    if constexpr (kScoreMods) {
      if (has_softcap) apply_softcap(acc_s, params.softcap_in);
      if (has_alibi) apply_alibi(sc, tScS_rc, bc, alibi_slope);
    }
    if (block_needs_mask(bc, kSubN, rows_in_tile, seq.seqlen_k, params.window_left, params.window_right)) {
      apply_mask(sc, tScS_rc, bc, seq.seqlen_k, params.window_left, params.window_right);
    }
    softmax.template update</*kSkipUnmoved=*/true>(sc, rowcol_view(acc_o), params.scale_softmax_log2, i == 0);

    Tensor rP = convert_fragment<Element>(acc_s);
    Tensor tOrP = make_tensor(rP.data(), acc_to_a_operand_layout(rP.layout()));
    gemm_rs_n_outer(acc_o, tOrP, tOrVt, smem_thr_copy_v.partition_S(stage_vt(s)), mma, smem_copy_v, smem_thr_copy_v);
    __syncwarp();  // every lane is done reading stage s before it is refilled
  }
  cp_async_wait<0>();

  // Merge the warps. Each warp's rows: lse_w (natural log; -inf without a visible key) and the
  // normalised output o_w; the block's lse = log sum_w exp(lse_w), output = sum_w exp(lse_w - lse) o_w.
  float lse_w[kRows];
  if (my_count > 0) {
    softmax.finalize(rowcol_view(acc_o), params.scale_softmax, -INFINITY, lse_w);
  } else {
    CUTE_UNROLL
    for (int mi = 0; mi < kRows; ++mi) lse_w[mi] = -INFINITY;
  }
  float* lse_smem = reinterpret_cast<float*>(smem_buf);  // Q is in registers now
  // Per warp kBlockM rows of kOStride floats: the pad shifts each row by 4 banks, so the eight
  // rows an MMA fragment store touches at once hit different banks (unpadded: 8-way conflicts).
  constexpr int kOStride = Traits::kMergeRowStride;
  float* o_smem = reinterpret_cast<float*>(smem_buf + Traits::kSmemQBytes);
  auto o_index = [](int e) { return e / kHeadDim * kOStride + e % kHeadDim; };  // e = row * kHeadDim + col
  __syncthreads();  // every warp is done with Q and its ring
  const bool writes_lse = get<1>(tOcO_rc(0, 0)) == 0;
  CUTE_UNROLL
  for (int mi = 0; mi < kRows; ++mi) {
    if (writes_lse) lse_smem[warp * kBlockM + get<0>(tOcO_rc(mi, 0))] = lse_w[mi];
  }
  __syncthreads();
  float scale[kRows];
  CUTE_UNROLL
  for (int mi = 0; mi < kRows; ++mi) {
    const int row = get<0>(tOcO_rc(mi, 0));
    float mx = -INFINITY;
    CUTE_UNROLL
    for (int w = 0; w < kNWarps; ++w) mx = fmaxf(mx, lse_smem[w * kBlockM + row]);
    float sum = 0.f;
    CUTE_UNROLL
    for (int w = 0; w < kNWarps; ++w) {
      const float l = lse_smem[w * kBlockM + row];
      sum += l == -INFINITY ? 0.f : __expf(l - mx);
    }
    const float lse = sum == 0.f ? -INFINITY : mx + __logf(sum);
    scale[mi] = lse_w[mi] == -INFINITY ? 0.f : __expf(lse_w[mi] - lse);
    if (warp == 0 && writes_lse) lse_smem[kNWarps * kBlockM + row] = lse;
  }
  Tensor o_rc = rowcol_view(acc_o);
  CUTE_UNROLL
  for (int mi = 0; mi < kRows; ++mi) {
    CUTE_UNROLL
    for (int ni = 0; ni < size<1>(o_rc); ++ni) o_rc(mi, ni) *= scale[mi];
  }
  CUTE_UNROLL
  for (int i = 0; i < size(acc_o); i += 2) {  // the tile's rows only: the rest is MMA padding
    const int row = get<0>(tOcO(i)), col = get<1>(tOcO(i));
    if (row < rows_in_tile) {
      *reinterpret_cast<float2*>(o_smem + (warp * kBlockM + row) * kOStride + col) = make_float2(acc_o(i), acc_o(i + 1));
    }
  }
  __syncthreads();

  auto merged = [&](int e) {  // the warps' sum at element e = row * kHeadDim + col (4 elements)
    float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
    CUTE_UNROLL
    for (int w = 0; w < kNWarps; ++w) {
      const float4 v = *reinterpret_cast<const float4*>(o_smem + w * kBlockM * kOStride + o_index(e));
      sum.x += v.x, sum.y += v.y, sum.z += v.z, sum.w += v.w;
    }
    return sum;
  };
  // The tile's final output and softmax_lse: value(e) gives 4 output elements at e = row * kHeadDim + col,
  // lse_of(row) the row's natural-log lse (-inf without a visible key: written as +inf, as upstream).
  auto write_output = [&](auto&& value, auto&& lse_of) {
    float* lse_out = params.softmax_lse_ptr + bidb * params.lse_batch_stride + bidh * params.lse_head_stride;
    if (tidx < rows_in_tile) {
      const float lse = lse_of(tidx);
      lse_out[int64_t(seq.q_start + m0 + tidx) * params.lse_row_stride] = lse == -INFINITY ? INFINITY : lse;
    }
    Element* o = static_cast<Element*>(params.o_ptr) + seq.o_offset + bidh * params.o_head_stride;
    for (int e = tidx * 4; e < rows_in_tile * kHeadDim; e += Traits::kNThreads * 4) {
      const int row = e / kHeadDim, col = e % kHeadDim;
      if (col >= params.d) continue;  // d is a multiple of 8: 4 columns are all in or all out
      const float4 v = value(e);
      Element out[4] = {Element(v.x), Element(v.y), Element(v.z), Element(v.w)};
      *reinterpret_cast<uint2*>(o + int64_t(m0 + row) * params.o_row_stride + col) = *reinterpret_cast<const uint2*>(out);
    }
  };
  if (direct) {
    write_output(merged, [&](int row) { return lse_smem[kNWarps * kBlockM + row]; });
  } else if (params.cluster_merge) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    // The splits of this tile are one thread-block cluster (sm_90): each leaves its result in its
    // own shared memory, and split 0 merges them through distributed shared memory -- no fp32
    // partials in global memory, no combine launch.
    namespace cg = cooperative_groups;
    cg::cluster_group cluster = cg::this_cluster();
    for (int e = tidx * 4; e < rows_in_tile * kHeadDim; e += Traits::kNThreads * 4) {
      *reinterpret_cast<float4*>(o_smem + o_index(e)) = merged(e);  // in place over warp 0's slot: one thread per e
    }
    cluster.sync();  // every split's result is in its shared memory (a releasing arrive)
    if (cluster.block_rank() == 0) {
      const int splits = int(cluster.num_blocks());
      float* weight = lse_smem + (kNWarps + 1) * kBlockM;  // [split][row], then the merged lse per row
      static_assert((kNWarps + 2 + kMaxClusterSplits) * kBlockM * 4 <= Traits::kSmemQBytes,
                    "the cluster merge's weights must fit in Q's shared memory");
      if (tidx < rows_in_tile) {
        // Every split's lse of this row in registers at once (one round of remote loads).
        float l[kMaxClusterSplits];
        float mx = -INFINITY;
        CUTE_UNROLL
        for (int r = 0; r < kMaxClusterSplits; ++r) {
          l[r] = r < splits ? cluster.map_shared_rank(lse_smem, r)[kNWarps * kBlockM + tidx] : -INFINITY;
          mx = fmaxf(mx, l[r]);
        }
        float sum = 0.f;
        CUTE_UNROLL
        for (int r = 0; r < kMaxClusterSplits; ++r) sum += l[r] == -INFINITY ? 0.f : __expf(l[r] - mx);
        const float lse = sum == 0.f ? -INFINITY : mx + __logf(sum);
        CUTE_UNROLL
        for (int r = 0; r < kMaxClusterSplits; ++r) {
          if (r < splits) weight[r * kBlockM + tidx] = l[r] == -INFINITY ? 0.f : __expf(l[r] - lse);
        }
        weight[splits * kBlockM + tidx] = lse;
      }
      __syncthreads();
      write_output(
          [&](int e) {
            const int row = e / kHeadDim;
            float4 v[kMaxClusterSplits];  // every split's values first (one round of remote loads)
            CUTE_UNROLL
            for (int r = 0; r < kMaxClusterSplits; ++r) {
              if (r < splits) v[r] = *reinterpret_cast<const float4*>(cluster.map_shared_rank(o_smem, r) + o_index(e));
            }
            float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
            CUTE_UNROLL
            for (int r = 0; r < kMaxClusterSplits; ++r) {  // fixed order: deterministic
              if (r < splits) {
                const float w = weight[r * kBlockM + row];
                sum.x += w * v[r].x, sum.y += w * v[r].y, sum.z += w * v[r].z, sum.w += w * v[r].w;
              }
            }
            return sum;
          },
          [&](int row) { return weight[splits * kBlockM + row]; });
    }
    // Split 0 has read every split's shared memory before any block exits. A relaxed arrive: split
    // 0's remote loads are complete (their values were stored), and its output stores need not be
    // visible to the cluster -- a releasing arrive waited for them (~1 us of the b1 epilogue).
    cute::cluster_arrive_relaxed();
    cute::cluster_wait();
#else
    __trap();  // the dispatcher asks for a cluster merge only on sm_90+, whose code has it
#endif
  } else {
    const int64_t head_rows = (int64_t(split_idx) * params.h + bidh) * params.total_q_rows;
    const int r0 = seq.q_row(params, bidb, m0);
    if (tidx < rows_in_tile) params.lseaccum_ptr[head_rows + r0 + tidx] = lse_smem[kNWarps * kBlockM + tidx];
    float* oacc = params.oaccum_ptr + (head_rows + r0) * kHeadDim;
    for (int e = tidx * 4; e < rows_in_tile * kHeadDim; e += Traits::kNThreads * 4) {
      *reinterpret_cast<float4*>(oacc + e) = merged(e);
    }
  }
}

}  // namespace flash
