"""Every bad input ends main.py with one clear line on stderr naming the culprit, exit code 1,
and no traceback; a pickle with code is never executed."""
import errno
import filecmp
import functools
import io
import os
import re
import shutil
import subprocess
import sys

import pytest
import timm
import torch

import checkpoints
import main
from helpers import make_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "mambar_tiny_patch16_224"
FAST = ["--input-size", "32", "--batch", "2", "--num_workers", "0", "--no-mlflow",
        "--epochs", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data"))


def fails(capfd, *argv):
    """Run main.py in-process; return its one stderr line after checking the exit code."""
    code = main.cli([*FAST, *argv])
    err = capfd.readouterr().err
    assert code == 1, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def save_model(path, name, img_size, num_classes):
    torch.save({"model": timm.create_model(name, num_classes=num_classes,
                                           img_size=img_size).state_dict()}, path)
    return str(path)


def test_unknown_model_lists_the_available_ones(capfd, data):
    line = fails(capfd, "--model", "mambar_huge_patch16_224", "--data-path", data)
    assert "unknown model 'mambar_huge_patch16_224'; available: mambar_base_patch16_224" in line
    assert TINY in line and "vim_tiny_patch16_224" in line


def test_missing_data_path(capfd, tmp_path):
    line = fails(capfd, "--data-path", str(tmp_path / "imagenet"))
    assert f"data path not found: '{tmp_path / 'imagenet'}'" in line


def test_empty_data_path(capfd, tmp_path):
    line = fails(capfd, "--data-path", str(tmp_path))
    assert f"data path {tmp_path} has no 'train' folder" in line


def test_data_folder_without_the_val_split(capfd, tmp_path):
    root = make_image_folder(tmp_path)
    os.rename(os.path.join(root, "val"), os.path.join(root, "validation"))
    assert f"data path {root} has no 'val' folder" in fails(capfd, "--data-path", root)


def test_corrupt_checkpoint(capfd, data, tmp_path):
    path = tmp_path / "checkpoint.pth"
    path.write_bytes(open(save_model(path, TINY, 32, 2), "rb").read()[:5000])
    line = fails(capfd, "--data-path", data, "--resume", str(path))
    assert f"cannot read checkpoint {path}: the file is corrupt or truncated" in line


def test_checkpoint_of_another_model_size(capfd, data, tmp_path):
    path = save_model(tmp_path / "small.pth", "mambar_small_patch16_224", 32, 2)
    line = fails(capfd, "--data-path", data, "--resume", path)
    assert f"{path} does not fit {TINY}: shape mismatch (checkpoint vs model): pos_embed" in line


def test_checkpoint_of_another_class_count(capfd, data, tmp_path):
    path = save_model(tmp_path / "in1k.pth", TINY, 32, 1000)
    line = fails(capfd, "--data-path", data, "--eval", "--resume", path)
    assert (f"{path} does not fit {TINY}: shape mismatch (checkpoint vs model): head.weight "
            f"(1000, 2304) vs (2, 2304), head.bias (1000,) vs (2,)") in line


def test_finetune_together_with_resume(capfd, data):
    line = fails(capfd, "--data-path", data, "--finetune", "a.pth", "--resume", "b.pth")
    assert "--finetune and --resume exclude each other" in line


@pytest.mark.parametrize("prob", ["-0.1", "1.5"])
def test_hflip_outside_zero_to_one(capfd, data, prob):
    line = fails(capfd, "--data-path", data, "--hflip", prob)
    assert "--hflip must be a probability in [0, 1]" in line


def test_input_size_not_a_multiple_of_the_patch_size(capfd, data):
    line = fails(capfd, "--data-path", data, "--input-size", "100")
    assert "--input-size 100" in line and "multiple of the patch size 16" in line


def test_batch_larger_than_the_dataset(capfd, data):
    line = fails(capfd, "--data-path", data, "--batch-size", "16")
    assert "--batch-size 16 is larger than the 8 training images" in line


@pytest.mark.parametrize("workers", ["0", "1"])
def test_unreadable_image_is_named(capfd, tmp_path, workers):
    root = make_image_folder(tmp_path)
    bad = os.path.join(root, "train", "class0", "2.png")
    with open(bad, "r+b") as f:
        f.truncate(50)
    line = fails(capfd, "--data-path", root, "--num_workers", workers)
    assert f"error: cannot read image {bad} (" in line and "remove or replace" in line


def test_unreadable_image_ends_the_process_with_workers(tmp_path):
    """As a user runs it: the error line, exit 1, and the process gone at once (its workers
    ignore SIGTERM, so one left running used to hold the interpreter's exit for ever)."""
    root = make_image_folder(tmp_path)
    bad = os.path.join(root, "train", "class0", "2.png")
    with open(bad, "r+b") as f:
        f.truncate(50)
    result = subprocess.run([sys.executable, "main.py", *FAST, "--num_workers", "2",
                             "--data-path", root], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot read image {bad} ("), lines


class FullFolderFile(io.FileIO):
    """A file in a folder that holds at most ``capacity`` bytes: a write that does not fit is
    cut short and the next one fails with ENOSPC, as the kernel does on a full filesystem."""

    def __init__(self, path, capacity):
        super().__init__(path, "wb")
        self.folder, self.capacity = os.path.dirname(os.path.abspath(path)), capacity

    def write(self, data):
        room = self.capacity - sum(e.stat().st_size for e in os.scandir(self.folder)
                                   if e.is_file())
        if room <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(memoryview(data)[:room])


def open_in_full_folder(capacity, path, mode="r", *args, **kwargs):
    if "w" not in mode:
        return open(path, mode, *args, **kwargs)
    return io.BufferedWriter(FullFolderFile(path, capacity))


@pytest.fixture
def small_filesystem(tmp_path, monkeypatch):
    """A function making a folder of ``size`` bytes for checkpoints, as a tmpfs where this
    process may mount one (root); elsewhere checkpoints.save_checkpoint writes through
    FullFolderFile. Returns the folder's mount point (the tmpfs, or the real one)."""
    mounted = []

    def make(path, size):
        os.makedirs(path)
        try:
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                                   str(path)], capture_output=True).returncode == 0
        except FileNotFoundError:  # no mount command
            done = False
        if done:
            mounted.append(path)
            return str(path)
        monkeypatch.setattr(checkpoints, "open", functools.partial(open_in_full_folder, size),
                            raising=False)
        mount = str(path)
        while not os.path.ismount(mount):
            mount = os.path.dirname(mount)
        return mount

    yield make
    for path in mounted:
        subprocess.run(["umount", str(path)], check=True)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """The output folder of a one-epoch run: checkpoints of the real size."""
    out = tmp_path_factory.mktemp("trained")
    assert main.cli([*FAST, "--data-path", data, "--output_dir", str(out)]) == 0
    return out


def test_a_full_disk_is_named_and_the_previous_checkpoint_kept(capfd, data, trained, tmp_path,
                                                                small_filesystem):
    """The second epoch's checkpoint does not fit beside the first's: one line naming the
    file, the filesystem and the space; the first checkpoint intact, no temp file left."""
    size = (trained / "checkpoint.pth").stat().st_size
    out = tmp_path / "disk"
    mount = small_filesystem(out, 2 * size + size // 2)
    for name in ("checkpoint.pth", "best_checkpoint.pth", "log.txt"):
        shutil.copy(trained / name, out / name)
    capfd.readouterr()
    line = fails(capfd, "--data-path", data, "--output_dir", str(out), "--epochs", "2")
    assert re.fullmatch(
        rf"error: cannot write checkpoint {re.escape(str(out))}/(best_)?checkpoint\.pth: no "
        rf"space left on {re.escape(mount)}( \(\S+\))?: [\d.]+ [MG]iB free, the checkpoint needs "
        rf"about [\d.]+ MiB; the previous checkpoint there is intact", line), line
    assert filecmp.cmp(out / "checkpoint.pth", trained / "checkpoint.pth", shallow=False)
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 0
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_the_full_disk_stand_in_fails_as_torch_save_does_on_one(trained, tmp_path):
    """Where no small filesystem can be mounted, FullFolderFile stands in for one: torch.save
    meets its ENOSPC as on a full tmpfs, and fails again finishing the archive (the
    RuntimeError that used to end runs with two tracebacks)."""
    checkpoint = torch.load(trained / "checkpoint.pth", weights_only=True)
    size = (trained / "checkpoint.pth").stat().st_size
    with pytest.raises(RuntimeError, match="unexpected pos") as raised:
        with open_in_full_folder(size // 2, str(tmp_path / "a.pth"), "wb") as f:
            torch.save(checkpoint, f)
    assert raised.value.__context__.errno == errno.ENOSPC


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("flags", [["--resume"], ["--finetune"], ["--eval", "--resume"]])
def test_a_malicious_pickle_is_never_executed(capfd, data, tmp_path, flags):
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pth"
    torch.save({"model": Evil(str(marker))}, evil)
    line = fails(capfd, "--data-path", data, *flags, str(evil))
    assert f"checkpoint {evil}: unpickling it would call posix.system" in line
    assert "refusing to load" in line and "nothing in it was executed" in line
    assert not marker.exists()


def test_debug_shows_the_traceback(capfd, data):
    assert main.cli([*FAST, "--data-path", data, "--model", "nope", "--debug"]) == 1
    assert "Traceback" in capfd.readouterr().err


def test_the_command_line_exits_non_zero_with_one_line(tmp_path):
    result = subprocess.run([sys.executable, "main.py", "--model", "nope", "--no-mlflow"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.startswith("error: unknown model 'nope'; available:")
    assert len(result.stderr.strip().splitlines()) == 1
