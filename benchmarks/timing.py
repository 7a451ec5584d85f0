"""GPU timing helpers shared by the benchmark scripts.

Method (see bench()):
  * warm up (default 3 calls), then synchronize;
  * before every timed call, read a 256 MiB buffer (evict_l2) so the 50 MB L2 of an H100
    holds none of the inputs; the flush runs OUTSIDE the CUDA-event window (the start event
    is recorded after the flush kernel, in stream order). It reads rather than writes: a
    written buffer (``zero_()``, as Triton's do_bench does) leaves ~50 MB of dirty lines in L2,
    which the timed kernel then has to write back to DRAM while it streams its own inputs
    (~17 us on an H100, 20% of an 85 us decode call; benchmarks/NOTES.md, experiment 17).
    FLASH_ATTN_BENCH_FLUSH=write restores the writing flush, for comparison;
  * CUDA events around each single call; all events are read after one final sync;
  * the flush kernel (~90 us) also keeps the GPU busy while the CPU enqueues the next
    call, so Python launch overhead is not counted for kernels shorter than the flush;
  * report the median in microseconds (plus min / p20 / p80 / count).

The number of timed repeats adapts to a per-cell time budget (max_time_s) so that one
slow configuration cannot eat the whole run: reps = clamp(max_time_s / estimate,
min_reps, reps).

bench_graph() is an optional CUDA-graph replay timer (graph of N back-to-back calls,
no L2 flush inside the graph, i.e. L2-warm for small inputs).  It returns None instead
of raising when capture/replay fails, so callers can fall back to bench().

measure_copy_bandwidth(): median time of a large device-to-device copy; returns bytes
read + written per second (the usual "copy bandwidth" convention).

Everything here imports without CUDA; the functions need a CUDA device when called.
"""

from __future__ import annotations

import datetime
import math
import statistics
import time
import subprocess
import os
from dataclasses import dataclass, field, asdict
from typing import Callable, Optional

import torch

L2_FLUSH_BYTES = 256 << 20  # 256 MiB, > 5x the 50 MB L2 of an H100

_flush_buffers: dict = {}
FLUSH_MODE = os.environ.get("FLASH_ATTN_BENCH_FLUSH", "read")
if FLUSH_MODE not in ("read", "write"):
    raise ValueError(f"FLASH_ATTN_BENCH_FLUSH must be 'read' or 'write', got {FLUSH_MODE!r}")


def cuda_available() -> bool:
    try:
        return torch.cuda.is_available() and torch.cuda.device_count() > 0
    except Exception:
        return False


def require_cuda(script_name: str) -> None:
    """Print a clear message and exit(1) when there is no usable CUDA device."""
    if not cuda_available():
        print(f"{script_name}: CUDA is not available (torch {torch.__version__}, "
              f"torch.version.cuda={torch.version.cuda}). This benchmark needs an NVIDIA GPU "
              f"(written for an H100); nothing was measured.")
        raise SystemExit(1)


def l2_flush_buffer(nbytes: int = L2_FLUSH_BYTES, device=None) -> torch.Tensor:
    dev = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    key = (str(dev), nbytes)
    buf = _flush_buffers.get(key)
    if buf is None:
        buf = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        _flush_buffers[key] = buf
    return buf


def free_flush_buffers() -> None:
    _flush_buffers.clear()


def evict_l2(buf: torch.Tensor) -> None:
    """Evict everything from L2 by streaming buf through it (see the module docstring): a
    reduction that reads it (L2 left holding clean lines), or zero_() with FLUSH_MODE 'write'."""
    if FLUSH_MODE == "write":
        buf.zero_()
    else:
        buf.view(torch.int32).amax()


@dataclass
class BenchResult:
    median_us: float
    min_us: float
    p20_us: float
    p80_us: float
    n: int
    times_us: list = field(default_factory=list, repr=False)

    def as_dict(self):
        d = asdict(self)
        d.pop("times_us", None)
        return d


def _quantile(xs, q):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    pos = q * (len(xs) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def bench(fn: Callable[[], object], *, warmup: int = 3, reps: int = 50, min_reps: int = 5,
          max_time_s: Optional[float] = 0.5, flush_l2: bool = True) -> BenchResult:
    """Time fn() on the current CUDA stream; returns per-call statistics in microseconds.

    Exceptions raised by fn propagate (callers catch them per cell).
    """
    for _ in range(max(warmup, 1)):
        fn()
    torch.cuda.synchronize()

    buf = l2_flush_buffer() if flush_l2 else None

    # One-call estimate (flushed) to size the number of repeats.
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    if buf is not None:
        evict_l2(buf)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    est_us = max(start.elapsed_time(end) * 1e3, 1.0)

    n = reps
    if max_time_s is not None and max_time_s > 0:
        per_call_us = est_us + (100.0 if buf is not None else 0.0)  # flush of 256 MiB ~ 90 us
        n = int(max_time_s * 1e6 / per_call_us)
        n = max(min_reps, min(reps, n))

    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        if buf is not None:
            evict_l2(buf)
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)]
    return BenchResult(
        median_us=statistics.median(times),
        min_us=min(times),
        p20_us=_quantile(times, 0.2),
        p80_us=_quantile(times, 0.8),
        n=n,
        times_us=times,
    )


def settle(fn: Callable[[], object], *, min_ms: float = 30.0, max_calls: int = 200) -> None:
    """Run fn (with the L2 flush, as bench does) for at least min_ms of wall time before a cell's
    timings. The first implementation timed after a heavy cell otherwise reads 2-12% slow on the
    H100 (clocks still recovering), which biases whichever implementation a script times first."""
    buf = l2_flush_buffer()
    t0 = time.perf_counter()
    for _ in range(max_calls):
        evict_l2(buf)
        fn()
        torch.cuda.synchronize()
        if (time.perf_counter() - t0) * 1e3 >= min_ms:
            break


def capture_graph(fn: Callable[[], object], *, calls: int = 1, warmup: int = 3):
    """Capture `calls` back-to-back fn() calls into one CUDA graph, after warm-up calls on a side
    stream as torch's docs ask. Returns (graph, output of the last captured call)."""
    cur = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    side.wait_stream(cur)
    with torch.cuda.stream(side):
        for _ in range(max(warmup, 1)):
            fn()
    cur.wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    out = None
    with torch.cuda.graph(g):
        for _ in range(calls):
            out = fn()
    torch.cuda.synchronize()
    return g, out


def bench_graph(fn: Callable[[], object], *, calls_per_graph: int = 20, reps: int = 20,
                warmup: int = 3) -> Optional[BenchResult]:
    """CUDA-graph replay timing: capture calls_per_graph back-to-back calls of fn into one
    graph, time each replay with events, report per-call time (replay time / calls).

    No L2 flush inside the graph: inputs that fit in L2 stay warm. Launch overhead is
    excluded. Returns None (never raises) when capture or replay fails.
    """
    try:
        g, _ = capture_graph(fn, calls=calls_per_graph, warmup=warmup)
        g.replay()  # warm replay
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            starts[i].record()
            g.replay()
            ends[i].record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) * 1e3 / calls_per_graph for s, e in zip(starts, ends)]
        del g
        return BenchResult(
            median_us=statistics.median(times),
            min_us=min(times),
            p20_us=_quantile(times, 0.2),
            p80_us=_quantile(times, 0.8),
            n=reps * calls_per_graph,
            times_us=times,
        )
    except Exception:
        try:
            torch.cuda.synchronize()
        except Exception:
            pass
        return None


def measure_copy_bandwidth(nbytes: int = 2 << 30, reps: int = 20, warmup: int = 3) -> dict:
    """Device-to-device copy of nbytes (default 2 GiB). Returns a dict with
    time_us (median), bytes_per_s (bytes read + bytes written per second = 2*nbytes/t)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    src.fill_(1)
    dst = torch.empty_like(src)
    try:
        res = bench(lambda: dst.copy_(src), warmup=warmup, reps=reps, min_reps=reps,
                    max_time_s=None, flush_l2=False)
    finally:
        del src, dst
        torch.cuda.empty_cache()
    return {
        "nbytes": nbytes,
        "time_us": res.median_us,
        "bytes_per_s": 2.0 * nbytes / (res.median_us * 1e-6),
    }


# ----------------------------------------------------------------------------- metadata

def gpu_name() -> str:
    try:
        return torch.cuda.get_device_name(torch.cuda.current_device())
    except Exception:
        return "unknown GPU"


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def today_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")


def git_rev(repo_dir: str) -> str:
    try:
        out = subprocess.run(["git", "-C", repo_dir, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        rev = out.stdout.strip() if out.returncode == 0 else "no-commit"
        dirty = subprocess.run(["git", "-C", repo_dir, "status", "--porcelain"],
                               capture_output=True, text=True, timeout=5)
        if dirty.returncode == 0 and dirty.stdout.strip():
            rev += "+dirty"
        return rev
    except Exception:
        return "unknown"


def environment_lines(repo_dir: str) -> list:
    """Human-readable lines describing GPU, software, date (printed at the top of each run)."""
    lines = [f"GPU: {gpu_name()}", f"date: {now_utc()}"]
    try:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        lines.append(f"SMs: {props.multi_processor_count}, memory: {props.total_memory / 2**30:.1f} GiB, "
                     f"capability: {props.major}.{props.minor}")
    except Exception:
        pass
    cudnn_v = None
    try:
        cudnn_v = torch.backends.cudnn.version()
    except Exception:
        pass
    lines.append(f"torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {cudnn_v}), "
                 f"repo rev {git_rev(repo_dir)}")
    return lines


def fmt(x, spec: str = ".1f", na: str = "n/a") -> str:
    if x is None:
        return na
    try:
        if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
            return na
        return format(x, spec)
    except Exception:
        return str(x)


def markdown_table(headers: list, rows: list) -> str:
    out = ["| " + " | ".join(headers) + " |",
           "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        out.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(out)


def short_err(e: BaseException, limit: int = 160) -> str:
    msg = f"{type(e).__name__}: {e}".replace("\n", " ").replace("|", "/")
    return msg if len(msg) <= limit else msg[:limit - 3] + "..."


def sticky_cuda_error() -> Optional[str]:
    """After a failed cell, check whether the CUDA context is still usable."""
    try:
        torch.cuda.synchronize()
        torch.zeros(1, device="cuda").add_(1).item()
        return None
    except Exception as e:  # illegal address etc: the context is dead
        return short_err(e)


def repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
