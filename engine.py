"""One training epoch and one evaluation pass (DeiT's engine.py), with real gradient
accumulation, EMA updates per optimizer step, and the bookkeeping that crash-safe training
needs: per-step reseeding, agreement across ranks on non-finite losses and stop requests."""
import math
from contextlib import closing, nullcontext
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
from timm.utils import accuracy
from torch.nn.parallel import DistributedDataParallel

import utils


class NonFiniteLossError(Exception):
    def __init__(self, epoch, step, value):
        super().__init__(f"non-finite loss ({value}) at epoch {epoch}, step {step}")
        self.epoch, self.step, self.value = epoch, step, value


@dataclass
class NonFiniteBudget:
    """How many optimizer steps with a non-finite loss may be skipped (--skip-nonfinite) and
    how many have been, over the whole run (it is saved in checkpoints)."""
    limit: int
    used: int = 0


def train_one_epoch(model, criterion, data_loader, optimizer, device, epoch, args, amp_dtype=None,
                    scaler=None, model_ema=None, mixup_fn=None, start_step=0, stop=None,
                    nonfinite=None,
                    on_progress: Optional[Callable[[int, Dict[str, float]], None]] = None):
    """Train over ``data_loader`` from micro-batch ``start_step``.

    The optimizer steps every ``args.accum_iter`` micro-batches (and at the end of the epoch)
    on the mean gradient of the group. Every micro-batch reseeds python / numpy / torch from
    (seed, epoch, step, rank), so mixup, drop path and dropout draws depend only on where the
    run is. Returns (averaged stats, None) after a full epoch, or (stats, next micro-batch)
    when ``stop`` was requested: all ranks then stop after the same optimizer step.

    ``on_progress(global step, {"loss": ..., "lr": ...})`` is called wherever a progress line
    is printed (every ``args.print_freq`` micro-batches and at the last one), for curves finer
    than an epoch: the global step is epoch x micro-batches per epoch + micro-batch, the loss
    this rank's mean over the micro-batches since the previous call (each counted once)."""
    model.train(args.train_mode)
    unwrapped = model.module if isinstance(model, DistributedDataParallel) else model
    metric_logger = utils.MetricLogger(delimiter="  ")
    metric_logger.add_meter("lr", utils.SmoothedValue(window_size=1, fmt="{value:.6f}"))
    total = start_step + len(data_loader)
    accum = args.accum_iter
    rank = utils.get_rank()
    nonfinite = nonfinite or NonFiniteBudget(0)
    poisoned = False  # the current accumulation group met a skipped non-finite loss
    losses_since_progress = []
    optimizer.zero_grad(set_to_none=True)
    batches = metric_logger.log_every(
        data_loader, args.print_freq, f"Epoch: [{epoch}]", start=start_step, total=total,
        images_per_iter=args.batch_size * utils.get_world_size())
    with closing(batches):
        for step, (samples, targets) in enumerate(batches, start_step):
            group_start = step - step % accum
            group_size = min(accum, total - group_start)
            steps_optimizer = step == group_start + group_size - 1
            utils.seed_everything(utils.derive_seed(args.seed, epoch, step, rank))
            samples = samples.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            if mixup_fn is not None:
                samples, targets = mixup_fn(samples, targets)
            # Gradients of all but the group's last micro-batch stay local (no all-reduce).
            sync = steps_optimizer or not isinstance(model, DistributedDataParallel)
            with nullcontext() if sync else model.no_sync():
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    outputs = model(samples)
                    loss = criterion(samples, outputs, targets)
                loss_value = loss.item()
                # Every rank must take the same decision, or the next all-reduce would hang.
                bad, stop_now = utils.any_rank(not math.isfinite(loss_value),
                                               stop is not None and stop.requested)
                if not bad:
                    loss = loss / group_size
                    (scaler.scale(loss) if scaler is not None else loss).backward()
            if bad:
                if nonfinite.used >= nonfinite.limit:
                    raise NonFiniteLossError(epoch, step, loss_value)
                nonfinite.used += 1
                poisoned = True
                print(f"warning: non-finite loss ({loss_value}) at epoch {epoch}, step {step}: "
                      f"optimizer step skipped ({nonfinite.used} of --skip-nonfinite "
                      f"{nonfinite.limit} used)", flush=True)
            else:
                metric_logger.update(loss=loss_value)
                losses_since_progress.append(loss_value)
            metric_logger.update(lr=optimizer.param_groups[0]["lr"])
            if on_progress is not None and (step % args.print_freq == 0 or step == total - 1):
                values = {"lr": optimizer.param_groups[0]["lr"]}
                if losses_since_progress:
                    values["loss"] = sum(losses_since_progress) / len(losses_since_progress)
                    losses_since_progress.clear()
                on_progress(epoch * total + step, values)
            if not steps_optimizer:
                continue
            if not poisoned:
                if scaler is not None:
                    scaler.unscale_(optimizer)
                if args.clip_grad:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                if model_ema is not None:
                    model_ema.update(unwrapped)
            optimizer.zero_grad(set_to_none=True)
            poisoned = False
            if stop_now and step + 1 < total:
                return _finish(metric_logger), step + 1
    return _finish(metric_logger), None


def _finish(metric_logger):
    metric_logger.synchronize_between_processes()
    print("Averaged stats:", metric_logger)
    return {k: meter.global_avg for k, meter in metric_logger.meters.items()}


@torch.no_grad()
def evaluate(data_loader, model, device, amp_dtype=None, print_freq=10, header="Test:"):
    """Loss, top-1 and top-5 over ``data_loader``, summed over ranks when each evaluates a
    shard. ``model`` must be the bare module: evaluation runs no collective per batch, so
    shards may differ in length."""
    criterion = torch.nn.CrossEntropyLoss()
    metric_logger = utils.MetricLogger(delimiter="  ")
    for name in ("loss", "acc1", "acc5"):
        metric_logger.add_meter(name, utils.SmoothedValue())
    model.eval()
    with closing(metric_logger.log_every(data_loader, print_freq, header)) as batches:
        for images, target in batches:
            images = images.to(device, non_blocking=True)
            target = target.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                output = model(images)
                loss = criterion(output, target)
            acc1, acc5 = accuracy(output, target, topk=(1, 5))
            metric_logger.update(n=images.shape[0], loss=loss.item(), acc1=acc1.item(),
                                 acc5=acc5.item())
    metric_logger.synchronize_between_processes()
    print(f"* Acc@1 {metric_logger.acc1.global_avg:.3f} Acc@5 {metric_logger.acc5.global_avg:.3f} "
          f"loss {metric_logger.loss.global_avg:.3f}")
    return {k: meter.global_avg for k, meter in metric_logger.meters.items()}
