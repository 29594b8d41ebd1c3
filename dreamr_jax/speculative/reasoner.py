"""`SpeculativeReasoner`: the research API over the six methods."""

from __future__ import annotations

import json
import os
import time
import traceback
from typing import Iterable, Sequence

from .. import compiles
from ..sharding import split_devices
from ..prompts import question_text
from .config import SpeculationConfig
from .methods import Problem, StepEngine, check_same_tokenizer, runner
from .results import check_methods, open_results, read_results, result_key
from .roles import Role
from .timeline import overlap_time, project
from .trace import Trace


class ContextLengthError(ValueError):
    """A question (with its image tokens) plus the token budget exceeds the model's context."""


def _capacity(cfg: SpeculationConfig) -> int:
    """Tokens a problem's contexts make room for after the prompt (drafts ahead, checks' scratch)."""
    return cfg.steps.token_budget + cfg.steps.max_step_tokens + 256


def _model(m, dtype):
    if isinstance(m, (str, os.PathLike)):
        from ..loading import load_model

        return load_model(m, dtype=dtype)
    return m


class SpeculativeReasoner:
    """Step-level speculative reasoning with a draft and a target Qwen-VL.

    reasoner = SpeculativeReasoner(draft=..., target=..., processor=..., method="dreamr",
                                   alpha=0.7, window=4)
    trace = reasoner.solve("What is 3 + 4?", image="figure.png")

    draft / target: loaded models or checkpoint paths; processor: a `Processor` (default: the
    target checkpoint's). Roles sit on disjoint devices from `split_devices` (or share one); a role
    with several devices splits its weights over them (`*_parallelism="tensor"`, the default) or
    keeps a copy on each ("replicate").
    method / alpha / window default to `config`'s (SpeculationConfig(): dreamr, 0.7, 4); any other
    `SpeculationConfig` field can be passed as a keyword.
    """

    def __init__(self, draft=None, target=None, processor=None, method: str | None = None, alpha: float | None = None,
                 window: int | None = None, *, config: SpeculationConfig | None = None, draft_processor=None,
                 dtype="float32", draft_devices=None, target_devices=None, draft_parallelism: str = "tensor",
                 target_parallelism: str = "tensor", **overrides):
        import dataclasses

        if target is None:
            raise ValueError("a target model (or checkpoint path) is required")
        base = config or SpeculationConfig()
        explicit = {k: v for k, v in dict(method=method, alpha=alpha, window=window).items() if v is not None}
        self.config = dataclasses.replace(base, **explicit, **overrides)
        if processor is None or isinstance(processor, (str, os.PathLike)):
            from ..processing import load_processor

            path = processor if processor is not None else (target if isinstance(target, (str, os.PathLike)) else None)
            if path is None:
                raise ValueError("pass processor=... when target is an already loaded model")
            processor = load_processor(path)
        if draft_processor is None and isinstance(draft, (str, os.PathLike)):
            from ..processing import load_processor

            draft_processor = load_processor(draft)
        if draft_processor is not None:
            check_same_tokenizer(draft_processor, processor)
        self.processor = processor
        draft_model, target_model = _model(draft, dtype), _model(target, dtype)
        if draft_model is not None and draft_model.cfg.text.vocab_size != target_model.cfg.text.vocab_size:
            raise ValueError(f"draft vocabulary {draft_model.cfg.text.vocab_size} != target vocabulary "
                             f"{target_model.cfg.text.vocab_size}: they must share a tokenizer")
        if draft_devices is None or target_devices is None:
            d, t = split_devices(1, 1)
            draft_devices, target_devices = draft_devices or d, target_devices or t
        self.target = Role("target", target_model, target_devices, target_parallelism)
        self.draft = Role("draft", draft_model, draft_devices, draft_parallelism) if draft_model is not None else None
        self._engines: dict[str, StepEngine] = {}
        # Validates keywords etc. at start-up, with a method this pair runs: a target alone (no
        # draft) runs only `target`, whatever the config's default; a method that needs the draft
        # is refused when it is asked for (`solve`, `solve_many`, `dreamr eval`).
        self.engine(self.config.method if self.draft is not None else "target")

    def engine(self, method: str) -> StepEngine:
        import dataclasses

        if method not in self._engines:
            cfg = dataclasses.replace(self.config, method=method)
            if method != "target" and self.draft is None:
                raise ValueError(f"method '{method}' needs a draft model")
            self._engines[method] = StepEngine(self.draft, self.target, self.processor, cfg)
        return self._engines[method]

    def prompt(self, question: str, num_images: int) -> str:
        return self.processor.user_prompt(question_text(self.config.instruction, question), num_images)

    def solve(self, question: str, image=None, method: str | None = None) -> Trace:
        """Reason about one question (and optional image, or list of images) with one method."""
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"the question must be a non-empty string, got {question!r}")
        method = method or self.config.method
        engine = self.engine(method)
        run = runner(method)  # before the clock starts: the first call imports the method's module
        cfg = engine.config
        images = [] if image is None else (list(image) if isinstance(image, (list, tuple)) else [image])
        enc = self.processor.encode(self.prompt(question, len(images)), images)
        ids = enc["input_ids"]
        limit = min(self.target.model.cfg.text.max_position_embeddings,
                    self.draft.model.cfg.text.max_position_embeddings if self.draft else 10**9)
        if len(ids) + cfg.steps.token_budget > limit:
            raise ContextLengthError(
                f"the question needs {len(ids)} prompt tokens; with a token budget of {cfg.steps.token_budget} "
                f"that exceeds the models' context of {limit} positions")
        # the settings the trace was made under, kept with it in results files
        trace = Trace(method=method, question=question, extra={"token_budget": cfg.steps.token_budget,
                                                                "alpha": cfg.alpha, "window": cfg.window})
        compiles_before, compile_s_before = compiles.totals()
        start = time.perf_counter()
        roles = ([self.target] if method != "draft" else []) + \
            ([self.draft] if self.draft is not None and method != "target" else [])
        for role in roles:
            role.reset_clock(start)
        problem = Problem(trace=trace, prompt_ids=ids, token_budget=cfg.steps.token_budget)
        capacity = _capacity(cfg)
        for role in roles:
            problem.openers[role.name] = (lambda role=role: role.prepare(
                ids, enc["pixel_values"], enc["image_grid_thw"], capacity=capacity))
        if method != "dreamr":  # dreamr prefills each role in that role's thread
            for name in problem.openers:
                problem.open(name)
        run(engine, problem)
        trace.wall_time = time.perf_counter() - start
        compiled, compile_s = compiles.totals()
        trace.extra["compiles"] = compiled - compiles_before  # XLA compilations inside this solve
        trace.extra["compile_s"] = compile_s - compile_s_before
        trace.intervals = sorted([i for r in roles for i in r.intervals], key=lambda i: i.start)
        trace.extra["projected_time"] = project(trace)
        trace.extra["overlap_time"] = overlap_time(trace)
        return trace

    def warm_up_checks(self, question: str, image=None, method: str = "dreamr") -> int:
        """Compile `method`'s packed check for every width and attended-cache bucket a run on this
        kind of prompt can reach (`StepEngine.warm_checks`); `dreamr eval` / `demo` call it after
        their warm-up pass. Returns the number of checks run."""
        engine = self.engine(method)
        cfg = engine.config
        images = [] if image is None else (list(image) if isinstance(image, (list, tuple)) else [image])
        enc = self.processor.encode(self.prompt(question, len(images)), images)
        ctx = self.target.open(enc["input_ids"], enc["pixel_values"], enc["image_grid_thw"],
                               capacity=_capacity(cfg))
        return engine.warm_checks(ctx)

    def solve_many(self, records: Iterable[dict], output: str | None = None, methods: Sequence[str] | None = None,
                   progress: bool = True, resume: bool = True) -> list[dict]:
        """Solve records ({'question', 'image'? or 'images'?, 'answer'?, 'id'?}) with each method.

        Results stream to `output` (JSONL, appended) as they finish; a record that fails is
        written with its error and the run goes on. With `resume` (the default) a (record id,
        method) pair that `output` already holds with status ok is not solved again: its row is
        returned as written and the number skipped is printed. A record without an id is known
        by its position. Returns a row per record and method, in order."""
        from tqdm import tqdm

        methods = list(dict.fromkeys(methods or [self.config.method]))
        check_methods(methods, has_draft=self.draft is not None)  # before any solve, not once per record
        records = list(records)
        done = {}
        if output and resume:
            done = {k: row for k, row in read_results(output).items() if row.get("status") == "ok"}
        keys = [[result_key(record.get("id", idx), m) for m in methods] for idx, record in enumerate(records)]
        todo = sum(k not in done for row in keys for k in row)
        if todo < len(records) * len(methods):
            print(f"resuming: {len(records) * len(methods) - todo} of {len(records) * len(methods)} (record, method) "
                  f"pairs are already in {output} with status ok; skipped")
        results = []
        sink = open_results(output) if output and todo else None
        try:
            bar = tqdm(total=todo, disable=not progress, desc="solving")
            for idx, record in enumerate(records):
                for method, key in zip(methods, keys[idx]):
                    if key in done:
                        results.append(done[key])
                        continue
                    row = {"id": record.get("id", idx), "method": method, "reference": record.get("answer")}
                    try:
                        image = record.get("images") or record.get("image")
                        trace = self.solve(record["question"], image, method=method)
                        row.update(status="ok", trace=trace.to_dict())
                    except Exception as e:  # one bad record must not stop the run
                        row.update(status="failed", error=f"{type(e).__name__}: {e}",
                                   traceback=traceback.format_exc(limit=3))
                    results.append(row)
                    if sink:
                        sink.write(json.dumps(row) + "\n")
                        sink.flush()
                    bar.update(1)
            bar.close()
        finally:
            if sink:
                sink.close()
        return results
