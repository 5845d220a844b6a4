"""benchmark.py's mambapy baseline: mambapy's scan against the oracle, and the
``mambapy`` backend routed into the model. mambapy is a benchmark-only dependency
(requirements-bench.txt), not part of the Quick start install: CI runs the main suite without
it and this file in a step of its own after installing it (.ci/run). Elsewhere, without
mambapy, these tests skip and say why."""
import pytest
import torch

import benchmark
from helpers import check_row
from selective_scan import selective_scan_reference

pytest.importorskip("mambapy", reason="benchmark-only dependency: pip install -r "
                                      "requirements-bench.txt")


def test_mambapy_backend_is_routed_into_the_model():
    cfg = benchmark.Config(model="mambar_tiny_patch16_224", img_size=32, batch=2, dtype="fp32",
                           backend="mambapy", device="cpu", mode="train", warmup=0, iters=1,
                           threads=1)
    row = benchmark.measure(cfg)  # raises if the mambapy scan was never called
    check_row(row)
    assert row["backend_resolved"] == "mambapy"


@pytest.mark.parametrize("reverse", [False, True])
def test_mambapy_scan_matches_the_oracle(reverse):
    batch, e, n, length = 2, 8, 4, 13  # not a power of two: pscan pads internally
    g = torch.Generator().manual_seed(1)
    leaves = dict(u=torch.randn(batch, e, length, generator=g),
                  delta=torch.randn(batch, e, length, generator=g) * 0.5 - 1,
                  A=-torch.rand(e, n, generator=g) - 0.1,
                  B=torch.randn(batch, n, length, generator=g),
                  C=torch.randn(batch, n, length, generator=g),
                  D=torch.randn(e, generator=g), z=torch.randn(batch, e, length, generator=g),
                  delta_bias=torch.randn(e, generator=g) * 0.5)
    outs, grads = [], []
    for scan in (selective_scan_reference, benchmark.selective_scan_mambapy):
        inputs = {k: v.clone().requires_grad_() for k, v in leaves.items()}
        out = scan(**inputs, delta_softplus=True, reverse=reverse)
        out.backward(torch.ones_like(out))
        outs.append(out.detach())
        grads.append([inputs[k].grad for k in leaves])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
