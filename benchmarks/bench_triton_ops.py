"""GPU time of the Triton ops (rotary, layer/RMS norm, cross entropy) against eager PyTorch.

    python3 benchmarks/bench_triton_ops.py [--quick] [--out-dir benchmarks/results]

Each number is the median of at least 30 calls timed with CUDA events, with L2 evicted by reading
a 256 MiB buffer before every call (timing.bench). "fwd+bwd" times one forward and one backward
(torch.autograd.grad) per call. An event window around one call also holds the gaps in which the
GPU waits for the host to launch the next kernel; a Triton launch from Python costs ~20 us of host
time, so "fwd+bwd" rows also give the GPU time of the same call replayed from a CUDA graph
(timing.bench_graph: 5 calls per graph, no launch gaps; L2 is not flushed inside the graph, which
changes little for these tensors of 128 MB and more). Prints a markdown table and writes the rows
to <out-dir>/triton_ops_<card>.json.
"""

import argparse
import json
import math
import os
import re
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from timing import bench, bench_graph, require_cuda  # noqa: E402

from flash_attn.layers.rotary import apply_rotary_emb  # noqa: E402
from flash_attn.losses.cross_entropy import CrossEntropyLoss  # noqa: E402
from flash_attn.ops.triton.layer_norm import layer_norm_fn, rms_norm_fn  # noqa: E402

MIN_REPS = 30


def card_name():
    """'NVIDIA H100 80GB HBM3' -> 'h100'; falls back to the whole name, lowercased."""
    name = torch.cuda.get_device_name()
    model = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Za-z]?)\b", name)
    return (model.group(1) if model else re.sub(r"\W+", "_", name)).lower()


def time_us(fn):
    return bench(fn, reps=MIN_REPS + 20, min_reps=MIN_REPS, max_time_s=None).median_us


def graph_us(fn):
    timed = bench_graph(fn, calls_per_graph=5, reps=5)
    return None if timed is None else round(timed.median_us, 1)


def forward_only(fn, inputs):
    def call():
        with torch.no_grad():
            fn(*inputs)

    return call


def forward_backward(fn, inputs):
    """A call running fn(*inputs) and the gradients of all its outputs w.r.t. the float inputs."""
    leaves = [t for t in inputs if t is not None and t.requires_grad]
    outputs = fn(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    grads = [torch.randn_like(o) for o in outputs]

    def call():
        outs = fn(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.grad(outs, leaves, grads)

    return call


def rotary_eager(x, cos, sin):
    half = cos.shape[-1]
    cos = torch.cat((cos, cos), dim=-1)[:, None, :]
    sin = torch.cat((sin, sin), dim=-1)[:, None, :]
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rotary_cases(dtype):
    batch, seqlen, nheads, headdim = 8, 4096, 32, 128
    x = torch.randn(batch, seqlen, nheads, headdim, device="cuda", dtype=dtype, requires_grad=True)
    angles = torch.rand(seqlen, headdim // 2, device="cuda") * 2 * math.pi
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    shape = f"{batch}x{seqlen}x{nheads}x{headdim}"
    inputs = (x, cos, sin)
    yield "rotary", shape, "fwd", forward_only(apply_rotary_emb, inputs), forward_only(rotary_eager, inputs)
    yield "rotary", shape, "fwd+bwd", forward_backward(apply_rotary_emb, inputs), forward_backward(rotary_eager, inputs)


def norm_cases(dtype):
    rows, hidden = 16384, 4096
    x = torch.randn(rows, hidden, device="cuda", dtype=dtype, requires_grad=True)
    residual = torch.randn_like(x, requires_grad=True)
    weight = torch.randn(hidden, device="cuda", dtype=dtype, requires_grad=True)
    bias = torch.randn(hidden, device="cuda", dtype=dtype, requires_grad=True)
    shape = f"{rows}x{hidden}"

    def ours_ln(x, residual, weight, bias):
        return layer_norm_fn(x, weight, bias, residual=residual, prenorm=True)

    def torch_ln(x, residual, weight, bias):
        h = x + residual
        return F.layer_norm(h, (hidden,), weight, bias, eps=1e-6), h

    def ours_rms(x, residual, weight):
        return rms_norm_fn(x, weight, None, residual=residual, prenorm=True)

    def torch_rms(x, residual, weight):
        h = x + residual
        return F.rms_norm(h, (hidden,), weight, eps=1e-6), h

    for op, ours, eager, inputs in (
        ("layer_norm_fn residual prenorm", ours_ln, torch_ln, (x, residual, weight, bias)),
        ("rms_norm_fn residual prenorm", ours_rms, torch_rms, (x, residual, weight)),
    ):
        yield op, shape, "fwd", forward_only(ours, inputs), forward_only(eager, inputs)
        yield op, shape, "fwd+bwd", forward_backward(ours, inputs), forward_backward(eager, inputs)


def cross_entropy_cases(dtype, shapes):
    ours_loss = CrossEntropyLoss()
    for rows, vocab in shapes:
        logits = torch.randn(rows, vocab, device="cuda", dtype=dtype, requires_grad=True)
        labels = torch.randint(0, vocab, (rows,), device="cuda")
        yield ("CrossEntropyLoss", f"{rows}x{vocab}", "fwd+bwd",
               forward_backward(lambda z: ours_loss(z, labels), (logits,)),
               forward_backward(lambda z: F.cross_entropy(z, labels), (logits,)))


def run(quick):
    dtypes = [torch.bfloat16] if quick else [torch.float16, torch.bfloat16]
    vocab_shapes = [(8192, 32000)] if quick else [(8192, 32000), (4096, 128256)]
    rows = []
    for dtype in dtypes:
        dtype_name = str(dtype).replace("torch.", "")
        for cases in (rotary_cases(dtype), norm_cases(dtype), cross_entropy_cases(dtype, vocab_shapes)):
            for op, shape, pass_name, ours, eager in cases:
                ours_us, torch_us = time_us(ours), time_us(eager)
                graphs = (graph_us(ours), graph_us(eager)) if pass_name == "fwd+bwd" else (None, None)
                rows.append(dict(op=op, dtype=dtype_name, shape=shape, **{"pass": pass_name},
                                 ours_us=round(ours_us, 1), torch_us=round(torch_us, 1),
                                 speedup=round(torch_us / ours_us, 2),
                                 ours_graph_us=graphs[0], torch_graph_us=graphs[1]))
                print(f"  {op} {dtype_name} {shape} {pass_name}: {ours_us:.1f} us vs torch {torch_us:.1f} us",
                      file=sys.stderr)
            torch.cuda.empty_cache()
    return rows


def markdown(rows, card):
    lines = [f"Triton ops vs eager PyTorch on {card} (median us, L2 flushed; graph: CUDA-graph replay)", "",
             "| op | dtype | shape | pass | ours (us) | torch (us) | speedup | ours graph (us) | torch graph (us) |",
             "|---|---|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['op']} | {r['dtype']} | {r['shape']} | {r['pass']} | {r['ours_us']} | {r['torch_us']} | "
              f"{r['speedup']}x | {r['ours_graph_us'] or 'n/a'} | {r['torch_graph_us'] or 'n/a'} |" for r in rows]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="bf16 only and the smaller vocabulary")
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    require_cuda("bench_triton_ops.py")
    card = card_name()
    rows = run(args.quick)
    print(markdown(rows, torch.cuda.get_device_name()))
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, f"triton_ops_{card}.json")
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
