"""Reasoning steps: the delimiter, the step and token budgets, and splitting a text into steps
(docs/METHOD.md section 1). Final-answer detection lives with grading (`data.grading.final_answer`)."""

from __future__ import annotations

import dataclasses

from ..validation import check_range, check_text

STEP_DELIMITER = "\n\n"


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


def split_steps(text: str, delimiter: str = STEP_DELIMITER) -> list[str]:
    """Non-empty steps of a reasoning text."""
    return [s for s in (part.strip() for part in text.split(delimiter)) if s]
