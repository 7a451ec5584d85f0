#!/usr/bin/env python
"""Figures from committed results, no GPU: docs/img/decode_<card>.png (ours and torch FA2 relative to
cuDNN per cell), forward_<card>.png and backward_<card>.png (TFLOP/s per sequence length, a panel per
dtype / head dim / causal). Needs matplotlib (a development dependency: pip install matplotlib).
"""

import argparse
import json
import os
import sys

BENCHMARKS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLORS = {"ours": "#1f77b4", "torch FA2": "#ff7f0e", "cuDNN": "#2ca02c", "ours deterministic": "#9ecae1"}
FORWARD = {"ours": "ours_tflops", "torch FA2": "torch_fa2_tflops", "cuDNN": "cudnn_tflops"}
BACKWARD = {"ours": "ours_bwd_tflops", "ours deterministic": "ours_det_bwd_tflops", "torch FA2": "torch_fa2_bwd_tflops",
            "cuDNN": "cudnn_bwd_tflops"}


def load(path):
    with open(path) as f:
        data = json.load(f)
    return (data["rows"], data.get("device")) if isinstance(data, dict) else (data, None)


def subtitle(device) -> str:
    return f"\n{device['card']}, commit {device.get('commit') or '?'}, {device['date'][:10]}" if device else ""


def plot_decode(plt, rows, device):
    """cuDNN time / time per cell (above 1: faster than cuDNN); cuDNN is the line at 1."""
    rows = [r for r in rows if r.get("cudnn_us")]
    fig, ax = plt.subplots(figsize=(15, 5))
    width = 0.4
    for i, (label, key) in enumerate((("ours", "ours_us"), ("torch FA2", "torch_fa2_varlen_us"))):
        ys = [r["cudnn_us"] / r[key] if r.get(key) else 0 for r in rows]
        ax.bar([x + (i - 0.5) * width for x in range(len(rows))], ys, width, label=label, color=COLORS[label])
    ax.axhline(1.0, color=COLORS["cuDNN"], lw=1.5, label="cuDNN")
    ax.set(xticks=range(len(rows)), xlim=(-0.6, len(rows) - 0.4), xlabel="heads / kv heads, batch, keys",
           ylabel="cuDNN time / time (higher is faster)",
           title="Decode (one query, fp16, head dim 128), L2 flushed" + subtitle(device))
    ax.set_xticklabels([f"{r['heads']}/{r['kv_heads']}\nb{r['batch']}\n{r['seqlen_k'] // 1024}k" for r in rows],
                       fontsize=7)
    ax.legend(loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    return fig, 90


def plot_throughput(plt, rows, device, title, series):
    """TFLOP/s against sequence length, one panel per (dtype, head dim, causal)."""
    def panel(r):
        return r.get("dtype", "fp16"), r["headdim"], r["causal"]
    panels = sorted(set(map(panel, rows)))
    cols = min(4, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 2.9 * nrows), squeeze=False, sharey=True)
    for ax, (dtype, headdim, causal) in zip(axes.flat, panels):
        cell = sorted((r for r in rows if panel(r) == (dtype, headdim, causal)), key=lambda r: r["seqlen"])
        for label, key in series.items():
            pts = [(r["seqlen"], r[key]) for r in cell if r.get(key)]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=label, color=COLORS[label])
        ax.set_xscale("log", base=2)
        ax.set_xticks([r["seqlen"] for r in cell])
        ax.set_xticklabels([f"{r['seqlen'] // 1024}k" if r["seqlen"] >= 1024 else str(r["seqlen"]) for r in cell],
                           fontsize=7)
        ax.set_title(f"{dtype}, head dim {headdim}, {'causal' if causal else 'not causal'}", fontsize=9)
        ax.grid(alpha=0.3)
    # Shared y axis: the top from every panel's data (a per-panel bottom froze it at the first panel's).
    top = max((r[key] for r in rows for key in series.values() if r.get(key)), default=1.0)
    axes.flat[0].set_ylim(0, 1.05 * top)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("TFLOP/s")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(title + subtitle(device))
    return fig, 80


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--card", default="h100")
    p.add_argument("--results-dir", default=os.path.join(BENCHMARKS, "results"))
    p.add_argument("--out-dir", default=os.path.join(os.path.dirname(BENCHMARKS), "docs", "img"))
    args = p.parse_args(argv)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot.py needs matplotlib, a development dependency: pip install matplotlib")
        return 1
    os.makedirs(args.out_dir, exist_ok=True)
    figures = {"decode": lambda rows, dev: plot_decode(plt, rows, dev),
               "forward": lambda rows, dev: plot_throughput(plt, rows, dev, "Prefill forward, model dim 2048", FORWARD),
               "backward": lambda rows, dev: plot_throughput(plt, rows, dev, "Backward, model dim 2048", BACKWARD)}
    drawn = 0
    for name, draw in figures.items():
        src = os.path.join(args.results_dir, f"{name}_{args.card}.json")
        path = os.path.join(args.out_dir, f"{name}_{args.card}.png")
        if not os.path.exists(src):
            print(f"skipped {name}: no {src}")
            continue
        fig, dpi = draw(*load(src))
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
        print(f"wrote {path}")
        drawn += 1
    return 0 if drawn else 1


if __name__ == "__main__":
    sys.exit(main())
