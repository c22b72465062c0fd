#!/usr/bin/env python
"""Summarise the demo: before/after scores, action usage, the loss curves of both training stages, and a chart.

Reads what `scripts/demo.sh` produced under ``--demo-dir`` (the evaluation of the untrained and the trained model,
and the LLaMA-Factory runs' ``trainer_log.jsonl``) and writes into it:

* ``report.md``: the before/after table (answer accuracy per test split, region-token accuracy), action usage;
* ``report.json``: the same figures, machine-readable;
* ``loss.png``: training loss of the alignment and the instruction stage;
* ``scores.png``: before/after bars.

The report is also printed. Region-token accuracy here counts every region-test record: an answer without a valid
region span counts as a miss (the evaluation's own table counts region answers only).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from transformers_vpt.files import write_atomic, write_json, write_text

STAGES = ("alignment", "instruction")
BEFORE, AFTER = "before", "after"
REGION_SPLIT = "synthetic_region_test"


def read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise SystemExit(f"demo report: cannot read {path}: {error}") from error


def read_losses(run_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) pairs of a LLaMA-Factory run, from its ``trainer_log.jsonl``."""
    path = run_dir / "trainer_log.jsonl"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise SystemExit(f"demo report: cannot read {path}: {error}") from error
    entries = (json.loads(line) for line in lines if line.strip())
    return [(entry["current_steps"], entry["loss"]) for entry in entries if "loss" in entry]


def collect(demo_dir: Path) -> dict:
    """The figures of the report: per model, answer accuracy per split, region accuracy, action counts."""
    summary = read_json(demo_dir / "evaluation" / "summary.json")
    usage = read_json(demo_dir / "evaluation" / "action_usage.json")
    for name in (BEFORE, AFTER):
        if name not in summary["models"]:
            raise SystemExit(f"demo report: model {name!r} missing from {demo_dir / 'evaluation' / 'summary.json'}")
    figures: dict = {"datasets": summary["datasets"], "models": {}}
    for name in (BEFORE, AFTER):
        model_usage = usage[name]
        region = model_usage.get(REGION_SPLIT)
        region_accuracy = None
        if region is not None and region["answered"]:
            hits = region["region_accuracy"]["correct"] if region["region_accuracy"] else 0
            region_accuracy = hits / region["answered"]
        figures["models"][name] = {
            "answer_accuracy": summary["models"][name]["scores"],
            "average": summary["models"][name]["average"],
            "region_accuracy": region_accuracy,
            "actions": {dataset: entry["actions"] for dataset, entry in model_usage.items()},
        }
    figures["losses"] = {stage: read_losses(demo_dir / "runs" / stage) for stage in STAGES}
    return figures


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.1%}"


def markdown(figures: dict) -> str:
    before, after = (figures["models"][name] for name in (BEFORE, AFTER))
    rows = [(f"answer accuracy, {d}", before["answer_accuracy"][d], after["answer_accuracy"][d]) for d in figures["datasets"]]
    rows.append(("answer accuracy, mean", before["average"], after["average"]))
    rows.append((f"region-token accuracy, {REGION_SPLIT}", before["region_accuracy"], after["region_accuracy"]))
    lines = ["| figure | before training | after training |", "|---|---:|---:|"]
    lines += [f"| {label} | {_fmt(b)} | {_fmt(a)} |" for label, b, a in rows]

    kinds = ("region", "dino", "sam", "clip", "none", "other")
    usage = ["| model | dataset | " + " | ".join(kinds) + " |", "|---|---|" + "---:|" * len(kinds)]
    for name in (BEFORE, AFTER):
        for dataset, counts in figures["models"][name]["actions"].items():
            usage.append(f"| {name} | {dataset} | " + " | ".join(str(counts.get(k, 0)) for k in kinds) + " |")

    losses = []
    for stage in STAGES:
        points = figures["losses"][stage]
        if points:
            losses.append(f"{stage}: loss {points[0][1]:.3f} (step {points[0][0]}) -> {points[-1][1]:.3f} (step {points[-1][0]})")
    return (
        "## VPT demo: before and after training\n\n"
        + "\n".join(lines)
        + "\n\nRegion-token accuracy: share of region-test records whose region span covers the target's cells "
        "(no span = miss).\n\n## Perception actions taken in round 1\n\n"
        + "\n".join(usage)
        + "\n\n## Training\n\n"
        + "\n".join(f"- {line}" for line in losses)
        + "\n"
    )


def loss_chart(figures: dict, path: Path) -> None:
    figure = Figure(figsize=(9, 3.8), layout="constrained")
    FigureCanvasAgg(figure)
    for axes, stage in zip(figure.subplots(1, len(STAGES)), STAGES):
        points = figures["losses"][stage]
        axes.plot([s for s, _ in points], [v for _, v in points], marker=".")
        axes.set_title(f"{stage} stage")
        axes.set_xlabel("step")
        axes.set_ylabel("training loss")
        axes.grid(alpha=0.3)
    write_atomic(path, lambda file: figure.savefig(file, format="png", dpi=100))


def score_chart(figures: dict, path: Path) -> None:
    labels = [*figures["datasets"], "region tokens"]
    figure = Figure(figsize=(max(6.0, 1.6 * len(labels)), 4.0), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    for k, name in enumerate((BEFORE, AFTER)):
        model = figures["models"][name]
        values = [model["answer_accuracy"][d] for d in figures["datasets"]] + [model["region_accuracy"]]
        axes.bar([i + (k - 0.5) * 0.4 for i in range(len(labels))], [v or 0.0 for v in values], 0.4,
                 label=f"{name} training")
    axes.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
    axes.set_ylim(0, 1)
    axes.set_ylabel("accuracy")
    axes.set_title("VPT demo: answer and region-token accuracy")
    axes.legend()
    write_atomic(path, lambda file: figure.savefig(file, format="png", dpi=100))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-dir", type=Path, default=Path("outputs/demo"), help="the demo's output folder")
    args = parser.parse_args(argv)
    figures = collect(args.demo_dir)
    text = markdown(figures)
    write_text(args.demo_dir / "report.md", text)
    write_json(args.demo_dir / "report.json", figures)
    loss_chart(figures, args.demo_dir / "loss.png")
    score_chart(figures, args.demo_dir / "scores.png")
    print(text)
    print(f"Written: {', '.join(str(args.demo_dir / n) for n in ('report.md', 'report.json', 'loss.png', 'scores.png'))}")


if __name__ == "__main__":
    main()
