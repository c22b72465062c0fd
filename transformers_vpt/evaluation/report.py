"""Run-level reports: the summary table (Markdown, CSV, JSON), a bar chart, and the action-usage breakdown."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from transformers_vpt.files import write_atomic, write_json, write_text

from .scoring import JUDGE, PRIMARY_METRIC

# results[model][dataset] is a dataset summary of `scoring.score`; models[model] is {"kind", "path"}.
Results = Mapping[str, Mapping[str, Mapping[str, Any]]]
ACTION_COLUMNS = ("region", "dino", "sam", "clip", "none")
OTHER_ACTIONS = "other"  # conflicting kinds, or a branch the model lacks ("unsupported:<kind>")


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _label(name: str, info: Mapping[str, Any]) -> str:
    return f"{name} (baseline)" if info["kind"] == "baseline" else name


def summary_table(results: Results, models: Mapping[str, Mapping[str, Any]], datasets: Sequence[str]) -> dict:
    """Main score per model and dataset, the metric behind each column, and each model's average.

    ``results[model][dataset]`` is a summary of `scoring.score` for every model and dataset.
    """
    any_model = next(iter(results.values()))  # the metric of a column depends on the dataset and the judge only
    metrics = {dataset: any_model[dataset]["main"]["metric"] for dataset in datasets}
    rows = {}
    for name, info in models.items():
        scores = {dataset: results[name][dataset]["main"]["value"] for dataset in datasets}
        rows[name] = {
            **info,
            "scores": scores,
            "answered": {dataset: results[name][dataset]["answered"] for dataset in datasets},
            "average": _mean(list(scores.values())),
            "averaged_over": sum(v is not None for v in scores.values()),
            "unscored": {dataset: _unscored(results[name][dataset]) for dataset in datasets},
        }
    return {"datasets": list(datasets), "metrics": metrics, "models": rows}


def _unscored(summary: Mapping[str, Any]) -> int | None:
    """Judge replies without a valid score (left out of the judge mean); None when there was no judge."""
    judge = summary.get("judge")
    return None if judge is None else judge.get("unscored", 0)


def _judged(table: dict) -> bool:
    return JUDGE in table["metrics"].values()


def summary_markdown(table: dict) -> str:
    datasets = table["datasets"]
    lines = [
        "| model | " + " | ".join(datasets) + " | Avg |",
        "|---|" + "---:|" * (len(datasets) + 1),
        "| *metric* | " + " | ".join(table["metrics"][d] or "—" for d in datasets) + " | |",
    ]
    for name, row in table["models"].items():
        cells = [_fmt(row["scores"][d]) for d in datasets] + [_fmt(row["average"])]
        lines.append(f"| {_label(name, row)} | " + " | ".join(cells) + " |")
    judged = (
        "`judge` = LLM-judge score in [0, 1], mean over the answers with a valid score (see the unscored table "
        "below); otherwise "
        if _judged(table)
        else ""
    )
    families = ", ".join(f"{family}: `{metric}`" for family, metric in PRIMARY_METRIC.items())
    legend = (
        f"Main score per dataset (the *metric* row): {judged}the dataset's judge-free metric ({families}; `cider` is "
        "CIDEr-D on the COCO scale). — = no score (a dataset without a judge-free metric and no judge, or nothing "
        "answered). Avg = mean over the row's scores."
    )
    text = "\n".join(lines) + "\n\n" + legend + "\n"
    return text + unscored_markdown(table) if _judged(table) else text


def unscored_markdown(table: dict) -> str:
    """Per model and dataset, the judge replies without a valid score in [0, 1] (not part of the judge mean)."""
    datasets = table["datasets"]
    lines = ["| unscored | " + " | ".join(datasets) + " | total |", "|---|" + "---:|" * (len(datasets) + 1)]
    for name, row in table["models"].items():
        counts = [row["unscored"][d] for d in datasets]
        cells = ["—" if c is None else str(c) for c in counts] + [str(sum(c or 0 for c in counts))]
        lines.append(f"| {_label(name, row)} | " + " | ".join(cells) + " |")
    legend = (
        "Unscored = judge replies without a score in [0, 1], even when asked twice (`--judge-score-rule strict`); "
        "they are left out of the judge mean. Their replies are in `<model>/<dataset>/final_answers.json`."
    )
    return "\n" + "\n".join(lines) + "\n\n" + legend + "\n"


def summary_csv(table: dict) -> str:
    """The summary table as CSV; with a judge, one ``unscored <dataset>`` column per dataset and their total."""
    datasets = table["datasets"]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    judged = _judged(table)
    unscored_columns = [f"unscored {d}" for d in datasets] + ["unscored"] if judged else []
    writer.writerow(["model", "kind", *datasets, "average", *unscored_columns])
    writer.writerow(["metric", "", *(table["metrics"][d] or "" for d in datasets), "", *([""] * len(unscored_columns))])
    for name, row in table["models"].items():
        values = [row["scores"][d] for d in datasets] + [row["average"]]
        cells = [name, row["kind"], *("" if v is None else f"{v:.6f}" for v in values)]
        if judged:
            counts = [row["unscored"][d] for d in datasets]
            cells += ["" if c is None else str(c) for c in counts] + [str(sum(c or 0 for c in counts))]
        writer.writerow(cells)
    return out.getvalue()


def summary_chart(table: dict, path: Path) -> None:
    """Grouped bars: one group per dataset (and the average), one bar per model."""
    datasets = table["datasets"]
    groups = [*datasets, "Avg"]
    rows = table["models"]
    width = 0.8 / max(len(rows), 1)
    figure = Figure(figsize=(max(6.0, len(groups) * (0.4 + 0.25 * len(rows))), 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    for k, (name, row) in enumerate(rows.items()):
        values = [row["scores"][d] for d in datasets] + [row["average"]]
        positions = [g + (k - (len(rows) - 1) / 2) * width for g in range(len(groups))]
        axes.bar(positions, [0.0 if v is None else v for v in values], width, label=_label(name, row))
    axes.set_xticks(range(len(groups)), groups, rotation=40, ha="right", fontsize=8)
    used = sorted({m for m in table["metrics"].values() if m})
    axes.set_ylabel("main score (" + ", ".join(used) + ")" if used else "main score")
    axes.set_ylim(bottom=0)  # scores are non-negative; an all-zero row must not centre the axis on 0
    axes.set_title("VPT evaluation: main score per dataset")
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    write_atomic(path, lambda file: figure.savefig(file, format="png", dpi=100))


def action_usage(results: Results) -> dict:
    """Per model and dataset: answers, counts per action column (plus ``other``), and region-token accuracy."""
    usage: dict[str, dict[str, Any]] = {}
    for name, per_dataset in results.items():
        usage[name] = {}
        for dataset, summary in per_dataset.items():
            counts = {column: summary["actions"].get(column, 0) for column in ACTION_COLUMNS}
            counts[OTHER_ACTIONS] = summary["answered"] - sum(counts.values())
            usage[name][dataset] = {
                "answered": summary["answered"],
                "actions": counts,
                "region_accuracy": summary["region_accuracy"],
            }
    return usage


def action_usage_markdown(usage: dict) -> str:
    columns = (*ACTION_COLUMNS, OTHER_ACTIONS)
    lines = [
        "| model | dataset | answered | " + " | ".join(columns) + " | region acc. |",
        "|---|---|" + "---:|" * (len(columns) + 2),
    ]
    for name, per_dataset in usage.items():
        for dataset, entry in per_dataset.items():
            answered = entry["answered"]
            cells = [
                f"{entry['actions'][c]} ({entry['actions'][c] / answered:.0%})" if answered else "0" for c in columns
            ]
            accuracy = entry["region_accuracy"]
            if accuracy and accuracy["total"]:
                region = f"{accuracy['correct']}/{accuracy['total']} ({accuracy['accuracy']:.0%})"
            else:
                region = "—"
            lines.append(f"| {name} | {dataset} | {answered} | " + " | ".join(cells) + f" | {region} |")
    legend = (
        "Actions taken in round 1: region = region tokens (crops in round 2); dino / sam / clip = re-encoding with "
        "that branch; none = no perception token (the round-1 text is the answer; always so for a baseline); "
        "other = several kinds at once or a branch the model lacks. Region acc. = share of region answers whose "
        "selected cell box (before the crop margin) contains the target cells (datasets with a region meta file)."
    )
    return "\n".join(lines) + "\n\n" + legend + "\n"


def write_reports(
    out_dir: Path, results: Results, models: Mapping[str, Mapping[str, Any]], datasets: Sequence[str]
) -> str:
    """Write summary.{md,csv,json,png} and action_usage.{md,json} into ``out_dir``; return both Markdown texts."""
    table = summary_table(results, models, datasets)
    usage = action_usage(results)
    markdown = summary_markdown(table)
    usage_markdown = action_usage_markdown(usage)
    write_text(out_dir / "summary.md", markdown)
    write_text(out_dir / "summary.csv", summary_csv(table))
    write_json(out_dir / "summary.json", table)
    summary_chart(table, out_dir / "summary.png")
    write_text(out_dir / "action_usage.md", usage_markdown)
    write_json(out_dir / "action_usage.json", usage)
    return f"## Summary\n\n{markdown}\n## Action usage\n\n{usage_markdown}"
