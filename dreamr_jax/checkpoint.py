"""Orbax checkpoints of a training run: model, optimizer, data iterator, step and extras.

One `CheckpointManager` item per part: "model" and "optimizer" (NNX states, restored onto the
live objects' shardings), "data" (the grain iterator's position, via grain's own orbax
handler) and "meta" (JSON: the step and the run's seed). Orbax writes each step to a
temporary folder and renames it when complete, so a run killed mid-save leaves the previous
checkpoint intact; `latest_step` names the newest complete one.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp
from flax import nnx


class TrainCheckpointer:
    def __init__(self, directory: str, *, max_to_keep: int = 2, async_save: bool = False):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, *, model, optimizer, data_iterator, meta: dict) -> None:
        import grain

        args = ocp.args.Composite(
            model=ocp.args.StandardSave(nnx.state(model)),
            optimizer=ocp.args.StandardSave(nnx.state(optimizer)),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            meta=ocp.args.JsonSave(dict(meta, step=int(step))),
        )
        self.manager.save(int(step), args=args, force=True)
        self.manager.wait_until_finished()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, step: int, *, model, optimizer, data_iterator) -> dict:
        """Load checkpoint `step` into the live model, optimizer and iterator; return meta."""
        import grain

        def abstract(tree):
            return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)

        args = ocp.args.Composite(
            model=ocp.args.StandardRestore(abstract(nnx.state(model))),
            optimizer=ocp.args.StandardRestore(abstract(nnx.state(optimizer))),
            data=grain.checkpoint.CheckpointRestore(data_iterator),
            meta=ocp.args.JsonRestore(),
        )
        restored = self.manager.restore(int(step), args=args)
        nnx.update(model, restored["model"])
        nnx.update(optimizer, restored["optimizer"])
        return dict(restored["meta"])

    def close(self) -> None:
        self.manager.close()
