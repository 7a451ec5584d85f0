// Hopper backward, head dim 128, bf16. Compiled for sm_90a; on other targets the kernel body is
// empty. Not registered with the dispatcher yet: api/bwd.cpp never calls it (see docs/SM90_BACKWARD.md).
#include "sm90/bwd_launch.h"

namespace flash {
template void run_bwd_sm90<128, true>(const BwdParams&, cudaStream_t);
}  // namespace flash
