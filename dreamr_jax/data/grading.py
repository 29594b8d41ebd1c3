"""Answer grading: choice letters, numbers with tolerance, normalised free text."""

from __future__ import annotations

import re

_NUMBER = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$")


def normalise(text: str) -> str:
    text = text.strip().strip("$").strip()
    text = re.sub(r"\\(text|mathrm|textbf)\{([^}]*)\}", r"\2", text)
    text = text.replace("\\!", "").replace("\\,", "").replace("{", "").replace("}", "")
    text = re.sub(r"\s+", " ", text).strip().rstrip(".").lower()
    return text


def as_number(text: str) -> float | None:
    t = normalise(text).replace(",", "")
    if t.endswith("%"):
        t = t[:-1]
    return float(t) if _NUMBER.match(t) else None


def answers_match(predicted: str | None, reference: str | None, rel_tol: float = 1e-4) -> bool:
    """True when a predicted final answer matches the reference: same choice letter, numbers
    equal within a relative tolerance, or equal normalised text."""
    if predicted is None or reference is None:
        return False
    p, r = normalise(str(predicted)), normalise(str(reference))
    if len(r) == 1 and r.isalpha():
        m = re.match(r"^\(?([a-z])\)?(\b|$)", p)
        return m is not None and m.group(1) == r
    pn, rn = as_number(p), as_number(r)
    if pn is not None and rn is not None:
        return abs(pn - rn) <= rel_tol * max(1.0, abs(rn))
    return p == r
