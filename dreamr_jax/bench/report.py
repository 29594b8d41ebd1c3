"""What every benchmark prints and writes beside its figures: progress lines, fixed-width
tables, JSON (numpy values made plain, written atomically so that a run cut short keeps what it
measured), and a description of the machine and the code that ran."""

from __future__ import annotations

import json
import os
import platform
import subprocess

import numpy as np


def log(*args) -> None:
    """print, flushed: a benchmark's log is read while it runs (and through pipes)."""
    print(*args, flush=True)


def fmt_row(cells, widths) -> str:
    return " | ".join(str(c).rjust(w) for c, w in zip(cells, widths))


def plain(o):
    """`o` with numpy arrays and scalars as lists and Python numbers, and every dict key a string."""
    if isinstance(o, dict):
        return {str(k): plain(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [plain(v) for v in o]
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    return o


def write_json(path: str | None, doc, *, indent: int = 1) -> None:
    """`doc` as JSON at `path` (nothing when None): written to a temporary file and renamed, so a
    reader (or a run killed mid-write) never sees half a file."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(plain(doc), f, indent=indent, default=str)
    os.replace(path + ".tmp", path)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for ln in f:
                if ln.startswith("model name"):
                    return ln.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def git_state() -> dict | None:
    """HEAD of the repository the dreamr_jax package sits in, and whether dreamr_jax/ differs from
    it (a figure measured on modified code is not HEAD's); None outside a git checkout."""
    import dreamr_jax

    root = os.path.dirname(os.path.dirname(os.path.abspath(dreamr_jax.__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "dreamr_jax"], cwd=root, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return dict(head=head or None, dreamr_jax_modified=bool(dirty))
    except (OSError, subprocess.SubprocessError):
        return None


def named_paths(items, flag: str, value: str) -> dict:
    """Command-line "NAME=PATH" items -> {name: path}, in order; ValueError naming the flag for an
    item without both parts or a name given twice (scripts pass it to `parser.error`)."""
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"{flag} {item!r}: expected NAME={value}")
        if name in out:
            raise ValueError(f"{flag}: the name {name!r} is given twice")
        out[name] = path
    return out
