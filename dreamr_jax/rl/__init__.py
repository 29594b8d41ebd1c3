"""SAPO: GRPO training of the draft with the composite reward (SPEC.md section 5)."""

from .grpo import chunked_token_logprobs, group_advantages, grpo_loss
from .rewards import composite_reward, draft_reward, length_reward, outcome_reward

__all__ = ["chunked_token_logprobs", "group_advantages", "grpo_loss", "composite_reward", "draft_reward",
           "length_reward", "outcome_reward"]
