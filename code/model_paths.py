"""Where a model comes from: a local directory, or a Hugging Face id looked up in the local cache first
and fetched when the Hub can be reached.  model_loader calls ``resolve_path`` for every path it is given;
every user mistake raises ``LoaderError`` naming the flag and the fix.
"""
import os
import socket
from urllib.parse import urlparse

from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError

from data_io import DataError

# Seconds to wait for the Hugging Face Hub to answer a connection before calling it unreachable
# (without this probe huggingface_hub retries for ~25 s before failing on an offline machine).
HUB_PROBE_TIMEOUT_S = 5

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


class LoaderError(DataError):
    """A model, adapter or option given by the user cannot be used; the message says how to fix it."""


def _looks_local(path):
    """A Hugging Face id is 'name' or 'owner/name'; anything else is meant as a local path."""
    return path.startswith((".", "/", "~")) or path.count("/") > 1 or "\\" in path


def _hub_reachable():
    """(True, '') when a TCP connection to the Hub's endpoint opens, else (False, reason)."""
    if constants.HF_HUB_OFFLINE:
        return False, "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S).close()
        return True, ""
    except OSError as e:
        return False, f"{host} cannot be reached: {e.strerror or e}"


def _hub_patterns(repo_id):
    """Files worth downloading: configs, tokenizer, and one weight format (safetensors first)."""
    files = HfApi().list_repo_files(repo_id)
    patterns = ["*.json", "*.model", "*.txt"]
    patterns.append("*.safetensors" if any(f.endswith(".safetensors") for f in files) else "*.bin")
    return patterns


def resolve_path(path, flag="--model_path"):
    """A local directory for ``path``: the directory itself, or the snapshot of a Hugging Face id
    (from the local cache, else downloaded).  Raises LoaderError naming ``flag`` and the fix."""
    if not path:
        raise LoaderError(f"{flag}: empty path; give a local model directory or a Hugging Face id")
    expanded = os.path.expanduser(path)
    if os.path.isdir(expanded):
        return os.path.abspath(expanded)
    if os.path.exists(expanded):
        raise LoaderError(f"{flag} {path}: is a file; give the directory that holds it")
    fix = (f"give a local model directory with {flag}, or run `python inference.py --demo` "
           f"for the offline toy model")
    if _looks_local(path):
        raise LoaderError(f"{flag} {path}: no such directory; {fix}")

    try:
        return snapshot_download(path, local_files_only=True)   # already in the local cache
    except HFValidationError as e:
        raise LoaderError(f"{flag} {path}: neither a local directory nor a valid Hugging Face id ({e}); {fix}")
    except Exception:
        pass
    reachable, reason = _hub_reachable()
    if not reachable:
        raise LoaderError(f"{flag} {path}: not a local directory, and the Hugging Face Hub cannot be "
                          f"reached to fetch it ({reason}); {fix}")
    try:
        return snapshot_download(path, allow_patterns=_hub_patterns(path))
    except RepositoryNotFoundError:
        raise LoaderError(f"{flag} {path}: no such model on the Hugging Face Hub (or it needs a login: "
                          f"`huggingface-cli login`); {fix}")
    except Exception as e:
        raise LoaderError(f"{flag} {path}: fetching it from the Hugging Face Hub failed "
                          f"({type(e).__name__}: {e}); {fix}")


def has_tokenizer(directory):
    return any(os.path.isfile(os.path.join(directory, name)) for name in TOKENIZER_FILES)
