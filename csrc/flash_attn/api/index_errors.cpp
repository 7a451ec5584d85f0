// Mapped host words for the kernels' reports of bad index values (index_errors.h says why).
#include "api/index_errors.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/util/Exception.h>

#include "params/index_errors.h"

namespace flash_api {

namespace {

constexpr int kMaxDevices = 64;
std::atomic<unsigned*> g_words[kMaxDevices] = {};

const char* describe(int error) {
  switch (error) {
    case flash::kSeqlensOutOfRange:
      return "cache_seqlens (+ the new k/v rows) / seqused_k must lie in [0, the cache's rows per sequence]";
    case flash::kLeftpadOutOfRange:
      return "cache_leftpad must lie in [0, cache_seqlens]";
    case flash::kCacheBatchIdxOutOfRange:
      return "cache_batch_idx must lie in [0, the cache's batch size)";
    default:
      return "block_table entries in use must lie in [0, the number of pages in the paged k/v cache)";
  }
}

}  // namespace

unsigned* index_error_words(int device) {
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "flash_attn supports CUDA devices 0..63, got device ",
              std::to_string(device));
  unsigned* words = g_words[device].load(std::memory_order_acquire);
  if (words != nullptr) return words;
  static std::mutex mutex;
  std::lock_guard<std::mutex> lock(mutex);
  words = g_words[device].load(std::memory_order_relaxed);
  if (words == nullptr) {
    // A first call inside a CUDA graph capture may allocate: host allocations are not stream work,
    // so relax the capture mode around it.
    cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
    C10_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode));
    void* host = nullptr;
    const cudaError_t status =
        cudaHostAlloc(&host, flash::kNumIndexErrors * sizeof(unsigned), cudaHostAllocMapped | cudaHostAllocPortable);
    C10_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode));
    C10_CUDA_CHECK(status);
    std::memset(host, 0, flash::kNumIndexErrors * sizeof(unsigned));
    // With unified addressing (every 64-bit platform CUDA supports) the device sees the same address.
    words = static_cast<unsigned*>(host);
    g_words[device].store(words, std::memory_order_release);
  }
  return words;
}

void raise_pending_index_errors(int device) {
  if (device < 0 || device >= kMaxDevices) return;
  volatile unsigned* words = g_words[device].load(std::memory_order_acquire);
  if (words == nullptr) return;
  unsigned any = 0;
  for (int i = 0; i < flash::kNumIndexErrors; ++i) any |= words[i];
  if (any == 0) return;
  std::string message = "flash_attn: a kernel of an earlier call on cuda:" + std::to_string(device) +
                        " read out-of-range index values (clamped so memory stayed in bounds; that call's output "
                        "is undefined):";
  for (int i = 0; i < flash::kNumIndexErrors; ++i) {
    if (words[i] != 0) {
      message += std::string(" ") + describe(i) + ";";
      words[i] = 0;
    }
  }
  TORCH_CHECK(false, message);
}

void check_index_errors() {
  const int device = c10::cuda::current_device();
  C10_CUDA_CHECK(cudaDeviceSynchronize());
  raise_pending_index_errors(device);
}

void strict_index_check(int device, cudaStream_t stream) {
  static const bool strict = [] {
    const char* e = std::getenv("FLASH_ATTN_STRICT_INDEX_CHECKS");
    return e != nullptr && std::string(e) == "1";
  }();
  if (!strict) return;
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) return;
  C10_CUDA_CHECK(cudaStreamSynchronize(stream));
  raise_pending_index_errors(device);
}

}  // namespace flash_api
