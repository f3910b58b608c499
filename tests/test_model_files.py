"""model_files.py: every directory the project writes carries tokenizer.model, a chat template that engines
turn into the project's own prompt ids, and a generation config that stops at the end marker; and the
prompts built from a fine-tuning checkpoint equal the ids convert_data.py produced (issue #21.1)."""
import glob
import json
import os
import random

import pytest
import sentencepiece as spm
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedTokenizerFast

import chat
import checkpoints
import config
import convert_data
import data_io
import model_files
import model_loader
import prompt
import web_demo
from conftest import REPO

SAMPLES = sorted(glob.glob(os.path.join(REPO, "data", "test", "ift_data.*")))
SYSTEMS = [None, "", "你是一个乐于助人的助手。", "You are  a helpful assistant.", "  以空格开头的系统提示",
           "结尾有空格  ", "第一行\n第二行\n", ["两条系统消息", "第二条"], "\t制表符开头"]
SPACINGS = [lambda t: t, lambda t: " " + t, lambda t: t + "  ", lambda t: t.replace("，", "，  ", 1),
            lambda t: "    " + t, lambda t: t + "\n\n", lambda t: "a  b   c    d " + t]


def sample_dialogues():
    """Every dialogue of the sample files in data/, once."""
    seen, dialogues = set(), []
    for path in SAMPLES:
        for dialogue in data_io.load_dialogues(path):
            key = json.dumps(dialogue, ensure_ascii=False, sort_keys=True)
            if key not in seen:
                seen.add(key)
                dialogues.append(dialogue)
    return dialogues


def conversations(seed=0):
    """(messages, turns, meta): each sample dialogue ending at each of its turns, with a system prompt
    (or the meta prompt), spacing changes and inputs drawn at random; content as a string or text parts."""
    rng = random.Random(seed)
    for dialogue in sample_dialogues():
        for end in range(1, len(dialogue) + 1):
            system = rng.choice(SYSTEMS)
            space = rng.choice(SPACINGS) if rng.random() < 0.5 else (lambda t: t)
            messages = [{"role": "system", "content": s} for s in ([system] if isinstance(system, str) else
                                                                     system or [])]
            turns = []
            for index, turn in enumerate(dialogue[:end]):
                last = index == end - 1
                question = space(turn["instruction"])
                user = {"role": "user", "content": question if rng.random() < 0.8 else
                        [{"type": "text", "text": question[:3]}, {"type": "text", "text": question[3:]}]}
                if turn["input"]:
                    user["input"] = turn["input"]
                messages.append(user)
                turns.append({"instruction": question, "input": turn["input"], "output": None if last else
                              space(turn["output"])})
                if not last:
                    messages.append({"role": "assistant", "content": turns[-1]["output"]})
            meta = prompt.split_messages([{k: v for k, v in m.items() if k != "input"} for m in messages])[0]
            yield messages, turns, meta


@pytest.fixture(scope="module")
def engine_dirs(tiny_model_dir, tmp_path_factory):
    """The tiny model as build_tiny_model.py wrote it ('<end>' is text) and a full fine-tuning checkpoint's
    tokenizer files ('<end>' one token), written by model_files.save_tokenizer as checkpoints.py does."""
    full = str(tmp_path_factory.mktemp("full_tokenizer"))
    model_files.save_tokenizer(full, convert_data.load_tokenizer(tiny_model_dir, special_end_token=True))
    return {"text_marker": tiny_model_dir, "token_marker": full}


def test_tiny_tokenizer_has_whitespace_run_pieces(tiny_model_dir):
    sp = spm.SentencePieceProcessor(model_file=os.path.join(tiny_model_dir, "tokenizer.model"))
    pieces = {sp.id_to_piece(i) for i in range(sp.get_piece_size())}
    assert {"▁▁", "▁▁▁▁"} <= pieces


@pytest.mark.parametrize("kind", ["text_marker", "token_marker"])
def test_chat_template_gives_the_projects_prompt_ids(engine_dirs, kind):
    directory = engine_dirs[kind]
    for name in (model_files.SENTENCEPIECE_FILE, model_files.TEMPLATE_FILE, model_files.GENERATION_FILE):
        assert os.path.isfile(os.path.join(directory, name)), name
    ours = model_loader.load_tokenizer(directory)
    assert prompt.segment_encoder(ours) is not None      # SentencePiece's own ids: the data's
    assert (config.END_MARKER in ours.get_added_vocab()) == (kind == "token_marker")
    # what engines load (AutoTokenizer), and the directory's tokenizer.json read as it is
    engines = {"AutoTokenizer": AutoTokenizer.from_pretrained(directory),
               "tokenizer.json": PreTrainedTokenizerFast.from_pretrained(directory)}
    mismatched = {name: [] for name in engines}
    total = 0
    for messages, turns, meta in conversations():
        want = prompt.encode_segments(ours, prompt.conversation_segments(turns, "zh", meta_prompt=meta))[0]
        total += 1
        for name, tokenizer in engines.items():
            got = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                return_dict=False)
            if got != want:
                mismatched[name].append(meta)
    assert total > 400
    # every directory's tokenizer.json is rebuilt from its tokenizer.model (model_files.write_model_files), so
    # what engines load agrees with SentencePiece on every text, leading spaces included
    assert mismatched == {name: [] for name in engines}, {name: m[:3] for name, m in mismatched.items()}
    assert any(meta[:1].isspace() for _, _, meta in conversations())   # the hard case is among them


def test_template_is_generated_from_config(engine_dirs, monkeypatch):
    monkeypatch.setattr(config, "META_PROMPT", "META\n")
    monkeypatch.setitem(config.TURN_TEMPLATES, config.INFERENCE_TEMPLATE,
                        {"plain": "Q: {instruction} \"quoted\" \\ A:", "with_input": "Q: {instruction}\n[{input}]\nA:"})
    tokenizer = AutoTokenizer.from_pretrained(engine_dirs["text_marker"])
    template = model_files.template_for(tokenizer)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                {"role": "user", "content": "more", "input": "x"}]
    text = tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                         tokenize=False)
    assert text == 'META\n Q: hi "quoted" \\ A: yo<end> \nQ: more\n[x]\nA:'


def test_generation_config_stops_at_the_end_marker(engine_dirs):
    text = GenerationConfig.from_pretrained(engine_dirs["text_marker"])
    assert sorted(text.eos_token_id) == [1, 2] and text.stop_strings == [config.END_MARKER]
    full_dir = engine_dirs["token_marker"]
    tokenizer = AutoTokenizer.from_pretrained(full_dir)
    end = tokenizer.convert_tokens_to_ids(config.END_MARKER)
    token = GenerationConfig.from_pretrained(full_dir)
    assert end > 2 and sorted(token.eos_token_id) == [1, 2, end] and token.stop_strings is None
    # the ids chat.py stops at
    assert sorted(token.eos_token_id) == chat.stop_token_ids(tokenizer)
    assert sorted(text.eos_token_id) == chat.stop_token_ids(AutoTokenizer.from_pretrained(engine_dirs["text_marker"]))


# ----------------------------------------------------------------------------------------------
# issue #21.1: checkpoints encode as the data was converted
# ----------------------------------------------------------------------------------------------
class NoEngine:
    """DeepSpeed's part of a checkpoint (the training state) is not what this test is about."""

    def save_checkpoint(self, *args, **kwargs):
        pass


def spaced_dialogues(seed=0):
    """Every sample dialogue, and each once more with leading, trailing and repeated spaces drawn at random
    (where transformers' rebuilt LlamaTokenizer and SentencePiece disagree)."""
    rng = random.Random(seed)
    dialogues = sample_dialogues()
    spaced = [[{key: rng.choice(SPACINGS[1:])(text) if text else text for key, text in turn.items()}
               for turn in dialogue] for dialogue in dialogues]
    return dialogues + spaced


def converted_prompts(tiny_model_dir, tmp_path, data_file, special_end_token):
    """The prompt of every turn of every dialogue of ``data_file`` as convert_data.py encodes it (one
    dialogue per sample, --template zh): the ids of each sample up to the start of each learned answer."""
    argv = ["--tokenizer", tiny_model_dir, "--data_file", data_file,
            "--out_data_path", str(tmp_path), "--template", "zh", "--max_dialogues_per_sample", "1",
            "--max_length", "16384"] + (["--special_end_token"] if special_end_token else [])
    converted = convert_data.convert(convert_data.parse_args(argv), show_progress=False)
    assert converted["meta"]["counts"]["truncated_samples"] == 0
    prompts = set()
    for ids, labels, mask, starts in zip(converted["input_ids"], converted["labels"], converted["attention_mask"],
                                         converted["sample_starts"]):
        for begin, end in zip(starts, starts[1:] + [mask.count(1)]):
            for i in range(begin, end):
                if labels[i] != -100 and (i == begin or labels[i - 1] == -100):
                    prompts.add(tuple(ids[begin:i]))
    return prompts


def write_checkpoint(path, model, tokenizer, monkeypatch):
    """checkpoints.save_checkpoint as finetune.py calls it, on one process without DeepSpeed."""
    monkeypatch.setattr(checkpoints, "all_ranks_agree", lambda ok, device: ok)
    checkpoints.save_checkpoint(path, NoEngine(), model, tokenizer, {}, {"global_step": 1}, 0, "cpu")
    return path


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_checkpoint_prompts_equal_the_converted_data(tiny_model_dir, tmp_path, monkeypatch, mode):
    from peft import LoraConfig, get_peft_model

    full = mode == "full"
    tokenizer = convert_data.load_tokenizer(tiny_model_dir, special_end_token=full)   # as finetune.py's
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    if full:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    else:
        model = get_peft_model(model, LoraConfig(r=config.LORA_R, target_modules=config.LORA_TARGET_MODULES))
    ckpt = write_checkpoint(str(tmp_path / "ckpt"), model, tokenizer, monkeypatch)
    for name in (model_files.SENTENCEPIECE_FILE, model_files.TEMPLATE_FILE, model_files.GENERATION_FILE):
        assert os.path.isfile(os.path.join(ckpt, name)), name
    # inference.py, the API server and the web demo load it like this
    loaded = (model_loader.load_model_and_tokenizer(ckpt, quant="fp32", device="cpu") if full else
              model_loader.load_model_and_tokenizer(tiny_model_dir, lora_path=ckpt, quant="fp32", device="cpu"))[1]
    dialogues = spaced_dialogues()
    data_file = str(tmp_path / "dialogues.json")
    data_io.atomic_write_json(data_file, dialogues)
    wanted = converted_prompts(tiny_model_dir, tmp_path, data_file, full)
    checked = {"segments": 0, "chat": 0}
    for dialogue in dialogues:
        for end in range(1, len(dialogue) + 1):
            turns = [dict(t) for t in dialogue[:end]]
            turns[-1]["output"] = None
            ids = prompt.encode_segments(loaded, prompt.conversation_segments(turns, "zh"))[0]
            if tuple(ids) not in wanted:
                pytest.fail(f"{mode} checkpoint: the prompt for {turns[-1]['instruction']!r} is not what "
                            f"convert_data.py produced")
            checked["segments"] += 1
            if any(t["input"] for t in turns):
                continue          # chat messages carry no input field
            history = [(t["instruction"], t["output"]) for t in turns[:-1]]
            query = turns[-1]["instruction"]
            assert chat.encode_prompt(loaded, history, query) == ids                     # inference.py
            messages = [{"role": r, "content": c} for pair in history for r, c in zip(("user", "assistant"), pair)]
            meta, pairs, last = prompt.split_messages(messages + [{"role": "user", "content": query}])
            api = chat.build_prompt(loaded, pairs, last, None, 10**6, 1, meta)           # the API server
            web = chat.build_prompt(loaded, *web_demo.conversation(messages, query, "")[1:], None, 10**6, 1)
            assert api.input_ids == ids and web.input_ids == ids
            checked["chat"] += 1
    assert checked["segments"] > 800 and checked["chat"] > 400, checked
