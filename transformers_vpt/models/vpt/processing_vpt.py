"""The VPT processor layer shared by every Qwen-VL base.

[`VPTProcessorMixin`] holds everything of a VPT processor that does not depend on the base: the DINOv2 (``detection``)
and SAM (``seg``) preprocessing built from saved parameters, the CLIP (``clip``) images re-encoded by the base's own
vision tower, the expansion of every placeholder (``<image>``, ``<detection_image>``, ``<seg_image>``, ``<clip_image>``,
``<video>`` and their chat-template spellings), literal user-text spans, typed content parts in chat templates, and
the saving and loading of all of it. A base's processor is ``class VPT_XProcessor(VPTProcessorMixin, XProcessor)``:
the base (``Qwen2VLProcessor``, ``Qwen2_5_VLProcessor``, ...) brings its tokenizer, image and video processors, its
video outputs (e.g. Qwen2.5-VL's ``second_per_grid_ts``) and its kwargs types; the subclass adds only its typed
``__call__`` and its kwargs class (`valid_processor_kwargs`).
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image
from tokenizers import Tokenizer
from transformers import BitImageProcessor, Qwen2VLImageProcessor, SamImageProcessor
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling
from transformers.image_utils import load_image as load_remote_image
from transformers.processing_utils import ProcessingKwargs, Unpack

from ...images import load_image
from ...vocabulary import (
    BRANCH_TOKENS,
    IM_END,
    IM_START,
    IMAGE_PAD,
    IMAGE_PLACEHOLDER,
    LITERAL_END,
    LITERAL_START,
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
"""The VPT re-encoding kinds: ``detection`` (DINOv2), ``seg`` (SAM), ``clip`` (the base's own ViT)."""

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
    VISION_START + VIDEO_PAD + VISION_END: ("video", True),  # whole, so that a base can expand it into frames
    **{pad: (kind, False) for kind, pad in _PAD_TOKENS.items()},
}
_PLACEHOLDER_RE = re.compile("|".join(re.escape(p) for p in _PLACEHOLDERS))
_LITERAL_RE = re.compile(f"{LITERAL_START}(.*?){LITERAL_END}", re.DOTALL)


def split_literal(text: str) -> list[tuple[str, bool]]:
    """``text`` as ``(segment, is_literal)`` pairs: literal segments are the user text marked by
    `transformers_vpt.vocabulary.literal_text` (markers dropped); stray markers are dropped too."""
    segments, position = [], 0
    for match in _LITERAL_RE.finditer(text):
        segments += [(text[position : match.start()], False), (match.group(1), True)]
        position = match.end()
    segments.append((text[position:], False))
    return [
        (segment.replace(LITERAL_START, "").replace(LITERAL_END, ""), literal)
        for segment, literal in segments
        if segment
    ]


def strip_literal_markers(text: str) -> str:
    """``text`` as a person reads it: the literal-text markers removed."""
    return text.replace(LITERAL_START, "").replace(LITERAL_END, "")


def _outside_literals(text: str, transform) -> str:
    """Apply ``transform`` to the parts of ``text`` outside literal spans; the spans keep their markers."""
    parts, position = [], 0
    for match in _LITERAL_RE.finditer(text):
        parts += [transform(text[position : match.start()]), match.group(0)]
        position = match.end()
    parts.append(transform(text[position:]))
    return "".join(parts)


def _channels_last(processor: Any, images: list) -> dict[str, str]:
    """``input_data_format`` for PIL images and a slow (NumPy) image processor: explicit, so that an image 1 or 3
    pixels high is not read as channels-first. Fast processors convert PIL images to CHW tensors themselves."""
    pil = images and all(isinstance(image, Image.Image) for image in images)
    return {"input_data_format": "channels_last"} if pil and not getattr(processor, "is_fast", False) else {}


def build_chat_template(default_system: str | None = "You are a helpful assistant.") -> str:
    """Qwen2-VL's chat template (Qwen2.5-VL's is the same), extended with ``detection_image`` / ``seg_image`` /
    ``clip_image`` content parts. ``default_system``: the system turn rendered when a conversation has none (None:
    no system turn, as Qwen3-VL's template)."""

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
        + (
            "{%- if loop.first and message['role'] != 'system' -%}"
            + emit(f"{IM_START}system\n{default_system}{IM_END}\n")
            + "{%- endif -%}"
            if default_system is not None
            else ""
        )
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


VPT_CHAT_TEMPLATE = build_chat_template()
"""The default chat template: Qwen2-VL's rendering, which Qwen2.5-VL shares (default system prompt,
``<|im_start|>role\\n...<|im_end|>\\n``, ``add_vision_id``), where ``detection_image`` / ``seg_image`` /
``clip_image`` content parts render as ``<|vision_start|><|detection_image_pad|><|vision_end|>`` etc. Messages with
string content render unchanged."""


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


_IMAGE_PART_TYPES = ("image", *(f"{branch.prefix}_image" for branch in BRANCH_TOKENS.values()))


def _parts(message: Mapping[str, Any]) -> list:
    content = message["content"]
    return [] if isinstance(content, str) else content


def _load_part_image(value: Any) -> Any:
    """A content part's image through the project's loader (EXIF, 16-bit); URLs and base64 through transformers'."""
    if isinstance(value, str) and (value.startswith(("http://", "https://", "data:")) or ";base64," in value):
        return load_remote_image(value)
    return load_image(value)


def _with_loaded_images(conversation: list) -> list:
    """``conversation`` with every image content part's ``image`` / ``url`` / ``path`` loaded into ``image``."""
    loaded = []
    for message in conversation:
        if isinstance(message["content"], str):
            loaded.append(message)
            continue
        parts = []
        for part in message["content"]:
            key = next((k for k in ("image", "url", "path") if k in part), None)
            if part.get("type") in _IMAGE_PART_TYPES and key is not None:
                kept = {k: v for k, v in part.items() if k not in ("url", "path")}
                part = {**kept, "image": _load_part_image(part[key])}
            parts.append(part)
        loaded.append({**message, "content": parts})
    return loaded


class VPTProcessorKwargs(ProcessingKwargs, total=False):
    """The call kwargs every VPT processor shares; a base's kwargs class restates them with its own image and video
    kwargs types (TypedDicts inherit annotations but not ``_defaults``) and is the base's `valid_processor_kwargs`.

    `text_kwargs` go to the tokenizer (`padding`, `padding_side`, `truncation`, `max_length`, ...;
    `return_mm_token_type_ids` adds `mm_token_type_ids`, 1 at `<|image_pad|>`). `images_kwargs` (the base's image
    kwargs: `min_pixels`, `max_pixels`, ...) go to the base's image processor, for `images` and `clip_images`;
    detection and seg images always use the processor's saved DINOv2 / SAM settings. `videos_kwargs` go to the base's
    video processing; `return_tensors` (a common kwarg) applies to every output. Defaults: no padding, no
    `mm_token_type_ids`; the padding side is the tokenizer's.
    """

    _defaults = {  # noqa: RUF012 (ProcessingKwargs reads this class attribute)
        "text_kwargs": {
            "padding": False,
            "return_mm_token_type_ids": False,
        },
    }


def _slow_image_processor(fast: Any) -> Qwen2VLImageProcessor:
    """The slow Qwen2-VL image processor (the image processor of every Qwen-VL base) with the settings of ``fast``."""
    known = Qwen2VLImageProcessor().to_dict().keys() - {"image_processor_type"}
    return Qwen2VLImageProcessor(**{key: value for key, value in fast.to_dict().items() if key in known})


class VPTProcessorMixin:
    r"""
    The VPT re-encoding inputs on top of a Qwen-VL processor: DINOv2 (``detection``), SAM (``seg``) and CLIP
    (``clip``, re-encoded by the base's own vision tower) images. Use it first among the bases,
    ``class VPT_XProcessor(VPTProcessorMixin, XProcessor)``, and set `valid_processor_kwargs` to the base's VPT kwargs
    class (see [`VPTProcessorKwargs`]).

    Text placeholders are expanded into ``<|vision_start|>`` + N pad tokens + ``<|vision_end|>``. Two spellings are
    accepted for every kind: the dataset one (``<image>``, ``<detection_image>``, ``<seg_image>``, ``<clip_image>``,
    ``<video>``) and the chat-template one (``<|vision_start|><|detection_image_pad|><|vision_end|>`` ...). N is
    ``prod(grid_thw) // merge_size**2`` for images, videos and clip images, and ``detection_image_seqlen`` /
    ``seg_image_seqlen`` for detection and seg images.

    Args:
        image_processor ([`Qwen2VLImageProcessor`], *optional*):
            The base's image processor; processes ``images`` and ``clip_images``.
        tokenizer ([`Qwen2TokenizerFast`], *optional*):
            A Qwen2 tokenizer with the VPT tokens added (see `transformers_vpt.vocabulary.add_vpt_tokens`).
        video_processor ([`Qwen2VLVideoProcessor`], *optional*):
            The base's video processor; processes ``videos``.
        chat_template (`str`, *optional*):
            A Jinja chat template; defaults to the class's `vpt_chat_template` ([`VPT_CHAT_TEMPLATE`]).
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
        fast_image_processor (`bool`, *optional*, defaults to `False`):
            Keep a fast (torch) image processor. By default it is replaced by the slow (PIL/NumPy) one with
            the same settings: the released models were trained with the slow one, and the fast one differs by up
            to one grey level (|pixel_values| difference <= 0.03 after normalisation).
    """

    vpt_chat_template: str = VPT_CHAT_TEMPLATE
    """The chat template used when none is given (a base whose chat template differs overrides it)."""
    valid_processor_kwargs = VPTProcessorKwargs
    """The kwargs class ``__call__`` merges its kwargs with (`ProcessorMixin`'s attribute); each base sets its own."""

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
        fast_image_processor: bool = False,
        **kwargs,
    ):
        self.fast_image_processor = fast_image_processor
        if image_processor is not None and getattr(image_processor, "is_fast", False) and not fast_image_processor:
            image_processor = _slow_image_processor(image_processor)
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
            chat_template=self.vpt_chat_template if chat_template is None else chat_template,
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
            images_kwargs: ``return_tensors`` (defaults to ``"pt"``); for ``clip`` also any of the base's image kwargs
                (``min_pixels``, ``max_pixels`` ...).

        Returns:
            ``{"detection_images": (N, 3, H, W)}``, ``{"seg_images": (N, 3, H, W)}`` or
            ``{"clip_pixel_values": (patches, dim), "clip_images_grid_thw": (N, 3)}``.
        """
        kind = _normalize_kind(kind)
        images_kwargs.setdefault("return_tensors", "pt")
        flat = images if isinstance(images, (list, tuple)) else [images]
        if kind == "clip":
            images_kwargs = {**_channels_last(self.image_processor, flat), **images_kwargs}
            outputs = self.image_processor(images=images, **images_kwargs)
            return {"clip_pixel_values": outputs["pixel_values"], "clip_images_grid_thw": outputs["image_grid_thw"]}
        if kind not in ("detection", "seg"):
            raise ValueError(f"{kind!r} is not a VPT re-encoding kind; choose from {list(EXTRA_MODALITIES)}")
        processor = self.detection_processor if kind == "detection" else self.seg_processor
        outputs = processor(images, return_tensors=images_kwargs["return_tensors"], **_channels_last(processor, flat))
        return {branch_by_prefix(kind).images_key: outputs["pixel_values"]}

    def preprocess_videos(self, videos: Any, **videos_kwargs) -> dict[str, Any]:
        """The base processor's own video inputs: its ``__call__`` runs on ``videos`` with an empty text, and every
        output but the tokenizer's is kept, so whatever the base adds for videos comes through (Qwen2-VL:
        ``pixel_values_videos``, ``video_grid_thw``; Qwen2.5-VL also ``second_per_grid_ts`` from ``fps``).

        Args:
            videos: The videos, as the base's video processor takes them.
            videos_kwargs: The merged video kwargs (``fps``, ``return_tensors``, ...).
        """
        base_call = super().__call__  # the base processor's (the class after this mixin in the MRO)
        outputs = base_call(text=[""], videos=videos, videos_kwargs=dict(videos_kwargs))
        text_keys = {*self.tokenizer.model_input_names, "mm_token_type_ids"}
        return {key: value for key, value in outputs.items() if key not in text_keys}

    def expand_placeholders(
        self,
        text: str | Sequence[str],
        image_grid_thw: Sequence[Sequence[int]] | None = None,
        video_grid_thw: Sequence[Sequence[int]] | None = None,
        clip_grid_thw: Sequence[Sequence[int]] | None = None,
        num_detection_images: int = 0,
        num_seg_images: int = 0,
        images_per_sample: Mapping[str, Sequence[int] | None] | None = None,
        video_metadata: Sequence[Any] | None = None,
    ) -> list[str]:
        """Expand every visual placeholder into ``<|vision_start|>`` + pad tokens + ``<|vision_end|>``.

        Inputs of each kind are consumed in order across the texts, as with the base's flat image lists. A text may
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
            video_metadata: One entry per video (the video processor's ``video_metadata``), for a base whose video
                text depends on it (Qwen3-VL's frame timestamps; see [`expand_video`]).

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
        counts = [
            Counter(_PLACEHOLDERS[m][0] for m in _PLACEHOLDER_RE.findall(_LITERAL_RE.sub("", t))) for t in texts
        ]
        for kind, sizes in tokens_per_input.items():
            self._check_placeholder_counts(
                kind, [c[kind] for c in counts], len(sizes), (images_per_sample or {}).get(kind)
            )

        remaining = {kind: iter(sizes) for kind, sizes in tokens_per_input.items()}
        video_grids = video_grid_thw if video_grid_thw is not None else ()
        videos = iter(zip(video_grids, video_metadata or itertools.repeat(None)))

        def expand(match: re.Match) -> str:
            kind, wrap = _PLACEHOLDERS[match.group(0)]
            if kind == "video":
                return self.expand_video(*next(videos), wrap=wrap)
            pads = _PAD_TOKENS[kind] * next(remaining[kind])
            return VISION_START + pads + VISION_END if wrap else pads

        return [_outside_literals(t, lambda part: _PLACEHOLDER_RE.sub(expand, part)) for t in texts]

    def expand_video(self, grid_thw: Sequence[int], metadata: Any = None, wrap: bool = True) -> str:
        """The text one video placeholder becomes: ``<|vision_start|>`` + its pad tokens + ``<|vision_end|>`` (only
        the pads when ``wrap`` is False: the text already has the delimiters). ``metadata``: the video's entry of the
        video processor's ``video_metadata``, unused here; a base whose video text depends on it overrides this."""
        pads = VIDEO_PAD * self.num_image_tokens("video", grid_thw)
        return VISION_START + pads + VISION_END if wrap else pads

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
        **kwargs: Unpack[VPTProcessorKwargs],
    ) -> BatchFeature:
        """Tokenize ``text`` with expanded placeholders and preprocess every kind of visual input.

        Args:
            images: The base's images, a flat list in placeholder order or a list per sample.
            text: One text or a batch of texts with placeholders (see the class docstring).
            videos: The base's videos (see [`preprocess_videos`]).
            detection_images: DINOv2 images, flat or per sample.
            seg_images: SAM images, flat or per sample.
            clip_images: Images re-encoded by the base's vision tower, flat or per sample.
            kwargs: The class's `valid_processor_kwargs`: tokenizer, image-processor and video-processor kwargs,
                flat (``padding_side="left"``, ``return_tensors="pt"``) or per modality (``text_kwargs={...}``).

        Returns:
            [`BatchFeature`] with ``input_ids``, ``attention_mask`` and, for the inputs given, ``pixel_values`` and
            ``image_grid_thw``, the base's video outputs (``pixel_values_videos``, ``video_grid_thw``, and e.g.
            Qwen2.5-VL's ``second_per_grid_ts``), ``detection_images`` (N, 3, H, W), ``seg_images`` (N, 3, H, W),
            ``clip_pixel_values`` and ``clip_images_grid_thw``.
        """
        if text is None:
            raise ValueError(f"{type(self).__name__} needs `text` with a placeholder for each visual input")
        output_kwargs = self._merge_kwargs(
            self.valid_processor_kwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs
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
                images_kwargs = {**_channels_last(self.image_processor, flat), **output_kwargs["images_kwargs"]}
                inputs.update(self.image_processor(images=flat, **images_kwargs))
            else:
                inputs.update(self.preprocess_extra_images(kind, flat, **output_kwargs["images_kwargs"]))
        if videos is not None:
            inputs.update(self.preprocess_videos(videos, **output_kwargs["videos_kwargs"]))
        video_metadata = inputs.pop("video_metadata", None)  # read by `expand_video`, not a model input

        texts = self.expand_placeholders(
            text,
            image_grid_thw=inputs.get("image_grid_thw"),
            video_grid_thw=inputs.get("video_grid_thw"),
            clip_grid_thw=inputs.get("clip_images_grid_thw"),
            num_detection_images=len(inputs.get("detection_images", ())),
            num_seg_images=len(inputs.get("seg_images", ())),
            images_per_sample=per_sample,
            video_metadata=video_metadata,
        )
        text_inputs = self._tokenize(texts, text_kwargs)
        self._check_pad_counts(texts, text_inputs["input_ids"])
        if return_mm_token_type_ids:
            ids = np.array(text_inputs["input_ids"])
            text_inputs["mm_token_type_ids"] = (ids == self.image_token_id).astype(np.int64).tolist()
        return BatchFeature(data={**text_inputs, **inputs}, tensor_type=return_tensors)

    def _tokenize(self, texts: list[str], text_kwargs: dict[str, Any]) -> dict[str, list]:
        """Tokenize ``texts``; literal spans (`vocabulary.literal_text`) are tokenized as plain text, matching no
        added token, so that user text never becomes a control token or an image slot."""
        if not any(LITERAL_START in text for text in texts):
            return self.tokenizer(texts, **text_kwargs, return_tensors=None)
        plain = self._plain_tokenizer()
        ids = []
        for text in texts:
            row = []
            for segment, literal in split_literal(text):
                if literal:
                    row += plain.encode(segment, add_special_tokens=False).ids
                else:
                    row += self.tokenizer(segment, add_special_tokens=False)["input_ids"]
            ids.append(row)
        if text_kwargs.get("truncation") and text_kwargs.get("max_length"):
            side, limit = self.tokenizer.truncation_side, text_kwargs["max_length"]
            ids = [row[:limit] if side == "right" else row[-limit:] for row in ids]
        # the advice to call `__call__` instead of `pad` does not apply: the ids are not the tokenizer's own
        self.tokenizer.deprecation_warnings["Asking-to-pad-a-fast-tokenizer"] = True
        pad_keys = ("padding", "max_length", "pad_to_multiple_of", "padding_side", "return_attention_mask")
        return dict(self.tokenizer.pad({"input_ids": ids}, **{k: text_kwargs[k] for k in pad_keys if k in text_kwargs}))

    def _plain_tokenizer(self) -> Tokenizer:
        """The tokenizer's backend without its added tokens (built once): how plain text of the same characters
        tokenizes."""
        if getattr(self, "_plain_backend", None) is None:
            backend = getattr(self.tokenizer, "backend_tokenizer", None)
            if backend is None:
                raise ValueError(
                    f"Literal user text needs a fast tokenizer, got {type(self.tokenizer).__name__}; load the "
                    "processor with use_fast=True"
                )
            spec = json.loads(backend.to_str())
            spec["added_tokens"] = []
            self._plain_backend = Tokenizer.from_str(json.dumps(spec))
        return self._plain_backend

    def _check_pad_counts(self, texts: list[str], input_ids: list[list[int]]) -> None:
        """Raise if tokenization (e.g. truncation) changed the number of pad tokens of any kind."""
        texts = [_LITERAL_RE.sub("", text) for text in texts]
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

        Besides the base's ``image`` / ``video`` / ``text`` parts, ``detection_image``, ``seg_image`` and
        ``clip_image`` parts are rendered by [`VPT_CHAT_TEMPLATE`]. With ``tokenize=True`` the images they carry
        (under ``image``, ``url`` or ``path``) are loaded and passed as ``detection_images`` / ``seg_images`` /
        ``clip_images``, per conversation.
        """
        if kwargs.get("tokenize", False):
            is_batched = isinstance(conversation[0], (list, tuple)) or hasattr(conversation[0], "content")
            conversations = [_with_loaded_images(conv) for conv in (conversation if is_batched else [conversation])]
            conversation = conversations if is_batched else conversations[0]
            for branch in BRANCH_TOKENS.values():
                part_type = f"{branch.prefix}_image"
                per_conversation = [
                    [part["image"] for message in conv for part in _parts(message) if part["type"] == part_type]
                    for conv in conversations
                ]
                if any(per_conversation):
                    kwargs.setdefault(branch.images_key, per_conversation)
        return super().apply_chat_template(conversation, chat_template, **kwargs)


__all__ = [
    "DEFAULT_DETECTION_PROCESSOR_CONFIG",
    "DEFAULT_SEG_PROCESSOR_CONFIG",
    "EXTRA_MODALITIES",
    "MODALITIES",
    "VPT_CHAT_TEMPLATE",
    "VPTProcessorKwargs",
    "build_chat_template",
    "VPTProcessorMixin",
    "split_literal",
    "strip_literal_markers",
]
