"""MLflow tracking: one MLflow run per training run, across resumes; the stages of a schedule as
children of one parent run; the run's files as artifacts beside its metrics.

Rank 0 only, and never fatal: the first failure (mlflow missing, a tracking server down at the
start or later) prints one warning, tracking stops and training goes on; a server that does not
answer holds rank 0 for MLflow's retries first ($MLFLOW_HTTP_REQUEST_MAX_RETRIES, default 7:
about 4 minutes), once. Tracks to ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the
working directory, in experiment ``$MLFLOW_EXPERIMENT_NAME`` (default ``mambar``).

A checkpoint keeps its run's id (``Tracker.reference``): a resumed run continues that MLflow run,
its metrics at their own steps. A new run is a child of ``$MAMBAR_MLFLOW_PARENT`` when set.
The stage scripts open that parent with this file's command line:

    python tracking.py parent --marker FILE --name NAME [--tag KEY=VALUE ...]
        reuses the run whose id FILE holds if the store has it, else creates one and writes
        its id to FILE; prints the id
    python tracking.py end --marker FILE --status FINISHED|FAILED|KILLED
        ends it; prints where MLflow's UI shows its experiment's runs table
"""
import argparse
import logging
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Callable, Dict, Optional

import torch

import utils

DEFAULT_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "mambar"
# The parent run's id, or a file that holds it: the stage scripts pass the file that node 0
# writes before any stage starts, so that rank 0 finds the id on whichever node it runs.
PARENT_ENV = "MAMBAR_MLFLOW_PARENT"
# MLflow 3's UI opens an experiment of this kind on its runs table, not on its GenAI pages.
# (Releases with a "GenAI | Model training" switch in the sidebar follow the switch instead, or
# ?workflowType=machine_learning in the address: README, "Logs and MLflow".)
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
REPO = Path(__file__).resolve().parent


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def _client():
    """mlflow's client for ``tracking_uri()``, its INFO lines (database creation, migrations)
    kept out of the training log."""
    import mlflow
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    return mlflow.MlflowClient(tracking_uri())


def _artifact_root(uri: str) -> Optional[str]:
    """Artifacts of a sqlite store go beside its database (mlflow's default is ./mlruns of
    whichever directory the first run started in)."""
    if not uri.startswith("sqlite:///"):
        return None
    database = Path(uri[len("sqlite:///"):]).resolve()
    return (database.parent / "mlartifacts").as_uri()


def experiment_id(client) -> str:
    """The experiment's id, created if need be; marked as a training experiment."""
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=_artifact_root(
                tracking_uri()), tags=EXPERIMENT_KIND)
        except Exception:  # created meanwhile by another job: use that one
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    for key, value in EXPERIMENT_KIND.items():
        if key not in experiment.tags:
            client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


def commit_tag() -> Dict[str, str]:
    """The repository's commit, as the tag MLflow's UI shows as the run's version."""
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"mlflow.source.git.commit": out.stdout.strip()} if out.returncode == 0 else {}


def run_name(args) -> str:
    """--run-name, else "eval" for --eval, else the output folder's name, else the model."""
    if args.run_name:
        return args.run_name
    if args.eval:
        return "eval"
    return os.path.basename(os.path.normpath(args.output_dir)) if args.output_dir else args.model


def stage_tags(args, device: torch.device) -> Dict[str, str]:
    """What tells the runs of a schedule apart in the runs table."""
    # Imported here: it loads the Numba scan, which `python tracking.py parent` does not need.
    from selective_scan import requested_backend, resolve_backend
    return {"model": args.model, "stage": run_name(args), "input_size": str(args.input_size),
            "global_batch": str(args.batch_size * args.world_size * args.accum_iter),
            "world_size": str(args.world_size),
            "scan_backend": resolve_backend(requested_backend(), device), **commit_tag()}


def _version(package: str) -> Optional[str]:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device, world_size: int) -> Dict[str, Optional[str]]:
    """The command line and what the numbers depend on: versions, device, where it ran."""
    cuda = device.type == "cuda"
    return {"command": shlex.join(sys.orig_argv), "cwd": os.getcwd(), "host": platform.node(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "world_size": world_size,
            "python": platform.python_version(), "torch": torch.__version__,
            "timm": _version("timm"), "mlflow": _version("mlflow"), "cuda": torch.version.cuda,
            "cudnn": str(torch.backends.cudnn.version()) if cuda else None,
            "triton": _version("triton"), "numba": _version("numba"),
            "device": torch.cuda.get_device_name(device) if cuda else f"CPU: {_cpu_model()}"}


def _read_id(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip() or None
    except OSError:
        return None


def parent_run_id() -> Optional[str]:
    """$MAMBAR_MLFLOW_PARENT: a run id, or a file holding one (a missing file: no parent)."""
    value = os.environ.get(PARENT_ENV, "").strip()
    return _read_id(value) if os.sep in value else value or None


class Tracker:
    """One training run's MLflow run; a no-op when tracking is off or has failed. Every call
    that fails prints one warning and turns tracking off for the rest of the run."""

    def __init__(self, client=None, run_id: Optional[str] = None):
        self._client, self.run_id = client, run_id

    @property
    def reference(self) -> Optional[Dict[str, str]]:
        """What a checkpoint keeps to continue this MLflow run (plain strings)."""
        if self._client is None:
            return None
        return {"run_id": self.run_id, "tracking_uri": tracking_uri()}

    def _call(self, what: str, action: Callable) -> None:
        """``action(client)``, unless tracking is off; the first failure turns it off."""
        if self._client is None:
            return
        try:
            action(self._client)
        except Exception as err:
            _warn(f"MLflow {what} failed, not tracking the rest of this run: "
                  f"{utils.error_line(err)}")
            self._client = None

    def log_metrics(self, metrics: Dict[str, object], step: int) -> None:
        """The numbers among ``metrics`` at ``step``."""
        if self._client is None:  # mlflow may not even be installed
            return
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        self._call("logging", lambda c: c.log_batch(self.run_id, metrics=batch))

    def log_train_step(self, step: int, values: Dict[str, float]) -> None:
        """Training values at a global step (``step/train_loss``, ``step/train_lr``): apart
        from the per-epoch summaries (``train_loss`` at the epoch), whose steps are epochs."""
        self.log_metrics({f"step/train_{k}": v for k, v in values.items()}, step)

    def log_file(self, path: str, folder: Optional[str] = None) -> None:
        self._call("artifact upload", lambda c: c.log_artifact(self.run_id, path, folder))

    def log_dict(self, data: dict, name: str) -> None:
        self._call("artifact upload", lambda c: c.log_dict(self.run_id, data, name))

    def log_weights(self, model: torch.nn.Module, name: str) -> None:
        """``model/<name>.pth``: {"model": state_dict}, the released checkpoints' format, which
        ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...))``
        and --finetune / --resume load."""
        if self._client is None:
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, f"{name}.pth")
            torch.save({"model": model.state_dict()}, path)
            self.log_file(path, "model")

    def end(self, status: str) -> None:
        """FINISHED, FAILED or KILLED."""
        self._call("ending the run", lambda c: c.set_terminated(self.run_id, status))
        self._client = None


def _reopen(client, run_id: str) -> bool:
    """Set ``run_id`` RUNNING again if this store has it (and it is not deleted)."""
    from mlflow.exceptions import MlflowException
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return False
    if run.info.lifecycle_stage == "deleted":
        return False
    client.update_run(run_id, status="RUNNING")
    return True


def _new_run(client, name: str, tags: Dict[str, str]) -> str:
    from mlflow.tracking.context.registry import resolve_tags
    parent = parent_run_id()
    if parent:
        experiment = client.get_run(parent).info.experiment_id
        tags = {**tags, "mlflow.parentRunId": parent}
    else:
        experiment = experiment_id(client)
    return client.create_run(experiment, tags=resolve_tags(tags), run_name=name).info.run_id


def start(args, device: torch.device, params: Dict[str, object],
          previous: Optional[Dict[str, str]] = None) -> Tracker:
    """This invocation's tracker: the run of ``previous`` continued, else a new run (its
    ``params`` logged; MLflow keeps a run's first values). Tags, the full arguments
    (``args.json``) and ``environment.json`` are those of the latest invocation."""
    if not args.mlflow or not utils.is_main_process():
        return Tracker()
    try:
        client = _client()
    except ImportError:
        _warn("mlflow is not installed; not tracking this run (--no-mlflow hides this warning)")
        return Tracker()
    tracker = Tracker(client)

    def begin(c):
        from mlflow.entities import Param, RunTag
        tags = stage_tags(args, device)
        if previous and _reopen(c, previous["run_id"]):
            tracker.run_id = previous["run_id"]
            c.log_batch(tracker.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        else:
            if previous:
                print(f"note: the checkpoint's MLflow run {previous['run_id']} (tracked in "
                      f"{previous['tracking_uri']}) is not in {tracking_uri()}; tracking the "
                      f"rest of this run as a new MLflow run")
            tracker.run_id = _new_run(c, run_name(args), tags)
            c.log_batch(tracker.run_id, params=[Param(k, str(v)[:6000])
                                                for k, v in params.items()])
        c.log_dict(tracker.run_id, dict(vars(args)), "args.json")
        c.log_dict(tracker.run_id, environment(device, args.world_size), "environment.json")

    tracker._call("tracking", begin)
    return tracker


def ui_address(client, run_id: str) -> str:
    """Where MLflow's UI shows a run's experiment on its runs table: the address carries
    ``workflowType``, which UI releases with a GenAI / model training switch follow rather
    than the experiment's kind. A local store needs ``mlflow ui`` started first."""
    page = (f"#/experiments/{client.get_run(run_id).info.experiment_id}"
            "?workflowType=machine_learning")
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{page}"
    return (f"{shlex.quote(sys.executable)} -m mlflow ui --backend-store-uri {uri}, then "
            f"http://127.0.0.1:5000/{page}")


def _open_parent(marker: str, name: str, tags: Dict[str, str]) -> str:
    from mlflow.tracking.context.registry import resolve_tags
    client = _client()
    run_id = _read_id(marker)
    if not (run_id and _reopen(client, run_id)):
        run_id = client.create_run(experiment_id(client), run_name=name,
                                   tags=resolve_tags({**tags, **commit_tag()})).info.run_id
        os.makedirs(os.path.dirname(os.path.abspath(marker)), exist_ok=True)
        with open(marker, "w") as f:
            f.write(run_id + "\n")
    return run_id


def cli(argv=None) -> int:
    """The stage scripts' entry: never fails the schedule (a warning, exit code 0)."""
    parser = argparse.ArgumentParser(description="The MLflow parent run of a schedule of "
                                     "stages (used by scripts/_stages.sh and scripts/demo.sh)")
    commands = parser.add_subparsers(dest="command", required=True)
    parent = commands.add_parser("parent", help="create or reuse the parent run; print its id")
    parent.add_argument("--marker", required=True, help="file that keeps the parent run's id")
    parent.add_argument("--name", required=True, help="run name of a new parent run")
    parent.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE")
    end = commands.add_parser("end", help="end the parent run")
    end.add_argument("--marker", required=True)
    end.add_argument("--status", required=True, choices=["FINISHED", "FAILED", "KILLED"])
    args = parser.parse_args(argv)
    try:
        if args.command == "parent":
            tags = dict(t.split("=", 1) for t in args.tag)
            print(_open_parent(args.marker, args.name, tags))
        elif _read_id(args.marker):
            client = _client()
            client.set_terminated(_read_id(args.marker), args.status)
            print(f"MLflow: {ui_address(client, _read_id(args.marker))}")
    except Exception as err:
        _warn(f"MLflow parent run ({args.command}): {utils.error_line(err)}")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
