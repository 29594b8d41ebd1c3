"""Price one device call of a Qwen-VL model on named hardware: FLOPs and bytes counted per layer,
a roofline per layer, a fixed cost per call and per decoded token, and the all-reduces of tensor
parallelism.

    hw = hardware("h100")                   # a preset, or a JSON file (`save_hardware`)
    model = model_spec("qwen3-vl-32b")      # a preset (":int4" / ":bf16" / ":fp32"), a checkpoint
                                            # folder or config.json, "asset:target"
    call_cost(model, hw, 1, "decode", tokens=32, cached=128)   # CallCost (FLOPs, bytes, seconds, bound)
    check_fits(model, hw, 1, kv_tokens=4096)                   # CostModelError when it does not fit

Counting conventions (each function below says why):

* A matmul of n rows by an (in, out) weight is 2 * n * in * out FLOPs. Norms, rotary embeddings,
  activation functions, softmax and biases are not counted (small beside the matmuls).
* Weights are read once per forward, at their stored width: 4 bytes (fp32), 2 (bf16 / fp16), or
  for int4 0.5 byte per weight plus, per group of `group_size` inputs of each output feature, a
  2-byte scale and a 1-byte zero: dreamr-jax's device layout (`dreamr_jax.quant.formats`: uint8
  nibbles, scales in the float dtype, zeros uint8). Only the decoder's seven projections are int4;
  embeddings, the head and the vision tower stay 16-bit, as in AWQ / compressed-tensors releases.
* The KV cache and activations are 2 bytes (4 for an fp32 model). Attention reads a row's whole
  cache once per forward (flash-style: scores never reach memory) and writes the new tokens' K / V.
  Each matmul reads its input and writes its output once.
* Tensor parallelism follows `dreamr_jax.models.qwen_vl.sharding`: attention splits by heads when both head counts
  divide by the device count, the MLP by its intermediate size, the embedding / head by the
  vocabulary; anything that does not divide stays whole on every device, and the vision tower is
  replicated. Each split narrowing product (o_proj, down_proj) ends with an all-reduce of the
  n x hidden activations, and a vocabulary-split embedding lookup with one more.
* The roofline is taken per layer (and per vision block, merger, head):
  max(FLOPs / (peak * flops_efficiency), bytes / (bandwidth * bandwidth_efficiency)). The layers'
  times add up; all-reduces (ring: 2 (d-1)/d * bytes / link_bandwidth + link_latency) and the fixed
  costs (call_overhead_s per call, token_overhead_s per decode iteration, layer_overhead_s per
  layer) add on top, nothing overlapped.
* A calibrated CPU (`dreamr calibrate`) changes three things. Its `matmul_table` prices each weight
  product from measured times instead of peak_flops (`matmul_seconds`), and a part's other FLOPs
  at the same average rate (`compute_seconds`); a model whose weights fit in its last-level cache
  reads them inside those measured times, so they leave the memory side; and its
  `elementwise_bandwidth` prices the activations' bytes after each part's roofline instead of
  inside it (a CPU runs the small elementwise ops one after another).

Not modelled: kernel-level effects beyond the two efficiency factors (e.g. int4 unpacking cost,
which BENCHMARKS.md measures at about bf16 speed with XLA alone: price int4 with a lower
`bandwidth_efficiency` to model that), the logits' gather or sampling, XLA's workspace memory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os


class CostModelError(ValueError):
    """A hardware or model name / file the cost model cannot use, bad call arguments, or a model
    that does not fit the hardware."""


GB = 1e9
_MIB = 2**20
_GIB = 2**30


# ---- hardware ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Hardware:
    name: str
    peak_flops: float  # dense bf16 FLOP/s of one device (tensor cores / MXU)
    mem_bandwidth: float  # bytes/s of one device's memory
    memory: float  # bytes of one device's memory
    link_bandwidth: float  # bytes/s one device sends in a ring all-reduce (PCIe / NVLink / ICI)
    flops_efficiency: float  # share of peak_flops a large matmul reaches (assumed, stated)
    bandwidth_efficiency: float  # share of mem_bandwidth a weight-streaming decode reaches
    call_overhead_s: float  # fixed host+launch cost of one jitted call
    token_overhead_s: float  # fixed cost per decoded token (per loop iteration), beyond the roofline
    link_latency_s: float = 0.0  # per all-reduce
    # fixed cost of one decoder layer's (or vision block's) ops per forward, beyond the roofline:
    # the launch cost of its dozen small ops, which dominates a small model's decode on a CPU
    # (XLA's CPU runtime runs ops one after another) and is hidden on accelerators, which queue
    # kernels ahead of the device (0 there)
    layer_overhead_s: float = 0.0
    # Measured matmul times, for hardware whose small matmuls fall far below its peak (a CPU: a
    # (32, 192) @ (192, 576) product ran at a sixth of the 1024^3 rate, a one-row product costs about
    # its launch): (rows, n_in, n_out, seconds) of one (rows, n_in) @ (n_in, n_out) float32 product
    # inside a compiled program (`calibrate.matmul_table`: square products on a grid of widths, plus
    # the named models' own weight shapes, each over a range of row counts). A weight product is
    # then priced by `matmul_seconds` from this table instead of peak_flops; empty: the roofline's
    # peak_flops * flops_efficiency for every size (the GPU / TPU presets, whose matmuls are large).
    matmul_table: tuple = ()
    # A last-level cache that holds a small model's weights: when the weights one device reads per
    # forward fit in `cache_bytes`, memory traffic moves at `cache_bandwidth` (0: no such tier).
    cache_bytes: float = 0.0
    cache_bandwidth: float = 0.0
    # Where elementwise work is not hidden under the matmuls: the rate at which a part's activation
    # bytes (norms, rotary, softmax, residuals, gating) are processed, added after its roofline
    # instead of inside it. A CPU runs a forward's ops one after another and its small elementwise
    # fusions move far below the memory bandwidth (calibrated: a few GB/s); 0: activations are part
    # of the roofline's bytes (accelerators, which fuse them into the matmuls' epilogues).
    elementwise_bandwidth: float = 0.0
    notes: str = ""  # where each number comes from

    def __post_init__(self):
        for f in ("peak_flops", "mem_bandwidth", "memory", "link_bandwidth"):
            if not _positive(getattr(self, f)):
                raise CostModelError(f"hardware '{self.name}': {f} must be a positive number, got {getattr(self, f)!r}")
        for f in ("flops_efficiency", "bandwidth_efficiency"):
            v = getattr(self, f)
            if not _positive(v) or v > 1:
                raise CostModelError(f"hardware '{self.name}': {f} must be in (0, 1], got {v!r}")
        for f in ("call_overhead_s", "token_overhead_s", "link_latency_s", "layer_overhead_s",
                  "cache_bytes", "cache_bandwidth", "elementwise_bandwidth"):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0:
                raise CostModelError(f"hardware '{self.name}': {f} must be a number >= 0, got {v!r}")
        object.__setattr__(self, "matmul_table", _checked_table(self.name, self.matmul_table))
        # derived once (not a field): the table by shape, which every priced product reads
        object.__setattr__(self, "_matmul_index", _table_index(self.matmul_table))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _checked_table(name: str, table) -> tuple:
    """`matmul_table` as a sorted tuple of (rows, n_in, n_out, seconds) (a JSON file gives lists),
    every value positive, each (rows, n_in, n_out) once, and square products (n_in == n_out) of at
    least one width, which price the shapes the table does not hold."""
    if not isinstance(table, (list, tuple)):
        raise CostModelError(f"hardware '{name}': matmul_table must be a list of [rows, n_in, n_out, seconds], "
                             f"got {type(table).__name__}")
    out = []
    for i, entry in enumerate(table):
        if not (isinstance(entry, (list, tuple)) and len(entry) == 4 and all(_positive(v) for v in entry)):
            raise CostModelError(f"hardware '{name}': matmul_table[{i}] must be [rows, n_in, n_out, seconds] of "
                                 f"positive numbers, got {entry!r}")
        out.append((float(entry[0]), int(entry[1]), int(entry[2]), float(entry[3])))
    if len({e[:3] for e in out}) != len(out):
        raise CostModelError(f"hardware '{name}': matmul_table holds a (rows, n_in, n_out) more than once")
    if out and not any(i == o for _, i, o, _ in out):
        raise CostModelError(f"hardware '{name}': matmul_table has no square product (n_in == n_out): "
                             "those price the shapes it does not hold")
    return tuple(sorted(out))


def _log_interp(points: list[tuple[float, float]], x: float, grow: float) -> float:
    """y at x from sorted (x, y) points, linear in log x and log y; past the last point y grows as
    (x / x_last) ** grow, below the first it stays at the first's."""
    if x >= points[-1][0]:
        return points[-1][1] * (x / points[-1][0]) ** grow
    if x <= points[0][0]:
        return points[0][1]
    i = max(j for j in range(len(points)) if points[j][0] <= x)
    (x0, y0), (x1, y1) = points[i], points[i + 1]
    f = math.log(x / x0) / math.log(x1 / x0)
    return math.exp((1 - f) * math.log(y0) + f * math.log(y1))


def _table_index(table: tuple) -> dict:
    """{(n_in, n_out): [(rows, seconds), ...] sorted by rows} of a checked (sorted) matmul table."""
    by_shape: dict[tuple[int, int], list] = {}
    for r, i, o, t in table:
        by_shape.setdefault((i, o), []).append((r, t))
    return by_shape


def matmul_seconds(hw: Hardware, rows: float, n_in: int, n_out: int) -> float:
    """Seconds of one (rows, n_in) @ (n_in, n_out) product on `hw`. Without a `matmul_table`: its
    FLOPs at the roofline's rate. With one: the measured times of that shape, interpolated in log
    rows (past the largest row count the time grows with the FLOPs; below the smallest it stays:
    launch-bound); a shape the table does not hold is read from the square products at the width
    of the same size, w = sqrt(n_in n_out), interpolated in log width (past the widest growing as
    w^2, the FLOPs)."""
    if not hw.matmul_table:
        return 2 * rows * n_in * n_out / (hw.peak_flops * hw.flops_efficiency)
    by_shape = hw._matmul_index
    if (n_in, n_out) in by_shape:
        return _log_interp(by_shape[n_in, n_out], rows, 1.0)
    squares = [(i, _log_interp(points, rows, 1.0)) for (i, o), points in sorted(by_shape.items()) if i == o]
    return _log_interp(squares, math.sqrt(n_in * n_out), 2.0)


# Shared assumptions of the GPU presets (dreamr-jax through XLA, bf16):
# * bandwidth_efficiency 0.80: BENCHMARKS.md's H100 run measured a 32B-shaped bf16 decode at 0.36 ms
#   per layer for 0.98 GB of weights, i.e. 2.7 TB/s = 0.81 of the 3.35 TB/s spec (copy bandwidth:
#   2.91 TB/s = 0.87). Taken for the other GPUs as well (not measured there).
# * call_overhead_s 80 us: the same run's estimate of one jitted call's dispatch on an H100.
# * token_overhead_s 20 us: the same run's 2-layer decode step (1.335 ms) less its roofline here
#   (2 layers + the head: 1.31 ms).
# * flops_efficiency: a large bf16 GEMM reaches about 70-80% of dense peak on A100 / H100 (cuBLAS /
#   XLA-class); the L40S less (power-limited clocks). Assumed, not measured in this project.
# * link_latency_s: per all-reduce of a small message (NCCL-class), assumed: 10 us on NVLink,
#   25 us over PCIe.
_GPU_NOTES = ("bandwidth_efficiency 0.80 from BENCHMARKS.md's H100 32B decode (0.36 ms/layer = 0.81 of spec), "
              "call_overhead_s 80 us and token_overhead_s 20 us from the same run; flops_efficiency and "
              "link_latency_s assumed")

HARDWARE: dict[str, Hardware] = {
    "l40s": Hardware(
        name="l40s",
        peak_flops=362e12,  # NVIDIA L40S datasheet: 362 TFLOP/s bf16 dense (733 with sparsity)
        mem_bandwidth=864e9,  # 48 GB GDDR6, 864 GB/s
        memory=46068 * _MIB,  # nvidia-smi total (48.3e9 bytes)
        link_bandwidth=25e9,  # no NVLink: PCIe 4.0 x16, 32 GB/s per direction raw, ~25 GB/s effective
        flops_efficiency=0.60,  # assumed: power-limited clocks keep large GEMMs well under peak
        bandwidth_efficiency=0.80,
        call_overhead_s=80e-6,
        token_overhead_s=20e-6,
        link_latency_s=25e-6,  # assumed: all-reduce over PCIe through the host bridge
        notes="NVIDIA L40S 48GB (PCIe). " + _GPU_NOTES,
    ),
    "a100": Hardware(
        name="a100",
        peak_flops=312e12,  # A100 SXM 80GB: 312 TFLOP/s bf16 dense
        mem_bandwidth=2.039e12,  # HBM2e, 2039 GB/s
        memory=81920 * _MIB,  # nvidia-smi total (85.9e9 bytes)
        link_bandwidth=300e9,  # NVLink 3: 600 GB/s total = 300 GB/s per direction
        flops_efficiency=0.75,  # assumed
        bandwidth_efficiency=0.80,
        call_overhead_s=80e-6,
        token_overhead_s=20e-6,
        link_latency_s=10e-6,
        notes="NVIDIA A100 SXM 80GB. " + _GPU_NOTES,
    ),
    "h100": Hardware(
        name="h100",
        peak_flops=989e12,  # H100 SXM: 989 TFLOP/s bf16 dense (1979 with sparsity)
        mem_bandwidth=3.35e12,  # HBM3, 3.35 TB/s
        memory=81559 * _MIB,  # nvidia-smi total of the H100 80GB HBM3 (85.5e9 bytes)
        link_bandwidth=450e9,  # NVLink 4: 900 GB/s total = 450 GB/s per direction
        flops_efficiency=0.70,  # assumed
        bandwidth_efficiency=0.80,  # measured (BENCHMARKS.md), see above
        call_overhead_s=80e-6,
        token_overhead_s=20e-6,
        link_latency_s=10e-6,
        notes="NVIDIA H100 SXM 80GB. " + _GPU_NOTES,
    ),
    "h200": Hardware(
        name="h200",
        peak_flops=989e12,  # same compute as the H100 SXM
        mem_bandwidth=4.8e12,  # HBM3e, 4.8 TB/s
        memory=143771 * _MIB,  # nvidia-smi total of the H200 141GB (150.8e9 bytes)
        link_bandwidth=450e9,  # NVLink 4
        flops_efficiency=0.70,  # assumed
        bandwidth_efficiency=0.80,  # the H100's measured share, assumed to carry over
        call_overhead_s=80e-6,
        token_overhead_s=20e-6,
        link_latency_s=10e-6,
        notes="NVIDIA H200 SXM 141GB. " + _GPU_NOTES,
    ),
    "v5e": Hardware(
        name="v5e",
        peak_flops=197e12,  # Cloud TPU v5e: 197 TFLOP/s bf16
        mem_bandwidth=819e9,  # 16 GB HBM2e, 819 GB/s
        memory=16 * _GIB,
        # ICI 1600 Gbps per chip over 4 links (2-D torus) = 50 GB/s per link per direction. Assumed: a
        # ring all-reduce sends over one link in one direction (a bidirectional ring would double it).
        link_bandwidth=50e9,
        flops_efficiency=0.75,  # assumed (MXU utilisation of large XLA matmuls)
        bandwidth_efficiency=0.80,  # assumed, as the GPUs
        call_overhead_s=80e-6,  # assumed, as the GPUs
        token_overhead_s=20e-6,  # assumed, as the GPUs
        link_latency_s=5e-6,  # assumed: ICI all-reduce of a small message
        notes="Google Cloud TPU v5e (one chip). ICI taken as one 50 GB/s link per direction; all "
              "efficiencies and overheads assumed (no TPU measurement in this project)",
    ),
    "v5p": Hardware(
        name="v5p",
        peak_flops=459e12,  # Cloud TPU v5p: 459 TFLOP/s bf16
        mem_bandwidth=2.765e12,  # 95 GB HBM2e, 2765 GB/s
        memory=95 * _GIB,
        link_bandwidth=100e9,  # ICI 4800 Gbps per chip over 6 links (3-D torus) = 100 GB/s per link; as v5e
        flops_efficiency=0.75,  # assumed
        bandwidth_efficiency=0.80,  # assumed
        call_overhead_s=80e-6,
        token_overhead_s=20e-6,
        link_latency_s=5e-6,
        notes="Google Cloud TPU v5p (one chip). ICI taken as one 100 GB/s link per direction; all "
              "efficiencies and overheads assumed (no TPU measurement in this project)",
    ),
    "cpu": Hardware(
        name="cpu",
        peak_flops=2e11,  # placeholder: a few AVX-512 cores, fp32
        mem_bandwidth=40e9,  # placeholder: BENCHMARKS.md's CPU copy bandwidth was 37 GB/s
        memory=16 * _GIB,
        link_bandwidth=10e9,
        flops_efficiency=0.5,
        bandwidth_efficiency=0.9,
        call_overhead_s=100e-6,
        token_overhead_s=100e-6,
        notes="placeholder for a small CPU host; every number is a rough guess: calibrate for real ones",
    ),
}

_HW_FIELDS = tuple(f.name for f in dataclasses.fields(Hardware))
_HW_REQUIRED = tuple(f.name for f in dataclasses.fields(Hardware) if f.default is dataclasses.MISSING)


def hardware(name_or_path: str) -> Hardware:
    """A preset (`HARDWARE`, case-insensitive) or a JSON file holding Hardware's fields, as
    `save_hardware` writes them. A file may name a preset as "base" and give only the fields that
    differ from it (e.g. measured bandwidths)."""
    key = str(name_or_path)
    if key.lower() in HARDWARE:
        return HARDWARE[key.lower()]
    if not (key.endswith(".json") or os.path.isfile(key)):
        raise CostModelError(f"unknown hardware '{key}': the presets are {', '.join(HARDWARE)}; "
                             "or pass a JSON file written by calibrate / save_hardware")
    try:
        with open(key) as f:
            d = json.load(f)
    except FileNotFoundError:
        raise CostModelError(f"hardware file {key} does not exist (presets: {', '.join(HARDWARE)})") from None
    except ValueError as e:
        raise CostModelError(f"hardware file {key}: not valid JSON ({e})") from e
    if not isinstance(d, dict):
        raise CostModelError(f"hardware file {key}: expected a JSON object of {', '.join(_HW_FIELDS)}")
    d = dict(d)
    base = d.pop("base", None)
    if "flops_half_rows" in d:  # the one field calibrate wrote before its matmul table
        raise CostModelError(f"hardware file {key} was written by an older `dreamr calibrate` (flops_half_rows); "
                             "rerun `dreamr calibrate --out PATH` to write a matmul table in its place")
    unknown = sorted(set(d) - set(_HW_FIELDS))
    if unknown:
        raise CostModelError(f"hardware file {key}: unknown field(s) {', '.join(unknown)}; "
                             f"the fields are base, {', '.join(_HW_FIELDS)}")
    if base is not None:
        if str(base).lower() not in HARDWARE:
            raise CostModelError(f"hardware file {key}: base '{base}' is not a preset ({', '.join(HARDWARE)})")
        d = {**{k: v for k, v in HARDWARE[str(base).lower()].to_dict().items() if k != "name"}, **d}
    d.setdefault("name", os.path.splitext(os.path.basename(key))[0])
    missing = [f for f in _HW_REQUIRED if f not in d]
    if missing:
        raise CostModelError(f"hardware file {key}: missing field(s) {', '.join(missing)} "
                             "(or name a preset as \"base\" to take them from)")
    return Hardware(**d)


def save_hardware(hw: Hardware, path: str) -> None:
    """Write `hw` as the JSON file `hardware(path)` reads back."""
    with open(path, "w") as f:
        json.dump(hw.to_dict(), f, indent=2)
        f.write("\n")


# ---- models -----------------------------------------------------------------------------------

_WIDTHS = {"int4": 4, "bf16": 16, "fp16": 16, "fp32": 32}
_WIDTH_NAMES = {4: "int4", 16: "bf16", 32: "fp32"}
SCALE_BYTES = 2  # int4: one fp16 / bf16 scale per group of each output feature
ZERO_BYTES = 1  # ... and one uint8 zero (dreamr-jax's device layout; AWQ stores it as a nibble on disk)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The dims the count needs. Text: hidden, layers, heads, kv_heads, head_dim, intermediate,
    vocab, tied (head shares the embedding). Vision: depth blocks of width vision_hidden
    (MLP vision_intermediate, vision_heads), patch_dim = C * T * p * p inputs per patch, merge x
    merge patches merged into one vision_out-wide token, plus `deepstack` more mergers (Qwen3-VL)."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    vision_depth: int
    vision_hidden: int
    vision_intermediate: int
    vision_heads: int
    patch_dim: int  # C*T*p*p
    merge: int
    vision_out: int
    deepstack: int
    weight_bits: int = 16  # 32, 16 or 4 (int4: AWQ / compressed-tensors with group scales)
    group_size: int = 128  # int4 inputs per scale; 0: one scale per output feature ("channel")
    vision_gated: bool = False  # Qwen2.5-VL's vision MLP is gated (gate, up, down); Qwen3-VL's is fc1, fc2
    vision_window: int = 0  # patches a windowed block attends to (Qwen2.5-VL: 64); 0: all blocks full
    vision_full_blocks: int = 0  # with vision_window: how many blocks still attend to the whole image
    # Qwen3-VL-MoE: every decoder MLP a mixture of `experts` gated MLPs of width
    # `expert_intermediate`, `experts_per_token` of them per token (0: dense; mixed dense / sparse
    # layers are priced as all sparse)
    experts: int = 0
    experts_per_token: int = 0
    expert_intermediate: int = 0

    def __post_init__(self):
        if self.weight_bits not in _WIDTH_NAMES:
            raise CostModelError(f"model '{self.name}': weight_bits must be 32, 16 or 4, got {self.weight_bits}")
        for f in ("hidden", "layers", "heads", "kv_heads", "head_dim", "intermediate", "vocab"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                raise CostModelError(f"model '{self.name}': {f} must be a positive integer, got {getattr(self, f)!r}")
        if self.group_size < 0:
            raise CostModelError(f"model '{self.name}': group_size must be >= 0, got {self.group_size}")
        if self.experts and not (0 < self.experts_per_token <= self.experts and self.expert_intermediate > 0):
            raise CostModelError(f"model '{self.name}': an MoE needs 1 <= experts_per_token <= experts and a "
                                 f"positive expert_intermediate, got {self.experts_per_token} of {self.experts}, "
                                 f"width {self.expert_intermediate}")

    def touched_experts(self, tokens: float) -> float:
        """Expected distinct experts `tokens` tokens route to in one layer, each choosing
        `experts_per_token` different experts uniformly: E (1 - (1 - k / E)^n)."""
        e, k = self.experts, self.experts_per_token
        return e * (1 - (1 - k / e) ** max(tokens, 0.0))

    @property
    def label(self) -> str:
        """'qwen3-vl-32b (bf16)'."""
        return f"{self.name} ({_WIDTH_NAMES[self.weight_bits]})"

    @property
    def dense_bytes(self) -> int:
        """Bytes of one unquantized weight, and of one activation / KV element."""
        return 4 if self.weight_bits == 32 else 2

    def linear_bytes(self, n_in: int, n_out: int, *, quantized: bool = False) -> float:
        """Stored bytes of one (n_in, n_out) weight. `quantized`: a decoder projection, int4 when
        weight_bits == 4 (0.5 byte per weight + a scale and a zero per group per output)."""
        if quantized and self.weight_bits == 4:
            groups = math.ceil(n_in / self.group_size) if self.group_size else 1
            return n_in * n_out / 2 + n_out * groups * (SCALE_BYTES + ZERO_BYTES)
        return n_in * n_out * self.dense_bytes

    # The weights of one part, as (n_in, n_out) shapes.
    @property
    def attention_shapes(self) -> tuple[tuple[int, int], ...]:
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return (self.hidden, q), (self.hidden, kv), (self.hidden, kv), (q, self.hidden)  # q, k, v, o

    @property
    def mlp_shapes(self) -> tuple[tuple[int, int], ...]:
        """One dense MLP's weights, or one expert's for an MoE."""
        inner = self.expert_intermediate if self.experts else self.intermediate
        return (self.hidden, inner), (self.hidden, inner), (inner, self.hidden)

    @property
    def vision_block_shapes(self) -> tuple[tuple[int, int], ...]:
        vh, vi = self.vision_hidden, self.vision_intermediate
        mlp = ((vh, vi), (vh, vi), (vi, vh)) if self.vision_gated else ((vh, vi), (vi, vh))
        return ((vh, 3 * vh), (vh, vh)) + mlp  # qkv, proj, MLP

    @property
    def merger_shapes(self) -> tuple[tuple[int, int], ...]:
        wide = self.merge**2 * self.vision_hidden
        return (wide, wide), (wide, self.vision_out)

    @property
    def params(self) -> int:
        """Weights of the matrices and embeddings (norms, biases and Qwen3-VL's vision position
        table are left out: under 0.1% of a released model)."""
        mlp = sum(i * o for i, o in self.mlp_shapes) * max(self.experts, 1) + self.hidden * self.experts  # + router
        layer = sum(i * o for i, o in self.attention_shapes) + mlp
        text = self.layers * layer + self.vocab * self.hidden * (1 if self.tied else 2)
        vision = (self.patch_dim * self.vision_hidden
                  + self.vision_depth * sum(i * o for i, o in self.vision_block_shapes)
                  + (1 + self.deepstack) * sum(i * o for i, o in self.merger_shapes))
        return text + vision


def _qwen3_vl(name, hidden, layers, heads, kv, inter, tied, vision_depth, vision_hidden, vision_inter):
    return ModelSpec(name, hidden, layers, heads, kv, 128, inter, 151936, tied,
                     vision_depth=vision_depth, vision_hidden=vision_hidden, vision_intermediate=vision_inter,
                     vision_heads=16, patch_dim=3 * 2 * 16 * 16, merge=2, vision_out=hidden, deepstack=3)


def _qwen3_vl_moe(name, hidden, layers, heads, kv, experts, top_k, expert_inter):
    return dataclasses.replace(_qwen3_vl(name, hidden, layers, heads, kv, 4 * hidden, False, 27, 1152, 4304),
                               experts=experts, experts_per_token=top_k, expert_intermediate=expert_inter)


def _qwen2_5_vl(name, hidden, layers, heads, kv, inter, vocab, tied):
    return ModelSpec(name, hidden, layers, heads, kv, hidden // heads, inter, vocab, tied,
                     vision_depth=32, vision_hidden=1280, vision_intermediate=3420, vision_heads=16,
                     patch_dim=3 * 2 * 14 * 14, merge=2, vision_out=hidden, deepstack=0, vision_gated=True,
                     vision_window=(112 // 14) ** 2, vision_full_blocks=4)


# The released Qwen/*-Instruct config.json values. Qwen3-VL: text dims as the issue lists them, the
# 32B's checked against its config.json (hidden 5120, 64 layers, 64 / 8 heads, head_dim 128, 25600,
# vocab 151936; vision depth 27, 1152, 4304, 16 heads, deepstack [8, 16, 24]); 2B / 4B vision depth 24,
# 1024, 4096, deepstack [5, 11, 17]. Qwen2.5-VL: the 3B's config.json (2048, 36 layers, 16 / 2 heads,
# 11008, vocab 151936, tied) and the 7B's module printout (vocab 152064, 18944; vision qkv 1280 ->
# 3840, gated MLP 1280 -> 3420, merger 5120 -> 5120 -> 3584); the 32B shares the 7B's vocabulary
# (152064, Qwen2.5-32B's). Qwen2.5-VL vision: transformers' Qwen2_5_VLVisionConfig defaults (depth 32,
# 1280, 3420, 16 heads, patch 14, window 112 px = 8 x 8 patches, full attention in blocks 7/15/23/31).
MODELS: dict[str, ModelSpec] = {
    "qwen3-vl-2b": _qwen3_vl("qwen3-vl-2b", 2048, 28, 16, 8, 6144, True, 24, 1024, 4096),
    "qwen3-vl-4b": _qwen3_vl("qwen3-vl-4b", 2560, 36, 32, 8, 9728, True, 24, 1024, 4096),
    "qwen3-vl-8b": _qwen3_vl("qwen3-vl-8b", 4096, 36, 32, 8, 12288, False, 27, 1152, 4304),
    "qwen3-vl-32b": _qwen3_vl("qwen3-vl-32b", 5120, 64, 64, 8, 25600, False, 27, 1152, 4304),
    # MoE (every layer sparse, untied): 128 experts, top 8
    "qwen3-vl-30b-a3b": _qwen3_vl_moe("qwen3-vl-30b-a3b", 2048, 48, 32, 4, 128, 8, 768),
    "qwen3-vl-235b-a22b": _qwen3_vl_moe("qwen3-vl-235b-a22b", 4096, 94, 64, 4, 128, 8, 1536),
    "qwen2.5-vl-3b": _qwen2_5_vl("qwen2.5-vl-3b", 2048, 36, 16, 2, 11008, 151936, True),
    "qwen2.5-vl-7b": _qwen2_5_vl("qwen2.5-vl-7b", 3584, 28, 28, 4, 18944, 152064, False),
    "qwen2.5-vl-32b": _qwen2_5_vl("qwen2.5-vl-32b", 5120, 64, 40, 8, 27648, 152064, False),
}

_MODEL_TYPES = ("qwen3_vl", "qwen3_vl_moe", "qwen2_5_vl")
_STORED_BITS = {"F32": 32, "F16": 16, "BF16": 16, "float32": 32, "float16": 16, "bfloat16": 16}


def model_spec(name_or_path: str) -> ModelSpec:
    """A ModelSpec from a preset name (`MODELS`, case-insensitive), a checkpoint folder or its
    config.json (Qwen3-VL or Qwen2.5-VL; int4 when the config has a quantization_config), a
    shipped asset ("asset:target", "asset:draft"), or the hub id of a released model whose folder is
    not here ("Qwen/Qwen3-VL-32B-Instruct"; "...-AWQ": int4), read as its preset with no download.
    A ":int4" / ":bf16" / ":fp16" / ":fp32" suffix sets the weights' width; without one a
    checkpoint's width is its stored dtype (config "dtype" / "torch_dtype", else its first
    safetensors file; 16-bit when neither says)."""
    text = str(name_or_path)
    base, _, suffix = text.rpartition(":")
    bits = None
    if base and suffix.lower() in _WIDTHS:
        text, bits = base, _WIDTHS[suffix.lower()]
    if text.lower() in MODELS:
        spec = MODELS[text.lower()]
        return dataclasses.replace(spec, weight_bits=bits) if bits else spec
    name, path = None, text
    if text.startswith("asset:"):
        name = text
        from .assets import path as asset_path

        try:
            path = asset_path(text.split(":", 1)[1])
        except (ValueError, FileNotFoundError) as e:
            raise CostModelError(f"model '{text}': {e}") from e
    if os.path.isdir(path):
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise CostModelError(f"model '{text}': folder {path} holds no config.json")
    elif os.path.isfile(path):
        config_path, path = path, os.path.dirname(path) or "."
    elif _hub_alias(text):
        key, alias_bits = _hub_alias(text)
        return dataclasses.replace(MODELS[key], weight_bits=bits or alias_bits or 16)
    else:
        raise CostModelError(f"unknown model '{name_or_path}': not a preset ({', '.join(MODELS)}, optionally with "
                             f"{' / '.join(':' + w for w in _WIDTHS)}), an existing checkpoint folder or config.json, "
                             "or asset:target / asset:draft")
    name = name or os.path.basename(os.path.abspath(path))  # a path: named after its folder
    return spec_from_config(_read_json(config_path), name=name, bits=bits, folder=path, source=config_path)


def _hub_alias(text: str) -> tuple[str, int | None] | None:
    """A released model's hub id -> (its preset, 4 for an -AWQ release), read from the name alone:
    "Qwen/Qwen3-VL-8B-Instruct" -> ("qwen3-vl-8b", None), "Qwen/Qwen2.5-VL-7B-Instruct-AWQ" -> 4."""
    if text.count("/") != 1:
        return None
    key, bits = text.split("/")[1].lower(), None
    if key.endswith("-awq"):
        key, bits = key[: -len("-awq")], 4
    for tail in ("-instruct", "-thinking"):
        key = key[: -len(tail)] if key.endswith(tail) else key
    return (key, bits) if key in MODELS else None


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            d = json.load(f)
    except ValueError as e:
        raise CostModelError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(d, dict):
        raise CostModelError(f"{path}: not a config.json (a JSON object)")
    return d


def spec_from_config(d: dict, *, name: str, bits: int | None = None, folder: str | None = None,
                     source: str = "config.json") -> ModelSpec:
    """A ModelSpec from a config.json dict, in the nested layout or Qwen2.5-VL's older flat one
    (text fields at the top level). `bits` overrides the width; else int4 with a
    quantization_config, else the stored dtype (see `model_spec`)."""
    model_type = d.get("model_type")
    if model_type not in _MODEL_TYPES:
        raise CostModelError(f"{source}: model_type '{model_type}' is not a Qwen-VL model; the cost model knows "
                             f"{' and '.join(_MODEL_TYPES)}")
    t = d.get("text_config") or d  # flat Qwen2.5-VL configs keep the text fields at the top level
    v = d.get("vision_config") or {}
    qwen3 = model_type in ("qwen3_vl", "qwen3_vl_moe")
    try:
        hidden, heads = int(t["hidden_size"]), int(t["num_attention_heads"])
        patch = int(v.get("patch_size", 16 if qwen3 else 14))
        window = int(v.get("window_size", 0 if qwen3 else 112))
        vision_hidden = int(v.get("hidden_size", 1152 if qwen3 else 1280))
        spec = ModelSpec(
            name=name,
            hidden=hidden,
            layers=int(t["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(t.get("num_key_value_heads") or heads),
            head_dim=int(t.get("head_dim") or hidden // heads) if qwen3 else hidden // heads,
            intermediate=int(t["intermediate_size"]),
            vocab=int(t["vocab_size"]),
            tied=bool(d.get("tie_word_embeddings") or t.get("tie_word_embeddings")),
            vision_depth=int(v.get("depth", 27 if qwen3 else 32)),
            vision_hidden=vision_hidden,
            vision_intermediate=int(v.get("intermediate_size", 4304 if qwen3 else 3420)),
            vision_heads=int(v.get("num_heads", 16)),
            patch_dim=int(v.get("in_channels", v.get("in_chans", 3))) * int(v.get("temporal_patch_size", 2)) * patch**2,
            merge=int(v.get("spatial_merge_size", 2)),
            vision_out=int(v.get("out_hidden_size", hidden)),
            deepstack=len(v.get("deepstack_visual_indexes", (8, 16, 24))) if qwen3 else 0,
            vision_gated=not qwen3,
            vision_window=0 if qwen3 or not window else (window // patch) ** 2,
            vision_full_blocks=0 if qwen3 else len(v.get("fullatt_block_indexes", (7, 15, 23, 31))),
            # transformers' Qwen3VLMoeTextConfig defaults where the file is silent
            experts=int(t.get("num_experts", 60)) if model_type == "qwen3_vl_moe" else 0,
            experts_per_token=int(t.get("num_experts_per_tok", 4)) if model_type == "qwen3_vl_moe" else 0,
            expert_intermediate=int(t.get("moe_intermediate_size", 1408)) if model_type == "qwen3_vl_moe" else 0,
        )
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, CostModelError):
            raise
        raise CostModelError(f"{source}: cannot read the model's dims ({type(e).__name__}: {e})") from e
    qc = d.get("quantization_config")
    if bits is None:
        bits = 4 if qc else _stored_bits(d, t, folder)
    return dataclasses.replace(spec, weight_bits=bits, group_size=_group_size(qc) if qc else 128)


def _group_size(qc: dict) -> int:
    """int4 inputs per scale from a quantization_config: AutoAWQ's group_size / q_group_size, or
    compressed-tensors' config group's weights (strategy "channel": 0, one scale per output)."""
    if "group_size" in qc or "q_group_size" in qc:
        g = qc.get("group_size", qc.get("q_group_size"))
        return 0 if g in (-1, None) else int(g)
    for group in (qc.get("config_groups") or {}).values():
        w = group.get("weights") or {}
        return int(w["group_size"]) if w.get("strategy") == "group" and w.get("group_size") else 0
    return 128


def _stored_bits(d: dict, t: dict, folder: str | None) -> int:
    """16 or 32: the config's dtype, else the first safetensors file's float dtype, else 16."""
    for key in ("dtype", "torch_dtype"):
        for c in (d, t):
            if c.get(key) in _STORED_BITS:
                return _STORED_BITS[c[key]]
    if folder and os.path.isdir(folder):
        files = sorted(f for f in os.listdir(folder) if f.startswith("model") and f.endswith(".safetensors"))
        if files:
            try:
                with open(os.path.join(folder, files[0]), "rb") as f:
                    n = int.from_bytes(f.read(8), "little")
                    header = json.loads(f.read(n))
                dtypes = [e["dtype"] for k, e in header.items() if k != "__metadata__" and e["dtype"] in _STORED_BITS]
                if dtypes:
                    return _STORED_BITS[max(set(dtypes), key=dtypes.count)]
            except (OSError, ValueError, KeyError, TypeError):
                pass  # an unreadable header: the loader will say why; price it as 16-bit
    return 16


# ---- counting ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Count:
    """What one part of a forward does on one device: FLOPs, bytes of weights, KV cache and
    activations moved, and the bytes of its all-reduces (each message once)."""

    flops: float = 0.0
    weight_bytes: float = 0.0
    kv_bytes: float = 0.0
    act_bytes: float = 0.0
    allreduce_bytes: float = 0.0
    allreduces: int = 0
    # its weight products as (rows, n_in, n_out) on this device: what `matmul_seconds` prices
    matmuls: tuple = ()

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.kv_bytes + self.act_bytes


def splits(model: ModelSpec, devices: int) -> tuple[int, int, int]:
    """Over how many devices (attention, MLP, vocabulary) split under tensor parallelism, as
    `dreamr_jax.models.qwen_vl.sharding` places them: attention by whole heads when both head counts divide, the
    MLP when the intermediate size divides, embedding / head when the vocabulary divides; 1: whole
    on every device."""
    d = devices
    attn = d if model.heads % d == 0 and model.kv_heads % d == 0 else 1
    mlp = d if (model.experts or model.intermediate) % d == 0 else 1  # an MoE splits by whole experts
    vocab = d if model.vocab % d == 0 else 1
    return attn, mlp, vocab


def layer_count(model: ModelSpec, *, tokens: float, rows: int = 1, cached: float = 0, devices: int = 1) -> Count:
    """One text decoder layer, per device: `tokens` new tokens in total over `rows` rows, each row
    with `cached` tokens already in its cache.

    Each new token attends to L = cached + (tokens/rows + 1) / 2 keys on average (causal within the
    new tokens); each row reads its whole cache (cached + tokens/rows keys) once and writes the new
    tokens' K and V."""
    m, n, b = model, tokens, model.dense_bytes
    d_attn, d_mlp, _ = splits(model, devices)
    q, kv = m.heads * m.head_dim, m.kv_heads * m.head_dim
    per_row = n / rows
    keys = cached + (per_row + 1) / 2
    projections = 2 * n * m.hidden * (q + 2 * kv) + 2 * n * q * m.hidden  # q, k, v; o
    attention = 2 * n * keys * q * 2  # QK^T and PV over the keys, every query head
    weights_attn = sum(m.linear_bytes(i, o, quantized=True) for i, o in m.attention_shapes)
    # experts stay dense in an int4 checkpoint (the loader refuses int4 experts)
    one_mlp = sum(m.linear_bytes(i, o, quantized=not m.experts) for i, o in m.mlp_shapes)
    router_flops = 0.0
    if m.experts:  # the router (whole on every device), then each token's k experts; the weights of
        # every expert any token chose, in expectation spread evenly over the devices
        inner, touched = m.expert_intermediate, m.touched_experts(n)
        router_flops = 2 * n * m.hidden * m.experts
        mlp = 2 * n * m.experts_per_token * 3 * m.hidden * inner
        weights_mlp = touched * one_mlp + m.linear_bytes(m.hidden, m.experts) * d_mlp  # the router whole
        act_mlp = m.experts_per_token * 3 * inner + m.experts
        rows_per_expert = n * m.experts_per_token / max(touched, 1e-9)
        mlp_products = (((rows_per_expert, m.hidden, inner), (rows_per_expert, m.hidden, inner),
                         (rows_per_expert, inner, m.hidden)) * max(1, round(touched / d_mlp)))
        mlp_products += ((n, m.hidden, m.experts),)  # the router, whole on every device
    else:
        inner = m.intermediate
        mlp = 2 * n * 3 * m.hidden * inner  # gate, up, down
        weights_mlp = one_mlp
        act_mlp = 3 * inner  # gate and up written; their product read by down
        mlp_products = ((n, m.hidden, inner // d_mlp), (n, m.hidden, inner // d_mlp), (n, inner // d_mlp, m.hidden))
    kv_read = rows * (cached + per_row) * 2 * kv * b  # K and V of every key, once per row
    kv_write = n * 2 * kv * b
    # each matmul reads its input and writes its output: x -> q,k,v; attn -> o; x -> gate, up; act -> down
    act_whole = 4 * m.hidden  # the residual stream into q/k/v and gate/up, out of o and down
    act_attn = 2 * q + 2 * kv  # q, k, v written; the attention output read by o
    n_allreduce = (d_attn > 1) + (d_mlp > 1)  # after o_proj and after down_proj, when split
    # q, k, v and gate, up split their outputs over the devices; o and down their inputs
    (h, _), (_, kv_out), _, (q_in, _) = m.attention_shapes
    matmuls = ((n, h, q // d_attn), (n, h, kv_out // d_attn), (n, h, kv_out // d_attn), (n, q_in // d_attn, h),
               *mlp_products)
    return Count(
        flops=(projections + attention) / d_attn + mlp / d_mlp + router_flops,
        weight_bytes=weights_attn / d_attn + weights_mlp / d_mlp,
        kv_bytes=(kv_read + kv_write) / d_attn,
        act_bytes=b * n * (act_whole + act_attn / d_attn + act_mlp / d_mlp),
        allreduce_bytes=n_allreduce * n * m.hidden * b,
        allreduces=n_allreduce,
        matmuls=matmuls,
    )


def head_count(model: ModelSpec, *, tokens: float, outputs: float, devices: int = 1) -> Count:
    """The embedding lookup of `tokens` tokens and the output head for `outputs` of them.

    The lookup reads only the looked-up rows; the head reads its whole (hidden, vocab) matrix (the
    embedding itself when tied), never int4, and writes float32 logits. A vocabulary split divides
    the head, and the lookup ends with an all-reduce of tokens x hidden."""
    m, b = model, model.dense_bytes
    _, _, d_vocab = splits(model, devices)
    split = d_vocab > 1
    return Count(
        flops=2 * outputs * m.hidden * m.vocab / d_vocab,
        weight_bytes=m.linear_bytes(m.hidden, m.vocab) / d_vocab + tokens * m.hidden * b,
        act_bytes=outputs * m.vocab * 4 / d_vocab,
        allreduce_bytes=tokens * m.hidden * b if split else 0.0,
        allreduces=int(split),
        matmuls=((outputs, m.hidden, m.vocab // d_vocab),),
    )


def vision_block_count(model: ModelSpec, *, patches: float, keys: float, rows: int = 1) -> Count:
    """One vision block over `rows` images of `patches` patches, each patch attending to `keys`
    patches (its whole image, or its window). Vision weights are never int4; the tower is
    replicated, so no device count."""
    m, b = model, model.dense_bytes
    vh, vi = m.vision_hidden, m.vision_intermediate
    p = rows * patches
    mats = 3 if m.vision_gated else 2
    return Count(
        flops=sum(2 * p * i * o for i, o in m.vision_block_shapes) + 2 * p * keys * vh * 2,
        weight_bytes=sum(m.linear_bytes(i, o) for i, o in m.vision_block_shapes),
        # read x (qkv), attn (proj), x (MLP), hidden (down); write 3 vh, vh, (mats - 1) vi, vh
        act_bytes=b * p * (8 * vh + mats * vi),
        matmuls=tuple((p, i, o) for i, o in m.vision_block_shapes),
    )


def vision_counts(model: ModelSpec, *, patches: int, rows: int = 1) -> list[tuple[str, Count]]:
    """The vision tower for `rows` images of `patches` patches each: patch embedding, every block
    (full attention over the image, or Qwen2.5-VL's windows), the merger and the deepstack
    mergers (merge^2 patches -> one token: fc1 merge^2 vh -> merge^2 vh, fc2 -> vision_out)."""
    m, b = model, model.dense_bytes
    p = rows * patches
    parts = [("patch_embed", Count(flops=2 * p * m.patch_dim * m.vision_hidden,
                                   weight_bytes=m.linear_bytes(m.patch_dim, m.vision_hidden),
                                   act_bytes=b * p * (m.patch_dim + m.vision_hidden),
                                   matmuls=((p, m.patch_dim, m.vision_hidden),)))]
    full = m.vision_full_blocks if m.vision_window else m.vision_depth  # blocks attending to the whole image
    for block in range(m.vision_depth):
        keys = patches if block < full else min(patches, m.vision_window)  # (their order does not matter)
        parts.append((f"vision_block{block}", vision_block_count(m, patches=patches, keys=keys, rows=rows)))
    merged = p / m.merge**2
    (wide, _), (_, out) = m.merger_shapes
    merger = Count(flops=sum(2 * merged * i * o for i, o in m.merger_shapes),
                   weight_bytes=sum(m.linear_bytes(i, o) for i, o in m.merger_shapes),
                   act_bytes=b * merged * (3 * wide + out),  # fc1 reads and writes wide; fc2 reads wide
                   matmuls=tuple((merged, i, o) for i, o in m.merger_shapes))
    parts += [(f"merger{k}", merger) for k in range(1 + m.deepstack)]
    return parts


# ---- pricing -----------------------------------------------------------------------------------

OPS = ("prefill", "extend", "decode")


@dataclasses.dataclass
class CallCost:
    """One device call: totals per device over the call, and its seconds.

    compute_s / memory_s: the sums over the parts (layers, vision blocks, head) of each side of the
    roofline; seconds = sum over parts of (max(compute, memory) + elementwise) + link_s +
    overhead_s, where a part's elementwise time (0 unless the hardware has an
    elementwise_bandwidth) is its activations' bytes priced after its roofline; elementwise_s is
    their sum (inside `parts`' seconds already)."""

    flops: float
    weight_bytes: float
    kv_bytes: float
    act_bytes: float
    allreduce_bytes: float
    compute_s: float
    memory_s: float
    link_s: float
    overhead_s: float
    seconds: float
    bound: str  # "compute" | "memory" (which dominated the layers)
    iterations: int = 1  # forwards in the call (decode: one per loop iteration)
    parts: dict = dataclasses.field(default_factory=dict)  # seconds of "layers", "vision", "head", "link", "overhead"
    elementwise_s: float = 0.0  # of `seconds`: activations priced after the roofline (a calibrated CPU)


def compute_seconds(hw: Hardware, count: Count) -> float:
    """The compute side of one part's roofline: its weight products by `matmul_seconds`, and its
    other FLOPs (attention's QK^T and PV) at the average rate of those products."""
    if not count.matmuls:
        return count.flops / (hw.peak_flops * hw.flops_efficiency)
    products = sum(matmul_seconds(hw, *mm) for mm in count.matmuls)
    product_flops = sum(2 * r * i * o for r, i, o in count.matmuls)
    return products * count.flops / product_flops


def _check_args(model, hw, devices, op, tokens, rows, cached, patches):
    if not isinstance(model, ModelSpec):
        raise CostModelError(f"model must be a ModelSpec (see model_spec), got {type(model).__name__}")
    if not isinstance(hw, Hardware):
        raise CostModelError(f"hw must be a Hardware (see hardware), got {type(hw).__name__}")
    if op not in OPS:
        raise CostModelError(f"op '{op}' is not one of {', '.join(OPS)}")
    if not isinstance(devices, int) or devices < 1:
        raise CostModelError(f"devices must be a positive integer, got {devices!r}")
    if not isinstance(rows, int) or rows < 1:
        raise CostModelError(f"rows must be a positive integer, got {rows!r}")
    if not tokens >= 1:
        raise CostModelError(f"{op}: tokens must be >= 1, got {tokens!r}")
    if op != "prefill" and tokens < rows:
        raise CostModelError(f"{op}: tokens ({tokens}) counts all rows' tokens, so it must be >= rows ({rows})")
    if not cached >= 0 or not patches >= 0:
        raise CostModelError(f"cached and patches must be >= 0, got cached={cached!r}, patches={patches!r}")


def call_cost(model: ModelSpec, hw: Hardware, devices: int, op: str, *, tokens: int, rows: int = 1,
              cached: int = 0, patches: int = 0) -> CallCost:
    """Price one device call of `model` tensor-parallel over `devices` devices of `hw`.

    op "prefill": `tokens` prompt tokens per row (rows rows), with `patches` image patches per row
      through the vision tower first; logits for the last token of each row.
    op "extend": `tokens` new tokens in total over `rows` rows, each row with `cached` tokens in its
      cache (a packed check, a verify, a feed); logits for one token per row.
    op "decode": `tokens` generated tokens in total over `rows` rows: ceil(tokens / rows) loop
      iterations, each a forward of `rows` tokens reading all weights, starting from `cached` tokens
      per row. Priced at the iterations' average cache length (exact for FLOPs and bytes, which are
      linear in it), plus token_overhead_s per iteration."""
    _check_args(model, hw, devices, op, tokens, rows, cached, patches)
    iterations = 1
    if op == "decode":
        iterations = math.ceil(tokens / rows)
        n, start, outputs = rows, cached + (iterations - 1) / 2, rows
    elif op == "extend":
        n, start, outputs = tokens, cached, rows
    else:
        n, start, outputs = tokens * rows, cached, rows
    byte_rate = hw.mem_bandwidth * hw.bandwidth_efficiency
    weight_share = 1.0  # of the weight bytes that count on the memory side
    if hw.cache_bandwidth and weight_bytes_per_device(model, devices) <= hw.cache_bytes:
        byte_rate = hw.cache_bandwidth  # the weights stay in the last-level cache between forwards
        # ... and a measured matmul table timed its products reading their weights from cache: its
        # times hold that read already
        weight_share = 0.0 if hw.matmul_table else 1.0

    def priced(count: Count, times: int) -> tuple[float, float, float, float]:
        """(compute, memory, the part's seconds, of which elementwise), each over `times` runs."""
        c = compute_seconds(hw, count)
        if hw.elementwise_bandwidth:  # activations after the roofline of the weights and cache
            m = (weight_share * count.weight_bytes + count.kv_bytes) / byte_rate
            e = count.act_bytes / hw.elementwise_bandwidth
            return times * c, times * m, times * (max(c, m) + e), times * e
        m = (weight_share * count.weight_bytes + count.kv_bytes + count.act_bytes) / byte_rate
        return times * c, times * m, times * max(c, m), 0.0

    layer = layer_count(model, tokens=n, rows=rows, cached=start, devices=devices)
    head = head_count(model, tokens=n, outputs=outputs, devices=devices)
    vision = vision_counts(model, patches=patches, rows=rows) if op == "prefill" and patches else []
    per_forward = [layer] * model.layers + [head]
    # (part, count, times): every layer of a forward is the same count, priced once
    counts = [("layers", layer, iterations * model.layers), ("head", head, iterations)] + \
        [("vision", c, 1) for _, c in vision]

    compute_s = memory_s = elementwise_s = 0.0
    seconds = {"layers": 0.0, "vision": 0.0, "head": 0.0}
    for part, c, times in counts:
        cs, ms, s, es = priced(c, times)
        compute_s, memory_s, elementwise_s = compute_s + cs, memory_s + ms, elementwise_s + es
        seconds[part] += s

    # ring all-reduce: each device sends 2 (d-1)/d of the message, then pays the latency once
    link_s = 0.0
    if devices > 1:
        for c in per_forward:
            link_s += iterations * (2 * (devices - 1) / devices * c.allreduce_bytes / hw.link_bandwidth
                                    + c.allreduces * hw.link_latency_s)
    overhead_s = hw.call_overhead_s + (iterations * hw.token_overhead_s if op == "decode" else 0.0)
    overhead_s += hw.layer_overhead_s * (iterations * model.layers + (model.vision_depth if vision else 0))
    layer_compute, layer_memory, _, _ = priced(layer, 1)
    total = sum(seconds.values()) + link_s + overhead_s
    return CallCost(
        flops=sum(c.flops * t for _, c, t in counts),
        weight_bytes=sum(c.weight_bytes * t for _, c, t in counts),
        kv_bytes=sum(c.kv_bytes * t for _, c, t in counts),
        act_bytes=sum(c.act_bytes * t for _, c, t in counts),
        allreduce_bytes=iterations * sum(c.allreduce_bytes for c in per_forward) if devices > 1 else 0.0,
        compute_s=compute_s,
        memory_s=memory_s,
        link_s=link_s,
        overhead_s=overhead_s,
        seconds=total,
        bound="compute" if layer_compute > layer_memory else "memory",
        iterations=iterations,
        parts={**seconds, "link": link_s, "overhead": overhead_s},
        elementwise_s=elementwise_s,
    )


def call_seconds(model: ModelSpec, hw: Hardware, devices: int, op: str, *, tokens: int, rows: int = 1,
                 cached: int = 0, patches: int = 0) -> float:
    """`call_cost(...).seconds`."""
    return call_cost(model, hw, devices, op, tokens=tokens, rows=rows, cached=cached, patches=patches).seconds


# ---- memory ------------------------------------------------------------------------------------


def weight_bytes_per_device(model: ModelSpec, devices: int) -> float:
    """Stored weights on each device under tensor parallelism (`splits`; the vision tower whole)."""
    m = model
    d_attn, d_mlp, d_vocab = splits(model, devices)
    mlp = sum(m.linear_bytes(i, o, quantized=not m.experts) for i, o in m.mlp_shapes) * max(m.experts, 1)
    router = m.linear_bytes(m.hidden, m.experts) if m.experts else 0.0  # whole on every device
    layer = (sum(m.linear_bytes(i, o, quantized=True) for i, o in m.attention_shapes) / d_attn
             + mlp / d_mlp + router)
    vocab = (1 if m.tied else 2) * m.linear_bytes(m.hidden, m.vocab) / d_vocab
    vision = (m.linear_bytes(m.patch_dim, m.vision_hidden)
              + m.vision_depth * sum(m.linear_bytes(i, o) for i, o in m.vision_block_shapes)
              + (1 + m.deepstack) * sum(m.linear_bytes(i, o) for i, o in m.merger_shapes))
    return m.layers * layer + vocab + vision


def kv_bytes_per_device(model: ModelSpec, devices: int, *, kv_tokens: int, rows: int = 1,
                        dtype_bytes: int = 2) -> float:
    """The KV cache of `rows` rows of `kv_tokens` tokens on each device (split with the KV heads)."""
    d_attn, _, _ = splits(model, devices)
    return rows * kv_tokens * model.layers * 2 * model.kv_heads * model.head_dim * dtype_bytes / d_attn


def memory_needed(model: ModelSpec, devices: int, *, kv_tokens: int, rows: int = 1, dtype_bytes: int = 2) -> float:
    """Bytes each device holds: its share of the weights plus its share of a KV cache of `rows` rows
    of `kv_tokens` tokens (`dtype_bytes` per element). XLA's workspace and activations are not
    counted: leave headroom."""
    if not isinstance(devices, int) or devices < 1:
        raise CostModelError(f"devices must be a positive integer, got {devices!r}")
    return (weight_bytes_per_device(model, devices)
            + kv_bytes_per_device(model, devices, kv_tokens=kv_tokens, rows=rows, dtype_bytes=dtype_bytes))


def check_fits(model: ModelSpec, hw: Hardware, devices: int, *, kv_tokens: int, rows: int = 1) -> None:
    """CostModelError when `memory_needed` exceeds one device's memory, saying how much it needs."""
    need = memory_needed(model, devices, kv_tokens=kv_tokens, rows=rows)
    if need > hw.memory:
        weights = weight_bytes_per_device(model, devices)
        fix = "use more devices" + (" or int4" if model.weight_bits != 4 else "")
        raise CostModelError(
            f"{model.label} needs {need / GB:.1f} GB per device on {devices} x {hw.name} ({hw.memory / GB:.1f} GB): "
            f"{fix} (weights {weights / GB:.1f} GB + KV cache {(need - weights) / GB:.1f} GB for {rows} x "
            f"{kv_tokens} tokens)")
