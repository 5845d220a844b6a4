"""Crash safety: a run killed (SIGKILL) or stopped (SIGTERM / SIGUSR1) and resumed ends with
exactly the weights of the uninterrupted run; a checkpoint restores every part of the training
state (weights, EMA, optimizer, schedule, loss scaler, position, best accuracy) to what the
uninterrupted run had; non-finite losses stop with the last good checkpoint untouched."""
import copy
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader, TensorDataset

import checkpoints
import main
from engine import NonFiniteBudget, train_one_epoch
from losses import DistillationLoss
from helpers import assert_same, assert_same_state, make_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# 16 training images, batch 2: 8 steps per epoch. Mixup/cutmix, RandAugment, random erasing,
# drop path and EMA stay on, so every source of randomness is exercised; one loader worker.
RUN = ["main.py", "--model", "mambar_tiny_patch16_224", "--input-size", "32", "--batch", "2",
       "--epochs", "2", "--warmup-epochs", "1", "--lr", "0.05", "--num_workers", "1",
       "--print-freq", "1", "--no-mlflow"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


# ------------------------------------------------------- the training state, part by part

# 16 samples, micro-batches of 2, 2 per optimizer step: 8 micro-batches, 4 steps per epoch.
TOY_ARGS = ["--model", "toy", "--batch-size", "2", "--accum_iter", "2", "--epochs", "3",
            "--warmup-epochs", "1", "--lr", "0.02", "--print-freq", "100", "--output_dir", "x"]


def toy_state(args):
    """A training state as main.run builds it, around a small model, with an fp16-style loss
    scaler (on CPU) that doubles its scale after every step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.LayerNorm(16),
                                torch.nn.Linear(16, 3))
    optimizer = create_optimizer_v2(model, **{**optimizer_kwargs(args), "lr": args.lr})
    return {"model": model, "optimizer": optimizer,
            "lr_scheduler": create_scheduler(args, optimizer)[0],
            "model_ema": ModelEmaV3(model, decay=0.9),
            "scaler": torch.amp.GradScaler("cpu", init_scale=2.0 ** 4, growth_interval=1),
            "max_accuracy": 0.0, "best_source": None, "nonfinite": NonFiniteBudget(5)}


def toy_epoch(state, epoch, args, start=0, stop=None):
    """Micro-batches start..stop of the epoch, as run_training drives train_one_epoch."""
    g = torch.Generator().manual_seed(epoch)
    x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
    stop = stop or 8
    loader = DataLoader(TensorDataset(x[2 * start:2 * stop], y[2 * start:2 * stop]), batch_size=2)
    state["lr_scheduler"].step(epoch)
    criterion = DistillationLoss(torch.nn.CrossEntropyLoss(), None, "none", 0.0, 1.0)
    train_one_epoch(state["model"], criterion, loader, state["optimizer"], torch.device("cpu"),
                    epoch, args, None, state["scaler"], state["model_ema"], None, start)


def snapshot(state):
    """Every part of a training state as plain data."""
    return copy.deepcopy({
        "model": state["model"].state_dict(), "ema": state["model_ema"].module.state_dict(),
        "optimizer": state["optimizer"].state_dict(),
        "lr_scheduler": state["lr_scheduler"].state_dict(),
        "scaler": state["scaler"].state_dict(), "max_accuracy": state["max_accuracy"],
        "best_source": state["best_source"], "nonfinite": state["nonfinite"].used})


@pytest.mark.parametrize("stop_at", [None, 4])  # the end of epoch 1, or its micro-batch 4
def test_a_checkpoint_restores_every_part_of_the_uninterrupted_state(stop_at, tmp_path):
    args = main.get_args_parser().parse_args(TOY_ARGS)
    uninterrupted, interrupted = toy_state(args), toy_state(args)
    for state in (uninterrupted, interrupted):
        toy_epoch(state, 0, args)
        toy_epoch(state, 1, args, stop=stop_at)
        state.update(max_accuracy=55.0, best_source="model_ema")
        state["nonfinite"].used = 2
    at_checkpoint = snapshot(uninterrupted)
    assert at_checkpoint["scaler"]["scale"] > 2.0 ** 4  # the scaler has moved
    path = tmp_path / "checkpoint.pth"
    checkpoints.save_checkpoint(main.make_checkpoint(interrupted, 1, stop_at, args), str(path))

    resumed = toy_state(args)
    assert main.resume(str(path), resumed, args) == ((1, stop_at) if stop_at else (2, 0))
    assert_same(snapshot(resumed), at_checkpoint)
    # Both go on to the end of the run and still agree.
    if stop_at:
        toy_epoch(uninterrupted, 1, args, start=stop_at)
        toy_epoch(resumed, 1, args, start=stop_at)
    toy_epoch(uninterrupted, 2, args)
    toy_epoch(resumed, 2, args)
    assert_same(snapshot(resumed), snapshot(uninterrupted))
    # And with a run that never stopped at all (each epoch in one piece).
    straight = toy_state(args)
    for epoch in range(3):
        toy_epoch(straight, epoch, args)
    for part in ("model", "ema", "optimizer", "scaler"):
        assert_same(snapshot(resumed)[part], snapshot(straight)[part], part)


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
    stopped = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert stopped["epoch"] == 1 and not stopped["epoch_complete"] and 3 <= stopped["step"] < 8
    assert f"Stopped by {signal.Signals(signum).name} at epoch 1, step {stopped['step']}: " \
           f"checkpoint {tmp_path / 'checkpoint.pth'}" in output
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
