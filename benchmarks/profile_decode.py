"""Decode calls to profile under Nsight Compute or nsys: one call per cell given on the command
line as batch,seqlen_k,heads,kv_heads (default: 16,2048,32,8 and 1,32768,12,12), after two
warm-up calls each. Example:
  ncu --kernel-name regex:flash_decode --launch-skip 2 --launch-count 1 --section SpeedOfLight \
      python benchmarks/profile_decode.py 16,2048,32,8
"""
import sys

import torch

from flash_attn import flash_attn_varlen_func


def run_cell(b, s, h, hk, calls=3):
    q = torch.randn(b, h, 128, device="cuda", dtype=torch.float16)
    k = torch.randn(b * s, hk, 128, device="cuda", dtype=torch.float16)
    v = torch.randn_like(k)
    cu_q = torch.arange(b + 1, device="cuda", dtype=torch.int32)
    cu_k = torch.arange(b + 1, device="cuda", dtype=torch.int32) * s
    for _ in range(calls):
        flash_attn_varlen_func(q, k, v, cu_q, cu_k, 1, s, causal=True)
    torch.cuda.synchronize()


def main(argv):
    cells = argv or ["16,2048,32,8", "1,32768,12,12"]
    for cell in cells:
        run_cell(*[int(x) for x in cell.split(",")])


if __name__ == "__main__":
    main(sys.argv[1:])
