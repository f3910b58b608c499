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
import random

import config


def pick_templates(turn, rng, template):
    """Return (turn template name, input template) for one turn.

    template == "random": the seed's behaviour, one template drawn per turn among those that fit
    (with or without input) and one input template drawn from config.INPUT_TEMPLATES.
    Otherwise the named template is used for every turn and the input is inserted as it is.
    """
    has_input = bool(turn.get("input"))
    kind = "with_input" if has_input else "plain"
    if template == "random":
        names = [name for name, parts in config.TURN_TEMPLATES.items() if parts[kind] is not None]
        name = rng.choice(names)
        input_template = rng.choice(config.INPUT_TEMPLATES) if has_input else None
        return name, input_template
    if template not in config.TURN_TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose 'random' or one of {template_names()}")
    if config.TURN_TEMPLATES[template][kind] is None:
        # this template only exists for turns with an input: fall back to the chat template
        template = config.INFERENCE_TEMPLATE
    return template, config.PINNED_INPUT_TEMPLATE


def template_names():
    return sorted(config.TURN_TEMPLATES)


def question_text(instruction, input_text, template_name, input_template):
    """The question part of one turn, ending where the answer starts."""
    parts = config.TURN_TEMPLATES[template_name]
    if input_text:
        return parts["with_input"].format(instruction=instruction, input=input_template.format(input_text))
    return parts["plain"].format(instruction=instruction)


def answer_text(output):
    """The learned part of one turn: the answer closed by the end marker."""
    return output + config.END_MARKER


def conversation_segments(turns, template=config.INFERENCE_TEMPLATE, rng=None, meta_prompt=None):
    """Segments for a list of turns.

    Each turn is a dict with 'instruction', optional 'input' and optional 'output'.  A turn whose
    'output' is None is the open question of a chat: its segment ends at the answer start and
    it must be the last turn.
    """
    rng = rng or random.Random(0)
    segments = [(config.META_PROMPT if meta_prompt is None else meta_prompt, False)]
    for index, turn in enumerate(turns):
        name, input_template = pick_templates(turn, rng, template)
        question = question_text(turn["instruction"], turn.get("input") or "", name, input_template)
        if index > 0:
            question = config.TURN_SEPARATOR + question
        segments.append((question, False))
        output = turn.get("output")
        if output is None:
            if index != len(turns) - 1:
                raise ValueError("only the last turn of a conversation may lack an output")
            break
        segments.append((answer_text(output), True))
    return segments


def chat_turns(history, query, input_text=""):
    """Turns for a chat prompt: (query, response) pairs of history, then the open query."""
    turns = [{"instruction": q, "input": "", "output": r} for q, r in history]
    turns.append({"instruction": query, "input": input_text, "output": None})
    return turns


def tokenize_segment_texts(tokenizer, texts):
    """Token ids of each text, tokenized on its own without special tokens (one batched call)."""
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def encode_segments(tokenizer, segments):
    """(input_ids, labels) for a list of segments: labels are -100 where learned is False."""
    input_ids, labels = [], []
    for (text, learned), ids in zip(segments, tokenize_segment_texts(tokenizer, [t for t, _ in segments])):
        input_ids.extend(ids)
        labels.extend(ids if learned else [-100] * len(ids))
    return input_ids, labels
