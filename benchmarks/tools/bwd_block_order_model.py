#!/usr/bin/env python
"""List-scheduling model of the Hopper backward's grid under a causal mask: one thread block per SM,
each block's work the query blocks its key block sees, blocks started in launch order on the
first SM to free up. Prints, per head dim and key length of the benchmark grid (model dim 2048,
batch x seqlen = 16k), the time of one (batch, kv head) group after another ("plain") over the
time of two other orders (> 1: the other order is faster):
  chunked  every chunk of 2 x SMs / key blocks groups starts key block by key block (NOTES items
           123 and 126: refuted, a group's blocks then start up to a wave apart)
  tail     only the last such chunk does, the groups before it keep the plain order (NOTES item
           145, plan/heuristics.h's sm90_bwd_tail_groups in benchmarks/pending/sm90-bwd-causal-tail-order)
  python benchmarks/tools/bwd_block_order_model.py [--sms 132]
"""
import argparse
import heapq

# Keys per thread block and query rows per step of the Hopper backward (plan/tile_sizes.h).
BLOCK_N = {64: 128, 128: 128, 256: 64}
BLOCK_M = {64: 128, 128: 64, 256: 64}


def makespan(works, sms):
    free = [0] * sms
    for w in works:
        heapq.heappush(free, heapq.heappop(free) + w)
    return max(free)


def orders(headdim, seqlen, sms, model_dim=2048, tokens=16384):
    groups = (tokens // seqlen) * (model_dim // headdim)
    key_blocks, query_blocks = seqlen // BLOCK_N[headdim], seqlen // BLOCK_M[headdim]
    work = [max(1, query_blocks - n * BLOCK_N[headdim] // BLOCK_M[headdim]) for n in range(key_blocks)]
    plain = [work[n] for _ in range(groups) for n in range(key_blocks)]
    per_chunk = max(1, 2 * sms // key_blocks)  # item 123's heads_per_chunk
    chunked = [work[n] for first in range(0, groups, per_chunk)
               for n in range(key_blocks) for _ in range(first, min(first + per_chunk, groups))]
    tail = min(groups, -(-2 * sms // key_blocks))  # sm90_bwd_tail_groups: ceil(2 x SMs / key blocks)
    tailed = [work[n] for _ in range(groups - tail) for n in range(key_blocks)] + \
             [work[n] for n in range(key_blocks) for _ in range(tail)]
    return plain, chunked, tailed


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sms", type=int, default=132)
    args = p.parse_args()
    print("| head dim | seqlen | plain / chunked | plain / tail |\n|---|---|---|---|")
    for headdim in BLOCK_N:
        for seqlen in (512, 1024, 2048, 4096, 8192, 16384):
            plain, chunked, tailed = orders(headdim, seqlen, args.sms)
            base = makespan(plain, args.sms)
            print(f"| {headdim} | {seqlen} | {base / makespan(chunked, args.sms):.3f} | "
                  f"{base / makespan(tailed, args.sms):.3f} |")


if __name__ == "__main__":
    main()
