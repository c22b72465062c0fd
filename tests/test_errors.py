"""Bad inputs raise ValueError naming the sample, never an assert or a silent wrong pairing."""

from __future__ import annotations

import pytest
import torch
from utils import TOKEN_IDS, Sample, collate, make_model


def test_fewer_control_tokens_than_images(model):
    sample = Sample("dino", extra_images=2, seed=1)
    action = TOKEN_IDS["detection_action_id"]
    sample.ids[sample.ids.index(action)] = 55  # first action token becomes text
    batch = collate([Sample("plain"), sample])
    with pytest.raises(ValueError, match=r"Sample 1 has 1 <\|detection_action\|> tokens for 2 detection_images"):
        model(**batch)


def test_pad_count_does_not_match_features(model):
    sample = Sample("sam", seed=1)
    pad = TOKEN_IDS["seg_image_token_id"]
    sample.ids.remove(pad)  # 15 pads for a 16-token image
    batch = collate([Sample("plain"), Sample("dino"), sample])
    with pytest.raises(ValueError, match=r"Sample 2 has 15 <\|seg_image_pad\|> tokens .* give 16 features"):
        model(**batch)


def test_more_images_than_pads(model):
    batch = collate([Sample("dino")])
    batch["detection_images"] = batch["detection_images"].repeat(2, 1, 1, 1)
    with pytest.raises(ValueError, match="1 of the detection_images have no"):
        model(**batch)


def test_pads_without_images(model):
    batch = collate([Sample("plain"), Sample("clip")])
    del batch["clip_pixel_values"], batch["clip_images_grid_thw"]
    with pytest.raises(ValueError, match=r"Sample 1 has 4 <\|clip_image_pad\|> tokens but no clip_images"):
        model(**batch)


def test_action_token_of_a_branch_that_is_not_built():
    model = make_model(("clip",))
    batch = collate([Sample("clip"), Sample("sam")])
    del batch["seg_images"]
    with pytest.raises(ValueError, match=r"Sample 1 has 16 <\|seg_image_pad\|> tokens but the 'sam' branch is not built"):
        model(**batch)


def test_images_for_a_branch_that_is_not_built():
    model = make_model(("dino",))
    batch = collate([Sample("dino")])
    batch["seg_images"] = torch.zeros(1, 3, 64, 64)
    with pytest.raises(ValueError, match="seg_images were given but the 'sam' branch is not built"):
        model(**batch)


def test_extra_images_without_any_control_token(model):
    sample = Sample("dino", seed=1)
    sample.ids[sample.ids.index(TOKEN_IDS["detection_action_id"])] = 55
    with pytest.raises(ValueError, match="Sample 0 has detection_images but no action token"):
        model(**collate([sample]))


def test_clip_pixels_without_grid(model):
    batch = collate([Sample("clip")])
    del batch["clip_images_grid_thw"]
    with pytest.raises(ValueError, match="clip_images_grid_thw"):
        model(**batch)


def test_action_token_first_in_a_decode_step_needs_the_previous_state(model):
    ids = torch.tensor([[TOKEN_IDS["detection_action_id"], 50]])
    with pytest.raises(ValueError, match="Sample 0 starts with an action token"):
        model(input_ids=ids)
