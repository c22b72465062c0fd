"""Processor for VPT Qwen2-VL: Qwen2-VL's processor plus the DINOv2, SAM and CLIP re-encoding image inputs.

Everything that is the same for every Qwen-VL base lives in `transformers_vpt.models.vpt.processing_vpt`
([`VPTProcessorMixin`]); this module adds Qwen2-VL's kwargs types and re-exports the shared names it always offered.
"""

import copy

from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLImagesKwargs, Qwen2VLProcessor

from ...vocabulary import VIDEO_PAD
from ..vpt.processing_vpt import (
    DEFAULT_DETECTION_PROCESSOR_CONFIG,
    DEFAULT_SEG_PROCESSOR_CONFIG,
    EXTRA_MODALITIES,
    MODALITIES,
    VPT_CHAT_TEMPLATE,
    VPTProcessorKwargs,
    VPTProcessorMixin,
    split_literal,
    strip_literal_markers,
)


class VPT_Qwen2VLProcessorKwargs(VPTProcessorKwargs, total=False):
    """The call kwargs of [`VPT_Qwen2VLProcessor`], typed and defaulted like Qwen2-VL's `Qwen2VLProcessorKwargs`.

    `text_kwargs` go to the tokenizer (`padding`, `padding_side`, `truncation`, `max_length`, ...;
    `return_mm_token_type_ids` adds `mm_token_type_ids`, 1 at `<|image_pad|>`). `images_kwargs` (Qwen2-VL's image
    kwargs: `min_pixels`, `max_pixels`, ...) go to the Qwen2-VL image processor, for `images` and `clip_images`;
    detection and seg images always use the processor's saved DINOv2 / SAM settings. `videos_kwargs` go to the
    video processor; `return_tensors` (a common kwarg) applies to every output. Defaults: no padding, no
    `mm_token_type_ids`; the padding side is the tokenizer's.
    """

    images_kwargs: Qwen2VLImagesKwargs
    # TypedDicts inherit annotations but not class attributes; ProcessingKwargs reads this one
    _defaults = copy.deepcopy(VPTProcessorKwargs._defaults)


class VPT_Qwen2VLProcessor(VPTProcessorMixin, Qwen2VLProcessor):
    r"""
    Qwen2-VL processor with the VPT re-encoding inputs: DINOv2 (``detection``), SAM (``seg``) and CLIP (``clip``,
    re-encoded by Qwen2-VL's own vision tower) images.

    Text placeholders are expanded into ``<|vision_start|>`` + N pad tokens + ``<|vision_end|>``. Two spellings are
    accepted for every kind: the dataset one (``<image>``, ``<detection_image>``, ``<seg_image>``, ``<clip_image>``,
    ``<video>``) and the chat-template one (``<|vision_start|><|detection_image_pad|><|vision_end|>`` ...). N is
    ``prod(grid_thw) // merge_size**2`` for images, videos and clip images, and ``detection_image_seqlen`` /
    ``seg_image_seqlen`` for detection and seg images.

    The arguments are [`VPTProcessorMixin`]'s: ``image_processor`` ([`Qwen2VLImageProcessor`]), ``tokenizer``
    ([`Qwen2TokenizerFast`] with the VPT tokens), ``video_processor`` ([`Qwen2VLVideoProcessor`]), ``chat_template``
    (defaults to [`VPT_CHAT_TEMPLATE`]), ``detection_processor_config`` / ``seg_processor_config`` (the DINOv2 / SAM
    preprocessing, defaults to the released one), ``detection_image_seqlen`` / ``seg_image_seqlen`` (256) and
    ``fast_image_processor`` (False: a fast image processor is replaced by the slow one with the same settings).
    """

    valid_processor_kwargs = VPT_Qwen2VLProcessorKwargs  # the `_merge_kwargs` types and defaults of `VPTProcessorMixin.__call__`


__all__ = [
    "DEFAULT_DETECTION_PROCESSOR_CONFIG",
    "DEFAULT_SEG_PROCESSOR_CONFIG",
    "EXTRA_MODALITIES",
    "MODALITIES",
    "VIDEO_PAD",
    "VPT_CHAT_TEMPLATE",
    "VPT_Qwen2VLProcessor",
    "VPT_Qwen2VLProcessorKwargs",
    "split_literal",
    "strip_literal_markers",
]
