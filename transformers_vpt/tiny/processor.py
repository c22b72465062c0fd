"""A tiny, offline VPT processor whose image sizes match the tiny models used in tests and demos."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase, Qwen2VLImageProcessor, Qwen2VLVideoProcessor, Qwen3VLVideoProcessor

from ..models.bases import get_base
from ..models.vpt.processing_vpt import (
    DEFAULT_DETECTION_PROCESSOR_CONFIG,
    DEFAULT_SEG_PROCESSOR_CONFIG,
    VPTProcessorMixin,
)
from .tokenizer import build_tiny_tokenizer

# Qwen2-VL vision tower: a 56x56 image gives grid (1, 4, 4) -> 4 image tokens.
TINY_PATCH_SIZE = 14
TINY_TEMPORAL_PATCH_SIZE = 2
TINY_MERGE_SIZE = 2
TINY_MIN_PIXELS = 56 * 56
TINY_MAX_PIXELS = 4 * 56 * 56

# DINOv2: shortest edge 32, centre crop 28x28, patch 14 -> 2x2 patch tokens (CLS dropped).
TINY_DINO_SHORTEST_EDGE = 32
TINY_DINO_CROP_SIZE = 28
TINY_DINO_PATCH_SIZE = 14
TINY_DETECTION_IMAGE_SEQLEN = (TINY_DINO_CROP_SIZE // TINY_DINO_PATCH_SIZE) ** 2

# SAM: longest edge 64, padded to 64x64, patch 16 -> a 4x4 feature map, projected with stride 1.
TINY_SAM_IMAGE_SIZE = 64
TINY_SAM_PATCH_SIZE = 16
TINY_SEG_IMAGE_SEQLEN = (TINY_SAM_IMAGE_SIZE // TINY_SAM_PATCH_SIZE) ** 2

TINY_DETECTION_PROCESSOR_CONFIG: dict[str, Any] = {
    **DEFAULT_DETECTION_PROCESSOR_CONFIG,
    "size": {"shortest_edge": TINY_DINO_SHORTEST_EDGE},
    "crop_size": {"height": TINY_DINO_CROP_SIZE, "width": TINY_DINO_CROP_SIZE},
}
TINY_SEG_PROCESSOR_CONFIG: dict[str, Any] = {
    **DEFAULT_SEG_PROCESSOR_CONFIG,
    "size": {"longest_edge": TINY_SAM_IMAGE_SIZE},
    "pad_size": {"height": TINY_SAM_IMAGE_SIZE, "width": TINY_SAM_IMAGE_SIZE},
}


TINY_VIDEO_PROCESSORS = {"qwen3_vl": Qwen3VLVideoProcessor}
"""The video processor class of a base whose class is not Qwen2-VL's (Qwen3-VL's: frame metadata, timestamps)."""


def tiny_video_processor(base: str = "qwen2_vl"):
    """The video processor of ``base`` at the tiny sizes (given frames are used as they are: no frame sampling)."""
    video_class = TINY_VIDEO_PROCESSORS.get(base, Qwen2VLVideoProcessor)
    extra = {"do_sample_frames": False} if video_class is not Qwen2VLVideoProcessor else {}
    return video_class(**tiny_image_kwargs(), **extra)


def tiny_image_kwargs() -> dict[str, Any]:
    """The tiny sizes of the Qwen2-VL image and video processors (Qwen2.5-VL uses the same classes)."""
    return {
        "size": {"shortest_edge": TINY_MIN_PIXELS, "longest_edge": TINY_MAX_PIXELS},
        "patch_size": TINY_PATCH_SIZE,
        "temporal_patch_size": TINY_TEMPORAL_PATCH_SIZE,
        "merge_size": TINY_MERGE_SIZE,
    }


def build_tiny_processor(
    tokenizer: PreTrainedTokenizerBase | None = None, base: str = "qwen2_vl", **kwargs
) -> VPTProcessorMixin:
    """Build the VPT processor of ``base`` (`VPT_Qwen2VLProcessor`, `VPT_Qwen2_5_VLProcessor`, ...) with tiny image
    sizes, offline and in milliseconds.

    The Qwen2-VL image processor is the slow one, as the VPT processor keeps by default (the released models were
    trained with it), so a saved and reloaded tiny processor gives identical outputs.

    Args:
        tokenizer: Defaults to `build_tiny_tokenizer()` (all three branches and the region tokens).
        base: A key of `transformers_vpt.models.bases.VPT_BASES`.
        kwargs: Overrides of the processor's ``__init__`` arguments (e.g. ``chat_template``,
            ``detection_image_seqlen``).
    """
    processor_kwargs = {
        "detection_processor_config": TINY_DETECTION_PROCESSOR_CONFIG,
        "seg_processor_config": TINY_SEG_PROCESSOR_CONFIG,
        "detection_image_seqlen": TINY_DETECTION_IMAGE_SEQLEN,
        "seg_image_seqlen": TINY_SEG_IMAGE_SEQLEN,
        **kwargs,
    }
    return get_base(base).processor_class(
        image_processor=Qwen2VLImageProcessor(**tiny_image_kwargs()),
        tokenizer=build_tiny_tokenizer() if tokenizer is None else tokenizer,
        video_processor=tiny_video_processor(base),
        **processor_kwargs,
    )
