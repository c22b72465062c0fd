"""Uniform module calls (DeepSpeed ZeRO-3, FSDP): every forward calls the same modules, whatever the batch holds.

ZeRO-3 and FSDP gather a module's parameters collectively each time it runs, so ranks whose micro-batches differ
(actions or not, extra images of a kind or not) must still call the same modules in the same order. The recorded
call sequences of very different batches must therefore be equal, and the mode must change no loss and no gradient.
"""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.deepspeed import HfDeepSpeedConfig
from utils import BASES, Sample, collate, make_model, recorded_calls

BATCHES = {
    "actions and every extra-image kind": ["dino", "sam", "clip", "region"],
    "no action, no extra image": ["plain", "region"],
    "mixed": ["dino", "plain", "dino"],
}
ENCODERS = ("model.visual", "model.detection_model", "model.seg_model")
NEVER_USED = {"model.detection_model.embeddings.mask_token"}  # DINOv2's masked-image-modelling token: VPT never masks


def batch(kinds: list[str]) -> dict:
    return collate([Sample(kind, seed=i, question=(50 + i,) * (1 + i)) for i, kind in enumerate(kinds)])


def record_calls(model, inputs) -> tuple[list[str], list[str]]:
    """Names of the modules whose forward ran, and of those whose backward ran, in order, for one training step."""
    with recorded_calls(dict(model.named_modules()), backward=True) as (forward, backward):
        model.zero_grad(set_to_none=True)
        model(**inputs).loss.backward()
    return forward, backward


def loss_and_grads(model, inputs, uniform: bool):
    model.uniform_module_calls = uniform
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # mask modelling draws its coins here, the same in both modes
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("num_inner_forward_run, gradient_checkpointing", [(2, False), (2, True), (1, False)])
def test_every_batch_calls_the_same_modules_in_the_same_order(num_inner_forward_run, gradient_checkpointing, base):
    model = make_model(num_inner_forward_run=num_inner_forward_run, base=base).train()
    model.detection_model.requires_grad_(False)  # as the recipes train: frozen DINOv2 and SAM
    model.seg_model.requires_grad_(False)
    if gradient_checkpointing:  # the decoder layers then run again in backward: equally on every batch
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.uniform_module_calls = True
    calls = {name: record_calls(model, batch(kinds)) for name, kinds in BATCHES.items()}
    (forward, backward), *others = calls.values()
    for name, (other_forward, other_backward) in zip(list(calls)[1:], others):
        assert other_forward == forward, name
        assert other_backward == backward, name
    if gradient_checkpointing:
        return

    passes = num_inner_forward_run
    assert forward.count("model.visual") == 2  # the images, then the clip branch's images
    assert forward.count("model.detection_model") == forward.count("model.seg_model") == 1
    for projector in ("model.detection_projector", "model.seg_projector", "model.clip_projector"):
        assert forward.count(projector) == passes
        assert forward.count(f"{projector}.linear_condition") == 1  # conditioned pass 2, or the zero term
    assert forward.count("model.language_model") == passes
    assert forward.count("model.language_model.layers.1") == backward.count("model.language_model.layers.1") == passes

    # Without the mode the same batches call different modules: this is what ZeRO-3 cannot gather.
    model.uniform_module_calls = False
    mixed, plain = (record_calls(model, batch(BATCHES[name]))[0] for name in ("mixed", "no action, no extra image"))
    assert mixed != plain


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("case", list(BATCHES))
@pytest.mark.parametrize("num_inner_forward_run", [2, 1])
def test_uniform_mode_changes_no_loss_and_no_gradient(case, num_inner_forward_run, base):
    overrides = dict(para_mask_id=1, para_mask_ratio=0.5) if num_inner_forward_run == 2 else {}
    model = make_model(num_inner_forward_run=num_inner_forward_run, base=base, **overrides).train()
    inputs = batch(BATCHES[case])
    loss_off, grads_off = loss_and_grads(model, inputs, uniform=False)
    loss_on, grads_on = loss_and_grads(model, inputs, uniform=True)
    torch.testing.assert_close(loss_on, loss_off, rtol=0, atol=1e-6)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad} - NEVER_USED
    assert set(grads_on) == trainable  # every trainable parameter gets a gradient, on every kind of batch
    for name, grad in grads_on.items():
        expected = grads_off.get(name, torch.zeros_like(grad))  # unused without the mode: a zero gradient
        torch.testing.assert_close(grad, expected, rtol=0, atol=1e-6, msg=name)


def test_frozen_encoders_stay_without_gradient():
    model = make_model().train()
    for module in ENCODERS:
        model.get_submodule(module).requires_grad_(False)
    _, grads = loss_and_grads(model, batch(BATCHES["no action, no extra image"]), uniform=True)
    assert not any(name.startswith(ENCODERS) for name in grads)
    assert set(grads) == {name for name, p in model.named_parameters() if p.requires_grad}


def test_uniform_mode_also_runs_the_vision_tower_without_images():
    model = make_model().train()
    model.uniform_module_calls = True
    inputs = batch(BATCHES["no action, no extra image"])
    text_only = {key: inputs[key] for key in ("input_ids", "attention_mask", "labels")}
    with_images, _ = record_calls(model, inputs)
    without_images, _ = record_calls(model, text_only)
    assert without_images == with_images


def test_uniform_mode_is_automatic_under_zero3_and_fsdp(monkeypatch):
    model = make_model()
    assert not model.uses_uniform_module_calls
    zero3 = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    assert model.uses_uniform_module_calls
    model.uniform_module_calls = False  # an explicit choice wins
    assert not model.uses_uniform_module_calls
    del zero3
    model.uniform_module_calls = None
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert model.uses_uniform_module_calls


def test_generation_decode_steps_stay_on_the_fast_path():
    model = make_model()
    model.uniform_module_calls = True
    inputs = batch(["plain"])
    inputs.pop("labels")
    with recorded_calls({"detection_model": model.detection_model}) as (calls, _), torch.no_grad():
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert calls == ["detection_model"]  # the prefill only: decode steps run one decoder pass and nothing else
