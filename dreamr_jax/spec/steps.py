"""Reasoning steps: the delimiter tokens, final-answer detection and the step/token budgets
(SPEC.md section 1)."""

from __future__ import annotations

import dataclasses
import re

STEP_DELIMITER = "\n\n"


@dataclasses.dataclass(frozen=True)
class StepConfig:
    delimiter: str = STEP_DELIMITER
    max_step_tokens: int = 192  # a step that hits this cap without a delimiter is never accepted
    token_budget: int = 2048  # total generated tokens per problem
    max_steps: int = 64


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
