"""Crash safety: a run killed (SIGKILL) or stopped (SIGTERM / SIGUSR1) and resumed ends with
exactly the weights of the uninterrupted run; non-finite losses stop with the last good
checkpoint untouched."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import main
from tiny_data import make_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# 16 training images, batch 2: 8 steps per epoch. Mixup/cutmix, RandAugment, random erasing,
# drop path and EMA stay on, so every source of randomness is exercised; one loader worker.
RUN = ["main.py", "--model", "mambar_tiny_patch16_224", "--input-size", "32", "--batch", "2",
       "--epochs", "2", "--warmup-epochs", "1", "--lr", "0.05", "--num_workers", "1",
       "--print-freq", "1", "--no-mlflow"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data"), train_per_class=8)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The final checkpoint of the uninterrupted run."""
    out = tmp_path_factory.mktemp("reference")
    subprocess.run([sys.executable, *RUN, "--data-path", data, "--output_dir", str(out)],
                   cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=600)
    return torch.load(out / "checkpoint.pth", weights_only=True)


def run_until(command, line_start, signum, launcher=(sys.executable,)):
    """Start ``command``, send ``signum`` once a stdout line starts with ``line_start``, and
    return (exit code, seconds from the signal to the exit, output)."""
    proc = subprocess.Popen([*launcher, *command], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    output = []
    for line in proc.stdout:
        output.append(line)
        if line.startswith(line_start):
            break
    sent = time.time()
    proc.send_signal(signum)
    output += proc.stdout.readlines()
    code = proc.wait(timeout=120)
    return code, time.time() - sent, "".join(output)


def assert_same_state(a, b):
    for part in ("model", "model_ema"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key}"
    for index, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][index][key]), (index, key)
    assert (a["epoch"], a["epoch_complete"]) == (b["epoch"], b["epoch_complete"])


@pytest.mark.slow
def test_sigkill_in_the_second_epoch_then_resume_is_bit_identical(data, reference, tmp_path):
    command = [*RUN, "--data-path", data, "--output_dir", str(tmp_path)]
    code, _, output = run_until(command, "Epoch: [1]  [3/8]", signal.SIGKILL)
    assert code == -signal.SIGKILL, output
    interrupted = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert (interrupted["epoch"], interrupted["epoch_complete"]) == (0, True)
    resumed = subprocess.run([sys.executable, *command, "--resume",
                              str(tmp_path / "checkpoint.pth")], cwd=ROOT, env=ENV,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "Resumed from" in resumed.stdout and "epoch 1, step 0" in resumed.stdout
    assert_same_state(torch.load(tmp_path / "checkpoint.pth", weights_only=True), reference)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_stop_signal_writes_a_mid_epoch_checkpoint_that_resumes_exactly(data, reference,
                                                                        tmp_path, signum):
    command = [*RUN, "--data-path", data, "--output_dir", str(tmp_path)]
    code, seconds, output = run_until(command, "Epoch: [1]  [2/8]", signum)
    assert code == 128 + signum, output
    assert seconds < 60
    assert f"Stopped by {signal.Signals(signum).name} at epoch 1, step" in output
    stopped = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert stopped["epoch"] == 1 and not stopped["epoch_complete"] and 3 <= stopped["step"] < 8
    # Relaunching the same command continues the run (auto-resume).
    resumed = subprocess.run([sys.executable, *command], cwd=ROOT, env=ENV,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert f"epoch 1, step {stopped['step']}" in resumed.stdout
    assert_same_state(torch.load(tmp_path / "checkpoint.pth", weights_only=True), reference)


@pytest.mark.slow
def test_sigterm_stops_every_ddp_rank_with_a_checkpoint(data, tmp_path):
    launcher = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2")
    command = [*RUN, "--data-path", data, "--output_dir", str(tmp_path)]
    code, seconds, output = run_until(command, "Epoch: [0]  [1/4]", signal.SIGTERM, launcher)
    assert code != 0 and seconds < 60, output
    assert output.count("Stopped by SIGTERM at epoch 0, step") == 1  # printed by rank 0
    stopped = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert stopped["epoch"] == 0 and not stopped["epoch_complete"]


def test_non_finite_loss_stops_naming_the_run_and_keeps_the_last_checkpoint(data, tmp_path,
                                                                          capfd):
    # Epoch 0 trains at the warmup lr; epoch 1 at 1e30 blows the weights up after one step.
    argv = ["--model", "mambar_tiny_patch16_224", "--input-size", "32", "--batch", "4",
            "--epochs", "2", "--warmup-epochs", "1", "--lr", "1e30", "--unscale-lr",
            "--num_workers", "0", "--no-mlflow", "--no-model-ema", "--data-path", data,
            "--output_dir", str(tmp_path)]
    assert main.cli(argv) == 1
    err = capfd.readouterr().err
    assert err.startswith(f"error: non-finite loss (nan) at epoch 1, step 1 of the run in "
                          f"{tmp_path}; the last good checkpoint there is left untouched")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    checkpoint = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert (checkpoint["epoch"], checkpoint["epoch_complete"]) == (0, True)
    assert main.cli(argv + ["--skip-nonfinite", "2"]) == 1
    captured = capfd.readouterr()
    assert captured.out.count("optimizer step skipped") == 2
    assert "non-finite loss (nan) at epoch 1, step 3" in captured.err


def test_a_mid_epoch_checkpoint_of_another_batch_layout_restarts_that_epoch(data, tmp_path,
                                                                            capsys):
    argv = ["--model", "mambar_tiny_patch16_224", "--input-size", "32", "--batch", "4",
            "--epochs", "1", "--num_workers", "0", "--no-mlflow", "--data-path", data,
            "--output_dir", str(tmp_path)]
    assert main.cli(argv) == 0
    checkpoint = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    checkpoint.update(epoch_complete=False, step=2)
    torch.save(checkpoint, tmp_path / "checkpoint.pth")
    capsys.readouterr()
    assert main.cli(argv[:5] + ["2"] + argv[6:]) == 0  # --batch 2
    out = capsys.readouterr().out
    assert "stopped mid-epoch with another batch_size / world_size / accum_iter" in out
    assert "epoch 0, step 0" in out and "Epoch: [0]  [0/8]" in out
