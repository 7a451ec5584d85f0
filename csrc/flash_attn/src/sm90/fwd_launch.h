// Host-side launch of the Hopper forward for one (head dim, dtype): builds the TMA descriptors,
// raises the dynamic shared-memory limit and launches one persistent block per SM (fewer when
// there are fewer units of work; 384 threads, 512 with 192-row tiles); with splits, the combine
// kernel after it.
// Included only by the instantiations/flash_fwd_sm90_*.cu files.
#pragma once

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <type_traits>

#include <cuda_runtime.h>

#include "launch/combine_launch.h"
#include "launch/dynamic_smem.h"
#include "params/fwd_params.h"
#include "plan/tile_sizes.h"
#include "sm90/fwd_kernel.h"
#include "sm90/kernel_traits.h"
#include "sm90/tile_scheduler.h"
#include "sm90/tma_loads.h"

namespace flash {

template <typename Traits, bool kIsSplit, bool kHasScoreMods, bool kPaged, bool kHasDropout = false>
void launch_fwd_sm90(const FwdParams& params, cudaStream_t stream) {
  const Sm90FwdArgs<Traits> args = make_sm90_fwd_args<Traits>(params, Traits::kOStoredByTma && !kIsSplit);
  constexpr auto kernel = &flash_fwd_sm90_kernel<Traits, kIsSplit, kHasScoreMods, kPaged, kHasDropout>;
  allow_dynamic_smem<kernel, Traits::kSmemBytes>(params.device);
  const int m_blocks = (params.seqlen_q + Traits::kBlockM - 1) / Traits::kBlockM;
  const int64_t units = Sm90TileScheduler<kIsSplit>::num_units(params, m_blocks);
  const int grid = int(std::min<int64_t>(units, std::max(1, params.num_sms)));
  kernel<<<grid, Traits::kNThreads, Traits::kSmemBytes, stream>>>(args);
}

// Four instantiations: plain; softcap and ALiBi (so the plain kernel's softmax step carries none
// of their code); and each with split-KV partials (params.split_kernel: the plan's splits of
// longer queries, merged by the combine kernel). Head dims with paged kernels
// (sm90_fwd_has_paged) have the four again with a paged K/V cache (params.block_table; the
// dispatcher sends only page sizes that are multiples of the key block, sm90_fwd_reads_pages).
// Dropout has its own: the plain kernel with dropout (unsplit, batch-strided or packed K/V, no
// score modifiers, no S_dmask: the dispatcher's sm90_takes_dropout). Head dims 192 and 256 add
// the plain kernel with 64-key blocks for short keys (sm90_fwd_short_keys); head dim 64 adds the
// plain kernel with 192-row tiles for calls without a mask (sm90_fwd_wide_rows).
template <int kHeadDim, bool kIsBf16>
void run_fwd_sm90(const FwdParams& params, cudaStream_t stream) {
  using Traits = Sm90FwdTraits<kHeadDim, kIsBf16>;
  if (params.dropout_keep_threshold != 0) {
    if (params.split_kernel || params.block_table != nullptr || has_score_mods(params) ||
        params.s_dmask_ptr != nullptr) {
      throw std::invalid_argument("the Hopper forward takes dropout only in its plain kernel, without S_dmask");
    }
    launch_fwd_sm90<Traits, false, false, false, true>(params, stream);
    return;
  }
  auto launch = [&](auto split, auto paged) {
    if (has_score_mods(params)) {
      launch_fwd_sm90<Traits, decltype(split)::value, true, decltype(paged)::value>(params, stream);
    } else {
      launch_fwd_sm90<Traits, decltype(split)::value, false, decltype(paged)::value>(params, stream);
    }
  };
  auto launch_splits = [&](auto paged) {
    if (params.split_kernel) {
      launch(std::true_type{}, paged);
      launch_combine_kernel<kHeadDim, typename Traits::Element>(params, stream);
    } else {
      launch(std::false_type{}, paged);
    }
  };
  if constexpr (kHeadDim == 64) {
    using WideTraits = Sm90FwdTraits<kHeadDim, kIsBf16, sm90_fwd_tile(kHeadDim).block_n, kSm90WideRowsBlockM>;
    const int wide_m_blocks = (params.seqlen_q + kSm90WideRowsBlockM - 1) / kSm90WideRowsBlockM;
    if (!params.split_kernel && params.block_table == nullptr && !has_score_mods(params) &&
        sm90_fwd_wide_rows(kHeadDim, params.window_left, params.window_right,
                           Sm90TileScheduler<false>::num_units(params, wide_m_blocks), params.num_sms)) {
      launch_fwd_sm90<WideTraits, false, false, false>(params, stream);
      return;
    }
  }
  if constexpr (sm90_fwd_tile(kHeadDim).block_n != 128) {
    if (!params.split_kernel && params.block_table == nullptr && !has_score_mods(params) &&
        sm90_fwd_short_keys(kHeadDim, params.seqlen_k)) {
      launch_fwd_sm90<Sm90FwdTraits<kHeadDim, kIsBf16, kSm90ShortKeysBlockN>, false, false, false>(params, stream);
      return;
    }
  }
  if (params.block_table != nullptr) {
    // The plain kernels read K/V batch-strided: a block table they cannot follow must never reach
    // them (the dispatcher's sm90_kv_indirect keeps such calls on the SM80 kernels).
    if (!sm90_fwd_reads_pages(kHeadDim, params.page_block_size)) {
      throw std::invalid_argument("the Hopper forward cannot read this block_table's pages at this head dim");
    }
    if constexpr (sm90_fwd_has_paged(kHeadDim)) launch_splits(std::true_type{});
    return;
  }
  launch_splits(std::false_type{});
}

}  // namespace flash
