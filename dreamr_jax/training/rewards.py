"""SAPO's reward terms (docs/METHOD.md section 5), on host values of a batch of rollouts.

R = w1 R_outcome + w2 R_draft + w3 R_length with
  R_outcome = 1 if the extracted final answer is correct else 0,
  R_draft   = fraction of the rollout's steps with rho >= alpha (hard) or their mean rho (soft),
  R_length  = 1 - min(1, L / L_ref).
The rhos come from the frozen target's CPN check over every step of every rollout.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..data.grading import answers_match, grade
from ..speculative import is_accepted


def outcome_reward(answers: Sequence[str | None], references: Sequence[str | dict | None]) -> np.ndarray:
    """1 where the answer is right: a reference string is compared with `answers_match`, a
    record (the data loaders' schema: answer, answer_type, choices) is graded with `grade`."""
    return np.array([float(grade(a, r) if isinstance(r, dict) else answers_match(a, r))
                     for a, r in zip(answers, references)], np.float32)


def draft_reward(step_rhos: Sequence[Sequence[float]], alpha: float = 0.7, soft: bool = False) -> np.ndarray:
    """Per rollout: the share of its steps the target accepts (or the mean rho); 0 with no steps."""
    out = []
    for rhos in step_rhos:
        if len(rhos) == 0:
            out.append(0.0)
        elif soft:
            out.append(float(np.mean(np.asarray(rhos, np.float32))))
        else:
            out.append(float(np.mean([is_accepted(r, alpha) for r in rhos])))
    return np.array(out, np.float32)


def length_reward(lengths: Sequence[int], l_ref: int = 1024) -> np.ndarray:
    lengths = np.asarray(lengths, np.float32)
    return (1.0 - np.minimum(1.0, lengths / float(l_ref))).astype(np.float32)


def composite_reward(outcome, draft, length, weights=(1.0, 1.0, 1.0)) -> np.ndarray:
    w1, w2, w3 = weights
    return (w1 * np.asarray(outcome) + w2 * np.asarray(draft) + w3 * np.asarray(length)).astype(np.float32)
