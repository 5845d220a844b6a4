"""The mixer's custom op (both scan directions: conv, projections, scans, their average)
against the spec's math under plain autograd, for every scan backend that runs here; what it
keeps; its registration."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

import selective_scan as ss
from helpers import fake_causal_conv1d, fake_cuda_extension, triton_interpreted
from selective_scan import cuda_kernels, mixer_op

E, N, R, K = 12, 4, 2, 4          # channels, states, dt rank, conv width
# One direction's parameters as the mixer holds them.
PARAMS = ("conv_weight", "conv_bias", "x_proj_weight", "dt_proj_weight", "dt_proj_bias",
          "A_log", "D")


def make_inputs(batch=2, length=9, dtype=torch.float64, seed=0):
    """in_proj's output xz (B, L, 2E) and the two directions' parameters."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, offset=0.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
                + offset).to(dtype)

    def direction():
        params = dict(conv_weight=rand(E, 1, K, scale=0.5), conv_bias=rand(E, scale=0.1),
                      x_proj_weight=rand(R + 2 * N, E, scale=0.3), dt_proj_weight=rand(E, R),
                      dt_proj_bias=rand(E, scale=0.3, offset=-1.0),
                      A_log=torch.log(torch.rand(E, N, generator=gen, dtype=torch.float64) * 3
                                      + 0.5).to(dtype),
                      D=rand(E))
        return {k: params[k].requires_grad_() for k in PARAMS}

    xz = rand(batch, length, 2 * E).requires_grad_()
    return xz, direction(), direction()


def split_xz(xz):
    x, z = xz.transpose(1, 2).chunk(2, dim=1)
    return x, z


def spec_causal_conv_silu(x, weight, bias):
    """SiLU(causal depthwise conv) as the spec writes it: pad K - 1 tokens on the left."""
    return F.silu(F.conv1d(F.pad(x, (weight.shape[-1] - 1, 0)), weight, bias, groups=x.shape[1]))


def spec_direction(x, z, p, reverse):
    """The spec written out: the backward direction is the forward one on flipped copies."""
    if reverse:
        x, z = x.flip(-1), z.flip(-1)
    u = spec_causal_conv_silu(x, p["conv_weight"], p["conv_bias"])
    dt, b, c = torch.einsum("oi,bil->bol", p["x_proj_weight"], u).split([R, N, N], dim=1)
    delta = torch.einsum("er,brl->bel", p["dt_proj_weight"], dt)
    # As the official mixer: A, D and the dt bias go to the scan in fp32.
    y = ss.selective_scan_reference(u, delta, -torch.exp(p["A_log"].float()), b, c,
                                    p["D"].float(), z, p["dt_proj_bias"].float(),
                                    delta_softplus=True)
    return y.flip(-1) if reverse else y


def spec_bimamba(xz, forward, backward):
    """Both directions' mean, (B, L, E) as out_proj reads it."""
    x, z = split_xz(xz)
    y = (spec_direction(x, z, forward, False) + spec_direction(x, z, backward, True)) / 2
    return y.transpose(1, 2)


def op_args(xz, forward, backward):
    """The op's tensor arguments from the parameters (``MixerWeights``' work, here by
    autograd): both dt_proj weights stacked, A = -exp(A_log) in fp32."""
    def direction(p):
        return [p["conv_weight"], p["conv_bias"], p["x_proj_weight"], p["dt_proj_bias"],
                -torch.exp(p["A_log"].float()), p["D"]]
    return [xz, torch.stack([forward["dt_proj_weight"], backward["dt_proj_weight"]]),
            *direction(forward), *direction(backward)]


def run_op(xz, forward, backward, backend):
    out, _ = mixer_op.bimamba(*op_args(xz, forward, backward), backend)
    return out


def leaves_of(xz, forward, backward):
    return [xz, *forward.values(), *backward.values()]


def leaf_names():
    return ["xz"] + [f"{k}{suffix}" for suffix in ("", "_b") for k in PARAMS]


# What the ``torch`` backend runs on the CPU (compiled with Numba, or the PyTorch loop without
# it), mamba-ssm's kernels with the oracle standing in, and the Triton kernels (plain and
# Gluon), interpreted.
IMPLS = ["compiled", "loop", "cuda", pytest.param("triton", marks=pytest.mark.kernels),
         pytest.param("gluon", marks=pytest.mark.kernels)]


@pytest.mark.parametrize("impl", IMPLS)
def test_op_matches_the_spec_with_every_gradient(monkeypatch, request, impl):
    backend, dtype, tol = "torch", torch.float64, dict(rtol=1e-7, atol=1e-9)
    calls = []
    if impl == "loop":
        monkeypatch.setattr(ss, "_load_cpu_scan", lambda: None)
    elif impl == "cuda":
        # The stand-in gates in fp32, as the kernel does.
        backend, tol = "cuda", dict(rtol=1e-5, atol=1e-6)
        monkeypatch.setattr(cuda_kernels, "load_scan_extension",
                            lambda: fake_cuda_extension(calls))

        def conv(*args, **kwargs):
            calls.append("conv")
            return fake_causal_conv1d(*args, **kwargs)
        for module in (cuda_kernels, mixer_op):
            monkeypatch.setattr(module, "load_causal_conv1d", lambda: conv)
    elif impl in ("triton", "gluon"):
        if not triton_interpreted():
            pytest.skip("Triton is not running in its interpreter here")
        backend, dtype, tol = "triton", torch.float32, dict(rtol=1e-4, atol=1e-5)
        if impl == "gluon":
            pytest.importorskip("triton.experimental.gluon")
            import triton
            from gluon_interpreter import interpreted
            from selective_scan import gluon_kernels
            # The triton backend's choice on an sm_90+ GPU, with one candidate per kernel.
            monkeypatch.setattr(ss, "_triton_kernels_module", lambda device: ".gluon_kernels")
            stack = contextlib.ExitStack()
            request.addfinalizer(stack.close)
            stack.enter_context(interpreted(gluon_kernels, {
                "_scan_fwd": triton.Config({"BLOCK_L": 16}, num_warps=1),
                "_scan_bwd": triton.Config({"BLOCK_L": 8}, num_warps=1)}))
    xz, forward, backward = make_inputs(length=21, dtype=dtype)
    want = spec_bimamba(xz, forward, backward)
    got = run_op(xz, forward, backward, backend)
    # (B, L, E) as out_proj reads it, whatever the backend.
    assert got.dtype == dtype and got.is_contiguous()
    torch.testing.assert_close(got, want, **tol)
    g = torch.randn_like(want)
    leaves = leaves_of(xz, forward, backward)
    got_grads = torch.autograd.grad(got, leaves, g)
    assert got_grads[0].is_contiguous()     # dxz in in_proj's layout, no copy after
    for name, a, b in zip(leaf_names(), got_grads, torch.autograd.grad(want, leaves, g)):
        torch.testing.assert_close(a, b, **tol, msg=f"{impl}: gradient of {name}")
    if impl == "cuda":
        # Both directions' conv kernels, then their scans, in the forward and again in the
        # backward's recompute; there each scan's forward kernel runs again before its
        # backward.
        assert calls == ["conv", "conv", "fwd", "fwd", "conv", "conv", "fwd", "bwd", "fwd",
                         "bwd"]


def test_op_keeps_its_inputs_and_the_x_proj_output_for_the_backward():
    """xz (in_proj's output), the weights and x_proj's output (dt, B, C; R + 2N channels):
    not u, delta, the conv's pre-activation or dt_proj's product, each redone in the
    backward."""
    xz, forward, backward = make_inputs()
    args = op_args(xz, forward, backward)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        out, x_dbl = mixer_op.bimamba(*args, "torch")
    assert x_dbl.shape == (2, xz.shape[0], xz.shape[1], R + 2 * N)
    storages = {t.untyped_storage().data_ptr() for t in kept}
    allowed = {t.untyped_storage().data_ptr() for t in (*args, x_dbl)}
    assert storages == allowed
    assert out.grad_fn is not None and not x_dbl.requires_grad


def test_op_registration_passes_torch_library_opcheck():
    """Schema, fake (shape-only) implementation, autograd registration and AOT dispatch, as
    torch.compile will use them."""
    xz, forward, backward = make_inputs(dtype=torch.float32)
    args = [t.detach().requires_grad_() for t in op_args(xz, forward, backward)]
    torch.library.opcheck(mixer_op.bimamba, (*args, "torch"))
    with torch.no_grad():
        dout = torch.randn(xz.shape[0], xz.shape[1], E)
        _, x_dbl = mixer_op.bimamba(*args, "torch")
    torch.library.opcheck(mixer_op.bimamba_backward,
                          (dout, args[0].detach(), x_dbl, *(t.detach() for t in args[1:]),
                           "torch"))


def test_op_under_bf16_autocast_returns_input_dtypes():
    """Under autocast xz arrives in bf16 (in_proj's output) and the weights in fp32: the
    output is bf16 and every gradient comes back in its input's dtype."""
    xz, forward, backward = make_inputs(dtype=torch.float32)
    xz_bf16 = xz.detach().bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run_op(xz_bf16, forward, backward, "torch")
    assert got.dtype == torch.bfloat16
    leaves = leaves_of(xz_bf16, forward, backward)
    grads = torch.autograd.grad(got.float(), leaves, torch.ones(got.shape))
    assert [g.dtype for g in grads] == [torch.bfloat16] + [torch.float32] * (len(leaves) - 1)
    want = spec_bimamba(xz, forward, backward)
    torch.testing.assert_close(got.float(), want, rtol=5e-2, atol=5e-2)


def test_backend_without_kernels_is_refused():
    xz, forward, backward = make_inputs()
    with pytest.raises(ValueError, match="reference"):
        run_op(xz, forward, backward, "reference")


def spec_conv_silu(x, weight, bias, reverse):
    """SiLU(causal depthwise conv), the anti-causal twin as flip -> conv -> flip."""
    if reverse:
        return spec_causal_conv_silu(x.flip(-1), weight, bias).flip(-1)
    return spec_causal_conv_silu(x, weight, bias)


@pytest.mark.skipif(not ss.compiled_cpu_scan_available(), reason="numba not installed")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("length", [1, 3, 4, 17])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_compiled_conv_matches_the_spec_with_every_gradient(dtype, length, reverse):
    """The Numba conv + SiLU the ``torch`` backend runs on the CPU: lengths shorter than the
    conv, 70 channels (a whole block of 64 and a padded one), x a channel-minor view."""
    from selective_scan import cpu_numba
    gen = torch.Generator().manual_seed(length)
    channels = 70
    xz = torch.randn(3, length, 2 * channels, generator=gen, dtype=torch.float64).to(dtype)
    x = xz[..., :channels].transpose(1, 2).requires_grad_()
    weight = (torch.randn(channels, 1, K, generator=gen, dtype=torch.float64) * 0.5
              ).to(dtype).requires_grad_()
    bias = torch.randn(channels, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    want = spec_conv_silu(x, weight, bias, reverse)
    du = torch.randn(want.shape, generator=gen, dtype=torch.float64).to(dtype)
    want_grads = torch.autograd.grad(want, (x, weight, bias), du)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    got = cpu_numba.conv_silu_forward(x.detach(), weight.detach(), bias.detach(), reverse)
    # u comes out channel-minor, the layout the projections and the scan read fastest.
    assert got.dtype == dtype and got.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(got, want, **tol)
    for du_layout in (du, du.transpose(1, 2).contiguous().transpose(1, 2)):
        got_grads = cpu_numba.conv_silu_backward(du_layout, x.detach(), weight.detach(),
                                                 bias.detach(), reverse)
        for name, a, b in zip(("x", "weight", "bias"), got_grads, want_grads):
            assert a.shape == b.shape and a.dtype == dtype
            torch.testing.assert_close(a, b, **tol, msg=f"gradient of {name}")


@pytest.mark.skipif(not ss.compiled_cpu_scan_available(), reason="numba not installed")
def test_cpu_conv_is_the_compiled_one_where_it_applies(monkeypatch):
    """The ``torch`` backend on fp32/fp64 CPU tensors runs the Numba conv; bf16 (no Numba
    type) and a machine without the compiled scan run PyTorch's."""
    from selective_scan import cpu_numba
    x = torch.zeros(1, 2, 3)
    for dtype in (torch.float32, torch.float64):
        assert mixer_op.conv_kernels("torch", x.to(dtype))[0] is cpu_numba.conv_silu_forward
    assert mixer_op.conv_kernels("torch", x.bfloat16())[0] is mixer_op.conv_silu
    monkeypatch.setattr(ss, "_load_cpu_scan", lambda: None)
    assert mixer_op.conv_kernels("torch", x)[0] is mixer_op.conv_silu


@pytest.mark.parametrize("channel_minor", [False, True], ids=["channels-first", "channel-minor"])
def test_projections_keep_the_layout_they_are_given(channel_minor):
    """channel_matmul answers in its input's layout (channel-minor from the compiled CPU
    kernels, channels-first elsewhere) and, with the weight gradient, equals einsum's sums."""
    gen = torch.Generator().manual_seed(0)
    layout = ((lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)) if channel_minor
              else (lambda t: t))
    x = layout(torch.randn(3, 5, 7, generator=gen, dtype=torch.float64))
    dout = layout(torch.randn(3, 4, 7, generator=gen, dtype=torch.float64))
    weight = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    got = mixer_op.channel_matmul(weight, x)
    torch.testing.assert_close(got, torch.einsum("oi,bil->bol", weight, x))
    assert got.transpose(1, 2).is_contiguous() == channel_minor
    torch.testing.assert_close(mixer_op._weight_grad(dout, x),
                               torch.einsum("bol,bil->oi", dout, x))
