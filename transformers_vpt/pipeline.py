"""Two-round VPT inference, as the released evaluation runs it (round 1 -> route -> round 2).

Round 1 answers the user turn freely. Its decoded text (special tokens stripped; region and action tokens survive)
picks the route:

* **region**: one or more region spans. Each span becomes a crop of the full-resolution original (the box rule of
  `regions.region_to_box`); round 2 replays round 1 verbatim and adds a user turn with the crops as new images.
* **dino / sam / clip**: the branch's ``<|*_action_start|>``. Round 2 replays the canonical action triple and adds
  a user turn with the branch placeholder, re-encoding the original image with that branch.
* **none / conflict / unsupported:<kind>**: no route, several kinds, or a branch the model lacks: the round-1 text
  is the answer.

``protocol`` (`PROTOCOLS`) decides the edges. ``"project"`` (the default) reads region spans with
``regions.parse_regions``: an index past the grid (``<|x_8|>``) is clamped to the last cell with a warning, a span
without x or y indices is skipped, and a crop box is at least one pixel wide. ``"released"`` routes as the released
evaluation did (`route`): a span counts only when it matches the released regex (an out-of-range index makes it no
span; an x-only span counts), the box is the released formula as is, and a record whose crop cannot be built is
*dropped* (`VPTResult.dropped`; the release left it out of scoring).

A question given to `VPTPipeline.__call__` is user text: control-token strings and placeholders in it stay plain
text (`vocabulary.literal_text`). `run` takes ready user turns (a dataset's first message) whose placeholders keep
their meaning. `BaselinePipeline` runs a plain base checkpoint (Qwen2-VL, Qwen2.5-VL, Qwen3-VL:
`BASELINE_MODEL_TYPES`) in one round with the same interface, and `load_pipeline` picks the class from the
checkpoint's config. Every class of a checkpoint's base (model, VPT processor) comes from
`transformers_vpt.models.bases`, by the config's `model_type`.

Images load through `transformers_vpt.images` (viewer pixels, 8-bit RGB). Images and crops are downscaled (long
side <= ``max_image_side``, NEAREST, as the released data pipeline) before the processor. Each image is loaded and
resized once per call and reused in round 2. The vision tower still encodes the original again in round 2: the
round-2 prompt is a new prefill.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import AutoModelForImageTextToText

from .errors import VPTUserError, one_line
from .generation import seeded_sampling_kwargs
from .images import (
    IMAGE_RESOLUTION,
    SEG_IMAGE_RESOLUTION,
    ImageInput,
    cap_image,
    fit_image,
    load_image,
)
from .models.bases import VPT_BASES, VPTBase, base_of
from .models.vpt.processing_vpt import strip_literal_markers
from .regions import Box, RegionSpan, SpanCells, crop_regions, find_spans, parse_regions, region_to_box
from .vocabulary import (
    BRANCH_TOKENS,
    IMAGE_PLACEHOLDER,
    REENCODE_TRIGGER,
    REGION_TRIGGER,
    TRIGGER_MODES,
    literal_text,
)

__all__ = [
    "BASELINE_MODEL_TYPES",
    "MODES",
    "ON_ERROR",
    "PROTOCOLS",
    "VPT_MODEL_TYPES",
    "BaselinePipeline",
    "VPTPipeline",
    "VPTResult",
    "build_user_text",
    "cap_image",
    "load_pipeline",
    "model_type_of",
    "route",
]

logger = logging.getLogger(__name__)

MODES = TRIGGER_MODES
ON_ERROR = ("record", "raise")
"""What `run` does with a record whose image cannot be loaded or whose generation fails: keep going and put the
error in that record's `VPTResult.error` (``"record"``, the default), or raise at once (``"raise"``)."""
PROTOCOLS = ("project", "released")
"""How round-1 text is routed at the edges (`route`): the project's rules (the default) or the released
evaluation's, to reproduce the published table like for like."""
# Where the released data puts each trigger: after the question.
_TRIGGER_SUFFIX = {"region": " \n" + REGION_TRIGGER, "reencode": "\n" + REENCODE_TRIGGER, "free": ""}
# Long-side caps of the released preprocessing for re-encoded images; CLIP re-encodes the round-1 image itself,
# so its features equal the round-1 ones and only the conditioned projection differs.
_REENCODE_MAX_SIDE = {"dino": IMAGE_RESOLUTION, "sam": SEG_IMAGE_RESOLUTION}
_DEFAULT_GENERATION = {"do_sample": False, "max_new_tokens": 128}
_ROUND_SEED_STRIDE = 1_000_003  # round 2 of a record draws from another stream than its round 1
BASELINE_MODEL_TYPES = tuple(VPT_BASES)
"""Model types `load_pipeline` runs as the one-round baseline: the stock type of every base (``qwen2_vl``,
``qwen2_5_vl``, ``qwen3_vl``)."""
VPT_MODEL_TYPES = tuple(model_type for base in VPT_BASES.values() for model_type in base.model_types)
"""Model types `VPTPipeline` runs: every base's VPT types (``qwen2_vl_vpt``, ``vrt_qwen2_vl``, ``qwen2_5_vl_vpt``,
``qwen3_vl_vpt``)."""


@dataclass
class VPTResult:
    """The outcome of one sample.

    Attributes:
        answer: The final answer: the round-2 text, or the round-1 text when there was no round 2.
        round1_text: The decoded round-1 output, verbatim.
        action: ``"region"``, ``"dino"``, ``"sam"``, ``"clip"``, ``"none"``, ``"conflict"``,
            ``"unsupported:<kind>"``, or ``"error"`` when the record failed (see ``error``).
        boxes: Region crop boxes in pixels of the original image (``(x0, y0, x1, y1)``, exclusive ends).
        round2_prompt: The rendered round-2 prompt (placeholders not expanded), None without a round 2.
        error: Why the record could not be answered (``on_error="record"``), None when it was.
        dropped: ``protocol="released"`` only: why the released evaluation would leave this record out of scoring
            (its round-2 crop could not be built, e.g. a region span of x tokens only); ``answer`` is then empty
            and there is no round 2. None otherwise.
    """

    answer: str
    round1_text: str
    action: str
    boxes: list[Box] = field(default_factory=list)
    round2_prompt: str | None = None
    error: str | None = None
    dropped: str | None = None


@dataclass
class _Request:
    """A rendered conversation to continue, its ``<image>`` images, and extra images per branch key."""

    prompt: str
    images: list[Image.Image]
    extra: dict[str, list[Image.Image]] = field(default_factory=dict)


def build_user_text(question: str, mode: str = "region", literal: bool = True) -> str:
    """The round-1 user turn of the released data: ``"<image>\\n{question}"`` plus the trigger phrase of ``mode``.

    With ``literal`` (the default) the question is user text: control-token strings and placeholders in it are
    tokenized as plain text. ``literal=False`` keeps their meaning (a dataset's own text).
    """
    if mode not in MODES:
        raise ValueError(f"Unknown trigger mode {mode!r}; choose from {list(MODES)}")
    if not isinstance(question, str):
        raise ValueError(f"A question must be a string, got {type(question).__name__}")
    return f"{IMAGE_PLACEHOLDER}\n{literal_text(question) if literal else question}{_TRIGGER_SUFFIX[mode]}"


def check_protocol(protocol: str) -> str:
    """``protocol`` itself when it is one of `PROTOCOLS`."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {list(PROTOCOLS)}, got {protocol!r}")
    return protocol


def route(
    text: str, branches: Sequence[str], protocol: str = "project"
) -> tuple[str, list[RegionSpan] | list[SpanCells]]:
    """The action of a decoded round-1 ``text`` for a model with re-encoding ``branches``, and its regions.

    A kind fires when the text holds one of its region spans (region) or its ``<|*_action_start|>`` (a re-encoding
    branch). One kind: that action; none: ``"none"``; several: ``"conflict"`` (the round-1 text is the answer);
    a branch the model lacks: ``"unsupported:<kind>"``.

    ``protocol="project"``: the regions are `regions.parse_regions` (out-of-range indices clamped, spans without
    x or y indices skipped). ``protocol="released"``: the spans are `regions.find_spans` with
    ``out_of_range="reject"``, the released regex: a span with an index past the grid does not count, while a span
    of x (or y) tokens only does; its `SpanCells.bounds` raises when the crop is built, which drops the record.
    The released rule for ``unsupported:<kind>`` is not documented; both protocols keep the round-1 text.
    """
    if check_protocol(protocol) == "released":
        regions: list[RegionSpan] | list[SpanCells] = find_spans(text, out_of_range="reject")
    else:
        regions = parse_regions(text)
    kinds = (["region"] if regions else []) + [k for k, b in BRANCH_TOKENS.items() if b.action_start in text]
    if len(kinds) != 1:
        return ("conflict" if kinds else "none"), []
    kind = kinds[0]
    if kind != "region" and kind not in branches:
        return f"unsupported:{kind}", []
    return kind, regions


def model_type_of(path: str | os.PathLike) -> str:
    """The ``model_type`` of a local checkpoint directory; a clear error when it is not one."""
    directory = Path(path)
    if not directory.is_dir():
        raise VPTUserError(f"model directory {directory} does not exist (give a local checkpoint directory)")
    config_file = directory / "config.json"
    try:
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except FileNotFoundError:
        raise VPTUserError(f"{directory} is not a model directory: it has no config.json") from None
    except (OSError, ValueError, AttributeError) as error:
        raise VPTUserError(f"cannot read {config_file}: {one_line(error)}") from error
    return str(model_type)


def _check_int(name: str, value: Any, low: int, none_ok: bool = False) -> None:
    if value is None and none_ok:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}{' or None' if none_ok else ''}, got {value!r}")


def base_of_checkpoint(path: str | os.PathLike, model_type: str) -> VPTBase:
    """The base of a checkpoint of ``model_type``; a clear error when it is no base's (stock or VPT) type."""
    base = base_of(model_type)
    if base is None:
        raise VPTUserError(
            f"{path} holds a {model_type!r} model, which is neither a VPT model ({', '.join(VPT_MODEL_TYPES)}) nor a "
            f"plain base model ({', '.join(BASELINE_MODEL_TYPES)})"
        )
    return base


class VPTPipeline:
    """Two-round VPT inference over images and questions, batched.

    Args:
        model: A VPT model of any base (`VPT_Qwen2VLForConditionalGeneration`,
            `VPT_Qwen2_5_VLForConditionalGeneration`, `VPT_Qwen3VLForConditionalGeneration`), on any device and dtype.
        processor: The matching VPT processor (`VPT_Qwen2VLProcessor`, `VPT_Qwen2_5_VLProcessor`,
            `VPT_Qwen3VLProcessor`).
    """

    progress_name = "VPT"
    two_rounds = True
    """Whether round 1 can route to a round 2 (and so whether `run` takes ``round1_texts``)."""

    def __init__(self, model, processor):
        self.model = model.eval()
        self.processor = processor

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: Any = "auto", device: str | torch.device | None = None):
        """Load the model and processor saved in ``path`` (a released checkpoint or a ``save_pretrained`` dir)."""
        model_type = model_type_of(path)
        base = base_of_checkpoint(path, model_type)
        cls._check_model_type(path, model_type)
        try:
            model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
            # The base's VPT processor class directly: a released checkpoint's processor config may name the stock
            # processor (Qwen2VLProcessor), and a plain checkpoint's always does.
            processor = base.processor_class.from_pretrained(path)
        except Exception as error:  # truncated weights, wrong shapes, ... fail with many types (SafetensorError)
            raise VPTUserError(f"cannot load the model in {path}: {one_line(error)}") from error
        if device is not None:
            model.to(device)
        return cls(model, processor)

    @classmethod
    def _check_model_type(cls, path, model_type: str) -> None:
        if model_type in BASELINE_MODEL_TYPES:
            raise VPTUserError(
                f"{path} is a plain {model_type} checkpoint without perception tokens; run it with BaselinePipeline "
                "(one round), or load_pipeline, which picks the class"
            )

    @property
    def base(self) -> VPTBase | None:
        """The model's base (`transformers_vpt.models.bases`; None for a model of no known base)."""
        return base_of(self.model.config.model_type)

    @property
    def branches(self) -> list[str]:
        return list(self.model.config.vision_encoder_ls)

    def __call__(
        self, images: Sequence[ImageInput], questions: Sequence[str], mode: str = "region", **kwargs
    ) -> list[VPTResult]:
        """Answer ``questions`` about ``images`` (one image per question) with the trigger phrase of ``mode``.

        ``mode`` is ``"region"``, ``"reencode"`` or ``"free"`` (no trigger). Questions are user text: control-token
        strings and placeholders in them stay plain text. ``kwargs`` go to [`run`].
        """
        if isinstance(questions, str) or isinstance(images, (str, os.PathLike, Image.Image)):
            raise ValueError("Give lists: one image and one question per sample")
        return self.run([build_user_text(q, mode) for q in questions], images, **kwargs)

    def run(
        self,
        user_texts: Sequence[str],
        images: Sequence[ImageInput],
        batch_size: int = 8,
        max_image_side: int | None = IMAGE_RESOLUTION,
        generation_kwargs: dict[str, Any] | None = None,
        progress: bool | None = None,
        seeds: Sequence[int] | None = None,
        on_error: str = "record",
        protocol: str = "project",
        round1_texts: Sequence[str] | None = None,
    ) -> list[VPTResult]:
        """Run both rounds on ready round-1 user turns (each with one ``<image>``, e.g. a dataset's first message).

        Args:
            user_texts: The round-1 user turns; their placeholders and control tokens keep their meaning.
            images: One image per turn: a PIL image or a path (``"path_x0,y0,x1,y1"`` crops on load).
            batch_size: Samples per generation batch (round 2 runs on the routed samples of each batch).
            max_image_side: Long-side cap of every image and crop before the processor (the released
                ``image_resolution``); None or 0 for no cap. `images.fit_image` is the whole rule.
            generation_kwargs: `generate` kwargs over the defaults (greedy, ``max_new_tokens=128``).
            progress: Show a progress bar over batches; by default only when there are at least two.
            seeds: One seed per sample. With sampling, each sample draws from its own generator (round 1 and
                round 2), so its answer does not depend on the batch it shares; ignored for greedy decoding.
            on_error: ``"record"``: a sample whose image cannot be loaded or whose generation fails gets a result
                with ``error`` set (the others are answered; a failing batch is retried sample by sample);
                ``"raise"``: raise at once.
            protocol: ``"project"`` (the default) or ``"released"``: how round-1 text is routed at the edges
                (`route`) and what happens when a crop cannot be built: ``"project"`` widens empty crop boxes to
                one pixel, and a crop that fails is an error of the sample (``on_error``); ``"released"`` uses the
                released box formula as is (an empty box is stretched by `images.fit_image`, as the released
                preprocessing does) and a crop that fails gives a result with ``dropped`` set, no round 2.
            round1_texts: One round-1 answer per sample to use instead of generating it (e.g. a record's ground-truth
                region answer: the oracle of the region path, or a recorded run replayed); each is routed and
                answered in round 2 exactly as a generated one.
        """
        if isinstance(user_texts, str) or len(user_texts) != len(images):
            raise ValueError(f"Got {len(user_texts)} texts but {len(images)} images; give one image per text")
        _check_int("batch_size", batch_size, 1)
        _check_int("max_image_side", max_image_side, 0, none_ok=True)
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {list(ON_ERROR)}, got {on_error!r}")
        check_protocol(protocol)
        if generation_kwargs is not None and not isinstance(generation_kwargs, dict):
            raise ValueError(f"generation_kwargs must be a dict, got {type(generation_kwargs).__name__}")
        if seeds is not None:
            seeds = list(seeds)
            if len(seeds) != len(user_texts):
                raise ValueError(f"Got {len(seeds)} seeds for {len(user_texts)} samples; give one seed per sample")
            for seed in seeds:
                _check_int("every seed", seed, 0)
        if round1_texts is not None:
            if not self.two_rounds:
                raise ValueError(f"{type(self).__name__} answers in one round: round1_texts cannot be given")
            if isinstance(round1_texts, str) or len(round1_texts) != len(user_texts):
                raise ValueError("round1_texts needs one round-1 answer (a string) per sample")
            for i, text in enumerate(round1_texts):
                if not isinstance(text, str):
                    raise ValueError(f"round1_texts[{i}] must be a string, got {type(text).__name__}")
        generation_kwargs = {**_DEFAULT_GENERATION, **(generation_kwargs or {})}
        starts = range(0, len(user_texts), batch_size)
        show = len(starts) >= 2 if progress is None else progress
        results: list[VPTResult] = []
        for start in tqdm(starts, desc=self.progress_name, unit="batch", disable=not show):
            indices = list(range(start, min(start + batch_size, len(user_texts))))
            results += self._run_records(
                indices,
                [user_texts[i] for i in indices],
                [images[i] for i in indices],
                None if seeds is None else [seeds[i] for i in indices],
                max_image_side or None,
                generation_kwargs,
                on_error,
                protocol=protocol,
                round1=None if round1_texts is None else [round1_texts[i] for i in indices],
            )
        return results

    def _run_records(
        self,
        indices,
        user_texts,
        images,
        seeds,
        max_image_side,
        generation_kwargs,
        on_error,
        protocol="project",
        round1=None,
    ):
        """One batch: load its images, answer the loadable samples, and keep per-sample errors (``on_error``)."""
        results: dict[int, VPTResult] = {}
        loaded = []
        for k, (index, image) in enumerate(zip(indices, images)):
            try:
                loaded.append((k, load_image(image)))
            except (VPTUserError, OSError, ValueError, TypeError) as error:
                if on_error == "raise":
                    raise VPTUserError(f"sample {index}: {one_line(error)}") from error
                results[k] = _failed(index, error)
        if loaded:
            keys = [k for k, _ in loaded]
            answers = self._answer_or_split(
                keys,
                [user_texts[k] for k in keys],
                [image for _, image in loaded],
                None if seeds is None else [seeds[k] for k in keys],
                max_image_side,
                generation_kwargs,
                on_error,
                [indices[k] for k in keys],
                protocol=protocol,
                round1=None if round1 is None else [round1[k] for k in keys],
            )
            results.update(zip(keys, answers))
        return [results[k] for k in range(len(indices))]

    def _answer_or_split(
        self,
        keys,
        texts,
        originals,
        seeds,
        max_image_side,
        generation_kwargs,
        on_error,
        indices,
        protocol="project",
        round1=None,
    ):
        try:
            return self._answer(
                texts, originals, seeds, max_image_side, generation_kwargs, protocol=protocol, round1=round1
            )
        except Exception as error:  # one bad sample (or memory) must not cost the batch: retry the samples alone
            if on_error == "raise":
                raise
            if len(keys) == 1:
                return [_failed(indices[0], error)]
            logger.warning("A batch failed (%s); answering its samples one by one", one_line(error))
            return [
                answer
                for i in range(len(keys))
                for answer in self._answer_or_split(
                    keys[i : i + 1],
                    texts[i : i + 1],
                    originals[i : i + 1],
                    None if seeds is None else seeds[i : i + 1],
                    max_image_side,
                    generation_kwargs,
                    on_error,
                    indices[i : i + 1],
                    protocol=protocol,
                    round1=None if round1 is None else round1[i : i + 1],
                )
            ]

    def _answer(
        self, user_texts, originals, seeds, max_image_side, generation_kwargs, protocol="project", round1=None
    ) -> list[VPTResult]:
        """Both rounds for samples whose images are loaded (round 1 given as ``round1``: not generated)."""
        shown = [fit_image(image, max_image_side) for image in originals]
        first_turns = [[{"role": "user", "content": text}] for text in user_texts]
        if round1 is None:
            round1 = self._generate(
                [self._request(turn, [image]) for turn, image in zip(first_turns, shown)], generation_kwargs, seeds
            )

        results, followups = [], {}
        for i, text in enumerate(round1):
            action, regions = route(text, self.branches, protocol)
            result = VPTResult(answer=text.strip(), round1_text=text, action=action)
            if action == "region":
                if protocol == "released":
                    crops, result.dropped = _released_crops(originals[i], regions)
                    if result.dropped is not None:
                        result.answer = ""
                        results.append(result)
                        continue
                else:
                    crops = crop_regions(originals[i], regions)
                result.boxes = [box for box, _ in crops]
                followups[i] = self._region_followup(first_turns[i], text, shown[i], crops, max_image_side)
            elif action in BRANCH_TOKENS:
                followups[i] = self._reencode_followup(first_turns[i], action, originals[i], shown[i])
            if i in followups:
                result.round2_prompt = strip_literal_markers(followups[i].prompt)
            results.append(result)

        if followups:
            round2_seeds = None if seeds is None else [seeds[i] + _ROUND_SEED_STRIDE for i in followups]
            answers = self._generate(list(followups.values()), generation_kwargs, round2_seeds)
            for i, answer in zip(followups, answers):
                results[i].answer = answer.strip()
        return results

    def _request(self, messages, images, extra=None) -> _Request:
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        return _Request(prompt, images, extra or {})

    def _region_followup(self, first_turn, round1_text, shown, crops, max_image_side) -> _Request:
        """Round 2 of a region answer: round 1 verbatim, then the crops as new images."""
        if len(crops) == 1:
            crop_turn = IMAGE_PLACEHOLDER
        else:
            crop_turn = "".join(f"Region {i}: {IMAGE_PLACEHOLDER}\n" for i in range(len(crops)))
        messages = first_turn + [
            {"role": "assistant", "content": round1_text},
            {"role": "user", "content": crop_turn},
        ]
        return self._request(messages, [shown] + [fit_image(crop, max_image_side) for _, crop in crops])

    def _reencode_followup(self, first_turn, kind, original, shown) -> _Request:
        """Round 2 of a re-encoding answer: the canonical action triple, then the original for the branch."""
        tokens = BRANCH_TOKENS[kind]
        messages = first_turn + [
            {"role": "assistant", "content": tokens.action_triple},
            {"role": "user", "content": tokens.placeholder},
        ]
        reencoded = shown if kind == "clip" else fit_image(original, _REENCODE_MAX_SIDE[kind])
        return self._request(messages, [shown], {tokens.images_key: [reencoded]})

    @torch.inference_mode()
    def _generate(self, requests: list[_Request], generation_kwargs: dict[str, Any], seeds=None) -> list[str]:
        """Continue every request in one left-padded batch; the decoded new text of each."""
        extra_keys = {key for r in requests for key in r.extra}
        inputs = self.processor(
            text=[r.prompt for r in requests],
            images=[r.images for r in requests],
            **{key: [r.extra.get(key, []) for r in requests] for key in extra_keys},
            padding=True,
            padding_side="left",
            return_tensors="pt",
        ).to(self.model.device)
        if seeds is not None:
            generation_kwargs = seeded_sampling_kwargs(generation_kwargs, seeds, self.model.generation_config)
        generation_kwargs = {"pad_token_id": self.processor.tokenizer.pad_token_id, **generation_kwargs}
        output = self.model.generate(**inputs, **generation_kwargs)
        return self.processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def _released_crops(
    original: Image.Image, spans: Sequence[SpanCells]
) -> tuple[list[tuple[Box, Image.Image]], str | None]:
    """The crops of the released evaluation and None, or no crops and why the release would drop the record.

    The box is the released formula without the project's one-pixel floor (`regions.region_to_box` with
    ``nonempty=False``). A span without x or y indices fails there, as the release's ``min`` over an empty index set
    did ("errors during crop construction drop the sample from scoring"). An empty box is not an error: PIL crops it
    to an empty image, which the released preprocessing (and `images.fit_image`) stretches to 28 pixels.
    """
    crops = []
    for span in spans:
        try:
            box = region_to_box(span, original.size, nonempty=False)
            crops.append((box, original.crop(box)))
        except Exception as error:  # the release dropped the sample on any error while it built the crops
            reason = f"crop failed: {one_line(error)}"
            logger.info("Released protocol: record dropped from scoring (%s)", reason)
            return [], reason
    return crops, None


class BaselinePipeline(VPTPipeline):
    """A plain base checkpoint (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) in one round, with `VPTPipeline`'s interface, images and
    user-text rules.

    The evaluation gives it the question without the trigger phrase (the phrases ask for perception tokens a plain
    model does not have); its results carry action ``"none"``. The model is the base's stock class, the processor
    the base's VPT processor (for the user-text rule; a plain tokenizer has no VPT tokens to expand).
    """

    two_rounds = False

    @property
    def progress_name(self) -> str:
        return self.base.label if self.base is not None else "baseline"

    @classmethod
    def _check_model_type(cls, path, model_type: str) -> None:
        if model_type not in BASELINE_MODEL_TYPES:
            raise VPTUserError(
                f"{path} is a {model_type} checkpoint, not a plain {' or '.join(BASELINE_MODEL_TYPES)} one; run it "
                "with VPTPipeline, or load_pipeline, which picks the class"
            )

    @property
    def branches(self) -> list[str]:
        return []

    def __call__(self, images, questions, mode: str = "free", **kwargs) -> list[VPTResult]:
        """Answer ``questions`` about ``images``; the baseline has no trigger phrase (``mode`` must be ``"free"``)."""
        if mode != "free":
            raise ValueError(f"The one-round baseline has no perception tokens: mode must be 'free', got {mode!r}")
        return super().__call__(images, questions, mode="free", **kwargs)

    def _answer(
        self, user_texts, originals, seeds, max_image_side, generation_kwargs, protocol="project", round1=None
    ) -> list[VPTResult]:
        """One round; ``protocol`` has no effect (there is no routing)."""
        requests = [
            self._request([{"role": "user", "content": text}], [fit_image(image, max_image_side)])
            for text, image in zip(user_texts, originals)
        ]
        answers = self._generate(requests, generation_kwargs, seeds)
        return [VPTResult(answer=text.strip(), round1_text=text, action="none") for text in answers]


def load_pipeline(path: str | os.PathLike, dtype: Any = "auto", device: str | torch.device | None = None):
    """`BaselinePipeline` for a plain base checkpoint (`BASELINE_MODEL_TYPES`), else `VPTPipeline`."""
    kind = BaselinePipeline if model_type_of(path) in BASELINE_MODEL_TYPES else VPTPipeline
    return kind.from_pretrained(path, dtype=dtype, device=device)


def _failed(index: int, error: BaseException) -> VPTResult:
    message = one_line(error)
    logger.warning("Sample %d not answered: %s", index, message)
    return VPTResult(answer="", round1_text="", action="error", error=message)
