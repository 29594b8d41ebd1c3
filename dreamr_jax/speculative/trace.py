"""Trace: what one problem's reasoning committed, who wrote each step, and when each role was
busy. Every method produces one; it is JSON-serialisable for result files."""

from __future__ import annotations

import dataclasses
import json
from typing import Any


@dataclasses.dataclass
class Step:
    text: str
    token_ids: list[int]
    author: str  # "draft" | "target"
    rho: float | None = None  # the check's score for drafted steps (or the drafted step it replaced)
    hit_cap: bool = False  # ended at the step-length cap without a delimiter

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclasses.dataclass
class Interval:
    """A span during which a role's device was busy, in seconds since the problem started."""

    role: str  # "draft" | "target"
    kind: str  # what it was for: "prefill" | "draft" | "check" | "fallback" | "verify" | "decode"
    start: float
    end: float
    tokens: int = 0  # new tokens: fed (prefill, extend) or generated (decode), all rows together
    # The call's shape, for pricing it at another scale (`dreamr_jax.costmodel`): the program
    # ("prefill" | "extend" | "decode"; "" in traces written before it was recorded), the tokens
    # each row already had in its cache, the rows, and the image patches of a prefill.
    op: str = ""
    cached: int = 0
    rows: int = 1
    patches: int = 0

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclasses.dataclass
class Trace:
    method: str
    question: str = ""
    steps: list[Step] = dataclasses.field(default_factory=list)
    answer: str | None = None
    finish_reason: str = ""  # "answer" | "eos" | "budget" | "max_steps" | "error"
    wall_time: float = 0.0
    intervals: list[Interval] = dataclasses.field(default_factory=list)
    drafted_checked: int = 0  # drafted steps whose check was committed on
    drafted_accepted: int = 0
    error: str | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.steps)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.steps)

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted drafted steps / drafted steps checked (None when nothing was checked)."""
        return self.drafted_accepted / self.drafted_checked if self.drafted_checked else None

    def busy_time(self, role: str) -> float:
        return sum(i.duration for i in self.intervals if i.role == role)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["text"] = self.text
        d["num_tokens"] = self.num_tokens
        d["acceptance_rate"] = self.acceptance_rate
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict) -> "Trace":
        d = {k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}}
        d["steps"] = [Step(**s) for s in d.get("steps", [])]
        known = {f.name for f in dataclasses.fields(Interval)}
        d["intervals"] = [Interval(**{k: v for k, v in i.items() if k in known}) for i in d.get("intervals", [])]
        return cls(**d)
