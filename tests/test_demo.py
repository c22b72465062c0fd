"""The demo (`scripts/demo.sh`) end to end at its smallest size: data, tiny model, both training stages through
`llamafactory-cli train`, the two-round evaluation of the untrained and the trained model, and the report."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # the whole demo pipeline, about a minute
def test_quick_demo_runs_every_stage_and_reports(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        ["bash", "scripts/demo.sh", "--quick", "--no-install", "--out-dir", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    for stage in ("alignment", "instruction"):
        assert (out / "runs" / stage / "model.safetensors").is_file(), stage
    report = json.loads((out / "report.json").read_text())
    assert set(report["models"]) == {"before", "after"}
    assert report["datasets"] == ["synthetic_region_test", "synthetic_action_test", "synthetic_plain_test"]
    for model in report["models"].values():
        assert all(0.0 <= value <= 1.0 for value in model["answer_accuracy"].values())
        assert sum(model["actions"]["synthetic_region_test"].values()) == 4  # every test record answered
    assert all(len(report["losses"][stage]) >= 1 for stage in ("alignment", "instruction"))
    for name in ("loss.png", "scores.png", "report.md"):
        assert (out / name).stat().st_size > 0, name
    assert "| answer accuracy, synthetic_region_test |" in result.stdout  # the report is printed
    assert "Demo finished" in result.stdout
