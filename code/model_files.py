"""The files that make a directory this project writes usable on its own and by serving engines.

Every place that writes a model, checkpoint or tokenizer directory (build_tiny_model.py, the demo model,
finetune.py's checkpoints, merge_lora.py, extend_vocab.py) ends with ``save_tokenizer`` or
``write_model_files``, which put there:

- tokenizer.model: the SentencePiece model the tokenizer was read from.  transformers 5 saves none, and
  without it the directory's tokenizer is transformers' rebuild, whose ids differ from SentencePiece's
  on leading and repeated spaces; with it prompt.segment_encoder encodes exactly as the data was.
- chat_template.jinja: the CuteGPT prompt, generated from config.py's templates (the one source), so that
  ``tokenizer.apply_chat_template(messages, add_generation_prompt=True)`` (what vLLM, SGLang, TGI and
  ``transformers serve`` call) gives the ids prompt.py builds.  prompt.py encodes each segment on its own,
  each with SentencePiece's dummy prefix '▁'; the engine tokenizes the rendered text in one piece and
  adds that prefix only where a text section starts.  The template therefore writes a space in front of
  every segment the tokenizer would not prefix itself: a merge across the space cannot happen, since
  LLaMA-style pieces hold '▁' only at their start (or are all '▁'), and no segment ends in a space
  (meta prompts end in a newline, questions in the answer cue, answers in the end marker).
- generation_config.json: the ids that end an answer (eos, the seed's '<s>', and the end marker when it
  is one token: engines honour eos_token_id) and, where the marker is text of several tokens,
  stop_strings (honoured by transformers' generate when handed the tokenizer, as ``transformers serve``
  does; vLLM takes a request's ``stop`` instead).
"""
import json
import os
import shutil
import string

from transformers import AutoTokenizer

import config
import prompt
import sp_convert

# the version of what this module writes: the demo model's cache is rebuilt when it changes
FORMAT = 1
TEMPLATE_FILE = "chat_template.jinja"
GENERATION_FILE = "generation_config.json"
SENTENCEPIECE_FILE = "tokenizer.model"


# ----------------------------------------------------------------------------------------------
# tokenizer.model
# ----------------------------------------------------------------------------------------------
def copy_sentencepiece_model(tokenizer, directory, fallbacks=()):
    """Copy into ``directory`` the tokenizer.model ``tokenizer`` was read from (its vocab_file, else the one
    in the directory it was loaded from, else the first of the ``fallbacks``, files or directories, that
    exists); returns the source used, or None where there is none (a tokenizer that only ever had a
    tokenizer.json)."""
    target = os.path.join(directory, SENTENCEPIECE_FILE)
    sources = [getattr(tokenizer, "vocab_file", None), getattr(tokenizer, "name_or_path", None)] + list(fallbacks)
    candidates = [os.path.join(s, SENTENCEPIECE_FILE) if s and os.path.isdir(s) else s for s in sources]
    for source in candidates:
        if source and os.path.isfile(source):
            if not (os.path.exists(target) and os.path.samefile(source, target)):
                shutil.copyfile(source, target)
            return source
    return target if os.path.isfile(target) else None


# ----------------------------------------------------------------------------------------------
# the chat template
# ----------------------------------------------------------------------------------------------
def jinja_string(text):
    """A Jinja string literal for ``text`` (Jinja reads Python-style escapes, and JSON's are among them)."""
    return json.dumps(text, ensure_ascii=False)


def jinja_format(template, fields):
    """A Jinja expression for ``template.format(**values)``: literal parts and the variables ``fields``
    names for each placeholder ({instruction} -> content, ...)."""
    parts = []
    for literal, field, spec, conversion in string.Formatter().parse(template):
        if literal:
            parts.append(jinja_string(literal))
        if field is not None:
            if spec or conversion:
                raise ValueError(f"config.py template {template!r}: only plain {{{field}}} placeholders are supported")
            parts.append(fields[field])
    return " ~ ".join(parts) if parts else '""'


def chat_template(end_is_token, prefix_after_token):
    """The Jinja chat template of the project's prompt (config.INFERENCE_TEMPLATE, the meta prompt or the
    system messages, multi-turn history, an optional 'input' field on user messages).

    ``end_is_token``: END_MARKER is one added token of the tokenizer (full fine-tuning); the engine then
    cuts the text there.  ``prefix_after_token``: the tokenizer gives the text after an added token its
    own dummy prefix (as SentencePiece does for the part after it in prompt.SentencePieceSegments).
    """
    turn = config.TURN_TEMPLATES[config.INFERENCE_TEMPLATE]
    question = jinja_format(turn["plain"], {"instruction": "content"})
    with_input = jinja_format(turn["with_input"], {
        "instruction": "content", "input": jinja_format(config.PINNED_INPUT_TEMPLATE, {"": "message.input"})})
    after_end = "true" if end_is_token and prefix_after_token else "false"
    # the answer: with the marker a token, an empty answer is the token alone (no prefix, no space)
    answer = ("{%- if content -%}{{- space ~ content -}}{%- endif -%}{{- END -}}" if end_is_token
              else "{{- space ~ content ~ END -}}")
    lines = [
        "{#- CuteGPT's prompt, generated by code/model_files.py from code/config.py: edit those, not this file.",
        "    Each segment starts with a space unless the tokenizer adds the dummy prefix there itself, so the",
        "    ids equal prompt.py's segment-by-segment encoding.  add_generation_prompt changes nothing: a user",
        "    turn always ends at the answer cue.  A user message may carry an 'input' field. -#}",
        "{%- set META = " + jinja_string(config.META_PROMPT) + " -%}",
        "{%- set END = " + jinja_string(config.END_MARKER) + " -%}",
        "{%- set SEPARATOR = " + jinja_string(config.TURN_SEPARATOR) + " -%}",
        "{%- macro text_of(message) -%}",
        "{%- if message.content is string -%}{{- message.content -}}",
        "{%- elif message.content is iterable -%}",
        "{%- for part in message.content -%}{%- if part.type == 'text' -%}{{- part.text -}}{%- endif -%}{%- endfor -%}",
        "{%- endif -%}",
        "{%- endmacro -%}",
        "{%- set ns = namespace(system=[], fresh=true, turns=0) -%}",
        "{%- for message in messages -%}",
        "{%- if message.role in ['system', 'developer'] -%}{%- set ns.system = ns.system + [text_of(message)] -%}"
        "{%- endif -%}",
        "{%- endfor -%}",
        "{%- if ns.system -%}{%- set meta = ns.system | join('\\n') -%}",
        "{%- if meta and not meta.endswith('\\n') -%}{%- set meta = meta ~ '\\n' -%}{%- endif -%}",
        "{%- else -%}{%- set meta = META -%}{%- endif -%}",
        "{{- meta -}}{%- if meta -%}{%- set ns.fresh = false -%}{%- endif -%}",
        "{%- for message in messages -%}",
        "{%- set content = text_of(message) -%}",
        "{%- set space = '' if ns.fresh else ' ' -%}",
        "{%- if message.role == 'user' -%}",
        "{%- set separator = SEPARATOR if ns.turns > 0 else '' -%}",
        "{%- if message.input is defined and message.input -%}{{- space ~ separator ~ " + with_input + " -}}",
        "{%- else -%}{{- space ~ separator ~ " + question + " -}}{%- endif -%}",
        "{%- set ns.turns = ns.turns + 1 -%}{%- set ns.fresh = false -%}",
        "{%- elif message.role == 'assistant' -%}",
        answer,
        "{%- set ns.fresh = " + after_end + " -%}",
        "{%- endif -%}",
        "{%- endfor -%}",
    ]
    return "\n".join(lines) + "\n"


def prefixes_after_token(tokenizer):
    """Whether ``tokenizer`` gives the text after an added token its own dummy prefix: the ids of
    END_MARKER + TURN_SEPARATOR equal the marker's id followed by the separator's ids alone."""
    end = prompt.end_marker_id(tokenizer)
    if end is None:
        return False
    alone = tokenizer(config.TURN_SEPARATOR, add_special_tokens=False)["input_ids"]
    joined = tokenizer(config.END_MARKER + config.TURN_SEPARATOR, add_special_tokens=False)["input_ids"]
    return joined == [end] + alone


def template_for(tokenizer):
    """The chat template for the tokenizer as an engine loads it from the directory."""
    return chat_template(prompt.end_marker_id(tokenizer) is not None, prefixes_after_token(tokenizer))


# ----------------------------------------------------------------------------------------------
# generation config
# ----------------------------------------------------------------------------------------------
def stop_ids(tokenizer):
    """The ids that end an answer: eos, '<s>' (the seed's stop) and the end marker where it is one token
    (chat.stop_token_ids, which this module cannot import without a cycle: the tests check they agree)."""
    ids = [tokenizer.eos_token_id, tokenizer.bos_token_id, prompt.end_marker_id(tokenizer)]
    return sorted({i for i in ids if i is not None})


def generation_values(tokenizer, overrides=None):
    """The generation_config.json entries this project sets (``overrides``: more of them, e.g. the demo's
    greedy settings)."""
    values = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": stop_ids(tokenizer)}
    if prompt.end_marker_id(tokenizer) is None:
        values["stop_strings"] = [config.END_MARKER]
    values.update(overrides or {})
    return values


def write_generation_config(directory, tokenizer, overrides=None):
    """Merge the project's entries into ``directory``/generation_config.json (written by the model's
    save_pretrained where there is a model; created otherwise, e.g. in a LoRA adapter directory)."""
    path = os.path.join(directory, GENERATION_FILE)
    current = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            current = json.load(f)
    current.update(generation_values(tokenizer, overrides))
    current["_from_model_config"] = False   # no longer a copy of config.json's values
    write_json(path, current)


def write_json(path, obj):
    """A plain write with the usual permissions: every caller writes into a temporary directory that is
    renamed into place once complete (data_io.atomic_directory)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
        f.write("\n")


# ----------------------------------------------------------------------------------------------
# the entry points
# ----------------------------------------------------------------------------------------------
def _engine_config(directory):
    """tokenizer_config.json as engines read it: the rendered chat template is tokenized in one piece, so the
    control tokens it writes ('<end>' after full fine-tuning) must be parsed as tokens there
    (split_special_tokens false).  The project's own loader encodes text as text whatever this says
    (model_loader.load_tokenizer); in an engine a control token typed by a user is parsed too (docs/serving.md)."""
    path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        tokenizer_config = json.load(f)
    tokenizer_config.pop("chat_template", None)   # a base model's entry would shadow ours for old readers
    tokenizer_config["split_special_tokens"] = False
    write_json(path, tokenizer_config)


def write_model_files(directory, sentencepiece_sources=(), generation=None):
    """Complete a directory that already holds the tokenizer's files: tokenizer.model (copied from the first
    of ``sentencepiece_sources`` that exists, files or directories; else the one there is kept), the chat template
    and the generation config (``generation``: extra entries).  Returns the tokenizer as engines load it."""
    copy_sentencepiece_model(None, directory, sentencepiece_sources)
    if os.path.isfile(os.path.join(directory, SENTENCEPIECE_FILE)):
        # tokenizer.json and tokenizer_config.json rewritten from tokenizer.model: SentencePiece's ids for
        # every reader (transformers' own LlamaTokenizer differs on leading spaces and appended pieces)
        sp_convert.load_llama_tokenizer(directory).save_pretrained(directory)
    _engine_config(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)   # what vLLM / transformers serve will see
    with open(os.path.join(directory, TEMPLATE_FILE), "w", encoding="utf-8") as f:
        f.write(template_for(tokenizer))
    write_generation_config(directory, tokenizer, generation)
    return tokenizer


def save_tokenizer(directory, tokenizer, fallbacks=(), generation=None):
    """``tokenizer.save_pretrained(directory)`` plus everything ``write_model_files`` adds; the
    tokenizer.model copied is the one ``tokenizer`` was read from, else the first of ``fallbacks``."""
    tokenizer.save_pretrained(directory)
    copy_sentencepiece_model(tokenizer, directory, fallbacks)
    return write_model_files(directory, (), generation)
