"""Gradients through both passes, gradient checkpointing, and per-sample mask modelling."""

from __future__ import annotations

import pytest
import torch
from utils import BASES, Sample, collate, make_model
from vpt_reference import reference_forward


def grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("base", BASES)
def test_gradients_match_reference_through_both_passes(base):
    model = make_model(base=base)
    batch = collate([Sample("dino", seed=1), Sample("clip", seed=2), Sample("sam", seed=3), Sample("region", seed=4)])
    ours = grads(model, model(**batch).loss)
    ref = grads(model, reference_forward(model, **batch)[1])
    assert ours.keys() == ref.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-3, atol=1e-6, msg=name)
    # The condition path is reachable only through the pass-1 control states.
    for prefix in ("detection", "seg", "clip"):
        assert ours[f"model.{prefix}_projector.linear_condition.weight"].abs().sum() > 0
    # The action-start token's embedding row gets gradient from pass 1 (control state) as well as pass 2.
    assert ours["model.language_model.embed_tokens.weight"][311].abs().sum() > 0


def test_frozen_modules_get_no_gradient_and_nothing_else_is_hardwired():
    model = make_model()
    for module in (model.model.visual, model.detection_model, model.seg_model):
        module.requires_grad_(False)
    batch = collate([Sample("dino", seed=1), Sample("sam", seed=2), Sample("clip", seed=3)])
    got = grads(model, model(**batch).loss)
    assert not any(n.startswith(("model.visual", "model.detection_model", "model.seg_model")) for n in got)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(got)  # every trainable parameter, embeddings and projectors included, gets a gradient


def test_encoders_receive_gradient_when_trainable():
    model = make_model()
    batch = collate([Sample("dino", seed=1), Sample("sam", seed=2), Sample("clip", seed=3)])
    got = grads(model, model(**batch).loss)
    names = ("model.detection_model.embeddings.patch_embeddings.projection.weight",
             "model.seg_model.patch_embed.projection.weight")
    for name in names:
        assert got[name].abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    model = make_model().train()
    batch = collate([Sample("dino", seed=1), Sample("clip", seed=2)])
    plain = grads(model, model(**batch).loss)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = grads(model, model(**batch).loss)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-7)


def mask_batch():
    # Rows with different numbers of turns: no system prompt, two re-encodings, a region row that is never masked.
    return collate([
        Sample("dino", seed=1),
        Sample("clip", seed=2, system=False),
        Sample("dino", seed=3, extra_images=2),
        Sample("region", seed=4),
    ])


@pytest.mark.parametrize("para_mask_id, paragraphs", [(1, (1,)), (2, (1, 3))])
def test_mask_modelling_blanks_the_right_paragraphs_per_row(para_mask_id, paragraphs):
    model = make_model(para_mask_id=para_mask_id, para_mask_ratio=1.0).train()
    batch = mask_batch()
    with torch.no_grad():
        out = model(**batch)
        ref_logits, _ = reference_forward(model, **batch, paragraph_mask_rows={0: paragraphs, 1: paragraphs, 2: paragraphs})
        unmasked, _ = reference_forward(model, **batch)
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(out.logits[keep], ref_logits[keep], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out.logits[0], unmasked[0])
    torch.testing.assert_close(out.logits[3], unmasked[3], rtol=1e-4, atol=1e-5)  # region row untouched
    model.eval()  # evaluation never masks
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits[keep], unmasked[keep], rtol=1e-4, atol=1e-5)


def test_mask_modelling_is_drawn_per_sample():
    model = make_model(para_mask_id=1, para_mask_ratio=0.5).train()
    batch = collate([Sample("dino", seed=1), Sample("dino", seed=2)])
    with torch.no_grad():
        masked, _ = reference_forward(model, **batch, paragraph_mask_rows={0: (1,), 1: (1,)})
        unmasked, _ = reference_forward(model, **batch)
    patterns = set()
    torch.manual_seed(0)
    for _ in range(24):
        with torch.no_grad():
            logits = model(**batch).logits
        pattern = []
        for row in range(2):
            if torch.allclose(logits[row], masked[row], atol=1e-5):
                pattern.append(True)
            else:
                torch.testing.assert_close(logits[row], unmasked[row], rtol=1e-4, atol=1e-5)
                pattern.append(False)
        patterns.add(tuple(pattern))
    assert {(True, False), (False, True)} & patterns, patterns  # rows of one batch are masked independently
    assert len(patterns) >= 3


def test_reused_clip_features_give_the_reference_gradients():
    """A clip image equal to the round-1 image reuses its features; a trainable vision tower gets both gradients."""
    model = make_model()
    sample = Sample("clip", seed=2)
    sample.extra["clip"][0] = sample.images[0].clone()
    batch = collate([sample, Sample("dino", seed=1)])
    ours = grads(model, model(**batch).loss)
    ref = grads(model, reference_forward(model, **batch)[1])
    assert ours.keys() == ref.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-3, atol=1e-6, msg=name)
