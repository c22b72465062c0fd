"""The `vpt_qwen2_vl` template: `qwen2_vl` with a multimodal plugin that also handles the VPT re-encoding images.

Placeholder expansion and the extra tensors come from `VPT_Qwen2VLProcessor` (`expand_placeholders`,
`preprocess_extra_images`); the plugin only loads images (crop paths included) and counts them.
"""

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from llamafactory.data import mm_plugin
from llamafactory.data.template import TEMPLATES
from typing_extensions import override

from transformers_vpt import VPT_Qwen2VLProcessor
from transformers_vpt.regions import open_image
from transformers_vpt.vocabulary import BRANCH_TOKENS

from .template import released_qwen2_vl_template

TEMPLATE_NAME = "vpt_qwen2_vl"


def vpt_processor(processor: Any) -> VPT_Qwen2VLProcessor:
    if not isinstance(processor, VPT_Qwen2VLProcessor):
        raise ValueError(
            f"The {TEMPLATE_NAME} template needs a VPT_Qwen2VLProcessor, got {type(processor).__name__}; "
            "point `model_name_or_path` at a VPT checkpoint (see scripts/prepare_weights.py)"
        )

    return processor


@dataclass
class VPTQwen2VLPlugin(mm_plugin.Qwen2VLPlugin):
    r"""Qwen2-VL plugin plus `<detection_image>`, `<seg_image>` and `<clip_image>`.

    LLaMA-Factory's dataset processors pass only images, videos and audios to `process_messages`; the extra images
    of the example being encoded are bound with `extra_images(...)`.
    """

    bound_extra_images: dict[str, list] = field(default_factory=dict, init=False, repr=False)

    @contextmanager
    def extra_images(self, **extra_images: list) -> Iterator[None]:
        self.bound_extra_images = extra_images
        try:
            yield
        finally:
            self.bound_extra_images = {}

    @override
    def _regularize_images(self, images: list, **kwargs) -> dict[str, list]:
        images = [open_image(image) if isinstance(image, str) else image for image in images]  # crop paths
        return super()._regularize_images(images, **kwargs)

    def _load_extra_images(self, kind: str, images: list, processor: Any) -> list:
        if kind == BRANCH_TOKENS["clip"].prefix:  # re-encoded by the model's own tower: the `images` pixel budget
            budget = dict(
                image_max_pixels=getattr(processor, "image_max_pixels", 768 * 768),
                image_min_pixels=getattr(processor, "image_min_pixels", 32 * 32),
            )
        else:  # the DINOv2 / SAM processors resize for themselves
            budget = dict(image_max_pixels=sys.maxsize, image_min_pixels=0)

        return self._regularize_images(images, **budget)["images"]

    def get_extra_mm_inputs(self, processor: Any, **extra_images: list) -> dict[str, torch.Tensor]:
        r"""`detection_images`, `seg_images`, `clip_pixel_values` and `clip_images_grid_thw` for the given lists."""
        processor = vpt_processor(processor)
        inputs = {}
        for branch in BRANCH_TOKENS.values():
            images = extra_images.get(branch.images_key) or []
            if images:
                images = self._load_extra_images(branch.prefix, images, processor)
                inputs.update(processor.preprocess_extra_images(branch.prefix, images))

        return inputs

    @override
    def process_messages(self, messages, images, videos, audios, processor):
        self._validate_input(processor, images, videos, audios)
        self._validate_messages(messages, images, videos, audios)
        extra = self.bound_extra_images
        mm_inputs = self._get_mm_token_metadata(images, videos, audios, processor)
        if mm_inputs is None:
            mm_inputs = self._get_mm_inputs(images, videos, audios, processor)

        clip_inputs = self.get_extra_mm_inputs(processor, clip_images=extra.get("clip_images"))
        contents = vpt_processor(processor).expand_placeholders(
            [message["content"] for message in messages],
            image_grid_thw=mm_inputs.get("image_grid_thw"),
            video_grid_thw=mm_inputs.get("video_grid_thw"),
            clip_grid_thw=clip_inputs.get("clip_images_grid_thw"),
            num_detection_images=len(extra.get("detection_images") or []),
            num_seg_images=len(extra.get("seg_images") or []),
        )
        return [{**message, "content": content} for message, content in zip(messages, contents, strict=True)]


def patch() -> None:
    mm_plugin.register_mm_plugin(TEMPLATE_NAME, VPTQwen2VLPlugin)
    base = TEMPLATES["qwen2_vl"]
    plugin = mm_plugin.get_mm_plugin(
        TEMPLATE_NAME, image_token=base.mm_plugin.image_token, video_token=base.mm_plugin.video_token
    )
    TEMPLATES[TEMPLATE_NAME] = released_qwen2_vl_template(base, plugin)  # the released labels (template.py)
