"""The four released variants, built at real size on the meta device, have the published parameter counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from transformers_vpt import VPT_Qwen2VLConfig, VPT_Qwen2VLForConditionalGeneration

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
