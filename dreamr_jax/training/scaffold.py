"""What every training run does around its step: the scaffold SFT (`sft`) and SAPO (`sapo_trainer`)
share, so each of them holds only its data and its step.

- the optimizer: AdamW after global-norm clipping (`adamw`), created on the mesh (`optimizer_on`);
- meshes and batches: a 1-D "data" mesh (`data_mesh`), a host batch of this process's rows made
  a global array sharded by rows (`shard_batch`);
- resuming: the settings a checkpoint was written with are compared to this run's before anything
  loads (`resume_step`, `check_resume`), its array shapes to the live model's (`check_shapes`);
- the run itself (`Run`): orbax checkpoints of the named NNX objects, the grain iterator, the step
  and a JSON meta item (`dreamr_jax.checkpoint`), exact resume, `metrics.jsonl` (and TensorBoard),
  a tqdm bar, a time limit every process agrees on, and the export of the trained model as a
  Hugging Face checkpoint (`Run.export`);
- multi-process helpers (`allgather`, `agreed`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Callable

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from ..checkpoint import TrainCheckpointer, trim_metrics
from ..config import ConfigError
from ..sharding import DATA_AXIS, distribute, gather_whole, local_copy, role_mesh

logger = logging.getLogger(__name__)


# ---- resuming: the settings and shapes a checkpoint was written with ----------------------------

# Settings a resumed run may change without allow_changed_settings: where the run is, how long it
# goes on, how often it logs and saves, and how the work is laid out over devices and chunks
# (none of them changes what a step computes beyond rounding). Raising `steps` is how a finished
# run is continued (SFT's cosine schedule then stretches to the new end).
RESUMABLE_CHANGES = frozenset({
    "output_dir", "steps", "time_limit_s", "log_every", "checkpoint_every", "keep_checkpoints", "data_workers",
    "export_dtype", "tensorboard", "allow_changed_settings", "sharding", "draft_sharding", "draft_devices",
    "target_devices", "target_parallelism", "micro_batches", "logprob_chunk", "check_rows"})


def settings_of(cfg) -> dict:
    """A config dataclass as {dotted key: JSON value} (nested dataclasses flattened; tuples as
    lists, as a checkpoint's JSON holds them)."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.update({f"{f.name}.{k}": v for k, v in settings_of(value).items()})
        else:
            out[f.name] = json.loads(json.dumps(value))
    return out


def changed_settings(stored: dict, current: dict) -> list[str]:
    """'key: old -> new' for each setting (of those both know, outside RESUMABLE_CHANGES) that differs;
    a mapping setting (e.g. `model`) is compared key by key."""
    changes = []
    for key in sorted(set(stored) & set(current)):
        old, new = stored[key], current[key]
        if key.split(".")[0] in RESUMABLE_CHANGES or old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            for sub in sorted(set(old) | set(new)):
                if old.get(sub, ...) != new.get(sub, ...):
                    changes.append(f"{key}.{sub}: {_shown(old.get(sub, ...))} -> {_shown(new.get(sub, ...))}")
        else:
            changes.append(f"{key}: {_shown(old)} -> {_shown(new)}")
    return changes


def moved_settings(stored: dict, cls) -> dict:
    """Settings a checkpoint stored, with the keys `cls.MOVED_KEYS` moved since renamed to where
    they live now: the old key held the value the run used (the new place's old value was unused),
    so a run checkpointed before the move resumes with the same config."""
    out = dict(stored)
    for old, (new, _) in getattr(cls, "MOVED_KEYS", {}).items():
        if old in out:
            out[new] = out.pop(old)
    return out


def _shown(value) -> str:
    return "(not set)" if value is ... else json.dumps(value)


def check_resume(ckpt, step: int, cfg) -> dict:
    """Before a run resumes from checkpoint `step`: refuse (ConfigError naming each changed key
    with its old and new value) when its settings differ from those the checkpoint was written
    with, unless cfg.allow_changed_settings (then a warning), and refuse another process count
    (each process's data iterator is stored on its own). Returns the checkpoint's meta (read
    alone, before any array is restored). A checkpoint written before settings were stored passes."""
    import orbax.checkpoint as ocp

    meta = dict(ckpt.manager.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
    written_by = meta.get("process_count", jax.process_count())
    if written_by != jax.process_count():
        raise ConfigError(f"the checkpoint at step {step} was written by {written_by} processes; "
                          f"resume with as many (the data iterator is per process)")
    stored = meta.get("settings")
    if stored is None:
        return meta
    changes = changed_settings(moved_settings(stored, type(cfg)), settings_of(cfg))
    if changes and not cfg.allow_changed_settings:
        raise ConfigError(
            f"{cfg.output_dir}: the checkpoint at step {step} was written with other settings: {'; '.join(changes)}. "
            "Resume with the settings it was trained with, use a new output_dir, or set allow_changed_settings=true "
            "to go on with the new ones")
    if changes:
        logger.warning("resuming from step %d with changed settings (allow_changed_settings): %s", step,
                       "; ".join(changes))
    return meta


def _checkpointer(cfg) -> TrainCheckpointer:
    return TrainCheckpointer(os.path.join(cfg.output_dir, "checkpoints"), max_to_keep=cfg.keep_checkpoints)


def resume_step(cfg) -> int | None:
    """The step of the latest checkpoint in cfg.output_dir (None: a fresh run), once the checks a
    resume must pass before anything loads have passed: not past cfg.steps, the same settings
    (`check_resume`)."""
    ckpt = _checkpointer(cfg)
    try:
        latest = ckpt.latest_step()
        if latest is not None:
            if latest > cfg.steps:
                raise ConfigError(f"{cfg.output_dir} holds a checkpoint at step {latest}, past steps={cfg.steps}; "
                                  "raise steps or use a new output_dir")
            check_resume(ckpt, latest, cfg)
        return latest
    finally:
        ckpt.close()


def _shape_table(tree) -> dict:
    """{'a/b/c': shape} of a state tree's arrays (live arrays or orbax metadata)."""
    table = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if hasattr(leaf, "shape"):
            names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
            names = names[:-1] if names and names[-1] == "value" else names
            table["/".join(names)] = tuple(leaf.shape)
    return table


def check_shapes(ckpt, step: int, where: str, **modules) -> None:
    """One ConfigError naming the arrays whose shapes differ between checkpoint `step` and the
    live objects (e.g. a model of another size), instead of the restore's pile of tracebacks."""
    import orbax.checkpoint as ocp
    from etils import epath

    problems = []
    for name, module in modules.items():
        folder = os.path.join(ckpt.directory, str(int(step)), name)
        if not os.path.isdir(folder):
            continue
        stored = _shape_table(ocp.StandardCheckpointHandler().metadata(epath.Path(folder)).tree)
        live = _shape_table(nnx.state(module))
        for path in sorted(set(stored) | set(live)):
            if stored.get(path) != live.get(path):
                old, new = stored.get(path, "absent"), live.get(path, "absent")
                problems.append(f"{name}/{path}: checkpoint {old}, this run {new}")
    if problems:
        shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise ConfigError(f"{where}: the checkpoint at step {step} holds arrays of other shapes than this run's "
                          f"model ({len(problems)} differ: {shown}). Resume with the model it was trained with, or "
                          "use a new output_dir")


# ---- the optimizer ------------------------------------------------------------------------------


def adamw(schedule: Callable, *, clip_norm: float, weight_decay: float, b1: float = 0.9, b2: float = 0.999,
          updates_per_step: int = 1) -> optax.GradientTransformation:
    """AdamW after global-norm clipping, its learning rate `schedule(training step)`. optax counts
    updates: a training step of `updates_per_step` updates (SAPO's grpo_iterations) makes all of
    them at that step's rate."""
    if updates_per_step == 1:
        rate = schedule
    else:
        def rate(count):
            return schedule(count // updates_per_step)
    return optax.chain(optax.clip_by_global_norm(clip_norm),
                       optax.adamw(rate, b1=b1, b2=b2, weight_decay=weight_decay))


def place(module, mesh, fsdp: bool = False) -> None:
    """Every array of an NNX object over `mesh`: replicated, or split when `fsdp` (`sharding.distribute`)."""
    nnx.update(module, distribute(nnx.state(module), mesh, fsdp))


def optimizer_on(model, tx: optax.GradientTransformation, mesh, fsdp: bool = False) -> nnx.Optimizer:
    """`tx` over `model`'s parameters, its state placed like the model's."""
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    # The optimizer's counters start on the default device (its moments, made from the placed
    # weights, are on the mesh already): placed like a step's outputs will be, or the second step
    # recompiles for the changed input shardings.
    place(optimizer, mesh, fsdp)
    return optimizer


# ---- meshes and batches -------------------------------------------------------------------------


def data_mesh(num_devices: int | None = None):
    """A 1-D mesh over the data axis (`sharding.DATA_AXIS`) on the first num_devices devices (all by default)."""
    devices = jax.devices()[: num_devices or len(jax.devices())]
    return role_mesh(devices)


def _batch_spec(path, leaf) -> P:
    name = path[-1].key if hasattr(path[-1], "key") else str(path[-1])
    if name == "positions":  # (3, B, S)
        return P(None, DATA_AXIS)
    return P(DATA_AXIS) if leaf.ndim else P()


def shard_batch(batch: dict, mesh) -> dict:
    """Host batch (this process's rows) -> global arrays sharded over the mesh's data axis."""
    def put(path, leaf):
        return jax.make_array_from_process_local_data(NamedSharding(mesh, _batch_spec(path, leaf)), np.asarray(leaf))
    return jax.tree_util.tree_map_with_path(put, batch)


# ---- several processes --------------------------------------------------------------------------


def allgather(values: np.ndarray) -> np.ndarray:
    """(process_count, ...) stack of every process's `values` (just [values] on one process).
    Across processes the values travel as 32-bit JAX arrays."""
    if jax.process_count() == 1:
        return np.asarray(values)[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(values)))


def agreed(flag: bool) -> bool:
    """Process 0's value of `flag` on every process (a no-op on one host)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag)))


# ---- export -------------------------------------------------------------------------------------

PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.json", "preprocessor_config.json",
                   "special_tokens_map.json")


def copy_processor_files(src: str, dst: str) -> None:
    """The tokenizer / processor files of folder `src` (those it has) into `dst`, so that an
    exported checkpoint loads with `load_processor` on its own."""
    import shutil

    os.makedirs(dst, exist_ok=True)
    for name in PROCESSOR_FILES:
        if os.path.exists(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), os.path.join(dst, name))


# ---- the run ------------------------------------------------------------------------------------


@dataclasses.dataclass
class LoopEnd:
    """How `Run.loop` ended: the step reached, the metric rows of this call, the last of them,
    and whether `stop_after` ended it (a job killed right after its checkpoint: no export)."""

    step: int
    history: list
    last: dict
    stopped: bool


class Run:
    """One training run in `cfg.output_dir`: checkpoints/, metrics.jsonl, tensorboard/ and hf/.

    `cfg` is a trainer's config: it has output_dir, steps, seed, log_every, checkpoint_every,
    keep_checkpoints, export_dtype and allow_changed_settings. Made before anything loads (it
    refuses a resume past `steps`, with other settings or another process count); then, as a
    context manager around the training, `resume` restores the newest checkpoint into the live
    objects (and names them as what each checkpoint saves), `loop` runs the steps, and after it
    `export` writes the trained model.
    """

    def __init__(self, cfg, name: str, *, tensorboard: bool = False):
        self.cfg, self.name, self.tensorboard = cfg, name, tensorboard
        os.makedirs(cfg.output_dir, exist_ok=True)
        resume_step(cfg)  # before anything loads: a resume with other settings is refused
        self.metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
        self.settings = settings_of(cfg)  # stored with every checkpoint, compared when a run resumes
        self.step = 0
        self.ckpt = None
        self.modules: dict = {}
        self.data_iterator = None

    def __enter__(self) -> "Run":
        self.ckpt = _checkpointer(self.cfg)
        return self

    def __exit__(self, *exc) -> None:
        if self.ckpt is not None:
            self.ckpt.close()
            self.ckpt = None

    def resume(self, data_iterator, **modules) -> dict:
        """Restore the newest checkpoint (if any) into `modules` (NNX objects by name, keeping their
        shardings) and the grain iterator, after one check that its arrays have the live shapes;
        drop the metric lines a stopped run wrote after it. From here on every checkpoint saves
        these objects. Returns the checkpoint's meta ({} for a fresh run)."""
        if self.ckpt is None:
            raise RuntimeError("Run.resume runs inside `with run:`")
        self.modules, self.data_iterator = modules, data_iterator
        latest = self.ckpt.latest_step()
        if latest is None:
            trim_metrics(self.metrics_path, -1)
            return {}
        check_shapes(self.ckpt, latest, self.cfg.output_dir, **modules)
        meta = self.ckpt.restore(latest, data_iterator=data_iterator, **modules)
        self.step = int(meta["step"])
        trim_metrics(self.metrics_path, self.step)
        return meta

    def save(self, extra_meta: dict | None = None) -> None:
        """A checkpoint of the current step: the objects `resume` named, the iterator, and meta
        (seed, process count, settings, `extra_meta`)."""
        meta = {"seed": self.cfg.seed, "process_count": jax.process_count(), "settings": self.settings,
                **(extra_meta or {})}
        self.ckpt.save(self.step, data_iterator=self.data_iterator, meta=meta, **self.modules)

    def _writer(self):
        if not self.tensorboard or jax.process_index() != 0:
            return None
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            logger.warning("tensorboardX is not installed; metrics go to metrics.jsonl only")
            return None
        # purge_step drops the events a stopped run logged after its last checkpoint.
        return SummaryWriter(os.path.join(self.cfg.output_dir, "tensorboard"), purge_step=self.step + 1)

    def loop(self, step_fn: Callable[[int], dict | None], *, extra_meta: Callable[[], dict] | None = None,
             postfix: Callable[[dict], dict] | None = None, time_limit_s: float | None = None,
             stop_after: int | None = None, progress: bool = True) -> LoopEnd:
        """Run steps from the resumed one to cfg.steps. `step_fn(step)` makes training step `step`
        (1-based) and returns its metric row, or None on a step it does not measure; rows are kept
        in the history, and written to metrics.jsonl (and TensorBoard) by process 0 every
        `log_every` steps and at the last. A checkpoint (meta plus `extra_meta()`) every
        `checkpoint_every` steps, at the last, and when `time_limit_s` runs out: a run out of time
        ends like a finished one, and rerunning the command resumes it. `stop_after` ends the call
        after that global step. `postfix(row)`: the bar's fields."""
        from tqdm import tqdm

        cfg = self.cfg
        pid = jax.process_index()
        history, last = [], {}
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not progress or pid != 0, desc=self.name)
        writer = self._writer()
        t_start = time.perf_counter()
        try:
            with open(self.metrics_path, "a") as sink:
                while self.step < cfg.steps:
                    row = step_fn(self.step + 1)
                    self.step += 1
                    step = self.step
                    bar.update(1)
                    if row is not None:
                        history.append(row)
                        last = row
                        if pid == 0 and (step % cfg.log_every == 0 or step == cfg.steps):
                            _write_row(row, sink, writer, self.name)
                        if postfix is not None:
                            bar.set_postfix(**postfix(row))
                    # Every process takes process 0's clock, so all stop at the same step.
                    out_of_time = (time_limit_s is not None and step % cfg.log_every == 0
                                   and agreed(time.perf_counter() - t_start >= time_limit_s))
                    if step % cfg.checkpoint_every == 0 or step == cfg.steps or out_of_time:
                        self.save(extra_meta() if extra_meta is not None else None)
                    if stop_after is not None and step >= stop_after:
                        return LoopEnd(step, history, last, stopped=True)
                    if out_of_time:
                        break
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        return LoopEnd(self.step, history, last, stopped=False)

    @property
    def export_dir(self) -> str:
        return os.path.join(self.cfg.output_dir, "hf")

    def export(self, model, mesh, *, fsdp: bool, model_config: dict, processor_files: str) -> str:
        """The trained `model` as a Hugging Face checkpoint in output_dir/hf (cfg.export_dtype),
        with the processor files of folder `processor_files`. Every process calls it: split (FSDP)
        weights are gathered by all of them; process 0 writes."""
        whole = gather_whole(model, mesh) if fsdp else model
        if jax.process_index() == 0:
            from ..models.qwen_vl.params import save_state

            save_state(local_copy(whole), self.export_dir, model_config, dtype=np.dtype(self.cfg.export_dtype))
            copy_processor_files(processor_files, self.export_dir)
        return self.export_dir


def _write_row(row: dict, sink, writer, name: str) -> None:
    sink.write(json.dumps(row) + "\n")
    sink.flush()
    if writer is not None:
        for k, v in row.items():
            if k != "step":
                writer.add_scalar(f"{name}/{k}", v, row["step"])
        writer.flush()
