"""VPT config: fields, validation, serialisation, and the released (vrt_qwen2_vl) layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoConfig

from transformers_vpt import VPT_Qwen2VLConfig, VRT_Qwen2VLConfig
from transformers_vpt.models.qwen2_vl_vpt.configuration_qwen2_vl_vpt import DINOV2_LARGE, SAM_VIT_LARGE

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "models"


def test_defaults_and_comma_string():
    config = VPT_Qwen2VLConfig(vision_encoder_ls="dino, clip,dino", num_inner_forward_run=2)
    assert config.vision_encoder_ls == ["dino", "clip"]
    assert config.detection_config.hidden_size == 1024 and config.seg_config.output_channels == 256
    assert config.para_mask_id == 0 and config.projector_scale == 1


@pytest.mark.parametrize(
    "field, value",
    [
        ("num_inner_forward_run", 3),
        ("num_inner_forward_run", True),
        ("vision_encoder_ls", "dino,depth"),
        ("vision_encoder_ls", ["clip", 3]),
        ("para_mask_id", 3),
        ("para_mask_ratio", 1.5),
        ("para_mask_ratio", -0.1),
        ("para_mask_ratio", "0.5"),
        ("projector_scale", 0),
        ("projector_scale", 1.5),
        ("seg_projector_stride", 0),
        ("clip_action_id", -1),
        ("detection_image_token_id", "151657"),
        ("detection_config", 7),
    ],
)
def test_invalid_values_raise(field, value):
    with pytest.raises(ValueError, match=field):
        VPT_Qwen2VLConfig(**{field: value})


def test_mask_modelling_needs_paragraph_ids():
    with pytest.raises(ValueError, match="para_start_id"):
        VPT_Qwen2VLConfig(para_mask_id=1, para_mask_ratio=0.5)


def test_round_trip_keeps_encoder_sub_configs(tmp_path):
    config = VPT_Qwen2VLConfig(vision_encoder_ls=["sam"], seg_config={**SAM_VIT_LARGE, "hidden_size": 64}, clip_action_id=9)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "qwen2_vl_vpt" and saved["seg_config"]["hidden_size"] == 64
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is VPT_Qwen2VLConfig
    assert loaded.seg_config.hidden_size == 64 and loaded.clip_action_id == 9 and loaded.vision_encoder_ls == ["sam"]


def released_clip_config() -> dict:
    """config.json as the released 2B-CLIP checkpoint writes it: flat text fields, no encoder sub-configs."""
    config = json.loads((CONFIGS / "qwen2-vl-2b-instruct.json").read_text())
    config.update(
        architectures=["VRT_Qwen2VLForConditionalGeneration"], model_type="vrt_qwen2_vl",
        clip_image_token_id=151657, clip_action_start_id=151676, clip_action_id=151677,
        detection_image_token_id=None, detection_action_id=None, detection_action_start_id=None,
        seg_image_token_id=None, seg_action_id=None, seg_action_start_id=None,
        para_start_id=151644, para_end_id=151645, num_inner_forward_run=2, projector_scale=1,
        para_mask_id=1, para_mask_ratio=0.5, alignment=False, use_cache=False, transformers_version="4.45.2",
    )
    return config


def test_released_layout_loads(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(released_clip_config()))
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, VRT_Qwen2VLConfig)
    assert config.vision_encoder_ls == ["clip"]  # inferred from the token ids that are set
    assert config.text_config.hidden_size == 1536 and config.text_config.vocab_size == 151936
    assert config.clip_action_id == 151677 and config.para_end_id == 151645
    # Missing encoder configs default to the encoders the released models used.
    assert config.detection_config.to_dict() | DINOV2_LARGE == config.detection_config.to_dict()
    assert config.seg_config.to_dict() | SAM_VIT_LARGE == config.seg_config.to_dict()
    # VPT fields never leak into the text config (a legacy flat config forwards its kwargs there).
    assert not hasattr(config.text_config, "clip_action_id")
    assert VPT_Qwen2VLConfig.from_pretrained(tmp_path).vision_encoder_ls == ["clip"]


def test_model_config_files_hold_the_public_encoder_values():
    dino = json.loads((CONFIGS / "dinov2-large.json").read_text())
    sam = json.loads((CONFIGS / "sam-vit-large-vision.json").read_text())
    assert {k: dino[k] for k in DINOV2_LARGE} == DINOV2_LARGE
    assert {k: sam[k] for k in SAM_VIT_LARGE} == SAM_VIT_LARGE
