"""Qwen3-VL and Qwen2.5-VL in Flax NNX, computing what transformers computes; `sharding` holds
how the family's weights split over a role's devices."""

from .config import QwenVLConfig, UnsupportedModelError
from .model import QwenVLModel
from .sharding import place_role_state, tensor_parallel_shardings

__all__ = ["QwenVLConfig", "QwenVLModel", "UnsupportedModelError", "place_role_state", "tensor_parallel_shardings"]
