// Entry points `fwd` (padded batch) and `varlen_fwd` (packed variable-length batch, paged K/V),
// with upstream flash-attn 2's argument order and return list {out, softmax_lse, S_dmask, rng_state}.
#include <limits>
#include <string>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>

#include "api/common.h"
#include "api/entry_points.h"
#include "api/index_errors.h"

namespace flash_api {

namespace {

// The Philox seed and offset a dropout forward used, for its backward (the kernel writes them):
// upstream returns the (2,) int64 tensor on every call; without dropout its contents are unused.
Tensor rng_state_tensor(const Tensor& like) { return empty_cuda({2}, at::kLong, like); }

// The dropout of a call with p_dropout > 0 (S_dmask only with return_softmax, which the checks
// allow only with dropout).
ForwardDropout forward_dropout(double p_dropout, bool return_softmax, const std::optional<at::Generator>& gen,
                               int batch, int num_heads, int max_seqlen_q, int max_seqlen_k, const Tensor& q) {
  return {p_dropout, gen, rng_state_tensor(q),
          return_softmax ? s_dmask_tensor(batch, num_heads, max_seqlen_q, max_seqlen_k, q) : Tensor()};
}

}  // namespace

// q: (batch, seqlen_q, num_heads, d); k, v: (batch, seqlen_k, num_heads_k, d).
std::vector<Tensor> mha_fwd(const Tensor& q_arg, const Tensor& k_arg, const Tensor& v_arg, OptTensor out_,
                            OptTensor alibi_slopes, double p_dropout, double softmax_scale, bool is_causal,
                            int window_left, int window_right, double softcap, bool return_softmax,
                            std::optional<at::Generator> gen, int num_splits) {
  const Tensor q_in = with_kernel_layout(q_arg), k = with_kernel_layout(k_arg), v = with_kernel_layout(v_arg);
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
  raise_pending_index_errors(q_in.get_device());
  const auto [wl, wr] = normalize_window(is_causal, window_left, window_right, q_in.size(1), seqlen_k);
  if (p_dropout > 0.0) {
    const ForwardDropout dropout =
        forward_dropout(p_dropout, return_softmax, gen, batch, num_heads, q_in.size(1), seqlen_k, q_in);
    std::vector<Tensor> result = run_batched(q_in, k, v, out_, alibi_slopes, softmax_scale, wl, wr, softcap,
                                             num_splits, KvLayout{seqlen_k}, kernel, &dropout);
    return {result[0], result[1], dropout.s_dmask, dropout.rng_state};
  }
  std::vector<Tensor> result = run_batched(q_in, k, v, out_, alibi_slopes, softmax_scale, wl, wr, softcap,
                                           num_splits, KvLayout{seqlen_k}, kernel);
  return {result[0], result[1], Tensor(), rng_state_tensor(q_in)};
}

// q: (total_q, num_heads, d); k, v: (total_k, num_heads_k, d), or paged
// (num_blocks, page_block_size, num_heads_k, d) with block_table (batch, max_blocks_per_seq).
std::vector<Tensor> mha_varlen_fwd(const Tensor& q_arg, const Tensor& k_arg, const Tensor& v_arg, OptTensor out_,
                                   const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k, OptTensor seqused_k,
                                   OptTensor leftpad_k, OptTensor block_table, OptTensor alibi_slopes,
                                   int max_seqlen_q, int max_seqlen_k, double p_dropout, double softmax_scale,
                                   bool zero_tensors, bool is_causal, int window_left, int window_right,
                                   double softcap, bool return_softmax, std::optional<at::Generator> gen,
                                   int num_splits) {
  const Tensor q_in = with_kernel_layout(q_arg), k = with_kernel_layout(k_arg), v = with_kernel_layout(v_arg);
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
  raise_pending_index_errors(q_in.get_device());
  auto [wl, wr] = normalize_window(is_causal, window_left, window_right, max_seqlen_q, max_seqlen_k);
  // The swap views q as (b, g, h_k, d), which needs exactly one query per sequence; packing a
  // group's heads with several queries each needs batch-strided queries (flash_attn_func,
  // flash_attn_with_kvcache). Dropout runs upstream's unsplit kernel on the caller's layout: no
  // swap, one split (an explicit num_splits is ignored, as upstream).
  const bool has_dropout = p_dropout > 0.0;
  const bool can_swap = wl < 0 && wr < 0 && !alibi_slopes && total_q == batch && !has_dropout;
  const DeviceInfo dev = device_info();
  const bool sm80_dropout =
      has_dropout && !sm90_takes_dropout(return_softmax, softcap > 0.0 || alibi_slopes.has_value(), paged);
  const bool sm90_prefill = sm90_forward_possible(
      dev, kernel, sm80_dropout, sm90_kv_indirect(false, false, paged, page_block_size, head_size));
  const flash::ForwardPlan plan = flash::plan_forward(batch, num_heads, num_heads_k, max_seqlen_q, max_seqlen_k,
                                                      head_size, can_swap, /*can_pack=*/false, dev.sm_count,
                                                      has_dropout ? 1 : num_splits, sm90_prefill,
                                                      flash::sm90_pairs_tiles(wl, wr));
  // With the swap, q (total_q = batch, h_k * g, d) is seen batch-strided as (b, g, h_k, d).
  Call c{q_in, k, v, out_ ? *out_ : empty_cuda(q_in.sizes(), q_in.scalar_type(), q_in),
         batch, plan.num_heads, num_heads_k, plan.seqlen_q, max_seqlen_k, head_size,
         !plan.swap_seqlen_ngroups, !paged, plan.swap_seqlen_ngroups ? plan.seqlen_q : 0};
  Tensor softmax_lse = empty_cuda({num_heads, total_q}, at::kFloat, q_in);
  const ForwardDropout dropout =
      has_dropout ? forward_dropout(p_dropout, return_softmax, gen, batch, num_heads, max_seqlen_q, max_seqlen_k, q_in)
                  : ForwardDropout{0.0, std::nullopt, rng_state_tensor(q_in), Tensor()};
  if (zero_tensors) {
    c.out.zero_();
    softmax_lse.fill_(-std::numeric_limits<float>::infinity());
  }

  if (total_q > 0 && max_seqlen_q > 0) {
    flash::FwdParams p;
    fill_common(p, c, alibi_slopes, wl, wr, softmax_scale, softcap);
    p.cu_seqlens_q = plan.swap_seqlen_ngroups ? nullptr : cu_seqlens_q.data_ptr<int>();
    p.cu_seqlens_k = cu_seqlens_k.data_ptr<int>();
    p.total_k_rows = paged ? 0 : k.size(0);
    p.seqused_k = seqused_k ? seqused_k->data_ptr<int>() : nullptr;
    p.leftpad_k = leftpad_k ? leftpad_k->data_ptr<int>() : nullptr;
    p.index_errors = index_error_words(dev.device);
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
    if (has_dropout) set_dropout(p, dropout);
    const int total_q_rows = plan.swap_seqlen_ngroups ? batch * plan.seqlen_q : total_q;
    auto accum = set_splits(p, plan, total_q_rows, dev, kernel);
    launch(kernel, p, plan, dev);
  }
  return {c.out, softmax_lse, dropout.s_dmask, dropout.rng_state};
}

}  // namespace flash_api
