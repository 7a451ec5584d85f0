// Host-side launch of the backward for one (head dim, dtype):
//   1. flash_bwd_preprocess_kernel: D = rowsum(dO * O); zeroes the fp32 dQ accumulator
//   2. flash_bwd_dkdv_kernel, grid (key blocks, batch, kv heads): dK, dV (and dQ by atomics)
//   3. deterministic: flash_bwd_dq_kernel, grid (query tiles, batch, heads): dQ in a fixed order;
//      else flash_bwd_convert_dq_kernel: the accumulator to dQ
// Included only by the generated instantiation files.
#pragma once

#include <type_traits>

#include <cuda_runtime.h>
#include <cutlass/numeric_types.h>

#include "params/launchers.h"
#include "common/bwd_kernel_traits.h"
#include "common/kernel_traits.h"
#include "kernels/bwd_dkdv_kernel.h"
#include "kernels/bwd_dq_kernel.h"
#include "kernels/bwd_row_kernels.h"
#include "launch/dynamic_smem.h"
#include "launch/fwd_launch.h"
#include "plan/tile_sizes.h"

namespace flash {

// Softcap and ALiBi get their own instantiation, as in the forward: the common kernel's loop
// carries none of their code.
template <typename Launch>
void with_bwd_extras(const BwdParams& params, Launch&& launch) {
  if (params.softcap_in > 0.f || params.alibi_slopes_ptr != nullptr) {
    launch(std::true_type{});
  } else {
    launch(std::false_type{});
  }
}

// Dropout: a separate instantiation of the dK/dV and dQ kernels, as in the forward.
template <typename Launch>
void with_bwd_extras_and_dropout(const BwdParams& params, Launch&& launch) {
  with_bwd_extras(params, [&](auto extras) {
    if (params.dropout_keep_threshold != 0u) {
      launch(extras, std::true_type{});
    } else {
      launch(extras, std::false_type{});
    }
  });
}

template <typename Traits, bool kHasExtras, bool kHasDropout>
void launch_bwd_dkdv(const BwdParams& params, cudaStream_t stream) {
  constexpr auto kernel = &flash_bwd_dkdv_kernel<Traits, kHasExtras, kHasDropout>;
  allow_dynamic_smem<kernel, Traits::kSmemBytes>(params.device);
  const int n_blocks = (params.seqlen_k + Traits::kBlockN - 1) / Traits::kBlockN;
  if (n_blocks > 0) kernel<<<dim3(n_blocks, params.b, params.h_k), Traits::kNThreads, Traits::kSmemBytes, stream>>>(params);
}

template <int kHeadDim, typename Element>
void run_bwd_impl(const BwdParams& params, cudaStream_t stream) {
  const int row_blocks = (params.seqlen_q + kBwdRowsPerBlock - 1) / kBwdRowsPerBlock;
  const dim3 row_grid(row_blocks, params.b, params.h);
  if (row_blocks > 0) {
    flash_bwd_preprocess_kernel<kHeadDim, Element><<<row_grid, kBwdRowWarps * 32, 0, stream>>>(params);
  }

  constexpr TileShape t = bwd_tile(kHeadDim);
  using Traits = BwdKernelTraits<kHeadDim, t.block_m, t.block_n, t.warps, Element>;
  with_bwd_extras_and_dropout(params, [&](auto extras, auto dropout) {
    constexpr bool kExtras = decltype(extras)::value, kDropout = decltype(dropout)::value;
    if constexpr (!kExtras && !kDropout) {
      // Without softcap, ALiBi and dropout: bwd_tile_plain's shape and Q/dO stages (head dim 64:
      // 128 x 128 tiles and two stages, 160 KB), where the GPU gives a block that much shared
      // memory (not sm_86 / sm_89: they run bwd_tile's).
      constexpr TileShape tp = bwd_tile_plain(kHeadDim);
      using PlainTraits =
          BwdKernelTraits<kHeadDim, tp.block_m, tp.block_n, tp.warps, Element, bwd_qdo_stages_plain(kHeadDim)>;
      if constexpr (!std::is_same_v<PlainTraits, Traits>) {
        if (PlainTraits::kSmemBytes <= max_dynamic_smem(params.device)) {
          return launch_bwd_dkdv<PlainTraits, false, false>(params, stream);
        }
      }
    }
    launch_bwd_dkdv<Traits, kExtras, kDropout>(params, stream);
  });

  if (params.deterministic) {
    constexpr TileShape tq = bwd_dq_tile(kHeadDim);
    using DqTraits = FwdKernelTraits<kHeadDim, tq.block_m, tq.block_n, tq.warps, Element>;
    constexpr int kSmem = bwd_dq_smem_bytes<DqTraits>();
    static_assert(kSmem <= 163 * 1024, "must fit an sm_80 thread block");
    const int m_blocks = (params.seqlen_q + tq.block_m - 1) / tq.block_m;
    with_bwd_extras_and_dropout(params, [&](auto extras, auto dropout) {
      constexpr auto kernel = &flash_bwd_dq_kernel<DqTraits, decltype(extras)::value, decltype(dropout)::value>;
      allow_dynamic_smem<kernel, kSmem>(params.device);
      if (m_blocks > 0) kernel<<<dim3(m_blocks, params.b, params.h), DqTraits::kNThreads, kSmem, stream>>>(params);
    });
  } else if (row_blocks > 0) {
    flash_bwd_convert_dq_kernel<kHeadDim, Element><<<row_grid, kBwdRowWarps * 32, 0, stream>>>(params);
  }
}

template <int kHeadDim, bool kIsBf16>
void run_bwd(const BwdParams& params, cudaStream_t stream) {
  run_bwd_impl<kHeadDim, std::conditional_t<kIsBf16, cutlass::bfloat16_t, cutlass::half_t>>(params, stream);
}

}  // namespace flash
