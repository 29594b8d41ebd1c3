"""Settings of step-level speculative reasoning (every knob of docs/METHOD.md section 3, with the paper's defaults)."""

from __future__ import annotations

import dataclasses
import math

from ..validation import SettingError, check_choice, check_flag, check_range, check_text
from .steps import StepConfig
from ..prompts import (JUDGE_CUE, JUDGE_FORMATS, JUDGE_INSTRUCTION, REASONING_INSTRUCTION, SPECREASON_PREFIX,
                       SPECREASON_PROMPT, Keywords)

# The methods: each name with the function that runs one problem (`engine, problem -> None`), as
# "module:function" in this package, imported when the method runs (`methods.runner`). The one
# list of methods, kept here so that settings are checked without loading the models.
RUNNERS = {"target": "methods:run_target", "draft": "methods:run_draft", "sd": "methods:run_sd",
           "specreason": "methods:run_specreason", "lookahead": "methods:run_lookahead", "dreamr": "fpsr:run_dreamr"}
METHODS = tuple(RUNNERS)
FALLBACK_MODES = ("auto", "eager", "on_reject")
KEYWORD_POLICIES = ("single", "first_subtoken")
# `alpha` is a threshold on rho = sigmoid(z+ - z-), so it lies in [0, 1] (0 accepts every drafted
# step). The one value outside: REJECT_ALL (infinity; `.inf` in YAML, `spec.alpha=.inf` on the
# command line), which no rho reaches, so every drafted step is rejected and the target writes
# every step (tests of target equivalence; alpha = 1 still accepts a rho rounded to 1.0).
REJECT_ALL = math.inf

@dataclasses.dataclass(frozen=True)
class SpeculationConfig:
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
    # "turn": the paper's judging turn after each checked step; "cue": only `judge_cue`, a few
    # tokens, for a target trained to answer it (the embedded world's is): `prompts.judge_text`.
    judge_format: str = "turn"
    judge_cue: str = JUDGE_CUE
    specreason_threshold: int = 7  # accept a drafted step when its 0-9 score is >= this
    specreason_prompt: str = SPECREASON_PROMPT
    specreason_prefix: str = SPECREASON_PREFIX  # the assistant turn is forced to start with this
    lookahead_judge: str = "model"  # "model" | "always" (judge says aligned) | "never"
    sd_tokens: int = 4  # draft tokens proposed per target verification
    fallback_chunk: int = 4  # FPSR decodes the target's fallback step in chunks this long
    # "eager": the target writes its own step for the earliest open position while the check is
    # pending (docs/METHOD.md section 4); "on_reject": only once that position's drafted step is rejected
    # (no wasted target work when acceptance is high, but a rejection's fallback is not hidden).
    # "auto": eager when the target has accelerator devices of its own, on_reject when the roles
    # share a device or share CPU cores (a fallback chunk then delays the checks behind it).
    fallback: str = "auto"
    # FPSR: before checking the drafted steps that wait, wait for the step the draft is writing if
    # it should end sooner than a check takes, so one forward checks them all (False: check at once).
    gather_checks: bool = True
    # FPSR: drafted steps the draft writes per decode call (1: each handed over as it ends, as
    # the paper; more: fewer calls, the steps handed over together when the call ends)
    draft_steps_per_call: int = 1
    # `target` / `draft` alone: tokens one decode call may write (as many steps as fit; the call
    # ends after the answer step). Fewer calls cost less fixed time, but the call's attention
    # spans every slot it may write.
    solo_tokens_per_call: int = 256

    def __post_init__(self):
        check_choice("method", self.method, METHODS)
        if self.alpha != REJECT_ALL:
            try:
                check_range("alpha", self.alpha, 0, 1)
            except SettingError:
                raise SettingError("alpha", "must be in [0, 1] (or inf: reject every drafted step)", self.alpha) \
                    from None
        check_range("window", self.window, 1, integer=True)
        for key in ("draft_temperature", "target_temperature"):
            check_range(key, getattr(self, key), 0)
        check_range("top_p", self.top_p, high=1, above=0)
        check_range("seed", self.seed, 0, integer=True)
        for key in ("instruction", "judge_instruction", "judge_cue", "specreason_prompt", "specreason_prefix"):
            check_text(key, getattr(self, key), empty=True)
        check_choice("judge_format", self.judge_format, JUDGE_FORMATS)
        if self.judge_format == "cue" and not self.judge_cue:
            raise SettingError("judge_cue", "must not be empty with judge_format 'cue'", self.judge_cue)
        check_range("specreason_threshold", self.specreason_threshold, 0, 10, integer=True)
        check_choice("lookahead_judge", self.lookahead_judge, ("model", "always", "never"))
        check_range("sd_tokens", self.sd_tokens, 1, integer=True)
        check_range("fallback_chunk", self.fallback_chunk, 1, integer=True)
        check_choice("fallback", self.fallback, FALLBACK_MODES)
        check_flag("gather_checks", self.gather_checks)
        check_range("draft_steps_per_call", self.draft_steps_per_call, 1, integer=True)
        check_range("solo_tokens_per_call", self.solo_tokens_per_call, 1, integer=True)
        if not isinstance(self.steps, StepConfig):
            raise SettingError("steps", "must be a StepConfig (a mapping in a config file)", self.steps)
        if not isinstance(self.keywords, Keywords):
            raise SettingError("keywords", "must be a Keywords (a mapping in a config file)", self.keywords)
        check_text("keywords.positive", self.keywords.positive)
        check_text("keywords.negative", self.keywords.negative)
        if self.keywords.positive == self.keywords.negative:
            raise SettingError("keywords.negative", "must differ from keywords.positive", self.keywords.negative)
        check_choice("keywords.policy", self.keywords.policy, KEYWORD_POLICIES)
