// Raising a kernel's dynamic shared-memory limit once per device, shared by every launcher.
#pragma once

#include <atomic>

#include <cuda_runtime.h>

namespace flash {

// Raise a kernel's dynamic shared memory limit to kBytes (what its launches always ask for), once
// per device: the template parameters make the static flags distinct for every instantiation.
template <auto Kernel, int kBytes>
void allow_dynamic_smem(int device) {
  if constexpr (kBytes > 48 * 1024) {
    static std::atomic<bool> raised[64] = {};  // per device
    std::atomic<bool>& done = raised[device & 63];
    if (!done.load(std::memory_order_relaxed)) {
      cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes);
      done.store(true, std::memory_order_relaxed);
    }
  }
}

// The most dynamic shared memory one thread block may opt in to on `device` (sm_80 163 KB, sm_86 and
// sm_89 99 KB, sm_90 227 KB), asked once per device.
inline int max_dynamic_smem(int device) {
  static std::atomic<int> cached[64] = {};  // per device; 0 until asked
  std::atomic<int>& c = cached[device & 63];
  int bytes = c.load(std::memory_order_relaxed);
  if (bytes == 0) {
    cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    c.store(bytes, std::memory_order_relaxed);
  }
  return bytes;
}

}  // namespace flash
