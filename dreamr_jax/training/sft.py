"""Supervised fine-tuning of a Qwen-VL model on the embedded world (solutions + CPN judging).

One jitted train step (forward with images, token-weighted cross-entropy, AdamW with warmup,
cosine decay and global-norm clipping), data parallel over a 1-D "data" mesh of every device
(the same code on CPU, GPU and TPU, one host or many), a grain input pipeline, orbax
checkpoints of model + optimizer + data iterator + step (atomic, exact resume) and metrics as
JSONL with a tqdm bar. Entry point: `python train/sft.py --config configs/sft_synthetic_target.yaml`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from ..config import ConfigError, _build, read_yaml, resolve_input_paths
from ..data.pipeline import DataConfig, WorldEncoder, world_dataset
from ..sharding import distribute, gather_whole, local_copy
from ..validation import SettingError, check_choice, check_flag, check_range, check_text

EXPORT_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    output_dir: str  # checkpoints, metrics.jsonl and the exported HF checkpoint (output_dir/hf)
    tokenizer: str  # folder with the tokenizer / processor files (copied into the export)
    model: dict = dataclasses.field(default_factory=dict)  # assets.qwen3_vl_config arguments
    init: str | None = None  # start from this HF checkpoint instead of random weights
    data: DataConfig = DataConfig()
    batch_size: int = 16
    steps: int = 1000
    learning_rate: float = 1e-3
    warmup_steps: int = 50
    end_lr_ratio: float = 0.05  # cosine decay to learning_rate * end_lr_ratio
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    seed: int = 0
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    export_dtype: str = "float16"  # dtype of the exported safetensors
    data_workers: int = 0  # grain worker processes rendering batches; 0 = one prefetch thread
    time_limit_s: float | None = None  # stop (checkpoint + export) once training has run this long
    # the weights and AdamW state over the data mesh: "replicate" (data parallel) or "fsdp" (each array
    # split over the devices, `sharding.fsdp_spec`)
    sharding: str = "replicate"
    # Resuming from output_dir's checkpoint with settings other than those it was trained with is
    # refused (each changed key named) unless this is true (`check_resume`).
    allow_changed_settings: bool = False

    def __post_init__(self):
        check_text("output_dir", self.output_dir)
        check_text("tokenizer", self.tokenizer, empty=True)
        check_text("init", self.init, optional=True)
        if not isinstance(self.model, dict):
            raise SettingError("model", "must be a mapping of qwen3_vl_config arguments", self.model)
        check_model_arguments(self.model)
        if not isinstance(self.data, DataConfig):
            raise SettingError("data", "must be a DataConfig (a mapping in a config file)", self.data)
        check_data(self.data)
        for key in ("batch_size", "steps", "checkpoint_every", "keep_checkpoints", "log_every"):
            check_range(key, getattr(self, key), 1, integer=True)
        check_range("learning_rate", self.learning_rate, above=0)
        check_range("warmup_steps", self.warmup_steps, 0, integer=True)
        check_range("end_lr_ratio", self.end_lr_ratio, 0, 1)
        check_range("weight_decay", self.weight_decay, 0)
        check_range("clip_norm", self.clip_norm, above=0)
        check_range("seed", self.seed, 0, integer=True)
        check_choice("export_dtype", self.export_dtype, EXPORT_DTYPES)
        check_range("data_workers", self.data_workers, 0, integer=True)
        check_range("time_limit_s", self.time_limit_s, 0, optional=True)
        check_choice("sharding", self.sharding, ("replicate", "fsdp"))
        check_flag("allow_changed_settings", self.allow_changed_settings)


def check_data(data: DataConfig) -> None:
    """The ranges of the world pipeline's settings (`data.*`)."""
    from ..data.synthetic import SPLITS

    check_range("data.seed", data.seed, 0, integer=True)
    check_choice("data.split", data.split, tuple(SPLITS))
    for key in ("judging_fraction", "specreason_fraction", "shuffled_reads", "cue_fraction"):
        check_range(f"data.{key}", getattr(data, key), 0, 1)
    check_range("data.verdict_weight", data.verdict_weight, 0)
    check_range("data.seq_len", data.seq_len, 2, integer=True)
    for key in ("instruction", "judge_instruction", "judge_cue", "specreason_prompt", "specreason_prefix"):
        check_text(f"data.{key}", getattr(data, key), empty=True)


def check_model_arguments(model: dict) -> None:
    """`model` (the architecture of a model trained from scratch): the keyword arguments of
    `assets.qwen3_vl_config`, all the required ones, each a positive integer (`model.<name>`)."""
    if not model:
        return
    import inspect

    from ..assets import qwen3_vl_config

    params = {name: p for name, p in inspect.signature(qwen3_vl_config).parameters.items() if name != "token_ids"}
    for key in model:
        if key not in params:
            raise SettingError(f"model.{key}", f"is not an argument of qwen3_vl_config (known: {', '.join(params)})",
                               model[key])
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in model]
    if missing:
        raise SettingError("model", f"misses {', '.join(missing)}", model)
    for key, value in model.items():
        if key == "tie_word_embeddings":
            check_flag("model.tie_word_embeddings", value)
        elif key == "deepstack_visual_indexes":
            if not isinstance(value, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                               and i >= 0 for i in value):
                raise SettingError("model.deepstack_visual_indexes", "must be a list of layer indexes", value)
        elif key == "head_dim" and value is None:
            continue
        else:
            check_range(f"model.{key}", value, 1, integer=True)


def load_sft_config(path: str, overrides: list[str] | None = None) -> SFTConfig:
    """An SFTConfig from YAML with `a.b=value` overrides; every setting checked (errors name the
    file and the key) before anything loads."""
    return resolve_input_paths(_build(SFTConfig, read_yaml(path, overrides), path), path, ("tokenizer", "init"))


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


def _shown(value) -> str:
    return "(not set)" if value is ... else json.dumps(value)


def check_resume(ckpt, step: int, cfg) -> dict:
    """Before a run resumes from checkpoint `step`: refuse (ConfigError naming each changed key
    with its old and new value) when its settings differ from those the checkpoint was written
    with, unless cfg.allow_changed_settings (then a warning). Returns the checkpoint's meta
    (read alone, before any array is restored). A checkpoint written before settings were
    stored passes."""
    import logging

    import orbax.checkpoint as ocp

    meta = dict(ckpt.manager.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
    stored = meta.get("settings")
    if stored is None:
        return meta
    changes = changed_settings(stored, settings_of(cfg))
    if changes and not cfg.allow_changed_settings:
        raise ConfigError(
            f"{cfg.output_dir}: the checkpoint at step {step} was written with other settings: {'; '.join(changes)}. "
            "Resume with the settings it was trained with, use a new output_dir, or set allow_changed_settings=true "
            "to go on with the new ones")
    if changes:
        logging.getLogger(__name__).warning("resuming from step %d with changed settings (allow_changed_settings): %s",
                                            step, "; ".join(changes))
    return meta


def resume_step(cfg) -> int | None:
    """The step of the latest checkpoint in cfg.output_dir (None: a fresh run), once the checks a
    resume must pass before anything loads have passed: not past cfg.steps, the same settings
    (`check_resume`)."""
    from ..checkpoint import TrainCheckpointer

    ckpt = TrainCheckpointer(os.path.join(cfg.output_dir, "checkpoints"), max_to_keep=cfg.keep_checkpoints)
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


# ---- the pure pieces --------------------------------------------------------------------------


def make_schedule(cfg: SFTConfig):
    """Linear warmup from 0, then cosine decay to learning_rate * end_lr_ratio at `steps`.
    optax evaluates it at the update count, so update number s (1-based) uses schedule(s - 1)."""
    return optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, max(1, cfg.warmup_steps), max(cfg.steps, cfg.warmup_steps + 1),
        end_value=cfg.learning_rate * cfg.end_lr_ratio)


def make_optimizer(cfg: SFTConfig) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm),
                       optax.adamw(make_schedule(cfg), b1=0.9, b2=0.98, weight_decay=cfg.weight_decay))


def weighted_loss(model, batch, positive_id: int, negative_id: int):
    """Token-weighted next-token cross-entropy; metrics include the verdict accuracy of the
    judging rows (does sign(z+ - z-) at the verdict position match the label)."""
    tokens, deepstack = model.encode_images(batch["vision"])
    logits = model.forward(batch["input_ids"], batch["valid"], batch["positions"], tokens, deepstack,
                           batch["image_gather"])
    targets = batch["input_ids"][:, 1:]
    weights = batch["weights"][:, 1:]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], targets)
    loss = jnp.sum(ce * weights) / jnp.maximum(jnp.sum(weights), 1e-6)
    # The verdict token at verdict_pos is predicted from the position before it.
    z = jnp.take_along_axis(logits, jnp.maximum(batch["verdict_pos"] - 1, 0)[:, None, None], axis=1)[:, 0]
    says_positive = z[:, positive_id] > z[:, negative_id]
    judged = batch["verdict_label"] >= 0
    correct = (says_positive == (batch["verdict_label"] == 1)) & judged
    # Reasoning-step tokens: supervised, and not a verdict (target index t + 1 in input_ids).
    is_verdict = jnp.arange(1, weights.shape[1] + 1)[None] == batch["verdict_pos"][:, None]
    step_tokens = (weights > 0) & ~is_verdict
    metrics = {
        "loss": loss,
        "verdict_accuracy": jnp.sum(correct) / jnp.maximum(jnp.sum(judged), 1),
        "token_accuracy": jnp.sum((jnp.argmax(logits[:, :-1], -1) == targets) & step_tokens)
        / jnp.maximum(jnp.sum(step_tokens), 1),
    }
    return loss, metrics


@nnx.jit(static_argnames=("positive_id", "negative_id"))
def train_step(model, optimizer, batch, positive_id: int, negative_id: int):
    grad_fn = nnx.value_and_grad(weighted_loss, has_aux=True)
    (_, metrics), grads = grad_fn(model, batch, positive_id, negative_id)
    optimizer.update(model, grads)
    return dict(metrics, grad_norm=optax.tree.norm(grads))


# ---- meshes -----------------------------------------------------------------------------------


def data_mesh(num_devices: int | None = None):
    """A 1-D mesh named "data" over the first num_devices devices (all by default)."""
    from jax.sharding import AxisType

    devices = jax.devices()[: num_devices or len(jax.devices())]
    return jax.make_mesh((len(devices),), ("data",), axis_types=(AxisType.Auto,), devices=devices)


def _batch_spec(path, leaf) -> P:
    name = path[-1].key if hasattr(path[-1], "key") else str(path[-1])
    if name == "positions":  # (3, B, S)
        return P(None, "data")
    return P("data") if leaf.ndim else P()


def shard_batch(batch: dict, mesh) -> dict:
    """Host batch (this process's rows) -> global arrays sharded over the mesh's data axis."""
    def put(path, leaf):
        return jax.make_array_from_process_local_data(NamedSharding(mesh, _batch_spec(path, leaf)), np.asarray(leaf))
    return jax.tree_util.tree_map_with_path(put, batch)


# ---- the run ----------------------------------------------------------------------------------


def build_model(cfg: SFTConfig, token_ids: dict):
    from ..assets import qwen3_vl_config
    from ..loading import load_model
    from ..models.qwen_vl.config import QwenVLConfig
    from ..models.qwen_vl.model import QwenVLModel

    if cfg.init:
        from ..hub import resolve_checkpoint

        model = load_model(cfg.init, dtype="float32")
        with open(os.path.join(resolve_checkpoint(cfg.init), "config.json")) as f:
            return model, json.load(f)
    if not cfg.model:
        raise ConfigError("sft config: give either model (an architecture) or init (a checkpoint)")
    config = qwen3_vl_config(token_ids=token_ids, **cfg.model)
    return QwenVLModel(QwenVLConfig.from_hf(config), rngs=nnx.Rngs(cfg.seed)), config


def token_ids_of(processor) -> dict:
    tok = processor.tokenizer
    ids = {k: tok.convert_tokens_to_ids(t) for k, t in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
        ("eos_token_id", "<|im_end|>"), ("bos_token_id", "<|endoftext|>"))}
    ids["vocab_size"] = len(tok)
    return ids


def train(cfg: SFTConfig, *, stop_after: int | None = None, progress: bool = True, export: bool = True) -> dict:
    """Run (or resume) SFT. `stop_after` ends the call after that global step without a final
    export, like a job killed right after its checkpoint (for resume tests)."""
    import grain
    from tqdm import tqdm

    from ..checkpoint import TrainCheckpointer, trim_metrics
    from ..hub import resolve_checkpoint
    from ..models.qwen_vl.params import save_state
    from ..processing import load_processor

    os.makedirs(cfg.output_dir, exist_ok=True)
    resume_step(cfg)  # before anything loads: a resume with other settings is refused
    processor = load_processor(cfg.init) if cfg.init else load_processor(tokenizer_path=cfg.tokenizer)
    ids = token_ids_of(processor)
    model, model_config = build_model(cfg, ids)
    mesh = data_mesh()
    if cfg.batch_size % (mesh.size) or cfg.batch_size % jax.process_count():
        raise ConfigError(f"batch_size {cfg.batch_size} must divide evenly over {mesh.size} devices")
    fsdp = cfg.sharding == "fsdp"
    nnx.update(model, distribute(nnx.state(model), mesh, fsdp))
    optimizer = nnx.Optimizer(model, make_optimizer(cfg), wrt=nnx.Param)
    # Optimizer counters are created on the default device; place them like the outputs of a
    # step will be, or the second step recompiles for the changed input shardings.
    nnx.update(optimizer, distribute(nnx.state(optimizer), mesh, fsdp))

    encoder = WorldEncoder(processor, cfg.data)
    local_batch = cfg.batch_size // jax.process_count()
    dataset = world_dataset(encoder, model.cfg, local_batch, process_index=jax.process_index(),
                            process_count=jax.process_count())
    # A background thread prepares the next batches (rendering, image processing, positions);
    # on an accelerator one thread cannot keep up, so worker processes take over.
    iter_dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4))
    if cfg.data_workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; we are not an absl app
            flags.FLAGS.mark_as_parsed()
        iter_dataset = iter_dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.data_workers))
    iterator = iter(iter_dataset)

    ckpt = TrainCheckpointer(os.path.join(cfg.output_dir, "checkpoints"), max_to_keep=cfg.keep_checkpoints)
    metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
    step = 0
    latest = ckpt.latest_step()
    if latest is not None:
        try:
            check_shapes(ckpt, latest, cfg.output_dir, model=model, optimizer=optimizer)
        except ConfigError:
            ckpt.close()
            raise
        meta = ckpt.restore(latest, model=model, optimizer=optimizer, data_iterator=iterator)
        step = int(meta["step"])
        trim_metrics(metrics_path, step)
    else:
        trim_metrics(metrics_path, -1)

    schedule = make_schedule(cfg)
    settings = settings_of(cfg)  # stored with every checkpoint, compared when a run resumes
    last_metrics = {}
    history = []
    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, desc="sft")
    t_window, tokens_window = time.perf_counter(), 0
    t_start = time.perf_counter()
    try:
        with open(metrics_path, "a") as sink:
            while step < cfg.steps:
                host = next(iterator)
                tokens_window += int(host["valid"].sum()) * jax.process_count()
                metrics = train_step(model, optimizer, shard_batch(host, mesh), encoder.positive_id,
                                     encoder.negative_id)
                step += 1
                bar.update(1)
                if step % cfg.log_every == 0 or step == cfg.steps:
                    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    elapsed = time.perf_counter() - t_window
                    row = dict(step=step, **metrics, learning_rate=float(schedule(step - 1)),
                               tokens_per_s=tokens_window / max(elapsed, 1e-9))
                    t_window, tokens_window = time.perf_counter(), 0
                    history.append(row)
                    last_metrics = row
                    if jax.process_index() == 0:
                        sink.write(json.dumps(row) + "\n")
                        sink.flush()
                    bar.set_postfix(loss=f"{row['loss']:.3f}", judge=f"{row['verdict_accuracy']:.2f}")
                # A run out of time ends like a finished one (checkpoint + export); rerunning the
                # command resumes it. Every process takes process 0's clock so all stop together.
                out_of_time = (cfg.time_limit_s is not None and step % cfg.log_every == 0
                               and _agreed(time.perf_counter() - t_start >= cfg.time_limit_s))
                if step % cfg.checkpoint_every == 0 or step == cfg.steps or out_of_time:
                    ckpt.save(step, model=model, optimizer=optimizer, data_iterator=iterator,
                              meta={"seed": cfg.seed, "settings": settings})
                if stop_after is not None and step >= stop_after:
                    return {"step": step, "metrics": last_metrics, "history": history}
                if out_of_time:
                    break
    finally:
        bar.close()
        ckpt.close()
    export_dir = os.path.join(cfg.output_dir, "hf")
    whole = local_copy(gather_whole(model, mesh)) if export and fsdp else model  # every process gathers
    if export and jax.process_index() == 0:
        save_state(whole, export_dir, model_config, dtype=np.dtype(cfg.export_dtype))
        _copy_processor_files(resolve_checkpoint(cfg.init) if cfg.init else cfg.tokenizer, export_dir)
    return {"step": step, "metrics": last_metrics, "history": history, "export_dir": export_dir,
            "model": model}


PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.json", "preprocessor_config.json",
                   "special_tokens_map.json")


def _agreed(flag: bool) -> bool:
    """Process 0's value of `flag` on every process (a no-op on one host)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag)))


def _copy_processor_files(src: str, dst: str) -> None:
    import shutil

    os.makedirs(dst, exist_ok=True)
    for name in PROCESSOR_FILES:
        if os.path.exists(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), os.path.join(dst, name))


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="SFT of a Qwen-VL model on the embedded world")
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. steps=200 data.seq_len=256")
    args = parser.parse_args(argv)
    if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("DREAMR_MULTIHOST"):
        jax.distributed.initialize()
    try:
        cfg = load_sft_config(args.config, args.overrides)
        t0 = time.perf_counter()
        out = train(cfg)
    except ConfigError as e:  # a setting that does not fit: its message, not a traceback
        raise SystemExit(f"error: {e}") from None
    print(json.dumps({"steps": out["step"], "final": out["metrics"], "seconds": round(time.perf_counter() - t0, 1),
                      "export_dir": out.get("export_dir")}, indent=2))
