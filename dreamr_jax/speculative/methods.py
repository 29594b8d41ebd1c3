"""The six methods of docs/METHOD.md section 3 behind one interface, each producing a `Trace`.

A `Problem` holds the two roles' contexts for one question; methods only move token
sequences between them (set_tokens / write / score), so rollback after a rejected step is a
cache-length change, and every check reuses the target's cached prefix.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable, Sequence

import numpy as np

from ..generation import attend_bucket, fine_bucket
from ..sampling import SamplingParams
from ..data.grading import final_answer
from ..prompts import judge_text, keyword_token_ids, lookahead_suffix, specreason_suffix
from .config import RUNNERS, SpeculationConfig
from .roles import Context, Role
from .tbvm import cpn_rho
from .trace import Step, Trace


class TokenizerMismatchError(ValueError):
    """Draft and target do not share a tokenizer."""


@dataclasses.dataclass
class Problem:
    """One question in flight: the committed steps and each role's context."""

    trace: Trace
    prompt_ids: list[int]
    token_budget: int  # tokens the problem may commit in all (`StepConfig.token_budget`)
    draft_ctx: Context | None = None
    target_ctx: Context | None = None
    committed: list[int] = dataclasses.field(default_factory=list)
    done: bool = False
    # role name -> a function that prepares that role's prompt and returns the function that
    # dispatches its prefill, which returns (context, wait function) (`Role.prepare`). FPSR
    # prepares both before dispatching either, and each role's thread waits for its own.
    openers: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.tokens_left <= 0:  # no budget: done before it starts (no method may write a token)
            self.trace.finish_reason, self.done = "budget", True

    def open(self, role_name: str) -> Context:
        ctx, done = self.dispatch(self.prepare(role_name))
        done()
        return ctx

    def prepare(self, role_name: str):
        """The host half of opening a role's context (`Role.prepare`): (name, dispatch function)."""
        return role_name, self.openers[role_name]()

    def dispatch(self, prepared):
        role_name, dispatch = prepared
        ctx, done = dispatch()
        setattr(self, f"{role_name}_ctx", ctx)
        return ctx, done

    @property
    def tokens_left(self) -> int:
        return self.token_budget - len(self.committed)


class StepEngine:
    """Shared machinery: the two roles, the token ids every method needs, commit and stop rules."""

    def __init__(self, draft: Role | None, target: Role, processor, config: SpeculationConfig):
        self.draft, self.target, self.proc, self.config = draft, target, processor, config
        tok = processor.tokenizer
        self.delimiter_ids = tuple(processor.tokens_containing(config.steps.delimiter))
        self.eos_ids = tuple(processor.eos_token_ids)
        self.stop_ids = tuple(sorted(set(self.delimiter_ids) | set(self.eos_ids)))
        # a decode call that may write several steps ends after the step holding one of these
        # (`final_answer`'s \boxed{}), not after its step limit: nothing after the answer is kept
        self.answer_ids = tuple(i for i in processor.tokens_containing("boxed") if i not in self.stop_ids)
        self.positive_id, self.negative_id = keyword_token_ids(tok, config.keywords)
        self.judge_ids = tok.encode(judge_text(config.judge_format, config.judge_instruction, config.judge_cue),
                                    add_special_tokens=False)
        self.specreason_ids = tok.encode(specreason_suffix(config.specreason_prompt, config.specreason_prefix),
                                         add_special_tokens=False)
        self.digit_ids = [tok.encode(str(d), add_special_tokens=False)[0] for d in range(10)]
        self.fallback_mode = resolve_fallback(config.fallback, draft, target)
        self.draft_params = SamplingParams(config.draft_temperature, 0,
                                           config.top_p if config.draft_temperature else 1.0)
        self.target_params = SamplingParams(config.target_temperature, 0,
                                            config.top_p if config.target_temperature else 1.0)

    # ---- steps --------------------------------------------------------------------------

    def step_budget(self, problem: Problem, *, ahead: int = 0, in_step: int = 0) -> int:
        """Tokens the next step may still take: the step cap minus what the step already has, and
        the problem's budget minus uncommitted tokens drafted ahead and the step so far."""
        return max(1, min(self.config.steps.max_step_tokens - in_step, problem.tokens_left - ahead - in_step))

    def split_steps(self, tokens: Sequence[int]) -> list[list[int]]:
        """The steps of one decode call that wrote several, split after each step delimiter or
        EOS; steps after one that ends the reasoning (an answer, EOS) are dropped, as they could
        never be committed; a trailing step without a delimiter is kept as it is."""
        steps, current = [], []
        for t in tokens:
            current.append(t)
            if t in self.stop_ids:
                steps.append(current)
                current = []
                if self.ends_reasoning(steps[-1]):
                    return steps
        if current:
            steps.append(current)
        return steps

    def ends_reasoning(self, tokens: Sequence[int]) -> bool:
        """Whether committing this step would end the problem (it states the answer, or EOS)."""
        return bool(tokens) and (tokens[-1] in self.eos_ids or final_answer(self.proc.decode(tokens)) is not None)

    def hit_cap(self, tokens: Sequence[int]) -> bool:
        return bool(tokens) and tokens[-1] not in self.stop_ids and len(tokens) >= self.config.steps.max_step_tokens

    def commit(self, problem: Problem, tokens: list[int], author: str, rho: float | None = None) -> None:
        """Append a whole step and decide whether reasoning stops."""
        trace = problem.trace
        text = self.proc.decode(tokens)
        trace.steps.append(Step(text=text, token_ids=list(tokens), author=author, rho=rho,
                                hit_cap=self.hit_cap(tokens)))
        problem.committed.extend(tokens)
        answer = final_answer(text)
        if answer is not None:
            trace.answer, trace.finish_reason, problem.done = answer, "answer", True
        elif tokens and tokens[-1] in self.eos_ids:
            trace.finish_reason, problem.done = "eos", True
        elif problem.tokens_left <= 0:
            trace.finish_reason, problem.done = "budget", True
        elif len(trace.steps) >= self.config.steps.max_steps:
            trace.finish_reason, problem.done = "max_steps", True
        if problem.done and trace.answer is None:
            trace.answer = final_answer(trace.text)

    # ---- the target's checks ----------------------------------------------------------------

    def cpn_scores(self, ctx: Context, candidates: Sequence[Sequence[int]]) -> np.ndarray:
        """rho for each candidate continuation of ctx (alternatives, e.g. SAPO's rollouts), in
        one batched forward that reuses the target's cached prefix: only the candidates and the
        judging suffix are run. ctx is unchanged."""
        self.target.set_tokens(ctx, ctx.tokens)
        if len(ctx.pending) > 1 and len(candidates) > 1:
            self.target.feed(ctx, kind="check")  # run the shared pending tokens once, not per row
        logits = self.target.score(ctx, [list(c) + self.judge_ids for c in candidates], kind="check",
                                   max_rows=self.config.window)
        return cpn_rho(np.asarray(logits), self.positive_id, self.negative_id)

    def check_drafts(self, ctx: Context, drafts: Sequence[Sequence[int]]) -> np.ndarray:
        """rho of each drafted step of a chain (draft i continues ctx + drafts[:i]) in one packed
        forward over ctx's cache (`Role.check_chain`); ctx then holds all the drafts."""
        logits = self.target.check_chain(ctx, drafts, self.judge_ids, (self.positive_id, self.negative_id),
                                         max_drafts=self.config.window)
        return cpn_rho(logits, 0, 1)

    def warm_checks(self, ctx: Context, max_width: int = 128, attends: Sequence[int] = (128, 256)) -> int:
        """Compile the packed check for every width bucket up to `max_width` tokens at each
        attended-cache bucket in `attends`, using `ctx` (a freshly opened prompt) as scratch.

        FPSR packs whatever drafts wait when the target is free, so which check widths a run
        meets depends on timing: a warm-up pass over the problems can miss one, and the timed
        pass then compiles it. Returns how many checks ran; ctx ends holding the prompt only."""
        filler = self.judge_ids[:1] or [0]
        widths = sorted({fine_bucket(n, step=8) for n in range(1, max_width + 1)})
        ran = 0
        for attend in attends:
            for width in widths:
                n_draft = width - len(self.judge_ids)
                start = attend - width  # the check then ends in the last slot of this bucket
                if n_draft < 1 or start < ctx.prompt_len or start + width > ctx.cache.max_len:
                    continue
                if attend_bucket(start + width, ctx.cache.max_len) != attend:
                    continue
                self.target.set_tokens(ctx, filler * (start - ctx.prompt_len))
                self.target.feed(ctx, kind="warm-up")
                self.check_drafts(ctx, [filler * n_draft])
                ran += 1
        self.target.set_tokens(ctx, [])
        return ran

    def specreason_score(self, ctx: Context, candidate: Sequence[int]) -> int:
        """SpecReason's forced 0-9 score of one drafted step; ctx then holds the step."""
        logits = self.target.check_chain(ctx, [candidate], self.specreason_ids, self.digit_ids)
        return int(np.argmax(logits[0]))


def resolve_fallback(mode: str, draft: Role | None, target: Role) -> str:
    """`SpeculationConfig.fallback` "auto" made concrete: "eager" when the target has accelerator devices
    of its own (its fallback decoding then runs in time the checks leave idle), else "on_reject"
    (roles on one device, or CPU devices, whose cores every computation shares: a fallback chunk
    in flight delays the check behind it by the chunk's time, and at high acceptance the step is
    rarely needed)."""
    if mode != "auto":
        return mode
    separate = draft is not None and not set(draft.devices) & set(target.devices)
    return "eager" if separate and target.devices[0].platform != "cpu" else "on_reject"


def check_same_tokenizer(draft_proc, target_proc) -> None:
    """Draft and target must tokenize identically (docs/METHOD.md section 6)."""
    a, b = draft_proc.tokenizer, target_proc.tokenizer
    if a.get_vocab() != b.get_vocab():
        raise TokenizerMismatchError(
            f"draft and target tokenizers differ (vocabulary sizes {len(a)} and {len(b)}); "
            "step-level speculation needs one shared tokenizer")
    probe = "Step 1: 3 + 4 = 7.\n\nSo \\boxed{7}"
    if a.encode(probe, add_special_tokens=False) != b.encode(probe, add_special_tokens=False):
        raise TokenizerMismatchError("draft and target tokenizers encode the same text differently")


# ---- methods ------------------------------------------------------------------------------

Runner = Callable[[StepEngine, Problem], None]


def runner(method: str) -> Runner:
    """The function that runs one problem with `method`, as `config.RUNNERS` names it."""
    if method not in RUNNERS:
        raise ValueError(f"unknown method '{method}'; known: {', '.join(RUNNERS)}")
    module, name = RUNNERS[method].split(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), name)



def run_single(engine: StepEngine, problem: Problem, role_name: str) -> None:
    """`target` / `draft`: one model alone, autoregressive. Each decode call writes up to
    `solo_tokens_per_call` tokens, as many steps as fit, and ends after the step that states the
    answer, so the baseline pays no per-step call overhead; the steps are committed one by one
    as the step-level methods commit theirs. A step the call's token limit cuts is continued by
    the next call (the step cap counts its earlier tokens)."""
    role = engine.target if role_name == "target" else engine.draft
    ctx = problem.target_ctx if role_name == "target" else problem.draft_ctx
    cfg = engine.config
    partial: list[int] = []  # the start of a step cut by the last call's token limit
    while not problem.done:
        tokens, _ = role.write(ctx,
                               max_tokens=max(1, min(cfg.solo_tokens_per_call, problem.tokens_left - len(partial))),
                               stop_ids=engine.delimiter_ids, end_ids=engine.eos_ids, answer_ids=engine.answer_ids,
                               max_steps=cfg.steps.max_steps - len(problem.trace.steps),
                               max_step_tokens=cfg.steps.max_step_tokens, in_step=len(partial),
                               answered=any(t in engine.answer_ids for t in partial),
                               params=engine.target_params if role_name == "target" else engine.draft_params,
                               seed=cfg.seed + len(problem.committed) + len(partial), kind="decode")
        steps = engine.split_steps(partial + tokens)
        partial = []
        for step in steps:
            if step is steps[-1] and step[-1] not in engine.stop_ids and not engine.hit_cap(step) \
                    and len(step) < problem.tokens_left:
                partial = step  # cut by the call's token limit, not by the step cap or the budget
                break
            engine.commit(problem, step, role_name)
            if problem.done:
                break


def run_target(engine: StepEngine, problem: Problem) -> None:
    """`target`: the target alone (`run_single`)."""
    run_single(engine, problem, "target")


def run_draft(engine: StepEngine, problem: Problem) -> None:
    """`draft`: the draft alone (`run_single`)."""
    run_single(engine, problem, "draft")


def run_specreason(engine: StepEngine, problem: Problem) -> None:
    """SpecReason: draft one step, the target scores it 0-9, the target rewrites it if too low."""
    cfg = engine.config
    while not problem.done:
        engine.draft.set_tokens(problem.draft_ctx, problem.committed)
        drafted, _ = engine.draft.write(problem.draft_ctx, max_tokens=engine.step_budget(problem),
                                        stop_ids=engine.stop_ids, params=engine.draft_params,
                                        seed=cfg.seed + len(problem.committed), kind="draft")
        engine.target.set_tokens(problem.target_ctx, problem.committed)
        score = engine.specreason_score(problem.target_ctx, drafted)  # the context now holds the step
        problem.trace.drafted_checked += 1
        if score >= cfg.specreason_threshold and not engine.hit_cap(drafted):
            problem.trace.drafted_accepted += 1
            engine.commit(problem, drafted, "draft", rho=score / 9)
        else:
            engine.target.set_tokens(problem.target_ctx, problem.committed)
            written, _ = engine.target.write(problem.target_ctx, max_tokens=engine.step_budget(problem),
                                             stop_ids=engine.stop_ids, params=engine.target_params,
                                             seed=cfg.seed + len(problem.committed), kind="fallback")
            engine.commit(problem, written, "target", rho=score / 9)


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def run_lookahead(engine: StepEngine, problem: Problem) -> None:
    """Lookahead Reasoning: the draft runs `window` steps ahead; the target writes its own step
    for every drafted prefix in one batch; drafted steps are kept while they match the target's
    (normalised exact match, else a one-token judge)."""
    cfg = engine.config
    tok = engine.proc.tokenizer
    aligned_ids = tok.encode("aligned", add_special_tokens=False)[0], tok.encode("un", add_special_tokens=False)[0]
    while not problem.done:
        engine.draft.set_tokens(problem.draft_ctx, problem.committed)
        drafts, spent = [], 0
        for _ in range(cfg.window):
            budget = engine.step_budget(problem, ahead=spent)
            d, _ = engine.draft.write(problem.draft_ctx, max_tokens=budget, stop_ids=engine.stop_ids,
                                      params=engine.draft_params, seed=cfg.seed + len(problem.committed) + spent,
                                      kind="draft")
            drafts.append(d)
            spent += len(d)
            if (d and (d[-1] in engine.eos_ids or final_answer(engine.proc.decode(d)) is not None)
                    or spent >= problem.tokens_left):
                break
        engine.target.set_tokens(problem.target_ctx, problem.committed)
        prefixes = [sum(drafts[:i], []) for i in range(len(drafts))]
        targets = engine.target.write_many(problem.target_ctx, prefixes, max_tokens=engine.step_budget(problem),
                                           stop_ids=engine.stop_ids, params=engine.target_params, seed=cfg.seed,
                                           kind="fallback")
        for i, (d, t) in enumerate(zip(drafts, targets)):
            problem.trace.drafted_checked += 1
            same = _normalise(engine.proc.decode(d)) == _normalise(engine.proc.decode(t)) and not engine.hit_cap(d)
            if not same and cfg.lookahead_judge != "model":
                same = cfg.lookahead_judge == "always" and not engine.hit_cap(d)
            elif not same:
                suffix = tok.encode(lookahead_suffix(engine.proc.decode(d), engine.proc.decode(t)),
                                    add_special_tokens=False)
                logits = np.asarray(engine.target.score(problem.target_ctx, [prefixes[i] + suffix], kind="check"))[0]
                same = logits[aligned_ids[0]] > logits[aligned_ids[1]] and not engine.hit_cap(d)
            if same:
                problem.trace.drafted_accepted += 1
                engine.commit(problem, d, "draft")
            else:
                engine.commit(problem, t, "target")
                break
            if problem.done:
                break


def run_sd(engine: StepEngine, problem: Problem) -> None:
    """Token-level speculative decoding with exact rejection sampling (Leviathan et al.):
    greedy output equals the target's greedy output; sampled output follows the target's
    distribution at its temperature. Per round, two device calls: the draft proposes up to
    `sd_tokens` tokens in one decode program, and the target runs them and accepts on the
    device in one program (`Role.propose` / `Role.verify`)."""
    cfg = engine.config
    temp_t = cfg.target_temperature
    temp_d = cfg.draft_temperature or temp_t
    target_params = SamplingParams(temp_t, 0, cfg.top_p if temp_t else 1.0)
    draft_params = SamplingParams(temp_d if temp_t else 0.0, 0, cfg.top_p if temp_t else 1.0)
    step: list[int] = []
    rounds = 0
    while not problem.done:
        engine.draft.set_tokens(problem.draft_ctx, problem.committed + step)
        engine.target.set_tokens(problem.target_ctx, problem.committed + step)
        k = max(1, min(cfg.sd_tokens, engine.step_budget(problem, in_step=len(step)) - 1))
        seed = cfg.seed + 7919 * rounds  # one stream per round for the draft, another for the target
        rounds += 1
        proposal, q_logits = engine.draft.propose(problem.draft_ctx, max_tokens=k, stop_ids=engine.stop_ids,
                                                  params=draft_params, seed=seed)
        n_acc, token = engine.target.verify(problem.target_ctx, proposal, q_logits, k=cfg.sd_tokens,
                                            params=target_params, draft_params=draft_params, seed=seed + 1)
        out = proposal[:n_acc] + [token]
        problem.trace.drafted_checked += len(proposal)
        problem.trace.drafted_accepted += n_acc
        for tok in out:
            step.append(tok)
            if tok in engine.stop_ids or len(step) >= engine.step_budget(problem):
                engine.commit(problem, step, "target")
                step = []
                if problem.done:
                    break
        # the rejected proposal tokens are rolled back by the next set_tokens


def speculative_accept(p_rows, q_rows, proposal: Sequence[int], rng: np.random.Generator) -> list[int]:
    """Exact rejection sampling of one proposal (Leviathan et al., 2023), a pure function.

    p_rows: k + 1 target probability rows (row j predicts proposal[j]; row k is the bonus
    position); q_rows: the k draft probability rows proposal[j] was sampled from. Each
    proposal token is kept with probability min(1, p/q); at the first rejection one token is
    drawn from the residual max(p - q, 0) (normalised) and the rest dropped; if all are kept a
    bonus token is drawn from row k. Every emitted token is then distributed exactly as the
    target's p. Returns the accepted prefix plus that one target token."""
    out: list[int] = []
    for j, tok in enumerate(proposal):
        p, q = np.asarray(p_rows[j], np.float64), np.asarray(q_rows[j], np.float64)
        if rng.random() < min(1.0, p[tok] / q[tok]):
            out.append(int(tok))
        else:
            residual = np.maximum(p - q, 0)
            total = residual.sum()
            # total == 0 means p == q up to rounding, where a rejection has probability 0: use p
            out.append(int(rng.choice(len(p), p=residual / total if total > 0 else p)))
            return out
    last = np.asarray(p_rows[len(proposal)], np.float64)
    out.append(int(rng.choice(len(last), p=last)))
    return out

