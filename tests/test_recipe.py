"""What main.py builds from each stage's command of the recipe (scripts/mambar_*.sh, dry run):
the optimizer's parameter groups and hyper-parameters, the learning rate of every epoch, the
EMA, mixup / cutmix / label smoothing, the training transforms and the criterion. Each is
checked against the recipe's numbers written out here (the authors' published Base commands,
their Adventurer recipe for the other sizes, and the official code's weight decay), not
against what our code computes. Nothing trains: main.run is
stopped where training would start, and the model is Tiny at 32 px on DIGITS (no download)."""
import math
import shlex
import subprocess
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from timm.data import Mixup
from timm.data.auto_augment import RandAugment
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms

import augment
import main

REPO = Path(__file__).resolve().parent.parent
TINY = "mambar_tiny_patch16_224"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
NO_DECAY_NAMES = {"pos_embed", "cls_token", "pos_embed_cls"}


def stage_commands(size="base", **env):
    """main.py's flags for stages 1-3 of ``scripts/mambar_{size}.sh --dry-run``."""
    proc = subprocess.run(["bash", str(REPO / "scripts" / f"mambar_{size}.sh"), "--dry-run"],
                          capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "DATA_PATH": "/data/imagenet", **env})
    assert proc.returncode == 0, proc.stderr
    argvs = []
    for line in proc.stdout.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        cmd = shlex.split(line)
        at = next(i for i, a in enumerate(cmd) if a.endswith("main.py"))
        argvs.append(cmd[at + 1:])
    return argvs[:3]


def cpu_flags(argv):
    """The stage's flags, on Tiny at 32 px, with DIGITS instead of ImageNet and no checkpoint
    in or out (those change neither the optimizer nor the augmentations)."""
    out, skip = [], {"--data-path", "--finetune", "--output_dir", "--model", "--input-size"}
    it = iter(argv)
    for arg in it:
        if arg in skip:
            next(it)
        else:
            out.append(arg)
    return out + ["--model", TINY, "--input-size", "32", "--num_workers", "0", "--no-mlflow"]


def build(argv, monkeypatch, world_size=1):
    """Run main.cli(argv) up to the start of training, as rank 0 of ``world_size`` processes;
    returns what run_training would receive."""
    def single_rank_of(args):
        args.distributed, args.rank, args.world_size, args.gpu = False, 0, world_size, 0

    built = {}

    def capture(model, model_eval, criterion, loader_train, loader_val, state, device, amp_dtype,
                mixup_fn, *rest):
        built.update(model=model, criterion=criterion, loader_train=loader_train, state=state,
                     mixup_fn=mixup_fn)
        return 0

    monkeypatch.setattr(main.utils, "init_distributed_mode", single_rank_of)
    monkeypatch.setattr(main, "run_training", capture)
    assert main.cli(argv) == 0
    return built


def recipe_lr(epoch, base, epochs, warmup=5, warmup_lr=1e-6, min_lr=1e-5):
    """The spec's schedule, stepped per epoch: linear warm-up from warmup_lr over ``warmup``
    epochs, then cosine from ``base`` to ``min_lr`` over the run (DeiT / timm count the cosine
    from epoch 0, so the warm-up epochs are part of its period)."""
    if epoch < warmup:
        return warmup_lr + epoch * (base - warmup_lr) / warmup
    return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * epoch / epochs))


def lr_per_epoch(built, epochs):
    """The lr of every parameter group at each epoch, as the epoch loop steps the schedule."""
    scheduler, optimizer = built["state"]["lr_scheduler"], built["state"]["optimizer"]
    out = []
    for epoch in range(epochs):
        scheduler.step(epoch)
        lrs = {group["lr"] for group in optimizer.param_groups}
        assert len(lrs) == 1, lrs
        out.append(lrs.pop())
    return out


# Base's published commands: (epochs, lr after scaling by global batch / 512, weight decay,
# drop path, label smoothing). Stages 1 and 2 have a global batch of 1024 (8 x 128), so their
# lr is twice the flag; stage 3 uses --unscale-lr.
BASE = [(300, 5e-4 * 1024 / 512, 0.05, 0.1, 0.0),
        (100, 2e-4 * 1024 / 512, 0.05, 0.4, 0.0),
        (20, 1e-5, 0.1, 0.4, 0.1)]
# Ways to reach the recipe's global batch: 8 GPUs, 1 GPU with 8-step accumulation, 8 GPUs of
# at most 32 images with 4-step accumulation (the scripts' --max-gpu-batch).
# (processes, environment of the script, stage 1's per-process batch and accumulation)
LAYOUTS = {"8 GPUs": (8, {"GPUS_PER_NODE": "8"}, ["128"]),
           "1 GPU, accum 8": (1, {"GPUS_PER_NODE": "1"}, ["128", "--accum_iter", "8"]),
           "8 GPUs, accum 4": (8, {"GPUS_PER_NODE": "8", "MAX_GPU_BATCH": "32"},
                               ["32", "--accum_iter", "4"])}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_each_stage_runs_at_the_recipe_lr_every_epoch(layout, monkeypatch):
    world, env, split = LAYOUTS[layout]
    commands = stage_commands(**env)
    at = commands[0].index("--batch-size") + 1
    assert commands[0][at:at + len(split)] == split
    for stage, (argv, (epochs, base, *_)) in enumerate(zip(commands, BASE), 1):
        built = build(cpu_flags(argv), monkeypatch, world_size=world)
        got = lr_per_epoch(built, epochs)
        want = [recipe_lr(e, base, epochs) for e in range(epochs)]
        assert got == pytest.approx(want, rel=1e-9, abs=0), f"stage {stage}"


def test_stage_one_lr_values_by_hand(monkeypatch):
    """Warm-up 1e-6 -> 1e-3 in 5 steps of ~2e-4, then the cosine reaches its midpoint at
    epoch 150 of 300 and the min lr at the end."""
    built = build(cpu_flags(stage_commands(GPUS_PER_NODE="8")[0]), monkeypatch, world_size=8)
    lrs = lr_per_epoch(built, 300)
    assert lrs[0] == pytest.approx(1e-6)
    assert lrs[1] == pytest.approx(1e-6 + (1e-3 - 1e-6) / 5)
    assert lrs[4] == pytest.approx(1e-6 + 4 * (1e-3 - 1e-6) / 5)
    assert lrs[150] == pytest.approx(1e-5 + (1e-3 - 1e-5) / 2)    # cos(pi / 2) = 0
    assert lrs[299] == pytest.approx(1e-5, rel=1e-2)


@pytest.mark.parametrize("world, accum, batch", [(1, 1, 16), (1, 4, 16), (4, 1, 16), (4, 3, 8)])
def test_lr_scales_with_the_global_batch_of_processes_batch_and_accumulation(world, accum, batch,
                                                                            monkeypatch):
    argv = ["--model", TINY, "--input-size", "32", "--num_workers", "0", "--no-mlflow",
            "--lr", "5e-4", "--batch-size", str(batch), "--accum_iter", str(accum),
            "--warmup-epochs", "0", "--epochs", "10"]
    built = build(argv, monkeypatch, world_size=world)
    assert lr_per_epoch(built, 1) == [pytest.approx(5e-4 * world * batch * accum / 512)]
    built = build(argv + ["--unscale-lr"], monkeypatch, world_size=world)
    assert lr_per_epoch(built, 1) == [pytest.approx(5e-4)]


def expected_decay(name, param, weight_decay):
    """The spec's rule: no decay for 1-D parameters, biases, pos_embed, cls_token and
    pos_embed_cls; everything else (A_log and A_b_log included) decays."""
    if param.ndim <= 1 or name.endswith(".bias") or name in NO_DECAY_NAMES:
        return 0.0
    return weight_decay


@pytest.mark.parametrize("model", [TINY, "mambar_small_patch16_224"])  # small has a neck
def test_weight_decay_groups_name_every_parameter_as_the_spec_says(model, monkeypatch):
    for argv, (_, _, wd, _, _) in zip(stage_commands(GPUS_PER_NODE="8"), BASE):
        flags = cpu_flags(argv)
        flags[flags.index("--model") + 1] = model
        built = build(flags, monkeypatch, world_size=8)
        group_of = {id(p): g["weight_decay"]
                    for g in built["state"]["optimizer"].param_groups for p in g["params"]}
        named = dict(built["model"].named_parameters())
        assert len(group_of) == len(named) == \
            sum(len(g["params"]) for g in built["state"]["optimizer"].param_groups)
        got = {name: group_of[id(p)] for name, p in named.items()}
        assert got == {name: expected_decay(name, p, wd) for name, p in named.items()}
    # The rule's consequences, name by name.
    decays = {"layers.0.mixer.A_log", "layers.0.mixer.A_b_log", "layers.0.mixer.in_proj.weight",
              "layers.0.mixer.x_proj_b.weight", "layers.0.mixer.conv1d.weight",
              "layers.23.mixer.out_proj.weight", "patch_embed.proj.weight", "head.weight"}
    free = {"pos_embed", "cls_token", "pos_embed_cls", "layers.0.mixer.D", "layers.0.mixer.D_b",
            "layers.0.mixer.dt_proj.bias", "layers.0.mixer.conv1d_b.bias", "layers.0.norm.weight",
            "norm_f.weight", "head.bias", "patch_embed.proj.bias"}
    if model != TINY:
        decays.add("neck.weight")
        free.add("norm_neck.weight")
    assert {got[n] for n in decays} == {0.1} and {got[n] for n in free} == {0.0}


def test_adamw_with_the_recipe_betas_and_eps(monkeypatch):
    for size, betas in (("base", (0.9, 0.999)), ("large", (0.9, 0.95))):
        built = build(cpu_flags(stage_commands(size, GPUS_PER_NODE="8")[0]), monkeypatch,
                      world_size=8)
        optimizer = built["state"]["optimizer"]
        assert type(optimizer) is torch.optim.AdamW
        for group in optimizer.param_groups:
            assert (tuple(group["betas"]), group["eps"], group["amsgrad"]) == (betas, 1e-8, False)
            # torch's fused kernel (one per parameter; same update, fewer ops): on a CPU step
            # of Tiny the unfused loop took 38 ms, the fused one 9.
            assert group["fused"] is True
    # Large's stage 1: 20 warm-up epochs to 2e-4 x 4096 / 512.
    lrs = lr_per_epoch(built, 200)
    assert lrs[:21] == pytest.approx([recipe_lr(e, 1.6e-3, 200, warmup=20) for e in range(21)])


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_ema_drop_path_and_mixup_follow_the_stage(stage, monkeypatch):
    built = build(cpu_flags(stage_commands(GPUS_PER_NODE="8")[stage - 1]), monkeypatch,
                  world_size=8)
    _, _, _, drop_path, smoothing = BASE[stage - 1]
    ema = built["state"]["model_ema"]
    assert ema.decay == 0.99996
    for (name, p), q in zip(built["model"].state_dict().items(), ema.module.state_dict().values()):
        assert torch.equal(p, q), name
    model = built["model"]
    assert model.drop_path.drop_prob == drop_path  # the last block's add
    assert model.layers[-1].drop_path.drop_prob == pytest.approx(drop_path * 22 / 23)
    mixup = built["mixup_fn"]
    assert isinstance(mixup, Mixup)
    assert (mixup.mixup_alpha, mixup.cutmix_alpha, mixup.cutmix_minmax, mixup.mix_prob,
            mixup.switch_prob, mixup.mode, mixup.label_smoothing, mixup.num_classes) == \
        (0.8, 1.0, None, 1.0, 0.5, "batch", smoothing, 10)


def test_the_ema_starts_from_the_finetuned_weights(tmp_path, monkeypatch):
    torch.manual_seed(1)
    source = timm.create_model(TINY, num_classes=10, img_size=32).state_dict()
    torch.save({"model": source}, tmp_path / "pt.pth")
    argv = cpu_flags(stage_commands(GPUS_PER_NODE="8")[1]) + ["--finetune",
                                                             str(tmp_path / "pt.pth")]
    built = build(argv, monkeypatch, world_size=8)
    for name, value in built["state"]["model_ema"].module.state_dict().items():
        assert torch.equal(value, source[name]), name


def one_hot(y, classes, smoothing):
    return torch.eye(classes)[y] * (1 - smoothing) + smoothing / classes


@pytest.mark.parametrize("stage", [1, 3])
def test_mixed_targets_carry_the_stage_smoothing_and_the_mixing_fraction(stage, monkeypatch):
    """Each target is lam * smooth(y) + (1 - lam) * smooth(y of the flipped batch), lam the
    fraction of the image that is its own (mixup blends, cutmix pastes a box)."""
    built = build(cpu_flags(stage_commands(GPUS_PER_NODE="8")[stage - 1]), monkeypatch,
                  world_size=8)
    smoothing = BASE[stage - 1][4]
    batch = 8
    y = torch.arange(batch) % 10
    for seed in range(6):  # both mixup and cutmix get drawn
        torch.manual_seed(seed)
        # Image i is the constant i + 1: the mixed pixel tells how much of it is left.
        x = (torch.arange(batch, dtype=torch.float32) + 1).view(-1, 1, 1, 1).expand(
            batch, 3, 32, 32).contiguous()
        mixed, targets = built["mixup_fn"](x.clone(), y.clone())
        own, other = x, x.flip(0)
        lam = ((mixed - other) / (own - other))[0].mean()  # image 0's partner is image 7
        want = lam * one_hot(y, 10, smoothing) + (1 - lam) * one_hot(y.flip(0), 10, smoothing)
        torch.testing.assert_close(targets, want)
        assert targets.min() == pytest.approx(smoothing / 10)


def soft_ce(logits, targets):
    return (-(targets * torch.log_softmax(logits, dim=1)).sum(1)).mean()


@pytest.mark.parametrize("flags, kind", [
    ([], "soft"),                                              # the recipe: mixup/cutmix on
    (["--mixup", "0"], "soft"),                                # cutmix alone still mixes
    (["--cutmix", "0"], "soft"),                               # and so does mixup alone
    (["--mixup", "0", "--cutmix", "0", "--smoothing", "0.1"], "smooth"),
    (["--mixup", "0", "--cutmix", "0", "--smoothing", "0"], "plain"),
    (["--bce-loss"], "bce")])
def test_the_criterion_is_the_one_the_flags_imply(flags, kind, monkeypatch):
    argv = cpu_flags(stage_commands(GPUS_PER_NODE="8")[2]) + flags
    built = build(argv, monkeypatch, world_size=8)
    criterion = built["criterion"]
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 10, generator=g)
    y = torch.tensor([3, 0, 9, 3])
    if kind == "soft":
        assert built["mixup_fn"] is not None
        targets = torch.softmax(torch.randn(4, 10, generator=g), 1)
        assert criterion(None, logits, targets).item() == pytest.approx(
            soft_ce(logits, targets).item(), rel=1e-6)
        return
    if kind == "bce":
        # BCE counts every class with a non-zero target as present: smoothing must stay out
        # of the mixed targets, which then name the two mixed labels only.
        x = torch.rand(4, 3, 32, 32)
        _, mixed = built["mixup_fn"](x, y)
        assert ((mixed > 0).sum(1) <= 2).all()
        targets = torch.tensor([[0.0] * 9 + [1.0]] * 4)
        targets[0, 2] = 0.3  # mixed in: counts as present
        binary = (targets > 0).float()
        p = torch.sigmoid(logits)
        want = -(binary * torch.log(p) + (1 - binary) * torch.log(1 - p)).mean()
        assert criterion(None, logits, targets).item() == pytest.approx(want.item(), rel=1e-5)
        return
    assert built["mixup_fn"] is None
    smoothing = 0.1 if kind == "smooth" else 0.0
    # Label smoothing as DeiT / timm define it: 1 - s on the label, s spread over all classes.
    want = soft_ce(logits, one_hot(y, 10, smoothing))
    assert criterion(None, logits, y).item() == pytest.approx(want.item(), rel=1e-6)


def train_transform(built):
    return built["loader_train"].dataset.dataset.transform.transforms


@pytest.mark.parametrize("stage", [1, 2])
def test_three_augment_in_stages_one_and_two(stage, monkeypatch):
    built = build(cpu_flags(stage_commands(GPUS_PER_NODE="8")[stage - 1]), monkeypatch,
                  world_size=8)
    crop, flip, choice, jitter, to_tensor, normalize = train_transform(built)
    assert isinstance(crop, RandomResizedCropAndInterpolation)
    assert (crop.size, crop.scale, crop.interpolation) == ((32, 32), (0.08, 1.0),
                                                           transforms.InterpolationMode.BICUBIC)
    assert isinstance(flip, transforms.RandomHorizontalFlip) and flip.p == 0.5
    assert isinstance(choice, transforms.RandomChoice) and choice.p is None
    gray, solarize, blur = choice.transforms
    assert isinstance(gray, transforms.Grayscale) and gray.num_output_channels == 3
    assert isinstance(solarize, augment.Solarization)
    assert (blur.radius_min, blur.radius_max) == (0.1, 2.0)
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == \
        ((0.7, 1.3), (0.7, 1.3), (0.7, 1.3), None)
    assert isinstance(to_tensor, transforms.ToTensor)
    assert (normalize.mean, normalize.std) == (MEAN, STD)
    # Solarize inverts pixels at or above 128; the blur radius is drawn from [0.1, 2].
    img = Image.new("RGB", (4, 4), (10, 128, 250))
    assert solarize(img).getpixel((0, 0)) == (10, 127, 5)
    assert built["loader_train"].sampler.sampler.num_repeats == 3  # repeated augmentation


def test_rand_augment_without_erasing_or_jitter_in_stage_three(monkeypatch):
    built = build(cpu_flags(stage_commands(GPUS_PER_NODE="8")[2]), monkeypatch, world_size=8)
    steps = train_transform(built)
    assert [type(t).__name__ for t in steps] == [
        "RandomResizedCropAndInterpolation", "RandomHorizontalFlip", "RandAugment",
        "MaybeToTensor", "Normalize"]
    rand = steps[2]
    assert isinstance(rand, RandAugment) and rand.num_layers == 2
    # rand-m9-mstd0.5-inc1: magnitude 9 drawn with std 0.5, the "increasing" variants.
    assert {(op.magnitude, op.magnitude_std, op.prob) for op in rand.ops} == {(9, 0.5, 0.5)}
    assert {"PosterizeIncreasing", "SolarizeIncreasing", "ColorIncreasing"} <= \
        {op.name for op in rand.ops}
    assert steps[0].interpolation == transforms.InterpolationMode.BICUBIC
    assert not hasattr(built["loader_train"].sampler.sampler, "num_repeats")  # no repeats


def test_random_erasing_follows_reprob_remode_recount(monkeypatch):
    argv = ["--model", TINY, "--input-size", "32", "--num_workers", "0", "--no-mlflow",
            "--reprob", "0.4", "--remode", "rand", "--recount", "2"]
    erasing = train_transform(build(argv, monkeypatch))[-1]
    assert isinstance(erasing, RandomErasing)
    # Up to --recount boxes per image (timm / DeiT draw the count from 1..recount).
    assert (erasing.probability, erasing.mode, erasing.min_count, erasing.max_count) == \
        (0.4, "rand", 1, 2)
