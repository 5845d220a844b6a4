"""The launch scripts (scripts/*.sh), the released-weights configuration and the README's
Quick start. The size scripts run in --dry-run mode, or with stub launchers that only record
their command lines, so nothing here trains (a few seconds in all)."""
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
SIZES = ("tiny", "small", "base", "large")
HF = "https://huggingface.co/Wangf3014/Mamba-Reg/resolve/main"

# The recipe per size and stage (Base = the authors' published commands, the others as their
# script headers explain).
# stage: (input, epochs, per-GPU batch on one 8-GPU node, accum there, global batch, lr,
#         weight decay, drop path)
RECIPES = {
    "base": [(128, 300, 128, 1, 1024, 5e-4, 0.05, 0.1),
             (224, 100, 128, 1, 1024, 2e-4, 0.05, 0.4),
             (224, 20, 64, 1, 512, 1e-5, 0.1, 0.4)],
    "small": [(128, 300, 128, 1, 1024, 5e-4, 0.05, 0.1),
              (224, 100, 128, 1, 1024, 2e-4, 0.05, 0.2),
              (224, 20, 64, 1, 512, 1e-5, 0.1, 0.4)],
    "tiny": [(128, 300, 128, 1, 1024, 5e-4, 0.05, 0.1),
             (224, 100, 128, 1, 1024, 2e-4, 0.05, 0.1),
             (224, 20, 64, 1, 512, 1e-5, 0.1, 0.1)],
    "large": [(128, 200, 128, 4, 4096, 2e-4, 0.3, 0.2),
              (224, 50, 64, 2, 1024, 8e-4, 0.3, 0.4),
              (224, 50, 64, 1, 512, 2e-5, 0.1, 0.6)],
}


@pytest.fixture(scope="module")
def parser():
    """main.py's own argument parser: every flag a script prints must be one main.py accepts."""
    sys.path.insert(0, str(REPO))
    import main
    return main.get_args_parser()


def clean_env(**overrides):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "MLFLOW_")) and k not in (
               "GPUS_PER_NODE", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
               "RDZV_ENDPOINT", "RDZV_ID", "MAX_GPU_BATCH", "DATA_PATH", "OUTPUT_ROOT",
               "DRY_RUN", "TORCHRUN", "PYTHON")}
    env.update({"GPUS_PER_NODE": "8", "DATA_PATH": "/data/imagenet"})
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def run_script(name, *args, check=True, **env):
    proc = subprocess.run(["bash", str(SCRIPTS / name), *args], capture_output=True, text=True,
                          env=clean_env(**env), timeout=60)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def commands(stdout):
    """The command lines of a dry run (comment lines start with #)."""
    return [shlex.split(line) for line in stdout.splitlines()
            if line.strip() and not line.startswith("#")]


def main_args(cmd, parser):
    """Split a command into (launcher args, main.py namespace)."""
    at = next(i for i, a in enumerate(cmd) if a.endswith("main.py"))
    assert Path(cmd[at]) == REPO / "main.py"
    return cmd[:at], parser.parse_args(cmd[at + 1:])


def launcher_opts(launcher):
    return dict(a[2:].split("=", 1) for a in launcher if a.startswith("--") and "=" in a)


@pytest.mark.parametrize("size", SIZES)
def test_dry_run_prints_three_chained_stages_and_eval(size, parser, tmp_path):
    out = run_script(f"mambar_{size}.sh", "--dry-run", OUTPUT_ROOT=tmp_path).stdout
    cmds = commands(out)
    assert len(cmds) == 4, out
    model = f"mambar_{size}_patch16_224"
    stages = [main_args(c, parser) for c in cmds]
    for i, ((launcher, args), recipe) in enumerate(zip(stages[:3], RECIPES[size])):
        input_size, epochs, batch, accum, global_batch, lr, wd, drop_path = recipe
        assert Path(launcher[0]).name == "torchrun"
        opts = launcher_opts(launcher)
        assert opts["nproc_per_node"] == "8" and opts["nnodes"] == "1"
        assert opts["node_rank"] == "0" and "master_addr" in opts and "master_port" in opts
        assert args.model == model
        assert args.output_dir == f"{tmp_path}/{model}/{('pt', 'mid', 'ft')[i]}"
        assert args.run_name == ('pt', 'mid', 'ft')[i]
        assert args.data_path == "/data/imagenet"
        assert (args.input_size, args.epochs) == (input_size, epochs)
        assert (args.batch_size, args.accum_iter) == (batch, accum)
        assert batch * 8 * accum == global_batch
        assert (args.lr, args.weight_decay, args.drop_path) == (lr, wd, drop_path)
        assert (args.reprob, args.resume) == (0.0, "")
        if i < 2:   # pretrain and intermediate: ThreeAugment, repeated aug, scaled lr
            assert args.ThreeAugment and args.repeated_aug and args.dist_eval
            assert not args.unscale_lr and args.smoothing == 0.0
        else:       # finetune: RandAugment, label smoothing, lr as given
            assert not args.ThreeAugment and not args.repeated_aug
            assert args.unscale_lr and args.smoothing == 0.1
            assert args.aa == "rand-m9-mstd0.5-inc1" and args.eval_crop_ratio == 1.0
    # The chain: each stage starts from the previous stage's last checkpoint.
    assert stages[0][1].finetune == ""
    assert stages[1][1].finetune == f"{stages[0][1].output_dir}/checkpoint.pth"
    assert stages[2][1].finetune == f"{stages[1][1].output_dir}/checkpoint.pth"
    launcher, ev = stages[3]
    assert "torchrun" not in launcher[0]
    assert ev.eval and ev.resume == f"{stages[2][1].output_dir}/checkpoint.pth"
    assert (ev.model, ev.input_size, ev.eval_crop_ratio, ev.batch_size) == (model, 224, 1.0, 128)
    assert ev.finetune == "" and ev.run_name == "eval"
    assert f"# MLflow: parent run mambar_{size}, its id in {tmp_path}/{model}/mlflow_parent" in out


def test_large_recipe_extras(parser):
    cmds = commands(run_script("mambar_large.sh", "-n").stdout)
    pt, mid, ft = (main_args(c, parser)[1] for c in cmds[:3])
    assert pt.opt_betas == [0.9, 0.95] and pt.warmup_epochs == 20
    assert mid.opt_betas is None and mid.warmup_epochs == 5 and ft.warmup_epochs == 5


@pytest.mark.parametrize("nodes,gpus,cap,expected", [
    (1, 8, None, [(128, 1), (128, 1), (64, 1)]),
    (1, 1, None, [(128, 8), (128, 8), (64, 8)]),
    (2, 8, None, [(64, 1), (64, 1), (32, 1)]),
    (1, 8, 32, [(32, 4), (32, 4), (32, 2)]),
    (1, 3, None, [(128, 1), (128, 1), (64, 1)]),   # 3 does not divide 1024: recipe batch/GPU
])
def test_global_batch_is_kept(nodes, gpus, cap, expected, parser):
    env = dict(NNODES=nodes, GPUS_PER_NODE=gpus)
    if cap:
        env["MAX_GPU_BATCH"] = cap
    out = run_script("mambar_base.sh", "--dry-run", **env).stdout
    got = [(a.batch_size, a.accum_iter) for a in
           (main_args(c, parser)[1] for c in commands(out)[:3])]
    assert got == expected
    if gpus == 3:
        assert "not the recipe's 1024" in out


def test_arguments_override_environment(parser):
    out = run_script("mambar_small.sh", "--dry-run", "--data-path", "/d", "--output-root",
                     "/o", "--gpus-per-node", "4", "--nnodes", "2", "--node-rank", "0",
                     "--master-addr", "n0", "--master-port", "1234", "--",
                     "--num_workers", "16", DATA_PATH="/env").stdout
    cmds = commands(out)
    launcher, args = main_args(cmds[0], parser)
    assert launcher_opts(launcher) == {"nnodes": "2", "nproc_per_node": "4", "node_rank": "0",
                                       "master_addr": "n0", "master_port": "1234"}
    assert (args.data_path, args.num_workers) == ("/d", 16)
    assert args.output_dir == "/o/mambar_small_patch16_224/pt"
    assert main_args(cmds[3], parser)[1].num_workers == 16   # extra flags reach the eval too


def test_slurm_variables_and_other_nodes(parser):
    out = run_script("mambar_base.sh", "--dry-run", GPUS_PER_NODE="", SLURM_NNODES=2,
                     SLURM_NODEID=1, SLURM_GPUS_ON_NODE=4, SLURM_JOB_ID=123456,
                     SLURM_JOB_NODELIST="gpu[07-08]", PATH="/usr/bin:/bin").stdout
    cmds = commands(out)
    assert len(cmds) == 3 and "node rank 0 only" in out      # no eval on node 1
    launcher, args = main_args(cmds[0], parser)
    assert launcher_opts(launcher) == {"nnodes": "2", "nproc_per_node": "4", "node_rank": "1",
                                       "master_addr": "gpu07",
                                       "master_port": str(20000 + 123456 % 20000)}
    assert (args.batch_size, args.accum_iter) == (128, 1)     # 2 x 4 GPUs x 128 = 1024


def test_rendezvous_endpoint(parser):
    out = run_script("mambar_base.sh", "-n", NNODES=2, RDZV_ENDPOINT="head:29400",
                     RDZV_ID="job7").stdout
    opts = launcher_opts(main_args(commands(out)[0], parser)[0])
    assert opts == {"nnodes": "2", "nproc_per_node": "8", "rdzv_backend": "c10d",
                    "rdzv_endpoint": "head:29400", "rdzv_id": "job7"}


def test_completed_stage_skipped_and_interrupted_stage_resumed(tmp_path, parser):
    base = tmp_path / "mambar_base_patch16_224"
    (base / "pt").mkdir(parents=True)
    (base / "pt" / "checkpoint.pth").write_bytes(b"fake")
    (base / "pt" / "stage.done").write_text("finished\n")
    (base / "mid").mkdir()
    (base / "mid" / "checkpoint.pth").write_bytes(b"fake")     # interrupted: no marker
    out = run_script("mambar_base.sh", "--dry-run", OUTPUT_ROOT=tmp_path).stdout
    assert re.search(r"stage 1/3 pt: .*: done \(.*stage\.done\), skipped", out)
    assert re.search(r"stage 2/3 mid: .*resuming from .*mid/checkpoint\.pth", out)
    cmds = commands(out)
    assert len(cmds) == 3     # mid, ft, eval
    mid = main_args(cmds[0], parser)[1]
    assert mid.output_dir.endswith("/mid") and mid.finetune.endswith("/pt/checkpoint.pth")
    assert main_args(cmds[1], parser)[1].output_dir.endswith("/ft")
    # A marker without its checkpoint does not count as done.
    (base / "pt" / "checkpoint.pth").unlink()
    out = run_script("mambar_base.sh", "--dry-run", OUTPUT_ROOT=tmp_path).stdout
    assert "), skipped" not in out and len(commands(out)) == 4


STUB = """#!/usr/bin/env bash
# Records its command line and the parent run's variable; as a launcher of main.py, leaves a
# checkpoint in --output_dir.
echo "$(basename "$0") $* parent=${{MAMBAR_MLFLOW_PARENT:-}}" >> "{log}"
prev=""
for a in "$@"; do
    if [[ "$prev" == --output_dir ]]; then mkdir -p "$a"; echo x > "$a/checkpoint.pth"; fi
    if [[ "$prev" == --output_dir && -n "${{FAIL_IN:-}}" && "$a" == *"$FAIL_IN" ]]; then exit "${{FAIL_CODE:-3}}"; fi
    prev=$a
done
"""


def stubs(tmp_path):
    log = tmp_path / "calls.log"
    for name in ("torchrun", "python"):
        path = tmp_path / name
        path.write_text(STUB.format(log=log))
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return dict(TORCHRUN=tmp_path / "torchrun", PYTHON=tmp_path / "python",
                OUTPUT_ROOT=tmp_path / "out"), log


def steps(log):
    """What the stub launchers were asked to run: the parent run's opening and end, each stage
    (with the parent run's variable it saw) and the eval."""
    out = []
    for call in log.read_text().splitlines():
        args = call.split()
        if args[1].endswith("tracking.py"):
            out.append(" ".join([args[2]] + [a for a in args[3:] if a.isupper()]))
        else:
            out.append(f"{args[args.index('--run-name') + 1]} {args[-1]}")
    return out


def test_real_run_chains_marks_and_skips(tmp_path):
    env, log = stubs(tmp_path)
    run_script("mambar_tiny.sh", **env)
    base = tmp_path / "out" / "mambar_tiny_patch16_224"
    parent = f"parent={base}/mlflow_parent"
    assert steps(log) == ["parent"] + [f"{s} {parent}" for s in ("pt", "mid", "ft", "eval")] \
        + ["end FINISHED"]
    calls = log.read_text().splitlines()
    assert [c.split()[0] for c in calls] == ["python"] + ["torchrun"] * 3 + ["python"] * 2
    assert calls[0].split()[1:6] == [f"{REPO}/tracking.py", "parent", "--marker",
                                     f"{base}/mlflow_parent", "--name"]
    assert all((base / s / "stage.done").is_file() for s in ("pt", "mid", "ft"))
    log.unlink()
    run_script("mambar_tiny.sh", **env)          # everything done: only the eval runs again
    assert steps(log) == ["parent", f"eval {parent}", "end FINISHED"]
    log.unlink()
    run_script("mambar_tiny.sh", "--", "--no-mlflow", **env)
    assert steps(log) == ["eval parent="]


def test_failed_stage_stops_the_chain(tmp_path):
    env, log = stubs(tmp_path)
    proc = run_script("mambar_small.sh", check=False, FAIL_IN="/mid", **env)
    assert proc.returncode == 3
    base = tmp_path / "out" / "mambar_small_patch16_224"
    assert (base / "pt" / "stage.done").is_file()
    assert (base / "mid" / "checkpoint.pth").is_file()
    assert not (base / "mid" / "stage.done").exists()
    assert not (base / "ft").exists()
    assert [s.split()[0] for s in steps(log)] == ["parent", "pt", "mid", "end"]
    assert steps(log)[-1] == "end FAILED"
    # The rerun reopens the parent, skips pt and relaunches mid (main.py resumes it from its
    # checkpoint).
    log.unlink()
    run_script("mambar_small.sh", **env)
    assert [s.split()[0] for s in steps(log)] == ["parent", "mid", "ft", "eval", "end"]
    calls = log.read_text().splitlines()
    assert "/mid" in calls[1] and "--finetune" in calls[1]
    # Stopped by a signal (exit code 128 + SIGTERM): the parent run ends KILLED.
    log.unlink()
    os.remove(base / "ft" / "stage.done")
    proc = run_script("mambar_small.sh", check=False, FAIL_IN="/ft", FAIL_CODE=143, **env)
    assert proc.returncode == 143 and steps(log)[-1] == "end KILLED"


def test_missing_data_path_and_bad_option():
    proc = run_script("mambar_base.sh", check=False, DATA_PATH="")
    assert proc.returncode == 2 and "DATA_PATH" in proc.stderr
    proc = run_script("mambar_base.sh", "--bogus", check=False)
    assert proc.returncode == 2 and "unknown option --bogus" in proc.stderr
    assert "Usage" in run_script("mambar_base.sh", "--help").stdout


def test_eval_released_dry_run(tmp_path, parser):
    ckpt = tmp_path / "mambar_base_patch16_224.pth"
    out = run_script("eval_released.sh", "base", str(ckpt), "--dry-run", "--",
                     "--num_workers", "4").stdout
    (cmd,) = commands(out)
    args = main_args(cmd, parser)[1]
    assert (args.model, args.resume, args.eval, args.eval_crop_ratio) == (
        "mambar_base_patch16_224", str(ckpt), True, 1.0)
    assert (args.input_size, args.data_path, args.num_workers) == (224, "/data/imagenet", 4)
    proc = run_script("eval_released.sh", "tiny", check=False)
    assert proc.returncode == 2 and "no released checkpoint" in proc.stderr


def test_eval_released_default_is_the_cached_released_file(tmp_path, parser):
    out = run_script("eval_released.sh", "large", "-n", TORCH_HOME=tmp_path,
                     PYTHON=sys.executable).stdout
    args = main_args(commands(out)[0], parser)[1]
    assert args.resume == str(tmp_path / "hub" / "checkpoints" / "mambar_large_patch16_224.pth")


def test_released_weight_urls():
    sys.path.insert(0, str(REPO))
    import timm
    import models_mambar  # noqa: F401
    for size in ("small", "base", "large"):
        name = f"mambar_{size}_patch16_224"
        assert timm.models.get_pretrained_cfg(name).url == f"{HF}/{name}.pth"
    assert not timm.models.get_pretrained_cfg("mambar_tiny_patch16_224").url


def test_pretrained_from_local_file_through_timm(tmp_path):
    """The offline path of the README: pretrained=True with a file overlay, released format."""
    sys.path.insert(0, str(REPO))
    import timm
    import torch
    import models_mambar  # noqa: F401
    torch.manual_seed(0)
    source = timm.create_model("mambar_tiny_patch16_224")
    path = tmp_path / "mambar_tiny_patch16_224.pth"
    torch.save({"model": source.state_dict()}, path)
    model = timm.create_model("mambar_tiny_patch16_224", pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path)))
    for k, v in source.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    # Another class count: the head is re-initialised, everything else loaded.
    model10 = timm.create_model("mambar_tiny_patch16_224", pretrained=True, num_classes=10,
                                pretrained_cfg_overlay=dict(file=str(path)))
    assert model10.head.out_features == 10
    assert torch.equal(model10.state_dict()["cls_token"], source.state_dict()["cls_token"])


def test_readme_quick_start():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    assert len(blocks) == 1
    lines = [ln for ln in blocks[0].splitlines() if ln.strip() and not ln.startswith("#")]
    assert len(lines) == 3
    assert lines[0].split("#")[0].strip() == (
        "python3 -m venv .venv && .venv/bin/pip install -r requirements.txt")
    assert "scripts/demo.sh" in lines[1]
    ci = (REPO / ".ci" / "run").read_text()
    test_cmd = lines[2].split("#")[0].strip()
    assert test_cmd == ".venv/bin/python -m pytest -q" and test_cmd in ci
    for script in re.findall(r"scripts/[\w.]+\.sh", readme):
        assert (REPO / script).is_file(), script
