"""Chat strings, instructions and judging cues: every text the methods put around a model's
reasoning. A leaf: it imports nothing of ours, so the data layer, the engine and training
share one copy of each.

The chat strings are Qwen's ChatML (the format of every model this package loads, and of the
embedded world's tokenizer); `turn` and `open_turn` build them in one place.
"""

from __future__ import annotations

import dataclasses

IM_START, IM_END = "<|im_start|>", "<|im_end|>"


def turn(role: str, text: str) -> str:
    """One whole ChatML turn."""
    return f"{IM_START}{role}\n{text}{IM_END}\n"


def open_turn(role: str) -> str:
    """The start of a turn the model writes."""
    return f"{IM_START}{role}\n"


def after_step(instruction: str, assistant_prefix: str = "", chat_end: str = IM_END + "\n") -> str:
    """Text after a candidate step that asks the model about it: close the assistant turn, a user
    turn carrying `instruction`, then the answer turn opened (and started with `assistant_prefix`)."""
    return f"{chat_end}{turn('user', instruction)}{open_turn('assistant')}{assistant_prefix}"


# ---- the reasoning prompt ----

REASONING_INSTRUCTION = (
    "Solve the problem step by step. Separate the steps with a blank line and put the final answer in "
    "\\boxed{} (for a multiple-choice question, the letter of the choice)."
)

SPECREASON_PROMPT = (
    "Evaluate the last reasoning step solely based on factual correctness and logical validity. Ignore style, "
    "phrasing, or overall usefulness; only judge whether the step is objectively correct and logically follows "
    "from prior steps. Assign a score from 0 to 9."
)
SPECREASON_PREFIX = "I think the quality score is: "



def question_text(instruction: str, question: str) -> str:
    """The first user turn's text: the reasoning instruction, a blank line, the question."""
    return f"{instruction}\n\n{question}"


def specreason_suffix(prompt: str = SPECREASON_PROMPT, prefix: str = SPECREASON_PREFIX) -> str:
    """Text after a candidate step for SpecReason's forced 0-9 score."""
    return after_step(prompt, prefix)


LOOKAHEAD_PROMPT = (
    "Do the following two reasoning steps state the same thing? Answer [aligned] if they are semantically "
    "equivalent, [unaligned] if they are not.\nStep A: {a}\nStep B: {b}"
)


def lookahead_suffix(step_a: str, step_b: str, prompt: str = LOOKAHEAD_PROMPT) -> str:
    """Text after the checked prefix for Lookahead Reasoning's semantic judge: the two steps in a
    user turn, and the answer turn opened with "[" (its verdicts are [aligned] / [unaligned])."""
    return after_step(prompt.format(a=step_a, b=step_b), "[")


# ---- the embedded world's short prompts (configs/synthetic.yaml sets them; the tiny models read
# them on every problem, and the judge suffix on every check) ----

WORLD_INSTRUCTION = "Solve step by step and put the answer in \\boxed{}."
WORLD_JUDGE_INSTRUCTION = "Is the last step correct? Answer positive or negative."
WORLD_SPECREASON_PROMPT = "Score the last step from 0 to 9."
WORLD_SPECREASON_PREFIX = "Score: "


# ---- TBVM's judging prompt and keywords ----

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


# A few-token verdict cue after the step: close the turn and ask in one word. The model must be
# trained to answer it (the embedded world's target is); the paper's full turn is the default.
JUDGE_CUE = f"{IM_END} correct?"
JUDGE_FORMATS = ("turn", "cue")


def judge_suffix(chat_end: str = "<|im_end|>\n", instruction: str = JUDGE_INSTRUCTION) -> str:
    """Text after the candidate step: close the assistant turn, ask, open the verdict turn."""
    return after_step(instruction, chat_end=chat_end)


def judge_text(judge_format: str = "turn", instruction: str = JUDGE_INSTRUCTION, cue: str = JUDGE_CUE) -> str:
    """The judging text that follows a candidate step.

    "turn": the paper's form (a user turn carrying the instruction, then the verdict turn opens;
    about 40 tokens of the Qwen tokenizer, run once per check). "cue": only `cue`, a few tokens,
    for a target trained to answer it; a check then costs little more than its step's tokens."""
    if judge_format == "turn":
        return judge_suffix(instruction=instruction)
    if judge_format == "cue":
        if not cue:
            raise ValueError("judge_format 'cue' needs a non-empty judge_cue")
        return cue
    raise ValueError(f"judge_format must be one of {JUDGE_FORMATS}, got '{judge_format}'")
