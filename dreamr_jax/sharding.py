"""Meshes, the split of devices between the draft and target roles, and how a model's arrays sit on
them: tensor parallelism of a role's weights, FSDP of a trained model's state, gathering a whole copy."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh


def split_devices(n_draft: int = 1, n_target: int = 1, devices=None):
    """Disjoint device lists for (draft, target); on a single device both roles share it.

    Raises when there are several devices but fewer than n_draft + n_target."""
    devices = list(devices if devices is not None else jax.devices())
    if n_draft < 1 or n_target < 1:
        raise ValueError("each role needs at least one device")
    if len(devices) == 1:
        return devices, devices
    if len(devices) < n_draft + n_target:
        raise ValueError(f"{len(devices)} devices cannot hold a {n_draft}-device draft and a {n_target}-device target")
    return devices[:n_draft], devices[n_draft : n_draft + n_target]


def role_mesh(devices, axis: str = "data") -> Mesh:
    """A 1-D mesh over a role's devices (classic Auto axes)."""
    return Mesh(np.array(list(devices)), (axis,), axis_types=(AxisType.Auto,))


# ---- tensor parallelism of one role's weights ----------------------------------------------------
#
# Megatron's split of a decoder layer, written as GSPMD shardings of the weights (Auto axes): the
# projections that widen the stream (q, k, v, gate, up) are split by output feature, the ones that
# narrow it back (o, down) by input feature, so XLA needs one all-reduce after each narrowing
# product. The vocabulary is split for the embedding and the output head; norms and the (small)
# vision tower are replicated. A weight whose split axis does not divide by the device count is
# replicated instead, so any model runs on any count. int4 layers split the same way: packed bytes
# and group scales by output feature, or by input feature when the groups divide evenly (a shard
# boundary must not fall inside a group).

TENSOR_AXIS = "model"
PARALLELISMS = ("tensor", "replicate")
_WIDEN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
_NARROW = ("o_proj", "down_proj")


def _names(keypath) -> tuple[str, ...]:
    out = []
    for k in keypath:
        name = getattr(k, "key", getattr(k, "name", getattr(k, "idx", None)))
        if name != "value":  # nnx.Variable's own field
            out.append(str(name))
    return tuple(out)


_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


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
    elif names[0] == "lm_head" and leaf == "kernel":
        axis = 1  # (hidden, vocab)
    elif owner in _WIDEN:
        # dense kernel (in, out); bias (out,); int4 qweight (out, in/2), scales / zeros (out, groups)
        axis = {"kernel": 1, "bias": 0, "qweight": 0, "scales": 0, "zeros": 0}.get(leaf)
    elif owner in _NARROW:
        # dense kernel (in, out); int4 qweight (out, in/2), scales / zeros (out, groups); bias stays whole
        axis = {"kernel": 0, "qweight": 1, "scales": 1, "zeros": 1}.get(leaf)
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
        if names[-1] in ("qweight", "scales", "zeros") and len(names) > 1 and names[-2] in _NARROW:
            group = [names[:-1] + (leaf,) for leaf in ("qweight", "scales", "zeros")]
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
    mesh = Mesh(np.array(devices), (TENSOR_AXIS,), axis_types=(AxisType.Auto,))
    replicated = NamedSharding(mesh, P())
    if parallelism == "replicate":
        return jax.device_put(state, replicated), replicated
    return jax.device_put(state, tensor_parallel_shardings(state, mesh, text_config)), replicated


# ---- FSDP of a trained model's weights and optimizer state ----------------------------------------

FSDP_MIN_ELEMENTS = 4096  # smaller arrays (norms, biases, counters) stay whole: splitting saves nothing


def fsdp_spec(shape: tuple[int, ...], n: int, axis: str = "data"):
    """ZeRO-3 / FSDP placement of one array over `n` devices of `axis`: its largest dimension that
    divides by n is split, anything small or indivisible stays whole. The spec depends only on the
    shape, so AdamW's moments land exactly where their weights do; XLA gathers a weight where a
    product needs it whole and reduce-scatters its gradient."""
    from jax.sharding import PartitionSpec as P

    if n == 1 or not shape or int(np.prod(shape)) < FSDP_MIN_ELEMENTS:
        return P()
    for i in sorted(range(len(shape)), key=lambda i: -shape[i]):
        if shape[i] % n == 0:
            return P(*([None] * i + [axis]))
    return P()


def distribute(tree, mesh, fsdp: bool = False):
    """Every array of `tree` (the same values on every process) placed over `mesh` from this
    process's copy: replicated, or split by `fsdp_spec` when `fsdp`. Built shard by
    shard on this process's devices: `jax.device_put` onto a mesh that spans processes and
    leaves out some local devices gives arrays whose shards cannot be read."""
    from jax.sharding import NamedSharding, PartitionSpec

    axis = mesh.axis_names[0]

    def put(x):
        spec = fsdp_spec(np.shape(x), mesh.shape[axis], axis) if fsdp else PartitionSpec()
        sharding = NamedSharding(mesh, spec)
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.sharding.is_equivalent_to(sharding, x.ndim):
                return x  # already there (e.g. optimizer state made from placed weights)
            raise ValueError(f"cannot place an array already spread as {x.sharding} as {spec}")
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree)


def gather_whole(model, mesh):
    """`model` with every array replicated over `mesh` (an all-gather of FSDP-split weights, run by
    every process together), so that `local_copy` can take one device's whole copy."""
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    graphdef, state = nnx.split(model)
    state = jax.jit(lambda s: s, out_shardings=NamedSharding(mesh, PartitionSpec()))(state)
    return nnx.merge(graphdef, state)


def local_copy(model, device=None):
    """The model on one of this process's devices (default: its first) of its replicated
    weights: that device's shard of every array, no copy made."""
    from flax import nnx

    graphdef, state = nnx.split(model)

    def shard(a):
        if device is None:
            return a.addressable_data(0)
        return next(s.data for s in a.addressable_shards if s.device == device)

    return nnx.merge(graphdef, jax.tree.map(shard, state))
