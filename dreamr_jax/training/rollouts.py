"""SAPO rollouts: G sampled solutions per prompt from the draft, cut into steps, and the frozen
target's CPN score of every step of every rollout.

A rollout's response runs to the end of the step that states the final answer (docs/METHOD.md section 1:
reasoning stops there), or to EOS / the token limit; tokens sampled past that point are not
part of the response and get no log-prob or loss.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from ..generation import generate_from_ids
from ..sampling import SamplingParams
from ..data.grading import final_answer


@dataclasses.dataclass
class Rollout:
    group: int  # index of its prompt; the G rollouts of a prompt share it
    prompt_ids: list[int]
    response: list[int]
    logprobs: list[float]  # the sampling policy's log p of each response token
    steps: list[list[int]]  # the response cut after every delimiter token
    answer: str | None


def split_steps(tokens: Sequence[int], delimiter_ids: Sequence[int]) -> list[list[int]]:
    """Cut a token sequence after every delimiter token (the last piece may lack one)."""
    delimiters, steps, current = set(delimiter_ids), [], []
    for t in tokens:
        current.append(t)
        if t in delimiters:
            steps.append(current)
            current = []
    if current:
        steps.append(current)
    return steps


def cut_at_answer(steps: list[list[int]], decode) -> tuple[list[list[int]], str | None]:
    """Keep the steps up to the first one that states a final answer; return them and it."""
    for i, step in enumerate(steps):
        answer = final_answer(decode(step))
        if answer is not None:
            return steps[: i + 1], answer
    return steps, final_answer(decode([t for s in steps for t in s]))


def sample_rollouts(model, processor, prompts: Sequence[dict], group_size: int, *, max_new_tokens: int,
                    delimiter_ids: Sequence[int], temperature: float = 1.0, top_p: float = 1.0,
                    seed: int = 0) -> list[Rollout]:
    """`group_size` samples for each prompt ({input_ids, pixel_values, image_grid_thw} from
    `Processor.encode`), all rows in one batched generation."""
    rows, pix, grids, owner = [], [], [], []
    for g, p in enumerate(prompts):
        for _ in range(group_size):
            rows.append(list(p["input_ids"]))
            owner.append(g)
            if p.get("pixel_values") is not None:
                pix.append(np.asarray(p["pixel_values"]))
                grids.append(np.asarray(p["image_grid_thw"]).reshape(-1, 3))
    out = generate_from_ids(model, rows, np.concatenate(pix) if pix else None,
                            np.concatenate(grids) if grids else None, processor=processor,
                            max_new_tokens=max_new_tokens, params=SamplingParams(temperature, 0, top_p),
                            stop_ids=tuple(processor.eos_token_ids), seed=seed)
    rollouts = []
    for row, g, tokens, logps in zip(rows, owner, out.token_ids, out.logprobs):
        steps, answer = cut_at_answer(split_steps(tokens, delimiter_ids), processor.decode)
        n = sum(len(s) for s in steps)
        rollouts.append(Rollout(group=g, prompt_ids=row, response=list(tokens[:n]), logprobs=list(logps[:n]),
                                steps=steps, answer=answer))
    return rollouts


def step_rhos(engine, prompt: dict, rollouts: Sequence[Rollout], max_rows: int = 32) -> list[list[float]]:
    """rho of every step of every rollout of one prompt, from the frozen target's CPN check.

    The prompt (question + image) is prefilled once; every (rollout, step) pair is one row of
    a batched forward over the cached prefix: that rollout's earlier steps, the step and the
    judging suffix, the same token sequence FPSR's check runs. Rows go in chunks of at most
    `max_rows`, each padded to a power of two rows, so varying step counts reuse a few
    compiled programs instead of compiling one per count."""
    target = engine.target
    candidates, where = [], []
    for r, rollout in enumerate(rollouts):
        for k in range(len(rollout.steps)):
            candidates.append([t for s in rollout.steps[: k + 1] for t in s])
            where.append(r)
    rhos: list[list[float]] = [[] for _ in rollouts]
    if not candidates:
        return rhos
    # Room for the longest row up front, so the cache never grows (a new shape) mid-check.
    longest = max(map(len, candidates)) + len(engine.judge_ids)
    ctx = target.open(prompt["input_ids"], prompt.get("pixel_values"), prompt.get("image_grid_thw"), capacity=longest)
    max_rows = 1 << (max(1, max_rows) - 1).bit_length()
    scores = []
    for start in range(0, len(candidates), max_rows):
        chunk = candidates[start: start + max_rows]
        rows = 1 << (len(chunk) - 1).bit_length()
        scores.extend(engine.cpn_scores(ctx, chunk + [chunk[0]] * (rows - len(chunk)))[: len(chunk)])
    for r, rho in zip(where, scores):
        rhos[r].append(float(rho))
    return rhos
