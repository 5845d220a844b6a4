"""Fused residual add + RMSNorm for pre-norm blocks, in Triton (forward and backward).

What one call computes, per row of D channels (all arithmetic fp32):

    new_residual = residual + float(hidden)          (float(hidden) when residual is None)
    normed       = new_residual * rsqrt(mean(new_residual ** 2) + eps) * weight  -> out_dtype

This replaces the four passes over (B, L, D) a block's forward makes in plain PyTorch (cast,
add, norm, cast) with one, and the backward's five with one that also adds the gradient
flowing along the residual stream. ``add_rms_norm`` is a ``torch.library.custom_op`` with a
fake implementation and a registered autograd, so ``torch.compile`` sees one node per
direction instead of tracing into Triton.

Design, and why:

* Forward: one kernel, BLOCK_M rows per program, each row whole in registers (BLOCK_D =
  next power of two >= D, masked), so the mean square needs no second pass. It writes the
  fp32 residual, the normed row in out_dtype and rstd (fp32, one per row) for the backward.
  Bytes per row, bf16 hidden and bf16 out: reads 2D (hidden) + 4D (residual), writes 4D
  (new residual) + 2D (normed) + 4 (rstd): 12D + 4. The unfused chain moves 32D (cast
  6D, add 12D, norm 8D, cast 6D), more where the norm reads its row twice.
* The backward reads the saved new_residual (4 bytes per element), not hidden and residual
  (2 + 4) to recompute it: fewer bytes, and less memory, because some fp32 (B, L, D)
  tensor per block is kept either way (this block's new_residual, or its residual input,
  which is the previous block's new_residual) and recomputing would keep hidden as well.
* Backward: one pass per row. dx = rstd * (w * dy - x_hat * mean(x_hat * w * dy)) +
  d_new_residual, in fp32; it is written once in hidden's dtype (d_hidden) and, where there
  is a residual input, once in fp32 (d_residual): the residual stream's gradient never
  goes through bf16. Bytes per row, bf16: reads 2D (d_normed) + 4D (new residual) + 4D
  (incoming residual gradient) + 4 (rstd), writes 2D + 4D: 16D + 4. Unfused: 44D (cast
  6D, norm input gradient 12D, its weight gradient 8D, gradient accumulation 12D, cast
  6D).
* dweight = sum over rows of dy * x_hat: each backward program walks a strided set of row
  blocks, accumulates its share in registers and stores one fp32 partial row; a torch sum
  over the (programs, D) partials finishes it. Chosen over atomics because it is
  deterministic (same bits every run, which training reproducibility needs) and has no
  contention on D addresses; the partials ((programs, D) fp32, ~2 MiB at D = 1024 on a
  132-SM GPU) are small next to the (B, L, D) traffic (hundreds of MB at batch 128).
* rstd is div_rn(1, sqrt_rn(mean + eps)), IEEE-rounded rather than the approximate
  rsqrt: it is computed once per row, not per element, so precision costs little.
* Launch settings: BLOCK_M rows per program so that a tile holds ~2048 elements, num_warps
  by tile size (4 up to D = 2048, more above), backward programs capped at 4 per SM. These are
  starting points, not measurements: they need timing on a GPU. Under the Triton
  interpreter (TRITON_INTERPRET=1, CPU tests) tensors stay on the CPU, num_warps is
  ignored and the backward uses at most two programs, so that the reduction over programs
  is still exercised.
"""
from __future__ import annotations

import os
from functools import lru_cache
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_D = 8192  # a row must fit in one program's registers
_TILE = 2048  # elements per program tile: ~16 fp32 registers per thread at 4 warps


@triton.jit
def _add_rms_norm_fwd_kernel(
    hidden_ptr, residual_ptr, weight_ptr, normed_ptr, new_residual_ptr, rstd_ptr,
    n_rows, n_cols, stride_hidden, stride_residual, stride_normed, stride_new, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # int64 rows: rows * stride overflows int32 beyond ~2M rows of 1024 channels
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    row_mask = rows < n_rows
    col_mask = cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]
    # masked lanes load 0, so they add nothing to the sum of squares
    x = tl.load(hidden_ptr + rows[:, None] * stride_hidden + cols[None, :], mask=mask,
                other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(residual_ptr + rows[:, None] * stride_residual + cols[None, :],
                     mask=mask, other=0.0).to(tl.float32)
    tl.store(new_residual_ptr + rows[:, None] * stride_new + cols[None, :], x, mask=mask)
    mean_sq = tl.sum(x * x, axis=1) / n_cols
    rstd = tl.div_rn(tl.full(mean_sq.shape, 1.0, tl.float32), tl.sqrt_rn(mean_sq + eps))
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)
    w = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    # same order as F.rms_norm: normalise, then scale
    y = (x * rstd[:, None]) * w[None, :]
    tl.store(normed_ptr + rows[:, None] * stride_normed + cols[None, :],
             y.to(normed_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add_rms_norm_bwd_kernel(
    d_normed_ptr, d_new_ptr, new_residual_ptr, rstd_ptr, weight_ptr,
    d_hidden_ptr, d_residual_ptr, d_weight_partial_ptr,
    n_rows, n_cols, stride_d_normed, stride_d_new, stride_new, stride_d_hidden,
    stride_d_residual,
    HAS_D_NEW: tl.constexpr, STORE_D_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < n_cols
    w = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    # a 2-D accumulator defers the cross-row reduction (shuffles) to once per program
    d_weight = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    n_blocks = tl.cdiv(n_rows, BLOCK_M)
    for block in tl.range(pid, n_blocks, n_programs):
        rows = (block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]
        # masked rows load x = dy = rstd = 0 and so add nothing to d_weight
        x = tl.load(new_residual_ptr + rows[:, None] * stride_new + cols[None, :], mask=mask,
                    other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
        dy = tl.load(d_normed_ptr + rows[:, None] * stride_d_normed + cols[None, :],
                     mask=mask, other=0.0).to(tl.float32)
        x_hat = x * rstd[:, None]
        d_weight += dy * x_hat
        w_dy = dy * w[None, :]
        mean_dot = tl.sum(x_hat * w_dy, axis=1) / n_cols
        dx = (w_dy - x_hat * mean_dot[:, None]) * rstd[:, None]
        if HAS_D_NEW:
            dx += tl.load(d_new_ptr + rows[:, None] * stride_d_new + cols[None, :], mask=mask,
                          other=0.0).to(tl.float32)
        tl.store(d_hidden_ptr + rows[:, None] * stride_d_hidden + cols[None, :],
                 dx.to(d_hidden_ptr.dtype.element_ty), mask=mask)
        if STORE_D_RESIDUAL:
            # from the fp32 value, not the d_hidden rounding
            tl.store(d_residual_ptr + rows[:, None] * stride_d_residual + cols[None, :], dx,
                     mask=mask)
    tl.store(d_weight_partial_ptr + pid * n_cols + cols, tl.sum(d_weight, axis=0),
             mask=col_mask)


def _block_sizes(n_cols: int) -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_D, num_warps): whole rows, ~_TILE elements per program."""
    if n_cols > MAX_D:
        raise ValueError(f"add_rms_norm keeps a row in registers: D={n_cols} > {MAX_D}")
    block_d = triton.next_power_of_2(n_cols)
    block_m = max(1, min(16, _TILE // block_d))
    num_warps = 4 if block_m * block_d <= _TILE else 8 if block_d <= 4096 else 16
    return block_m, block_d, num_warps


@lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _rows(t: Tensor, n_cols: int) -> Tensor:
    """(rows, D) view with unit column stride, copying only when it has to: the kernels
    take a row stride, so expanded or row-strided gradients need no copy."""
    t = t.reshape(-1, n_cols)
    return t if t.stride(1) == 1 else t.contiguous()


def _check_device(t: Tensor) -> None:
    if t.device.type != "cuda" and not _INTERPRET:
        raise ValueError("add_rms_norm runs Triton kernels: it needs CUDA tensors, or "
                         "TRITON_INTERPRET=1 set before triton is imported (CPU, slow)")


def _forward(hidden: Tensor, residual: Optional[Tensor], weight: Tensor, eps: float,
             out_dtype: torch.dtype, block_m: Optional[int] = None
             ) -> Tuple[Tensor, Tensor, Tensor]:
    """Launcher: (normed, new_residual, rstd). ``block_m`` overrides the rows per program
    (tests use it to reach partial row blocks with tiny shapes)."""
    _check_device(hidden)
    n_cols = hidden.shape[-1]
    weight = weight.contiguous()  # read with unit stride
    h2 = _rows(hidden, n_cols)
    r2 = _rows(residual, n_cols) if residual is not None else h2
    n_rows = h2.shape[0]
    normed = torch.empty(hidden.shape, dtype=out_dtype, device=hidden.device)
    new_residual = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device)
    rstd = torch.empty(hidden.shape[:-1], dtype=torch.float32, device=hidden.device)
    if n_rows == 0:
        return normed, new_residual, rstd
    bm, block_d, num_warps = _block_sizes(n_cols)
    bm = block_m or bm
    _add_rms_norm_fwd_kernel[(triton.cdiv(n_rows, bm),)](
        h2, r2, weight, normed, new_residual, rstd,
        n_rows, n_cols, h2.stride(0), r2.stride(0), n_cols, n_cols, eps,
        HAS_RESIDUAL=residual is not None, BLOCK_M=bm, BLOCK_D=block_d, num_warps=num_warps)
    return normed, new_residual, rstd


def _backward(d_normed: Tensor, d_new_residual: Optional[Tensor], new_residual: Tensor,
              rstd: Tensor, weight: Tensor, hidden_dtype: torch.dtype, has_residual: bool,
              block_m: Optional[int] = None, num_programs: Optional[int] = None
              ) -> Tuple[Tensor, Tensor, Tensor]:
    """Launcher: (d_hidden, d_residual, d_weight); d_residual is empty without a residual
    input. ``block_m`` and ``num_programs`` override the launch (tests)."""
    _check_device(new_residual)
    n_cols = new_residual.shape[-1]
    weight = weight.contiguous()
    rstd = rstd.reshape(-1).contiguous()
    dev = new_residual.device
    x2 = _rows(new_residual, n_cols)
    dy2 = _rows(d_normed, n_cols)
    dn2 = _rows(d_new_residual, n_cols) if d_new_residual is not None else x2
    n_rows = x2.shape[0]
    d_hidden = torch.empty(new_residual.shape, dtype=hidden_dtype, device=dev)
    d_residual = (torch.empty(new_residual.shape, dtype=torch.float32, device=dev)
                  if has_residual else new_residual.new_empty(0))
    dr2 = d_residual.view(-1, n_cols) if has_residual else d_hidden.view(-1, n_cols)
    bm, block_d, num_warps = _block_sizes(n_cols)
    bm = block_m or bm
    n_blocks = triton.cdiv(n_rows, bm)
    if num_programs is None:
        num_programs = 2 if dev.type != "cuda" else 4 * _sm_count(dev.index or 0)
    grid = max(1, min(n_blocks, num_programs))
    partial = torch.empty((grid, n_cols), dtype=torch.float32, device=dev)
    if n_rows == 0:
        return d_hidden, d_residual, torch.zeros_like(weight)
    _add_rms_norm_bwd_kernel[(grid,)](
        dy2, dn2, x2, rstd, weight, d_hidden, dr2, partial,
        n_rows, n_cols, dy2.stride(0), dn2.stride(0), x2.stride(0), n_cols, n_cols,
        HAS_D_NEW=d_new_residual is not None, STORE_D_RESIDUAL=has_residual,
        BLOCK_M=bm, BLOCK_D=block_d, num_warps=num_warps)
    return d_hidden, d_residual, partial.sum(0).to(weight.dtype)


@torch.library.custom_op("mambar::add_rms_norm", mutates_args=())
def _add_rms_norm_op(hidden: Tensor, residual: Optional[Tensor], weight: Tensor, eps: float,
                     out_dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor]:
    """(normed, new_residual, rstd); rstd is an output only so autograd can save it."""
    return _forward(hidden, residual, weight, eps, out_dtype)


@_add_rms_norm_op.register_fake
def _(hidden, residual, weight, eps, out_dtype):
    return (hidden.new_empty(hidden.shape, dtype=out_dtype),
            hidden.new_empty(hidden.shape, dtype=torch.float32),
            hidden.new_empty(hidden.shape[:-1], dtype=torch.float32))


@torch.library.custom_op("mambar::add_rms_norm_backward", mutates_args=())
def _add_rms_norm_backward_op(d_normed: Tensor, d_new_residual: Optional[Tensor],
                              new_residual: Tensor, rstd: Tensor, weight: Tensor,
                              hidden_dtype: torch.dtype, has_residual: bool
                              ) -> Tuple[Tensor, Tensor, Tensor]:
    """(d_hidden, d_residual, d_weight); d_residual has no elements without a residual."""
    return _backward(d_normed, d_new_residual, new_residual, rstd, weight, hidden_dtype,
                     has_residual)


@_add_rms_norm_backward_op.register_fake
def _(d_normed, d_new_residual, new_residual, rstd, weight, hidden_dtype, has_residual):
    d_residual = (new_residual.new_empty(new_residual.shape) if has_residual
                  else new_residual.new_empty(0))
    return (new_residual.new_empty(new_residual.shape, dtype=hidden_dtype), d_residual,
            weight.new_empty(weight.shape))


def _setup_context(ctx, inputs, output) -> None:
    hidden, residual, weight, _eps, _out_dtype = inputs
    _normed, new_residual, rstd = output
    ctx.mark_non_differentiable(rstd)
    # an unused new_residual (the last norm) then arrives as None, not a tensor of zeros
    # the kernel would have to read
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(new_residual, rstd, weight)
    ctx.hidden_dtype = hidden.dtype
    ctx.has_residual = residual is not None


def _backward_rule(ctx, d_normed: Optional[Tensor], d_new_residual: Optional[Tensor],
                   _d_rstd: Optional[Tensor]):
    new_residual, rstd, weight = ctx.saved_tensors
    if d_normed is None and d_new_residual is None:
        return None, None, None, None, None
    if d_normed is None:  # only the residual stream is used downstream: rare, keep simple
        d_normed = torch.zeros_like(new_residual)
    d_hidden, d_residual, d_weight = torch.ops.mambar.add_rms_norm_backward(
        d_normed, d_new_residual, new_residual, rstd, weight, ctx.hidden_dtype,
        ctx.has_residual)
    return d_hidden, (d_residual if ctx.has_residual else None), d_weight, None, None


_add_rms_norm_op.register_autograd(_backward_rule, setup_context=_setup_context)


def add_rms_norm(hidden: Tensor, residual: Optional[Tensor], weight: Tensor,
                 eps: float = 1e-5, out_dtype: Optional[torch.dtype] = None
                 ) -> Tuple[Tensor, Tensor]:
    """Pre-norm residual step: (normed in ``out_dtype`` (default hidden's), new fp32
    residual = residual + float(hidden), or float(hidden) when ``residual`` is None).

    ``hidden``: (..., D), any float dtype (drop_path already applied by the caller);
    ``residual``: fp32, same shape; ``weight``: (D,). Math is fp32 whatever the dtypes and
    whatever autocast says: the op is opaque to autocast."""
    if not hidden.is_floating_point():
        raise TypeError(f"hidden must be floating point, got {hidden.dtype}")
    if residual is not None and (residual.dtype != torch.float32
                                 or residual.shape != hidden.shape):
        raise ValueError(f"residual must be fp32 with hidden's shape {tuple(hidden.shape)}, "
                         f"got {residual.dtype} {tuple(residual.shape)}")
    if weight.shape != hidden.shape[-1:]:
        raise ValueError(f"weight must be ({hidden.shape[-1]},), got {tuple(weight.shape)}")
    normed, new_residual, _ = _add_rms_norm_op(hidden, residual, weight, float(eps),
                                               out_dtype or hidden.dtype)
    return normed, new_residual
