"""A tiny, offline Qwen2-style tokenizer for tests and demos.

The tokenizer is a byte-level BPE trained in a few milliseconds on a small built-in corpus, with the Qwen2
pre-tokenizer, the 14 Qwen2-VL special tokens appended in Qwen's order, Qwen2-VL's eos/pad choices, the VPT chat
template and the VPT tokens. Nothing is downloaded, and the result is deterministic.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import Qwen2TokenizerFast
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from ..models.qwen2_vl_vpt.processing_qwen2_vl_vpt import VPT_CHAT_TEMPLATE
from ..vocabulary import BRANCH_KINDS, REENCODE_TRIGGER, REGION_TRIGGER, add_vpt_tokens

QWEN2_PATTERN = PRETOKENIZE_REGEX
"""The Qwen2 pre-tokenizer regex (numbers split digit by digit, unlike GPT-4's ``\\p{N}{1,3}``)."""

QWEN2_VL_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
"""The special tokens Qwen2-VL appends after its BPE vocabulary, in id order (151643-151656 in the real one)."""

TINY_VOCAB_SIZE = 384
"""Embedding rows of the tiny models; ``len(build_tiny_tokenizer())`` never exceeds it."""

TINY_BPE_VOCAB_SIZE = 328
"""Size of the trained byte-level BPE part (256 bytes + merges), before the special and VPT tokens."""

_CORPUS = (
    "You are a helpful assistant.",
    "What is in the image? What colour is the object? Answer the question with a single word.",
    "Describe the image. The image shows a red circle, a blue square and a green triangle.",
    "Is there a yellow star on the left or on the right? There is a white rectangle at the top.",
    "How many shapes are there? There are 3 shapes: 1 circle, 1 square and 1 triangle.",
    "Which colour is the largest shape? The largest shape is black. The smallest one is orange.",
    "question answer image region object shape colour color red green blue yellow black white orange purple",
    "pink brown gray grey circle square triangle rectangle star dot line left right top bottom center middle",
    "Yes. No. The dog is on the pillow. A cat sits on a chair next to the table.",
    "system user assistant Picture Video Region",
    REGION_TRIGGER,
    REENCODE_TRIGGER,
    "Now answer the question.",
    "0 1 2 3 4 5 6 7 8 9 10 100 2024",
)


def build_tiny_tokenizer(
    vision_encoder_ls: Sequence[str] = BRANCH_KINDS,
    with_regions: bool = True,
    save_dir: str | os.PathLike | None = None,
) -> Qwen2TokenizerFast:
    """Build the tiny Qwen2-VL-style tokenizer with the VPT tokens of ``vision_encoder_ls``.

    Args:
        vision_encoder_ls: Branches whose image pad and action tokens are added (``"dino"``, ``"sam"``, ``"clip"``).
        with_regions: Whether to add the 18 region tokens.
        save_dir: If given, the tokenizer is also saved there with ``save_pretrained``.

    Returns:
        A `Qwen2TokenizerFast` whose ``len`` is at most [`TINY_VOCAB_SIZE`].
    """
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_BPE_VOCAB_SIZE,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(_CORPUS, trainer=trainer)

    tokenizer = qwen2_vl_tokenizer_from_backend(backend)
    add_vpt_tokens(tokenizer, vision_encoder_ls=vision_encoder_ls, with_regions=with_regions)
    if save_dir is not None:
        tokenizer.save_pretrained(save_dir)
    return tokenizer


def qwen2_vl_tokenizer_from_backend(backend: Tokenizer) -> Qwen2TokenizerFast:
    """Append the Qwen2-VL special tokens to a byte-level BPE ``backend`` (in place) and wrap it like Qwen2-VL's.

    With the real Qwen2 BPE (151,643 ranks) the special tokens get Qwen2-VL's ids 151643-151656. The wrapper has
    Qwen2-VL's settings: eos ``<|im_end|>``, pad ``<|endoftext|>``, no bos or unk token, and the chat template
    [`VPT_CHAT_TEMPLATE`] (Qwen2-VL's rendering, extended with the VPT content parts).
    """
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN2_VL_SPECIAL_TOKENS])
    return Qwen2TokenizerFast(
        tokenizer_object=backend,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(QWEN2_VL_SPECIAL_TOKENS[1:]),
        chat_template=VPT_CHAT_TEMPLATE,
        model_max_length=32768,
    )
