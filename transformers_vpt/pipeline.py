"""Two-round VPT inference, as the released evaluation runs it (round 1 -> route -> round 2).

Round 1 answers the user turn freely. Its decoded text (special tokens stripped; region and action tokens survive)
picks the route:

* **region**: one or more region spans. Each span becomes a crop of the full-resolution original (the box rule of
  `regions.region_to_box`); round 2 replays round 1 verbatim and adds a user turn with the crops as new images.
* **dino / sam / clip**: the branch's ``<|*_action_start|>``. Round 2 replays the canonical action triple and adds
  a user turn with the branch placeholder, re-encoding the original image with that branch.
* **none / conflict / unsupported:<kind>**: no route, several kinds, or a branch the model lacks: the round-1 text
  is the answer.

Images and crops are downscaled (long side <= ``max_image_side``, NEAREST, as the released data pipeline) before
the processor. Each image is loaded and resized once per call and reused in round 2. The vision tower still encodes
the original again in round 2: the round-2 prompt is a new prefill.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import AutoModelForImageTextToText

from .models.qwen2_vl_vpt.processing_qwen2_vl_vpt import VPT_Qwen2VLProcessor
from .regions import Box, RegionSpan, crop_regions, open_image, parse_regions
from .vocabulary import BRANCH_TOKENS, IMAGE_PLACEHOLDER, REENCODE_TRIGGER, REGION_TRIGGER

__all__ = ["MODES", "VPTPipeline", "VPTResult", "build_user_text", "cap_image", "route"]

MODES = ("region", "reencode", "free")
# Where the released data puts each trigger: after the question.
_TRIGGER_SUFFIX = {"region": " \n" + REGION_TRIGGER, "reencode": "\n" + REENCODE_TRIGGER, "free": ""}
# Long-side caps of the released preprocessing for re-encoded images; CLIP re-encodes the round-1 image itself,
# so its features equal the round-1 ones and only the conditioned projection differs.
_REENCODE_MAX_SIDE = {"dino": 512, "sam": 1024}
_DEFAULT_GENERATION = {"do_sample": False, "max_new_tokens": 128}

ImageInput = Image.Image | str | os.PathLike


@dataclass
class VPTResult:
    """The outcome of one sample.

    Attributes:
        answer: The final answer: the round-2 text, or the round-1 text when there was no round 2.
        round1_text: The decoded round-1 output, verbatim.
        action: ``"region"``, ``"dino"``, ``"sam"``, ``"clip"``, ``"none"``, ``"conflict"`` or
            ``"unsupported:<kind>"``.
        boxes: Region crop boxes in pixels of the original image (``(x0, y0, x1, y1)``, exclusive ends).
        round2_prompt: The rendered round-2 prompt (placeholders not expanded), None without a round 2.
    """

    answer: str
    round1_text: str
    action: str
    boxes: list[Box] = field(default_factory=list)
    round2_prompt: str | None = None


@dataclass
class _Request:
    """A rendered conversation to continue, its ``<image>`` images, and extra images per branch key."""

    prompt: str
    images: list[Image.Image]
    extra: dict[str, list[Image.Image]] = field(default_factory=dict)


def build_user_text(question: str, mode: str = "region") -> str:
    """The round-1 user turn of the released data: ``"<image>\\n{question}"`` plus the trigger phrase of ``mode``."""
    if mode not in MODES:
        raise ValueError(f"Unknown trigger mode {mode!r}; choose from {list(MODES)}")
    return f"{IMAGE_PLACEHOLDER}\n{question}{_TRIGGER_SUFFIX[mode]}"


def route(text: str, branches: Sequence[str]) -> tuple[str, list[RegionSpan]]:
    """The action of a decoded round-1 ``text`` for a model with re-encoding ``branches``, and its regions."""
    regions = parse_regions(text)
    kinds = (["region"] if regions else []) + [k for k, b in BRANCH_TOKENS.items() if b.action_start in text]
    if len(kinds) != 1:
        return ("conflict" if kinds else "none"), []
    kind = kinds[0]
    if kind != "region" and kind not in branches:
        return f"unsupported:{kind}", []
    return kind, regions


def cap_image(image: Image.Image, max_side: int | None) -> Image.Image:
    """``image`` downscaled (NEAREST) so that its long side is at most ``max_side``; None means no cap."""
    width, height = image.size
    if max_side is None or max(width, height) <= max_side:
        return image
    scale = max_side / max(width, height)
    return image.resize((max(1, int(width * scale)), max(1, int(height * scale))), Image.NEAREST)


def _load(image: ImageInput) -> Image.Image:
    return image.convert("RGB") if isinstance(image, Image.Image) else open_image(os.fspath(image))


class VPTPipeline:
    """Two-round VPT inference over images and questions, batched.

    Args:
        model: A `VPT_Qwen2VLForConditionalGeneration` (any device and dtype).
        processor: The matching `VPT_Qwen2VLProcessor`.
    """

    def __init__(self, model, processor):
        self.model = model.eval()
        self.processor = processor

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: Any = "auto", device: str | torch.device | None = None):
        """Load the model and processor saved in ``path`` (a released checkpoint or a ``save_pretrained`` dir)."""
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
        if device is not None:
            model.to(device)
        # The VPT processor class directly: a released checkpoint's processor config may name plain Qwen2VLProcessor.
        return cls(model, VPT_Qwen2VLProcessor.from_pretrained(path))

    @property
    def branches(self) -> list[str]:
        return list(self.model.config.vision_encoder_ls)

    def __call__(
        self, images: Sequence[ImageInput], questions: Sequence[str], mode: str = "region", **kwargs
    ) -> list[VPTResult]:
        """Answer ``questions`` about ``images`` (one image per question) with the trigger phrase of ``mode``.

        ``mode`` is ``"region"``, ``"reencode"`` or ``"free"`` (no trigger). ``kwargs`` go to [`run`].
        """
        return self.run([build_user_text(q, mode) for q in questions], images, **kwargs)

    def run(
        self,
        user_texts: Sequence[str],
        images: Sequence[ImageInput],
        batch_size: int = 8,
        max_image_side: int | None = 512,
        generation_kwargs: dict[str, Any] | None = None,
        progress: bool | None = None,
    ) -> list[VPTResult]:
        """Run both rounds on ready round-1 user turns (each with one ``<image>``, e.g. a dataset's first message).

        Args:
            user_texts: The round-1 user turns.
            images: One image per turn: a PIL image or a path (``"path_x0,y0,x1,y1"`` crops on load).
            batch_size: Samples per generation batch (round 2 runs on the routed samples of each batch).
            max_image_side: Long-side cap of every image and crop before the processor; None for no cap.
            generation_kwargs: `generate` kwargs over the defaults (greedy, ``max_new_tokens=128``).
            progress: Show a progress bar over batches; by default only when there are at least two.
        """
        if len(user_texts) != len(images):
            raise ValueError(f"Got {len(user_texts)} texts but {len(images)} images; give one image per text")
        generation_kwargs = {**_DEFAULT_GENERATION, **(generation_kwargs or {})}
        starts = range(0, len(user_texts), batch_size)
        show = len(starts) >= 2 if progress is None else progress
        results = []
        for start in tqdm(starts, desc="VPT", unit="batch", disable=not show):
            batch = slice(start, start + batch_size)
            results += self._run_batch(user_texts[batch], images[batch], max_image_side, generation_kwargs)
        return results

    def _run_batch(self, user_texts, images, max_image_side, generation_kwargs) -> list[VPTResult]:
        originals = [_load(image) for image in images]
        shown = [cap_image(image, max_image_side) for image in originals]
        first_turns = [[{"role": "user", "content": text}] for text in user_texts]
        round1 = self._generate(
            [self._request(turn, [image]) for turn, image in zip(first_turns, shown)], generation_kwargs
        )

        results, followups = [], {}
        for i, text in enumerate(round1):
            action, regions = route(text, self.branches)
            result = VPTResult(answer=text.strip(), round1_text=text, action=action)
            if action == "region":
                crops = crop_regions(originals[i], regions)
                result.boxes = [box for box, _ in crops]
                followups[i] = self._region_followup(first_turns[i], text, shown[i], crops, max_image_side)
            elif action in BRANCH_TOKENS:
                followups[i] = self._reencode_followup(first_turns[i], action, originals[i], shown[i])
            if i in followups:
                result.round2_prompt = followups[i].prompt
            results.append(result)

        if followups:
            answers = self._generate(list(followups.values()), generation_kwargs)
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
        return self._request(messages, [shown] + [cap_image(crop, max_image_side) for _, crop in crops])

    def _reencode_followup(self, first_turn, kind, original, shown) -> _Request:
        """Round 2 of a re-encoding answer: the canonical action triple, then the original for the branch."""
        tokens = BRANCH_TOKENS[kind]
        messages = first_turn + [
            {"role": "assistant", "content": tokens.action_triple},
            {"role": "user", "content": tokens.placeholder},
        ]
        reencoded = shown if kind == "clip" else cap_image(original, _REENCODE_MAX_SIDE[kind])
        return self._request(messages, [shown], {tokens.images_key: [reencoded]})

    @torch.inference_mode()
    def _generate(self, requests: list[_Request], generation_kwargs: dict[str, Any]) -> list[str]:
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
        generation_kwargs = {"pad_token_id": self.processor.tokenizer.pad_token_id, **generation_kwargs}
        output = self.model.generate(**inputs, **generation_kwargs)
        return self.processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
