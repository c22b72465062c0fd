"""The demo (`scripts/demo.sh`) end to end at its smallest size: detail-task data, tiny model, both VPT training
stages and the baseline through `llamafactory-cli train`, the two-round evaluation of the VPT model, the one-round
baseline, the oracle, and the report (report.json figures, examples picture); on the default base and on Qwen3-VL
(`--base qwen3_vl`)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from transformers_vpt.models.bases import VPT_BASES

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # the whole demo pipeline, about a minute (each base)
@pytest.mark.parametrize("base", [None, "qwen3_vl"], ids=["default", "qwen3_vl"])
def test_quick_demo_runs_every_stage_and_reports(base, tmp_path):
    out = tmp_path / "demo"
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    env = {**os.environ, "PATH": path, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        ["bash", "scripts/demo.sh", "--quick", "--no-install", "--out-dir", str(out), *(["--base", base] * bool(base))],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    entry = VPT_BASES[base or "qwen2_vl"]
    assert (out / "sources" / entry.label.lower() / "config.json").is_file()  # the tiny stock model of the base
    for model in (out / "vpt-init", out / "runs" / "instruction"):
        assert json.loads((model / "config.json").read_text())["model_type"] == entry.model_types[0], model
    template = "vpt_qwen3_vl_nothink" if base == "qwen3_vl" else entry.template
    assert f"template {template})" in result.stdout
    assert "</think>" not in result.stdout  # no empty thinking block in the training labels LLaMA-Factory prints

    for stage in ("alignment", "instruction", "baseline"):
        assert (out / "runs" / stage / "model.safetensors").is_file(), stage
    # The baseline is the stock tiny base (no perception tokens), trained with the stock template.
    assert json.loads((out / "runs" / "baseline" / "config.json").read_text())["model_type"] == entry.name
    report = json.loads((out / "report.json").read_text())
    splits = ["synthetic_region_test", "synthetic_action_test", "synthetic_plain_test"]
    assert list(report["splits"]) == splits
    for split, row in report["splits"].items():
        assert set(row) == {"baseline_accuracy", "vpt_accuracy", "oracle_accuracy", "region_accuracy"}
        assert all(0.0 <= row[key] <= 1.0 for key in ("baseline_accuracy", "vpt_accuracy")), split
        assert (row["oracle_accuracy"] is None) == (split == "synthetic_plain_test"), split
        assert (row["region_accuracy"] is None) == (split != "synthetic_region_test"), split
    assert 0.0 < report["duration_s"] < 900
    for name in ("vpt", "baseline"):
        assert sum(report["actions"][name]["synthetic_region_test"].values()) == 4  # every test record answered
    baseline_actions = report["actions"]["baseline"]["synthetic_region_test"]
    assert {kind for kind, count in baseline_actions.items() if count} == {"none"}  # one round, always
    oracle_answers = out / "evaluation-oracle" / "vpt" / "synthetic_region_test" / "final_answers.json"
    oracle = json.loads(oracle_answers.read_text())
    region_test = json.loads((out / "data" / "synthetic_region_test.json").read_text())
    assert [a["round1_text"] for a in oracle] == [r["messages"][1]["content"] for r in region_test]
    assert all(len(report["losses"][stage]) >= 1 for stage in ("alignment", "instruction", "baseline"))
    for name in ("loss.png", "scores.png", "examples.png", "report.md"):
        assert (out / name).stat().st_size > 0, name
    assert "![examples](examples.png)" in (out / "report.md").read_text()
    assert "| test split | baseline (one round) | VPT (two rounds) |" in result.stdout  # the report is printed
    assert "Demo finished" in result.stdout


def test_an_unknown_base_stops_before_anything_is_written(tmp_path):
    """`--base` takes the bases of `transformers_vpt.models.bases`; another name is one line and exit status 2."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        ["bash", "scripts/demo.sh", "--no-install", "--base", "qwen9_vl", "--out-dir", str(tmp_path / "demo")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 2
    known = ", ".join(VPT_BASES)
    assert "qwen3_vl" in known
    assert result.stderr.strip().splitlines()[-1] == f"demo.sh: unknown --base 'qwen9_vl'; choose from {known}"
    assert not (tmp_path / "demo").exists()
    usage = subprocess.run(["bash", "scripts/demo.sh", "--help"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "--base BASE" in usage.stdout
