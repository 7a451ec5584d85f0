#!/usr/bin/env python
"""Host (CPU) time of one decode call, a CUDA-graph check, and the kv-cache call's cost.

flash_attn_varlen_func on q (1, heads, 128), k/v (2048, kv_heads, 128), causal, fp16, heads 12/12 and
32/8, also in inference_mode and as the raw extension's varlen_fwd, next to floors. Per call, us:
overhead_us = max(0, wall_us - gpu_fed_us), the verdict (target <= 10); wall_us: a hot loop of n = 2000
calls (--quick 500) and the final synchronize, / n (loop_enq_us: the loop; gpu_loop_us: events around it);
gpu_fed_us / host_us: GPU / enqueue time of 100 calls behind a sleep kernel; gpu_us / gpu_warm_us: one
call, L2 flushed / warm. Graph check: 100 replays (--quick 20) on new inputs equal the eager call bitwise,
none stale (else exit status 3). kvcache / func: flash_attn_with_kvcache / flash_attn_func. Result:
host_overhead_<card>.json.
"""

import contextlib
import statistics
import sys
import time

import torch

import common
import timing
from common import fmt

SEQLEN_K = 2048
HEAD_CONFIGS = [(12, 12), (32, 8)]
KVCACHE_CONFIGS = [(1, 32, 8, 8192), (16, 12, 12, 4096)]  # (batch, heads, kv heads, keys)
TARGET_US = 10.0
BATCH_CALLS = 100  # calls behind one sleep kernel
COLUMNS = ["overhead_us", "wall_us", "gpu_fed_us", "host_us", "loop_enq_us", "gpu_loop_us", "gpu_us", "gpu_warm_us"]


def sleep_cycles_per_us() -> float:
    torch.cuda._sleep(1000)
    return 2_000_000 / timing.event_median_us(lambda: torch.cuda._sleep(2_000_000), 3)


def hot_loop(fn, n) -> dict:
    """After fed_batches (its calls are the warm-up)."""
    torch.cuda.synchronize()
    start, end = timing.event(), timing.event()
    start.record()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    end.record()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return {"wall_us": (t2 - t0) / n * 1e6, "loop_enq_us": (t1 - t0) / n * 1e6,
            "gpu_loop_us": start.elapsed_time(end) * 1e3 / n}


def fed_batches(fn, args) -> dict:
    host, fed, invalid, sleep_us, batch = [], [], 0, BATCH_CALLS * 100.0, BATCH_CALLS
    for _ in range(max(1, args.n // batch)):
        for _attempt in range(3):
            torch.cuda.synchronize()
            start, end = timing.event(), timing.event()
            torch.cuda._sleep(int(sleep_us * args.cycles_per_us))
            start.record()
            t0 = time.perf_counter()
            for _ in range(batch):
                fn()
            t1 = time.perf_counter()
            asleep = not start.query()
            end.record()
            torch.cuda.synchronize()
            if asleep:
                host.append((t1 - t0) / batch * 1e6)
                fed.append(start.elapsed_time(end) * 1e3 / batch)
                break
            # The sleep ended first: too short, or a full launch queue blocked. Longer, fewer.
            sleep_us, batch = sleep_us * 2, max(10, batch // 2)
        else:
            invalid += 1
    return {"host_us": statistics.median(host) if host else None, "gpu_fed_us": statistics.median(fed) if fed else None,
            "host_batches": len(host), "host_invalid_batches": invalid}


def measure(fn, args, ctx=None, gpu=True) -> dict:
    out = {}
    try:
        with ctx() if ctx else contextlib.nullcontext():
            fn()
            out.update(fed_batches(fn, args))
            out.update(hot_loop(fn, args.n))
            if out["gpu_fed_us"] is not None:
                out["overhead_us"] = max(0.0, out["wall_us"] - out["gpu_fed_us"])
            if gpu:
                out["gpu_us"] = timing.bench(fn, reps=50, min_reps=50, max_time_s=None)
                sleep = int(50 * args.cycles_per_us)  # a short sleep ahead of each window: no launch gap inside
                out["gpu_warm_us"] = timing.event_median_us(fn, 50, lambda: torch.cuda._sleep(sleep))
    except Exception as e:  # noqa: BLE001 - reported in the table
        out["error"] = timing.short_err(e)
        common.context_dead()
    return out


def graph_check(fn, q, k, v, args) -> dict:
    res = {"replays": args.replays, "status": "FAIL"}
    try:
        graph, static_out = timing.capture_graph(fn)
        maxdiff, stale, prev = 0.0, 0, None
        for _ in range(args.replays):
            for x in (q, k, v):
                x.copy_(torch.randn_like(x))
            graph.replay()
            maxdiff = max(maxdiff, common.maxdiff(static_out, fn()))
            stale += prev is not None and torch.equal(prev, static_out)
            prev = static_out.clone()
        res.update(maxdiff=maxdiff, stale_replays=stale, status="PASS" if maxdiff == 0.0 and not stale else "FAIL")
        m = measure(graph.replay, args, gpu=False)
        res.update(replay_host_us=m.get("host_us"), replay_gpu_loop_us=m.get("gpu_loop_us"))
    except Exception as e:  # noqa: BLE001 - a failed capture is a FAIL with its reason
        res["error"] = timing.short_err(e)
        common.context_dead()
    return res


def floors(args) -> dict:
    x1, qf = torch.zeros(1, device="cuda"), torch.zeros(1, 12, 128, device="cuda", dtype=torch.float16)
    calls = {"torch.empty(0, device='cuda')": lambda: torch.empty(0, device="cuda"),
             "q.view(-1)": lambda: qf.view(-1), "x.zero_() (1 element)": lambda: x1.zero_()}
    return {name: measure(fn, args, gpu=False) for name, fn in calls.items()}


def decode_config(h, hk, args) -> dict:
    import flash_attn
    import flash_attn_2_cuda as ext
    shape = f"b1 s{SEQLEN_K} h{h}/{hk}"
    q = torch.randn(1, h, 128, device="cuda", dtype=torch.float16)
    k, v = (torch.randn(SEQLEN_K, hk, 128, device="cuda", dtype=torch.float16) for _ in range(2))
    cu_q = torch.arange(2, device="cuda", dtype=torch.int32)
    cu_k = cu_q * SEQLEN_K

    def wrapper():
        return flash_attn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 1, SEQLEN_K, causal=True)

    def raw():  # upstream's varlen_fwd argument list: the extension without the Python wrapper
        return ext.varlen_fwd(q, k, v, None, cu_q, cu_k, None, None, None, None, 1, SEQLEN_K, 0.0, 128 ** -0.5,
                              False, True, -1, -1, 0.0, False, None, 0)[0]

    cfg = {"shape": shape, "heads": h, "kv_heads": hk, "seqlen_k": SEQLEN_K, "impls": {},
           "auto_splits": flash_attn.num_splits_heuristic(1, h, hk, 1, SEQLEN_K, 128)}
    for name, fn, ctx in (("flash_attn_varlen_func", wrapper, None),
                          ("flash_attn_varlen_func (inference_mode)", wrapper, torch.inference_mode),
                          ("varlen_fwd (raw extension)", raw, None)):
        cfg["impls"][name] = m = measure(fn, args, ctx)
        print(f"{shape} {name:40s} " + " ".join(f"{c} {fmt(m.get(c), '.2f')}" for c in COLUMNS), flush=True)
    w, r = cfg["impls"]["flash_attn_varlen_func"], cfg["impls"]["varlen_fwd (raw extension)"]
    cfg["overhead_us"] = w.get("overhead_us")
    cfg["target_met"] = cfg["overhead_us"] is not None and cfg["overhead_us"] <= TARGET_US
    cfg["python_wrapper_us"] = w["host_us"] - r["host_us"] if w.get("host_us") and r.get("host_us") else None
    cfg["graph"] = graph_check(wrapper, q, k, v, args)
    return cfg


def kvcache_pair(b, h, hk, sk, args) -> dict:
    """One query per sequence: the kv-cache path costs what flash_attn_func does (no device-to-host copy)."""
    import flash_attn
    q = torch.randn(b, 1, h, 128, device="cuda", dtype=torch.float16)
    kc, vc = (torch.randn(b, sk, hk, 128, device="cuda", dtype=torch.float16) for _ in range(2))
    lens = torch.full((b,), sk, device="cuda", dtype=torch.int32)
    f = measure(lambda: flash_attn.flash_attn_func(q, kc, vc, causal=True), args)
    c = measure(lambda: flash_attn.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, causal=True), args)
    row = {"shape": f"b{b} s{sk} h{h}/{hk}", **{f"{k}_{n}": m.get(k) for n, m in (("func", f), ("kvcache", c))
                                              for k in ("wall_us", "gpu_us")}}
    for k in ("wall_us", "gpu_us"):
        row[f"{k}_ratio"] = common.ratio(c.get(k), f.get(k))
    return row


def report(floor_rows, configs, kvcache) -> str:
    def line(shape, name, m):
        return [shape, name] + [fmt(m.get(c), ".2f") for c in COLUMNS] + [m.get("error", "")]
    table = [line("-", name, m) for name, m in floor_rows.items()]
    table += [line(cfg["shape"], name, m) for cfg in configs for name, m in cfg["impls"].items()]
    table += [[row["shape"], "kvcache / func (target <= 1.02)"] + [fmt(row.get(f"{c}_ratio"), ".3f")
              if c in ("wall_us", "gpu_us") else "" for c in COLUMNS] + [""] for row in kvcache]
    lines = [common.markdown_table(["shape", "call"] + COLUMNS + ["error"], table), ""]
    for cfg in configs:
        g = cfg["graph"]
        lines.append(f"- {cfg['shape']} (auto splits {cfg['auto_splits']}): host overhead "
                     f"{fmt(cfg['overhead_us'], '.2f')} us, target <= {TARGET_US:g} us "
                     f"{'MET' if cfg['target_met'] else 'NOT MET'}; Python wrapper "
                     f"{fmt(cfg['python_wrapper_us'], '.2f')} us; CUDA graph {g['status']} ({g['replays']} replays, "
                     f"max |graph - eager| {fmt(g.get('maxdiff'), '.3g')}, stale {g.get('stale_replays', 'n/a')}"
                     + (f", {g['error']}" if "error" in g else "") + f"), replay host cost "
                     f"{fmt(g.get('replay_host_us'), '.2f')} us")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = common.parser(__doc__).parse_args(argv)
    args.n, args.replays = (500, 20) if args.quick else (2000, 100)  # calls per hot loop, graph replays
    desc = common.start()
    args.cycles_per_us = sleep_cycles_per_us()
    floor_rows = floors(args)
    configs = [decode_config(h, hk, args) for h, hk in HEAD_CONFIGS]
    kvcache = [kvcache_pair(*c, args) for c in KVCACHE_CONFIGS]
    common.save(args, "host_overhead", desc, {"floors": floor_rows, "configs": configs, "kvcache": kvcache,
                                              "n_calls": args.n, "sleep_cycles_per_us": args.cycles_per_us},
                report(floor_rows, configs, kvcache))
    return 0 if all(cfg["graph"]["status"] == "PASS" for cfg in configs) else 3


if __name__ == "__main__":
    sys.exit(main())
