"""`make demo` (`dreamr demo`): every method on the embedded world with the shipped pair.

Also the tiny random-weight Qwen3-VL checkpoints (real Qwen tokenizer) the tests build.
"""

from __future__ import annotations

import os
import shutil
import time


DEMO_DIR = os.path.join("out", "demo-qwen3-vl-tiny")


def tiny_qwen3_vl_config(vocab_size: int = 151936) -> dict:
    """A small Qwen3-VL (real vocabulary and special-token ids) in config.json form."""
    return {
        "model_type": "qwen3_vl",
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "tie_word_embeddings": True,
        "image_token_id": 151655, "video_token_id": 151656,
        "vision_start_token_id": 151652, "vision_end_token_id": 151653,
        "text_config": {
            "model_type": "qwen3_vl_text", "vocab_size": vocab_size, "hidden_size": 128, "intermediate_size": 384,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
            "rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "tie_word_embeddings": True,
            "bos_token_id": 151643, "eos_token_id": 151645, "hidden_act": "silu",
            "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [6, 5, 5],
                                "mrope_interleaved": True},
        },
        "vision_config": {
            "model_type": "qwen3_vl_vision", "depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 4,
            "patch_size": 16, "temporal_patch_size": 2, "spatial_merge_size": 2, "in_channels": 3,
            "out_hidden_size": 128, "num_position_embeddings": 256, "deepstack_visual_indexes": [0],
            "hidden_act": "gelu_pytorch_tanh",
        },
    }


def write_processor_files(folder: str, *, shortest_edge: int, longest_edge: int) -> None:
    """Next to a checkpoint's weights: the real Qwen tokenizer files, the Qwen-VL chat template
    and a Qwen3-VL preprocessor config bounded to small images (fast on a CPU)."""
    from .processing import qwen_tokenizer_dir, write_image_processor_files

    for name in os.listdir(qwen_tokenizer_dir()):
        shutil.copy(os.path.join(qwen_tokenizer_dir(), name), folder)
    write_image_processor_files(folder, shortest_edge=shortest_edge, longest_edge=longest_edge)


def build_demo_checkpoint(folder: str = DEMO_DIR, seed: int = 0) -> str:
    """Random weights + the real Qwen tokenizer + a small-image preprocessor config."""
    from flax import nnx

    from .models.qwen_vl.config import QwenVLConfig
    from .models.qwen_vl.model import QwenVLModel
    from .models.qwen_vl.params import save_state

    config = tiny_qwen3_vl_config()
    model = QwenVLModel(QwenVLConfig.from_hf(config), rngs=nnx.Rngs(seed))
    save_state(model, folder, config)
    write_processor_files(folder, shortest_edge=32 * 32 * 4, longest_edge=256 * 256)
    return folder


def demo_image(path: str) -> str:
    """A small rendered picture (coloured shapes and digits) to feed the pipeline."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (224, 160), "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle([10, 10, 70, 70], fill="red")
    draw.ellipse([90, 20, 150, 80], fill="blue")
    draw.polygon([(180, 80), (210, 20), (220, 80)], fill="green")
    for i, digit in enumerate("3721"):
        draw.text((20 + 50 * i, 110), digit, fill="black")
    img.save(path)
    return path


DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "synthetic.yaml")


def run_demo(out_dir: str = os.path.join("out", "demo"), count: int = 100, config: str = DEFAULT_CONFIG,
             methods=None, progress: bool = True, fresh: bool = True, projection=None) -> list[dict]:
    """`make demo`: the shipped target/draft pair on `count` synthetic test problems with every
    method; prints the table (accuracy, acceptance, latency, speedup over target alone and the
    projected speedup) and writes the plots and per-problem traces to `out_dir`. A demo is a
    measurement, so by default it measures again: an earlier `results.jsonl` there is kept as
    `results.<time>.jsonl` and a new one started (its speedups compare times of one run). With
    `fresh=False` (`--resume`) it resumes an interrupted demo like `dreamr eval`. A
    `projection.Projection` (`--project`) adds its `projected@HW` speedup column. `methods`:
    every method (`METHODS`) by default."""
    from .config import load_config
    from .data import synthetic
    from .evaluate import EvalError, check_methods, check_out_dir, locked_out_dir, read_records, run_eval
    from .speculative import SpeculativeReasoner
    from .speculative.config import METHODS

    methods = METHODS if methods is None else methods
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise EvalError(f"--count must be an integer >= 1, got {count!r}")
    check_out_dir(out_dir)
    t0 = time.perf_counter()
    cfg = load_config(config)
    check_methods(methods, has_draft=cfg.draft is not None, pair=config)
    with locked_out_dir(out_dir):  # before the data are written and the models load
        data = synthetic.write_split(os.path.join(out_dir, "data"), "test", count)
        reasoner = SpeculativeReasoner(draft=cfg.draft, target=cfg.target, config=cfg.spec, dtype=cfg.dtype)
        t = reasoner.target.model.cfg.text
        d = reasoner.draft.model.cfg.text if reasoner.draft else None
        print(f"target: {cfg.target} ({t.num_hidden_layers} layers x {t.hidden_size}); "
              + (f"draft: {cfg.draft} ({d.num_hidden_layers} layers x {d.hidden_size}); " if d else "no draft; ")
              + f"{count} synthetic test problems")
        # The warm-up is a whole untimed pass (about half a minute here): FPSR packs its checks by
        # timing, so only the run's own problems reach the check shapes the timed pass will meet.
        rows = run_eval(reasoner, read_records(data), methods, out_dir, warmup_records=count, progress=progress,
                        fresh=fresh, projection=projection)
    print(f"demo total {time.perf_counter() - t0:.0f} s")
    return rows
