import argparse
import errno
import os
import shutil
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

import utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_derive_seed_is_a_pure_function_of_its_keys():
    assert utils.derive_seed(0, 1, 2) == utils.derive_seed(0, 1, 2)
    assert len({utils.derive_seed(0, e, s) for e in range(10) for s in range(10)}) == 100
    assert 0 <= utils.derive_seed(2 ** 40, 3) < 2 ** 63


def test_checkpoints_are_plain_data_and_written_atomically(tmp_path):
    path = tmp_path / "checkpoint.pth"
    utils.save_checkpoint({"model": {"w": torch.ones(2)}, "args": {"lr": 1e-3}}, str(path))
    assert utils.load_checkpoint(str(path))["args"] == {"lr": 1e-3}
    assert os.listdir(tmp_path) == ["checkpoint.pth"]


def test_no_space_left_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pth")
    utils.save_checkpoint({"epoch": 1}, path)

    def full_disk(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(utils.UserError, match=f"cannot write checkpoint {path}: No space left "
                                              f"on device; the previous checkpoint"):
        utils.save_checkpoint({"epoch": 2}, path)
    assert utils.load_checkpoint(path) == {"epoch": 1}
    assert os.listdir(tmp_path) == ["checkpoint.pth"]


def test_a_kill_between_temp_file_and_rename_keeps_the_previous_checkpoint(tmp_path):
    path = str(tmp_path / "checkpoint.pth")
    utils.save_checkpoint({"epoch": 1}, path)
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {ROOT!r})
        import utils
        os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
        utils.save_checkpoint({{"epoch": 2}}, {path!r})
    """)
    result = subprocess.run([sys.executable, "-c", script], timeout=120)
    assert result.returncode == -9
    assert utils.load_checkpoint(path) == {"epoch": 1}
    assert len(os.listdir(tmp_path)) == 2  # the dead writer's temp file
    utils.save_checkpoint({"epoch": 3}, path)
    assert os.listdir(tmp_path) == ["checkpoint.pth"]
    assert utils.load_checkpoint(path) == {"epoch": 3}


def test_corrupt_and_truncated_checkpoints_are_named(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"model": {"w": torch.zeros(1000)}}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:3000])
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    for path in (truncated, garbage, tmp_path / "empty.pth"):
        path.touch()
        with pytest.raises(utils.UserError, match=f"cannot read checkpoint {path}: the file is "
                                                  f"corrupt"):
            utils.load_checkpoint(str(path))
    with pytest.raises(utils.UserError, match="checkpoint not found: .*missing.pth"):
        utils.load_checkpoint(str(tmp_path / "missing.pth"))


def test_a_pickle_with_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pth"
    torch.save({"model": Evil(str(marker))}, evil)
    with pytest.raises(utils.UserError, match=f"refusing to load checkpoint {evil}: unpickling "
                                              f"it would call posix.system.*nothing in it was "
                                              f"executed"):
        utils.load_checkpoint(str(evil))
    assert not marker.exists()


def test_checkpoints_of_the_official_code_with_pickled_args_load(tmp_path):
    path = tmp_path / "official.pth"
    torch.save({"model": {"w": torch.ones(1)}, "args": argparse.Namespace(lr=5e-4)}, path)
    assert utils.load_checkpoint(str(path))["args"].lr == 5e-4


def test_check_shapes_names_the_keys():
    model = torch.nn.Linear(3, 2)
    bad = {"weight": torch.zeros(5, 3), "extra": torch.zeros(1)}
    with pytest.raises(utils.UserError, match=r"ckpt does not fit lin: shape mismatch "
                                              r"\(checkpoint vs model\): weight \(5, 3\) vs "
                                              r"\(2, 3\); missing: bias; unexpected: extra"):
        utils.check_shapes(model, bad, "ckpt", "lin")
    assert utils.check_shapes(model, {"weight": torch.zeros(2, 3)}, "ckpt", "lin",
                              strict=False) == (["bias"], [])


def test_mlflow_run_records_params_and_metrics(tmp_path, monkeypatch):
    import mlflow
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    run = utils.MlflowRun(SimpleNamespace(output_dir="out/pt", model="m"), {"lr": 5e-4, "x": None})
    run.log_metrics({"test_acc1": 12.5, "train_loss": 2.0, "flag": True, "name": "s"}, step=0)
    run.log_metrics({"test_acc1": 25.0}, step=1)
    run.end()
    client = mlflow.MlflowClient(tracking_uri=uri)
    (logged,) = client.search_runs(client.get_experiment_by_name("mambar").experiment_id)
    assert logged.info.run_name == "pt" and logged.info.status == "FINISHED"
    assert logged.data.params == {"lr": "0.0005", "x": "None"}
    assert [m.value for m in client.get_metric_history(logged.info.run_id, "test_acc1")] == \
        [12.5, 25.0]
    assert set(logged.data.metrics) == {"test_acc1", "train_loss"}


def test_without_mlflow_installed_training_goes_on(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    run = utils.MlflowRun(SimpleNamespace(output_dir="", model="m"), {})
    run.log_metrics({"a": 1.0}, step=0)
    run.end()
    assert "mlflow is not installed" in capsys.readouterr().err


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


def test_a_url_is_downloaded_once_into_the_hub_cache(tmp_path, monkeypatch):
    src = tmp_path / "src.pth"
    torch.save({"model": {"w": torch.arange(3.0)}}, src)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    calls = []

    def fake_download(url, dst):
        calls.append(url)
        shutil.copyfile(src, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    url = "https://example.org/weights/mambar_base_patch16_224.pth"
    for _ in range(2):
        assert torch.equal(utils.load_checkpoint(url)["model"]["w"], torch.arange(3.0))
    assert calls == [url]
    assert (tmp_path / "hub" / "checkpoints" / "mambar_base_patch16_224.pth").is_file()
