import datetime
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest

import utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_derive_seed_is_a_pure_function_of_its_keys():
    assert utils.derive_seed(0, 1, 2) == utils.derive_seed(0, 1, 2)
    assert len({utils.derive_seed(0, e, s) for e in range(10) for s in range(10)}) == 100
    assert 0 <= utils.derive_seed(2 ** 40, 3) < 2 ** 63


def test_slurm_tasks_join_one_process_group(monkeypatch):
    import builtins
    calls = []

    def rendezvous(url, rank, world_size, timeout):
        calls.append(dict(url=url, rank=rank, world_size=world_size, timeout=timeout))
        yield utils.dist.HashStore(), rank, world_size

    monkeypatch.setattr(builtins, "print", builtins.print)  # restored after the test
    monkeypatch.setattr(utils.dist, "rendezvous", rendezvous)
    monkeypatch.setattr(utils.dist, "init_process_group", lambda **kw: calls.append(kw))
    monkeypatch.setattr(utils.dist, "barrier", lambda: None)
    monkeypatch.setattr(utils.shutil, "which", lambda name: None)  # no scontrol here
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, "")  # so that the values set by the code get undone
        monkeypatch.delenv(name)
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[03-04,07],cpu1")
    args = SimpleNamespace(device="cpu", dist_url="env://", dist_timeout=2.5)
    utils.init_distributed_mode(args)
    assert (args.distributed, args.rank, args.world_size, args.gpu) == (True, 5, 8, 1)
    timeout = datetime.timedelta(minutes=2.5)
    store = calls[1].pop("store")
    assert calls == [dict(url="env://", rank=5, world_size=8, timeout=timeout),
                     dict(backend="gloo", rank=5, world_size=8, timeout=timeout)]
    assert isinstance(store, utils.dist.PrefixStore)
    assert (os.environ["MASTER_ADDR"], os.environ["RANK"], os.environ["LOCAL_RANK"]) == \
        ("gpu03", "5", "1")


def test_a_single_process_needs_no_process_group(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    args = SimpleNamespace(device="cpu", dist_url="env://")
    utils.init_distributed_mode(args)
    assert (args.distributed, args.rank, args.world_size) == (False, 0, 1)


@pytest.mark.slow
def test_a_process_group_that_will_not_be_destroyed_does_not_hold_the_exit():
    """destroy_process_group can block when another process is gone (NCCL tears its
    communicators down with them): past the bound the process still ends, with code 1 and
    where it was stuck."""
    code = textwrap.dedent("""
        import time
        import torch.distributed as dist
        import utils
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        dist.destroy_process_group = lambda: time.sleep(600)
        utils.leave_process_group(timeout=1)
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "Timeout" in result.stderr and "in leave_process_group" in result.stderr
