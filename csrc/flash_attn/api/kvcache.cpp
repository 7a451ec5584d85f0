// Entry point `fwd_kvcache` (flash_attn_with_kvcache): checks, the in-place append of new k / v
// (with rotary) into a contiguous or paged cache, then attention over the cache through the
// shared forward path. No device-to-host copy: bad index values are reported by the kernels
// (api/index_errors.h).
#include <string>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "api/common.h"
#include "api/entry_points.h"
#include "api/index_errors.h"
#include "params/kvcache_append.h"

namespace flash_api {

namespace {

struct CacheShape {
  int capacity;        // rows per sequence
  int num_pages;       // paged only
  int page_block_size; // paged only
  int batch_cache;     // contiguous only
};

}  // namespace

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
  // q and the new k / v are read only: a strided last dimension or misaligned rows are copied.
  // The caches are written in place, so theirs must already fit the kernels.
  const Tensor q_in = with_kernel_layout(q_arg);
  const OptTensor k_ = k_arg ? OptTensor(with_kernel_layout(*k_arg)) : OptTensor();
  const OptTensor v_ = v_arg ? OptTensor(with_kernel_layout(*v_arg)) : OptTensor();
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
  // The caches are read and written in place with 16-byte vector copies, so their rows must be a
  // multiple of 8 elements; padding them (as upstream does) would copy the whole cache on every call.
  TORCH_CHECK(head_size % 8 == 0 || head_size > 256, "flash_attn_with_kvcache: head_dim ", std::to_string(head_size),
              " is not a multiple of 8; the caches are used in place, so allocate k_cache / v_cache (and q, k, v) with "
              "the head dim zero-padded to ", std::to_string((head_size + 7) / 8 * 8),
              " (zeros change no score; slice the output back)");
  check_head_dims(head_size, num_heads, num_heads_k);
  check_vector_aligned(kcache, "k_cache");
  check_vector_aligned(vcache, "v_cache");
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
  const int device = q_in.get_device();
  device_info();  // an unsupported GPU raises before the append launches
  raise_pending_index_errors(device);

  KvLayout kv{cs.capacity};
  kv.batch_cache = cs.batch_cache;
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
    a.num_cache_batches = cs.batch_cache;
    a.index_errors = index_error_words(device);
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
  std::vector<Tensor> result =
      run_batched(q, kcache, vcache, out_, alibi_slopes, softmax_scale, wl, wr, softcap, num_splits, kv, kernel);
  strict_index_check(device, stream);
  return result;
}

}  // namespace flash_api
