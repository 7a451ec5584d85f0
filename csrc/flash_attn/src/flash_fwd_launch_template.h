// Host-side launch of the forward kernels for one (head dim, dtype): picks the tile shape,
// the grid, the dynamic shared memory, and chains the combine kernel after a split launch.
// Included only by the generated instantiation files.
#pragma once

#include <atomic>
#include <type_traits>

#include <cuda_runtime.h>
#include <cutlass/numeric_types.h>

#include "flash.h"
#include "flash_fwd_combine_kernel.h"
#include "flash_fwd_kernel.h"
#include "kernel_traits.h"
#include "tile_sizes.h"

namespace flash {

// Raise a kernel's dynamic shared memory limit once per device. One flag set per kernel: the
// template parameter makes the static local distinct for every kernel instantiation.
template <auto Kernel>
void allow_dynamic_smem(int bytes) {
  static std::atomic<uint64_t> done_devices{0};
  if (bytes <= 48 * 1024) return;
  int device = 0;
  cudaGetDevice(&device);
  const uint64_t bit = uint64_t(1) << (device & 63);
  if (!(done_devices.load(std::memory_order_relaxed) & bit)) {
    cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    done_devices.fetch_or(bit, std::memory_order_relaxed);
  }
}

template <typename Traits, bool kIsSplit, bool kHasExtras>
void launch_fwd_kernel(const FwdParams& params, cudaStream_t stream) {
  constexpr auto kernel = &flash_fwd_kernel<Traits, kIsSplit, kHasExtras>;
  allow_dynamic_smem<kernel>(Traits::kSmemBytes);
  const int m_blocks = (params.seqlen_q + Traits::kBlockM - 1) / Traits::kBlockM;
  const dim3 grid = kIsSplit ? dim3(m_blocks, params.num_splits, params.b * params.h)
                             : dim3(m_blocks, params.b, params.h);
  kernel<<<grid, Traits::kNThreads, Traits::kSmemBytes, stream>>>(params);
}

// Softcap, ALiBi and paged K/V get their own kernel so the common kernel's loop carries none of
// their code (smaller loop body, fewer live registers).
template <typename Traits, bool kIsSplit>
void launch_fwd_kernel(const FwdParams& params, cudaStream_t stream) {
  const bool extras = params.softcap_in > 0.f || params.alibi_slopes_ptr != nullptr || params.block_table != nullptr;
  if (extras) {
    launch_fwd_kernel<Traits, kIsSplit, true>(params, stream);
  } else {
    launch_fwd_kernel<Traits, kIsSplit, false>(params, stream);
  }
}

template <int kHeadDim, typename Element>
void launch_combine_kernel(const FwdParams& params, cudaStream_t stream) {
  const int rows = params.h * params.total_q_rows;
  const int blocks = (rows + kCombineWarps - 1) / kCombineWarps;
  flash_fwd_combine_kernel<kHeadDim, Element><<<blocks, kCombineWarps * 32, 0, stream>>>(params);
}

template <int kHeadDim, typename Element>
void run_fwd_impl(const FwdParams& params, cudaStream_t stream) {
  if (params.split_kernel) {
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

}  // namespace flash
