"""safetensors files: the one header parser, memory-mapped reader and writer of the package.

The format (https://huggingface.co/docs/safetensors): 8 bytes little-endian header length n, an
n-byte JSON header {key: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}
whose offsets count from the end of the header, then the raw little-endian tensor bytes.

We parse it ourselves because safetensors' numpy backend cannot return bfloat16 (the dtype of
every Qwen release). This module imports nothing else of dreamr_jax, so the loader
(`dreamr_jax.loading`, `models.qwen_vl.params`) and the quantizer (`quant.quantize`) can share it
without depending on each other.
"""

from __future__ import annotations

import json
import os
import uuid

import ml_dtypes
import numpy as np

# safetensors dtype names <-> numpy dtypes: the only table; readers and the writer use it both ways.
DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32), "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
_NAMES = {dtype: name for name, dtype in DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model: names every offending file, key and shape."""


def _parse(file: str) -> tuple[dict, int]:
    """(header without `__metadata__`, offset of the first data byte), every entry checked against
    the file's size, so a truncated or corrupt file fails here, naming the file and the first
    tensor whose bytes are not all there, instead of as a short read later."""
    try:
        size = os.path.getsize(file)
        with open(file, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 0 or 8 + n > size:
                raise CheckpointError(f"{file}: truncated or corrupt safetensors file ({size} bytes, too short for "
                                      f"{'its header' if n >= 0 else 'a header'}); download or copy it again")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from e
    try:
        header = json.loads(raw)
    except ValueError as e:
        raise CheckpointError(f"{file}: corrupt safetensors file (its header is not valid JSON: {e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: corrupt safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    data = size - 8 - n
    for key, e in header.items():
        try:
            dtype, shape, (begin, end) = e["dtype"], [int(d) for d in e["shape"]], e["data_offsets"]
        except (TypeError, KeyError, ValueError) as err:
            raise CheckpointError(f"{file}: tensor '{key}': corrupt header entry {e!r} ({err})") from err
        if dtype not in DTYPES:
            raise CheckpointError(f"{file}: tensor '{key}' has unsupported dtype {dtype}")
        if end > data:
            raise CheckpointError(
                f"{file}: truncated or corrupt: tensor '{key}' ({dtype} {shape}) lies at bytes {begin}..{end} of the "
                f"data but the file holds only {data} bytes of data; download or copy it again")
        nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
        if end - begin != nbytes or begin < 0:
            raise CheckpointError(f"{file}: corrupt: tensor '{key}' ({dtype} {shape}) takes {nbytes} bytes but its "
                                  f"header gives it {end - begin}")
    return header, 8 + n


def read_header(file: str) -> dict:
    """A safetensors file's header {key: {dtype, shape, data_offsets}}, checked against the file's
    size: a truncated or corrupt file is a CheckpointError naming the file (and the first tensor
    whose bytes are not all there)."""
    return _parse(file)[0]


class SafetensorsFile:
    """Memory-mapped reader: `read(key)` is a view of the file's bytes (nothing is copied until
    the caller converts it). The header is checked on opening (`read_header`)."""

    def __init__(self, path: str):
        self.path = path
        self.entries, self.data_start = _parse(path)
        self._map = None

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key) -> tuple[int, ...]:
        return tuple(self.entries[key]["shape"])

    def dtype_name(self, key) -> str:
        return self.entries[key]["dtype"]

    def read(self, key) -> np.ndarray:
        e = self.entries[key]
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        start, end = e["data_offsets"]
        raw = self._map[self.data_start + start : self.data_start + end]
        return raw.view(DTYPES[e["dtype"]]).reshape(e["shape"])


def write_safetensors(path: str, tensors: dict, metadata: dict | None = None) -> None:
    """Write `tensors` {key: array} (any dtype of `DTYPES`, bfloat16 included) to `path`.

    Atomic: the bytes go to a temporary file in the same folder, which is synced and then
    renamed over `path` (a rename within one file system), so a crash or a concurrent reader
    never sees a half-written file. Tensors are laid out widest dtype first (then by key), as
    the safetensors library does, so each one starts at a multiple of its item size and a
    memory-mapped view of it is aligned."""
    arrays = {}
    for key, value in tensors.items():
        a = np.asarray(value, order="C")  # not ascontiguousarray: that turns a 0-d tensor into shape (1,)
        if a.dtype not in _NAMES:
            raise ValueError(f"{key}: dtype {a.dtype} cannot be written to safetensors")
        arrays[key] = a
    order = sorted(arrays, key=lambda k: (-arrays[k].dtype.itemsize, k))
    header, offset = {}, 0
    for key in order:
        a = arrays[key]
        header[key] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    header["__metadata__"] = metadata or {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data then starts 8-byte aligned
    # A unique name: two writers of one path (threads, processes) never share a temporary file.
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(len(blob).to_bytes(8, "little"))
            f.write(blob)
            for key in order:
                if arrays[key].size:
                    f.write(arrays[key].reshape(-1).view(np.uint8).data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
