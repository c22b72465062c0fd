"""Scores of one (model, dataset): judge-free metrics, the LLM judge, action usage and region-token accuracy."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from transformers_vpt.regions import parse_regions

from .judge import JudgeClient, JudgeResult
from .metrics import metric_family, score_dataset, score_items

logger = logging.getLogger(__name__)

PRIMARY_METRIC = {"vqa": "vqa_accuracy", "anls": "anls", "pope": "accuracy", "caption": "cider", "free_form": "rouge_l"}
"""The main judge-free metric of each family, shown in the summary table when there is no judge."""

JUDGE = "judge"

# How each protocol (`transformers_vpt.pipeline.PROTOCOLS`) reads region indices past the grid.
_OUT_OF_RANGE = {"project": "clamp", "released": "reject"}


def family_of(dataset: str) -> str | None:
    """The dataset's metric family, or None for a name metrics.py does not know (no judge-free metric)."""
    try:
        return metric_family(dataset)
    except ValueError:
        return None


def region_hit(round1_text: str, target_cells: Sequence[int], protocol: str = "project") -> bool:
    """Whether a selected region's cell box (before the crop margin) contains the target's (x0, y0, x1, y1) cells.

    The regions are read as ``protocol`` routed them: clamped out-of-range indices (``project``) or spans with
    them left out (``released``)."""
    tx0, ty0, tx1, ty1 = target_cells
    if protocol not in _OUT_OF_RANGE:
        raise ValueError(f"protocol must be one of {list(_OUT_OF_RANGE)}, got {protocol!r}")
    out_of_range = _OUT_OF_RANGE[protocol]
    return any(
        x0 <= tx0 and y0 <= ty0 and tx1 <= x1 and ty1 <= y1
        for x0, y0, x1, y1 in (region.bounds for region in parse_regions(round1_text, out_of_range=out_of_range))
    )


def judge_summary(judge: JudgeClient, results: Sequence[JudgeResult], desc: str = "judge") -> dict[str, Any]:
    """The judge part of a dataset summary: mean over the scored answers; unscored and failed ones are counted."""
    scores = [result.score for result in results if not result.failed and result.score is not None]
    unscored = sum(result.unscored for result in results)
    failed = sum(result.failed for result in results)
    if failed:
        logger.warning("%s: the judge failed on %d answers (left out; a rerun retries them)", desc, failed)
    if unscored:
        logger.warning(
            "%s: %d judge replies hold no score in [0, 1] (unscored, left out of the mean; see judge_reply in "
            "final_answers.json)",
            desc,
            unscored,
        )
    return {
        "model": judge.model,
        "score_rule": judge.score_rule,
        "score": sum(scores) / len(scores) if scores else None,
        "judged": len(scores),
        "unscored": unscored,
        "failed": failed,
    }


def score(
    dataset: str,
    rows: list[dict[str, Any]],
    judge: JudgeClient | None = None,
    targets: Mapping[str, Mapping[str, Any]] | None = None,
    desc: str = "judge",
    protocol: str = "project",
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Score answered ``rows`` (dicts with question, ground_truth, answer, round1_text, action, image).

    Returns the rows with their ``"scores"`` added, and the dataset summary: ``answered``, ``family``, ``metrics``
    (judge-free aggregates), ``judge`` (`judge_summary`: the mean over the scored answers, the score rule, counts of
    scored, unscored and failed answers), ``main`` (``{"metric", "value"}``: the judge when one is used, else the
    family's primary metric), ``actions`` (counts) and ``region_accuracy`` (over region answers whose image has a
    target in ``targets``; its regions read as ``protocol`` routed them, `region_hit`). A row's ``scores["judge"]``
    is None when its answer is unscored or the judge failed; ``judge_error`` then says why. Rows the released
    protocol dropped are not given here (the evaluation leaves them out and lists them as problems).
    """
    family = family_of(dataset)
    predictions = [row["answer"] for row in rows]
    references = [row["ground_truth"] for row in rows]
    per_item = score_items(dataset, predictions, references) if family and rows else [{} for _ in rows]
    scored = [{**row, "scores": dict(values)} for row, values in zip(rows, per_item)]
    summary: dict[str, Any] = {
        "answered": len(rows),
        "family": family,
        "metrics": score_dataset(dataset, predictions, references) if family else {},
        "judge": None,
        "actions": dict(Counter(row["action"] for row in rows)),
        "region_accuracy": None,
    }

    if judge is not None:
        results = judge.score_many([(r["question"], r["ground_truth"], r["answer"]) for r in rows], desc=desc)
        for row, result in zip(scored, results):
            row["scores"][JUDGE] = None if result.failed else result.score
            row["judge_reply"] = result.reply
            if result.error is not None:
                row["judge_error"] = result.error
        summary["judge"] = judge_summary(judge, results, desc)
        summary["main"] = {"metric": JUDGE, "value": summary["judge"]["score"]}
    elif family:
        metric = PRIMARY_METRIC[family]
        summary["main"] = {"metric": metric, "value": summary["metrics"].get(metric)}
    else:
        summary["main"] = {"metric": None, "value": None}

    if targets:
        hits = []
        for row in scored:
            if row["action"] == "region" and row["image"] in targets:
                row["scores"]["region_hit"] = hit = region_hit(
                    row["round1_text"], targets[row["image"]]["cells"], protocol
                )
                hits.append(hit)
        summary["region_accuracy"] = {
            "correct": sum(hits),
            "total": len(hits),
            "accuracy": sum(hits) / len(hits) if hits else None,
        }
    return scored, summary
