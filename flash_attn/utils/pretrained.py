"""Loading a checkpoint's state dict from a local folder or the Hugging Face Hub, as upstream
flash-attn 2.8.3's flash_attn.utils.pretrained.state_dict_from_pretrained.

huggingface_hub (Hub downloads) and safetensors (.safetensors files) are imported when a call
needs them, so importing this module needs neither.
"""

import json
import os

import torch

__all__ = ["state_dict_from_pretrained"]

WEIGHTS_NAME = "pytorch_model.bin"
WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

# The checkpoint layouts in the order they are looked for: (file name, sharded, safetensors).
_LAYOUTS = (
    (WEIGHTS_NAME, False, False),
    (WEIGHTS_INDEX_NAME, True, False),
    (SAFE_WEIGHTS_NAME, False, True),
    (SAFE_WEIGHTS_INDEX_NAME, True, True),
)


def _require(package, purpose):
    try:
        return __import__(package, fromlist=["_"])
    except ImportError as e:
        raise ImportError(
            f"state_dict_from_pretrained needs the '{package}' package {purpose}; "
            f"install it with `pip install {package.split('.')[0].replace('_', '-')}`"
        ) from e


def _hub_file(model_name, filename):
    """Local path of filename in the Hub repository model_name (downloaded into the Hugging
    Face cache), or None where the repository lacks that file."""
    hub = _require("huggingface_hub", "to download checkpoints from the Hugging Face Hub")
    hub_errors = _require("huggingface_hub.errors", "to download checkpoints from the Hugging Face Hub")
    try:
        return hub.hf_hub_download(model_name, filename)
    except hub_errors.EntryNotFoundError:
        return None


def _resolve(model_name, filename):
    if os.path.isdir(model_name):
        path = os.path.join(model_name, filename)
        return path if os.path.isfile(path) else None
    return _hub_file(model_name, filename)


def _load_file(path, safetensors_format, device):
    if safetensors_format:
        safetensors_torch = _require("safetensors.torch", "to read .safetensors checkpoints")
        return safetensors_torch.load_file(path, device="cpu" if device is None else str(device))
    return torch.load(path, map_location=device, weights_only=True)


def state_dict_from_pretrained(model_name, device=None, dtype=None):
    """The state dict of the checkpoint model_name: a local folder, or else a Hugging Face Hub
    repository id. The first of pytorch_model.bin, its sharded index, model.safetensors and its
    sharded index that exists is read (every shard of a sharded one).

    device: where the tensors end up (None: where the files load them, the CPU).
    dtype: converts every tensor to it; for a dtype other than float32 the files are read to the
        CPU and converted before the move to device, which saves device memory.
    Raises EnvironmentError when no checkpoint file is found.
    """
    load_device = device if dtype in (None, torch.float32) else "cpu"
    for filename, sharded, safetensors_format in _LAYOUTS:
        resolved = _resolve(model_name, filename)
        if resolved is None:
            continue
        if sharded:
            with open(resolved) as f:
                shard_names = sorted(set(json.load(f)["weight_map"].values()))
            shard_paths = [_resolve(model_name, name) for name in shard_names]
            missing = [n for n, p in zip(shard_names, shard_paths) if p is None]
            if missing:
                raise EnvironmentError(f"{model_name}: the index {filename} names missing shards {missing}")
        else:
            shard_paths = [resolved]
        state_dict = {}
        for path in shard_paths:
            state_dict.update(_load_file(path, safetensors_format, load_device))
        if dtype is not None:
            state_dict = {k: v.to(dtype=dtype) for k, v in state_dict.items()}
        return {k: v.to(device=device) for k, v in state_dict.items()}
    raise EnvironmentError(f"Model name {model_name} was not found.")
