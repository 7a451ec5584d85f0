#!/usr/bin/env python
"""GPU time of the Triton ops (rotary, layer/RMS norm, cross entropy) against eager PyTorch: median
of 50 calls, L2 flushed (read) before each (timing.bench). "fwd+bwd" times a forward and a backward
(torch.autograd.grad) per call, and, since a Triton launch costs ~20 us of host time that the event
window also holds, the same call replayed from a CUDA graph (5 calls per graph, no launch gaps, L2
not flushed: little change for tensors of 128 MB and more). --quick: bf16 only, the smaller
vocabulary. Result: triton_ops_<card>.json.
"""

import functools
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # common, timing

import common  # noqa: E402
import timing  # noqa: E402


def forward_only(fn, inputs):
    return torch.no_grad()(functools.partial(fn, *inputs))


def forward_backward(fn, inputs):
    """A call running fn(*inputs) and the gradients of all its outputs w.r.t. the float inputs."""
    leaves = [t for t in inputs if t is not None and t.requires_grad]

    def outputs():
        out = fn(*inputs)
        return out if isinstance(out, tuple) else (out,)
    grads = [torch.randn_like(o) for o in outputs()]
    return lambda: torch.autograd.grad(outputs(), leaves, grads)


def rotary_eager(x, cos, sin):
    half = cos.shape[-1]
    cos = torch.cat((cos, cos), dim=-1)[:, None, :]
    sin = torch.cat((sin, sin), dim=-1)[:, None, :]
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rotary_cases(dtype):
    from flash_attn.layers.rotary import apply_rotary_emb
    batch, seqlen, nheads, headdim = 8, 4096, 32, 128
    x = torch.randn(batch, seqlen, nheads, headdim, device="cuda", dtype=dtype, requires_grad=True)
    angles = torch.rand(seqlen, headdim // 2, device="cuda") * 2 * math.pi
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    shape = f"{batch}x{seqlen}x{nheads}x{headdim}"
    inputs = (x, cos, sin)
    yield "rotary", shape, "fwd", forward_only(apply_rotary_emb, inputs), forward_only(rotary_eager, inputs)
    yield "rotary", shape, "fwd+bwd", forward_backward(apply_rotary_emb, inputs), forward_backward(rotary_eager, inputs)


def norm_cases(dtype):
    from flash_attn.ops.triton.layer_norm import layer_norm_fn, rms_norm_fn
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

    for op, ours, eager, inputs in (("layer_norm_fn residual prenorm", ours_ln, torch_ln, (x, residual, weight, bias)),
                                    ("rms_norm_fn residual prenorm", ours_rms, torch_rms, (x, residual, weight))):
        yield op, shape, "fwd", forward_only(ours, inputs), forward_only(eager, inputs)
        yield op, shape, "fwd+bwd", forward_backward(ours, inputs), forward_backward(eager, inputs)


def cross_entropy_cases(dtype, shapes):
    from flash_attn.losses.cross_entropy import CrossEntropyLoss
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
                ours_us, torch_us = (timing.bench(fn, reps=50, max_time_s=None) for fn in (ours, eager))
                graphs = [timing.bench_graph(fn, calls_per_graph=5, reps=5) if pass_name == "fwd+bwd" else None
                          for fn in (ours, eager)]
                rows.append(dict(op=op, dtype=dtype_name, shape=shape, **{"pass": pass_name},
                                 ours_us=round(ours_us, 1), torch_us=round(torch_us, 1),
                                 speedup=round(torch_us / ours_us, 2), ours_graph_us=graphs[0] and round(graphs[0], 1),
                                 torch_graph_us=graphs[1] and round(graphs[1], 1)))
                print(f"  {op} {dtype_name} {shape} {pass_name}: {ours_us:.1f} us vs torch {torch_us:.1f} us",
                      flush=True)
            torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    args = common.parser(__doc__).parse_args(argv)
    desc = common.start()
    rows = run(args.quick)
    headers = ["op", "dtype", "shape", "pass", "ours (us)", "torch (us)", "speedup", "ours graph (us)",
               "torch graph (us)"]
    table = [[r["op"], r["dtype"], r["shape"], r["pass"], r["ours_us"], r["torch_us"], f"{r['speedup']}x",
              r["ours_graph_us"] or "n/a", r["torch_graph_us"] or "n/a"] for r in rows]
    report = ("Triton ops vs eager PyTorch (median us, L2 flushed; graph: CUDA-graph replay)\n\n"
              + common.markdown_table(headers, table))
    common.save(args, "triton_ops", desc, rows, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
