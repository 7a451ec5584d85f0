// Index values the kernels read from user tensors (cache_seqlens / seqused_k, cache_leftpad,
// cache_batch_idx, block_table entries) may be out of range. The kernels clamp them, so a bad value
// never touches memory out of bounds, and record which argument was bad in one word per argument of
// mapped host memory; the dispatcher reads those words at its next call on the device and raises an
// error naming the argument (api/index_errors.cpp). No device-to-host copy, no synchronisation.
// Plain C++: shared by the dispatcher and the kernels.
#pragma once

namespace flash {

enum IndexError : int {
  kSeqlensOutOfRange = 0,
  kLeftpadOutOfRange = 1,
  kCacheBatchIdxOutOfRange = 2,
  kBlockTableOutOfRange = 3,
  kNumIndexErrors = 4,
};

}  // namespace flash
