"""A small Qwen-style tokenizer for the embedded world, and the processor files beside it.

Same design as Qwen2's tokenizer (byte-level BPE behind Qwen's pre-tokenizer regex, digits
split one by one, the Qwen-VL special tokens and chat template), trained with HF `tokenizers`
on this world's text. A 512-token vocabulary instead of 151k keeps the embedding and output
layers of the shipped tiny models small: with the real vocabulary they alone would exceed the
30 MB asset budget.
"""

from __future__ import annotations

import json
import os

import numpy as np

from ..prompts import WORLD_INSTRUCTION, WORLD_JUDGE_INSTRUCTION, WORLD_SPECREASON_PREFIX, WORLD_SPECREASON_PROMPT
from .synthetic import judging_example, make_problem

# Qwen2's pre-tokenizer regex, as in its tokenizer.json.
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>")
IMAGE_SIZE_PIXELS = 64 * 64  # the world's 2x2 grids


def training_corpus(seed: int = 0, count: int = 4000):
    """Text of this world: prompts, steps, the judging suffix and verdicts, the default
    instructions of the package (so any configured prompt still tokenizes sensibly)."""
    from .. import prompts as paper  # the paper's prompts, the package defaults

    rng = np.random.default_rng(seed)
    fixed = [WORLD_INSTRUCTION, WORLD_JUDGE_INSTRUCTION, WORLD_SPECREASON_PROMPT, WORLD_SPECREASON_PREFIX,
             paper.REASONING_INSTRUCTION, paper.JUDGE_INSTRUCTION, paper.SPECREASON_PROMPT, paper.SPECREASON_PREFIX,
             paper.LOOKAHEAD_PROMPT,
             "positive", " positive", "negative", " negative", "user\n", "assistant\n", "system\n",
             "You are a helpful assistant."]
    for i in range(count):
        p = make_problem(seed, "train", i)
        ex = judging_example(p, rng)
        yield f"{WORLD_INSTRUCTION}\n\n{p.question}\n" + "".join(s + "\n\n" for s in p.steps)
        yield ex.candidate + "\n\n" + ("positive" if ex.label else "negative")
        yield f"user\nassistant\n{WORLD_JUDGE_INSTRUCTION}\n{WORLD_SPECREASON_PROMPT}\n{WORLD_SPECREASON_PREFIX}"
        if i < 200:
            yield from fixed


def train_tokenizer(vocab_size: int = 512, seed: int = 0):
    """A `tokenizers.Tokenizer` with Qwen2's pipeline, trained on `training_corpus`."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(training_corpus(seed), trainer=trainer)
    return tok


def write_tokenizer_files(folder: str, vocab_size: int = 512, seed: int = 0) -> dict:
    """Tokenizer, chat template and 96x96 image-processor config in `folder`; returns the
    special-token ids a config.json needs."""
    from transformers import PreTrainedTokenizerFast

    from ..processing import write_image_processor_files

    os.makedirs(folder, exist_ok=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(vocab_size, seed), eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", additional_special_tokens=list(SPECIAL_TOKENS[1:]),
                                   model_max_length=32768, clean_up_tokenization_spaces=False)
    fast.save_pretrained(folder)
    # Load through transformers' Qwen2 tokenizer class, like the real checkpoints.
    path = os.path.join(folder, "tokenizer_config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(tokenizer_class="Qwen2Tokenizer", bos_token=None, unk_token=None, errors="replace",
               split_special_tokens=False, add_prefix_space=False)
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)
    write_image_processor_files(folder, shortest_edge=IMAGE_SIZE_PIXELS, longest_edge=IMAGE_SIZE_PIXELS)
    ids = {name: fast.convert_tokens_to_ids(name) for name in SPECIAL_TOKENS}
    return {"vocab_size": len(fast), "eos_token_id": ids["<|im_end|>"], "bos_token_id": ids["<|endoftext|>"],
            "image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
            "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"]}
