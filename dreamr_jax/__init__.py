"""dreamr-jax: DREAM-R multimodal speculative reasoning in JAX / Flax NNX.

Public API (stable names):
    load_model, load_processor, forward, generate, SpeculativeReasoner,
    rl.grpo_loss / rl.group_advantages (SAPO's pure pieces)

Names are imported on first use (PEP 562), so `import dreamr_jax` does not import jax: the
`dreamr` command can still set XLA flags (CPU devices for the two roles) before jax starts.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "GenerationResult": ".generation", "Generator": ".generation", "forward": ".generation",
    "generate": ".generation", "load_model": ".loading", "Processor": ".processing",
    "load_processor": ".processing", "SpeculationConfig": ".speculative", "SpeculativeReasoner": ".speculative",
    "Trace": ".speculative",
}

__all__ = ["load_model", "load_processor", "forward", "generate", "GenerationResult", "Generator", "Processor",
           "SpeculativeReasoner", "SpeculationConfig", "Trace", "rl"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "rl":  # dr.rl.grpo_loss: the public name of the training package's pure pieces
        return importlib.import_module(".training", __name__)
    if name == "SpecConfig":  # the name before SpeculationConfig
        import warnings

        warnings.warn("dreamr_jax.SpecConfig is now dreamr_jax.SpeculationConfig", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(".speculative", __name__), "SpeculationConfig")
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dreamr_jax' has no attribute '{name}'")


def __dir__():
    return sorted(list(globals()) + __all__)
