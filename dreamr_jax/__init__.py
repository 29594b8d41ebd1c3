"""dreamr-jax: DREAM-R multimodal speculative reasoning in JAX / Flax NNX.

Public API (stable names):
    load_model, load_processor, forward, generate, SpeculativeReasoner
"""

from .generation import GenerationResult, Generator, forward, generate
from .loading import load_model
from .processing import Processor, load_processor
from .spec import SpecConfig, SpeculativeReasoner, Trace

__all__ = ["load_model", "load_processor", "forward", "generate", "GenerationResult", "Generator", "Processor",
           "SpeculativeReasoner", "SpecConfig", "Trace"]
__version__ = "0.1.0"
