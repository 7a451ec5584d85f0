// Argument checks of the forward entry points. Checks that need no GPU run before the device
// checks, so CPU tests reach them.
#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "api/common.h"

// CUDA architectures compiled in, from setup.py (e.g. 80,90).
#ifndef FLASH_ATTN_ARCHS_LIST
#define FLASH_ATTN_ARCHS_LIST
#endif

namespace flash_api {

std::string shape_str(const Tensor& t) {
  std::string out = "(";
  for (int64_t i = 0; i < t.dim(); ++i) out += (i ? ", " : "") + std::to_string(t.size(i));
  return out + (t.dim() == 1 ? ",)" : ")");
}

void check_qkv_dtypes(const Tensor& q, const Tensor& k, const Tensor& v) {
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16, "q must have dtype torch.float16 or torch.bfloat16, got ",
              c10::toString(dt));
  TORCH_CHECK(k.scalar_type() == dt, "k must have the same dtype as q, got ", c10::toString(k.scalar_type()), " and ",
              c10::toString(dt));
  TORCH_CHECK(v.scalar_type() == dt, "v must have the same dtype as q, got ", c10::toString(v.scalar_type()), " and ",
              c10::toString(dt));
  TORCH_CHECK(q.stride(-1) == 1, "q must have contiguous last dimension");
  TORCH_CHECK(k.stride(-1) == 1, "k must have contiguous last dimension");
  TORCH_CHECK(v.stride(-1) == 1, "v must have contiguous last dimension");
}

bool vector_aligned(const Tensor& t) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int64_t i = 0; i + 1 < t.dim(); ++i) {
    if (t.size(i) > 1 && t.stride(i) % 8 != 0) return false;
  }
  return true;
}

bool tma_compatible(const void* ptr, std::initializer_list<int64_t> strides) {
  if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return false;
  for (int64_t s : strides) {
    if (s <= 0 || s % 8 != 0) return false;
  }
  return true;
}

Tensor with_kernel_layout(const Tensor& t) {
  if (t.dim() == 0) return t;
  const Tensor dense_rows = t.stride(-1) != 1 ? t.contiguous() : t;
  // A contiguous view at an odd offset stays where it is under contiguous(): clone it.
  return vector_aligned(dense_rows) ? dense_rows : dense_rows.clone(at::MemoryFormat::Contiguous);
}

void check_head_dims(int head_size, int num_heads, int num_heads_k) {
  TORCH_CHECK(head_size <= 256, "head_dim must be at most 256, got ", std::to_string(head_size));
  TORCH_CHECK(head_size % 8 == 0 && head_size > 0, "head_dim must be a positive multiple of 8, got ", std::to_string(head_size),
              " (flash_attn's Python functions pad other sizes)");
  TORCH_CHECK(num_heads_k > 0 && num_heads % num_heads_k == 0, "num_heads must be divisible by num_heads_k, got ",
              std::to_string(num_heads), " and ", std::to_string(num_heads_k));
}

void check_dropout_p(double p_dropout) {
  TORCH_CHECK(p_dropout >= 0.0 && p_dropout < 1.0, "dropout_p must be in [0, 1), got ", std::to_string(p_dropout));
}

void check_options(float p_dropout, bool return_softmax, int window_left, int window_right, float softcap,
                   int num_splits) {
  check_dropout_p(p_dropout);
  // Upstream's condition and message: the probabilities are returned only with dropout.
  TORCH_CHECK(!return_softmax || p_dropout > 0.f, "return_softmax is only supported when p_dropout > 0.0");
  TORCH_CHECK(window_left >= -1, "window_size_left must be >= -1, got ", std::to_string(window_left));
  TORCH_CHECK(window_right >= -1, "window_size_right must be >= -1, got ", std::to_string(window_right));
  TORCH_CHECK(softcap >= 0.f, "softcap must be >= 0, got ", std::to_string(softcap));
  TORCH_CHECK(num_splits >= 0, "num_splits must be >= 0 (0 = heuristic), got ", std::to_string(num_splits));
}

void check_alibi(const OptTensor& alibi, int batch, int num_heads) {
  if (!alibi) return;
  TORCH_CHECK(alibi->scalar_type() == at::kFloat, "alibi_slopes must have dtype torch.float32");
  TORCH_CHECK(alibi->stride(-1) == 1, "alibi_slopes must have contiguous last dimension");
  TORCH_CHECK(alibi->sizes() == at::IntArrayRef({num_heads}) || alibi->sizes() == at::IntArrayRef({batch, num_heads}),
              "alibi_slopes must have shape (num_heads,) or (batch_size, num_heads), got ", shape_str(*alibi));
}

void check_int32_vector(const Tensor& t, const char* name, int64_t numel) {
  TORCH_CHECK(t.scalar_type() == at::kInt, name, " must have dtype torch.int32, got ", c10::toString(t.scalar_type()));
  TORCH_CHECK(t.dim() == 1 && t.numel() == numel, name, " must have shape (", std::to_string(numel), ",), got ", shape_str(t));
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_on_device(const Tensor& t, const char* name, const Tensor& q) {
  TORCH_CHECK(t.is_cuda(), name, " must be on a CUDA device");
  TORCH_CHECK(t.device() == q.device(), name, " must be on the same device as q");
}

void check_out(const Tensor& out, const Tensor& q) {
  TORCH_CHECK(out.scalar_type() == q.scalar_type(), "out must have the same dtype as q");
  TORCH_CHECK(out.sizes() == q.sizes(), "out must have the same shape as q, got ", shape_str(out), " and ", shape_str(q));
  TORCH_CHECK(out.stride(-1) == 1, "out must have contiguous last dimension");
  check_vector_aligned(out, "out");
}

void check_vector_aligned(const Tensor& t, const char* name) {
  TORCH_CHECK(vector_aligned(t), name, " is written in place with 16-byte vector stores: its data pointer must be "
              "16-byte aligned and its strides (but the last) multiples of 8 elements");
}

flash::FwdLauncher find_kernel(int head_size, bool is_bf16) {
  const int kernel_hdim = flash::round_up_headdim(head_size);
  flash::FwdLauncher launcher = flash::find_fwd(kernel_hdim, is_bf16);
  TORCH_CHECK(launcher.run != nullptr, "head_dim ", std::to_string(head_size), " (kernel head dim ", std::to_string(kernel_hdim), ", ",
              is_bf16 ? "bf16" : "fp16",
              ") was not compiled in this build; rebuild with FLASH_ATTN_HEADDIMS / FLASH_ATTN_DTYPES including it");
  return launcher;
}

std::pair<int, int> normalize_window(bool is_causal, int window_left, int window_right, int max_seqlen_q,
                                     int max_seqlen_k) {
  if (max_seqlen_q == 1 && is_causal) is_causal = false;
  if (is_causal) window_right = 0;
  if (window_left >= max_seqlen_k) window_left = -1;
  if (window_right >= max_seqlen_k) window_right = -1;
  return {window_left, window_right};
}

std::string unsupported_gpu_message(const std::string& gpu_name, int major, int minor) {
  const std::vector<int> archs{FLASH_ATTN_ARCHS_LIST};
  const int capability = major * 10 + minor;
  const int lowest = archs.empty() ? 0 : *std::min_element(archs.begin(), archs.end());
  if (capability >= 80 && !archs.empty() && capability >= lowest) return "";
  std::string built;
  for (int a : archs) built += (built.empty() ? "sm_" : ", sm_") + std::to_string(a);
  std::string message = "flash_attn does not run on " + gpu_name + " (compute capability " + std::to_string(major) +
                        "." + std::to_string(minor) + "): ";
  if (capability < 80) {
    message += "its kernels need compute capability 8.0 (Ampere) or newer";
  } else {
    message += "this build compiled " + (built.empty() ? std::string("no architecture") : built) +
               "; rebuild with FLASH_ATTN_CUDA_ARCHS including " + std::to_string(capability);
  }
  return message + " (built: " + (built.empty() ? std::string("none") : built) + ")";
}

}  // namespace flash_api
