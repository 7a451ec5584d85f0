"""GPU timing for the benchmark scripts, and the card description heading every result.

bench() times single calls with CUDA events, each after evicting L2 by READING a 256 MiB buffer outside
the event window: a written flush (Triton's do_bench) leaves ~50 MB of dirty lines that the timed kernel
writes back (~17 us on an H100). The flush (~90 us) also keeps launch overhead out of shorter kernels'
times. Medians; imports without CUDA.
"""

import contextlib
import datetime
import functools
import os
import statistics
import subprocess
import time
import warnings
from typing import Callable, Optional

import torch

L2_FLUSH_BYTES = 256 << 20
flush_buffer = functools.cache(lambda: torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda"))


def event() -> torch.cuda.Event:
    return torch.cuda.Event(enable_timing=True)


def event_median_us(fn: Callable[[], object], n: int, before: Optional[Callable[[], object]] = None) -> float:
    """Median microseconds of n CUDA-event windows around fn(), each after before() (outside the window)."""
    starts, ends = [event() for _ in range(n)], [event() for _ in range(n)]
    for i in range(n):
        if before:
            before()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends))


def evict_l2() -> None:
    flush_buffer().view(torch.int32).amax()  # a reduction reads every line and leaves L2 holding clean ones


def bench(fn: Callable[[], object], *, warmup: int = 3, reps: int = 50, min_reps: int = 5,
          max_time_s: Optional[float] = 0.5, flush_l2: bool = True) -> float:
    """Median GPU time of fn() in us; max_time_s caps the repeats so that no slow configuration eats a run."""
    for _ in range(max(warmup, 1)):
        fn()
    torch.cuda.synchronize()
    flush, n = evict_l2 if flush_l2 else None, reps
    if max_time_s:  # one call's time (plus ~100 us per flush) sets the repeats
        per_call_us = event_median_us(fn, 1, flush) + (100.0 if flush_l2 else 0.0)
        n = max(min_reps, min(reps, int(max_time_s * 1e6 / max(per_call_us, 1.0))))
    return event_median_us(fn, n, flush)


def settle(fn: Callable[[], object], min_ms: float = 30.0, max_calls: int = 200) -> None:
    """Run fn with the flush for >= min_ms before a cell's timings: the first implementation timed
    after a heavy cell otherwise reads 2-12% slow on an H100 (clocks still recovering)."""
    t0 = time.perf_counter()
    for _ in range(max_calls):
        evict_l2()
        fn()
        torch.cuda.synchronize()
        if (time.perf_counter() - t0) * 1e3 >= min_ms:
            break


def capture_graph(fn: Callable[[], object], calls: int = 1, warmup: int = 3):
    """(graph of `calls` back-to-back fn() calls, warmed up on a side stream as torch asks, last output)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph, out = torch.cuda.CUDAGraph(), None
    with torch.cuda.graph(graph):
        for _ in range(calls):
            out = fn()
    torch.cuda.synchronize()
    return graph, out


def bench_graph(fn: Callable[[], object], calls_per_graph: int = 20, reps: int = 10) -> Optional[float]:
    """Median per-call microseconds from replays of a graph of back-to-back calls (no launch gaps, no
    flush: L2-warm for small inputs); None when capture or replay fails."""
    try:
        graph, _ = capture_graph(fn, calls_per_graph)
        graph.replay()
        return event_median_us(graph.replay, reps) / calls_per_graph
    except Exception:  # noqa: BLE001 - callers report n/a
        torch.cuda.synchronize()
        return None


def short_err(e: BaseException, limit: int = 200) -> str:
    return f"{type(e).__name__}: {e}".replace("\n", " ").replace("|", "/")[:limit]


def time_impl(make_fn, kw, ctx=None):
    """(median us or None, note or None, first output or None); never raises. make_fn builds the
    callable (setup outside the timing); SDPA's warnings say why it refused a backend."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with ctx() if ctx else contextlib.nullcontext():
                fn = make_fn()
                out = fn()
                return bench(fn, **kw), None, out[0] if isinstance(out, (tuple, list)) else out
        except Exception as e:  # noqa: BLE001 - a failing implementation is n/a, not a crash
            note = short_err(e) + "".join(f" [warning: {str(w.message)[:160]}]" for w in caught[:1])
            return None, note, None


def time_impls(impls: dict, kw, passes: int = 2, repeat=None):
    """Time {name: (make_fn, ctx)} in order, then those in `repeat` (default all) in reverse order, each
    keeping its lower median, so that none gains from its place: ({name: us}, {name: note}, {name: output})."""
    times, notes, outs = {}, {}, {}
    for name, (make_fn, ctx) in impls.items():
        times[name], note, outs[name] = time_impl(make_fn, kw, ctx)
        if note:
            notes[name] = note
    if passes > 1:
        for name in reversed([n for n in impls if repeat is None or n in repeat]):
            if times[name] is not None:
                t, _, _ = time_impl(impls[name][0], kw, impls[name][1])
                times[name] = min(times[name], t) if t is not None else times[name]
    return times, notes, outs


def sdpa_context(backend: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return lambda: sdpa_kernel([getattr(SDPBackend, backend)])


def torch_fa2_forward():
    """PyTorch's vendored FlashAttention-2 forward as call(q, k, v, cu_q, cu_k, max_q, max_k, causal,
    dropout_p=0.0) (cu_q = cu_k = None: dense (batch, seqlen, heads, d) inputs), or (None, why)."""
    try:
        op = torch.ops.aten._flash_attention_forward.default
        names = [a.name for a in op._schema.arguments]
    except Exception as e:  # noqa: BLE001
        return None, "aten._flash_attention_forward unavailable: " + short_err(e)
    expected = ["query", "key", "value", "cum_seq_q", "cum_seq_k", "max_q", "max_k", "dropout_p", "is_causal",
                "return_debug_mask"]
    if names[:len(expected)] != expected:
        return None, f"unexpected schema {op._schema}"

    def call(q, k, v, cu_q, cu_k, max_q, max_k, causal, dropout_p=0.0):
        return op(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, causal, False, scale=q.shape[-1] ** -0.5)[0]
    return call, None


def copy_bandwidth(nbytes: int = 2 << 30, reps: int = 20) -> float:
    """Bytes read + written per second by a device-to-device copy of nbytes (median time)."""
    src = torch.ones(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = bench(lambda: dst.copy_(src), reps=reps, min_reps=reps, max_time_s=None, flush_l2=False)
    src = dst = None  # noqa: F841 - frees the 4 GiB before the cache is emptied
    torch.cuda.empty_cache()
    return 2.0 * nbytes / (us * 1e-6)


def _run(cmd) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def describe_device(repo_dir: str) -> dict:
    """Card, software and commit for result headers; BENCH_COMMIT names the commit of a tree without
    git metadata of its own (a baseline from `git archive`, a copy on another machine)."""
    idx = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(idx)
    smi = _run(["nvidia-smi", "-i", str(idx), "--query-gpu=serial,driver_version", "--format=csv,noheader"])
    serial, _, driver = (x.strip() for x in smi.partition(","))
    commit = os.environ.get("BENCH_COMMIT") or _run(["git", "-C", repo_dir, "rev-parse", "--short", "HEAD"])
    if commit and not os.environ.get("BENCH_COMMIT") and _run(["git", "-C", repo_dir, "status", "--porcelain",
                                                               "--untracked-files=no"]):
        commit += "+dirty"
    return {"card": props.name, "serial": serial if serial and serial != "[N/A]" else None,
            "driver": driver or None, "sms": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2 ** 30, 1), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "commit": commit or None,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def device_line(d: dict) -> str:
    serial = f" (serial {d['serial']})" if d.get("serial") else ""
    return (f"{d['card']}{serial}, {d['sms']} SMs, driver {d.get('driver') or '?'}, torch {d['torch']} "
            f"(CUDA {d['cuda']}, cuDNN {d['cudnn']}), commit {d.get('commit') or 'unknown'}, {d['date']}")
