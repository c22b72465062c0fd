"""Every Qwen-VL base behaves as its stock model without VPT tokens, and round-trips through save/load."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModel, AutoModelForImageTextToText
from utils import BASES, Sample, collate, make_model, stock_twin

from transformers_vpt.models.bases import VPT_BASES
from transformers_vpt.models.vpt.modeling_vpt import BRANCH_MODULES


def saved_keys(directory) -> list[str]:
    with safe_open(directory / "model.safetensors", "pt") as saved:
        return list(saved.keys())


VPT_MODELS = {name: base.model_class.vpt_model_class for name, base in VPT_BASES.items()}


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_without_vpt_tokens_the_logits_are_exactly_the_stock_models(base, padding_side):
    model = make_model(base=base)
    stock = stock_twin(model, base)
    batch = collate([Sample("plain", seed=1), Sample("region", seed=2, question=(50, 51, 52))], padding_side)
    with torch.no_grad():
        ours, theirs = model(**batch), stock(**batch)
    keep = batch["attention_mask"].bool()
    assert torch.equal(ours.logits[keep], theirs.logits[keep])
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-6, atol=1e-7)  # ours in float32 on labelled rows


@pytest.mark.parametrize("base", BASES)
def test_save_load_round_trip_and_auto_classes(base, tmp_path):
    model = make_model(base=base, seed=5)
    model.save_pretrained(tmp_path)
    keys = saved_keys(tmp_path)  # the released layout on every base: branch modules at the top level
    assert set(BRANCH_MODULES) <= {key.split(".")[0] for key in keys}
    assert not any(key.startswith(tuple(f"model.{name}." for name in BRANCH_MODULES)) for key in keys)
    loaded, info = AutoModelForImageTextToText.from_pretrained(tmp_path, output_loading_info=True)
    assert type(loaded) is type(model) and not info["missing_keys"] and not info["unexpected_keys"]
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in ours)
    assert isinstance(AutoModel.from_config(model.config), VPT_MODELS[base])
    batch = collate([Sample("dino", seed=1), Sample("clip", seed=2)])
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded.eval()(**batch).logits)
