"""Settings of step-level speculative reasoning (all of SPEC.md's knobs, with its defaults)."""

from __future__ import annotations

import dataclasses

from .steps import StepConfig
from .tbvm import JUDGE_CUE, JUDGE_FORMATS, JUDGE_INSTRUCTION, Keywords

METHODS = ("target", "draft", "sd", "specreason", "lookahead", "dreamr")
FALLBACK_MODES = ("auto", "eager", "on_reject")

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
    return f"<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n{prefix}"


LOOKAHEAD_PROMPT = (
    "Do the following two reasoning steps state the same thing? Answer [aligned] if they are semantically "
    "equivalent, [unaligned] if they are not.\nStep A: {a}\nStep B: {b}"
)


@dataclasses.dataclass(frozen=True)
class SpecConfig:
    method: str = "dreamr"
    alpha: float = 0.7
    window: int = 4
    keywords: Keywords = Keywords()
    steps: StepConfig = StepConfig()
    draft_temperature: float = 0.0
    target_temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    instruction: str = REASONING_INSTRUCTION
    judge_instruction: str = JUDGE_INSTRUCTION
    # "turn": SPEC.md's judging turn after each checked step; "cue": only `judge_cue`, a few
    # tokens, for a target trained to answer it (the embedded world's is): `tbvm.judge_text`.
    judge_format: str = "turn"
    judge_cue: str = JUDGE_CUE
    specreason_threshold: int = 7  # accept a drafted step when its 0-9 score is >= this
    specreason_prompt: str = SPECREASON_PROMPT
    specreason_prefix: str = SPECREASON_PREFIX  # the assistant turn is forced to start with this
    lookahead_judge: str = "model"  # "model" | "always" (judge says aligned) | "never"
    sd_tokens: int = 4  # draft tokens proposed per target verification
    fallback_chunk: int = 4  # FPSR decodes the target's fallback step in chunks this long
    # "eager": the target writes its own step for the earliest open position while the check is
    # pending (SPEC.md 4); "on_reject": only once that position's drafted step is rejected
    # (no wasted target work when acceptance is high, but a rejection's fallback is not hidden).
    # "auto": eager when the target has accelerator devices of its own, on_reject when the roles
    # share a device or share CPU cores (a fallback chunk then delays the checks behind it).
    fallback: str = "auto"
    # FPSR: before checking the drafted steps that wait, wait for the step the draft is writing if
    # it should end sooner than a check takes, so one forward checks them all (False: check at once).
    gather_checks: bool = True
    # FPSR: drafted steps the draft writes per decode call (1: each handed over as it ends, as
    # SPEC.md; more: fewer calls, the steps handed over together when the call ends)
    draft_steps_per_call: int = 1
    # `target` / `draft` alone: tokens one decode call may write (as many steps as fit; the call
    # ends after the answer step). Fewer calls cost less fixed time, but the call's attention
    # spans every slot it may write.
    solo_tokens_per_call: int = 256

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method '{self.method}' is not one of {METHODS}")
        if self.draft_steps_per_call < 1:
            raise ValueError(f"draft_steps_per_call must be >= 1, got {self.draft_steps_per_call}")
        if self.solo_tokens_per_call < 1:
            raise ValueError(f"solo_tokens_per_call must be >= 1, got {self.solo_tokens_per_call}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.fallback not in FALLBACK_MODES:
            raise ValueError(f"fallback must be one of {FALLBACK_MODES}, got '{self.fallback}'")
        if self.judge_format not in JUDGE_FORMATS:
            raise ValueError(f"judge_format must be one of {JUDGE_FORMATS}, got '{self.judge_format}'")
        if self.judge_format == "cue" and not self.judge_cue:
            raise ValueError("judge_format 'cue' needs a non-empty judge_cue")
        if self.lookahead_judge not in ("model", "always", "never"):
            raise ValueError(f"lookahead_judge must be model/always/never, got '{self.lookahead_judge}'")
