"""Resolve a local checkpoint folder or a Hugging Face hub id to a local folder."""

from __future__ import annotations

import os


class NotACheckpointError(FileNotFoundError):
    """The path is neither a checkpoint folder nor a hub id that can be fetched or found in the cache."""


# The checkpoint's own files only: `model*.safetensors` (not an `adapter_model.safetensors` a repo may also hold).
_HUB_PATTERNS = ["*.json", "model*.safetensors", "*.txt", "*.jinja", "*.model", "tokenizer*"]


def looks_like_local_path(path: str) -> bool:
    """Whether a string that names no existing folder was meant as a local path rather than a hub
    id ('org/name'): it starts with '.', '/' or '~', has more than one '/', or contains a path
    separator after a first component that exists here (`checkpoints/qwen` with a `checkpoints`
    folder). Anything else of the form 'org/name' is a hub id."""
    if path.startswith((".", "/", "~")) or path.count("/") > 1:
        return True
    for sep in {"/", os.sep, os.altsep or "/"}:
        if sep in path and os.path.exists(path.split(sep, 1)[0]):
            return True
    return os.sep != "/" and os.sep in path  # a Windows-style path is never a hub id


def missing_path_error(path: str, what: str = "folder", hint: str = "") -> NotACheckpointError:
    """The error for a local path that does not exist: names it, its absolute form and the
    deepest part of it that does exist (where a typo most likely is)."""
    full = os.path.abspath(os.path.expanduser(path))
    existing = full
    while existing and not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    return NotACheckpointError(f"{path}: no such {what} ({full} does not exist; the deepest existing part is "
                               f"{existing}){hint}")


def resolve_checkpoint(path_or_hub_id: str | os.PathLike) -> str:
    """A folder holding `config.json`. A string naming an existing folder is that folder; one that
    looks like a path (see `looks_like_local_path`) but does not exist is a `NotACheckpointError`
    (a FileNotFoundError) naming it, with no hub lookup; anything else is a hub id, fetched through
    the Hugging Face cache (offline works when the files are cached, or with HF_HUB_OFFLINE=1)."""
    path = os.fspath(path_or_hub_id)
    if path.startswith("asset:"):  # the shipped models of the embedded world, e.g. "asset:target"
        from .assets import path as asset_path

        path = asset_path(path.split(":", 1)[1])
    typed = path
    if path.startswith("~"):
        path = os.path.expanduser(path)
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "config.json")):
            raise NotACheckpointError(f"{path}: not a checkpoint folder (no config.json)")
        return path
    if os.path.exists(path):
        raise NotACheckpointError(f"{path}: is a file; pass the checkpoint folder that holds config.json")
    if looks_like_local_path(typed):
        as_id = path.count("/") == 1 and not path.startswith((".", "/", "~"))
        hint = f"; read as a local path, not a hub id, because '{path.split('/')[0]}' exists here" if as_id else ""
        raise missing_path_error(typed, hint=hint)
    if path.count("/") != 1 or not all(path.split("/")):
        raise NotACheckpointError(f"{path}: no such folder, and not a hub id of the form 'org/name'")
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(path, allow_patterns=_HUB_PATTERNS)
    except Exception as e:  # offline with an empty cache, unknown repo, gated repo, ...
        raise NotACheckpointError(
            f"{path}: no local folder of that name, and as a hub id it could not be fetched or found in the HF cache "
            f"({type(e).__name__}: {e})"
        ) from e
    return resolve_checkpoint(local)
