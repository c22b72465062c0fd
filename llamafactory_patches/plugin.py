"""The VPT templates: each stock template a VPT base is formatted with, plus a multimodal plugin that also handles
the VPT re-encoding images.

Every VPT template (`VPT_TEMPLATES`: `vpt_qwen2_vl`, `vpt_qwen2_5_vl`, `vpt_qwen3_vl`, `vpt_qwen3_vl_nothink`) is
built from a stock LLaMA-Factory 0.9.5 template and gets the VPT plugin of that template's plugin class
(`VPT_PLUGINS`): `VPTQwen2VLPlugin` over `Qwen2VLPlugin` (the `qwen2_vl` template, which 0.9.5 also uses for
Qwen2.5-VL), `VPTQwen3VLPlugin` over `Qwen3VLPlugin` (`qwen3_vl`, `qwen3_vl_nothink`). What they add is written once,
in `VPTPluginMixin`.

Images follow the released rule (`transformers_vpt.images.fit_image`), as `VPTPipeline` does at inference: the long
side of images, crops and clip images capped at the recipe's `image_resolution` (512), DINOv2 inputs at 512 and SAM
inputs at 1024, sides under 28 stretched. LLaMA-Factory 0.9.5's `image_max_pixels` / `image_min_pixels` area rule
does not apply to them (it still applies to video frames).

Placeholder expansion and the extra tensors come from the VPT processor (`VPTProcessorMixin.expand_placeholders`,
`preprocess_extra_images`); the plugin only loads images (crop paths included) and counts them. Videos expand as the
base's processor writes them, with each video's own metadata (Qwen3-VL's frame timestamps).
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from llamafactory.data import mm_plugin
from llamafactory.data import template as template_module
from llamafactory.data.template import TEMPLATES
from typing_extensions import override

from transformers_vpt.images import IMAGE_RESOLUTION, SEG_IMAGE_RESOLUTION, fit_image, load_image, to_rgb
from transformers_vpt.models.bases import VPT_BASES
from transformers_vpt.models.vpt.processing_vpt import VPTProcessorMixin
from transformers_vpt.vocabulary import BRANCH_TOKENS

from .guard import Private
from .template import register_released_template, register_stock_template

VPT_TEMPLATES = {name: stock for base in VPT_BASES.values() for name, stock in base.templates.items()}
"""Every VPT template and the stock template it is built from (`transformers_vpt.models.bases`, `VPTBase.templates`):
LLaMA-Factory 0.9.5 formats Qwen2.5-VL with its `qwen2_vl` template and plugin, and so does VPT."""
RELEASED_LABELS = {name: base.released_labels for base in VPT_BASES.values() for name in base.templates}
"""Whether a VPT template trains the released labels (`template.ReleasedQwen2VLTemplate`); else the stock
template's class and labels are kept (Qwen3-VL)."""


def vpt_processor(processor: Any) -> VPTProcessorMixin:
    if not isinstance(processor, VPTProcessorMixin):
        raise ValueError(
            f"The VPT templates need a VPT processor (e.g. VPT_Qwen2VLProcessor), got {type(processor).__name__}; "
            "point `model_name_or_path` at a VPT checkpoint (see scripts/prepare_weights.py)"
        )

    return processor


@dataclass
class VPTPluginMixin:
    r"""What a VPT plugin adds to a stock Qwen-VL plugin: `<detection_image>`, `<seg_image>` and `<clip_image>`, the
    released image rule, crop paths, and placeholders expanded by the VPT processor. Put it first,
    ``class VPTXPlugin(VPTPluginMixin, mm_plugin.XPlugin)``; the private methods it overrides are the stock class's
    (listed in `PRIVATE` for each class in `VPT_PLUGINS`).

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
        r"""Every placeholder of the sample expanded by the VPT processor: images, videos (each with its own grid and
        metadata, in placeholder order across the messages) and the bound extra images."""
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
            video_metadata=mm_inputs.get("video_metadata"),  # one entry per video (Qwen3-VL: frame timestamps)
        )
        return [{**message, "content": content} for message, content in zip(messages, contents, strict=True)]


@dataclass
class VPTQwen2VLPlugin(VPTPluginMixin, mm_plugin.Qwen2VLPlugin):
    r"""LLaMA-Factory's Qwen2-VL plugin (templates `qwen2_vl`, used for Qwen2-VL and Qwen2.5-VL) with VPT inputs."""


@dataclass
class VPTQwen3VLPlugin(VPTPluginMixin, mm_plugin.Qwen3VLPlugin):
    r"""LLaMA-Factory's Qwen3-VL plugin (templates `qwen3_vl`, `qwen3_vl_nothink`) with VPT inputs: its video
    frames and metadata, timestamps written by `VPT_Qwen3VLProcessor.expand_video` for every video."""


VPT_PLUGINS = {"vpt_qwen2_vl": VPTQwen2VLPlugin, "vpt_qwen3_vl": VPTQwen3VLPlugin}
"""The VPT plugins by their `register_mm_plugin` name; each extends one stock plugin class (its second base)."""
STOCK_PLUGINS = {cls.__bases__[1]: name for name, cls in VPT_PLUGINS.items()}
"""Stock plugin class -> the name of the VPT plugin that extends it."""


@dataclass(frozen=True)
class StockTemplate(Private):
    r"""`Private` entry of a stock template a VPT template is built from (``TEMPLATES[template]``): registered, and
    formatted with a plugin class that a VPT plugin extends (`STOCK_PLUGINS`)."""

    template: str = ""

    @override
    def problem(self) -> str | None:
        problem = super().problem()
        if problem is not None:
            return problem
        registered = getattr(self.owner, self.name).get(self.template)
        if registered is None:
            return f"{self.qualname} has no {self.template!r} template"
        plugin_class = type(registered.mm_plugin)
        if plugin_class not in STOCK_PLUGINS:
            known = ", ".join(cls.__name__ for cls in STOCK_PLUGINS)
            return f"{self.qualname}[{self.template!r}] uses {plugin_class.__name__}, the VPT plugins extend {known}"
        return None


_PLUGIN_METHODS = (
    ("_regularize_images", ("self", "images", "kwargs")),
    ("_preprocess_image", ("self", "image", "kwargs")),
    ("_get_mm_inputs", ("self", "images", "videos", "audios", "processor")),
    ("_validate_input", ("self", "processor", "images", "videos", "audios")),
    ("_validate_messages", ("self", "messages", "images", "videos", "audios")),
    ("_get_mm_token_metadata", ("self", "images", "videos", "audios", "processor")),
)
"""The stock plugin's private methods the VPT plugin overrides or calls."""
_QWEN3_METHODS = (
    # gives `_get_mm_token_metadata` the videos' `video_metadata` (frame indices, fps) read by `expand_video`
    ("_get_video_token_metadata", ("self", "videos", "processor")),
)
PRIVATE = (
    *(
        Private(stock, name, parameters, patch=f"the VPT multimodal plugin {VPT_PLUGINS[vpt].__name__}")
        for stock, vpt in STOCK_PLUGINS.items()
        for name, parameters in _PLUGIN_METHODS + (_QWEN3_METHODS if stock is mm_plugin.Qwen3VLPlugin else ())
    ),
    *(
        StockTemplate(template_module, "TEMPLATES", template=stock, patch=f"the {name} template")
        for name, stock in VPT_TEMPLATES.items()
    ),
)


def plugin_for(stock_template: str) -> mm_plugin.BasePlugin:
    r"""The VPT plugin for a VPT template built from ``stock_template``: the VPT plugin of the stock template's
    plugin class, with the stock plugin's settings (image and video tokens, ...)."""
    stock = TEMPLATES[stock_template].mm_plugin
    settings = {item.name: getattr(stock, item.name) for item in fields(stock) if item.init}
    return mm_plugin.get_mm_plugin(STOCK_PLUGINS[type(stock)], **settings)


def patch() -> None:
    r"""Registers the VPT plugins (`register_mm_plugin`) and every VPT template (`register_template`): the released
    labels for a base with `released_labels`, else the stock template's class and formatting."""
    for name, plugin_class in VPT_PLUGINS.items():
        if name not in mm_plugin.PLUGINS:
            mm_plugin.register_mm_plugin(name, plugin_class)
    for name, stock in VPT_TEMPLATES.items():
        register = register_released_template if RELEASED_LABELS[name] else register_stock_template
        register(name, stock, plugin_for(stock))
