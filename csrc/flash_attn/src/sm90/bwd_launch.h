// Host-side launch of the Hopper backward for one (head dim, dtype):
//   1. flash_bwd_preprocess_kernel (kernels/bwd_row_kernels.h, shared with the SM80 path):
//      D = rowsum(dO * O); zeroes the fp32 dQ accumulator
//   2. flash_bwd_sm90_kernel, grid (key blocks, batch, kv heads), a producer warpgroup and two or
//      three consumer warpgroups: dK, dV, and dQ added into the accumulator by atomics; its
//      deterministic variant when params.deterministic (the key blocks add in a fixed order,
//      sm90/bwd_dq_order.h), each with dropout when the forward had it
//   3. flash_bwd_convert_dq_kernel: the accumulator (times scale_grad) to dQ
// The caller allocates dq_accum as for the SM80 atomic path ([h][total_q_rows][kernel head dim]
// fp32) and, when deterministic, the zeroed dq_add_count array (batch x h x query blocks of
// sm90_bwd_block_m(kernel head dim) ints).
// Included only by the instantiations/flash_bwd_sm90_*.cu files.
#pragma once

#include <stdexcept>
#include <type_traits>

#include <cuda_runtime.h>

#include "launch/dynamic_smem.h"
#include "params/bwd_params.h"
#include "kernels/bwd_row_kernels.h"
#include "sm90/bwd_kernel.h"
#include "sm90/bwd_kernel_traits.h"

namespace flash {

template <typename Traits>
void launch_bwd_sm90_kernel(const BwdParams& params, cudaStream_t stream) {
  const Sm90BwdArgs<Traits> args = make_sm90_bwd_args<Traits>(params);
  constexpr auto kernel = &flash_bwd_sm90_kernel<Traits>;
  allow_dynamic_smem<kernel, Traits::kSmemBytes>(params.device);
  const int n_blocks = (params.seqlen_k + Traits::kBlockN - 1) / Traits::kBlockN;
  // Block x = 0 starts first: key block 0 (the one most query blocks see under a causal mask), or
  // the last key block in deterministic mode (bwd_key_block).
  if (n_blocks > 0) {
    kernel<<<dim3(n_blocks, params.b, params.h_k), Traits::kNThreads, Traits::kSmemBytes, stream>>>(args);
  }
}

template <int kHeadDim, bool kIsBf16>
void run_bwd_sm90(const BwdParams& params, cudaStream_t stream) {
  using Element = std::conditional_t<kIsBf16, cutlass::bfloat16_t, cutlass::half_t>;
  if (params.dq_accum_ptr == nullptr || (params.deterministic && params.dq_add_count_ptr == nullptr)) {
    throw std::invalid_argument("the Hopper backward needs the fp32 dQ accumulator (and, when deterministic, "
                                "the dQ add counts)");
  }
  const int row_blocks = (params.seqlen_q + kBwdRowsPerBlock - 1) / kBwdRowsPerBlock;
  const dim3 row_grid(row_blocks, params.b, params.h);
  if (row_blocks > 0) {
    flash_bwd_preprocess_kernel<kHeadDim, Element><<<row_grid, kBwdRowWarps * 32, 0, stream>>>(params);
  }

  const bool dropout = params.dropout_keep_threshold != 0;
  if (params.deterministic) {
    if (dropout) {
      launch_bwd_sm90_kernel<Sm90BwdTraits<kHeadDim, kIsBf16, true, true>>(params, stream);
    } else {
      launch_bwd_sm90_kernel<Sm90BwdTraits<kHeadDim, kIsBf16, true>>(params, stream);
    }
  } else if (dropout) {
    launch_bwd_sm90_kernel<Sm90BwdTraits<kHeadDim, kIsBf16, false, true>>(params, stream);
  } else {
    launch_bwd_sm90_kernel<Sm90BwdTraits<kHeadDim, kIsBf16, false>>(params, stream);
  }

  if (row_blocks > 0) {
    flash_bwd_convert_dq_kernel<kHeadDim, Element><<<row_grid, kBwdRowWarps * 32, 0, stream>>>(params);
  }
}

}  // namespace flash
