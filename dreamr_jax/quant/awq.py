"""AWQ's activation-aware scaling (Lin et al. 2024; AutoAWQ's `auto_scale`), before int4 rounding.

A few input channels of each projection see much larger activations than the rest; rounding
their weights costs the most. AWQ multiplies those weight columns by s > 1 before quantizing and
divides the op that produces the input by s, which leaves the float model's output unchanged:

    y = W x = (W diag(s)) (x / s)

Per decoder layer, four groups share one s, each with the op whose output is their input:

    input_layernorm          -> q_proj, k_proj, v_proj
    v_proj (rows)            -> o_proj         (only when v's outputs are o's inputs: no GQA)
    post_attention_layernorm -> gate_proj, up_proj
    up_proj (rows)           -> down_proj

For each group, s = mean|x|^r / (mean|W~|^(1 - r) + 1e-4), normalised by sqrt(max s * min s),
where |W~| is |W| over its group maximum (AutoAWQ's "duo scaling"), for r on a grid of
`n_grid` points in [0, 1); the s whose round-to-nearest quantized projections give the smallest
mean squared error of the group's outputs on calibration activations wins.

Differences from AutoAWQ, on purpose:
- the loss is over the group's linear outputs, not the whole attention / MLP block's output:
  the search then needs no block forward of our own beside the model's (the scales are chosen
  the same way; only the loss's weighting of output errors differs);
- s = 1 (plain round to nearest) is a candidate too, so the calibration error is never worse
  than round to nearest's;
- AutoAWQ's second search (clipping the weight range, `auto_clip`) is not done.

Activations come from one eager forward of the dense model per calibration text (text only,
as AutoAWQ calibrates on pile text): the per-channel mean |x| over every token and a random
sample of at most `max_rows` token rows per projection for the loss.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from .formats import dequantize, quantize_rtn

# (op producing the input, projections reading it); names under text.layers.{i}.
GROUPS = (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
          ("self_attn.v_proj", ("self_attn.o_proj",)),
          ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
          ("mlp.up_proj", ("mlp.down_proj",)))


def fake_quantize(weight_out_in: np.ndarray, group_size: int) -> np.ndarray:
    """Round-to-nearest int4 per group of input features, dequantized: what the int4 model computes with."""
    q, z, s = quantize_rtn(weight_out_in, group_size)  # (in, out), (groups, out), (groups, out)
    return dequantize(q.T, z.T, s.T)


@dataclasses.dataclass
class ScaleSearch:
    scale: np.ndarray  # (in,) float32: multiply the projections' columns, divide the producer
    ratio: float | None  # the winning r; None when plain round to nearest (s = 1) won
    loss: float  # mean squared output error with `scale`
    rtn_loss: float  # the same with s = 1


def search_scale(x_rows: np.ndarray, x_abs_mean: np.ndarray, weights: Sequence[np.ndarray], group_size: int,
                 n_grid: int = 20) -> ScaleSearch:
    """The best per-input-channel scale of one group. x_rows (N, in): sampled activations;
    x_abs_mean (in,): mean |x| over all calibration tokens; weights: the group's (out, in) weights."""
    x = np.asarray(x_rows, np.float32)
    w = np.concatenate([np.asarray(a, np.float32) for a in weights], axis=0)
    n_out, n_in = w.shape
    reference = x @ w.T

    def loss(scale):
        approx = (x / scale) @ fake_quantize(w * scale, group_size).T
        return float(np.mean((approx - reference) ** 2))

    grouped = np.abs(w).reshape(n_out, n_in // group_size, group_size)
    w_mean = (grouped / np.maximum(grouped.max(-1, keepdims=True), 1e-12)).reshape(n_out, n_in).mean(0)
    x_mean = np.asarray(x_abs_mean, np.float32)
    ones = np.ones(n_in, np.float32)
    rtn = loss(ones)
    best = ScaleSearch(ones, None, rtn, rtn)
    for i in range(n_grid):
        r = i / n_grid
        scale = np.maximum(x_mean ** r / (w_mean ** (1 - r) + 1e-4), 1e-4)
        scale = (scale / np.sqrt(scale.max() * scale.min())).astype(np.float32)
        value = loss(scale)
        if value < best.loss:
            best = ScaleSearch(scale, r, value, rtn)
    return best


class _Recorder:
    """Collects each projection's input while the dense model runs eagerly: per-channel sums of
    |x| over every token, and a uniform random sample of at most `max_rows` token rows (each row
    gets a random key; the rows with the smallest keys so far are kept)."""

    def __init__(self, max_rows: int, seed: int):
        self.max_rows, self.rng = max_rows, np.random.default_rng(seed)
        self.abs_sum, self.count, self.rows, self.keys = {}, {}, {}, {}

    def add(self, name: str, x) -> None:
        x = np.asarray(x, np.float32).reshape(-1, x.shape[-1])
        self.abs_sum[name] = self.abs_sum.get(name, 0.0) + np.abs(x).sum(0)
        self.count[name] = self.count.get(name, 0) + len(x)
        rows = np.concatenate([self.rows[name], x]) if name in self.rows else x
        keys = (np.concatenate([self.keys[name], self.rng.random(len(x))]) if name in self.keys
                else self.rng.random(len(x)))
        keep = np.argsort(keys, kind="stable")[: self.max_rows]
        self.rows[name], self.keys[name] = rows[keep], keys[keep]


# The projections whose inputs the search reads: the first of each group (a group shares its input).
RECORDED = tuple(readers[0] for _, readers in GROUPS)


class _Recording(nnx.Module):
    """A projection that hands its input to `record` before computing: `capture_activations` puts
    it in place of the projection in a private copy of the model."""

    def __init__(self, inner, record):
        self.inner = inner
        self.record = record

    def __call__(self, x):
        self.record(x)
        return self.inner(x)


def capture_activations(model, token_rows: Sequence[Sequence[int]], max_rows: int = 512, seed: int = 0) -> dict:
    """{"layers.{i}.{projection}": (sampled rows (n, in), mean |x| (in,))} for every projection a
    group reads (q_proj for q/k/v, gate_proj for gate/up, o_proj, down_proj), from the dense model."""
    recorder = _Recorder(max_rows, seed)
    # Recording happens in a clone (new module objects over the same weight buffers: nothing is
    # copied) whose projections are wrapped: `model`, the projection classes and every other model
    # (another thread's included) are left as they are.
    recording = nnx.clone(model)
    for i, layer in enumerate(recording.layers):
        for part in RECORDED:
            block, name = part.split(".")
            owner = getattr(layer, block)
            record = functools.partial(recorder.add, f"layers.{i}.{part}")
            setattr(owner, name, _Recording(getattr(owner, name), record))
    for row in token_rows:  # eager calls: the recorder sees concrete activations
        ids = jnp.asarray([list(row)], jnp.int32)
        positions = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), (3, 1, ids.shape[1]))
        recording.forward(ids, jnp.ones_like(ids, bool), positions)
    return {name: (recorder.rows[name], recorder.abs_sum[name] / recorder.count[name])
            for name in recorder.rows}


def awq_scales(model, token_rows: Sequence[Sequence[int]], group_size: int, *, n_grid: int = 20,
               max_rows: int = 512, seed: int = 0, log=None) -> tuple[dict, list]:
    """(plan, stats). plan: {canonical checkpoint key: [(axis, factor)]} that folds AWQ's scales
    into the dense weights (`scale_weights` applies them): projections' columns (axis 1) times s,
    the producing norm (axis 0) or linear rows (axis 0, and its bias) divided by s. stats: per
    group the chosen ratio and the calibration losses with and without s."""
    acts = capture_activations(model, token_rows, max_rows, seed)
    cfg = model.cfg.text
    plan: dict[str, list] = {}
    stats: list[dict] = []
    for i, layer in enumerate(model.layers):
        for producer, readers in GROUPS:
            if producer == "self_attn.v_proj" and cfg.num_key_value_heads != cfg.num_attention_heads:
                continue  # v's outputs are not o's inputs one to one under grouped-query attention
            x_rows, x_mean = acts[f"layers.{i}.{readers[0]}"]
            weights = [np.asarray(_module(layer, r).weight[...], np.float32) for r in readers]  # (out, in)
            found = search_scale(x_rows, x_mean, weights, group_size, n_grid)
            stats.append({"layer": i, "group": producer, "ratio": found.ratio, "loss": found.loss,
                                      "rtn_loss": found.rtn_loss})
            if found.ratio is None:
                continue
            base = f"text.layers.{i}."
            for r in readers:
                plan.setdefault(f"{base}{r}.weight", []).append((1, found.scale))
            plan.setdefault(f"{base}{producer}.weight", []).append((0, 1.0 / found.scale))
            if producer.endswith("_proj"):
                plan.setdefault(f"{base}{producer}.bias", []).append((0, 1.0 / found.scale))
        if log:
            log(f"AWQ scales: layer {i + 1}/{len(model.layers)}")
    return plan, stats


def _module(layer, dotted: str):
    block, name = dotted.split(".")
    return getattr(getattr(layer, block), name)


def scale_weights(array: np.ndarray, factors: Sequence[tuple[int, np.ndarray]]) -> np.ndarray:
    """A checkpoint tensor (HF layout: linear weights (out, in)) with AWQ factors applied, in float32."""
    out = np.asarray(array, np.float32)
    for axis, factor in factors:
        out = out * (factor[None, :] if axis == 1 else factor.reshape((-1,) + (1,) * (out.ndim - 1)))
    return out
