"""The LLaMA-Factory layer is guarded: the tested release only, every private name checked before anything is
patched, VPT recipes refused where the patches cannot reach (``USE_V1=1``), and registries used where they exist."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import llamafactory_patches
from llamafactory_patches import args, model, plugin, recipe
from llamafactory_patches.guard import (
    ANY_VERSION_ENV,
    TESTED_VERSION,
    PatchError,
    Private,
    check_private,
    check_version,
)

llamafactory_patches.apply()

from llamafactory.data import converter, mm_plugin  # noqa: E402
from llamafactory.data.template import TEMPLATES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VPT_RECIPE = ROOT / "configs" / "tiny" / "instruction.yaml"


# ---------------------------------------------------------------------------------------------- version and names
def test_another_release_is_refused_with_the_fix(monkeypatch):
    monkeypatch.delenv(ANY_VERSION_ENV, raising=False)
    check_version(TESTED_VERSION)
    with pytest.raises(PatchError, match=r"written for llamafactory 0\.9\.5, found 0\.9\.6") as error:
        check_version("0.9.6")
    message = str(error.value)
    assert "\n" not in message and ANY_VERSION_ENV in message and "VPT_LLAMAFACTORY_PATCH=0" in message
    monkeypatch.setenv(ANY_VERSION_ENV, "1")
    check_version("0.9.6")  # the adventurous may try


def sample(a, b):
    return a + b


class Owner:
    listed = [int, str]
    function = staticmethod(sample)


def test_private_names_are_checked_and_reported_together():
    assert Private(Owner, "function", ("a", "b"), expected=sample).problem() is None
    assert Private(Owner, "listed", contains=(int,)).problem() is None
    assert "does not exist" in Private(Owner, "gone").problem()
    assert "takes ('a', 'b'), the patch expects ('a',)" in Private(Owner, "function", ("a",)).problem()
    assert "replaced by another patch" in Private(Owner, "function", expected=print).problem()
    assert "lacks ['float']" in Private(Owner, "listed", contains=(float,)).problem()
    with pytest.raises(PatchError, match=r"gone does not exist \(batching\); .*listed lacks") as error:
        check_private([Private(Owner, "gone", patch="batching"), Private(Owner, "listed", contains=(float,))])
    assert "nothing was patched" in str(error.value)


def test_every_patch_module_declares_its_private_names():
    import importlib

    for name in (*llamafactory_patches.PATCH_MODULES, "template"):
        module = importlib.import_module(f"llamafactory_patches.{name}")
        assert module.PRIVATE and all(isinstance(entry, Private) for entry in module.PRIVATE), name


# ---------------------------------------------------------------------------------------------- registries
EXPECTED_TEMPLATES = {  # VPT template -> (template class, plugin class)
    "vpt_qwen2_vl": ("ReleasedQwen2VLTemplate", "VPTQwen2VLPlugin"),
    "vpt_qwen2_5_vl": ("ReleasedQwen2VLTemplate", "VPTQwen2VLPlugin"),
    "vpt_qwen3_vl": ("ReasoningTemplate", "VPTQwen3VLPlugin"),
    "vpt_qwen3_vl_nothink": ("Template", "VPTQwen3VLPlugin"),
}


def test_every_vpt_template_is_registered_with_the_plugin_of_its_stock_template():
    registered = {name: TEMPLATES[name] for name in plugin.VPT_TEMPLATES}
    kinds = {name: (type(ours).__name__, type(ours.mm_plugin).__name__) for name, ours in registered.items()}
    assert kinds == EXPECTED_TEMPLATES
    assert set(mm_plugin.PLUGINS) >= {"vpt_qwen2_vl", "vpt_qwen3_vl"}
    assert issubclass(mm_plugin.PLUGINS["vpt_qwen3_vl"], mm_plugin.Qwen3VLPlugin)


@pytest.mark.parametrize("name", list(plugin.VPT_TEMPLATES))
def test_template_is_its_stock_template_with_the_released_labels_or_as_is(name):
    ours, base = TEMPLATES[name], TEMPLATES[plugin.VPT_TEMPLATES[name]]
    assert type(ours.mm_plugin) is plugin.VPT_PLUGINS[plugin.STOCK_PLUGINS[type(base.mm_plugin)]]
    assert isinstance(ours.mm_plugin, plugin.VPTPluginMixin) and isinstance(ours.mm_plugin, type(base.mm_plugin))
    settings = [f.name for f in dataclasses.fields(base.mm_plugin) if f.init]
    assert [getattr(ours.mm_plugin, key) for key in settings] == [getattr(base.mm_plugin, key) for key in settings]
    assert ours.mm_plugin.image_token == "<|image_pad|>" and ours.mm_plugin.video_token == "<|video_pad|>"
    differ = {f.name for f in dataclasses.fields(base) if getattr(ours, f.name) != getattr(base, f.name)}
    if plugin.RELEASED_LABELS[name]:
        assert type(ours).__name__ == "ReleasedQwen2VLTemplate"
        assert differ == {"format_assistant", "format_function", "mm_plugin"}
    else:
        assert type(ours) is type(base) and differ == {"mm_plugin"}


def test_stock_templates_and_qwen3_plugin_names_are_guarded(monkeypatch):
    from llamafactory.data import template as template_module

    guarded = {(entry.owner, entry.name) for entry in plugin.PRIVATE}
    for name in ("_get_mm_inputs", "_get_video_token_metadata", "_get_mm_token_metadata", "_preprocess_image"):
        assert (mm_plugin.Qwen3VLPlugin, name) in guarded, name
    stock = [entry for entry in plugin.PRIVATE if isinstance(entry, plugin.StockTemplate)]
    assert {entry.template for entry in stock} == set(plugin.VPT_TEMPLATES.values())
    assert all(entry.problem() is None for entry in stock)
    elsewhere = dataclasses.replace(TEMPLATES["qwen3_vl"], mm_plugin=mm_plugin.BasePlugin(None, None, None))
    monkeypatch.setitem(TEMPLATES, "moved", elsewhere)
    moved = plugin.StockTemplate(template_module, "TEMPLATES", template="moved", patch="the vpt_x template")
    assert "['moved'] uses BasePlugin, the VPT plugins extend Qwen2VLPlugin, Qwen3VLPlugin" in moved.problem()
    gone = plugin.StockTemplate(template_module, "TEMPLATES", template="gone")
    assert "has no 'gone' template" in gone.problem()
    with pytest.raises(PatchError, match=r"\(the vpt_x template\)") as error:
        check_private([moved])
    assert "\n" not in str(error.value)


def test_formattings_are_registered_and_stock_converters_untouched():
    from llamafactory.data.converter import AlpacaDatasetConverter, OpenAIDatasetConverter, SharegptDatasetConverter

    from llamafactory_patches.data import VPT_CONVERTERS, stock_formatting, vpt_formatting

    stock = {"alpaca": AlpacaDatasetConverter, "sharegpt": SharegptDatasetConverter, "openai": OpenAIDatasetConverter}
    for name, cls in stock.items():
        assert converter.DATASET_CONVERTERS[name] is cls
        assert issubclass(converter.DATASET_CONVERTERS[f"vpt_{name}"], cls)
        assert vpt_formatting(name) == f"vpt_{name}" and stock_formatting(f"vpt_{name}") == name
    assert set(VPT_CONVERTERS) <= set(converter.DATASET_CONVERTERS)
    assert vpt_formatting("ranking_x") == "ranking_x"


def test_recipe_detection_knows_every_vpt_key_model_type_and_template():
    """recipe.py imports nothing, so its lists are written out: they are the ones `VPT_BASES` gives."""
    from transformers_vpt.models.bases import VPT_BASES

    templates = [name for base in VPT_BASES.values() for name in base.templates]
    model_types = [model_type for base in VPT_BASES.values() for model_type in base.model_types]
    assert sorted(recipe.VPT_TEMPLATES) == sorted(templates) == sorted(plugin.VPT_TEMPLATES)
    assert sorted(recipe.VPT_MODEL_TYPES) == sorted(model_types) == sorted(model.VPT_MODEL_TYPES)
    assert {"vpt_qwen3_vl", "vpt_qwen3_vl_nothink"} <= set(recipe.VPT_TEMPLATES)
    assert "qwen3_vl_vpt" in recipe.VPT_MODEL_TYPES
    assert set(recipe.VPT_KEYS) == set(args.vpt_keys())


def test_recipe_detection(tmp_path):
    plain = tmp_path / "plain.yaml"
    plain.write_text("model_name_or_path: Qwen/Qwen2-VL-2B-Instruct\ntemplate: qwen2_vl\nstage: sft\n")
    assert recipe.vpt_markers([str(plain)]) == []
    assert recipe.vpt_markers(["train", str(plain)]) == []
    assert recipe.vpt_markers([str(plain), "template=vpt_qwen2_vl"]) == ["template: vpt_qwen2_vl"]
    assert recipe.vpt_markers(["--template", "vpt_qwen2_vl", "--vision_encoder_ls=dino"]) == [
        "template: vpt_qwen2_vl",
        "vision_encoder_ls",
    ]
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps({"model_type": "qwen2_vl_vpt"}))
    as_json = tmp_path / "r.json"
    as_json.write_text(json.dumps({"model_name_or_path": str(checkpoint), "template": "qwen2_vl"}))
    assert recipe.vpt_markers(["train", str(as_json)]) == ["model_name_or_path: a qwen2_vl_vpt checkpoint"]
    assert "template: vpt_qwen2_vl" in recipe.vpt_markers([str(VPT_RECIPE)])
    assert recipe.vpt_markers([str(tmp_path / "missing.yaml")]) == []


# ---------------------------------------------------------------------------------------------- in a fresh process
CHILD = r"""
import sys
setup, argv = sys.argv[1], sys.argv[2:]
exec(setup)
sys.argv = ["llamafactory-cli", *argv]
import llamafactory.train.tuner  # the .pth hook runs here
import llamafactory_patches
from llamafactory.train.sft import workflow
print("STATE", llamafactory_patches._applied, workflow.CustomSeq2SeqTrainer.__module__)
"""
MOVED_NAME = "import llamafactory.model.loader as m; m.patch_config = lambda config, tokenizer: None"
NEW_RELEASE = "import llamafactory.extras.env as e; e.VERSION = '0.9.6'"


def start(setup: str, argv: list[str], **env) -> subprocess.Popen:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **env}
    environment.pop(ANY_VERSION_ENV, None) if ANY_VERSION_ENV not in env else None
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, setup, *argv], env=environment, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def finish(process) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=300)
    return process.returncode, out, err


@pytest.mark.slow
def test_a_moved_private_name_or_another_release_stops_vpt_runs_only(tmp_path):
    plain = tmp_path / "plain.yaml"
    plain.write_text("model_name_or_path: some/model\ntemplate: qwen\n")
    scenarios = {
        "moved, vpt": start(MOVED_NAME, [str(VPT_RECIPE)]),
        "moved, plain": start(MOVED_NAME, [str(plain)]),
        "release, vpt": start(NEW_RELEASE, [str(VPT_RECIPE)]),
        "release, plain": start(NEW_RELEASE, [str(plain)]),
        "release, vpt, override": start(NEW_RELEASE, [str(VPT_RECIPE)], **{ANY_VERSION_ENV: "1"}),
    }
    results = {name: finish(process) for name, process in scenarios.items()}

    rc, out, err = results["moved, vpt"]
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("vpt: error: llamafactory 0.9.5 differs"), err
    assert "llamafactory.model.loader.patch_config takes ('config', 'tokenizer')" in lines[0]
    assert "template: vpt_qwen2_vl" in lines[0] and "Traceback" not in err

    rc, out, err = results["release, vpt"]
    assert rc == 2 and "found 0.9.6" in err and len(err.strip().splitlines()) == 1, err

    for name in ("moved, plain", "release, plain"):  # not VPT: LLaMA-Factory as it is, unpatched
        rc, out, err = results[name]
        assert rc == 0 and "STATE False llamafactory.train.sft.trainer" in out, (name, out, err)

    rc, out, err = results["release, vpt, override"]
    assert rc == 0 and "STATE True llamafactory_patches.trainer" in out, (out, err)


@pytest.mark.slow
def test_use_v1_refuses_a_vpt_recipe_and_the_switch_turns_the_hook_off(tmp_path):
    cli = Path(sys.executable).with_name("llamafactory-cli")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "USE_V1": "1"}
    v1 = subprocess.Popen([str(cli), "train", str(VPT_RECIPE)], env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    off = start("", [str(VPT_RECIPE)], VPT_LLAMAFACTORY_PATCH="0")
    out, err = v1.communicate(timeout=300)
    assert v1.returncode == 2, (out, err)
    assert "vpt: error: USE_V1=1 runs LLaMA-Factory's v1 stack" in err and "template: vpt_qwen2_vl" in err
    assert "Traceback" not in err

    rc, out, err = finish(off)
    assert rc == 0 and "STATE False llamafactory.train.sft.trainer" in out, (out, err)


def test_vpt_cli_refuses_another_release_in_one_line(monkeypatch, capsys):
    import llamafactory.extras.env

    from transformers_vpt import cli

    monkeypatch.delenv(ANY_VERSION_ENV, raising=False)
    monkeypatch.setattr(llamafactory.extras.env, "VERSION", "0.9.6")
    assert cli.main(["train", str(VPT_RECIPE)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vpt-cli: error: the VPT patches are written for llamafactory 0.9.5")
