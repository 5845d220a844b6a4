"""tools/gpu_checks.sh and its Python part (tools/gpu_checks_report.py), on the CPU: the
generated image folder, the summary's reading of benchmark JSON files, and the script's own
flow when its time budget runs out (GPU time is scarce: a broken script must show here)."""
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
import gpu_checks_report as report  # noqa: E402


def test_image_folder_has_every_split_class_and_image(tmp_path):
    report.make_image_folder(str(tmp_path), classes=3, train=4, val=2, size=32)
    for split, count in (("train", 4), ("val", 2)):
        classes = sorted(os.listdir(tmp_path / split))
        assert classes == ["class_00", "class_01", "class_02"]
        for name in classes:
            files = sorted(os.listdir(tmp_path / split / name))
            assert files == [f"{i}.jpg" for i in range(count)]
            with Image.open(tmp_path / split / name / files[0]) as image:
                assert image.format == "JPEG" and image.size == (32, 32)
    # Noise around a colour per class: the classes' mean colours are far apart (learnable).
    means = [np.asarray(Image.open(tmp_path / "train" / f"class_{c:02d}" / "0.jpg"),
                        dtype=float).mean(axis=(0, 1)) for c in range(2)]
    assert np.abs(means[0] - means[1]).max() > 30


def test_images_command_rejects_an_empty_data_set(tmp_path):
    done = subprocess.run([sys.executable, "tools/gpu_checks_report.py", "images",
                           str(tmp_path / "x"), "2", "0", "1"], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "classes, train and val must be at least 1" in done.stderr.splitlines()[-1]
    assert not (tmp_path / "x").exists()


def test_summary_reads_targets_choices_and_scan_shares(tmp_path):
    row = {"model": "mambar_base_patch16_224", "img_size": 224, "batch": 128,
           "backend_resolved": "triton",
           "triton_configs": {"_scan_fwd_kernel (1536, 16, 208)": "BLOCK_L: 16, num_warps: 4"},
           "scan_profile": {"share": 0.4567, "basis": "cuda time", "recompute_ms": 1.5,
                            "share_by_kernel_name": 0.44,
                            "top_kernels": [["_scan_bwd_kernel", 12.25, 48]]}}
    (tmp_path / "bench_224.json").write_text(json.dumps({
        "results": [row, {"model": "deit_base_patch16_224", "error": "OOM"}],
        "targets": [{"topic": "GPU", "name": "Mamba-B train img/s", "value": 812.5,
                     "target": ">= 1000", "ok": False},
                    {"topic": "GPU", "name": "peak GB", "value": 12.1, "target": "<= 17",
                     "ok": True}]}))
    (tmp_path / "bench_cut.json").write_text('{"results": [')  # a run killed mid-write
    (tmp_path / "other.json").write_text("{}")                 # not a benchmark file
    assert report.summarise(str(tmp_path)) == [
        "bench_224.json: 2 rows, 1 errors",
        "  GPU: Mamba-B train img/s: 812.5 (target >= 1000) FAIL",
        "  GPU: peak GB: 12.1 (target <= 17) PASS",
        "  triton mambar_base_patch16_224 224px b128: _scan_fwd_kernel (1536, 16, 208): "
        "BLOCK_L: 16, num_warps: 4",
        "  scan share mambar_base_patch16_224 triton 224px b128: 45.7% (cuda time; u, delta "
        "redone: 1.50 ms/step), by kernel name: 0.44",
        "      12.250 ms/step     48x  _scan_bwd_kernel",
        "bench_cut.json: unreadable (JSONDecodeError: Expecting value: line 1 column 14 "
        "(char 13))",
    ]


def progress(step, loss, total=3):
    return (f"Epoch: [0]  [{step}/{total}]  eta: 0:00:01  lr: 0.000001  loss: {loss} "
            f"({loss})  time: 0.1000  data: 0.0100")


def test_loss_curves_of_two_backends_compared_step_for_step():
    log = "\n".join([
        "### stages_cuda (limit 120s): env MAMBAR_SCAN_BACKEND=cuda bash scripts/x.sh",
        "# stage 1/3 pt: 128 px, 300 epochs", progress(0, 6.9080), progress(1, 6.9010),
        "* Acc@1 0.000 Acc@5 10.000 loss 6.901",
        "# stage 2/3 mid: 224 px, 100 epochs", progress(0, 6.8500),
        "### stages_triton (limit 120s): env MAMBAR_SCAN_BACKEND=triton bash scripts/x.sh",
        "# stage 1/3 pt: 128 px, 300 epochs", progress(0, 6.9080), progress(1, 6.9150),
        "# stage 2/3 mid: 224 px, 100 epochs", progress(0, 6.8400), progress(1, 6.8000)])
    assert report.loss_curves(log) == {
        "stages_cuda": {("stage 1/3 pt", 0, 0): 6.908, ("stage 1/3 pt", 0, 1): 6.901,
                        ("stage 2/3 mid", 0, 0): 6.85},
        "stages_triton": {("stage 1/3 pt", 0, 0): 6.908, ("stage 1/3 pt", 0, 1): 6.915,
                          ("stage 2/3 mid", 0, 0): 6.84, ("stage 2/3 mid", 0, 1): 6.8}}
    # Largest: |6.901 - 6.915| / 6.915 = 0.20% (stage 2's first step: 0.15%).
    assert report.compare_losses(log, "stages_cuda", "stages_triton") == (
        "loss curves stages_cuda vs stages_triton: 3 steps in common (3 and 4 logged), "
        "largest difference 0.20% of the loss (6.901 against 6.915, stage 1/3 pt, epoch 0 "
        "step 1): PASS (within 5%)")
    assert report.compare_losses(log, "stages_cuda", "stages_triton", tolerance=0.001).endswith(
        "FAIL (within 0.1%)")
    assert report.compare_losses(log, "train_cuda", "stages_triton") == (
        "loss curves train_cuda vs stages_triton: no loss lines for train_cuda")
    diverged = log.replace(progress(1, 6.9150), progress(1, "nan"))
    assert report.compare_losses(diverged, "stages_cuda", "stages_triton").endswith(
        "(6.901 against nan, stage 1/3 pt, epoch 0 step 1): FAIL (within 5%)")


def run_smoke(tmp_path, **env) -> str:
    """gpu_checks.sh's flow on the CPU (tiny sizes) with ``env`` set, its output and scratch
    under ``tmp_path``; the summary it wrote."""
    env = dict(os.environ, OUT=str(tmp_path / "out"), GPU_CHECKS_SMOKE="1",
               PYTHON=sys.executable, TMPDIR=str(tmp_path), **env)
    done = subprocess.run(["bash", "tools/gpu_checks.sh"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return (tmp_path / "out" / "summary.txt").read_text()


def test_script_reports_every_step_it_had_no_time_for(tmp_path):
    """A 10-second budget: every step is skipped with the time that was left, the cuda steps
    with the reason, and the run still ends with its summary and its bundle of logs."""
    summary = run_smoke(tmp_path, GPU_CHECKS_BUDGET_S="10")
    out = tmp_path / "out"
    for name in ("tests_triton_gpu", "tests_gluon_gpu", "bench_224", "train_triton",
                 "stages_triton", "bench_sweep", "bench_compile", "tests_triton_small",
                 "tests_gpu_marked"):
        assert any(line.startswith(name) and "SKIPPED (budget:" in line
                   for line in summary.splitlines()), name
    assert "cuda backend       SKIPPED (mamba-ssm / causal-conv1d not importable" in summary
    assert "smoke=1, budget 10s" in summary
    # At most 8 files come back from the GPU machine: here the summary and the bundle.
    assert sorted(os.listdir(out)) == ["results.tar.gz", "summary.txt"]
    with tarfile.open(out / "results.tar.gz") as bundle:
        names = {os.path.basename(n) for n in bundle.getnames()}
    assert {"gpu_tests.log", "bench.txt", "train_tiny.log", "stages.log",
            "build.log"} <= names
    # Its scratch folders (mktemp's: logs, generated images, wheels) are gone.
    assert not [name for name in os.listdir(tmp_path) if name.startswith("tmp.")]


@pytest.mark.slow
def test_script_runs_a_size_scripts_stages_through_the_seed_launcher(tmp_path):
    """One step for real, as on the GPU but tiny and on the CPU: a size script's three stages
    and its --eval, launched as the seed launches main.py (``python -m
    torch.distributed.launch --use_env``) on the generated image folder, each step's loss
    and each evaluation in the summary."""
    summary = run_smoke(tmp_path, GPU_CHECKS_ONLY="stages_triton")
    step = [line for line in summary.splitlines() if line.startswith("stages_triton")]
    assert len(step) == 1 and "rc=0" in step[0], summary
    assert "tests_triton_gpu" not in summary  # GPU_CHECKS_ONLY ran that step alone
    stages = summary[summary.index("# stage 1/3"):]
    headers = [line.split(":")[0] for line in stages.splitlines() if line.startswith("# ")]
    assert headers == ["# stage 1/3 pt", "# stage 2/3 mid", "# stage 3/3 ft",
                       "# eval of the final checkpoint (one process)"]
    for part in stages.split("# stage")[1:]:
        # 2 classes x 16 images at 8 per step: 4 steps a stage, each with its loss.
        assert sum(line.startswith("Epoch: [0]  [") for line in part.splitlines()) == 4
        assert "* Acc@1" in part
    assert "* Acc@1" in stages.split("# eval of the final checkpoint")[1]
    # The cuda backend did not run here: nothing to compare its losses with.
    assert "loss curves stages_cuda vs stages_triton: no loss lines for stages_cuda" in summary
