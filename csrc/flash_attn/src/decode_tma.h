// TMA loads of the plain decode kernel's K/V sub-blocks (sm_90). A warp's full sub-block is two
// bulk tensor copies issued by one lane (K and V) that complete on the
// warp's mbarrier for that ring stage, in place of 32 cp.async per lane and their 64-bit address
// chains: the copy block was ~135 of the ~630 instructions of the loop, and at one warp per
// scheduler a decode block's speed follows its instruction count (NOTES 54).
//
// The shared K/V tile is tile_to_shape(Swizzle<3,3,3> o (8, 64), (kSubN, kHeadDim)): each
// 64-column half is kSubN rows of 128 bytes with the 16-byte chunk index XORed by row % 8, which
// is TMA's 128-byte swizzle for a box of (64 columns, kSubN rows) at a 1024-byte aligned address.
#pragma once

#include <cstdint>

#include <cuda.h>
#include <cuda_runtime.h>
#include <cute/arch/copy_sm90_desc.hpp>
#include <cute/arch/copy_sm90_tma.hpp>
#include <cutlass/arch/barrier.h>

#include "flash_params.h"
#include "tile_sizes.h"

namespace flash {


// The K and V tensor maps of one decode launch: a kernel parameter (__grid_constant__).
struct alignas(64) DecodeTmaMaps {
  CUtensorMap k;
  CUtensorMap v;
};

// Host: the tensor maps of p's K and V.
// False if the driver refuses them (the launch then loads with cp.async).
inline bool encode_decode_tma_maps(const FwdParams& p, int sub_n, bool bf16, DecodeTmaMaps& maps) {
  // The driver entry point, looked up once (the extension does not link libcuda).
  using EncodeFn = decltype(&cuTensorMapEncodeTiled);
  static const EncodeFn encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();
      fn = nullptr;
    }
    return reinterpret_cast<EncodeFn>(fn);
  }();
  if (encode == nullptr) return false;
  constexpr int kElemBytes = 2;  // fp16 / bf16
  // Dims (64 columns, rows, d / 64 column blocks, h_k, batch entries): a (64, sub_n, d / 64, 1, 1)
  // box lands as the column blocks one after another, each sub_n rows of 128 bytes -- the shared
  // tile's layout -- so one copy moves a whole K or V sub-block.
  auto one = [&](CUtensorMap& map, const void* ptr, int64_t head_stride, int64_t row_stride, int64_t batch_stride) {
    const cuuint64_t dims[5] = {cuuint64_t(kDecodeTmaBoxCols), cuuint64_t(p.kv_rows), cuuint64_t(p.d / kDecodeTmaBoxCols),
                                cuuint64_t(p.h_k), cuuint64_t(p.kv_batches)};
    // A batch dim of one still needs a legal stride.
    const cuuint64_t strides[4] = {cuuint64_t(row_stride * kElemBytes), cuuint64_t(kDecodeTmaBoxCols * kElemBytes),
                                   cuuint64_t(head_stride * kElemBytes),
                                   cuuint64_t((p.kv_batches > 1 ? batch_stride : row_stride) * kElemBytes)};
    const cuuint32_t box[5] = {kDecodeTmaBoxCols, cuuint32_t(sub_n), cuuint32_t(p.d / kDecodeTmaBoxCols), 1, 1};
    const cuuint32_t elem_strides[5] = {1, 1, 1, 1, 1};
    return encode(&map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 5,
                  const_cast<void*>(ptr), dims, strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                  CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                  CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
  };
  return one(maps.k, p.k_ptr, p.k_head_stride, p.k_row_stride, p.k_batch_stride) &&
         one(maps.v, p.v_ptr, p.v_head_stride, p.v_row_stride, p.v_batch_stride);
}

// Device: one warp's ring-stage barriers. Lane 0 initialises them (one arrival per phase: its
// arrive.expect_tx); only this warp waits on them.
__device__ __forceinline__ void init_tma_barriers(uint64_t* bars, int stages, int lane) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (lane == 0) {
    for (int s = 0; s < stages; ++s) cute::initialize_barrier(bars[s], 1);
    cutlass::arch::fence_barrier_init();
  }
  __syncwarp();
#endif
}

// Device, one lane: K and V rows [row, row + kSubN) of kv head `head` in batch entry `batch` into
// the stage's shared tiles, completing on `bar`.
template <int kSubN, int kHeadDim, typename Element>
__device__ __forceinline__ void tma_load_kv(const DecodeTmaMaps& maps, uint64_t& bar, Element* smem_k, Element* smem_v,
                                            int head, int row, int batch) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr uint64_t kHint = uint64_t(cute::TMA::CacheHintSm90::EVICT_NORMAL);
  cute::set_barrier_transaction_bytes(bar, 2 * kSubN * kHeadDim * sizeof(Element));
  cute::SM90_TMA_LOAD_5D::copy(&maps.k, &bar, kHint, smem_k, 0, row, 0, head, batch);
  cute::SM90_TMA_LOAD_5D::copy(&maps.v, &bar, kHint, smem_v, 0, row, 0, head, batch);
#endif
}

__device__ __forceinline__ void wait_tma_stage(uint64_t& bar, int phase) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cute::wait_barrier(bar, phase);
#endif
}

}  // namespace flash
