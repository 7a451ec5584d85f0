// The dispatcher: checks arguments, packs FwdParams, takes the seqlen/ngroups-swap and split-KV
// decisions (heuristics.h) and launches the kernel of the right head dim and dtype.
// Argument checks that need no GPU run before the device checks, so CPU tests exercise them.

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include <ATen/cuda/EmptyTensor.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "src/flash.h"
#include "src/flash_params.h"
#include "src/heuristics.h"
#include "src/kvcache_append.h"

// CUDA architectures compiled in, from setup.py (e.g. 80,90).
#ifndef FLASH_ATTN_ARCHS_LIST
#define FLASH_ATTN_ARCHS_LIST
#endif

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// Error messages pass only strings to TORCH_CHECK (numbers through std::to_string, shapes through
// shape_str): with torch 2.11 on the H100 machine, c10::str streaming an int or an IntArrayRef
// from this extension segfaulted inside std::ostream's number formatting.
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

// A strided last dimension is copied, as upstream's Python wrapper (maybe_contiguous) does; done here
// so the Python hot path needs no stride queries (each costs host time per decode step).
Tensor contiguous_last_dim(const Tensor& t) {
  return t.dim() > 0 && t.stride(-1) != 1 ? t.contiguous() : t;
}

void check_head_dims(int head_size, int num_heads, int num_heads_k) {
  TORCH_CHECK(head_size <= 256, "head_dim must be at most 256, got ", std::to_string(head_size));
  TORCH_CHECK(head_size % 8 == 0 && head_size > 0, "head_dim must be a positive multiple of 8, got ", std::to_string(head_size),
              " (flash_attn's Python functions pad other sizes)");
  TORCH_CHECK(num_heads_k > 0 && num_heads % num_heads_k == 0, "num_heads must be divisible by num_heads_k, got ",
              std::to_string(num_heads), " and ", std::to_string(num_heads_k));
}

void check_options(float p_dropout, bool return_softmax, int window_left, int window_right, float softcap,
                   int num_splits) {
  TORCH_CHECK(p_dropout == 0.f, "dropout_p > 0 is not supported by this flash_attn build (forward only, no dropout)");
  TORCH_CHECK(!return_softmax, "return_softmax needs dropout_p > 0, which this build does not support");
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
}

flash::FwdLauncher find_kernel(int head_size, bool is_bf16) {
  const int kernel_hdim = flash::round_up_headdim(head_size);
  flash::FwdLauncher launcher = flash::find_fwd(kernel_hdim, is_bf16);
  TORCH_CHECK(launcher.run != nullptr, "head_dim ", std::to_string(head_size), " (kernel head dim ", std::to_string(kernel_hdim), ", ",
              is_bf16 ? "bf16" : "fp16",
              ") was not compiled in this build; rebuild with FLASH_ATTN_HEADDIMS / FLASH_ATTN_DTYPES including it");
  return launcher;
}

// Causal with one query row attends every key (bottom-right alignment); windows reaching past the
// sequence are unbounded. Returns (left, right), -1 = unbounded.
std::pair<int, int> normalize_window(bool is_causal, int window_left, int window_right, int max_seqlen_q,
                                     int max_seqlen_k) {
  if (max_seqlen_q == 1 && is_causal) is_causal = false;
  if (is_causal) window_right = 0;
  if (window_left >= max_seqlen_k) window_left = -1;
  if (window_right >= max_seqlen_k) window_right = -1;
  return {window_left, window_right};
}

void set_scores(flash::FwdParams& p, float softmax_scale, float softcap) {
  constexpr float kLog2e = 1.4426950408889634f;
  if (softcap > 0.f) {
    p.softcap_in = softmax_scale / softcap;
    p.scale_softmax = softcap;
  } else {
    p.softcap_in = 0.f;
    p.scale_softmax = softmax_scale;
  }
  p.scale_softmax_log2 = p.scale_softmax * kLog2e;
}

void set_tensor(const Tensor& t, const void*& ptr, int64_t& batch_stride, int64_t& row_stride,
                int64_t& head_stride, bool batched) {
  ptr = t.data_ptr();
  batch_stride = batched ? t.stride(0) : 0;
  row_stride = t.stride(-3);
  head_stride = t.stride(-2);
}

// q or out of one query per sequence, (batch, [1,] num_heads, d), seen by the kernel after the
// seqlen/ngroups swap as (batch, groups rows, num_heads / groups heads): query head
// hk * groups + g is row g of kv head hk. Strides only, no view tensors (each costs host time).
void set_swapped_tensor(const Tensor& t, int groups, const void*& ptr, int64_t& batch_stride, int64_t& row_stride,
                        int64_t& head_stride) {
  ptr = t.data_ptr();
  batch_stride = t.stride(0);
  row_stride = t.stride(-2);
  head_stride = groups * t.stride(-2);
}

// Everything after the checks: shared by the padded and the varlen entry points.
struct Call {
  Tensor q, k, v, out;  // the caller's shapes; with swap_groups > 0, q and out are seen swapped
  int batch, num_heads, num_heads_k, seqlen_q, seqlen_k, head_size;  // as the kernel sees them
  bool varlen_q, varlen_k;
  int swap_groups = 0;
};

// Output buffers straight from the CUDA allocator (at::empty's dispatch costs host time per call).
Tensor empty_cuda(at::IntArrayRef sizes, at::ScalarType dtype, const Tensor& like) {
  return Tensor(at::detail::empty_cuda(sizes, dtype, like.device(), std::nullopt));
}

void fill_common(flash::FwdParams& p, const Call& c, const OptTensor& alibi, int window_left, int window_right,
                 float softmax_scale, float softcap) {
  p = {};
  const void* o_const = nullptr;
  if (c.swap_groups > 0) {
    set_swapped_tensor(c.q, c.swap_groups, p.q_ptr, p.q_batch_stride, p.q_row_stride, p.q_head_stride);
    set_swapped_tensor(c.out, c.swap_groups, o_const, p.o_batch_stride, p.o_row_stride, p.o_head_stride);
  } else {
    set_tensor(c.q, p.q_ptr, p.q_batch_stride, p.q_row_stride, p.q_head_stride, !c.varlen_q);
    set_tensor(c.out, o_const, p.o_batch_stride, p.o_row_stride, p.o_head_stride, !c.varlen_q);
  }
  set_tensor(c.k, p.k_ptr, p.k_batch_stride, p.k_row_stride, p.k_head_stride, !c.varlen_k);
  set_tensor(c.v, p.v_ptr, p.v_batch_stride, p.v_row_stride, p.v_head_stride, !c.varlen_k);
  p.o_ptr = const_cast<void*>(o_const);
  p.b = c.batch;
  p.h = c.num_heads;
  p.h_k = c.num_heads_k;
  p.h_h_k_ratio = c.num_heads / c.num_heads_k;
  p.seqlen_q = c.seqlen_q;
  p.seqlen_k = c.seqlen_k;
  p.d = c.head_size;
  set_scores(p, softmax_scale, softcap);
  p.window_left = window_left;
  p.window_right = window_right;
  if (alibi) {
    p.alibi_slopes_ptr = alibi->data_ptr<float>();
    p.alibi_slopes_batch_stride = alibi->dim() == 2 ? alibi->stride(0) : 0;
  }
  p.num_splits = 1;
}

// Per-device facts the plan needs, cached (an attribute query costs a driver call).
struct DeviceInfo {
  int device;
  int sm_count;
  bool pdl;  // programmatic dependent launch (sm_90+)
};

DeviceInfo device_info() {
  static std::atomic<int> cached[64] = {};  // sm_count * 2 + pdl, 0 = not yet queried
  const int device = c10::cuda::current_device();
  int packed = cached[device & 63].load(std::memory_order_relaxed);
  if (packed == 0) {
    int sms = 0, major = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    packed = sms * 2 + (major >= 9 ? 1 : 0);
    cached[device & 63].store(packed, std::memory_order_relaxed);
  }
  return {device, packed / 2, (packed & 1) != 0};
}

// A run-time switch: -1 when the variable is unset or empty, 0 when it is "0", 1 otherwise.
// Callers read it once (a static), never on every call.
int env_switch(const char* name) {
  const char* e = std::getenv(name);
  if (e == nullptr || *e == 0) return -1;
  return std::string(e) == "0" ? 0 : 1;
}

// FLASH_ATTN_COMBINE_PDL=0 launches the combine kernel without programmatic dependent launch: for
// A/B measurements of its host and GPU cost in one build only.
bool combine_pdl_enabled() {
  static const bool enabled = env_switch("FLASH_ATTN_COMBINE_PDL") != 0;
  return enabled;
}

// FLASH_ATTN_DECODE_CLUSTER_MERGE=0 merges decode splits with the combine kernel even where a
// thread-block cluster could: for A/B measurements in one build only.
bool cluster_merge_enabled() {
  static const bool enabled = env_switch("FLASH_ATTN_DECODE_CLUSTER_MERGE") != 0;
  return enabled;
}

// FLASH_ATTN_DECODE_PAIRS=0 launches single-split decode grids without clusters of two: for A/B
// measurements in one build only.
bool pair_clusters_enabled() {
  static const bool enabled = env_switch("FLASH_ATTN_DECODE_PAIRS") != 0;
  return enabled;
}

// Allocates the split-KV partial buffers straight from PyTorch's caching allocator (no sync,
// graph-safe, no tensor object). The returned pointer must live until the launch is enqueued.
c10::DataPtr set_splits(flash::FwdParams& p, const flash::ForwardPlan& plan, int total_q_rows, const DeviceInfo& dev,
                        const flash::FwdLauncher& kernel) {
  const int num_splits = plan.num_splits;
  p.split_kernel = plan.split_kernel;
  p.decode_kernel = plan.decode_kernel;
  p.num_splits = num_splits;
  p.device = dev.device;
  p.allow_pdl = dev.pdl && combine_pdl_enabled();
  p.total_q_rows = total_q_rows;
  // sm_90 (the pdl flag) runs a decode tile's splits as one thread-block cluster that merges them.
  // The plan's rule of thumb (grid <= 0.75 x SMs), then what this device can hold at once: every
  // cluster must be resident, or split 0 of a late cluster waits a whole wave.
  if (plan.cluster_merge && dev.pdl && cluster_merge_enabled()) {
    p.cluster_merge = plan.tiles <= kernel.max_decode_clusters(p, num_splits);  // one cluster per tile
  }
  // One split on sm_90: blocks of consecutive heads in clusters of two, which the hardware places
  // on the two SMs of a TPC; busy TPCs then all carry two blocks (NOTES 55). The grid's head
  // dimension (b * h blocks) must split into whole pairs.
  p.decode_pair_clusters = plan.decode_kernel && num_splits == 1 && dev.pdl && (int64_t(p.b) * p.h) % 2 == 0 &&
                           pair_clusters_enabled();
  if (!plan.split_kernel || (plan.decode_kernel && num_splits == 1) || p.cluster_merge) return {};  // no partials
  // One allocation for both: the partial outputs [num_splits][h][rows][kernel_hdim], then the
  // partial lse [num_splits][h][rows].
  const int kernel_hdim = flash::round_up_headdim(p.d);
  const int64_t lse_elems = int64_t(num_splits) * p.h * total_q_rows;
  c10::DataPtr accum = c10::cuda::CUDACachingAllocator::get()->allocate(lse_elems * (kernel_hdim + 1) * sizeof(float));
  p.oaccum_ptr = static_cast<float*>(accum.get());
  p.lseaccum_ptr = p.oaccum_ptr + lse_elems * kernel_hdim;
  return accum;
}

void launch(const flash::FwdLauncher& kernel, const flash::FwdParams& p) {
  kernel.run(p, c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// FLASH_ATTN_DECODE_KERNEL=0 runs decode on the 64-row split kernel instead of the decode
// kernel: for A/B measurements in one build only.
bool decode_kernel_enabled() {
  static const bool enabled = env_switch("FLASH_ATTN_DECODE_KERNEL") != 0;
  return enabled;
}

// Batch-strided K/V beyond a plain (batch, seqlen_k, ...) tensor: the kv-cache layouts.
struct KvLayout {
  int seqlen_k;                      // rows per sequence the kernel may read
  const int* seqused_k = nullptr;    // keys used per entry (absolute end, left padding included)
  const int* leftpad_k = nullptr;
  const int* cache_batch_idx = nullptr;
  const int* block_table = nullptr;  // k, v are (num_pages, page_block_size, h_k, d)
  int64_t block_table_batch_stride = 0;
  int page_block_size = 0;
  int num_pages = 0;
};

// Attention of batch-strided q (batch, seqlen_q, num_heads, d) against batch-strided or paged
// K/V, after all checks: the plan (swap, splits), the output buffers and the launch. wl / wr are
// the window after normalize_window (the caller needs it too: rotary positions).
std::vector<Tensor> run_batched(const Tensor& q_in, const Tensor& k, const Tensor& v, OptTensor out_,
                                const OptTensor& alibi_slopes, double softmax_scale, int wl, int wr, double softcap,
                                int num_splits, const KvLayout& kv, const flash::FwdLauncher& kernel) {
  const int batch = q_in.size(0), seqlen_q = q_in.size(1), num_heads = q_in.size(2), head_size = q_in.size(3);
  const int num_heads_k = k.size(2);
  const bool can_swap = wl < 0 && wr < 0 && !alibi_slopes;
  const DeviceInfo dev = device_info();
  const flash::ForwardPlan plan = flash::plan_forward(batch, num_heads, num_heads_k, seqlen_q, kv.seqlen_k,
                                                      head_size, can_swap, dev.sm_count, num_splits,
                                                      decode_kernel_enabled());
  // With the swap, (b, 1, h_k * g, d) is seen as (b, g, h_k, d): the g query heads of a kv head
  // become its query rows.
  Call c{q_in, k, v, out_ ? *out_ : empty_cuda(q_in.sizes(), q_in.scalar_type(), q_in),
         batch, plan.num_heads, num_heads_k, plan.seqlen_q, kv.seqlen_k, head_size, false, false,
         plan.swap_seqlen_ngroups ? plan.seqlen_q : 0};
  // Contiguous (b, h, seqlen_q) in the kernel's view is the same memory as (b, num_heads, seqlen_q).
  Tensor softmax_lse = empty_cuda({batch, num_heads, seqlen_q}, at::kFloat, q_in);

  if (batch > 0 && seqlen_q > 0 && num_heads > 0) {
    flash::FwdParams p;
    fill_common(p, c, alibi_slopes, wl, wr, softmax_scale, softcap);
    p.seqused_k = kv.seqused_k;
    p.leftpad_k = kv.leftpad_k;
    p.cache_batch_idx = kv.cache_batch_idx;
    if (kv.block_table != nullptr) {
      p.block_table = kv.block_table;
      p.block_table_batch_stride = kv.block_table_batch_stride;
      p.page_block_size = kv.page_block_size;
      p.num_pages = kv.num_pages;
    }
    p.softmax_lse_ptr = softmax_lse.data_ptr<float>();
    p.lse_batch_stride = int64_t(plan.num_heads) * plan.seqlen_q;
    p.lse_head_stride = plan.seqlen_q;
    p.lse_row_stride = 1;
    auto accum = set_splits(p, plan, batch * plan.seqlen_q, dev, kernel);
    launch(kernel, p);
  }
  return {c.out, softmax_lse};
}

// q: (batch, seqlen_q, num_heads, d); k, v: (batch, seqlen_k, num_heads_k, d).
std::vector<Tensor> mha_fwd(const Tensor& q_arg, const Tensor& k_arg, const Tensor& v_arg, OptTensor out_,
                            OptTensor alibi_slopes, double p_dropout, double softmax_scale, bool is_causal,
                            int window_left, int window_right, double softcap, bool return_softmax, int num_splits) {
  const Tensor q_in = contiguous_last_dim(q_arg), k = contiguous_last_dim(k_arg), v = contiguous_last_dim(v_arg);
  check_qkv_dtypes(q_in, k, v);
  TORCH_CHECK(q_in.dim() == 4, "q must have shape (batch, seqlen_q, num_heads, head_dim), got ", shape_str(q_in));
  TORCH_CHECK(k.dim() == 4, "k must have shape (batch, seqlen_k, num_heads_k, head_dim), got ", shape_str(k));
  const int batch = q_in.size(0), num_heads = q_in.size(2), head_size = q_in.size(3);
  const int seqlen_k = k.size(1), num_heads_k = k.size(2);
  TORCH_CHECK(k.size(0) == batch && k.size(3) == head_size, "k must have shape (batch, seqlen_k, num_heads_k, ",
              "head_dim) with q's batch and head_dim, got ", shape_str(k), " for q ", shape_str(q_in));
  TORCH_CHECK(v.sizes() == k.sizes(), "v must have the same shape as k, got ", shape_str(v), " and ", shape_str(k));
  check_head_dims(head_size, num_heads, num_heads_k);
  check_options(p_dropout, return_softmax, window_left, window_right, softcap, num_splits);
  check_alibi(alibi_slopes, batch, num_heads);
  if (out_) check_out(*out_, q_in);
  check_on_device(q_in, "q", q_in);
  check_on_device(k, "k", q_in);
  check_on_device(v, "v", q_in);
  if (out_) check_on_device(*out_, "out", q_in);
  if (alibi_slopes) check_on_device(*alibi_slopes, "alibi_slopes", q_in);
  const flash::FwdLauncher kernel = find_kernel(head_size, q_in.scalar_type() == at::kBFloat16);

  const at::cuda::CUDAGuard device_guard{q_in.device()};
  const auto [wl, wr] = normalize_window(is_causal, window_left, window_right, q_in.size(1), seqlen_k);
  return run_batched(q_in, k, v, out_, alibi_slopes, softmax_scale, wl, wr, softcap,
                     num_splits, KvLayout{seqlen_k}, kernel);
}

// q: (total_q, num_heads, d); k, v: (total_k, num_heads_k, d), or paged
// (num_blocks, page_block_size, num_heads_k, d) with block_table (batch, max_blocks_per_seq).
std::vector<Tensor> mha_varlen_fwd(const Tensor& q_arg, const Tensor& k_arg, const Tensor& v_arg, OptTensor out_,
                                   const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k, OptTensor seqused_k,
                                   OptTensor leftpad_k, OptTensor block_table, OptTensor alibi_slopes,
                                   int max_seqlen_q, int max_seqlen_k, double p_dropout, double softmax_scale,
                                   bool zero_tensors, bool is_causal, int window_left, int window_right,
                                   double softcap, bool return_softmax, int num_splits) {
  const Tensor q_in = contiguous_last_dim(q_arg), k = contiguous_last_dim(k_arg), v = contiguous_last_dim(v_arg);
  check_qkv_dtypes(q_in, k, v);
  const bool paged = block_table.has_value();
  TORCH_CHECK(q_in.dim() == 3, "q must have shape (total_q, num_heads, head_dim), got ", shape_str(q_in));
  TORCH_CHECK(k.dim() == (paged ? 4 : 3), "k must have shape ",
              paged ? "(num_blocks, page_block_size, num_heads_k, head_dim) with block_table"
                    : "(total_k, num_heads_k, head_dim)",
              ", got ", shape_str(k));
  const int total_q = q_in.size(0), num_heads = q_in.size(1), head_size = q_in.size(2);
  const int num_heads_k = k.size(-2);
  const int batch = cu_seqlens_q.numel() - 1;
  TORCH_CHECK(k.size(-1) == head_size, "k must have q's head_dim ", std::to_string(head_size), ", got ", shape_str(k));
  TORCH_CHECK(v.sizes() == k.sizes(), "v must have the same shape as k, got ", shape_str(v), " and ", shape_str(k));
  check_head_dims(head_size, num_heads, num_heads_k);
  check_options(p_dropout, return_softmax, window_left, window_right, softcap, num_splits);
  TORCH_CHECK(batch >= 1, "cu_seqlens_q must have batch_size + 1 >= 2 elements, got ",
              std::to_string(cu_seqlens_q.numel()));
  check_int32_vector(cu_seqlens_q, "cu_seqlens_q", batch + 1);
  check_int32_vector(cu_seqlens_k, "cu_seqlens_k", batch + 1);
  if (seqused_k) check_int32_vector(*seqused_k, "seqused_k", batch);
  if (leftpad_k) check_int32_vector(*leftpad_k, "leftpad_k", batch);
  TORCH_CHECK(max_seqlen_q >= 0 && max_seqlen_k >= 0, "max_seqlen_q and max_seqlen_k must be >= 0");
  int page_block_size = 0;
  if (paged) {
    TORCH_CHECK(block_table->scalar_type() == at::kInt, "block_table must have dtype torch.int32");
    TORCH_CHECK(block_table->dim() == 2 && block_table->size(0) == batch,
                "block_table must have shape (batch_size, max_blocks_per_seq), got ", shape_str(*block_table));
    TORCH_CHECK(block_table->stride(-1) == 1, "block_table must have contiguous last dimension");
    page_block_size = k.size(1);
    TORCH_CHECK(page_block_size % 16 == 0 && page_block_size > 0,
                "page_block_size (k.size(1) with block_table) must be a positive multiple of 16, got ",
                std::to_string(page_block_size));
  }
  // Left padding of varlen K/V is not exposed by flash_attn_varlen_func (upstream neither) and has
  // no test here; flash_attn_with_kvcache's cache_leftpad is the supported path.
  TORCH_CHECK(!leftpad_k, "leftpad_k is not supported by varlen_fwd in this flash_attn build; use "
              "flash_attn_with_kvcache(cache_leftpad=...)");
  check_alibi(alibi_slopes, batch, num_heads);
  if (out_) check_out(*out_, q_in);
  check_on_device(q_in, "q", q_in);
  check_on_device(k, "k", q_in);
  check_on_device(v, "v", q_in);
  check_on_device(cu_seqlens_q, "cu_seqlens_q", q_in);
  check_on_device(cu_seqlens_k, "cu_seqlens_k", q_in);
  if (seqused_k) check_on_device(*seqused_k, "seqused_k", q_in);
  if (leftpad_k) check_on_device(*leftpad_k, "leftpad_k", q_in);
  if (paged) check_on_device(*block_table, "block_table", q_in);
  if (out_) check_on_device(*out_, "out", q_in);
  if (alibi_slopes) check_on_device(*alibi_slopes, "alibi_slopes", q_in);
  const bool is_bf16 = q_in.scalar_type() == at::kBFloat16;
  const flash::FwdLauncher kernel = find_kernel(head_size, is_bf16);

  const at::cuda::CUDAGuard device_guard{q_in.device()};
  auto [wl, wr] = normalize_window(is_causal, window_left, window_right, max_seqlen_q, max_seqlen_k);
  // The swap views q as (b, g, h_k, d), which needs exactly one query per sequence.
  const bool can_swap = wl < 0 && wr < 0 && !alibi_slopes && total_q == batch;
  const DeviceInfo dev = device_info();
  const flash::ForwardPlan plan = flash::plan_forward(batch, num_heads, num_heads_k, max_seqlen_q, max_seqlen_k,
                                                      head_size, can_swap, dev.sm_count, num_splits,
                                                      decode_kernel_enabled());
  // With the swap, q (total_q = batch, h_k * g, d) is seen batch-strided as (b, g, h_k, d).
  Call c{q_in, k, v, out_ ? *out_ : empty_cuda(q_in.sizes(), q_in.scalar_type(), q_in),
         batch, plan.num_heads, num_heads_k, plan.seqlen_q, max_seqlen_k, head_size,
         !plan.swap_seqlen_ngroups, !paged, plan.swap_seqlen_ngroups ? plan.seqlen_q : 0};
  Tensor softmax_lse = empty_cuda({num_heads, total_q}, at::kFloat, q_in);
  if (zero_tensors) {
    c.out.zero_();
    softmax_lse.fill_(-std::numeric_limits<float>::infinity());
  }

  if (total_q > 0 && max_seqlen_q > 0) {
    flash::FwdParams p;
    fill_common(p, c, alibi_slopes, wl, wr, softmax_scale, softcap);
    p.cu_seqlens_q = plan.swap_seqlen_ngroups ? nullptr : cu_seqlens_q.data_ptr<int>();
    p.cu_seqlens_k = cu_seqlens_k.data_ptr<int>();
    p.seqused_k = seqused_k ? seqused_k->data_ptr<int>() : nullptr;
    p.leftpad_k = leftpad_k ? leftpad_k->data_ptr<int>() : nullptr;
    if (paged) {
      p.block_table = block_table->data_ptr<int>();
      p.block_table_batch_stride = block_table->stride(0);
      p.page_block_size = page_block_size;
      p.num_pages = k.size(0);
      p.seqlen_k = block_table->size(1) * page_block_size;  // rows the table can address
      p.k_batch_stride = k.stride(0);
      p.v_batch_stride = v.stride(0);
    }
    p.softmax_lse_ptr = softmax_lse.data_ptr<float>();
    if (plan.swap_seqlen_ngroups) {
      // Kernel element (b, kv head hk, row g) is query head hk * ngroups + g of sequence b.
      p.lse_batch_stride = 1;
      p.lse_head_stride = int64_t(plan.seqlen_q) * total_q;
      p.lse_row_stride = total_q;
    } else {
      p.lse_batch_stride = 0;
      p.lse_head_stride = total_q;
      p.lse_row_stride = 1;
    }
    const int total_q_rows = plan.swap_seqlen_ngroups ? batch * plan.seqlen_q : total_q;
    auto accum = set_splits(p, plan, total_q_rows, dev, kernel);
    launch(kernel, p);
  }
  return {c.out, softmax_lse};
}

// Value checks of index tensors need their contents on the host: one small device->host copy,
// a synchronisation. They run unless the stream is capturing a CUDA graph (no sync allowed; the
// kernels then clamp bad indices so they never touch memory out of bounds) or
// FLASH_ATTN_SKIP_VALUE_CHECKS=1 asks to skip them.
bool value_checks_enabled(cudaStream_t stream) {
  static const bool skip = env_switch("FLASH_ATTN_SKIP_VALUE_CHECKS") == 1;
  if (skip) return false;
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &status) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return status == cudaStreamCaptureStatusNone;
}

struct CacheShape {
  int capacity;        // rows per sequence
  int num_pages;       // paged only
  int page_block_size; // paged only
  int batch_cache;     // contiguous only
};

void check_cache_values(const Tensor& cache_seqlens, int seqlen_new, const OptTensor& leftpad,
                        const OptTensor& cache_batch_idx, const OptTensor& block_table, const CacheShape& cs) {
  std::vector<Tensor> bad;
  std::vector<std::string> what;
  const Tensor end = cache_seqlens + seqlen_new;
  bad.push_back(((cache_seqlens < 0) | (end > cs.capacity)).any());
  what.push_back("cache_seqlens (+ the new k/v rows) must lie in [0, " + std::to_string(cs.capacity) +
                 "], the cache's rows per sequence");
  if (leftpad) {
    bad.push_back(((*leftpad < 0) | (*leftpad > cache_seqlens)).any());
    what.push_back("cache_leftpad must lie in [0, cache_seqlens]");
  }
  if (cache_batch_idx) {
    bad.push_back(((*cache_batch_idx < 0) | (*cache_batch_idx >= cs.batch_cache)).any());
    what.push_back("cache_batch_idx must lie in [0, " + std::to_string(cs.batch_cache) + "), the cache's batch size");
  }
  if (block_table) {
    const int width = block_table->size(1);
    const Tensor used = (end.clamp(0, cs.capacity) + cs.page_block_size - 1).div(cs.page_block_size, "floor");
    const Tensor in_use = at::arange(width, used.options()).unsqueeze(0) < used.unsqueeze(1);
    bad.push_back((in_use & ((*block_table < 0) | (*block_table >= cs.num_pages))).any());
    what.push_back("block_table entries in use must lie in [0, " + std::to_string(cs.num_pages) +
                   "), the number of pages in k_cache");
  }
  const Tensor flags = at::stack(bad).cpu();
  const bool* f = flags.data_ptr<bool>();
  for (size_t i = 0; i < what.size(); ++i) TORCH_CHECK(!f[i], what[i]);
}

// flash_attn_with_kvcache. q: (batch, seqlen_q, num_heads, d); k_cache, v_cache:
// (batch_cache, seqlen_cache, num_heads_k, d) or paged (num_pages, page_block_size, num_heads_k, d)
// with block_table (batch, max_blocks_per_seq); optional new k, v: (batch, seqlen_new, num_heads_k, d)
// appended in place at cache_seqlens, rotated with rotary_cos / rotary_sin (seqlen_ro, rotary_dim / 2)
// as is q.
std::vector<Tensor> mha_fwd_kvcache(const Tensor& q_arg, const Tensor& kcache, const Tensor& vcache, OptTensor k_arg,
                                    OptTensor v_arg, OptTensor cache_seqlens, OptTensor rotary_cos, OptTensor rotary_sin,
                                    OptTensor cache_batch_idx, OptTensor cache_leftpad, OptTensor block_table,
                                    OptTensor alibi_slopes, OptTensor out_, double softmax_scale, bool is_causal,
                                    int window_left, int window_right, double softcap, bool rotary_interleaved,
                                    int num_splits) {
  // q and the new k / v are read only: a strided last dimension is copied. The caches are
  // written in place, so theirs must already be contiguous.
  const Tensor q_in = contiguous_last_dim(q_arg);
  const OptTensor k_ = k_arg ? OptTensor(contiguous_last_dim(*k_arg)) : OptTensor();
  const OptTensor v_ = v_arg ? OptTensor(contiguous_last_dim(*v_arg)) : OptTensor();
  const auto dt = q_in.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16, "q must have dtype torch.float16 or torch.bfloat16, got ",
              c10::toString(dt));
  TORCH_CHECK(kcache.scalar_type() == dt, "k_cache must have the same dtype as q, got ",
              c10::toString(kcache.scalar_type()), " and ", c10::toString(dt));
  TORCH_CHECK(vcache.scalar_type() == dt, "v_cache must have the same dtype as q, got ",
              c10::toString(vcache.scalar_type()), " and ", c10::toString(dt));
  TORCH_CHECK(q_in.dim() == 4, "q must have shape (batch, seqlen_q, num_heads, head_dim), got ", shape_str(q_in));
  TORCH_CHECK(kcache.stride(-1) == 1, "k_cache must have contiguous last dimension");
  TORCH_CHECK(vcache.stride(-1) == 1, "v_cache must have contiguous last dimension");
  const bool paged = block_table.has_value();
  TORCH_CHECK(kcache.dim() == 4, "k_cache must have shape ",
              paged ? "(num_blocks, page_block_size, num_heads_k, head_dim) with block_table"
                    : "(batch_size_cache, seqlen_cache, num_heads_k, head_dim)",
              ", got ", shape_str(kcache));
  TORCH_CHECK(vcache.sizes() == kcache.sizes(), "v_cache must have the same shape as k_cache, got ", shape_str(vcache),
              " and ", shape_str(kcache));
  const int batch = q_in.size(0), seqlen_q = q_in.size(1), num_heads = q_in.size(2), head_size = q_in.size(3);
  const int num_heads_k = kcache.size(2);
  TORCH_CHECK(kcache.size(3) == head_size, "k_cache must have q's head_dim ", std::to_string(head_size), ", got ",
              shape_str(kcache));
  check_head_dims(head_size, num_heads, num_heads_k);
  check_options(0.f, false, window_left, window_right, softcap, num_splits);

  CacheShape cs{};
  if (paged) {
    TORCH_CHECK(block_table->scalar_type() == at::kInt, "block_table must have dtype torch.int32, got ",
                c10::toString(block_table->scalar_type()));
    TORCH_CHECK(block_table->dim() == 2 && block_table->size(0) == batch,
                "block_table must have shape (batch_size, max_blocks_per_seq), got ", shape_str(*block_table));
    TORCH_CHECK(block_table->stride(-1) == 1, "block_table must have contiguous last dimension");
    TORCH_CHECK(!cache_batch_idx, "cache_batch_idx cannot be used with block_table (index the block table instead)");
    cs.page_block_size = kcache.size(1);
    cs.num_pages = kcache.size(0);
    TORCH_CHECK(cs.page_block_size % 16 == 0 && cs.page_block_size > 0,
                "page_block_size (k_cache.size(1) with block_table) must be a positive multiple of 16, got ",
                std::to_string(cs.page_block_size));
    TORCH_CHECK(cs.num_pages > 0, "k_cache must hold at least one page");
    cs.capacity = block_table->size(1) * cs.page_block_size;
  } else {
    cs.capacity = kcache.size(1);
    cs.batch_cache = kcache.size(0);
    if (cache_batch_idx) {
      check_int32_vector(*cache_batch_idx, "cache_batch_idx", batch);
    } else {
      TORCH_CHECK(cs.batch_cache >= batch, "k_cache must have at least q's batch size ", std::to_string(batch),
                  " (or pass cache_batch_idx), got ", shape_str(kcache));
    }
  }

  TORCH_CHECK(k_.has_value() == v_.has_value(), k_ ? "v must be given together with k" : "k must be given together with v");
  int seqlen_new = 0;
  if (k_) {
    TORCH_CHECK(k_->scalar_type() == dt, "k must have the same dtype as q, got ", c10::toString(k_->scalar_type()));
    TORCH_CHECK(v_->scalar_type() == dt, "v must have the same dtype as q, got ", c10::toString(v_->scalar_type()));
    TORCH_CHECK(k_->dim() == 4 && k_->size(0) == batch && k_->size(2) == num_heads_k && k_->size(3) == head_size,
                "k must have shape (batch, seqlen_new, num_heads_k, head_dim) = (", std::to_string(batch),
                ", seqlen_new, ", std::to_string(num_heads_k), ", ", std::to_string(head_size), "), got ",
                shape_str(*k_));
    TORCH_CHECK(v_->sizes() == k_->sizes(), "v must have the same shape as k, got ", shape_str(*v_), " and ",
                shape_str(*k_));
    TORCH_CHECK(cache_seqlens.has_value(), "cache_seqlens is required when k and v are appended to the cache");
    seqlen_new = k_->size(1);
  }
  if (cache_seqlens) check_int32_vector(*cache_seqlens, "cache_seqlens", batch);
  if (cache_leftpad) check_int32_vector(*cache_leftpad, "cache_leftpad", batch);
  const bool rotary = rotary_cos.has_value();
  int rotary_dim = 0;
  TORCH_CHECK(rotary_cos.has_value() == rotary_sin.has_value(), "rotary_cos and rotary_sin must be given together");
  if (rotary) {
    TORCH_CHECK(k_.has_value(), "rotary_cos / rotary_sin need the new k and v to rotate (pass k and v)");
    for (const Tensor* t : {&*rotary_cos, &*rotary_sin}) {
      const char* name = t == &*rotary_cos ? "rotary_cos" : "rotary_sin";
      TORCH_CHECK(t->scalar_type() == dt, name, " must have the same dtype as q, got ", c10::toString(t->scalar_type()));
      TORCH_CHECK(t->dim() == 2 && t->is_contiguous(), name, " must be a contiguous (seqlen_ro, rotary_dim / 2) tensor, got ",
                  shape_str(*t));
    }
    TORCH_CHECK(rotary_sin->sizes() == rotary_cos->sizes(), "rotary_sin must have the same shape as rotary_cos");
    rotary_dim = 2 * rotary_cos->size(1);
    TORCH_CHECK(rotary_dim > 0 && rotary_dim <= head_size && rotary_dim % 16 == 0,
                "rotary_dim (2 * rotary_cos.size(1)) must be a multiple of 16 and at most head_dim ",
                std::to_string(head_size), ", got ", std::to_string(rotary_dim));
    TORCH_CHECK(rotary_cos->size(0) >= cs.capacity, "rotary_cos must have at least as many rows as the cache (",
                std::to_string(cs.capacity), "), got ", shape_str(*rotary_cos));
  }
  check_alibi(alibi_slopes, batch, num_heads);
  if (out_) check_out(*out_, q_in);

  check_on_device(q_in, "q", q_in);
  check_on_device(kcache, "k_cache", q_in);
  check_on_device(vcache, "v_cache", q_in);
  for (auto [t, name] : {std::pair<const OptTensor*, const char*>{&k_, "k"}, {&v_, "v"},
                         {&cache_seqlens, "cache_seqlens"}, {&rotary_cos, "rotary_cos"},
                         {&rotary_sin, "rotary_sin"}, {&cache_batch_idx, "cache_batch_idx"},
                         {&cache_leftpad, "cache_leftpad"}, {&block_table, "block_table"},
                         {&alibi_slopes, "alibi_slopes"}, {&out_, "out"}}) {
    if (t->has_value()) check_on_device(**t, name, q_in);
  }
  const bool is_bf16 = dt == at::kBFloat16;
  const flash::FwdLauncher kernel = find_kernel(head_size, is_bf16);

  const at::cuda::CUDAGuard device_guard{q_in.device()};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  if (cache_seqlens && value_checks_enabled(stream)) {
    check_cache_values(*cache_seqlens, seqlen_new, cache_leftpad, cache_batch_idx, block_table, cs);
  }

  KvLayout kv{cs.capacity};
  kv.leftpad_k = cache_leftpad ? cache_leftpad->data_ptr<int>() : nullptr;
  kv.cache_batch_idx = cache_batch_idx ? cache_batch_idx->data_ptr<int>() : nullptr;
  if (paged) {
    kv.block_table = block_table->data_ptr<int>();
    kv.block_table_batch_stride = block_table->stride(0);
    kv.page_block_size = cs.page_block_size;
    kv.num_pages = cs.num_pages;
  }
  kv.seqused_k = cache_seqlens ? cache_seqlens->data_ptr<int>() : nullptr;

  const auto [wl, wr] = normalize_window(is_causal, window_left, window_right, seqlen_q, kv.seqlen_k);
  Tensor q = q_in, seqused;
  if (k_) {
    seqused = at::empty({batch}, cache_seqlens->options());
    kv.seqused_k = seqused.data_ptr<int>();
    flash::AppendKvParams a{};
    a.knew_ptr = k_->data_ptr();
    a.vnew_ptr = v_->data_ptr();
    a.knew_batch_stride = k_->stride(0), a.knew_row_stride = k_->stride(1), a.knew_head_stride = k_->stride(2);
    a.vnew_batch_stride = v_->stride(0), a.vnew_row_stride = v_->stride(1), a.vnew_head_stride = v_->stride(2);
    a.kcache_ptr = kcache.data_ptr();
    a.vcache_ptr = vcache.data_ptr();
    a.kcache_batch_stride = kcache.stride(0), a.kcache_row_stride = kcache.stride(1), a.kcache_head_stride = kcache.stride(2);
    a.vcache_batch_stride = vcache.stride(0), a.vcache_row_stride = vcache.stride(1), a.vcache_head_stride = vcache.stride(2);
    a.block_table = kv.block_table;
    a.block_table_batch_stride = kv.block_table_batch_stride;
    a.page_block_size = cs.page_block_size;
    a.num_pages = cs.num_pages;
    a.capacity = cs.capacity;
    a.cache_seqlens = cache_seqlens->data_ptr<int>();
    a.cache_batch_idx = kv.cache_batch_idx;
    a.b = batch, a.seqlen_new = seqlen_new, a.h_k = num_heads_k, a.d = head_size;
    a.seqused_out = seqused.data_ptr<int>();
    if (rotary) {
      q = at::empty({batch, seqlen_q, num_heads, head_size}, q_in.options());
      a.cos_ptr = rotary_cos->data_ptr();
      a.sin_ptr = rotary_sin->data_ptr();
      a.rotary_dim = rotary_dim;
      a.seqlen_ro = rotary_cos->size(0);
      a.interleaved = rotary_interleaved;
      a.q_ptr = q_in.data_ptr();
      a.q_batch_stride = q_in.stride(0), a.q_row_stride = q_in.stride(1), a.q_head_stride = q_in.stride(2);
      a.qrot_ptr = q.data_ptr();
      a.seqlen_q = seqlen_q, a.h = num_heads;
      // Upstream's convention: with a causal or local mask query row t sits at cache_seqlens + t,
      // otherwise every query row at cache_seqlens.
      a.q_positions_per_row = wl >= 0 || wr >= 0;
    }
    if (batch > 0) {
      flash::run_kvcache_append(a, is_bf16, stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  return run_batched(q, kcache, vcache, out_, alibi_slopes, softmax_scale, wl, wr, softcap, num_splits, kv, kernel);
}

flash::ForwardPlan checked_plan(int batch, int num_heads, int num_heads_k, int seqlen_q, int seqlen_k, int head_size,
                                int num_sms, int num_splits) {
  TORCH_CHECK(num_splits >= 0, "num_splits must be >= 0 (0 = heuristic), got ", std::to_string(num_splits));
  TORCH_CHECK(num_sms > 0, "num_sms must be positive");
  check_head_dims(head_size, num_heads, num_heads_k);
  return flash::plan_forward(batch, num_heads, num_heads_k, seqlen_q, seqlen_k, head_size, /*can_swap=*/true,
                             num_sms, num_splits, /*allow_decode_kernel=*/true);
}

int num_splits_heuristic(int batch, int num_heads, int num_heads_k, int seqlen_q, int seqlen_k, int head_size,
                         int num_sms, int num_splits) {
  return checked_plan(batch, num_heads, num_heads_k, seqlen_q, seqlen_k, head_size, num_sms, num_splits).num_splits;
}

// Whether the plan lets a decode tile's splits merge inside a thread-block cluster (sm_90 decides
// the rest at run time).
bool cluster_merge_planned(int batch, int num_heads, int num_heads_k, int seqlen_q, int seqlen_k, int head_size,
                           int num_sms, int num_splits) {
  return checked_plan(batch, num_heads, num_heads_k, seqlen_q, seqlen_k, head_size, num_sms, num_splits)
      .cluster_merge;
}

// Clusters of `cluster_size` plain decode blocks the current device holds at once (0: none, e.g.
// before sm_90): what bounds the cluster merge at run time.
int decode_cluster_capacity(int head_size, bool is_bf16, int cluster_size) {
  TORCH_CHECK(cluster_size >= 1 && cluster_size <= flash::kMaxClusterSplits, "cluster_size must lie in [1, ",
              std::to_string(flash::kMaxClusterSplits), "], got ", std::to_string(cluster_size));
  // The current device's answer: no guard needed.
  flash::FwdParams p{};
  p.device = c10::cuda::current_device();
  return find_kernel(head_size, is_bf16).max_decode_clusters(p, cluster_size);
}

pybind11::dict build_info() {
  pybind11::list headdims, dtypes;
  bool any_fp16 = false, any_bf16 = false;
  for (int i = 0; i < flash::kNumKernelHeadDims; ++i) {
    const bool fp16 = flash::fwd_launchers[i][0].run != nullptr, bf16 = flash::fwd_launchers[i][1].run != nullptr;
    if (fp16 || bf16) headdims.append(flash::kKernelHeadDims[i]);
    any_fp16 |= fp16;
    any_bf16 |= bf16;
  }
  if (any_fp16) dtypes.append("fp16");
  if (any_bf16) dtypes.append("bf16");
  pybind11::list archs;
  for (int arch : std::vector<int>{FLASH_ATTN_ARCHS_LIST}) archs.append(std::to_string(arch));
  pybind11::dict info;
  info["headdims"] = headdims;
  info["dtypes"] = dtypes;
  info["archs"] = archs;
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "FlashAttention-2 compatible forward attention with split-KV decoding";
  m.def("fwd", &mha_fwd, "Forward attention, padded batch", pybind11::arg("q"), pybind11::arg("k"),
        pybind11::arg("v"), pybind11::arg("out"), pybind11::arg("alibi_slopes"), pybind11::arg("dropout_p"),
        pybind11::arg("softmax_scale"), pybind11::arg("causal"), pybind11::arg("window_size_left"),
        pybind11::arg("window_size_right"), pybind11::arg("softcap"), pybind11::arg("return_softmax"),
        pybind11::arg("num_splits") = 0);
  m.def("varlen_fwd", &mha_varlen_fwd, "Forward attention, variable-length batch", pybind11::arg("q"),
        pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("out"), pybind11::arg("cu_seqlens_q"),
        pybind11::arg("cu_seqlens_k"), pybind11::arg("seqused_k"), pybind11::arg("leftpad_k"),
        pybind11::arg("block_table"), pybind11::arg("alibi_slopes"), pybind11::arg("max_seqlen_q"),
        pybind11::arg("max_seqlen_k"), pybind11::arg("dropout_p"), pybind11::arg("softmax_scale"),
        pybind11::arg("zero_tensors"), pybind11::arg("causal"), pybind11::arg("window_size_left"),
        pybind11::arg("window_size_right"), pybind11::arg("softcap"), pybind11::arg("return_softmax"),
        pybind11::arg("num_splits") = 0);
  m.def("fwd_kvcache", &mha_fwd_kvcache, "Forward attention against a KV cache, appending new keys / values",
        pybind11::arg("q"), pybind11::arg("k_cache"), pybind11::arg("v_cache"), pybind11::arg("k"),
        pybind11::arg("v"), pybind11::arg("cache_seqlens"), pybind11::arg("rotary_cos"), pybind11::arg("rotary_sin"),
        pybind11::arg("cache_batch_idx"), pybind11::arg("cache_leftpad"), pybind11::arg("block_table"),
        pybind11::arg("alibi_slopes"), pybind11::arg("out"), pybind11::arg("softmax_scale"), pybind11::arg("causal"),
        pybind11::arg("window_size_left"), pybind11::arg("window_size_right"), pybind11::arg("softcap"),
        pybind11::arg("rotary_interleaved"), pybind11::arg("num_splits") = 0);
  m.def("num_splits_heuristic", &num_splits_heuristic,
        "Number of key splits the dispatcher uses for these shapes (no window, no ALiBi)", pybind11::arg("batch"),
        pybind11::arg("nheads"), pybind11::arg("nheads_k"), pybind11::arg("seqlen_q"), pybind11::arg("seqlen_k"),
        pybind11::arg("headdim"), pybind11::arg("num_sms"), pybind11::arg("num_splits") = 0);
  m.def("cluster_merge_planned", &cluster_merge_planned,
        "Whether the decode splits of these shapes may merge inside a thread-block cluster (sm_90)",
        pybind11::arg("batch"), pybind11::arg("nheads"), pybind11::arg("nheads_k"), pybind11::arg("seqlen_q"),
        pybind11::arg("seqlen_k"), pybind11::arg("headdim"), pybind11::arg("num_sms"), pybind11::arg("num_splits") = 0);
  m.def("decode_cluster_capacity", &decode_cluster_capacity,
        "Thread-block clusters of cluster_size decode blocks the current CUDA device holds at once",
        pybind11::arg("head_size"), pybind11::arg("is_bf16"), pybind11::arg("cluster_size"));
  m.def("build_info", &build_info, "Compiled head dims, dtypes and CUDA architectures");
}
