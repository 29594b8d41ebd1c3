"""Tensor parallelism of a Qwen-VL model's weights: which array of which layer splits along which
axis over a role's devices, and placing a role's weights by those rules. The meshes, their axis
names and the split of devices between roles are generic (`dreamr_jax.sharding`).

Megatron's split of a decoder layer, written as GSPMD shardings of the weights (Auto axes): the
projections that widen the stream (q, k, v, gate, up) are split by output feature, the ones that
narrow it back (o, down) by input feature, so XLA needs one all-reduce after each narrowing
product. The vocabulary is split for the embedding and the output head; norms and the (small)
vision tower are replicated. A weight whose split axis does not divide by the device count is
replicated instead, so any model runs on any count. int4 layers split the same way: packed bytes
and group scales by output feature, or by input feature when the groups divide evenly (a shard
boundary must not fall inside a group)."""

from __future__ import annotations

import contextlib

import jax
import numpy as np
from flax import nnx

from ...sharding import PARALLELISMS, TENSOR_AXIS, role_mesh

_WIDEN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
_NARROW = ("o_proj", "down_proj")
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_INT4 = ("qweight", "scales", "zeros")  # the arrays of one int4 layer


def _names(keypath) -> tuple[str, ...]:
    out = []
    for k in keypath:
        name = getattr(k, "key", getattr(k, "name", getattr(k, "idx", None)))
        if name != "value":  # nnx.Variable's own field
            out.append(str(name))
    return tuple(out)


def tensor_parallel_spec(names: tuple[str, ...], shape: tuple[int, ...], n: int, split_attention: bool = True):
    """The PartitionSpec of one weight of a Qwen-VL model (path `names`) over `n` devices.
    `split_attention=False` keeps q / k / v / o whole (when the heads do not divide by n)."""
    from jax.sharding import PartitionSpec as P

    if n == 1 or not names or names[0] == "visual":
        return P()
    leaf, owner = names[-1], (names[-2] if len(names) > 1 else "")
    if owner in _ATTENTION and not split_attention:
        return P()
    axis = None  # which array axis to split
    if names[0] == "embed_tokens":
        axis = 0  # (vocab, hidden)
    elif names[0] == "lm_head" and leaf == "weight":
        axis = 0  # (vocab, hidden)
    elif owner in _WIDEN:
        # dense weight (out, in); bias (out,); int4 qweight (out, in/2), scales / zeros (out, groups)
        axis = {"weight": 0, "bias": 0, "qweight": 0, "scales": 0, "zeros": 0}.get(leaf)
    elif owner in _NARROW:
        # dense weight (out, in); int4 qweight (out, in/2), scales / zeros (out, groups); bias stays whole
        axis = {"weight": 1, "qweight": 1, "scales": 1, "zeros": 1}.get(leaf)
    elif owner == "experts":
        # MoE experts (E, 2I, H) / (E, H, I): expert parallelism, whole experts per device
        axis = 0 if leaf in ("gate_up_proj", "down_proj") else None
    if axis is None or len(shape) <= axis or shape[axis] % n:
        return P()
    return P(*([None] * axis + [TENSOR_AXIS]))


def tensor_parallel_shardings(state, mesh, text_config=None):
    """A pytree of `NamedSharding`s matching `state` (an nnx.State of a Qwen-VL model) over `mesh`'s
    TENSOR_AXIS.

    Attention splits by whole heads: with `text_config` given, q / k / v / o split only when both
    the query and the KV head counts divide by the device count (a split inside a head makes XLA
    gather activations around the q / k norms and the GQA grouping); otherwise the attention
    block stays whole on every device and only the MLP and the vocabulary split. A row-split int4
    layer's packed bytes and group scales must split at the same input feature for each device's
    product to need nothing from the others: when only one of them divides, both stay whole."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    n = mesh.shape[TENSOR_AXIS]
    split_attention = text_config is None or (text_config.num_attention_heads % n == 0
                                              and text_config.num_key_value_heads % n == 0)
    leaves = jax.tree_util.tree_leaves_with_path(state)
    specs = {_names(kp): tensor_parallel_spec(_names(kp), np.shape(x), n, split_attention) for kp, x in leaves}
    for names, spec in list(specs.items()):
        if names[-1] in _INT4 and len(names) > 1 and names[-2] in _NARROW:
            group = [names[:-1] + (leaf,) for leaf in _INT4]
            if any(specs.get(g) == P() for g in group):
                for g in group:
                    specs[g] = P()
    return jax.tree_util.tree_map_with_path(lambda kp, x: NamedSharding(mesh, specs[_names(kp)]), state)


def place_role_state(state, devices, parallelism: str = "tensor", text_config=None):
    """Put a role's weights on its devices: (placed state, sharding for its inputs). One device:
    everything there. Several: split by `tensor_parallel_shardings` ("tensor"; `text_config` for
    the head counts) or copied whole to each ("replicate")."""
    from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

    if parallelism not in PARALLELISMS:
        raise ValueError(f"parallelism '{parallelism}' is not one of {PARALLELISMS}")
    devices = list(devices)
    if len(devices) == 1:
        sharding = SingleDeviceSharding(devices[0])
        return jax.device_put(state, sharding), sharding
    mesh = role_mesh(devices, TENSOR_AXIS)
    replicated = NamedSharding(mesh, P())
    if parallelism == "replicate":
        return jax.device_put(state, replicated), replicated
    return jax.device_put(state, tensor_parallel_shardings(state, mesh, text_config)), replicated


@contextlib.contextmanager
def expert_parallel_split(model, devices, parallelism: str = "tensor"):
    """While a role splits `model` (nnx.split) for its devices: the MoE experts know the mesh
    they are split over (`text.Experts.expert_mesh`, part of the split graph), so each device
    routes only its own experts' tokens. Only when `tensor_parallel_spec` splits them: several
    devices, "tensor" parallelism, the expert count divisible. Restored afterwards, so the model
    can be split for other roles too."""
    from .text import Experts

    devices = list(devices)
    experts = [m for _, m in nnx.iter_graph(model) if isinstance(m, Experts)]
    n = len(devices)
    split = n > 1 and parallelism == "tensor" and all(e.gate_up_proj.shape[0] % n == 0 for e in experts)
    mesh = (role_mesh(devices, TENSOR_AXIS), TENSOR_AXIS) if split else None
    for e in experts:
        e.expert_mesh = mesh
    try:
        yield
    finally:
        for e in experts:
            e.expert_mesh = None
