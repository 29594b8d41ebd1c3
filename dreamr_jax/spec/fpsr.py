"""FPSR, the `dreamr` method (SPEC.md section 4): drafting, checking and the target's own
fallback step run at the same time, the draft on its devices and the target on its own.

Two host threads, one per role, share a small state under a condition variable:

- the draft thread keeps up to `window` drafted steps ahead of the commit point, each
  conditioned on the committed text plus the earlier drafts, handing each over as it ends;
- the target thread (the caller's) checks every handed-over step as soon as it exists (all
  unchecked ones in one batched forward that reuses the cached prefix), meanwhile writes its
  own step for the earliest uncommitted position in short chunks, and commits in order:
  an accepted draft cancels that fallback (early stop); a rejected one commits the fallback,
  bumps the epoch (cancelling every later draft and check) and the window restarts there.

Cancelled work is only ever discarded: the committed text is decided by the commit rule
alone, and each context is rolled back (a cache-length change) to the committed tokens.
The scheduler is deterministic in what it commits (given greedy decoding); only timing varies.
"""

from __future__ import annotations

import threading

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


def run_dreamr(engine: StepEngine, problem: Problem) -> None:
    shared = _Shared()
    draft_thread = threading.Thread(target=_draft_loop, args=(engine, problem, shared), daemon=True)
    draft_thread.start()
    try:
        _target_loop(engine, problem, shared)
    finally:
        with shared.cond:
            shared.finished = True
            shared.cond.notify_all()
        draft_thread.join()
    if shared.error is not None:
        raise shared.error


def _draft_loop(engine: StepEngine, problem: Problem, shared: _Shared) -> None:
    cfg = engine.config
    try:
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
            left = problem.trace.extra["token_budget"] - len(base) - spent  # budget after base + drafts
            if left <= 0 or (last is not None and _ends_reasoning(engine, last)):
                with shared.cond:  # nothing useful to draft until the target commits
                    if shared.epoch == epoch and len(shared.drafts) == n_before and not shared.finished:
                        shared.cond.wait()
                continue
            engine.draft.set_tokens(problem.draft_ctx, base + drafted)
            tokens, _ = engine.draft.write(problem.draft_ctx, max_tokens=max(1, min(cfg.steps.max_step_tokens, left)),
                                           stop_ids=engine.stop_ids, params=engine.draft_params,
                                           seed=cfg.seed + len(base) + spent, kind="draft")
            with shared.cond:
                if shared.epoch == epoch:
                    shared.drafts.append(tokens)
                    shared.rhos.append(None)
                    shared.cond.notify_all()
                # else: a rejection restarted the window while we drafted; the step is dropped (cancelled)
    except BaseException as e:  # surface in the caller's thread
        with shared.cond:
            shared.error = e
            shared.finished = True
            shared.cond.notify_all()


def _ends_reasoning(engine: StepEngine, tokens: list[int]) -> bool:
    from .steps import final_answer

    return bool(tokens) and (tokens[-1] in engine.eos_ids or final_answer(engine.proc.decode(tokens)) is not None)


def _target_loop(engine: StepEngine, problem: Problem, shared: _Shared) -> None:
    cfg = engine.config
    target = engine.target
    fallback_ctx = None
    fallback_tokens: list[int] = []
    fallback_for = None  # (epoch, committed length) the fallback was started for
    check_ctx = None  # committed text + checked drafts, for incremental checks
    while not problem.done:
        with shared.cond:
            if shared.error is not None:
                return
            epoch = shared.epoch
            drafts = [list(d) for d in shared.drafts]
            rhos = list(shared.rhos)

        # 1. commit in order whatever is decided
        if drafts and rhos[0] is not None:
            accepted = is_accepted(rhos[0], cfg.alpha) and not engine.hit_cap(drafts[0])
            fallback_done = fallback_for == (epoch, len(problem.committed)) and _step_done(engine, problem, fallback_tokens)
            if accepted or fallback_done:
                problem.trace.drafted_checked += 1
                with shared.cond:
                    if accepted:
                        problem.trace.drafted_accepted += 1
                        engine.commit(problem, drafts[0], "draft", rho=float(rhos[0]))
                        shared.drafts.pop(0)
                        shared.rhos.pop(0)
                    else:
                        engine.commit(problem, fallback_tokens, "target", rho=float(rhos[0]))
                        target_ctx_from_fallback = fallback_ctx
                        shared.epoch += 1
                        shared.drafts.clear()
                        shared.rhos.clear()
                    shared.cond.notify_all()
                if not accepted:
                    problem.target_ctx = target_ctx_from_fallback  # it already holds the committed step
                fallback_ctx, fallback_tokens, fallback_for = None, [], None  # cancel (early stop) or consumed
                continue

        # 2. check every drafted step that has no score yet, in one batched forward. The check
        #    context holds the committed text plus the already-checked drafts, so each check
        #    runs only its own step and the judging suffix.
        unchecked = [i for i, r in enumerate(rhos) if r is None]
        if unchecked:
            first = unchecked[0]
            if check_ctx is None:
                check_ctx = target.fork(problem.target_ctx)
            target.set_tokens(check_ctx, problem.committed + [t for d in drafts[:first] for t in d])
            candidates = [[t for d in drafts[first : i + 1] for t in d] for i in unchecked]
            scores = engine.cpn_scores(check_ctx, candidates, extend_ctx=True)
            with shared.cond:
                if shared.epoch == epoch:
                    for i, rho in zip(unchecked, scores):
                        shared.rhos[i] = float(rho)
            continue

        # 3. the target's own step for the earliest uncommitted position, one chunk at a time
        rejected = bool(drafts) and rhos[0] is not None and (not is_accepted(rhos[0], cfg.alpha) or engine.hit_cap(drafts[0]))
        if cfg.fallback == "eager":
            need_fallback = not drafts or rhos[0] is None or rejected
        else:
            need_fallback = rejected
        key = (epoch, len(problem.committed))
        if need_fallback and not (fallback_for == key and _step_done(engine, problem, fallback_tokens)):
            if fallback_for != key:
                fallback_ctx, fallback_tokens, fallback_for = _context_at(target, problem, check_ctx), [], key
            chunk = min(cfg.fallback_chunk, engine.step_budget(problem, in_step=len(fallback_tokens)))
            new, _ = target.write(fallback_ctx, max_tokens=chunk, stop_ids=engine.stop_ids,
                                  params=engine.target_params, seed=cfg.seed + len(problem.committed) + len(fallback_tokens),
                                  kind="fallback")
            fallback_tokens = fallback_tokens + new
            continue

        # 4. nothing to do until the draft hands over a step
        with shared.cond:
            if shared.epoch == epoch and len(shared.drafts) == len(drafts) and shared.error is None:
                shared.cond.wait(timeout=1.0)


def _context_at(target, problem: Problem, check_ctx):
    """A fresh target context holding exactly the committed text, forked from whichever of the
    target's contexts already has more of it computed: after accepted drafts that is the check
    context (it ran them), so the fallback starts with a cheap truncation, not a re-run."""
    def shared(ctx):
        n = 0
        for a, b in zip(ctx.fed, problem.committed):
            if a != b:
                break
            n += 1
        return n

    base = problem.target_ctx
    if check_ctx is not None and shared(check_ctx) > shared(base):
        base = check_ctx
    ctx = target.fork(base)
    target.set_tokens(ctx, problem.committed)
    return ctx


def _step_done(engine: StepEngine, problem: Problem, tokens: list[int]) -> bool:
    if not tokens:
        return False
    return tokens[-1] in engine.stop_ids or len(tokens) >= engine.step_budget(problem)
