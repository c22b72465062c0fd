"""The released image rule and image processor in inference: token counts computed here from the rule itself."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    Qwen2VLImageProcessor,
    Qwen2VLImageProcessorFast,
    Qwen2VLVideoProcessor,
)

from transformers_vpt import VPT_Qwen2VLProcessor
from transformers_vpt.images import fit_image
from transformers_vpt.pipeline import VPTPipeline
from transformers_vpt.tiny.tokenizer import build_tiny_tokenizer
from transformers_vpt.vocabulary import IMAGE_PAD

# Qwen2-VL-2B/7B-Instruct's image processor settings.
REAL = {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 1280, "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2}


def released_tokens(width: int, height: int, resolution: int = 512) -> tuple[int, int]:
    """(image tokens, merged grid h * w) of the released pipeline, written out from the rule: long side capped at
    ``resolution`` (sides truncated), sides under 28 stretched to 28, then Qwen2-VL's smart resize."""
    if max(width, height) > resolution:
        scale = resolution / max(width, height)
        width, height = int(width * scale), int(height * scale)
    width, height = max(width, 28), max(height, 28)
    h, w = round(height / 28) * 28, round(width / 28) * 28
    if h * w > REAL["max_pixels"]:
        beta = math.sqrt(height * width / REAL["max_pixels"])
        h, w = math.floor(height / beta / 28) * 28, math.floor(width / beta / 28) * 28
    elif h * w < REAL["min_pixels"]:
        beta = math.sqrt(REAL["min_pixels"] / (height * width))
        h, w = math.ceil(height * beta / 28) * 28, math.ceil(width * beta / 28) * 28
    return (h // 28) * (w // 28), (h // 14, w // 14)


SIZES = [(1100, 700), (600, 300), (500, 400), (25, 15)]


def make_processor(image_processor, **kwargs) -> VPT_Qwen2VLProcessor:
    return VPT_Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=build_tiny_tokenizer(),
        video_processor=Qwen2VLVideoProcessor(**REAL),
        **kwargs,
    )


def test_the_rule_written_out():
    assert [released_tokens(*size)[0] for size in SIZES] == [216, 162, 252, 4]


class RecordingModel(torch.nn.Module):
    """Stands in for the model: records what `generate` gets and generates nothing."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(vision_encoder_ls=["dino", "sam", "clip"])
        self.generation_config = SimpleNamespace(do_sample=False)
        self.device = torch.device("cpu")
        self.calls = []

    def generate(self, **inputs):
        self.calls.append(inputs)
        return inputs["input_ids"]


@pytest.mark.parametrize("size", SIZES, ids=lambda size: f"{size[0]}x{size[1]}")
def test_pipeline_inputs_follow_the_released_rule(size):
    processor = make_processor(Qwen2VLImageProcessor(**REAL))
    model = RecordingModel()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    VPTPipeline(model, processor)([image], ["Q?"], mode="free")
    (inputs,) = model.calls
    tokens, grid = released_tokens(*size)
    assert inputs["input_ids"][0].tolist().count(processor.tokenizer.convert_tokens_to_ids(IMAGE_PAD)) == tokens
    assert inputs["image_grid_thw"].tolist() == [[1, *grid]]


def test_fit_image_edges():
    assert fit_image(Image.new("RGB", (1100, 700))).size == (512, 325)
    assert fit_image(Image.new("RGB", (25, 15))).size == (28, 28)
    assert fit_image(Image.new("RGB", (300, 10)), None).size == (300, 28)
    assert fit_image(Image.new("RGB", (9000, 30)), None).size == (30 * 180, 30)


def test_the_slow_image_processor_is_the_default():
    fast = Qwen2VLImageProcessorFast(**REAL)
    processor = make_processor(fast)
    assert type(processor.image_processor) is Qwen2VLImageProcessor
    assert processor.image_processor.max_pixels == REAL["max_pixels"]
    kept = make_processor(fast, fast_image_processor=True)
    assert kept.image_processor is fast
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 600, 3), dtype=np.uint8))
    slow_pixels = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    fast_pixels = fast(images=[image], return_tensors="pt")["pixel_values"]
    # what the switch is about: about one grey level on a few pixels
    assert 0 < (slow_pixels - fast_pixels).abs().max() <= 0.031
