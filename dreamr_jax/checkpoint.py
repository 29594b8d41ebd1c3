"""Orbax checkpoints of a training run: model, optimizer, data iterator, step and extras.

One `CheckpointManager` item per part: each named NNX object (e.g. "model" and "optimizer",
restored onto the live objects' shardings), "data" (the grain iterator's position, via grain's own orbax
handler) and "meta" (JSON: the step plus what the run adds, `training.scaffold.Run.save`: its
seed, process count and settings). Orbax writes each step to a temporary folder and renames it
when complete, so a run killed mid-save leaves the previous checkpoint intact; `latest_step`
names the newest complete one. The training scaffold (`training.scaffold.Run`) is its user.
"""

from __future__ import annotations

import json
import os

import jax
import orbax.checkpoint as ocp
from flax import nnx


class TrainCheckpointer:
    """Checkpoints of a run's NNX objects, passed by name (SFT: model + optimizer; SAPO:
    policy + optimizer + reference), with the grain iterator's position and a JSON meta item."""

    def __init__(self, directory: str, *, max_to_keep: int = 2, async_save: bool = False):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, *, data_iterator, meta: dict, **modules) -> None:
        import grain

        args = ocp.args.Composite(
            **{name: ocp.args.StandardSave(nnx.state(module)) for name, module in modules.items()},
            data=grain.checkpoint.CheckpointSave(data_iterator),
            meta=ocp.args.JsonSave(dict(meta, step=int(step))),
        )
        self.manager.save(int(step), args=args, force=True)
        self.manager.wait_until_finished()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, step: int, *, data_iterator, **modules) -> dict:
        """Load checkpoint `step` into the live objects (keeping their shardings) and the
        iterator; return meta."""
        import grain

        def abstract(module):
            return jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.state(module))

        for name, module in modules.items():
            self._check_layout(step, name, abstract(module))
        args = ocp.args.Composite(
            **{name: ocp.args.StandardRestore(abstract(module)) for name, module in modules.items()},
            data=grain.checkpoint.CheckpointRestore(data_iterator),
            meta=ocp.args.JsonRestore(),
        )
        restored = self.manager.restore(int(step), args=args)
        for name, module in modules.items():
            nnx.update(module, restored[name])
        return dict(restored["meta"])

    def _check_layout(self, step: int, name: str, wanted) -> None:
        """Raise CheckpointLayoutError naming the paths when item `name` of checkpoint `step` holds
        other parameters or shapes than the live object (orbax would stop at the first, in its
        own terms). The stored tree is read from the item's metadata, not its arrays."""
        from etils import epath

        folder = epath.Path(self.directory) / str(step) / name
        if not folder.exists():
            return  # orbax names a missing item itself
        stored = ocp.PyTreeCheckpointHandler().metadata(folder)
        tree = getattr(stored, "tree", stored)
        have = {"/".join(map(str, k)): getattr(v, "shape", None) for k, v in ocp.tree.to_flat_dict(tree).items()}
        want = {"/".join(map(str, k)): v.shape for k, v in ocp.tree.to_flat_dict(wanted).items()}
        problems = [f"missing {k}" for k in sorted(want.keys() - have.keys())]
        problems += [f"unexpected {k}" for k in sorted(have.keys() - want.keys())]
        problems += [f"{k}: stored shape {list(have[k])}, the model's {list(want[k])}"
                     for k in sorted(want.keys() & have.keys()) if have[k] is not None and tuple(have[k]) != want[k]]
        if problems:
            hint = ("; it was written before dense weights became `weight` (out, in) (issue 19): "
                    "start a new output_dir or convert it" if any(k.endswith("kernel/value") for k in have) else "")
            raise CheckpointLayoutError(
                f"checkpoint {os.path.join(self.directory, str(step))} item '{name}' does not match the "
                f"model ({len(problems)} differences{hint}): " + "; ".join(problems[:6])
                + (" ..." if len(problems) > 6 else ""))

    def close(self) -> None:
        self.manager.close()


class CheckpointLayoutError(ValueError):
    """A training checkpoint whose parameters (paths or shapes) are not the live model's."""


def trim_metrics(path: str, last_step: int) -> None:
    """On resume, drop metric lines a stopped run wrote after its last checkpoint (process 0
    writes the file; the rewrite is atomic)."""
    if jax.process_index() != 0 or not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line)["step"] <= last_step]
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)
