"""save_pretrained / from_pretrained round trips and loading checkpoints in the released layout."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, AutoModelForVision2Seq
from utils import make_model

from transformers_vpt import VPT_Qwen2VLForConditionalGeneration, VRT_Qwen2VLForConditionalGeneration


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("auto_class", [AutoModelForImageTextToText, AutoModelForVision2Seq])
def test_round_trip_is_bit_exact(tmp_path, auto_class):
    model = make_model(seed=3)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded, info = auto_class.from_pretrained(tmp_path, output_loading_info=True)
    assert type(loaded) is VPT_Qwen2VLForConditionalGeneration
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    assert_same_weights(model, loaded)
    assert loaded.config.vision_encoder_ls == model.config.vision_encoder_ls


def test_saved_keys_use_the_released_layout(tmp_path):
    make_model(seed=3).save_pretrained(tmp_path)
    prefixes = {key.split(".")[0] for key in load_file(tmp_path / "model.safetensors")}
    assert prefixes == {"model", "visual", "lm_head", "detection_model", "detection_projector", "seg_model",
                        "seg_projector", "clip_projector"}
    assert any(key.startswith("model.layers.") for key in load_file(tmp_path / "model.safetensors"))


def write_released_checkpoint(model, directory, fmt):
    """A checkpoint as the released models store it: 4.45 key layout, `depth_projector`, unused projector layers,
    flat config with model_type vrt_qwen2_vl (tiny encoder configs kept so the test stays small)."""
    model.save_pretrained(directory)
    state = load_file(directory / "model.safetensors")
    (directory / "model.safetensors").unlink()
    released = {}
    for key, value in state.items():
        released[key.replace("clip_projector.", "depth_projector.", 1) if key.startswith("clip_projector.") else key] = value
    hidden, sam_channels = model.config.text_config.hidden_size, model.config.seg_config.output_channels
    released.update({
        "depth_projector.layernorm_feature.weight": torch.ones(hidden),
        "depth_projector.layernorm_feature.bias": torch.zeros(hidden),
        "depth_projector.linear_feature.weight": torch.randn(hidden, hidden),
        "depth_projector.linear_feature.bias": torch.zeros(hidden),
        "seg_projector.linear_feature.weight": torch.randn(hidden, sam_channels),
        "seg_projector.linear_feature.bias": torch.zeros(hidden),
    })
    if fmt == "safetensors":
        save_file(released, directory / "model.safetensors", metadata={"format": "pt"})
    else:
        torch.save(released, directory / "pytorch_model.bin")
    config = json.loads((directory / "config.json").read_text())
    config.update(config.pop("text_config"))  # 4.45 configs keep the text fields at the top level
    config.update(model_type="vrt_qwen2_vl", architectures=["VRT_Qwen2VLForConditionalGeneration"])
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_released_layout_loads_with_no_missing_or_unexpected_keys(tmp_path, fmt, caplog):
    model = make_model(seed=5)
    write_released_checkpoint(model, tmp_path, fmt)
    with caplog.at_level(logging.INFO, logger="transformers_vpt.models.qwen2_vl_vpt.modeling_qwen2_vl_vpt"):
        loaded, info = AutoModelForImageTextToText.from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(loaded, VRT_Qwen2VLForConditionalGeneration)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    assert_same_weights(model, loaded)  # depth_projector.* landed in clip_projector.*
    assert "Dropped 6 checkpoint tensors of unused released projector layers" in caplog.text
    direct = VPT_Qwen2VLForConditionalGeneration.from_pretrained(tmp_path)
    assert_same_weights(model, direct)


def test_unused_layers_are_not_built():
    model = make_model()
    names = set(model.state_dict())  # the branches live in `model.model`; listed here by checkpoint name
    names = {name.removeprefix("model.") for name in names if name.startswith(tuple(f"model.{p}" for p in BRANCH_PREFIXES))}
    assert not any(n.startswith(("clip_projector.layernorm_feature", "clip_projector.linear_feature",
                                 "seg_projector.linear_feature")) for n in names)
    assert {"detection_projector.layernorm_feature.weight", "detection_projector.linear_feature.weight",
            "seg_projector.conv_feature.weight", "clip_projector.linear_condition.weight"} <= names


BRANCH_PREFIXES = ("detection_model.", "detection_projector.", "seg_model.", "seg_projector.", "clip_projector.")


def test_dropping_trained_branches_needs_the_opt_in(tmp_path, caplog):
    make_model(seed=3).save_pretrained(tmp_path / "full")
    with pytest.raises(ValueError, match=r"the sam, clip branches \(seg_model, seg_projector, clip_projector: \d+ "
                                         r"tensors\).*drop_branches=True.*vpt_drop_branches: true"):
        VPT_Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "full", vision_encoder_ls=["dino"])
    with pytest.raises(ValueError, match=r"the clip branch \(clip_projector"):
        AutoModelForImageTextToText.from_pretrained(tmp_path / "full", vision_encoder_ls=["dino", "sam"])

    with caplog.at_level(logging.WARNING, logger="transformers_vpt.models.qwen2_vl_vpt.modeling_qwen2_vl_vpt"):
        model, info = AutoModelForImageTextToText.from_pretrained(
            tmp_path / "full", vision_encoder_ls=["dino"], drop_branches=True, output_loading_info=True
        )
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    assert "Dropped the sam, clip branches" in caplog.text
    model.save_pretrained(tmp_path / "dino")  # the opt-in is the only way to a checkpoint without them
    saved = {key.split(".")[0] + "." for key in load_file(tmp_path / "dino" / "model.safetensors")}
    assert saved & set(BRANCH_PREFIXES) == {"detection_model.", "detection_projector."}
    VPT_Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "dino")  # consistent now: loads without it


def test_a_config_that_leaves_out_a_branch_of_its_weights_does_not_load(tmp_path):
    make_model(seed=3).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["vision_encoder_ls"] = ["sam", "clip"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"the dino branch \(detection_model, detection_projector"):
        AutoModelForImageTextToText.from_pretrained(tmp_path)


def test_released_clip_projector_is_a_branch_but_unused_layers_are_not(tmp_path):
    write_released_checkpoint(make_model(seed=5), tmp_path, "safetensors")
    with pytest.raises(ValueError, match=r"the clip branch \(clip_projector: 4 tensors\)"):  # depth_projector.*
        AutoModelForImageTextToText.from_pretrained(tmp_path, vision_encoder_ls=["dino", "sam"])
    model, info = AutoModelForImageTextToText.from_pretrained(
        tmp_path, vision_encoder_ls=["dino", "sam"], drop_branches=True, output_loading_info=True
    )
    assert info["unexpected_keys"] == [] and not hasattr(model, "clip_projector")
