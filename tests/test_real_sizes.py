"""The four released variants, built at real size on the meta device, have the published parameter counts; Qwen2.5-VL
3B/7B and Qwen3-VL 4B/8B with each branch have the public base sizes plus the branch (``pytest -s`` prints the
counts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from transformers_vpt import VPT_Qwen2VLConfig, VPT_Qwen2VLForConditionalGeneration
from transformers_vpt.models.bases import VPT_BASES

MODELS = Path(__file__).resolve().parents[1] / "configs" / "models"


def real_config(base: str, encoder: str) -> VPT_Qwen2VLConfig:
    fields = json.loads((MODELS / f"qwen2-vl-{base}-instruct.json").read_text())
    fields.pop("model_type"), fields.pop("architectures")
    detection = json.loads((MODELS / "dinov2-large.json").read_text())
    seg = json.loads((MODELS / "sam-vit-large-vision.json").read_text())
    detection.pop("model_type"), seg.pop("model_type")
    return VPT_Qwen2VLConfig(**fields, detection_config=detection, seg_config=seg, vision_encoder_ls=[encoder],
                             num_inner_forward_run=2)


def unused_released_layers(config: VPT_Qwen2VLConfig, encoder: str) -> int:
    """Parameters of the layers the released projectors built but never ran (counted in the published sizes)."""
    hidden = config.text_config.hidden_size
    if encoder == "clip":  # feature LayerNorm + Linear(H, H)
        return 2 * hidden + hidden * hidden + hidden
    if encoder == "sam":  # feature Linear(256, H)
        return config.seg_config.output_channels * hidden + hidden
    return 0


@pytest.mark.parametrize(
    "base, encoder, published",
    [("2b", "clip", 2.45), ("2b", "dino", 2.75), ("2b", "sam", 2.76), ("7b", "clip", 8.32)],
)
def test_parameter_counts_match_the_published_sizes(base, encoder, published):
    config = real_config(base, encoder)
    with torch.device("meta"):
        model = VPT_Qwen2VLForConditionalGeneration(config)
    # A state dict counts tied embeddings twice, as the published figures do.
    count = sum(t.numel() for t in model.state_dict().values()) + unused_released_layers(config, encoder)
    assert round(count / 1e9, 2) == published, count


# --- Qwen2.5-VL: no released VPT checkpoints; the counts are the public base sizes plus the branches ------------------

QWEN2_5_VL_BASE = {"3b": 3_754_622_976, "7b": 8_292_166_656}
"""Parameters of stock Qwen2.5-VL-3B/7B-Instruct (tied embeddings counted once): the published 3.75B and 8.29B."""
DINOV2_LARGE_PARAMETERS = 304_368_640  # DINOv2-large (ViT-L/14): the published 0.30B
SAM_VIT_L_ENCODER_PARAMETERS = 308_278_272  # SAM ViT-L image encoder with its neck: 0.31B
QWEN2_5_VL_VPT = {
    ("3b", "dino"): 4_065_293_312,
    ("3b", "sam"): 4_075_492_864,
    ("3b", "clip"): 3_758_823_424,
    ("7b", "dino"): 8_613_066_752,
    ("7b", "sam"): 8_627_984_896,
    ("7b", "clip"): 8_305_022_464,
}
"""Parameters of VPT Qwen2.5-VL-3B/7B with one branch, built here once and checked against the decomposition below."""


def qwen2_5_vl_fields(size: str) -> dict:
    fields = json.loads((MODELS / f"qwen2.5-vl-{size}-instruct.json").read_text())
    fields.pop("model_type"), fields.pop("architectures")
    return fields


def projector_parameters(config, encoder: str) -> int:
    """The branch's projector, counted from its definition (`perception.py`): the condition path LayerNorm(H) +
    Linear(H, H), plus dino's LayerNorm(D) + Linear(D, H) or sam's channel LayerNorm(C) + Conv2d(C, H, k, k)."""
    hidden = config.text_config.hidden_size
    condition = 2 * hidden + hidden * hidden + hidden
    if encoder == "dino":
        width = config.detection_config.hidden_size
        return condition + 2 * width + width * hidden + hidden
    if encoder == "sam":
        channels, kernel = config.seg_config.output_channels, config.seg_projector_stride
        return condition + 2 * channels + channels * hidden * kernel * kernel + hidden
    return condition


def unique_parameters(model) -> int:
    """Parameters counted once each (tied embeddings once), as the Qwen2.5-VL model cards report them."""
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("size", ["3b", "7b"])
def test_qwen2_5_vl_base_sizes_are_the_published_ones(size):
    base = VPT_BASES["qwen2_5_vl"]
    with torch.device("meta"):
        stock = base.stock_model_class(base.stock_model_class.config_class(**qwen2_5_vl_fields(size)))
    count = unique_parameters(stock)
    print(f"\nQwen2.5-VL-{size.upper()}-Instruct (stock): {count:,} parameters ({count / 1e9:.2f}B)")
    assert count == QWEN2_5_VL_BASE[size]
    assert round(count / 1e9, 2) == {"3b": 3.75, "7b": 8.29}[size]


@pytest.mark.parametrize("size", ["3b", "7b"])
@pytest.mark.parametrize("encoder", ["dino", "sam", "clip"])
def test_qwen2_5_vl_vpt_parameter_counts(size, encoder):
    base = VPT_BASES["qwen2_5_vl"]
    detection = json.loads((MODELS / "dinov2-large.json").read_text())
    seg = json.loads((MODELS / "sam-vit-large-vision.json").read_text())
    detection.pop("model_type"), seg.pop("model_type")
    config = base.config_class(**qwen2_5_vl_fields(size), detection_config=detection, seg_config=seg,
                               vision_encoder_ls=[encoder], num_inner_forward_run=2)
    with torch.device("meta"):
        model = base.model_class(config)
    count = unique_parameters(model)
    encoder_module = {"dino": "detection_model", "sam": "seg_model"}.get(encoder)
    encoder_count = unique_parameters(getattr(model.model, encoder_module)) if encoder_module else 0
    projector = projector_parameters(config, encoder)
    print(
        f"\nVPT Qwen2.5-VL-{size.upper()} + {encoder}: {count:,} parameters ({count / 1e9:.2f}B) = base "
        f"{QWEN2_5_VL_BASE[size]:,} + encoder {encoder_count:,} + projector {projector:,}"
    )
    assert encoder_count == {"dino": DINOV2_LARGE_PARAMETERS, "sam": SAM_VIT_L_ENCODER_PARAMETERS, "clip": 0}[encoder]
    assert count == QWEN2_5_VL_BASE[size] + encoder_count + projector == QWEN2_5_VL_VPT[size, encoder]
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == (size == "3b")  # 3B ties, 7B does not


# --- Qwen3-VL: no released VPT checkpoints; the counts are the public base sizes plus the branches --------------------

QWEN3_VL_BASE = {"4b": 4_437_815_808, "8b": 8_767_123_696}
"""Parameters of stock Qwen3-VL-4B/8B-Instruct (tied embeddings counted once): the published 4.44B and 8.77B."""
QWEN3_VL_VPT = {
    ("4b", "dino"): 4_751_371_776,
    ("4b", "sam"): 4_763_144_192,
    ("4b", "clip"): 4_444_377_088,
    ("8b", "dino"): 9_092_482_288,
    ("8b", "sam"): 9_108_973_296,
    ("8b", "clip"): 8_783_913_200,
}
"""Parameters of VPT Qwen3-VL-4B/8B with one branch, built here once and checked against the decomposition below."""


def qwen3_vl_fields(size: str) -> dict:
    fields = json.loads((MODELS / f"qwen3-vl-{size}-instruct.json").read_text())
    fields.pop("model_type"), fields.pop("architectures")
    return fields


def qwen3_vl_parameters(config) -> dict[str, int]:
    """Stock Qwen3-VL's parameters by part, counted from the config as the model is defined (no module is built).

    Text: embeddings, per layer q/k/v/o projections (no bias) with q/k RMSNorms of the head size, a SwiGLU MLP and
    two RMSNorms, the final norm, and an LM head unless it is tied. Vision: the Conv3d patch embedding (with bias),
    learned position embeddings, per block two LayerNorms, qkv and output projections and a two-layer MLP (all with
    bias), the merger (LayerNorm before the 2x2 shuffle, two Linear layers) and one DeepStack merger per
    `deepstack_visual_indexes` entry (LayerNorm after the shuffle)."""
    text, vision = config.text_config, config.vision_config
    hidden, head, vocab = text.hidden_size, text.head_dim, text.vocab_size
    attention = hidden * head * (2 * text.num_attention_heads + 2 * text.num_key_value_heads) + 2 * head
    layer = attention + 3 * hidden * text.intermediate_size + 2 * hidden
    width, merged = vision.hidden_size, vision.hidden_size * vision.spatial_merge_size**2
    patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2 * width + width
    block = 4 * width + (width * 3 * width + 3 * width) + (width * width + width) + (
        2 * width * vision.intermediate_size + vision.intermediate_size + width
    )
    merger_linears = (merged * merged + merged) + (merged * vision.out_hidden_size + vision.out_hidden_size)
    return {
        "embeddings": vocab * hidden,
        "decoder": text.num_hidden_layers * layer + hidden,
        "lm_head": 0 if text.tie_word_embeddings else vocab * hidden,
        "vision_tower": patch + vision.num_position_embeddings * width + vision.depth * block,
        "merger": 2 * width + merger_linears,
        "deepstack_mergers": len(vision.deepstack_visual_indexes) * (2 * merged + merger_linears),
    }


@pytest.mark.parametrize("size", ["4b", "8b"])
def test_qwen3_vl_base_sizes_are_the_published_ones(size):
    base = VPT_BASES["qwen3_vl"]
    config = base.stock_model_class.config_class(**qwen3_vl_fields(size))
    with torch.device("meta"):
        stock = base.stock_model_class(config)
    count = unique_parameters(stock)
    parts = qwen3_vl_parameters(config)
    vision = parts["vision_tower"] + parts["merger"] + parts["deepstack_mergers"]
    print(
        f"\nQwen3-VL-{size.upper()}-Instruct (stock): {count:,} parameters ({count / 1e9:.2f}B) = "
        + " + ".join(f"{name} {value:,}" for name, value in parts.items())
    )
    assert unique_parameters(stock.model.visual) == vision
    assert unique_parameters(stock.model.visual.deepstack_merger_list) == parts["deepstack_mergers"]
    assert unique_parameters(stock.model.language_model) == parts["embeddings"] + parts["decoder"]
    assert count == sum(parts.values()) == QWEN3_VL_BASE[size]
    assert round(count / 1e9, 2) == {"4b": 4.44, "8b": 8.77}[size]
    assert (stock.lm_head.weight is stock.get_input_embeddings().weight) == (size == "4b")  # 4B ties, 8B does not


@pytest.mark.parametrize("size", ["4b", "8b"])
@pytest.mark.parametrize("encoder", ["dino", "sam", "clip"])
def test_qwen3_vl_vpt_parameter_counts(size, encoder):
    base = VPT_BASES["qwen3_vl"]
    detection = json.loads((MODELS / "dinov2-large.json").read_text())
    seg = json.loads((MODELS / "sam-vit-large-vision.json").read_text())
    detection.pop("model_type"), seg.pop("model_type")
    config = base.config_class(**qwen3_vl_fields(size), detection_config=detection, seg_config=seg,
                               vision_encoder_ls=[encoder], num_inner_forward_run=2)
    with torch.device("meta"):
        model = base.model_class(config)
    count = unique_parameters(model)
    encoder_module = {"dino": "detection_model", "sam": "seg_model"}.get(encoder)
    encoder_count = unique_parameters(getattr(model.model, encoder_module)) if encoder_module else 0
    projector = projector_parameters(config, encoder)
    print(
        f"\nVPT Qwen3-VL-{size.upper()} + {encoder}: {count:,} parameters ({count / 1e9:.2f}B) = base "
        f"{QWEN3_VL_BASE[size]:,} + encoder {encoder_count:,} + projector {projector:,}"
    )
    assert encoder_count == {"dino": DINOV2_LARGE_PARAMETERS, "sam": SAM_VIT_L_ENCODER_PARAMETERS, "clip": 0}[encoder]
    assert count == QWEN3_VL_BASE[size] + encoder_count + projector == QWEN3_VL_VPT[size, encoder]
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == (size == "4b")  # 4B ties, 8B does not
