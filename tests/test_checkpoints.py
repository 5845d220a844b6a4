"""Checkpoint files: plain data written atomically, read safely (a pickle with code is refused,
never run), and their weights fitted to a model with one-line errors naming the keys."""
import argparse
import errno
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import checkpoints
import models_mambar as mm
from utils import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_model():
    return mm.MambaR(img_size=32, embed_dim=32, depth=2, num_registers=4, neck_reduction=2,
                     num_classes=5)


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoints_are_plain_data_and_written_atomically(tmp_path):
    path = tmp_path / "checkpoint.pth"
    checkpoints.save_checkpoint({"model": {"w": torch.ones(2)}, "args": {"lr": 1e-3}}, str(path))
    assert checkpoints.load_checkpoint(str(path))["args"] == {"lr": 1e-3}
    assert os.listdir(tmp_path) == ["checkpoint.pth"]


@pytest.mark.parametrize("code, reason", [
    (errno.ENOSPC, r"no space left on /\S*( \(\S+\))?: [\d.]+ [MG]iB free, the checkpoint "
                   r"needs about 0\.0 MiB"),
    (errno.EIO, "Input/output error")])
def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch, code, reason):
    path = str(tmp_path / "checkpoint.pth")
    checkpoints.save_checkpoint({"epoch": 1}, path)

    def failing_write(obj, f):
        f.write(b"partial")
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(torch, "save", failing_write)
    with pytest.raises(UserError, match=f"cannot write checkpoint {path}: {reason}; the "
                                        f"previous checkpoint there is intact$"):
        checkpoints.save_checkpoint({"epoch": 2}, path)
    assert checkpoints.load_checkpoint(path) == {"epoch": 1}
    assert os.listdir(tmp_path) == ["checkpoint.pth"]


def test_a_kill_between_temp_file_and_rename_keeps_the_previous_checkpoint(tmp_path):
    path = str(tmp_path / "checkpoint.pth")
    checkpoints.save_checkpoint({"epoch": 1}, path)
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {ROOT!r})
        import checkpoints
        os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
        checkpoints.save_checkpoint({{"epoch": 2}}, {path!r})
    """)
    result = subprocess.run([sys.executable, "-c", script], timeout=120)
    assert result.returncode == -9
    assert checkpoints.load_checkpoint(path) == {"epoch": 1}
    assert len(os.listdir(tmp_path)) == 2  # the dead writer's temp file
    checkpoints.save_checkpoint({"epoch": 3}, path)
    assert os.listdir(tmp_path) == ["checkpoint.pth"]
    assert checkpoints.load_checkpoint(path) == {"epoch": 3}


def test_corrupt_and_truncated_checkpoints_are_named(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"model": {"w": torch.zeros(1000)}}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:3000])
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    for path in (truncated, garbage, tmp_path / "empty.pth"):
        path.touch()
        with pytest.raises(UserError, match=f"cannot read checkpoint {path}: the file is "
                                                  f"corrupt"):
            checkpoints.load_checkpoint(str(path))
    with pytest.raises(UserError, match="checkpoint not found: .*missing.pth"):
        checkpoints.load_checkpoint(str(tmp_path / "missing.pth"))


def test_a_pickle_with_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pth"
    torch.save({"model": Evil(str(marker))}, evil)
    with pytest.raises(UserError, match=f"refusing to load checkpoint {evil}: unpickling "
                                              f"it would call posix.system.*nothing in it was "
                                              f"executed"):
        checkpoints.load_checkpoint(str(evil))
    assert not marker.exists()


def test_checkpoints_of_the_official_code_with_pickled_args_load(tmp_path):
    path = tmp_path / "official.pth"
    torch.save({"model": {"w": torch.ones(1)}, "args": argparse.Namespace(lr=5e-4)}, path)
    assert checkpoints.load_checkpoint(str(path))["args"].lr == 5e-4


def test_check_fit_names_the_keys():
    model = torch.nn.Linear(3, 2)
    bad = {"weight": torch.zeros(5, 3), "extra": torch.zeros(1)}
    with pytest.raises(UserError, match=r"ckpt does not fit lin: shape mismatch "
                                              r"\(checkpoint vs model\): weight \(5, 3\) vs "
                                              r"\(2, 3\); missing: bias; unexpected: extra"):
        checkpoints.check_fit(model, bad, "ckpt", "lin")
    assert checkpoints.check_fit(model, {"weight": torch.zeros(2, 3)}, "ckpt", "lin",
                              strict=False) == (["bias"], [])


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
        assert torch.equal(checkpoints.load_checkpoint(url)["model"]["w"], torch.arange(3.0))
    assert calls == [url]
    assert (tmp_path / "hub" / "checkpoints" / "mambar_base_patch16_224.pth").is_file()


def test_released_format_loads_strict(tmp_path):
    src = small_model()
    path = tmp_path / "released.pth"
    torch.save({"model": src.state_dict()}, path)
    dst = small_model()
    checkpoints.load_weights(dst, str(path), strict=True)
    for key, value in src.state_dict().items():
        assert torch.equal(dst.state_dict()[key], value), key
    bare = tmp_path / "bare.pth"
    torch.save(src.state_dict(), bare)
    assert set(checkpoints.load_state_dict_file(str(bare))) == set(src.state_dict())


def test_loader_names_bad_keys(tmp_path):
    state = small_model().state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["norm_f.weight"]
    state["head.weight"] = torch.zeros(7, state["head.weight"].shape[1])
    path = tmp_path / "bad.pth"
    torch.save({"model": state}, path)
    with pytest.raises(UserError) as err:
        checkpoints.load_weights(small_model(), str(path))
    message = str(err.value)
    assert "norm_f.weight" in message and "extra.weight" in message
    assert "head.weight (7, 64) vs (5, 64)" in message


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_loader_refuses_pickled_code_and_corrupt_files(tmp_path):
    evil = tmp_path / "evil.pth"
    torch.save({"model": _Payload()}, evil)
    with pytest.raises(UserError, match="refusing to load .*evil.pth"):
        checkpoints.load_state_dict_file(str(evil))
    good = tmp_path / "good.pth"
    torch.save({"model": small_model().state_dict()}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(UserError, match="corrupt or truncated"):
        checkpoints.load_state_dict_file(str(truncated))
    with pytest.raises(UserError, match="not found"):
        checkpoints.load_state_dict_file(str(tmp_path / "missing.pth"))
