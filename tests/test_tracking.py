"""tracking.py, read back through MlflowClient from local sqlite stores: a schedule's parent run
with a tagged child per stage, each run's metrics as in log.txt, its step-level curves and its
files; one MLflow run across a SIGTERM and the resume; a store that is down costing no
training; and end to end (slow) a size script's stages under one parent across a rerun."""
import contextlib
import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from types import SimpleNamespace

import pytest
import timm
import torch
from PIL import Image
from torchvision import transforms

import main
from helpers import make_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "mambar_tiny_patch16_224"
RUN = ["--model", TINY, "--input-size", "32", "--num_workers", "0"]
EPOCH_METRICS = {"train_loss", "train_lr", "test_loss", "test_acc1", "test_acc5",
                 "test_ema_loss", "test_ema_acc1", "test_ema_acc5", "max_accuracy"}


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory):
    """An empty sqlite store, copied by each test: creating one (its schema migrations) takes
    seconds."""
    import mlflow
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


def new_store(empty_store, folder):
    """A fresh store in ``folder``: its URI and a client."""
    import mlflow
    shutil.copy(empty_store, folder / "mlflow.db")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    return uri, mlflow.MlflowClient(tracking_uri=uri)


def runs_of(client, experiment="mambar"):
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


def history(client, run, name):
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, name))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """8 training images (4 per class) and 4 validation images."""
    return make_image_folder(tmp_path_factory.mktemp("data"))


# --------------------------------------------------------------------------- a schedule

@pytest.fixture(scope="module")
def schedule(empty_store, data, tmp_path_factory):
    """What a stage script does, in process: open the parent run, train a stage (2 epochs of 4
    micro-batches, a progress line every 2), evaluate its checkpoint, open the parent again (a
    rerun of the script) and end it. An EMA of decay 0.5 and a large lr keep the EMA figures
    apart from the live weights'."""
    import tracking
    root = tmp_path_factory.mktemp("schedule")
    uri, client = new_store(empty_store, root)
    marker = root / "mambar_tiny_patch16_224" / "mlflow_parent"
    opening = ["parent", "--marker", str(marker), "--name", "mambar_tiny", "--tag",
               f"model={TINY}"]
    out = root / "pt"
    common = RUN + ["--data-path", data, "--batch", "2"]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", uri)
        env.setenv("MAMBAR_MLFLOW_PARENT", str(marker))
        assert tracking.cli(opening) == 0
        parent = marker.read_text().strip()
        assert main.cli(common + ["--epochs", "2", "--print-freq", "2", "--lr", "0.05",
                                  "--warmup-epochs", "1", "--model-ema-decay", "0.5",
                                  "--run-name", "pt", "--output_dir", str(out),
                                  "--mlflow-log-weights"]) == 0
        assert main.cli(common + ["--eval", "--resume", str(out / "checkpoint.pth")]) == 0
        assert tracking.cli(opening) == 0
        assert marker.read_text().strip() == parent
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            assert tracking.cli(["end", "--marker", str(marker), "--status", "FINISHED"]) == 0
    runs = {r.info.run_name: r for r in runs_of(client)}
    lines = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    return SimpleNamespace(client=client, runs=runs, parent=parent, out=out, lines=lines,
                           data=data, uri=uri, printed=printed.getvalue())


def evaluate_by_hand(state_dict, data):
    """Loss and top-1 of ``state_dict`` on the val split, with the spec's evaluation
    preprocessing written out (resize 32 / 0.875 bicubic, center crop, normalise)."""
    model = timm.create_model(TINY, num_classes=2, img_size=32)
    model.load_state_dict(state_dict)
    model.eval()
    prep = transforms.Compose([
        transforms.Resize(36, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(32), transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    images, labels = [], []
    for label in (0, 1):
        for name in ("0.png", "1.png"):
            images.append(prep(Image.open(os.path.join(data, "val", f"class{label}", name))
                               .convert("RGB")))
            labels.append(label)
    with torch.no_grad():
        logits = model(torch.stack(images))
    labels = torch.tensor(labels)
    return (torch.nn.functional.cross_entropy(logits, labels).item(),
            100.0 * (logits.argmax(1) == labels).float().mean().item())


def test_every_value_of_log_txt_is_the_runs_metric_at_its_epoch(schedule):
    """The EMA figures are those of the EMA weights; the eval run logs the last epoch's test
    figures again."""
    client, run, lines, out = schedule.client, schedule.runs["pt"], schedule.lines, schedule.out
    assert sorted(os.listdir(out)) == ["best_checkpoint.pth", "checkpoint.pth", "log.txt"]
    assert [line["epoch"] for line in lines] == [0, 1]
    assert set(lines[0]) == EPOCH_METRICS | {"epoch", "n_parameters"}
    assert run.data.params["model"] == TINY and run.data.params["lr_scaled"] == str(0.05 * 2 / 512)
    assert {k for k in run.data.metrics if not k.startswith("step/")} == EPOCH_METRICS
    for name in EPOCH_METRICS:
        assert history(client, run, name) == [(e, line[name]) for e, line in enumerate(lines)]
    # Epoch 0 runs at the warm-up lr, epoch 1 halfway down the cosine (1 of 2 epochs) from
    # 0.05 x 2 / 512 to the min lr 1e-5.
    assert [line["train_lr"] for line in lines] == \
        pytest.approx([1e-6, 1e-5 + (0.05 * 2 / 512 - 1e-5) / 2])
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=True)
    assert (checkpoint["epoch"], checkpoint["epoch_complete"], checkpoint["args"]["model"]) == \
        (1, True, TINY)
    live_loss, live_acc1 = evaluate_by_hand(checkpoint["model"], schedule.data)
    ema_loss, ema_acc1 = evaluate_by_hand(checkpoint["model_ema"], schedule.data)
    assert abs(live_loss - ema_loss) > 1e-3
    last = lines[-1]
    assert (last["test_loss"], last["test_acc1"]) == pytest.approx((live_loss, live_acc1),
                                                                   rel=1e-4)
    assert (last["test_ema_loss"], last["test_ema_acc1"]) == pytest.approx((ema_loss, ema_acc1),
                                                                           rel=1e-4)
    # The best of both, over the epochs, is what is kept as the best.
    assert [line["max_accuracy"] for line in lines] == [
        max(max(x["test_acc1"], x["test_ema_acc1"]) for x in lines[:i + 1])
        for i in range(len(lines))]
    assert torch.load(out / "best_checkpoint.pth", weights_only=True)["best_acc1"] == \
        last["max_accuracy"]

    evaluation = schedule.runs["eval"]
    tested = {k for k in EPOCH_METRICS if k.startswith("test_")}
    assert set(evaluation.data.metrics) == tested
    for name in tested:
        assert history(client, evaluation, name) == [(0, pytest.approx(last[name], rel=1e-6))]


def test_loss_and_lr_every_print_freq_steps_at_global_steps(schedule):
    """Step = epoch x 4 micro-batches + micro-batch, at every second micro-batch and the last
    of each epoch, as the progress lines; the lr is the epoch's, the loss the mean of the
    micro-batches since the previous point: 1, 2 and 1 of them, averaging to the epoch's."""
    client, run, lines = schedule.client, schedule.runs["pt"], schedule.lines
    steps = [0, 2, 3, 4, 6, 7]
    assert history(client, run, "step/train_lr") == \
        [(s, pytest.approx(lines[s // 4]["train_lr"])) for s in steps]
    losses = history(client, run, "step/train_loss")
    assert [s for s, _ in losses] == steps
    for epoch, (first, pair, last) in enumerate((losses[:3], losses[3:])):
        assert (first[1] + 2 * pair[1] + last[1]) / 4 == \
            pytest.approx(lines[epoch]["train_loss"], rel=1e-6)


def test_the_runs_files_are_beside_its_metrics(schedule, tmp_path):
    """log.txt, the full arguments, the command line and environment, and with
    --mlflow-log-weights the final weights, which timm loads."""
    client, run, out = schedule.client, schedule.runs["pt"], schedule.out
    files = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert files == {"log.txt", "args.json", "environment.json", "model"}
    fetched = client.download_artifacts(run.info.run_id, "", str(tmp_path))
    with open(os.path.join(fetched, "log.txt")) as f:
        assert f.read() == (out / "log.txt").read_text()
    with open(os.path.join(fetched, "args.json")) as f:
        args = json.load(f)
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=True)
    assert args == json.loads(json.dumps(checkpoint["args"]))
    with open(os.path.join(fetched, "environment.json")) as f:
        environment = json.load(f)
    assert environment["torch"] == torch.__version__ and environment["timm"] == timm.__version__
    assert environment["device"].startswith("CPU") and environment["world_size"] == 1
    assert {"command", "cuda", "triton", "python", "host"} <= set(environment)
    weights = os.path.join(fetched, "model", f"{TINY}.pth")
    # num_classes in the overlay too: else timm drops a head of another size than ImageNet's.
    model = timm.create_model(TINY, pretrained=True, num_classes=2, img_size=32,
                              pretrained_cfg_overlay=dict(file=weights, num_classes=2))
    for key, value in checkpoint["model"].items():
        assert torch.equal(model.state_dict()[key], value), key


def test_the_schedule_is_one_parent_run_with_a_tagged_child_per_stage(schedule):
    """The parent, reopened by the rerun, not duplicated, ended FINISHED; children named for
    their stage and tagged with what sets them apart; the experiment is a training one."""
    client, runs = schedule.client, schedule.runs
    assert sorted(runs) == ["eval", "mambar_tiny", "pt"]
    parent = runs["mambar_tiny"]
    assert parent.info.run_id == schedule.parent and parent.info.status == "FINISHED"
    assert parent.data.tags["model"] == TINY
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    for name, input_size, global_batch in (("pt", "32", "2"), ("eval", "32", "2")):
        run = runs[name]
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == schedule.parent
        assert {k: run.data.tags.get(k) for k in ("model", "stage", "input_size",
                                                   "global_batch", "world_size",
                                                   "scan_backend",
                                                   "mlflow.source.git.commit")} == {
            "model": TINY, "stage": name, "input_size": input_size,
            "global_batch": global_batch, "world_size": "1", "scan_backend": "torch",
            "mlflow.source.git.commit": commit}
    experiment = client.get_experiment_by_name("mambar")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    # Ending the schedule prints where the UI shows that experiment's runs table.
    assert schedule.printed == (
        f"MLflow: {sys.executable} -m mlflow ui --backend-store-uri {schedule.uri}, then "
        "http://127.0.0.1:5000/"
        f"#/experiments/{experiment.experiment_id}?workflowType=machine_learning\n")


# --------------------------------------------------------------------------- one run, resumed

def test_one_mlflow_run_across_a_sigterm_and_its_resume(empty_store, data, tmp_path,
                                                         monkeypatch):
    """SIGTERM in epoch 1 stops the run mid-epoch: KILLED, its id in the checkpoint. The same
    command continues that MLflow run, RUNNING while it trains, FINISHED at the end, its step
    curve going on from the step it stopped at: every step once."""
    uri, client = new_store(empty_store, tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = tmp_path / "run"
    argv = RUN + ["--data-path", data, "--batch", "2", "--epochs", "2", "--print-freq", "1",
                  "--no-model-ema", "--output_dir", str(out)]
    real_train, real_evaluate = main.train_one_epoch, main.evaluate

    def sigterm_in_epoch_1(*args, **kwargs):
        if args[5] == 1:  # the epoch: stop after its first step
            os.kill(os.getpid(), signal.SIGTERM)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(main, "train_one_epoch", sigterm_in_epoch_1)
    assert main.cli(argv) == 128 + signal.SIGTERM
    (stopped,) = runs_of(client)
    assert stopped.info.status == "KILLED"
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=True)
    assert (checkpoint["epoch"], checkpoint["step"], checkpoint["epoch_complete"]) == (1, 1, False)
    assert checkpoint["mlflow"] == {"run_id": stopped.info.run_id, "tracking_uri": uri}
    assert [s for s, _ in history(client, stopped, "step/train_loss")] == [0, 1, 2, 3, 4]

    statuses = []

    def recording_evaluate(*args, **kwargs):
        statuses.append(client.get_run(stopped.info.run_id).info.status)
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(main, "train_one_epoch", real_train)
    monkeypatch.setattr(main, "evaluate", recording_evaluate)
    assert main.cli(argv) == 0
    (resumed,) = runs_of(client)
    assert resumed.info.run_id == stopped.info.run_id and resumed.info.status == "FINISHED"
    assert statuses == ["RUNNING"]
    assert [s for s, _ in history(client, resumed, "step/train_loss")] == list(range(8))
    assert [s for s, _ in history(client, resumed, "test_acc1")] == [0, 1]


# --------------------------------------------------------------------------- failures

def mlflow_lines(err):
    return [line for line in err.splitlines() if "mlflow" in line.lower()]


def test_a_store_that_is_down_costs_no_training(empty_store, data, tmp_path, monkeypatch,
                                                capfd):
    """A tracking server that does not answer at the start, or a store that fails later (here
    as the run ends, its last call): one warning each time, and training ends as without
    tracking (exit 0, checkpoint)."""
    from mlflow.exceptions import MlflowException
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    argv = RUN + ["--data-path", data, "--batch", "4", "--epochs", "1", "--no-model-ema"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    assert main.cli(argv + ["--output_dir", str(tmp_path / "unreachable")]) == 0
    (warning,) = mlflow_lines(capfd.readouterr().err)
    assert warning.startswith("warning: MLflow") and "127.0.0.1:9" in warning
    assert torch.load(tmp_path / "unreachable" / "checkpoint.pth",
                      weights_only=True)["mlflow"] is None

    uri, client = new_store(empty_store, tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    real_training = main.run_training

    def refuse(*args, **kwargs):
        raise MlflowException("connection refused")

    def then_the_store_fails(*args, **kwargs):
        code = real_training(*args, **kwargs)
        for method in ("log_batch", "update_run_info", "set_tag"):
            monkeypatch.setattr(SqlAlchemyStore, method, refuse)
        return code

    monkeypatch.setattr(main, "run_training", then_the_store_fails)
    assert main.cli(argv + ["--output_dir", str(tmp_path / "ending")]) == 0
    (warning,) = mlflow_lines(capfd.readouterr().err)
    assert warning.startswith("warning: MLflow") and "connection refused" in warning
    (run,) = runs_of(client)
    assert run.info.status == "RUNNING" and "test_acc1" in run.data.metrics


def test_without_mlflow_installed_training_goes_on(monkeypatch, capsys):
    import tracking
    monkeypatch.setitem(sys.modules, "mlflow", None)
    tracker = tracking.start(main.get_args_parser().parse_args([]), torch.device("cpu"), {})
    tracker.log_metrics({"a": 1.0}, step=0)
    tracker.end("FINISHED")
    assert tracker.reference is None
    (warning,) = capsys.readouterr().err.splitlines()
    assert "mlflow is not installed" in warning


# --------------------------------------------------------------------------- a size script

TORCHRUN = """#!/usr/bin/env bash
exec "{python}" -m torch.distributed.run "$@"
"""


@pytest.mark.slow
def test_a_size_script_logs_its_stages_under_one_parent_across_a_rerun(empty_store, tmp_path):
    """mambar_tiny.sh, one process per stage, 1 epoch each on 4 images, then relaunched with
    the last stage unmarked (as after a failure between its end and its marker): the parent
    is reused, finished stages are not logged again, the relaunched stage continues its run;
    each stage started from the previous one's weights (--finetune) is a run of its own."""
    uri, client = new_store(empty_store, tmp_path)
    data = make_image_folder(tmp_path / "data", train_per_class=2, val_per_class=1)
    torchrun = tmp_path / "torchrun"
    torchrun.write_text(TORCHRUN.format(python=sys.executable))
    torchrun.chmod(torchrun.stat().st_mode | stat.S_IEXEC)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MAMBAR_"))}
    env.update(MLFLOW_TRACKING_URI=uri, DATA_PATH=data, OUTPUT_ROOT=str(tmp_path / "out"),
               GPUS_PER_NODE="1", TORCHRUN=str(torchrun), PYTHON=sys.executable,
               OMP_NUM_THREADS="1")
    command = ["bash", os.path.join(ROOT, "scripts", "mambar_tiny.sh"), "--", "--epochs", "1",
               "--batch-size", "2", "--accum_iter", "1", "--num_workers", "0"]

    def launch():
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    launch()
    first = {r.info.run_name: r for r in runs_of(client, TINY)}
    assert sorted(first) == ["eval", "ft", "mambar_tiny", "mid", "pt"]
    parent = first["mambar_tiny"]
    assert parent.info.status == "FINISHED" and parent.data.tags["world_size"] == "1"
    for name, input_size in (("pt", "128"), ("mid", "224"), ("ft", "224"), ("eval", "224")):
        run = first[name]
        assert run.info.status == "FINISHED", name
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert (run.data.tags["stage"], run.data.tags["input_size"]) == (name, input_size)
    assert len({first[n].info.run_id for n in ("pt", "mid", "ft")}) == 3

    os.remove(tmp_path / "out" / TINY / "ft" / "stage.done")
    launch()
    runs = runs_of(client, TINY)
    assert sorted(r.info.run_name for r in runs) == ["eval", "eval", "ft", "mambar_tiny", "mid",
                                                     "pt"]
    assert {r.info.run_id for r in runs if r.info.run_name != "eval"} == \
        {first[n].info.run_id for n in ("mambar_tiny", "pt", "mid", "ft")}
    assert all(r.info.status == "FINISHED" for r in runs)
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in runs
               if r.info.run_name != "mambar_tiny")
