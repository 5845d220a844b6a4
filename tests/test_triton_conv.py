"""The fused depthwise conv1d + SiLU of triton_conv.py against a plain-PyTorch reference.

On a machine without CUDA the kernels run under Triton's interpreter (set before triton is
imported), so sizes are tiny; the interpreter config (BLOCK_E 16, BLOCK_L 8, TILES 2) makes
E = 24 two channel blocks (one partial) and L = 17 three time tiles in two segments.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.kernels
triton = pytest.importorskip("triton")
from selective_scan import triton_conv as ct  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (B, E, L, K): L < K (1 and 2 < 3), odd L, E below one channel block and 1.5 blocks, L over
# one segment of the in-kernel tile loop.
CASES = [(2, 5, 1, 4), (2, 5, 3, 4), (2, 24, 17, 4), (2, 5, 2, 3), (2, 24, 5, 3),
         (2, 24, 17, 3)]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5),
       torch.bfloat16: dict(rtol=1e-2, atol=1e-3),
       torch.float16: dict(rtol=2e-3, atol=1e-4)}


def reference(x: torch.Tensor, weight: torch.Tensor, bias, reverse: bool) -> torch.Tensor:
    """SiLU of the depthwise conv by F.conv1d: pad K-1 both sides and keep the first L
    outputs (causal); reverse is flip -> causal -> flip, the definition the kernel must
    match without flipping."""
    if reverse:
        return reference(x.flip(-1), weight, bias, False).flip(-1)
    K, L = weight.shape[-1], x.shape[-1]
    return F.silu(F.conv1d(x, weight, bias, padding=K - 1, groups=x.shape[1])[..., :L])


def reference_grads(du, x, weight, bias, reverse):
    """(u, dx, dW, db) of the reference in fp64, from the same (possibly rounded) inputs."""
    leaves = [t.detach().double().requires_grad_() for t in (x, weight)]
    b = None if bias is None else bias.detach().double().requires_grad_()
    u = reference(leaves[0], leaves[1], b, reverse)
    u.backward(du.double())
    return u.detach(), leaves[0].grad, leaves[1].grad, None if b is None else b.grad


def make(B, E, L, K, dtype=torch.float32, bias=True, seed=0):
    """x as the model has it: the channel-minor first half of (B, L, 2E) viewed as
    (B, 2E, L). The other half is NaN: any read outside x's elements poisons the result."""
    g = torch.Generator().manual_seed(seed)
    xz = torch.randn(B, L, 2 * E, generator=g).to(dtype)
    xz[..., E:] = float("nan")
    x = xz.to(DEVICE).transpose(1, 2).chunk(2, dim=1)[0]
    w = (torch.randn(E, 1, K, generator=g) * 0.5).to(dtype).to(DEVICE)
    b = torch.randn(E, generator=g).to(dtype).to(DEVICE) if bias else None
    du = torch.randn(B, E, L, generator=g).to(dtype).to(DEVICE)
    return x, w, b, du


def close(actual, expected, dtype):
    torch.testing.assert_close(actual.double().cpu(), expected.cpu(), **TOL[dtype])


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}E{}L{}K{}".format(*c))
def test_forward_fp32(case, reverse):
    *shape, K = case
    x, w, b, _ = make(*shape, K)
    assert x.stride() == (shape[2] * 2 * shape[1], 1, 2 * shape[1])  # the model's view
    u = ct.conv_silu_forward(x, w, b, reverse)
    close(u, reference_grads(torch.zeros_like(u), x, w, b, reverse)[0], torch.float32)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}E{}L{}K{}".format(*c))
def test_backward_fp32(case, reverse):
    *shape, K = case
    x, w, b, du = make(*shape, K)
    dx, dw, db = ct.conv_silu_backward(du, x, w, b, reverse)
    _, rdx, rdw, rdb = reference_grads(du, x, w, b, reverse)
    close(dx, rdx, torch.float32)
    close(dw, rdw, torch.float32)
    close(db, rdb, torch.float32)
    assert dw.shape == w.shape and dw.dtype == w.dtype and db.dtype == b.dtype


@pytest.mark.parametrize("reverse", [False, True])
def test_contiguous_input(reverse):
    """A plain (B, E, L) input works too, and u / dx follow its layout by default."""
    x, w, b, du = make(2, 24, 17, 4)
    x = x.contiguous()
    u = ct.conv_silu_forward(x, w, b, reverse)
    dx, dw, db = ct.conv_silu_backward(du, x, w, b, reverse)
    ru, rdx, rdw, rdb = reference_grads(du, x, w, b, reverse)
    assert u.is_contiguous() and dx.is_contiguous()
    for a, r in ((u, ru), (dx, rdx), (dw, rdw), (db, rdb)):
        close(a, r, torch.float32)


@pytest.mark.parametrize("reverse", [False, True])
def test_no_bias(reverse):
    x, w, _, du = make(2, 24, 17, 4, bias=False)
    u = ct.conv_silu_forward(x, w, None, reverse)
    dx, dw, db = ct.conv_silu_backward(du, x, w, None, reverse)
    ru, rdx, rdw, _ = reference_grads(du, x, w, None, reverse)
    assert db is None
    for a, r in ((u, ru), (dx, rdx), (dw, rdw)):
        close(a, r, torch.float32)


@pytest.mark.parametrize("dtype,reverse", [(torch.bfloat16, False), (torch.bfloat16, True),
                                           (torch.float16, True)])
def test_half_precision(dtype, reverse):
    """Half inputs against the fp64 reference of the same rounded values: the kernels work
    in fp32 and round once on the way out, so only output rounding separates them."""
    x, w, b, du = make(2, 24, 17, 4, dtype=dtype)
    u = ct.conv_silu_forward(x, w, b, reverse)
    dx, dw, db = ct.conv_silu_backward(du, x, w, b, reverse)
    ru, rdx, rdw, rdb = reference_grads(du, x, w, b, reverse)
    for a, r in ((u, ru), (dx, rdx), (dw, rdw), (db, rdb)):
        assert a.dtype == dtype
        close(a, r, dtype)


class _Recorder:
    """Stands in for an autotuned kernel: records the arguments of each launch."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(args)
            return self.kernel[grid](*args, **kwargs)
        return launch


def test_layouts_no_copy(monkeypatch):
    """The kernels get the caller's strided views themselves (no contiguous copy) and u
    comes back in the requested layout; the NaN half of xz proves nothing else is read."""
    B, E, L = 2, 24, 17
    x, w, b, du = make(B, E, L, 4)
    fwd = _Recorder(ct._conv_silu_fwd_kernel)
    bwd = _Recorder(ct._conv_silu_bwd_kernel)
    monkeypatch.setattr(ct, "_conv_silu_fwd_kernel", fwd)
    monkeypatch.setattr(ct, "_conv_silu_bwd_kernel", bwd)
    expected = reference(x.double(), w.double(), b.double(), False)
    for channel_minor, strides in ((True, (L * E, 1, E)), (False, (E * L, L, 1)),
                                   (None, (L * E, 1, E))):  # None: x's layout
        u = ct.conv_silu_forward(x, w, b, False, channel_minor=channel_minor)
        assert u.stride() == strides
        assert fwd.calls[-1][0] is x and fwd.calls[-1][3] is u
        close(u, expected, torch.float32)
    du = du.transpose(1, 2).contiguous().transpose(1, 2)  # channel-minor du
    dx, _, _ = ct.conv_silu_backward(du, x, w, b, False)
    assert bwd.calls[0][0] is x and bwd.calls[0][3] is du and bwd.calls[0][4] is dx
    assert dx.stride() == (L * E, 1, E)  # x's (channel-minor) layout, dense
    close(dx, reference_grads(du, x, w, b, False)[1], torch.float32)


@pytest.mark.parametrize("half,reverse", [(0, False), (1, True)])
def test_backward_into_buffer_slice(half, reverse):
    """dx lands in one half of a (B, L, 2E) gradient buffer, the other half untouched; du is
    a non-contiguous view (every other token of a longer tensor, channel-minor)."""
    B, E, L = 2, 24, 17
    x, w, b, du = make(B, E, L, 4)
    big = torch.randn(B, 2 * L, E, dtype=torch.float32, device=DEVICE)
    big[:, ::2] = du.transpose(1, 2)
    du_view = big[:, ::2].transpose(1, 2)
    assert not du_view.is_contiguous() and du_view.stride(2) == 2 * E
    buf = torch.full((B, L, 2 * E), 7.0, device=DEVICE)
    target = buf.transpose(1, 2).chunk(2, dim=1)[half]
    dx, dw, db = ct.conv_silu_backward(du_view, x, w, b, reverse, dx=target)
    assert dx is target
    _, rdx, rdw, rdb = reference_grads(du, x, w, b, reverse)
    close(buf.transpose(1, 2)[:, half * E:(half + 1) * E], rdx, torch.float32)
    assert torch.all(buf.transpose(1, 2)[:, (1 - half) * E:(2 - half) * E] == 7.0)
    close(dw, rdw, torch.float32)
    close(db, rdb, torch.float32)


def test_backward_accumulates_into_dx():
    """The second direction adds its dx to the first's: the buffer holds both sums."""
    B, E, L = 2, 24, 17
    x, w, b, du = make(B, E, L, 4)
    buf = torch.zeros((B, L, 2 * E), device=DEVICE)
    target = buf.transpose(1, 2).chunk(2, dim=1)[0]
    ct.conv_silu_backward(du, x, w, b, False, dx=target)
    ct.conv_silu_backward(du, x, w, b, True, dx=target, accumulate=True)
    want = reference_grads(du, x, w, b, False)[1] + reference_grads(du, x, w, b, True)[1]
    close(target, want, torch.float32)
    with pytest.raises(ValueError, match="accumulate needs a dx"):
        ct.conv_silu_backward(du, x, w, b, True, accumulate=True)


def test_backward_adds_weight_gradients_into_given_buffers():
    """dW and db into zeroed fp32 buffers the caller gives (the mixer zeroes all of its
    buffers by one launch): returned as given, checked when malformed."""
    B, E, L = 2, 24, 17
    x, w, b, du = make(B, E, L, 4)
    dweight = torch.zeros(E, 1, 4, device=DEVICE)
    dbias = torch.zeros(E, device=DEVICE)
    _, dw, db = ct.conv_silu_backward(du, x, w, b, True, dweight=dweight, dbias=dbias)
    assert dw is dweight and db is dbias
    _, _, rdw, rdb = reference_grads(du, x, w, b, True)
    close(dw, rdw, torch.float32)
    close(db, rdb, torch.float32)
    with pytest.raises(ValueError, match="dweight"):
        ct.conv_silu_backward(du, x, w, b, dweight=torch.zeros(E, 4, device=DEVICE))
    with pytest.raises(ValueError, match="dbias"):
        ct.conv_silu_backward(du, x, w, b, dbias=torch.zeros(E, dtype=torch.float64,
                                                              device=DEVICE))


def test_forward_into_slice():
    """The lower-level launcher writes u through out's strides only."""
    B, E, L = 2, 5, 17
    x, w, b, _ = make(B, E, L, 4)
    buf = torch.full((B, L, 2 * E), 7.0, device=DEVICE)
    out = buf.transpose(1, 2)[:, E:]
    assert ct.conv_silu_forward_into(x, w, b, True, out) is out
    close(out, reference(x.double(), w.double(), b.double(), True), torch.float32)
    assert torch.all(buf[..., :E] == 7.0)


def test_bad_arguments():
    x, w, b, du = make(2, 5, 3, 4)
    with pytest.raises(ValueError):
        ct.conv_silu_forward(x, w[:4], b)
    with pytest.raises(ValueError):
        ct.conv_silu_forward(x, w, b[:4])
    with pytest.raises(ValueError):
        ct.conv_silu_backward(du[..., :2], x, w, b)
    with pytest.raises(ValueError):
        ct.conv_silu_backward(du, x, w, b, dx=torch.empty(2, 5, 4, device=DEVICE))
