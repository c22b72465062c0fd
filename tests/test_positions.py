"""One M-RoPE rule for VPT pads in training and generation: get_rope_index, where VPT pads are text positions."""

from __future__ import annotations

import torch
from utils import IMAGE, TOKEN_IDS, Sample, collate


def test_vpt_pads_take_consecutive_text_positions(model):
    batch = collate([Sample("dino", seed=1), Sample("clip", seed=2)], "left")
    positions, _ = model.model.get_rope_index(
        batch["input_ids"], image_grid_thw=batch["image_grid_thw"], attention_mask=batch["attention_mask"]
    )
    for row, pad in ((0, TOKEN_IDS["detection_image_token_id"]), (1, TOKEN_IDS["clip_image_token_id"])):
        cols = (batch["input_ids"][row] == pad).nonzero().flatten()
        pads = positions[:, row, cols]
        assert torch.equal(pads[0], pads[1]) and torch.equal(pads[1], pads[2])  # same on t, h, w: a text position
        assert torch.equal(pads[0], pads[0][0] + torch.arange(len(cols)))
        image_cols = (batch["input_ids"][row] == IMAGE).nonzero().flatten()
        assert not torch.equal(positions[1, row, image_cols], positions[2, row, image_cols])  # images stay 3-D


def test_training_collator_positions_equal_the_model_default(model):
    """LLaMA-Factory's collator passes (4, B, L) positions from get_rope_index; the model's default is the same."""
    batch = collate([Sample("dino", seed=1), Sample("sam", seed=2), Sample("region", seed=3)], "left")
    positions, _ = model.model.get_rope_index(
        batch["input_ids"], image_grid_thw=batch["image_grid_thw"], attention_mask=batch["attention_mask"]
    )
    text = batch["attention_mask"].cumsum(-1) - 1
    with torch.no_grad():
        default = model(**batch).logits
        collated = model(**batch, position_ids=torch.cat([text[None], positions])).logits
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(collated[keep], default[keep])


def test_generation_prefill_uses_the_training_positions(model):
    batch = collate([Sample("dino", seed=1), Sample("plain", seed=2)], "left")
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    prepared = model.prepare_inputs_for_generation(
        **inputs, cache_position=torch.arange(batch["input_ids"].shape[1]), use_cache=True
    )
    positions, _ = model.model.get_rope_index(
        batch["input_ids"], image_grid_thw=batch["image_grid_thw"], attention_mask=batch["attention_mask"]
    )
    if prepared["position_ids"] is None:  # Qwen3-VL leaves them to the forward, which computes them on a prefill
        prefill = model.model.get_position_ids(batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"])
    else:
        prefill = prepared["position_ids"][1:]
    assert torch.equal(prefill, positions)
