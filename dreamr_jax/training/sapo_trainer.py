"""The SAPO trainer: GRPO training of the draft against a frozen target, with the composite reward.

Roles and meshes. The draft being trained holds float master weights replicated over the
draft mesh (a 1-D "data" mesh over the first `draft_devices` devices of every process); its
update runs data parallel over that mesh. The reference (a frozen copy of the initial draft)
lives there too. The frozen target runs on each process's next `target_devices` devices
(`sharding.split_devices`; on a single device both roles share it), where it checks the
steps of that process's own rollouts. Rollouts are sampled on each process from its local
copy of the replicated policy, so processes never exchange tokens: only the update's
gradients (inside the jitted step) and a few host statistics cross processes.

One step, on every process for its slice of the prompt batch (`training.sapo`):
1. G rollouts per prompt (temperature / top-p), cut into steps at the delimiter;
2. R_outcome (graders), R_draft (the target's CPN check of every step, batched), R_length,
   R = w1 R_outcome + w2 R_draft + w3 R_length, advantages within each prompt's group;
3. old and reference log-probs, then `grpo_iterations` AdamW updates of `grpo_loss`.

This module holds SAPO's config, its prompts (`PromptEncoder`, `prompt_dataset`), the global
batch the processes build together, and that step; the run around it is the training scaffold
(`training.scaffold`): orbax checkpoints of policy, optimizer, reference, the grain iterator's
position, the RNG key and the step (a run stopped anywhere and resumed repeats the next step's
metrics exactly), `metrics.jsonl` and TensorBoard (`tensorboard/`), the export.
Command line: `dreamr train sapo --config configs/sapo_synthetic.yaml [key=value ...]`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Callable, ClassVar, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ..config import ConfigError, read_config
from ..sharding import gather_whole, local_copy
from ..speculative import SpeculationConfig
from ..prompts import question_text
from ..validation import SettingError, check_choice, check_flag, check_range, check_text
from . import scaffold
from .sapo import GRPOSettings, collect, in_dtype, means, policy_batch, update

logger = logging.getLogger(__name__)

TRAIN_SOURCES = ("synthetic", "geo3k", "ocrvqa", "scienceqa")


@dataclasses.dataclass(frozen=True)
class SAPOData:
    """Where the training prompts come from."""

    sources: tuple = ("synthetic",)  # "synthetic" (the embedded world) and/or geo3k, ocrvqa, scienceqa
    paths: dict = dataclasses.field(default_factory=dict)  # source -> local file / folder (else the hub)
    split: str | None = None  # benchmark split (default: each set's training split)
    limit: int | None = None  # at most this many records per benchmark source
    world_seed: int = 0  # the embedded world's seed; its problems come from the "train" split
    world_size: int = 100_000  # embedded-world problems per epoch

    def __post_init__(self):
        sources = self.sources
        if isinstance(sources, str):
            sources = (sources,)
        if not isinstance(sources, (tuple, list)):
            raise SettingError("sources", f"must name some of {', '.join(TRAIN_SOURCES)}", sources)
        sources = tuple(sources)
        object.__setattr__(self, "sources", sources)
        unknown = [s for s in sources if s not in TRAIN_SOURCES]
        if not sources or unknown:
            raise SettingError("sources", f"must name some of {', '.join(TRAIN_SOURCES)}", list(sources))
        if not isinstance(self.paths, dict):
            raise SettingError("paths", "must be a mapping of source -> file or folder", self.paths)
        if set(self.paths) - set(sources):
            raise SettingError("paths", f"names {sorted(set(self.paths) - set(sources))}, not among the sources",
                               self.paths)
        for source, where in self.paths.items():
            check_text(f"paths.{source}", where)
        check_text("split", self.split, optional=True)
        check_range("limit", self.limit, 1, integer=True, optional=True)
        check_range("world_seed", self.world_seed, 0, integer=True)
        check_range("world_size", self.world_size, 1, integer=True)


@dataclasses.dataclass(frozen=True)
class SAPOConfig:
    output_dir: str  # checkpoints/, metrics.jsonl, tensorboard/ and the trained draft (hf/)
    draft: str  # the draft to train: checkpoint folder, hub id or "asset:draft"
    target: str  # the frozen verifier: checkpoint folder, hub id or "asset:target"
    data: SAPOData = SAPOData()
    # Prompts, judging suffix, keywords, the step delimiter, the check threshold (`spec.alpha`: a
    # drafted step counts as accepted when rho >= alpha) and the draft's sampling
    # (`spec.draft_temperature`, `spec.top_p`: SAPO's rollouts), as the speculative engine uses
    # them: one place for each. The rollouts must be sampled, so the default temperature is 1; a
    # `spec:` section that leaves it out keeps it.
    spec: SpeculationConfig = SpeculationConfig(draft_temperature=1.0)
    dtype: str = "float32"  # compute dtype: rollouts, target, reference, the loss's forward
    param_dtype: str = "float32"  # the trained draft's master weights (and so its optimizer state)
    max_pixels: int | None = None  # image processor bound (default: the checkpoint's)
    # ---- rollouts and rewards
    group_size: int = 8  # G rollouts per prompt
    max_new_tokens: int = 1024  # response tokens per rollout
    max_length: int = 8192  # prompt + response; longer prompts are replaced (logged)
    soft_draft_reward: bool = False  # R_draft = mean rho instead of the accepted fraction
    l_ref: int = 1024  # R_length = 1 - min(1, L / l_ref)
    reward_weights: tuple = (1.0, 1.0, 1.0)  # w1 (outcome), w2 (draft), w3 (length)
    # ---- GRPO
    epsilon: float = 0.2
    beta: float = 0.01
    grpo_iterations: int = 1  # updates per rollout batch (old log-probs kept)
    logprob_chunk: int = 128  # sequence positions per chunk of the full-vocabulary log-probs
    check_rows: int = 32  # rows per batched CPN check
    micro_batches: int = 1  # each process's prompts go through the update in this many parts (gradients accumulated)
    rollout_prompts: int = 0  # prompts per generation call (0: all of a process's at once), spread over its
                              # draft devices
    # ---- optimizer: AdamW, global-norm clipping, linear warmup then constant / cosine / linear
    learning_rate: float = 1e-6
    schedule: str = "constant"
    warmup_steps: int = 0  # training steps
    end_lr_ratio: float = 0.0  # cosine / linear decay to learning_rate * end_lr_ratio at `steps`
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    clip_norm: float = 1.0
    # ---- the run
    batch_size: int = 64  # prompts per step, over all processes
    steps: int = 1000
    seed: int = 0
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    log_every: int = 1
    tensorboard: bool = True
    export_dtype: str = "float32"  # dtype of the exported trained draft (output_dir/hf)
    # ---- devices, per process: the draft's data-parallel share and the target's
    draft_devices: int = 1
    target_devices: int = 1
    target_parallelism: str = "tensor"  # the frozen target over its devices: "tensor" (split) or "replicate"
    # The draft's float weights, AdamW moments and reference copy over the draft mesh: "replicate"
    # (plain data parallelism) or "fsdp" (each array split over the devices, `sharding.fsdp_spec`;
    # rollouts and the export gather a whole copy first).
    draft_sharding: str = "replicate"
    # Resuming from output_dir's checkpoint with settings other than those it was trained with is
    # refused (each changed key named) unless this is true (`scaffold.check_resume`).
    allow_changed_settings: bool = False

    # Settings that had a second copy here; a config that still sets one is told where it lives.
    MOVED_KEYS: ClassVar[dict] = {
        "alpha": ("spec.alpha", "the check threshold, the engine's"),
        "temperature": ("spec.draft_temperature", "the draft's sampling, the engine's"),
        "top_p": ("spec.top_p", "the draft's sampling, the engine's"),
    }

    def __post_init__(self):
        for key in ("output_dir", "draft", "target"):
            check_text(key, getattr(self, key))
        if not isinstance(self.data, SAPOData):
            raise SettingError("data", "must be a SAPOData (a mapping in a config file)", self.data)
        if not isinstance(self.spec, SpeculationConfig):
            raise SettingError("spec", "must be a SpeculationConfig (a mapping in a config file)", self.spec)
        # the engine also takes alpha = inf (reject every step); a reward needs a threshold in [0, 1]
        check_range("spec.alpha", self.spec.alpha, 0, 1)
        if not self.spec.draft_temperature > 0:
            raise SettingError("spec.draft_temperature", "must be > 0 for SAPO (GRPO compares sampled rollouts; "
                               "greedy ones are all the same)", self.spec.draft_temperature)
        for name in ("dtype", "param_dtype", "export_dtype"):
            check_choice(name, getattr(self, name), ("float32", "bfloat16", "float16"))
        check_range("max_pixels", self.max_pixels, 1, integer=True, optional=True)
        check_range("max_length", self.max_length, 2, integer=True)
        check_range("max_new_tokens", self.max_new_tokens, 1, integer=True)
        if self.max_new_tokens >= self.max_length:
            raise SettingError("max_new_tokens", f"must be below max_length ({self.max_length})", self.max_new_tokens)
        if isinstance(self.reward_weights, (list, tuple)) and all(
                isinstance(w, (int, float)) and not isinstance(w, bool) for w in self.reward_weights):
            object.__setattr__(self, "reward_weights", tuple(float(w) for w in self.reward_weights))
        check_range("micro_batches", self.micro_batches, 1, integer=True)
        check_range("learning_rate", self.learning_rate, above=0)
        check_choice("schedule", self.schedule, ("constant", "cosine", "linear"))
        check_range("warmup_steps", self.warmup_steps, 0, integer=True)
        check_range("end_lr_ratio", self.end_lr_ratio, 0, 1)
        check_range("weight_decay", self.weight_decay, 0)
        check_range("b1", self.b1, 0, below=1)
        check_range("b2", self.b2, 0, below=1)
        check_range("clip_norm", self.clip_norm, above=0)
        for key in ("batch_size", "steps", "checkpoint_every", "keep_checkpoints", "log_every", "draft_devices",
                    "target_devices"):
            check_range(key, getattr(self, key), 1, integer=True)
        check_range("seed", self.seed, 0, integer=True)
        check_flag("tensorboard", self.tensorboard)
        check_choice("target_parallelism", self.target_parallelism, ("tensor", "replicate"))
        check_choice("draft_sharding", self.draft_sharding, ("replicate", "fsdp"))
        check_flag("allow_changed_settings", self.allow_changed_settings)
        # group_size, l_ref, reward_weights, epsilon, beta, grpo_iterations, logprob_chunk, check_rows
        # and rollout_prompts: GRPOSettings checks them (same names), with spec's sampling and alpha.
        self.settings()

    def settings(self) -> GRPOSettings:
        return GRPOSettings(
            group_size=self.group_size, max_new_tokens=self.max_new_tokens,
            temperature=self.spec.draft_temperature, top_p=self.spec.top_p, alpha=self.spec.alpha,
            soft_draft_reward=self.soft_draft_reward, l_ref=self.l_ref,
            reward_weights=self.reward_weights, epsilon=self.epsilon, beta=self.beta,
            grpo_iterations=self.grpo_iterations, logprob_chunk=self.logprob_chunk,
            compute_dtype=None if self.dtype == self.param_dtype else self.dtype, check_rows=self.check_rows,
            rollout_prompts=self.rollout_prompts)


def load_sapo_config(path: str, overrides: list[str] | None = None) -> SAPOConfig:
    """A SAPOConfig from YAML with `a.b=value` overrides; every setting checked (errors name the
    file and the key) before anything loads."""
    return read_config(SAPOConfig, path, overrides, ("draft", "target"))


# ---- optimizer --------------------------------------------------------------------------------


def make_schedule(cfg: SAPOConfig):
    """Learning rate at training step s (0-based): linear warmup from 0 over `warmup_steps`,
    then constant, cosine or linear decay to learning_rate * end_lr_ratio at `steps`."""
    peak, warm = cfg.learning_rate, cfg.warmup_steps
    end = peak * cfg.end_lr_ratio
    if cfg.schedule == "constant":
        after = optax.constant_schedule(peak)
    elif cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, max(1, cfg.steps - warm), alpha=cfg.end_lr_ratio)
    else:
        after = optax.linear_schedule(peak, end, max(1, cfg.steps - warm))
    if warm <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), after], [warm])


def make_optimizer(cfg: SAPOConfig) -> optax.GradientTransformation:
    """AdamW with global-norm clipping. optax counts updates; each training step makes
    `grpo_iterations` of them, all at that step's learning rate."""
    return scaffold.adamw(make_schedule(cfg), clip_norm=cfg.clip_norm, weight_decay=cfg.weight_decay, b1=cfg.b1,
                          b2=cfg.b2, updates_per_step=cfg.grpo_iterations)


# ---- devices ------------------------------------------------------------------------------------


def role_devices(draft_devices: int, target_devices: int):
    """(the draft's devices over all processes, this process's target devices).

    Every process splits its own devices with `split_devices`; the draft mesh is the union
    of the draft shares in process order, so process p's rows are the p-th block of a batch."""
    from ..sharding import split_devices

    per_process: dict[int, list] = {}
    for d in jax.devices():
        per_process.setdefault(d.process_index, []).append(d)
    draft, mine = [], None
    for p in sorted(per_process):
        local = sorted(per_process[p], key=lambda d: d.id)
        try:
            d, t = split_devices(draft_devices, target_devices, local)
        except ValueError as e:
            raise ConfigError(f"process {p}: {e} (draft_devices and target_devices count per process)") from e
        draft += d
        if p == jax.process_index():
            mine = t
    return draft, mine


# ---- data ---------------------------------------------------------------------------------------


def load_records(data: SAPOData) -> list[dict] | None:
    """Benchmark records of the configured sources (None when the only source is the world)."""
    from ..data.datasets import load_benchmark

    records = []
    for source in data.sources:
        if source == "synthetic":
            continue
        loaded = load_benchmark(source, data.split, path=data.paths.get(source), limit=data.limit, on_error="skip")
        if not loaded:
            raise ConfigError(f"data source {source} gave no records")
        records += list(loaded)
    return records


class PromptEncoder:
    """Record -> the draft's chat prompt (instruction + question, its images) as token ids and
    pixel patches, plus the fields the graders need."""

    def __init__(self, processor, instruction: str, max_prompt_tokens: int):
        self.proc, self.instruction, self.max_prompt_tokens = processor, instruction, max_prompt_tokens

    def __call__(self, record: dict) -> dict:
        images = [im for im in (record.get("images") or []) if im is not None]
        text = self.proc.user_prompt(question_text(self.instruction, record["question"]), len(images))
        enc = self.proc.encode(text, images)
        keep = {k: record.get(k) for k in ("id", "source", "answer", "answer_type", "choices")}
        return dict(enc, record=keep)

    def batch(self, records: Sequence[dict]) -> list[dict]:
        """Encode a batch; a prompt too long for max_length is replaced by the batch's shortest,
        so every batch keeps its shape (GRPO's groups are per prompt, a repeat is harmless)."""
        encoded = [self(r) for r in records]
        fits = [e for e in encoded if len(e["input_ids"]) <= self.max_prompt_tokens]
        if not fits:
            raise ValueError(f"no prompt of records {[r.get('id') for r in records]} fits in "
                             f"{self.max_prompt_tokens} tokens (max_length - max_new_tokens)")
        shortest = min(fits, key=lambda e: len(e["input_ids"]))
        out = []
        for e in encoded:
            if len(e["input_ids"]) > self.max_prompt_tokens:
                logger.warning("prompt of %s has %d tokens, over %d; replaced", e["record"]["id"],
                               len(e["input_ids"]), self.max_prompt_tokens)
                e = shortest
            out.append(e)
        return out


def prompt_dataset(cfg: SAPOConfig, encoder: PromptEncoder, records: list[dict] | None, local_batch: int,
                   process_index: int = 0, process_count: int = 1):
    """grain MapDataset of prompt batches for one process: the sources shuffled (reshuffled every
    epoch) by cfg.seed, repeated forever, every process taking its own interleaved slice."""
    import grain

    from ..data import synthetic

    world = "synthetic" in cfg.data.sources
    n_world = cfg.data.world_size if world else 0
    n_total = n_world + len(records or [])

    def record(index: int) -> dict:
        index = int(index)
        if index < n_world:
            return synthetic.make_problem(cfg.data.world_seed, "train", index).record()
        return records[index - n_world]

    ds = grain.MapDataset.range(n_total).shuffle(seed=cfg.seed).repeat(None)
    ds = ds[process_index::process_count].map(record)
    return ds.batch(local_batch, drop_remainder=True, batch_fn=list).map(encoder.batch)


# ---- multi-process helpers ------------------------------------------------------------------------


def _shift(a: np.ndarray, by: int) -> np.ndarray:
    return np.where(a >= 0, a + by, a).astype(np.int32)


def offset_for_process(batch: dict, process_index: int, units: int, segments: int, windows: int) -> dict:
    """Make one process's batch index the global batch its rows join: in the global arrays
    process p's patches, merge units, image segments and windows come after those of
    processes 0..p-1, each holding `units` merge units (equal patch buckets) and at most
    `segments` images / `windows` windows. -1 (padding, text) stays -1."""
    if process_index == 0 or batch["vision"] is None:
        return batch
    vision = dict(batch["vision"])
    vision["segment_ids"] = _shift(vision["segment_ids"], process_index * segments)
    vision["window_segment_ids"] = _shift(vision["window_segment_ids"], process_index * windows)
    vision["unit_order"] = _shift(vision["unit_order"], process_index * units)
    vision["unit_restore"] = _shift(vision["unit_restore"], process_index * units)
    return dict(batch, vision=vision, image_gather=_shift(batch["image_gather"], process_index * units))


def global_policy_batch(model_cfg, rollouts, prompts, pad_id: int) -> dict:
    """`policy_batch` with the row length and patch bucket every process agrees on, offset
    for this process's place in the global batch."""
    from ..generation import length_bucket, patch_bucket

    patches = sum(int(np.prod(np.asarray(prompts[r.group]["image_grid_thw"]).reshape(-1, 3), -1).sum())
                  for r in rollouts if prompts[r.group].get("pixel_values") is not None)
    longest = max(len(r.prompt_ids) + len(r.response) for r in rollouts)
    agreed = scaffold.allgather(np.array([longest, patches], np.int64)).max(0)
    width = length_bucket(int(agreed[0]))
    num_patches = patch_bucket(int(agreed[1]), model_cfg.vision.merge_unit) if agreed[1] else None
    host = policy_batch(model_cfg, rollouts, prompts, pad_id, width=width, num_patches=num_patches)
    if jax.process_count() > 1 and host["vision"] is not None:
        v = host["vision"]
        counts = scaffold.allgather(np.array([v["segment_ids"].max() + 1, v["window_segment_ids"].max() + 1],
                                             np.int64)).max(0)
        host = offset_for_process(host, jax.process_index(), len(v["unit_order"]), int(counts[0]), int(counts[1]))
    return host


def _scalars(tree) -> dict:
    """Replicated device scalars -> floats (read from this process's own copy)."""
    return {k: float(np.asarray(v.addressable_data(0) if isinstance(v, jax.Array) else v)) for k, v in tree.items()}


def _step_seed(key, process_index: int) -> int:
    """This process's rollout seed for a step, from the step's key."""
    bits = jax.random.bits(jax.random.fold_in(key, process_index), (), jnp.uint32)
    return int(np.asarray(bits)) >> 1


# ---- the run ------------------------------------------------------------------------------------




def train(cfg: SAPOConfig, *, stop_after: int | None = None, progress: bool = True, export: bool = True,
          extra_reward: Callable | None = None) -> dict:
    """Run (or resume from output_dir's latest checkpoint) SAPO training of cfg.draft.

    `stop_after` ends the call after that global step, like a job killed right after it
    (no export); `extra_reward(rollouts, records) -> (N,)` is added to R (logged as
    `reward_extra`). Returns {"step", "metrics" (the last row), "history", "policy", "optimizer", ...}."""
    import grain

    from ..hub import resolve_checkpoint
    from ..loading import load_model
    from ..processing import load_processor
    from ..sharding import role_mesh
    from ..speculative import Role, StepEngine, check_same_tokenizer

    settings = cfg.settings()
    n_proc, pid = jax.process_count(), jax.process_index()
    if cfg.batch_size % n_proc:
        raise ConfigError(f"batch_size {cfg.batch_size} must divide evenly over {n_proc} processes")
    draft_devices, target_devices = role_devices(cfg.draft_devices, cfg.target_devices)
    mesh = role_mesh(draft_devices)
    local_batch = cfg.batch_size // n_proc
    local_devices = [d for d in draft_devices if d.process_index == pid]
    if local_batch % cfg.micro_batches:
        raise ConfigError(f"{local_batch} prompts per process must split into micro_batches={cfg.micro_batches}")
    micro_prompts = local_batch // cfg.micro_batches
    if (micro_prompts * cfg.group_size) % len(local_devices):
        raise ConfigError(f"a micro-batch of {micro_prompts} prompts x {cfg.group_size} rollouts per process must "
                          f"divide over its {len(local_devices)} draft devices")
    # before anything loads: a resume with other settings is refused
    run = scaffold.Run(cfg, "sapo", tensorboard=cfg.tensorboard)

    image_overrides = {} if cfg.max_pixels is None else {"max_pixels": cfg.max_pixels}
    processor = load_processor(cfg.draft, **image_overrides)
    check_same_tokenizer(processor, load_processor(cfg.target, **image_overrides))
    fsdp = cfg.draft_sharding == "fsdp"
    policy = load_model(cfg.draft, dtype=cfg.param_dtype)
    scaffold.place(policy, mesh, fsdp)
    # The frozen copy of the initial draft. A clone shares the policy's graph, so jitted
    # functions compiled for one serve the other.
    reference = in_dtype(nnx.clone(policy), None if cfg.dtype == cfg.param_dtype else cfg.dtype)
    optimizer = scaffold.optimizer_on(policy, make_optimizer(cfg), mesh, fsdp)
    target = load_model(cfg.target, dtype=cfg.dtype)
    if target.cfg.text.vocab_size != policy.cfg.text.vocab_size:
        raise ConfigError(f"draft vocabulary {policy.cfg.text.vocab_size} != target vocabulary "
                          f"{target.cfg.text.vocab_size}")
    engine = StepEngine(None, Role("target", target, target_devices, cfg.target_parallelism), processor, cfg.spec)

    encoder = PromptEncoder(processor, cfg.spec.instruction, cfg.max_length - cfg.max_new_tokens)
    dataset = prompt_dataset(cfg, encoder, load_records(cfg.data), local_batch, pid, n_proc)
    # A background thread encodes the next batches (images, tokenizer) while this one trains.
    iterator = iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)))
    schedule = make_schedule(cfg)
    rng = {"key": jax.random.key(cfg.seed)}  # split every step; checkpointed with it

    def step(number: int) -> dict:
        prompts = next(iterator)
        rng["key"], step_key = jax.random.split(rng["key"])
        if fsdp:  # one whole compute-dtype copy per device, gathered from the split weights
            whole = gather_whole(in_dtype(policy, settings.compute_dtype), mesh)
            samplers = [local_copy(whole, d) for d in local_devices]
        else:
            samplers = [in_dtype(local_copy(policy, d), settings.compute_dtype) for d in local_devices]
        got = collect(samplers, engine, processor, prompts, [p["record"] for p in prompts], settings,
                      _step_seed(step_key, pid), extra_reward)
        whole = samplers = None  # the gathered / cast copies are not needed by the update: free them
        rows = micro_prompts * cfg.group_size  # rollouts come prompt after prompt
        batches = []
        for m in range(cfg.micro_batches):
            part = slice(m * rows, (m + 1) * rows)
            host = global_policy_batch(policy.cfg, got.rollouts[part], prompts, processor.pad_token_id)
            host["advantages"] = got.advantages[part].astype(np.float32)
            batches.append(scaffold.shard_batch(host, mesh))
        t0 = time.perf_counter()
        device_metrics = update(policy, optimizer, reference, batches, settings)
        row = _scalars(device_metrics)  # waits for the update
        t_update = time.perf_counter() - t0

        # Every process's rollout statistics, summed (and its timings, the slowest), every step:
        # the gather is a collective all processes take part in.
        sums = got.sums(cfg.spec.alpha)
        names = sorted(sums)
        local = np.array([sums[k] for k in names] + [got.rollout_seconds, got.check_seconds], np.float64)
        gathered = scaffold.allgather(local)
        totals = {k: float(v) for k, v in zip(names, gathered[:, : len(names)].sum(0).tolist())}
        t_rollout, t_check = float(gathered[:, len(names)].max()), float(gathered[:, len(names) + 1].max())
        tokens = totals["response_tokens"]
        return dict(step=number, **row, **means(totals), learning_rate=float(schedule(number - 1)),
                    rollout_tokens_per_s=tokens / max(t_rollout, 1e-9),
                    check_tokens_per_s=tokens / max(t_check, 1e-9),
                    update_tokens_per_s=settings.grpo_iterations * tokens / max(t_update, 1e-9),
                    rollout_seconds=float(t_rollout), check_seconds=float(t_check),
                    update_seconds=float(t_update))

    with run:
        meta = run.resume(iterator, policy=policy, optimizer=optimizer, reference=reference)
        if meta:
            rng["key"] = jax.random.wrap_key_data(np.asarray(meta["rng_key"], np.uint32))
        end = run.loop(step, stop_after=stop_after, progress=progress,
                       extra_meta=lambda: {"rng_key": np.asarray(jax.random.key_data(rng["key"])).tolist()},
                       postfix=lambda row: dict(reward=f"{row['reward']:.3f}", accept=f"{row['acceptance_rate']:.2f}",
                                                kl=f"{row['kl']:.4f}"))
    result = {"step": end.step, "metrics": end.last, "history": end.history, "policy": policy,
              "optimizer": optimizer}
    if end.stopped:
        return result
    if export:
        source = resolve_checkpoint(cfg.draft)
        with open(os.path.join(source, "config.json")) as f:
            model_config = json.load(f)
        run.export(policy, mesh, fsdp=fsdp, model_config=model_config, processor_files=source)
    return dict(result, export_dir=run.export_dir)
