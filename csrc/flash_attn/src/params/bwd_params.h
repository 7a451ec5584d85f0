// Parameters of one backward attention call, packed by api/bwd.cpp and read by the backward
// kernels. Plain C++: the dispatcher includes this without CUDA/CUTLASS headers.
//
// The forward's fields keep their meaning (FwdParams is the base): q, k, v, out and softmax_lse are
// the forward's inputs and results, read here; scores, ALiBi, window and the varlen offsets are the
// same, so the backward recomputes exactly the probabilities the forward normalised.
#pragma once

#include <cstdint>

#include "params/fwd_params.h"

namespace flash {

struct BwdParams : FwdParams {
  // Gradient of the output, (b, seqlen_q, h, d) or varlen (total_q, h, d); strides in elements.
  const void* do_ptr;
  int64_t do_batch_stride, do_row_stride, do_head_stride;

  // Gradients written by the kernels. They may be strided views of one packed tensor (dqkv), so
  // every stride is honoured; the last dimension is contiguous. dk / dv have h_k heads: the query
  // heads of a GQA group are summed inside the kernel.
  void* dq_ptr;
  void* dk_ptr;
  void* dv_ptr;
  int64_t dq_batch_stride, dq_row_stride, dq_head_stride;
  int64_t dk_batch_stride, dk_row_stride, dk_head_stride;
  int64_t dv_batch_stride, dv_row_stride, dv_head_stride;

  // D = rowsum(dO * O) in fp32, laid out like softmax_lse (same three strides).
  float* softmax_d_ptr;

  // fp32 dQ accumulated by the dK/dV blocks with atomics: [h][total_q_rows][kernel head dim],
  // rows indexed like the forward's split partials (SeqInfo::q_row). nullptr when the SM80 kernels
  // run deterministic: then a separate kernel computes dQ per query tile in a fixed key order.
  float* dq_accum_ptr;

  // d(scaled score)/d(q.k) apart from softcap's tanh' factor: the caller's softmax_scale (with
  // softcap, softcap * softcap_in is the same number).
  float scale_grad;

  bool deterministic;

  // Deterministic Hopper backward only (else nullptr): per (batch, head, query block of
  // sm90_bwd_block_m(kernel head dim) rows), how many key blocks have added their part of dQ into
  // dq_accum, zeroed before the launch; the key blocks take turns in a fixed order
  // (sm90/bwd_dq_order.h).
  int* dq_add_count_ptr;

  // Deterministic Hopper backward only: the key blocks walk the query blocks from rotated starts,
  // and the dQ adds follow that walk (sm90/bwd_dq_order.h); set by the dispatcher where
  // plan/heuristics.h's sm90_bwd_rotated_dq_walk allows it.
  bool dq_walk_rotated;
};

}  // namespace flash
