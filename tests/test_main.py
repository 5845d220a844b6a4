"""main.py: DeiT's flags, --finetune across resolutions, --eval of released checkpoints, MLflow
tracking, and the README's three training stages + evaluation end to end with 2 processes."""
import json
import os
import shlex
import subprocess
import sys
from types import SimpleNamespace

import pytest
import timm
import torch

import main
import models_mambar
from tiny_data import make_image_folder
from utils import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "mambar_tiny_patch16_224"

# The README's commands (issue 3), as published but for paths, model, batch and epochs.
STAGES = [
    "--model {model} --batch {batch} --lr 5e-4 --weight-decay 0.05 --data-path {data} "
    "--output_dir {out}/pt --reprob 0.0 --smoothing 0.0 --repeated-aug --ThreeAugment "
    "--epochs {epochs} --input-size 128 --drop-path 0.1 --dist-eval",
    "--model {model} --batch {batch} --lr 2e-4 --weight-decay 0.05 --data-path {data} "
    "--finetune {out}/pt/checkpoint.pth --output_dir {out}/mid --reprob 0.0 --smoothing 0.0 "
    "--repeated-aug --ThreeAugment --epochs {epochs} --input-size 224 --drop-path 0.4 --dist-eval",
    "--model {model} --batch {batch} --lr 1e-5 --weight-decay 0.1 --unscale-lr --data-path {data} "
    "--finetune {out}/mid/checkpoint.pth --output_dir {out}/ft --reprob 0.0 --smoothing 0.1 "
    "--no-repeated-aug --aa rand-m9-mstd0.5-inc1 --eval-crop-ratio 1.0 --epochs {epochs} "
    "--input-size 224 --drop-path 0.4",
]
EVAL = ("--model {model} --eval --eval-crop-ratio 1.0 --batch {batch} --data-path {data} "
        "--resume {checkpoint}")


def parse(*argv):
    return main.get_args_parser().parse_args(list(argv))


def test_flags_and_defaults_are_deits():
    args = parse()
    assert (args.batch_size, args.epochs, args.lr, args.weight_decay, args.drop_path) == \
        (64, 300, 5e-4, 0.05, 0.1)
    assert (args.opt, args.opt_eps, args.opt_betas, args.clip_grad, args.momentum) == \
        ("adamw", 1e-8, None, None, 0.9)
    assert (args.sched, args.warmup_lr, args.min_lr, args.warmup_epochs, args.decay_epochs,
            args.cooldown_epochs) == ("cosine", 1e-6, 1e-5, 5, 30, 10)
    assert (args.smoothing, args.reprob, args.remode, args.recount, args.aa, args.color_jitter,
            args.train_interpolation) == (0.1, 0.25, "pixel", 1, "rand-m9-mstd0.5-inc1", 0.3,
                                          "bicubic")
    assert (args.mixup, args.cutmix, args.mixup_prob, args.mixup_switch_prob, args.mixup_mode) \
        == (0.8, 1.0, 1.0, 0.5, "batch")
    assert (args.model_ema, args.model_ema_decay, args.repeated_aug, args.eval_crop_ratio,
            args.seed, args.num_workers, args.pin_mem, args.dist_url, args.accum_iter) == \
        (True, 0.99996, True, 0.875, 0, 10, True, "env://", 1)
    assert (args.amp, args.distillation_type, args.teacher_model, args.mlflow) == \
        ("auto", "none", "regnety_160", True)


def test_the_readme_commands_parse_with_abbreviated_flags():
    for template in STAGES + [EVAL]:
        args = parse(*shlex.split(template.format(model=TINY, batch=128, data="d", out="o",
                                                  epochs=300, checkpoint="c.pth")))
        assert args.batch_size == 128
    args = parse(*shlex.split(STAGES[2].format(model=TINY, batch=64, data="d", out="o",
                                               epochs=20)))
    assert (args.unscale_lr, args.repeated_aug, args.eval_crop_ratio, args.finetune) == \
        (True, False, 1.0, "o/mid/checkpoint.pth")


@pytest.mark.parametrize("flag", [["--local-rank=1"], ["--local_rank", "1"]])
def test_the_launchers_local_rank_flag_is_accepted(flag):
    assert parse(*flag).local_rank == 1


def save_model(path, name, img_size, num_classes):
    model = timm.create_model(name, num_classes=num_classes, img_size=img_size)
    torch.save({"model": model.state_dict()}, path)
    return model.state_dict()


def test_finetune_from_128_px_interpolates_pos_embed_and_keeps_everything_else(tmp_path):
    path = tmp_path / "pt.pth"
    source = save_model(path, TINY, 128, 1000)
    model = timm.create_model(TINY, num_classes=10, img_size=224)
    head_before = model.head.weight.clone()
    main.load_finetune(model, SimpleNamespace(finetune=str(path), model=TINY))
    loaded = model.state_dict()
    assert torch.equal(loaded["pos_embed"],
                       models_mambar.resize_pos_embed(source["pos_embed"], (14, 14)))
    assert loaded["pos_embed"].shape == (1, 196, 192)
    assert torch.equal(loaded["head.weight"], head_before)  # other class count: dropped
    for key, value in source.items():
        if key != "pos_embed" and not key.startswith("head."):
            assert torch.equal(loaded[key], value), key
    assert any(k.startswith("layers.") and "mixer" in k for k in source)


def test_finetune_keeps_the_head_when_the_class_count_matches(tmp_path):
    path = tmp_path / "pt.pth"
    source = save_model(path, TINY, 128, 10)
    model = timm.create_model(TINY, num_classes=10, img_size=224)
    main.load_finetune(model, SimpleNamespace(finetune=str(path), model=TINY))
    assert torch.equal(model.state_dict()["head.weight"], source["head.weight"])


def test_finetune_from_another_model_size_names_the_mismatched_keys(tmp_path):
    path = tmp_path / "small.pth"
    save_model(path, "mambar_small_patch16_224", 128, 10)
    model = timm.create_model(TINY, num_classes=10, img_size=224)
    with pytest.raises(UserError, match=rf"{path} does not fit {TINY}: shape mismatch "
                                        r"\(checkpoint vs model\): pos_embed \(1, 196, 384\) vs "
                                        r"\(1, 196, 192\), .* and \d+ more"):
        main.load_finetune(model, SimpleNamespace(finetune=str(path), model=TINY))


def test_eval_of_a_released_format_checkpoint(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data")
    path = tmp_path / "released.pth"
    state_dict = save_model(path, TINY, 32, 2)
    code = main.cli(["--model", TINY, "--eval", "--resume", str(path), "--data-path", data,
                     "--input-size", "32", "--batch", "2", "--num_workers", "0", "--no-mlflow"])
    out = capsys.readouterr().out
    assert code == 0 and "Accuracy of the network on the 4 test images" in out
    assert "EMA" not in out
    assert set(torch.load(path)["model"]) == set(state_dict)


def test_training_is_tracked_in_mlflow_and_log_txt(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    data = make_image_folder(tmp_path / "data")
    out = tmp_path / "run"
    code = main.cli(["--model", TINY, "--data-path", data, "--input-size", "32", "--batch", "4",
                     "--epochs", "2", "--num_workers", "0", "--output_dir", str(out)])
    assert code == 0
    assert sorted(os.listdir(out)) == ["best_checkpoint.pth", "checkpoint.pth", "log.txt"]
    lines = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [0, 1]
    assert {"train_loss", "train_lr", "test_acc1", "test_acc5", "test_loss",
            "test_ema_acc1", "max_accuracy", "n_parameters"} <= set(lines[0])
    client = mlflow.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs(client.get_experiment_by_name("mambar").experiment_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model"] == TINY and run.data.params["lr_scaled"] == str(5e-4 * 4 / 512)
    history = client.get_metric_history(run.info.run_id, "test_acc1")
    assert [(m.step, m.value) for m in history] == [(e, line["test_acc1"])
                                                    for e, line in enumerate(lines)]
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=True)
    assert (checkpoint["epoch"], checkpoint["epoch_complete"], checkpoint["args"]["model"]) == \
        (1, True, TINY)


def run_stage(launcher, template, **values):
    command = launcher + ["main.py"] + shlex.split(template.format(**values))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


LAUNCHERS = {
    "torchrun": lambda n: [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                           str(n)],
    "launch": lambda n: [sys.executable, "-m", "torch.distributed.launch",
                         f"--nproc_per_node={n}", "--use_env"],
}
# On 2 CPU cores: one loader worker instead of 10, and MLflow (slow to start) in one variant.
CPU_FLAGS = {"torchrun": " --num_workers 1", "launch": " --num_workers 1 --no-mlflow"}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_three_stages_and_eval_with_two_processes(launcher, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    # 4 training images: one step of 2 on each of the 2 processes per stage.
    data = make_image_folder(tmp_path / "data", train_per_class=2, val_per_class=1)
    values = dict(model=TINY, batch=2, data=data, out=tmp_path, epochs=1)
    for stage, template in zip(("pt", "mid", "ft"), STAGES):
        run_stage(LAUNCHERS[launcher](2), template + CPU_FLAGS[launcher], **values)
        assert {"checkpoint.pth", "best_checkpoint.pth", "log.txt"} <= \
            set(os.listdir(tmp_path / stage))
    pt = torch.load(tmp_path / "pt" / "checkpoint.pth", weights_only=True)
    mid = torch.load(tmp_path / "mid" / "checkpoint.pth", weights_only=True)
    assert pt["model"]["pos_embed"].shape[1] == 64 and mid["model"]["pos_embed"].shape[1] == 196
    out = run_stage(LAUNCHERS[launcher](1), EVAL + CPU_FLAGS[launcher],
                    checkpoint=tmp_path / "ft" / "checkpoint.pth", **values)
    assert "Accuracy of the network on the 2 test images" in out
    if launcher == "torchrun":
        mlflow = pytest.importorskip("mlflow")
        client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
        runs = client.search_runs(client.get_experiment_by_name("mambar").experiment_id)
        assert sorted(r.info.run_name for r in runs) == sorted(["pt", "mid", "ft", TINY])
