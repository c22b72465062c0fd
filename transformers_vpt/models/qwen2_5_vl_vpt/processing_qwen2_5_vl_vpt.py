"""Processor for VPT Qwen2.5-VL: Qwen2.5-VL's processor plus the DINOv2, SAM and CLIP re-encoding image inputs.

Everything that is the same for every Qwen-VL base lives in `transformers_vpt.models.vpt.processing_vpt`
([`VPTProcessorMixin`]). Qwen2.5-VL brings its own image processor (Qwen2-VL's class, as the Auto mapping of
``qwen2_5_vl`` has it), its video processor and, for videos, ``second_per_grid_ts`` (``temporal_patch_size / fps``,
computed by `Qwen2_5_VLProcessor.__call__`); this module adds its kwargs types.
"""

import copy

from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import (
    Qwen2_5_VLImagesKwargs,
    Qwen2_5_VLProcessor,
    Qwen2_5_VLVideosProcessorKwargs,
)

from ..vpt.processing_vpt import VPTProcessorKwargs, VPTProcessorMixin


class VPT_Qwen2_5_VLProcessorKwargs(VPTProcessorKwargs, total=False):
    """The call kwargs of [`VPT_Qwen2_5_VLProcessor`], typed and defaulted like `Qwen2_5_VLProcessorKwargs`.

    As [`VPTProcessorKwargs`], with Qwen2.5-VL's image kwargs (`min_pixels`, `max_pixels`, ...) for `images` and
    `clip_images` and its video kwargs (`fps`: one number or one per video, which sets `second_per_grid_ts`).
    """

    images_kwargs: Qwen2_5_VLImagesKwargs
    videos_kwargs: Qwen2_5_VLVideosProcessorKwargs
    # TypedDicts inherit annotations but not class attributes; ProcessingKwargs reads this one
    _defaults = copy.deepcopy(VPTProcessorKwargs._defaults)


class VPT_Qwen2_5_VLProcessor(VPTProcessorMixin, Qwen2_5_VLProcessor):
    r"""
    Qwen2.5-VL processor with the VPT re-encoding inputs: DINOv2 (``detection``), SAM (``seg``) and CLIP (``clip``,
    re-encoded by Qwen2.5-VL's own vision tower) images.

    Placeholders, literal text, typed content parts, the DINOv2 / SAM preprocessing and saving are those of
    [`VPTProcessorMixin`] (the same as [`VPT_Qwen2VLProcessor`]'s, argument for argument). Videos come out as
    `Qwen2_5_VLProcessor` gives them: ``pixel_values_videos``, ``video_grid_thw`` and ``second_per_grid_ts``.

    The arguments are [`VPTProcessorMixin`]'s: ``image_processor`` ([`Qwen2VLImageProcessor`]), ``tokenizer``
    ([`Qwen2TokenizerFast`] with the VPT tokens), ``video_processor`` ([`Qwen2VLVideoProcessor`]), ``chat_template``
    (defaults to [`VPT_CHAT_TEMPLATE`]: Qwen2.5-VL's rendering is Qwen2-VL's), ``detection_processor_config`` /
    ``seg_processor_config``, ``detection_image_seqlen`` / ``seg_image_seqlen`` and ``fast_image_processor``.
    """

    valid_processor_kwargs = VPT_Qwen2_5_VLProcessorKwargs  # the `_merge_kwargs` types and defaults of `VPTProcessorMixin.__call__`


__all__ = ["VPT_Qwen2_5_VLProcessor", "VPT_Qwen2_5_VLProcessorKwargs"]
