#!/usr/bin/env bash
# The seed's fine-tuning run: LoRA on 8 GPUs with DeepSpeed, DatasetIds rows of 2048 tokens,
# 4 epochs, a checkpoint every 2000 steps, flash attention where installed.
#
#   bash finetune.sh
#   GPUS=0,1 MODEL_PATH=/models/cutegpt-base bash finetune.sh --lr 1e-4     # extra args pass through
#
# Environment: GPUS (visible devices, default 0..7; on a CPU-only machine the count of ranks),
# MASTER_PORT (12932), MODEL_PATH (XuYipei/kw-cutegpt-13b-base), DATA_PATH
# (data/test/llama_ift_data_ids.pkl), SAVE_DIR (ckp/).
set -euo pipefail
cd "$(dirname "$0")"
GPUS=${GPUS:-0,1,2,3,4,5,6,7}
MASTER_PORT=${MASTER_PORT:-12932}
MODEL_PATH=${MODEL_PATH:-XuYipei/kw-cutegpt-13b-base}
DATA_PATH=${DATA_PATH:-data/test/llama_ift_data_ids.pkl}
SAVE_DIR=${SAVE_DIR:-ckp/}
NUM_GPUS=$(echo "$GPUS" | tr ',' '\n' | grep -c .)

CUDA_VISIBLE_DEVICES=$GPUS deepspeed --num_gpus "$NUM_GPUS" --master_port "$MASTER_PORT" code/finetune.py \
    --use_lora \
    --save_steps 2000 \
    --max_epoches 4 \
    --save_dir "$SAVE_DIR" \
    --save_name llama_lora \
    --model_path "$MODEL_PATH" \
    --dataset_type DatasetIds \
    --data_path "$DATA_PATH" \
    --max_length 2048 \
    --use_flash_attention \
    "$@"
