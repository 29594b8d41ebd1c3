"""Result files: the methods a run may ask for, the rows of a results JSONL (one per record and
method, appended as each finishes), and writing a file whole or not at all. Below both
`SpeculativeReasoner.solve_many`, which streams rows, and `dreamr_jax.evaluate` /
`dreamr_jax.projection`, which read them back."""

from __future__ import annotations

import json
import math
import os
from typing import Callable, Sequence

from .config import METHODS


class EvalError(ValueError):
    """A bad input to an evaluation, or an output folder it cannot use; the message names it."""


def check_methods(methods: Sequence[str], has_draft: bool = True, *, flag: str = "", pair: str = "this pair") -> None:
    """Every name one of `METHODS`; with no draft model, only `target` (the others need one).
    `flag` (the option that named them) and `pair` (the config) go into the message."""
    for m in methods:
        if m not in METHODS:
            raise EvalError(f"{flag + ': ' if flag else ''}unknown method '{m}'; known: {', '.join(METHODS)}")
    needs_draft = [m for m in methods if m != "target"]
    if needs_draft and not has_draft:
        raise EvalError(f"{', '.join(needs_draft)} need{'s' if len(needs_draft) == 1 else ''} a draft model and "
                        f"{pair} has none (no `draft:`); a target alone runs only the method 'target'")


def result_key(record_id, method: str) -> tuple[str, str]:
    """What identifies a row of results.jsonl: the record's id (as JSON, so 1 and "1" differ) and the method."""
    return json.dumps(record_id, default=str), method


def read_results(path: str, warn: bool = True) -> dict:
    """{result_key: row} of a results JSONL, the latest row of each pair winning (a failed pair is
    solved again on resume and appended). A line that does not parse (a run killed mid-write)
    is left in the file but ignored, with a note."""
    rows = {}
    if not os.path.exists(path):
        return rows
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if row["status"] == "ok" and "trace" not in row:
                    raise KeyError("trace")
                rows[result_key(row["id"], row["method"])] = row
            except (ValueError, KeyError, TypeError):
                if warn:
                    print(f"note: {path}:{n} is not a complete result row (a run cut off mid-write?); ignored")
    return rows


def open_results(path: str):
    """`path` opened for appending rows, on a line of their own even after a torn last line."""
    f = open(path, "a", encoding="utf-8")
    if f.tell() > 0:
        with open(path, "rb") as r:
            r.seek(-1, os.SEEK_END)
            if r.read(1) != b"\n":
                f.write("\n")
    return f


def write_atomically(path: str, write: Callable[[str], None]) -> None:
    """`write(tmp)` a temporary file in the same folder, then rename it over `path`: a reader or
    a crash sees the old file or the new one, never half of one."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    write_atomically(path, write)


def json_safe(value):
    """NaN / infinity -> None (JSON null): summary.json stays strict JSON that any reader parses."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
