"""Transformer blocks with the API of flash-attn 2.8.3's flash_attn.modules.block.

Block: mixer (attention) then MLP, pre-norm or post-norm, with residual dropout and stochastic
depth. ParallelBlock: mixer and MLP side by side on the same normalized input (GPT-J, GPT-NeoX,
PaLM). With fused_dropout_add_ln=True the dropout + residual add + norm runs as one Triton kernel
(flash_attn.ops.triton.layer_norm.layer_norm_fn).
"""

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from flash_attn.modules.mha import MHA
from flash_attn.modules.mlp import Mlp

try:
    from flash_attn.ops.triton.layer_norm import LayerNorm as TritonLayerNorm
    from flash_attn.ops.triton.layer_norm import RMSNorm, layer_norm_fn
except ImportError:  # triton is not installed: only fused_dropout_add_ln needs it
    TritonLayerNorm, RMSNorm, layer_norm_fn = None, None, None


class StochasticDepth(nn.Module):
    """Stochastic depth ("drop path", https://arxiv.org/abs/1603.09382), with the semantics of
    torchvision.ops.StochasticDepth, which upstream uses (torchvision is not a dependency here).

    In training, with probability p the input is replaced by zeros, and otherwise scaled by
    1 / (1 - p). mode="row" draws one decision per entry of the first dimension (per sample),
    mode="batch" one for the whole input. In eval mode, or with p == 0, the input is returned.
    """

    def __init__(self, p, mode):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"StochasticDepth: p must be in [0, 1], got {p}")
        if mode not in ("row", "batch"):
            raise ValueError(f"StochasticDepth: mode must be 'row' or 'batch', got {mode!r}")
        self.p = p
        self.mode = mode

    def forward(self, input):
        if not self.training or self.p == 0.0:
            return input
        keep_prob = 1.0 - self.p
        if self.mode == "row":
            shape = (input.shape[0],) + (1,) * (input.ndim - 1)
        else:
            shape = (1,) * input.ndim
        keep = torch.empty(shape, dtype=input.dtype, device=input.device).bernoulli_(keep_prob)
        if keep_prob > 0.0:
            keep.div_(keep_prob)
        return input * keep

    def extra_repr(self):
        return f"p={self.p}, mode={self.mode}"


def _check_fusable(norm, dropout, norm_arg, dropout_arg):
    """The fused kernel reads the norm's weight, bias and eps, and applies plain dropout."""
    if layer_norm_fn is None:
        raise ImportError(
            "fused_dropout_add_ln=True needs triton, for flash_attn.ops.triton.layer_norm; it is not installed"
        )
    fusable_norms = (nn.LayerNorm, TritonLayerNorm, RMSNorm)
    if not isinstance(norm, fusable_norms) or norm.weight is None:
        raise TypeError(
            f"fused_dropout_add_ln=True needs {norm_arg} to build torch.nn.LayerNorm (with its affine weight) "
            f"or flash_attn.ops.triton.layer_norm.LayerNorm / RMSNorm; got {type(norm).__name__}"
        )
    if not isinstance(dropout, nn.Dropout):
        raise TypeError(
            f"fused_dropout_add_ln=True needs {dropout_arg} to build torch.nn.Dropout; got {type(dropout).__name__}"
        )


def _fused_norm(x, norm, residual, dropout_p=0.0, rowscale=None, prenorm=False, residual_in_fp32=False,
                out_dtype=None):
    """norm(dropout(x * rowscale) + residual) in one kernel; with prenorm also the sum."""
    return layer_norm_fn(
        x,
        norm.weight,
        norm.bias,
        residual=residual,
        eps=norm.eps,
        dropout_p=dropout_p,
        rowscale=rowscale,
        prenorm=prenorm,
        residual_in_fp32=residual_in_fp32,
        # The Triton norm modules can store their weight as weight - 1; the kernel must know.
        zero_centered_weight=getattr(norm, "zero_centered_weight", False),
        is_rms_norm=RMSNorm is not None and isinstance(norm, RMSNorm),
        out_dtype=out_dtype,
    )


def _default_layer_classes(dim, mixer_cls, mlp_cls):
    # Upstream's defaults: attention with 64-wide heads, and an MLP 4 times as wide as the model.
    # The blocks build the layers themselves, in upstream's order (parameter order and the
    # random initialisation follow it).
    mixer_cls = partial(MHA, num_heads=dim // 64) if mixer_cls is None else mixer_cls
    mlp_cls = partial(Mlp, hidden_features=4 * dim) if mlp_cls is None else mlp_cls
    return mixer_cls, mlp_cls


def _mark_norm_params(norms, sequence_parallel, mark_shared_params):
    # Tensor-parallel training code reads these flags: parameters marked _sequence_parallel get
    # their gradients all-reduced over the group, _shared_params ones are broadcast at init.
    for norm in norms:
        for p in norm.parameters():
            if sequence_parallel:
                p._sequence_parallel = True
            if mark_shared_params:
                p._shared_params = True


class Block(nn.Module):
    """One Transformer layer: a mixer (attention by default) then an MLP, each with residual
    dropout, stochastic depth and a norm.

    prenorm=True: forward(hidden_states, residual) computes
        residual = drop_path1(dropout1(hidden_states)) + residual   (just the first term when
                                                                     residual is None)
        hidden_states = mixer(norm1(residual))
        residual = drop_path2(dropout2(hidden_states)) + residual
        hidden_states = mlp(norm2(residual))
    and returns (hidden_states, residual): the dropout + add that conventionally closes a pre-norm
    layer opens the next one here, right before that layer's norm, so the three fuse into one
    kernel (fused_dropout_add_ln). The first block gets residual=None; after the last block, the caller
    applies the final dropout + add + norm itself. residual_in_fp32 keeps the residual stream in
    float32.

    prenorm=False (post-norm, as in BERT): forward(hidden_states) computes
        hidden_states = norm1(drop_path1(dropout1(mixer(hidden_states))) + hidden_states)
        hidden_states = norm2(drop_path2(dropout2(mlp(hidden_states))) + hidden_states)
    and returns hidden_states. With return_residual=True the mixer and mlp return
    (output, their input) and that input is the one added back.

    mixer_cls / mlp_cls: callables taking dim (default: MHA with dim // 64 heads, and Mlp with a
    4 * dim hidden layer). An mlp that is nn.Identity skips the second half (no dropout2,
    drop_path2 or norm2 are built).
    sequence_parallel / mark_shared_params: flag the norm parameters for tensor-parallel training
    (p._sequence_parallel, p._shared_params).
    """

    def __init__(
        self,
        dim,
        mixer_cls=None,
        mlp_cls=None,
        norm_cls=nn.LayerNorm,
        dropout_cls=nn.Dropout,
        prenorm=True,
        resid_dropout1=0.0,
        resid_dropout2=0.0,
        drop_path1=0.0,
        drop_path2=0.0,
        fused_dropout_add_ln=False,
        return_residual=False,
        residual_in_fp32=False,
        sequence_parallel=False,
        mark_shared_params=False,
    ):
        super().__init__()
        if residual_in_fp32 and not prenorm:
            raise ValueError("residual_in_fp32=True needs prenorm=True (a post-norm block keeps no residual stream)")
        self.prenorm = prenorm
        self.fused_dropout_add_ln = fused_dropout_add_ln
        self.return_residual = return_residual
        self.residual_in_fp32 = residual_in_fp32
        mixer_cls, mlp_cls = _default_layer_classes(dim, mixer_cls, mlp_cls)
        self.mixer = mixer_cls(dim)
        self.dropout1 = dropout_cls(resid_dropout1)
        self.drop_path1 = StochasticDepth(drop_path1, mode="row")
        self.norm1 = norm_cls(dim)
        self.mlp = mlp_cls(dim)
        norms = [self.norm1]
        if self._has_mlp():
            self.dropout2 = dropout_cls(resid_dropout2)
            self.drop_path2 = StochasticDepth(drop_path2, mode="row")
            self.norm2 = norm_cls(dim)
            norms.append(self.norm2)
        if fused_dropout_add_ln:
            _check_fusable(self.norm1, self.dropout1, "norm_cls", "dropout_cls")
        _mark_norm_params(norms, sequence_parallel, mark_shared_params)

    def _has_mlp(self):
        return not isinstance(self.mlp, nn.Identity)

    def allocate_inference_cache(self, batch_size, max_seqlen, dtype=None, **kwargs):
        return self.mixer.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype, **kwargs)

    def _add_then_norm(self, x, residual, dropout, drop_path, norm):
        """Pre-norm step: (norm(new residual), new residual), new residual = drop_path(dropout(x))
        + residual."""
        if self.fused_dropout_add_ln:
            return _fused_norm(
                x,
                norm,
                residual,
                dropout_p=dropout.p if self.training else 0.0,
                rowscale=self._rowscale(x, drop_path),
                prenorm=True,
                residual_in_fp32=self.residual_in_fp32,
            )
        dropped = drop_path(dropout(x))
        residual = dropped if residual is None else dropped + residual
        normed = norm(residual.to(dtype=norm.weight.dtype))
        if self.residual_in_fp32:
            residual = residual.to(torch.float32)
        return normed, residual

    def _norm_of_sum(self, out, skip, dropout, drop_path, norm):
        """Post-norm step: norm(drop_path(dropout(out)) + skip)."""
        if self.fused_dropout_add_ln:
            return _fused_norm(
                out,
                norm,
                skip,
                dropout_p=dropout.p if self.training else 0.0,
                rowscale=self._rowscale(out, drop_path),
            )
        return norm((drop_path(dropout(out)) + skip).to(dtype=norm.weight.dtype))

    def _rowscale(self, x, drop_path):
        # Stochastic depth keeps or drops whole samples; the kernel takes that as one scale per
        # row (token), drawn here per sample and repeated over its tokens.
        if not self.training or drop_path.p == 0.0:
            return None
        return drop_path(torch.ones(x.shape[:-1], device=x.device, dtype=x.dtype))

    def forward(self, hidden_states, residual=None, mixer_subset=None, mixer_kwargs=None):
        """
        hidden_states: (batch, seqlen, dim). With prenorm, the previous block's output (or the
            embeddings, for the first block); with post-norm, the layer input.
        residual: prenorm only: the previous block's residual, None for the first block.
        mixer_subset: prenorm only: passed to the mixer as mixer_subset=..., which selects the
            query positions it computes (e.g. the CLS token of a ViT's last layer); the residual is
            sliced with [:, mixer_subset] to match.
        mixer_kwargs: extra keyword arguments of the mixer (not modified).
        Returns (hidden_states, residual) with prenorm, hidden_states otherwise.
        """
        mixer_kwargs = dict(mixer_kwargs) if mixer_kwargs is not None else {}
        if self.prenorm:
            hidden_states, residual = self._add_then_norm(
                hidden_states, residual, self.dropout1, self.drop_path1, self.norm1
            )
            if mixer_subset is not None:
                mixer_kwargs["mixer_subset"] = mixer_subset
            hidden_states = self.mixer(hidden_states, **mixer_kwargs)
            if mixer_subset is not None:
                residual = residual[:, mixer_subset]
            if self._has_mlp():
                hidden_states, residual = self._add_then_norm(
                    hidden_states, residual, self.dropout2, self.drop_path2, self.norm2
                )
                hidden_states = self.mlp(hidden_states)
            return hidden_states, residual

        if residual is not None:
            raise ValueError("residual must be None with prenorm=False: a post-norm block adds its own input back")
        if mixer_subset is not None:
            raise ValueError(
                "mixer_subset is only used with prenorm=True; pass it to a post-norm block's mixer in mixer_kwargs"
            )
        mixer_out = self.mixer(hidden_states, **mixer_kwargs)
        if self.return_residual:
            mixer_out, hidden_states = mixer_out
        hidden_states = self._norm_of_sum(mixer_out, hidden_states, self.dropout1, self.drop_path1, self.norm1)
        if self._has_mlp():
            mlp_out = self.mlp(hidden_states)
            if self.return_residual:
                mlp_out, hidden_states = mlp_out
            hidden_states = self._norm_of_sum(mlp_out, hidden_states, self.dropout2, self.drop_path2, self.norm2)
        return hidden_states


class ParallelBlock(nn.Module):
    """Mixer and MLP side by side (GPT-J, GPT-NeoX, PaLM), pre-norm:

        residual = dropout1(hidden_states1) + dropout2(hidden_states2) + residual
                   (terms that are None are left out)
        hidden_states1 = mixer(norm1(residual))
        hidden_states2 = mlp(norm2(residual))       (norm1 when tied_norm)

    forward returns (hidden_states1, hidden_states2, residual); the next block adds both outputs
    into the residual, so dropout, add and norm fuse into one kernel (fused_dropout_add_ln). The
    first block gets hidden_states2=None and residual=None. residual_in_fp32 keeps the residual
    stream in float32. mixer_cls, mlp_cls, sequence_parallel, mark_shared_params: as in Block.

    With fused_dropout_add_ln, both inputs are dropped out with probability resid_dropout1, as
    upstream's fused path does. The Triton kernel here takes one input and one norm, so
    hidden_states2's dropout and add run in PyTorch before it, and an untied norm2 is a second
    kernel call on the residual it returns.
    """

    def __init__(
        self,
        dim,
        mixer_cls=None,
        mlp_cls=None,
        norm_cls=nn.LayerNorm,
        dropout_cls=nn.Dropout,
        resid_dropout1=0.0,
        resid_dropout2=0.0,
        tied_norm=False,
        fused_dropout_add_ln=False,
        residual_in_fp32=False,
        sequence_parallel=False,
        mark_shared_params=False,
    ):
        super().__init__()
        self.tied_norm = tied_norm
        self.fused_dropout_add_ln = fused_dropout_add_ln
        self.residual_in_fp32 = residual_in_fp32
        mixer_cls, mlp_cls = _default_layer_classes(dim, mixer_cls, mlp_cls)
        self.mixer = mixer_cls(dim)
        self.dropout1 = dropout_cls(resid_dropout1)
        self.norm1 = norm_cls(dim)
        self.mlp = mlp_cls(dim)
        self.dropout2 = dropout_cls(resid_dropout2)
        norms = [self.norm1]
        if not tied_norm:
            self.norm2 = norm_cls(dim)
            norms.append(self.norm2)
        if fused_dropout_add_ln:
            _check_fusable(self.norm1, self.dropout1, "norm_cls", "dropout_cls")
        _mark_norm_params(norms, sequence_parallel, mark_shared_params)

    def allocate_inference_cache(self, batch_size, max_seqlen, dtype=None, **kwargs):
        return self.mixer.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype, **kwargs)

    def forward(self, hidden_states1, hidden_states2=None, residual=None, mixer_kwargs=None):
        """
        hidden_states1: (batch, seqlen, dim), the previous block's mixer output (or the
            embeddings, for the first block).
        hidden_states2: the previous block's MLP output; None for the first block.
        residual: the previous block's residual; None for the first block.
        mixer_kwargs: extra keyword arguments of the mixer.
        Returns (mixer output, MLP output, residual).
        """
        if self.fused_dropout_add_ln:
            normed1, normed2, residual = self._fused_add_norms(hidden_states1, hidden_states2, residual)
        else:
            dropped1 = self.dropout1(hidden_states1)
            residual = dropped1 if residual is None else residual + dropped1
            if hidden_states2 is not None:
                residual = residual + self.dropout2(hidden_states2)
            normed1 = self.norm1(residual.to(dtype=self.norm1.weight.dtype))
            normed2 = normed1 if self.tied_norm else self.norm2(residual.to(dtype=self.norm2.weight.dtype))
            if self.residual_in_fp32:
                residual = residual.to(torch.float32)
        mixer_kwargs = mixer_kwargs if mixer_kwargs is not None else {}
        return self.mixer(normed1, **mixer_kwargs), self.mlp(normed2), residual

    def _fused_add_norms(self, hidden_states1, hidden_states2, residual):
        dropout_p = self.dropout1.p if self.training else 0.0
        if hidden_states2 is not None:
            dropped2 = F.dropout(hidden_states2, dropout_p, training=self.training)
            if residual is not None:
                residual = residual + dropped2
            else:
                # The kernel's residual output has the dtype of the residual it is given.
                residual = dropped2.to(torch.float32) if self.residual_in_fp32 else dropped2
        normed1, residual = _fused_norm(
            hidden_states1,
            self.norm1,
            residual,
            dropout_p=dropout_p,
            prenorm=True,
            residual_in_fp32=self.residual_in_fp32,
        )
        if self.tied_norm:
            return normed1, normed1, residual
        normed2 = _fused_norm(residual, self.norm2, None, out_dtype=normed1.dtype)
        return normed1, normed2, residual
