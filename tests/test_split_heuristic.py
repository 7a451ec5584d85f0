"""The split-KV heuristic (CPU only; a pure function of the shapes, runs in CI without a GPU).

flash_attn.num_splits_heuristic(batch, nheads, nheads_k, seqlen_q, seqlen_k, headdim,
num_sms=132, num_splits=0) returns the number of KV splits the dispatcher would use.
"""

import math

import pytest

flash_attn_gpu = pytest.importorskip("flash_attn_2_cuda")
flash_attn = pytest.importorskip("flash_attn")

SMS = 132  # H100 SXM


def nsplits(batch, nheads, nheads_k, seqlen_q, seqlen_k, headdim, num_sms=SMS, num_splits=0):
    n = flash_attn.num_splits_heuristic(
        batch, nheads, nheads_k, seqlen_q, seqlen_k, headdim, num_sms=num_sms, num_splits=num_splits
    )
    assert isinstance(n, int)
    return n


def key_blocks_64(seqlen_k):
    return max(1, math.ceil(seqlen_k / 64))


@pytest.mark.parametrize("seqlen_k", [2048, 8192, 32768])
def test_batch1_mha_decode_splits(seqlen_k):
    assert nsplits(1, 12, 12, 1, seqlen_k, 128) >= 4


@pytest.mark.parametrize("seqlen_k", [4096, 8192, 32768])
def test_batch1_gqa_decode_splits(seqlen_k):
    assert nsplits(1, 32, 8, 1, seqlen_k, 128) > 1


def test_mqa_decode_splits():
    assert nsplits(1, 8, 1, 1, 16384, 128) > 1


@pytest.mark.parametrize("seqlen_k", [2048, 4096])
def test_partial_last_wave_no_split(seqlen_k):
    # 192 single-split blocks are 1.45 waves on 132 SMs; the 60 blocks of the last wave each get a
    # larger share of the bandwidth, so this beats 3 full waves of 2 splits (H100: 73.2 against
    # 76.7 us at 2048 keys).
    assert nsplits(16, 12, 12, 1, seqlen_k, 128) == 1


@pytest.mark.parametrize("seqlen_k", [8192, 32768])
def test_long_partial_last_wave_splits(seqlen_k):
    # The same grid with long keys: how fast the 60 blocks of the last wave stream depends on the
    # card, so 2 splits fill the waves (2.9 waves of 384 blocks).
    assert nsplits(16, 12, 12, 1, seqlen_k, 128) == 2


def test_full_gpu_no_split():
    # batch * heads already fills the GPU many times over.
    assert nsplits(128, 32, 32, 1, 8192, 128) == 1
    assert nsplits(64, 32, 8, 1, 8192, 128) == 1


@pytest.mark.parametrize("seqlen_q", [2, 16, 128, 4096])
def test_requested_one_never_splits(seqlen_q):
    # num_splits=1 is upstream's unsplit kernel for every query length.
    assert nsplits(1, 12, 12, seqlen_q, 8192, 128, num_splits=1) == 1


@pytest.mark.parametrize("seqlen_k", [1, 100, 8192, 32768])
def test_requested_one_is_one(seqlen_k):
    assert nsplits(1, 12, 12, 1, seqlen_k, 128, num_splits=1) == 1


@pytest.mark.parametrize("requested", [2, 3, 7, 8, 16, 200])
@pytest.mark.parametrize("seqlen_k", [1, 63, 129, 1000, 4097, 32768])
def test_requested_n_is_clamped(seqlen_k, requested):
    n = nsplits(2, 16, 16, 1, seqlen_k, 128, num_splits=requested)
    assert 1 <= n <= min(requested, 128)
    assert n <= key_blocks_64(seqlen_k)


def test_requested_n_honoured_for_long_keys():
    assert nsplits(1, 12, 12, 1, 32768, 128, num_splits=8) == 8
    assert nsplits(4, 32, 8, 1, 32768, 64, num_splits=8) == 8


@pytest.mark.parametrize("headdim", [32, 64, 96, 128, 192, 256])
def test_tiny_seqlen_k(headdim):
    assert nsplits(1, 12, 12, 1, 1, headdim) == 1


@pytest.mark.parametrize("num_sms", [1, 16, 108, 132])
@pytest.mark.parametrize("headdim", [32, 64, 128, 256])
@pytest.mark.parametrize("seqlen_k", [1, 7, 64, 65, 1000, 8192, 65536, 262144])
@pytest.mark.parametrize("batch,nheads,nheads_k", [(1, 1, 1), (1, 12, 12), (2, 32, 8), (3, 8, 1), (512, 64, 8)])
def test_sanity_bounds(batch, nheads, nheads_k, seqlen_k, headdim, num_sms):
    n = nsplits(batch, nheads, nheads_k, 1, seqlen_k, headdim, num_sms=num_sms)
    assert 1 <= n <= 128
    assert n <= key_blocks_64(seqlen_k)


@pytest.mark.parametrize("headdim", [64, 128, 256])
def test_more_keys_more_splits_batch1(headdim):
    # Monotonic-ish: a long KV sequence gets at least as many splits as a short one.
    short = nsplits(1, 12, 12, 1, 128, headdim)
    long = nsplits(1, 12, 12, 1, 65536, headdim)
    assert long >= short
    assert long >= 4


def test_pure_and_matches_extension():
    args = (1, 12, 12, 1, 8192, 128, SMS, 0)
    a = flash_attn.num_splits_heuristic(*args[:6], num_sms=SMS, num_splits=0)
    b = flash_attn.num_splits_heuristic(*args[:6], num_sms=SMS, num_splits=0)
    c = flash_attn_gpu.num_splits_heuristic(*args)
    assert a == b == c


def plan(batch, nheads, nheads_k, seqlen_q, seqlen_k, headdim=128, num_splits=0):
    return flash_attn_gpu.forward_plan(batch, nheads, nheads_k, seqlen_q, seqlen_k, headdim, SMS, num_splits)


def cluster_merge(batch, nheads, nheads_k, seqlen_q, seqlen_k, headdim=128, num_splits=0):
    return plan(batch, nheads, nheads_k, seqlen_q, seqlen_k, headdim, num_splits)["cluster_merge"]


def test_plan_agrees_with_the_heuristic():
    for args in ((1, 12, 12, 1, 8192), (16, 32, 8, 4, 16384), (2, 16, 16, 1024, 4096)):
        for requested in (0, 1, 3):
            p = plan(*args, num_splits=requested)
            assert p["num_splits"] == nsplits(*args, 128, num_splits=requested)
            assert p["decode_kernel"] <= p["split_kernel"]


def test_plan_kernel_choice():
    # One query of 32 / 8 heads: the group's 4 heads become 4 rows of the 16-row decode tile.
    p = plan(1, 32, 8, 1, 8192)
    assert p["swap_seqlen_ngroups"] and (p["seqlen_q"], p["num_heads"]) == (4, 8) and p["decode_kernel"]
    # An explicit num_splits = 1 keeps upstream's unsplit kernel.
    assert not plan(1, 12, 12, 4, 8192, num_splits=1)["split_kernel"]
    # An explicit 3 over one 128-key split block is one split: the unsplit kernel, as upstream.
    p = plan(1, 12, 12, 32, 100, num_splits=3)
    assert p["num_splits"] == 1 and not p["split_kernel"]
    # Many query rows: no split kernel unless the Hopper prefill splits take them.
    assert not plan(4, 16, 16, 2048, 4096)["split_kernel"]


@pytest.mark.parametrize("nheads,nheads_k", [(12, 12), (32, 8), (32, 32)])
def test_cluster_merge_at_batch1(nheads, nheads_k):
    # Batch 1 with 2..8 splits fits in one block per SM: merged inside a thread-block cluster.
    n = nsplits(1, nheads, nheads_k, 1, 2048, 128)
    assert 2 <= n <= 8
    assert cluster_merge(1, nheads, nheads_k, 1, 2048)


def test_no_cluster_merge_beyond_one_wave_of_clusters():
    # 384 blocks (an explicit 2 splits of b16 12/12): the combine kernel merges.
    assert not cluster_merge(16, 12, 12, 1, 2048, num_splits=2)
    # 128 blocks in clusters of 4 do not all fit at once on 132 SMs (clusters pack per GPC).
    assert not cluster_merge(1, 32, 32, 1, 8192, num_splits=4)
    assert cluster_merge(1, 32, 32, 1, 8192, num_splits=3)


@pytest.mark.parametrize("requested", [1, 9, 16])
def test_no_cluster_merge_outside_2_to_8_splits(requested):
    assert not cluster_merge(1, 4, 4, 1, 32768, num_splits=requested)
    assert cluster_merge(1, 4, 4, 1, 32768, num_splits=8)


def test_no_cluster_merge_without_decode_kernel():
    # 128 query rows run on the 64-row split kernel: partials and the combine kernel.
    assert not cluster_merge(1, 4, 4, 128, 32768, num_splits=4)


# A few queries per sequence (speculative verification, chunked decode): one query tile holds
# every row of a (batch, head), so the grid is batch x heads blocks and splits pay as at decode.
@pytest.mark.parametrize("seqlen_q", [2, 4, 8, 16])
@pytest.mark.parametrize("heads", [(12, 12), (32, 8)])
@pytest.mark.parametrize("seqlen_k", [8192, 32768])
def test_small_seqlen_q_splits_at_batch1(seqlen_q, heads, seqlen_k):
    assert nsplits(1, heads[0], heads[1], seqlen_q, seqlen_k, 128) >= 4


@pytest.mark.parametrize("seqlen_q", [2, 8, 16, 64])
def test_small_seqlen_q_plan_matches_decode_rule(seqlen_q):
    # The same cost model as one query: a grid of batch x heads blocks over the same key blocks.
    for batch, seqlen_k in [(1, 4096), (4, 16384), (16, 32768)]:
        n = nsplits(batch, 12, 12, seqlen_q, seqlen_k, 128)
        assert 1 <= n <= 128
        if batch * 12 >= 2 * SMS:
            assert n <= 2


def packed_heads(groups, seqlen_q):
    """Query heads per kernel head: the whole group where its rows fit the decode kernel's 16, else
    the largest part of it (>= 2 heads) whose rows do, else the whole group in the split tile."""
    if groups * seqlen_q <= 16:
        return groups
    parts = [p for p in range(2, groups) if groups % p == 0 and p * seqlen_q <= 16]
    return max(parts, default=groups)


@pytest.mark.parametrize("seqlen_q", [2, 3, 4, 5, 8, 9, 16, 33])
def test_packed_gqa_plans_as_its_kernel_heads(seqlen_q):
    # Where query heads of a group pack with their queries into one tile (heads per kv head x
    # seqlen_q <= 64 rows), the grid is batch x (heads / packed heads) tiles of those rows, and
    # the parts of one group share their K/V.
    for batch in (1, 4, 16):
        for seqlen_k in (4096, 16384, 32768):
            for nheads, nheads_k in ((32, 8), (12, 4), (16, 2)):
                groups = nheads // nheads_k
                p = plan(batch, nheads, nheads_k, seqlen_q, seqlen_k)
                if groups * seqlen_q <= 64:
                    g = packed_heads(groups, seqlen_q)
                    assert (p["pack_groups"], p["seqlen_q"], p["num_heads"]) == (g, g * seqlen_q, nheads // g)
                    assert p["decode_kernel"] == (g * seqlen_q <= 16)
                    if g == groups:  # the same grid as kv heads with the packed rows as queries
                        assert p["num_splits"] == nsplits(batch, nheads_k, nheads_k, g * seqlen_q, seqlen_k, 128)
                else:
                    assert p["pack_groups"] == 1
                assert nsplits(batch, nheads, nheads_k, seqlen_q, seqlen_k, 128, num_splits=1) == 1


def test_group_parts_fill_the_decode_tile():
    # 8 queries of 4 heads a group would be 32 rows of the split tile: two heads' 16 rows run the
    # decode kernel instead, and 16 queries (no part of two heads fits) the split tile's 64 rows.
    assert plan(1, 32, 8, 8, 4096)["pack_groups"] == 2 and plan(1, 32, 8, 8, 4096)["decode_kernel"]
    assert plan(1, 16, 2, 5, 4096)["pack_groups"] == 2  # 8 heads a group: 3 x 5 rows would fit, 3 does not divide 8
    assert plan(1, 12, 4, 9, 4096)["pack_groups"] == 3 and not plan(1, 12, 4, 9, 4096)["decode_kernel"]
    assert plan(1, 32, 8, 16, 4096)["pack_groups"] == 4 and not plan(1, 32, 8, 16, 4096)["decode_kernel"]


@pytest.mark.parametrize("num_splits", [0, 2, 3, 8])
@pytest.mark.parametrize("seqlen_k", [1, 63, 100, 128, 129, 4096])
@pytest.mark.parametrize("heads,seqlen_q", [((32, 8), 2), ((32, 8), 4), ((6, 2), 16), ((32, 8), 8), ((32, 8), 16)])
def test_packed_rows_run_the_decode_or_split_kernel(heads, seqlen_q, seqlen_k, num_splits):
    # Only the decode and split kernels read rows through the packed map, so a packed plan runs one
    # of them even where an explicit num_splits is cut to the one key block there is.
    p = plan(1, heads[0], heads[1], seqlen_q, seqlen_k, num_splits=num_splits)
    g = packed_heads(heads[0] // heads[1], seqlen_q)
    assert p["pack_groups"] == g and (p["seqlen_q"], p["num_heads"]) == (g * seqlen_q, heads[0] // g)
    assert p["split_kernel"] and not p["prefill_splits"]
    assert p["decode_kernel"] == (g * seqlen_q <= 16)
    assert plan(1, heads[0], heads[1], seqlen_q, seqlen_k, num_splits=1)["pack_groups"] == 1


# Fastest explicit num_splits on an H100 (132 SMs) for packed 32 / 8 heads, 16 queries (64 rows of
# the split kernel's tile), fp16, head dim 128, causal (benchmarks/NOTES.md item 135).
SPLIT_TILE_FASTEST = [(1, 4096, 13), (4, 4096, 4), (1, 16384, 12), (4, 16384, 4)]


@pytest.mark.parametrize("batch,seqlen_k,fastest", SPLIT_TILE_FASTEST)
def test_split_tile_plans_near_the_fastest_count(batch, seqlen_k, fastest):
    # The split tile streams slower per block than the decode kernel, so it takes more blocks to
    # saturate DRAM: a plan from the decode kernel's rate took about half the fastest count.
    n = nsplits(batch, 32, 8, 16, seqlen_k, 128)
    assert 0.7 * fastest <= n <= 1.3 * fastest


def test_small_seqlen_q_full_gpu_no_split():
    assert nsplits(128, 32, 32, 4, 8192, 128) == 1


def test_long_queries_never_split_by_heuristic():
    # Past the split tile's 64 rows the grid has query tiles to spread; upstream's unsplit kernel
    # (on the SM80 kernels: the Hopper forward's plan is below).
    assert nsplits(1, 12, 12, 65, 32768, 128) == 1
    assert nsplits(1, 12, 12, 4096, 32768, 128) == 1


def sm90_splits(batch, nheads, nheads_k, seqlen_q, seqlen_k, headdim=128, num_splits=0, causal=False):
    """The plan where the Hopper forward can take the call (sm90_prefill)."""
    return flash_attn_gpu.num_splits_heuristic(batch, nheads, nheads_k, seqlen_q, seqlen_k, headdim, SMS, num_splits,
                                               True, causal)


@pytest.mark.parametrize("headdim", [64, 128, 256])
@pytest.mark.parametrize("seqlen_q", [65, 256, 512])
def test_sm90_long_keys_small_grid_split(seqlen_q, headdim):
    # A few 128-row tiles over many key blocks: most SMs would idle for the whole call.
    n = sm90_splits(1, 8, 8, seqlen_q, 131072, headdim)
    tiles = 8 * math.ceil(seqlen_q / 128)
    assert n > 1
    assert tiles * n <= 2 * SMS  # no more units than two waves


@pytest.mark.parametrize("batch,nheads,seqlen_q,seqlen_k", [(4, 16, 2048, 2048), (1, 32, 1024, 65536),
                                                           (1, 12, 4096, 32768), (2, 8, 128, 1024)])
def test_sm90_full_grid_or_short_keys_no_split(batch, nheads, seqlen_q, seqlen_k):
    # At least a wave of tiles, or too few key blocks to pay for the partials and the combine.
    assert sm90_splits(batch, nheads, nheads, seqlen_q, seqlen_k) == 1


def test_sm90_plan_keeps_short_queries_and_explicit_counts():
    # Up to 64 query rows the split / decode kernels' plan holds; an explicit count is kept.
    assert sm90_splits(1, 12, 12, 1, 32768) == nsplits(1, 12, 12, 1, 32768, 128)
    assert sm90_splits(1, 12, 12, 64, 32768) == nsplits(1, 12, 12, 64, 32768, 128)
    assert sm90_splits(1, 8, 8, 512, 131072, num_splits=1) == 1
    assert sm90_splits(1, 8, 8, 512, 131072, num_splits=5) == 5


@pytest.mark.parametrize("headdim", [64, 128, 256])
def test_sm90_more_keys_no_fewer_splits(headdim):
    assert sm90_splits(1, 4, 4, 256, 65536, headdim) >= sm90_splits(1, 4, 4, 256, 8192, headdim)


@pytest.mark.parametrize("seqlen_q", [2, 16])
def test_small_seqlen_q_explicit_splits_kept(seqlen_q):
    assert nsplits(1, 12, 12, seqlen_q, 32768, 128, num_splits=1) == 1
    assert nsplits(1, 12, 12, seqlen_q, 32768, 128, num_splits=7) == 7


# The fastest count of 1-32 splits on an H100 (2026-12-06, sweep_num_splits.py --grid prefill at
# commit 8fa1aa5; b1, 16 / 4 heads, head dim 128; at 1024 causal queries over 32k keys 2 and 4
# splits tie).
SWEEP_FASTEST = [
    (65, 8192, False, 8), (65, 32768, False, 8), (65, 131072, False, 8),
    (256, 8192, False, 4), (256, 32768, False, 4), (256, 131072, False, 4),
    (1024, 8192, False, 1), (1024, 32768, False, 1), (1024, 131072, False, 1),
    (65, 8192, True, 8), (65, 32768, True, 8), (65, 131072, True, 8),
    (256, 8192, True, 8), (256, 32768, True, 8), (256, 131072, True, 8),
    (1024, 8192, True, 2), (1024, 32768, True, 2), (1024, 131072, True, 2),
]


@pytest.mark.parametrize("seqlen_q,seqlen_k,causal,fastest", SWEEP_FASTEST)
def test_sm90_plan_matches_the_sweep(seqlen_q, seqlen_k, causal, fastest):
    assert sm90_splits(1, 16, 4, seqlen_q, seqlen_k, causal=causal) == fastest


def test_sm90_causal_pairs_split_more():
    # Under a causal mask the Hopper forward runs query tiles in pairs: half the units, each about
    # twice the key blocks when the queries are few against the keys.
    assert sm90_splits(1, 16, 4, 256, 32768, causal=True) == 2 * sm90_splits(1, 16, 4, 256, 32768)
    # A window's left edge ends the pairing: the plan of a causal call is not a window's.
    assert sm90_splits(1, 16, 4, 256, 32768, causal=True) > 1

