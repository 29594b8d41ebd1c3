"""Training examples as token ids + loss weights, and the grain pipeline that batches them.

Examples are tokenized exactly the way the speculative engine builds its sequences, piece by
piece: the chat prompt with its image, then each step as `encode(step + "\\n\\n")`, then (for
judging) the candidate step, `judge_suffix(...)` and the verdict keyword. So the target learns
the CPN check on the very token sequences `StepEngine.cpn_scores` feeds it.

Two kinds of example:
- solution: prompt + all reference steps (their reads reordered with `shuffled_reads`, the
  misaligned draft's habit steps added with `redundant_habits`); every step token is supervised;
- judging: prompt + the correct steps before position k (supervised) + a candidate step
  (not supervised: it may be wrong) + the judging suffix + the verdict (supervised with
  `verdict_weight`); a `specreason_fraction` of them use SpecReason's scoring suffix instead,
  with the score 9 (correct) or 0 (wrong) as the verdict.

Batches are fixed-shape (B, seq_len) with one 96x96 image per row, so one train step compiles
once. The iterator is a grain `DatasetIterator` whose state is checkpointed with the model.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..models.qwen_vl.rope_index import get_rope_index, prepare_vision_inputs
from ..prompts import (JUDGE_CUE, WORLD_INSTRUCTION, WORLD_JUDGE_INSTRUCTION, WORLD_SPECREASON_PREFIX,
                       WORLD_SPECREASON_PROMPT, Keywords, judge_suffix, judge_text, keyword_token_ids, question_text,
                       specreason_suffix)
from . import synthetic


@dataclasses.dataclass(frozen=True)
class DataConfig:
    seed: int = 0  # the world's seed (problem i of a split is fixed by it)
    split: str = "train"
    judging_fraction: float = 0.5  # share of judging examples (0 for a draft: it never judges)
    verdict_weight: float = 4.0  # loss weight of the verdict token relative to a step token
    seq_len: int = 192
    # Share of judging examples asked in SpecReason's format (a forced 0-9 score; trained to
    # answer 9 for a correct step and 0 for a wrong one), so the `specreason` baseline has a
    # scorer trained as much as the CPN judge.
    specreason_fraction: float = 0.25
    # Share of solution examples whose digit reads come in a random order (`synthetic.
    # reordered_reads`): a draft taught in another style than the target's (which judges only
    # the reference order correct), the mismatch SAPO's R_draft exists to remove. 0 for the
    # shipped pair.
    shuffled_reads: float = 0.0
    # The misaligned draft's habits (`synthetic.habitual_solution`): each solution example
    # restates the question before computing and writes `synthetic.CHECK_STEP` before the answer,
    # each with this probability. 0 for the shipped pair.
    redundant_habits: float = 0.0
    # Share of wrong judging candidates that are redundant steps (`synthetic.redundant_step`: the
    # question restated, a digit read again, `CHECK_STEP`), so the target learns to reject them.
    redundant_share: float = 0.0
    instruction: str = WORLD_INSTRUCTION
    judge_instruction: str = WORLD_JUDGE_INSTRUCTION
    # Share of CPN judging examples asked with the short verdict cue (`prompts.judge_text("cue")`)
    # instead of the full judging turn, so one target serves both `spec.judge_format`s.
    cue_fraction: float = 0.0
    judge_cue: str = JUDGE_CUE
    specreason_prompt: str = WORLD_SPECREASON_PROMPT
    specreason_prefix: str = WORLD_SPECREASON_PREFIX


class WorldEncoder:
    """Token ids, loss weights and image patches of the world's training examples."""

    def __init__(self, processor, config: DataConfig):
        self.proc, self.config = processor, config
        tok = processor.tokenizer
        self.positive_id, self.negative_id = keyword_token_ids(tok, Keywords())
        self.judge_ids = tok.encode(judge_suffix(instruction=config.judge_instruction), add_special_tokens=False)
        self.cue_ids = tok.encode(judge_text("cue", cue=config.judge_cue), add_special_tokens=False)
        self.specreason_ids = tok.encode(specreason_suffix(config.specreason_prompt, config.specreason_prefix),
                                         add_special_tokens=False)
        self.score_ids = {score: tok.encode(str(score), add_special_tokens=False)[0] for score in (0, 9)}
        self.pad_id = processor.pad_token_id

    def _steps(self, texts) -> list[list[int]]:
        return [self.proc.tokenizer.encode(t + "\n\n", add_special_tokens=False) for t in texts]

    def _prompt(self, problem: synthetic.WorldProblem) -> dict:
        text = self.proc.user_prompt(question_text(self.config.instruction, problem.question), 1)
        return self.proc.encode(text, [problem.image()])

    def example(self, index: int) -> dict:
        """Training example `index`: deterministic in (seed, split, index)."""
        cfg = self.config
        problem = synthetic.make_problem(cfg.seed, cfg.split, index)
        rng = np.random.default_rng([cfg.seed, 7, synthetic.SPLITS[cfg.split], index])
        enc = self._prompt(problem)
        ids = list(enc["input_ids"])
        weights = [0.0] * len(ids)
        label = -1
        verdict_pos = -1
        if rng.random() < cfg.judging_fraction:
            ex = synthetic.judging_example(problem, rng, redundant_share=cfg.redundant_share)
            for step in self._steps(ex.context_steps):
                ids += step
                weights += [1.0] * len(step)
            if rng.random() < cfg.specreason_fraction:
                candidate = self._steps([ex.candidate])[0] + self.specreason_ids
                verdict = self.score_ids[9 if ex.label else 0]
            else:
                judge = self.cue_ids if cfg.cue_fraction and rng.random() < cfg.cue_fraction else self.judge_ids
                candidate = self._steps([ex.candidate])[0] + judge
                verdict = self.positive_id if ex.label else self.negative_id
                label = int(ex.label)
            ids += candidate + [verdict]
            weights += [0.0] * len(candidate) + [cfg.verdict_weight]
            verdict_pos = len(ids) - 1
        else:
            steps = problem.steps
            if cfg.shuffled_reads and rng.random() < cfg.shuffled_reads:
                steps = synthetic.reordered_reads(problem, rng)
            if cfg.redundant_habits:
                steps = synthetic.habitual_solution(dataclasses.replace(problem, steps=tuple(steps)), rng,
                                                    cfg.redundant_habits)
            for step in self._steps(steps):
                ids += step
                weights += [1.0] * len(step)
        if len(ids) > cfg.seq_len:
            raise ValueError(f"example {index} ({problem.kind}) has {len(ids)} tokens > seq_len {cfg.seq_len}; "
                             "raise data.seq_len")
        n = len(ids)
        pad = cfg.seq_len - n
        return {
            "input_ids": np.asarray(ids + [self.pad_id] * pad, np.int32),
            "weights": np.asarray(weights + [0.0] * pad, np.float32),
            "length": np.int32(n),
            "verdict_pos": np.int32(verdict_pos),  # index of the verdict token (CPN or score), -1 if none
            "verdict_label": np.int32(label),  # 1 / 0 for CPN judging examples, -1 otherwise
            "pixel_values": np.asarray(enc["pixel_values"], np.float32),
            "image_grid_thw": np.asarray(enc["image_grid_thw"], np.int64).reshape(3),
        }


def collate(batch: dict, model_cfg) -> dict:
    """Stacked examples -> model inputs: 3-D positions, image gather index, vision inputs."""
    ids = batch["input_ids"]
    b, s = ids.shape
    valid = np.arange(s)[None, :] < batch["length"][:, None]
    grids = batch["image_grid_thw"].reshape(-1, 3)
    positions, _ = get_rope_index(ids, valid, grids, image_token_id=model_cfg.image_token_id,
                                  spatial_merge_size=model_cfg.vision.spatial_merge_size)
    is_image = (ids == model_cfg.image_token_id) & valid
    gather = np.where(is_image, np.cumsum(is_image.ravel()).reshape(b, s) - 1, -1)
    pixels = batch["pixel_values"].reshape(-1, batch["pixel_values"].shape[-1])
    vision = prepare_vision_inputs(pixels, grids, model_cfg, pixels.shape[0])
    vision = {k: v for k, v in dataclasses.asdict(vision).items() if k != "num_valid_tokens"}
    return {
        "input_ids": ids.astype(np.int32),
        "weights": batch["weights"].astype(np.float32),
        "valid": valid,
        "verdict_pos": batch["verdict_pos"].astype(np.int32),
        "verdict_label": batch["verdict_label"].astype(np.int32),
        "positions": positions.astype(np.int32),
        "image_gather": gather.astype(np.int32),
        "vision": vision,
    }


def offset_for_process(batch: dict, process_index: int) -> dict:
    """Make one process's collated batch index the global batch its rows join.

    `collate` numbers images, image tokens, attention segments and merge units from 0 on every
    process; in the global array process p's come after those of processes 0..p-1 (all
    processes hold equal, fixed-shape batches). -1 (padding / text) stays -1."""
    if process_index == 0:
        return batch
    vision = dict(batch["vision"])
    units = len(vision["unit_order"])
    shifted = lambda a, n: np.where(a >= 0, a + process_index * n, a).astype(np.int32)  # noqa: E731
    vision["segment_ids"] = shifted(vision["segment_ids"], int(vision["segment_ids"].max()) + 1)
    vision["window_segment_ids"] = shifted(vision["window_segment_ids"], int(vision["window_segment_ids"].max()) + 1)
    vision["unit_order"] = shifted(vision["unit_order"], units)
    vision["unit_restore"] = shifted(vision["unit_restore"], units)
    return dict(batch, vision=vision, image_gather=shifted(batch["image_gather"], units))


def world_dataset(encoder: WorldEncoder, model_cfg, batch_size: int, *, num_examples: int = 10**8,
                  process_index: int = 0, process_count: int = 1):
    """grain MapDataset of collated batches; each process reads its own slice of the examples."""
    import grain

    ds = grain.MapDataset.range(num_examples)[process_index::process_count]
    ds = ds.map(encoder.example).batch(batch_size, drop_remainder=True)
    return ds.map(lambda batch: offset_for_process(collate(batch, model_cfg), process_index))
