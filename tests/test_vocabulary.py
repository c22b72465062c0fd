"""The VPT vocabulary on the tiny tokenizer and on the real Qwen2 vocabulary (ids of the released models)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers.convert_slow_tokenizer import TikTokenConverter

from transformers_vpt.models.qwen2_vl_vpt.configuration_qwen2_vl_vpt import VPT_Qwen2VLConfig
from transformers_vpt.models.qwen2_vl_vpt.processing_qwen2_vl_vpt import VPT_CHAT_TEMPLATE
from transformers_vpt.tiny.tokenizer import (
    QWEN2_PATTERN,
    QWEN2_VL_SPECIAL_TOKENS,
    TINY_BPE_VOCAB_SIZE,
    TINY_VOCAB_SIZE,
    build_tiny_tokenizer,
    qwen2_vl_tokenizer_from_backend,
)
from transformers_vpt.vocabulary import (
    BRANCH_TOKENS,
    IM_END,
    IM_START,
    REGION_END,
    REGION_START,
    REGION_TOKENS,
    add_vpt_tokens,
    x_token,
    y_token,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def test_tiny_tokenizer_fits_the_tiny_model(tokenizer):
    assert len(tokenizer) <= TINY_VOCAB_SIZE
    assert len(build_tiny_tokenizer(with_regions=False)) < len(tokenizer)


def test_tiny_tokenizer_is_qwen2_vl_shaped(tokenizer):
    ids = tokenizer.convert_tokens_to_ids(list(QWEN2_VL_SPECIAL_TOKENS))
    assert ids == list(range(ids[0], ids[0] + len(QWEN2_VL_SPECIAL_TOKENS)))
    assert ids[0] == TINY_BPE_VOCAB_SIZE
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert tokenizer.unk_token is None and tokenizer.bos_token is None
    assert tokenizer.chat_template == VPT_CHAT_TEMPLATE
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_tiny_tokenizer_is_deterministic(tokenizer):
    assert build_tiny_tokenizer().backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


def test_byte_level_round_trip_and_qwen2_digits(tokenizer):
    text = "Café 北京 naïve — x² 12345\n\ttabs  and  spaces 🙂"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.tokenize("2024") == ["2", "0", "2", "4"]


def test_image_pads_are_special(tokenizer):
    for branch in BRANCH_TOKENS.values():
        ids = tokenizer(f"red{branch.image_pad}{branch.image_pad}blue")["input_ids"]
        pad_id = tokenizer.convert_tokens_to_ids(branch.image_pad)
        assert ids.count(pad_id) == 2
        assert branch.image_pad in tokenizer.all_special_tokens
        assert tokenizer.decode(ids, skip_special_tokens=True) == "redblue"


def test_region_and_action_tokens_are_atomic_and_survive_skip_special_tokens(tokenizer):
    region = REGION_START + x_token(1) + y_token(2) + x_token(5) + y_token(7) + REGION_END
    actions = "".join(branch.action_triple for branch in BRANCH_TOKENS.values())
    text = f"Look {region} then {actions} done"
    ids = tokenizer(text)["input_ids"]
    for token in (
        *REGION_TOKENS,
        *[t for b in BRANCH_TOKENS.values() for t in (b.action_start, b.action, b.action_end)],
    ):
        assert token not in tokenizer.all_special_tokens
        assert tokenizer.convert_ids_to_tokens(tokenizer(token)["input_ids"]) == [token]
    assert len([i for i in ids if i >= TINY_BPE_VOCAB_SIZE]) == 6 + 9
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_add_vpt_tokens_is_idempotent_and_fills_the_config():
    tokenizer = build_tiny_tokenizer(vision_encoder_ls=["dino"])
    size = len(tokenizer)
    config = VPT_Qwen2VLConfig(vision_encoder_ls=["dino"])
    assert add_vpt_tokens(tokenizer, config) == 0
    assert len(tokenizer) == size
    det = BRANCH_TOKENS["dino"]
    assert config.detection_image_token_id == tokenizer.convert_tokens_to_ids(det.image_pad)
    assert config.detection_action_start_id == tokenizer.convert_tokens_to_ids(det.action_start)
    assert config.detection_action_id == tokenizer.convert_tokens_to_ids(det.action)
    assert config.seg_image_token_id is None and config.clip_action_id is None
    assert (config.para_start_id, config.para_end_id) == tuple(tokenizer.convert_tokens_to_ids([IM_START, IM_END]))

    assert add_vpt_tokens(tokenizer, config, vision_encoder_ls=["dino", "sam"]) == 4
    assert config.seg_image_token_id == size and config.seg_action_start_id == size + 1


# ----------------------------------------------------------------------------------------------------------------
# The real Qwen2 vocabulary (qwen.tiktoken shipped by dashscope): the ids of the released VPT models.

REAL_IDS = {
    REGION_START: 151658,
    REGION_END: 151659,
    x_token(0): 151660,
    x_token(7): 151667,
    y_token(0): 151668,
    y_token(7): 151675,
}


@pytest.fixture(scope="module")
def qwen_backend():
    """The converted Qwen2 BPE (151,643 ranks); converting takes a few seconds, so it is done once."""
    spec = importlib.util.find_spec("dashscope")
    vocab_file = Path(spec.submodule_search_locations[0]) / "resources" / "qwen.tiktoken"
    return TikTokenConverter(str(vocab_file), pattern=QWEN2_PATTERN, additional_special_tokens=[]).converted()


@pytest.mark.parametrize("kind", ["clip", "dino", "sam"])
def test_real_vocabulary_ids(qwen_backend, kind):
    tokenizer = qwen2_vl_tokenizer_from_backend(qwen_backend)
    assert tokenizer.convert_tokens_to_ids(list(QWEN2_VL_SPECIAL_TOKENS)) == list(range(151643, 151657))
    assert tokenizer("Hello world")["input_ids"] == [9707, 1879]

    config = VPT_Qwen2VLConfig(vision_encoder_ls=[kind])
    assert add_vpt_tokens(tokenizer, config) == 1 + 18 + 3
    branch = BRANCH_TOKENS[kind]
    expected = {
        **REAL_IDS,
        branch.image_pad: 151657,
        branch.action_start: 151676,
        branch.action: 151677,
        branch.action_end: 151678,
    }
    assert {token: tokenizer.convert_tokens_to_ids(token) for token in expected} == expected
    assert getattr(config, branch.image_token_id_field) == 151657
    assert getattr(config, branch.action_start_id_field) == 151676
    assert getattr(config, branch.action_id_field) == 151677
    assert (config.para_start_id, config.para_end_id) == (151644, 151645)
    for other in set(BRANCH_TOKENS) - {kind}:
        assert getattr(config, BRANCH_TOKENS[other].image_token_id_field) is None
