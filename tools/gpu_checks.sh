#!/usr/bin/env bash
# One run on a lent GPU (one H100/H200, about 9 minutes of wall time): the GPU tests, the scan
# alone against mamba-ssm's kernel and a speed-of-light probe (scan_bench.py), the benchmark
# matrix (Mamba® T/S/B with the Triton scan against DeiT of the same size, the resolution sweep
# for B, peak memory, the scan's share of a training step), the authors' CUDA kernels built on
# the machine and compared with our backends, short bf16 trainings of Tiny launched as the
# seed's commands launch main.py, the Base size script's three stages and --eval through
# that launcher on a generated image folder, once per backend, and Base's training step eager
# against torch.compile.
#
#   bash tools/gpu_checks.sh                      # results under $OUT (default ./gpu_results)
#   GPU_CHECKS_SMOKE=1 bash tools/gpu_checks.sh   # the same flow on CPU with tiny sizes
#
# The CUDA kernels: put the source distributions of causal-conv1d and mamba-ssm in .cuda_src/
# (scripts/build_cuda_kernels.py says how to fetch them); they are built in the background while
# the Triton steps run, with every core but a few, and the wheels come back under $OUT
# (cuda_wheels.tar, split into parts when large: `cat cuda_wheels.tar.part* | tar x` into
# .cuda_wheels/). Wheels carried in .cuda_wheels/ are installed instead of building.
#
# Every step runs under `timeout` and a global budget (GPU_CHECKS_BUDGET_S, default 540 s):
# steps run in order of importance and each gets min(its cap, what is left), so a hang or a
# slow step costs the later ones, never the whole allowance. Nothing stops on a failure;
# summary.txt lists each step's exit code and time, then the figures that matter.
# $OUT ends with at most 8 files (the device tool's limit): summary.txt, results.tar.gz (every
# log, table and JSON file), and the built wheels (cuda_wheels.tar or its parts).
set -u
cd "$(dirname "$0")/.."

OUT=${OUT:-./gpu_results}
mkdir -p "$OUT"
LOGS=$(mktemp -d)  # everything but summary.txt, bundled into $OUT/results.tar.gz at the end
IMAGES=$(mktemp -d)  # the generated image folder of the launcher runs
WHEELS=$(mktemp -d)  # the CUDA kernels' wheels, carried or built
trap 'rm -rf "$LOGS" "$IMAGES" "$WHEELS"' EXIT
PY=${PYTHON:-$(command -v python || command -v python3)}
BUDGET=${GPU_CHECKS_BUDGET_S:-540}
SMOKE=${GPU_CHECKS_SMOKE:-0}
ONLY=${GPU_CHECKS_ONLY:-}  # step names to run (e.g. "tests_cuda stages_cuda"); empty: all
SUMMARY=$OUT/summary.txt
TESTS_LOG=$LOGS/gpu_tests.log
BENCH_TXT=$LOGS/bench.txt
TRAIN_LOG=$LOGS/train_tiny.log
STAGES_LOG=$LOGS/stages.log
BUILD_LOG=$LOGS/build.log
export PYTHONUNBUFFERED=1
# Keep Triton's autotuning results on disk, so the later benchmark processes reuse them
# instead of re-tuning the same shapes (ignored by Triton releases without the knob).
export TRITON_CACHE_AUTOTUNING=1
# ... and log each tuning (its duration and the chosen config) into the logs.
export TRITON_PRINT_AUTOTUNING=1
: > "$SUMMARY"; : > "$TESTS_LOG"; : > "$BENCH_TXT"; : > "$TRAIN_LOG"; : > "$BUILD_LOG"
: > "$STAGES_LOG"


if [ "$SMOKE" = 1 ]; then
    # The flow on CPU: tiny sizes, fp32, one step each, the torch / reference backends.
    DEVICE=cpu; DTYPE=fp32; FAST=torch; PX=32; SWEEP="32 64"; SWEEP_BATCH="64=1"
    BATCH=2; MODELS="mambar_tiny_patch16_224"; BASE=mambar_tiny_patch16_224
    ITERS="--warmup 0 --iters 1"; SWEEP_ITERS=$ITERS; BACKENDS_BATCH=1
    SMALL_TESTS=(-k "not TestGPU and softplus")
    TRAIN_ARGS=(--device cpu --amp fp32 --input-size 32 --batch-size 16)
    CAP_MODEL_TESTS=60; CAP_SCAN=30; CAP_BENCH=240; CAP_SWEEP=120; CAP_SMALL_TESTS=60
    CAP_TRAIN=60; CAP_CUDA_TESTS=60; CAP_BACKENDS=60; CAP_CUDA_MIN=60; BUILD_JOBS=1
    CAP_COMPILE=420
    STAGES_SCRIPT=mambar_tiny.sh; STAGES_BATCH=8; STAGES_IMAGES="2 16 4"; CAP_STAGES=150
    STAGES_ARGS=(--device cpu --amp fp32 --input-size 32)
else
    DEVICE=cuda; DTYPE=bf16; FAST=triton; PX=224; SWEEP="224 384 512 768 1024"
    # Batch per size for the sweep: activations grow with the tokens (208 at 224 px, 4108 at
    # 1024 px), and equal batches keep Mamba® and DeiT comparable at each size.
    SWEEP_BATCH="384=64,512=32,768=16,1024=8"
    BATCH=128; BASE=mambar_base_patch16_224; BACKENDS_BATCH=128
    MODELS="mambar_base_patch16_224 mambar_small_patch16_224 mambar_tiny_patch16_224"
    ITERS="--warmup 3 --iters 10"; SWEEP_ITERS="--warmup 2 --iters 5"
    # One progress line per step, so the two backends' losses compare step by step.
    SMALL_TESTS=(-k "not TestGPU")
    TRAIN_ARGS=(--amp bf16 --input-size 64 --batch-size 128 --print-freq 1)
    # The scan alone: plain Triton and Gluon (each autotuned at 3 shapes), then the probe.
    CAP_SCAN_TRITON=90
    CAP_MODEL_TESTS=100; CAP_SCAN=50; CAP_BENCH=140; CAP_SWEEP=110; CAP_SMALL_TESTS=90
    CAP_TRAIN=40; CAP_CUDA_TESTS=75; CAP_BACKENDS=60; CAP_COMPILE=200
    # The least the cuda steps need once the build is done (tests, scan alone, Base step).
    CAP_CUDA_MIN=150
    # The seed's published recipe (Base), one epoch per stage: 16 classes x 128 training
    # images at 32 per micro-batch are 64 micro-batches a stage, 2 optimizer steps of the
    # recipe's global batch in stages 1-2 (1024) and 4 in stage 3 (512).
    STAGES_SCRIPT=mambar_base.sh; STAGES_BATCH=32; STAGES_IMAGES="16 128 16"; CAP_STAGES=120
    STAGES_ARGS=()
    # The build runs niced beside the steps above and gets all but two cores: mamba-ssm's
    # eleven translation units then compile in one wave.
    BUILD_JOBS=$(( $(nproc) > 4 ? $(nproc) - 2 : 2 ))
fi

# step NAME CAP LOG CMD...: run CMD under min(CAP, budget left), append its output to LOG and
# a line with its exit code and duration to the summary (124: killed by the timeout).
step() {
    local name=$1 cap=$2 log=$3; shift 3
    if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then
        return
    fi
    local left=$((BUDGET - SECONDS))
    local limit=$((cap < left ? cap : left))
    if [ "$limit" -lt 20 ]; then
        printf '%-18s SKIPPED (budget: %ss left)\n' "$name" "$left" >> "$SUMMARY"
        return
    fi
    local start=$SECONDS
    printf '\n### %s (limit %ss): %s\n' "$name" "$limit" "$*" >> "$log"
    timeout -k 10 "$limit" "$@" >> "$log" 2>&1
    local rc=$?
    printf '%-18s rc=%-3s %4ss (limit %ss)\n' "$name" "$rc" "$((SECONDS - start))" "$limit" \
        >> "$SUMMARY"
}

bench() {  # bench NAME CAP JSON ARGS...: benchmark.py on $DEVICE, tables into bench.txt
    local name=$1 cap=$2 json=$3; shift 3
    step "$name" "$cap" "$BENCH_TXT" "$PY" benchmark.py --device "$DEVICE" --json "$json" "$@"
}

# Test inputs are laid out unlike the model's (same autotuning key): the tests' tuning stays
# out of the disk cache that the benchmarks read. Without pyproject's marker filter (the
# kernel tests are what a GPU is for); a -m in the arguments replaces it.
tests() {  # tests NAME CAP PYTEST-ARGS...
    local name=$1 cap=$2; shift 2
    step "$name" "$cap" "$TESTS_LOG" env TRITON_CACHE_AUTOTUNING=0 \
        "$PY" -m pytest -q -p no:cacheprovider -m "" "$@"
}

# train NAME BACKEND: one short bf16 epoch of Tiny launched as the seed's commands launch
# main.py (one process, NCCL on a GPU); its output directory stays out of $OUT.
train() {
    local name=$1 backend=$2 run_dir
    run_dir=$(mktemp -d)
    step "$name" "$CAP_TRAIN" "$TRAIN_LOG" env MAMBAR_SCAN_BACKEND="$backend" \
        "$PY" -m torch.distributed.launch --nproc_per_node=1 --use_env main.py \
        --model mambar_tiny_patch16_224 --data-set DIGITS --epochs 1 --no-mlflow --seed 0 \
        --num_workers 4 --output_dir "$run_dir" "${TRAIN_ARGS[@]}"
    rm -rf "$run_dir"
}

# stages NAME BACKEND: the three stages of a size script and its final --eval, launched as
# the seed launches main.py (python -m torch.distributed.launch --use_env, one process), each
# stage one epoch over a generated image folder, one progress line per step.
stages() {
    local name=$1 backend=$2 run_dir
    run_dir=$(mktemp -d)
    printf '#!/bin/sh\nexec "%s" -m torch.distributed.launch --use_env "$@"\n' "$PY" \
        > "$run_dir/launch"
    chmod +x "$run_dir/launch"
    step "$name" "$CAP_STAGES" "$STAGES_LOG" env MAMBAR_SCAN_BACKEND="$backend" \
        TORCHRUN="$run_dir/launch" PYTHON="$PY" bash "scripts/$STAGES_SCRIPT" \
        --data-path "$IMAGES" --output-root "$run_dir" --gpus-per-node 1 \
        --max-gpu-batch "$STAGES_BATCH" -- --epochs 1 --num_workers 4 --no-mlflow \
        --print-freq 1 ${STAGES_ARGS[@]+"${STAGES_ARGS[@]}"}
    rm -rf "$run_dir"
}
# shellcheck disable=SC2086  # classes, training and validation images per class
"$PY" tools/gpu_checks_report.py images "$IMAGES" $STAGES_IMAGES

{
    echo "gpu_checks.sh $(date -Is) on ${HOSTNAME:-?}, smoke=$SMOKE, budget ${BUDGET}s"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || cat SNAPSHOT 2>/dev/null)" \
        "$(git status --porcelain 2>/dev/null | wc -l) changed files"
    if command -v nvidia-smi > /dev/null; then
        timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv
        timeout 20 nvidia-smi
    fi
    timeout 60 "$PY" - <<'EOF'
import importlib.metadata as md, platform, torch
def v(p):
    try:
        return md.version(p)
    except md.PackageNotFoundError:
        return "-"
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}),",
      ", ".join(f"{p} {v(p)}" for p in ("triton", "timm", "einops", "pytest", "mamba-ssm",
                                        "causal-conv1d", "mambapy")))
print("cuda device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
EOF
    command -v nvcc > /dev/null && nvcc --version | tail -2
    echo
} >> "$SUMMARY" 2>&1

# (0) In the background: the authors' CUDA kernels (wheels carried in .cuda_wheels/ are reused;
# otherwise built from .cuda_src/), and the static instruction counts of the Triton kernels as
# this machine's Triton compiles them (CPU only, for the issue efficiency of the timings).
BUILD_PID=
if [ "$SMOKE" != 1 ] && { ls .cuda_src/*.tar.gz || ls .cuda_wheels/*.whl; } > /dev/null 2>&1; then
    cp .cuda_wheels/*.whl "$WHEELS"/ 2> /dev/null
    # In its own process group, so that stopping it also stops pip, ninja and nvcc.
    setsid bash -c 'start=$SECONDS
        nice -n 5 "$0" scripts/build_cuda_kernels.py --sdists .cuda_src --wheels "$1" \
            --arch "$2" --jobs "$3" --logs "$4"
        echo "build_cuda_kernels exit $? after $((SECONDS - start)) s"' \
        "$PY" "$WHEELS" "${CUDA_ARCH:-9.0}" "$BUILD_JOBS" "$LOGS" >> "$BUILD_LOG" 2>&1 &
    BUILD_PID=$!
else
    echo "no .cuda_src/ or .cuda_wheels/ (or smoke run): the cuda backend is not built" \
        >> "$BUILD_LOG"
fi
# (In a smoke run, or a run of chosen steps, only when named: "kernel_stats".)
if { [ -z "$ONLY" ] && [ "$SMOKE" != 1 ]; } || [[ " $ONLY " == *" kernel_stats "* ]]; then
    ( nice -n 5 timeout 240 "$PY" tools/kernel_stats.py --reverse both --jobs 2 \
          > "$LOGS/kernel_stats.txt" 2>&1 ) &
fi

# Steps in order of importance, since a slow one eats into the budget of those after it.
# (a) The Triton scan at the model's sizes (TestGPU: every autotuning candidate of both
# kernels, Base-sized shapes), then the scan alone at the training shapes.
tests tests_triton_gpu "$CAP_MODEL_TESTS" "tests/test_selective_scan_triton.py::TestGPU"
# (a2) The Gluon scan (the triton backend's kernels on sm_90+ GPUs once these pass;
# until then opt-in with MAMBAR_TRITON_GLUON=1) against the oracle (every gradient, fp32/bf16,
# both directions, chunk edges, every autotuning candidate). On the CPU these tests run the
# kernels under the interpreter, which cannot show a race between threads: this step can. The
# whole model on it: MAMBAR_TRITON_GLUON=1 GPU_CHECKS_ONLY="bench_224" bash tools/gpu_checks.sh
tests tests_gluon_gpu 180 tests/test_selective_scan_gluon.py
# (a3) The fused conv1d + SiLU and add + RMSNorm kernels, compiled, and the whole GPU path (the
# mixer's op on them and the scans) against the reference backend.
tests tests_kernels_gpu 120 tests/test_triton_conv.py tests/test_fused_norm.py \
    "tests/test_models.py::test_the_gpu_path_matches_the_reference"
if [ "$DEVICE" = cuda ]; then
    step scan_triton "$CAP_SCAN_TRITON" "$BENCH_TXT" "$PY" tools/scan_bench.py \
        --backend triton gluon probe --json "$LOGS/scan_triton.json"
fi

# (b) T/S/B at 224 px, inference and training step, with DeiT of each size and the scan's
# share of the training step; then a short training launched as the seed's commands do.
# shellcheck disable=SC2086  # ITERS / MODELS are word lists on purpose
bench bench_224 "$CAP_BENCH" "$LOGS/bench_224.json" --model $MODELS --backend "$FAST" \
    --input-size "$PX" --batch "$BATCH" --dtype "$DTYPE" --mode both --scan-share $ITERS
train train_triton "$FAST"

sweep() {  # the resolution sweep for B (training step)
    # shellcheck disable=SC2086
    bench bench_sweep "$CAP_SWEEP" "$LOGS/bench_sweep.json" --model "$BASE" --backend "$FAST" \
        --input-size $SWEEP --batch "$BATCH" --sweep-batch "$SWEEP_BATCH" --dtype "$DTYPE" \
        --mode train $SWEEP_ITERS
    SWEPT=1
}
SWEPT=0
building() { [ -n "$BUILD_PID" ] && kill -0 "$BUILD_PID" 2> /dev/null; }

# (c) The CUDA kernels: if the build is still going, the sweep runs meanwhile; then wait for
# it while leaving the cuda steps their time, install, and compare with our backends.
if building; then sweep; fi
if [ -n "$BUILD_PID" ]; then
    while building && [ $((BUDGET - SECONDS)) -gt "$CAP_CUDA_MIN" ]; do sleep 2; done
    if building; then
        echo "build_cuda         STOPPED (still running at $SECONDS s)" >> "$SUMMARY"
        kill -- -"$BUILD_PID"
    fi
    wait "$BUILD_PID" 2> /dev/null
    grep -E "^(causal-conv1d|mamba-ssm|build_cuda_kernels)" "$BUILD_LOG" | sed 's/^/build: /' \
        >> "$SUMMARY"
    if ls "$WHEELS"/*.whl > /dev/null 2>&1; then
        "$PY" -m pip install -q --no-deps --no-index --no-compile "$WHEELS"/*.whl \
            >> "$BUILD_LOG" 2>&1
        (cd "$WHEELS" && tar cf "$LOGS/cuda_wheels.tar" ./*.whl)
    fi
fi
"$PY" -c "import selective_scan_cuda, causal_conv1d; print('selective_scan_cuda and causal_conv1d import')" \
    >> "$BUILD_LOG" 2>&1
if "$PY" -c "import selective_scan as s, sys; sys.exit(not (s.cuda_kernels_available() and s.cuda_kernels.load_causal_conv1d()))" \
    2>> "$BUILD_LOG"; then
    tests tests_cuda "$CAP_CUDA_TESTS" -rP -m gpu tests/test_cuda_backend.py \
        tests/test_selective_scan.py
    step scan_cuda "$CAP_SCAN" "$BENCH_TXT" "$PY" tools/scan_bench.py --backend cuda \
        --json "$LOGS/scan_cuda.json"
    # shellcheck disable=SC2086
    bench bench_backends "$CAP_BACKENDS" "$LOGS/bench_backends.json" --model "$BASE" \
        --backend "$FAST" cuda --input-size "$PX" --batch "$BACKENDS_BATCH" --dtype "$DTYPE" \
        --mode both --reference none $ITERS
    train train_cuda cuda
    stages stages_cuda cuda
else
    echo "cuda backend       SKIPPED (mamba-ssm / causal-conv1d not importable; see build.log)" \
        >> "$SUMMARY"
fi

stages stages_triton "$FAST"

# (d) What is left: the sweep if it has not run, eager against torch.compile for Base's training
# step, then the rest of the tests (among them compiled against eager on the GPU).
if [ "$SWEPT" = 0 ]; then sweep; fi
# shellcheck disable=SC2086
bench bench_compile "$CAP_COMPILE" "$LOGS/bench_compile.json" --model "$BASE" \
    --backend "$FAST" --input-size "$PX" --batch "$BATCH" --dtype "$DTYPE" --mode train \
    --reference none --compile both $ITERS
tests tests_triton_small "$CAP_SMALL_TESTS" tests/test_selective_scan_triton.py \
    "${SMALL_TESTS[@]}"
tests tests_gpu_marked 60 -m gpu --continue-on-collection-errors tests/ \
    --ignore=tests/test_selective_scan_triton.py --ignore=tests/test_cuda_backend.py \
    --ignore=tests/test_selective_scan_gluon.py

{
    echo
    echo "total ${SECONDS}s"
    echo
    echo "== tests (last lines of each pytest run)"
    grep -E '^(=+ )?[0-9]+ (passed|failed|skipped|errors?|deselected)|^(FAILED|ERROR) ' \
        "$TESTS_LOG" | head -40
    echo
    echo "== the scan alone (scan_bench.py; ns per state element)"
    grep -E '^(base|base448|tiny) |^autotuner:' "$BENCH_TXT"
    echo
    echo "== benchmark progress (every configuration, in run order)"
    grep -E '^\[[0-9]+/[0-9]+\]' "$BENCH_TXT"
    echo
    echo "== targets and scan shares (from the JSON files; full tables in bench.txt)"
    "$PY" tools/gpu_checks_report.py summary "$LOGS"
    echo
    echo "== Triton autotuning as printed when tuned (the JSON lines above also list choices"
    echo "   read from Triton's disk cache): kernel, key (E, N, L, dtypes), chosen config"
    grep -h -A3 "Triton autotuning for function" "$TESTS_LOG" "$BENCH_TXT" "$TRAIN_LOG" \
        | grep -v "^--$" | paste - - - - | sed -E 's/finished after [0-9.]+s,//' \
        | sort | uniq -c | head -40
    echo
    echo "== main.py (launcher runs): throughput and loss lines"
    grep -E '^### |Averaged stats|Epoch: \[0\] +\[|Acc@1' "$TRAIN_LOG" | cut -c1-160 | tail -40
    grep -E 'Error|error:' "$TRAIN_LOG" | tail -3
    "$PY" tools/gpu_checks_report.py losses "$TRAIN_LOG" train_cuda train_triton
    echo
    echo "== the size script's stages through the seed's launcher (per backend: the stage"
    echo "   headers, each step's loss, the evaluations)"
    grep -E '^### |^# stage|^# eval|Epoch: \[0\] +\[|Acc@1|^error' "$STAGES_LOG" \
        | sed -E 's/  eta: [0-9:]+//; s/  time: .*//' | cut -c1-120 | tail -150
    "$PY" tools/gpu_checks_report.py losses "$STAGES_LOG" stages_cuda stages_triton
    echo
    echo "== build of the CUDA kernels (build.log, last lines)"
    tail -5 "$BUILD_LOG"
} >> "$SUMMARY" 2>&1

# Bundle: summary.txt stays readable beside one archive; the wheels go in 15 MiB parts.
wait
tar czf "$OUT/results.tar.gz" -C "$LOGS" --exclude=cuda_wheels.tar . 2>> "$SUMMARY"
if [ -f "$LOGS/cuda_wheels.tar" ]; then
    if [ "$(stat -c %s "$LOGS/cuda_wheels.tar")" -le $((15 * 2**20)) ]; then
        cp "$LOGS/cuda_wheels.tar" "$OUT/"
    else
        split -b 15M -d -a 2 "$LOGS/cuda_wheels.tar" "$OUT/cuda_wheels.tar.part"
    fi
fi
ls -l "$OUT" >> "$SUMMARY"
cat "$SUMMARY"
