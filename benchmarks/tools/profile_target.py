#!/usr/bin/env python
"""Calls to profile under Nsight Compute or Nsight Systems, each after two warm-up calls (without
arguments: prefill 4,4096,16,128 and decode 1,8192,12,12):
  decode B,S,H,HK   flash_attn_varlen_func, one query per sequence (fp16, head dim 128)
  prefill B,S,H,D   flash_attn_func, non-causal (fp16)
  causal B,S,H,D    flash_attn_func, causal (fp16)
  backward B,S,H,D  flash_attn_func forward and backward, non-causal (fp16; the backward kernels
                    are flash_bwd_*)
  cudnn B,S,H,D, cudnn_causal B,S,H,D
                    the peer: SDPA with the cuDNN backend (fp16), so that its kernel's launch
                    (grid, threads, registers, shared memory) and counters sit beside ours
The third launch of the decode kernel: ncu --kernel-name regex:flash_decode --launch-skip 2 \\
  --launch-count 1 --section SpeedOfLight python benchmarks/tools/profile_target.py decode 16,2048,32,8
"""
import sys

import torch

from flash_attn import flash_attn_func, flash_attn_varlen_func


def run(kind: str, shape: str, calls: int = 3) -> None:
    a, s, h, x = (int(n) for n in shape.split(","))
    if kind in ("prefill", "causal"):
        q, k, v = (torch.randn(a, s, h, x, device="cuda", dtype=torch.float16) for _ in range(3))
        call = lambda: flash_attn_func(q, k, v, causal=kind == "causal")  # noqa: E731
    elif kind in ("cudnn", "cudnn_causal"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        q, k, v = (torch.randn(a, h, s, x, device="cuda", dtype=torch.float16) for _ in range(3))

        def call():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=kind == "cudnn_causal")

    elif kind == "backward":
        q, k, v = (torch.randn(a, s, h, x, device="cuda", dtype=torch.float16, requires_grad=True) for _ in range(3))
        dout = torch.randn(a, s, h, x, device="cuda", dtype=torch.float16)
        call = lambda: flash_attn_func(q, k, v).backward(dout)  # noqa: E731
    elif kind == "decode":
        q = torch.randn(a, h, 128, device="cuda", dtype=torch.float16)
        k, v = (torch.randn(a * s, x, 128, device="cuda", dtype=torch.float16) for _ in range(2))
        cu_q = torch.arange(a + 1, device="cuda", dtype=torch.int32)
        call = lambda: flash_attn_varlen_func(q, k, v, cu_q, cu_q * s, 1, s, causal=True)  # noqa: E731
    else:
        raise SystemExit(f"unknown kind {kind!r}\n{__doc__}")
    for _ in range(calls):
        call()
    torch.cuda.synchronize()


if __name__ == "__main__":
    args = sys.argv[1:] or ["prefill", "4,4096,16,128", "decode", "1,8192,12,12"]
    if len(args) % 2:  # -h, --help or an unpaired argument
        print(__doc__)
        sys.exit(args not in (["-h"], ["--help"]))
    for i in range(0, len(args), 2):
        run(args[i], args[i + 1])
