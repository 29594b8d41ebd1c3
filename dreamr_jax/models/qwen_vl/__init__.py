"""Qwen3-VL and Qwen2.5-VL in Flax NNX, computing what transformers computes."""

from .config import QwenVLConfig, UnsupportedModelError
from .model import QwenVLModel

__all__ = ["QwenVLConfig", "QwenVLModel", "UnsupportedModelError"]
