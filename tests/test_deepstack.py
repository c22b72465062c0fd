"""Qwen3-VL's DeepStack in the VPT forward.

The rule: the original images' (and videos') DeepStack features are added after the first decoder layers at their
positions in both passes, exactly as stock Qwen3-VL adds them; DINOv2 and SAM features enter the input embeddings
only; an image re-encoded by the clip branch (Qwen3-VL's own tower) brings its DeepStack features at its pad
positions when `config.clip_deepstack` (the default), and none without it.
"""

from __future__ import annotations

import pytest
import torch
from utils import IMAGE, PAD, PATCH_DIM, TOKEN_IDS, VEND, VIDEO, VSTART, Sample, collate, make_model
from vpt_reference import reference_forward

from transformers_vpt.models.bases import VPT_BASES

torch.set_num_threads(1)

CLIP_PAD, DINO_PAD, SAM_PAD = (TOKEN_IDS[f"{kind}_image_token_id"] for kind in ("clip", "detection", "seg"))


@pytest.fixture(scope="module")
def qwen3():
    return make_model(base="qwen3_vl")


def decoder_calls(model, batch) -> list[dict]:
    """The DeepStack inputs of every decoder pass of one forward: {"columns", "positions", "layers"}."""
    calls = []

    def record(module, args, kwargs):
        mask = kwargs.get("visual_pos_masks")
        calls.append({
            "columns": kwargs["inputs_embeds"].shape[1],
            "positions": None if mask is None else mask.clone(),
            "layers": kwargs.get("deepstack_visual_embeds"),
        })

    hook = model.model.language_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        hook.remove()
    return calls


def stock_deepstack(model, pixel_values, grid_thw) -> list[torch.Tensor]:
    """The DeepStack features stock Qwen3-VL computes for these images."""
    with torch.no_grad():
        return list(model.model.get_image_features(pixel_values, grid_thw)[1])


def test_the_original_images_deepstack_enters_pass_one_as_in_stock_qwen3_vl(qwen3):
    batch = collate([Sample("dino", seed=1), Sample("plain", seed=2)])
    ids = batch["input_ids"]
    pass_one, pass_two = decoder_calls(qwen3, batch)
    end = pass_one["columns"]
    assert torch.equal(pass_one["positions"], (ids == IMAGE)[:, :end])  # the images, never the DINOv2 pads
    assert not pass_one["positions"][(ids == DINO_PAD)[:, :end]].any()
    expected = stock_deepstack(qwen3, batch["pixel_values"], batch["image_grid_thw"])
    assert len(pass_one["layers"]) == len(qwen3.config.vision_config.deepstack_visual_indexes) == 2
    for ours, theirs in zip(pass_one["layers"], expected):
        assert torch.equal(ours, theirs)
    # pass 2 recomputes only from the first changed column, after every image: their DeepStack lives in the prefix
    assert pass_two["columns"] < ids.shape[1] and pass_two["positions"] is None


def test_full_length_pass_two_adds_the_original_images_deepstack_again(qwen3):
    batch = collate([Sample("sam", seed=1), Sample("region", seed=2)])
    with torch.no_grad():
        out = qwen3(**batch, output_hidden_states=True)  # hidden states: no prefix reuse, pass 2 over every column
    calls = decoder_calls(qwen3, {**batch, "output_hidden_states": True})
    assert len(calls) == 2 and calls[1]["columns"] == batch["input_ids"].shape[1]
    assert torch.equal(calls[1]["positions"], batch["input_ids"] == IMAGE)  # not the SAM pads
    ref_logits, _ = reference_forward(qwen3, **batch)
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(out.logits[keep], ref_logits[keep], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("clip_deepstack", [True, False])
def test_clip_images_bring_their_deepstack_at_their_pads_when_configured(clip_deepstack):
    model = make_model(base="qwen3_vl", clip_deepstack=clip_deepstack)
    batch = collate([Sample("clip", seed=1, extra_images=2), Sample("dino", seed=2)])
    ids = batch["input_ids"]
    _, pass_two = decoder_calls(model, batch)
    start = ids.shape[1] - pass_two["columns"]
    clip_pads = (ids == CLIP_PAD)[:, start:]
    if clip_deepstack:
        assert torch.equal(pass_two["positions"], clip_pads)
        expected = stock_deepstack(model, batch["clip_pixel_values"], batch["clip_images_grid_thw"])
        for ours, theirs in zip(pass_two["layers"], expected):
            assert torch.equal(ours, theirs)
    else:
        assert pass_two["positions"] is None
    with torch.no_grad():
        out = model(**batch)
    ref_logits, ref_loss = reference_forward(model, **batch)
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(out.logits[keep], ref_logits[keep], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=1e-6)


def test_the_clip_rule_changes_the_answer(qwen3):
    """The DeepStack features of the tiny tower are not negligible: with and without them the logits differ."""
    without = make_model(base="qwen3_vl", clip_deepstack=False)
    batch = collate([Sample("clip", seed=3)])
    with torch.no_grad():
        on, off = qwen3(**batch).logits, without(**batch).logits
    clip_end = int((batch["input_ids"][0] == CLIP_PAD).nonzero().max())
    assert torch.equal(on[:, :clip_end - 3], off[:, :clip_end - 3])  # before the clip image, nothing differs
    assert (on[:, clip_end:] - off[:, clip_end:]).abs().max() > 1e-3


def test_a_reused_clip_image_reuses_its_deepstack(qwen3):
    """A clip image identical to a round-1 image reuses that image's features, DeepStack included."""
    samples = [Sample("clip", seed=1), Sample("dino", seed=2)]
    samples[0].extra["clip"][0] = samples[0].images[0].clone()
    batch = collate(samples)
    _, pass_two = decoder_calls(qwen3, batch)
    images = stock_deepstack(qwen3, batch["pixel_values"], batch["image_grid_thw"])
    for ours, theirs in zip(pass_two["layers"], images):
        assert torch.equal(ours, theirs[:4])  # the first image's rows, from the forward's own encoding
    with torch.no_grad():
        out = qwen3(**batch)
    ref_logits, _ = reference_forward(qwen3, **batch)
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(out.logits[keep], ref_logits[keep], rtol=1e-4, atol=1e-5)


def video_batch(with_action: bool) -> dict:
    """One sample with a 2-frame video (grid (2, 4, 4): two runs of 4 pads, each opened by <|vision_start|>), an
    image, and optionally a DINOv2 re-encoding; padded on the left by a second, shorter sample."""
    g = torch.Generator().manual_seed(5)
    frames = [VSTART, *[VIDEO] * 4, VEND] * 2
    ids = [40, *frames, 41, VSTART, *[IMAGE] * 4, VEND, 42]
    batch = {}
    if with_action:
        start, action = TOKEN_IDS["detection_action_start_id"], TOKEN_IDS["detection_action_id"]
        ids += [start, action, 43, VSTART, *[DINO_PAD] * 4, VEND, 44]
        batch["detection_images"] = torch.randn(1, 3, 28, 28, generator=g)
    other = [45, VSTART, *[IMAGE] * 4, VEND, 46]
    input_ids = torch.tensor([ids, [PAD] * (len(ids) - len(other)) + other])
    batch.update(
        input_ids=input_ids,
        attention_mask=(input_ids != PAD).long(),
        pixel_values=torch.randn(32, PATCH_DIM, generator=g),
        image_grid_thw=torch.tensor([[1, 4, 4], [1, 4, 4]]),
        pixel_values_videos=torch.randn(32, PATCH_DIM, generator=g),
        video_grid_thw=torch.tensor([[2, 4, 4]]),
    )
    return batch


def test_videos_and_images_without_vpt_tokens_give_stock_qwen3_vl_logits(qwen3):
    stock_class = VPT_BASES["qwen3_vl"].stock_model_class
    stock = stock_class(stock_class.config_class(**{
        key: value for key, value in qwen3.config.to_dict().items()
        if key not in ("model_type", "architectures", "detection_config", "seg_config")
    })).eval()
    stock.load_state_dict(qwen3.state_dict(), strict=False)
    batch = video_batch(with_action=False)
    with torch.no_grad():
        ours, theirs = qwen3(**batch).logits, stock(**batch).logits
    keep = batch["attention_mask"].bool()
    assert torch.equal(ours[keep], theirs[keep])


def test_video_deepstack_enters_both_passes(qwen3):
    """A VPT sample with a video: pass 1 adds the video's and the image's DeepStack (merged as stock does)."""
    batch = video_batch(with_action=True)
    pass_one, _ = decoder_calls(qwen3, batch)
    end = pass_one["columns"]
    ids = batch["input_ids"]
    assert torch.equal(pass_one["positions"], ((ids == IMAGE) | (ids == VIDEO))[:, :end])
    with torch.no_grad():
        videos = qwen3.model.get_video_features(batch["pixel_values_videos"], batch["video_grid_thw"])[1]
    is_video = (ids == VIDEO)[:, :end][pass_one["positions"]]
    assert int(is_video.sum()) == 8
    for ours, theirs in zip(pass_one["layers"], videos):
        assert torch.equal(ours[is_video], theirs)


def test_clip_deepstack_is_saved_and_validated(tmp_path):
    model = make_model(base="qwen3_vl", clip_deepstack=False)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    assert loaded.config.clip_deepstack is False
    with pytest.raises(ValueError, match="clip_deepstack must be true or false, got 'yes'"):
        type(model.config)(clip_deepstack="yes")
