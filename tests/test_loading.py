"""dreamr_jax.loading.load_model: shards, both key layouts, the flat Qwen2.5-VL config, bfloat16
tensors, tied embeddings, and clear errors for checkpoints that do not fit."""

from __future__ import annotations

import copy
import json
import os
import shutil

import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from dreamr_jax.hub import NotACheckpointError
from dreamr_jax.loading import load_model
from dreamr_jax.models.qwen_vl.config import UnsupportedModelError
from dreamr_jax.models.qwen_vl.params import CheckpointError

from helpers.models import image_prompt, jax_logits, random_image_inputs, tiny_config_dict, torch_logits

LOGITS_TOL = 1e-4  # dreamr_jax vs transformers, float32
BF16_LOGITS_TOL = 1e-5  # bf16 checkpoint loaded as float32 vs transformers on the same bf16-rounded weights

GRIDS = [(1, 4, 6)]


# ---- helpers ------------------------------------------------------------------------------------


def flat_state(model) -> dict:
    return {tuple(map(str, path)): np.asarray(var.get_value()) for path, var in nnx.to_flat_state(nnx.state(model))}


def assert_same_state(a, b):
    sa, sb = flat_state(a), flat_state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape, k
        np.testing.assert_array_equal(sa[k], sb[k], err_msg=str(k))


def probe_inputs(model):
    """A one-image prompt (so vision, deepstack and text weights all matter)."""
    pix, g = random_image_inputs(GRIDS, model.cfg.vision.patch_dim, seed=11)
    ids = np.array(image_prompt(np.random.default_rng(11), [GRIDS]))
    return ids, None, pix, g


def rewrite_checkpoint(src: str, dst: str, edit=None, config_edit=None) -> str:
    """Copy a single-file checkpoint, passing its tensors (numpy, by key) through `edit`."""
    os.makedirs(dst, exist_ok=True)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    if edit is not None:
        tensors = edit(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    if config_edit is not None:
        config = config_edit(config)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    return dst


@pytest.fixture(scope="module")
def reference(tiny_checkpoints):
    """The untied Qwen3-VL checkpoint loaded from its single file, with its probe logits."""
    folder, tm = tiny_checkpoints["qwen3_vl"]
    model = load_model(folder)
    return model, jax_logits(model, *probe_inputs(model))


# ---- layouts ------------------------------------------------------------------------------------


def test_sharded_checkpoint_with_index(tiny_checkpoints, reference, tmp_path):
    _, tm = tiny_checkpoints["qwen3_vl"]
    ref_model, ref_logits = reference
    tm.save_pretrained(tmp_path, max_shard_size="50KB")
    shards = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(shards) > 2 and "model.safetensors" not in shards
    with open(tmp_path / "model.safetensors.index.json") as f:
        assert set(json.load(f)["weight_map"].values()) == set(shards)

    model = load_model(str(tmp_path))
    assert_same_state(model, ref_model)
    np.testing.assert_array_equal(jax_logits(model, *probe_inputs(model)), ref_logits)

    # An index that names a shard which is not there is reported by file name.
    os.remove(tmp_path / shards[-1])
    with pytest.raises(CheckpointError) as e:
        load_model(str(tmp_path))
    assert shards[-1] in str(e.value)


def to_layout(tensors: dict, layout: str) -> dict:
    """Rename checkpoint keys to the current layout (`model.language_model.*`, `model.visual.*`) or to the
    older one of the first Qwen2.5-VL releases (`model.*`, `visual.*`), which transformers 5 still writes
    for Qwen2.5-VL. `lm_head.*` is the same in both."""
    out = {}
    for k, v in tensors.items():
        for prefix in ("model.language_model.", "model.visual.", "visual.", "model."):
            if k.startswith(prefix):
                part = "text" if prefix in ("model.language_model.", "model.") else "visual"
                rest = k[len(prefix):]
                break
        else:
            assert k == "lm_head.weight", k
            out[k] = v
            continue
        if layout == "new":
            k = ("model.language_model." if part == "text" else "model.visual.") + rest
        else:
            k = ("model." if part == "text" else "visual.") + rest
        out[k] = v
    assert len(out) == len(tensors)
    return out


@pytest.mark.parametrize("layout", ["old", "new"])
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_key_layouts(tiny_checkpoints, tmp_path, family, layout):
    folder, tm = tiny_checkpoints[family]
    moved = rewrite_checkpoint(folder, str(tmp_path / layout), lambda t: to_layout(t, layout))
    keys = load_file(os.path.join(moved, "model.safetensors")).keys()
    text_prefix, vision_prefix = (("model.", "visual.") if layout == "old"
                                  else ("model.language_model.", "model.visual."))
    assert any(k.startswith(text_prefix + "layers.") for k in keys)
    assert any(k.startswith(vision_prefix + "blocks.") for k in keys)
    assert "lm_head.weight" in keys
    if layout == "old":
        assert not any(k.startswith(("model.language_model.", "model.visual.")) for k in keys)

    model, saved = load_model(moved), load_model(folder)
    assert_same_state(model, saved)
    inputs = probe_inputs(model)
    ours = jax_logits(model, *inputs)
    np.testing.assert_array_equal(ours, jax_logits(saved, *inputs))
    assert np.abs(ours - torch_logits(tm, *inputs)).max() <= LOGITS_TOL


def flat_qwen2_5_config(config: dict) -> dict:
    """A nested Qwen2.5-VL config.json -> the flat layout of the original hub releases:
    text fields at the top level, `rope_scaling` with type "mrope", `vision_config` nested."""
    text = config.pop("text_config")
    rope = text.pop("rope_parameters")
    for drop in ("model_type", "architectures", "dtype", "transformers_version"):
        text.pop(drop, None)
    flat = {**config, **text}
    flat.pop("dtype", None)
    flat.update(
        rope_theta=rope["rope_theta"],
        rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]},
        torch_dtype="float32",
        use_sliding_window=False,
        sliding_window=32768,
        max_window_layers=3,
        vision_token_id=config.get("vision_start_token_id"),
    )
    flat["vision_config"] = dict(config["vision_config"], in_chans=3, spatial_patch_size=4)
    return flat


def test_flat_qwen2_5_config(tiny_checkpoints, tmp_path):
    folder, tm = tiny_checkpoints["qwen2_5_vl"]
    flat = rewrite_checkpoint(folder, str(tmp_path / "flat"), config_edit=flat_qwen2_5_config)
    with open(os.path.join(flat, "config.json")) as f:
        config = json.load(f)
    assert "text_config" not in config and "hidden_size" in config and "rope_scaling" in config

    model, nested = load_model(flat), load_model(folder)
    assert model.cfg == nested.cfg
    assert model.cfg.text.mrope_section == (2, 3, 3) and model.cfg.text.num_hidden_layers == 3
    inputs = probe_inputs(model)
    ours = jax_logits(model, *inputs)
    np.testing.assert_array_equal(ours, jax_logits(nested, *inputs))
    assert np.abs(ours - torch_logits(tm, *inputs)).max() <= LOGITS_TOL


def test_bfloat16_checkpoint(tiny_checkpoints, reference, tmp_path):
    from safetensors.torch import load_file as load_torch, save_file as save_torch

    folder, tm = tiny_checkpoints["qwen3_vl"]
    ref_model, _ = reference
    bf16_dir = tmp_path / "bf16"
    bf16_dir.mkdir()
    tensors = {k: v.to(torch.bfloat16) for k, v in load_torch(os.path.join(folder, "model.safetensors")).items()}
    save_torch(tensors, str(bf16_dir / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(os.path.join(folder, "config.json"), bf16_dir / "config.json")

    model = load_model(str(bf16_dir), dtype="float32")
    # Every parameter is exactly the float32 one rounded to bfloat16 (transposes/reshapes included).
    ours, full = flat_state(model), flat_state(ref_model)
    for k in full:
        assert ours[k].dtype == np.float32, k
        np.testing.assert_array_equal(ours[k], full[k].astype(ml_dtypes.bfloat16).astype(np.float32), err_msg=str(k))

    rounded = copy.deepcopy(tm)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
    inputs = probe_inputs(model)
    err = np.abs(jax_logits(model, *inputs) - torch_logits(rounded, *inputs)).max()
    assert err <= BF16_LOGITS_TOL, f"bf16 checkpoint logits differ by {err}"

    # And kept in bfloat16 when asked.
    as_bf16 = load_model(str(bf16_dir), dtype="bfloat16")
    assert {v.dtype for v in flat_state(as_bf16).values()} == {np.dtype(ml_dtypes.bfloat16)}


def test_tied_embeddings(tiny_checkpoints, tmp_path):
    folder, tm = tiny_checkpoints["qwen3_vl_tied"]
    assert "lm_head.weight" not in load_file(os.path.join(folder, "model.safetensors"))
    model = load_model(folder)
    assert model.cfg.tie_word_embeddings and model.lm_head is None
    ids = np.random.default_rng(12).integers(0, 400, (1, 10))
    ours = jax_logits(model, ids)
    assert np.abs(ours - torch_logits(tm, ids)).max() <= LOGITS_TOL

    # A tied checkpoint that stores the head anyway still loads (the embedding is used).
    def add_head(t):
        return dict(t, **{"lm_head.weight": t["model.language_model.embed_tokens.weight"].copy()})

    with_head = load_model(rewrite_checkpoint(folder, str(tmp_path / "with_head"), add_head))
    np.testing.assert_array_equal(jax_logits(with_head, ids), ours)


# ---- errors -------------------------------------------------------------------------------------


def test_not_a_checkpoint(tmp_path):
    missing = tmp_path / "no_such_folder"
    with pytest.raises(NotACheckpointError) as e:
        load_model(str(missing))
    assert "no_such_folder" in str(e.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NotACheckpointError) as e:
        load_model(str(empty))
    assert str(empty) in str(e.value) and "config.json" in str(e.value)

    a_file = tmp_path / "weights.safetensors"
    a_file.write_bytes(b"")
    with pytest.raises(NotACheckpointError) as e:
        load_model(str(a_file))
    assert "weights.safetensors" in str(e.value)


def test_unsupported_model_type(tmp_path):
    config = tiny_config_dict("qwen3_vl")
    config["model_type"] = "llama"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError) as e:
        load_model(str(tmp_path))
    assert "'llama'" in str(e.value)


MLP_KEY = "model.language_model.layers.1.mlp.up_proj.weight"


def test_missing_tensor(tiny_checkpoints, tmp_path):
    folder, _ = tiny_checkpoints["qwen3_vl"]
    bad = rewrite_checkpoint(folder, str(tmp_path), lambda t: {k: v for k, v in t.items() if k != MLP_KEY})
    with pytest.raises(CheckpointError) as e:
        load_model(bad)
    msg = str(e.value)
    assert "missing" in msg and "model.language_model.layers.1.mlp.up_proj.weight" in msg
    assert "layers.0.mlp.up_proj.weight" not in msg  # only the missing one is named


def test_unexpected_tensor(tiny_checkpoints, tmp_path):
    folder, _ = tiny_checkpoints["qwen3_vl"]
    extra = "model.language_model.layers.0.mlp.extra_proj.weight"
    bad = rewrite_checkpoint(folder, str(tmp_path), lambda t: dict(t, **{extra: np.zeros((3, 4), np.float32)}))
    with pytest.raises(CheckpointError) as e:
        load_model(bad)
    assert "unexpected" in str(e.value) and extra in str(e.value)


def test_wrong_shape(tiny_checkpoints, tmp_path):
    folder, _ = tiny_checkpoints["qwen3_vl"]

    def shrink(t):
        assert t[MLP_KEY].shape == (96, 64)
        return dict(t, **{MLP_KEY: t[MLP_KEY][:95]})

    bad = rewrite_checkpoint(folder, str(tmp_path), shrink)
    with pytest.raises(CheckpointError) as e:
        load_model(bad)
    msg = str(e.value)
    assert MLP_KEY in msg and "[95, 64]" in msg  # the key and the checkpoint's shape
    assert "the config implies [96, 64]" in msg  # and the shape expected, in the checkpoint's orientation


def test_hub_id_not_in_cache_offline(monkeypatch, tmp_path):
    """A hub id goes through the Hugging Face cache; offline with an empty cache: a clear error."""
    import huggingface_hub.constants

    from dreamr_jax.hub import NotACheckpointError, resolve_checkpoint

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(NotACheckpointError, match="Qwen/Qwen3-VL-2B-Instruct"):
        resolve_checkpoint("Qwen/Qwen3-VL-2B-Instruct")


def test_hub_id_found_in_cache_offline(monkeypatch, tmp_path, tiny_checkpoints):
    """A hub id whose snapshot sits in the Hugging Face cache loads offline."""
    import shutil

    import huggingface_hub.constants

    folder, torch_model = tiny_checkpoints["qwen3_vl"]
    revision = "0" * 40
    snapshot = tmp_path / "models--tiny-org--tiny-qwen3-vl" / "snapshots" / revision
    shutil.copytree(folder, snapshot)
    (tmp_path / "models--tiny-org--tiny-qwen3-vl" / "refs").mkdir()
    (tmp_path / "models--tiny-org--tiny-qwen3-vl" / "refs" / "main").write_text(revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    model = load_model("tiny-org/tiny-qwen3-vl")
    assert model.checkpoint_path == str(snapshot)


def test_two_loads_share_one_graph_definition():
    """Loading the same checkpoint twice gives equal NNX graph definitions, so jitted functions
    keyed on them are reused rather than recompiled (a lambda activation once broke this)."""
    first, _ = nnx.split(load_model("asset:draft"))
    second, _ = nnx.split(load_model("asset:draft"))
    assert first == second and hash(first) == hash(second)


# ---- safetensors_io: the one reader / writer ----------------------------------------------------


def test_safetensors_round_trip_every_dtype(tmp_path):
    """Every dtype of the one table round-trips through our writer and reader, each tensor starts
    at a multiple of its item size, and the safetensors library reads what we write."""
    from dreamr_jax.safetensors_io import DTYPES, SafetensorsFile, read_header, write_safetensors

    rng = np.random.default_rng(0)
    tensors = {f"t.{name}": rng.integers(0, 2, (3, 5)).astype(dtype) for name, dtype in DTYPES.items()}
    tensors["scalar"] = np.array(1.5, ml_dtypes.bfloat16)
    tensors["empty"] = np.zeros((0, 4), np.float32)
    path = str(tmp_path / "all.safetensors")
    write_safetensors(path, tensors, metadata={"format": "pt", "note": "x"})
    reader = SafetensorsFile(path)
    assert sorted(reader.keys()) == sorted(tensors)
    for key, want in tensors.items():
        got = reader.read(key)
        assert got.dtype == want.dtype and got.shape == want.shape, key
        np.testing.assert_array_equal(got.astype(np.float64), want.astype(np.float64), err_msg=key)
        assert (reader.data_start + reader.entries[key]["data_offsets"][0]) % want.dtype.itemsize == 0, key
    assert read_header(path).keys() == tensors.keys()
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        assert json.loads(f.read(n))["__metadata__"] == {"format": "pt", "note": "x"}
    standard = {k: v for k, v in tensors.items() if not k.startswith(("t.BF16", "t.F8", "scalar"))}
    write_safetensors(path, standard)
    back = load_file(path)
    for key, want in standard.items():
        np.testing.assert_array_equal(back[key], want, err_msg=key)


def test_safetensors_writer_is_atomic(tmp_path, monkeypatch):
    """The writer replaces the file in one rename: a failed write leaves the old file whole and no
    temporary file behind."""
    from dreamr_jax.safetensors_io import SafetensorsFile, write_safetensors

    path = str(tmp_path / "model.safetensors")
    write_safetensors(path, {"a": np.arange(4, dtype=np.float32)})
    with pytest.raises(ValueError, match="complex"):
        write_safetensors(path, {"a": np.zeros(2, np.float32), "b": np.zeros(2, np.complex64)})

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(os, "fsync", disk_full)  # fails after the temporary file is written
        with pytest.raises(OSError, match="No space"):
            write_safetensors(path, {"a": np.zeros(2, np.float32)})
    assert os.listdir(tmp_path) == ["model.safetensors"]
    np.testing.assert_array_equal(SafetensorsFile(path).read("a"), np.arange(4, dtype=np.float32))
    write_safetensors(path, {"a": np.ones(2, np.float16)})
    assert os.listdir(tmp_path) == ["model.safetensors"]
    np.testing.assert_array_equal(SafetensorsFile(path).read("a"), np.ones(2, np.float16))


def test_reader_rejects_truncated_file(tmp_path):
    from dreamr_jax.safetensors_io import SafetensorsFile, write_safetensors

    path = str(tmp_path / "cut.safetensors")
    write_safetensors(path, {"w": np.zeros((8, 8), np.float32)})
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 4)
    with pytest.raises(CheckpointError, match="truncated") as e:
        SafetensorsFile(path)
    assert path in str(e.value) and "'w'" in str(e.value)
