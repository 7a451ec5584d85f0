"""Device checks shared by the Triton kernels of flash_attn.ops.triton.

Triton compiles for CUDA devices; CPU tensors work only under Triton's interpreter
(TRITON_INTERPRET=1), which runs the same kernels in numpy for testing.
"""

import contextlib
import os

import torch


def check_device(*tensors):
    """Raises a readable error instead of Triton's pointer error for tensors it cannot reach."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    for device in devices:
        if device.type != "cuda" and not interpreted:
            raise ValueError(
                f"flash_attn Triton kernels need CUDA tensors, got a tensor on {device} "
                "(CPU tensors run only under TRITON_INTERPRET=1)"
            )


def device_guard(tensor):
    """Makes the tensor's GPU current, so Triton launches on it and not on cuda:0."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()
