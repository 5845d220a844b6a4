"""benchmark.py on CPU: the CLI's JSON, the CPU worker subprocess, the FLOP counter against
independent counts. No timing assertions. (The mambapy baseline, which needs a benchmark-only
package, is tested in test_benchmark_mambapy.py.)"""
import importlib.util
import json
import os
import subprocess
import sys
import types

import pytest
import timm
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import benchmark  # noqa: E402
from helpers import check_row  # noqa: E402
from selective_scan import selective_scan_reference  # noqa: E402

TINY = ["--device", "cpu", "--model", "mambar_tiny_patch16_224", "--input-size", "32",
        "--batch", "2", "--warmup", "0", "--iters", "1", "--threads", "1"]


def test_cli_tiny_infer_and_train_with_deit(tmp_path):
    out = tmp_path / "bench_tiny.json"
    proc = subprocess.run([sys.executable, "benchmark.py", *TINY, "--mode", "both",
                           "--in-process", "--scan-share", "--profile-steps", "1",
                           "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Mamba vs DeiT" in proc.stdout and "deit_tiny" in proc.stdout
    data = json.loads(out.read_text())
    for field in ("date", "command", "device_name", "torch", "timm"):
        assert data["meta"][field]
    rows = {(r["model"], r["mode"]): r for r in data["results"]}
    assert set(rows) == {(m, mode) for m in ("mambar_tiny_patch16_224", "deit_tiny_patch16_224")
                         for mode in ("infer", "train")}
    for row in rows.values():
        check_row(row)
        assert row["img_size"] == 32 and row["batch"] == 2 and row["dtype"] == "fp32"
    assert rows[("mambar_tiny_patch16_224", "train")]["backend_resolved"] == "torch"
    assert rows[("mambar_tiny_patch16_224", "infer")]["tokens"] == 4 + 12
    profile = rows[("mambar_tiny_patch16_224", "train")]["scan_profile"]
    assert profile["scan_ms"] > 0 and 0 < profile["share"] <= 1
    # u and delta, redone inside the scan's backward node, are counted apart from the scan.
    assert 0 < profile["recompute_ms"] < profile["scan_ms"]
    assert "u, delta redone ms" in proc.stdout
    # The GPU run's summary reads these files: what it says of this one.
    sys.path.insert(0, os.path.join(REPO, "tools"))
    from gpu_checks_report import summarise
    lines = summarise(str(tmp_path))
    assert lines[0] == "bench_tiny.json: 4 rows, 0 errors"
    share = [line for line in lines if line.startswith("  scan share ")]
    assert share[0].startswith("  scan share mambar_tiny_patch16_224 torch 32px b2: "
                               f"{100 * profile['share']:.1f}% ")


@pytest.mark.slow
def test_cpu_worker_subprocess_reports_its_own_peak_rss():
    cfg = benchmark.Config(model="mambar_tiny_patch16_224", img_size=32, batch=2, dtype="fp32",
                           backend="torch", device="cpu", mode="infer", warmup=0, iters=1,
                           threads=1)
    row = benchmark.run_isolated(cfg, timeout=240)
    check_row(row)
    assert row["peak_mem_basis"].startswith("ru_maxrss")
    assert row["peak_mem_mb"] >= row["rss_base_mb"] > 0 and row["workload_mb"] >= 0


def test_plan_pairs_each_mamba_size_with_its_deit_and_sweep_batches():
    args = benchmark.parse_args(["--device", "cpu", "--model", "mambar_base_patch16_224",
                                 "--backend", "torch", "reference", "--mode", "train",
                                 "--sweep", "--sweep-batch", "768=16,1024=8"])
    configs = benchmark.plan(args)
    assert [c.img_size for c in configs[:3]] == [224] * 3
    assert [(c.model, c.backend) for c in configs[:3]] == [
        ("mambar_base_patch16_224", "torch"), ("mambar_base_patch16_224", "reference"),
        ("deit_base_patch16_224", "sdpa")]
    assert {c.img_size: c.batch for c in configs} == {224: 8, 384: 8, 512: 8, 768: 16, 1024: 8}
    assert benchmark.parse_sweep_batch("4") == {0: 4}


def pretend_mambapy_is(installed: bool, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: (
        (object() if installed else None) if name == "mambapy" else find_spec(name, *rest)))


def test_compare_mambapy_preset_fills_unset_flags(monkeypatch):
    pretend_mambapy_is(True, monkeypatch)
    preset = benchmark.parse_args(["--compare-mambapy", "--iters", "2"])
    assert (preset.backend, preset.batch, preset.threads, preset.iters) == (
        ["torch", "mambapy"], 8, 2, 2)


def test_mambapy_backend_without_mambapy_is_a_one_line_error(monkeypatch, capsys):
    pretend_mambapy_is(False, monkeypatch)
    with pytest.raises(SystemExit) as exc:
        benchmark.parse_args(["--compare-mambapy"])
    assert exc.value.code == 2
    assert "pip install mambapy" in capsys.readouterr().err


def fake_row(model, backend, size, batch, img_per_s, peak_mem_mb, device="cuda", mode="train",
             dtype="bf16"):
    """A result row as measure() writes it, with made-up figures."""
    return dict(model=model, family="mamba" if benchmark.is_mamba(model) else "deit",
                backend=backend, backend_resolved=backend, img_size=size, batch=batch,
                dtype=dtype, mode=mode, device=device, img_per_s=img_per_s,
                step_s=batch / img_per_s, first_step_s=1.0, peak_mem_mb=peak_mem_mb,
                tokens=(size // 16) ** 2 + 12, flops={"total": 2e10, "matmul": 1e10},
                gflops_per_img=20.0, tflops_per_s=1.0)


def test_targets_of_the_cpu_scan_and_the_gpu_step():
    mb, db = "mambar_base_patch16_224", "deit_base_patch16_224"
    rows = [fake_row(mb, "triton", 224, 128, 1100, 16000),
            fake_row(db, "sdpa", 224, 128, 2000, 9000),
            fake_row(mb, "triton", 512, 32, 300, 9000), fake_row(db, "sdpa", 512, 32, 250, 9000),
            fake_row(mb, "triton", 1024, 8, 20, 9000), fake_row(db, "sdpa", 1024, 8, 25, 9000)]
    tiny = "mambar_tiny_patch16_224"
    for backend, speed, mem in (("torch", 2.0, 1500), ("mambapy", 0.3, 6000)):
        rows += [fake_row(tiny, backend, 224, 8, speed, mem, "cpu", "train", "fp32"),
                 fake_row(tiny, backend, 224, 8, 3 * speed, mem, "cpu", "infer", "fp32")]
    got = {(t["topic"], t["name"], t["target"]): (t["value"], t["ok"])
           for t in benchmark.check_targets(rows)}
    assert got[("GPU", "Mamba-B triton img/s (224 px, batch 128)", ">= 1000")] == (1100, True)
    assert got[("GPU", "Mamba-B peak training memory, GB", "<= 17")] == (
        round(16000 * 2**20 / 1e9, 3), True)
    assert got[("GPU", "Mamba-B / DeiT-B img/s (224 px)", ">= 0.45")] == (0.55, True)
    assert got[("GPU", "Mamba-B / DeiT-B img/s (512 px, batch 32)", "> 1")] == (1.2, True)
    assert got[("GPU", "Mamba-B / DeiT-B img/s (1024 px, batch 8)", "> 1")] == (0.8, False)
    speedup = "speedup over the mambapy scan"
    assert got[("CPU", f"train {speedup}", ">= 5x")] == (round(2 / 0.3, 3), True)
    assert got[("CPU", f"infer {speedup}", ">= 3x")][1] is True
    assert got[("CPU", "train peak RSS, MiB (mambapy: 6000)", "<= mambapy's")] == (1500, True)
    # The goal is 10x in both modes, where the floors pass: 6.7x fails here.
    assert got[("CPU", f"train {speedup}", ">= 10x")] == (round(2 / 0.3, 3), False)
    assert got[("CPU", f"infer {speedup}", ">= 10x")] == (round(6 / 0.9, 3), False)
    report = benchmark.report({"device_name": "x", "torch": "t", "cuda": None, "timm": "t",
                               "triton": None, "mambapy": None, "python": "3", "threads": None,
                               "date": "d", "git_commit": None, "command": "c"},
                              rows, benchmark.check_targets(rows))
    assert "FAIL" in report and "Scan backends vs mambapy" in report


# --------------------------------------------------------------------------- FLOPs

def counted_matmul_flops(model, img_size, batch=2):
    """FLOPs per image that torch's own counter sees (mm / addmm / bmm / convolution)."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.randn(batch, 3, img_size, img_size))
    assert counter.get_total_flops() % batch == 0
    return counter.get_total_flops() // batch


@pytest.mark.parametrize("name", ["mambar_tiny_patch16_224", "mambar_small_patch16_224",
                                  "vim_tiny_patch16_224"])
def test_mamba_matmul_flops_match_torch_flop_counter(name):
    # Mamba®-S has a neck (neck_reduction 2), Vim a class token; the reference scan does no
    # matmul, so every counted FLOP is a weight matmul or a convolution.
    model = timm.create_model(name, img_size=64, depth=2, scan_backend="reference").eval()
    flops = benchmark.mamba_flops(model)
    mixer = model.layers[0].mixer
    k = mixer.conv1d.kernel_size[0]
    # The causal conv is computed with K-1 padding outputs per direction and then sliced.
    padding = 2 * 2 * mixer.d_inner * (k - 1) * k * len(model.layers)
    assert counted_matmul_flops(model, 64) == flops["matmul"] + padding


def test_vit_matmul_flops_match_torch_flop_counter():
    model = timm.create_model("deit_tiny_patch16_224", img_size=64).eval()
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False  # explicit q @ k^T and attn @ v, visible to the counter
    assert counted_matmul_flops(model, 64) == benchmark.vit_flops(model)["matmul"]


class ElementwiseFlops(TorchDispatchMode):
    """Counts the elementwise FLOPs an implementation executes, with benchmark.py's weights:
    one per output element of add / mul / exp, one per input element of a sum, softplus 2,
    SiLU 4. Copies, views and allocations count nothing."""

    WEIGHTS = {"add": 1, "mul": 1, "exp": 1, "softplus": 2, "silu": 4}

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name == "sum":
            self.flops += args[0].numel()
        elif name in self.WEIGHTS:
            self.flops += self.WEIGHTS[name] * out.numel()
        return out


@pytest.mark.parametrize("reverse", [False, True])
def test_scan_flops_formula_matches_the_oracles_operations(reverse):
    batch, e, n, length = 2, 6, 4, 5
    g = torch.Generator().manual_seed(0)
    u, delta, z = (torch.randn(batch, e, length, generator=g) for _ in range(3))
    b, c = (torch.randn(batch, n, length, generator=g) for _ in range(2))
    a, d, bias = -torch.rand(e, n, generator=g), torch.randn(e, generator=g), torch.randn(e)
    with ElementwiseFlops() as mode:
        selective_scan_reference(u, delta, a, b, c, d, z, bias, True, reverse)
    assert mode.flops == batch * benchmark.scan_flops(length, e, n)


def test_triton_autotune_choices_name_each_kernel_and_key(monkeypatch):
    # What the JSON rows of the Triton backend carry, read from the autotuners' caches (the
    # interpreter runs one config and tunes nothing, so stand-ins play the kernels here).
    fake = types.SimpleNamespace(
        _scan_fwd_kernel=types.SimpleNamespace(cache={(384, 16, 208, "torch.bfloat16"): "A"}),
        _scan_bwd_kernel=types.SimpleNamespace(cache={(384, 16, 208, "torch.bfloat16"): "B"}))
    gluon = types.SimpleNamespace(
        _scan_fwd=types.SimpleNamespace(cache={(384, 16, 208, "torch.bfloat16"): "C"}),
        _scan_bwd=types.SimpleNamespace(cache={}))
    monkeypatch.setitem(sys.modules, "selective_scan.triton_kernels", fake)
    monkeypatch.setitem(sys.modules, "selective_scan.gluon_kernels", gluon)
    assert benchmark.triton_autotune_choices() == {
        "_scan_fwd_kernel (384, 16, 208, 'torch.bfloat16')": "A",
        "_scan_bwd_kernel (384, 16, 208, 'torch.bfloat16')": "B",
        "gluon._scan_fwd (384, 16, 208, 'torch.bfloat16')": "C"}
    monkeypatch.delitem(sys.modules, "selective_scan.triton_kernels")
    monkeypatch.delitem(sys.modules, "selective_scan.gluon_kernels")
    assert benchmark.triton_autotune_choices() == {}


def test_cuda_peak_memory_counts_the_timed_steps_only(monkeypatch):
    """The peak-memory counter restarts after the warm-up (whose first step may hold Triton's
    autotuning buffers) and before the first timed step."""
    log = []
    monkeypatch.setattr(benchmark, "_sync", lambda device: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: log.append("reset"))
    first, times = benchmark.time_steps(lambda: log.append("step"), 2, 3, torch.device("cuda"))
    assert log == ["step", "step", "reset", "step", "step", "step"]
    assert len(times) == 3 and first >= 0


def test_top_kernels_rank_names_by_device_time_per_step():
    def kernel(name, us):
        return types.SimpleNamespace(name=name, time_range=types.SimpleNamespace(
            elapsed_us=lambda: us))
    # Two steps: "gemm" 2 x 300 us, "scan" 2 x 250 us + 1 x 50 us, "copy" 4 x 10 us.
    kernels = [kernel("gemm", 300), kernel("scan", 250), kernel("copy", 10), kernel("copy", 10),
               kernel("scan", 250), kernel("gemm", 300), kernel("scan", 50),
               kernel("copy", 10), kernel("copy", 10), kernel("x" * 200, 4)]
    assert benchmark.top_kernels(kernels, steps=2, n=3) == [
        ("gemm", 0.3, 1), ("scan", 0.275, 2), ("copy", 0.02, 2)]
    assert benchmark.top_kernels(kernels, steps=2)[-1] == ("x" * 90, 0.002, 0)


def test_compile_both_measures_each_model_eagerly_and_compiled(monkeypatch):
    """--compile both: an eager and a compiled row per configuration, the compiled one run
    through torch.compile's wrapper, compared with the eager one in the backend table.
    (Dynamo's "eager" backend here, to keep the test short.)"""
    args = benchmark.parse_args(["--device", "cpu", "--model", "mambar_tiny_patch16_224",
                                 "--input-size", "32", "--batch", "2", "--mode", "infer",
                                 "--iters", "1", "--warmup", "0", "--backend", "torch",
                                 "--reference", "none", "--compile", "both"])
    configs = benchmark.plan(args)
    assert [c.compile for c in configs] == [False, True]
    wrapped = []
    real_compile = torch.compile

    def recording_compile(model):
        wrapped.append(real_compile(model, backend="eager"))
        return wrapped[-1]

    monkeypatch.setattr(torch, "compile", recording_compile)
    rows = [benchmark.measure(c) for c in configs]
    assert len(wrapped) == 1
    for row in rows:
        check_row(row)
    table = benchmark.results_table(rows)
    assert "torch+compile" in table
    baseline, compared = benchmark.backend_comparison(rows)
    assert baseline == "torch" and [r[5] for r in compared] == ["torch+compile"]
