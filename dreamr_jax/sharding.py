"""Meshes and the split of devices between the draft and target roles."""

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
