"""The `vpt_qwen2_vl` template: `qwen2_vl` with a multimodal plugin that also handles the VPT re-encoding images.

Images follow the released rule (`transformers_vpt.images.fit_image`), as `VPTPipeline` does at inference: the long
side of images, crops and clip images capped at the recipe's `image_resolution` (512), DINOv2 inputs at 512 and SAM
inputs at 1024, sides under 28 stretched. LLaMA-Factory 0.9.5's `image_max_pixels` / `image_min_pixels` area rule
does not apply to them (it still applies to video frames).

Placeholder expansion and the extra tensors come from the VPT processor (`VPTProcessorMixin.expand_placeholders`,
`preprocess_extra_images`); the plugin only loads images (crop paths included) and counts them.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from llamafactory.data import mm_plugin
from llamafactory.data.template import TEMPLATES
from typing_extensions import override

from transformers_vpt.images import IMAGE_RESOLUTION, SEG_IMAGE_RESOLUTION, fit_image, load_image, to_rgb
from transformers_vpt.models.bases import VPT_BASES
from transformers_vpt.models.vpt.processing_vpt import VPTProcessorMixin
from transformers_vpt.vocabulary import BRANCH_TOKENS

from .guard import Private
from .template import register_released_template

TEMPLATE_NAME = "vpt_qwen2_vl"
BASE_TEMPLATE = "qwen2_vl"
VPT_TEMPLATES = {base.template: base.stock_template for base in VPT_BASES.values()}
"""The VPT templates and the stock template each is built from (`transformers_vpt.models.bases`): LLaMA-Factory
0.9.5 formats Qwen2.5-VL with its `qwen2_vl` template and plugin, and so does VPT (with the released labels, as for
Qwen2-VL)."""

_PLUGIN = mm_plugin.Qwen2VLPlugin
PRIVATE = tuple(
    Private(_PLUGIN, name, parameters, patch="the VPT multimodal plugin")
    for name, parameters in (
        ("_regularize_images", ("self", "images", "kwargs")),
        ("_preprocess_image", ("self", "image", "kwargs")),
        ("_get_mm_inputs", ("self", "images", "videos", "audios", "processor")),
        ("_validate_input", ("self", "processor", "images", "videos", "audios")),
        ("_validate_messages", ("self", "messages", "images", "videos", "audios")),
        ("_get_mm_token_metadata", ("self", "images", "videos", "audios", "processor")),
    )
)


def vpt_processor(processor: Any) -> VPTProcessorMixin:
    if not isinstance(processor, VPTProcessorMixin):
        raise ValueError(
            f"The VPT templates need a VPT processor (e.g. VPT_Qwen2VLProcessor), got {type(processor).__name__}; "
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
    bound_image_resolution: int | None = field(default=None, init=False, repr=False)

    @contextmanager
    def extra_images(self, **extra_images: list) -> Iterator[None]:
        self.bound_extra_images = extra_images
        try:
            yield
        finally:
            self.bound_extra_images = {}

    @contextmanager
    def image_rule(self, image_resolution: int) -> Iterator[None]:
        r"""Apply the released image rule with ``image_resolution`` to the images regularized meanwhile."""
        self.bound_image_resolution = image_resolution
        try:
            yield
        finally:
            self.bound_image_resolution = None

    @override
    def _regularize_images(self, images: list, **kwargs) -> dict[str, list]:
        images = [load_image(image) if isinstance(image, str) else image for image in images]  # crop paths, EXIF
        return super()._regularize_images(images, **kwargs)

    @override
    def _preprocess_image(self, image, **kwargs):
        if self.bound_image_resolution is None or "video_fps" in kwargs:  # video frames keep the stock rule
            return super()._preprocess_image(image, **kwargs)

        return fit_image(to_rgb(image), self.bound_image_resolution)

    @override
    def _get_mm_inputs(self, images, videos, audios, processor) -> dict[str, torch.Tensor]:
        with self.image_rule(getattr(processor, "image_resolution", IMAGE_RESOLUTION)):
            return super()._get_mm_inputs(images, videos, audios, processor)

    def _load_extra_images(self, kind: str, images: list, processor: Any) -> list:
        resolution = {
            BRANCH_TOKENS["clip"].prefix: getattr(processor, "image_resolution", IMAGE_RESOLUTION),  # the images' cap
            BRANCH_TOKENS["dino"].prefix: IMAGE_RESOLUTION,
            BRANCH_TOKENS["sam"].prefix: SEG_IMAGE_RESOLUTION,
        }[kind]
        with self.image_rule(resolution):
            return self._regularize_images(images)["images"]

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
    r"""Registers the plugin (`register_mm_plugin`) and the template (`register_template`, the released labels)."""
    if TEMPLATE_NAME not in mm_plugin.PLUGINS:
        mm_plugin.register_mm_plugin(TEMPLATE_NAME, VPTQwen2VLPlugin)
    for name, base_name in VPT_TEMPLATES.items():
        base = TEMPLATES[base_name].mm_plugin
        plugin = mm_plugin.get_mm_plugin(TEMPLATE_NAME, image_token=base.image_token, video_token=base.video_token)
        register_released_template(name, base_name, plugin)
