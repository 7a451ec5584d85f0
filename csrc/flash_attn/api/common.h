// Shared by the dispatcher's entry points (fwd.cpp, kvcache.cpp, module.cpp): argument checks whose
// messages name the argument, packing of FwdParams, the device facts the plan needs, and the plan
// and launch of one batch-strided forward call. Free of pybind11 and torch/extension.h, so each
// entry point compiles against ATen alone.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>
#include <c10/core/Allocator.h>

#include "params/fwd_params.h"
#include "params/launchers.h"
#include "plan/heuristics.h"

namespace flash_api {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// ---- argument checks (checks.cpp) ----
// Error messages pass only strings to TORCH_CHECK (numbers through std::to_string, shapes through
// shape_str): with torch 2.11 on the H100 machine, c10::str streaming an int or an IntArrayRef
// from this extension segfaulted inside std::ostream's number formatting.
std::string shape_str(const Tensor& t);
void check_qkv_dtypes(const Tensor& q, const Tensor& k, const Tensor& v);
// The kernels move rows in 16-byte vectors (cp.async, TMA): a tensor they read or write needs a
// 16-byte aligned data pointer and strides (but the last) that are multiples of 8 elements,
// dimensions of size 1 excepted.
bool vector_aligned(const Tensor& t);
// The same for a TMA tensor map of a 2-byte tensor, which also reads the strides of size-1
// dimensions: a 16-byte aligned base and every stride a positive multiple of 8 elements.
bool tma_compatible(const void* ptr, std::initializer_list<int64_t> strides);
// A read-only input the kernels can load: a strided last dimension is copied, as upstream's Python
// wrapper (maybe_contiguous) does, and so is a view whose rows are not 16-byte aligned. Done here
// so the Python hot path needs no stride queries (each costs host time per decode step).
Tensor with_kernel_layout(const Tensor& t);
// Tensors written in place (out, gradients, kv caches) cannot be copied: raises naming `name`.
void check_vector_aligned(const Tensor& t, const char* name);
void check_head_dims(int head_size, int num_heads, int num_heads_k);
void check_dropout_p(double p_dropout);
void check_options(float p_dropout, bool return_softmax, int window_left, int window_right, float softcap,
                   int num_splits);
void check_alibi(const OptTensor& alibi, int batch, int num_heads);
void check_int32_vector(const Tensor& t, const char* name, int64_t numel);
void check_on_device(const Tensor& t, const char* name, const Tensor& q);
void check_out(const Tensor& out, const Tensor& q);
flash::FwdLauncher find_kernel(int head_size, bool is_bf16);
// Causal with one query row attends every key (bottom-right alignment); windows reaching past the
// sequence are unbounded. Returns (left, right), -1 = unbounded.
std::pair<int, int> normalize_window(bool is_causal, int window_left, int window_right, int max_seqlen_q,
                                     int max_seqlen_k);

// Empty when the build's kernels run on a GPU of compute capability major.minor, else the error
// message naming the GPU, its capability and the architectures this build compiled. The build
// embeds PTX of its lowest architecture, so any GPU at or above it (and at least sm_80) runs.
std::string unsupported_gpu_message(const std::string& gpu_name, int major, int minor);

// ---- packing, plan and launch (forward_call.cpp) ----
// Output buffers straight from the CUDA allocator (at::empty's dispatch costs host time per call).
Tensor empty_cuda(at::IntArrayRef sizes, at::ScalarType dtype, const Tensor& like);

// Per-device facts the plan needs, cached (an attribute query costs a driver call). Raises, before
// any kernel launches, on a GPU this build cannot run on (unsupported_gpu_message).
struct DeviceInfo {
  int device;
  int sm_count;
  bool pdl;   // programmatic dependent launch and thread-block clusters (sm_90+)
  bool sm90;  // compute capability 9.0: the Hopper (sm_90a) kernels run
};
DeviceInfo device_info();

// Whether the forward may run the Hopper kernel on compute capability 9.0 where it applies, and
// plan its splits of longer queries (default on). Returns the previous setting. For tests and
// benchmarks that cover or time the SM80 kernels on a Hopper GPU.
bool set_sm90_forward(bool enabled);

// Whether the dense backward may run the Hopper kernel on compute capability 9.0 where it applies
// (default on; bwd.cpp). Returns the previous setting.
bool set_sm90_backward(bool enabled);

// Everything after the checks: shared by the padded and the varlen entry points.
struct Call {
  Tensor q, k, v, out;  // the caller's shapes; with swap_groups > 0, q and out are seen swapped
  int batch, num_heads, num_heads_k, seqlen_q, seqlen_k, head_size;  // as the kernel sees them
  bool varlen_q, varlen_k;
  int swap_groups = 0;
  int pack_groups = 1;  // > 1: query heads of a group packed with their queries into rows (FwdParams)
};
void fill_common(flash::FwdParams& p, const Call& c, const OptTensor& alibi, int window_left, int window_right,
                 float softmax_scale, float softcap);

// Whether the Hopper forward can take a call with these features (kv_indirect: K/V read through an
// index it does not follow, sm90_kv_indirect), as far as they are known before the plan, which
// then also splits longer queries over the Hopper tiles; the launch checks the rest
// (sm90_forward_applies: the plan, the tensors' TMA alignment, no empty keys). A call it then does
// not take runs the same plan on the SM80 kernels. sm80_dropout: dropout the Hopper forward does
// not take (sm90_takes_dropout).
bool sm90_forward_possible(const DeviceInfo& dev, const flash::FwdLauncher& kernel, bool sm80_dropout,
                           bool kv_indirect);

// Dropout the Hopper forward takes: in its plain kernel (sm90/fwd_launch.h), so without softcap or
// ALiBi and without a block table, and without S_dmask (return_softmax: the SM80 kernel writes it).
inline bool sm90_takes_dropout(bool return_softmax, bool score_mods, bool paged) {
  return !return_softmax && !score_mods && !paged;
}

// K/V indices the Hopper forward does not follow: left padding, cache_batch_idx, or a block table
// whose pages do not hold whole key blocks at this head dim (plan/tile_sizes.h,
// sm90_fwd_reads_pages: page sizes that are multiples of 128 at head dims up to 128). Shared by
// the entry points' plans and the launch's rule, so both see the same answer.
inline bool sm90_kv_indirect(bool leftpad, bool cache_batch_idx, bool paged, int page_block_size, int head_size) {
  return leftpad || cache_batch_idx ||
         (paged && !flash::sm90_fwd_reads_pages(flash::round_up_headdim(head_size), page_block_size));
}

// Copies the plan's kernel choice into p and allocates the split-KV partials straight from
// PyTorch's caching allocator (no sync, graph-safe, no tensor object). The returned pointer must
// live until the launch is enqueued.
c10::DataPtr set_splits(flash::FwdParams& p, const flash::ForwardPlan& plan, int total_q_rows, const DeviceInfo& dev,
                        const flash::FwdLauncher& kernel);
// Launches the forward the plan chose: the Hopper kernel where it applies (compute capability
// 9.0, sm90_forward_applies), else the SM80 kernels.
void launch(const flash::FwdLauncher& kernel, const flash::FwdParams& p, const flash::ForwardPlan& plan,
            const DeviceInfo& dev);

// Dropout of one forward call (p > 0): the Philox seed and offset come from `gen` (or the default
// CUDA generator) and are written to rng_state by the kernel; s_dmask, when defined (return_softmax),
// receives the probabilities with dropped entries negated. The plan runs the unsplit kernel.
struct ForwardDropout {
  double p;
  std::optional<at::Generator> gen;
  Tensor rng_state;  // (2,) int64
  Tensor s_dmask;    // (batch, num_heads, max_seqlen_q rounded to 128, max_seqlen_k rounded to 128)
};
// The keep threshold and scale of dropout probability p_dropout (> 0), forward and backward alike.
void set_dropout_rate(flash::FwdParams& p, double p_dropout);
// set_dropout_rate plus the generator's Philox state (graph-safe: device pointers while a CUDA
// graph is captured), rng_state and S_dmask. p.b and p.h must be set.
void set_dropout(flash::FwdParams& p, const ForwardDropout& dropout);
// S_dmask of a return_softmax call, zero where the kernel writes nothing.
Tensor s_dmask_tensor(int batch, int num_heads, int max_seqlen_q, int max_seqlen_k, const Tensor& q);

// Batch-strided K/V beyond a plain (batch, seqlen_k, ...) tensor: the kv-cache layouts.
struct KvLayout {
  int seqlen_k;                      // rows per sequence the kernel may read
  const int* seqused_k = nullptr;    // keys used per entry (absolute end, left padding included)
  const int* leftpad_k = nullptr;
  const int* cache_batch_idx = nullptr;
  int batch_cache = 0;               // with cache_batch_idx: the cache's batch size
  const int* block_table = nullptr;  // k, v are (num_pages, page_block_size, h_k, d)
  int64_t block_table_batch_stride = 0;
  int page_block_size = 0;
  int num_pages = 0;
};

// Attention of batch-strided q (batch, seqlen_q, num_heads, d) against batch-strided or paged
// K/V, after all checks: the plan (swap, splits), the output buffers and the launch. wl / wr are
// the window after normalize_window (the caller needs it too: rotary positions). `dropout`:
// nullptr without. Returns {out, softmax_lse}.
std::vector<Tensor> run_batched(const Tensor& q_in, const Tensor& k, const Tensor& v, OptTensor out_,
                                const OptTensor& alibi_slopes, double softmax_scale, int wl, int wr, double softcap,
                                int num_splits, const KvLayout& kv, const flash::FwdLauncher& kernel,
                                const ForwardDropout* dropout = nullptr);

}  // namespace flash_api
