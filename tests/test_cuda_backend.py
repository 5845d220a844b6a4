"""The ``cuda`` backend (mamba-ssm's selective scan, causal-conv1d's conv) against the Triton and
torch backends on a GPU: the mixer with both directions, and whole Mamba®-T and Vim-T models,
forward and every gradient, in fp32 and under bf16 autocast.

The scan alone is compared per backend in ``test_selective_scan.py``. These tests need a GPU
and ``requirements-cuda.txt``; they skip elsewhere. Errors are relative norms
(‖got - want‖ / ‖want‖) against the ``torch`` backend on the same GPU: the three backends
compute the same function with different summation orders, so fp32 agrees to ~1e-5 per op and
bf16 autocast to the rounding of its bf16 activations.
"""
import pytest
import timm
import torch

import models_mambar  # noqa: F401  (registers the models)
import models_vim  # noqa: F401
import selective_scan as ss
from selective_scan import cuda_kernels, mixer_op
from vision_mamba import BiMambaMixer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# Relative-norm tolerances: the mixer is one layer; the models stack 24 of them.
TOL = {
    "mixer": {torch.float32: 1e-4, torch.bfloat16: 2e-2},
    "model": {torch.float32: 2e-3, torch.bfloat16: 6e-2},
}


@pytest.fixture(autouse=True)
def needs_kernels():
    if not ss.cuda_kernels_available():
        pytest.skip("mamba-ssm kernels not installed (pip install -r requirements-cuda.txt)")
    if cuda_kernels.load_causal_conv1d() is None:
        pytest.skip("causal-conv1d not installed")


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm().clamp(min=1e-30)).item()


def set_backend(module: torch.nn.Module, backend: str) -> None:
    for m in module.modules():
        if isinstance(m, BiMambaMixer):
            m.scan_backend = backend


def run(module: torch.nn.Module, x: torch.Tensor, dout_seed: int, dtype: torch.dtype):
    """Output, d(input) and d(every parameter) for a fixed random output gradient."""
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = module(x)
    g = torch.Generator(device="cuda").manual_seed(dout_seed)
    dout = torch.randn(out.shape, generator=g, device="cuda", dtype=out.dtype)
    out.backward(dout)
    grads = {name: p.grad.detach().float().clone() for name, p in module.named_parameters()}
    grads["input"] = x.grad.detach().float().clone()
    return out.detach().float(), grads


def compare(module, x, dtype, tol):
    """Each GPU backend against ``torch``: output and every gradient within ``tol``. The
    errors are printed (pytest -rP shows them) so that a run records the margins."""
    results = {}
    for backend in ("torch", "triton", "cuda"):
        set_backend(module, backend)
        results[backend] = run(module, x, dout_seed=1, dtype=dtype)
    want_out, want_grads = results["torch"]
    for backend in ("triton", "cuda"):
        out, grads = results[backend]
        assert torch.isfinite(out).all(), f"{backend}: non-finite output"
        assert grads.keys() == want_grads.keys()
        errors = {"output": rel_err(out, want_out)}
        errors.update({f"grad {name}": rel_err(grads[name], want)
                       for name, want in want_grads.items()})
        worst = sorted(errors.items(), key=lambda kv: -kv[1])[:5]
        print(f"{backend} vs torch ({dtype}): output {errors['output']:.2e}; worst: "
              + ", ".join(f"{k} {v:.2e}" for k, v in worst))
        bad = [f"{k} {v:.2e}" for k, v in worst if not v < tol]
        assert not bad, f"{backend}: relative errors above {tol:.0e}: {', '.join(bad)}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_mixer_matches_across_backends(dtype):
    torch.manual_seed(0)
    mixer = BiMambaMixer(192).cuda()
    # Non-default parameters, so a backend that drops D, the bias or a direction's own
    # weights cannot agree by accident.
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 197, 192, device="cuda")
    compare(mixer, x, dtype, TOL["mixer"][dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", [
    "mambar_tiny_patch16_224",
    "vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2",
])
def test_model_logits_and_gradients_match_across_backends(name, dtype):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).cuda()
    x = torch.randn(2, 3, 224, 224, device="cuda")
    compare(model, x, dtype, TOL["model"][dtype])


def test_cuda_backend_calls_both_kernels(monkeypatch):
    """The cuda backend really runs mamba-ssm's scan and causal-conv1d's conv, once per
    direction each in the forward."""
    calls = {"scan": 0, "conv": 0}

    def counted(key, fn):
        def wrapper(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(cuda_kernels, "scan_forward",
                        counted("scan", cuda_kernels.scan_forward))
    monkeypatch.setattr(mixer_op, "causal_conv1d_silu",
                        counted("conv", cuda_kernels.causal_conv1d_silu))
    mixer = BiMambaMixer(64, scan_backend="cuda").cuda()
    with torch.no_grad():
        mixer(torch.randn(1, 33, 64, device="cuda"))
    assert calls == {"scan": 2, "conv": 2}


def test_cuda_backend_keeps_no_more_for_the_backward_than_triton():
    """What a forward leaves allocated for its backward (the graph's saved tensors) is no
    larger with mamba-ssm's kernels than with the Triton scan: the mixer's op keeps only its
    inputs with either."""
    torch.manual_seed(0)
    model = timm.create_model("mambar_tiny_patch16_224").cuda()
    x = torch.randn(16, 3, 224, 224, device="cuda")
    kept = {}
    for backend in ("triton", "cuda"):
        set_backend(model, backend)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x)
        torch.cuda.synchronize()
        kept[backend] = torch.cuda.memory_allocated() - before
        out.float().sum().backward()
        model.zero_grad(set_to_none=True)
        del out
    print(f"kept for the backward, MiB: {kept['triton'] / 2**20:.1f} (triton), "
          f"{kept['cuda'] / 2**20:.1f} (cuda)")
    assert kept["cuda"] <= 1.02 * kept["triton"]
