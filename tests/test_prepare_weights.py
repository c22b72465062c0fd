"""transformers_vpt.weights and scripts/prepare_weights.py on tiny local Qwen2-VL, DINOv2 and SAM models
(safetensors and .bin)."""

import pytest
import torch
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    Dinov2Model,
    Qwen2VLForConditionalGeneration,
    SamModel,
)

from scripts import prepare_weights as prepare_cli
from transformers_vpt import VPT_Qwen2VLForConditionalGeneration, VPT_Qwen2VLProcessor
from transformers_vpt.tiny.sources import build_sources
from transformers_vpt.vocabulary import BRANCH_TOKENS, REGION_TOKENS, token_id
from transformers_vpt.weights import prepare_weights


@pytest.fixture(scope="module", params=[True, False], ids=["safetensors", "bin"])
def sources(request, tmp_path_factory):
    dirs = build_sources(tmp_path_factory.mktemp("sources"), safe_serialization=request.param)
    weights = "model.safetensors" if request.param else "pytorch_model.bin"
    assert all((directory / weights).is_file() for directory in dirs.values())
    return dirs


def assert_same(actual: dict, expected: dict, prefix: str = "") -> None:
    for key, value in expected.items():
        assert torch.equal(actual[prefix + key], value), prefix + key


def test_all_branches(sources, tmp_path):
    prepare_cli.main([
        "--qwen2-vl", str(sources["qwen2_vl"]), "--dino", str(sources["dino"]), "--sam", str(sources["sam"]),
        "--vision-encoder-ls", "dino,sam,clip", "--seg-projector-stride", "1", "--output-dir", str(tmp_path),
    ])
    model = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert type(model) is VPT_Qwen2VLForConditionalGeneration
    assert model.config.model_type == "qwen2_vl_vpt" and model.config.vision_encoder_ls == ["dino", "sam", "clip"]
    state = model.state_dict()

    qwen = Qwen2VLForConditionalGeneration.from_pretrained(sources["qwen2_vl"]).state_dict()
    embedding_keys = {"model.language_model.embed_tokens.weight", "lm_head.weight"}
    assert_same(state, {key: value for key, value in qwen.items() if key not in embedding_keys})
    assert_same(state, Dinov2Model.from_pretrained(sources["dino"]).state_dict(), "model.detection_model.")
    assert_same(state, SamModel.from_pretrained(sources["sam"]).vision_encoder.state_dict(), "model.seg_model.")
    assert model.config.detection_config.hidden_size == 32 and model.config.seg_config.output_channels == 16

    tokenizer = AutoProcessor.from_pretrained(tmp_path).tokenizer
    old_size = len(AutoTokenizer.from_pretrained(sources["qwen2_vl"]))
    for branch in BRANCH_TOKENS.values():
        for token in (branch.image_pad, branch.action_start, branch.action):
            assert token_id(tokenizer, token) is not None
        assert getattr(model.config, branch.action_id_field) == token_id(tokenizer, branch.action)
    assert all(token_id(tokenizer, token) is not None for token in REGION_TOKENS)
    for key in embedding_keys:  # old rows kept, new rows set to the mean of the old ones
        assert torch.equal(state[key][:old_size], qwen[key][:old_size])
        expected = qwen[key][:old_size].mean(0).expand(len(tokenizer) - old_size, -1)
        torch.testing.assert_close(state[key][old_size : len(tokenizer)], expected)


def test_processor_reads_encoder_preprocessing(sources, tmp_path):
    prepare_weights(
        sources["qwen2_vl"], tmp_path, "dino,sam", dino=sources["dino"], sam=sources["sam"], seg_projector_stride=1
    )
    processor = AutoProcessor.from_pretrained(tmp_path)
    assert type(processor) is VPT_Qwen2VLProcessor
    assert processor.detection_processor_config["crop_size"] == {"height": 28, "width": 28}
    assert processor.seg_processor_config["pad_size"] == {"height": 64, "width": 64}
    assert (processor.detection_image_seqlen, processor.seg_image_seqlen) == (4, 16)


def test_defaults_without_preprocessor_config(sources, tmp_path):
    dino = tmp_path / "dino"
    dino.mkdir()
    for name in ("config.json", "model.safetensors", "pytorch_model.bin"):
        if (sources["dino"] / name).is_file():
            (dino / name).write_bytes((sources["dino"] / name).read_bytes())
    prepare_weights(sources["qwen2_vl"], tmp_path / "out", ["dino"], dino=dino)
    processor = AutoProcessor.from_pretrained(tmp_path / "out")
    assert processor.detection_processor_config["crop_size"] == {"height": 224, "width": 224}
    assert processor.detection_image_seqlen == (224 // 14) ** 2


def test_clip_needs_no_encoder_and_dino_needs_its_directory(sources, tmp_path):
    model = prepare_weights(sources["qwen2_vl"], tmp_path, "clip")
    assert not hasattr(model, "detection_model") and hasattr(model, "clip_projector")
    with pytest.raises(ValueError, match="needs the local directory"):
        prepare_weights(sources["qwen2_vl"], tmp_path, "dino")
