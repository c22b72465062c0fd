"""Two-round inference on tiny random models: every route, its round-2 inputs, batching, loading, crop paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList

from transformers_vpt.pipeline import VPTPipeline, build_user_text, cap_image, route
from transformers_vpt.regions import box_to_region_text
from transformers_vpt.tiny.assemble import build_tiny_vpt
from transformers_vpt.tiny.tokenizer import TINY_BPE_VOCAB_SIZE
from transformers_vpt.vocabulary import BRANCH_TOKENS, IM_END, IM_START, REENCODE_TRIGGER, REGION_TRIGGER

DET, SEG, CLIP = BRANCH_TOKENS["dino"], BRANCH_TOKENS["sam"], BRANCH_TOKENS["clip"]
MAX_SIDE = 64
SYSTEM = f"{IM_START}system\nYou are a helpful assistant.{IM_END}\n"

# On a 640x480 image one cell is 80x60 pixels; boxes widen the cell bounds by one cell and clamp to the grid.
SPAN_A = box_to_region_text((2, 3, 5, 4))  # cells x 1..6, y 2..5
SPAN_B = box_to_region_text((0, 0, 0, 0))  # cells x 0..1, y 0..1
SPAN_C = box_to_region_text((6, 6, 7, 7))  # cells x 5..7, y 5..7
BOX_A, BOX_B, BOX_C = (80, 120, 560, 360), (0, 0, 160, 120), (400, 300, 640, 480)

# question -> (round-1 text, action, boxes)
CASES = {
    "Q region?": (SPAN_A, "region", [BOX_A]),
    "Q two regions?": (f"{SPAN_B} and {SPAN_C}", "region", [BOX_B, BOX_C]),
    "Q dino?": (DET.action_triple, "dino", []),
    "Q sam?": (SEG.action_triple, "sam", []),
    "Q clip?": (CLIP.action_triple, "clip", []),
    "Q plain?": ("red circle", "none", []),
    "Q malformed?": ("<|region_token_start|>left<|region_token_end|>", "none", []),
    "Q conflict?": (SPAN_A + DET.action_triple, "conflict", []),
}
SCRIPTS = {question: text for question, (text, _, _) in CASES.items()}


class Scripted(LogitsProcessor):
    """Round 1 (a single user turn) emits the script of the row's question, then EOS. Round 2 decodes greedily over
    plain-text tokens for a few steps, then EOS, so its answer depends on everything the model got in round 2."""

    def __init__(self, tokenizer, scripts: dict[str, str], answer_tokens: int = 3):
        self.tokenizer = tokenizer
        self.scripts = {q: tokenizer.encode(text) + [tokenizer.eos_token_id] for q, text in scripts.items()}
        self.answer_tokens = answer_tokens
        self.im_start = tokenizer.convert_tokens_to_ids(IM_START)
        self.header = len(tokenizer.encode(f"{IM_START}assistant\n"))

    def __call__(self, input_ids, scores):
        out = torch.full_like(scores, -float("inf"))
        for row, ids in enumerate(input_ids.tolist()):
            starts = [i for i, t in enumerate(ids) if t == self.im_start]
            generated = len(ids) - starts[-1] - self.header
            if len(starts) == 3:  # system, user, assistant
                prompt = self.tokenizer.decode(ids)
                script = next(s for q, s in self.scripts.items() if q in prompt)
                out[row, script[min(generated, len(script) - 1)]] = 0.0
            elif generated < self.answer_tokens:
                out[row, :TINY_BPE_VOCAB_SIZE] = scores[row, :TINY_BPE_VOCAB_SIZE]
            else:
                out[row, self.tokenizer.eos_token_id] = 0.0
        return out


def make_image(seed=0, size=(640, 480)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def scripted_kwargs(processor, scripts=SCRIPTS) -> dict:
    return {"logits_processor": LogitsProcessorList([Scripted(processor.tokenizer, scripts)]), "max_new_tokens": 32}


def expected_round2(question: str, round1: str, action: str, boxes, image):
    """The round-2 prompt and processor inputs of the released protocol."""
    shown = cap_image(image, MAX_SIDE)
    if action == "region":
        assistant = round1
        user = "<image>" if len(boxes) == 1 else "".join(f"Region {i}: <image>\n" for i in range(len(boxes)))
        images, extra = [shown] + [cap_image(image.crop(box), MAX_SIDE) for box in boxes], {}
    else:
        branch = BRANCH_TOKENS[action]
        assistant, user, images = branch.action_triple, branch.placeholder, [shown]
        # DINOv2 images are capped at 512, SAM at 1024 (released preprocessing); CLIP re-encodes the round-1 image.
        reencoded = {"dino": cap_image(image, 512), "sam": image, "clip": shown}[action]
        extra = {branch.images_key: [reencoded]}
    prompt = (
        f"{SYSTEM}{IM_START}user\n{build_user_text(question)}{IM_END}\n{IM_START}assistant\n{assistant}{IM_END}\n"
        f"{IM_START}user\n{user}{IM_END}\n{IM_START}assistant\n"
    )
    return prompt, dict(images=[images], **{key: [value] for key, value in extra.items()})


@pytest.mark.parametrize("question", list(CASES))
def test_every_route(pipeline, generate_calls, question):
    round1, action, boxes = CASES[question]
    image = make_image()
    (result,) = pipeline(
        [image], [question], max_image_side=MAX_SIDE, generation_kwargs=scripted_kwargs(pipeline.processor)
    )
    assert (result.round1_text, result.action, result.boxes) == (round1, action, boxes)
    processor = pipeline.processor
    if action not in ("region", *BRANCH_TOKENS):
        assert len(generate_calls) == 1
        assert result.answer == round1 and result.round2_prompt is None
        return

    assert len(generate_calls) == 2
    prompt, images = expected_round2(question, round1, action, boxes, image)
    assert result.round2_prompt == prompt
    expected = processor(text=[prompt], **images, return_tensors="pt")
    inputs, output = generate_calls[1]
    assert set(expected) <= set(inputs)
    for key, value in expected.items():
        assert torch.equal(inputs[key], value), key
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    assert len(new_tokens) == 4  # 3 free tokens and EOS
    assert result.answer == processor.decode(new_tokens, skip_special_tokens=True).strip()


def test_unsupported_branch():
    """A model without SAM whose round 1 spells out the SAM action start keeps its round-1 text."""
    model, processor = build_tiny_vpt(("dino", "clip"))
    pipeline = VPTPipeline(model, processor)
    text = SEG.action_start + " red"
    assert SEG.action_start not in processor.tokenizer.get_vocab()  # emitted as plain byte-level pieces
    (result,) = pipeline([make_image()], ["Q?"], generation_kwargs=scripted_kwargs(processor, {"Q?": text}))
    assert (result.action, result.answer, result.round1_text, result.boxes) == ("unsupported:sam", text, text, [])
    assert result.round2_prompt is None


def test_mixed_batches_equal_single_samples(pipeline):
    questions = list(CASES)
    images = [make_image(seed) for seed in range(len(questions))]
    kwargs = {"max_image_side": MAX_SIDE, "generation_kwargs": scripted_kwargs(pipeline.processor), "progress": False}
    batched = pipeline(images, questions, batch_size=5, **kwargs)
    single = [pipeline([image], [question], **kwargs)[0] for image, question in zip(images, questions)]
    assert batched == single
    assert [r.action for r in batched] == [action for _, action, _ in CASES.values()]
    assert all(r.answer for r in batched if r.round2_prompt)


def test_from_pretrained_and_crop_paths(tmp_path, pipeline):
    build_tiny_vpt(save_dir=tmp_path / "model")
    loaded = VPTPipeline.from_pretrained(tmp_path / "model", device="cpu")
    assert loaded.model.dtype == torch.float32 and loaded.branches == ["dino", "sam", "clip"]
    make_image().save(tmp_path / "image.png")
    kwargs = {"max_image_side": MAX_SIDE, "generation_kwargs": scripted_kwargs(pipeline.processor)}
    (from_path,) = loaded([f"{tmp_path / 'image.png'}_320,240,640,480"], ["Q region?"], **kwargs)
    (in_memory,) = pipeline([make_image().crop((320, 240, 640, 480))], ["Q region?"], **kwargs)
    assert from_path == in_memory
    assert from_path.boxes == [(40, 60, 280, 180)]  # the box rule on the 320x240 crop


def test_progress_bar(pipeline, capsys):
    kwargs = {"generation_kwargs": scripted_kwargs(pipeline.processor), "batch_size": 1}
    pipeline([make_image(size=(56, 56))], ["Q plain?"], **kwargs)
    assert "VPT" not in capsys.readouterr().err
    pipeline([make_image(size=(56, 56))] * 2, ["Q plain?"] * 2, **kwargs)
    assert "2/2" in capsys.readouterr().err
    pipeline([make_image(size=(56, 56))] * 2, ["Q plain?"] * 2, progress=False, **kwargs)
    assert "VPT" not in capsys.readouterr().err


def test_user_text_and_routing_rules():
    assert build_user_text("Q?") == f"<image>\nQ? \n{REGION_TRIGGER}"
    assert build_user_text("Q?", "reencode") == f"<image>\nQ?\n{REENCODE_TRIGGER}"
    assert build_user_text("Q?", "free") == "<image>\nQ?"
    with pytest.raises(ValueError, match="trigger mode"):
        build_user_text("Q?", "crop")
    assert route(DET.action_start, ["dino"]) == ("dino", [])  # the start token alone triggers, as released
    assert route(CLIP.action_start + SEG.action_start, ["sam", "clip"]) == ("conflict", [])
    assert route(SEG.action_triple, ["dino"]) == ("unsupported:sam", [])
    assert route(SPAN_A, [])[0] == "region"
    assert cap_image(make_image(size=(100, 30)), 50).size == (50, 15)
    assert cap_image(make_image(size=(100, 30)), None).size == (100, 30)


def test_mismatched_inputs(pipeline):
    with pytest.raises(ValueError, match="one image per text"):
        pipeline([make_image()], ["a?", "b?"])
