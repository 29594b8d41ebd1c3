"""TBVM with the CPN score (SPEC.md section 2): the target judges a drafted step from the
logits of two keyword tokens after a judging instruction.

rho = s+ / (s+ + s-) with s± the keyword probabilities equals sigmoid(z+ - z-) on the raw
logits: the softmax normaliser cancels. Accept iff rho >= alpha.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

JUDGE_INSTRUCTION = (
    "Evaluate the last reasoning step only for factual correctness, logical validity and consistency with "
    "the image. Answer with one word: positive if it is correct, negative if it is not."
)


class KeywordError(ValueError):
    """A judging keyword that is not a single token of the target's tokenizer."""


@dataclasses.dataclass(frozen=True)
class Keywords:
    positive: str = "positive"
    negative: str = "negative"
    policy: str = "single"  # "single": each keyword must be one token; "first_subtoken": use its first token


def keyword_token_ids(tokenizer, keywords: Keywords = Keywords()) -> tuple[int, int]:
    """Token ids of the two keywords, checked at start-up.

    Each keyword must be one token both bare and with a leading space (the two forms a model
    may answer with); the bare form is the one scored, since the verdict opens the assistant
    turn. With policy "first_subtoken" multi-token keywords use their first token (which
    must then differ between the two).
    """
    if keywords.policy not in ("single", "first_subtoken"):
        raise KeywordError(f"keyword policy must be 'single' or 'first_subtoken', got '{keywords.policy}'")
    ids = []
    problems = []
    for word in (keywords.positive, keywords.negative):
        bare = tokenizer.encode(word, add_special_tokens=False)
        spaced = tokenizer.encode(" " + word, add_special_tokens=False)
        if keywords.policy == "single" and (len(bare) != 1 or len(spaced) != 1):
            pieces = tokenizer.convert_ids_to_tokens(bare)
            spaced_pieces = tokenizer.convert_ids_to_tokens(spaced)
            problems.append(f"'{word}' -> {pieces} and ' {word}' -> {spaced_pieces}")
        if not bare:
            problems.append(f"'{word}' encodes to no token")
            continue
        ids.append(bare[0])
    if problems:
        raise KeywordError(
            "judging keywords must each be a single token of the target's tokenizer (bare and with a leading "
            "space): " + "; ".join(problems) + ". Pick other keywords or set policy='first_subtoken'."
        )
    if ids[0] == ids[1]:
        raise KeywordError(f"keywords '{keywords.positive}' and '{keywords.negative}' share their first token {ids[0]}")
    return ids[0], ids[1]


def cpn_rho(logits, positive_id: int, negative_id: int):
    """rho = sigmoid(z+ - z-) in float32, over any leading batch shape of logits (..., V).

    A numpy input is scored in numpy (no device dispatch for a handful of verdicts)."""
    if isinstance(logits, np.ndarray):
        margin = logits[..., positive_id].astype(np.float32) - logits[..., negative_id].astype(np.float32)
        with np.errstate(over="ignore"):
            return (np.float32(1) / (np.float32(1) + np.exp(-margin))).astype(np.float32)
    logits = jnp.asarray(logits, jnp.float32)
    return jax.nn.sigmoid(logits[..., positive_id] - logits[..., negative_id])


def accept(rho, alpha: float):
    """Accept iff rho >= alpha (alpha > 1 rejects everything, alpha = 0 accepts everything).

    Compared in float32 (rho's precision), so host-side decisions (`is_accepted`) agree."""
    return jnp.asarray(rho, jnp.float32) >= jnp.float32(alpha)


def is_accepted(rho: float, alpha: float) -> bool:
    """`accept` for one host-side rho, with the same float32 comparison."""
    return bool(np.float32(rho) >= np.float32(alpha))


# A few-token verdict cue after the step: close the turn and ask in one word. The model must be
# trained to answer it (the embedded world's target is); SPEC.md's full turn is the default.
JUDGE_CUE = "<|im_end|> correct?"
JUDGE_FORMATS = ("turn", "cue")


def judge_suffix(chat_end: str = "<|im_end|>\n", instruction: str = JUDGE_INSTRUCTION) -> str:
    """Text after the candidate step: close the assistant turn, ask, open the verdict turn."""
    return f"{chat_end}<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n"


def judge_text(judge_format: str = "turn", instruction: str = JUDGE_INSTRUCTION, cue: str = JUDGE_CUE) -> str:
    """The judging text that follows a candidate step.

    "turn": SPEC.md's form (a user turn carrying the instruction, then the verdict turn opens;
    about 40 tokens of the Qwen tokenizer, run once per check). "cue": only `cue`, a few tokens,
    for a target trained to answer it; a check then costs little more than its step's tokens."""
    if judge_format == "turn":
        return judge_suffix(instruction=instruction)
    if judge_format == "cue":
        if not cue:
            raise ValueError("judge_format 'cue' needs a non-empty judge_cue")
        return cue
    raise ValueError(f"judge_format must be one of {JUDGE_FORMATS}, got '{judge_format}'")
