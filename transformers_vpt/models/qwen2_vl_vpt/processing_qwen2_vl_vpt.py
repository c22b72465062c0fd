"""Processor for VPT Qwen2-VL: Qwen2-VL's processor plus the DINOv2, SAM and CLIP re-encoding image inputs."""

from __future__ import annotations

import copy
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from transformers import BitImageProcessor, SamImageProcessor
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling, load_image
from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor, Qwen2VLProcessorKwargs

from ...vocabulary import (
    BRANCH_TOKENS,
    IM_END,
    IM_START,
    IMAGE_PAD,
    IMAGE_PLACEHOLDER,
    VIDEO_PAD,
    VIDEO_PLACEHOLDER,
    VISION_END,
    VISION_START,
    branch_by_prefix,
    token_id,
)

DEFAULT_DETECTION_PROCESSOR_CONFIG: dict[str, Any] = {
    "do_resize": True,
    "size": {"shortest_edge": 256},
    "resample": int(PILImageResampling.BICUBIC),
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": list(IMAGENET_DEFAULT_MEAN),
    "image_std": list(IMAGENET_DEFAULT_STD),
    "do_convert_rgb": True,
}
"""`BitImageProcessor` kwargs of the released DINOv2 preprocessing (224x224 crop: 16x16 patches of 14)."""

DEFAULT_SEG_PROCESSOR_CONFIG: dict[str, Any] = {
    "do_resize": True,
    "size": {"longest_edge": 1024},
    "resample": int(PILImageResampling.BILINEAR),
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": list(IMAGENET_DEFAULT_MEAN),
    "image_std": list(IMAGENET_DEFAULT_STD),
    "do_pad": True,
    "pad_size": {"height": 1024, "width": 1024},
    "do_convert_rgb": True,
}
"""`SamImageProcessor` kwargs of the released SAM preprocessing (longest side 1024, padded to 1024x1024)."""

MODALITIES = ("image", "video", "detection", "seg", "clip")
"""Kinds of visual inputs, named like the processor's inputs (``detection`` -> ``detection_images``)."""
EXTRA_MODALITIES = tuple(branch.prefix for branch in BRANCH_TOKENS.values())
"""The VPT re-encoding kinds: ``detection`` (DINOv2), ``seg`` (SAM), ``clip`` (Qwen2-VL's own ViT)."""

_PAD_TOKENS = {
    "image": IMAGE_PAD,
    "video": VIDEO_PAD,
    **{branch.prefix: branch.image_pad for branch in BRANCH_TOKENS.values()},
}
_DATASET_PLACEHOLDERS = {
    "image": IMAGE_PLACEHOLDER,
    "video": VIDEO_PLACEHOLDER,
    **{branch.prefix: branch.placeholder for branch in BRANCH_TOKENS.values()},
}
# Matched string -> (kind, whether the expansion must be wrapped in <|vision_start|> ... <|vision_end|>).
# Chat-template style text already has the wrapper around a single pad token.
_PLACEHOLDERS = {
    **{placeholder: (kind, True) for kind, placeholder in _DATASET_PLACEHOLDERS.items()},
    **{pad: (kind, False) for kind, pad in _PAD_TOKENS.items()},
}
_PLACEHOLDER_RE = re.compile("|".join(re.escape(p) for p in _PLACEHOLDERS))


def _build_chat_template() -> str:
    """Qwen2-VL's chat template, extended with ``detection_image`` / ``seg_image`` / ``clip_image`` content parts."""

    def emit(text: str) -> str:
        return "{{- " + repr(text) + " -}}"

    def wrapped(pad: str) -> str:
        return emit(VISION_START + pad + VISION_END)

    extra_parts = "".join(
        f"{{%- elif part['type'] == '{branch.prefix}_image' -%}}{wrapped(branch.image_pad)}"
        for branch in BRANCH_TOKENS.values()
    )
    return (
        "{%- set image_count = namespace(value=0) -%}"
        "{%- set video_count = namespace(value=0) -%}"
        "{%- for message in messages -%}"
        "{%- if loop.first and message['role'] != 'system' -%}"
        + emit(f"{IM_START}system\nYou are a helpful assistant.{IM_END}\n")
        + "{%- endif -%}"
        + emit(IM_START)
        + "{{- message['role'] -}}"
        + emit("\n")
        + "{%- if message['content'] is string -%}{{- message['content'] -}}"
        "{%- else -%}{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'image' -%}"
        "{%- set image_count.value = image_count.value + 1 -%}"
        "{%- if add_vision_id -%}{{- 'Picture ' ~ image_count.value ~ ': ' -}}{%- endif -%}"
        + wrapped(IMAGE_PAD)
        + "{%- elif part['type'] == 'video' -%}"
        "{%- set video_count.value = video_count.value + 1 -%}"
        "{%- if add_vision_id -%}{{- 'Video ' ~ video_count.value ~ ': ' -}}{%- endif -%}"
        + wrapped(VIDEO_PAD)
        + extra_parts
        + "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}"
        "{%- endif -%}{%- endfor -%}{%- endif -%}" + emit(IM_END + "\n") + "{%- endfor -%}"
        "{%- if add_generation_prompt -%}" + emit(f"{IM_START}assistant\n") + "{%- endif -%}"
    )


VPT_CHAT_TEMPLATE = _build_chat_template()
"""The default chat template: Qwen2-VL's rendering (default system prompt, ``<|im_start|>role\\n...<|im_end|>\\n``,
``add_vision_id``), where ``detection_image`` / ``seg_image`` / ``clip_image`` content parts render as
``<|vision_start|><|detection_image_pad|><|vision_end|>`` etc. Messages with string content render unchanged."""


def _flatten_images(images: Any) -> tuple[list, list[int] | None]:
    """Return ``(flat list, per-sample counts)``; the counts are None unless ``images`` is nested per sample."""
    if images is None:
        return [], None
    if isinstance(images, (list, tuple)):
        if images and all(isinstance(sample, (list, tuple)) for sample in images):
            return [image for sample in images for image in sample], [len(sample) for sample in images]
        return list(images), None
    return [images], None


def _normalize_kind(kind: str) -> str:
    """Accept the vocabulary's branch kinds too (``dino`` -> ``detection``, ``sam`` -> ``seg``)."""
    kind = BRANCH_TOKENS[kind].prefix if kind in BRANCH_TOKENS else kind
    if kind not in MODALITIES:
        raise ValueError(f"Unknown visual input kind {kind!r}; choose from {list(MODALITIES)}")
    return kind


class VPT_Qwen2VLProcessor(Qwen2VLProcessor):
    r"""
    Qwen2-VL processor with the VPT re-encoding inputs: DINOv2 (``detection``), SAM (``seg``) and CLIP (``clip``,
    re-encoded by Qwen2-VL's own vision tower) images.

    Text placeholders are expanded into ``<|vision_start|>`` + N pad tokens + ``<|vision_end|>``. Two spellings are
    accepted for every kind: the dataset one (``<image>``, ``<detection_image>``, ``<seg_image>``, ``<clip_image>``,
    ``<video>``) and the chat-template one (``<|vision_start|><|detection_image_pad|><|vision_end|>`` ...). N is
    ``prod(grid_thw) // merge_size**2`` for images, videos and clip images, and ``detection_image_seqlen`` /
    ``seg_image_seqlen`` for detection and seg images.

    Args:
        image_processor ([`Qwen2VLImageProcessor`], *optional*):
            Processes ``images`` and ``clip_images``.
        tokenizer ([`Qwen2TokenizerFast`], *optional*):
            A Qwen2 tokenizer with the VPT tokens added (see `transformers_vpt.vocabulary.add_vpt_tokens`).
        video_processor ([`Qwen2VLVideoProcessor`], *optional*):
            Processes ``videos``.
        chat_template (`str`, *optional*):
            A Jinja chat template; defaults to [`VPT_CHAT_TEMPLATE`].
        detection_processor_config (`dict`, *optional*):
            Keyword arguments of the [`BitImageProcessor`] of ``detection_images``; defaults to the released DINOv2
            preprocessing, [`DEFAULT_DETECTION_PROCESSOR_CONFIG`].
        seg_processor_config (`dict`, *optional*):
            Keyword arguments of the [`SamImageProcessor`] of ``seg_images``; defaults to the released SAM
            preprocessing, [`DEFAULT_SEG_PROCESSOR_CONFIG`].
        detection_image_seqlen (`int`, *optional*, defaults to 256):
            Number of ``<|detection_image_pad|>`` tokens per detection image (DINOv2 patch tokens, CLS dropped).
        seg_image_seqlen (`int`, *optional*, defaults to 256):
            Number of ``<|seg_image_pad|>`` tokens per seg image (projected SAM features).
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        video_processor=None,
        chat_template: str | None = None,
        detection_processor_config: dict[str, Any] | None = None,
        seg_processor_config: dict[str, Any] | None = None,
        detection_image_seqlen: int = 256,
        seg_image_seqlen: int = 256,
        **kwargs,
    ):
        self.detection_processor_config = copy.deepcopy(
            DEFAULT_DETECTION_PROCESSOR_CONFIG if detection_processor_config is None else detection_processor_config
        )
        self.seg_processor_config = copy.deepcopy(
            DEFAULT_SEG_PROCESSOR_CONFIG if seg_processor_config is None else seg_processor_config
        )
        self.detection_image_seqlen = detection_image_seqlen
        self.seg_image_seqlen = seg_image_seqlen
        self.detection_processor = BitImageProcessor(**self.detection_processor_config)
        self.seg_processor = SamImageProcessor(**self.seg_processor_config)
        super().__init__(
            image_processor,
            tokenizer,
            video_processor,
            chat_template=VPT_CHAT_TEMPLATE if chat_template is None else chat_template,
            **kwargs,
        )

    @property
    def model_input_names(self) -> list[str]:
        return super().model_input_names + [
            BRANCH_TOKENS["dino"].images_key,
            BRANCH_TOKENS["sam"].images_key,
            "clip_pixel_values",
            "clip_images_grid_thw",
        ]

    def pad_token_id(self, kind: str) -> int | None:
        """Id of the pad token of ``kind`` (e.g. ``<|detection_image_pad|>``), None if the tokenizer lacks it."""
        return token_id(self.tokenizer, _PAD_TOKENS[_normalize_kind(kind)])

    def num_image_tokens(self, kind: str, grid_thw: Sequence[int] | None = None) -> int:
        """Number of pad tokens one visual input of ``kind`` expands to.

        Args:
            kind: One of [`MODALITIES`] (``"dino"`` / ``"sam"`` are accepted for ``"detection"`` / ``"seg"``).
            grid_thw: The ``(t, h, w)`` patch grid of the input; required for ``image``, ``video`` and ``clip``.
        """
        kind = _normalize_kind(kind)
        if kind == "detection":
            return self.detection_image_seqlen
        if kind == "seg":
            return self.seg_image_seqlen
        if grid_thw is None:
            raise ValueError(f"`grid_thw` is required to count the tokens of a {kind} input")
        merge_size = (self.video_processor if kind == "video" else self.image_processor).merge_size
        return math.prod(int(n) for n in grid_thw) // merge_size**2

    def preprocess_extra_images(self, kind: str, images: Any, **images_kwargs) -> dict[str, Any]:
        """Run the image processor of a VPT re-encoding kind on a flat list of images.

        Args:
            kind: ``"detection"``, ``"seg"`` or ``"clip"`` (or ``"dino"`` / ``"sam"``).
            images: The images (PIL images, arrays or tensors).
            images_kwargs: ``return_tensors`` (defaults to ``"pt"``); for ``clip`` also any Qwen2-VL image kwargs
                (``min_pixels``, ``max_pixels`` ...).

        Returns:
            ``{"detection_images": (N, 3, H, W)}``, ``{"seg_images": (N, 3, H, W)}`` or
            ``{"clip_pixel_values": (patches, dim), "clip_images_grid_thw": (N, 3)}``.
        """
        kind = _normalize_kind(kind)
        images_kwargs.setdefault("return_tensors", "pt")
        if kind == "clip":
            outputs = self.image_processor(images=images, **images_kwargs)
            return {"clip_pixel_values": outputs["pixel_values"], "clip_images_grid_thw": outputs["image_grid_thw"]}
        if kind not in ("detection", "seg"):
            raise ValueError(f"{kind!r} is not a VPT re-encoding kind; choose from {list(EXTRA_MODALITIES)}")
        processor = self.detection_processor if kind == "detection" else self.seg_processor
        outputs = processor(images, return_tensors=images_kwargs["return_tensors"])
        return {branch_by_prefix(kind).images_key: outputs["pixel_values"]}

    def expand_placeholders(
        self,
        text: str | Sequence[str],
        image_grid_thw: Sequence[Sequence[int]] | None = None,
        video_grid_thw: Sequence[Sequence[int]] | None = None,
        clip_grid_thw: Sequence[Sequence[int]] | None = None,
        num_detection_images: int = 0,
        num_seg_images: int = 0,
        images_per_sample: Mapping[str, Sequence[int] | None] | None = None,
    ) -> list[str]:
        """Expand every visual placeholder into ``<|vision_start|>`` + pad tokens + ``<|vision_end|>``.

        Inputs of each kind are consumed in order across the texts, as with Qwen2-VL's flat image lists. A text may
        be a whole sample or a single message (LLaMA-Factory plugins pass a sample's messages).

        Args:
            text: One text or a list of texts.
            image_grid_thw: One ``(t, h, w)`` row per image, in placeholder order.
            video_grid_thw: One row per video.
            clip_grid_thw: One row per clip image.
            num_detection_images: Number of detection (DINOv2) images.
            num_seg_images: Number of seg (SAM) images.
            images_per_sample: Optional per-text input counts by kind (from inputs nested per sample); when given
                for a kind, each text must have exactly that many placeholders of the kind.

        Raises:
            ValueError: A text's placeholder count does not match its inputs (the message names the text index and
                the kind), or the tokenizer lacks the pad token of a kind in use.
        """
        texts = [text] if isinstance(text, str) else list(text)

        def grid_tokens(kind: str, grids: Sequence[Sequence[int]] | None) -> list[int]:
            return [self.num_image_tokens(kind, grid) for grid in ([] if grids is None else grids)]

        tokens_per_input = {
            "image": grid_tokens("image", image_grid_thw),
            "video": grid_tokens("video", video_grid_thw),
            "detection": [self.detection_image_seqlen] * num_detection_images,
            "seg": [self.seg_image_seqlen] * num_seg_images,
            "clip": grid_tokens("clip", clip_grid_thw),
        }
        counts = [Counter(_PLACEHOLDERS[m][0] for m in _PLACEHOLDER_RE.findall(t)) for t in texts]
        for kind, sizes in tokens_per_input.items():
            self._check_placeholder_counts(
                kind, [c[kind] for c in counts], len(sizes), (images_per_sample or {}).get(kind)
            )

        remaining = {kind: iter(sizes) for kind, sizes in tokens_per_input.items()}

        def expand(match: re.Match) -> str:
            kind, wrap = _PLACEHOLDERS[match.group(0)]
            pads = _PAD_TOKENS[kind] * next(remaining[kind])
            return VISION_START + pads + VISION_END if wrap else pads

        return [_PLACEHOLDER_RE.sub(expand, t) for t in texts]

    def _check_placeholder_counts(
        self, kind: str, placeholders: list[int], num_inputs: int, inputs_per_sample: Sequence[int] | None
    ) -> None:
        name = _DATASET_PLACEHOLDERS[kind]
        if inputs_per_sample is not None:
            if len(inputs_per_sample) != len(placeholders):
                raise ValueError(
                    f"{kind} inputs are nested for {len(inputs_per_sample)} samples, but there are "
                    f"{len(placeholders)} texts"
                )
            for i, (found, given) in enumerate(zip(placeholders, inputs_per_sample)):
                if found != given:
                    raise ValueError(f"Sample {i} has {found} {name} placeholder(s) but {given} {kind} input(s)")
        left = num_inputs
        for i, found in enumerate(placeholders):
            if found > left:
                raise ValueError(
                    f"Sample {i} has {found} {name} placeholder(s) but only {left} {kind} input(s) are left for it "
                    f"({num_inputs} given in all; placeholders per sample: {placeholders})"
                )
            if found and self.pad_token_id(kind) is None:
                raise ValueError(
                    f"Sample {i} uses {kind} inputs but the tokenizer has no {_PAD_TOKENS[kind]} token; add the VPT "
                    "tokens with `transformers_vpt.vocabulary.add_vpt_tokens`"
                )
            left -= found
        if left:
            raise ValueError(
                f"{num_inputs} {kind} input(s) given but only {num_inputs - left} {name} placeholder(s) found "
                f"(placeholders per sample: {placeholders})"
            )

    def __call__(
        self,
        images: Any = None,
        text: str | list[str] | None = None,
        videos: Any = None,
        *,
        detection_images: Any = None,
        seg_images: Any = None,
        clip_images: Any = None,
        **kwargs,
    ) -> BatchFeature:
        """Tokenize ``text`` with expanded placeholders and preprocess every kind of visual input.

        Args:
            images: Qwen2-VL images, a flat list in placeholder order or a list per sample.
            text: One text or a batch of texts with placeholders (see the class docstring).
            videos: Qwen2-VL videos.
            detection_images: DINOv2 images, flat or per sample.
            seg_images: SAM images, flat or per sample.
            clip_images: Images re-encoded by Qwen2-VL's vision tower, flat or per sample.
            kwargs: Tokenizer and image-processor kwargs, e.g. ``padding``, ``padding_side``, ``return_tensors``.

        Returns:
            [`BatchFeature`] with ``input_ids``, ``attention_mask`` and, for the inputs given, ``pixel_values`` and
            ``image_grid_thw``, ``pixel_values_videos`` and ``video_grid_thw``, ``detection_images`` (N, 3, H, W),
            ``seg_images`` (N, 3, H, W), ``clip_pixel_values`` and ``clip_images_grid_thw``.
        """
        if text is None:
            raise ValueError(f"{type(self).__name__} needs `text` with a placeholder for each visual input")
        output_kwargs = self._merge_kwargs(
            Qwen2VLProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs
        )
        text_kwargs = output_kwargs["text_kwargs"]
        return_tensors = text_kwargs.pop("return_tensors", None)
        return_mm_token_type_ids = text_kwargs.pop("return_mm_token_type_ids", False)

        inputs: dict[str, Any] = {}
        per_sample: dict[str, list[int] | None] = {}
        given = {"image": images, "detection": detection_images, "seg": seg_images, "clip": clip_images}
        for kind, value in given.items():
            flat, per_sample[kind] = _flatten_images(value)
            if not flat:
                continue
            if kind == "image":
                inputs.update(self.image_processor(images=flat, **output_kwargs["images_kwargs"]))
            else:
                inputs.update(self.preprocess_extra_images(kind, flat, **output_kwargs["images_kwargs"]))
        if videos is not None:
            inputs.update(self.video_processor(videos=videos, **output_kwargs["videos_kwargs"]))

        texts = self.expand_placeholders(
            text,
            image_grid_thw=inputs.get("image_grid_thw"),
            video_grid_thw=inputs.get("video_grid_thw"),
            clip_grid_thw=inputs.get("clip_images_grid_thw"),
            num_detection_images=len(inputs.get("detection_images", ())),
            num_seg_images=len(inputs.get("seg_images", ())),
            images_per_sample=per_sample,
        )
        text_inputs = self.tokenizer(texts, **text_kwargs, return_tensors=None)
        self._check_pad_counts(texts, text_inputs["input_ids"])
        if return_mm_token_type_ids:
            ids = np.array(text_inputs["input_ids"])
            text_inputs["mm_token_type_ids"] = (ids == self.image_token_id).astype(np.int64).tolist()
        return BatchFeature(data={**text_inputs, **inputs}, tensor_type=return_tensors)

    def _check_pad_counts(self, texts: list[str], input_ids: list[list[int]]) -> None:
        """Raise if tokenization (e.g. truncation) changed the number of pad tokens of any kind."""
        for kind, pad in _PAD_TOKENS.items():
            pad_id = self.pad_token_id(kind)
            if pad_id is None:
                continue
            in_text = [t.count(pad) for t in texts]
            in_ids = [list(ids).count(pad_id) for ids in input_ids]
            if in_text != in_ids:
                raise ValueError(
                    f"Mismatch in {pad} count between text ({in_text}) and input_ids ({in_ids}), probably because "
                    "of truncation; disable truncation or increase `max_length`"
                )

    def apply_chat_template(self, conversation, chat_template: str | None = None, **kwargs):
        """Render (and with ``tokenize=True`` process) conversations with typed content parts.

        Besides Qwen2-VL's ``image`` / ``video`` / ``text`` parts, ``detection_image``, ``seg_image`` and
        ``clip_image`` parts are rendered by [`VPT_CHAT_TEMPLATE`]. With ``tokenize=True`` the images they carry
        (under ``image``, ``url`` or ``path``) are loaded and passed as ``detection_images`` / ``seg_images`` /
        ``clip_images``, per conversation.
        """
        if kwargs.get("tokenize", False):
            is_batched = isinstance(conversation[0], (list, tuple)) or hasattr(conversation[0], "content")
            conversations = conversation if is_batched else [conversation]
            for branch in BRANCH_TOKENS.values():
                part_type = f"{branch.prefix}_image"
                per_conversation = [
                    [
                        load_image(part[key])
                        for message in conv
                        if not isinstance(message["content"], str)
                        for part in message["content"]
                        if part["type"] == part_type
                        for key in ("image", "url", "path")
                        if key in part
                    ]
                    for conv in conversations
                ]
                if any(per_conversation):
                    kwargs.setdefault(branch.images_key, per_conversation)
        return super().apply_chat_template(conversation, chat_template, **kwargs)


__all__ = ["VPT_Qwen2VLProcessor"]
