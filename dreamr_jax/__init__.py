"""dreamr-jax: DREAM-R multimodal speculative reasoning in JAX / Flax NNX.

Public API (stable names):
    load_model, load_processor, forward, generate, SpeculativeReasoner,
    rl.grpo_loss / rl.group_advantages (SAPO's pure pieces)
"""

from .generation import GenerationResult, Generator, forward, generate
from .loading import load_model
from .processing import Processor, load_processor
from .spec import SpecConfig, SpeculativeReasoner, Trace
from . import rl  # noqa: E402  (dr.rl.grpo_loss, as ARCHITECTURE.md names it)

__all__ = ["load_model", "load_processor", "forward", "generate", "GenerationResult", "Generator", "Processor",
           "SpeculativeReasoner", "SpecConfig", "Trace", "rl"]
__version__ = "0.1.0"
