"""Training: supervised fine-tuning (`sft`) and SAPO, GRPO training of the draft with the
composite reward (`sapo`, `sapo_trainer`), over one scaffold.

Pure pieces (`grpo_loss`, `group_advantages`, `chunked_token_logprobs`, the reward terms) load
with the package; the SAPO trainer (`SAPOConfig`, `SAPOData`, `load_sapo_config`, `train`, from
`training.sapo_trainer`) loads on first use. `dreamr_jax.rl` is this package under its public name.
"""

from .grpo import chunked_token_logprobs, group_advantages, grpo_loss
from .rewards import composite_reward, draft_reward, length_reward, outcome_reward

_TRAINER = ("SAPOConfig", "SAPOData", "load_sapo_config", "train")

__all__ = ["chunked_token_logprobs", "group_advantages", "grpo_loss", "composite_reward", "draft_reward",
           "length_reward", "outcome_reward", *_TRAINER]


def __getattr__(name):
    if name in _TRAINER:
        from . import sapo_trainer

        return getattr(sapo_trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
