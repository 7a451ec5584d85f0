"""Where the host time of one decode call goes: torch.profiler's CPU table for a hot loop of
flash_attn_varlen_func (b1, 12 heads, 2048 keys), and enqueue-rate timings (GPU kept busy by a
sleep kernel) of the raw extension call next to single torch ops as floors."""
import time

import torch
from torch.profiler import ProfilerActivity, profile

import flash_attn_2_cuda as ext
from flash_attn import flash_attn_varlen_func


def enqueue_us(fn, n=2000):
    torch.cuda._sleep(200_000_000)  # keeps the GPU busy: the loop measures host time only
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def main():
    b, s, h = 1, 2048, 12
    q = torch.randn(b, h, 128, device="cuda", dtype=torch.half)
    k = torch.randn(b * s, h, 128, device="cuda", dtype=torch.half)
    v = torch.randn_like(k)
    cu_q = torch.arange(b + 1, device="cuda", dtype=torch.int32)
    cu_k = cu_q * s
    call = lambda: flash_attn_varlen_func(q, k, v, cu_q, cu_k, 1, s, causal=True)  # noqa: E731

    def raw(num_splits):
        return lambda: ext.varlen_fwd(q, k, v, None, cu_q, cu_k, None, None, None, None, 1, s, 0.0, 0.0883,
                                      False, True, -1, -1, 0.0, False, num_splits)

    for _ in range(50):
        call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(200):
            call()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    rows = [
        ("torch.empty_like(q)", lambda: torch.empty_like(q)),
        ("torch.empty((12, 1), fp32)", lambda: torch.empty((12, 1), device="cuda", dtype=torch.float32)),
        ("flash_attn_varlen_func", call),
        ("raw varlen_fwd, auto (8 splits: decode + combine)", raw(0)),
        ("raw varlen_fwd, num_splits=1 (unsplit kernel)", raw(1)),
    ]
    for name, fn in rows:
        fn()
        print(f"{name:55s} {enqueue_us(fn):6.2f} us/call (host)")


if __name__ == "__main__":
    main()
