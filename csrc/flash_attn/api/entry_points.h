// The dispatcher's entry points as module.cpp binds them (flash_attn_2_cuda.*), with upstream
// flash-attn 2's argument order; our extra num_splits trails.
#pragma once

#include <optional>
#include <vector>

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

namespace flash_api {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// q: (batch, seqlen_q, num_heads, d); k, v: (batch, seqlen_k, num_heads_k, d).
// Returns {out, softmax_lse, S_dmask, rng_state}.
std::vector<Tensor> mha_fwd(const Tensor& q, const Tensor& k, const Tensor& v, OptTensor out,
                            OptTensor alibi_slopes, double p_dropout, double softmax_scale, bool is_causal,
                            int window_left, int window_right, double softcap, bool return_softmax,
                            std::optional<at::Generator> gen, int num_splits);

// q: (total_q, num_heads, d); k, v: (total_k, num_heads_k, d), or paged with block_table.
// Returns {out, softmax_lse, S_dmask, rng_state}.
std::vector<Tensor> mha_varlen_fwd(const Tensor& q, const Tensor& k, const Tensor& v, OptTensor out,
                                   const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k, OptTensor seqused_k,
                                   OptTensor leftpad_k, OptTensor block_table, OptTensor alibi_slopes,
                                   int max_seqlen_q, int max_seqlen_k, double p_dropout, double softmax_scale,
                                   bool zero_tensors, bool is_causal, int window_left, int window_right,
                                   double softcap, bool return_softmax, std::optional<at::Generator> gen,
                                   int num_splits);

// flash_attn_with_kvcache. Returns {out, softmax_lse}.
std::vector<Tensor> mha_fwd_kvcache(const Tensor& q, const Tensor& kcache, const Tensor& vcache, OptTensor k,
                                    OptTensor v, OptTensor cache_seqlens, OptTensor rotary_cos, OptTensor rotary_sin,
                                    OptTensor cache_batch_idx, OptTensor cache_leftpad, OptTensor block_table,
                                    OptTensor alibi_slopes, OptTensor out, double softmax_scale, bool is_causal,
                                    int window_left, int window_right, double softcap, bool rotary_interleaved,
                                    int num_splits);

}  // namespace flash_api

namespace flash_api {

// Backward of mha_fwd. dout, q, out: (batch, seqlen_q, num_heads, d); k, v: (batch, seqlen_k,
// num_heads_k, d); softmax_lse: (batch, num_heads, seqlen_q). dq / dk / dv, when given, are written
// in place (any strides with a contiguous last dimension). Returns {dq, dk, dv, softmax_d}.
std::vector<Tensor> mha_bwd(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                            const Tensor& softmax_lse, OptTensor dq, OptTensor dk, OptTensor dv,
                            OptTensor alibi_slopes, double p_dropout, double softmax_scale, bool is_causal,
                            int window_left, int window_right, double softcap, bool deterministic,
                            std::optional<at::Generator> gen, OptTensor rng_state);

// Backward of mha_varlen_fwd (no paged K/V). dout, q, out: (total_q, num_heads, d); k, v:
// (total_k, num_heads_k, d); softmax_lse: (num_heads, total_q). Returns {dq, dk, dv, softmax_d}.
std::vector<Tensor> mha_varlen_bwd(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                                   const Tensor& out, const Tensor& softmax_lse, OptTensor dq, OptTensor dk,
                                   OptTensor dv, const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
                                   OptTensor alibi_slopes, int max_seqlen_q, int max_seqlen_k, double p_dropout,
                                   double softmax_scale, bool zero_tensors, bool is_causal, int window_left,
                                   int window_right, double softcap, bool deterministic,
                                   std::optional<at::Generator> gen, OptTensor rng_state);

}  // namespace flash_api
