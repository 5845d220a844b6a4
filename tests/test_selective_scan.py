"""The selective-scan backends against the sequential oracle."""
import pathlib
import subprocess
import sys
import types

import numba
import numpy as np
import pytest
import torch

import selective_scan as ss
from helpers import fake_causal_conv1d, fake_cuda_extension
from selective_scan import cpu_numba as ssc
from selective_scan import cuda_kernels, loop, mixer_op

REPO = pathlib.Path(__file__).resolve().parents[1]
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


# The two CPU implementations behind the ``torch`` backend: the compiled scan (what it runs
# on CPU tensors when Numba imports) and the PyTorch loop (without Numba, and off the CPU).
compiled_scan = ss.kernel_scan(ssc.scan_forward, ssc.scan_backward)
CPU_SCANS = {"compiled": compiled_scan, "loop": ss.selective_scan_loop}
cpu_scans = pytest.mark.parametrize("impl", list(CPU_SCANS))


def assert_matches_reference(scan, args, reverse, rtol=1e-5, atol=1e-5, grad_rtol=1e-4,
                             grad_atol=1e-5):
    ref_out, ref_grads, g = run_with_grads(ss.selective_scan_reference, args, reverse)
    out, grads, _ = run_with_grads(scan, args, reverse, g)
    torch.testing.assert_close(out, ref_out, rtol=rtol, atol=atol)
    names = [n for n, a in zip(ARG_NAMES, args) if a is not None]
    for name, got, want in zip(names, grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=grad_rtol, atol=grad_atol,
                                   msg=f"grad of {name} (reverse={reverse})")


@cpu_scans
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("optional", ["all", "no_D", "no_z", "no_bias"])
def test_torch_matches_reference_fp32(impl, reverse, optional):
    args = make_inputs()
    drop = {"no_D": 5, "no_z": 6, "no_bias": 7}.get(optional)
    if drop is not None:
        args[drop] = None
    assert_matches_reference(CPU_SCANS[impl], args, reverse)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("length", [1, 2, 17, 208])
def test_compiled_odd_lengths_and_full_channel_blocks(length, reverse):
    """dim 40: two full blocks of 16 channels and a padded one; length 208: the model's."""
    args = make_inputs(batch=2, dim=40, state=16, length=length, seed=length)
    assert_matches_reference(compiled_scan, args, reverse, grad_rtol=2e-4,
                             grad_atol=2e-5)


@pytest.mark.parametrize("reverse", [False, True])
def test_compiled_strided_inputs(reverse):
    """The model's layouts: u, delta and z channel-minor, B and C row slices of one
    projection, A transposed; the results must not depend on strides."""
    batch, dim, state, length = 2, 20, 4, 11
    base = make_inputs(batch, dim, state, length)
    gen = torch.Generator().manual_seed(3)

    def channel_minor(t):
        return t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()

    u, delta, A, B, C, D, z, bias = base
    proj = torch.randn(batch, 2 * state + 3, length, generator=gen).requires_grad_()
    b_view, c_view = proj[:, 3:3 + state], proj[:, 3 + state:]
    a_view = A.detach().t().contiguous().t().requires_grad_()
    args = [channel_minor(u), channel_minor(delta), a_view, b_view, c_view, D,
            channel_minor(z), bias]
    assert not args[0].is_contiguous() and not b_view.is_contiguous()
    assert_matches_reference(compiled_scan, args, reverse)


@cpu_scans
@pytest.mark.parametrize("reverse", [False, True])
def test_torch_inference_path_matches_reference(impl, reverse):
    args = make_inputs(length=12)
    with torch.no_grad():
        got = CPU_SCANS[impl](*args, reverse=reverse)
        want = ss.selective_scan_reference(*args, reverse=reverse)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@cpu_scans
@pytest.mark.parametrize("reverse", [False, True])
def test_torch_gradcheck_float64(impl, reverse):
    args = make_inputs(batch=1, dim=3, state=2, length=5, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda *a: CPU_SCANS[impl](*a, delta_softplus=True, reverse=reverse), args)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dim", [48, 130], ids=["whole-images", "split-images"])
def test_compiled_no_softplus_and_two_threads(reverse, dim):
    """delta used as given; and the same numbers whether one thread or two split the jobs
    (the per-task sums of dA, dB, dC, dD are added up afterwards): with 48 channels each of
    the 3 images is one job and a task of its own; with 130, three jobs each, which the 8
    tasks split."""
    args = make_inputs(batch=3, dim=dim, state=4, length=9)
    saved = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out = compiled_scan(*args, delta_softplus=False, reverse=reverse)
            g = torch.ones_like(out)
            results.append((out, torch.autograd.grad(out, args, g)))
    finally:
        torch.set_num_threads(saved)
    want = ss.selective_scan_reference(*args, delta_softplus=False, reverse=reverse)
    # Negative delta makes exp(delta A) > 1: states grow, and rounding with them.
    torch.testing.assert_close(results[0][0], want, rtol=1e-4, atol=1e-5)
    # The threads' sums are added in another order: equal to rounding at the sums' scale.
    for name, one, two in zip(ARG_NAMES, results[0][1], results[1][1]):
        torch.testing.assert_close(two, one, rtol=1e-5, atol=1e-6 * float(one.abs().max()),
                                   msg=f"grad of {name}")


def test_kernel_softplus_and_its_derivative():
    """The kernels' softplus (x itself above 20, as F.softplus) and sigmoid, fp32."""
    fn = numba.njit(lambda x: ssc._softplus_sigmoid(x))
    xs = np.concatenate([np.linspace(-100, 100, 20001), [-1e-6, 0.0, 1e-6, 19.99, 20.01]]
                        ).astype(np.float32)
    got = np.array([fn(x) for x in xs], dtype=np.float32)
    x64 = torch.from_numpy(xs).double()
    for col, want in ((0, torch.nn.functional.softplus(x64)), (1, torch.sigmoid(x64))):
        want = want.float().numpy()
        err = np.abs(got[:, col].astype(np.float64) - want)
        # 4 ulp, or absolutely tiny where exp(-|x|) underflows below fp32's normal range
        assert np.all(err <= np.maximum(4 * np.spacing(want), 1e-37)), col


def _scan_in_child(queue):
    args = make_inputs(batch=2, dim=64, length=5)
    queue.put(float(compiled_scan(*args).detach().sum()))


def test_two_threads_work_in_a_forked_child():
    """A DataLoader-style fork after the parent has used its thread pool: the child must build
    its own (the parent's threads do not exist there) instead of waiting on them forever."""
    import multiprocessing
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        args = make_inputs(batch=2, dim=64, length=5)
        want = float(compiled_scan(*args).detach().sum())
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_scan_in_child, args=(queue,))
        child.start()
        child.join(timeout=60)
        if child.is_alive():
            child.kill()
        assert child.exitcode == 0
        assert queue.get(timeout=5) == pytest.approx(want, rel=1e-6)
    finally:
        torch.set_num_threads(saved)


def test_mixer_end_to_end_compiled_against_loop(monkeypatch):
    """The model's mixer (its layouts: channel-minor z, B and C slices of one projection, a
    full 64-channel block) with the compiled scan against the same mixer on the loop."""
    torch.manual_seed(0)
    import vision_mamba
    mixer = vision_mamba.BiMambaMixer(32, scan_backend="torch")
    hidden = torch.randn(2, 13, 32, requires_grad=True)
    leaves = [hidden, *mixer.parameters()]
    calls = []

    def compiled(backend, device):
        assert backend == "torch"
        return ss._writing_into(lambda *a: calls.append("fwd") or ssc.scan_forward(*a),
                                lambda *a: calls.append("bwd") or ssc.scan_backward(*a))
    monkeypatch.setattr(mixer_op, "scan_kernels", compiled)
    got = mixer(hidden)
    g_got = torch.autograd.grad(got.square().sum(), leaves)
    monkeypatch.setattr(mixer_op, "scan_kernels", lambda backend, device: ss._writing_into(
        loop.scan_forward, loop.scan_backward))
    want = mixer(hidden)
    g_want = torch.autograd.grad(want.square().sum(), leaves)
    assert calls == ["fwd", "fwd", "bwd", "bwd"]   # both directions ran compiled
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_split_covers_every_job_once():
    for jobs, threads, unit in ((1, 2, 1), (7, 2, 1), (192, 2, 1), (5, 1, 1), (100, 3, 1),
                                (48, 2, 6), (96, 2, 6), (18, 2, 6), (7, 2, 7)):
        ranges = ssc._split(jobs, threads, unit)
        covered = [j for first, last in ranges for j in range(first, last)]
        assert covered == list(range(jobs))
        assert len(ranges) == (1 if threads == 1 else min(jobs, 4 * threads))
        # Whole units (images) per range where there are enough of them.
        whole = all(first % unit == 0 for first, _ in ranges)
        assert whole == (jobs // unit >= len(ranges)), (jobs, threads, unit)


def test_fast_exp_float32_within_one_ulp():
    """The kernels' vectorisable exp against exp in fp64 rounded to fp32, from the smallest
    normal result to just under 2^127.5, and its ends: 0, inf, nan."""
    exp = numba.njit(lambda x: ssc._exp(x))
    xs = np.concatenate([np.linspace(-87.3, 88.3, 20001),
                         np.random.default_rng(0).normal(0, 5, 5000)]).astype(np.float32)
    got = np.array([exp(x) for x in xs], dtype=np.float32)
    want = np.exp(xs.astype(np.float64)).astype(np.float32)
    ulp = np.spacing(want)
    assert np.max(np.abs(got.astype(np.float64) - want) / ulp) <= 1
    for x, want in ((-100, 0), (-np.inf, 0), (0, 1), (100, np.inf), (np.inf, np.inf)):
        assert exp(np.float32(x)) == want, x
    assert np.isnan(exp(np.float32(np.nan)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_softplus_matches_torch(dtype):
    x = torch.cat([torch.linspace(-120, 120, 2000), torch.randn(1000) * 4]).to(dtype)
    x = x.reshape(3, 1000, 1).permute(2, 0, 1)   # strided, as the scan passes delta
    want = torch.nn.functional.softplus(x)
    got = loop._softplus(x)
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


@cpu_scans
@pytest.mark.parametrize("reverse", [False, True])
def test_torch_bf16_close_to_fp32(impl, reverse):
    args32 = make_inputs(length=16)
    args16 = [a.detach().to(torch.bfloat16).requires_grad_() if a.dtype == torch.float32
              and a.dim() == 3 else a for a in args32]
    out16 = CPU_SCANS[impl](*args16, reverse=reverse)
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
    assert "CPU tensors -> torch (compiled, Numba)" in ss.describe_backends("auto")


def test_torch_backend_runs_the_compiled_scan_on_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(ss, "_load_cpu_scan", lambda: types.SimpleNamespace(
        scan_forward=lambda *a: calls.append(a) or a[0], scan_backward=None))
    args = make_inputs()
    ss.selective_scan_torch(*args, True, False)
    assert len(calls) == 1


@pytest.mark.parametrize("code", [
    # main.py silences print on other ranks by replacing builtins.print, after which Numba's
    # import fails: the compiled scan must already be loaded by then.
    "import selective_scan, utils; utils.setup_for_distributed(False)",
    # The compiled module imported first must not leave selective_scan without it.
    "import selective_scan.cpu_numba, selective_scan",
])
def test_compiled_scan_loads_in_a_fresh_process(code):
    code += ("; import sys, selective_scan as ss; "
             "sys.exit(0 if ss.compiled_cpu_scan_available() else 3)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_fallback_to_the_loop_without_numba(monkeypatch):
    """With Numba not importable, the ``torch`` backend is the PyTorch loop, says so once in
    the backend line, and still matches the oracle."""
    monkeypatch.setitem(sys.modules, "numba", None)         # import numba -> ImportError
    monkeypatch.delitem(sys.modules, "selective_scan.cpu_numba")
    ss._load_cpu_scan.cache_clear()
    loop_calls = []
    real_apply = loop.LoopScan.apply
    monkeypatch.setattr(loop.LoopScan, "apply",
                        lambda *a: loop_calls.append(1) or real_apply(*a))
    try:
        assert not ss.compiled_cpu_scan_available()
        assert "CPU tensors -> torch (PyTorch loop: numba not installed)" in \
            ss.describe_backends("auto")
        args = make_inputs()
        assert_matches_reference(ss.get_scan(ss.resolve_backend("auto", torch.device("cpu"))),
                                 args, reverse=True)
        assert loop_calls
    finally:
        ss._load_cpu_scan.cache_clear()


SCANS_CHECKED = {"reference": ss.selective_scan_reference, "torch": ss.selective_scan_torch,
                 "loop": ss.selective_scan_loop}


@pytest.mark.parametrize("scan", list(SCANS_CHECKED))
@pytest.mark.parametrize("arg, make, match", [
    ("A", lambda a: torch.complex(a, a), r"A: expected a real floating-point tensor"),
    ("B", lambda b: b[0, :, 0].expand(6, 4).contiguous(),
     r"B: expected \(batch, d_state, length\) = \(2, 4, 9\)"),
    ("C", lambda c: c.detach().unsqueeze(1).expand(2, 2, 4, 9),
     r"C: expected \(batch, d_state, length\) = \(2, 4, 9\)"),
    ("D", lambda d: d[:3], r"D: expected \(channels,\) = \(6,\)"),
    ("delta", lambda t: t[..., :5], r"delta: expected u's shape"),
])
def test_unsupported_inputs_name_the_argument(scan, arg, make, match):
    """mamba-ssm-style complex A, fixed B of shape (E, N), grouped C (B, G, N, L): a
    ValueError naming the argument, not wrong numbers or an error from deep inside."""
    args = dict(zip(ARG_NAMES, make_inputs()))
    args[arg] = make(args[arg])
    with pytest.raises(ValueError, match=match):
        SCANS_CHECKED[scan](**args)


@pytest.mark.parametrize("optional", ["all", "no_D", "no_z", "no_bias"])
def test_cuda_backend_glue_with_the_oracle_as_kernel(monkeypatch, optional):
    """The ``cuda`` backend's autograd function around mamba-ssm's extension, the oracle standing
    in for the kernels: reverse = flip in, scan forwards, flip out, for the output and every
    gradient; strided inputs (as the mixer passes them) and fp64 A made what the kernels take."""
    calls = []
    monkeypatch.setattr(cuda_kernels, "load_scan_extension", lambda: fake_cuda_extension(calls))
    for reverse in (False, True):
        args = make_inputs(length=10)
        strided = [a.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
                   if a is not None and a.dim() == 3 else a for a in args]
        strided[2] = args[2].detach().double().requires_grad_()    # A in fp64
        drop = {"no_D": 5, "no_z": 6, "no_bias": 7}.get(optional)
        if drop is not None:
            strided[drop] = None
        assert_matches_reference(ss.selective_scan_cuda, strided, reverse)
    assert calls == ["fwd", "fwd", "bwd"] * 2   # the backward reruns the forward kernel


def test_cuda_backend_keeps_only_its_inputs(monkeypatch):
    """Unlike mamba-ssm's own autograd function, the ``cuda`` backend saves the tensors it was
    given, not its contiguous or flipped copies: the mixer's recompute hooks can release u and
    delta, and nothing else the size of the sequence is kept."""
    monkeypatch.setattr(cuda_kernels, "load_scan_extension", lambda: fake_cuda_extension([]))
    args = [a.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
            if a.dim() == 3 else a for a in make_inputs(length=10)]
    packed = []

    def pack(t):
        packed.append(t)
        return t

    for reverse in (False, True):
        packed.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            ss.selective_scan_cuda(*args, reverse=reverse)
        assert len(packed) == 8
        assert all(any(t is a for a in args) for t in packed)


@pytest.mark.parametrize("reverse", [False, True])
def test_cuda_conv_glue_with_a_stand_in_kernel(monkeypatch, reverse):
    """causal_conv1d_silu: the (anti-)causal depthwise conv + SiLU of the spec, gradients
    included, from a channel-minor view."""
    monkeypatch.setattr(cuda_kernels, "load_causal_conv1d", lambda: fake_causal_conv1d)
    torch.manual_seed(0)
    x = torch.randn(2, 11, 6).transpose(1, 2).requires_grad_()   # (B, E, L), channel-minor
    weight = torch.randn(6, 1, 4, requires_grad=True)
    bias = torch.randn(6, requires_grad=True)
    # The spec: u_t = SiLU(sum_j w[j] x_{t-3+j} + b), zero before the start; the backward
    # direction is the same on the reversed sequence, reversed back.
    src = x.flip(-1) if reverse else x
    want = torch.stack([sum(weight[:, 0, j] * src[..., t - 3 + j] for j in range(4)
                            if t - 3 + j >= 0) + bias for t in range(11)], -1)
    want = torch.nn.functional.silu(want)
    want = want.flip(-1) if reverse else want
    got = cuda_kernels.causal_conv1d_silu(x, weight, bias, reverse)
    torch.testing.assert_close(got, want)
    g = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, (x, weight, bias), g),
                    torch.autograd.grad(want, (x, weight, bias), g)):
        torch.testing.assert_close(a, b)


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
