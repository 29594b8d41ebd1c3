"""SAPO from the shipped misaligned draft (configs/sapo_synthetic_redundant.yaml): a short run
raises the draft's mean R_draft, measured before and after on the same validation prompts with
the same sampling seed (common random numbers, so the comparison sees the policy's change and
not a new draw)."""

from __future__ import annotations

import os

import numpy as np

import dreamr_jax as dr
from dreamr_jax.data import synthetic

from helpers import REPO_ROOT


def mean_draft_reward(policy, engine, processor, encoder, settings, problems) -> float:
    from dreamr_jax.training.sapo import collect

    records = [p.record() for p in problems]
    prompts = encoder.batch(records)
    got = collect(policy, engine, processor, prompts, records, settings, seed=0)
    return float(np.mean(got.terms["reward_draft"]))


def test_short_sapo_run_from_the_misaligned_draft_raises_r_draft(tmp_path):
    from dreamr_jax.speculative import SpeculativeReasoner
    from dreamr_jax.training.sapo_trainer import PromptEncoder, load_sapo_config, train

    cfg = load_sapo_config(os.path.join(REPO_ROOT, "configs", "sapo_synthetic_redundant.yaml"),
                           # a few steps at 5x the run's learning rate, so that 6 steps of 4 prompts move the policy
                           [f"output_dir={tmp_path}", "steps=6", "batch_size=4", "warmup_steps=0",
                            "learning_rate=5e-4", "checkpoint_every=100", "tensorboard=false"])
    out = train(cfg, progress=False, export=False)
    processor = dr.load_processor(cfg.draft)
    before = dr.load_model(cfg.draft, dtype=cfg.param_dtype)  # as the trainer loads the policy
    engine = SpeculativeReasoner(target=dr.load_model(cfg.target), draft=before, processor=processor,
                                 config=cfg.spec).engine("dreamr")
    encoder = PromptEncoder(processor, cfg.spec.instruction, cfg.max_length - cfg.max_new_tokens)
    problems = list(synthetic.problems(0, "val", 8))
    settings = cfg.settings()
    r_before = mean_draft_reward(before, engine, processor, encoder, settings, problems)
    r_after = mean_draft_reward(out["policy"], engine, processor, encoder, settings, problems)
    assert r_after > r_before, (r_before, r_after)
