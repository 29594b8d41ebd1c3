"""FPSR, the `dreamr` method (docs/METHOD.md section 4): drafting, checking and the target's own
fallback step run at the same time, the draft on its devices and the target on its own.

Two host threads, one per role, share a small state under a condition variable:

- the target's prefill is dispatched first; the draft thread then prefills its own context and
  keeps up to `window` drafted steps ahead of the commit point, each conditioned on the
  committed text plus the earlier drafts, handing each over as it ends (or
  `draft_steps_per_call` at a time);
- the target thread (the caller's) checks every handed-over step that waits, all in one packed
  forward on a context that holds the committed text and the steps already checked
  (`StepEngine.check_drafts`), first waiting for a step the draft is about to finish
  (`gather_checks`); it writes its own step for the commit point either meanwhile, in short
  chunks (`fallback="eager"`), or once a drafted step is rejected (`"on_reject"`); and it
  commits in order: an accepted draft cancels that fallback (early stop); a rejected one
  commits the target's step, bumps the epoch (cancelling every later draft and check) and the
  window restarts there.

Cancelled work is only ever discarded: the committed text is decided by the commit rule
alone, and each context is rolled back (a cache-length change) to the committed tokens.
The scheduler is deterministic in what it commits (given greedy decoding); only timing varies.
"""

from __future__ import annotations

import threading
import time

from .methods import Problem, StepEngine
from .tbvm import is_accepted


class _Shared:
    def __init__(self):
        self.cond = threading.Condition()
        self.epoch = 0
        self.drafts: list[list[int]] = []  # uncommitted drafted steps, in order
        self.rhos: list[float | None] = []  # their checks (None = not yet checked)
        self.finished = False
        self.error: BaseException | None = None
        # when the draft started the step it is writing now (None: not writing), and how long its
        # steps take (a running mean): the target's check gathering reads them
        self.drafting_since: float | None = None
        self.draft_step_s = 0.0


def run_dreamr(engine: StepEngine, problem: Problem) -> None:
    shared = _Shared()
    # Both prompts are prepared on the host first, then both prefills dispatched, the target's
    # first (jax runs them asynchronously, each on its role's devices); the draft thread then
    # waits for its own and drafts while this thread waits for the target's. On the 2-core CPU,
    # Python work done while a prefill runs competes with it for the cores (preparing the draft's
    # prompt after dispatching the target's took 0.3-3.7 ms), and a draft that opened its own
    # context from its new thread started about a millisecond later still.
    names = [n for n in ("target", "draft") if getattr(problem, f"{n}_ctx") is None]
    prepared = [problem.prepare(n) for n in names]
    waits = dict(zip(names, (problem.dispatch(p)[1] for p in prepared)))
    target_open, draft_open = waits.get("target"), waits.get("draft")
    draft_thread = threading.Thread(target=_draft_loop, args=(engine, problem, shared, draft_open), daemon=True)
    draft_thread.start()
    try:
        if target_open is not None:
            target_open()
        _target_loop(engine, problem, shared)
    finally:
        with shared.cond:
            shared.finished = True
            shared.cond.notify_all()
        draft_thread.join()
    if shared.error is not None:
        raise shared.error


def _draft_loop(engine: StepEngine, problem: Problem, shared: _Shared, draft_open=None) -> None:
    cfg = engine.config
    try:
        if draft_open is not None:
            draft_open()
        while True:
            with shared.cond:
                while not shared.finished and len(shared.drafts) >= cfg.window:
                    shared.cond.wait()
                if shared.finished:
                    return
                # Within an epoch the target only moves accepted drafts from the front of
                # `drafts` to the committed text, so committed + drafts stays the same token
                # sequence: a step drafted on this snapshot stays valid until the epoch changes.
                epoch = shared.epoch
                drafted = [t for d in shared.drafts for t in d]
                base = list(problem.committed)
                n_before = len(shared.drafts)
                last = shared.drafts[-1] if shared.drafts else None
            spent = len(drafted)
            left = problem.token_budget - len(base) - spent  # budget after base + drafts
            if left <= 0 or (last is not None and engine.ends_reasoning(last)):
                with shared.cond:  # nothing useful to draft until the target commits
                    if shared.epoch == epoch and len(shared.drafts) == n_before and not shared.finished:
                        shared.cond.wait()
                continue
            n_steps = min(cfg.draft_steps_per_call, cfg.window - n_before)
            with shared.cond:
                started = shared.drafting_since = time.perf_counter()
            engine.draft.set_tokens(problem.draft_ctx, base + drafted)
            tokens, _ = engine.draft.write(
                problem.draft_ctx, max_tokens=max(1, min(n_steps * cfg.steps.max_step_tokens, left)),
                stop_ids=engine.delimiter_ids if n_steps > 1 else engine.stop_ids, params=engine.draft_params,
                seed=cfg.seed + len(base) + spent, kind="draft", max_steps=n_steps,
                end_ids=engine.eos_ids if n_steps > 1 else (), max_step_tokens=cfg.steps.max_step_tokens,
                answer_ids=engine.answer_ids)
            steps = engine.split_steps(tokens) if n_steps > 1 else [tokens]
            with shared.cond:
                took = (time.perf_counter() - started) / len(steps)
                shared.draft_step_s = took if not shared.draft_step_s else 0.7 * shared.draft_step_s + 0.3 * took
                shared.drafting_since = None
                if shared.epoch == epoch:
                    shared.drafts.extend(steps)
                    shared.rhos.extend([None] * len(steps))
                shared.cond.notify_all()
                # else: a rejection restarted the window while we drafted; the step is dropped (cancelled)
    except BaseException as e:  # surface in the caller's thread
        with shared.cond:
            shared.error = e
            shared.finished = True
            shared.cond.notify_all()


def _target_loop(engine: StepEngine, problem: Problem, shared: _Shared) -> None:
    cfg = engine.config
    target = engine.target
    ctx = problem.target_ctx  # committed text + every drafted step already checked (their keys kept)
    eager = engine.fallback_mode == "eager"
    fallback: _Fallback | None = None  # eager mode: the target's own step for the commit point
    last_check_s = 0.0  # how long the last check took
    while not problem.done:
        with shared.cond:
            if shared.error is not None:
                return
            epoch = shared.epoch
            drafts = [list(d) for d in shared.drafts]
            rhos = list(shared.rhos)
        key = (epoch, len(problem.committed))

        # 1. commit in order whatever is decided
        if drafts and rhos[0] is not None:
            problem.trace.drafted_checked += 1
            if is_accepted(rhos[0], cfg.alpha) and not engine.hit_cap(drafts[0]):
                problem.trace.drafted_accepted += 1
                with shared.cond:
                    engine.commit(problem, drafts[0], "draft", rho=float(rhos[0]))
                    shared.drafts.pop(0)
                    shared.rhos.pop(0)
                    shared.cond.notify_all()
                fallback = None  # early stop: that position's fallback is not needed
                continue
            # Rejected: the target's own step at the commit point. On rejection only, it is written
            # now, in one call, in the check context rolled back to the committed text (a length
            # change); eager mode finishes the step it has been writing meanwhile.
            if fallback is None or fallback.key != key:
                fallback = _Fallback(key, target.fork(ctx) if eager else ctx, [])
                target.set_tokens(fallback.ctx, problem.committed)
            while not _step_done(engine, problem, fallback.tokens):
                _write_fallback(engine, problem, fallback, engine.step_budget(problem, in_step=len(fallback.tokens)))
            with shared.cond:
                engine.commit(problem, fallback.tokens, "target", rho=float(rhos[0]))
                shared.epoch += 1  # cancels every later draft and check
                shared.drafts.clear()
                shared.rhos.clear()
                shared.cond.notify_all()
            ctx = problem.target_ctx = fallback.ctx  # it holds the committed text, fallback step included
            fallback = None
            continue

        # 2. check every drafted step that has no score yet: all in one packed forward over the
        #    check context, which already holds the committed text and the earlier drafts.
        unchecked = [i for i, r in enumerate(rhos) if r is None]
        if unchecked and cfg.gather_checks and _draft_ends_soon(shared, epoch, len(drafts), last_check_s):
            continue  # the step the draft is finishing joins this check
        if unchecked:
            first = unchecked[0]
            target.set_tokens(ctx, problem.committed + [t for d in drafts[:first] for t in d])
            check_start = time.perf_counter()
            scores = engine.check_drafts(ctx, drafts[first:])
            last_check_s = time.perf_counter() - check_start
            with shared.cond:
                if shared.epoch == epoch:
                    for i, rho in zip(unchecked, scores):
                        shared.rhos[i] = float(rho)
            continue

        # 3. eager: meanwhile the target's own step for the commit point, a short chunk at a time,
        #    in a context of its own (so the checks' context stays as it is)
        if eager and not (fallback is not None and fallback.key == key
                          and _step_done(engine, problem, fallback.tokens)):
            if fallback is None or fallback.key != key:
                fallback = _Fallback(key, target.fork(ctx), [])
                target.set_tokens(fallback.ctx, problem.committed)
            _write_fallback(engine, problem, fallback,
                            min(cfg.fallback_chunk, engine.step_budget(problem, in_step=len(fallback.tokens))))
            continue

        # 4. nothing to do until the draft hands over a step. Here every drafted step has been
        #    committed (1. takes checked ones, 2. checks the rest), so the draft is writing one:
        #    it only waits with no drafts when the budget is spent, and a spent budget ends the
        #    problem at its last commit (`StepEngine.commit`; a problem with none is done before it
        #    starts). The timeout only re-checks that reasoning (and the error).
        with shared.cond:
            if shared.epoch == epoch and len(shared.drafts) == len(drafts) and shared.error is None:
                shared.cond.wait(timeout=1.0)


def _draft_ends_soon(shared: _Shared, epoch: int, n_drafts: int, check_s: float) -> bool:
    """Gathering checks: if the draft is writing a step that should end sooner than a check takes
    (its running mean step time says), wait for that step (up to that long) so one forward checks
    it with the waiting ones, instead of a forward now and another right after it (each forward
    has a fixed cost). Returns whether it waited; the caller then looks again."""
    with shared.cond:
        since = shared.drafting_since
        if since is None or shared.epoch != epoch or len(shared.drafts) != n_drafts:
            return False
        left = shared.draft_step_s - (time.perf_counter() - since)
        if not 0.0 < left <= check_s:
            return False
        shared.cond.wait(timeout=left * 1.5)
        return True


class _Fallback:
    """The target's own step for one commit point: (epoch, committed length), its context, tokens."""

    def __init__(self, key, ctx, tokens):
        self.key, self.ctx, self.tokens = key, ctx, tokens


def _write_fallback(engine: StepEngine, problem: Problem, fallback: _Fallback, max_tokens: int) -> None:
    new, _ = engine.target.write(fallback.ctx, max_tokens=max_tokens, stop_ids=engine.stop_ids,
                                 params=engine.target_params,
                                 seed=engine.config.seed + len(problem.committed) + len(fallback.tokens),
                                 kind="fallback")
    fallback.tokens = fallback.tokens + new


def _step_done(engine: StepEngine, problem: Problem, tokens: list[int]) -> bool:
    if not tokens:
        return False
    return tokens[-1] in engine.stop_ids or len(tokens) >= engine.step_budget(problem)
