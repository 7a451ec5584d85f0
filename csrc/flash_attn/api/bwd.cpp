// Entry points `bwd` (padded batch) and `varlen_bwd` (packed variable-length batch), with upstream
// flash-attn 2.8's argument order and return list {dq, dk, dv, softmax_d}. They reuse the forward's
// softmax_lse (no forward recompute) and its conventions: the same window normalisation, score
// packing and varlen offsets (fill_common), so the kernels recompute exactly the forward's P. With
// dropout they regenerate the forward's mask from its rng_state (read on the device: no sync).
#include <atomic>
#include <initializer_list>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "api/common.h"
#include "api/entry_points.h"

namespace flash_api {

namespace {

std::string dims_str(at::IntArrayRef dims) {
  std::string out = "(";
  for (size_t i = 0; i < dims.size(); ++i) out += (i ? ", " : "") + std::to_string(dims[i]);
  return out + (dims.size() == 1 ? ",)" : ")");
}

flash::BwdLauncher find_bwd_kernel(int head_size, bool is_bf16) {
  const int kernel_hdim = flash::round_up_headdim(head_size);
  flash::BwdLauncher launcher = flash::find_bwd(kernel_hdim, is_bf16);
  TORCH_CHECK(launcher.run != nullptr, "backward for head_dim ", std::to_string(head_size), " (kernel head dim ",
              std::to_string(kernel_hdim), ", ", is_bf16 ? "bf16" : "fp16",
              ") was not compiled in this build; rebuild with FLASH_ATTN_HEADDIMS / FLASH_ATTN_DTYPES including it");
  return launcher;
}

void check_bwd_options(double p_dropout, const OptTensor& rng_state, int window_left, int window_right,
                       double softcap) {
  check_dropout_p(p_dropout);
  if (p_dropout > 0.0) {
    // The forward's (seed, offset): the backward must regenerate its mask, not draw a new one.
    TORCH_CHECK(rng_state.has_value(), "rng_state (the forward's 4th result) is required when dropout_p > 0");
    TORCH_CHECK(rng_state->scalar_type() == at::kLong && rng_state->numel() == 2 && rng_state->is_contiguous(),
                "rng_state must be a contiguous int64 tensor of 2 elements (seed, offset), got ",
                shape_str(*rng_state), " ", c10::toString(rng_state->scalar_type()));
  }
  TORCH_CHECK(window_left >= -1, "window_size_left must be >= -1, got ", std::to_string(window_left));
  TORCH_CHECK(window_right >= -1, "window_size_right must be >= -1, got ", std::to_string(window_right));
  TORCH_CHECK(softcap >= 0.0, "softcap must be >= 0, got ", std::to_string(softcap));
}

// out, dout or a preallocated gradient: q's dtype, the given shape, contiguous last dimension
// (other strides are honoured: dq / dk / dv may be views of one packed dqkv).
void check_like(const Tensor& t, const char* name, const Tensor& q, at::IntArrayRef shape) {
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), name, " must have the same dtype as q, got ",
              c10::toString(t.scalar_type()), " and ", c10::toString(q.scalar_type()));
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", dims_str(shape), ", got ", shape_str(t));
  TORCH_CHECK(t.stride(-1) == 1, name, " must have contiguous last dimension");
}

void check_lse(const Tensor& lse, at::IntArrayRef shape) {
  TORCH_CHECK(lse.scalar_type() == at::kFloat, "softmax_lse must have dtype torch.float32, got ",
              c10::toString(lse.scalar_type()));
  TORCH_CHECK(lse.sizes() == shape, "softmax_lse must have shape ", dims_str(shape), ", got ", shape_str(lse));
}

// The checks both entry points share once the layouts are known: out, dout, softmax_lse and the
// preallocated gradients against q and k, ALiBi, then -- last, so CPU tests reach every other
// check -- each tensor on q's device (the varlen entry point adds its cu_seqlens).
void check_tensors(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& dout,
                   const Tensor& softmax_lse, at::IntArrayRef lse_shape, const OptTensor& dq, const OptTensor& dk,
                   const OptTensor& dv, const OptTensor& alibi_slopes, int batch, int num_heads, double p_dropout,
                   const OptTensor& rng_state,
                   std::initializer_list<std::pair<const Tensor*, const char*>> also_on_device = {}) {
  check_like(out, "out", q, q.sizes());
  check_like(dout, "dout", q, q.sizes());
  check_lse(softmax_lse, lse_shape);
  if (dq) check_like(*dq, "dq", q, q.sizes());
  if (dk) check_like(*dk, "dk", q, k.sizes());
  if (dv) check_like(*dv, "dv", q, k.sizes());
  for (auto [t, name] : {std::pair<const OptTensor*, const char*>{&dq, "dq"}, {&dk, "dk"}, {&dv, "dv"}}) {
    if (t->has_value()) check_vector_aligned(**t, name);
  }
  check_alibi(alibi_slopes, batch, num_heads);
  for (auto [t, name] : {std::pair<const Tensor*, const char*>{&q, "q"}, {&k, "k"}, {&v, "v"}, {&out, "out"},
                         {&dout, "dout"}, {&softmax_lse, "softmax_lse"}}) {
    check_on_device(*t, name, q);
  }
  for (auto [t, name] : also_on_device) check_on_device(*t, name, q);
  for (auto [t, name] : {std::pair<const OptTensor*, const char*>{&dq, "dq"}, {&dk, "dk"}, {&dv, "dv"},
                         {&alibi_slopes, "alibi_slopes"}}) {
    if (t->has_value()) check_on_device(**t, name, q);
  }
  if (p_dropout > 0.0) check_on_device(*rng_state, "rng_state", q);
}

std::atomic<bool> sm90_backward_enabled{true};

// What the Hopper backward covers (sm90/bwd_kernel.h, docs/SM90_BACKWARD.md): the dense and the
// varlen backward at the kernel head dims it is built for (run_sm90 registered: 64, 96, 128, 192
// and 256 in a full build), causal or window masks, GQA/MQA, deterministic or not, dropout or not;
// nothing of softcap or ALiBi, which run the SM80 kernels. A packed tensor of no rows has no TMA
// map (a zero extent): the SM80 path takes that call. Decided before the buffers are allocated:
// the two paths need different ones.
bool sm90_backward_applies(const flash::BwdParams& p, const DeviceInfo& dev, const flash::BwdLauncher& kernel) {
  const bool packed_q = p.cu_seqlens_q != nullptr, packed_k = p.cu_seqlens_k != nullptr;
  return kernel.run_sm90 != nullptr && dev.sm90 && sm90_backward_enabled.load(std::memory_order_relaxed) &&
         p.seqused_k == nullptr && p.leftpad_k == nullptr && p.block_table == nullptr &&
         p.cache_batch_idx == nullptr && p.seqlen_q > 0 && p.seqlen_k > 0 && (!packed_q || p.total_q_rows > 0) &&
         (!packed_k || p.total_k_rows > 0) && p.alibi_slopes_ptr == nullptr && p.softcap_in == 0.f &&
         tma_compatible(p.q_ptr, {p.q_row_stride, p.q_head_stride, packed_q ? 8 : p.q_batch_stride}) &&
         tma_compatible(p.k_ptr, {p.k_row_stride, p.k_head_stride, packed_k ? 8 : p.k_batch_stride}) &&
         tma_compatible(p.v_ptr, {p.v_row_stride, p.v_head_stride, packed_k ? 8 : p.v_batch_stride}) &&
         tma_compatible(p.do_ptr, {p.do_row_stride, p.do_head_stride, packed_q ? 8 : p.do_batch_stride});
}

void set_grad(const Tensor& t, void*& ptr, int64_t& batch_stride, int64_t& row_stride, int64_t& head_stride,
              bool batched) {
  ptr = t.data_ptr();
  batch_stride = batched ? t.stride(0) : 0;
  row_stride = t.stride(-3);
  head_stride = t.stride(-2);
}

// Shared by both entry points after the checks: packs BwdParams, picks the Hopper or the SM80
// kernels, allocates what they need and launches. softmax_lse and softmax_d share the strides given.
void run_backward(const flash::BwdLauncher& kernel, const Call& c, const Tensor& dout, const Tensor& lse,
                  const Tensor& softmax_d, const Tensor& dq, const Tensor& dk, const Tensor& dv,
                  const OptTensor& alibi_slopes, const int* cu_seqlens_q, const int* cu_seqlens_k, int total_q_rows,
                  int64_t lse_batch_stride, int64_t lse_head_stride, int64_t lse_row_stride, int wl, int wr,
                  double softmax_scale, double softcap, bool deterministic, double p_dropout,
                  const OptTensor& rng_state) {
  flash::BwdParams p{};
  fill_common(p, c, alibi_slopes, wl, wr, static_cast<float>(softmax_scale), static_cast<float>(softcap));
  p.cu_seqlens_q = cu_seqlens_q;
  p.cu_seqlens_k = cu_seqlens_k;
  p.softmax_lse_ptr = lse.data_ptr<float>();
  p.softmax_d_ptr = softmax_d.data_ptr<float>();
  p.lse_batch_stride = lse_batch_stride;
  p.lse_head_stride = lse_head_stride;
  p.lse_row_stride = lse_row_stride;
  p.do_ptr = dout.data_ptr();
  p.do_batch_stride = c.varlen_q ? 0 : dout.stride(0);
  p.do_row_stride = dout.stride(-3);
  p.do_head_stride = dout.stride(-2);
  set_grad(dq, p.dq_ptr, p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride, !c.varlen_q);
  set_grad(dk, p.dk_ptr, p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride, !c.varlen_k);
  set_grad(dv, p.dv_ptr, p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride, !c.varlen_k);
  p.total_q_rows = total_q_rows;
  p.total_k_rows = c.varlen_k ? static_cast<int>(c.k.size(0)) : 0;
  p.scale_grad = static_cast<float>(softmax_scale);
  p.deterministic = deterministic;
  const DeviceInfo dev = device_info();
  p.device = dev.device;
  if (p_dropout > 0.0) {
    set_dropout_rate(p, p_dropout);
    const int64_t* seed_offset = rng_state->data_ptr<int64_t>();
    p.philox_seed_ptr = seed_offset;
    p.philox_offset_ptr = seed_offset + 1;
    p.philox_offset = 0;
  }
  const bool sm90 = sm90_backward_applies(p, dev, kernel);
  const int kernel_hdim = flash::round_up_headdim(c.head_size);
  p.dq_walk_rotated = sm90 && deterministic &&
                      flash::sm90_bwd_rotated_dq_walk(p.window_left, p.window_right,
                                                      flash::ceil_div(p.seqlen_k, flash::sm90_bwd_block_n(kernel_hdim)),
                                                      dev.sm_count);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  // The fp32 dQ accumulator, for every path but the SM80 kernels' deterministic one (which
  // computes dQ in its own kernel); the deterministic Hopper kernel also takes one add count per
  // (batch, head, query block), zeroed here, after the accumulator in the same allocation. Straight
  // from PyTorch's caching allocator: no sync, no tensor object; it lives until the launches are
  // enqueued (the allocator keeps the stream order).
  c10::DataPtr buffers;
  if (sm90 || !deterministic) {
    const int64_t accum_elems = int64_t(c.num_heads) * total_q_rows * kernel_hdim;
    const int block_m = flash::sm90_bwd_block_m(kernel_hdim);
    const int64_t q_blocks = (c.seqlen_q + block_m - 1) / block_m;
    const int64_t counts = sm90 && deterministic ? int64_t(c.batch) * c.num_heads * q_blocks : 0;
    buffers = c10::cuda::CUDACachingAllocator::get()->allocate(accum_elems * sizeof(float) + counts * sizeof(int));
    p.dq_accum_ptr = static_cast<float*>(buffers.get());
    if (counts > 0) {
      p.dq_add_count_ptr = reinterpret_cast<int*>(p.dq_accum_ptr + accum_elems);
      C10_CUDA_CHECK(cudaMemsetAsync(p.dq_add_count_ptr, 0, counts * sizeof(int), stream));
    }
  }
  (sm90 ? kernel.run_sm90 : kernel.run)(p, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

Tensor grad_or_empty(const OptTensor& given, const Tensor& like) {
  return given ? *given : empty_cuda(like.sizes(), like.scalar_type(), like);
}

}  // namespace

bool set_sm90_backward(bool enabled) { return sm90_backward_enabled.exchange(enabled); }

// q, out, dout: (batch, seqlen_q, num_heads, d); k, v: (batch, seqlen_k, num_heads_k, d);
// softmax_lse: (batch, num_heads, seqlen_q) fp32.
std::vector<Tensor> mha_bwd(const Tensor& dout_arg, const Tensor& q_arg, const Tensor& k_arg, const Tensor& v_arg,
                            const Tensor& out_arg, const Tensor& softmax_lse, OptTensor dq_, OptTensor dk_,
                            OptTensor dv_, OptTensor alibi_slopes, double p_dropout, double softmax_scale,
                            bool is_causal, int window_left, int window_right, double softcap, bool deterministic,
                            std::optional<at::Generator> gen, OptTensor rng_state) {
  const Tensor q = with_kernel_layout(q_arg), k = with_kernel_layout(k_arg), v = with_kernel_layout(v_arg);
  const Tensor out = with_kernel_layout(out_arg), dout = with_kernel_layout(dout_arg);
  check_qkv_dtypes(q, k, v);
  TORCH_CHECK(q.dim() == 4, "q must have shape (batch, seqlen_q, num_heads, head_dim), got ", shape_str(q));
  TORCH_CHECK(k.dim() == 4, "k must have shape (batch, seqlen_k, num_heads_k, head_dim), got ", shape_str(k));
  const int batch = q.size(0), seqlen_q = q.size(1), num_heads = q.size(2), head_size = q.size(3);
  const int seqlen_k = k.size(1), num_heads_k = k.size(2);
  TORCH_CHECK(k.size(0) == batch && k.size(3) == head_size, "k must have shape (batch, seqlen_k, num_heads_k, ",
              "head_dim) with q's batch and head_dim, got ", shape_str(k), " for q ", shape_str(q));
  TORCH_CHECK(v.sizes() == k.sizes(), "v must have the same shape as k, got ", shape_str(v), " and ", shape_str(k));
  check_head_dims(head_size, num_heads, num_heads_k);
  check_bwd_options(p_dropout, rng_state, window_left, window_right, softcap);
  check_tensors(q, k, v, out, dout, softmax_lse, {batch, num_heads, seqlen_q}, dq_, dk_, dv_, alibi_slopes, batch,
                num_heads, p_dropout, rng_state);
  const flash::BwdLauncher kernel = find_bwd_kernel(head_size, q.scalar_type() == at::kBFloat16);

  const at::cuda::CUDAGuard device_guard{q.device()};
  const auto [wl, wr] = normalize_window(is_causal, window_left, window_right, seqlen_q, seqlen_k);
  const Tensor dq = grad_or_empty(dq_, q), dk = grad_or_empty(dk_, k), dv = grad_or_empty(dv_, v);
  const Tensor softmax_d = empty_cuda({batch, num_heads, seqlen_q}, at::kFloat, q);
  if (batch > 0 && num_heads > 0 && (seqlen_q > 0 || seqlen_k > 0)) {
    const Call c{q, k, v, out, batch, num_heads, num_heads_k, seqlen_q, seqlen_k, head_size, false, false, 0};
    run_backward(kernel, c, dout, softmax_lse, softmax_d, dq, dk, dv, alibi_slopes, nullptr, nullptr,
                 batch * seqlen_q, softmax_lse.stride(0), softmax_lse.stride(1), softmax_lse.stride(2), wl, wr,
                 softmax_scale, softcap, deterministic, p_dropout, rng_state);
  }
  return {dq, dk, dv, softmax_d};
}

// q, out, dout: (total_q, num_heads, d); k, v: (total_k, num_heads_k, d); softmax_lse:
// (num_heads, total_q) fp32.
std::vector<Tensor> mha_varlen_bwd(const Tensor& dout_arg, const Tensor& q_arg, const Tensor& k_arg,
                                   const Tensor& v_arg, const Tensor& out_arg, const Tensor& softmax_lse,
                                   OptTensor dq_, OptTensor dk_, OptTensor dv_, const Tensor& cu_seqlens_q,
                                   const Tensor& cu_seqlens_k, OptTensor alibi_slopes, int max_seqlen_q,
                                   int max_seqlen_k, double p_dropout, double softmax_scale, bool zero_tensors,
                                   bool is_causal, int window_left, int window_right, double softcap,
                                   bool deterministic, std::optional<at::Generator> gen, OptTensor rng_state) {
  const Tensor q = with_kernel_layout(q_arg), k = with_kernel_layout(k_arg), v = with_kernel_layout(v_arg);
  const Tensor out = with_kernel_layout(out_arg), dout = with_kernel_layout(dout_arg);
  check_qkv_dtypes(q, k, v);
  TORCH_CHECK(q.dim() == 3, "q must have shape (total_q, num_heads, head_dim), got ", shape_str(q));
  TORCH_CHECK(k.dim() == 3, "k must have shape (total_k, num_heads_k, head_dim), got ", shape_str(k));
  const int total_q = q.size(0), num_heads = q.size(1), head_size = q.size(2);
  const int num_heads_k = k.size(1);
  const int batch = cu_seqlens_q.numel() - 1;
  TORCH_CHECK(k.size(2) == head_size, "k must have q's head_dim ", std::to_string(head_size), ", got ", shape_str(k));
  TORCH_CHECK(v.sizes() == k.sizes(), "v must have the same shape as k, got ", shape_str(v), " and ", shape_str(k));
  check_head_dims(head_size, num_heads, num_heads_k);
  check_bwd_options(p_dropout, rng_state, window_left, window_right, softcap);
  TORCH_CHECK(batch >= 1, "cu_seqlens_q must have batch_size + 1 >= 2 elements, got ",
              std::to_string(cu_seqlens_q.numel()));
  check_int32_vector(cu_seqlens_q, "cu_seqlens_q", batch + 1);
  check_int32_vector(cu_seqlens_k, "cu_seqlens_k", batch + 1);
  TORCH_CHECK(max_seqlen_q >= 0 && max_seqlen_k >= 0, "max_seqlen_q and max_seqlen_k must be >= 0");
  check_tensors(q, k, v, out, dout, softmax_lse, {num_heads, total_q}, dq_, dk_, dv_, alibi_slopes, batch,
                num_heads, p_dropout, rng_state, {{&cu_seqlens_q, "cu_seqlens_q"}, {&cu_seqlens_k, "cu_seqlens_k"}});
  const flash::BwdLauncher kernel = find_bwd_kernel(head_size, q.scalar_type() == at::kBFloat16);

  const at::cuda::CUDAGuard device_guard{q.device()};
  const auto [wl, wr] = normalize_window(is_causal, window_left, window_right, max_seqlen_q, max_seqlen_k);
  const Tensor dq = grad_or_empty(dq_, q), dk = grad_or_empty(dk_, k), dv = grad_or_empty(dv_, v);
  const Tensor softmax_d = empty_cuda({num_heads, total_q}, at::kFloat, q);
  if (zero_tensors) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    softmax_d.zero_();
  }
  if (total_q > 0 || k.size(0) > 0) {
    const Call c{q, k, v, out, batch, num_heads, num_heads_k, max_seqlen_q, max_seqlen_k, head_size, true, true, 0};
    run_backward(kernel, c, dout, softmax_lse, softmax_d, dq, dk, dv, alibi_slopes, cu_seqlens_q.data_ptr<int>(),
                 cu_seqlens_k.data_ptr<int>(), total_q, 0, softmax_lse.stride(0), softmax_lse.stride(1), wl, wr,
                 softmax_scale, softcap, deterministic, p_dropout, rng_state);
  }
  return {dq, dk, dv, softmax_d};
}

}  // namespace flash_api
