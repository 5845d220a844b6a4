"""The selective-scan backends against the sequential oracle."""
import pytest
import torch

import selective_scan as ss

ARG_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(batch=2, dim=6, state=4, length=9, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, offset=0.0):
        t = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + offset
        return t.to(dtype=dtype, device=device).requires_grad_()

    u = rand(batch, dim, length)
    delta = rand(batch, dim, length, scale=0.5)
    A = (-torch.rand(dim, state, generator=gen, dtype=torch.float64) * 2 - 0.2)
    A = A.to(dtype=torch.float32 if dtype != torch.float64 else dtype,
             device=device).requires_grad_()
    B = rand(batch, state, length)
    C = rand(batch, state, length)
    D = rand(dim)
    z = rand(batch, dim, length)
    delta_bias = rand(dim, scale=0.3, offset=-1.0)
    return [u, delta, A, B, C, D, z, delta_bias]


def run_with_grads(scan, args, reverse, out_grad=None):
    out = scan(*args, delta_softplus=True, reverse=reverse)
    if out_grad is None:
        out_grad = torch.randn_like(out.float(), generator=torch.Generator().manual_seed(7)
                                    if out.device.type == "cpu" else None).to(out.dtype)
    used = [a for a in args if a is not None]
    grads = torch.autograd.grad(out, used, out_grad)
    return out, grads, out_grad


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("optional", ["all", "no_D", "no_z", "no_bias"])
def test_torch_matches_reference_fp32(reverse, optional):
    args = make_inputs()
    drop = {"no_D": 5, "no_z": 6, "no_bias": 7}.get(optional)
    if drop is not None:
        args[drop] = None
    ref_out, ref_grads, g = run_with_grads(ss.selective_scan_reference, args, reverse)
    out, grads, _ = run_with_grads(ss.selective_scan_torch, args, reverse, g)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    names = [n for n, a in zip(ARG_NAMES, args) if a is not None]
    for name, got, want in zip(names, grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"grad of {name}")


@pytest.mark.parametrize("reverse", [False, True])
def test_torch_inference_path_matches_reference(reverse):
    args = make_inputs(length=12)
    with torch.no_grad():
        got = ss.selective_scan_torch(*args, reverse=reverse)
        want = ss.selective_scan_reference(*args, reverse=reverse)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reverse", [False, True])
def test_torch_gradcheck_float64(reverse):
    args = make_inputs(batch=1, dim=3, state=2, length=5, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda *a: ss.selective_scan_torch(*a, delta_softplus=True, reverse=reverse), args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_softplus_matches_torch(dtype):
    x = torch.cat([torch.linspace(-120, 120, 2000), torch.randn(1000) * 4]).to(dtype)
    x = x.reshape(3, 1000, 1).permute(2, 0, 1)   # strided, as the scan passes delta
    want = torch.nn.functional.softplus(x)
    got = ss._softplus(x)
    assert got.dtype == dtype
    tiny = torch.finfo(dtype).tiny
    rel = ((got - want).abs() / want.abs().clamp_min(tiny)).max().item()
    assert rel < 4 * torch.finfo(dtype).eps


def test_reverse_equals_flipped_forward():
    args = make_inputs()
    u, delta, A, B, C, D, z, bias = args
    flip = lambda t: t.flip(-1)  # noqa: E731
    want = ss.selective_scan_reference(flip(u), flip(delta), A, flip(B), flip(C), D, flip(z),
                                       bias).flip(-1)
    got = ss.selective_scan_torch(u, delta, A, B, C, D, z, bias, reverse=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_reference_matches_closed_form_first_steps():
    """Two tokens by hand: h1 = dt1*B1*u1, h2 = exp(dt2*A)*h1 + dt2*B2*u2."""
    u, delta, A, B, C, D, z, bias = [a.detach() for a in make_inputs(1, 2, 3, 2)]
    dt = torch.nn.functional.softplus(delta + bias[:, None])[0]
    h1 = dt[:, 0, None] * B[0, None, :, 0] * u[0, :, 0, None]
    h2 = torch.exp(dt[:, 1, None] * A) * h1 + dt[:, 1, None] * B[0, None, :, 1] * u[0, :, 1, None]
    y = torch.stack([(h1 * C[0, None, :, 0]).sum(-1), (h2 * C[0, None, :, 1]).sum(-1)], -1)
    want = (y + D[:, None] * u[0]) * torch.nn.functional.silu(z[0])
    got = ss.selective_scan_reference(u, delta, A, B, C, D, z, bias)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reverse", [False, True])
def test_torch_bf16_close_to_fp32(reverse):
    args32 = make_inputs(length=16)
    args16 = [a.detach().to(torch.bfloat16).requires_grad_() if a.dtype == torch.float32
              and a.dim() == 3 else a for a in args32]
    out16 = ss.selective_scan_torch(*args16, reverse=reverse)
    assert out16.dtype == torch.bfloat16
    rounded = [a.detach().float() if a.dtype == torch.bfloat16 else a for a in args16]
    want = ss.selective_scan_reference(*rounded, reverse=reverse)
    torch.testing.assert_close(out16.float(), want, rtol=2e-2, atol=2e-2)
    out16.float().sum().backward()
    assert all(a.grad is not None and torch.isfinite(a.grad).all() for a in args16)
    assert args16[0].grad.dtype == torch.bfloat16


def test_backend_resolution(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(ss.ENV_VAR, raising=False)
    assert ss.requested_backend(None) == "auto"
    assert ss.resolve_backend("auto", cpu) == "torch"
    monkeypatch.setenv(ss.ENV_VAR, "reference")
    assert ss.requested_backend(None) == "reference"
    assert ss.requested_backend("torch") == "torch"
    with pytest.raises(ValueError, match="unknown scan backend 'fast'"):
        ss.requested_backend("fast")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        ss.resolve_backend("cuda", cpu)
    assert ss.get_scan("torch") is ss.selective_scan_torch


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["torch", "cuda", "triton"])
def test_gpu_backends_match_torch_cpu_oracle(backend, dtype):
    if backend == "cuda" and not ss.cuda_kernels_available():
        pytest.skip("mamba-ssm kernels not installed")
    if backend == "triton" and not ss.triton_available():
        pytest.skip("triton backend unavailable")
    cpu_args = make_inputs(batch=2, dim=64, state=16, length=70)
    dev_args = [a.detach().to("cuda", a.dtype if a.dim() < 3 or dtype == torch.float32 else dtype)
                .requires_grad_() for a in cpu_args]
    ref_args = [a.detach().cpu().float().requires_grad_() for a in dev_args]
    tol = dict(rtol=1e-3, atol=1e-3) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    for reverse in (False, True):
        want, want_grads, g = run_with_grads(ss.selective_scan_torch, ref_args, reverse)
        got, got_grads, _ = run_with_grads(ss.get_scan(backend), dev_args, reverse,
                                           g.to("cuda", dtype))
        torch.testing.assert_close(got.float().cpu(), want, **tol)
        for name, a, b in zip(ARG_NAMES, got_grads, want_grads):
            scale = b.abs().max().clamp(min=1.0)
            torch.testing.assert_close(a.float().cpu() / scale, b / scale, **tol,
                                       msg=f"{backend} grad of {name} (reverse={reverse})")
