"""Plain Qwen2-VL as the baseline: a single round of ``generate``, with the same images and scoring as VPT.

The evaluation gives it the question without the trigger phrase (``datasets.prompt_for_mode(question, "free")``):
the phrases ask for perception tokens that a plain Qwen2-VL does not have. Its results carry action ``"none"``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor

from transformers_vpt.pipeline import ImageInput, VPTResult, cap_image
from transformers_vpt.regions import open_image
from transformers_vpt.vocabulary import IMAGE_PAD, IMAGE_PLACEHOLDER, VISION_END, VISION_START

_IMAGE_TOKENS = VISION_START + IMAGE_PAD + VISION_END


class BaselinePipeline:
    """Single-round inference of a `Qwen2VLForConditionalGeneration`, with `VPTPipeline.run`'s interface."""

    def __init__(self, model, processor):
        self.model = model.eval()
        self.processor = processor

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: Any = "auto", device: str | torch.device | None = None):
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
        if device is not None:
            model.to(device)
        return cls(model, AutoProcessor.from_pretrained(path))

    def run(
        self,
        user_texts: Sequence[str],
        images: Sequence[ImageInput],
        batch_size: int = 8,
        max_image_side: int | None = 512,
        generation_kwargs: dict[str, Any] | None = None,
        progress: bool | None = None,
    ) -> list[VPTResult]:
        """Answer user turns holding one ``<image>`` each; ``generation_kwargs`` go to `generate`."""
        if len(user_texts) != len(images):
            raise ValueError(f"Got {len(user_texts)} texts but {len(images)} images; give one image per text")
        starts = range(0, len(user_texts), batch_size)
        show = len(starts) >= 2 if progress is None else progress
        answers = []
        for start in tqdm(starts, desc="Qwen2-VL", unit="batch", disable=not show):
            batch = slice(start, start + batch_size)
            answers += self._generate(user_texts[batch], images[batch], max_image_side, generation_kwargs or {})
        return [VPTResult(answer=text.strip(), round1_text=text, action="none") for text in answers]

    @torch.inference_mode()
    def _generate(self, user_texts, images, max_image_side, generation_kwargs) -> list[str]:
        prompts = [
            self.processor.apply_chat_template(
                [{"role": "user", "content": text.replace(IMAGE_PLACEHOLDER, _IMAGE_TOKENS)}],
                add_generation_prompt=True,
            )
            for text in user_texts
        ]
        pixels = [
            cap_image(
                image.convert("RGB") if isinstance(image, Image.Image) else open_image(os.fspath(image)), max_image_side
            )
            for image in images
        ]
        inputs = self.processor(text=prompts, images=pixels, padding=True, padding_side="left", return_tensors="pt").to(
            self.model.device
        )
        generation_kwargs = {"pad_token_id": self.processor.tokenizer.pad_token_id, **generation_kwargs}
        output = self.model.generate(**inputs, **generation_kwargs)
        return self.processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
