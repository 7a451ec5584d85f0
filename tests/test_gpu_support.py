"""Which GPUs a build runs on, and the error on one it does not (CPU: the capability is passed in,
as a fake of the device query the dispatcher makes once per device before any launch)."""

import pytest

flash_attn_gpu = pytest.importorskip("flash_attn_2_cuda", reason="the flash_attn_2_cuda extension is not built")
flash_attn = pytest.importorskip("flash_attn")


def built_archs():
    return [int(a) for a in flash_attn.build_info()["archs"]]


def test_pre_ampere_gpu_is_refused_with_a_named_reason():
    msg = flash_attn_gpu.unsupported_gpu_message("Tesla T4", 7, 5)
    assert "Tesla T4" in msg and "7.5" in msg and "8.0" in msg
    for arch in built_archs():
        assert f"sm_{arch}" in msg


def test_gpus_at_or_above_the_lowest_built_arch_run():
    lowest = min(built_archs())
    major, minor = divmod(max(lowest, 80), 10)
    assert flash_attn_gpu.unsupported_gpu_message("any", major, minor) == ""
    # Newer than every built arch: the embedded PTX of the lowest one is JIT-compiled.
    assert flash_attn_gpu.unsupported_gpu_message("any", 12, 0) == ""


def test_arch_left_out_of_the_build_is_refused():
    lowest = min(built_archs())
    if lowest <= 80:
        pytest.skip("this build runs on every sm_80+ GPU")
    msg = flash_attn_gpu.unsupported_gpu_message("NVIDIA A100-SXM4-80GB", 8, 0)
    assert "A100" in msg and "8.0" in msg and "FLASH_ATTN_CUDA_ARCHS" in msg
    assert f"sm_{lowest}" in msg
