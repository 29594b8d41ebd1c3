"""Supervised fine-tuning of a Qwen-VL model on the embedded world (solutions + CPN judging).

What is SFT's own: its config (`SFTConfig`, `load_sft_config`), the model it starts from
(`build_model`), its data (the world's `WorldEncoder` examples through a grain pipeline) and its
jitted step (`train_step`: forward with images, token-weighted cross-entropy, AdamW with warmup,
cosine decay and global-norm clipping). `train` runs that step data parallel over a 1-D "data"
mesh of every device (the same code on CPU, GPU and TPU, one host or many) on the training
scaffold (`training.scaffold`: orbax checkpoints with exact resume, metrics.jsonl, the export).
Command line: `dreamr train sft --config configs/sft_synthetic_target.yaml [key=value ...]`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ..config import ConfigError, read_config
from ..data.pipeline import DataConfig, WorldEncoder, world_dataset
from ..validation import SettingError, check_choice, check_flag, check_range, check_text
from . import scaffold

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
    # refused (each changed key named) unless this is true (`scaffold.check_resume`).
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
    for key in ("judging_fraction", "specreason_fraction", "shuffled_reads", "cue_fraction",
                "redundant_habits", "redundant_share"):
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
    return read_config(SFTConfig, path, overrides, ("tokenizer", "init"))


# ---- the pure pieces --------------------------------------------------------------------------


def make_schedule(cfg: SFTConfig):
    """Linear warmup from 0, then cosine decay to learning_rate * end_lr_ratio at `steps`.
    optax evaluates it at the update count, so update number s (1-based) uses schedule(s - 1)."""
    return optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, max(1, cfg.warmup_steps), max(cfg.steps, cfg.warmup_steps + 1),
        end_value=cfg.learning_rate * cfg.end_lr_ratio)


def make_optimizer(cfg: SFTConfig) -> optax.GradientTransformation:
    return scaffold.adamw(make_schedule(cfg), clip_norm=cfg.clip_norm, weight_decay=cfg.weight_decay, b1=0.9, b2=0.98)


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
    """Run (or resume from output_dir's latest checkpoint) SFT. `stop_after` ends the call after
    that global step without a final export, like a job killed right after its checkpoint (for
    resume tests). Returns {"step", "metrics" (the last row), "history", "export_dir", "model"}."""
    import grain

    from ..hub import resolve_checkpoint
    from ..processing import load_processor

    run = scaffold.Run(cfg, "sft")  # before anything loads: a resume with other settings is refused
    processor = load_processor(cfg.init) if cfg.init else load_processor(tokenizer_path=cfg.tokenizer)
    model, model_config = build_model(cfg, token_ids_of(processor))
    mesh = scaffold.data_mesh()
    if cfg.batch_size % (mesh.size) or cfg.batch_size % jax.process_count():
        raise ConfigError(f"batch_size {cfg.batch_size} must divide evenly over {mesh.size} devices")
    fsdp = cfg.sharding == "fsdp"
    scaffold.place(model, mesh, fsdp)
    optimizer = scaffold.optimizer_on(model, make_optimizer(cfg), mesh, fsdp)

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
    schedule = make_schedule(cfg)
    window = {"start": None, "tokens": 0}  # tokens/s over the steps since the last row

    def step(number: int) -> dict | None:
        if window["start"] is None:  # the clock starts with the loop, after the restore
            window["start"] = time.perf_counter()
        host = next(iterator)
        window["tokens"] += int(host["valid"].sum()) * jax.process_count()
        metrics = train_step(model, optimizer, scaffold.shard_batch(host, mesh), encoder.positive_id,
                             encoder.negative_id)
        if number % cfg.log_every and number != cfg.steps:
            return None  # reading the metrics back would wait for the step
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        elapsed = time.perf_counter() - window["start"]
        row = dict(step=number, **metrics, learning_rate=float(schedule(number - 1)),
                   tokens_per_s=window["tokens"] / max(elapsed, 1e-9))
        window.update(start=time.perf_counter(), tokens=0)
        return row

    with run:
        run.resume(iterator, model=model, optimizer=optimizer)
        end = run.loop(step, time_limit_s=cfg.time_limit_s, stop_after=stop_after, progress=progress,
                       postfix=lambda row: dict(loss=f"{row['loss']:.3f}", judge=f"{row['verdict_accuracy']:.2f}"))
    if end.stopped:
        return {"step": end.step, "metrics": end.last, "history": end.history}
    if export:
        run.export(model, mesh, fsdp=fsdp, model_config=model_config,
                   processor_files=resolve_checkpoint(cfg.init) if cfg.init else cfg.tokenizer)
    return {"step": end.step, "metrics": end.last, "history": end.history, "export_dir": run.export_dir,
            "model": model}
