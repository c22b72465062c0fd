"""Two-round inference on tiny random models of every base: every route, its round-2 inputs, batching, loading,
crop paths."""

from __future__ import annotations

import pytest
import torch
from utils import (
    BASES,
    BOX_A,
    BOX_B,
    BOX_C,
    MAX_SIDE,
    SPAN_A,
    SPAN_B,
    SPAN_C,
    SYSTEM,
    expected_round2,
    make_image,
    scripted_kwargs,
)

from transformers_vpt.images import IMAGE_RESOLUTION, fit_image
from transformers_vpt.models.bases import VPT_BASES
from transformers_vpt.pipeline import BaselinePipeline, VPTPipeline, build_user_text, cap_image, load_pipeline, route
from transformers_vpt.tiny.assemble import build_tiny_base, build_tiny_vpt
from transformers_vpt.vocabulary import BRANCH_TOKENS, REENCODE_TRIGGER, REGION_TRIGGER

DET, SEG, CLIP = BRANCH_TOKENS["dino"], BRANCH_TOKENS["sam"], BRANCH_TOKENS["clip"]

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


def has_default_system(processor) -> bool:
    """Whether the processor's chat template opens a conversation without a system turn with the default one."""
    return processor.apply_chat_template([{"role": "user", "content": "Q"}]).startswith(SYSTEM)


@pytest.mark.parametrize("base", BASES, indirect=True)
@pytest.mark.parametrize("question", list(CASES))
def test_every_route(base, pipeline, generate_calls, question):
    assert type(pipeline.model) is VPT_BASES[base].model_class
    round1, action, boxes = CASES[question]
    image = make_image()
    kwargs = scripted_kwargs(pipeline.processor, SCRIPTS)
    (result,) = pipeline([image], [question], max_image_side=MAX_SIDE, generation_kwargs=kwargs)
    assert (result.round1_text, result.action, result.boxes) == (round1, action, boxes)
    processor = pipeline.processor
    if action not in ("region", *BRANCH_TOKENS):
        assert len(generate_calls) == 1
        assert result.answer == round1 and result.round2_prompt is None
        return

    assert len(generate_calls) == 2
    prompt, images = expected_round2(question, round1, action, boxes, image)
    if not has_default_system(processor):  # Qwen3-VL's chat template has no default system turn
        prompt = prompt.removeprefix(SYSTEM)
    assert result.round2_prompt == prompt
    expected = processor(text=[prompt], **images, return_tensors="pt")
    inputs, output = generate_calls[1]
    assert set(expected) <= set(inputs)
    for key, value in expected.items():
        assert torch.equal(inputs[key], value), key
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    assert len(new_tokens) == 4  # 3 free tokens and EOS
    assert result.answer == processor.decode(new_tokens, skip_special_tokens=True).strip()


@pytest.mark.parametrize("base", BASES)
def test_unsupported_branch(base):
    """A model without SAM whose round 1 spells out the SAM action start keeps its round-1 text."""
    model, processor = build_tiny_vpt(("dino", "clip"), base=base)
    pipeline = VPTPipeline(model, processor)
    text = SEG.action_start + " red"
    assert SEG.action_start not in processor.tokenizer.get_vocab()  # emitted as plain byte-level pieces
    (result,) = pipeline([make_image()], ["Q?"], generation_kwargs=scripted_kwargs(processor, {"Q?": text}))
    assert (result.action, result.answer, result.round1_text, result.boxes) == ("unsupported:sam", text, text, [])
    assert result.round2_prompt is None


@pytest.mark.parametrize("base", BASES, indirect=True)
def test_mixed_batches_equal_single_samples(pipeline):
    questions = list(CASES)
    images = [make_image(seed) for seed in range(len(questions))]
    generation_kwargs = scripted_kwargs(pipeline.processor, SCRIPTS)
    kwargs = {"max_image_side": MAX_SIDE, "generation_kwargs": generation_kwargs, "progress": False}
    batched = pipeline(images, questions, batch_size=5, **kwargs)
    single = [pipeline([image], [question], **kwargs)[0] for image, question in zip(images, questions)]
    assert batched == single
    assert [r.action for r in batched] == [action for _, action, _ in CASES.values()]
    assert all(r.answer for r in batched if r.round2_prompt)


@pytest.mark.parametrize("base", BASES, indirect=True)
def test_given_round1_texts_replace_round1(pipeline, generate_calls):
    """``round1_texts`` (the oracle of the demo, a replayed run) skip round-1 generation and route as generated
    text does: the results equal a run whose model wrote those texts."""
    questions = ["Q region?", "Q dino?", "Q plain?", "Q two regions?"]
    images = [make_image(seed) for seed in range(len(questions))]
    kwargs = {"max_image_side": MAX_SIDE, "progress": False}
    scripted = pipeline(
        images, questions, batch_size=3, generation_kwargs=scripted_kwargs(pipeline.processor, SCRIPTS), **kwargs
    )
    generate_calls.clear()
    texts = [build_user_text(q, "region") for q in questions]
    given = pipeline.run(
        texts, images, batch_size=3, round1_texts=[SCRIPTS[q] for q in questions],
        generation_kwargs=scripted_kwargs(pipeline.processor, {}), **kwargs,
    )
    assert [(r.round1_text, r.action, r.boxes, r.round2_prompt) for r in given] == [
        (r.round1_text, r.action, r.boxes, r.round2_prompt) for r in scripted
    ]
    assert len(generate_calls) == 2  # round 2 of each batch only
    assert all(inputs["input_ids"].shape[0] in (2, 1) for inputs, _ in generate_calls)
    with pytest.raises(ValueError, match="one round-1 answer"):
        pipeline.run(texts, images, round1_texts=["only one"])
    with pytest.raises(ValueError, match=r"round1_texts\[1\] must be a string"):
        pipeline.run(texts[:2], images[:2], round1_texts=["a", None])


def test_the_baseline_refuses_round1_texts(tmp_path):
    model, processor = build_tiny_base()
    baseline = BaselinePipeline(model, processor)
    with pytest.raises(ValueError, match="answers in one round"):
        baseline.run(["<image>\nQ?"], [make_image()], round1_texts=["x"])


@pytest.mark.parametrize("base", BASES, indirect=True)
def test_from_pretrained_and_crop_paths(tmp_path, base, pipeline):
    build_tiny_vpt(save_dir=tmp_path / "model", base=base)
    loaded = load_pipeline(tmp_path / "model", device="cpu")
    assert type(loaded) is VPTPipeline
    assert type(loaded.model) is VPT_BASES[base].model_class
    assert type(loaded.processor) is VPT_BASES[base].processor_class
    assert loaded.model.dtype == torch.float32 and loaded.branches == ["dino", "sam", "clip"]
    make_image().save(tmp_path / "image.png")
    kwargs = {"max_image_side": MAX_SIDE, "generation_kwargs": scripted_kwargs(pipeline.processor, SCRIPTS)}
    (from_path,) = loaded([f"{tmp_path / 'image.png'}_320,240,640,480"], ["Q region?"], **kwargs)
    (in_memory,) = pipeline([make_image().crop((320, 240, 640, 480))], ["Q region?"], **kwargs)
    assert from_path == in_memory
    assert from_path.boxes == [(40, 60, 280, 180)]  # the box rule on the 320x240 crop


@pytest.mark.parametrize("base", BASES)
def test_a_plain_base_checkpoint_is_the_one_round_baseline(base, tmp_path):
    """`load_pipeline` runs a plain checkpoint of every base with `BaselinePipeline`: its stock model class, its base's
    VPT processor, one round; the answer is the stock model's own greedy output on the stock processor's inputs."""
    entry = VPT_BASES[base]
    stock, stock_processor = build_tiny_base(base, save_dir=tmp_path / "plain")
    pipeline = load_pipeline(tmp_path / "plain")
    assert type(pipeline) is BaselinePipeline and pipeline.progress_name == entry.label
    assert type(pipeline.model) is entry.stock_model_class and type(pipeline.processor) is entry.processor_class
    image = make_image(size=(120, 90))
    (result,) = pipeline([image], ["What is it?"], generation_kwargs={"max_new_tokens": 5})
    assert (result.action, result.boxes, result.round2_prompt) == ("none", [], None)

    text = stock_processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nWhat is it?"}]}],
        add_generation_prompt=True,
    )
    inputs = stock_processor(text=[text], images=[fit_image(image, IMAGE_RESOLUTION)], return_tensors="pt")
    pad = stock_processor.tokenizer.pad_token_id
    output = stock.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=pad)
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    assert result.round1_text == stock_processor.decode(new_tokens, skip_special_tokens=True)
    with pytest.raises(ValueError, match="mode must be 'free'"):
        pipeline([image], ["What is it?"], mode="region")


def test_progress_bar(pipeline, capsys):
    kwargs = {"generation_kwargs": scripted_kwargs(pipeline.processor, SCRIPTS), "batch_size": 1}
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
