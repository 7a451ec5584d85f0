// Packing of FwdParams, the plan and the launch of one forward call, shared by the padded, varlen
// and kv-cache entry points.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <mutex>
#include <string>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/EmptyTensor.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>

#include "api/common.h"
#include "api/index_errors.h"

namespace flash_api {

namespace {

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

// q or out of a few queries per sequence, (batch, seqlen, num_heads, d), with `groups` query heads
// of a kv head packed into the rows (FwdParams::pack_groups): the kernel's head h starts at query
// head h * groups, and its rows step by query (row_stride) and by packed head (group_stride).
void set_packed_tensor(const Tensor& t, int groups, const void*& ptr, int64_t& batch_stride, int64_t& row_stride,
                       int64_t& head_stride, int64_t& group_stride) {
  ptr = t.data_ptr();
  batch_stride = t.stride(0);
  row_stride = t.stride(-3);
  group_stride = t.stride(-2);
  head_stride = groups * t.stride(-2);
}

}  // namespace

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
  } else if (c.pack_groups > 1) {
    set_packed_tensor(c.q, c.pack_groups, p.q_ptr, p.q_batch_stride, p.q_row_stride, p.q_head_stride,
                      p.q_group_stride);
    set_packed_tensor(c.out, c.pack_groups, o_const, p.o_batch_stride, p.o_row_stride, p.o_head_stride,
                      p.o_group_stride);
    p.pack_groups = c.pack_groups;
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

void set_dropout_rate(flash::FwdParams& p, double p_dropout) {
  const double keep = 1.0 - p_dropout;
  // Never 0 (the kernels' "no dropout"); p at 8-bit resolution (common/dropout.h).
  p.dropout_keep_threshold = static_cast<uint32_t>(std::clamp(std::round(keep * 256.0), 1.0, 256.0));
  p.dropout_scale = static_cast<float>(1.0 / keep);
}

void set_dropout(flash::FwdParams& p, const ForwardDropout& dropout) {
  set_dropout_rate(p, dropout.p);
  auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(dropout.gen,
                                                                  at::cuda::detail::getDefaultCUDAGenerator());
  at::PhiloxCudaState state;
  {
    // One 128-bit counter stream per (batch, head): reserve b * h counters of the generator.
    std::lock_guard<std::mutex> lock(gen->mutex_);
    state = gen->philox_cuda_state(static_cast<uint64_t>(p.b) * p.h);
  }
  if (state.captured_) {
    // Graph capture: the seed and offset are read from device memory at run time, so every replay
    // draws a fresh mask.
    p.philox_seed_ptr = state.seed_.ptr;
    p.philox_offset_ptr = state.offset_.ptr;
    p.philox_offset = state.offset_intragraph_;
  } else {
    p.philox_seed = state.seed_.val;
    p.philox_offset = state.offset_.val;
  }
  p.rng_state_ptr = dropout.rng_state.data_ptr<int64_t>();
  if (dropout.s_dmask.defined()) {
    p.s_dmask_ptr = dropout.s_dmask.data_ptr();
    p.s_dmask_batch_stride = dropout.s_dmask.stride(0);
    p.s_dmask_head_stride = dropout.s_dmask.stride(1);
    p.s_dmask_row_stride = dropout.s_dmask.stride(2);
  }
}

Tensor s_dmask_tensor(int batch, int num_heads, int max_seqlen_q, int max_seqlen_k, const Tensor& q) {
  auto round128 = [](int x) { return (x + 127) / 128 * 128; };
  return at::zeros({batch, num_heads, round128(max_seqlen_q), round128(max_seqlen_k)}, q.options());
}

DeviceInfo device_info() {
  // sm_count * 4 + sm90 * 2 + pdl; 0 = not yet queried, -1 = a GPU this build cannot run on.
  static std::atomic<int> cached[64] = {};
  const int device = c10::cuda::current_device();
  int packed = cached[device & 63].load(std::memory_order_relaxed);
  if (packed == 0) {
    int sms = 0, major = 0, minor = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    const bool sm90 = major == 9 && minor == 0;
    packed = unsupported_gpu_message("", major, minor).empty() ? sms * 4 + (sm90 ? 2 : 0) + (major >= 9 ? 1 : 0) : -1;
    cached[device & 63].store(packed, std::memory_order_relaxed);
  }
  if (packed < 0) {
    cudaDeviceProp prop{};
    C10_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
    TORCH_CHECK(false, unsupported_gpu_message(prop.name, prop.major, prop.minor));
  }
  return {device, packed / 4, (packed & 1) != 0, (packed & 2) != 0};
}

namespace {

std::atomic<bool> sm90_forward_enabled{true};

}  // namespace

bool sm90_forward_possible(const DeviceInfo& dev, const flash::FwdLauncher& kernel, bool sm80_dropout,
                           bool kv_indirect) {
  return kernel.run_sm90 != nullptr && dev.sm90 && sm90_forward_enabled.load(std::memory_order_relaxed) &&
         !sm80_dropout && !kv_indirect;
}

namespace {

// What the Hopper forward covers (sm90/fwd_kernel.h): the forward of batch-strided or packed
// (varlen) q/k/v, with seqused_k, at the kernel head dims it is built for (run_sm90 registered),
// with causal or window masks, softcap and ALiBi, unsplit or with the plan's splits of longer
// queries (prefill_splits), a paged K/V cache whose page size is a multiple of the key block at
// head dims up to 128 (flash_attn_with_kvcache and varlen with block_table; each key block is one
// TMA box inside one page), dropout in the plain kernel without S_dmask (sm90_takes_dropout), and
// nothing of left padding, other block tables or cache_batch_idx (sm90_forward_possible,
// sm90_kv_indirect); everything else runs the SM80
// kernels. The kernel zeroes the V rows past a sequence's keys, which whole-block TMA loads bring
// in (from the next sequence, or a page's rows past the length). A packed tensor's batch stride is
// never read; a paged one's is the page stride.
bool sm90_forward_applies(const flash::FwdParams& p, const flash::ForwardPlan& plan, const DeviceInfo& dev,
                          const flash::FwdLauncher& kernel) {
  const bool paged = p.block_table != nullptr;
  const bool packed_q = p.cu_seqlens_q != nullptr, packed_k = p.cu_seqlens_k != nullptr && !paged;
  const bool kv_indirect =
      sm90_kv_indirect(p.leftpad_k != nullptr, p.cache_batch_idx != nullptr, paged, p.page_block_size, p.d);
  const bool sm80_dropout = p.dropout_keep_threshold != 0 &&
                            !sm90_takes_dropout(p.s_dmask_ptr != nullptr, flash::has_score_mods(p), paged);
  return sm90_forward_possible(dev, kernel, sm80_dropout, kv_indirect) &&
         (!plan.split_kernel || plan.prefill_splits) && !plan.swap_seqlen_ngroups && p.seqlen_k > 0 &&
         (!packed_k || p.total_k_rows > 0) &&
         tma_compatible(p.q_ptr, {p.q_row_stride, p.q_head_stride, packed_q ? 8 : p.q_batch_stride}) &&
         tma_compatible(p.k_ptr, {p.k_row_stride, p.k_head_stride, packed_k ? 8 : p.k_batch_stride}) &&
         tma_compatible(p.v_ptr, {p.v_row_stride, p.v_head_stride, packed_k ? 8 : p.v_batch_stride}) &&
         tma_compatible(p.o_ptr, {p.o_row_stride, p.o_head_stride, packed_q ? 8 : p.o_batch_stride});
}

}  // namespace

bool set_sm90_forward(bool enabled) { return sm90_forward_enabled.exchange(enabled); }

c10::DataPtr set_splits(flash::FwdParams& p, const flash::ForwardPlan& plan, int total_q_rows, const DeviceInfo& dev,
                        const flash::FwdLauncher& kernel) {
  const int num_splits = plan.num_splits;
  p.split_kernel = plan.split_kernel;
  p.decode_kernel = plan.decode_kernel;
  p.num_splits = num_splits;
  p.device = dev.device;
  p.num_sms = dev.sm_count;
  p.allow_pdl = dev.pdl;
  p.total_q_rows = total_q_rows;
  // sm_90 (the pdl flag) runs a decode tile's splits as one thread-block cluster that merges them.
  // The plan's rule of thumb (grid <= 0.75 x SMs), then what this device can hold at once: every
  // cluster must be resident, or split 0 of a late cluster waits a whole wave.
  if (plan.cluster_merge && dev.pdl) {
    p.cluster_merge = plan.tiles <= kernel.max_decode_clusters(p, num_splits);  // one cluster per tile
  }
  // One split on sm_90: blocks of consecutive heads in clusters of two, which the hardware places
  // on the two SMs of a TPC; busy TPCs then all carry two blocks. The grid's head
  // dimension (b * h blocks) must split into whole pairs.
  p.decode_pair_clusters = plan.decode_kernel && num_splits == 1 && dev.pdl && (int64_t(p.b) * p.h) % 2 == 0;
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

void launch(const flash::FwdLauncher& kernel, const flash::FwdParams& p, const flash::ForwardPlan& plan,
            const DeviceInfo& dev) {
  const auto run = sm90_forward_applies(p, plan, dev, kernel) ? kernel.run_sm90 : kernel.run;
  run(p, c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::vector<Tensor> run_batched(const Tensor& q_in, const Tensor& k, const Tensor& v, OptTensor out_,
                                const OptTensor& alibi_slopes, double softmax_scale, int wl, int wr, double softcap,
                                int num_splits, const KvLayout& kv, const flash::FwdLauncher& kernel,
                                const ForwardDropout* dropout) {
  const int batch = q_in.size(0), seqlen_q = q_in.size(1), num_heads = q_in.size(2), head_size = q_in.size(3);
  const int num_heads_k = k.size(2);
  // Dropout runs upstream's unsplit kernel on the caller's (batch, head, row) layout: no swap, one
  // split (an explicit num_splits is ignored, as upstream).
  const bool can_swap = wl < 0 && wr < 0 && !alibi_slopes && dropout == nullptr;
  // Packed rows keep their query positions, so a causal mask or a window's right edge still applies.
  const bool can_pack = wl < 0 && !alibi_slopes && dropout == nullptr;
  if (dropout != nullptr) num_splits = 1;
  const DeviceInfo dev = device_info();
  const bool kv_indirect = sm90_kv_indirect(kv.leftpad_k != nullptr, kv.cache_batch_idx != nullptr,
                                            kv.block_table != nullptr, kv.page_block_size, head_size);
  const bool sm80_dropout = dropout != nullptr && !sm90_takes_dropout(dropout->s_dmask.defined(),
                                                                      softcap > 0.0 || alibi_slopes.has_value(),
                                                                      kv.block_table != nullptr);
  const flash::ForwardPlan plan =
      flash::plan_forward(batch, num_heads, num_heads_k, seqlen_q, kv.seqlen_k, head_size, can_swap, can_pack,
                          dev.sm_count, num_splits, sm90_forward_possible(dev, kernel, sm80_dropout, kv_indirect),
                          flash::sm90_pairs_tiles(wl, wr));
  // With the swap, (b, 1, h_k * g, d) is seen as (b, g, h_k, d): the g query heads of a kv head
  // become its query rows. Packed, (b, s, h, d) is seen as h / p heads of s * p rows (p = the
  // plan's pack_groups: g, or a part of it), read through a row and a group stride (set_packed_tensor).
  Call c{q_in, k, v, out_ ? *out_ : empty_cuda(q_in.sizes(), q_in.scalar_type(), q_in),
         batch, plan.num_heads, num_heads_k, plan.seqlen_q, kv.seqlen_k, head_size, false, false,
         plan.swap_seqlen_ngroups ? plan.seqlen_q : 0, plan.pack_groups};
  // Contiguous (b, h, seqlen_q) in the kernel's view is the same memory as (b, num_heads, seqlen_q).
  Tensor softmax_lse = empty_cuda({batch, num_heads, seqlen_q}, at::kFloat, q_in);

  if (batch > 0 && seqlen_q > 0 && num_heads > 0) {
    flash::FwdParams p;
    fill_common(p, c, alibi_slopes, wl, wr, softmax_scale, softcap);
    p.seqused_k = kv.seqused_k;
    p.leftpad_k = kv.leftpad_k;
    p.cache_batch_idx = kv.cache_batch_idx;
    p.num_cache_batches = kv.batch_cache;
    p.index_errors = index_error_words(dev.device);
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
    p.lse_group_stride = seqlen_q;  // packed rows: the next query head's lse of the same query
    if (dropout != nullptr) set_dropout(p, *dropout);
    auto accum = set_splits(p, plan, batch * plan.seqlen_q, dev, kernel);
    launch(kernel, p, plan, dev);
  }
  return {c.out, softmax_lse};
}

}  // namespace flash_api
