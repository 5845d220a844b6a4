"""The fused residual-add + RMSNorm (fused_norm.py) against an independent plain-torch
reference.

Without CUDA the kernels run under Triton's CPU interpreter (conftest.py sets
TRITON_INTERPRET=1) on tiny shapes. Rows get magnitudes from 1e-3 to 10, so that
in some rows eps dominates the mean square (a kernel that drops eps fails) and fp32 and
bf16 rounding are exercised at several scales.
"""
from typing import Optional, Tuple

import pytest
import torch

pytestmark = pytest.mark.kernels
triton = pytest.importorskip("triton")
import fused_norm as ar  # noqa: E402
from fused_norm import add_rms_norm  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
EPS = 1e-5
SHAPES = [(2, 5, 24), (3, 7, 192)]  # D not a power of two; 21 rows = 3 row blocks at D=192
DTYPES = [torch.float32, torch.bfloat16]
F32_REL = 1e-5
BF16_REL = 2.0 ** -7  # one bf16 ulp: the two sides may round an fp32 value differently


def make_inputs(shape: Tuple[int, ...], hidden_dtype: torch.dtype, with_residual: bool,
                seed: int = 0) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    scale = 10.0 ** (torch.rand(shape[:-1] + (1,), generator=g) * 4 - 3)
    hidden = (torch.randn(shape, generator=g) * scale).to(hidden_dtype)
    residual = torch.randn(shape, generator=g) * scale if with_residual else None
    weight = 1 + 0.5 * torch.randn(shape[-1], generator=g)
    to = lambda t: None if t is None else t.to(DEVICE).requires_grad_()  # noqa: E731
    return to(hidden), to(residual), to(weight)


def reference(hidden: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor,
              eps: float, out_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """Written out from the definition, sharing no code with the kernel module."""
    x = hidden.float() if residual is None else residual + hidden.float()
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return normed.to(out_dtype), x


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """|actual - expected| <= rel * (|expected| + max |expected| over its row). Rows are
    independent and their scales differ 1e4-fold here, so the absolute slack (entries near
    zero carry the error of the row's large ones, after cancellation) is per row: a
    global one would let a large row's slack hide an error in a small row."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    a, e = actual.detach().float(), expected.detach().float()
    slack = rel * (e.abs() + e.abs().amax(dim=-1, keepdim=True))
    excess = ((a - e).abs() / slack).max().item()
    assert excess <= 1, f"off by {excess:.3g}x the tolerance; max |diff| " \
                        f"{(a - e).abs().max().item():.3g}"


def rel_for(dtype: torch.dtype) -> float:
    return F32_REL if dtype == torch.float32 else BF16_REL


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("hidden_dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_forward(shape, hidden_dtype, out_dtype, with_residual):
    hidden, residual, weight = make_inputs(shape, hidden_dtype, with_residual)
    with torch.no_grad():
        normed, new_residual = add_rms_norm(hidden, residual, weight, EPS, out_dtype)
        ref_normed, ref_residual = reference(hidden, residual, weight, EPS, out_dtype)
    # one fp32 add on both sides: must be bit for bit, and never pass through bf16
    assert new_residual.dtype == torch.float32
    torch.testing.assert_close(new_residual, ref_residual, rtol=0, atol=0)
    assert_close(normed, ref_normed, rel_for(out_dtype))


def test_forward_matches_model_formula():
    """The model's own expression, through F.rms_norm."""
    hidden, residual, weight = make_inputs((2, 5, 24), torch.bfloat16, True, seed=1)
    with torch.no_grad():
        normed, new_residual = add_rms_norm(hidden, residual, weight, EPS, torch.bfloat16)
        x = residual + hidden.float()
        expected = torch.nn.functional.rms_norm(x, (24,), weight.float(), EPS)
    assert_close(normed, expected.to(torch.bfloat16), BF16_REL)


def test_forward_row_strided_input():
    """A view with a row stride (a slice of a wider tensor) is read in place."""
    hidden, residual, weight = make_inputs((2, 5, 48), torch.float32, True, seed=2)
    hidden, residual = hidden.detach()[..., :24], residual.detach()[..., 24:]
    weight = weight.detach()[:24]
    normed, new_residual = add_rms_norm(hidden, residual, weight, EPS, torch.float32)
    ref_normed, ref_residual = reference(hidden, residual, weight, EPS, torch.float32)
    torch.testing.assert_close(new_residual, ref_residual, rtol=0, atol=0)
    assert_close(normed, ref_normed, F32_REL)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("hidden_dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("residual_grad", [False, True])
def test_backward(shape, hidden_dtype, out_dtype, with_residual, residual_grad):
    hidden, residual, weight = make_inputs(shape, hidden_dtype, with_residual, seed=3)
    inputs = [t for t in (hidden, residual, weight) if t is not None]
    g = torch.Generator().manual_seed(4)
    d_normed = torch.randn(shape, generator=g).to(DEVICE, out_dtype)
    d_new_residual = torch.randn(shape, generator=g).to(DEVICE) if residual_grad else None

    def grads(fn):
        normed, new_residual = fn(hidden, residual, weight, EPS, out_dtype)
        if residual_grad:  # the gradient arriving along the residual stream
            return torch.autograd.grad((normed, new_residual), inputs,
                                       (d_normed, d_new_residual))
        return torch.autograd.grad(normed, inputs, d_normed)

    names = ("hidden", "residual", "weight") if with_residual else ("hidden", "weight")
    for got, want, name in zip(grads(add_rms_norm), grads(reference), names):
        assert got.dtype == want.dtype, name
        # d_residual is fp32 and tight: the residual stream's gradient never sees bf16
        rel = rel_for(got.dtype) if name == "hidden" else F32_REL
        assert_close(got, want, rel)


@pytest.mark.parametrize("block_m,num_programs", [(4, 1), (4, 3), (2, 100)])
def test_backward_launch_shapes(block_m, num_programs):
    """Partial last row block, several blocks per program, one block per program: the
    per-program d_weight partials must add up whatever the split."""
    shape = (3, 7, 24)
    hidden, residual, weight = make_inputs(shape, torch.float32, True, seed=5)
    g = torch.Generator().manual_seed(6)
    d_normed, d_new = (torch.randn(shape, generator=g).to(DEVICE) for _ in range(2))
    with torch.no_grad():
        normed, new_residual, rstd = ar._forward(hidden, residual, weight, EPS,
                                                 torch.float32, block_m=block_m)
        got = ar._backward(d_normed, d_new, new_residual, rstd, weight, torch.float32, True,
                           block_m=block_m, num_programs=num_programs)
    ref_normed, ref_residual = reference(hidden, residual, weight, EPS, torch.float32)
    assert_close(normed, ref_normed.detach(), F32_REL)
    want = torch.autograd.grad((ref_normed, ref_residual), (hidden, residual, weight),
                               (d_normed, d_new))
    for a, b in zip(got, want):
        assert_close(a, b, F32_REL)


def test_backward_expanded_gradient():
    """normed.sum() hands back a stride-0 gradient; the launcher must cope."""
    hidden, residual, weight = make_inputs((2, 5, 24), torch.float32, True, seed=7)
    got = torch.autograd.grad(add_rms_norm(hidden, residual, weight, EPS)[0].sum(),
                              (hidden, residual, weight))
    want = torch.autograd.grad(reference(hidden, residual, weight, EPS, torch.float32)[0]
                               .sum(), (hidden, residual, weight))
    for a, b in zip(got, want):
        assert_close(a, b, F32_REL)


def test_rejects_bf16_residual():
    hidden, residual, weight = make_inputs((2, 5, 24), torch.bfloat16, True)
    with pytest.raises(ValueError, match="fp32"):
        add_rms_norm(hidden, residual.bfloat16(), weight, EPS)


@pytest.mark.parametrize("with_residual", [False, True])
def test_opcheck(with_residual):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch."""
    hidden, residual, weight = make_inputs((2, 5, 24), torch.float32, with_residual, seed=8)
    torch.library.opcheck(torch.ops.mambar.add_rms_norm.default,
                          (hidden, residual, weight, EPS, torch.float32))


def test_compile_sees_one_node_each_way():
    """Dynamo and AOTAutograd keep the op opaque: one node forward, one backward."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    graphs = {}

    def capture(name):
        def compiler(gm, _example_inputs):
            graphs[name] = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
            return make_boxed_func(gm.forward)
        return compiler

    backend = aot_autograd(fw_compiler=capture("fw"), bw_compiler=capture("bw"))
    hidden, residual, weight = make_inputs((2, 5, 24), torch.bfloat16, True, seed=9)
    fn = torch.compile(add_rms_norm, backend=backend, fullgraph=True)
    normed, new_residual = fn(hidden, residual, weight, EPS, torch.bfloat16)
    (normed.float().sum() + new_residual.sum()).backward()
    assert sum("mambar.add_rms_norm." in t for t in graphs["fw"]) == 1, graphs["fw"]
    assert sum("mambar.add_rms_norm_backward." in t for t in graphs["bw"]) == 1, graphs["bw"]
