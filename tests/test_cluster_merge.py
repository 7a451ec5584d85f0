"""The run-time bound of the decode cluster merge (GPU): how many thread-block clusters of the
decode kernel the device holds at once. The merged results themselves are checked by every split
test (split equals unsplit, bitwise determinism), which runs 2-8 splits of small grids merged in
clusters on sm_90 and larger ones through the combine kernel."""

import pytest
import torch

flash_attn_gpu = pytest.importorskip("flash_attn_2_cuda")


def capacity(size, head_size=128):
    return flash_attn_gpu.decode_cluster_capacity(head_size, False, size)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cluster_capacity(require_kernel):
    require_kernel(128, torch.float16)
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("thread-block clusters need sm_90 (the combine kernel merges there)")
    caps = [capacity(s) for s in range(1, 9)]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert all(c >= 1 for c in caps), caps
    assert all(a >= b for a, b in zip(caps, caps[1:])), caps  # larger clusters: no more of them
    # The head-dim-128 decode block takes more than half an SM's shared memory: one per SM.
    assert all(c * s <= sms for s, c in enumerate(caps, 1)), caps
    assert capacity(4) == caps[3]  # cached answer is the same


def test_cluster_capacity_bad_size():
    with pytest.raises(RuntimeError, match="cluster_size"):
        flash_attn_gpu.decode_cluster_capacity(128, False, 9)
