"""The VPT classes build on public transformers API: generation rules through `generate`'s `logits_processor`, typed
processor kwargs, and a benchmark that drives the model through public methods only."""

from __future__ import annotations

import ast
import typing
from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig, GenerationMixin, LogitsProcessor, LogitsProcessorList
from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLImagesKwargs
from transformers.processing_utils import ProcessingKwargs

from transformers_vpt import VPT_Qwen2VLForConditionalGeneration, VPT_Qwen2VLProcessor
from transformers_vpt.generation import (
    ForceTokenAtStepLogitsProcessor,
    VPTActionLogitsProcessor,
    VPTSuppressTokensLogitsProcessor,
)
from transformers_vpt.models.qwen2_vl_vpt.processing_qwen2_vl_vpt import VPT_Qwen2VLProcessorKwargs
from transformers_vpt.models.vpt.modeling_vpt import VPTForConditionalGenerationMixin
from transformers_vpt.models.vpt.processing_vpt import VPTProcessorKwargs
from transformers_vpt.tiny.assemble import build_tiny_vpt

torch.set_num_threads(1)

BENCH = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"
PROMPT = "<|im_start|>user\nwhat is it?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tiny():
    model, processor = build_tiny_vpt(("dino", "sam"))
    config = model.config
    with torch.no_grad():  # bias the head towards the tokens generation must never sample
        forbidden = [config.detection_image_token_id, config.seg_image_token_id, config.detection_action_id,
                     config.seg_action_id]
        model.lm_head.weight[forbidden] *= 50
    return model, processor, forbidden


def prompt_inputs(processor) -> dict:
    return dict(processor(text=[PROMPT], return_tensors="pt"))


class Recorder(LogitsProcessor):
    """A user processor: records the scores it is given and bans one token."""

    def __init__(self, banned: int):
        self.banned, self.seen = banned, []

    def __call__(self, input_ids, scores):
        self.seen.append(scores.clone())
        return scores.index_fill(-1, torch.tensor([self.banned]), -float("inf"))


# ---------------------------------------------------------------------------------------------------- generation
def test_no_private_logits_processor_override():
    assert "_get_logits_processor" not in vars(VPT_Qwen2VLForConditionalGeneration)
    assert VPT_Qwen2VLForConditionalGeneration._get_logits_processor is GenerationMixin._get_logits_processor
    assert "generate" in vars(VPTForConditionalGenerationMixin)  # the public method carries the rules
    assert VPT_Qwen2VLForConditionalGeneration.generate is VPTForConditionalGenerationMixin.generate


def test_user_processors_and_vpt_rules_both_apply(tiny):
    model, processor, forbidden = tiny
    config = model.config
    inputs = prompt_inputs(processor)
    prompt_length = inputs["input_ids"].shape[1]
    greedy = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)[0, prompt_length:]
    recorder = Recorder(banned=int(greedy[0]))
    force = ForceTokenAtStepLogitsProcessor(prompt_length, 1, config.seg_action_start_id)
    user = LogitsProcessorList([recorder, force])
    out = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False, logits_processor=user)
    new = out[0, prompt_length:].tolist()

    assert list(user) == [recorder, force]  # the caller's list is not changed
    assert new[0] != recorder.banned  # the user's processor applied
    assert new[1:3] == [config.seg_action_start_id, config.seg_action_id]  # user forcing, then VPT forcing
    assert not set(new) & (set(forbidden) - {config.seg_action_id})  # VPT suppression: no pad, no unforced action
    assert len(recorder.seen) == 6
    for scores in recorder.seen:  # suppression runs before the user's processors
        assert torch.isinf(scores[:, forbidden]).all()


def test_rules_apply_when_sampling_with_a_user_processor(tiny):
    model, processor, forbidden = tiny
    inputs = prompt_inputs(processor)
    prompt_length = inputs["input_ids"].shape[1]
    force = ForceTokenAtStepLogitsProcessor(prompt_length, 0, model.config.detection_action_start_id)
    torch.manual_seed(0)
    out = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=True, top_k=3, top_p=0.5,
                         temperature=0.7, logits_processor=[force])[0, prompt_length:].tolist()
    assert out[:2] == [model.config.detection_action_start_id, model.config.detection_action_id]
    assert not set(out[2:]) & set(forbidden)


def test_vpt_processors_surround_the_user_list(tiny):
    model, _, _ = tiny
    first, last = model.get_vpt_logits_processors()
    assert [type(p) for p in first] == [VPTSuppressTokensLogitsProcessor]
    assert [type(p) for p in last] == [VPTActionLogitsProcessor]
    assert set(first[0].tokens) == {model.config.detection_image_token_id, model.config.seg_image_token_id,
                                    model.config.detection_action_id, model.config.seg_action_id}


@pytest.mark.parametrize("how", ["generation_config", "model_default"])
def test_beam_search_runs_however_it_is_asked_for(tiny, how):
    """`num_beams` as a kwarg, in a given generation config, or as the model's default: the same beam search."""
    model, processor, _ = tiny
    inputs = prompt_inputs(processor)
    saved = model.generation_config
    expected = model.generate(**inputs, max_new_tokens=3, num_beams=2, do_sample=False)
    try:
        if how == "generation_config":
            kwargs = {"generation_config": GenerationConfig(num_beams=2, max_new_tokens=3, do_sample=False)}
        else:  # a default of the model's generation config reaches a given config that leaves it at its default
            model.generation_config = GenerationConfig(**{**saved.to_diff_dict(), "num_beams": 2, "do_sample": False})
            kwargs = {"generation_config": GenerationConfig(max_new_tokens=3)}
        assert torch.equal(model.generate(**inputs, **kwargs), expected)
    finally:
        model.generation_config = saved


# ---------------------------------------------------------------------------------------------------- processor
def test_processor_kwargs_are_typed_like_qwen2_vl():
    hints = VPT_Qwen2VLProcessorKwargs.__annotations__
    assert set(ProcessingKwargs.__annotations__) <= set(hints)
    assert hints["images_kwargs"] is Qwen2VLImagesKwargs
    assert VPT_Qwen2VLProcessorKwargs._defaults["text_kwargs"] == {"padding": False, "return_mm_token_type_ids": False}
    assert VPT_Qwen2VLProcessor.valid_processor_kwargs is VPT_Qwen2VLProcessorKwargs  # what `_merge_kwargs` uses
    (unpacked,) = typing.get_args(typing.get_type_hints(VPT_Qwen2VLProcessor.__call__)["kwargs"])
    assert unpacked is VPTProcessorKwargs  # the call is typed with the kwargs every VPT processor shares


def test_processor_merges_kwargs_with_its_own_class(tiny, monkeypatch):
    _, processor, _ = tiny
    used = []
    merge = processor._merge_kwargs
    monkeypatch.setattr(processor, "_merge_kwargs", lambda cls, **kw: used.append(cls) or merge(cls, **kw))
    processor(text=[PROMPT])
    assert used == [VPT_Qwen2VLProcessorKwargs]


def test_processor_defaults_and_overrides_apply(tiny):
    _, processor, _ = tiny
    texts = [PROMPT, "hi"]
    default = processor(text=texts)
    assert [len(ids) for ids in default["input_ids"]] != [len(default["input_ids"][0])] * 2  # no padding
    assert "mm_token_type_ids" not in default
    structured = processor(text=texts, text_kwargs={"padding": True, "padding_side": "left"})
    assert len({len(ids) for ids in structured["input_ids"]}) == 1
    assert structured["attention_mask"][1][0] == 0  # padded on the left
    flat = processor(text=texts, padding="longest", padding_side="left", return_mm_token_type_ids=True)
    assert flat["input_ids"] == structured["input_ids"]
    assert "mm_token_type_ids" in flat


def test_processor_image_kwargs_reach_the_image_processor(tiny):
    _, processor, _ = tiny
    image = torch.rand(3, 112, 112)
    text = ["<|im_start|>user\n<image>what<|im_end|>\n"]
    small = processor(images=[image], text=text, max_pixels=56 * 56, return_tensors="pt")
    large = processor(images=[image], text=text, images_kwargs={"max_pixels": 112 * 112}, return_tensors="pt")
    assert small["image_grid_thw"].prod() < large["image_grid_thw"].prod()


# ---------------------------------------------------------------------------------------------------- benchmark
COMPILE_ON_CPU = {"_compile_all_devices"}
"""The one private name the bench may touch: transformers' `generate` compiles its decode step only on CUDA unless
this `CompileConfig` field is set, and the compile section measures that very path on CPU."""


def test_bench_calls_no_private_methods_and_swaps_no_class():
    tree = ast.parse(BENCH.read_text())
    private = [
        f"line {node.lineno}: {ast.unparse(node)}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr.startswith("_")
        and not (node.attr.startswith("__") and node.attr.endswith("__"))
        and node.attr not in COMPILE_ON_CPU
    ]
    assert not private, private
    swaps = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr == "__class__"]
    assert not swaps
    subclasses = [
        node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)
        for base in node.bases if "VPT_Qwen2VL" in ast.unparse(base)
    ]
    assert not subclasses, subclasses
