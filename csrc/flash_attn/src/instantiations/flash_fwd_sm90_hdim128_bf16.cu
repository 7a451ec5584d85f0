// Hopper forward, head dim 128, bf16. Compiled for sm_90a only; not yet registered with the
// dispatcher (see sm90/fwd_kernel.h).
#include "sm90/fwd_launch.h"

namespace flash {
template void run_fwd_sm90<128, true>(const FwdParams&, cudaStream_t);
}  // namespace flash
