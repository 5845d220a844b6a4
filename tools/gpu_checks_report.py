"""The parts of tools/gpu_checks.sh written in Python, kept here so the CPU tests can run
them: the generated image folder its launcher runs train on, the figures its summary reads
out of the benchmark JSON files, and the comparison of two backends' loss curves.

    python tools/gpu_checks_report.py images ROOT CLASSES TRAIN VAL
    python tools/gpu_checks_report.py summary LOGS
    python tools/gpu_checks_report.py losses LOG RUN RUN
"""
import argparse
import glob
import json
import math
import os
import re
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image


def make_image_folder(root: str, classes: int, train: int, val: int, size: int = 160) -> None:
    """An ImageFolder tree (train/ and val/, one folder per class) of JPEGs: noise around a
    colour of each class, so a short training learns something but not trivially."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        for c in range(classes):
            folder = os.path.join(root, split, f"class_{c:02d}")
            os.makedirs(folder)
            mean = np.array([(37 * c) % 256, (91 * c) % 256, (151 * c) % 256])
            for i in range(count):
                pixels = np.clip(rng.normal(mean, 60, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(os.path.join(folder, f"{i}.jpg"), quality=90)


def summarise(logs: str) -> List[str]:
    """Per benchmark JSON file in ``logs`` (``bench_*.json``, written by benchmark.py): its
    row and error counts, each target with PASS or FAIL, the Triton autotuner's choices, and
    the scan's share of the training step with its heaviest kernels. A file that cannot be
    read says so in one line; the others are still read."""
    lines = []
    for path in sorted(glob.glob(os.path.join(logs, "bench_*.json"))):
        name = os.path.basename(path)
        try:
            with open(path) as f:
                data = json.load(f)
            results, targets = data["results"], data["targets"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            lines.append(f"{name}: unreadable ({type(err).__name__}: {err})")
            continue
        lines.append(f"{name}: {len(results)} rows, "
                     f"{sum('error' in r for r in results)} errors")
        for t in targets:
            lines.append(f"  {t['topic']}: {t['name']}: {t['value']} (target "
                         f"{t['target']}) {'PASS' if t['ok'] else 'FAIL'}")
        for r in results:
            where = f"{r.get('model')} {r.get('img_size')}px b{r.get('batch')}"
            for kernel_key, config in r.get("triton_configs", {}).items():
                lines.append(f"  triton {where}: {kernel_key}: {config}")
            s = r.get("scan_profile")
            if s:
                share = s.get("share")
                lines.append(
                    f"  scan share {r.get('model')} {r.get('backend_resolved')} "
                    f"{r.get('img_size')}px b{r.get('batch')}: "
                    f"{'n/a' if share is None else f'{100 * share:.1f}%'} ({s.get('basis')}; "
                    f"u, delta redone: {s.get('recompute_ms', 0):.2f} ms/step), "
                    f"by kernel name: {s.get('share_by_kernel_name')}")
                for kernel, ms, launches in s.get("top_kernels", []):
                    lines.append(f"    {ms:8.3f} ms/step {launches:6d}x  {kernel}")
    return lines


# A progress line of main.py (engine.py through utils.log_every): its epoch, its step, and the
# loss as printed (the median of the last steps, then the epoch's mean in brackets).
_PROGRESS = re.compile(r"^Epoch: \[(\d+)\]\s+\[\s*(\d+)/\d+\].*?\bloss: (\S+) ")
Step = Tuple[str, int, int]  # (stage header or "", epoch, step)


def loss_curves(log: str) -> Dict[str, Dict[Step, float]]:
    """The losses of each run in a gpu_checks.sh log, by run (the step name of its ``###``
    header) and (stage, epoch, step); stages are the size script's ``# stage`` headers."""
    curves: Dict[str, Dict[Step, float]] = {}
    run, stage = None, ""
    for line in log.splitlines():
        if line.startswith("### "):
            run, stage = line[4:].split(" ")[0], ""
            curves.setdefault(run, {})
        elif line.startswith("# stage "):
            stage = line[2:].split(":")[0]
        elif run is not None:
            match = _PROGRESS.match(line)
            if match:
                epoch, step, loss = match.groups()
                curves[run][(stage, int(epoch), int(step))] = float(loss)
    return curves


def compare_losses(log: str, run_a: str, run_b: str, tolerance: float = 0.05) -> str:
    """One line: do two runs' loss curves agree step for step, each difference within
    ``tolerance`` of the loss (bf16 runs of the same seed and data differ by rounding only)?"""
    curves = loss_curves(log)
    missing = [run for run in (run_a, run_b) if not curves.get(run)]
    if missing:
        return f"loss curves {run_a} vs {run_b}: no loss lines for {', '.join(missing)}"
    a, b = curves[run_a], curves[run_b]
    common = sorted(set(a) & set(b))
    if not common:
        return f"loss curves {run_a} vs {run_b}: no step in common"
    worst = max(common, key=lambda k: _relative(a[k], b[k]))
    rel = _relative(a[worst], b[worst])
    stage, epoch, step = worst
    where = f"{stage + ', ' if stage else ''}epoch {epoch} step {step}"
    return (f"loss curves {run_a} vs {run_b}: {len(common)} steps in common "
            f"({len(a)} and {len(b)} logged), largest difference {100 * rel:.2f}% of the loss "
            f"({a[worst]} against {b[worst]}, {where}): "
            f"{'PASS' if rel <= tolerance else 'FAIL'} (within {100 * tolerance:g}%)")


def _relative(x: float, y: float) -> float:
    if not (math.isfinite(x) and math.isfinite(y)):
        return 0.0 if x == y else math.inf
    return abs(x - y) / max(abs(x), abs(y), 1e-12)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    images = commands.add_parser("images", help="write the generated image folder")
    images.add_argument("root")
    for name in ("classes", "train", "val"):
        images.add_argument(name, type=int)
    summary = commands.add_parser("summary", help="print the figures of the benchmark JSONs")
    summary.add_argument("logs")
    losses = commands.add_parser("losses", help="compare two runs' loss curves in a log")
    losses.add_argument("log")
    losses.add_argument("runs", nargs=2)
    args = parser.parse_args(argv)
    if args.command == "images":
        if min(args.classes, args.train, args.val) < 1:
            parser.error("classes, train and val must be at least 1")
        make_image_folder(args.root, args.classes, args.train, args.val)
    elif args.command == "summary":
        print("\n".join(summarise(args.logs)))
    else:
        with open(args.log) as f:
            print(compare_losses(f.read(), *args.runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
