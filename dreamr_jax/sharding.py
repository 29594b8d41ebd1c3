"""Meshes, the split of devices between the draft and target roles, and how a trained model's
arrays sit on them: FSDP of its state, gathering a whole copy. Generic over models: a model
family's own split of its weights (tensor parallelism) lives beside the family
(`dreamr_jax.models.qwen_vl.sharding`) and builds its mesh here."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

# The mesh axis names, one each: data parallelism / FSDP over a training run's or a role's
# devices, and tensor parallelism of a role's weights.
DATA_AXIS = "data"
TENSOR_AXIS = "model"
# How a role with several devices holds its weights: split by its family's tensor-parallel rules,
# or a whole copy on each device.
PARALLELISMS = ("tensor", "replicate")


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


def role_mesh(devices, axis: str = DATA_AXIS) -> Mesh:
    """A 1-D mesh over `devices` in their given order, with classic Auto axes (GSPMD places what
    the shardings leave open): a role's devices, or a training run's data mesh. The one mesh
    builder, so every mesh of a run agrees on axis types and device order. The order is kept
    (not `jax.make_mesh`'s topology order on TPU): SAPO places process p's rows as the p-th block
    of the mesh, and a role may hold any subset of a host's chips."""
    return Mesh(np.array(list(devices)), (axis,), axis_types=(AxisType.Auto,))


# ---- FSDP of a trained model's weights and optimizer state ----------------------------------------

FSDP_MIN_ELEMENTS = 4096  # smaller arrays (norms, biases, counters) stay whole: splitting saves nothing


def fsdp_spec(shape: tuple[int, ...], n: int, axis: str = DATA_AXIS):
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
