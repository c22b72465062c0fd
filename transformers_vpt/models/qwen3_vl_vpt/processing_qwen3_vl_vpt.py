"""Processor for VPT Qwen3-VL: Qwen3-VL's processor plus the DINOv2, SAM and CLIP re-encoding image inputs.

Everything that is the same for every Qwen-VL base lives in `transformers_vpt.models.vpt.processing_vpt`
([`VPTProcessorMixin`]). Qwen3-VL brings its image processor (Qwen2-VL's class, 16-pixel patches), its video
processor, which returns each video's metadata, and its video text: one ``<t seconds>`` timestamp and one
``<|vision_start|>`` ... ``<|vision_end|>`` run per frame (`expand_video`). Its chat template has no default
system turn.
"""

import copy
from collections.abc import Sequence
from typing import Any

from transformers.models.qwen3_vl.processing_qwen3_vl import (
    Qwen3VLImagesKwargs,
    Qwen3VLProcessor,
    Qwen3VLVideosProcessorKwargs,
)
from transformers.utils import logging

from ...vocabulary import VIDEO_PAD, VISION_END, VISION_START
from ..vpt.processing_vpt import VPTProcessorKwargs, VPTProcessorMixin, build_chat_template

logger = logging.get_logger(__name__)

VPT_QWEN3_VL_CHAT_TEMPLATE = build_chat_template(default_system=None)
"""Qwen3-VL's rendering (no default system turn) with the VPT content parts of [`VPT_CHAT_TEMPLATE`]."""


class VPT_Qwen3VLProcessorKwargs(VPTProcessorKwargs, total=False):
    """The call kwargs of [`VPT_Qwen3VLProcessor`], typed and defaulted like `Qwen3VLProcessorKwargs`.

    As [`VPTProcessorKwargs`], with Qwen3-VL's image kwargs (`min_pixels`, `max_pixels`, `patch_size`, ...) for
    `images` and `clip_images` and its video kwargs (`fps`, `num_frames`, `do_sample_frames`, `video_metadata`).
    """

    images_kwargs: Qwen3VLImagesKwargs
    videos_kwargs: Qwen3VLVideosProcessorKwargs
    # TypedDicts inherit annotations but not class attributes; ProcessingKwargs reads this one
    _defaults = {**copy.deepcopy(VPTProcessorKwargs._defaults), "videos_kwargs": {"return_metadata": True}}


class VPT_Qwen3VLProcessor(VPTProcessorMixin, Qwen3VLProcessor):
    r"""
    Qwen3-VL processor with the VPT re-encoding inputs: DINOv2 (``detection``), SAM (``seg``) and CLIP (``clip``,
    re-encoded by Qwen3-VL's own vision tower) images.

    Placeholders, literal text, typed content parts, the DINOv2 / SAM preprocessing and saving are those of
    [`VPTProcessorMixin`] (the same as [`VPT_Qwen2VLProcessor`]'s, argument for argument). A video expands as
    `Qwen3VLProcessor` expands it, frame by frame with timestamps, and comes out as ``pixel_values_videos`` and
    ``video_grid_thw``.

    The arguments are [`VPTProcessorMixin`]'s: ``image_processor`` ([`Qwen2VLImageProcessor`]), ``tokenizer``
    ([`Qwen2TokenizerFast`] with the VPT tokens), ``video_processor`` ([`Qwen3VLVideoProcessor`]), ``chat_template``
    (defaults to [`VPT_QWEN3_VL_CHAT_TEMPLATE`]), ``detection_processor_config`` / ``seg_processor_config``,
    ``detection_image_seqlen`` / ``seg_image_seqlen`` and ``fast_image_processor``.
    """

    valid_processor_kwargs = VPT_Qwen3VLProcessorKwargs  # the kwargs types and defaults of `VPTProcessorMixin.__call__`
    vpt_chat_template = VPT_QWEN3_VL_CHAT_TEMPLATE

    def preprocess_videos(self, videos: Any, **videos_kwargs) -> dict[str, Any]:
        """Qwen3-VL's video processor on ``videos``: ``pixel_values_videos``, ``video_grid_thw`` and the videos'
        ``video_metadata`` (frame indices and fps), which `expand_video` turns into timestamps."""
        videos_kwargs = {**videos_kwargs, "return_metadata": True}
        return dict(self.video_processor(videos=videos, **videos_kwargs))

    def expand_video(self, grid_thw: Sequence[int], metadata: Any = None, wrap: bool = True) -> str:
        """``<t seconds><|vision_start|>`` + one frame's pad tokens + ``<|vision_end|>`` per frame, as
        `Qwen3VLProcessor` writes a video (whatever ``wrap``: a bare ``<|video_pad|>`` becomes the same text)."""
        frames, height, width = (int(n) for n in grid_thw)
        frame_tokens = height * width // self.video_processor.merge_size**2
        fps = getattr(metadata, "fps", None)
        indices = getattr(metadata, "frames_indices", None)
        if indices is None:  # every frame of the video was given
            indices = list(range(frames * self.video_processor.temporal_patch_size))
        if fps is None:
            logger.warning_once(
                "Qwen3-VL writes frame timestamps, but a video has no fps in its metadata; using fps=24. Pass "
                "`video_metadata` (or let the video processor sample the frames) for the right timestamps."
            )
            fps = 24
        timestamps = self._calculate_timestamps(list(indices), fps, self.video_processor.merge_size)  # it pads in place
        return "".join(
            f"<{timestamps[frame]:.1f} seconds>" + VISION_START + VIDEO_PAD * frame_tokens + VISION_END
            for frame in range(frames)
        )


__all__ = ["VPT_QWEN3_VL_CHAT_TEMPLATE", "VPT_Qwen3VLProcessor", "VPT_Qwen3VLProcessorKwargs"]
