"""Prompt building: the ONE place where a CuteGPT prompt is turned into text.

A conversation is rendered as a list of *segments* ``(text, learned)``:

    META_PROMPT                                   learned=False
    question of turn 1   (template, e.g. 问：…\n答：)  learned=False
    answer of turn 1 + END_MARKER                 learned=True
    TURN_SEPARATOR + question of turn 2           learned=False
    answer of turn 2 + END_MARKER                 learned=True
    ...

Every segment is tokenized on its own (no special tokens) and the ids are concatenated.
convert_data.py does this for training samples; chat.py does it for the prompt of a new query
(history turns with their answers, then the new question).  Because both go through
``conversation_segments`` and ``encode_segments``, the ids inference feeds equal, token for
token, the ids the model was trained on up to where the answer starts.
"""
import os
import random

import sentencepiece

import config


def pick_templates(turn, rng, template):
    """Return (turn template name, input template) for one turn.

    template == "random": the seed's behaviour, one template drawn per turn among those that fit
    (with or without input) and one input template drawn from config.INPUT_TEMPLATES.
    Otherwise the named template is used for every turn and the input is inserted as it is.
    """
    return template_picker(template, rng)(turn)


def template_picker(template, rng):
    """A function turn -> (turn template name, input template): ``pick_templates`` with its lookups done
    once, for drawing the templates of many turns in a row (the same draws, in the same order)."""
    if template == "random":
        choice, input_templates = rng.choice, config.INPUT_TEMPLATES
        plain = [name for name, parts in config.TURN_TEMPLATES.items() if parts["plain"] is not None]
        with_input = [name for name, parts in config.TURN_TEMPLATES.items() if parts["with_input"] is not None]

        def pick(turn):
            if turn.get("input"):
                name = choice(with_input)          # the turn template first, then the input template
                return name, choice(input_templates)
            return choice(plain), None
        return pick
    if template not in config.TURN_TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose 'random' or one of {template_names()}")
    # a template that only exists for turns with an input falls back to the chat template
    pinned = {kind: (template if config.TURN_TEMPLATES[template][kind] is not None else config.INFERENCE_TEMPLATE,
                     config.PINNED_INPUT_TEMPLATE) for kind in ("plain", "with_input")}
    return lambda turn: pinned["with_input" if turn.get("input") else "plain"]


def template_names():
    return sorted(config.TURN_TEMPLATES)


def question_text(instruction, input_text, template_name, input_template):
    """The question part of one turn, ending where the answer starts."""
    parts = config.TURN_TEMPLATES[template_name]
    if input_text:
        return parts["with_input"].format(instruction=instruction, input=input_template.format(input_text))
    return parts["plain"].format(instruction=instruction)


class AnswerText(str):
    """The text of an answer segment: the answer, then the template's END_MARKER.  A str (code that reads
    segments as text needs no change); tokenize_segment_texts gives its final END_MARKER the marker's own
    id where the tokenizer has '<end>' as one token (full fine-tuning), while an '<end>' written in any
    text, this answer's included, stays characters: control tokens come only from the template."""


def answer_text(output):
    """The learned part of one turn: the answer closed by the end marker."""
    return AnswerText(output + config.END_MARKER)


def conversation_segments(turns, template=config.INFERENCE_TEMPLATE, rng=None, meta_prompt=None):
    """Segments for a list of turns.

    Each turn is a dict with 'instruction', optional 'input' and optional 'output'.  A turn whose
    'output' is None is the open question of a chat: its segment ends at the answer start and
    it must be the last turn.
    """
    rng = rng or random.Random(0)
    pick = template_picker(template, rng)
    return render_segments(turns, [pick(turn) for turn in turns], meta_prompt)


def render_segments(turns, picks, meta_prompt=None):
    """Segments of ``turns`` rendered with the template picks drawn for them (one per turn)."""
    segments = [(config.META_PROMPT if meta_prompt is None else meta_prompt, False)]
    last = len(turns) - 1
    for index, (turn, (name, input_template)) in enumerate(zip(turns, picks)):
        question = question_text(turn["instruction"], turn.get("input") or "", name, input_template)
        segments.append((config.TURN_SEPARATOR + question if index else question, False))
        output = turn.get("output")
        if output is None:
            if index != last:
                raise ValueError("only the last turn of a conversation may lack an output")
            break
        segments.append((answer_text(output), True))
    return segments


def chat_turns(history, query, input_text=""):
    """Turns for a chat prompt: (query, response) pairs of history, then the open query."""
    turns = [{"instruction": q, "input": "", "output": r} for q, r in history]
    turns.append({"instruction": query, "input": input_text, "output": None})
    return turns


class MessageError(ValueError):
    """A chat message list that is no CuteGPT conversation; ``param`` names the offending field
    (e.g. 'messages[2].role')."""

    def __init__(self, message, param="messages"):
        super().__init__(message)
        self.param = param


SYSTEM_ROLES = ("system", "developer")   # 'developer' is OpenAI's newer name for the system role


def message_text(content, param):
    """The text of a message's content: a string, or a list of text parts ({'type': 'text', 'text': ...})."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for index, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise MessageError("only text content is supported: each content part must be "
                                   "{'type': 'text', 'text': '...'}", f"{param}[{index}]")
            texts.append(part["text"])
        return "".join(texts)
    raise MessageError("content must be a string or a list of text parts", param)


def split_messages(messages):
    """(meta_prompt, history, query) from chat messages ({'role', 'content'} dicts, as the OpenAI API
    and gradio send them): system messages at the start replace config.META_PROMPT (joined by
    newlines, a final newline added, as META_PROMPT ends in one; None when there are none), then
    user/assistant turns alternate, starting and ending with a user message."""
    if not isinstance(messages, list) or not messages:
        raise MessageError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    system, turns = [], []
    for index, message in enumerate(messages):
        param = f"messages[{index}]"
        if not isinstance(message, dict):
            raise MessageError("each message must be an object with 'role' and 'content'", param)
        role = message.get("role")
        if role not in SYSTEM_ROLES + ("user", "assistant"):
            raise MessageError(f"unknown role {role!r}: use one of 'system', 'user', 'assistant'", f"{param}.role")
        text = message_text(message.get("content"), f"{param}.content")
        if role in SYSTEM_ROLES:
            if turns:
                raise MessageError("system messages must come before the user and assistant messages", f"{param}.role")
            system.append(text)
            continue
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if role != expected:
            raise MessageError(f"expected a {expected} message here: user and assistant messages must alternate, "
                               f"starting with a user message", f"{param}.role")
        turns.append(text)
    if len(turns) % 2 == 0:
        raise MessageError("the last message must be a user message (the one to answer)")
    meta_prompt = None
    if system:
        meta_prompt = "\n".join(system)
        if meta_prompt and not meta_prompt.endswith("\n"):
            meta_prompt += "\n"
    history = [(turns[i], turns[i + 1]) for i in range(0, len(turns) - 1, 2)]
    return meta_prompt, history, turns[-1]


def end_marker_id(tokenizer):
    """The id of config.END_MARKER where the tokenizer holds it as one added token, else None."""
    return tokenizer.get_added_vocab().get(config.END_MARKER)


def split_marked(texts, end_id):
    """(texts to encode as text, marked): answer texts (AnswerText) lose their final END_MARKER when
    ``end_id`` is an id for it; marked[i] says whether text i gets ``end_id`` appended."""
    if end_id is None:
        return list(texts), None
    cut = len(config.END_MARKER)
    marked = [isinstance(t, AnswerText) and t.endswith(config.END_MARKER) for t in texts]
    if not any(marked):
        return list(texts), None
    return [t[:-cut] if m else t for t, m in zip(texts, marked)], marked


def with_marks(token_lists, marked, end_id):
    if marked is None:
        return token_lists
    return [list(ids) + [end_id] if m else ids for ids, m in zip(token_lists, marked)]


class SentencePieceSegments:
    """Batched, multi-threaded SentencePiece encoding: a LLaMA tokenizer's ids.

    LLaMA tokenizers ship ``tokenizer.model``; encoding with it directly is what the original
    CuteGPT's slow LlamaTokenizer did, and it is several times faster than the Hugging Face BPE on
    long unsplit Chinese runs.  Every text is encoded as text ('<s>', '</s>', '<end>' in it are
    characters); only the END_MARKER that closes an answer segment (AnswerText) becomes the '<end>' id,
    where the tokenizer has one (full fine-tuning).
    """

    def __init__(self, tokenizer, processor):
        self.processor = processor
        self.end_id = end_marker_id(tokenizer)
        self.threads = max(1, min(8, os.cpu_count() or 1))

    def encode(self, texts, threads=None):
        texts, marked = split_marked(texts, self.end_id)
        return with_marks(self.processor.encode(texts, num_threads=threads or self.threads), marked, self.end_id)


_SEGMENT_ENCODERS = {}


def segment_encoder(tokenizer):
    """The SentencePiece fast path for ``tokenizer``, or None where it does not apply.

    It applies when the tokenizer has a tokenizer.model whose pieces carry the same ids as the
    tokenizer's vocabulary (checked on every piece); otherwise the tokenizer itself is used.
    """
    vocab_file = getattr(tokenizer, "vocab_file", None)
    key = (id(tokenizer), vocab_file, len(tokenizer))
    if key not in _SEGMENT_ENCODERS:
        encoder = None
        if vocab_file and os.path.isfile(vocab_file):
            processor = sentencepiece.SentencePieceProcessor(model_file=vocab_file)
            vocab = tokenizer.get_vocab()
            pieces = [processor.id_to_piece(i) for i in range(processor.get_piece_size())]
            if all(vocab.get(piece) == i for i, piece in enumerate(pieces)):
                encoder = SentencePieceSegments(tokenizer, processor)
        _SEGMENT_ENCODERS[key] = encoder
    return _SEGMENT_ENCODERS[key]


def tokenize_segment_texts(tokenizer, texts, threads=None):
    """Token ids of each text, tokenized on its own without special tokens (one batched call).

    Training (convert_data.py, dataset.py) and inference (chat.py, the API server) all come here, so
    they always agree.  Text is encoded as text: '<s>', '</s>', '<end>' written by a user are
    characters; control ids come only from the template (the END_MARKER closing an AnswerText).  LLaMA
    tokenizers go through SentencePiece itself (``segment_encoder``; ``threads``: its encoding threads,
    default min(8, cores); convert_data.py passes --threads), others through the Hugging Face
    tokenizer's batch call.  Both release the GIL while they encode, so another thread's Python work
    runs meanwhile (dataset.tokenize_samples' pipeline).
    """
    if not texts:
        return []
    encoder = segment_encoder(tokenizer)
    if encoder is not None:
        return encoder.encode(texts, threads)
    end_id = end_marker_id(tokenizer)
    plain, marked = split_marked(texts, end_id)
    ids = tokenizer(plain, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return with_marks(ids, marked, end_id)


def encode_segments(tokenizer, segments):
    """(input_ids, labels) for a list of segments: labels are -100 where learned is False."""
    input_ids, labels = [], []
    for (text, learned), ids in zip(segments, tokenize_segment_texts(tokenizer, [t for t, _ in segments])):
        input_ids.extend(ids)
        labels.extend(ids if learned else [-100] * len(ids))
    return input_ids, labels


# ----------------------------------------------------------------------------------------------
# C-Eval prompts (evaluate_ceval.py, and the tests that train on them)
# ----------------------------------------------------------------------------------------------
def ceval_question(row):
    """One question with its four options, ending at the answer prompt (config.CEVAL['question'])."""
    return config.CEVAL["question"].format(**{key: row[key] for key in ("question", "A", "B", "C", "D")})


def ceval_prompt(subject_name, row, examples=()):
    """The C-Eval prompt of ``row``: the subject header, the solved ``examples`` (few-shot), then the
    question; the model's next token after it is the answer letter."""
    parts = [config.CEVAL["header"].format(subject=subject_name)]
    for example in examples:
        parts.append(ceval_question(example) + config.CEVAL["answer"].format(answer=example["answer"]))
    parts.append(ceval_question(row))
    return "".join(parts)
