"""int4 weights: checkpoint formats (AutoAWQ gemm, compressed-tensors pack-quantized) and `Int4Linear`.

`scripts/quantize.py` (dreamr_jax.quant.quantize) writes AutoAWQ checkpoints from dense ones.
"""

from .formats import (AWQ_PACK_ORDER, Int4Tensors, QuantFormat, UnsupportedQuantizationError, from_awq,
                      from_compressed, pack_awq, pack_ct, pack_nibbles, parse_quantization_config, to_awq, unpack_awq,
                      unpack_ct, unpack_nibbles)
from .linear import METHODS, Int4Linear, Int4Weight, int4_linears, set_int4_method, state_bytes

__all__ = ["AWQ_PACK_ORDER", "Int4Tensors", "QuantFormat", "UnsupportedQuantizationError", "from_awq", "from_compressed",
           "pack_awq", "pack_ct", "pack_nibbles", "parse_quantization_config", "to_awq", "unpack_awq", "unpack_ct",
           "unpack_nibbles", "METHODS", "Int4Linear", "Int4Weight", "int4_linears", "set_int4_method", "state_bytes"]
