"""A job of two processes under torchrun: when one fails the whole job ends within a minute,
with that process's message once and no traceback from the others; a group that torchrun
restarts (--max-restarts) resumes from the last checkpoint and ends with the weights of a
run that was never interrupted."""
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
from torch.utils.data import DistributedSampler
from torchvision.datasets import ImageFolder

from helpers import assert_same_state, make_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
# Batches of 2 on 2 processes; one loader worker each.
RUN = ["main.py", "--model", "mambar_tiny_patch16_224", "--input-size", "32", "--batch", "2",
       "--epochs", "2", "--warmup-epochs", "1", "--lr", "0.05", "--num_workers", "1",
       "--print-freq", "1", "--no-mlflow"]

pytestmark = pytest.mark.slow


def torchrun(*flags):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(port), *flags]


class Job:
    """A torchrun job; its output lines arrive, time-stamped, on ``self.lines``."""

    def __init__(self, command):
        self.proc = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines, self.output = queue.Queue(), []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.output.append(line)
            self.lines.put((time.time(), line))

    def wait_for(self, pattern, timeout=300):
        """The time at which a line matching ``pattern`` came."""
        deadline = time.time() + timeout
        while True:
            try:
                when, line = self.lines.get(timeout=max(deadline - time.time(), 0.01))
            except queue.Empty:
                self.kill()
                pytest.fail(f"no line matching {pattern!r} in {timeout} s:\n{self.text()}")
            if re.search(pattern, line):
                return when

    def wait(self, timeout):
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"still running after {timeout} s:\n{self.text()}")
        time.sleep(0.2)  # the reader thread's last lines
        return code

    def kill(self):
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def text(self):
        return "".join(self.output)

    def rank_pid(self, rank):
        """The pid of the process torchrun started for ``rank``."""
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{pid}/environ", "rb") as f:
                    env = f.read().split(b"\0")
            except OSError:
                continue
            if parent == self.proc.pid and f"RANK={rank}".encode() in env:
                return int(pid)
        raise AssertionError(f"no process of rank {rank}")


def test_one_process_failing_ends_the_job_with_its_message_once(tmp_path):
    root = make_image_folder(tmp_path / "data", train_per_class=8)  # 4 steps per epoch
    # An image that only rank 1 reads (no repeated augmentation: each rank a shard of its own)
    # in its second step.
    train = ImageFolder(os.path.join(root, "train"))
    bad = train.samples[list(DistributedSampler(train, 2, 1, shuffle=True, seed=0))[2]][0]
    with open(bad, "r+b") as f:
        f.truncate(50)
    job = Job(torchrun() + RUN + ["--data-path", root, "--no-repeated-aug"])
    failed = job.wait_for(r"^\[rank 1\] error: ")
    code = job.wait(timeout=60)
    ended = time.time()
    output = job.text()
    assert code != 0 and ended - failed < 60, output
    assert output.count(f"error: cannot read image {bad} (") == 1, output
    assert "[rank 0] stopped: lost contact with another process of the job" in output
    assert "[rank0]: Traceback" not in output  # no traceback from the process that did not fail
    # torchrun's report: each process exited with a non-zero code.
    exits = dict(re.findall(r"rank\s*: (\d) \(local_rank: \d\)\s*exitcode\s*: (-?\d+)", output))
    assert set(exits) == {"0", "1"} and "0" not in exits.values(), output


def test_a_group_restarted_by_torchrun_resumes_and_ends_as_if_never_stopped(tmp_path):
    data = make_image_folder(tmp_path / "data")  # 8 training images: 2 steps per epoch
    reference = tmp_path / "reference"
    job = Job(torchrun() + RUN + ["--data-path", data, "--output_dir", str(reference)])
    assert job.wait(timeout=600) == 0, job.text()

    out = tmp_path / "restarted"
    job = Job(torchrun("--max-restarts", "1") + RUN + ["--data-path", data, "--output_dir",
                                                       str(out)])
    # Epoch 0 has ended: rank 0 writes best_checkpoint.pth, then checkpoint.pth, while rank 1
    # waits for it. Killing rank 1 now leaves that checkpoint to resume from.
    while not (out / "best_checkpoint.pth").exists():
        assert job.proc.poll() is None, job.text()
        time.sleep(0.05)
    os.kill(job.rank_pid(1), signal.SIGKILL)
    assert job.wait(timeout=600) == 0, job.text()
    output = job.text()
    assert output.count("Resumed from") == 1 and "epoch 1, step 0" in output, output
    assert_same_state(torch.load(out / "checkpoint.pth", weights_only=True),
                      torch.load(reference / "checkpoint.pth", weights_only=True))
