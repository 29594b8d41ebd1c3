"""A training checkpoint whose parameters are not the live model's is refused by name before
orbax restores anything: e.g. one written before dense weights became `weight` (out, in)."""

from __future__ import annotations

import grain
import jax.numpy as jnp
import pytest
from flax import nnx

from dreamr_jax.checkpoint import CheckpointLayoutError, TrainCheckpointer


class _OldLinear(nnx.Module):  # the layout before issue 19: `kernel` (in, out)
    def __init__(self):
        self.kernel = nnx.Param(jnp.arange(6.0).reshape(2, 3))


class _NewLinear(nnx.Module):
    def __init__(self, shape=(3, 2)):
        self.weight = nnx.Param(jnp.zeros(shape))


def _save(folder, module):
    data = grain.MapDataset.range(4).to_iter_dataset()
    checkpointer = TrainCheckpointer(str(folder))
    checkpointer.save(1, data_iterator=iter(data), meta={"seed": 0}, model=module)
    checkpointer.close()
    return data


def test_old_layout_is_named(tmp_path):
    data = _save(tmp_path, _OldLinear())
    checkpointer = TrainCheckpointer(str(tmp_path))
    named = r"item 'model'.*issue 19.*missing weight/value; unexpected kernel/value"
    with pytest.raises(CheckpointLayoutError, match=named):
        checkpointer.restore(1, data_iterator=iter(data), model=_NewLinear())
    checkpointer.close()


def test_shape_change_is_named_and_a_match_restores(tmp_path):
    data = _save(tmp_path, _NewLinear())
    checkpointer = TrainCheckpointer(str(tmp_path))
    with pytest.raises(CheckpointLayoutError, match=r"weight/value: stored shape \[3, 2\], the model's \[2, 3\]"):
        checkpointer.restore(1, data_iterator=iter(data), model=_NewLinear((2, 3)))
    live = _NewLinear()
    live.weight.set_value(jnp.ones((3, 2)))
    assert checkpointer.restore(1, data_iterator=iter(data), model=live)["seed"] == 0
    assert float(live.weight[...].sum()) == 0.0  # the stored zeros
    checkpointer.close()
