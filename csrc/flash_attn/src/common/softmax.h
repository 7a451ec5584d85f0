// Online softmax over key blocks, kept per query row in registers (FlashAttention-2 style:
// the running sum stays per-thread and is reduced across the quad only once, at the end).
#pragma once

#include <cmath>
#include <type_traits>
#include <utility>

#include <cute/tensor.hpp>

#include "common/mma_utils.h"

namespace flash {

using namespace cute;

// kFolds: how many independent partial results reduce a thread's scores of one row (see
// below); the kernel chooses it, 1 by default.
template <int kRows, int kFolds = 1>
struct OnlineSoftmax {
  static_assert(kFolds == 1 || kFolds == 2 || kFolds == 4);
  float row_max[kRows];
  float row_sum[kRows];

  // s: scores of this key block, o: output accumulator, both (rows, cols) views. On return s
  // holds the unnormalised probabilities exp2(s * scale_log2 - max) and o is rescaled to the
  // new running max. kSkipUnmoved (warp-uniform callers only): when no row's max moved in the
  // whole warp, the rescale (a multiply by exactly 1) is skipped -- 64 FMULs per sub-block of
  // the decode loop. The two branches differ in that test and in where the rescale falls (before
  // every row's exponentials, or row by row); merged, the prefill kernel's SASS changes (+64
  // instructions), so they stay apart until a GPU run can time it.
  template <bool kSkipUnmoved = false, typename TS, typename TO>
  __device__ __forceinline__ void update(TS&& s, TO&& o, float scale_log2, bool is_first) {
    static_assert(decltype(size<0>(s))::value == kRows);
    if constexpr (kSkipUnmoved) {
      float new_max[kRows];
      running_maxima(s, is_first, new_max);
      bool moved = false;
      CUTE_UNROLL
      for (int mi = 0; mi < kRows; ++mi) moved |= !is_first && new_max[mi] != row_max[mi];
      if (is_first) {
        CUTE_UNROLL
        for (int mi = 0; mi < kRows; ++mi) row_sum[mi] = 0.f;
      } else if (__any_sync(0xffffffffu, moved)) {
        CUTE_UNROLL
        for (int mi = 0; mi < kRows; ++mi) rescale(o, mi, row_max[mi] * scale_log2 - shift_of(new_max[mi], scale_log2));
      }
      CUTE_UNROLL
      for (int mi = 0; mi < kRows; ++mi) {
        row_max[mi] = new_max[mi];
        exponentiate(s, mi, scale_log2, shift_of(new_max[mi], scale_log2));
      }
    } else {
      float maxima[kRows];
      if constexpr (kFolds > 1) running_maxima(s, is_first, maxima);
      CUTE_UNROLL
      for (int mi = 0; mi < kRows; ++mi) {
        const float m = kFolds > 1 ? maxima[mi] : running_max(s, mi, is_first);
        const float shift = shift_of(m, scale_log2);
        if (is_first) {
          row_sum[mi] = 0.f;
        } else {
          rescale(o, mi, row_max[mi] * scale_log2 - shift);
        }
        row_max[mi] = m;
        exponentiate(s, mi, scale_log2, shift);
      }
    }
  }

  // As update() after the first block, for kernels whose P V GEMM of the previous block still
  // writes o while this block's softmax runs (the Hopper forward): o's correction is returned
  // for rescale_output() once that GEMM has finished, and the result says whether any row of the
  // warp needs it (warp-uniform; a caller may skip rescale_output, a multiply by exactly 1, when
  // none does).
  // kKeepMaxWithinLag: a row's running max moves only when this block's exceeds it by more than
  // kMaxLagLog2 (in log2 units of the scaled scores); otherwise the row keeps it, its
  // probabilities reach at most 2^kMaxLagLog2 (16-bit P and the fp32 sums carry those as
  // precisely as values up to 1, and the log-sum-exp uses the kept max), and its output needs no
  // correction. After the first few blocks a row's max rarely climbs that far, so most blocks
  // skip the output's d / 2 multiplies. Without it every row takes the block's max and every
  // block is corrected.
  static constexpr float kMaxLagLog2 = 8.f;
  template <bool kKeepMaxWithinLag, typename TS>
  __device__ __forceinline__ bool update_deferred(TS&& s, float scale_log2, float (&o_correction)[kRows]) {
    static_assert(decltype(size<0>(s))::value == kRows);
    float maxima[kRows];
    if constexpr (kFolds > 1) running_maxima(s, /*is_first=*/false, maxima);
    bool corrected = false;
    CUTE_UNROLL
    for (int mi = 0; mi < kRows; ++mi) {
      const float m = kFolds > 1 ? maxima[mi] : running_max(s, mi, false);
      // False for a row without a visible key yet (-inf - -inf): it takes m, as a moved row.
      const bool keep = kKeepMaxWithinLag && (m - row_max[mi]) * scale_log2 <= kMaxLagLog2;
      const float kept_or_new = keep ? row_max[mi] : m;
      const float shift = shift_of(kept_or_new, scale_log2);
      o_correction[mi] = keep ? 1.f : exp2f(row_max[mi] * scale_log2 - shift);
      row_sum[mi] *= o_correction[mi];
      corrected |= !keep;
      row_max[mi] = kept_or_new;
      exponentiate(s, mi, scale_log2, shift);
    }
    // Without the lag every row is corrected: no vote needed.
    return kKeepMaxWithinLag ? __any_sync(0xffffffffu, corrected) : true;
  }

  template <typename TO>
  __device__ __forceinline__ static void rescale_output(TO&& o, const float (&o_correction)[kRows]) {
    CUTE_UNROLL
    for (int mi = 0; mi < kRows; ++mi) {
      CUTE_UNROLL
      for (int ni = 0; ni < size<1>(o); ++ni) o(mi, ni) *= o_correction[mi];
    }
  }

  // Normalises o by the row sums and returns each row's log-sum-exp (natural log, in score
  // units). A row with no visible key gets output 0 and lse `empty_lse`.
  template <typename TO>
  __device__ __forceinline__ void finalize(TO&& o, float scale_softmax, float empty_lse, float (&lse)[kRows]) {
    CUTE_UNROLL
    for (int mi = 0; mi < kRows; ++mi) {
      const float sum = quad_allreduce_sum(row_sum[mi]);
      const bool empty = sum == 0.f || sum != sum;
      const float inv = empty ? 1.f : 1.f / sum;
      lse[mi] = empty ? empty_lse : row_max[mi] * scale_softmax + __logf(sum);
      CUTE_UNROLL
      for (int ni = 0; ni < size<1>(o); ++ni) o(mi, ni) *= inv;
    }
  }

 private:
  // A thread's scores of one row are reduced (max, sum) in kFolds independent partial results,
  // column ni into fold ni % kFolds, then combined: a single accumulator makes a chain of as
  // many dependent instructions as the thread has columns (32 at 128 keys in the Hopper
  // forward), each waiting out the previous one's latency; four folds make the chain a quarter as
  // deep. With folds every row's max is taken before any row's exponentials, so the rows' chains
  // and shuffles interleave; with one accumulator each row's max comes just before its own
  // exponentials, which then overlap the next row's chain. Which is faster depends on what bounds
  // the kernel's loop, so the kernel chooses (sm90/kernel_traits.h).
  template <typename TS>
  static constexpr void check_folds() {
    static_assert(decltype(size<1>(std::declval<TS&>()))::value % kFolds == 0,
                  "a row's columns split evenly into the folds");
  }

  // Row mi's max over this block and the running max (quad-reduced: a row spans 4 threads).
  template <typename TS>
  __device__ __forceinline__ float running_max(TS& s, int mi, bool is_first) const {
    float m = is_first ? -INFINITY : row_max[mi];
    CUTE_UNROLL
    for (int ni = 0; ni < size<1>(s); ++ni) m = fmaxf(m, s(mi, ni));
    return quad_allreduce_max(m);
  }
  // Every row's max as running_max, in folds, all rows' before any quad reduction.
  template <typename TS>
  __device__ __forceinline__ void running_maxima(TS& s, bool is_first, float (&m)[kRows]) const {
    if constexpr (kFolds == 1) {
      CUTE_UNROLL
      for (int mi = 0; mi < kRows; ++mi) m[mi] = running_max(s, mi, is_first);
    } else {
      check_folds<std::remove_reference_t<TS>>();
      CUTE_UNROLL
      for (int mi = 0; mi < kRows; ++mi) {
        float part[kFolds];
        CUTE_UNROLL
        for (int f = 0; f < kFolds; ++f) part[f] = s(mi, f);
        CUTE_UNROLL
        for (int ni = kFolds; ni < size<1>(s); ++ni) part[ni % kFolds] = fmaxf(part[ni % kFolds], s(mi, ni));
        CUTE_UNROLL
        for (int width = kFolds / 2; width > 0; width /= 2) {
          CUTE_UNROLL
          for (int f = 0; f < width; ++f) part[f] = fmaxf(part[f], part[f + width]);
        }
        m[mi] = fmaxf(is_first ? -INFINITY : row_max[mi], part[0]);
      }
      CUTE_UNROLL
      for (int mi = 0; mi < kRows; ++mi) m[mi] = quad_allreduce_max(m[mi]);
    }
  }
  // A row that has seen no visible key keeps max -inf; shifting by 0 then yields exp2 = 0 rather
  // than NaN.
  __device__ __forceinline__ static float shift_of(float m, float scale_log2) {
    return m == -INFINITY ? 0.f : m * scale_log2;
  }
  template <typename TO>
  __device__ __forceinline__ void rescale(TO& o, int mi, float log2_correction) {
    const float correction = exp2f(log2_correction);
    row_sum[mi] *= correction;
    CUTE_UNROLL
    for (int ni = 0; ni < size<1>(o); ++ni) o(mi, ni) *= correction;
  }
  template <typename TS>
  __device__ __forceinline__ void exponentiate(TS& s, int mi, float scale_log2, float shift) {
    check_folds<std::remove_reference_t<TS>>();
    float part[kFolds];
    CUTE_UNROLL
    for (int ni = 0; ni < size<1>(s); ++ni) {
      s(mi, ni) = exp2f(fmaf(s(mi, ni), scale_log2, -shift));
      if (ni < kFolds) {
        part[ni] = s(mi, ni);
      } else {
        part[ni % kFolds] += s(mi, ni);
      }
    }
    CUTE_UNROLL
    for (int width = kFolds / 2; width > 0; width /= 2) {
      CUTE_UNROLL
      for (int f = 0; f < width; ++f) part[f] += part[f + width];
    }
    row_sum[mi] += part[0];
  }
};

}  // namespace flash
