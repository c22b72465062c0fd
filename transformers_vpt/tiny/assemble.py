"""A complete tiny VPT model and its matching processor, with random weights: for tests and the demo."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from ..models.qwen2_vl_vpt import VPT_Qwen2VLForConditionalGeneration
from ..models.qwen2_vl_vpt.processing_qwen2_vl_vpt import VIDEO_PAD, VPT_Qwen2VLProcessor
from ..vocabulary import BRANCH_KINDS, IMAGE_PAD, VISION_END, VISION_START, add_vpt_tokens
from .model import tiny_config
from .processor import build_tiny_processor
from .tokenizer import build_tiny_tokenizer


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
    ids = tokenizer.convert_tokens_to_ids
    config = tiny_config(
        vision_encoder_ls,
        image_token_id=ids(IMAGE_PAD),
        video_token_id=ids(VIDEO_PAD),
        vision_start_token_id=ids(VISION_START),
        vision_end_token_id=ids(VISION_END),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    add_vpt_tokens(tokenizer, config)
    torch.manual_seed(seed)
    model = VPT_Qwen2VLForConditionalGeneration(config).eval()
    if save_dir is not None:
        model.save_pretrained(save_dir)
        processor.save_pretrained(save_dir)
    return model, processor
