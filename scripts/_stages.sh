# shellcheck shell=bash
# Shared logic of scripts/mambar_{tiny,small,base,large}.sh: sourced, not run.
#
# A size script sets the recipe, then calls `run_recipe "$@"`:
#   MODEL                         timm name, e.g. mambar_base_patch16_224
#   S1_* / S2_* / S3_*            per stage (pt = 128 px pretrain, mid = 224 px intermediate,
#                                 ft = 224 px finetune):
#     Sn_INPUT   input size       Sn_EPOCHS  epochs
#     Sn_BATCH   per-GPU batch of the recipe (the most one GPU is given; see MAX_GPU_BATCH)
#     Sn_GLOBAL  global batch of the recipe (per optimizer step, all GPUs)
#     Sn_ARGS    (array) every other main.py flag of that stage
#   EVAL_BATCH                    batch of the final --eval
#
# What run_recipe does, in order:
#   stage 1 (pt)  -> stage 2 (mid, --finetune pt/checkpoint.pth)
#                 -> stage 3 (ft, --finetune mid/checkpoint.pth) -> --eval of ft/checkpoint.pth
# under $OUTPUT_ROOT/$MODEL/{pt,mid,ft}.
#
# Completed stages: after a stage's torchrun exits 0, this script writes
# $STAGE_DIR/stage.done. A stage with both stage.done and checkpoint.pth is skipped. Delete
# stage.done (or the stage folder) to run a stage again.
# Interrupted stages: a stage folder with checkpoint.pth but no stage.done is launched with the
# same command; main.py's auto-resume (on by default) continues from that checkpoint (mid-epoch
# if it was stopped by SIGTERM/SIGUSR1) and ignores --finetune. If a stage had in fact finished
# but the marker was not written, the relaunch trains zero epochs and exits 0.
#
# MLflow: the schedule is one parent run (named after the script, its id kept in
# $OUTPUT_ROOT/$MODEL/mlflow_parent so that a rerun reuses it) and each stage and the eval a
# child run (pt/mid/ft/eval). main.py reads the parent's id from that file, named by
# $MAMBAR_MLFLOW_PARENT: node 0 writes it before any stage starts, so rank 0 finds it on any
# node. The parent ends FINISHED after the eval, FAILED (or KILLED, exit code > 128) when a
# stage fails. `-- --no-mlflow` turns tracking off.
#
# Global batch: the script keeps each stage's recipe global batch whatever the number of GPUs,
# by splitting it as  global = GPUs x per-GPU batch x --accum_iter  with the per-GPU batch at
# most min(Sn_BATCH, MAX_GPU_BATCH). When the GPU count does not divide the global batch, it
# uses the recipe's per-GPU batch with no accumulation and says so (main.py then scales the lr
# by the actual global batch / 512, except in stage 3 which uses --unscale-lr).

usage() {
    cat <<EOF
Usage: bash scripts/$(basename "$0") [options] [-- extra main.py flags]

Runs the three training stages of $MODEL (128 px pretrain, 224 px intermediate, 224 px
finetune), each through torchrun, then evaluates the final checkpoint.

Options (each also settable through the environment variable in brackets):
  --data-path DIR        ImageNet root with train/ and val/ class folders [DATA_PATH]
  --output-root DIR      stages go to DIR/$MODEL/{pt,mid,ft}, default ./output [OUTPUT_ROOT]
  --gpus-per-node N      processes per node; default \$SLURM_GPUS_ON_NODE, else the number of
                         GPUs nvidia-smi lists, else 8 [GPUS_PER_NODE]
  --nnodes N             number of nodes, default \$SLURM_NNODES or 1 [NNODES]
  --node-rank R          this node's rank, default \$SLURM_NODEID or 0 [NODE_RANK]
  --master-addr HOST     rank-0 node, default the first host of \$SLURM_JOB_NODELIST, else
                         127.0.0.1 [MASTER_ADDR]
  --master-port PORT     default 29500, or 20000 + \$SLURM_JOB_ID % 20000 [MASTER_PORT]
  --rdzv-endpoint H:P    use torchrun's c10d rendezvous instead of a fixed node rank
                         [RDZV_ENDPOINT; RDZV_ID names the job, default \$SLURM_JOB_ID or mambar]
  --max-gpu-batch N      cap the per-GPU batch (gradient accumulation keeps the recipe's
                         global batch) [MAX_GPU_BATCH]
  --dry-run, -n          print the commands (and which stages would be skipped or resumed)
                         without running anything [DRY_RUN=1]
  -h, --help             this text
Also: PYTHON (default python), TORCHRUN (default torchrun), MLFLOW_TRACKING_URI,
MLFLOW_EXPERIMENT_NAME (default: the model name); the schedule is one MLflow parent run, each
stage a child (-- --no-mlflow: no tracking).
Flags after -- go to every main.py command (e.g. -- --num_workers 16).
EOF
}

_die() { echo "error: $*" >&2; exit 2; }

_print_cmd() {  # the command as a copy-pasteable line
    local out="" arg
    for arg in "$@"; do out+="$(printf '%q' "$arg") "; done
    echo "${out% }"
}

_default_gpus() {
    if [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then
        echo "${SLURM_GPUS_ON_NODE%%(*}"
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        nvidia-smi -L | grep -c '^GPU'
    else
        echo 8
    fi
}

_default_master_addr() {  # the first host of the SLURM allocation, else this machine
    local list=${SLURM_JOB_NODELIST:-}
    if [[ -z "$list" ]]; then
        echo 127.0.0.1
    elif command -v scontrol >/dev/null 2>&1; then
        scontrol show hostnames "$list" | head -n 1
    elif [[ "$list" =~ ^([^],[]+)(\[([^],-]+))? ]]; then  # gpu[03-05,07],cpu1 -> gpu03
        echo "${BASH_REMATCH[1]}${BASH_REMATCH[3]}"
    else
        echo 127.0.0.1
    fi
}

# Sets BATCH and ACCUM for a stage: global batch $1, recipe per-GPU batch $2, world size $3.
_split_batch() {
    local global=$1 recipe=$2 world=$3 cap per accum
    cap=$recipe
    if [[ -n "${MAX_GPU_BATCH:-}" ]] && (( MAX_GPU_BATCH < cap )); then cap=$MAX_GPU_BATCH; fi
    if (( global % world != 0 )); then
        BATCH=$cap ACCUM=1
        BATCH_NOTE="global batch $((world * cap)), not the recipe's $global ($world GPUs do not divide it)"
        return
    fi
    per=$((global / world))
    accum=$(((per + cap - 1) / cap))
    while (( per % accum != 0 )); do accum=$((accum + 1)); done
    BATCH=$((per / accum)) ACCUM=$accum
    BATCH_NOTE="global batch $global = $world GPUs x $BATCH x accum $ACCUM"
}

# The two below use run_recipe's locals (python, repo, parent, node_rank).
_end_parent() {  # status: FINISHED, FAILED or KILLED
    if [[ -n "$parent" ]] && (( node_rank == 0 )); then
        "$python" "$repo/tracking.py" end --marker "$parent" --status "$1"
    fi
}

_step() {  # runs a command of the schedule; if it fails, ends the parent run and exits likewise
    local code=0 status=FAILED
    "$@" || code=$?
    (( code == 0 )) && return 0
    (( code > 128 )) && status=KILLED
    _end_parent "$status"
    exit "$code"
}

run_recipe() {
    local dry_run=${DRY_RUN:-0}
    local -a extra=()
    while (($#)); do
        case "$1" in
            -n|--dry-run) dry_run=1 ;;
            -h|--help) usage; exit 0 ;;
            --data-path) DATA_PATH=${2:?--data-path needs a value}; shift ;;
            --output-root) OUTPUT_ROOT=${2:?--output-root needs a value}; shift ;;
            --gpus-per-node) GPUS_PER_NODE=${2:?--gpus-per-node needs a value}; shift ;;
            --nnodes) NNODES=${2:?--nnodes needs a value}; shift ;;
            --node-rank) NODE_RANK=${2:?--node-rank needs a value}; shift ;;
            --master-addr) MASTER_ADDR=${2:?--master-addr needs a value}; shift ;;
            --master-port) MASTER_PORT=${2:?--master-port needs a value}; shift ;;
            --rdzv-endpoint) RDZV_ENDPOINT=${2:?--rdzv-endpoint needs a value}; shift ;;
            --max-gpu-batch) MAX_GPU_BATCH=${2:?--max-gpu-batch needs a value}; shift ;;
            --) shift; extra=("$@"); break ;;
            *) usage >&2; _die "unknown option $1 (main.py flags go after --)" ;;
        esac
        shift
    done

    local repo
    repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    local python=${PYTHON:-python} torchrun=${TORCHRUN:-torchrun}
    local gpus=${GPUS_PER_NODE:-$(_default_gpus)}
    local nnodes=${NNODES:-${SLURM_NNODES:-1}}
    local node_rank=${NODE_RANK:-${SLURM_NODEID:-0}}
    local master_addr=${MASTER_ADDR:-$(_default_master_addr)}
    local master_port=${MASTER_PORT:-}
    if [[ -z "$master_port" ]]; then
        if [[ -n "${SLURM_JOB_ID:-}" ]]; then master_port=$((20000 + SLURM_JOB_ID % 20000))
        else master_port=29500; fi
    fi
    local data_path=${DATA_PATH:-}
    local root=${OUTPUT_ROOT:-./output}
    local n
    for n in gpus nnodes node_rank master_port; do
        [[ "${!n}" =~ ^[0-9]+$ ]] || _die "$n must be a number (got '${!n}')"
    done
    [[ -z "${MAX_GPU_BATCH:-}" || "$MAX_GPU_BATCH" =~ ^[1-9][0-9]*$ ]] \
        || _die "MAX_GPU_BATCH must be a positive number (got '$MAX_GPU_BATCH')"
    (( gpus >= 1 && nnodes >= 1 )) || _die "need at least one GPU and one node"
    if [[ -z "$data_path" ]]; then
        [[ "$dry_run" == 1 ]] || _die "set DATA_PATH (or --data-path) to the ImageNet root (train/ and val/)"
        data_path=/PATH/TO/IMAGENET
    fi
    export MLFLOW_EXPERIMENT_NAME=${MLFLOW_EXPERIMENT_NAME:-$MODEL}

    local -a launcher=("$torchrun" --nnodes="$nnodes" --nproc_per_node="$gpus")
    if [[ -n "${RDZV_ENDPOINT:-}" ]]; then
        launcher+=(--rdzv_backend=c10d --rdzv_endpoint="$RDZV_ENDPOINT"
                   --rdzv_id="${RDZV_ID:-${SLURM_JOB_ID:-mambar}}")
    else
        launcher+=(--node_rank="$node_rank" --master_addr="$master_addr"
                   --master_port="$master_port")
    fi
    local world=$((gpus * nnodes))
    local base="$root/$MODEL"
    local -a names=(pt mid ft)

    echo "# $MODEL: 3 stages then eval, $nnodes node(s) x $gpus process(es) = $world; output $base"
    [[ "$dry_run" == 1 ]] && echo "# dry run: nothing is executed"

    # SLURM's pre-emption warning (--signal=USR1@...) reaches every process of the step: main.py
    # catches it and checkpoints; this shell and torchrun must not die of it first.
    trap '' USR1

    local parent=""
    if [[ " ${extra[*]-} " != *" --no-mlflow "* ]]; then
        parent="$base/mlflow_parent"
        export MAMBAR_MLFLOW_PARENT=$parent
        if [[ "$dry_run" == 1 ]]; then
            echo "# MLflow: parent run $(basename "$0" .sh), its id in $parent"
        elif (( node_rank == 0 )); then
            "$python" "$repo/tracking.py" parent --marker "$parent" --name "$(basename "$0" .sh)" \
                --tag model="$MODEL" --tag world_size="$world" >/dev/null
        fi
    fi

    local i dir prev_dir="" marker
    for i in 1 2 3; do
        local name=${names[$((i - 1))]}
        local -a s_args=()
        eval "s_args=(\"\${S${i}_ARGS[@]}\")"
        local s_input="S${i}_INPUT" s_epochs="S${i}_EPOCHS" s_batch="S${i}_BATCH" s_global="S${i}_GLOBAL"
        dir="$base/$name"
        marker="$dir/stage.done"
        _split_batch "${!s_global}" "${!s_batch}" "$world"
        local -a cmd=("${launcher[@]}" "$repo/main.py" --model "$MODEL" --run-name "$name"
                      --batch-size "$BATCH")
        (( ACCUM > 1 )) && cmd+=(--accum_iter "$ACCUM")
        cmd+=("${s_args[@]}" --data-path "$data_path")
        [[ -n "$prev_dir" ]] && cmd+=(--finetune "$prev_dir/checkpoint.pth")
        cmd+=(--output_dir "$dir" --epochs "${!s_epochs}" --input-size "${!s_input}" ${extra[@]+"${extra[@]}"})
        local head="# stage $i/3 $name: ${!s_input} px, ${!s_epochs} epochs, $BATCH_NOTE"
        if [[ -f "$marker" && -f "$dir/checkpoint.pth" ]]; then
            echo "$head: done ($marker), skipped"
        else
            if [[ -f "$dir/checkpoint.pth" ]]; then
                echo "$head: resuming from $dir/checkpoint.pth (main.py auto-resume)"
            else
                echo "$head"
            fi
            _print_cmd "${cmd[@]}"
            if [[ "$dry_run" != 1 ]]; then
                if [[ -n "$prev_dir" && ! -f "$prev_dir/checkpoint.pth" ]]; then
                    _die "stage $i needs $prev_dir/checkpoint.pth, which does not exist"
                fi
                _step "${cmd[@]}"
                mkdir -p "$dir"
                date -u +"finished %Y-%m-%dT%H:%M:%SZ" > "$marker"
            fi
        fi
        prev_dir=$dir
    done

    local -a eval_cmd=("$python" "$repo/main.py" --model "$MODEL" --run-name eval
                       --eval --eval-crop-ratio 1.0
                       --batch-size "$EVAL_BATCH" --input-size 224 --data-path "$data_path"
                       --resume "$prev_dir/checkpoint.pth" ${extra[@]+"${extra[@]}"})
    if (( node_rank != 0 )); then
        echo "# eval: runs on node rank 0 only"
        return 0
    fi
    echo "# eval of the final checkpoint (one process)"
    _print_cmd "${eval_cmd[@]}"
    if [[ "$dry_run" != 1 ]]; then
        _step "${eval_cmd[@]}"
        _end_parent FINISHED
    fi
}
