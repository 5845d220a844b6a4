"""Checkpoint files: read safely, written atomically, and their weights fitted to a model.

Every failure is a one-line ``UserError`` naming the file and the reason: a file that is
missing, corrupt or would run code when unpickled (it is refused, never executed), or weights
that do not fit the model (the keys named).
"""
import argparse
import errno
import glob
import os
import pickle
import re
import warnings
from typing import Dict, List, Tuple

import torch
import torch.nn as nn

from utils import UserError, error_line


def save_checkpoint(obj, path):
    """Write ``obj`` to ``path`` atomically: temp file in the same directory, flush, fsync,
    rename, fsync the directory. A kill or a full disk at any moment leaves the previous
    ``path`` intact; a write that fails is a one-line ``UserError`` (for a full disk naming
    the filesystem, its free space and what the checkpoint needs). ``obj`` must be plain data
    (tensors, numbers, strings, lists, dicts) so that it loads with ``weights_only=True``."""
    directory = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    # Temp files of writers killed mid-write: only rank 0 writes into an output dir.
    for stale in glob.glob(os.path.join(glob.escape(directory), f".{glob.escape(base)}.*.tmp")):
        os.unlink(stale)
    tmp = os.path.join(directory, f".{base}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        cause = _os_error(err)
        if cause is None:
            raise
        previous = ("the previous checkpoint there is intact" if os.path.exists(path) else
                    "nothing was written")
        raise UserError(f"cannot write checkpoint {path}: {_write_failure(cause, directory, obj)}"
                        f"; {previous}") from None
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _os_error(err):
    """The ``OSError`` behind a failed write, if any. torch.save's zip writer does not let
    it through: it fails once more when it finishes the archive and raises a
    ``RuntimeError`` ("unexpected pos ...") whose context is the ``OSError``."""
    while err is not None and not isinstance(err, OSError):
        err = err.__cause__ or err.__context__
    return err


def _write_failure(err, directory, obj):
    reason = err.strerror or os.strerror(err.errno or errno.EIO)
    if err.errno not in (errno.ENOSPC, errno.EDQUOT):
        return reason
    mount = directory
    while not os.path.ismount(mount):
        mount = os.path.dirname(mount)
    # The last entry for a mount point is the one mounted over the others.
    device = ([fields[0] for fields in _mounts() if fields[1] == mount] or [None])[-1]
    stat = os.statvfs(directory)
    return (f"{'no space left' if err.errno == errno.ENOSPC else 'disk quota exceeded'} on "
            f"{mount}{f' ({device})' if device else ''}: {_size(stat.f_bavail * stat.f_frsize)}"
            f" free, the checkpoint needs about {_size(_tensor_bytes(obj))}")


def _mounts():
    try:
        with open("/proc/self/mounts") as f:
            return [line.split() for line in f]
    except OSError:  # not Linux
        return []


def _tensor_bytes(obj):
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _size(n):
    return f"{n / 2 ** 20:.1f} MiB" if n < 2 ** 30 else f"{n / 2 ** 30:.2f} GiB"


def read_checkpoint(path: str, what: str = "checkpoint") -> object:
    """Everything in a checkpoint file, loaded with ``weights_only=True``: a pickle that would
    run code is refused, never executed. Besides tensors and plain data only
    ``argparse.Namespace`` is allowed (checkpoints of the official Mamba® / Vim / DeiT code
    pickle their arguments; it runs no code). Errors name the file, as ``what``."""
    if not os.path.exists(path):
        raise UserError(f"{what} not found: {path}")
    if not os.path.isfile(path):
        raise UserError(f"{what} is not a file: {path}")
    try:
        # The unpickler warns about pickle protocols it may not support; the refusal below is
        # the message that matters.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # Registered at every load: timm's loader drops it when its safe_globals exits.
            torch.serialization.add_safe_globals([argparse.Namespace])
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if "weights only load failed" in str(err).lower() and found:
            raise UserError(f"refusing to load {what} {path}: unpickling it would call "
                                  f"{found.group(1)}, not just build tensors and plain data; "
                                  f"nothing in it was executed") from None
        raise UserError(f"cannot read {what} {path}: the file is corrupt or not a "
                              f"plain-data PyTorch checkpoint ({error_line(err)}); nothing in it "
                              f"was executed") from None
    except Exception as err:  # the unpickler fails in many ways on damaged bytes
        raise UserError(f"cannot read {what} {path}: the file is corrupt or truncated "
                              f"({error_line(err)})") from None


def load_checkpoint(path, what="checkpoint"):
    """Everything in a checkpoint file (see ``read_checkpoint``). An http(s) URL (a released
    checkpoint) is downloaded once into torch hub's checkpoint cache, then read from there."""
    if path.startswith(("http://", "https://")):
        cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(path))
        if not os.path.isfile(cached):
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            try:
                torch.hub.download_url_to_file(path, cached)
            except Exception as err:
                raise UserError(f"cannot download {what} {path}: {err}") from None
        path = cached
    return read_checkpoint(path, what)


def model_state_dict(checkpoint: object, path: str) -> Dict[str, torch.Tensor]:
    """The model weights of a loaded checkpoint: ``{"model": state_dict}`` (the released format
    and ours), ``{"state_dict": ...}`` or a bare state dict."""
    if isinstance(checkpoint, dict):
        for key in ("model", "state_dict"):
            if isinstance(checkpoint.get(key), dict):
                checkpoint = checkpoint[key]
                break
    if not (isinstance(checkpoint, dict) and checkpoint
            and all(isinstance(v, torch.Tensor) for v in checkpoint.values())):
        raise UserError(f"{path} holds no model weights (expected {{'model': "
                              f"state_dict}} or a state dict)")
    return checkpoint


def load_state_dict_file(path: str) -> Dict[str, torch.Tensor]:
    """The model state dict of a checkpoint file (see ``read_checkpoint``)."""
    return model_state_dict(read_checkpoint(path), path)


def check_fit(model, state_dict, path, model_name, strict=True, hint=""):
    """Raise a one-line error naming the keys of ``state_dict`` that do not fit ``model``:
    wrong shapes always, missing or unexpected keys too when ``strict``. Returns the
    (missing, unexpected) key lists."""
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
             for k, v in state_dict.items() if k in own and v.shape != own[k].shape]
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    problems = [f"{label}: {_name_list(keys)}" for label, keys in
                (("shape mismatch (checkpoint vs model)", wrong),
                 ("missing", missing if strict else []),
                 ("unexpected", unexpected if strict else [])) if keys]
    if problems:
        raise UserError(f"{path} does not fit {model_name}: " + "; ".join(problems) + hint)
    return missing, unexpected


def _name_list(keys, limit=4):
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_weights(model: nn.Module, path: str, strict: bool = True
                 ) -> Tuple[List[str], List[str]]:
    """Load a checkpoint file's weights into ``model`` (see ``check_fit`` for what fails);
    returns the (missing, unexpected) keys, empty when ``strict``."""
    state_dict = load_state_dict_file(path)
    missing, unexpected = check_fit(model, state_dict, path, type(model).__name__, strict)
    model.load_state_dict(state_dict, strict=strict)
    return missing, unexpected
