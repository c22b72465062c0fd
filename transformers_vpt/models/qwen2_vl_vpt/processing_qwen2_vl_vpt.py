"""Processor for VPT Qwen2-VL: Qwen2-VL's processor plus the DINOv2, SAM and CLIP re-encoding image inputs.

Everything that is the same for every Qwen-VL base lives in `transformers_vpt.models.vpt.processing_vpt`
([`VPTProcessorMixin`]); this module adds Qwen2-VL's kwargs types and re-exports the shared names it always offered.
"""

import copy
from typing import Any

from transformers.feature_extraction_utils import BatchFeature
from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLImagesKwargs, Qwen2VLProcessor
from transformers.processing_utils import Unpack

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

    valid_processor_kwargs = VPT_Qwen2VLProcessorKwargs

    def __call__(
        self,
        images: Any = None,
        text: str | list[str] | None = None,
        videos: Any = None,
        *,
        detection_images: Any = None,
        seg_images: Any = None,
        clip_images: Any = None,
        **kwargs: Unpack[VPT_Qwen2VLProcessorKwargs],
    ) -> BatchFeature:
        """Tokenize ``text`` with expanded placeholders and preprocess every kind of visual input.

        Args:
            images: Qwen2-VL images, a flat list in placeholder order or a list per sample.
            text: One text or a batch of texts with placeholders (see the class docstring).
            videos: Qwen2-VL videos.
            detection_images: DINOv2 images, flat or per sample.
            seg_images: SAM images, flat or per sample.
            clip_images: Images re-encoded by Qwen2-VL's vision tower, flat or per sample.
            kwargs: [`VPT_Qwen2VLProcessorKwargs`]: tokenizer, image-processor and video-processor kwargs, flat
                (``padding_side="left"``, ``return_tensors="pt"``) or per modality (``text_kwargs={...}``).

        Returns:
            [`BatchFeature`] with ``input_ids``, ``attention_mask`` and, for the inputs given, ``pixel_values`` and
            ``image_grid_thw``, ``pixel_values_videos`` and ``video_grid_thw``, ``detection_images`` (N, 3, H, W),
            ``seg_images`` (N, 3, H, W), ``clip_pixel_values`` and ``clip_images_grid_thw``.
        """
        return super().__call__(
            images,
            text,
            videos,
            detection_images=detection_images,
            seg_images=seg_images,
            clip_images=clip_images,
            **kwargs,
        )


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
