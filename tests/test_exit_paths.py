"""Every way a main.py run ends, run as a user runs it (a process of its own, with data loader
workers; the signals also without): it ends within seconds, with the exit code and the
message that say what happened, and leaves no process behind. The runs fork from
tests/main_server.py, which has imported main once, instead of starting a new interpreter
each. (An unreadable image: test_bad_input.py; the end and the non-finite loss without
workers: test_resume.py and test_main.py.)"""
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from helpers import make_image_folder

HERE = os.path.dirname(os.path.abspath(__file__))
# 16 training images in batches of 2: 8 steps, time for a signal to land mid-epoch; 4
# validation images.
RUN = ["--model", "mambar_tiny_patch16_224", "--input-size", "32", "--batch-size", "2",
       "--epochs", "1", "--no-mlflow", "--no-model-ema", "--print-freq", "1"]
LIMIT = 60  # seconds from the start of a run to the exit of all its processes

pytestmark = pytest.mark.slow


class Server:
    """tests/main_server.py, and the runs it forks."""

    def __init__(self):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "main_server.py")],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env)
        self.answers = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.answers.put(json.loads(line))

    def start(self, argv, log, fault=None):
        self.proc.stdin.write(json.dumps({"argv": argv, "log": str(log), "fault": fault}) + "\n")
        self.proc.stdin.flush()
        return Run(self, self.answers.get(timeout=120)["pid"], log)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


class Run:
    def __init__(self, server, pid, log):
        self.server, self.pid, self.log = server, pid, log
        self.started = time.time()

    def output(self):
        return self.log.read_text() if self.log.exists() else ""

    def wait_for(self, text):
        """Wait until the run's output holds ``text``."""
        while text not in self.output():
            if time.time() - self.started > LIMIT:
                self.kill()
                pytest.fail(f"no {text!r} in {LIMIT} s:\n{self.output()}")
            time.sleep(0.1)

    def kill(self):
        os.killpg(self.pid, signal.SIGKILL)
        self.server.answers.get(timeout=60)  # its exit code: the next run's answers follow

    def group(self):
        """Processes left in the run's process group (zombies aside)."""
        left = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == self.pid and fields[0] != "Z":
                left.append(int(pid))
        return left

    def end(self):
        """(exit code, output) once the run and every process it started have ended;
        fails (and kills them) if that takes longer than LIMIT seconds."""
        try:
            code = self.server.answers.get(timeout=max(LIMIT - (time.time() - self.started), 1))
        except queue.Empty:
            self.kill()
            pytest.fail(f"still running after {LIMIT} s:\n{self.output()}")
        while self.group() and time.time() - self.started < LIMIT:
            time.sleep(0.1)
        left = self.group()
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert not left, f"processes left after the run: {left}\n{self.output()}"
        return code["code"], self.output()

    def workers(self):
        return [pid for pid in self.group() if pid != self.pid]


@pytest.fixture(scope="module")
def server():
    server = Server()
    yield server
    server.close()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data"), train_per_class=8)


def last_line(output):
    return output.strip().splitlines()[-1]


def test_done(server, data, tmp_path):
    code, output = server.start([*RUN, "--data-path", data, "--num_workers", "2"],
                                tmp_path / "log").end()
    assert code == 0, output
    assert "Training time" in output


def test_non_finite_loss(server, data, tmp_path):
    # At lr 1e30 from the first step, the second step's loss is no longer finite.
    argv = [*RUN, "--data-path", data, "--num_workers", "2", "--lr", "1e30", "--unscale-lr",
            "--warmup-epochs", "0"]
    code, output = server.start(argv, tmp_path / "log").end()
    assert code == 1 and "Traceback" not in output, output
    assert last_line(output).startswith("error: non-finite loss"), output


def test_a_bug_in_the_step_shows_its_traceback(server, data, tmp_path):
    code, output = server.start([*RUN, "--data-path", data, "--num_workers", "2"],
                                tmp_path / "log", fault="oom").end()
    assert code == 1, output
    assert "Traceback" in output and last_line(output).startswith("torch.OutOfMemoryError: ")


@pytest.mark.parametrize("workers", ["0", "2"])
def test_ctrl_c(server, data, tmp_path, workers):
    out = tmp_path / "out"
    run = server.start([*RUN, "--data-path", data, "--num_workers", workers, "--output_dir",
                        str(out)], tmp_path / "log")
    run.wait_for("Epoch: [0]  [1/8]")
    os.killpg(run.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    code, output = run.end()
    assert code == 130 and "Traceback" not in output, output
    assert last_line(output) == f"interrupted; no checkpoint yet in {out}", output


@pytest.mark.parametrize("workers", ["0", "2"])
def test_sigterm_checkpoints_first(server, data, tmp_path, workers):
    out = tmp_path / "out"
    run = server.start([*RUN, "--data-path", data, "--num_workers", workers, "--output_dir",
                        str(out)], tmp_path / "log")
    run.wait_for("Epoch: [0]  [1/8]")
    os.killpg(run.pid, signal.SIGTERM)  # as SLURM and `timeout` do: workers too
    code, output = run.end()
    assert code == 128 + signal.SIGTERM, output
    assert "Stopped by SIGTERM at epoch 0, step" in output
    checkpoint = torch.load(out / "checkpoint.pth", weights_only=True)
    assert checkpoint["epoch"] == 0 and not checkpoint["epoch_complete"]


def test_sigterm_ends_an_evaluation_at_once(server, tmp_path):
    data = make_image_folder(tmp_path / "data", train_per_class=1, val_per_class=20)
    run = server.start([*RUN, "--data-path", data, "--num_workers", "2", "--eval"],
                       tmp_path / "log")
    run.wait_for("Test:  [ 1/14]")
    os.killpg(run.pid, signal.SIGTERM)
    code, output = run.end()
    assert code == 128 + signal.SIGTERM and "Accuracy of the network" not in output, output
    assert last_line(output) == "Stopped by SIGTERM during the evaluation (nothing to save)"


def test_a_killed_worker_ends_the_run(server, data, tmp_path):
    run = server.start([*RUN, "--data-path", data, "--num_workers", "2"], tmp_path / "log")
    run.wait_for("Epoch: [0]  [1/8]")
    os.kill(run.workers()[0], signal.SIGKILL)  # as the out-of-memory killer does
    code, output = run.end()
    assert code == 1 and "DataLoader worker (pid" in output, output


def test_workers_do_not_outlive_a_killed_run(server, data, tmp_path):
    run = server.start([*RUN, "--data-path", data, "--num_workers", "2"], tmp_path / "log")
    run.wait_for("Epoch: [0]  [1/8]")
    assert len(run.workers()) == 2
    os.kill(run.pid, signal.SIGKILL)
    code, _ = run.end()
    assert code == -signal.SIGKILL
