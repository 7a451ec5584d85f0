"""Timing helpers built on torch.utils.benchmark (same API as upstream flash_attn.utils.benchmark).

benchmark_forward / benchmark_backward / benchmark_combined return (Timer, Measurement);
benchmark_fwd_bwd returns two such pairs and benchmark_all three. benchmark_memory returns the
peak CUDA memory in GB; pytorch_profiler prints (and optionally saves) a profile.
"""

import torch
import torch.utils.benchmark as benchmark


def _autocast(amp, amp_dtype):
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.autocast(device_type=device_type, dtype=amp_dtype, enabled=amp)


def _first_output(y):
    return y[0] if isinstance(y, tuple) else y


def _clear_grads(inputs):
    # Setting .grad to None avoids timing gradient accumulation.
    for x in inputs:
        if isinstance(x, torch.Tensor):
            x.grad = None


def _output_and_grad(fn, inputs, kwinputs, grad, amp, amp_dtype):
    with _autocast(amp, amp_dtype):
        y = _first_output(fn(*inputs, **kwinputs))
    if grad is None:
        grad = torch.randn_like(y)
    elif grad.shape != y.shape:
        raise RuntimeError("Grad shape does not match output shape")
    return y, grad


def _time(stmt, globals, repeats, verbose):
    t = benchmark.Timer(stmt=stmt, globals=globals, num_threads=torch.get_num_threads())
    m = t.timeit(repeats)
    if verbose:
        print(m)
    return t, m


def benchmark_forward(
    fn, *inputs, repeats=10, desc="", verbose=True, amp=False, amp_dtype=torch.float16, **kwinputs
):
    """Use Pytorch Benchmark on the forward pass of an arbitrary function."""
    if verbose:
        print(desc, "- Forward pass")

    def fwd():
        with _autocast(amp, amp_dtype):
            fn(*inputs, **kwinputs)

    return _time("fwd()", {"fwd": fwd}, repeats, verbose)


def benchmark_backward(
    fn, *inputs, grad=None, repeats=10, desc="", verbose=True, amp=False, amp_dtype=torch.float16,
    **kwinputs,
):
    """Use Pytorch Benchmark on the backward pass of an arbitrary function."""
    if verbose:
        print(desc, "- Backward pass")
    y, grad = _output_and_grad(fn, inputs, kwinputs, grad, amp, amp_dtype)

    def bwd():
        _clear_grads(inputs)
        y.backward(grad, retain_graph=True)

    return _time("bwd()", {"bwd": bwd}, repeats, verbose)


def benchmark_combined(
    fn, *inputs, grad=None, repeats=10, desc="", verbose=True, amp=False, amp_dtype=torch.float16,
    **kwinputs,
):
    """Use Pytorch Benchmark on the forward+backward pass of an arbitrary function."""
    if verbose:
        print(desc, "- Forward + Backward pass")
    _, grad = _output_and_grad(fn, inputs, kwinputs, grad, amp, amp_dtype)

    def fwd_bwd():
        _clear_grads(inputs)
        with _autocast(amp, amp_dtype):
            y = _first_output(fn(*inputs, **kwinputs))
        y.backward(grad, retain_graph=True)

    return _time("fwd_bwd()", {"fwd_bwd": fwd_bwd}, repeats, verbose)


def benchmark_fwd_bwd(
    fn, *inputs, grad=None, repeats=10, desc="", verbose=True, amp=False, amp_dtype=torch.float16,
    **kwinputs,
):
    """Forward and backward timed separately: ((t, m) forward, (t, m) backward)."""
    common = dict(repeats=repeats, desc=desc, verbose=verbose, amp=amp, amp_dtype=amp_dtype)
    return (
        benchmark_forward(fn, *inputs, **common, **kwinputs),
        benchmark_backward(fn, *inputs, grad=grad, **common, **kwinputs),
    )


def benchmark_all(
    fn, *inputs, grad=None, repeats=10, desc="", verbose=True, amp=False, amp_dtype=torch.float16,
    **kwinputs,
):
    """Forward, backward and forward+backward: three (t, m) pairs."""
    common = dict(repeats=repeats, desc=desc, verbose=verbose, amp=amp, amp_dtype=amp_dtype)
    return (
        benchmark_forward(fn, *inputs, **common, **kwinputs),
        benchmark_backward(fn, *inputs, grad=grad, **common, **kwinputs),
        benchmark_combined(fn, *inputs, grad=grad, **common, **kwinputs),
    )


def pytorch_profiler(
    fn, *inputs, trace_filename=None, backward=False, amp=False, amp_dtype=torch.float16,
    cpu=False, verbose=True, **kwinputs,
):
    """Run fn (and optionally its backward) under the PyTorch profiler to see CUDA kernels."""
    if backward:
        with _autocast(amp, amp_dtype):
            g = torch.randn_like(_first_output(fn(*inputs, **kwinputs)))

    def step():
        if backward:
            _clear_grads(inputs)
        with _autocast(amp, amp_dtype):
            out = _first_output(fn(*inputs, **kwinputs))
        if backward:  # backward outside autocast
            out.backward(g, retain_graph=True)

    for _ in range(30):  # warm up
        step()
    activities = [torch.profiler.ProfilerActivity.CPU] if cpu else []
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    elif not activities:
        activities.append(torch.profiler.ProfilerActivity.CPU)
    with torch.profiler.profile(activities=activities, record_shapes=True, with_stack=True) as prof:
        step()
    if verbose:
        print(prof.key_averages().table(row_limit=50))
    if trace_filename is not None:
        prof.export_chrome_trace(trace_filename)


def benchmark_memory(fn, *inputs, desc="", verbose=True, **kwinputs):
    """Peak CUDA memory allocated while running fn once, in GB (2**20 * 1000 bytes, as upstream)."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    fn(*inputs, **kwinputs)
    torch.cuda.synchronize()
    mem = torch.cuda.max_memory_allocated() / ((2**20) * 1000)
    if verbose:
        print(f"{desc} max memory: {mem}GB")
    torch.cuda.empty_cache()
    return mem
