#!/usr/bin/env bash
# The Mamba® three-stage schedule in miniature, on a CPU, with no download: Mamba®-Tiny on
# scikit-learn's handwritten digits (1437 train / 360 val images, 10 classes; main.py's
# embedded DIGITS data set, used when no --data-path is given).
#
#   bash scripts/demo.sh          # about 3 minutes on 2 cores (BENCHMARKS.md); prints the
#                                 # final top-1
#
#   stage  paper (ImageNet)                      here (digits)
#   1      128 px, 300 ep, from scratch          32 px (2x2 patches + 12 registers), 2 epochs
#   2      224 px, 100 ep, --finetune stage 1    64 px (4x4 patches), 1 epoch, --finetune stage 1
#   3      224 px, 20 ep, --finetune stage 2,    64 px, 1 epoch, --finetune stage 2,
#          lr 1e-5, smoothing 0.1                lr 2e-5, smoothing 0.1
#   eval   --eval --resume ft/checkpoint.pth     the same, on the 360 validation images
#
# Each stage restarts its learning-rate schedule, as the paper's stages do: at a new resolution
# every patch covers a different pixel block and the registers sit elsewhere, so a stage needs
# a fresh schedule to adapt (stage 1 reaches 71% at 32 px, stage 2 92% at 64 px, stage 3 96%).
# Training runs as 2 processes x 1 thread (torchrun, gloo), 16 images each: for a model this
# small, two processes beat one with two threads (back to back, a quarter less time per step). Changed for 8x8-pixel digits and minutes of CPU: the learning
# rates are used as given (--unscale-lr: 3e-4, 1e-4, 2e-5; global batch 32) with no warmup; no
# horizontal flip (--hflip 0: a mirrored digit is another glyph; with flips the same stages
# took 9 epochs to 94.2%), colour jitter, mixup, cutmix, EMA, drop path or repeated
# augmentation; stage 1 without RandAugment (timm's random-resized crop, scale 0.08-1); stages
# 2-3 with ThreeAugment's simple-random-crop variant (--src) instead of a random-resized crop,
# which would cut most of the digit away. About a fifth of the time is the launches
# (imports, data, MLflow). Longer schedules and other learning rates tried on the way:
# BENCHMARKS.md, "Tried and not kept".
# 48 px is skipped on purpose: 3x3 patches put all 12 registers before the patches
# (L = floor(9 / 13) = 0); in our runs it lost accuracy.
#
# Output: output/demo/{pt,mid,ft} (checkpoints, log.txt); in output/demo/mlflow.db a parent
# MLflow run "demo" with the child runs pt, mid, ft and eval (README, "Logs and MLflow").
# Every run starts over, with a new parent run. Variables: PYTHON (default: .venv/bin/python when
# present), DEMO_OUTPUT, DEMO_NPROC (training processes, default 2; the learning rates assume
# 2 x 16 images).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$repo/.venv/bin/python" ]]; then PYTHON="$repo/.venv/bin/python"; else PYTHON=python3; fi
fi
out=${DEMO_OUTPUT:-$repo/output/demo}
rm -rf "$out"/{pt,mid,ft} "$out"/{pt,mid,ft,eval}.log "$out/mlflow_parent"
mkdir -p "$out"
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$out/mlflow.db}
export MLFLOW_EXPERIMENT_NAME=${MLFLOW_EXPERIMENT_NAME:-mambar-demo}
export MAMBAR_MLFLOW_PARENT=$out/mlflow_parent   # read by main.py: the stages' parent run
fail() {  # log, what failed: its last lines, an error, the parent run ended FAILED
    tail -n 20 "$1"
    echo "error: $2 (log: $1)" >&2
    "$PYTHON" "$repo/tracking.py" end --marker "$MAMBAR_MLFLOW_PARENT" --status FAILED
    exit 1
}
# One compute thread per process; threads that wait for work sleep instead of spinning (when
# anything else runs on the machine, spinning threads stall the scan's many small steps).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
nproc=${DEMO_NPROC:-2}

common=(--model mambar_tiny_patch16_224 --data-set DIGITS --batch-size 16 --unscale-lr
        --warmup-epochs 0 --min-lr 1e-6 --color-jitter 0 --mixup 0 --cutmix 0 --reprob 0
        --hflip 0 --no-repeated-aug --no-model-ema --drop-path 0 --eval-crop-ratio 1.0 --dist-eval
        --num_workers 1 --print-freq 50)

stage() {  # name, then main.py flags
    local name=$1 t0=$SECONDS
    shift
    echo "== stage $name: torchrun --nproc_per_node $nproc main.py $*"
    "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$nproc" \
        "$repo/main.py" "${common[@]}" --output_dir "$out/$name" --run-name "$name" "$@" \
        > "$out/$name.log" 2>&1 || fail "$out/$name.log" "stage $name failed"
    echo "   $(grep -E '^Training time' "$out/$name.log" | tail -n 1 | sed 's/^Training time [^;]*; //'), $((SECONDS - t0)) s"
}

start=$SECONDS
"$PYTHON" "$repo/tracking.py" parent --marker "$MAMBAR_MLFLOW_PARENT" --name demo \
    --tag model=mambar_tiny_patch16_224 --tag world_size="$nproc" >/dev/null
stage pt  --input-size 32 --epochs 2 --lr 3e-4 --weight-decay 0.05 --smoothing 0.0 --aa none
stage mid --input-size 64 --epochs 1 --lr 1e-4 --weight-decay 0.05 --smoothing 0.0 \
          --ThreeAugment --src --finetune "$out/pt/checkpoint.pth"
stage ft  --input-size 64 --epochs 1 --lr 2e-5 --weight-decay 0.1 --smoothing 0.1 \
          --ThreeAugment --src --finetune "$out/mid/checkpoint.pth"

echo "== eval: python main.py --eval --resume $out/ft/checkpoint.pth"
"$PYTHON" "$repo/main.py" --model mambar_tiny_patch16_224 --data-set DIGITS --input-size 64 \
    --eval --eval-crop-ratio 1.0 --batch-size 64 --num_workers 1 --run-name eval \
    --resume "$out/ft/checkpoint.pth" > "$out/eval.log" 2>&1 || fail "$out/eval.log" "eval failed"
top1=$(sed -n 's/^Accuracy of the network on the .* test images: \([0-9.]*\)%.*/\1/p' "$out/eval.log" | tail -n 1)
[[ -n "$top1" ]] || fail "$out/eval.log" "no accuracy in $out/eval.log"
"$PYTHON" "$repo/tracking.py" end --marker "$MAMBAR_MLFLOW_PARENT" --status FINISHED
elapsed=$((SECONDS - start))
printf 'Final top-1 on the 360 digits validation images: %s%%\n' "$top1"
printf 'Total wall time: %d min %02d s (%d s)\n' $((elapsed / 60)) $((elapsed % 60)) "$elapsed"
