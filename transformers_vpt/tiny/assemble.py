"""Complete tiny models with their matching processors, random weights: a VPT model of any base, and the plain
(stock) base model that tests, the demo and the tiny recipes start from."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin

from ..models.bases import get_base
from ..models.vpt.processing_vpt import VPTProcessorMixin
from ..vocabulary import BRANCH_KINDS, IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START, add_vpt_tokens
from .model import TINY_BASES, tiny_config
from .processor import build_tiny_processor
from .tokenizer import build_tiny_tokenizer


def qwen2_vl_token_fields(tokenizer: PreTrainedTokenizerBase) -> dict[str, int | None]:
    """The Qwen-VL config fields that name tokens (image/video pads, vision delimiters, eos, pad), from
    ``tokenizer`` (the same fields for every base)."""
    ids = tokenizer.convert_tokens_to_ids
    return {
        "image_token_id": ids(IMAGE_PAD),
        "video_token_id": ids(VIDEO_PAD),
        "vision_start_token_id": ids(VISION_START),
        "vision_end_token_id": ids(VISION_END),
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def build_tiny_vpt(
    vision_encoder_ls: Sequence[str] = BRANCH_KINDS,
    seed: int = 0,
    save_dir: str | os.PathLike | None = None,
    base: str = "qwen2_vl",
) -> tuple[PreTrainedModel, VPTProcessorMixin]:
    """Build a tiny two-pass VPT model of ``base`` (in eval mode) and the tiny processor whose tokenizer it matches.

    Args:
        vision_encoder_ls: Re-encoding branches of the model; the tokenizer gets exactly their tokens, as the
            released single-branch tokenizers do.
        seed: Seed of the random weights.
        save_dir: If given, the model and the processor are saved there with ``save_pretrained``.
        base: A key of `transformers_vpt.models.bases.VPT_BASES` (``qwen2_vl``, ``qwen2_5_vl``, ``qwen3_vl``): the model
            is that base's VPT class (`VPT_Qwen2VLForConditionalGeneration`, ...) with its tiny vision tower, the
            processor that base's VPT processor.
    """
    model_class = get_base(base).model_class
    tokenizer = build_tiny_tokenizer(vision_encoder_ls)
    processor = build_tiny_processor(tokenizer, base=base)
    config = tiny_config(vision_encoder_ls, base=base, **qwen2_vl_token_fields(tokenizer))
    add_vpt_tokens(tokenizer, config)
    torch.manual_seed(seed)
    model = model_class(config).eval()
    if save_dir is not None:
        model.save_pretrained(save_dir)
        processor.save_pretrained(save_dir)
    return model, processor


def build_tiny_base(
    base: str = "qwen2_vl",
    seed: int | None = 0,
    save_dir: str | os.PathLike | None = None,
    safe_serialization: bool = True,
    **config_overrides,
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Build the tiny stock model of ``base`` (in eval mode) and its stock processor: `Qwen2VLForConditionalGeneration`
    and `Qwen2VLProcessor`, `Qwen2_5_VLForConditionalGeneration` and `Qwen2_5_VLProcessor`, ..., with the tiny
    tokenizer without any VPT token, the tiny image sizes, and the text and vision widths of the tiny VPT models.

    Args:
        base: A key of `transformers_vpt.models.bases.VPT_BASES`.
        seed: Seed of the random weights; None leaves the global random state alone (no seeding).
        save_dir: If given, the model and the processor are saved there with ``save_pretrained``.
        safe_serialization: Save safetensors (True) or ``pytorch_model.bin`` (False).
        config_overrides: Fields of the base's stock config (e.g. ``eos_token_id=None``).
    """
    entry = get_base(base)
    tokenizer = build_tiny_tokenizer(vision_encoder_ls=(), with_regions=False)
    images = build_tiny_processor(tokenizer, base=base)
    processor = entry.stock_processor_class(
        image_processor=images.image_processor,
        tokenizer=tokenizer,
        video_processor=images.video_processor,
        chat_template=tokenizer.chat_template,
    )
    _, vision, text = TINY_BASES[base]
    fields = {"text_config": text, "vision_config": vision, "tie_word_embeddings": False}
    config = entry.stock_model_class.config_class(**fields | qwen2_vl_token_fields(tokenizer) | config_overrides)
    if seed is not None:
        torch.manual_seed(seed)
    model = entry.stock_model_class(config).eval()
    if save_dir is not None:
        model.save_pretrained(save_dir, safe_serialization=safe_serialization)
        processor.save_pretrained(save_dir)
    return model, processor


def build_tiny_qwen2_vl(
    seed: int | None = 0,
    save_dir: str | os.PathLike | None = None,
    safe_serialization: bool = True,
    base: str = "qwen2_vl",
    **config_overrides,
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """`build_tiny_base` under its first name: by default a tiny plain `Qwen2VLForConditionalGeneration` and its
    `Qwen2VLProcessor`; ``base="qwen2_5_vl"`` gives the Qwen2.5-VL ones."""
    return build_tiny_base(base, seed, save_dir, safe_serialization, **config_overrides)
