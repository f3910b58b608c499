"""Safe reading and atomic writing of the project's files.

- Every .pkl the project reads goes through ``RestrictedUnpickler``: plain containers and
  scalars only.  A pickle that names any class or function (the way a malicious pickle runs code)
  is refused before anything is called.
- Dialogue files (.pkl, .json, .jsonl) are validated turn by turn; a bad one raises ``DataError``
  naming the file, the dialogue index and the turn index.
- Files and directories are written to a temporary name and renamed into place, so a crash or a
  bad input never leaves half a file behind.
"""
import io
import json
import os
import pickle
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager

TURN_KEYS = ("instruction", "input", "output")


class DataError(Exception):
    """A user's file or argument is wrong; the message says which and how to fix it."""


def fail(message, code=2):
    """Print one clear error line and exit (no traceback for user mistakes)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def note(message):
    """Print one notice line for the user on stderr."""
    print(f"note: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# restricted unpickling
# ----------------------------------------------------------------------------------------------
class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles lists, dicts, tuples, sets, str, bytes, int, float, bool and None only.

    Those types are built by pickle opcodes directly; anything else needs ``find_class``, which
    refuses every name, so no constructor or function named by the file is ever called.
    """

    def find_class(self, module, name):
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: this file may only hold lists, dicts and plain values"
        )


def safe_load_pickle(path):
    """Load a pickle with ``RestrictedUnpickler``; raises DataError with the file name."""
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f).load()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found")
    except pickle.UnpicklingError as e:
        raise DataError(f"{path}: unsafe or invalid pickle ({e})")
    except (EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError) as e:
        raise DataError(f"{path}: not a readable pickle ({type(e).__name__}: {e})")


def safe_loads_pickle(data):
    return RestrictedUnpickler(io.BytesIO(data)).load()


# ----------------------------------------------------------------------------------------------
# atomic writes
# ----------------------------------------------------------------------------------------------
def atomic_write_bytes(path, data):
    """Write ``data`` to ``path`` through a temporary file in the same directory, then rename."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_pickle(path, obj):
    atomic_write_bytes(path, pickle.dumps(obj, protocol=4))


def atomic_write_json(path, obj):
    atomic_write_bytes(path, (json.dumps(obj, ensure_ascii=False, indent=1) + "\n").encode("utf-8"))


@contextmanager
def atomic_directory(final_path):
    """Yield a temporary directory beside ``final_path``; rename it into place on success.

    On any exception the temporary directory is removed and ``final_path`` is left as it was.
    An existing ``final_path`` is replaced only after the new one is complete.
    """
    parent = os.path.dirname(os.path.abspath(final_path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(final_path) + "-", dir=parent)
    try:
        yield tmp
        if os.path.exists(final_path):
            old = tmp + ".old"
            os.replace(final_path, old)
            os.replace(tmp, final_path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------------------------
# dialogues
# ----------------------------------------------------------------------------------------------
def _read_json_records(path):
    if path.endswith(".jsonl"):
        # line by line: the whole file as one str, then its lines, would be two copies of the text in
        # fresh memory; and a JSON Lines file is split at newlines only (str.splitlines would also split
        # at U+2028 and other separators that may stand unescaped inside a JSON string)
        records = []
        with open(path, "r", encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if line.isspace():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: line {line_no} is not valid JSON ({e.msg}); fix or remove that line")
        return records
    with open(path, "r", encoding="utf-8") as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})")


def load_dialogues(path):
    """Read dialogues from .pkl, .json or .jsonl and validate them.

    Accepted shapes: a list of dialogues, each a list of turns {'instruction', 'input', 'output'};
    or Alpaca-style single-turn records {'instruction', 'input'?, 'output'} (each becomes a
    one-turn dialogue; a missing 'input' means none).  Returns a list of lists of dicts.
    """
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found (give a .pkl, .json or .jsonl file of dialogues)")
    if path.endswith(".pkl"):
        data = safe_load_pickle(path)
    elif path.endswith(".json") or path.endswith(".jsonl"):
        try:
            data = _read_json_records(path)
        except UnicodeDecodeError:
            raise DataError(f"{path}: not UTF-8 text")
    else:
        raise DataError(f"{path}: unknown file type; use .pkl, .json or .jsonl")
    return validate_dialogues(data, path)


def validate_dialogues(data, path):
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of dialogues, found {type(data).__name__}")
    if not data:
        raise DataError(f"{path}: holds no dialogues")
    dialogues = []
    for d_index, dialogue in enumerate(data):
        if isinstance(dialogue, dict):  # Alpaca-style single-turn record
            dialogue = [dict(dialogue, input=dialogue.get("input", ""))]
        turns = _clean_turns(dialogue)
        dialogues.append(turns if turns is not None else _checked_turns(dialogue, f"{path}: dialogue {d_index}"))
    return dialogues


def _clean_turns(dialogue):
    """The fast path of validation: the turns of a well-formed dialogue (plain dicts whose three fields
    are plain str, instruction and output not blank), as dicts of the three keys in TURN_KEYS order (a
    turn that already is one is kept as it is, a copy made of the others); None where anything is off
    (or merely unusual, such as a str subclass), for ``_checked_turns`` to judge and name."""
    if type(dialogue) is not list or not dialogue:
        return None
    turns = []
    for turn in dialogue:
        if type(turn) is not dict:
            return None
        canonical = tuple(turn) == TURN_KEYS
        if canonical:
            instruction, input_text, output = turn.values()
        else:
            instruction, input_text, output = turn.get("instruction"), turn.get("input"), turn.get("output")
        if not (type(instruction) is str and type(input_text) is str and type(output) is str
                and instruction.strip() and output.strip()):
            return None
        turns.append(turn if canonical else {"instruction": instruction, "input": input_text, "output": output})
    return turns


def _checked_turns(dialogue, where):
    """The turns of one dialogue, each checked with a DataError naming what is wrong (and where)."""
    if not isinstance(dialogue, list):
        raise DataError(f"{where}: expected a list of turns, found {type(dialogue).__name__}")
    if not dialogue:
        raise DataError(f"{where}: empty dialogue (it needs at least one turn); remove it")
    turns = []
    for t_index, turn in enumerate(dialogue):
        where_turn = f"{where}, turn {t_index}"
        if not isinstance(turn, dict):
            raise DataError(f"{where_turn}: expected a dict with keys {list(TURN_KEYS)}, found {type(turn).__name__}")
        missing = [k for k in TURN_KEYS if k not in turn]
        if missing:
            raise DataError(f"{where_turn}: missing key(s) {missing}; every turn needs {list(TURN_KEYS)}")
        for key in TURN_KEYS:
            if not isinstance(turn[key], str):
                raise DataError(f"{where_turn}: field '{key}' must be a string, found {type(turn[key]).__name__}")
        if not turn["instruction"].strip():
            raise DataError(f"{where_turn}: empty 'instruction'; every turn needs a question")
        if not turn["output"].strip():
            raise DataError(f"{where_turn}: empty 'output'; every turn needs an answer to learn")
        turns.append({k: turn[k] for k in TURN_KEYS})
    return turns


def load_documents(path, text_field="text"):
    """Plain-text documents for pre-training: a .txt file holds documents separated by a blank line,
    a .jsonl file one JSON object per line with the text in ``text_field``.  Empty ones are skipped."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found (give a .txt or .jsonl file of text)")
    if not path.endswith((".txt", ".jsonl")):
        raise DataError(f"{path}: unknown file type for pre-training text; use .txt (documents separated by a "
                        f"blank line) or .jsonl (one object per line)")
    try:
        if path.endswith(".txt"):
            with open(path, "r", encoding="utf-8") as f:
                text = f.read().replace("\r\n", "\n")
            documents = [doc.strip("\n") for doc in re.split(r"\n[ \t]*\n", text)]
        else:
            documents = []
            for line_no, record in enumerate(_read_json_records(path), 1):
                value = record.get(text_field) if isinstance(record, dict) else None
                if not isinstance(value, str):
                    raise DataError(f"{path}: record {line_no} has no string field '{text_field}'; "
                                    f"name the field with --text_field")
                documents.append(value)
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text")
    documents = [doc for doc in documents if doc.strip()]
    if not documents:
        raise DataError(f"{path}: holds no text")
    return documents


def check_writable_dir(path, what="directory"):
    """Raise DataError unless ``path`` exists (or can be created) and is writable."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise DataError(f"{path}: cannot create the {what} ({e.strerror}); pick a writable path")
    try:   # a real write: permissions alone miss read-only file systems (and root passes every access check)
        fd, probe = tempfile.mkstemp(prefix=".tmp-probe-", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise DataError(f"{path}: the {what} is not writable ({e.strerror}); pick a writable path")
