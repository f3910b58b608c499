"""CuteGPT configuration: the one file a user edits to tune.

Every hyperparameter, template and marker lives here and is read by all scripts (convert_data.py,
finetune.py, inference.py, ...).  Command-line flags of the scripts override single values.
Measured figures behind some of these choices are in BENCHMARKS.md.
"""

# ---- Published models (Hugging Face ids); a local directory works in their place
BASE_MODEL = "XuYipei/kw-cutegpt-13b-base"          # LLaMA-13B + Chinese vocabulary, further pre-trained
FULL_FT_MODEL = "XuYipei/kw-cutegpt-13b-ift"         # full-parameter instruction tuning
LORA_MODEL = "Abbey4799/kw-cutegpt-13b-ift-lora"     # LoRA instruction tuning on top of BASE_MODEL

# ---- Prompt.  prompt.py is the only code that turns these into text, for training and chat
# alike, so the ids a chat feeds the model equal the ids it was trained on.
META_PROMPT = "你是复旦大学知识工场实验室训练出来的语言模型CuteGPT。给定任务描述，请给出对应请求的回答。\n"
END_MARKER = "<end>"      # closes every answer: the model learns to emit it, generation stops at it
TURN_SEPARATOR = "\n"     # between an answer and the next question (the seed wrote "\n" after every answer)

# A turn is QUESTION (not learned) + ANSWER + END_MARKER (learned).  Each template gives the question:
# "plain" for a turn without input, "with_input" for one with ({input}: after INPUT_TEMPLATES).
TURN_TEMPLATES = {
    # Chinese 问/答: the template inference uses (the seed's generate_prompt)
    "zh": {"plain": "问：{instruction}\n答：", "with_input": "问：{instruction}\n{input}\n答："},
    # Chinese variants that only appear with an input: the background first, or "known" facts
    "zh_background": {"plain": None, "with_input": "背景：{input}\n问：{instruction}\n答："},
    "zh_known": {"plain": None, "with_input": "已知：{input}\n{instruction}\n回答："},
    # English Instruction/Response
    "en": {"plain": "Instruction:{instruction}\nResponse:",
           "with_input": "Instruction:{instruction}\n{input}\nResponse:"},
    # no markers: the question on one line, the answer on the next
    "plain": {"plain": "{instruction}\n", "with_input": "{instruction}\n{input}\n"},
}
INFERENCE_TEMPLATE = "zh"  # what chat uses, and what `convert_data.py --template zh` pins

# How an input is introduced.  With --template random (the seed's default) one is drawn per turn;
# "{}" is listed three times so that a bare input stays the most common (3 in 9), as in the seed.
INPUT_TEMPLATES = ["Input:{}", "Question:{}", "Problem:{}", "Q:{}", "*Question*:{}", "(Problem){}",
                   "{}", "{}", "{}"]
PINNED_INPUT_TEMPLATE = "{}"  # with a pinned template the input is inserted as it is

# ---- Data conversion (convert_data.py)
MAX_LENGTH = 2048              # tokens per training row (LLaMA's context)
MAX_DIALOGUES_PER_SAMPLE = 10  # the seed shuffles and joins 1..10 dialogues into one multi-round sample
CONVERT_SEED = 0               # same seed, same bytes
TOKENIZE_BATCH = 1024          # segments per tokenizer call
# Training cuts a micro-batch to its longest row, rounded up to 8 (tensor-core friendly bf16 shapes);
# convert_data.py spreads samples evenly over its rows, so rows end within a few tokens of each other.
ROW_LENGTH_MULTIPLE = 8
# --threads: threads of SentencePiece's batched C++ encode, which runs outside the GIL in a background
# thread while the main thread renders the next chunk.  0 = one per usable core, at most
# CONVERT_THREADS_MAX: SentencePiece is under half of the conversion's CPU time and the rest holds the
# GIL, so beyond a few cores more threads only wait.  Any number gives the same bytes.
CONVERT_THREADS = 0
CONVERT_THREADS_MAX = 16
# A sample is tokenized only as far as --max_length keeps (segment_prefixes.SegmentPrefixes): each round
# encodes the segments that an estimate of their tokens (characters and UTF-8 bytes, fitted to the segments
# encoded so far) x this margin says are still needed.  The ids never depend on it: a higher margin costs
# more rounds, a lower one segments encoded for nothing.
TRUNCATION_ESTIMATE_MARGIN = 1.0

# ---- LoRA (peft) -- the seed's settings
LORA_R = 8                 # rank of the update matrices
LORA_ALPHA = 16            # scaling = alpha / r = 2
LORA_DROPOUT = 0.05
LORA_TARGET_MODULES = ["q_proj", "v_proj"]

# ---- DeepSpeed.  finetune.py picks DS_CONFIG_lora with --use_lora, else DS_CONFIG_ft.
# --lr, --warmup_steps, --micro_batch_size, --grad_accum, --zero_stage override single values;
# --deepspeed_config FILE.json replaces the whole dict.
# bf16 is switched off automatically where the device lacks it (CPU runs train in fp32).
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

# ZeRO-3 and offload (--zero_stage 3, --offload_optimizer, --offload_param; distributed.resolve_ds_config).
# What one GPU holds for 13B (13.1B parameters with the extended vocabulary) on 8 GPUs, model states only
# (activations come on top: a few GB at micro batch 1 x 2048 with --gradient_checkpointing):
#   full fine-tuning, bf16 weights (2 B) + bf16 gradients (2 B) + fp32 master and Adam moments (12 B) = 16 B/param:
#     ZeRO-2                      26 + 26/8 + 157/8   = 49 GB   fits neither 24 nor 40 GB
#     ZeRO-2 + offload_optimizer  26 + 3.3            = 29 GB   (157 GB in CPU RAM) fits 40 GB only (tight)
#     ZeRO-3                      (26 + 26 + 157)/8   = 26 GB   fits 40 GB, not 24 GB
#     ZeRO-3 + offload_optimizer  (26 + 26)/8         = 6.5 GB  (157 GB in CPU RAM) fits 24 GB: the 3090 setting
#     ZeRO-3 + offload_param too  about 1 GB (one layer at a time) (183 GB in CPU RAM): when 24 GB is still short
#     nvme in place of cpu        when the node lacks the ~160-190 GB of CPU RAM above (needs a local NVMe disk)
#   LoRA: the frozen bf16 base is 26 GB on every GPU under ZeRO 1/2 (fits 40 GB; on 24 GB use --quant or ZeRO-3),
#     and 26/8 = 3.3 GB under ZeRO-3 (the adapter and its optimizer state are a few MB).
# ZeRO-3's settings: every rank keeps 1/N of each weight and fetches the rest just before a layer runs.
ZERO_3 = {
    "stage": 3,
    "overlap_comm": True,
    "stage3_prefetch_bucket_size": 5e7,          # weights fetched ahead of the layer that needs them
    "stage3_param_persistence_threshold": 1e5,   # tensors this small (norms, biases) stay whole on every rank
    "stage3_max_live_parameters": 1e9,           # at most this many gathered weights at once (2 GB in bf16)
    "stage3_max_reuse_distance": 1e9,
    # save_16bit_model may gather the whole weights; finetune's checkpoints gather them with
    # deepspeed.zero.GatheredParameters (checkpoints.export_state_dict) in any case
    "stage3_gather_16bit_weights_on_model_save": True,
}
# Where offloaded state goes.  cpu: pinned host memory, fast copies.  nvme: ZeRO-Infinity's swap files under
# --nvme_path, when the CPU RAM is short; its buffers (count x size) stay in pinned host memory.
OFFLOAD_CPU = {"device": "cpu", "pin_memory": True}
OFFLOAD_NVME_OPTIMIZER = {"device": "nvme", "pin_memory": True, "buffer_count": 4, "fast_init": False}
# buffer_size must hold the largest weight: the 49,954 x 5120 embedding = 2.6e8 elements (0.5 GB in bf16)
OFFLOAD_NVME_PARAM = {"device": "nvme", "pin_memory": True, "buffer_count": 5, "buffer_size": 3e8, "max_in_cpu": 1e9}

# ---- Training (finetune.py) defaults not held by DeepSpeed
TRAIN_SEED = 10          # the seed's default
# After the warm-up the rate stays at its peak ("constant": the seed's WarmupLR) or falls to 0 at the last
# step ("linear", "cosine"): a falling rate lets the weights settle instead of hopping around the minimum.
LR_SCHEDULE = "constant"
LOG_EVERY = 1            # steps between log lines / JSONL records
# The output layer and the loss run this many positions at a time, each chunk recomputed in backward,
# so the full logits never exist: 2 rows x 2048 positions x 49,954 words are 0.4 GB in bf16, 0.8 GB in
# fp32 for the loss, and as much again for their gradients.  The recompute is one more pass of the
# output layer (5120 x 49,954 = 0.26B of 13B weights: about 2% of a step).  0: all positions at once.
LOSS_CHUNK_TOKENS = 1024
# The attention kernel of training (--attention).  Packed rows need a block-diagonal causal mask:
#   sdpa  - PyTorch SDPA with the mask as a dense batch x L x L tensor; a custom mask rules out SDPA's
#           flash kernel, so it runs the memory-efficient or cuDNN one (slower; BENCHMARKS.md);
#   flex  - FlexAttention with the same pattern as a BlockMask: 128 x 128 blocks that no sample spans
#           are skipped and no L x L tensor exists.  CUDA only (no backward pass on a CPU);
#   flash - flash-attn's variable-length kernels, split at every position id 0.
# sdpa stays the default until flex is measured on a GPU: it runs everywhere, CPU included.
TRAINING_ATTENTION = "sdpa"
TRAINING_ATTENTION_CHOICES = ("sdpa", "flex", "flash")
# finetune.py refuses to start with less free space than this many checkpoints (export + optimizer
# state): room for the temporary copy written before the previous one goes, and for a short estimate.
CHECKPOINT_DISK_MARGIN = 1.5
# How long a rank waits for the others in one collective (and to join the group) before it stops with an
# error instead of hanging: longer than the slowest legitimate wait, which is rank 0 writing a 13B full
# fine-tuning checkpoint (26 GB of bf16 export + 13B x 12 bytes of ZeRO state over the nodes) while the
# others wait: 10-20 minutes on a 50 MB/s network filesystem.  DeepSpeed's own default (10 minutes) can
# cut that save short.  Decisions every rank must share (bad input, the checkpoint to resume) are agreed
# by collectives at start, so a wrong flag stops every node at once and never waits for this.
DIST_TIMEOUT_MINUTES = 30

# ---- Generation (inference.py, chat) -- the seed's settings, with sampling really switched on
GENERATION = {"do_sample": True, "temperature": 1.0, "top_p": 0.8, "top_k": 50, "repetition_penalty": 1.1,
              "max_new_tokens": 256}
MEMORY_LIMIT = 3   # (query, response) pairs of history fed back with each new query
# --fast: at batch 1 plain generate() spends most of a step in Python and kernel launches.  The fast
# path is transformers' own switches: a static KV cache allocated once (one shape for every request, so
# the compiled step is reused; 2048 = LLaMA's context: 2 (K, V) x 40 layers x 2048 x 5120 x 2 bytes =
# 1.6 GiB per sequence at 13B in bf16, so int8 weights (~13 GiB) + cache fit 16 GiB); on a CUDA GPU the
# decoding step compiled ("compile" is transformers' CompileConfig: "reduce-overhead" replays a CUDA
# graph); with --quant int8, torchao int8 weight-only kernels, as bitsandbytes' LLM.int8() cannot be
# compiled (int8 without --fast stays the seed's bitsandbytes; nf4 has no fast path).
FAST = {"max_cache_len": 2048,
        "compile": {"mode": "reduce-overhead", "fullgraph": False, "dynamic": False}}

CANNED_QUERIES = ["请推荐五本名著，依次列出作品名、作者", "再来三本呢？"]

# ---- Serving: code/api_server.py (OpenAI-compatible HTTP API) and code/web_demo.py (gradio page)
SERVER = {
    # loopback only: this machine, not the network.  Bind 0.0.0.0 on purpose (with --api_key).
    "host": "127.0.0.1",
    "port": 8000,                  # the API server (OpenAI clients: base_url http://127.0.0.1:8000/v1)
    "web_port": 7860,              # the web demo (gradio's usual port)
    "model_name": "cutegpt",       # the id /v1/models lists and requests name in "model"
    # answers one request may ask for (n x the prompts of /v1/completions; OpenAI allows up to 128):
    # each is a whole generation in the queue, so one request must not fill it (max_waiting)
    "max_choices": 16,
    # requests beyond those being generated wait in arrival order; beyond this many waiting, new
    # requests get 429 with a Retry-After header (OpenAI clients retry those)
    "max_waiting": 64,
    # Concurrent requests are generated together by transformers' continuous batching: one paged KV
    # cache for all requests, one forward pass per step for every running request (api_queue.py).
    # Its own sizing assumes a GPU and was slower than no batching on a CPU; these sizes suit a CPU
    # (BENCHMARKS.md has the figures).  The cache holds num_blocks x page_size = 4096 tokens: two whole contexts
    # of 2048 (a request can take one: it must fit, api_queue checks), or 16 requests of 256.  Per token
    # it costs 2 (K, V) x layers x hidden x 4 bytes in fp32: 2 KB for the toy model (8 MB in all),
    # 1.6 MB at 13B (6.7 GB: a 13B on a CPU is slow anyway).  max_batch_tokens caps the tokens of one
    # forward pass (prompt chunks + one per decoding request): on a CPU a longer pass is no faster per
    # token, and prompts longer than it are prefilled in pieces between decoding steps.
    # per_request_sampling: each request brings its own temperature / top_p / top_k into the batch.  The
    # batch then sorts the whole vocabulary of every running request at every step, which on a CPU costs
    # more than the toy model's forward pass (BENCHMARKS.md); so on a CPU the batch samples with the
    # server's own settings, and a request asking for others runs alone, the batch paused meanwhile.
    "batching": {"page_size": 64, "num_blocks": 64, "max_batch_tokens": 512, "max_requests_per_batch": 16,
                 "per_request_sampling": False},
    # On a CUDA GPU: None lets transformers size the cache and the batch from the free GPU memory (it
    # takes up to ~80-90% of it); more requests per batch keep the GPU busy (13B in bf16 on one 80 GB
    # card: ~40 GB of cache = ~50k tokens, e.g. 64 requests of 800).
    "batching_gpu": {"page_size": 256, "num_blocks": None, "max_batch_tokens": None, "max_requests_per_batch": 64,
                     "per_request_sampling": True},
    # The penalty for requests that send no repetition_penalty (OpenAI's API has none): 1 = none.  The
    # batch cannot apply one (its processors see a step's tokens, not a request's history), so
    # inference.py's 1.1 here would make every such request run alone and serving many users pointless.
    "repetition_penalty": 1.0,
    # api_server.py generates in a process of its own (api_process.py) while its first process answers
    # HTTP: tokenizing prompts, streaming every token as an event.  On a CPU the engine's matrix
    # products take this many threads; None = every core but one, which is left to the HTTP side
    # (on 2 cores: 1 + 1; torch's default, all cores, had both sides fight for them).
    "engine_cpu_threads": None,
    # a 429's Retry-After: the mean seconds a request has taken lately (at least this many)
    "retry_after_min_s": 1,
    "disconnect_poll_s": 0.5,      # how often a waiting or streaming request checks its client is there
}

# ---- Tiny model (build_tiny_model.py): stands in for the 13B weights in tests and the demo
TINY_MODEL = {
    "vocab_size": 1200,          # SentencePiece pieces (256 byte-fallback pieces among them)
    "hidden_size": 128, "num_layers": 2, "num_heads": 4,
    "intermediate_size": 344,    # ~ 8/3 x hidden, as LLaMA
    "max_position_embeddings": 2048,
    # std of the random weights.  LLaMA's 0.02 suits 5120 dimensions; at 128 its layers barely mix
    # tokens and a rank-8 LoRA on q/v cannot learn anything from it.
    "initializer_range": 0.3,
    "seed": 0,
}

# ---- --demo: a toy CuteGPT built by the project's own pipeline (build_tiny_model -> convert_data ->
# finetune) on the sample dialogues.  Changing any value here (or the data file) rebuilds the cache.
DEMO = {
    "data": "data/test/ift_data.pkl",        # relative to the repo root
    "cache_dir": "data/demo_model",          # relative to the repo root
    "tiny_model": {"seed": 0},               # build_tiny_model flags (else config.TINY_MODEL)
    "max_length": 512,                       # convert_data / finetune rows
    "template": "zh",                        # the chat template for every turn
    "max_dialogues_per_sample": 1,
    "special_end_token": True,               # full fine-tuning: '<end>' is one token
    # the dialogue of CANNED_QUERIES is seen this many times per epoch (every other one once): without
    # the repeats the 0.7M-parameter model recalls neither canned answer
    "repeat_canned": 20,
    # a rate decaying to 0 lets the weights settle (at a constant 1e-2 the recall depended on the CPU)
    "finetune": {"max_epoches": 50, "lr": 1e-2, "warmup_steps": 10, "micro_batch_size": 8, "grad_accum": 1,
                 "seed": 0, "lr_schedule": "linear"},
    # the toy model recalls its training answers: greedy, and no penalty on the repeats they contain
    "generation": {"do_sample": False, "repetition_penalty": 1.0},
}

# ---- The recipe around instruction tuning: extend_vocab.py, pre-training, merge_lora.py, C-Eval
EXTEND_VOCAB = {
    # pieces of the SentencePiece model trained on the Chinese corpus, before dropping those the base
    # already has (CuteGPT's vocabulary: LLaMA's 32,000 + 17,954 new = 49,954)
    "vocab_size": 20000,
    # characters covered; the rarest 0.05% stay on byte fallback (SentencePiece's value for CJK text)
    "character_coverage": 0.9995,
    "input_sentence_size": 2_000_000,   # corpus lines sampled for training (held in memory; 0: all)
    # every N-th non-empty line (at most heldout_max_lines) is held out to measure tokens per character
    "heldout_every": 50, "heldout_max_lines": 20000,
    "text_field": "text",               # JSONL corpora: the field holding the text
}

# LLaMA's real tokenizer.model, rebuilt by code/build_llama_tokenizer.py from a public artefact (the tests
# and the convert benchmark run on it): llama.cpp's vocabulary test file, vendored in this sdist (76 MB,
# downloaded once per test run), holds LLaMA's pieces and scores; the md5 is that of Meta's file.
LLAMA_TOKENIZER = {
    "sdist": "llama-cpp-python==0.3.36",
    "gguf_member": "vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf",
    "md5": "eeec4125e9c7560836b4873b6f8e3025",
}

# convert_data.py --mode pretrain (.txt: documents split by a blank line; .jsonl: one per line in
# "text_field").  Chunks of --max_length overlap by one token, so each token after a document's first
# is learned once; no BOS (CuteGPT's prompts start without one), eos closes each document.
PRETRAIN = {"text_field": "text"}

# merge_lora.py: the largest safetensors file (transformers' default; 13B in fp16 = 26 GB: 6 shards)
MERGE_MAX_SHARD_SIZE = "5GB"

# C-Eval (evaluate_ceval.py, which also holds the 52 subjects).  DATA_DIR/dev/{subject}_dev.csv: 5 solved
# examples a subject; val/: questions with answers; test/: without.  Columns: id, question, A-D, answer.
CEVAL = {
    # the first line of every prompt ({subject}: the Chinese name); then each question, ending at the
    # answer prompt whose next token is scored; a solved few-shot example's answer follows it
    "header": "以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n",
    "question": "{question}\nA. {A}\nB. {B}\nC. {C}\nD. {D}\n答案：",
    "answer": "{answer}\n\n",
    "choices": ["A", "B", "C", "D"],
    "shots": [0, 5],          # default: both settings, as CuteGPT's README reports them
    "batch_size": 8,          # prompts per forward pass (left-padded)
    "split": "val",
    "output_file": "ceval_results.json",
}
