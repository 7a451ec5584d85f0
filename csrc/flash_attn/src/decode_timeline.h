// Diagnostics only (setup.py: FLASH_ATTN_DECODE_TIMELINE=1; benchmarks/decode_timeline.py reads
// the dump): per decode thread block, the SM it ran on and %globaltimer / clock64 at marks --
// 0 kernel start, 1 sequence lengths loaded, 2 first sub-block landed, 3 main loop done, 4 exit,
// and with a cluster merge 5 warps merged (before the first cluster barrier), 6 past it.
// Shows where a decode launch loses time to the bandwidth floor: waves, unequal block speeds,
// prologue and epilogue (NOTES 39). Without the macro every hook compiles to nothing.
#pragma once

#ifdef FLASH_ATTN_DECODE_TIMELINE
#include <cstdio>
#include <cstdlib>
#include <vector>

#include <cuda_runtime.h>
#endif

namespace flash {

#ifdef FLASH_ATTN_DECODE_TIMELINE
constexpr int kTimelineWords = 16;  // per block: smid, then (globaltimer, clock64) per mark
static __device__ unsigned long long* g_decode_timeline = nullptr;

__device__ __forceinline__ void timeline_mark(int mark) {
  if (threadIdx.x != 0 || g_decode_timeline == nullptr) return;
  unsigned long long ns;
  const unsigned long long cycles = clock64();
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns));
  unsigned smid;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));
  const long long block = (static_cast<long long>(blockIdx.z) * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
  unsigned long long* record = g_decode_timeline + block * kTimelineWords;
  record[0] = smid;
  record[1 + 2 * mark] = ns;
  record[2 + 2 * mark] = cycles;
}

// Host side, around one launch: clears the records before it and, when FLASH_ATTN_TIMELINE_FILE
// names a file, synchronizes after it and writes the grid (3 x uint32) and the records there.
// One buffer per translation unit (the device symbol is static): enough for 1M blocks.
class TimelineRecorder {
 public:
  TimelineRecorder(dim3 grid, cudaStream_t stream) : grid_(grid), stream_(stream) {
    static unsigned long long* buffer = nullptr;
    if (buffer == nullptr) {
      cudaMalloc(&buffer, (size_t(1) << 20) * kTimelineWords * sizeof(unsigned long long));
      cudaMemcpyToSymbol(g_decode_timeline, &buffer, sizeof(buffer));
    }
    buffer_ = buffer;
    words_ = size_t(grid.x) * grid.y * grid.z * kTimelineWords;
    cudaMemsetAsync(buffer_, 0, words_ * sizeof(unsigned long long), stream_);
  }
  ~TimelineRecorder() {
    const char* path = std::getenv("FLASH_ATTN_TIMELINE_FILE");
    if (path == nullptr) return;
    cudaStreamSynchronize(stream_);
    std::vector<unsigned long long> host(words_);
    cudaMemcpy(host.data(), buffer_, words_ * sizeof(unsigned long long), cudaMemcpyDeviceToHost);
    if (FILE* f = std::fopen(path, "wb")) {
      const unsigned dims[3] = {grid_.x, grid_.y, grid_.z};
      std::fwrite(dims, sizeof(unsigned), 3, f);
      std::fwrite(host.data(), sizeof(unsigned long long), words_, f);
      std::fclose(f);
    }
  }
  TimelineRecorder(const TimelineRecorder&) = delete;
  TimelineRecorder& operator=(const TimelineRecorder&) = delete;

 private:
  dim3 grid_;
  cudaStream_t stream_;
  unsigned long long* buffer_ = nullptr;
  size_t words_ = 0;
};

#define FLASH_DECODE_TIMELINE_MARK(mark) ::flash::timeline_mark(mark)
#define FLASH_DECODE_TIMELINE_RECORD(grid, stream) ::flash::TimelineRecorder timeline_recorder_((grid), (stream))
#else
#define FLASH_DECODE_TIMELINE_MARK(mark) ((void)0)
#define FLASH_DECODE_TIMELINE_RECORD(grid, stream) ((void)0)
#endif

}  // namespace flash
