// The Python module flash_attn_2_cuda: binds the entry points with upstream flash-attn 2's names and
// argument order, and the plan queries (num_splits_heuristic, ...) the Python package and the CPU
// tests use.
#include <string>
#include <vector>

#include <c10/cuda/CUDAFunctions.h>
#include <torch/extension.h>

#include "api/common.h"
#include "api/entry_points.h"
#include "api/index_errors.h"

// CUDA architectures compiled in, from setup.py (e.g. 80,90).
#ifndef FLASH_ATTN_ARCHS_LIST
#define FLASH_ATTN_ARCHS_LIST
#endif

namespace flash_api {
namespace {

flash::ForwardPlan checked_plan(int batch, int num_heads, int num_heads_k, int seqlen_q, int seqlen_k, int head_size,
                                int num_sms, int num_splits, bool sm90_prefill = false, bool causal = false) {
  TORCH_CHECK(num_splits >= 0, "num_splits must be >= 0 (0 = heuristic), got ", std::to_string(num_splits));
  TORCH_CHECK(num_sms > 0, "num_sms must be positive");
  check_head_dims(head_size, num_heads, num_heads_k);
  return flash::plan_forward(batch, num_heads, num_heads_k, seqlen_q, seqlen_k, head_size, /*can_swap=*/true,
                             /*can_pack=*/true, num_sms, num_splits, sm90_prefill,
                             flash::sm90_pairs_tiles(-1, causal ? 0 : -1));
}

// sm90_prefill: as where the Hopper forward can take the call (compute capability 9.0), whose plan
// also splits longer queries over the Hopper tiles (paired under a causal mask).
int num_splits_heuristic(int batch, int num_heads, int num_heads_k, int seqlen_q, int seqlen_k, int head_size,
                         int num_sms, int num_splits, bool sm90_prefill, bool causal) {
  return checked_plan(batch, num_heads, num_heads_k, seqlen_q, seqlen_k, head_size, num_sms, num_splits, sm90_prefill,
                      causal)
      .num_splits;
}

// The whole plan of these shapes (no window, no ALiBi), for tests and for callers who want to know
// which kernel runs: the kernel's rows and heads (after the swap or the packing), the splits, and
// which kernel and merge they take
// (cluster_merge: the decode splits may merge inside a thread-block cluster; sm_90 decides the rest
// at run time).
pybind11::dict forward_plan(int batch, int num_heads, int num_heads_k, int seqlen_q, int seqlen_k, int head_size,
                            int num_sms, int num_splits, bool sm90_prefill, bool causal) {
  const flash::ForwardPlan plan = checked_plan(batch, num_heads, num_heads_k, seqlen_q, seqlen_k, head_size, num_sms,
                                               num_splits, sm90_prefill, causal);
  pybind11::dict d;
  d["swap_seqlen_ngroups"] = plan.swap_seqlen_ngroups;
  d["pack_groups"] = plan.pack_groups;
  d["seqlen_q"] = plan.seqlen_q;
  d["num_heads"] = plan.num_heads;
  d["num_splits"] = plan.num_splits;
  d["split_kernel"] = plan.split_kernel;
  d["prefill_splits"] = plan.prefill_splits;
  d["decode_kernel"] = plan.decode_kernel;
  d["cluster_merge"] = plan.cluster_merge;
  return d;
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
  pybind11::list headdims, dtypes, sm90_headdims, sm90_bwd_headdims;
  bool any_fp16 = false, any_bf16 = false;
  for (int i = 0; i < flash::kNumKernelHeadDims; ++i) {
    const bool fp16 = flash::fwd_launchers[i][0].run != nullptr, bf16 = flash::fwd_launchers[i][1].run != nullptr;
    if (fp16 || bf16) headdims.append(flash::kKernelHeadDims[i]);
    if (flash::fwd_launchers[i][0].run_sm90 != nullptr || flash::fwd_launchers[i][1].run_sm90 != nullptr) {
      sm90_headdims.append(flash::kKernelHeadDims[i]);
    }
    if (flash::bwd_launchers[i][0].run_sm90 != nullptr || flash::bwd_launchers[i][1].run_sm90 != nullptr) {
      sm90_bwd_headdims.append(flash::kKernelHeadDims[i]);
    }
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
  info["sm90_forward_headdims"] = sm90_headdims;  // kernel head dims with a Hopper forward
  info["sm90_backward_headdims"] = sm90_bwd_headdims;  // and with a Hopper backward
  return info;
}

}  // namespace
}  // namespace flash_api

using namespace flash_api;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "FlashAttention-2 compatible attention with split-KV decoding";
  m.def("fwd", &mha_fwd, "Forward attention, padded batch", pybind11::arg("q"), pybind11::arg("k"),
        pybind11::arg("v"), pybind11::arg("out"), pybind11::arg("alibi_slopes"), pybind11::arg("dropout_p"),
        pybind11::arg("softmax_scale"), pybind11::arg("causal"), pybind11::arg("window_size_left"),
        pybind11::arg("window_size_right"), pybind11::arg("softcap"), pybind11::arg("return_softmax"),
        pybind11::arg("gen") = pybind11::none(), pybind11::arg("num_splits") = 0);
  m.def("varlen_fwd", &mha_varlen_fwd, "Forward attention, variable-length batch", pybind11::arg("q"),
        pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("out"), pybind11::arg("cu_seqlens_q"),
        pybind11::arg("cu_seqlens_k"), pybind11::arg("seqused_k"), pybind11::arg("leftpad_k"),
        pybind11::arg("block_table"), pybind11::arg("alibi_slopes"), pybind11::arg("max_seqlen_q"),
        pybind11::arg("max_seqlen_k"), pybind11::arg("dropout_p"), pybind11::arg("softmax_scale"),
        pybind11::arg("zero_tensors"), pybind11::arg("causal"), pybind11::arg("window_size_left"),
        pybind11::arg("window_size_right"), pybind11::arg("softcap"), pybind11::arg("return_softmax"),
        pybind11::arg("gen") = pybind11::none(), pybind11::arg("num_splits") = 0);
  m.def("bwd", &mha_bwd, "Backward attention, padded batch", pybind11::arg("dout"), pybind11::arg("q"),
        pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("out"), pybind11::arg("softmax_lse"),
        pybind11::arg("dq"), pybind11::arg("dk"), pybind11::arg("dv"), pybind11::arg("alibi_slopes"),
        pybind11::arg("dropout_p"), pybind11::arg("softmax_scale"), pybind11::arg("causal"),
        pybind11::arg("window_size_left"), pybind11::arg("window_size_right"), pybind11::arg("softcap"),
        pybind11::arg("deterministic"), pybind11::arg("gen") = pybind11::none(),
        pybind11::arg("rng_state") = pybind11::none());
  m.def("varlen_bwd", &mha_varlen_bwd, "Backward attention, variable-length batch", pybind11::arg("dout"),
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("out"),
        pybind11::arg("softmax_lse"), pybind11::arg("dq"), pybind11::arg("dk"), pybind11::arg("dv"),
        pybind11::arg("cu_seqlens_q"), pybind11::arg("cu_seqlens_k"), pybind11::arg("alibi_slopes"),
        pybind11::arg("max_seqlen_q"), pybind11::arg("max_seqlen_k"), pybind11::arg("dropout_p"),
        pybind11::arg("softmax_scale"), pybind11::arg("zero_tensors"), pybind11::arg("causal"),
        pybind11::arg("window_size_left"), pybind11::arg("window_size_right"), pybind11::arg("softcap"),
        pybind11::arg("deterministic"), pybind11::arg("gen") = pybind11::none(),
        pybind11::arg("rng_state") = pybind11::none());
  m.def("fwd_kvcache", &mha_fwd_kvcache, "Forward attention against a KV cache, appending new keys / values",
        pybind11::arg("q"), pybind11::arg("k_cache"), pybind11::arg("v_cache"), pybind11::arg("k"),
        pybind11::arg("v"), pybind11::arg("cache_seqlens"), pybind11::arg("rotary_cos"), pybind11::arg("rotary_sin"),
        pybind11::arg("cache_batch_idx"), pybind11::arg("cache_leftpad"), pybind11::arg("block_table"),
        pybind11::arg("alibi_slopes"), pybind11::arg("out"), pybind11::arg("softmax_scale"), pybind11::arg("causal"),
        pybind11::arg("window_size_left"), pybind11::arg("window_size_right"), pybind11::arg("softcap"),
        pybind11::arg("rotary_interleaved"), pybind11::arg("num_splits") = 0);
  m.def("num_splits_heuristic", &num_splits_heuristic,
        "Number of key splits the dispatcher uses for these shapes (no window, no ALiBi); sm90_prefill: where "
        "the Hopper forward can take the call; causal: a causal mask",
        pybind11::arg("batch"), pybind11::arg("nheads"), pybind11::arg("nheads_k"), pybind11::arg("seqlen_q"),
        pybind11::arg("seqlen_k"), pybind11::arg("headdim"), pybind11::arg("num_sms"), pybind11::arg("num_splits") = 0,
        pybind11::arg("sm90_prefill") = false, pybind11::arg("causal") = false);
  m.def("forward_plan", &forward_plan,
        "The dispatcher's plan for these shapes (no window, no ALiBi): the kernel's rows and heads, the number of "
        "splits, whether the split, decode or Hopper prefill-split kernel runs, and whether decode splits may merge "
        "in a thread-block cluster",
        pybind11::arg("batch"), pybind11::arg("nheads"), pybind11::arg("nheads_k"), pybind11::arg("seqlen_q"),
        pybind11::arg("seqlen_k"), pybind11::arg("headdim"), pybind11::arg("num_sms"), pybind11::arg("num_splits") = 0,
        pybind11::arg("sm90_prefill") = false, pybind11::arg("causal") = false);
  m.def("decode_cluster_capacity", &decode_cluster_capacity,
        "Thread-block clusters of cluster_size decode blocks the current CUDA device holds at once",
        pybind11::arg("head_size"), pybind11::arg("is_bf16"), pybind11::arg("cluster_size"));
  m.def("build_info", &build_info,
        "Compiled head dims, dtypes, CUDA architectures and Hopper forward and backward head dims");
  m.def("set_sm90_forward", &set_sm90_forward,
        "Lets the dense forward run the Hopper kernel where it applies (default True); returns the previous setting",
        pybind11::arg("enabled"));
  m.def("set_sm90_backward", &set_sm90_backward,
        "Lets the dense backward run the Hopper kernel where it applies (default True); returns the previous setting",
        pybind11::arg("enabled"));
  m.def("unsupported_gpu_message", &unsupported_gpu_message,
        "Empty if this build runs on a GPU of that capability, else the error a call there raises",
        pybind11::arg("gpu_name"), pybind11::arg("major"), pybind11::arg("minor"));
  m.def("check_index_errors", &check_index_errors,
        "Synchronises the current CUDA device and raises if a kernel reported out-of-range index values");
}

