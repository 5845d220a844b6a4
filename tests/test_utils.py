import os
from types import SimpleNamespace

import utils


def test_derive_seed_is_a_pure_function_of_its_keys():
    assert utils.derive_seed(0, 1, 2) == utils.derive_seed(0, 1, 2)
    assert len({utils.derive_seed(0, e, s) for e in range(10) for s in range(10)}) == 100
    assert 0 <= utils.derive_seed(2 ** 40, 3) < 2 ** 63


def test_slurm_tasks_join_one_process_group(monkeypatch):
    import builtins
    calls = []
    monkeypatch.setattr(builtins, "print", builtins.print)  # restored after the test
    monkeypatch.setattr(utils.dist, "init_process_group", lambda **kw: calls.append(kw))
    monkeypatch.setattr(utils.dist, "barrier", lambda: None)
    monkeypatch.setattr(utils.shutil, "which", lambda name: None)  # no scontrol here
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, "")  # so that the values set by the code get undone
        monkeypatch.delenv(name)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[03-04,07],cpu1")
    args = SimpleNamespace(device="cpu", dist_url="env://")
    utils.init_distributed_mode(args)
    assert (args.distributed, args.rank, args.world_size, args.gpu) == (True, 5, 8, 1)
    assert calls == [dict(backend="gloo", init_method="env://", world_size=8, rank=5)]
    assert (os.environ["MASTER_ADDR"], os.environ["RANK"], os.environ["LOCAL_RANK"]) == \
        ("gpu03", "5", "1")


def test_a_single_process_needs_no_process_group(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    args = SimpleNamespace(device="cpu", dist_url="env://")
    utils.init_distributed_mode(args)
    assert (args.distributed, args.rank, args.world_size) == (False, 0, 1)
