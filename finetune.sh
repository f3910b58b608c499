#!/usr/bin/env bash
# The seed's fine-tuning run: LoRA on 8 GPUs with DeepSpeed, DatasetIds rows of 2048 tokens,
# 4 epochs, a checkpoint every 2000 steps, flash attention where installed.
#
#   bash finetune.sh
#   GPUS=4,5 MODEL_PATH=/models/cutegpt-base bash finetune.sh --lr 1e-4     # extra args pass through
#   DRY_RUN=1 GPUS=4,5 bash finetune.sh                                     # print the launch command only
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash finetune.sh     # one torchrun per node (NODE_RANK=1 on the other)
#   HOSTFILE=hostfile MASTER_ADDR=10.0.0.1 bash finetune.sh        # DeepSpeed's launcher, from node 0, over ssh
#   HOSTFILE=hostfile NO_SSH=1 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash finetune.sh   # the same, on every node, no ssh
#   srun --nodes=2 --ntasks-per-node=1 bash finetune.sh            # SLURM: NNODES, NODE_RANK, MASTER_ADDR from srun
#
# Environment:
#   GPUS        the GPU ids to train on, the same on every node (default: CUDA_VISIBLE_DEVICES, else
#               0,...,7); DeepSpeed's launcher gets them as --include (it ignores CUDA_VISIBLE_DEVICES
#               once it is given a GPU count).  On a machine without a GPU: the number of ids is the
#               number of CPU ranks.
#   NNODES (1), NODE_RANK, MASTER_ADDR   several nodes, one torchrun each; MASTER_ADDR is node 0's address
#   HOSTFILE    DeepSpeed's launcher over the hosts of that file ("node0 slots=8", one line per node),
#               started on node 0 (passwordless ssh to the others), or with NO_SSH=1 on every node
#               with its NODE_RANK and MASTER_ADDR; NNODES takes the first NNODES hosts
#   MASTER_PORT (12932), MODEL_PATH (XuYipei/kw-cutegpt-13b-base), DATA_PATH
#   (data/test/llama_ift_data_ids.pkl), SAVE_DIR (ckp/; over several nodes a folder they all share)
#   ACCELERATOR gpu or cpu (default: gpu when torch sees CUDA); DRY_RUN=1 prints the command and exits
set -euo pipefail
cd "$(dirname "$0")"

fail() { echo "error: $*" >&2; exit 2; }
is_count() { [[ "$1" =~ ^[0-9]+$ ]]; }

GPUS_GIVEN=${GPUS:+1}
GPUS=${GPUS:-${CUDA_VISIBLE_DEVICES:-0,1,2,3,4,5,6,7}}
MASTER_PORT=${MASTER_PORT:-12932}
MODEL_PATH=${MODEL_PATH:-XuYipei/kw-cutegpt-13b-base}
DATA_PATH=${DATA_PATH:-data/test/llama_ift_data_ids.pkl}
SAVE_DIR=${SAVE_DIR:-ckp/}
HOSTFILE=${HOSTFILE:-}
NO_SSH=${NO_SSH:-0}
MASTER_ADDR=${MASTER_ADDR:-}
# a SLURM step (srun) says how many nodes it spans and which one this is; node 0 is the first of its list
if [[ -n "${SLURM_STEP_NUM_NODES:-}" && -z "$HOSTFILE" ]]; then
    [[ "${SLURM_STEP_NUM_TASKS:-$SLURM_STEP_NUM_NODES}" == "$SLURM_STEP_NUM_NODES" ]] ||
        fail "srun started ${SLURM_STEP_NUM_TASKS} tasks on ${SLURM_STEP_NUM_NODES} nodes: finetune.sh starts the ranks of its node itself, run it once per node (srun --ntasks-per-node=1)"
    NNODES=${NNODES:-$SLURM_STEP_NUM_NODES}
    NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-}}
    if [[ -z "$MASTER_ADDR" && "$NNODES" != 1 ]]; then
        MASTER_ADDR=$(scontrol show hostnames "$SLURM_STEP_NODELIST" | head -n 1)
    fi
fi
NNODES=${NNODES:-}
NODE_RANK=${NODE_RANK:-}

[[ "$GPUS" =~ ^[0-9]+(,[0-9]+)*$ ]] || fail "GPUS=$GPUS: give GPU ids separated by commas, e.g. GPUS=0,1"
[[ -z "$NNODES" ]] || { is_count "$NNODES" && (( NNODES >= 1 )); } || fail "NNODES=$NNODES: give the number of nodes, e.g. NNODES=2"
NUM_GPUS=$(echo "$GPUS" | tr ',' '\n' | grep -c .)
ACCELERATOR=${ACCELERATOR:-$(python -c 'import torch; print("gpu" if torch.cuda.is_available() else "cpu")' 2>/dev/null || echo gpu)}
case "$ACCELERATOR" in
    gpu) IDS=$GPUS ;;
    cpu) IDS=$(seq -s, 0 $((NUM_GPUS - 1))) ;;   # CPU ranks have no ids: as many as GPUS names
    *) fail "ACCELERATOR=$ACCELERATOR: give gpu or cpu" ;;
esac
# node NODE_RANK of NNODES, joining MASTER_ADDR: the variables a multi-node launch needs
need_node_rank() {
    [[ -n "$MASTER_ADDR" ]] || fail "$1: MASTER_ADDR (the address of node 0, reachable from every node) is needed"
    { is_count "$NODE_RANK" && (( NODE_RANK < $2 )); } ||
        fail "$1: NODE_RANK=${NODE_RANK} must be this node's number, 0 to $(($2 - 1)) (0 on the node at MASTER_ADDR)"
}

TRAIN=(code/finetune.py
    --use_lora
    --save_steps 2000
    --max_epoches 4
    --save_dir "$SAVE_DIR"
    --save_name llama_lora
    --model_path "$MODEL_PATH"
    --dataset_type DatasetIds
    --data_path "$DATA_PATH"
    --max_length 2048
    --use_flash_attention
    "$@"
)

if [[ -n "$HOSTFILE" ]]; then   # DeepSpeed's launcher over the hosts of HOSTFILE
    [[ -f "$HOSTFILE" ]] || fail "HOSTFILE=$HOSTFILE: file not found (one line per node: 'HOSTNAME slots=GPUS')"
    mapfile -t HOSTS < <(awk '$1 !~ /^#/ && NF {print $1}' "$HOSTFILE")
    NNODES=${NNODES:-${#HOSTS[@]}}
    (( ${#HOSTS[@]} >= NNODES )) || fail "NNODES=$NNODES: HOSTFILE=$HOSTFILE lists ${#HOSTS[@]} hosts"
    INCLUDE=""
    for host in "${HOSTS[@]:0:NNODES}"; do   # GPUS given: those ids on every host; else every slot
        INCLUDE+="${INCLUDE:+@}$host${GPUS_GIVEN:+:$IDS}"
    done
    LAUNCH=(deepspeed --hostfile "$HOSTFILE" --include "$INCLUDE" --master_port "$MASTER_PORT")
    [[ -z "$MASTER_ADDR" ]] || LAUNCH+=(--master_addr "$MASTER_ADDR")
    if [[ "$NO_SSH" == 1 ]]; then
        need_node_rank "HOSTFILE with NO_SSH=1" "$NNODES"
        LAUNCH+=(--no_ssh --node_rank "$NODE_RANK")
    fi
    unset CUDA_VISIBLE_DEVICES
elif [[ "$NO_SSH" == 1 ]]; then
    fail "NO_SSH=1 goes with HOSTFILE (DeepSpeed's launcher); without a hostfile give NNODES, NODE_RANK and MASTER_ADDR"
elif [[ "${NNODES:-1}" != 1 ]]; then   # one torchrun per node; torchrun leaves CUDA_VISIBLE_DEVICES as it is
    need_node_rank "NNODES=$NNODES" "$NNODES"
    LAUNCH=(torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NUM_GPUS"
            --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
    [[ "$ACCELERATOR" == cpu ]] || LAUNCH=(env "CUDA_VISIBLE_DEVICES=$GPUS" "${LAUNCH[@]}")
elif [[ "$ACCELERATOR" == gpu ]]; then
    LAUNCH=(deepspeed --include "localhost:$GPUS" --master_port "$MASTER_PORT")
    unset CUDA_VISIBLE_DEVICES
else   # DeepSpeed's CPU accelerator counts NUMA nodes as devices: ask for the number of ranks instead
    LAUNCH=(deepspeed --num_gpus "$NUM_GPUS" --master_port "$MASTER_PORT")
fi

if [[ "${DRY_RUN:-0}" == 1 ]]; then   # the command, each word quoted only where the shell needs it
    words=()
    for word in "${LAUNCH[@]}" "${TRAIN[@]}"; do
        if [[ "$word" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then words+=("$word"); else words+=("$(printf '%q' "$word")"); fi
    done
    echo "${words[*]}"
    exit 0
fi
exec "${LAUNCH[@]}" "${TRAIN[@]}"
