"""vpt-cli on a saved tiny model of every base: infer output, --save-boxes, help texts."""

from __future__ import annotations

import pytest
from PIL import Image
from utils import BASES, SPAN_A, make_image, script_pipeline_runs

from transformers_vpt.cli import main
from transformers_vpt.tiny.assemble import build_tiny_vpt


@pytest.fixture(scope="module", params=BASES)
def model_dir(request, tmp_path_factory):
    """A saved tiny VPT model (all branches), once per base."""
    directory = tmp_path_factory.mktemp(f"tiny_vpt_{request.param}")
    build_tiny_vpt(save_dir=directory, base=request.param)
    return directory


@pytest.fixture
def image_path(tmp_path):
    path = tmp_path / "image.png"
    make_image(size=(320, 240)).save(path)
    return path


def infer_args(model_dir, image_path, *extra):
    return [
        "infer",
        "--model",
        str(model_dir),
        "--image",
        str(image_path),
        "--question",
        "What?",
        "--device",
        "cpu",
        "--max-new-tokens",
        "4",
        *extra,
    ]


def test_infer_prints_answer_and_action(model_dir, image_path, capsys):
    assert main(infer_args(model_dir, image_path, "--mode", "free")) == 0
    out = capsys.readouterr().out
    assert out.startswith("Answer: ") and "\nAction: " in out


def test_infer_region_and_save_boxes(model_dir, image_path, tmp_path, monkeypatch, capsys):
    script_pipeline_runs(monkeypatch, {"What?": SPAN_A})
    out_png = tmp_path / "boxes.png"
    assert main(infer_args(model_dir, image_path, "--save-boxes", str(out_png))) == 0
    out = capsys.readouterr().out
    assert "Action: region" in out and "Boxes: (40,60,280,180)" in out
    with Image.open(out_png) as drawn, Image.open(image_path) as original:
        assert drawn.size == original.size == (320, 240)
        assert drawn.getpixel((40, 100)) == (255, 0, 0)  # left edge of the box
        assert drawn.getpixel((160, 120)) == original.getpixel((160, 120))  # inside the box: untouched


@pytest.mark.parametrize("argv", [["--help"], ["infer", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "infer" in out
    if argv[0] == "infer":
        assert all(option in out for option in ("--model", "--mode", "--save-boxes", "--max-image-side"))


def test_missing_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
