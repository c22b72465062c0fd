"""VPT_Qwen3VLProcessor: the shared VPT processor layer on Qwen3-VL's processor.

Images and every VPT kind must come out exactly as from the Qwen2-VL VPT processor (same tokenizer and image
sizes); videos exactly as stock `Qwen3VLProcessor` writes and processes them (frame timestamps, one vision run per
frame), whichever placeholder spelling; the chat template is Qwen3-VL's (no default system turn) with the VPT parts;
it saves and loads itself.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoProcessor, Qwen3VLProcessor
from utils import assert_same_outputs, tiny_image, tiny_videos, vision_run

from transformers_vpt.models.qwen3_vl_vpt.processing_qwen3_vl_vpt import (
    VPT_QWEN3_VL_CHAT_TEMPLATE,
    VPT_Qwen3VLProcessor,
    VPT_Qwen3VLProcessorKwargs,
)
from transformers_vpt.models.vpt.processing_vpt import VPT_CHAT_TEMPLATE, VPTProcessorMixin
from transformers_vpt.tiny.processor import build_tiny_processor
from transformers_vpt.tiny.tokenizer import build_tiny_tokenizer
from transformers_vpt.vocabulary import BRANCH_TOKENS, IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START, literal_text

torch.set_num_threads(1)

DET, SEG, CLIP = BRANCH_TOKENS["dino"], BRANCH_TOKENS["sam"], BRANCH_TOKENS["clip"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def processor(tokenizer) -> VPT_Qwen3VLProcessor:
    return build_tiny_processor(tokenizer, base="qwen3_vl")


@pytest.fixture(scope="module")
def stock(processor) -> Qwen3VLProcessor:
    """Stock Qwen3-VL's processor on the same tokenizer, image and video processors."""
    return Qwen3VLProcessor(
        image_processor=processor.image_processor,
        tokenizer=processor.tokenizer,
        video_processor=processor.video_processor,
    )


def test_the_class_is_the_shared_layer_on_the_base():
    assert VPT_Qwen3VLProcessor.__mro__[1:3] == (VPTProcessorMixin, Qwen3VLProcessor)
    assert VPT_Qwen3VLProcessor.valid_processor_kwargs is VPT_Qwen3VLProcessorKwargs
    own = {name for name in vars(VPT_Qwen3VLProcessor) if not name.startswith("__")}
    assert own == {"valid_processor_kwargs", "vpt_chat_template", "preprocess_videos", "expand_video"}


def _all_kinds(processor, **kwargs):
    texts = [
        f"<image>\nWhat is {literal_text('<image> <|detection_action|>')}?<detection_image><clip_image>",
        f"{vision_run(SEG.image_pad, 1)}b{vision_run(IMAGE_PAD, 1)} {DET.action_triple}",
    ]
    return processor(
        text=texts,
        images=[[tiny_image(seed=0)], [tiny_image(112, 56, seed=1)]],
        detection_images=[[tiny_image(seed=2)], []],
        seg_images=[tiny_image(seed=3)],
        clip_images=[tiny_image(56, 112, seed=4)],
        padding=True,
        return_tensors="pt",
        **kwargs,
    )


@pytest.mark.parametrize("kwargs", [{}, {"padding_side": "left", "return_mm_token_type_ids": True}])
def test_images_and_vpt_kinds_as_the_qwen2_vl_processor(processor, tokenizer, kwargs):
    qwen2_vl = build_tiny_processor(tokenizer)
    ours, theirs = _all_kinds(processor, **copy.deepcopy(kwargs)), _all_kinds(qwen2_vl, **copy.deepcopy(kwargs))
    assert_same_outputs(ours, theirs, ordered_keys=False)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},  # no metadata: every frame given, fps unknown (24, as stock Qwen3-VL)
        {"fps": 2.0},
        {"video_metadata": [
            {"fps": 3.0, "total_num_frames": 8, "frames_indices": [0, 2, 4, 6]},
            {"fps": 1.0, "total_num_frames": 2, "frames_indices": [0, 1]},
        ]},
    ],
)
@pytest.mark.parametrize("spelling", ["<video>", vision_run(VIDEO_PAD, 1), VIDEO_PAD])
def test_videos_exactly_as_stock_qwen3_vl(processor, stock, kwargs, spelling):
    videos = tiny_videos()
    ours = processor(
        text=[f"{spelling}Describe.<clip_image>", f"A {spelling} B"], videos=videos, clip_images=[tiny_image()],
        padding=True, return_tensors="pt", **copy.deepcopy(kwargs),
    )
    theirs = stock(
        text=[f"{vision_run(VIDEO_PAD, 1)}Describe.{vision_run(CLIP.image_pad, 4)}", f"A {VIDEO_PAD} B"], videos=videos,
        padding=True, return_tensors="pt", **copy.deepcopy(kwargs),
    )
    for key in ("input_ids", "attention_mask", "pixel_values_videos", "video_grid_thw"):
        assert torch.equal(ours[key], theirs[key]), key
    assert "video_metadata" not in ours  # read for the timestamps, not a model input
    text = processor.tokenizer.decode(ours["input_ids"][0])
    assert text.count(VISION_START) == 2 + 1 and text.count(" seconds>") == 2  # one run and one timestamp per frame
    if "video_metadata" in kwargs:  # frames 0 and 4 of a 3 fps video: timestamps of frame pairs (0, 2) and (4, 6)
        assert text.startswith(f"<0.3 seconds>{VISION_START}") and f"{VISION_END}<1.7 seconds>" in text


def test_video_placeholder_counts_are_checked(processor):
    with pytest.raises(ValueError, match="Sample 0 has 2 <video> placeholder"):
        processor(text=["<video><video>"], videos=tiny_videos()[:1])


def test_chat_template_is_qwen3_vl_with_the_vpt_parts(processor):
    assert processor.chat_template == VPT_QWEN3_VL_CHAT_TEMPLATE != VPT_CHAT_TEMPLATE
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}, {"type": "clip_image"}]},
        {"role": "assistant", "content": "A"},
    ]
    text = processor.apply_chat_template(conversation, add_generation_prompt=False)
    # no default system turn, unlike Qwen2-VL's template
    assert text == (
        f"<|im_start|>user\n{vision_run(IMAGE_PAD, 1)}Q{vision_run(CLIP.image_pad, 1)}<|im_end|>\n"
        "<|im_start|>assistant\nA<|im_end|>\n"
    )
    with_system = [{"role": "system", "content": "S"}, *conversation]
    assert processor.apply_chat_template(with_system).startswith("<|im_start|>system\nS<|im_end|>\n<|im_start|>user")


def test_save_and_load(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is VPT_Qwen3VLProcessor and loaded.chat_template == processor.chat_template
    assert type(loaded.video_processor) is type(processor.video_processor)
    assert_same_outputs(_all_kinds(loaded), _all_kinds(processor), ordered_keys=False)
    videos = tiny_videos()
    assert_same_outputs(
        loaded(text=["<video>", "x<video>"], videos=videos, padding=True, return_tensors="pt"),
        processor(text=["<video>", "x<video>"], videos=videos, padding=True, return_tensors="pt"),
        ordered_keys=False,
    )


def test_expand_video_leaves_the_metadata_alone(processor):
    metadata = SimpleNamespace(fps=2.0, frames_indices=[0, 1, 2])  # an odd count: the timestamps pad a copy
    text = processor.expand_video((2, 4, 4), metadata)
    assert metadata.frames_indices == [0, 1, 2] and text.count(" seconds>") == 2
