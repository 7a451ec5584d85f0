// The element-wise heart of the backward, shared by the dK/dV and the deterministic dQ kernels:
// raw scores S and dP = dO V^T of one (query tile, key block) pair become the probabilities P
// (recomputed from the forward's log-sum-exp, no second softmax pass) and dS, the gradient of the
// raw score q.k divided by softmax_scale (the kernels apply that factor once, at the end).
//
// With dropout (mask M, keep probability 1 - p; the forward's output O = (P o M / (1 - p)) V):
//   dP' = dP o M / (1 - p),  dS = P o (dP' - D)   (D = rowsum(dO o O), O the dropped output)
// and the probabilities handed back for dV += P^T dO are the dropped ones, P o M / (1 - p).
#pragma once

#include <cmath>

#include <cute/tensor.hpp>

#include "params/bwd_params.h"
#include "common/dropout.h"
#include "common/mma_utils.h"
#include "common/score_mods.h"

namespace flash {

using namespace cute;

constexpr float kLog2e = 1.4426950408889634f;

// Per query row a thread holds: the forward's lse in log2 units and D = rowsum(dO * O). Rows past
// the sequence get lse = +inf, so their P (and dS) are exactly 0 whatever their zero-filled Q and
// dO give; so do rows the forward left empty (lse = +inf).
template <int kRows>
struct RowStats {
  float lse_log2[kRows];
  float d[kRows];

  // coord_rc: (rows, cols) coordinates of the thread's accumulator elements within the tile.
  template <typename TC>
  __device__ void load(const BwdParams& p, TC const& coord_rc, int bidb, int bidh, int q_start, int m0,
                       int rows_in_tile) {
    const int64_t base = bidb * p.lse_batch_stride + bidh * p.lse_head_stride;
    CUTE_UNROLL
    for (int mi = 0; mi < kRows; ++mi) {
      const int row = get<0>(coord_rc(mi, 0));
      const bool valid = row < rows_in_tile;
      const int64_t off = base + int64_t(q_start + m0 + (valid ? row : 0)) * p.lse_row_stride;
      lse_log2[mi] = valid ? p.softmax_lse_ptr[off] * kLog2e : INFINITY;
      d[mi] = valid ? p.softmax_d_ptr[off] : 0.f;
    }
  }
};

// acc_s: S = Q K^T on entry, P on return. acc_dp: dP on entry, dS on return (fp32). The score
// modifiers follow the forward exactly: softcap tanh(s * softcap_in), ALiBi (slope / scale_softmax),
// mask to -inf, then P = exp2(s * scale_log2 - lse_log2). With softcap, dS also carries tanh's
// derivative 1 - t^2 (softcap * softcap_in = softmax_scale, applied by the caller).
// kHasDropout: `keep` holds the dropout mask of acc_s's elements (Dropout::keep_bits); acc_s
// returns the dropped, rescaled P.
template <bool kHasExtras, bool kHasDropout = false, int kRows, typename TS, typename TdP, typename TC,
          typename Keep = KeepAll>
__device__ __forceinline__ void scores_to_grads(TS& acc_s, TdP& acc_dp, TC const& coord_rc, const BwdParams& p,
                                                const BlockCoords& bc, int seqlen_k, bool needs_mask,
                                                float alibi_slope, const RowStats<kRows>& stats,
                                                [[maybe_unused]] Keep const& keep = {}) {
  Tensor s = rowcol_view(acc_s);
  Tensor dp = rowcol_view(acc_dp);
  static_assert(decltype(size<0>(s))::value == kRows);
  auto finish = [&](auto&& tanh_grad) {
    CUTE_UNROLL
    for (int mi = 0; mi < kRows; ++mi) {
      CUTE_UNROLL
      for (int ni = 0; ni < size<1>(s); ++ni) {
        const float prob = exp2f(fmaf(s(mi, ni), p.scale_softmax_log2, -stats.lse_log2[mi]));
        if constexpr (kHasDropout) {
          const bool kept = keep.test(s.layout()(mi, ni));
          const float dprob = kept ? dp(mi, ni) * p.dropout_scale : 0.f;
          s(mi, ni) = kept ? prob * p.dropout_scale : 0.f;
          dp(mi, ni) = prob * (dprob - stats.d[mi]) * tanh_grad(mi, ni);
        } else {
          s(mi, ni) = prob;
          dp(mi, ni) = prob * (dp(mi, ni) - stats.d[mi]) * tanh_grad(mi, ni);
        }
      }
    }
  };
  if constexpr (kHasExtras) {
    const bool has_softcap = p.softcap_in > 0.f;
    Tensor grad = make_fragment_like(acc_s);  // tanh'(s * softcap_in), or 1
    if (has_softcap) {
      CUTE_UNROLL
      for (int i = 0; i < size(acc_s); ++i) {
        const float t = tanh_accurate(acc_s(i) * p.softcap_in);
        acc_s(i) = t;
        grad(i) = 1.f - t * t;
      }
    }
    if (p.alibi_slopes_ptr != nullptr) apply_alibi(s, coord_rc, bc, alibi_slope);
    if (needs_mask) apply_mask(s, coord_rc, bc, seqlen_k, p.window_left, p.window_right);
    Tensor grad_rc = rowcol_view(grad);
    if (has_softcap) {
      finish([&](int mi, int ni) { return grad_rc(mi, ni); });
    } else {
      finish([](int, int) { return 1.f; });
    }
  } else {
    if (needs_mask) apply_mask(s, coord_rc, bc, seqlen_k, p.window_left, p.window_right);
    finish([](int, int) { return 1.f; });
  }
}

}  // namespace flash
