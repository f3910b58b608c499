"""CuteGPT configuration: the one file a user edits to tune.

Every hyperparameter, template and marker of the project lives here, read by all scripts
(convert_data.py, dataset.py, finetune.py, inference.py, ...).  Change a value here rather than
hunting for a constant elsewhere; command-line flags of the scripts only override single values.
"""

# --------------------------------------------------------------------------------------------
# Published models (Hugging Face ids).  Any local directory works in their place.
# --------------------------------------------------------------------------------------------
BASE_MODEL = "XuYipei/kw-cutegpt-13b-base"          # LLaMA-13B + Chinese vocabulary, further pre-trained
FULL_FT_MODEL = "XuYipei/kw-cutegpt-13b-ift"         # full-parameter instruction tuning
LORA_MODEL = "Abbey4799/kw-cutegpt-13b-ift-lora"     # LoRA instruction tuning on top of BASE_MODEL

# --------------------------------------------------------------------------------------------
# Prompt: meta prompt, turn templates, input templates, end marker.
# prompt.py is the only code that turns these into text; training and inference both use it,
# so the ids a chat feeds the model equal the ids the model was trained on.
# --------------------------------------------------------------------------------------------
META_PROMPT = "你是复旦大学知识工场实验室训练出来的语言模型CuteGPT。给定任务描述，请给出对应请求的回答。\n"

# Closes every answer.  The model learns to emit it; generation stops when it appears.
END_MARKER = "<end>"

# Put between one answer and the next question (the seed wrote "\n" after every answer).
TURN_SEPARATOR = "\n"

# A turn is rendered as QUESTION (not learned) followed by ANSWER + END_MARKER (learned).
# Each template gives the question part: "plain" is used when the turn has no input,
# "with_input" when it has one ({input} is the input field after INPUT_TEMPLATES formatting).
TURN_TEMPLATES = {
    # Chinese 问/答: the template inference uses (the seed's generate_prompt)
    "zh": {
        "plain": "问：{instruction}\n答：",
        "with_input": "问：{instruction}\n{input}\n答：",
    },
    # Chinese variants that only appear with an input: background first, or "known" facts
    "zh_background": {
        "plain": None,
        "with_input": "背景：{input}\n问：{instruction}\n答：",
    },
    "zh_known": {
        "plain": None,
        "with_input": "已知：{input}\n{instruction}\n回答：",
    },
    # English Instruction/Response
    "en": {
        "plain": "Instruction:{instruction}\nResponse:",
        "with_input": "Instruction:{instruction}\n{input}\nResponse:",
    },
    # no markers at all: the question on one line, the answer on the next
    "plain": {
        "plain": "{instruction}\n",
        "with_input": "{instruction}\n{input}\n",
    },
}

# The template chat uses (and `convert_data.py --template zh` pins for every turn).
INFERENCE_TEMPLATE = "zh"

# How an input field is introduced.  With --template random (the seed's default) one is drawn
# per turn; "{}" appears several times so that a bare input stays the most common (as in the seed).
INPUT_TEMPLATES = [
    "Input:{}",
    "Question:{}",
    "Problem:{}",
    "Q:{}",
    "*Question*:{}",
    "(Problem){}",
    "{}",
    "{}",
    "{}",
]
# With a pinned template the input is inserted as it is.
PINNED_INPUT_TEMPLATE = "{}"

# --------------------------------------------------------------------------------------------
# Data conversion (convert_data.py)
# --------------------------------------------------------------------------------------------
MAX_LENGTH = 2048              # tokens per training row (LLaMA's context)
MAX_DIALOGUES_PER_SAMPLE = 10  # the seed shuffles and joins 1..10 dialogues into one multi-round sample
CONVERT_SEED = 0               # same seed, same bytes
TOKENIZE_BATCH = 1024          # segments per fast-tokenizer call

# --------------------------------------------------------------------------------------------
# LoRA (peft) -- the seed's settings
# --------------------------------------------------------------------------------------------
LORA_R = 8                 # rank of the update matrices
LORA_ALPHA = 16            # scaling = alpha / r = 2
LORA_DROPOUT = 0.05
LORA_TARGET_MODULES = ["q_proj", "v_proj"]

# --------------------------------------------------------------------------------------------
# DeepSpeed.  finetune.py picks DS_CONFIG_lora with --use_lora, else DS_CONFIG_ft.
# --lr, --warmup_steps, --micro_batch_size, --grad_accum, --zero_stage override single values;
# --deepspeed_config FILE.json replaces the whole dict.
# bf16 is switched off automatically where the device lacks it (CPU runs train in fp32).
# --------------------------------------------------------------------------------------------
DS_CONFIG_lora = {
    "bf16": {"enabled": True},
    "optimizer": {
        "type": "AdamW",
        "params": {"lr": 3e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0},
    },
    # linear warm-up from 0 to 3e-4 over 300 steps, then constant (the seed's schedule shape)
    "scheduler": {
        "type": "WarmupLR",
        "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 3e-4, "warmup_num_steps": 300, "warmup_type": "linear"},
    },
    "zero_optimization": {
        "stage": 1,
        "allgather_partitions": True,
        "allgather_bucket_size": 2e8,
        "reduce_scatter": True,
        "reduce_bucket_size": 2e8,
        "contiguous_gradients": True,
    },
    # 2 rows per GPU x 8 accumulation x 8 GPUs = 128 rows (262,144 tokens at 2048) per optimizer step
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 8,
    "gradient_clipping": 1.0,
    "steps_per_print": 1000000,  # finetune.py prints its own one-line-per-step log
    "wall_clock_breakdown": False,
}

DS_CONFIG_ft = {
    "bf16": {"enabled": True},
    "optimizer": {
        "type": "AdamW",
        "params": {"lr": 1e-5, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.0},
    },
    # full fine-tuning moves every weight: a 30x smaller peak rate than LoRA
    "scheduler": {
        "type": "WarmupLR",
        "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-5, "warmup_num_steps": 300, "warmup_type": "linear"},
    },
    "zero_optimization": {
        "stage": 1,
        "allgather_partitions": True,
        "allgather_bucket_size": 2e8,
        "reduce_scatter": True,
        "reduce_bucket_size": 2e8,
        "contiguous_gradients": True,
        # 13B x (fp32 master + 2 Adam moments) = 156 GB: kept in CPU memory, not on the GPUs
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
    },
    # 1 row per GPU x 16 accumulation x 8 GPUs = 128 rows per optimizer step, as in LoRA mode
    "train_micro_batch_size_per_gpu": 1,
    "gradient_accumulation_steps": 16,
    "gradient_clipping": 1.0,
    "steps_per_print": 1000000,
    "wall_clock_breakdown": False,
}

# --------------------------------------------------------------------------------------------
# Training (finetune.py) defaults not held by DeepSpeed
# --------------------------------------------------------------------------------------------
TRAIN_SEED = 10          # the seed's default
LOG_EVERY = 1            # steps between log lines / JSONL records

# --------------------------------------------------------------------------------------------
# Generation (inference.py, chat) -- the seed's settings, with sampling really switched on
# --------------------------------------------------------------------------------------------
GENERATION = {
    "do_sample": True,
    "temperature": 1.0,
    "top_p": 0.8,
    "top_k": 50,
    "repetition_penalty": 1.1,
    "max_new_tokens": 256,
}
MEMORY_LIMIT = 3   # (query, response) pairs of history fed back with each new query
CANNED_QUERIES = ["请推荐五本名著，依次列出作品名、作者", "再来三本呢？"]

# --------------------------------------------------------------------------------------------
# Serving: code/api_server.py (OpenAI-compatible HTTP API) and code/web_demo.py (gradio page)
# --------------------------------------------------------------------------------------------
SERVER = {
    # loopback only: reachable from this machine, not the network.  Bind 0.0.0.0 on purpose (with
    # --api_key) to serve others.
    "host": "127.0.0.1",
    "port": 8000,                  # the API server (OpenAI clients: base_url http://127.0.0.1:8000/v1)
    "web_port": 7860,              # the web demo (gradio's usual port)
    "model_name": "cutegpt",       # the id /v1/models lists and requests name in "model"
    # One generation runs at a time (one model, one CPU/GPU stream); the others wait in a FIFO
    # queue.  Beyond this many waiting requests new ones get 429 (OpenAI clients retry those).
    "max_waiting": 64,
    # While a request waits or streams, its connection is checked this often (seconds) so that a
    # client that went away gives up its place or stops its generation.
    "disconnect_poll_s": 0.5,
}

# --------------------------------------------------------------------------------------------
# Tiny model (build_tiny_model.py): stands in for the 13B weights in tests and the demo
# --------------------------------------------------------------------------------------------
TINY_MODEL = {
    "vocab_size": 1200,          # SentencePiece pieces (256 byte-fallback pieces among them)
    "hidden_size": 128,
    "num_layers": 2,
    "num_heads": 4,
    "intermediate_size": 344,    # ~ 8/3 x hidden, as LLaMA
    "max_position_embeddings": 2048,
    # std of the random weights.  LLaMA's 0.02 suits 5120 dimensions; at 128 it leaves a random
    # model whose layers barely mix tokens, and a rank-8 LoRA on q/v then cannot learn anything
    # (measured: loss 7.1 -> 5.1 in 300 steps on 3 answers, vs -> 0.003 at 0.3).
    "initializer_range": 0.3,
    "seed": 0,
}

# --------------------------------------------------------------------------------------------------
# --demo: a toy CuteGPT built by the project's own pipeline (build_tiny_model -> convert_data ->
# finetune) on the sample dialogues.  Measured 2026-11-28 on a 2-core CPU machine: 146 s the first
# time (build 7 s, conversion 5 s, fine-tuning 126 s), 7 s cached.  With these settings the sample
# answers of the canned queries were recalled word for word at every checked epoch from 38 to 59
# (every 3rd epoch, 2 pinned cores); without repeating the canned conversation the 0.7M-parameter
# model recalled neither answer within 60 epochs.
# Changing any value here (or the data file) rebuilds the cache.
# --------------------------------------------------------------------------------------------------
DEMO = {
    "data": "data/test/ift_data.pkl",   # relative to the repo root
    "cache_dir": "data/demo_model",         # relative to the repo root
    "tiny_model": {"seed": 0},                               # build_tiny_model flags (else config.TINY_MODEL)
    "max_length": 512,                                       # convert_data / finetune rows
    "template": "zh",                                        # the chat template for every turn
    "max_dialogues_per_sample": 1,
    "special_end_token": True,                               # full fine-tuning: '<end>' is one token
    # the sample dialogue holding config.CANNED_QUERIES is seen this many times per epoch (every
    # other dialogue once), so that the toy model recalls those two answers word for word
    "repeat_canned": 20,
    "finetune": {"max_epoches": 50, "lr": 1e-2, "warmup_steps": 10, "micro_batch_size": 8, "grad_accum": 1,
                 "seed": 0},
    # the toy model recalls its training answers: greedy, and no penalty on the repeats they contain
    "generation": {"do_sample": False, "repetition_penalty": 1.0},
}
