"""AMP decorators for autograd Functions, as upstream flash-attn 2.8.3 exports them.

torch.amp.custom_fwd / custom_bwd (torch >= 2.4) take a device_type and deprecate the
torch.cuda.amp versions; these wrappers fix device_type to "cuda", so code written against
torch.cuda.amp's decorators (`@custom_fwd`, `@custom_fwd(cast_inputs=torch.float16)`) runs
unchanged on either torch.
"""

import functools

import torch

__all__ = ["custom_fwd", "custom_bwd"]

_TORCH_AMP_HAS_DECORATORS = hasattr(torch.amp, "custom_fwd")

if _TORCH_AMP_HAS_DECORATORS:
    from torch.amp import custom_bwd as _amp_custom_bwd
    from torch.amp import custom_fwd as _amp_custom_fwd
else:
    from torch.cuda.amp import custom_bwd as _amp_custom_bwd
    from torch.cuda.amp import custom_fwd as _amp_custom_fwd


def _on_cuda(amp_decorator):
    @functools.wraps(amp_decorator)
    def decorator(*args, **kwargs):
        if _TORCH_AMP_HAS_DECORATORS:
            kwargs["device_type"] = "cuda"
        return amp_decorator(*args, **kwargs)

    return decorator


custom_fwd = _on_cuda(_amp_custom_fwd)
custom_bwd = _on_cuda(_amp_custom_bwd)
