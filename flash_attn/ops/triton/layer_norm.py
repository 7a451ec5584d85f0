"""Fused dropout + residual add + LayerNorm / RMSNorm in Triton, with the API of flash-attn 2.8's
flash_attn.ops.triton.layer_norm.

Forward, one program per row: x -> x * rowscale -> dropout(x) -> x + residual -> norm(x) * w + b.
The pre-norm sum is stored as residual_out when the caller needs it (prenorm) or when the
backward cannot rebuild it from x (residual, dropout, rowscale, a float32 residual stream).

Backward, two kernels: dx one program per row, as the forward (each row streams at the memory
rate); dweight / dbias as a column reduction over (rows x columns) tiles, each program summing a
chunk of rows into one row of a (chunks, N) float32 buffer that is summed afterwards -- no
atomics, a deterministic sum. (A single kernel whose programs also walked their rows for dx held
a whole row in registers per step and serialised its rows: its backward took 742 us for the 512 MB
of a (16384, 4096) bf16 prenorm call on an H100, under a quarter of the copy bandwidth.) Dropout masks are not stored: every row
draws from its own Philox seed, and the backward draws the same numbers again.
"""


import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from flash_attn.ops.triton.launch import check_device, device_guard

# One row must fit one program's registers.
_MAX_FUSED_BYTES = 65536


@triton.jit
def _norm_fwd_kernel(
    X,
    Y,
    W,
    B,
    RESIDUAL,
    RESIDUAL_OUT,
    ROWSCALE,
    SEEDS,
    DROPOUT_MASK,
    MEAN,
    RSTD,
    stride_x_row,
    stride_y_row,
    stride_res_row,
    stride_res_out_row,
    N,
    eps,
    dropout_p,
    IS_RMS_NORM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    STORE_RESIDUAL_OUT: tl.constexpr,
    HAS_ROWSCALE: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    STORE_DROPOUT_MASK: tl.constexpr,
    ZERO_CENTERED_WEIGHT: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    in_row = cols < N

    x = tl.load(X + row * stride_x_row + cols, mask=in_row, other=0.0).to(tl.float32)
    if HAS_ROWSCALE:
        x *= tl.load(ROWSCALE + row).to(tl.float32)
    if HAS_DROPOUT:
        keep = tl.rand(tl.load(SEEDS + row), cols) > dropout_p
        x = tl.where(keep, x / (1.0 - dropout_p), 0.0)
        if STORE_DROPOUT_MASK:
            tl.store(DROPOUT_MASK + row * N + cols, keep, mask=in_row)
    if HAS_RESIDUAL:
        x += tl.load(RESIDUAL + row * stride_res_row + cols, mask=in_row, other=0.0).to(tl.float32)
    if STORE_RESIDUAL_OUT:
        res_out = RESIDUAL_OUT + row * stride_res_out_row + cols
        tl.store(res_out, x.to(RESIDUAL_OUT.dtype.element_ty), mask=in_row)

    if IS_RMS_NORM:
        centered = x
    else:
        mean = tl.sum(x, axis=0) / N
        tl.store(MEAN + row, mean)
        centered = tl.where(in_row, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / N + eps)
    tl.store(RSTD + row, rstd)

    w = tl.load(W + cols, mask=in_row, other=0.0).to(tl.float32)
    if ZERO_CENTERED_WEIGHT:
        w += 1.0
    y = centered * rstd * w
    if HAS_BIAS:
        y += tl.load(B + cols, mask=in_row, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y_row + cols, y.to(Y.dtype.element_ty), mask=in_row)


@triton.jit
def _norm_bwd_dx_kernel(
    X,  # the pre-norm sum saved by the forward
    W,
    DY,
    DX,
    DRESIDUAL,  # gradient reaching residual_out (prenorm)
    DRESIDUAL_IN,  # gradient of the residual input, when it differs from DX
    ROWSCALE,
    SEEDS,
    MEAN,
    RSTD,
    stride_x_row,
    stride_dy_row,
    stride_dx_row,
    stride_dres_row,
    stride_dres_in_row,
    N,
    dropout_p,
    IS_RMS_NORM: tl.constexpr,
    HAS_DRESIDUAL: tl.constexpr,
    STORE_DRESIDUAL_IN: tl.constexpr,
    HAS_ROWSCALE: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    ZERO_CENTERED_WEIGHT: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    in_row = cols < N
    w = tl.load(W + cols, mask=in_row, other=0.0).to(tl.float32)
    if ZERO_CENTERED_WEIGHT:
        w += 1.0
    x = tl.load(X + row * stride_x_row + cols, mask=in_row, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * stride_dy_row + cols, mask=in_row, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + row)
    if IS_RMS_NORM:
        xhat = x * rstd
    else:
        xhat = tl.where(in_row, (x - tl.load(MEAN + row)) * rstd, 0.0)
    wdy = w * dy
    # d/dx of w * xhat: project out the directions the normalization removes.
    c1 = tl.sum(xhat * wdy, axis=0) / N
    if IS_RMS_NORM:
        dx = (wdy - xhat * c1) * rstd
    else:
        c2 = tl.sum(wdy, axis=0) / N
        dx = (wdy - (xhat * c1 + c2)) * rstd
    if HAS_DRESIDUAL:
        dx += tl.load(DRESIDUAL + row * stride_dres_row + cols, mask=in_row, other=0.0).to(tl.float32)
    if STORE_DRESIDUAL_IN:
        dres_in = DRESIDUAL_IN + row * stride_dres_in_row + cols
        tl.store(dres_in, dx.to(DRESIDUAL_IN.dtype.element_ty), mask=in_row)
    if HAS_DROPOUT:
        keep = tl.rand(tl.load(SEEDS + row), cols) > dropout_p
        dx = tl.where(keep, dx / (1.0 - dropout_p), 0.0)
    if HAS_ROWSCALE:
        dx *= tl.load(ROWSCALE + row).to(tl.float32)
    tl.store(DX + row * stride_dx_row + cols, dx.to(DX.dtype.element_ty), mask=in_row)


@triton.jit
def _norm_bwd_dw_kernel(
    X,
    DY,
    MEAN,
    RSTD,
    DW_PARTIAL,
    DB_PARTIAL,
    stride_x_row,
    stride_dy_row,
    M,
    N,
    rows_per_chunk,
    IS_RMS_NORM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    col_block = tl.program_id(0)
    chunk = tl.program_id(1)
    cols = col_block * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    in_cols = cols < N
    dw = tl.zeros((BLOCK_COLS,), dtype=tl.float32)
    db = tl.zeros((BLOCK_COLS,), dtype=tl.float32)
    first_row = chunk.to(tl.int64) * rows_per_chunk
    last_row = tl.minimum(first_row + rows_per_chunk, M)
    for row0 in range(first_row, last_row, BLOCK_ROWS):
        rows = row0 + tl.arange(0, BLOCK_ROWS)
        in_rows = rows < last_row
        tile = in_rows[:, None] & in_cols[None, :]
        x = tl.load(X + rows[:, None] * stride_x_row + cols[None, :], mask=tile, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy_row + cols[None, :], mask=tile, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=in_rows, other=0.0)
        if IS_RMS_NORM:
            xhat = x * rstd[:, None]
        else:
            mean = tl.load(MEAN + rows, mask=in_rows, other=0.0)
            xhat = (x - mean[:, None]) * rstd[:, None]
        dw += tl.sum(tl.where(tile, dy * xhat, 0.0), axis=0)
        if HAS_BIAS:
            db += tl.sum(dy, axis=0)
    tl.store(DW_PARTIAL + chunk * N + cols, dw, mask=in_cols)
    if HAS_BIAS:
        tl.store(DB_PARTIAL + chunk * N + cols, db, mask=in_cols)


def _block_n(x):
    n = x.shape[-1]
    block_n = triton.next_power_of_2(n)
    if block_n * x.element_size() > _MAX_FUSED_BYTES:
        raise RuntimeError(f"layer norm: hidden size {n} exceeds the {_MAX_FUSED_BYTES} bytes a row may take")
    return block_n


def _num_warps(block_n):
    return min(max(block_n // 512, 1), 16)


def _rows(t, name, n):
    """t as (rows, n) with unit last stride, as a view where possible."""
    if t is None:
        return None
    if t.shape[-1] != n:
        raise ValueError(f"layer norm: {name} has last dim {t.shape[-1]}, expected {n}")
    t = t.reshape(-1, n)
    return t if t.stride(-1) == 1 else t.contiguous()


def _buffer_rows(t, name, shape):
    """A caller's output buffer as a (rows, n) view; its writes must reach the caller."""
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"layer norm: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    rows = t.view(-1, shape[-1])
    if rows.stride(-1) != 1:
        raise ValueError(f"layer norm: {name} must have a unit last stride")
    return rows


# dweight / dbias: tiles of _DW_BLOCK_ROWS x _DW_BLOCK_COLS, each program summing a chunk of rows
# for one column block into a float32 partial row; enough chunks to give every SM a few programs.
_DW_BLOCK_ROWS = 32
_DW_BLOCK_COLS = 128


def _dw_chunks(x, m, n):
    col_blocks = triton.cdiv(n, _DW_BLOCK_COLS)
    programs = 4 * torch.cuda.get_device_properties(x.device).multi_processor_count if x.device.type == "cuda" else 4
    chunks = max(1, min(triton.cdiv(m, _DW_BLOCK_ROWS), triton.cdiv(programs, col_blocks)))
    rows_per_chunk = triton.cdiv(triton.cdiv(m, chunks), _DW_BLOCK_ROWS) * _DW_BLOCK_ROWS
    return triton.cdiv(m, rows_per_chunk), rows_per_chunk


class LayerNormFn(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x,
        weight,
        bias,
        residual=None,
        x1=None,
        weight1=None,
        bias1=None,
        eps=1e-6,
        dropout_p=0.0,
        rowscale=None,
        prenorm=False,
        residual_in_fp32=False,
        zero_centered_weight=False,
        is_rms_norm=False,
        return_dropout_mask=False,
        out_dtype=None,
        out=None,
        residual_out=None,
    ):
        for name, value in (("x1", x1), ("weight1", weight1), ("bias1", bias1)):
            if value is not None:
                raise NotImplementedError(
                    f"layer_norm_fn: {name} (the parallel second norm) is not implemented in this build"
                )
        check_device(x, weight, bias, residual, rowscale, out, residual_out)
        shape = x.shape
        n = shape[-1]
        x2d = _rows(x, "x", n)
        m = x2d.shape[0]
        residual2d = _rows(residual, "residual", n)
        if residual is not None and residual.shape != shape:
            raise ValueError(f"layer norm: residual shape {tuple(residual.shape)} != x shape {tuple(shape)}")
        if weight.shape != (n,) or (bias is not None and bias.shape != (n,)):
            raise ValueError(f"layer norm: weight and bias must have shape ({n},)")
        weight = weight.contiguous()
        bias = bias.contiguous() if bias is not None else None
        if rowscale is not None:
            rowscale = rowscale.reshape(-1).contiguous()
            if rowscale.shape != (m,):
                raise ValueError(f"layer norm: rowscale must have one value per row ({m})")
        residual_dtype = residual.dtype if residual is not None else (torch.float32 if residual_in_fp32 else x.dtype)

        if out is None:
            y2d = torch.empty((m, n), dtype=out_dtype or x.dtype, device=x.device)
        else:
            y2d = _buffer_rows(out, "out", shape)
        # x itself serves as residual_out when the pre-norm sum is x unchanged.
        sum_is_x = residual is None and dropout_p == 0.0 and rowscale is None and residual_dtype == x.dtype
        if residual_out is not None:
            res_out2d = _buffer_rows(residual_out, "residual_out", shape)
        elif not sum_is_x:
            res_out2d = torch.empty((m, n), dtype=residual_dtype, device=x.device)
        else:
            res_out2d = None
        mean = None if is_rms_norm else torch.empty(m, dtype=torch.float32, device=x.device)
        rstd = torch.empty(m, dtype=torch.float32, device=x.device)
        seeds = torch.randint(2**31, (m,), dtype=torch.int64, device=x.device) if dropout_p > 0.0 else None
        mask2d = None
        if return_dropout_mask and dropout_p > 0.0:
            mask2d = torch.empty((m, n), dtype=torch.bool, device=x.device)

        if m > 0:
            block_n = _block_n(x2d)
            with device_guard(x):
                _norm_fwd_kernel[(m,)](
                    x2d,
                    y2d,
                    weight,
                    bias,
                    residual2d,
                    res_out2d,
                    rowscale,
                    seeds,
                    mask2d,
                    mean,
                    rstd,
                    x2d.stride(0),
                    y2d.stride(0),
                    residual2d.stride(0) if residual2d is not None else 0,
                    res_out2d.stride(0) if res_out2d is not None else 0,
                    n,
                    eps,
                    dropout_p,
                    IS_RMS_NORM=is_rms_norm,
                    HAS_BIAS=bias is not None,
                    HAS_RESIDUAL=residual is not None,
                    STORE_RESIDUAL_OUT=res_out2d is not None,
                    HAS_ROWSCALE=rowscale is not None,
                    HAS_DROPOUT=dropout_p > 0.0,
                    STORE_DROPOUT_MASK=mask2d is not None,
                    ZERO_CENTERED_WEIGHT=zero_centered_weight,
                    BLOCK_N=block_n,
                    num_warps=_num_warps(block_n),
                )
        pre_norm = res_out2d if res_out2d is not None else x2d
        ctx.save_for_backward(pre_norm, weight, bias, rowscale, seeds, mean, rstd)
        ctx.shape = shape
        ctx.x_dtype = x.dtype
        ctx.residual_dtype = residual_dtype if residual is not None else None
        ctx.dropout_p = dropout_p
        ctx.prenorm = prenorm
        ctx.is_rms_norm = is_rms_norm
        ctx.zero_centered_weight = zero_centered_weight

        y = y2d.view(shape)
        outputs = (y, pre_norm.view(shape)) if prenorm else (y,)
        if return_dropout_mask:
            mask = mask2d.view(shape) if mask2d is not None else None
            # The second mask belongs to the parallel norm (x1), which this build lacks.
            outputs = outputs + (mask, None)
        return outputs[0] if len(outputs) == 1 else outputs

    @staticmethod
    def backward(ctx, dy, *grads_of_other_outputs):
        pre_norm, weight, bias, rowscale, seeds, mean, rstd = ctx.saved_tensors
        m, n = pre_norm.shape
        dy2d = _rows(dy, "dy", n)
        dresidual2d = _rows(grads_of_other_outputs[0], "dresidual", n) if ctx.prenorm else None
        has_residual = ctx.residual_dtype is not None
        dx2d = torch.empty((m, n), dtype=ctx.x_dtype, device=dy.device)
        separate_dresidual = has_residual and (
            ctx.residual_dtype != ctx.x_dtype or ctx.dropout_p > 0.0 or rowscale is not None
        )
        dres_in2d = torch.empty((m, n), dtype=ctx.residual_dtype, device=dy.device) if separate_dresidual else None
        chunks, rows_per_chunk = _dw_chunks(pre_norm, max(m, 1), n)
        dw_partial = torch.zeros((chunks, n), dtype=torch.float32, device=dy.device)
        db_partial = torch.zeros((chunks, n), dtype=torch.float32, device=dy.device) if bias is not None else None

        if m > 0:
            block_n = _block_n(pre_norm)
            with device_guard(pre_norm):
                _norm_bwd_dx_kernel[(m,)](
                    pre_norm,
                    weight,
                    dy2d,
                    dx2d,
                    dresidual2d,
                    dres_in2d,
                    rowscale,
                    seeds,
                    mean,
                    rstd,
                    pre_norm.stride(0),
                    dy2d.stride(0),
                    dx2d.stride(0),
                    dresidual2d.stride(0) if dresidual2d is not None else 0,
                    dres_in2d.stride(0) if dres_in2d is not None else 0,
                    n,
                    ctx.dropout_p,
                    IS_RMS_NORM=ctx.is_rms_norm,
                    HAS_DRESIDUAL=dresidual2d is not None,
                    STORE_DRESIDUAL_IN=dres_in2d is not None,
                    HAS_ROWSCALE=rowscale is not None,
                    HAS_DROPOUT=ctx.dropout_p > 0.0,
                    ZERO_CENTERED_WEIGHT=ctx.zero_centered_weight,
                    BLOCK_N=block_n,
                    num_warps=_num_warps(block_n),
                )
                _norm_bwd_dw_kernel[(triton.cdiv(n, _DW_BLOCK_COLS), chunks)](
                    pre_norm,
                    dy2d,
                    mean,
                    rstd,
                    dw_partial,
                    db_partial,
                    pre_norm.stride(0),
                    dy2d.stride(0),
                    m,
                    n,
                    rows_per_chunk,
                    IS_RMS_NORM=ctx.is_rms_norm,
                    HAS_BIAS=bias is not None,
                    BLOCK_ROWS=_DW_BLOCK_ROWS,
                    BLOCK_COLS=_DW_BLOCK_COLS,
                    num_warps=4,
                )
        dw = dw_partial.sum(0).to(weight.dtype)
        db = db_partial.sum(0).to(bias.dtype) if bias is not None else None
        dx = dx2d.view(ctx.shape)
        dresidual = None
        if has_residual:
            dresidual = dres_in2d.view(ctx.shape) if separate_dresidual else dx
        # One gradient per forward argument: x, weight, bias, residual, then 14 non-tensors/unsupported.
        return (dx, dw, db, dresidual) + (None,) * 14


def layer_norm_fn(
    x,
    weight,
    bias,
    residual=None,
    x1=None,
    weight1=None,
    bias1=None,
    eps=1e-6,
    dropout_p=0.0,
    rowscale=None,
    prenorm=False,
    residual_in_fp32=False,
    zero_centered_weight=False,
    is_rms_norm=False,
    return_dropout_mask=False,
    out_dtype=None,
    out=None,
    residual_out=None,
):
    """LayerNorm (or RMSNorm with is_rms_norm) of dropout(x * rowscale) + residual.

    x, residual: (..., N); weight, bias: (N,); rowscale: (...,) one scale per row.
    dropout_p: dropout on x before the residual add (its mask is regenerated in the backward).
    prenorm: also return the pre-norm sum (the next residual), in float32 when residual_in_fp32
        and no residual is given, else in residual's dtype.
    zero_centered_weight: the weight is stored as weight - 1.
    return_dropout_mask: append (dropout_mask, None) to the outputs.
    out, residual_out: preallocated outputs.
    x1, weight1, bias1 (parallel norm of a second input) raise NotImplementedError.
    Returns y, or (y, residual_out) when prenorm.
    """
    return LayerNormFn.apply(
        x,
        weight,
        bias,
        residual,
        x1,
        weight1,
        bias1,
        eps,
        dropout_p,
        rowscale,
        prenorm,
        residual_in_fp32,
        zero_centered_weight,
        is_rms_norm,
        return_dropout_mask,
        out_dtype,
        out,
        residual_out,
    )


def rms_norm_fn(
    x,
    weight,
    bias,
    residual=None,
    x1=None,
    weight1=None,
    bias1=None,
    eps=1e-6,
    dropout_p=0.0,
    rowscale=None,
    prenorm=False,
    residual_in_fp32=False,
    zero_centered_weight=False,
    return_dropout_mask=False,
    out_dtype=None,
    out=None,
    residual_out=None,
):
    """layer_norm_fn with is_rms_norm=True: x / rms(x) * weight (+ bias)."""
    return LayerNormFn.apply(
        x,
        weight,
        bias,
        residual,
        x1,
        weight1,
        bias1,
        eps,
        dropout_p,
        rowscale,
        prenorm,
        residual_in_fp32,
        zero_centered_weight,
        True,
        return_dropout_mask,
        out_dtype,
        out,
        residual_out,
    )


def layer_norm_linear_fn(
    x,
    norm_weight,
    norm_bias,
    linear_weight,
    linear_bias,
    residual=None,
    eps=1e-6,
    prenorm=False,
    residual_in_fp32=False,
    is_rms_norm=False,
):
    """Norm then F.linear. Unlike flash-attn's fused version, the normalized activations are kept
    for the backward instead of being recomputed."""
    out_dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled() else None
    normed = layer_norm_fn(
        x,
        norm_weight,
        norm_bias,
        residual=residual,
        eps=eps,
        prenorm=prenorm,
        residual_in_fp32=residual_in_fp32,
        is_rms_norm=is_rms_norm,
        out_dtype=out_dtype,
    )
    y, residual_out = normed if prenorm else (normed, None)
    dtype = out_dtype or y.dtype
    bias = linear_bias.to(dtype) if linear_bias is not None else None
    out = F.linear(y.to(dtype), linear_weight.to(dtype), bias)
    return (out, residual_out) if prenorm else out


def _norm_reference(x, weight, bias, residual, eps, dropout_p, rowscale, prenorm, zero_centered_weight,
                    dropout_mask, upcast, normalize):
    dtype = x.dtype
    if upcast:
        x, weight = x.float(), weight.float()
        bias = bias.float() if bias is not None else None
        residual = residual.float() if residual is not None else None
    if zero_centered_weight:
        weight = weight + 1.0
    if rowscale is not None:
        x = x * rowscale[..., None]
    if dropout_p > 0.0:
        if dropout_mask is not None:
            x = x.masked_fill(~dropout_mask, 0.0) / (1.0 - dropout_p)
        else:
            x = F.dropout(x, dropout_p)
    if residual is not None:
        x = (x + residual).to(x.dtype)
    out = normalize(x, weight, bias).to(dtype)
    return (out, x) if prenorm else out


def _check_reference_args(x1, weight1, bias1):
    for name, value in (("x1", x1), ("weight1", weight1), ("bias1", bias1)):
        if value is not None:
            raise NotImplementedError(f"norm reference: {name} (the parallel second norm) is not implemented")


def layer_norm_ref(
    x,
    weight,
    bias,
    residual=None,
    x1=None,
    weight1=None,
    bias1=None,
    eps=1e-6,
    dropout_p=0.0,
    rowscale=None,
    prenorm=False,
    zero_centered_weight=False,
    dropout_mask=None,
    dropout_mask1=None,
    upcast=False,
):
    """Eager PyTorch layer_norm_fn (upcast: compute in float32). Returns out, or (out, pre-norm sum)."""
    _check_reference_args(x1, weight1, bias1)

    def normalize(h, w, b):
        return F.layer_norm(h.to(w.dtype), h.shape[-1:], weight=w, bias=b, eps=eps)

    return _norm_reference(x, weight, bias, residual, eps, dropout_p, rowscale, prenorm, zero_centered_weight,
                           dropout_mask, upcast, normalize)


def rms_norm_ref(
    x,
    weight,
    bias,
    residual=None,
    x1=None,
    weight1=None,
    bias1=None,
    eps=1e-6,
    dropout_p=0.0,
    rowscale=None,
    prenorm=False,
    zero_centered_weight=False,
    dropout_mask=None,
    dropout_mask1=None,
    upcast=False,
):
    """Eager PyTorch rms_norm_fn (upcast: compute in float32). Returns out, or (out, pre-norm sum)."""
    _check_reference_args(x1, weight1, bias1)

    def normalize(h, w, b):
        scaled = h * torch.rsqrt(h.square().mean(dim=-1, keepdim=True) + eps) * w
        return scaled + b if b is not None else scaled

    return _norm_reference(x, weight, bias, residual, eps, dropout_p, rowscale, prenorm, zero_centered_weight,
                           dropout_mask, upcast, normalize)


class _FusedNorm(torch.nn.Module):
    is_rms_norm = False

    def __init__(self, hidden_size, eps=1e-5, dropout_p=0.0, zero_centered_weight=False, bias=True,
                 device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.eps = eps
        self.drop = torch.nn.Dropout(dropout_p) if dropout_p > 0.0 else None
        self.zero_centered_weight = zero_centered_weight
        self.weight = torch.nn.Parameter(torch.empty(hidden_size, **factory))
        if bias:
            self.bias = torch.nn.Parameter(torch.empty(hidden_size, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self):
        # A zero-centered weight stores weight - 1, so the identity scale is zero.
        if self.zero_centered_weight:
            torch.nn.init.zeros_(self.weight)
        else:
            torch.nn.init.ones_(self.weight)
        if self.bias is not None:
            torch.nn.init.zeros_(self.bias)

    def forward(self, x, residual=None, prenorm=False, residual_in_fp32=False):
        return layer_norm_fn(
            x,
            self.weight,
            self.bias,
            residual=residual,
            eps=self.eps,
            dropout_p=self.drop.p if self.drop is not None and self.training else 0.0,
            prenorm=prenorm,
            residual_in_fp32=residual_in_fp32,
            zero_centered_weight=self.zero_centered_weight,
            is_rms_norm=self.is_rms_norm,
        )


class LayerNorm(_FusedNorm):
    """LayerNorm over the last dim with weight and bias; forward(x, residual=None, prenorm=False,
    residual_in_fp32=False) fuses dropout (dropout_p, training only) and the residual add."""

    def __init__(self, hidden_size, eps=1e-5, dropout_p=0.0, zero_centered_weight=False, device=None, dtype=None):
        super().__init__(hidden_size, eps, dropout_p, zero_centered_weight, bias=True, device=device, dtype=dtype)


class RMSNorm(_FusedNorm):
    """RMSNorm over the last dim with a weight and no bias; same forward as LayerNorm."""

    is_rms_norm = True

    def __init__(self, hidden_size, eps=1e-5, dropout_p=0.0, zero_centered_weight=False, device=None, dtype=None):
        super().__init__(hidden_size, eps, dropout_p, zero_centered_weight, bias=False, device=device, dtype=dtype)
