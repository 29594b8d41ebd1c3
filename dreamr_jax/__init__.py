"""dreamr-jax: DREAM-R multimodal speculative reasoning in JAX / Flax NNX.

Public API (stable names):
    load_model, load_processor, forward, generate
"""

from .generation import GenerationResult, Generator, forward, generate
from .loading import load_model
from .processing import Processor, load_processor

__all__ = ["load_model", "load_processor", "forward", "generate", "GenerationResult", "Generator", "Processor"]
__version__ = "0.1.0"
