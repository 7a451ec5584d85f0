// Host-side launch of the combine kernel (kernels/combine_kernel.h) after a split launch, shared by
// the SM80 split and decode kernels (launch/fwd_launch.h) and the Hopper forward's split
// instantiation (sm90/fwd_launch.h).
#pragma once

#include <cuda_runtime.h>

#include "kernels/combine_kernel.h"
#include "params/fwd_params.h"

namespace flash {

// The combine kernel is launched as a programmatic dependent of the split kernel on sm_90+: its
// launch overlaps the split kernel's tail and it waits for the partials inside
// (cudaGridDependencySynchronize), which hides most of a second launch's latency at decode.
template <int kHeadDim, typename Element>
void launch_combine_kernel(const FwdParams& params, cudaStream_t stream) {
  const int rows = params.h * params.total_q_rows;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3((rows + kCombineWarps - 1) / kCombineWarps);
  config.blockDim = dim3(kCombineWarps * 32);
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  if (params.allow_pdl) {
    config.attrs = attribute;
    config.numAttrs = 1;
  }
  cudaLaunchKernelEx(&config, flash_fwd_combine_kernel<kHeadDim, Element>, params);
}

}  // namespace flash
