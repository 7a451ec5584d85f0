"""gloo process groups on CPU for the tensor-parallel tests: one rank in this process, or several
spawned ranks that each run a module-level worker function."""

import contextlib

import torch.distributed as dist
import torch.multiprocessing as mp
import pytest


@contextlib.contextmanager
def single_rank_group():
    """The default group of a one-rank world, torn down afterwards."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    if dist.is_initialized():
        pytest.skip("a default process group already exists")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def _rank_entry(rank, worker, world_size, init_file, args):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        worker(rank, dist.group.WORLD, *args)
    finally:
        dist.destroy_process_group()


def run_on_ranks(worker, world_size, tmp_path, *args):
    """Runs worker(rank, group, *args) on world_size spawned ranks; a failure on any rank fails
    the caller. worker must be a module-level function (it is pickled by name)."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    mp.spawn(_rank_entry, args=(worker, world_size, str(tmp_path / "init"), args), nprocs=world_size)
