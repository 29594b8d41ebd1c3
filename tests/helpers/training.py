"""The tiny runs the training tests share: a Qwen3-VL of `TINY_WORLD_ARCH` with the world's
tokenizer, a few-step SFT config, and the SAPO trainer's tiny task (also imported by the
multi-device scripts those tests start in subprocesses)."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from . import REPO_ROOT

# A tiny Qwen3-VL for the world's tokenizer and 96x96 images (trainer and pipeline tests).
TINY_WORLD_ARCH = dict(hidden_size=32, num_hidden_layers=1, intermediate_size=64, num_attention_heads=2,
                       num_key_value_heads=1, vision_hidden_size=32, vision_depth=1)


def tiny_sft_config(tmp, **changes):
    """A few-step SFT run of TINY_WORLD_ARCH on the world's judging mix (trainer and resume tests)."""
    from dreamr_jax import assets
    from dreamr_jax.data.pipeline import DataConfig
    from dreamr_jax.training.sft import SFTConfig

    base = dict(output_dir=str(tmp), tokenizer=assets.path("tokenizer"), model=TINY_WORLD_ARCH,
                data=DataConfig(judging_fraction=0.5, seq_len=160), batch_size=4, steps=4, learning_rate=3e-3,
                warmup_steps=2, checkpoint_every=2, log_every=1)
    return SFTConfig(**{**base, **changes})


# ---- SAPO's tiny task -------------------------------------------------------------------------------

# The tiny task: R = the share of response tokens in a fixed set of 32 of the 512 ids (1/16
# of them at random initialisation), which a tiny random draft can learn within a few steps.
TASK_TOKENS = frozenset(range(100, 132))


def task_reward(rollouts, records):
    return [float(np.mean([t in TASK_TOKENS for t in r.response])) if r.response else 0.0 for r in rollouts]


def tiny_sapo_config(tmp, pair, **kw):
    """A short SAPO run of the tiny world pair ((target folder, draft folder)) in which only the
    extra reward (`task_reward`) has weight."""
    from dreamr_jax.config import load_config
    from dreamr_jax.training.sapo_trainer import SAPOConfig, SAPOData

    target_dir, draft_dir = pair
    # the world's prompts; SAPO's rollouts sample (temperature 1) and count rho >= 0.7 as accepted
    spec = dataclasses.replace(load_config(os.path.join(REPO_ROOT, "configs", "synthetic.yaml")).spec,
                               draft_temperature=1.0, top_p=1.0, alpha=0.7)
    base = dict(output_dir=str(tmp), draft=draft_dir, target=target_dir, spec=spec, data=SAPOData(world_size=64),
                group_size=8, max_new_tokens=16, max_length=256, batch_size=2, steps=3, learning_rate=1e-2,
                warmup_steps=1, l_ref=16, logprob_chunk=16, reward_weights=(0.0, 0.0, 0.0), checkpoint_every=2)
    base.update(kw)
    return SAPOConfig(**base)
