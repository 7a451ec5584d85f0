"""Schedule simulation of the Hopper backward's grid under a causal mask: how long the grid takes,
relative to a perfect balance, when its thread blocks start in a given order.

Model: one thread block per (key block, batch, kv head) group, one resident block per SM; the GPU
starts blocks in launch order, each on the SM that frees first. A block costs its steps (query
blocks from its diagonal to the end) plus a fixed `--block-cost` in steps (K / V loads, the dK /
dV epilogue). Orders:
  key_order  today's: each group's key blocks in order, group after group
  tail       the last tail groups interleaved key block by key block
             (plan/heuristics.h, sm90_bwd_tail_groups: ceil(2 x SMs / key blocks) groups)
  interleave every group interleaved (the balance bound; its groups share no L2 rows)
Printed per cell: makespan / balanced time, and the mean share of running blocks that are the only
block of their group (0: all share rows with others in L2; 1: none do).

  python benchmarks/bwd_schedule_sim.py            # the backward benchmark's causal grid
"""

import argparse
import heapq
import math

# benchmark_backward.py's grid: model dim 2048, batch x seqlen = 16k.
HEAD_DIMS = {64: 32, 128: 16, 256: 8}
SEQLENS = [512, 1024, 2048, 4096, 8192, 16384]


def block_shape(head_dim):
    """(query rows per step, keys per block) of the default variant (plan/tile_sizes.h)."""
    return (128 if head_dim == 64 else 64), (128 if head_dim <= 128 else 64)


def blocks(seqlen, groups, block_m, block_n, block_cost):
    """{(group, key block): cost} for seqlen_q == seqlen_k under a causal mask."""
    n_blocks = math.ceil(seqlen / block_n)
    return n_blocks, {(g, n): block_cost + math.ceil((seqlen - n * block_n) / block_m)
                      for g in range(groups) for n in range(n_blocks)}


def launch_order(name, n_blocks, groups, sms):
    if name == "key_order":
        return [(g, n) for g in range(groups) for n in range(n_blocks)]
    tail = groups if name == "interleave" else min(groups, math.ceil(2 * sms / n_blocks))
    head = [(g, n) for g in range(groups - tail) for n in range(n_blocks)]
    return head + [(g, n) for n in range(n_blocks) for g in range(groups - tail, groups)]


def simulate(order, cost, sms):
    free = [(0.0, sm) for sm in range(sms)]
    heapq.heapify(free)
    running = {}
    end, alone = 0.0, []
    for g, n in order:
        start, sm = heapq.heappop(free)
        running[sm] = (start + cost[(g, n)], g)
        live = [group for stop, group in running.values() if stop > start]
        alone.append(sum(live.count(group) == 1 for group in live) / len(live))
        end = max(end, start + cost[(g, n)])
        heapq.heappush(free, (start + cost[(g, n)], sm))
    return end, sum(alone) / len(alone)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sms", type=int, default=132)
    parser.add_argument("--block-cost", type=float, default=2.0)
    args = parser.parse_args()
    for head_dim, heads in HEAD_DIMS.items():
        block_m, block_n = block_shape(head_dim)
        print(f"head dim {head_dim} ({heads} heads, {block_m} queries x {block_n} keys a step)")
        for seqlen in SEQLENS:
            groups = (16384 // seqlen) * heads
            n_blocks, cost = blocks(seqlen, groups, block_m, block_n, args.block_cost)
            balanced = sum(cost.values()) / args.sms
            cells = []
            for name in ("key_order", "tail", "interleave"):
                end, alone = simulate(launch_order(name, n_blocks, groups, args.sms), cost, args.sms)
                cells.append(f"{name} {end / balanced:.3f} ({alone:.2f})")
            print(f"  {seqlen:6d} keys: " + "  ".join(cells))


if __name__ == "__main__":
    main()
