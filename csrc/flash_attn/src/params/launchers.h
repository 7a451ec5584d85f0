// Entry points of the compiled kernels, one per (head dim, dtype), as seen by the dispatcher.
// Free of CUDA kernels and CUTLASS so flash_api.cpp compiles without them.
#pragma once

#include <cuda_runtime_api.h>

#include "params/fwd_params.h"
#include "plan/tile_sizes.h"

namespace flash {

// Runs the forward (split kernel + combine when params.split_kernel) on `stream`. Defined in
// flash_fwd_launch_template.h, instantiated in the generated instantiations/*.cu files.
template <int kHeadDim, bool kIsBf16>
void run_fwd(const FwdParams& params, cudaStream_t stream);

// Thread-block clusters of `cluster_size` decode blocks (of the decode variant `params` selects)
// that the current device can hold at once; 0 when it cannot launch such clusters. Cached.
template <int kHeadDim, bool kIsBf16>
int max_decode_clusters(const FwdParams& params, int cluster_size);

// The Hopper forward (sm90/): warp-specialised, TMA + wgmma, for the dense forward on compute
// capability 9.0, unsplit or (params.split_kernel) split with the combine kernel after it.
// Defined in sm90/fwd_launch.h, instantiated in
// instantiations/flash_fwd_sm90_*.cu, which are compiled only when the build targets sm_90.
template <int kHeadDim, bool kIsBf16>
void run_fwd_sm90(const FwdParams& params, cudaStream_t stream);

// One (head dim, dtype)'s entry points. run_sm90 is null where this build has no Hopper kernel.
struct FwdLauncher {
  void (*run)(const FwdParams&, cudaStream_t) = nullptr;
  int (*max_decode_clusters)(const FwdParams&, int cluster_size) = nullptr;
  void (*run_sm90)(const FwdParams&, cudaStream_t) = nullptr;
};

constexpr int kNumKernelHeadDims = sizeof(kKernelHeadDims) / sizeof(kKernelHeadDims[0]);

constexpr int headdim_index(int kernel_headdim) {
  for (int i = 0; i < kNumKernelHeadDims; ++i) {
    if (kKernelHeadDims[i] == kernel_headdim) return i;
  }
  return -1;
}

// Kernels present in this build. Each instantiation file registers itself at load time, so a
// reduced build (FLASH_ATTN_HEADDIMS / FLASH_ATTN_DTYPES) needs no list kept in sync by hand.
inline FwdLauncher fwd_launchers[kNumKernelHeadDims][2] = {};

// The SM80 and Hopper files of one (head dim, dtype) register in either order.
inline bool register_fwd(int kernel_headdim, bool is_bf16, const FwdLauncher& launcher) {
  FwdLauncher& entry = fwd_launchers[headdim_index(kernel_headdim)][is_bf16];
  entry.run = launcher.run;
  entry.max_decode_clusters = launcher.max_decode_clusters;
  return true;
}

inline bool register_fwd_sm90(int kernel_headdim, bool is_bf16, void (*run_sm90)(const FwdParams&, cudaStream_t)) {
  fwd_launchers[headdim_index(kernel_headdim)][is_bf16].run_sm90 = run_sm90;
  return true;
}

inline FwdLauncher find_fwd(int kernel_headdim, bool is_bf16) {
  const int i = headdim_index(kernel_headdim);
  return i < 0 ? FwdLauncher{} : fwd_launchers[i][is_bf16];
}

}  // namespace flash

#include "params/bwd_params.h"

namespace flash {

// Runs the backward (preprocess, dK/dV with dQ atomics or the deterministic dQ kernel, dQ
// conversion) on `stream`. Defined in launch/bwd_launch.h, instantiated in the generated
// instantiations/flash_bwd_*.cu files.
template <int kHeadDim, bool kIsBf16>
void run_bwd(const BwdParams& params, cudaStream_t stream);

// The Hopper backward (sm90/bwd_kernel.h): TMA + wgmma, dQ by atomics into the fp32 accumulator,
// for the dense, non-deterministic backward on compute capability 9.0. Defined in
// sm90/bwd_launch.h, instantiated in instantiations/flash_bwd_sm90_*.cu, which are compiled only
// when the build targets sm_90.
template <int kHeadDim, bool kIsBf16>
void run_bwd_sm90(const BwdParams& params, cudaStream_t stream);

// One (head dim, dtype)'s backward entry points. run_sm90 is null where this build has no Hopper
// backward.
struct BwdLauncher {
  void (*run)(const BwdParams&, cudaStream_t) = nullptr;
  void (*run_sm90)(const BwdParams&, cudaStream_t) = nullptr;
};

// Backward kernels present in this build, registered at load time like the forward's.
inline BwdLauncher bwd_launchers[kNumKernelHeadDims][2] = {};

// The SM80 and Hopper files of one (head dim, dtype) register in either order.
inline bool register_bwd(int kernel_headdim, bool is_bf16, const BwdLauncher& launcher) {
  bwd_launchers[headdim_index(kernel_headdim)][is_bf16].run = launcher.run;
  return true;
}

inline bool register_bwd_sm90(int kernel_headdim, bool is_bf16, void (*run_sm90)(const BwdParams&, cudaStream_t)) {
  bwd_launchers[headdim_index(kernel_headdim)][is_bf16].run_sm90 = run_sm90;
  return true;
}

inline BwdLauncher find_bwd(int kernel_headdim, bool is_bf16) {
  const int i = headdim_index(kernel_headdim);
  return i < 0 ? BwdLauncher{} : bwd_launchers[i][is_bf16];
}

}  // namespace flash
