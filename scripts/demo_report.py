#!/usr/bin/env python
"""Summarise the demo: VPT against the baseline and the oracle per test split, examples, loss curves, a chart.

Reads what `scripts/demo.sh` produced under ``--demo-dir``: the evaluation of the VPT model (two rounds) and of the
baseline (the same tiny model trained to answer directly, one round) in ``evaluation/``, the oracle evaluation (the
VPT model's round 2 on each record's ground-truth region or action) in ``evaluation-oracle/``, and the LLaMA-Factory
runs' ``trainer_log.jsonl``. Writes into it:

* ``report.json``: ``duration_s`` and, per test split under ``splits``, ``baseline_accuracy``, ``vpt_accuracy``,
  ``oracle_accuracy`` (splits whose records hold a ground-truth round 1, else null) and ``region_accuracy`` (the
  region split, else null), all fractions in [0, 1]; also the perception actions taken and the loss curves;
* ``report.md``: the same as tables, and in words what the tiny model learnt and did not (`findings`);
* ``examples.png``: test boards with the region the VPT model selected, its crop, the question, the VPT answer and
  the baseline answer;
* ``loss.png``: training loss of the alignment, instruction and baseline runs;
* ``scores.png``: baseline / VPT / oracle bars per split, and region-token accuracy.

The report is also printed. Region-token accuracy counts every region-test record: an answer without a valid region
span counts as a miss (the evaluation's own table counts region answers only).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from transformers_vpt.files import write_atomic, write_json, write_text

STAGES = ("alignment", "instruction", "baseline")
VPT, BASELINE = "vpt", "baseline"
REGION_SPLIT = "synthetic_region_test"
FIGURES = ("baseline_accuracy", "vpt_accuracy", "oracle_accuracy", "region_accuracy")
EXAMPLES = 8


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


def _scores(evaluation_dir: Path, models: tuple[str, ...]) -> tuple[dict, dict]:
    """The evaluation's summary scores and action usage, checked to hold ``models``."""
    summary = read_json(evaluation_dir / "summary.json")
    usage = read_json(evaluation_dir / "action_usage.json")
    for name in models:
        if name not in summary["models"]:
            raise SystemExit(f"demo report: model {name!r} missing from {evaluation_dir / 'summary.json'}")
    return summary, usage


def _region_accuracy(entry: dict | None) -> float | None:
    """Hits over every answered region-test record (no region span: a miss)."""
    if entry is None or not entry["answered"]:
        return None
    hits = entry["region_accuracy"]["correct"] if entry["region_accuracy"] else 0
    return hits / entry["answered"]


def collect(demo_dir: Path, duration_s: float | None) -> dict:
    """The figures of the report (see the module docstring)."""
    summary, usage = _scores(demo_dir / "evaluation", (VPT, BASELINE))
    oracle, _ = _scores(demo_dir / "evaluation-oracle", (VPT,))
    oracle_scores = oracle["models"][VPT]["scores"]
    splits = {}
    for dataset in summary["datasets"]:
        splits[dataset] = {
            "baseline_accuracy": summary["models"][BASELINE]["scores"].get(dataset),
            "vpt_accuracy": summary["models"][VPT]["scores"].get(dataset),
            "oracle_accuracy": oracle_scores.get(dataset),
            "region_accuracy": _region_accuracy(usage[VPT].get(dataset)) if dataset == REGION_SPLIT else None,
        }
    answers = read_json(demo_dir / "data" / "synthetic_meta.json")["answers"]
    return {
        "duration_s": duration_s,
        "chance": 1 / max(len(words) for words in answers.values()),
        "splits": splits,
        "actions": {name: {d: entry["actions"] for d, entry in usage[name].items()} for name in (VPT, BASELINE)},
        "losses": {stage: read_losses(demo_dir / "runs" / stage) for stage in STAGES},
    }


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.1%}"


def findings(figures: dict) -> list[str]:
    """What the figures show, in words: localisation, reading the crop, the gain over the baseline, re-encoding."""
    chance = figures["chance"]
    region = figures["splits"].get(REGION_SPLIT)
    lines = []
    if region is None:
        return ["No region split was evaluated."]
    hits, oracle = region["region_accuracy"], region["oracle_accuracy"]
    vpt, base = region["vpt_accuracy"], region["baseline_accuracy"]
    if hits is not None:
        lines.append(
            f"Localisation: the selected cells contain the target in {hits:.0%} of the region-test records"
            + (" (learnt)." if hits >= 0.7 else " (not learnt in this budget).")
        )
    if oracle is not None:
        read = oracle >= chance + 0.3
        lines.append(
            f"Reading the crop: given the ground-truth crop, the model answers {oracle:.0%} (chance {chance:.0%}); "
            + ("it reads the pattern from the crop." if read else "it does not read the pattern from the crop in this "
               "budget, so a correct region cannot turn into a correct answer.")
        )
    if vpt is not None and base is not None:
        gain = vpt - base  # fractions
        lines.append(
            f"VPT against the baseline on the detail question: {vpt:.0%} against {base:.0%} ({gain * 100:+.0f} "
            "points); the baseline answers from round 1's downscaled view only, where the pattern does not show."
        )
    plain = figures["splits"].get("synthetic_plain_test", {}).get("vpt_accuracy")
    if plain is not None:
        lines.append(
            f"Without a region (the plain split) the VPT model answers {plain:.0%}: "
            + ("about chance, as the global view holds no trace of the pattern." if plain < chance + 0.15 else
               "above chance, so the global view gives some of the pattern away.")
        )
    action = figures["splits"].get("synthetic_action_test", {}).get("vpt_accuracy")
    if action is not None:
        lines.append(
            f"Re-encoding (the action split, {action:.0%}) "
            + ("does not help on this task: the branches see the board downscaled (CLIP at round 1's size, DINOv2 "
               "and SAM at their tiny input sizes), so the pattern is not in their features either; the row shows "
               "that those paths run, not that they answer better." if action < chance + 0.15
               else "answers above chance on this task.")
        )
    return lines


def markdown(figures: dict) -> str:
    lines = [
        "| test split | baseline (one round) | VPT (two rounds) | oracle (ground-truth round 1) "
        "| region-token accuracy |",
        "|---|---:|---:|---:|---:|",
    ]
    for dataset, row in figures["splits"].items():
        lines.append(f"| {dataset} | " + " | ".join(_fmt(row[key]) for key in FIGURES) + " |")

    kinds = ("region", "dino", "sam", "clip", "none", "other")
    usage = ["| model | dataset | " + " | ".join(kinds) + " |", "|---|---|" + "---:|" * len(kinds)]
    for name, per_dataset in figures["actions"].items():
        for dataset, counts in per_dataset.items():
            usage.append(f"| {name} | {dataset} | " + " | ".join(str(counts.get(k, 0)) for k in kinds) + " |")

    losses = []
    for stage in STAGES:
        points = figures["losses"][stage]
        if points:
            (first_step, first), (last_step, last) = points[0], points[-1]
            losses.append(f"{stage}: loss {first:.3f} (step {first_step}) -> {last:.3f} (step {last_step})")
    duration = figures["duration_s"]
    took = f"\n\nThe demo took {duration / 60:.1f} min ({duration:.0f} s) on this machine." if duration else ""
    return (
        "## VPT demo: a fine detail, with and without perception tokens\n\n"
        + "\n".join(lines)
        + "\n\nAnswer accuracy per test split (the same test questions in every split: with the region trigger, the "
        "re-encoding trigger, or none). The baseline is the same tiny model trained on the same images and questions "
        "for the same steps to answer directly; it gets every split without its trigger. Region-token accuracy: share "
        "of region-test records whose selected cells contain the target (no span = miss)."
        + took
        + "\n\n## What the tiny model does and does not learn\n\n"
        + "\n".join(f"- {line}" for line in findings(figures))
        + "\n\n## Perception actions taken in round 1\n\n"
        + "\n".join(usage)
        + "\n\n## Training\n\n"
        + "\n".join(f"- {line}" for line in losses)
        + "\n"
    )


def _save(figure: Figure, path: Path) -> None:
    write_atomic(path, lambda file: figure.savefig(file, format="png", dpi=100))


def loss_chart(figures: dict, path: Path) -> None:
    figure = Figure(figsize=(12, 3.8), layout="constrained")
    FigureCanvasAgg(figure)
    for axes, stage in zip(figure.subplots(1, len(STAGES)), STAGES):
        points = figures["losses"][stage]
        axes.plot([s for s, _ in points], [v for _, v in points], marker=".")
        axes.set_title(f"{stage} run")
        axes.set_xlabel("step")
        axes.set_ylabel("training loss")
        axes.grid(alpha=0.3)
    _save(figure, path)


def score_chart(figures: dict, path: Path) -> None:
    datasets = list(figures["splits"])
    labels = [*datasets, "region tokens"]
    figure = Figure(figsize=(max(6.0, 1.8 * len(labels)), 4.0), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    bars = (("baseline_accuracy", "baseline"), ("vpt_accuracy", "VPT"), ("oracle_accuracy", "oracle"))
    for k, (key, name) in enumerate(bars):
        values = [figures["splits"][d][key] for d in datasets] + [None]
        axes.bar([i + (k - 1) * 0.27 for i in range(len(labels))], [v or 0.0 for v in values], 0.27, label=name)
    region = figures["splits"].get(REGION_SPLIT, {}).get("region_accuracy")
    axes.bar([len(labels) - 1], [region or 0.0], 0.27, color="gray", label="region-token accuracy (VPT)")
    axes.set_xticks(range(len(labels)), labels, rotation=15, ha="right", fontsize=8)
    axes.set_ylim(0, 1)
    axes.set_ylabel("accuracy")
    axes.set_title("VPT demo: answer accuracy per test split, region-token accuracy")
    axes.legend(fontsize=8)
    _save(figure, path)


def _answers(path: Path) -> dict[int, dict]:
    return {row["index"]: row for row in read_json(path)} if path.is_file() else {}


def _shown(answer: str, width: int = 24) -> str:
    """An answer as a caption shows it: printable characters only, at most ``width`` of them."""
    text = "".join(c if c.isprintable() else "?" for c in answer)
    return text if len(text) <= width else text[: width - 1] + "…"


def examples_chart(demo_dir: Path, path: Path, count: int = EXAMPLES) -> bool:
    """A grid of region-test boards: the selected box (green) and the target (dashed), the crop round 2 saw, the
    question and both answers. False (nothing written) when there is no answered record to show."""
    vpt = _answers(demo_dir / "evaluation" / VPT / REGION_SPLIT / "final_answers.json")
    baseline = _answers(demo_dir / "evaluation" / BASELINE / REGION_SPLIT / "final_answers.json")
    meta = read_json(demo_dir / "data" / "synthetic_meta.json")["targets"]
    rows = [vpt[i] for i in sorted(vpt)[:count]]
    if not rows:
        return False
    columns = 4
    lines = (len(rows) + columns - 1) // columns
    figure = Figure(figsize=(3.2 * columns, 4.3 * lines), layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(2 * lines, 2 * columns, height_ratios=[3, 1.3] * lines)
    for n, row in enumerate(rows):
        line, column = divmod(n, columns)
        image = Image.open(demo_dir / "data" / row["image"]).convert("RGB")
        board = figure.add_subplot(grid[2 * line, 2 * column])
        board.imshow(image)
        target = meta.get(row["image"], {})
        if box := target.get("box"):
            board.add_patch(Rectangle(box[:2], box[2] - box[0], box[3] - box[1], fill=False, ls="--", ec="black"))
        for x0, y0, x1, y1 in row.get("boxes") or []:
            board.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=2, ec="limegreen"))
        crop = figure.add_subplot(grid[2 * line, 2 * column + 1])
        if row.get("boxes"):
            crop.imshow(image.crop(tuple(row["boxes"][0])))
            crop.set_title("crop (round 2)", fontsize=8)
        else:
            crop.text(0.5, 0.5, f"no region\n({row['action']})", ha="center", va="center", fontsize=8)
        for axes in (board, crop):
            axes.set_box_aspect(1)
            axes.set_xticks([])
            axes.set_yticks([])
        caption = figure.add_subplot(grid[2 * line + 1, 2 * column : 2 * column + 2])
        caption.axis("off")
        question = row["question"].replace("<image>", "").split("\n")[1].strip()
        truth, answer = row["ground_truth"], row["answer"].strip()
        base = baseline.get(row["index"], {}).get("answer", "—").strip()
        mark = {True: "✓", False: "✗"}
        caption.text(
            0, 1,
            f"{question}\ntruth: {truth}\nVPT: {_shown(answer)} {mark[answer == truth]}\n"
            f"baseline: {_shown(base)} {mark[base == truth]}",
            va="top", fontsize=8, family="monospace",
        )
    figure.suptitle("VPT demo: the region the VPT model selected (green; target dashed), its crop, and both answers")
    _save(figure, path)
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-dir", type=Path, default=Path("outputs/demo"), help="the demo's output folder")
    parser.add_argument(
        "--duration-s", type=float, metavar="S", help="how long the demo took, in seconds (demo.sh measures it)"
    )
    args = parser.parse_args(argv)
    figures = collect(args.demo_dir, args.duration_s)
    text = markdown(figures)
    written = ["report.md", "report.json", "loss.png", "scores.png"]
    if examples_chart(args.demo_dir, args.demo_dir / "examples.png"):
        written.append("examples.png")
        text += "\n![examples](examples.png)\n"
    write_text(args.demo_dir / "report.md", text)
    write_json(args.demo_dir / "report.json", figures)
    loss_chart(figures, args.demo_dir / "loss.png")
    score_chart(figures, args.demo_dir / "scores.png")
    print(text)
    print(f"Written: {', '.join(str(args.demo_dir / n) for n in written)}")


if __name__ == "__main__":
    main()
