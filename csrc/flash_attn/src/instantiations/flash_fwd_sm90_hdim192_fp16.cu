// Hopper forward, head dim 192, fp16. Compiled for sm_90a (setup.py adds this file only when the
// build targets sm_90); on other targets the kernel body is empty and the dispatcher never picks it.
#include "params/launchers.h"
#include "sm90/fwd_launch.h"

namespace flash {
template void run_fwd_sm90<192, false>(const FwdParams&, cudaStream_t);
static const bool kRegisteredSm90 = register_fwd_sm90(192, false, &run_fwd_sm90<192, false>);
}  // namespace flash
