"""The recipes in configs/: each one parses with LLaMA-Factory's argument classes (VPT keys included) and names a VPT
template; each Qwen2.5-VL and Qwen3-VL recipe is its source with only the base changed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import llamafactory_patches
from llamafactory_patches.plugin import VPT_TEMPLATES

llamafactory_patches.apply()

from llamafactory.hparams import parser  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "configs").glob("*.yaml"))
ADAPTED = {  # Qwen2.5-VL recipe -> the authors' Qwen2-VL recipe it adapts
    "Qwen2.5-VL-3b-VPT-CLIP.yaml": "Qwen2-VL-2b-VPT-CLIP.yaml",
    "Qwen2.5-VL-3b-VPT-Det.yaml": "Qwen2-VL-2b-VPT-Det.yaml",
    "Qwen2.5-VL-7b-VPT-CLIP.yaml": "Qwen2-VL-7b-VPT-CLIP.yaml",
}
ADAPTED_QWEN3 = {  # Qwen3-VL recipe -> the recipe it adapts
    "Qwen3-VL-4b-VPT-CLIP.yaml": "Qwen2.5-VL-3b-VPT-CLIP.yaml",
}
BASE_KEYS = {"model_name_or_path", "template", "output_dir"}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.name)
def test_recipe_parses_and_names_a_vpt_template(recipe):
    values = {**load(recipe), "bf16": False, "fp16": False}  # bf16 needs a GPU; the keys are what is checked
    # A DeepSpeed config given to TrainingArguments becomes process-wide state (it would turn ZeRO-3 on for every
    # later test): check that the file exists, and parse the rest.
    deepspeed = values.pop("deepspeed", None)
    assert deepspeed is None or (ROOT / deepspeed).is_file(), deepspeed
    model_args, data_args, *_ = parser._parse_train_args(values)
    assert data_args.template in VPT_TEMPLATES
    assert model_args.vision_encoder_ls  # every recipe builds at least one branch
    assert model_args.model_name_or_path.startswith("saves/")


@pytest.mark.parametrize("recipe, source", ADAPTED.items())
def test_qwen2_5_vl_recipes_change_only_the_base(recipe, source):
    ours, theirs = load(ROOT / "configs" / recipe), load(ROOT / "configs" / source)
    assert ours["template"] == "vpt_qwen2_5_vl" and "Qwen2.5-VL" in ours["model_name_or_path"]
    assert {key: value for key, value in ours.items() if key not in BASE_KEYS} == {
        key: value for key, value in theirs.items() if key not in BASE_KEYS
    }


@pytest.mark.parametrize("recipe, source", ADAPTED_QWEN3.items())
def test_qwen3_vl_recipes_change_only_the_base(recipe, source):
    """A Qwen3-VL recipe trains with a Qwen3-VL template, the no-think one for an Instruct base (a non-reasoning
    model), from a `saves/init` checkpoint of prepare_weights; everything else is its source recipe's."""
    from transformers_vpt.models.bases import VPT_BASES

    ours, theirs = load(ROOT / "configs" / recipe), load(ROOT / "configs" / source)
    assert ours["template"] in VPT_BASES["qwen3_vl"].templates
    assert ours["template"] == "vpt_qwen3_vl_nothink" and "Instruct" in (ROOT / "configs" / recipe).read_text()
    assert ours["model_name_or_path"] == f"saves/init/{recipe.removesuffix('.yaml')}-init"
    assert ours["output_dir"] == f"saves/{recipe.removesuffix('.yaml')}"
    assert {key: value for key, value in ours.items() if key not in BASE_KEYS} == {
        key: value for key, value in theirs.items() if key not in BASE_KEYS
    }
