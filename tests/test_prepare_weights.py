"""transformers_vpt.weights and scripts/prepare_weights.py on tiny local base (Qwen2-VL, Qwen2.5-VL, Qwen3-VL), DINOv2
and SAM models (safetensors and .bin)."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer, Dinov2Model, SamModel

from scripts import prepare_weights as prepare_cli
from transformers_vpt.models.bases import VPT_BASES
from transformers_vpt.tiny.assemble import build_tiny_base
from transformers_vpt.tiny.model import TINY_BASES
from transformers_vpt.tiny.sources import build_sources
from transformers_vpt.vocabulary import BRANCH_TOKENS, REGION_TOKENS, token_id
from transformers_vpt.weights import prepare_weights

SOURCES = [("qwen2_vl", True), ("qwen2_vl", False), ("qwen2_5_vl", True), ("qwen3_vl", True)]
SOURCE_IDS = [f"{base}-{'safetensors' if safe else 'bin'}" for base, safe in SOURCES]


@pytest.fixture(scope="module", params=SOURCES, ids=SOURCE_IDS)
def sources(request, tmp_path_factory):
    """The tiny sources of one base: (base name, directories by kind; the base model's is also under "base")."""
    base, safe = request.param
    dirs = build_sources(tmp_path_factory.mktemp("sources"), safe_serialization=safe, base=base)
    weights = "model.safetensors" if safe else "pytorch_model.bin"
    assert all((directory / weights).is_file() for directory in dirs.values())
    return base, {**dirs, "base": dirs[base]}


def base_flag(base: str, directory) -> list[str]:
    """The base model on the command line: Qwen2-VL with its own flag (as always), any other with --base-model."""
    return ["--qwen2-vl", str(directory)] if base == "qwen2_vl" else ["--base-model", str(directory), "--base", base]


def assert_same(actual: dict, expected: dict, prefix: str = "") -> None:
    for key, value in expected.items():
        assert torch.equal(actual[prefix + key], value), prefix + key


def test_all_branches(sources, tmp_path):
    base, dirs = sources
    entry = VPT_BASES[base]
    prepare_cli.main([
        *base_flag(base, dirs["base"]), "--dino", str(dirs["dino"]), "--sam", str(dirs["sam"]),
        "--vision-encoder-ls", "dino,sam,clip", "--seg-projector-stride", "1", "--output-dir", str(tmp_path),
    ])
    model, info = AutoModelForImageTextToText.from_pretrained(tmp_path, output_loading_info=True)
    assert type(model) is entry.model_class
    assert info["missing_keys"] == info["unexpected_keys"] == [], info  # the saved layout loads as it is
    assert model.config.model_type == entry.model_types[0]
    assert model.config.vision_encoder_ls == ["dino", "sam", "clip"]
    state = model.state_dict()

    stock = entry.stock_model_class.from_pretrained(dirs["base"]).state_dict()
    embedding_keys = {"model.language_model.embed_tokens.weight", "lm_head.weight"}
    assert_same(state, {key: value for key, value in stock.items() if key not in embedding_keys})
    assert_same(state, Dinov2Model.from_pretrained(dirs["dino"]).state_dict(), "model.detection_model.")
    assert_same(state, SamModel.from_pretrained(dirs["sam"]).vision_encoder.state_dict(), "model.seg_model.")
    assert model.config.detection_config.hidden_size == 32 and model.config.seg_config.output_channels == 16
    stock_vision = entry.stock_model_class.config_class.from_pretrained(dirs["base"]).vision_config.to_dict()
    assert {k: v for k, v in model.config.vision_config.to_dict().items() if k != "dtype"} == {
        k: v for k, v in stock_vision.items() if k != "dtype"
    }  # e.g. Qwen2.5-VL's window_size and fullatt_block_indexes, Qwen3-VL's deepstack_visual_indexes

    processor = AutoProcessor.from_pretrained(tmp_path)
    assert type(processor) is entry.processor_class
    tokenizer = processor.tokenizer
    old_size = len(AutoTokenizer.from_pretrained(dirs["base"]))
    for branch in BRANCH_TOKENS.values():
        for token in (branch.image_pad, branch.action_start, branch.action):
            assert token_id(tokenizer, token) is not None
        assert getattr(model.config, branch.action_id_field) == token_id(tokenizer, branch.action)
    assert all(token_id(tokenizer, token) is not None for token in REGION_TOKENS)
    for key in embedding_keys:  # old rows kept, new rows set to the mean of the old ones
        assert torch.equal(state[key][:old_size], stock[key][:old_size])
        expected = stock[key][:old_size].mean(0).expand(len(tokenizer) - old_size, -1)
        torch.testing.assert_close(state[key][old_size : len(tokenizer)], expected)


def test_processor_reads_encoder_preprocessing(sources, tmp_path):
    base, dirs = sources
    prepare_weights(dirs["base"], tmp_path, "dino,sam", dino=dirs["dino"], sam=dirs["sam"], seg_projector_stride=1)
    processor = AutoProcessor.from_pretrained(tmp_path)
    assert type(processor) is VPT_BASES[base].processor_class
    assert processor.detection_processor_config["crop_size"] == {"height": 28, "width": 28}
    assert processor.seg_processor_config["pad_size"] == {"height": 64, "width": 64}
    assert (processor.detection_image_seqlen, processor.seg_image_seqlen) == (4, 16)


def test_defaults_without_preprocessor_config(sources, tmp_path):
    _, dirs = sources
    dino = tmp_path / "dino"
    dino.mkdir()
    for name in ("config.json", "model.safetensors", "pytorch_model.bin"):
        if (dirs["dino"] / name).is_file():
            (dino / name).write_bytes((dirs["dino"] / name).read_bytes())
    prepare_weights(dirs["base"], tmp_path / "out", ["dino"], dino=dino)
    processor = AutoProcessor.from_pretrained(tmp_path / "out")
    assert processor.detection_processor_config["crop_size"] == {"height": 224, "width": 224}
    assert processor.detection_image_seqlen == (224 // 14) ** 2


def test_clip_needs_no_encoder_and_dino_needs_its_directory(sources, tmp_path):
    base, dirs = sources
    model = prepare_weights(dirs["base"], tmp_path, "clip", base=base)
    assert type(model) is VPT_BASES[base].model_class
    assert not hasattr(model, "detection_model") and hasattr(model, "clip_projector")
    with pytest.raises(ValueError, match="needs the local directory"):
        prepare_weights(dirs["base"], tmp_path, "dino")


@pytest.fixture(scope="module")
def both_bases(tmp_path_factory):
    """A tiny stock model directory of every base, by base name (clip-only runs need no encoders)."""
    root = tmp_path_factory.mktemp("bases")
    return {base: build_sources(root / base, base=base)[base] for base in VPT_BASES}


@pytest.mark.parametrize("base", list(VPT_BASES))
def test_base_model_infers_the_base_from_its_config(both_bases, base, tmp_path):
    """--base-model alone takes the base the directory's config.json declares; --base given must agree."""
    assert prepare_cli.main(
        ["--base-model", str(both_bases[base]), "--vision-encoder-ls", "clip", "--output-dir", str(tmp_path / "a")]
    ) == 0
    assert json.loads((tmp_path / "a" / "config.json").read_text())["model_type"] == VPT_BASES[base].model_types[0]
    assert prepare_cli.main([
        "--base-model", str(both_bases[base]), "--base", base, "--vision-encoder-ls", "clip",
        "--output-dir", str(tmp_path / "b"),
    ]) == 0
    assert type(AutoModelForImageTextToText.from_pretrained(tmp_path / "b")) is VPT_BASES[base].model_class


def test_a_base_that_disagrees_is_one_line(both_bases, tmp_path, capsys):
    qwen2, qwen2_5, qwen3 = both_bases["qwen2_vl"], both_bases["qwen2_5_vl"], both_bases["qwen3_vl"]
    vpt, vpt3 = tmp_path / "vpt", tmp_path / "vpt3"
    prepare_weights(qwen2_5, vpt, "clip")
    prepare_weights(qwen3, vpt3, "clip")
    shutil.copytree(qwen2, tmp_path / "copy")
    clip = ["--vision-encoder-ls", "clip", "--output-dir", str(tmp_path / "out")]
    cases = [
        (["--base-model", str(qwen2_5), "--base", "qwen2_vl"],
         "expected qwen2_vl (a Qwen2.5-VL base model: pass --base qwen2_5_vl or leave --base out)"),
        (["--qwen2-vl", str(qwen2_5)], "expected qwen2_vl (a Qwen2.5-VL base model: give it with --base-model DIR)"),
        (["--qwen2-vl", str(qwen2), "--base", "qwen2_5_vl"], "give the Qwen2.5-VL directory with --base-model"),
        (["--base-model", str(vpt)], "that is a Qwen2.5-VL VPT checkpoint; give the plain Qwen2.5-VL model"),
        (["--base-model", str(qwen3), "--base", "qwen2_5_vl"],
         "expected qwen2_5_vl (a Qwen3-VL base model: pass --base qwen3_vl or leave --base out)"),
        (["--qwen2-vl", str(qwen3)], "expected qwen2_vl (a Qwen3-VL base model: give it with --base-model DIR)"),
        (["--qwen2-vl", str(qwen2), "--base", "qwen3_vl"], "give the Qwen3-VL directory with --base-model"),
        (["--base-model", str(vpt3)], "that is a Qwen3-VL VPT checkpoint; give the plain Qwen3-VL model"),
        (["--base-model", str(both_bases["qwen2_vl"].parent / "dinov2")], "expected a base model: qwen2_vl or"),
    ]
    for argv, message in cases:
        assert prepare_cli.main([*argv, *clip]) == 2, message
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):  # --base-model and --qwen2-vl name the same source: one of them
        prepare_cli.main(["--base-model", str(qwen2), "--qwen2-vl", str(qwen2), *clip])
    assert "not allowed with argument" in capsys.readouterr().err


def test_tied_word_embeddings_stay_tied(tmp_path):
    """A base that ties its word embeddings (Qwen3-VL-4B; the text config decides) and saves them once, without
    `lm_head.weight`, gives a VPT model with one tied matrix: old rows kept, new rows at the mean, tied after a
    reload."""
    directory = tmp_path / "qwen3-vl"
    text = {**TINY_BASES["qwen3_vl"][2], "tie_word_embeddings": True}
    stock, _ = build_tiny_base("qwen3_vl", save_dir=directory, text_config=text, tie_word_embeddings=True)
    assert stock.lm_head.weight is stock.get_input_embeddings().weight
    with safe_open(directory / "model.safetensors", "pt") as weights:
        keys = set(weights.keys())
    assert "lm_head.weight" not in keys and "model.language_model.embed_tokens.weight" in keys  # the current layout
    old_size = len(AutoTokenizer.from_pretrained(directory))
    old_rows = stock.get_input_embeddings().weight[:old_size]

    model = prepare_weights(directory, tmp_path / "vpt", "dino,clip", dino=build_sources(tmp_path / "s")["dino"])
    loaded, info = AutoModelForImageTextToText.from_pretrained(tmp_path / "vpt", output_loading_info=True)
    assert info["missing_keys"] == info["unexpected_keys"] == [], info
    assert loaded.config.tie_word_embeddings and loaded.config.text_config.tie_word_embeddings
    new_size = len(AutoTokenizer.from_pretrained(tmp_path / "vpt"))
    for vpt in (model, loaded):
        embeddings = vpt.get_input_embeddings().weight
        assert vpt.lm_head.weight is embeddings
        assert torch.equal(embeddings[:old_size], old_rows)
        torch.testing.assert_close(embeddings[old_size:new_size], old_rows.mean(0).expand(new_size - old_size, -1))


def _run_make_tiny(*args):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "configs/tiny/make_tiny.py", *args]
    return subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=300)


def test_make_tiny_text_config_and_seed(tmp_path):
    """configs/tiny/make_tiny.py: --text-config overrides the tiny text config of the source and (through
    prepare_weights) of the VPT checkpoint; --seed makes the random weights reproducible; an unknown field is one
    usage line."""
    for run in ("a", "b"):
        result = _run_make_tiny("--out-dir", str(tmp_path / run), "--no-data", "--seed", "3", "--text-config",
                                "rope_theta=10")
        assert result.returncode == 0, result.stderr[-2000:]
    for model in ("sources/qwen2-vl", "vpt-init"):
        config = json.loads((tmp_path / "a" / model / "config.json").read_text())
        assert config["text_config"]["rope_theta"] == 10, model
    with safe_open(str(tmp_path / "a/vpt-init/model.safetensors"), "pt") as a, \
            safe_open(str(tmp_path / "b/vpt-init/model.safetensors"), "pt") as b:
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
    bad = _run_make_tiny("--out-dir", str(tmp_path / "c"), "--no-data", "--text-config", "rope_thetta=10")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].endswith("rope_thetta is not a field of the qwen2_vl text config")
    assert not (tmp_path / "c").exists()
