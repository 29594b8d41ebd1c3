"""int4 weights: `quantization_config` parsing, (un)packing the checkpoint formats, and the arithmetic
(`quantize_rtn` rounds a dense weight, `dequantize` expands int4 weights: the package's only copy).

Imports nothing but numpy: the model (`models/qwen_vl`), the loader and the quantizer build on it.

Two on-disk formats hold the same thing, W[o, i] = (q[o, i] - z[o, g(i)]) * s[o, g(i)] with 4-bit
q and z and groups g of `group_size` consecutive input features:

* AutoAWQ "gemm": per linear `qweight` (in, out/8) int32, `qzeros` (in/group, out/8) int32 and
  `scales` (in/group, out) float16. Eight 4-bit values per int32 along the output axis, nibble
  i (bits 4i..4i+3) holding column 8c + AWQ_PACK_ORDER[i] (AutoAWQ interleaves them so its CUDA
  kernel can unpack two halves with one shift).
* compressed-tensors "pack-quantized": `weight_packed` (out, in/8) int32, eight values per
  int32 along the input axis in order (nibble i = column 8c + i), stored with an offset of 8
  (the signed value -8..7 plus 8); `weight_scale` (out, groups); optional `weight_zero_point`
  (signed, packed the same way along the *output* axis: (out/8, groups)); `weight_shape` [out, in].
  Without a zero point the format is symmetric: z = 8 in the offset code.

Both are converted to one device layout (`Int4Tensors`): `qweight` uint8 (out, in/2) with
q[o, 2k] in the low and q[o, 2k+1] in the high nibble of byte k (little nibble first, which is
also what compressed-tensors' int32 words are when read as bytes), `scales` (out, groups) in the
checkpoint's float dtype and `zeros` uint8 (out, groups), 0..15.
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np

AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AutoAWQ int32 holds column 8c + AWQ_PACK_ORDER[i]

SUPPORTED = "AutoAWQ 'gemm' (quant_method 'awq', 4 bits) and compressed-tensors 'pack-quantized' (4-bit int weights)"


class UnsupportedQuantizationError(ValueError):
    """A `quantization_config` naming a method, format or setting that dreamr-jax does not load."""


# ---- quantization_config ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class QuantFormat:
    """What a checkpoint's `quantization_config` says, checked. `kind` is "awq" or "compressed-tensors"."""

    kind: str
    group_size: int | None  # None: one group per row (compressed-tensors "channel") or not stated
    not_converted: tuple[str, ...] = ()  # AutoAWQ `modules_to_not_convert` / compressed-tensors `ignore`

    @property
    def tensor_suffixes(self) -> tuple[str, ...]:
        if self.kind == "awq":
            return ("qweight", "qzeros", "scales")
        return ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")

    @property
    def packed_suffix(self) -> str:
        return "qweight" if self.kind == "awq" else "weight_packed"


def parse_quantization_config(qc, *, source: str = "config.json") -> QuantFormat | None:
    """`quantization_config` dict (or None) -> QuantFormat (or None for a dense checkpoint).

    Raises UnsupportedQuantizationError naming the method / format / setting for anything else."""
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise UnsupportedQuantizationError(f"{source}: quantization_config must be an object, got {type(qc).__name__}")
    method = str(qc.get("quant_method", "")).lower()
    if method == "awq":
        return _parse_awq(qc, source)
    if method == "compressed-tensors":
        return _parse_compressed_tensors(qc, source)
    raise UnsupportedQuantizationError(
        f"{source}: quantization_config quant_method '{qc.get('quant_method')}' is not supported; "
        f"dreamr-jax loads {SUPPORTED}"
    )


def _parse_awq(qc: dict, source: str) -> QuantFormat:
    version = str(qc.get("version", qc.get("format", "gemm"))).lower()
    if version != "gemm":
        raise UnsupportedQuantizationError(
            f"{source}: AWQ version '{version}' is not supported (its packing differs); dreamr-jax loads {SUPPORTED}. "
            "Re-export the model with AutoAWQ version='gemm'."
        )
    bits = qc.get("bits", qc.get("w_bit", 4))
    if bits != 4:
        raise UnsupportedQuantizationError(f"{source}: AWQ with bits={bits} is not supported; "
                                           "only 4-bit AWQ ('gemm') loads")
    if qc.get("zero_point", True) is False:
        raise UnsupportedQuantizationError(f"{source}: AWQ with zero_point=false is not supported "
                                           "(AutoAWQ 'gemm' stores zeros)")
    group = qc.get("group_size", qc.get("q_group_size", 128))
    if not isinstance(group, int) or (group <= 0 and group != -1):
        raise UnsupportedQuantizationError(f"{source}: AWQ group_size {group!r} is not a positive integer (or -1)")
    return QuantFormat("awq", None if group == -1 else group, tuple(qc.get("modules_to_not_convert") or ()))


def _parse_compressed_tensors(qc: dict, source: str) -> QuantFormat:
    top_format = qc.get("format")
    groups = qc.get("config_groups") or {}
    if not groups:
        raise UnsupportedQuantizationError(f"{source}: compressed-tensors quantization_config has no config_groups")
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise UnsupportedQuantizationError(
            f"{source}: compressed-tensors quantization_status '{status}' is not supported "
            "(only 'compressed' checkpoints)")
    if qc.get("kv_cache_scheme"):
        raise UnsupportedQuantizationError(f"{source}: compressed-tensors kv_cache_scheme (quantized KV cache) "
                                           "is not supported")
    group_sizes = set()
    for name, g in groups.items():
        fmt = g.get("format") or top_format
        if fmt != "pack-quantized":
            raise UnsupportedQuantizationError(
                f"{source}: compressed-tensors format '{fmt}' (config group '{name}') is not supported; "
                f"dreamr-jax loads {SUPPORTED}")
        for act in ("input_activations", "output_activations"):
            if g.get(act):
                raise UnsupportedQuantizationError(
                    f"{source}: compressed-tensors config group '{name}' quantizes {act} (e.g. W4A8); "
                    "only weight-only int4 is supported")
        w = g.get("weights") or {}
        if w.get("num_bits") != 4 or w.get("type", "int") != "int":
            raise UnsupportedQuantizationError(
                f"{source}: compressed-tensors config group '{name}' has {w.get('num_bits')}-bit "
                f"{w.get('type', 'int')} weights; only 4-bit int weights are supported")
        strategy = w.get("strategy")
        if strategy not in ("group", "channel"):
            raise UnsupportedQuantizationError(
                f"{source}: compressed-tensors weight strategy '{strategy}' (config group '{name}') is not supported "
                "(only 'group' and 'channel')")
        if w.get("actorder") == "group":
            raise UnsupportedQuantizationError(
                f"{source}: compressed-tensors actorder 'group' (activation reordering with weight_g_idx) "
                "is not supported")
        if w.get("dynamic"):
            raise UnsupportedQuantizationError(f"{source}: compressed-tensors dynamic weight quantization "
                                               "is not supported")
        group_sizes.add(w.get("group_size") if strategy == "group" else None)
    group = group_sizes.pop() if len(group_sizes) == 1 else None  # per-module sizes are read from the scales
    return QuantFormat("compressed-tensors", group, tuple(qc.get("ignore") or ()))


# ---- nibble packing -------------------------------------------------------------------------------

_SHIFTS = (4 * np.arange(8)).astype(np.uint32)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """int32 (..., n) -> uint8 (..., n, 8): nibble i of each word at [..., i]."""
    words = np.ascontiguousarray(packed).view(np.uint32)
    return ((words[..., None] >> _SHIFTS) & 0xF).astype(np.uint8)


def _words(nibbles: np.ndarray) -> np.ndarray:
    """uint8 (..., n, 8) -> int32 (..., n): the inverse of `_nibbles`."""
    words = np.zeros(nibbles.shape[:-1], np.uint32)
    for i in range(8):
        words |= (nibbles[..., i].astype(np.uint32) & 0xF) << np.uint32(4 * i)
    return words.view(np.int32)


def unpack_awq(packed: np.ndarray) -> np.ndarray:
    """AutoAWQ int32 (rows, cols/8) -> uint8 (rows, cols), values 0..15 in column order."""
    nib = _nibbles(packed)
    out = np.empty_like(nib)
    out[..., list(AWQ_PACK_ORDER)] = nib  # column AWQ_PACK_ORDER[i] <- nibble i
    return out.reshape(*packed.shape[:-1], packed.shape[-1] * 8)


def pack_awq(values: np.ndarray) -> np.ndarray:
    """uint8 (rows, cols) values 0..15, cols % 8 == 0 -> AutoAWQ int32 (rows, cols/8)."""
    rows, cols = values.shape
    if cols % 8:
        raise ValueError(f"AWQ packs 8 columns per int32; {cols} columns is not a multiple of 8")
    v = values.reshape(rows, cols // 8, 8)
    return _words(v[..., list(AWQ_PACK_ORDER)])


def unpack_ct(packed: np.ndarray, cols: int) -> np.ndarray:
    """compressed-tensors int32 (rows, ceil(cols/8)) -> uint8 (rows, cols), the offset code 0..15."""
    return _nibbles(packed).reshape(packed.shape[0], -1)[:, :cols]


def pack_ct(values: np.ndarray) -> np.ndarray:
    """uint8 (rows, cols) offset-coded 0..15 -> compressed-tensors int32 (rows, ceil(cols/8)) (zero padded)."""
    rows, cols = values.shape
    pad = -cols % 8
    v = np.pad(values, ((0, 0), (0, pad))).reshape(rows, -1, 8)
    return _words(v)


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """uint8 (rows, cols) values 0..15, cols even -> the device layout uint8 (rows, cols/2), low nibble first."""
    if q.shape[-1] % 2:
        raise ValueError(f"int4 rows must have an even length, got {q.shape[-1]}")
    q = q.astype(np.uint8)
    return (q[..., 0::2] & 0xF) | ((q[..., 1::2] & 0xF) << 4)


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """The device layout uint8 (rows, cols/2) -> uint8 (rows, cols)."""
    out = np.empty(packed.shape[:-1] + (packed.shape[-1], 2), np.uint8)
    out[..., 0] = packed & 0xF
    out[..., 1] = packed >> 4
    return out.reshape(*packed.shape[:-1], -1)


# ---- the arithmetic --------------------------------------------------------------------------------


def dequantize(q, zeros, scales):
    """W (out, in) float32 = (q - z) * s, per group of consecutive input features.

    q: 4-bit values (out, in) or (out, groups, group_size), any integer or float dtype; zeros,
    scales: (out, groups). Written with array methods only, so it takes numpy arrays (host:
    `Int4Tensors.dequantize`, AWQ's search, the quantizer's error) and jax arrays or tracers
    (`Int4Linear` inside a jitted program) alike: the one place int4 weights are expanded."""
    f32 = np.float32
    groups = q.reshape(*zeros.shape, -1).astype(f32)
    w = (groups - zeros.astype(f32)[..., None]) * scales.astype(f32)[..., None]
    return w.reshape(q.shape[0], -1)


def quantize_rtn(weight_out_in: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric 4-bit round to nearest per group of `group_size` input features, as AutoAWQ computes it:
    s = max(w_max - w_min, 1e-5) / 15 (rounded to float16), z = clamp(round(-w_min / s), 0, 15),
    q = clamp(round(w / s) + z, 0, 15).

    A dense weight (out, in) -> (q uint8 (in, out), zeros uint8 (groups, out), scales float16 (groups, out)):
    AutoAWQ's (in, out) orientation, what `pack_awq` takes."""
    n_out, n_in = weight_out_in.shape
    if n_in % group_size:
        raise ValueError(f"{n_in} input features do not split into groups of {group_size}; pick a --group-size "
                         "that divides every projection's input size")
    w = weight_out_in.astype(np.float32).reshape(n_out, n_in // group_size, group_size)
    w_max, w_min = w.max(-1), w.min(-1)
    scales = (np.maximum(w_max - w_min, 1e-5) / 15).astype(np.float16)
    s = scales.astype(np.float32)
    zeros = np.clip(np.round(-w_min / s), 0, 15)
    q = np.clip(np.round(w / s[..., None]) + zeros[..., None], 0, 15).astype(np.uint8)
    return (np.ascontiguousarray(q.reshape(n_out, n_in).T), np.ascontiguousarray(zeros.astype(np.uint8).T),
            np.ascontiguousarray(scales.T))


# ---- the device layout ----------------------------------------------------------------------------


@dataclasses.dataclass
class Int4Tensors:
    """One linear's int4 weights in the layout `Int4Linear` holds (host arrays)."""

    qweight: np.ndarray  # uint8 (out, in/2)
    scales: np.ndarray  # (out, groups), float16 / bfloat16 / float32 as stored
    zeros: np.ndarray  # uint8 (out, groups), 0..15

    @property
    def shape(self) -> tuple[int, int]:
        """(in, out): the shape of the dense W in y = x @ W."""
        return self.qweight.shape[1] * 2, self.qweight.shape[0]

    @property
    def group_size(self) -> int:
        return self.shape[0] // self.scales.shape[1]

    def dequantize(self) -> np.ndarray:
        """The dense W (in, out) of y = x @ W, float32: (q - z) * s."""
        return dequantize(unpack_nibbles(self.qweight), self.zeros, self.scales).T


def _check_groups(n_in: int, n_groups: int, what: str) -> None:
    if n_groups < 1 or n_in % n_groups:
        raise ValueError(f"{what}: {n_in} input features do not split into {n_groups} equal groups")


def from_awq(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, *, what: str = "AWQ linear") -> Int4Tensors:
    """AutoAWQ gemm tensors -> Int4Tensors. Shapes are checked against each other."""
    n_in, n_out = qweight.shape[0], qweight.shape[1] * 8
    if qweight.dtype != np.int32 or qzeros.dtype != np.int32:
        raise ValueError(f"{what}: qweight / qzeros must be int32, got {qweight.dtype} / {qzeros.dtype}")
    g = scales.shape[0]
    if scales.shape != (g, n_out) or qzeros.shape != (g, n_out // 8):
        raise ValueError(f"{what}: qweight {list(qweight.shape)} (in, out/8) implies scales [groups, {n_out}] and "
                         f"qzeros [groups, {n_out // 8}], got {list(scales.shape)} and {list(qzeros.shape)}")
    _check_groups(n_in, g, what)
    q = unpack_awq(qweight)  # (in, out)
    z = unpack_awq(qzeros)  # (groups, out)
    return Int4Tensors(pack_nibbles(np.ascontiguousarray(q.T)), np.ascontiguousarray(scales.T),
                       np.ascontiguousarray(z.T))


def from_compressed(weight_packed: np.ndarray, weight_scale: np.ndarray, weight_zero_point: np.ndarray | None,
                    weight_shape, *, what: str = "compressed-tensors linear") -> Int4Tensors:
    """compressed-tensors pack-quantized tensors -> Int4Tensors."""
    n_out, n_in = (int(v) for v in np.asarray(weight_shape).reshape(-1)[:2])
    if weight_packed.dtype != np.int32 or weight_packed.shape != (n_out, -(-n_in // 8)):
        raise ValueError(f"{what}: weight_packed must be int32 [{n_out}, {-(-n_in // 8)}] for weight_shape "
                         f"[{n_out}, {n_in}], got {weight_packed.dtype} {list(weight_packed.shape)}")
    if weight_scale.ndim == 1:
        weight_scale = weight_scale[:, None]
    g = weight_scale.shape[1]
    if weight_scale.shape[0] != n_out:
        raise ValueError(f"{what}: weight_scale {list(weight_scale.shape)} does not have {n_out} rows")
    _check_groups(n_in, g, what)
    if n_in % 8 == 0 and sys.byteorder == "little":
        # int32 words read as bytes are already the device layout (nibble i of word c = column 8c + i)
        q = np.ascontiguousarray(weight_packed).view(np.uint8).reshape(n_out, n_in // 2)
    else:
        q = pack_nibbles(unpack_ct(weight_packed, n_in))
    if weight_zero_point is None:
        z = np.full((n_out, g), 8, np.uint8)  # symmetric: signed 0 in the offset code
    elif weight_zero_point.dtype == np.int32 and weight_zero_point.shape == (-(-n_out // 8), g):
        z = unpack_ct(np.ascontiguousarray(weight_zero_point.T), n_out).T  # packed along the output axis
    elif weight_zero_point.reshape(n_out, -1).shape == (n_out, g) and weight_zero_point.dtype.kind == "i":
        z = (weight_zero_point.reshape(n_out, g).astype(np.int32) + 8).astype(np.uint8)  # unpacked, signed
    else:
        raise ValueError(f"{what}: weight_zero_point {weight_zero_point.dtype} {list(weight_zero_point.shape)} fits "
                         f"neither packed [{-(-n_out // 8)}, {g}] int32 nor unpacked [{n_out}, {g}]")
    return Int4Tensors(q, np.ascontiguousarray(weight_scale), np.ascontiguousarray(z, dtype=np.uint8))


def to_awq(t: Int4Tensors) -> dict[str, np.ndarray]:
    """Int4Tensors -> AutoAWQ gemm tensors {qweight, qzeros, scales} (scales as float16)."""
    q = unpack_nibbles(t.qweight).T  # (in, out)
    return dict(qweight=pack_awq(np.ascontiguousarray(q)), qzeros=pack_awq(np.ascontiguousarray(t.zeros.T)),
                scales=np.ascontiguousarray(t.scales.T.astype(np.float16)))

