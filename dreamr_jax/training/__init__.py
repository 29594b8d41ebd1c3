"""Training: supervised fine-tuning (`sft`) and SAPO, GRPO training of the draft with the
composite reward (`sapo`: its step, `sapo_trainer`: its run), over one scaffold (`scaffold`:
optimizer, checkpoints and resume, metrics, export, batch sharding). The command line is
`dreamr train sft|sapo --config FILE [key=value ...]`.

Pure pieces (`grpo_loss`, `group_advantages`, `chunked_token_logprobs`, the reward terms) load
with the package; the trainers (`SFTConfig`, `load_sft_config`, `train_sft`; `SAPOConfig`,
`SAPOData`, `load_sapo_config`, `train_sapo`, also as `train`) load on first use, so importing
the pure pieces does not load the data pipelines. `dreamr_jax.rl` is this package under its
public name.
"""

from .grpo import chunked_token_logprobs, group_advantages, grpo_loss
from .rewards import composite_reward, draft_reward, length_reward, outcome_reward

# name here -> (module, its name there)
_LAZY = {
    "SAPOConfig": ("sapo_trainer", "SAPOConfig"), "SAPOData": ("sapo_trainer", "SAPOData"),
    "load_sapo_config": ("sapo_trainer", "load_sapo_config"), "train_sapo": ("sapo_trainer", "train"),
    "train": ("sapo_trainer", "train"),  # the name SAPO's trainer had here first
    "SFTConfig": ("sft", "SFTConfig"), "load_sft_config": ("sft", "load_sft_config"), "train_sft": ("sft", "train"),
}

__all__ = ["chunked_token_logprobs", "group_advantages", "grpo_loss", "composite_reward", "draft_reward",
           "length_reward", "outcome_reward", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
