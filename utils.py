"""Process-level helpers: user errors, metric logging, distributed setup, seeding and stop
signals. Logging and distributed setup follow DeiT's utils.py."""
import builtins
import datetime
import faulthandler
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import time
from collections import defaultdict, deque

import numpy as np
import torch
import torch.distributed as dist


class UserError(Exception):
    """A problem with the command line, the data or a file: shown as one line, no traceback."""


def error_line(err: BaseException) -> str:
    """The exception's type and first sentence: enough to tell what went wrong in one line
    (for this repository's one-line errors and warnings)."""
    text = str(err).strip()
    text = text.splitlines()[0].split(". ")[0] if text else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


# --------------------------------------------------------------------------- metric logging

class SmoothedValue:
    """Track a series of values and provide access to smoothed values over a window or the
    global series average."""

    def __init__(self, window_size=20, fmt=None):
        self.deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt or "{median:.4f} ({global_avg:.4f})"

    def update(self, value, n=1):
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self):
        """Sum count and total over ranks (the window stays local)."""
        if not is_dist_avail_and_initialized():
            return
        t = torch.tensor([self.count, self.total], dtype=torch.float64, device=comm_device())
        dist.all_reduce(t)
        self.count, self.total = int(t[0].item()), t[1].item()

    @property
    def median(self):
        return torch.tensor(list(self.deque)).median().item()

    @property
    def avg(self):
        return torch.tensor(list(self.deque), dtype=torch.float32).mean().item()

    @property
    def global_avg(self):
        return self.total / max(self.count, 1)

    @property
    def max(self):
        return max(self.deque)

    @property
    def value(self):
        return self.deque[-1]

    def __str__(self):
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg,
                               max=self.max, value=self.value)


class MetricLogger:
    def __init__(self, delimiter="  "):
        self.meters = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, n=1, **kwargs):
        for k, v in kwargs.items():
            if isinstance(v, torch.Tensor):
                v = v.item()
            self.meters[k].update(v, n=n)

    def __getattr__(self, attr):
        if attr in self.meters:
            return self.meters[attr]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{attr}'")

    def __str__(self):
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items()
                                   if meter.deque)

    def synchronize_between_processes(self):
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def add_meter(self, name, meter):
        self.meters[name] = meter

    def log_every(self, iterable, print_freq, header="", start=0, total=None, images_per_iter=None):
        """Yield from ``iterable``, printing progress every ``print_freq`` iterations.

        ``start``/``total`` number the iterations of a resumed epoch; ``images_per_iter`` (the
        global batch) turns the iteration time into a throughput in img/s. A data loader's
        workers are shut down when the generator is closed, whether the loop ended, stopped
        early or raised: close it (``contextlib.closing``) rather than leave that to the
        garbage collector."""
        total = len(iterable) + start if total is None else total
        start_time = end = time.time()
        iter_time = SmoothedValue(fmt="{avg:.4f}")
        data_time = SmoothedValue(fmt="{avg:.4f}")
        width = len(str(total))
        iterator = iter(iterable)
        try:
            for i, obj in enumerate(iterator, start):
                data_time.update(time.time() - end)
                yield obj
                iter_time.update(time.time() - end)
                if i % print_freq == 0 or i == total - 1:
                    eta = datetime.timedelta(seconds=int(iter_time.global_avg * (total - i - 1)))
                    parts = [header, f"[{i:{width}d}/{total}]", f"eta: {eta}", str(self),
                             f"time: {iter_time}", f"data: {data_time}"]
                    if images_per_iter:
                        parts.append(f"img/s: {images_per_iter / max(iter_time.avg, 1e-9):.1f}")
                    if torch.cuda.is_available():
                        parts.append(f"max mem: {torch.cuda.max_memory_allocated() / 2 ** 20:.0f}")
                    print(self.delimiter.join(p for p in parts if p), flush=True)
                end = time.time()
        finally:
            shutdown_loader_workers(iterator)
        done = max(iter_time.count, 1)
        total_time = time.time() - start_time
        print(f"{header} Total time: {datetime.timedelta(seconds=int(total_time))} "
              f"({total_time / done:.4f} s / it)", flush=True)


def shutdown_loader_workers(iterator):
    """Stop a data loader iterator's worker processes now. Workers ignore SIGTERM (see
    ``main.worker_ignores_stop_signals``), so one left to the garbage collector outlives an
    exception that holds it and hangs the interpreter's exit, which terminates and joins
    them."""
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


# --------------------------------------------------------------------------- distributed

def is_dist_avail_and_initialized():
    return dist.is_available() and dist.is_initialized()


def get_world_size():
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank():
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process():
    return get_rank() == 0


def comm_device():
    """Where tensors for collectives live: CUDA for nccl, CPU for gloo."""
    if is_dist_avail_and_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def setup_for_distributed(is_master):
    """Silence print() on every rank but the first; print(..., force=True) still prints."""
    builtin_print = builtins.print

    def print(*args, **kwargs):
        force = kwargs.pop("force", False)
        if is_master or force:
            builtin_print(*args, **kwargs)

    builtins.print = print


def _first_slurm_host(nodelist):
    """First host name of a SLURM node list such as ``gpu[03-05,07],cpu1``."""
    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, check=False).stdout.split()
        if out:
            return out[0]
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    prefix, ranges = match.group(1), match.group(2)
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def init_distributed_mode(args):
    """Join the process group described by torchrun / torch.distributed.launch variables
    (RANK, WORLD_SIZE, LOCAL_RANK) or by SLURM's (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID),
    over nccl on GPUs and gloo on CPUs, with ``args.dist_timeout`` minutes for any collective.
    Without either, run as a single process."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        args.rank = int(os.environ["RANK"])
        args.world_size = int(os.environ["WORLD_SIZE"])
        args.gpu = int(os.environ.get("LOCAL_RANK", 0))
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
        args.rank = int(os.environ["SLURM_PROCID"])
        args.world_size = int(os.environ["SLURM_NTASKS"])
        args.gpu = int(os.environ.get("SLURM_LOCALID", 0))
        # env:// rendezvous needs these; srun does not set them.
        os.environ.update(RANK=str(args.rank), WORLD_SIZE=str(args.world_size),
                          LOCAL_RANK=str(args.gpu))
        os.environ.setdefault("MASTER_ADDR", _first_slurm_host(os.environ["SLURM_JOB_NODELIST"]))
        os.environ.setdefault("MASTER_PORT", "29500")
    else:
        args.distributed, args.rank, args.world_size, args.gpu = False, 0, 1, 0
        return
    args.distributed = True
    if torch.device(args.device).type == "cuda":
        torch.cuda.set_device(args.gpu)
        args.device = f"cuda:{args.gpu}"
        args.dist_backend = "nccl"
    else:
        args.dist_backend = "gloo"
    print(f"| distributed init (rank {args.rank}/{args.world_size}, {args.dist_backend}): "
          f"{args.dist_url}", flush=True)
    timeout = datetime.timedelta(minutes=args.dist_timeout)
    store, _, _ = next(dist.rendezvous(args.dist_url, args.rank, args.world_size,
                                       timeout=timeout))
    # torchrun serves one store to every round of a group it restarts (--max-restarts), and
    # the keys a dead round left there (its processes' addresses) would send the new round
    # to dead ports. Each round gets its own key prefix, numbered by the restart count that
    # torchrun's agent on each node advances when the group fails (0 under other launchers).
    round_ = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend=args.dist_backend, store=dist.PrefixStore(
        f"mambar/round{round_}", store), rank=args.rank, world_size=args.world_size,
        timeout=timeout)
    dist.barrier()
    setup_for_distributed(args.rank == 0)


def lost_contact(err):
    """Whether ``err`` is a collective or the job's store failing because another process
    is gone (gloo: its connection closed) or silent past the timeout, rather than this one
    failing: that process's own message, or the launcher's report, says what happened."""
    text = str(err)
    return isinstance(err, dist.DistError) or any(
        marker in text for marker in ("Connection closed by peer", "Connection reset by peer",
                                      "Timed out waiting"))


def leave_process_group(timeout=30.0):
    """``destroy_process_group``, bounded: with another process gone it can block (NCCL
    tears its communicators down with them). Past ``timeout`` seconds this process prints
    where it is stuck and exits with code 1."""
    if not is_dist_avail_and_initialized():
        return
    faulthandler.dump_traceback_later(timeout, exit=True)
    try:
        dist.destroy_process_group()
    finally:
        faulthandler.cancel_dump_traceback_later()


def any_rank(*flags):
    """Per flag, whether it is set on any rank (one small all-reduce when distributed)."""
    if not is_dist_avail_and_initialized():
        return [bool(f) for f in flags]
    t = torch.tensor([float(bool(f)) for f in flags], device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


# --------------------------------------------------------------------------- seeding

def derive_seed(*keys):
    """A 63-bit seed that is a pure function of ``keys`` (e.g. seed, epoch, step, rank).

    Training reseeds from such keys at every step and for every sample, so a run restarted
    from a checkpoint at any step boundary replays exactly the same random draws."""
    digest = hashlib.blake2b(repr(tuple(int(k) for k in keys)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- stop signals

class Stopped(Exception):
    """A stop signal that ends the process at once (see ``StopRequest``)."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopRequest:
    """Records SIGTERM / SIGUSR1 (SLURM's pre-emption warning) so that training can stop at
    the next step boundary and write a checkpoint. Repeated signals are absorbed: torchrun
    forwards the SIGTERM that SLURM also sends directly, and that second copy must not kill
    the checkpoint in progress. With ``at_once`` (an evaluation: nothing to save) the first
    signal raises ``Stopped`` wherever the process is, as SIGINT, which keeps its default,
    raises KeyboardInterrupt."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, at_once=False):
        self.signum = None
        self.at_once = at_once
        self._previous = {}

    def __enter__(self):
        self._previous = {s: signal.signal(s, self._handler) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handler(self, signum, frame):
        # No printing here: a handler that runs inside print() would re-enter the stream.
        if self.signum is None:
            self.signum = signum
            if self.at_once:
                raise Stopped(signum)

    @property
    def requested(self):
        return self.signum is not None

    @property
    def name(self):
        return signal.Signals(self.signum).name if self.signum else None


# --------------------------------------------------------------------------- logs

def append_log(output_dir, stats):
    """One JSON line per epoch in ``output_dir/log.txt``, as DeiT writes it."""
    with open(os.path.join(output_dir, "log.txt"), "a") as f:
        f.write(json.dumps(stats) + "\n")
