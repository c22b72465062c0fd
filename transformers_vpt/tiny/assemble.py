"""Complete tiny models with their matching processors, random weights: a VPT model, and the plain Qwen2-VL that
tests, the demo and the tiny recipes start from."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase, Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

from ..models.qwen2_vl_vpt import VPT_Qwen2VLForConditionalGeneration
from ..models.qwen2_vl_vpt.processing_qwen2_vl_vpt import VIDEO_PAD, VPT_Qwen2VLProcessor
from ..vocabulary import BRANCH_KINDS, IMAGE_PAD, VISION_END, VISION_START, add_vpt_tokens
from .model import TINY_TEXT, TINY_VISION, tiny_config
from .processor import build_tiny_processor
from .tokenizer import build_tiny_tokenizer


def qwen2_vl_token_fields(tokenizer: PreTrainedTokenizerBase) -> dict[str, int | None]:
    """The Qwen2-VL config fields that name tokens (image/video pads, vision delimiters, eos, pad), from
    ``tokenizer``."""
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
) -> tuple[VPT_Qwen2VLForConditionalGeneration, VPT_Qwen2VLProcessor]:
    """Build a tiny two-pass VPT model (in eval mode) and the tiny processor whose tokenizer it matches.

    Args:
        vision_encoder_ls: Re-encoding branches of the model; the tokenizer gets exactly their tokens, as the
            released single-branch tokenizers do.
        seed: Seed of the random weights.
        save_dir: If given, the model and the processor are saved there with ``save_pretrained``.
    """
    tokenizer = build_tiny_tokenizer(vision_encoder_ls)
    processor = build_tiny_processor(tokenizer)
    config = tiny_config(vision_encoder_ls, **qwen2_vl_token_fields(tokenizer))
    add_vpt_tokens(tokenizer, config)
    torch.manual_seed(seed)
    model = VPT_Qwen2VLForConditionalGeneration(config).eval()
    if save_dir is not None:
        model.save_pretrained(save_dir)
        processor.save_pretrained(save_dir)
    return model, processor


def build_tiny_qwen2_vl(
    seed: int | None = 0,
    save_dir: str | os.PathLike | None = None,
    safe_serialization: bool = True,
    **config_overrides,
) -> tuple[Qwen2VLForConditionalGeneration, Qwen2VLProcessor]:
    """Build a tiny plain Qwen2-VL (in eval mode) and its `Qwen2VLProcessor`: the tiny tokenizer without any VPT
    token and the tiny image sizes, the text and vision widths of the tiny VPT models.

    Args:
        seed: Seed of the random weights; None leaves the global random state alone (no seeding).
        save_dir: If given, the model and the processor are saved there with ``save_pretrained``.
        safe_serialization: Save safetensors (True) or ``pytorch_model.bin`` (False).
        config_overrides: Fields of the `Qwen2VLConfig` (e.g. ``eos_token_id=None``).
    """
    tokenizer = build_tiny_tokenizer(vision_encoder_ls=(), with_regions=False)
    images = build_tiny_processor(tokenizer)
    processor = Qwen2VLProcessor(
        image_processor=images.image_processor,
        tokenizer=tokenizer,
        video_processor=images.video_processor,
        chat_template=tokenizer.chat_template,
    )
    fields = {"text_config": TINY_TEXT, "vision_config": TINY_VISION, "tie_word_embeddings": False}
    config = Qwen2VLConfig(**fields | qwen2_vl_token_fields(tokenizer) | config_overrides)
    if seed is not None:
        torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    if save_dir is not None:
        model.save_pretrained(save_dir, safe_serialization=safe_serialization)
        processor.save_pretrained(save_dir)
    return model, processor
