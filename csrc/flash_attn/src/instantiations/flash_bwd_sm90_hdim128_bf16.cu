// Hopper backward, head dim 128, bf16. Compiled for sm_90a (setup.py adds this file only when the
// build targets sm_90); on other targets the kernel body is empty and the dispatcher never picks it.
#include "params/launchers.h"
#include "sm90/bwd_launch.h"

namespace flash {
template void run_bwd_sm90<128, true>(const BwdParams&, cudaStream_t);
static const bool kRegisteredSm90 = register_bwd_sm90(128, true, &run_bwd_sm90<128, true>);
}  // namespace flash
