// Host-side launch of the forward kernels for one (head dim, dtype): picks the tile shape,
// the grid, the dynamic shared memory, and chains the combine kernel after a split launch.
// Included only by the generated instantiation files.
#pragma once

#include <algorithm>
#include <atomic>
#include <type_traits>

#include <cuda_runtime.h>
#include <cutlass/fast_math.h>
#include <cutlass/numeric_types.h>

#include "launch/combine_launch.h"
#include "launch/dynamic_smem.h"
#include "params/launchers.h"
#include "kernels/decode_kernel_traits.h"
#include "kernels/decode_kernel.h"
#include "kernels/fwd_kernel.h"
#include "common/kernel_traits.h"
#include "plan/tile_sizes.h"

namespace flash {

// Softcap, ALiBi and paged K/V get their own kernel instantiation so the common kernel's loop
// carries none of their code (smaller loop body, fewer live registers).
template <typename Launch>
void with_extras(const FwdParams& params, Launch&& launch) {
  const bool extras = has_score_mods(params) || params.block_table != nullptr;
  if (extras) {
    launch(std::true_type{});
  } else {
    launch(std::false_type{});
  }
}

// Dropout gets its own instantiation of the unsplit kernel (the plan never splits with dropout), so
// the kernels without it stay as they are. dropout_keep_threshold is 0 without dropout.
template <typename Launch>
void with_dropout(const FwdParams& params, Launch&& launch) {
  if (params.dropout_keep_threshold != 0u) {
    launch(std::true_type{});
  } else {
    launch(std::false_type{});
  }
}

template <typename Traits, bool kIsSplit>
void launch_fwd_kernel(const FwdParams& params, cudaStream_t stream) {
  with_extras(params, [&](auto extras) {
    auto launch = [&](auto dropout) {
      constexpr auto kernel = &flash_fwd_kernel<Traits, kIsSplit, decltype(extras)::value, decltype(dropout)::value>;
      allow_dynamic_smem<kernel, Traits::kSmemBytes>(params.device);
      const int m_blocks = (params.seqlen_q + Traits::kBlockM - 1) / Traits::kBlockM;
      const dim3 grid = kIsSplit ? dim3(m_blocks, params.num_splits, params.b * params.h)
                                 : dim3(m_blocks, params.b, params.h);
      kernel<<<grid, Traits::kNThreads, Traits::kSmemBytes, stream>>>(params);
    };
    if constexpr (kIsSplit) {
      launch(std::false_type{});
    } else {
      with_dropout(params, launch);
    }
  });
}

// Decode: three instantiations -- plain, paged (key rows aligned to 16-row page groups: no left
// padding), and score modifiers (softcap / ALiBi), which also serves the rare combinations: paging
// with score modifiers, and paging with left padding (any alignment) -- each once with packed GQA
// rows (FwdParams::pack_groups > 1) and once without.
template <typename Launch>
void with_decode_features(const FwdParams& params, Launch&& launch) {
  const bool paged = params.block_table != nullptr;
  auto with_packing = [&](auto score_mods, auto paged_kv) {
    if (params.pack_groups > 1) {
      launch(score_mods, paged_kv, std::true_type{});
    } else {
      launch(score_mods, paged_kv, std::false_type{});
    }
  };
  if (has_score_mods(params) || (paged && params.leftpad_k != nullptr)) {
    with_packing(std::true_type{}, std::true_type{});
  } else if (paged) {
    with_packing(std::false_type{}, std::true_type{});
  } else {
    with_packing(std::false_type{}, std::false_type{});
  }
}

// Launch configuration of a decode grid in thread-block clusters: the splits of a query tile
// (1, splits, 1) for the cluster merge, or pairs of heads (1, 1, 2). Not copyable: the config
// points at its own attribute.
template <typename Traits>
struct DecodeClusterLaunch {
  cudaLaunchAttribute attribute[1];
  cudaLaunchConfig_t config;
  DecodeClusterLaunch(dim3 grid, dim3 cluster, cudaStream_t stream) : attribute{}, config{} {
    config.gridDim = grid;
    config.blockDim = dim3(Traits::kNThreads);
    config.dynamicSmemBytes = Traits::kSmemBytes;
    config.stream = stream;
    attribute[0].id = cudaLaunchAttributeClusterDimension;
    attribute[0].val.clusterDim.x = cluster.x;
    attribute[0].val.clusterDim.y = cluster.y;
    attribute[0].val.clusterDim.z = cluster.z;
    config.attrs = attribute;
    config.numAttrs = 1;
  }
  DecodeClusterLaunch(const DecodeClusterLaunch&) = delete;
  DecodeClusterLaunch& operator=(const DecodeClusterLaunch&) = delete;
};

template <typename Traits>
void launch_decode_kernel(const FwdParams& params, cudaStream_t stream) {
  with_decode_features(params, [&](auto score_mods, auto paged, auto packed) {
    constexpr auto kernel = &flash_decode_kernel<Traits, decltype(score_mods)::value, decltype(paged)::value,
                                                 decltype(packed)::value>;
    allow_dynamic_smem<kernel, Traits::kSmemBytes>(params.device);
    const int m_blocks = (params.seqlen_q + Traits::kBlockM - 1) / Traits::kBlockM;
    const dim3 grid(m_blocks, params.num_splits, params.b * params.h);
    // Row -> (block-table entry, row in page) by multiply and shift: the divisor's magic numbers
    // are computed here once instead of a division per sub-block in the kernel.
    const cutlass::FastDivmod page_div(params.block_table != nullptr ? params.page_block_size : 1);
    if (params.cluster_merge || params.decode_pair_clusters) {
      // The splits of a query tile merge inside the kernel, or pairs of heads share a TPC.
      const dim3 cluster = params.cluster_merge ? dim3(1, params.num_splits, 1) : dim3(1, 1, 2);
      const DecodeClusterLaunch<Traits> launch(grid, cluster, stream);
      cudaLaunchKernelEx(&launch.config, kernel, params, page_div);
    } else {
      kernel<<<grid, Traits::kNThreads, Traits::kSmemBytes, stream>>>(params, page_div);
    }
  });
}

// Clusters of `cluster_size` blocks of this decode variant that fit on the device at once (the
// cluster merge needs every cluster resident: clusters pack per GPC, so fewer fit than SMs /
// cluster_size). One occupancy query per (device, variant, size), cached.
template <typename Traits>
int decode_cluster_capacity(const FwdParams& params, int cluster_size) {
  if (cluster_size < 1 || cluster_size > kMaxClusterSplits) return 0;
  int capacity = 0;
  with_decode_features(params, [&](auto score_mods, auto paged, auto packed) {
    constexpr auto kernel = &flash_decode_kernel<Traits, decltype(score_mods)::value, decltype(paged)::value,
                                                 decltype(packed)::value>;
    static std::atomic<int> cached[64][kMaxClusterSplits + 1] = {};  // capacity + 1, 0 = not yet asked
    std::atomic<int>& slot = cached[params.device & 63][cluster_size];
    int known = slot.load(std::memory_order_relaxed);
    if (known == 0) {
      allow_dynamic_smem<kernel, Traits::kSmemBytes>(params.device);
      const DecodeClusterLaunch<Traits> launch(dim3(1, cluster_size, 1), dim3(1, cluster_size, 1), nullptr);
      int clusters = 0;
      if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &launch.config) != cudaSuccess) {
        (void)cudaGetLastError();  // no cluster support (pre-sm_90): report none, leave no error behind
        clusters = 0;
      }
      known = clusters + 1;
      slot.store(known, std::memory_order_relaxed);
    }
    capacity = known - 1;
  });
  return capacity;
}

template <int kHeadDim, typename Element>
void run_fwd_impl(const FwdParams& params, cudaStream_t stream) {
  if (params.decode_kernel) {
    constexpr DecodeTile t = decode_tile(kHeadDim);
    launch_decode_kernel<DecodeKernelTraits<kHeadDim, t.sub_n, t.stages, t.warps, Element>>(params, stream);
    // One split writes the output directly, a cluster of splits merges in the kernel.
    if (params.num_splits > 1 && !params.cluster_merge) launch_combine_kernel<kHeadDim, Element>(params, stream);
  } else if (params.split_kernel) {
    constexpr TileShape t = splitkv_tile(kHeadDim);
    launch_fwd_kernel<FwdKernelTraits<kHeadDim, t.block_m, t.block_n, t.warps, Element>, true>(params, stream);
    launch_combine_kernel<kHeadDim, Element>(params, stream);
  } else {
    constexpr TileShape t = fwd_tile(kHeadDim);
    launch_fwd_kernel<FwdKernelTraits<kHeadDim, t.block_m, t.block_n, t.warps, Element>, false>(params, stream);
  }
}

template <int kHeadDim, bool kIsBf16>
void run_fwd(const FwdParams& params, cudaStream_t stream) {
  run_fwd_impl<kHeadDim, std::conditional_t<kIsBf16, cutlass::bfloat16_t, cutlass::half_t>>(params, stream);
}

template <int kHeadDim, bool kIsBf16>
int max_decode_clusters(const FwdParams& params, int cluster_size) {
  constexpr DecodeTile t = decode_tile(kHeadDim);
  using Element = std::conditional_t<kIsBf16, cutlass::bfloat16_t, cutlass::half_t>;
  return decode_cluster_capacity<DecodeKernelTraits<kHeadDim, t.sub_n, t.stages, t.warps, Element>>(params, cluster_size);
}

}  // namespace flash
