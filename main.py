"""Mamba® training and evaluation (DeiT's main.py and flags).

Runs as ``python main.py``, under ``torchrun`` or ``python -m torch.distributed.launch
--use_env`` (env:// rendezvous), or as SLURM tasks; nccl on GPUs, gloo on CPUs.

Crash safety: checkpoints are written atomically; every random draw is a function of (seed,
epoch, step, rank) or (seed, epoch, rank, sample position), so a run resumed from any checkpoint
replays the uninterrupted run exactly. SIGTERM / SIGUSR1 stop at the next optimizer step and
write a mid-epoch checkpoint (``"epoch_complete": False``) that a resume continues from the
next micro-batch; the process then exits with 128 + the signal number. Relaunching the same
command continues from ``output_dir/checkpoint.pth`` (``--auto-resume``, the default;
``--no-auto-resume`` starts over). A non-finite loss stops the run without touching the
checkpoints (``--skip-nonfinite N`` skips up to N such steps); an unreadable image stops it
naming the file. Bad input ends the run with one ``error:`` line on stderr and exit code 1
(``--debug`` shows the traceback); Ctrl-C stops at once, exit code 130. When one of several
processes fails, the others stop with one line each instead of a traceback, and a group that
torchrun restarts (``--max-restarts``) continues from the checkpoint too.
"""
import argparse
import datetime
import os
import signal
import sys
import time
import traceback

# Idle OpenMP threads must sleep, not spin: a spinning team fights any other busy process for
# the cores and every op's barrier then waits out a scheduler slice (seen here: a 2-thread CPU
# training step took 135 s instead of 3.5 s next to one other busy process). Read by OpenMP
# when torch loads, hence before the imports below.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import timm
import torch
from timm.data import Mixup
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel

import checkpoints
import models_mambar
import models_vim
import tracking
import utils
from datasets import DATASETS, UnreadableImageError, build_dataset
from engine import NonFiniteBudget, NonFiniteLossError, evaluate, train_one_epoch
from losses import build_criterion, build_teacher
from samplers import SeededDataset, build_eval_sampler, build_train_sampler

# Modules whose timm-registered models --model accepts.
MODEL_MODULES = [models_mambar, models_vim]

# Head parameters that --finetune drops when their shape differs (another class count).
HEAD_PREFIXES = ("head.", "neck.", "norm_neck.")

CHECKPOINT_VERSION = 1

# What a mid-epoch position (a micro-batch index) means; a resume must match them to use it.
MID_EPOCH_LAYOUT = ("batch_size", "world_size", "accum_iter")


def get_args_parser():
    parser = argparse.ArgumentParser("Mamba® training and evaluation script", add_help=False)
    parser.add_argument("--batch-size", default=64, type=int, help="batch size per process")
    parser.add_argument("--epochs", default=300, type=int)
    parser.add_argument("--bce-loss", action="store_true")
    parser.add_argument("--unscale-lr", action="store_true",
                        help="use --lr as given instead of scaling it by the global batch "
                             "(batch size x processes x accum_iter) / 512")
    parser.add_argument("--accum_iter", default=1, type=int,
                        help="micro-batches per optimizer step (gradient accumulation)")

    # Model parameters
    parser.add_argument("--model", default="mambar_tiny_patch16_224", type=str, metavar="MODEL",
                        help="name of the model to train")
    parser.add_argument("--input-size", default=224, type=int, help="images input size")
    parser.add_argument("--drop", type=float, default=0.0, metavar="PCT", help="dropout rate")
    parser.add_argument("--drop-path", type=float, default=0.1, metavar="PCT",
                        help="drop path rate")
    parser.add_argument("--grad-checkpointing", action="store_true",
                        help="redo each block's forward in the backward instead of keeping its "
                             "activations (for Large or high resolution; about one more "
                             "forward per step)")
    parser.add_argument("--compile", action="store_true",
                        help="run the model through torch.compile (one graph: the mixer's "
                             "scan is a custom op); the first steps pay the compilation")
    parser.add_argument("--model-ema", action="store_true",
                        help="keep an EMA of the weights and evaluate it too (default)")
    parser.add_argument("--no-model-ema", action="store_false", dest="model_ema")
    parser.set_defaults(model_ema=True)
    parser.add_argument("--model-ema-decay", type=float, default=0.99996)
    parser.add_argument("--model-ema-force-cpu", action="store_true", default=False)

    # Optimizer parameters
    parser.add_argument("--opt", default="adamw", type=str, metavar="OPTIMIZER")
    parser.add_argument("--opt-eps", default=1e-8, type=float, metavar="EPSILON")
    parser.add_argument("--opt-betas", default=None, type=float, nargs="+", metavar="BETA",
                        help="optimizer betas (default: the optimizer's)")
    parser.add_argument("--clip-grad", type=float, default=None, metavar="NORM",
                        help="clip gradient norm (default: no clipping)")
    parser.add_argument("--momentum", type=float, default=0.9, metavar="M", help="SGD momentum")
    parser.add_argument("--weight-decay", type=float, default=0.05)

    # Learning rate schedule parameters (stepped once per epoch)
    parser.add_argument("--sched", default="cosine", choices=["cosine", "tanh", "step", "poly"],
                        type=str, metavar="SCHEDULER")
    parser.add_argument("--lr", type=float, default=5e-4, metavar="LR",
                        help="learning rate for a global batch of 512 (see --unscale-lr)")
    parser.add_argument("--lr-noise", type=float, nargs="+", default=None, metavar="pct, pct",
                        help="learning rate noise on/off epoch percentages")
    parser.add_argument("--lr-noise-pct", type=float, default=0.67, metavar="PERCENT")
    parser.add_argument("--lr-noise-std", type=float, default=1.0, metavar="STDDEV")
    parser.add_argument("--warmup-lr", type=float, default=1e-6, metavar="LR")
    parser.add_argument("--min-lr", type=float, default=1e-5, metavar="LR")
    parser.add_argument("--decay-epochs", type=float, default=30, metavar="N")
    parser.add_argument("--warmup-epochs", type=int, default=5, metavar="N")
    parser.add_argument("--cooldown-epochs", type=int, default=10, metavar="N")
    parser.add_argument("--patience-epochs", type=int, default=10, metavar="N")
    parser.add_argument("--decay-rate", "--dr", type=float, default=0.1, metavar="RATE")

    # Augmentation parameters
    parser.add_argument("--color-jitter", type=float, default=0.3, metavar="PCT")
    parser.add_argument("--hflip", type=float, default=0.5, metavar="PROB",
                        help="probability of a horizontal flip in training (0 for images whose "
                             "mirror image means something else, such as digits)")
    parser.add_argument("--aa", type=str, default="rand-m9-mstd0.5-inc1", metavar="NAME",
                        help='AutoAugment / RandAugment policy ("none" to disable)')
    parser.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    parser.add_argument("--train-interpolation", type=str, default="bicubic",
                        help='training interpolation ("random", "bilinear", "bicubic")')
    parser.add_argument("--repeated-aug", action="store_true",
                        help="repeated augmentation across processes (default; a single "
                             "process uses a plain shuffle, as in DeiT)")
    parser.add_argument("--no-repeated-aug", action="store_false", dest="repeated_aug")
    parser.set_defaults(repeated_aug=True)
    parser.add_argument("--train-mode", action="store_true")
    parser.add_argument("--no-train-mode", action="store_false", dest="train_mode")
    parser.set_defaults(train_mode=True)
    parser.add_argument("--ThreeAugment", action="store_true",
                        help="DeiT III's ThreeAugment instead of RandAugment + random erasing")
    parser.add_argument("--src", action="store_true",
                        help="with --ThreeAugment: simple random crop instead of random "
                             "resized crop")

    # Random erase parameters
    parser.add_argument("--reprob", type=float, default=0.25, metavar="PCT")
    parser.add_argument("--remode", type=str, default="pixel")
    parser.add_argument("--recount", type=int, default=1)
    parser.add_argument("--resplit", action="store_true", default=False,
                        help="accepted for DeiT compatibility; has no effect")

    # Mixup parameters
    parser.add_argument("--mixup", type=float, default=0.8, help="mixup alpha, on if > 0")
    parser.add_argument("--cutmix", type=float, default=1.0, help="cutmix alpha, on if > 0")
    parser.add_argument("--cutmix-minmax", type=float, nargs="+", default=None)
    parser.add_argument("--mixup-prob", type=float, default=1.0)
    parser.add_argument("--mixup-switch-prob", type=float, default=0.5)
    parser.add_argument("--mixup-mode", type=str, default="batch",
                        choices=["batch", "pair", "elem"])

    # Distillation parameters
    parser.add_argument("--teacher-model", default="regnety_160", type=str, metavar="MODEL")
    parser.add_argument("--teacher-path", type=str, default="")
    parser.add_argument("--distillation-type", default="none", choices=["none", "soft", "hard"])
    parser.add_argument("--distillation-alpha", default=0.5, type=float)
    parser.add_argument("--distillation-tau", default=1.0, type=float)

    # Finetuning
    parser.add_argument("--finetune", default="",
                        help="start from these weights: pos_embed resized to --input-size, "
                             "head/neck dropped where the class count differs")

    # Dataset parameters
    parser.add_argument("--data-path", default="", type=str,
                        help="dataset root (for IMNET: train/ and val/ class folders)")
    parser.add_argument("--data-set", default=None, choices=DATASETS, type=str,
                        help="default: IMNET with --data-path, else DIGITS (scikit-learn's "
                             "handwritten digits, shipped with scikit-learn: no download)")
    parser.add_argument("--inat-category", default="name",
                        choices=["kingdom", "phylum", "class", "order", "supercategory",
                                 "family", "genus", "name"])
    parser.add_argument("--output_dir", default="", help="where to save, empty for no saving")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "fp32", "none"],
                        help="autocast on CUDA: auto = bf16; fp16 adds a grad scaler; "
                             "fp32/none disables it. CPU always runs fp32.")
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--resume", default="", help="resume from checkpoint")
    parser.add_argument("--auto-resume", action="store_true",
                        help="continue from output_dir/checkpoint.pth when it exists and "
                             "--resume is not given (default), so that a relaunched job "
                             "continues without editing its command line")
    parser.add_argument("--no-auto-resume", action="store_false", dest="auto_resume")
    parser.set_defaults(auto_resume=True)
    parser.add_argument("--start_epoch", default=0, type=int, metavar="N")
    parser.add_argument("--eval", action="store_true", help="perform evaluation only")
    parser.add_argument("--eval-crop-ratio", default=0.875, type=float,
                        help="evaluation resizes to input_size / ratio, then center-crops")
    parser.add_argument("--dist-eval", action="store_true", default=False,
                        help="shard the evaluation over the processes")
    parser.add_argument("--num_workers", default=10, type=int)
    parser.add_argument("--pin-mem", action="store_true")
    parser.add_argument("--no-pin-mem", action="store_false", dest="pin_mem")
    parser.set_defaults(pin_mem=True)
    parser.add_argument("--print-freq", default=10, type=int, help="progress line every N steps")
    parser.add_argument("--skip-nonfinite", default=0, type=int, metavar="N",
                        help="skip up to N optimizer steps with a non-finite loss over the "
                             "run instead of stopping at the first")
    parser.add_argument("--no-mlflow", action="store_false", dest="mlflow",
                        help="do not track the run with MLflow (default: track to "
                             "$MLFLOW_TRACKING_URI, else sqlite:///mlflow.db; a resumed run "
                             "continues its MLflow run; $MAMBAR_MLFLOW_PARENT: parent run)")
    parser.add_argument("--run-name", default="", metavar="NAME",
                        help="MLflow run name and stage tag (default: eval for --eval, else "
                             "the --output_dir folder's name, else the model)")
    parser.add_argument("--mlflow-log-weights", action="store_true",
                        help="at the end of training, log the weights as MLflow artifact "
                             "model/MODEL.pth (loadable with timm's pretrained_cfg_overlay="
                             "dict(file=...))")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")

    # Distributed training parameters
    parser.add_argument("--world_size", default=1, type=int,
                        help="number of processes (set by the launcher)")
    parser.add_argument("--dist_url", default="env://", help="url used to set up distributed "
                        "training")
    parser.add_argument("--dist-timeout", default=10.0, type=float, metavar="MINUTES",
                        help="how long a process waits for the others in a collective before "
                             "failing: bounds how long a job outlives a process that hangs, "
                             "or on GPUs (NCCL) one that died without a launcher to stop the "
                             "rest (default: 10)")
    # torch.distributed.launch without --use_env passes these; the env var LOCAL_RANK is used.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0,
                        help=argparse.SUPPRESS)
    return parser


def available_models():
    return sorted(name for module in MODEL_MODULES
                  for name in timm.list_models(module=module.__name__))


def check_args(args):
    """Argument errors that need no data or model, caught before anything slow starts."""
    if args.data_set is None:
        args.data_set = "IMNET" if args.data_path else "DIGITS"
    if args.model not in available_models():
        raise utils.UserError(f"unknown model {args.model!r}; available: "
                              f"{', '.join(available_models())}")
    if args.finetune and args.resume:
        raise utils.UserError("--finetune and --resume exclude each other: --finetune starts "
                              "a new run from weights, --resume continues a run")
    if args.distillation_type != "none" and args.finetune and not args.eval:
        raise utils.UserError("finetuning with distillation is not supported")
    for flag in ("batch_size", "accum_iter", "epochs", "print_freq"):
        if getattr(args, flag) < 1:
            raise utils.UserError(f"--{flag.replace('_', '-')} must be at least 1")
    if not 0 <= args.hflip <= 1:
        raise utils.UserError("--hflip must be a probability in [0, 1]")
    if not 0 < args.eval_crop_ratio <= 1:
        raise utils.UserError("--eval-crop-ratio must be in (0, 1]")
    if not args.dist_timeout > 0:
        raise utils.UserError("--dist-timeout must be a positive number of minutes")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise utils.UserError(f"--device {args.device}: CUDA is not available (use --device cpu)")


def autocast_dtype(args, device):
    """(autocast dtype or None, whether to use a grad scaler)."""
    if device.type != "cuda":
        if args.amp in ("bf16", "fp16"):
            print(f"note: --amp {args.amp} applies on CUDA only; this CPU run is fp32")
        return None, False
    if args.amp in ("auto", "bf16"):
        return torch.bfloat16, False
    if args.amp == "fp16":
        return torch.float16, True
    return None, False


def worker_ignores_stop_signals(worker_id):
    """SLURM (and `timeout`) signal every process of the job, data loader workers included.
    Workers ignore SIGTERM / SIGUSR1 so that the main process can finish its step and write a
    checkpoint; they exit when the main process shuts the loader down or dies."""
    for s in utils.StopRequest.SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def build_loaders(args, device):
    dataset_train = None
    if not args.eval:
        dataset_train, args.nb_classes = build_dataset(is_train=True, args=args)
    dataset_val, nb_val = build_dataset(is_train=False, args=args)
    if dataset_train is not None and nb_val != args.nb_classes:
        raise utils.UserError(f"the train split has {args.nb_classes} classes but the val split "
                              f"{nb_val} ({args.data_path})")
    args.nb_classes = nb_val
    pin = args.pin_mem and device.type == "cuda"
    loader_val = torch.utils.data.DataLoader(
        dataset_val, sampler=build_eval_sampler(dataset_val, args),
        batch_size=int(1.5 * args.batch_size), num_workers=args.num_workers, pin_memory=pin,
        drop_last=False, worker_init_fn=worker_ignores_stop_signals)
    if dataset_train is None:
        return None, loader_val, dataset_val
    sampler_train = build_train_sampler(dataset_train, args)
    if len(sampler_train) < args.batch_size:
        raise utils.UserError(
            f"--batch-size {args.batch_size} is larger than the {len(sampler_train)} training "
            f"images each of the {args.world_size} process(es) gets per epoch (the train split "
            f"has {len(dataset_train)})")
    loader_train = torch.utils.data.DataLoader(
        SeededDataset(dataset_train), sampler=sampler_train, batch_size=args.batch_size,
        num_workers=args.num_workers, pin_memory=pin, drop_last=True,
        worker_init_fn=worker_ignores_stop_signals)
    return loader_train, loader_val, dataset_val


def build_model(args):
    # The same initial weights whatever the number of processes.
    utils.seed_everything(args.seed)
    try:
        model = timm.create_model(args.model, pretrained=False, num_classes=args.nb_classes,
                                  drop_rate=args.drop, drop_path_rate=args.drop_path,
                                  drop_block_rate=None, img_size=args.input_size)
    except ValueError as err:
        raise utils.UserError(f"cannot build {args.model} for --input-size {args.input_size}: "
                              f"{err}") from None
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def load_finetune(model, args):
    """Start from the weights in --finetune: pos_embed resized to this model's grid
    (registers kept), head / neck dropped where their shape differs, any other shape mismatch
    an error naming the keys; missing / unexpected keys are reported."""
    checkpoint = checkpoints.load_checkpoint(args.finetune, "--finetune checkpoint")
    state_dict = checkpoints.model_state_dict(checkpoint, args.finetune)
    state_dict = model.interpolate_pos_embed(state_dict)
    own = model.state_dict()
    dropped = [k for k, v in state_dict.items()
               if k.startswith(HEAD_PREFIXES) and k in own and v.shape != own[k].shape]
    for k in dropped:
        del state_dict[k]
    missing, unexpected = checkpoints.check_fit(model, state_dict, args.finetune, args.model,
                                                strict=False)
    model.load_state_dict(state_dict, strict=False)
    print(f"Finetuning from {args.finetune}"
          + (f"; dropped (shape differs): {', '.join(dropped)}" if dropped else "")
          + (f"; not in checkpoint, left as initialised: {', '.join(missing)}" if missing else "")
          + (f"; ignored (not in model): {', '.join(unexpected)}" if unexpected else ""))


def load_model_weights(model, state_dict, path, args):
    hint = ("; use --finetune to start from weights of another input size or class count"
            if not args.eval else "")
    checkpoints.check_fit(model, state_dict, path, args.model, strict=True, hint=hint)
    model.load_state_dict(state_dict)


def make_checkpoint(state, epoch, next_step, args):
    """Plain data only (loads with weights_only=True). ``epoch`` is the last completed epoch
    (DeiT's meaning) when ``next_step`` is None, else the epoch in progress."""
    return {
        "version": CHECKPOINT_VERSION,
        "model": state["model"].state_dict(),
        "optimizer": state["optimizer"].state_dict(),
        "lr_scheduler": state["lr_scheduler"].state_dict(),
        "model_ema": state["model_ema"].module.state_dict() if state["model_ema"] else None,
        "scaler": state["scaler"].state_dict() if state["scaler"] else None,
        "epoch": epoch,
        "epoch_complete": next_step is None,
        "step": next_step or 0,
        "max_accuracy": state["max_accuracy"],
        "best_source": state["best_source"],
        "nonfinite_skipped": state["nonfinite"].used,
        "mlflow": state.get("mlflow"),
        "args": dict(vars(args)),
    }


def find_resume_checkpoint(args):
    """--resume, else for training with --auto-resume output_dir/checkpoint.pth if it exists."""
    if args.resume or args.eval or not (args.auto_resume and args.output_dir):
        return args.resume
    path = os.path.join(args.output_dir, "checkpoint.pth")
    if os.path.isfile(path):
        print(f"auto-resume: found {path} (--no-auto-resume to start over)")
        return path
    return ""


def resume(checkpoint_path, state, args):
    """Load a checkpoint; for training also the optimizer, schedule, scaler, EMA and position.
    Returns (start epoch, start micro-batch)."""
    checkpoint = checkpoints.load_checkpoint(checkpoint_path)
    model = state["model"]
    load_model_weights(model, checkpoints.model_state_dict(checkpoint, checkpoint_path),
                       checkpoint_path, args)
    has_ema = isinstance(checkpoint, dict) and isinstance(checkpoint.get("model_ema"), dict)
    if args.eval and not has_ema:
        state["model_ema"] = None
    elif state["model_ema"] is not None:
        if has_ema:
            load_model_weights(state["model_ema"].module, checkpoint["model_ema"],
                               f"{checkpoint_path} (model_ema)", args)
        else:
            state["model_ema"].module.load_state_dict(model.state_dict())
    if args.eval or "optimizer" not in checkpoint or "epoch" not in checkpoint:
        print(f"Loaded weights from {checkpoint_path}")
        return args.start_epoch, 0
    state["optimizer"].load_state_dict(checkpoint["optimizer"])
    state["lr_scheduler"].load_state_dict(checkpoint["lr_scheduler"])
    if state["scaler"] is not None and checkpoint.get("scaler"):
        state["scaler"].load_state_dict(checkpoint["scaler"])
    state["max_accuracy"] = checkpoint.get("max_accuracy", 0.0)
    state["best_source"] = checkpoint.get("best_source")
    state["nonfinite"].used = checkpoint.get("nonfinite_skipped", 0)
    state["mlflow"] = checkpoint.get("mlflow")
    if checkpoint.get("epoch_complete", True):
        start = (checkpoint["epoch"] + 1, 0)
    elif any(checkpoint.get("args", {}).get(k) != getattr(args, k) for k in MID_EPOCH_LAYOUT):
        # Its step counts batches of another size or sharding: the position cannot carry over.
        print(f"note: {checkpoint_path} stopped mid-epoch with another "
              f"{' / '.join(MID_EPOCH_LAYOUT)}; epoch {checkpoint['epoch']} restarts from its "
              f"first step")
        start = (checkpoint["epoch"], 0)
    else:
        start = (checkpoint["epoch"], checkpoint["step"])
    print(f"Resumed from {checkpoint_path}: epoch {start[0]}, step {start[1]}")
    return start


def main(args):
    check_args(args)
    utils.init_distributed_mode(args)
    device = torch.device(args.device)
    with utils.StopRequest(at_once=args.eval) as stop:
        return run(args, device, stop)


def run(args, device, stop):
    amp_dtype, use_scaler = autocast_dtype(args, device)

    loader_train, loader_val, dataset_val = build_loaders(args, device)
    mixup_fn = None
    mixup_active = args.mixup > 0 or args.cutmix > 0.0 or args.cutmix_minmax is not None
    if mixup_active and not args.eval:
        if args.batch_size % 2:
            raise utils.UserError(f"mixup/cutmix pair up images: --batch-size must be even "
                                  f"(got {args.batch_size}; or set --mixup 0 --cutmix 0)")
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix,
                         cutmix_minmax=args.cutmix_minmax, prob=args.mixup_prob,
                         switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=0.0 if args.bce_loss else args.smoothing,
                         num_classes=args.nb_classes)

    print(f"Creating model: {args.model}")
    model = build_model(args)
    checkpoint_path = find_resume_checkpoint(args)
    if args.finetune and checkpoint_path:
        print(f"note: --finetune ignored: continuing the run in {checkpoint_path}")
    elif args.finetune:
        load_finetune(model, args)
    model.to(device)
    model_ema = None
    if args.model_ema and (args.resume or not args.eval):
        model_ema = ModelEmaV3(model, decay=args.model_ema_decay,
                               device=torch.device("cpu") if args.model_ema_force_cpu else None)
    model_without_ddp = model
    if args.distributed:
        model = DistributedDataParallel(model, device_ids=[args.gpu] if device.type == "cuda"
                                        else None)
    # Checkpoints and the EMA read model_without_ddp, never a compiled wrapper (whose
    # state_dict keys gain a prefix).
    model_eval = model_without_ddp
    if args.compile:
        model, model_eval = torch.compile(model), torch.compile(model_without_ddp)
    n_parameters = sum(p.numel() for p in model_without_ddp.parameters() if p.requires_grad)
    print(f"number of params: {n_parameters}")

    global_batch = args.batch_size * args.world_size * args.accum_iter
    args.lr_scaled = args.lr if args.unscale_lr else args.lr * global_batch / 512.0
    print(f"lr: {args.lr_scaled:.4g}" + ("" if args.unscale_lr else
          f" = {args.lr:g} x global batch {global_batch} / 512"))
    # Adam(W) as torch's fused kernel, on CPUs and GPUs alike: one kernel per parameter
    # instead of a dozen small ops (the plain loop cost 4x as much on a CPU step of Tiny).
    fused = {"fused": True} if args.opt.lower() in ("adam", "adamw") else {}
    optimizer = create_optimizer_v2(model_without_ddp,
                                    **{**optimizer_kwargs(args), "lr": args.lr_scaled, **fused})
    lr_scheduler, _ = create_scheduler(args, optimizer)
    teacher = None
    if args.distillation_type != "none":
        teacher = build_teacher(args, args.nb_classes, device)
    criterion = build_criterion(args, mixup_active, teacher)
    state = {"model": model_without_ddp, "optimizer": optimizer, "lr_scheduler": lr_scheduler,
             "model_ema": model_ema,
             "scaler": torch.amp.GradScaler("cuda") if use_scaler else None,
             "max_accuracy": 0.0, "best_source": None,
             "nonfinite": NonFiniteBudget(args.skip_nonfinite), "mlflow": None}
    start_epoch, start_step = args.start_epoch, 0
    if checkpoint_path:
        start_epoch, start_step = resume(checkpoint_path, state, args)

    tracker = tracking.start(args, device, {**vars(args), "n_parameters": n_parameters},
                             state["mlflow"])
    state["mlflow"] = tracker.reference or state["mlflow"]
    try:
        if args.eval:
            code = run_eval(loader_val, dataset_val, model_eval, state, device, amp_dtype, args,
                            tracker)
        else:
            code = run_training(model, model_eval, criterion, loader_train, loader_val, state,
                                device, amp_dtype, mixup_fn, start_epoch, start_step, stop,
                                args, tracker, n_parameters)
    except (KeyboardInterrupt, utils.Stopped):
        tracker.end("KILLED")
        raise
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED" if code == 0 else "KILLED")
    return code


def run_eval(loader_val, dataset_val, model_eval, state, device, amp_dtype, args, tracker):
    stats = {f"test_{k}": v for k, v in
             evaluate(loader_val, model_eval, device, amp_dtype, args.print_freq).items()}
    print(f"Accuracy of the network on the {len(dataset_val)} test images: "
          f"{stats['test_acc1']:.1f}%")
    if state["model_ema"] is not None:
        ema = evaluate(loader_val, state["model_ema"].module, device, amp_dtype, args.print_freq,
                       header="Test (EMA):")
        stats.update({f"test_ema_{k}": v for k, v in ema.items()})
        print(f"Accuracy of the EMA weights on the {len(dataset_val)} test images: "
              f"{ema['acc1']:.1f}%")
    tracker.log_metrics(stats, step=0)
    return 0


def run_training(model, model_eval, criterion, loader_train, loader_val, state, device, amp_dtype,
                 mixup_fn, start_epoch, start_step, stop, args, tracker, n_parameters):
    """The epoch loop; returns the process exit code (0, or 128 + signal when stopped)."""
    print(f"Start training for {args.epochs} epochs")
    start_time = time.time()
    for epoch in range(start_epoch, args.epochs):
        loader_train.sampler.set_epoch(epoch, start=start_step * args.batch_size)
        state["lr_scheduler"].step(epoch)
        train_stats, next_step = train_one_epoch(
            model, criterion, loader_train, state["optimizer"], device, epoch, args, amp_dtype,
            state["scaler"], state["model_ema"], mixup_fn, start_step, stop, state["nonfinite"],
            on_progress=tracker.log_train_step)
        start_step = 0
        if next_step is not None:
            save(state, epoch, next_step, args, best=False)
            return stopped(stop, epoch, next_step, args)
        test_stats = evaluate(loader_val, model_eval, device, amp_dtype, args.print_freq)
        stats = {**{f"train_{k}": v for k, v in train_stats.items()},
                 **{f"test_{k}": v for k, v in test_stats.items()}}
        candidates = {"model": test_stats["acc1"]}
        if state["model_ema"] is not None:
            ema_stats = evaluate(loader_val, state["model_ema"].module, device, amp_dtype,
                                 args.print_freq, header="Test (EMA):")
            stats.update({f"test_ema_{k}": v for k, v in ema_stats.items()})
            candidates["model_ema"] = ema_stats["acc1"]
        source, acc1 = max(candidates.items(), key=lambda kv: kv[1])
        improved = acc1 > state["max_accuracy"] or state["best_source"] is None
        if improved:
            state["max_accuracy"], state["best_source"] = acc1, source
        print(f"Accuracy on the {len(loader_val.dataset)} test images: "
              + ", ".join(f"{k} {v:.1f}%" for k, v in candidates.items())
              + f"; best {state['max_accuracy']:.2f}% ({state['best_source']})")
        save(state, epoch, None, args, best=improved)
        stats["max_accuracy"] = state["max_accuracy"]
        if args.output_dir and utils.is_main_process():
            utils.append_log(args.output_dir,
                             {**stats, "epoch": epoch, "n_parameters": n_parameters})
            tracker.log_file(os.path.join(args.output_dir, "log.txt"))
        tracker.log_metrics(stats, step=epoch)
        if utils.any_rank(stop.requested)[0] and epoch + 1 < args.epochs:
            return stopped(stop, epoch + 1, 0, args)
    total_time = str(datetime.timedelta(seconds=int(time.time() - start_time)))
    print(f"Training time {total_time}; max accuracy {state['max_accuracy']:.2f}% "
          f"({state['best_source']})")
    if args.mlflow_log_weights:
        tracker.log_weights(state["model"], args.model)
    return 0


def save(state, epoch, next_step, args, best):
    if not args.output_dir or not utils.is_main_process():
        return
    checkpoint = make_checkpoint(state, epoch, next_step, args)
    if best:
        checkpoint["best_acc1"] = state["max_accuracy"]
        checkpoints.save_checkpoint(checkpoint,
                                    os.path.join(args.output_dir, "best_checkpoint.pth"))
    checkpoints.save_checkpoint(checkpoint, os.path.join(args.output_dir, "checkpoint.pth"))


def stopped(stop, epoch, step, args):
    name = stop.name or "a signal on another rank"
    where = (f"checkpoint {os.path.join(args.output_dir, 'checkpoint.pth')}" if args.output_dir
             else "no checkpoint (no --output_dir)")
    if utils.is_main_process():
        sys.stderr.write(f"Stopped by {name} at epoch {epoch}, step {step}: {where}; rerun "
                         f"the same command to continue\n")
    return 128 + (stop.signum or 15)


def make_output_dir(path):
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise utils.UserError(f"cannot create --output_dir {path}: {err.strerror}") from None


def cli(argv=None):
    """Parse ``argv`` and run; returns the exit code: 0 done, 1 expected failure (bad input,
    non-finite loss, unreadable data: one ``error:`` line on stderr), 128 + signal when
    stopped by SIGTERM / SIGUSR1 (training: after the checkpoint; --eval: at once), 130 on
    Ctrl-C. A bug raises (the traceback; Python exits with 1)."""
    parser = argparse.ArgumentParser("Mamba® training and evaluation script",
                                     parents=[get_args_parser()])
    args = parser.parse_args(argv)
    try:
        if args.output_dir:
            make_output_dir(args.output_dir)
        return main(args)
    except (utils.UserError, NonFiniteLossError, UnreadableImageError) as err:
        if args.debug:
            traceback.print_exc()
        if isinstance(err, NonFiniteLossError) and not utils.is_main_process():
            return 1  # every rank stops at the same step: rank 0 says why
        message = str(err).strip().splitlines()[-1]
        if isinstance(err, UnreadableImageError):
            # Raised in a loader worker, it arrives wrapped with the worker's traceback text.
            message = message.split(f"{type(err).__name__}: ", 1)[-1]
        if isinstance(err, NonFiniteLossError):
            message = (f"{message} of the run in {args.output_dir or '(no --output_dir)'}; "
                       f"the last good checkpoint there is left untouched (--skip-nonfinite N "
                       f"skips up to N bad steps)")
        sys.stderr.write(f"{rank_prefix()}error: {message}\n")
        return 1
    except KeyboardInterrupt:
        if args.debug:
            traceback.print_exc()
        if utils.is_main_process():
            # Ctrl-C means now: the step in progress is dropped, not finished and saved as
            # on SIGTERM.
            last = os.path.join(args.output_dir, "checkpoint.pth")
            where = (f"the last checkpoint, {last}, is intact: rerun the same command to "
                     f"continue from it" if os.path.isfile(last) else
                     f"no checkpoint yet in {args.output_dir}" if args.output_dir else
                     "nothing saved (no --output_dir)")
            sys.stderr.write(f"{rank_prefix()}interrupted; {where}\n")
        return 128 + signal.SIGINT
    except utils.Stopped as err:
        if utils.is_main_process():
            sys.stderr.write(f"Stopped by {err} during the evaluation (nothing to save)\n")
        return 128 + err.signum
    except Exception as err:
        if utils.get_world_size() > 1 and utils.lost_contact(err) and not args.debug:
            # Another process failed (its error is its own to print) or was killed (the
            # launcher names it): this one's traceback would only bury that.
            sys.stderr.write(f"{rank_prefix()}stopped: lost contact with another process of "
                             f"the job ({utils.error_line(err)})\n")
            return 1
        raise
    finally:
        utils.leave_process_group()


def rank_prefix():
    return f"[rank {utils.get_rank()}] " if utils.get_world_size() > 1 else ""


if __name__ == "__main__":
    sys.exit(cli())
