"""The two parts of scripts/gpu_checks.sh written in Python, kept here so the CPU tests can run
them: the generated image folder its launcher runs train on, and the figures its summary
reads out of the benchmark JSON files.

    python scripts/gpu_checks_report.py images ROOT CLASSES TRAIN VAL
    python scripts/gpu_checks_report.py summary LOGS
"""
import argparse
import glob
import json
import os
import sys
from typing import List, Optional, Sequence

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
            lines.append(f"  issue {t['issue']}: {t['name']}: {t['value']} (target "
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    images = commands.add_parser("images", help="write the generated image folder")
    images.add_argument("root")
    for name in ("classes", "train", "val"):
        images.add_argument(name, type=int)
    summary = commands.add_parser("summary", help="print the figures of the benchmark JSONs")
    summary.add_argument("logs")
    args = parser.parse_args(argv)
    if args.command == "images":
        if min(args.classes, args.train, args.val) < 1:
            parser.error("classes, train and val must be at least 1")
        make_image_folder(args.root, args.classes, args.train, args.val)
    else:
        print("\n".join(summarise(args.logs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
