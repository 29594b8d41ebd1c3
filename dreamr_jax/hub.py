"""Resolve a local checkpoint folder or a Hugging Face hub id to a local folder."""

from __future__ import annotations

import os


class NotACheckpointError(FileNotFoundError):
    """The path is neither a checkpoint folder nor a hub id that can be fetched or found in the cache."""


_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "tokenizer*"]


def resolve_checkpoint(path_or_hub_id: str | os.PathLike) -> str:
    """A folder holding `config.json`. Hub ids go through the Hugging Face cache (offline
    works when the files are cached, or with HF_HUB_OFFLINE=1)."""
    path = os.fspath(path_or_hub_id)
    if path.startswith("asset:"):  # the shipped models of the embedded world, e.g. "asset:target"
        from .assets import path as asset_path

        path = asset_path(path.split(":", 1)[1])
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "config.json")):
            raise NotACheckpointError(f"{path}: not a checkpoint folder (no config.json)")
        return path
    if os.path.exists(path):
        raise NotACheckpointError(f"{path}: is a file; pass the checkpoint folder that holds config.json")
    looks_like_id = path.count("/") == 1 and not path.startswith((".", "/", "~"))
    if not looks_like_id:
        raise NotACheckpointError(f"{path}: no such folder, and not a hub id of the form 'org/name'")
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(path, allow_patterns=_HUB_PATTERNS)
    except Exception as e:  # offline with an empty cache, unknown repo, gated repo, ...
        raise NotACheckpointError(
            f"{path}: not a local folder, and the hub id could not be fetched or found in the HF cache ({type(e).__name__}: {e})"
        ) from e
    return resolve_checkpoint(local)
