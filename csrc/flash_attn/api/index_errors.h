// Bad index values (cache_seqlens, cache_leftpad, cache_batch_idx, block_table entries) reach the
// user as an error naming the argument without a device-to-host copy or a synchronisation on the
// call's path: the kernels clamp such values and set a word per argument in mapped host memory
// (src/params/index_errors.h), and every entry point first reads the words the device's earlier
// kernels may have set. So the error surfaces at the first call on the device after the bad call's
// kernels ran, or at check_index_errors (which synchronises). FLASH_ATTN_STRICT_INDEX_CHECKS=1
// synchronises after each kv-cache call instead, so the error names the call that had the bad
// values (debugging; not while a CUDA graph is captured).
#pragma once

#include <cuda_runtime_api.h>

namespace flash_api {

// The device's error words as the kernels see them (allocated on first use, then cached).
unsigned* index_error_words(int device);

// Raises an error naming each argument some kernel on `device` reported since the last check, and
// clears the reports. A read of host memory: no copy, no synchronisation.
void raise_pending_index_errors(int device);

// Synchronises the current device, then raises as raise_pending_index_errors.
void check_index_errors();

// FLASH_ATTN_STRICT_INDEX_CHECKS=1: after a kv-cache launch, synchronise `stream` (unless it is
// capturing a CUDA graph) and raise right away.
void strict_index_check(int device, cudaStream_t stream);

}  // namespace flash_api
