"""A few forward calls to profile under Nsight Compute (scripts/gpu_check.sh --profile):
prefill (hd128, b4 s4096, non-causal) and one decode step (b1, 12 heads, 8192 keys)."""
import torch

from flash_attn import flash_attn_func, flash_attn_varlen_func


def main():
    q = torch.randn(4, 4096, 16, 128, device="cuda", dtype=torch.float16)
    k, v = torch.randn_like(q), torch.randn_like(q)
    for _ in range(3):
        flash_attn_func(q, k, v)
    b, s, h = 1, 8192, 12
    qd = torch.randn(b, h, 128, device="cuda", dtype=torch.float16)
    kd = torch.randn(b * s, h, 128, device="cuda", dtype=torch.float16)
    cu_q = torch.arange(b + 1, device="cuda", dtype=torch.int32)
    cu_k = torch.arange(b + 1, device="cuda", dtype=torch.int32) * s
    for _ in range(3):
        flash_attn_varlen_func(qd, kd, kd, cu_q, cu_k, 1, s, causal=True)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
