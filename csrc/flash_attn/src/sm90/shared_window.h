// Shared-memory tiles addressed by their 32-bit shared-window addresses.
//
// A tile reached through a generic pointer (a SharedStorage member) is read and written by nvcc
// with generic loads and stores (LD.E / ST.E) and with its swizzle computed on 64-bit addresses:
// nvcc does not see that the pointer is shared. in_shared_window holds the tile's shared-window
// address (cast_smem_ptr_to_uint) in a pointer of the tile's type, which CuTe may offset and
// swizzle but nothing dereferences; window_address turns an element's address in such a tile back
// into the 32-bit operand of ld.shared / st.shared.
#pragma once

#include <cstdint>

#include <cute/arch/util.hpp>

namespace flash {

template <typename T>
__device__ __forceinline__ T* in_shared_window(T* tile) {
  return reinterpret_cast<T*>(uintptr_t(cute::cast_smem_ptr_to_uint(tile)));
}

__device__ __forceinline__ uint32_t window_address(const void* element_in_window) {
  return uint32_t(reinterpret_cast<uintptr_t>(element_in_window));
}

__device__ __forceinline__ uint4 load_shared_16_bytes(uint32_t address) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(address)
               : "memory");
  return v;
}

__device__ __forceinline__ void store_shared_float2(uint32_t address, float x, float y) {
  asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(address), "f"(x), "f"(y) : "memory");
}

}  // namespace flash
