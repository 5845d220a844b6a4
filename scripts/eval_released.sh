#!/usr/bin/env bash
# Evaluate a released Mamba® checkpoint on the ImageNet-1k validation set, as the authors do
# (one process, --eval-crop-ratio 1.0: resize to 224 bicubic, center crop 224).
#
#   bash scripts/eval_released.sh SIZE [CHECKPOINT] [--dry-run] [-- extra main.py flags]
#
#   SIZE        small | base | large (or the full name, e.g. mambar_base_patch16_224).
#               Tiny has no released checkpoint.
#   CHECKPOINT  a local {"model": state_dict} file, e.g. mambar_base_patch16_224.pth, or a URL.
#               Default: the model's released checkpoint (the URL in its timm pretrained config,
#               models_mambar.default_cfgs), taken from the torch hub cache
#               ($TORCH_HOME/hub/checkpoints, as timm.create_model(..., pretrained=True) uses)
#               and downloaded there first if it is not cached.
#   DATA_PATH   (environment) the ImageNet root; only DATA_PATH/val/<class>/<image> is read.
#
# Expected top-1 (released checkpoints, 224 px): Small 81.4, Base 83.0, Large 83.6.
# Example:
#   DATA_PATH=/data/imagenet bash scripts/eval_released.sh base ~/Downloads/mambar_base_patch16_224.pth
set -euo pipefail

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python}
dry_run=${DRY_RUN:-0}
size="" checkpoint=""
extra=()
while (($#)); do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        -n|--dry-run) dry_run=1 ;;
        --) shift; extra=("$@"); break ;;
        -*) usage >&2; echo "error: unknown option $1 (main.py flags go after --)" >&2; exit 2 ;;
        *) if [[ -z "$size" ]]; then size=$1
           elif [[ -z "$checkpoint" ]]; then checkpoint=$1
           else echo "error: unexpected argument $1" >&2; exit 2; fi ;;
    esac
    shift
done

case "$size" in
    small|base|large) model="mambar_${size}_patch16_224" ;;
    mambar_small_patch16_224|mambar_base_patch16_224|mambar_large_patch16_224) model=$size ;;
    tiny|mambar_tiny_patch16_224)
        echo "error: Mamba®-Tiny has no released checkpoint (train one: scripts/mambar_tiny.sh)" >&2
        exit 2 ;;
    "") usage >&2; exit 2 ;;
    *) echo "error: unknown size '$size' (small, base or large)" >&2; exit 2 ;;
esac

data_path=${DATA_PATH:-}
if [[ -z "$data_path" ]]; then
    [[ "$dry_run" == 1 ]] || { echo "error: set DATA_PATH to the ImageNet root (with val/)" >&2; exit 2; }
    data_path=/PATH/TO/IMAGENET
fi

# Default checkpoint, or a URL: the file timm's pretrained loading would use, in the same cache.
if [[ -z "$checkpoint" || "$checkpoint" == http://* || "$checkpoint" == https://* ]]; then
    checkpoint=$( (PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" "$python" - "$model" "$checkpoint" "$dry_run" <<'EOF'
import os
import sys

import timm
import torch

import models_mambar  # noqa: F401  (registers the models and their pretrained configs)

model, url, dry_run = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
if not url:
    cfg = timm.models.get_pretrained_cfg(model)
    url = getattr(cfg, "url", None) or ""
    if not url and getattr(cfg, "hf_hub_id", None) and getattr(cfg, "hf_hub_filename", None):
        url = f"https://huggingface.co/{cfg.hf_hub_id}/resolve/main/{cfg.hf_hub_filename}"
    if not url:
        sys.exit(f"error: {model} has no released-checkpoint URL in its pretrained config; "
                 f"pass the checkpoint file as the second argument")
path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
if not os.path.isfile(path) and not dry_run:
    print(f"downloading {url} -> {path}", file=sys.stderr)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, path)
    except Exception as err:
        sys.exit(f"error: cannot download {url} ({err}); download it by hand and pass the "
                 f"file as the second argument")
print(path)
EOF
    ) | tail -n 1)
fi

cmd=("$python" "$repo/main.py" --model "$model" --eval --eval-crop-ratio 1.0 --batch-size 128
     --input-size 224 --data-path "$data_path" --resume "$checkpoint" ${extra[@]+"${extra[@]}"})
out=""
for arg in "${cmd[@]}"; do out+="$(printf '%q' "$arg") "; done
echo "${out% }"
[[ "$dry_run" == 1 ]] || exec "${cmd[@]}"
