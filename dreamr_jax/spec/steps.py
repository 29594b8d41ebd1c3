"""Reasoning steps: the delimiter tokens, final-answer detection and the step/token budgets
(SPEC.md section 1)."""

from __future__ import annotations

import dataclasses
import math
import re

STEP_DELIMITER = "\n\n"


# ---- settings checks (shared by every config dataclass: StepConfig, SpecConfig, PairConfig, the trainers') ----


class SettingError(ValueError):
    """A setting out of its range. `key` names it (dotted below a nested group, e.g.
    "keywords.policy"); `dreamr_jax.config` prefixes the path of the group it was read into."""

    def __init__(self, key: str, requirement: str, value):
        self.key, self.requirement, self.value = key, requirement, value
        super().__init__(f"{key} {requirement}, got {value!r}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_range(key: str, value, low=None, high=None, *, above=None, below=None, integer: bool = False,
                optional: bool = False) -> None:
    """`value` must be a finite number (an int when `integer`) with low <= value <= high,
    above < value and value < below (bounds given as None are not checked); None passes when
    `optional`. Raises SettingError naming `key`."""
    if value is None and optional:
        return
    if integer and not (isinstance(value, int) and not isinstance(value, bool)):
        raise SettingError(key, "must be an integer", value)
    if not _is_number(value) or not math.isfinite(value):
        raise SettingError(key, "must be a finite number", value)
    parts = []
    if low is not None or above is not None:
        parts.append(f">= {low}" if low is not None else f"> {above}")
    if high is not None or below is not None:
        parts.append(f"<= {high}" if high is not None else f"< {below}")
    ok = ((low is None or value >= low) and (high is None or value <= high) and (above is None or value > above)
          and (below is None or value < below))
    if not ok:
        if len(parts) == 2:
            lo = f"[{low}" if low is not None else f"({above}"
            hi = f"{high}]" if high is not None else f"{below})"
            raise SettingError(key, f"must be in {lo}, {hi}", value)
        raise SettingError(key, f"must be {parts[0]}", value)


def check_choice(key: str, value, choices) -> None:
    """`value` must be one of `choices` (raises SettingError naming `key`)."""
    if isinstance(value, bool) or value not in choices:
        names = [str(c) for c in choices]
        listed = f"{names[0]} or {names[1]}" if len(names) == 2 else "one of " + ", ".join(names)
        raise SettingError(key, f"must be {listed}", value)


def check_text(key: str, value, *, empty: bool = False, optional: bool = False) -> None:
    """`value` must be a string (non-empty unless `empty`; None passes when `optional`)."""
    if value is None and optional:
        return
    if not isinstance(value, str) or (not empty and not value):
        raise SettingError(key, "must be a non-empty string" if not empty else "must be a string", value)


def check_flag(key: str, value) -> None:
    """`value` must be True or False."""
    if not isinstance(value, bool):
        raise SettingError(key, "must be true or false", value)


@dataclasses.dataclass(frozen=True)
class StepConfig:
    delimiter: str = STEP_DELIMITER
    max_step_tokens: int = 192  # a step that hits this cap without a delimiter is never accepted
    token_budget: int = 2048  # total generated tokens per problem
    max_steps: int = 64

    def __post_init__(self):
        check_text("delimiter", self.delimiter)
        for key in ("max_step_tokens", "token_budget", "max_steps"):
            check_range(key, getattr(self, key), 1, integer=True)


_BOXED = re.compile(r"\\boxed\{")
_CHOICE = re.compile(r"(?:answer|Answer|ANSWER)\s*(?:is|:)?\s*:?\s*\(?([A-J])\)?(?![A-Za-z])")


def boxed_answer(text: str) -> str | None:
    """The content of the last complete `\\boxed{...}` (nested braces allowed), else None."""
    result = None
    for match in _BOXED.finditer(text):
        group = brace_group(text, match.end() - 1)
        if group is not None:
            result = group[0]
    return result


def brace_group(text: str, start: int) -> tuple[str, int] | None:
    """The content of the `{...}` group opening at text[start] (nested braces allowed) and the
    index after it; None if text[start] is not "{" or the group never closes."""
    if start >= len(text) or text[start] != "{":
        return None
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i], i + 1
    return None


def choice_answer(text: str) -> str | None:
    """A multiple-choice letter stated as an answer ("Answer: B", "the answer is (C)")."""
    found = _CHOICE.findall(text)
    return found[-1] if found else None


def final_answer(text: str) -> str | None:
    """The final answer a step states, if any: a complete \\boxed{} first, else a choice letter."""
    boxed = boxed_answer(text)
    if boxed is not None:
        return boxed.strip()
    return choice_answer(text)


def split_steps(text: str, delimiter: str = STEP_DELIMITER) -> list[str]:
    """Non-empty steps of a reasoning text."""
    return [s for s in (part.strip() for part in text.split(delimiter)) if s]
