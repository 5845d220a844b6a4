"""main.py: DeiT's flags, --finetune across resolutions, --eval of released checkpoints, the best
checkpoint, and the README's three training stages + evaluation end to end with 2 processes
(MLflow tracking: test_tracking.py)."""
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
from helpers import make_image_folder
from utils import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "mambar_tiny_patch16_224"

# The README's commands, as published but for paths, model, batch and epochs.
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


@pytest.mark.parametrize("amp, device, want", [
    ("auto", "cuda", (torch.bfloat16, False)), ("bf16", "cuda", (torch.bfloat16, False)),
    ("fp16", "cuda", (torch.float16, True)), ("fp32", "cuda", (None, False)),
    ("none", "cuda", (None, False)), ("auto", "cpu", (None, False)),
    ("fp16", "cpu", (None, False))])
def test_autocast_is_bf16_on_cuda_by_default_and_fp16_brings_a_scaler(amp, device, want):
    assert main.autocast_dtype(parse("--amp", amp), torch.device(device)) == want


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
    # The spec: pos_embed interpolated bicubically over the patch grid, 8x8 -> 14x14, as
    # torch's bicubic interpolation of the (D, 8, 8) grid does it.
    grid = source["pos_embed"].reshape(1, 8, 8, 192).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(grid, size=(14, 14), mode="bicubic",
                                           align_corners=False)
    torch.testing.assert_close(loaded["pos_embed"],
                               want.permute(0, 2, 3, 1).reshape(1, 196, 192))
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


def test_the_best_checkpoint_is_chosen_over_live_and_ema_accuracies(tmp_path, monkeypatch):
    """Evaluation is replaced by fixed accuracies per epoch, one series for the EMA module
    and one for the live model: the best (and its source) is the highest of either, and
    best_checkpoint.pth is the epoch that reached it."""
    ema_modules = []

    class RecordedEma(main.ModelEmaV3):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            ema_modules.append(self.module)

    scores = {"ema": iter([70.0, 20.0]), "live": iter([40.0, 60.0])}

    def fixed_evaluate(loader, model, *args, **kwargs):
        acc1 = next(scores["ema" if any(model is m for m in ema_modules) else "live"])
        return {"loss": 1.0, "acc1": acc1, "acc5": 100.0}

    monkeypatch.setattr(main, "ModelEmaV3", RecordedEma)
    monkeypatch.setattr(main, "evaluate", fixed_evaluate)
    out = tmp_path / "run"
    code = main.cli(["--model", TINY, "--data-path", make_image_folder(tmp_path / "data"),
                     "--input-size", "32", "--batch", "4", "--epochs", "2", "--num_workers", "0",
                     "--no-mlflow", "--output_dir", str(out)])
    assert code == 0
    lines = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [(x["test_acc1"], x["test_ema_acc1"], x["max_accuracy"]) for x in lines] == \
        [(40.0, 70.0, 70.0), (60.0, 20.0, 70.0)]
    best = torch.load(out / "best_checkpoint.pth", weights_only=True)
    assert (best["epoch"], best["best_acc1"], best["best_source"]) == (0, 70.0, "model_ema")
    last = torch.load(out / "checkpoint.pth", weights_only=True)
    assert (last["epoch"], last["max_accuracy"], last["best_source"]) == (1, 70.0, "model_ema")


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
        import mlflow
        client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
        runs = client.search_runs(client.get_experiment_by_name("mambar").experiment_id)
        assert sorted(r.info.run_name for r in runs) == ["eval", "ft", "mid", "pt"]
        # 2 processes x batch 2: the lr flag x 4 / 512, except stage 3's --unscale-lr.
        lr = {r.info.run_name: float(r.data.params["lr_scaled"]) for r in runs}
        assert (lr["pt"], lr["mid"], lr["ft"]) == pytest.approx((5e-4 * 4 / 512, 2e-4 * 4 / 512,
                                                                 1e-5))


def test_compile_flag_trains_and_evaluates_compiled_models_and_saves_plain_weights(
        tmp_path, monkeypatch):
    """--compile: training and evaluation call torch.compile's wrappers, and the checkpoint
    holds the plain model's keys, which an uncompiled model loads strictly. (Dynamo's "eager"
    backend here, to keep the test short; test_models checks Inductor's numbers.)"""
    data = make_image_folder(tmp_path / "data")
    compiled, trained, evaluated = [], [], []
    real_compile, real_train, real_evaluate = torch.compile, main.train_one_epoch, main.evaluate

    def recording_compile(module):
        compiled.append(real_compile(module, backend="eager"))
        return compiled[-1]

    def recording_train(model, *args, **kwargs):
        trained.append(model)
        return real_train(model, *args, **kwargs)

    def recording_evaluate(loader, model, *args, **kwargs):
        evaluated.append(model)
        return real_evaluate(loader, model, *args, **kwargs)

    monkeypatch.setattr(torch, "compile", recording_compile)
    monkeypatch.setattr(main, "train_one_epoch", recording_train)
    monkeypatch.setattr(main, "evaluate", recording_evaluate)
    out = tmp_path / "out"
    code = main.cli(["--model", TINY, "--data-path", data, "--input-size", "32", "--batch", "4",
                     "--epochs", "1", "--num_workers", "0", "--no-mlflow", "--no-model-ema",
                     "--compile", "--output_dir", str(out)])
    assert code == 0 and len(compiled) == 2
    assert trained == [compiled[0]] and evaluated == [compiled[1]]
    state_dict = torch.load(out / "checkpoint.pth", weights_only=True)["model"]
    model = timm.create_model(TINY, num_classes=2, img_size=32)
    model.load_state_dict(state_dict, strict=True)
