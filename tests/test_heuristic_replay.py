"""The split heuristic replayed against measured sweeps (CPU only): for every cell of the committed
H100 sweeps (benchmarks/results/splits_sweep*_h100.json, written by
benchmarks/sweep_num_splits.py), the split count the heuristic picks today is looked up among the
measured times. A change to the heuristic that would have lost time on the card shows here before
a GPU run: regret (time of the pick / best time) <= 1.05 in at least 95% of the cells (issue 5's
bar for the contiguous grid, and the same for the paged sweep, whose cells get the same plan as
contiguous K/V)."""

import json
import os

import pytest

flash_attn = pytest.importorskip("flash_attn")
pytest.importorskip("flash_attn_2_cuda")

RESULTS = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results")
SWEEPS = {"contiguous": "splits_sweep_h100.json", "paged16": "splits_sweep_paged16_h100.json"}
H100_SMS = 132


def rows(name):
    path = os.path.join(RESULTS, SWEEPS[name])
    if not os.path.exists(path):
        pytest.skip(f"{path} not present")
    with open(path) as f:
        data = json.load(f)
    return data["rows"] if isinstance(data, dict) else data


def pick_time(row, splits):
    # An explicit num_splits=1 runs upstream's unsplit kernel; the heuristic's single split runs the
    # decode kernel: its time is the cell's auto time when the sweep's heuristic also chose 1.
    if splits == 1:
        return row["auto_us"] if row["auto_splits"] == 1 else None
    return row["times_us"].get(str(splits))


@pytest.mark.parametrize("name", list(SWEEPS))
def test_heuristic_regret_on_measured_sweep(name):
    regrets = []
    for row in rows(name):
        splits = flash_attn.num_splits_heuristic(row["batch"], row["heads"], row["kv_heads"], 1, row["seqlen_k"],
                                                 128, num_sms=H100_SMS)
        t = pick_time(row, splits)
        if t is not None:
            regrets.append((t / row["best_us"], row, splits))
    known = len(regrets)
    assert known >= 0.9 * len(rows(name)), f"only {known} of the cells' picks were measured"
    good = sum(r <= 1.05 for r, _, _ in regrets)
    worst = max(regrets, key=lambda x: x[0])
    assert good >= 0.95 * known, (
        f"{name}: regret <= 1.05 in {good}/{known} cells; worst {worst[0]:.3f} at "
        f"b{worst[1]['batch']} s{worst[1]['seqlen_k']} {worst[1]['heads']}/{worst[1]['kv_heads']} with {worst[2]} splits")
