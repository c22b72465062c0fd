"""The VPT model against the plain reference: logits, loss and gradients for every branch and mixed batches."""

from __future__ import annotations

import pytest
import torch
from utils import IM_START, TOKEN_IDS, Sample, collate, image_run, make_model, turn
from vpt_reference import reference_forward

CASES = {
    "dino": ["dino"],
    "sam": ["sam"],
    "clip": ["clip"],
    "region": ["region"],
    "plain": ["plain"],
    "mixed": ["dino", "region", "sam", "plain", "clip"],
}


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_loss_match_reference(model, case, padding_side):
    samples = [Sample(kind, seed=i, question=(50 + i,) * (1 + i)) for i, kind in enumerate(CASES[case])]
    batch = collate(samples, padding_side)
    with torch.no_grad():
        out = model(**batch)
        ref_logits, ref_loss = reference_forward(model, **batch)
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(out.logits[keep], ref_logits[keep], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=1e-6)


def test_several_images_per_sample_pair_in_order(model):
    samples = [Sample("dino", extra_images=2, seed=1), Sample("clip", extra_images=3, seed=2), Sample("dino", seed=3)]
    batch = collate(samples)
    with torch.no_grad():
        out = model(**batch)
        ref_logits, ref_loss = reference_forward(model, **batch)
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(out.logits[keep], ref_logits[keep], rtol=1e-4, atol=1e-5)
    # Swapping the two images of sample 0 changes its logits: pairing is by order, not arbitrary.
    swapped = dict(batch, detection_images=batch["detection_images"][[1, 0, 2]])
    with torch.no_grad():
        other = model(**swapped)
    assert not torch.allclose(other.logits[0], out.logits[0])


def test_projector_scale_two_concatenates_control_states():
    model = make_model(("dino",), projector_scale=2)
    sample = Sample("dino", seed=4)
    # give the single image two control tokens: duplicate the action turn
    action_turn_start = sample.ids.index(311) - 2
    action_turn = sample.ids[action_turn_start : action_turn_start + 7]
    sample.ids[action_turn_start:action_turn_start] = action_turn
    batch = collate([sample])
    with torch.no_grad():
        out = model(**batch)
        ref_logits, _ = reference_forward(model, **batch)
    torch.testing.assert_close(out.logits, ref_logits, rtol=1e-4, atol=1e-5)


def test_single_pass_mode_uses_unconditioned_projection():
    model = make_model(("dino",), num_inner_forward_run=1)
    batch = collate([Sample("dino"), Sample("plain", seed=1)])
    with torch.no_grad():
        out = model(**batch)
        ref_logits, ref_loss = reference_forward(model, **batch)
    torch.testing.assert_close(out.logits, ref_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.loss, ref_loss)


def test_alignment_batch_without_text_image():
    """Alignment records have only a <detection_image>: no Qwen image at all."""
    model = make_model(("dino",), num_inner_forward_run=1)
    ids = turn(21, [*image_run(TOKEN_IDS["detection_image_token_id"], 4), 50]) + [IM_START, 22, 60, 341]
    input_ids = torch.tensor([ids])
    images = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        out = model(input_ids=input_ids, detection_images=images, labels=input_ids)
        ref_logits, ref_loss = reference_forward(model, input_ids, labels=input_ids, detection_images=images)
    torch.testing.assert_close(out.logits, ref_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.loss, ref_loss)


def decoder_lengths(model, batch):
    lengths = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True
    )
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        hook.remove()
    return lengths


def test_pass_one_stops_at_the_last_action_and_pass_two_reuses_the_prefix(model):
    batch = collate([Sample("dino", seed=1), Sample("plain", seed=2)])
    ids = batch["input_ids"]
    actions = (ids == 312).nonzero()[:, 1]
    first_change = int(actions.min())
    assert decoder_lengths(model, batch) == [int(actions.max()), ids.shape[1] - first_change]


def test_batches_without_action_tokens_run_a_single_pass(model):
    batch = collate([Sample("region", seed=1), Sample("plain", seed=2)])
    assert decoder_lengths(model, batch) == [batch["input_ids"].shape[1]]


def test_clip_reuses_the_vision_tower_features_of_an_identical_image(model):
    """A clip image equal to an image of the same forward (round 2 re-encodes the round-1 image) is not re-encoded."""
    samples = [Sample("clip", seed=1), Sample("clip", seed=2, extra_images=2), Sample("dino", seed=3)]
    samples[0].extra["clip"][0] = samples[0].images[0].clone()  # the round-1 image itself
    samples[1].extra["clip"][1] = samples[0].images[0].clone()  # another sample's image: still the same features
    batch = collate(samples)
    calls = []
    hook = model.model.visual.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["grid_thw"].shape[0]), with_kwargs=True
    )
    try:
        with torch.no_grad():
            out = model(**batch)
    finally:
        hook.remove()
    assert calls == [3, 1]  # the three original images, then only the one clip image seen nowhere else
    with torch.no_grad():
        ref_logits, ref_loss = reference_forward(model, **batch)
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(out.logits[keep], ref_logits[keep], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=1e-6)
