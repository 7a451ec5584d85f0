// Host-side launch of the Hopper forward for one (head dim, dtype): builds the TMA descriptors,
// raises the dynamic shared-memory limit and launches one persistent 384-thread block per SM
// (fewer when there are fewer units of work); with splits, the combine kernel after it.
// Included only by the instantiations/flash_fwd_sm90_*.cu files.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include <cuda_runtime.h>

#include "launch/combine_launch.h"
#include "launch/dynamic_smem.h"
#include "params/fwd_params.h"
#include "sm90/fwd_kernel.h"
#include "sm90/kernel_traits.h"
#include "sm90/tile_scheduler.h"
#include "sm90/tma_loads.h"

namespace flash {

template <typename Traits, bool kIsSplit, bool kHasScoreMods>
void launch_fwd_sm90(const FwdParams& params, cudaStream_t stream) {
  const Sm90FwdArgs<Traits> args = make_sm90_fwd_args<Traits>(params);
  constexpr auto kernel = &flash_fwd_sm90_kernel<Traits, kIsSplit, kHasScoreMods>;
  allow_dynamic_smem<kernel, Traits::kSmemBytes>(params.device);
  const int m_blocks = (params.seqlen_q + Traits::kBlockM - 1) / Traits::kBlockM;
  const int64_t units = Sm90TileScheduler<kIsSplit>::num_units(params, m_blocks);
  const int grid = int(std::min<int64_t>(units, std::max(1, params.num_sms)));
  kernel<<<grid, Traits::kNThreads, Traits::kSmemBytes, stream>>>(args);
}

// Four instantiations: plain; softcap and ALiBi (so the plain kernel's softmax step carries none
// of their code); and each with split-KV partials (params.split_kernel: the plan's splits of
// longer queries, merged by the combine kernel).
template <int kHeadDim, bool kIsBf16>
void run_fwd_sm90(const FwdParams& params, cudaStream_t stream) {
  using Traits = Sm90FwdTraits<kHeadDim, kIsBf16>;
  auto launch = [&](auto split) {
    if (has_score_mods(params)) {
      launch_fwd_sm90<Traits, decltype(split)::value, true>(params, stream);
    } else {
      launch_fwd_sm90<Traits, decltype(split)::value, false>(params, stream);
    }
  };
  if (params.split_kernel) {
    launch(std::true_type{});
    launch_combine_kernel<kHeadDim, typename Traits::Element>(params, stream);
  } else {
    launch(std::false_type{});
  }
}

}  // namespace flash
