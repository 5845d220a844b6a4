"""The mixer's two scan directions as one ``torch.library`` custom op, for every backend.

Each direction of the bidirectional mixer (``vision_mamba.BiMambaMixer``, whose reference path
spells out the same math) computes, from x and z (the two halves of in_proj's output xz):

    u      = SiLU(causal depthwise conv(x))          (anti-causal for the backward direction)
    dt, B, C = split(x_proj.weight @ u)
    delta  = dt_proj.weight @ dt                      (the bias and softplus are the scan's)
    y      = selective_scan(u, delta, A = -exp(A_log), B, C, D, z, dt_proj.bias)

and the mixer averages the two directions' y. ``mambar::bimamba`` does all of it in one op,
from xz (B, L, 2E) to the average (B, L, E). Why one op:

* ``torch.compile`` traces a custom op as a single node with a fake (shape-only)
  implementation and a registered autograd formula, so the compiled model has no graph
  breaks, whatever the scan backend runs inside (Numba, Triton or mamba-ssm's kernels).
* An op decides what its backward keeps. This one keeps its inputs (xz and weights) and
  each direction's x_proj output (dt, B, C: R + 2N channels, 5-11 % of x's);
  ``mambar::bimamba_backward`` redoes the conv and dt_proj (cheap) before each scan's
  backward, rather than holding u and delta, each the size of x, from the forward to the
  backward (Mamba®-B at batch 128: gigabytes).
* Both directions in one op write into one buffer each way, with no copy between: the first
  direction's scan writes ½ y into the (B, L, E) output that out_proj reads as it is, the
  second adds its ½ y there; in the backward the ½ is a scale on the scans' dout, and the two
  directions' dx and dz land in one (B, L, 2E) gradient, the layout of in_proj's output.
  Their x_proj outputs, delta and its gradient are (2, B, L, C) buffers, so that dt_proj
  runs as one batched GEMM for both directions, each way, and one launch zeroes everything
  the backward's kernels add into.

The scan backends provide a (forward, backward) kernel pair that needs only the inputs and
takes those output arguments (``selective_scan.scan_kernels``); so do the conv backends
(``conv_kernels``). The op's backward goes back through the projections and the conv by hand:
autograd does not record inside a custom op.
"""
from __future__ import annotations

import contextlib
import importlib
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import compiled_cpu_scan_available, put, scan_kernels
from .cuda_kernels import causal_conv1d_silu, load_causal_conv1d

# Profiler ranges, so that benchmark.py can tell the scan's time from the rest of the op's.
SCAN_RANGE = "mambar.selective_scan"
SCAN_BACKWARD_RANGE = "mambar.selective_scan_backward"
RECOMPUTE_RANGE = "mambar.recompute"

# One direction's parameters, in the order the op takes them after xz and both directions'
# dt_proj weights (then the other direction's).
DIRECTION_PARAMS = ("conv_weight", "conv_bias", "x_proj_weight", "dt_proj_bias", "A", "D")


def without_autocast(device: torch.device):
    """Autocast off, on devices that have it (the meta device, where timm builds models to
    inspect them, has none and refuses the context)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------- the conv

def conv_silu(x: Tensor, weight: Tensor, bias: Optional[Tensor], reverse: bool) -> Tensor:
    """SiLU(causal depthwise conv(x)) in x's dtype, (B, E, L) -> (B, E, L); with ``reverse``
    the anti-causal twin, which equals flip -> causal conv -> flip without the copies."""
    return F.silu(_conv(x, weight, bias, reverse)[0])


def _conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], reverse: bool
          ) -> Tuple[Tensor, Tensor, Tensor]:
    """The conv before SiLU (B, E, L), the padded conv it was cut from, and the kernel used."""
    k = weight.shape[-1]
    weight = weight.to(x.dtype).flip(-1) if reverse else weight.to(x.dtype)
    bias = None if bias is None else bias.to(x.dtype)
    padded = F.conv1d(x, weight, bias, padding=k - 1, groups=x.shape[1])
    return padded[..., k - 1:] if reverse else padded[..., :x.shape[-1]], padded, weight


def conv_silu_backward(du: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor],
                       reverse: bool) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Gradients of x, the conv weight (E, 1, K) and bias from that of ``conv_silu``'s output;
    the conv is run again for its pre-activation."""
    pre, padded, kernel = _conv(x, weight, bias, reverse)
    k, channels, length = kernel.shape[-1], x.shape[1], x.shape[-1]
    dpadded = torch.zeros_like(padded)
    (dpadded[..., k - 1:] if reverse else dpadded[..., :length]).copy_(
        torch.ops.aten.silu_backward(du, pre))
    dx, dkernel, dbias = torch.ops.aten.convolution_backward(
        dpadded, x, kernel, [channels], [1], [k - 1], [1], False, [0], channels,
        [True, True, bias is not None])
    return dx, dkernel.flip(-1) if reverse else dkernel, dbias


def _into_buffers(backward: Callable) -> Callable:
    """A conv backward that returns its own gradients, under the output arguments of the
    Triton conv's: dx copied or added where asked, dW and db added into given buffers."""
    def run(du, x, weight, bias, reverse, dx=None, accumulate=False, dweight=None, dbias=None):
        grad_x, grad_weight, grad_bias = backward(du, x, weight, bias, reverse)
        return (put(grad_x, dx, accumulate=accumulate),
                put(grad_weight, dweight, accumulate=True),
                None if grad_bias is None else put(grad_bias, dbias, accumulate=True))
    return run


def conv_kernels(backend: str, x: Tensor) -> Tuple[Callable, Callable]:
    """The (forward, backward) pair of SiLU(conv) for a concrete backend and input:
    ``forward(x, weight, bias, reverse) -> u`` and ``backward(du, x, weight, bias, reverse,
    dx=None, accumulate=False, dweight=None, dbias=None) -> (dx, dweight, dbias)``, dx
    written into (or added to) the given tensor, dW and db added into the given ones. The
    ``triton`` backend runs the fused Triton conv (``triton_conv.py``: x read in place, u
    channel-minor, dW and db reduced in the kernel); causal-conv1d's kernel runs the ``cuda``
    forward; on the CPU the compiled scan's module has the conv too (fp32/fp64), since
    oneDNN's depthwise conv backward costs 10x its forward at the model's sizes; PyTorch's
    conv everywhere else."""
    if backend == "triton":
        module = importlib.import_module(".triton_conv", __package__)
        return module.conv_silu_forward, module.conv_silu_backward
    if backend == "cuda" and load_causal_conv1d() is not None:
        # Its backward entry points changed between releases: PyTorch's conv goes back (the
        # same values to rounding).
        return causal_conv1d_silu, _into_buffers(conv_silu_backward)
    if (backend == "torch" and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.float64) and compiled_cpu_scan_available()):
        module = importlib.import_module(".cpu_numba", __package__)
        return module.conv_silu_forward, _into_buffers(module.conv_silu_backward)
    return conv_silu, _into_buffers(conv_silu_backward)


# --------------------------------------------------------------------------- projections

def _channel_minor(x: Tensor) -> bool:
    """Whether (B, C, L) ``x`` is stored with its channels innermost, as (B, L, C)."""
    return x.stride(1) < x.stride(2)


def channel_matmul(weight: Tensor, x: Tensor) -> Tensor:
    """(O, I) @ (B, I, L) -> (B, O, L) in x's layout, the weight cast to x's dtype as autocast
    would: channels-first in and out by one bmm; channel-minor in and out, as the compiled
    CPU kernels and the Triton conv write them, by one GEMM over all B x L tokens."""
    weight = weight.to(x.dtype)
    if _channel_minor(x):
        return F.linear(x.transpose(1, 2), weight).transpose(1, 2)
    return torch.bmm(weight.expand(x.shape[0], -1, -1), x)


def _tokens(x: Tensor) -> Tensor:
    """A channel-minor (B, C, L) tensor as the (B x L, C) matrix it is stored as: a view
    where its images follow each other (``_stored_as_tokens``), a copy otherwise."""
    return x.transpose(1, 2).flatten(0, 1)


def _stored_as_tokens(x: Tensor) -> bool:
    """Whether (B, C, L) x is a (B x L, C) matrix with unit channel stride in memory."""
    return x.stride(1) == 1 and x.stride(0) == x.shape[2] * x.stride(2)


def _add_channel_matmul(acc: Tensor, weight: Tensor, x: Tensor) -> Tensor:
    """acc + weight @ x for (B, O, L) acc and (B, I, L) x; both stored as token matrices, one
    GEMM that adds into acc in place (its epilogue), else a product and an add."""
    if _stored_as_tokens(acc) and _stored_as_tokens(x):
        _tokens(acc).addmm_(_tokens(x), weight.to(x.dtype).t())
        return acc
    return acc + channel_matmul(weight, x)


def _weight_grad(dout: Tensor, x: Tensor) -> Tensor:
    """The gradient of an (O, I) weight from (B, O, L) output and (B, I, L) input gradients,
    summed over batch and tokens. Both channel-minor: one GEMM over all tokens, on views.
    Otherwise, in fp32/fp64, per-image products summed over the batch (an einsum first copies
    both operands into (channel, batch x token) layouts); in half precision one GEMM, so that
    the sum is rounded once."""
    if _channel_minor(dout) and _channel_minor(x):
        return _tokens(dout).t() @ _tokens(x)
    if x.dtype in (torch.float32, torch.float64):
        return torch.bmm(dout, x.transpose(1, 2)).sum(0)
    return torch.einsum("bol,bil->oi", dout, x)


def _x_proj_into(out: Tensor, u: Tensor, weight: Tensor) -> None:
    """x_proj's output for (B, E, L) u written into (B, L, R + 2N) ``out`` (contiguous), in
    either of u's layouts."""
    weight = weight.to(u.dtype)
    if _stored_as_tokens(u):
        torch.mm(_tokens(u), weight.t(), out=out.flatten(0, 1))
    else:
        torch.bmm(u.transpose(1, 2), weight.t().expand(u.shape[0], -1, -1), out=out)


def _stacked_tokens(t: Tensor) -> Tensor:
    """A (2, B, L, C) buffer (or a view of its last dim) as (2, B x L, C) matrices."""
    return t.flatten(1, 2)


def _channels(t: Tensor, direction: int) -> Tensor:
    """One direction's (B, C, L) channel-minor view of a (2, B, L, C) buffer."""
    return t[direction].transpose(1, 2)


# --------------------------------------------------------------------------- the op

class Direction(NamedTuple):
    conv_weight: Tensor
    conv_bias: Tensor
    x_proj_weight: Tensor
    dt_proj_bias: Tensor
    A: Tensor
    D: Tensor


def _halves(xz: Tensor) -> Tuple[Tensor, Tensor]:
    """x and z, the channel halves of (B, L, 2E) xz, as channel-minor (B, E, L) views."""
    x, z = xz.transpose(1, 2).chunk(2, dim=1)
    return x, z


def _directions(params: Sequence[Tensor]) -> Tuple[Direction, Direction]:
    n = len(DIRECTION_PARAMS)
    return Direction(*params[:n]), Direction(*params[n:])


def _delta(x_dbl: Tensor, dt_proj_weight: Tensor) -> Tensor:
    """Both directions' delta (2, B, L, E) from their dt, the first R channels of x_proj's
    outputs (2, B, L, R + 2N), by one batched GEMM."""
    rank = dt_proj_weight.shape[2]
    delta = torch.bmm(_stacked_tokens(x_dbl[..., :rank]),
                      dt_proj_weight.to(x_dbl.dtype).transpose(1, 2))
    return delta.view(*x_dbl.shape[:3], -1)


def _scan_args(x_dbl: Tensor, delta: Tensor, z: Tensor, direction: int, p: Direction
               ) -> Tuple[Tensor, ...]:
    """One direction's scan arguments after u: delta, A, B, C, D, z and the dt bias, with A,
    D and the bias in fp32, as the official mixer."""
    state = p.A.shape[1]
    b_ssm, c_ssm = _channels(x_dbl, direction)[:, -2 * state:].split([state, state], dim=1)
    return (_channels(delta, direction), p.A.float(), b_ssm, c_ssm, p.D.float(), z,
            p.dt_proj_bias.float())


@torch.library.custom_op("mambar::bimamba", mutates_args=())
def bimamba(xz: Tensor, dt_proj_weight: Tensor, conv_weight: Tensor, conv_bias: Tensor,
            x_proj_weight: Tensor, dt_proj_bias: Tensor, A: Tensor, D: Tensor,
            conv_weight_b: Tensor, conv_bias_b: Tensor, x_proj_weight_b: Tensor,
            dt_proj_bias_b: Tensor, A_b: Tensor, D_b: Tensor, backend: str
            ) -> Tuple[Tensor, Tensor]:
    """Both directions of the mixer on in_proj's output xz (B, L, 2E): the mean of their
    scans, (B, L, E) in xz's dtype, the layout out_proj reads; then both directions' x_proj
    outputs (2, B, L, R + 2N), for the backward. ``dt_proj_weight``: both directions' (2, E,
    R); the second direction's other parameters end in ``_b``; A is -exp(A_log);
    ``backend`` is a concrete scan backend (``selective_scan.resolve_backend``)."""
    directions = _directions((conv_weight, conv_bias, x_proj_weight, dt_proj_bias, A, D,
                              conv_weight_b, conv_bias_b, x_proj_weight_b, dt_proj_bias_b,
                              A_b, D_b))
    x, z = _halves(xz)
    out = xz.new_empty(xz.shape[0], xz.shape[1], x.shape[1])
    x_dbl = xz.new_empty(2, xz.shape[0], xz.shape[1], x_proj_weight.shape[0])
    forward, _ = scan_kernels(backend, xz.device)
    conv_forward, _ = conv_kernels(backend, x)
    with without_autocast(xz.device):
        us = [conv_forward(x, p.conv_weight, p.conv_bias, bool(i))
              for i, p in enumerate(directions)]
        for i, p in enumerate(directions):
            _x_proj_into(x_dbl[i], us[i], p.x_proj_weight)
        delta = _delta(x_dbl, dt_proj_weight)
        # The first direction writes ½ y into out, the second adds its ½ y.
        for i, p in enumerate(directions):
            with torch.profiler.record_function(SCAN_RANGE):
                forward(us[i], *_scan_args(x_dbl, delta, z, i, p), True, bool(i),
                        out=out.transpose(1, 2), out_scale=0.5, accumulate=bool(i))
    return out, x_dbl


@bimamba.register_fake
def _(xz, dt_proj_weight, conv_weight, conv_bias, x_proj_weight, *params_and_backend):
    return (xz.new_empty(xz.shape[0], xz.shape[1], xz.shape[2] // 2),
            xz.new_empty(2, xz.shape[0], xz.shape[1], x_proj_weight.shape[0]))


class Accumulators(NamedTuple):
    """The buffers that kernels add into, all zeroed by one launch: both directions' d(B, C)
    (2, B, L, 2N), and per direction dA, dD, d dt_proj bias and the conv's dW and db."""
    dbc: Tensor
    per_direction: List[Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]]


def _accumulators(dx_dbl: Tensor, directions: Sequence[Direction]
                  ) -> Tuple[Accumulators, List[Tensor]]:
    """The accumulators and the dense tensors to zero for them. dB and dC go into dx_dbl's
    last 2N channels where it is at least fp32 (the precision of the scan's sums; dx_dbl is
    then zeroed whole), else into an fp32 block of their own, cast into dx_dbl after."""
    f32, state = torch.float32, directions[0].A.shape[1]
    if torch.promote_types(dx_dbl.dtype, f32) == dx_dbl.dtype:
        dbc, zeroed = dx_dbl[..., -2 * state:], [dx_dbl]
    else:
        dbc = dx_dbl.new_empty(*dx_dbl.shape[:3], 2 * state, dtype=f32)
        zeroed = [dbc]
    per_direction = []
    for p in directions:
        conv = torch.promote_types(p.conv_weight.dtype, f32)
        bufs = (p.A.new_empty(p.A.shape, dtype=f32), p.D.new_empty(p.D.shape, dtype=f32),
                p.D.new_empty(p.D.shape, dtype=f32),
                p.conv_weight.new_empty(p.conv_weight.shape, dtype=conv),
                p.conv_bias.new_empty(p.conv_bias.shape, dtype=conv))
        per_direction.append(bufs)
        zeroed += bufs
    return Accumulators(dbc, per_direction), zeroed


@torch.library.custom_op("mambar::bimamba_backward", mutates_args=())
def bimamba_backward(dout: Tensor, xz: Tensor, x_dbl: Tensor, dt_proj_weight: Tensor,
                     conv_weight: Tensor, conv_bias: Tensor, x_proj_weight: Tensor,
                     dt_proj_bias: Tensor, A: Tensor, D: Tensor, conv_weight_b: Tensor,
                     conv_bias_b: Tensor, x_proj_weight_b: Tensor, dt_proj_bias_b: Tensor,
                     A_b: Tensor, D_b: Tensor, backend: str) -> List[Tensor]:
    """Gradients of ``bimamba``'s mean for its tensor inputs, in their order and dtypes: dxz
    in xz's layout (B, L, 2E), both directions' dx and dz added in place; the conv and delta
    are recomputed, x_proj's output is the forward's."""
    directions = _directions((conv_weight, conv_bias, x_proj_weight, dt_proj_bias, A, D,
                              conv_weight_b, conv_bias_b, x_proj_weight_b, dt_proj_bias_b,
                              A_b, D_b))
    x, z = _halves(xz)
    dxz = torch.empty_like(xz)
    dx, dz = _halves(dxz)
    dy = dout.transpose(1, 2)
    _, backward = scan_kernels(backend, xz.device)
    conv_forward, conv_backward = conv_kernels(backend, x)
    rank, state = dt_proj_weight.shape[2], A.shape[1]
    dx_dbl = torch.empty_like(x_dbl)
    acc, zeroed = _accumulators(dx_dbl, directions)
    torch._foreach_zero_(zeroed)
    with without_autocast(xz.device):
        with torch.profiler.record_function(RECOMPUTE_RANGE):
            us = [conv_forward(x, p.conv_weight, p.conv_bias, bool(i))
                  for i, p in enumerate(directions)]
            delta = _delta(x_dbl, dt_proj_weight)
        ddelta = torch.empty_like(delta)
        dus = []
        for i, p in enumerate(directions):
            da, dd, dbias = acc.per_direction[i][:3]
            db, dc = _channels(acc.dbc, i).split([state, state], dim=1)
            with torch.profiler.record_function(SCAN_BACKWARD_RANGE):
                # The first direction writes dz, the second adds into it.
                dus.append(backward(
                    us[i], *_scan_args(x_dbl, delta, z, i, p), dy, True, bool(i),
                    dout_scale=0.5, ddelta=_channels(ddelta, i), dz=dz,
                    dz_accumulate=bool(i), dB=db, dC=dc, dA=da, dD=dd,
                    ddelta_bias=dbias)[0])
        # Back through delta = W_dt dt for both directions at once: W_dt's gradient
        # (2, E, R) and d dt into dx_dbl's first R channels.
        ddt_proj = torch.bmm(_stacked_tokens(ddelta).transpose(1, 2),
                             _stacked_tokens(x_dbl[..., :rank]))
        torch.bmm(_stacked_tokens(ddelta), dt_proj_weight.to(ddelta.dtype),
                  out=_stacked_tokens(dx_dbl[..., :rank]))
        if acc.dbc.dtype != dx_dbl.dtype:
            dx_dbl[..., rank:].copy_(acc.dbc)
        grads = [dxz, ddt_proj.to(dt_proj_weight.dtype)]
        # Back through (dt, B, C) = W_x u and the conv, one direction at a time.
        for i, p in enumerate(directions):
            u, d_x_dbl = us[i], _channels(dx_dbl, i)
            dx_proj = _weight_grad(d_x_dbl, u)
            du = _add_channel_matmul(dus[i].to(u.dtype), p.x_proj_weight.t(), d_x_dbl)
            da, dd, dbias, dconv_weight, dconv_bias = acc.per_direction[i]
            conv_backward(du, x, p.conv_weight, p.conv_bias, bool(i), dx=dx,
                          accumulate=bool(i), dweight=dconv_weight, dbias=dconv_bias)
            grads += [g.to(t.dtype).contiguous() for g, t in zip(
                (dconv_weight, dconv_bias, dx_proj, dbias, da, dd), p)]
    return grads


@bimamba_backward.register_fake
def _(dout, xz, x_dbl, *params_and_backend):
    return [torch.empty_like(xz)] + [t.new_empty(t.shape) for t in params_and_backend[:-1]]


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], output[1], *inputs[1:-1])
    ctx.backend = inputs[-1]
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, _):
    grads = torch.ops.mambar.bimamba_backward(dout, *ctx.saved_tensors, ctx.backend)
    return (*grads, None)


bimamba.register_autograd(_backward, setup_context=_setup_context)
