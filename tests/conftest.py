"""Shared fixtures: tiny VPT models and token sequences for every kind of sample, built in code."""

from __future__ import annotations

import pytest
import torch

from transformers_vpt import VPT_Qwen2VLForConditionalGeneration
from transformers_vpt.pipeline import VPTPipeline
from transformers_vpt.tiny.assemble import build_tiny_vpt
from transformers_vpt.tiny.model import TINY_DINO_TOKENS, TINY_SAM_TOKENS, tiny_config

torch.set_num_threads(1)

# Token ids of the hand-built sequences (the tiny vocabulary has 384 rows).
PAD, IMAGE, VIDEO, VSTART, VEND, IM_START, IM_END, NEWLINE = 299, 300, 301, 302, 303, 340, 341, 10
TOKEN_IDS = dict(
    image_token_id=IMAGE,
    video_token_id=VIDEO,
    vision_start_token_id=VSTART,
    vision_end_token_id=VEND,
    detection_image_token_id=310,
    detection_action_start_id=311,
    detection_action_id=312,
    seg_image_token_id=320,
    seg_action_start_id=321,
    seg_action_id=322,
    clip_image_token_id=330,
    clip_action_start_id=331,
    clip_action_id=332,
    para_start_id=IM_START,
    para_end_id=IM_END,
    pad_token_id=PAD,
)
PREFIX = {"dino": "detection", "sam": "seg", "clip": "clip"}
CLIP_GRID = [1, 4, 4]  # 16 patches -> 4 merged tokens
IMAGE_GRID = [1, 4, 4]
PATCH_DIM = 3 * 2 * 14 * 14
ACTION_END = {"dino": 313, "sam": 323, "clip": 333}


@pytest.fixture(scope="module")
def vpt(tmp_path_factory):
    """A saved tiny VPT model (all branches): (directory, processor)."""
    directory = tmp_path_factory.mktemp("models") / "vpt"
    _, processor = build_tiny_vpt(save_dir=directory)
    return directory, processor


@pytest.fixture(scope="module")
def pipeline():
    """A `VPTPipeline` over the tiny VPT model (all branches) and its processor."""
    return VPTPipeline(*build_tiny_vpt())


@pytest.fixture
def generate_calls(pipeline, monkeypatch):
    """Every `model.generate` call of the test: (kwargs, output)."""
    calls = []
    generate = pipeline.model.generate

    def spy(**kwargs):
        output = generate(**kwargs)
        calls.append((kwargs, output))
        return output

    monkeypatch.setattr(pipeline.model, "generate", spy)
    return calls


def make_model(vision_encoder_ls=("dino", "sam", "clip"), seed=0, **overrides):
    torch.manual_seed(seed)
    config = tiny_config(vision_encoder_ls, token_ids=TOKEN_IDS, **overrides)
    return VPT_Qwen2VLForConditionalGeneration(config).eval()


@pytest.fixture(scope="session")
def model():
    return make_model()


def turn(role_token: int, body: list[int]) -> list[int]:
    return [IM_START, role_token, *body, IM_END, NEWLINE]


def image_run(pad: int, count: int) -> list[int]:
    return [VSTART, *([pad] * count), VEND]


class Sample:
    """Token ids plus the images of one sample, in the released conversation layout."""

    def __init__(self, kind: str, question=(50, 51), answer=(60, 61), extra_images=1, system=True, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.images = [torch.randn(IMAGE_GRID[1] * IMAGE_GRID[2], PATCH_DIM, generator=g)]
        self.extra = {"dino": [], "sam": [], "clip": []}
        ids = turn(20, [30]) if system else []
        ids += turn(21, [*image_run(IMAGE, 4), *question])
        if kind in PREFIX:
            start, action = TOKEN_IDS[f"{PREFIX[kind]}_action_start_id"], TOKEN_IDS[f"{PREFIX[kind]}_action_id"]
            pad = TOKEN_IDS[f"{PREFIX[kind]}_image_token_id"]
            for _ in range(extra_images):
                ids += turn(22, [start, action, ACTION_END[kind]])
                count = {"dino": TINY_DINO_TOKENS, "sam": TINY_SAM_TOKENS, "clip": 4}[kind]
                ids += turn(21, image_run(pad, count))
                self.extra[kind].append(
                    torch.randn(3, 28, 28, generator=g) if kind == "dino"
                    else torch.randn(3, 64, 64, generator=g) if kind == "sam"
                    else torch.randn(16, PATCH_DIM, generator=g)
                )
        elif kind == "region":
            ids += turn(22, [70, 71, 72])
            ids += turn(21, image_run(IMAGE, 4))
            self.images.append(torch.randn(16, PATCH_DIM, generator=g))
        ids += [IM_START, 22, *answer, IM_END]
        self.ids = ids


def collate(samples: list[Sample], padding_side="right") -> dict:
    """Pad and stack samples into model inputs; labels cover every non-pad token."""
    length = max(len(s.ids) for s in samples)
    input_ids = torch.full((len(samples), length), PAD)
    attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample.ids)
        cols = slice(0, n) if padding_side == "right" else slice(length - n, length)
        input_ids[row, cols] = torch.tensor(sample.ids)
        attention_mask[row, cols] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    images = [img for s in samples for img in s.images]
    batch = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=labels,
        pixel_values=torch.cat(images),
        image_grid_thw=torch.tensor([IMAGE_GRID] * len(images)),
    )
    dino = [img for s in samples for img in s.extra["dino"]]
    sam = [img for s in samples for img in s.extra["sam"]]
    clip = [img for s in samples for img in s.extra["clip"]]
    if dino:
        batch["detection_images"] = torch.stack(dino)
    if sam:
        batch["seg_images"] = torch.stack(sam)
    if clip:
        batch["clip_pixel_values"] = torch.cat(clip)
        batch["clip_images_grid_thw"] = torch.tensor([CLIP_GRID] * len(clip))
    return batch
