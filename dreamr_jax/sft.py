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

from .config import ConfigError, _build, read_yaml
from .data.pipeline import DataConfig, WorldEncoder, world_dataset
from .sharding import distribute, gather_whole, local_copy


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

    def __post_init__(self):
        if self.sharding not in ("replicate", "fsdp"):
            raise ValueError(f"sharding must be replicate or fsdp, got '{self.sharding}'")


def load_sft_config(path: str, overrides: list[str] | None = None) -> SFTConfig:
    return _build(SFTConfig, read_yaml(path, overrides), path, nested={"data": DataConfig})


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
    from .assets import qwen3_vl_config
    from .loading import load_model
    from .models.qwen_vl.config import QwenVLConfig
    from .models.qwen_vl.model import QwenVLModel

    if cfg.init:
        from .hub import resolve_checkpoint

        model = load_model(cfg.init, dtype="float32")
        with open(os.path.join(resolve_checkpoint(cfg.init), "config.json")) as f:
            return model, json.load(f)
    if not cfg.model:
        raise ConfigError("sft config: give either `model` (architecture) or `init` (a checkpoint)")
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

    from .checkpoint import TrainCheckpointer, trim_metrics
    from .hub import resolve_checkpoint
    from .models.qwen_vl.params import save_state
    from .processing import load_processor

    os.makedirs(cfg.output_dir, exist_ok=True)
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
        if latest > cfg.steps:
            raise ConfigError(f"{cfg.output_dir} holds a checkpoint at step {latest}, past steps={cfg.steps}; "
                              "raise steps or use a new output_dir")
        meta = ckpt.restore(latest, model=model, optimizer=optimizer, data_iterator=iterator)
        step = int(meta["step"])
        trim_metrics(metrics_path, step)
    else:
        trim_metrics(metrics_path, -1)

    schedule = make_schedule(cfg)
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
                    ckpt.save(step, model=model, optimizer=optimizer, data_iterator=iterator, meta={"seed": cfg.seed})
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
    cfg = load_sft_config(args.config, args.overrides)
    t0 = time.perf_counter()
    out = train(cfg)
    print(json.dumps({"steps": out["step"], "final": out["metrics"], "seconds": round(time.perf_counter() - t0, 1),
                      "export_dir": out.get("export_dir")}, indent=2))
