"""int4 weights: checkpoint formats (AutoAWQ gemm, compressed-tensors pack-quantized) and `Int4Linear`.

Two layers. `formats` and `linear` (exported here) import nothing of the model: the model
(`models/qwen_vl`) and the loader build on them. `quantize` and `awq` convert dense checkpoints
(`scripts/quantize.py` runs `quantize.quantize_checkpoint`); they need the model and the loader,
so they sit above both, and neither this file nor anything below imports them.
"""

from .formats import (AWQ_PACK_ORDER, Int4Tensors, QuantFormat, UnsupportedQuantizationError, dequantize, from_awq,
                      from_compressed, pack_awq, pack_ct, pack_nibbles, parse_quantization_config, quantize_rtn, to_awq,
                      unpack_awq, unpack_ct, unpack_nibbles)
from .linear import METHODS, Int4Linear, Int4Weight, int4_linears, set_int4_method, state_bytes

__all__ = ["AWQ_PACK_ORDER", "Int4Tensors", "QuantFormat", "UnsupportedQuantizationError", "dequantize", "from_awq",
           "from_compressed", "pack_awq", "pack_ct", "pack_nibbles", "parse_quantization_config", "quantize_rtn",
           "to_awq", "unpack_awq", "unpack_ct", "unpack_nibbles", "METHODS", "Int4Linear", "Int4Weight", "int4_linears",
           "set_int4_method", "state_bytes"]
