"""The evaluation driver on tiny CPU models: every released split kind and route, the Qwen2-VL baseline, Qwen2.5-VL
and Qwen3-VL VPT and baseline models, broken records, resume after a kill, the LLM judge on a local server,
region-token accuracy, the reports and the CLI."""

from __future__ import annotations

import ast
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from utils import (
    ROOT,
    SPAN_A,
    SYSTEM,
    FakeOpenAI,
    action_record,
    draw,
    eval_config,
    load,
    read_jsonl,
    record,
    region_record,
    scripted,
)

from transformers_vpt.evaluation import evaluation as ev
from transformers_vpt.evaluation.datasets import RELEASED_TEST_SETS, prompt_for_mode
from transformers_vpt.evaluation.metrics import score_dataset
from transformers_vpt.evaluation.scoring import PRIMARY_METRIC, family_of
from transformers_vpt.evaluation.storage import AnswerLog
from transformers_vpt.pipeline import VPTPipeline
from transformers_vpt.regions import box_to_region_text
from transformers_vpt.tiny import synthetic as synth
from transformers_vpt.tiny.assemble import build_tiny_base, build_tiny_qwen2_vl, build_tiny_vpt
from transformers_vpt.vocabulary import BRANCH_TOKENS, REENCODE_TRIGGER, REGION_TRIGGER

DET, SEG, CLIP = BRANCH_TOKENS["dino"], BRANCH_TOKENS["sam"], BRANCH_TOKENS["clip"]
# Round-1 text per route and the action it must give; "none" answers the reference itself.
ROUTES = {
    "region": (SPAN_A, "region"),
    "two regions": (box_to_region_text((0, 0, 0, 0)) + " and " + box_to_region_text((6, 6, 7, 7)), "region"),
    "dino": (DET.action_triple, "dino"),
    "sam": (SEG.action_triple, "sam"),
    "clip": (CLIP.action_triple, "clip"),
    "none": (None, "none"),
    "conflict": (SPAN_A + DET.action_triple, "conflict"),
}
GOOD_RECORDS = {name: 5 if name.startswith("POPE") else 2 for name in RELEASED_TEST_SETS}
BROKEN = {  # appended to GQA_region_test: record -> the problem reported
    "missing image": "missing image file",
    "two images": "2 <image> placeholders",
    "no answer": "no assistant turn",
    "corrupt image": "cannot read image",
}


def reference(dataset: str, k: int) -> str:
    if dataset.startswith("POPE"):
        return ("Yes", "No")[k % 2]
    if dataset.startswith(("TextCap", "Flickr30k", "LLaVA")):
        return f"A red square, {k}."
    return ("Now answer the question.\n" if k % 3 == 0 else "") + f"red {k}"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The twelve released split names, in the released record format, with scripted round-1 outputs.

    Returns (data dir, {question key: round-1 script}, {(dataset, index): (route, reference)}).
    """
    root = tmp_path_factory.mktemp("data")
    (root / "images").mkdir()
    scripts, expected, k = {}, {}, 0
    for dataset in RELEASED_TEST_SETS:
        records = []
        for i in range(GOOD_RECORDS[dataset]):
            key, answer, image = f"[q{k:02d}]", reference(dataset, k), f"images/{dataset}_{i}.png"
            draw(root / image, k)
            route = list(ROUTES)[k % len(ROUTES)]
            text, _ = ROUTES[route]
            scripts[key] = text or answer.removeprefix("Now answer the question.\n")
            question = f"What is in {key}?"
            records.append((region_record if "_region_" in dataset else action_record)(question, answer, image))
            expected[dataset, i] = route, answer.removeprefix("Now answer the question.\n")
            k += 1
        if dataset == "GQA_region_test":
            (root / "images/corrupt.png").write_bytes(b"not a png")
            records += [
                region_record("Where [b0]?", "x", "images/nope.png"),
                record(["<image>\n<image>\nWhere [b1]?", "x"], ["images/GQA_region_test_0.png"] * 2),
                record(["<image>\nWhere [b2]?"], ["images/GQA_region_test_0.png"]),
                region_record("Where [b3]?", "x", "images/corrupt.png"),
            ]
        (root / f"{dataset}.json").write_text(json.dumps(records, indent=1))
    return root, scripts, expected


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Directories of a tiny VPT model (all branches) and a tiny plain Qwen2-VL, with their processors."""
    root = tmp_path_factory.mktemp("models")
    _, vpt_processor = build_tiny_vpt(save_dir=root / "vpt")
    _, processor = build_tiny_qwen2_vl(save_dir=root / "qwen2vl")
    return {"vpt": (root / "vpt", vpt_processor), "qwen2vl": (root / "qwen2vl", processor)}


def baseline_overrides(models, data) -> dict:
    """The baseline answers every question with its reference."""
    _, _, expected = data
    answers = {f"[q{k:02d}]": answer for k, (_, answer) in enumerate(expected.values())}
    return scripted(models["qwen2vl"][1], answers)


@pytest.fixture(scope="module")
def vpt_run(tmp_path_factory, data, models):
    """A greedy evaluation of the VPT model on every split; returns the output dir and the returned summaries."""
    data_dir, scripts, _ = data
    out = tmp_path_factory.mktemp("vpt_run")
    model_dir, processor = models["vpt"]
    results, _ = ev.evaluate(eval_config(data_dir, out, model_dir), scripted(processor, scripts))
    return out, results


def test_every_split_and_route(vpt_run, data):
    out, results = vpt_run
    _, _, expected = data
    assert list(results["vpt"]) == list(RELEASED_TEST_SETS)
    seen_routes = set()
    for dataset in RELEASED_TEST_SETS:
        folder = out / "vpt" / dataset
        answers = read_jsonl(folder / "answers.jsonl")
        final = load(folder / "final_answers.json")
        assert [a["index"] for a in answers] == [f["index"] for f in final] == list(range(GOOD_RECORDS[dataset]))
        for answer, row in zip(answers, final):
            route, truth = expected[dataset, answer["index"]]
            script, action = ROUTES[route]
            seen_routes.add(route)
            assert answer["action"] == row["action"] == action
            assert answer["round1_text"] == (script or truth)
            assert row["ground_truth"] == truth and row["answer"] == answer["answer"]
            assert row["question"] == answer["prompt"]  # --mode keep: the record's first turn, trigger included
            if action in ("region", "dino", "sam", "clip"):  # round 2 ran
                assert answer["round2_prompt"].count("<|im_start|>user") == 2
                assert len(answer["boxes"]) == (2 if route == "two regions" else int(action == "region"))
            else:
                assert answer["round2_prompt"] is None and answer["answer"] == answer["round1_text"].strip()
        summary = load(folder / "scores.json")
        assert summary == results["vpt"][dataset]
        family = family_of(dataset)
        assert summary["metrics"] == pytest.approx(
            score_dataset(dataset, [r["answer"] for r in final], [r["ground_truth"] for r in final])
        )
        assert summary["main"] == {
            "metric": PRIMARY_METRIC[family],
            "value": summary["metrics"][PRIMARY_METRIC[family]],
        }
        assert summary["judge"] is None and summary["answered"] == GOOD_RECORDS[dataset]
    assert seen_routes == set(ROUTES)
    assert load(out / "vpt" / "POPE_action_test" / "scores.json")["metrics"].keys() >= {"accuracy", "f1"}


def test_broken_records_are_reported_and_skipped(vpt_run):
    out, _ = vpt_run
    problems = load(out / "vpt" / "GQA_region_test" / "problems.json")
    assert [p["index"] for p in problems] == [2, 3, 4, 5]
    for problem, expected in zip(problems, BROKEN.values()):
        assert expected in problem["problem"]
    assert load(out / "vpt" / "DocVQA_region_test_8cut" / "problems.json") == []
    summary = load(out / "vpt" / "GQA_region_test" / "scores.json")
    assert (summary["records"], summary["answered"], summary["problems"]) == (6, 2, 4)


def test_baseline_judge_and_reports(vpt_run, data, models, tmp_path, monkeypatch):
    """VPT (resumed: nothing left to answer) and the baseline, judged on a local server; then every report."""
    data_dir, _, expected = data
    out = tmp_path / "run"
    shutil.copytree(vpt_run[0], out)

    loaded, from_pretrained = [], VPTPipeline.from_pretrained.__func__
    monkeypatch.setattr(
        VPTPipeline,
        "from_pretrained",
        classmethod(lambda cls, *args, **kwargs: loaded.append(args) or from_pretrained(cls, *args, **kwargs)),
    )
    def judge(body):
        prompt = body["messages"][0]["content"]
        truth, answer = prompt.rpartition("\nStandard answer: ")[2].split("\nModel's answer: ")
        return 200, "score: 1" if truth == answer else "score: 0.25"

    with FakeOpenAI(judge) as server:
        cfg = eval_config(data_dir, out, models["vpt"][0], models["qwen2vl"][0], extra=["--judge-base-url", server.url])
        results, markdown = ev.evaluate(cfg, baseline_overrides(models, data))
        requests = len(server.requests)
        again, _ = ev.evaluate(cfg, baseline_overrides(models, data))
        assert len(server.requests) == requests  # the judge cache in the output dir answers the rerun
    assert again == results
    assert [Path(args[0]).name for args in loaded] == ["qwen2vl"]  # BaselinePipeline inherits from_pretrained;
    # the VPT model had nothing left to answer, the baseline is loaded once (the rerun has nothing left either)
    assert (out / "judge_cache.jsonl").is_file()
    prompts = [r["body"]["messages"][0]["content"] for r in server.requests]
    assert any(f"Question: <image>\nWhat is in [q00]? \n{REGION_TRIGGER}\n" in p for p in prompts)

    for dataset in RELEASED_TEST_SETS:
        base = load(out / "qwen2vl" / dataset / "final_answers.json")
        for row in base:
            _, truth = expected[dataset, row["index"]]
            assert (row["action"], row["boxes"], row["answer"], row["scores"]["judge"]) == ("none", [], truth, 1.0)
            bare = row["question"].replace(f" \n{REGION_TRIGGER}", "").replace(f"\n{REENCODE_TRIGGER}", "")
            assert row["prompt"] == bare and "answer the question" not in row["prompt"]
        vpt = load(out / "vpt" / dataset / "final_answers.json")
        for row in vpt:
            assert row["scores"]["judge"] == (1.0 if row["answer"] == row["ground_truth"] else 0.25)
            assert row["judge_reply"].startswith("score: ")
        judge_score = results["vpt"][dataset]["judge"]["score"]
        assert judge_score == pytest.approx(sum(r["scores"]["judge"] for r in vpt) / len(vpt))
        assert results["qwen2vl"][dataset]["main"] == {"metric": "judge", "value": 1.0}
        assert load(out / "qwen2vl" / dataset / "settings.json")["mode"] == "free"

    table = load(out / "summary.json")
    assert table["datasets"] == list(RELEASED_TEST_SETS)
    assert set(table["metrics"].values()) == {"judge"}
    assert table["models"]["qwen2vl"]["kind"] == "baseline" and table["models"]["qwen2vl"]["average"] == 1.0
    vpt_scores = [results["vpt"][d]["judge"]["score"] for d in RELEASED_TEST_SETS]
    assert table["models"]["vpt"]["average"] == pytest.approx(sum(vpt_scores) / len(vpt_scores))

    md = (out / "summary.md").read_text()
    assert md in markdown and "| qwen2vl (baseline) | 1.000 |" in md
    assert md.splitlines()[2].startswith("| *metric* | judge | judge |")
    rows = list(csv.reader((out / "summary.csv").open()))
    unscored = [f"unscored {d}" for d in RELEASED_TEST_SETS] + ["unscored"]
    assert rows[0] == ["model", "kind", *RELEASED_TEST_SETS, "average", *unscored]
    assert rows[1][2:14] == ["judge"] * 12
    assert [row[:2] for row in rows[2:]] == [["vpt", "vpt"], ["qwen2vl", "baseline"]]
    assert float(rows[2][14]) == pytest.approx(table["models"]["vpt"]["average"])
    assert rows[2][15:] == ["0"] * 13  # every judge reply held a score
    assert table["models"]["vpt"]["unscored"] == dict.fromkeys(RELEASED_TEST_SETS, 0)
    with Image.open(out / "summary.png") as chart:
        assert chart.format == "PNG" and chart.width > 400

    usage = load(out / "action_usage.json")
    for dataset in RELEASED_TEST_SETS:
        assert usage["qwen2vl"][dataset]["actions"]["none"] == GOOD_RECORDS[dataset]
        actions = [row["action"] for row in load(out / "vpt" / dataset / "final_answers.json")]
        counts = usage["vpt"][dataset]["actions"]
        assert counts["other"] == actions.count("conflict")
        assert all(counts[a] == actions.count(a) for a in ("region", "dino", "sam", "clip", "none"))
    usage_md = (out / "action_usage.md").read_text()
    assert usage_md in markdown and "| qwen2vl | POPE_action_test | 5 | 0 (0%) |" in usage_md


@pytest.mark.parametrize("base", ["qwen2_5_vl", "qwen3_vl"])
def test_other_base_vpt_and_baseline(base, vpt_run, data, tmp_path):
    """A Qwen2.5-VL or Qwen3-VL VPT model takes the same routes on every split as the Qwen2-VL one (same scripts, same
    round-1 texts, boxes and round-2 prompts, which on Qwen3-VL have no default system turn); a plain checkpoint of
    the base is the one-round baseline."""
    data_dir, scripts, expected = data
    root = tmp_path / "models"
    _, processor = build_tiny_vpt(save_dir=root / "vpt_other", base=base)
    _, plain_processor = build_tiny_base(base, save_dir=root / "plain_other")
    system = SYSTEM if processor.apply_chat_template([{"role": "user", "content": "Q"}]).startswith(SYSTEM) else ""
    assert bool(system) == (base != "qwen3_vl")  # Qwen3-VL's template has no default system turn
    out = tmp_path / "run"
    results, _ = ev.evaluate(eval_config(data_dir, out, root / "vpt_other"), scripted(processor, scripts))
    keys = ("index", "action", "round1_text", "boxes", "round2_prompt", "prompt")

    def without_system(answer: dict) -> dict:
        prompt = answer["round2_prompt"]
        return {**answer, "round2_prompt": prompt if prompt is None or system else prompt.removeprefix(SYSTEM)}

    for dataset in RELEASED_TEST_SETS:
        ours = read_jsonl(out / "vpt_other" / dataset / "answers.jsonl")
        theirs = [without_system(a) for a in read_jsonl(vpt_run[0] / "vpt" / dataset / "answers.jsonl")]
        assert [{k: a[k] for k in keys} for a in ours] == [{k: a[k] for k in keys} for a in theirs]
        assert results["vpt_other"][dataset]["answered"] == GOOD_RECORDS[dataset]

    answers = {f"[q{k:02d}]": answer for k, (_, answer) in enumerate(expected.values())}
    datasets = ["GQA_region_test", "POPE_action_test"]
    cfg = eval_config(data_dir, out, root / "vpt_other", root / "plain_other", extra=["--datasets", *datasets])
    results, _ = ev.evaluate(cfg, scripted(plain_processor, answers))  # the VPT model has nothing left to answer
    assert {name: model["kind"] for name, model in load(out / "summary.json")["models"].items()} == {
        "vpt_other": "vpt",
        "plain_other": "baseline",
    }
    for dataset in datasets:
        rows = load(out / "plain_other" / dataset / "final_answers.json")
        assert [(row["action"], row["answer"]) for row in rows] == [
            ("none", expected[dataset, row["index"]][1]) for row in rows
        ]
        assert load(out / "plain_other" / dataset / "settings.json")["mode"] == "free"


def test_resume_after_a_kill_matches_an_uninterrupted_run(data, models, tmp_path, monkeypatch):
    """Sampling (seeded per record): a run killed during its second batch, then resumed, equals a run never killed."""
    data_dir, scripts, _ = data
    model_dir, processor = models["vpt"]
    extra = ["--datasets", "POPE_action_test", "--batch-size", "2", "--no-greedy", "--top-p", "1.0"]
    reference_results, _ = ev.evaluate(
        eval_config(data_dir, tmp_path / "once", model_dir, extra=extra), scripted(processor, scripts)
    )

    run, calls = VPTPipeline.run, []

    def killed_on_second_batch(self, *args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return run(self, *args, **kwargs)

    monkeypatch.setattr(VPTPipeline, "run", killed_on_second_batch)
    resumed = eval_config(data_dir, tmp_path / "killed", model_dir, extra=extra)
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate(resumed, scripted(processor, scripts))
    answers = tmp_path / "killed/vpt/POPE_action_test/answers.jsonl"
    assert [a["index"] for a in read_jsonl(answers)] == [0, 1]
    monkeypatch.setattr(VPTPipeline, "run", run)
    results, _ = ev.evaluate(resumed, scripted(processor, scripts))

    assert [a["index"] for a in read_jsonl(answers)] == [0, 1, 2, 3, 4]
    assert results == reference_results
    for name in ("final_answers.json", "answers.jsonl"):
        assert (tmp_path / "killed/vpt/POPE_action_test" / name).read_text() == (
            tmp_path / "once/vpt/POPE_action_test" / name
        ).read_text()


def test_resume_after_a_cut_off_line(vpt_run, data, models, tmp_path, monkeypatch):
    """A kill in the middle of appending a batch: the cut-off line is dropped, its items and the rest answered."""
    data_dir, scripts, _ = data
    out = tmp_path / "run"
    shutil.copytree(vpt_run[0], out)
    answers = out / "vpt/POPE_action_test/answers.jsonl"
    lines = answers.read_text().splitlines(keepends=True)
    answers.write_text("".join(lines[:2]) + lines[2][: len(lines[2]) // 2])

    asked = []
    run = VPTPipeline.run
    monkeypatch.setattr(
        VPTPipeline, "run", lambda self, texts, *a, **kw: asked.extend(texts) or run(self, texts, *a, **kw)
    )
    model_dir, processor = models["vpt"]
    results, _ = ev.evaluate(eval_config(data_dir, out, model_dir), scripted(processor, scripts))

    assert len(asked) == 3  # records 2, 3 and 4 of POPE, nothing else
    assert results == vpt_run[1]
    assert [a["index"] for a in read_jsonl(answers)] == [0, 1, 2, 3, 4]
    for dataset in RELEASED_TEST_SETS:
        name = f"vpt/{dataset}/final_answers.json"
        assert (out / name).read_text() == (vpt_run[0] / name).read_text()


def test_failures_at_run_time_are_isolated_and_retried(data, models, tmp_path, monkeypatch):
    """An image that fails to decode and a sample whose generation fails are reported; the rest of their batch is
    answered, and a rerun retries exactly them."""
    data_dir, scripts, _ = data
    records = json.loads((data_dir / "POPE_action_test.json").read_text())[:3]
    truncated = tmp_path / "truncated.png"
    draw(truncated, 0)
    truncated.write_bytes(truncated.read_bytes()[:-60])  # the header is fine, the pixel data is not
    records.append(action_record("What is in [q99]?", "Yes", str(truncated)))
    (tmp_path / "data").mkdir()
    (tmp_path / "data/POPE_action_test.json").write_text(json.dumps(records))
    failing = records[1]["messages"][0]["content"]

    run = VPTPipeline.run

    def fails_on_record_1(self, texts, *args, **kwargs):
        if failing in texts:
            raise RuntimeError("boom")
        return run(self, texts, *args, **kwargs)

    monkeypatch.setattr(VPTPipeline, "run", fails_on_record_1)
    model_dir, processor = models["vpt"]
    cfg = eval_config(tmp_path / "data", tmp_path / "out", model_dir, extra=["--media-dir", str(data_dir)])
    results, _ = ev.evaluate(cfg, scripted(processor, scripts))
    folder = tmp_path / "out/vpt/POPE_action_test"
    assert [a["index"] for a in read_jsonl(folder / "answers.jsonl")] == [0, 2]
    problems = load(folder / "problems.json")
    assert [p["index"] for p in problems] == [1, 3]
    assert problems[0]["problem"] == "generation failed: RuntimeError: boom"
    assert problems[1]["problem"].startswith(f"cannot read image {truncated}")

    monkeypatch.setattr(VPTPipeline, "run", run)
    results, _ = ev.evaluate(cfg, scripted(processor, scripts))
    assert [a["index"] for a in read_jsonl(folder / "answers.jsonl")] == [0, 2, 1]
    assert [p["index"] for p in load(folder / "problems.json")] == [3]
    assert results["vpt"]["POPE_action_test"]["answered"] == 3


def test_answer_log_tolerates_a_cut_off_line(tmp_path):
    log = AnswerLog(tmp_path / "answers.jsonl")
    log.append([{"index": 0, "answer": "a"}, {"index": 1, "answer": "b"}])
    log.path.write_text(log.path.read_text() + '{"index": 2, "ans')
    assert list(log.load()) == [0, 1]
    assert log.path.read_text().endswith('"b"}\n')
    log.append([{"index": 2, "answer": "c"}])
    assert list(log.load()) == [0, 1, 2]


def test_region_token_accuracy(data, models, tmp_path):
    """With a meta file of target cells, region answers count as correct when their cell box contains the target."""
    data_dir, _, _ = data
    datasets = ["OI_region_test", "VSR_region_test"]
    images = [f"images/{d}_{i}.png" for d in datasets for i in range(2)]
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"targets": {image: {"cells": [3, 3, 4, 4]} for image in images}}))
    questions = [
        json.loads((data_dir / f"{d}.json").read_text())[i]["messages"][0]["content"]
        for d in datasets
        for i in range(2)
    ]
    keys = [q.split("in ")[1].split("?")[0] for q in questions]
    round1 = [
        box_to_region_text((3, 3, 4, 4)),  # exactly the target: correct
        box_to_region_text((2, 2, 5, 6)),  # contains it: correct
        box_to_region_text((3, 3, 3, 4)),  # contains it only with the crop margin: wrong
        DET.action_triple,  # no region: not counted
    ]
    model_dir, processor = models["vpt"]
    extra = ["--datasets", *datasets, "--region-meta", str(meta)]
    cfg = eval_config(data_dir, tmp_path / "out", model_dir, extra=extra)
    results, markdown = ev.evaluate(cfg, scripted(processor, dict(zip(keys, round1))))
    assert results["vpt"]["OI_region_test"]["region_accuracy"] == {"correct": 2, "total": 2, "accuracy": 1.0}
    assert results["vpt"]["VSR_region_test"]["region_accuracy"] == {"correct": 0, "total": 1, "accuracy": 0.0}
    hits = [
        row["scores"].get("region_hit")
        for d in datasets
        for row in load(tmp_path / "out/vpt" / d / "final_answers.json")
    ]
    assert hits == [True, True, False, None]
    assert "| vpt | OI_region_test | 2 | 2 (100%) |" in markdown and "| 2/2 (100%) |" in markdown
    assert load(tmp_path / "out/action_usage.json")["vpt"]["VSR_region_test"]["region_accuracy"]["total"] == 1


def test_oracle_replays_the_records_round_one(models, tmp_path):
    """--oracle: round 2 runs on each record's own ground-truth round-1 turn, whatever the model would generate;
    records without one are problems; the setting is part of what a rerun is checked against."""
    data_dir = tmp_path / "data"
    (data_dir / "images").mkdir(parents=True)
    for k in range(3):
        draw(data_dir / f"images/{k}.png", k)
    records = [
        region_record("Where is [o0]?", "red", "images/0.png"),
        action_record("Where is [o1]?", "blue", "images/1.png"),
        record(["<image>\nWhere is [o2]?", "green"], ["images/2.png"]),  # one round: nothing to replay
    ]
    (data_dir / "mixed_test.json").write_text(json.dumps(records))
    model_dir, _ = models["vpt"]
    out = tmp_path / "out"
    results, _ = ev.evaluate(eval_config(data_dir, out, model_dir, extra=["--oracle"]))
    answers = load(out / "vpt/mixed_test/final_answers.json")
    assert [(a["round1_text"], a["action"]) for a in answers] == [(SPAN_A, "region"), (DET.action_triple, "dino")]
    problems = load(out / "vpt/mixed_test/problems.json")
    assert [(p["index"], "no first assistant turn" in p["problem"]) for p in problems] == [(2, True)]
    assert load(out / "vpt/mixed_test/settings.json")["oracle"] is True
    with pytest.raises(ev.ConfigError, match="other settings \\(oracle\\)"):
        ev.evaluate(eval_config(data_dir, out, model_dir))


def test_trigger_modes():
    question = f"<image>\nWhat is it? \n{REGION_TRIGGER}"
    assert prompt_for_mode(question, "keep") == question
    assert prompt_for_mode(question, "region") == question
    assert prompt_for_mode(question, "reencode") == f"<image>\nWhat is it?\n{REENCODE_TRIGGER}"
    assert prompt_for_mode(question, "free") == "<image>\nWhat is it?"
    assert prompt_for_mode(f"{REENCODE_TRIGGER}\n<image>\nWhat is it?", "free") == "<image>\nWhat is it?"


def test_cli_on_synthetic_data(models, tmp_path, capsys):
    """The command line on make_synthetic_data output: split discovery, unknown split names, the region meta hook."""
    synth.generate(tmp_path / "data", train_size=0, alignment_size=0, test_size=3, image_size=224)
    out = tmp_path / "out"
    argv = [
        "--model",
        f"tiny={models['vpt'][0]}",
        "--data-dir",
        str(tmp_path / "data"),
        "--output-dir",
        str(out),
        "--region-meta",
        str(tmp_path / "data/synthetic_meta.json"),
        "--limit",
        "2",
        "--max-new-tokens",
        "6",
        "--max-image-side",
        "64",
        "--device",
        "cpu",
        "--greedy",
    ]
    assert ev.main(argv) == 0
    printed = capsys.readouterr().out
    splits = ["synthetic_action_test", "synthetic_plain_test", "synthetic_region_test"]
    table = load(out / "summary.json")
    assert table["datasets"] == splits  # *_test*.json only: no train, meta or dataset_info files
    scores = table["models"]["tiny"]["scores"]
    assert set(scores) == set(splits) and all(0.0 <= v <= 1.0 for v in scores.values())  # synthetic -> vqa family
    assert "| *metric* | vqa_accuracy | vqa_accuracy | vqa_accuracy |" in printed and "## Action usage" in printed
    assert all(load(out / "tiny" / s / "scores.json")["answered"] == 2 for s in splits)
    log = (out / "evaluation.log").read_text()
    assert "synthetic_region_test: 2 records to evaluate" in log

    assert ev.main([*argv, "--mode", "free"]) == 2  # other settings than the answers in --output-dir
    assert "holds answers made with other settings (mode)" in (out / "evaluation.log").read_text()


def test_usage_errors_and_nothing_to_evaluate(data, models, tmp_path, capsys):
    data_dir, _, _ = data
    model = str(models["vpt"][0])
    with pytest.raises(SystemExit) as exit_info:
        ev.main(["--model", model])
    assert exit_info.value.code == 2 and "--data-dir" in capsys.readouterr().err
    base = ["--model", model, "--data-dir", str(data_dir), "--output-dir", str(tmp_path / "out")]
    assert ev.main([*base, "--datasets", "NoSuch_test"]) == 2
    assert ev.main(["--model", str(tmp_path), *base[2:]]) == 2  # not a model directory
    assert ev.main([*base, "--model", f"vpt={models['qwen2vl'][0]}"]) == 2  # two models named vpt
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text('{"model_type": "llama"}')
    capsys.readouterr()
    assert ev.main(["--model", str(llama), *base[2:]]) == 2
    assert (
        "model_type 'llama' is neither a VPT model (qwen2_vl_vpt, vrt_qwen2_vl, qwen2_5_vl_vpt, qwen3_vl_vpt) nor a "
        "plain base model (qwen2_vl, qwen2_5_vl, qwen3_vl)" in capsys.readouterr().err
    )

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "GQA_region_test.json").write_text(json.dumps([record(["<image>\nQ?"], ["nope.png"])]))
    assert ev.main(["--model", model, "--data-dir", str(broken), "--output-dir", str(tmp_path / "none")]) == 1


def test_yaml_config(tmp_path):
    path = tmp_path / "eval.yaml"
    path.write_text("model: [a, b=c]\ndata_dir: data\ndatasets: POPE_action_test\ngreedy: true\nlimit: 5\n")
    cfg = ev.parse_config(["--config", str(path), "--limit", "7", "--model", "d"])
    assert (cfg.model, cfg.data_dir, cfg.datasets, cfg.greedy, cfg.limit) == (
        ["d"],
        "data",
        ["POPE_action_test"],
        True,
        7,
    )
    assert cfg.generation_kwargs() == {"do_sample": False, "max_new_tokens": 1024}
    assert ev.parse_config(["--config", str(path), "--no-greedy"]).generation_kwargs() == {
        "do_sample": True,
        "top_k": 10,
        "top_p": 0.1,
        "temperature": 0.95,
        "max_new_tokens": 1024,
    }
    example = ev.parse_config(["--config", str(ROOT / "evaluation/evaluation.yaml")])
    assert example.datasets == list(RELEASED_TEST_SETS) and example.limit == 1000
    path.write_text("model: a\ndata_dir: data\nbatch: 3\n")
    with pytest.raises(SystemExit):
        ev.parse_config(["--config", str(path)])


def test_script_help(tmp_path):
    """`python evaluation/evaluation.py` works from any folder: the thin entry calls the installed package."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "evaluation/evaluation.py"), "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.startswith("usage: evaluation.py ")
    assert "--judge-base-url" in done.stdout and "answers.jsonl" in done.stdout and "POPE_action_test" in done.stdout
    assert "torchrun --nproc-per-node" in done.stdout


def test_installed_command_help(tmp_path):
    """`vpt-eval` is the installed console script of `transformers_vpt.evaluation.evaluation:main`; the library is
    `transformers_vpt.evaluation` and nothing installs a top-level `evaluation`."""
    done = subprocess.run(
        [str(Path(sys.executable).parent / "vpt-eval"), "--help"], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: vpt-eval ") and "--judge-base-url" in done.stdout
    probe = (  # outside the repository (pytest puts it on sys.path): what the installation provides
        "import importlib.metadata as m, importlib.util as u; print(u.find_spec('evaluation'), "
        "[p.value for p in m.entry_points(group='console_scripts') if p.name == 'vpt-eval'])"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["None", "['transformers_vpt.evaluation.evaluation:main']"]
    assert Path(ev.__file__) == ROOT / "transformers_vpt/evaluation/evaluation.py"


def test_no_script_edits_sys_path():
    """Scripts are thin command lines over installed modules (DevNote): none of evaluation/ or scripts/ touches
    ``sys.path``, and evaluation/ holds only the command's entry and its example config."""
    offenders = []
    for path in sorted([*(ROOT / "evaluation").glob("*.py"), *(ROOT / "scripts").glob("*.py")]):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", "") == "sys":
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []
    assert sorted(p.name for p in (ROOT / "evaluation").iterdir() if p.name != "__pycache__") == [
        "evaluation.py",
        "evaluation.yaml",
    ]
