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
# Training cuts every micro-batch to its longest row (padding after it is never computed), rounded up
# to a multiple of 8 so bf16 matrix shapes stay tensor-core friendly.  convert_data.py spreads samples
# evenly over its rows, so rows of a micro-batch end within a few tokens of each other: on the sample
# data (tiny test tokenizer, 2048) 18 rows of 1,905-1,946 real tokens instead of 17 full ones and one of 322:
# 94.2% of full rows are real, 99.8% of rows cut to their own length.
ROW_LENGTH_MULTIPLE = 8
# convert_data.py --threads: threads of SentencePiece's batched C++ encode, which runs in a background
# thread (outside the GIL) while the main thread renders the next chunk and assembles the one before.
# 0 = one per usable core, at most CONVERT_THREADS_MAX: SentencePiece's C++ work is under half of the
# conversion's CPU time on the 2-core VM (about 0.6-0.8 of 1.5-1.8 CPU-seconds, BENCHMARKS.md), the rest
# (reading, rendering, assembling, packing, and turning the tokenizer's ids into Python ints) holds the
# GIL, so beyond a few cores more threads only wait (16: the cores of the host the project measures on).
# Any number gives the same bytes.
CONVERT_THREADS = 0
CONVERT_THREADS_MAX = 16
# A sample is tokenized only as far as --max_length needs (dataset.SegmentPrefixes: what follows would be
# truncated away); how far that is, is only known after encoding, so each round encodes as many segments
# as characters x (tokens per character seen so far) x this margin say are still needed.  The ids never
# depend on it: a higher margin costs more rounds, a lower one more segments encoded for nothing (on the
# benchmark's 20,000 dialogues: 0.9 -> 238 rounds, 82,187 segments encoded; 1.0 -> 292, 79,497; 1.3 ->
# 446, 76,174; 73,910 are needed; the time barely moves).
TRUNCATION_ESTIMATE_MARGIN = 1.0

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
# What both modes share: bf16, ZeRO stage 1, a linear warm-up over 300 steps (then constant: the seed's
# schedule shape), gradient clipping at 1.0.
_DS_SHARED = {
    "bf16": {"enabled": True},
    "gradient_clipping": 1.0,
    "steps_per_print": 1000000,  # finetune.py prints its own one-line-per-step log
    "wall_clock_breakdown": False,
}
_ZERO_1 = {"stage": 1, "allgather_partitions": True, "allgather_bucket_size": 2e8, "reduce_scatter": True,
           "reduce_bucket_size": 2e8, "contiguous_gradients": True}
_WARMUP = {"warmup_min_lr": 0.0, "warmup_num_steps": 300, "warmup_type": "linear"}

DS_CONFIG_lora = {
    **_DS_SHARED,
    "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}},
    "scheduler": {"type": "WarmupLR", "params": {**_WARMUP, "warmup_max_lr": 3e-4}},   # from 0 to 3e-4
    "zero_optimization": dict(_ZERO_1),
    # 2 rows per GPU x 8 accumulation x 8 GPUs = 128 rows (262,144 tokens at 2048) per optimizer step
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 8,
}

DS_CONFIG_ft = {
    **_DS_SHARED,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-5, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.0}},
    # full fine-tuning moves every weight: a 30x smaller peak rate than LoRA
    "scheduler": {"type": "WarmupLR", "params": {**_WARMUP, "warmup_max_lr": 1e-5}},
    # 13B x (fp32 master + 2 Adam moments) = 156 GB: kept in CPU memory, not on the GPUs
    "zero_optimization": {**_ZERO_1, "offload_optimizer": {"device": "cpu", "pin_memory": True}},
    # 1 row per GPU x 16 accumulation x 8 GPUs = 128 rows per optimizer step, as in LoRA mode
    "train_micro_batch_size_per_gpu": 1,
    "gradient_accumulation_steps": 16,
}

# --------------------------------------------------------------------------------------------
# Training (finetune.py) defaults not held by DeepSpeed
# --------------------------------------------------------------------------------------------
TRAIN_SEED = 10          # the seed's default
# After the warm-up the learning rate stays at its peak ("constant": the seed's WarmupLR), or falls to
# 0 at the last step ("linear": DeepSpeed's WarmupDecayLR; "cosine": WarmupCosineLR), as most
# fine-tuning recipes do; a falling rate lets the weights settle instead of hopping around the minimum.
LR_SCHEDULE = "constant"
LOG_EVERY = 1            # steps between log lines / JSONL records
# finetune.py computes the output layer and the loss this many positions at a time and recomputes each
# chunk in backward, so the full logits never exist: at 2 rows x 2048 positions x 49,954 words they take
# 0.4 GB in bf16 plus 0.8 GB in fp32 for the loss, and as much again for their gradients.  The recompute
# costs one more pass of the output layer (about 2% of a 13B step).  0: all positions at once.
LOSS_CHUNK_TOKENS = 1024
# The attention kernel of training (finetune.py --attention).  Packed rows need a block-diagonal causal
# mask (samples never see each other):
#   sdpa  - PyTorch SDPA with that mask as a dense additive tensor (batch x L x L); a custom mask rules out
#           SDPA's flash kernel, so it runs the memory-efficient or cuDNN one (H200, one 13B layer, 2 x 2048:
#           2.25 ms forward+backward against 1.16 ms for plain causal attention, BENCHMARKS.md);
#   flex  - PyTorch FlexAttention with the same pattern as a BlockMask (built once per micro-batch from the
#           position-id restarts): blocks of 128 x 128 positions that no sample spans are skipped, and no
#           L x L tensor exists.  Needs a CUDA GPU: FlexAttention has no backward pass on a CPU;
#   flash - flash-attn's variable-length kernels (the flash_attn package), split at every position id 0.
# sdpa stays the default until flex is measured on a GPU: it runs everywhere, CPU included.
TRAINING_ATTENTION = "sdpa"
TRAINING_ATTENTION_CHOICES = ("sdpa", "flex", "flash")
# finetune.py refuses to start when the checkpoint folder has less free space than this many times its
# estimate of one checkpoint (export + optimizer state): room for the temporary copy written before the
# previous one is replaced, and for the estimate being short.
CHECKPOINT_DISK_MARGIN = 1.5

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
# --fast (model_loader.add_model_arguments: inference.py, the API server, the web demo, bench_infer.py).
# Decoding one token at batch 1 reads every weight once, so its speed is set by memory bandwidth; plain
# generate() spends most of a step in Python and kernel launches instead (13B on an H200: bf16 8.8
# tokens/s where 4.27 TB/s / 26.4 GB allows ~160; bitsandbytes int8 3.3 where ~300 is allowed).  The
# fast path uses only transformers' own switches on the model's generation_config:
# - a static KV cache of FAST["max_cache_len"] positions, allocated once: one shape for every request,
#   so the compiled step is reused (a cache sized per request would recompile for every new length).
#   2048 = LLaMA's context; at 13B it takes 2 (K, V) x 40 layers x 2048 x 5120 x 2 bytes = 1.6 GiB per
#   sequence in bf16, so int8 weights (~12.9 GiB) + cache stay under 16 GiB at batch 1 (a 24 GB card);
# - on a CUDA GPU, generate() compiles the decoding step with torch.compile (FAST["compile"] is
#   transformers' CompileConfig: mode "reduce-overhead" replays it as a CUDA graph).  On a CPU
#   transformers does not compile: the static cache alone runs there (what the CPU tests check);
# - --quant int8 with --fast: int8 weight-only kernels of torchao (TorchAoConfig(Int8WeightOnlyConfig()),
#   one scale per output channel, activations in bf16 where the GPU has
#   it, else fp16, fp32 on a CPU) instead of bitsandbytes' LLM.int8() (int8 x int8 with
#   fp16 outlier columns), which cannot be compiled and is the slowest path; --quant int8 without --fast
#   stays the seed's bitsandbytes int8.  nf4 has no fast path here (bitsandbytes 4-bit is not compiled).
FAST = {
    "max_cache_len": 2048,
    "compile": {"mode": "reduce-overhead", "fullgraph": False, "dynamic": False},
}

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
    # the learning rate decays linearly to 0 over the run: at a constant 1e-2 the toy model's weights kept
    # moving and on an AMD EPYC CPU it lost the third line of the first canned answer (2026-12-03)
    "finetune": {"max_epoches": 50, "lr": 1e-2, "warmup_steps": 10, "micro_batch_size": 8, "grad_accum": 1,
                 "seed": 0, "lr_schedule": "linear"},
    # the toy model recalls its training answers: greedy, and no penalty on the repeats they contain
    "generation": {"do_sample": False, "repetition_penalty": 1.0},
}

# --------------------------------------------------------------------------------------------------
# The recipe before and after instruction tuning: vocabulary extension (extend_vocab.py), continued
# pre-training (convert_data.py --mode pretrain, then finetune.py), LoRA merging (merge_lora.py) and
# C-Eval evaluation (evaluate_ceval.py).
# --------------------------------------------------------------------------------------------------
EXTEND_VOCAB = {
    # pieces of the SentencePiece model trained on the Chinese corpus, before dropping those the base
    # already has (CuteGPT's vocabulary: LLaMA's 32,000 + 17,954 new = 49,954)
    "vocab_size": 20000,
    # share of characters the new model must cover; the rarest 0.05% stay on the base's byte fallback
    # (SentencePiece's recommended value for CJK text)
    "character_coverage": 0.9995,
    # lines sampled from the corpus for training (SentencePiece holds them in memory; 0: every line)
    "input_sentence_size": 2_000_000,
    # every N-th non-empty corpus line is held out (not trained on) to measure tokens per character,
    # at most heldout_max_lines of them, unless --heldout_file is given
    "heldout_every": 50,
    "heldout_max_lines": 20000,
    # JSONL corpora: the field holding the text
    "text_field": "text",
}

# Pre-training mode of convert_data.py: plain text, every token learned (each token is predicted
# from the ones before it in its document).  A .txt file holds documents separated by a blank line;
# a .jsonl file one document per line in the field PRETRAIN["text_field"].  A document longer than
# --max_length is cut into chunks of max_length that overlap by one token, so every token after
# the document's first is learned exactly once; no BOS is added (CuteGPT's prompts, in training, chat
# and evaluation alike, start without one), eos closes each document and is learned.
PRETRAIN = {
    "text_field": "text",
}

# merge_lora.py: the largest safetensors file it writes ("5GB" as transformers' default; a 13B
# model in fp16 (26 GB) is saved as 6 shards)
MERGE_MAX_SHARD_SIZE = "5GB"

# --------------------------------------------------------------------------------------------------
# C-Eval (evaluate_ceval.py).  Data layout, as the C-Eval release ships it:
#   DATA_DIR/dev/{subject}_dev.csv    5 solved examples per subject (the few-shot examples)
#   DATA_DIR/val/{subject}_val.csv    questions with answers (accuracy is computed)
#   DATA_DIR/test/{subject}_test.csv  questions without answers (predictions are written)
# columns: id, question, A, B, C, D, answer (explanation in dev is ignored).
# --------------------------------------------------------------------------------------------------
CEVAL = {
    # first line of every prompt; {subject} is the subject's Chinese name
    "header": "以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n",
    # one question; the answer prompt ends it and the next token is scored
    "question": "{question}\nA. {A}\nB. {B}\nC. {C}\nD. {D}\n答案：",
    # what follows a solved few-shot example's question
    "answer": "{answer}\n\n",
    "choices": ["A", "B", "C", "D"],
    "shots": [0, 5],          # default: both settings, as CuteGPT's README reports them
    "batch_size": 8,          # prompts per forward pass (left-padded)
    "split": "val",
    "output_file": "ceval_results.json",
}

# The four C-Eval categories, in the order of the README tables.
CEVAL_CATEGORIES = ["STEM", "Social Science", "Humanities", "Other"]

# The 52 C-Eval subjects: name -> (Chinese name used in the prompt, category).  A category average is
# the plain mean of the accuracies of its subjects; the overall average the plain mean over all
# evaluated subjects (every subject weighs the same, however many questions it has).
CEVAL_SUBJECTS = {
    # STEM (20)
    "computer_network": ("计算机网络", "STEM"),
    "operating_system": ("操作系统", "STEM"),
    "computer_architecture": ("计算机组成", "STEM"),
    "college_programming": ("大学编程", "STEM"),
    "college_physics": ("大学物理", "STEM"),
    "college_chemistry": ("大学化学", "STEM"),
    "advanced_mathematics": ("高等数学", "STEM"),
    "probability_and_statistics": ("概率统计", "STEM"),
    "discrete_mathematics": ("离散数学", "STEM"),
    "electrical_engineer": ("注册电气工程师", "STEM"),
    "metrology_engineer": ("注册计量师", "STEM"),
    "high_school_mathematics": ("高中数学", "STEM"),
    "high_school_physics": ("高中物理", "STEM"),
    "high_school_chemistry": ("高中化学", "STEM"),
    "high_school_biology": ("高中生物", "STEM"),
    "middle_school_mathematics": ("初中数学", "STEM"),
    "middle_school_biology": ("初中生物", "STEM"),
    "middle_school_physics": ("初中物理", "STEM"),
    "middle_school_chemistry": ("初中化学", "STEM"),
    "veterinary_medicine": ("兽医学", "STEM"),
    # Social Science (10)
    "college_economics": ("大学经济学", "Social Science"),
    "business_administration": ("工商管理", "Social Science"),
    "marxism": ("马克思主义基本原理", "Social Science"),
    "mao_zedong_thought": ("毛泽东思想和中国特色社会主义理论体系概论", "Social Science"),
    "education_science": ("教育学", "Social Science"),
    "teacher_qualification": ("教师资格", "Social Science"),
    "high_school_politics": ("高中政治", "Social Science"),
    "high_school_geography": ("高中地理", "Social Science"),
    "middle_school_politics": ("初中政治", "Social Science"),
    "middle_school_geography": ("初中地理", "Social Science"),
    # Humanities (11)
    "modern_chinese_history": ("近代史纲要", "Humanities"),
    "ideological_and_moral_cultivation": ("思想道德修养与法律基础", "Humanities"),
    "logic": ("逻辑学", "Humanities"),
    "law": ("法学", "Humanities"),
    "chinese_language_and_literature": ("中国语言文学", "Humanities"),
    "art_studies": ("艺术学", "Humanities"),
    "professional_tour_guide": ("导游资格", "Humanities"),
    "legal_professional": ("法律职业资格", "Humanities"),
    "high_school_chinese": ("高中语文", "Humanities"),
    "high_school_history": ("高中历史", "Humanities"),
    "middle_school_history": ("初中历史", "Humanities"),
    # Other (11)
    "civil_servant": ("公务员", "Other"),
    "sports_science": ("体育学", "Other"),
    "plant_protection": ("植物保护", "Other"),
    "basic_medicine": ("基础医学", "Other"),
    "clinical_medicine": ("临床医学", "Other"),
    "urban_and_rural_planner": ("注册城乡规划师", "Other"),
    "accountant": ("注册会计师", "Other"),
    "fire_engineer": ("注册消防工程师", "Other"),
    "environmental_impact_assessment_engineer": ("环境影响评价工程师", "Other"),
    "tax_accountant": ("税务师", "Other"),
    "physician": ("医师资格", "Other"),
}
